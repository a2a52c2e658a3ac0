//! `etcd://HOST:PORT[/prefix]`.

use std::fmt;
use std::str::FromStr;

/// Where the arbiter is and which part of its key space is ours:
/// `etcd://HOST:PORT[/prefix]`. The prefix defaults to [`Endpoint::DEFAULT_PREFIX`]; it must
/// start with '/' and must not end with '/'. An IPv6 host is written in brackets:
/// `etcd://[::1]:2379`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// etcd's client port.
    pub port: u16,
    /// Key prefix: our keys are `{prefix}/primary` and `{prefix}/standby`.
    pub prefix: String,
}

impl Endpoint {
    /// The prefix when the endpoint names none.
    pub const DEFAULT_PREFIX: &'static str = "/rmc/default";

    /// `HOST:PORT` as it goes in a URL (IPv6 in brackets).
    pub(crate) fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

const EXPECTED: &str = "expected etcd://HOST:PORT[/prefix]";

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{EXPECTED}, got {s:?} (missing etcd://)"))?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, Endpoint::DEFAULT_PREFIX),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{EXPECTED}, got {s:?} (unclosed '[')"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("{EXPECTED}, got {s:?} (missing :PORT)"))?;
            (host, port)
        } else {
            authority
                .rsplit_once(':')
                .ok_or_else(|| format!("{EXPECTED}, got {s:?} (missing :PORT)"))?
        };
        if host.is_empty() {
            return Err(format!("{EXPECTED}, got {s:?} (empty HOST)"));
        }
        if host.contains(['/', '@', '[', ']'])
            || (host.contains(':') && !authority.starts_with('['))
        {
            return Err(format!("{EXPECTED}, got {s:?} (bad HOST {host:?})"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{EXPECTED}, got {s:?} (bad PORT {port:?})"))?;
        if port == 0 {
            return Err(format!("{EXPECTED}, got {s:?} (PORT 0)"));
        }
        if prefix.len() < 2 || prefix.ends_with('/') {
            return Err(format!(
                "{EXPECTED}, got {s:?} (the prefix must start with '/' and not end with '/')"
            ));
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
            prefix: prefix.to_string(),
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}{}", self.host_port(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_round_trip() {
        let e: Endpoint = "etcd://10.0.0.1:2379".parse().unwrap();
        assert_eq!(
            e,
            Endpoint {
                host: "10.0.0.1".into(),
                port: 2379,
                prefix: "/rmc/default".into()
            }
        );
        assert_eq!(e.to_string(), "etcd://10.0.0.1:2379/rmc/default");
        for s in [
            "etcd://localhost:2379/a",
            "etcd://[::1]:2379/rmc/vm1",
            "etcd://h:1/x/y",
        ] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
            assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        }
        let e: Endpoint = "etcd://[::1]:2379".parse().unwrap();
        assert_eq!(e.host, "::1");
        assert_eq!(e.host_port(), "[::1]:2379");
    }

    #[test]
    fn rejects_bad_endpoints() {
        for s in [
            "http://h:1",
            "etcd://h",
            "etcd://:1",
            "etcd://h:x",
            "etcd://h:0",
            "etcd://h:70000",
            "etcd://h:1/",
            "etcd://h:1/a/",
            "etcd://::1:2379",
            "etcd://[::1:2379",
            "",
        ] {
            let err = s.parse::<Endpoint>().unwrap_err();
            assert!(
                err.contains("expected etcd://HOST:PORT[/prefix]"),
                "{s}: {err}"
            );
        }
    }
}
