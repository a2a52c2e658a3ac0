//! rmc-arbiter: fencing through etcd, so that there can never be two primaries.
//!
//! The primary holds the key `{prefix}/primary`, attached to an etcd lease that a
//! [`LeaseKeeper`] renews on its own thread. The key's create_revision is the fencing token of
//! that primary term. A standby takes over only by winning a [`Arbiter::campaign`]: one etcd
//! transaction that creates `{prefix}/primary` if and only if it does not exist (and, when
//! asked, only if `{prefix}/standby` names the backup the standby holds, see
//! [`Arbiter::mark_standby`]). The primary stops emitting anything as soon as
//! [`LeaseKeeper::is_valid`] turns false, which happens *before* etcd could have expired its
//! lease, so the old and the new primary never overlap.
//!
//! # Why not the etcd-client crate
//! etcd-client brings tokio and tonic and needs `protoc` at build time. We need a handful of
//! unary calls, so we speak to etcd's v3 JSON gRPC gateway (`POST /v3/kv/txn` and friends)
//! over a small blocking HTTP client ([`ureq`], plain http, no TLS). Keys and values are base64
//! in that JSON, and int64 fields come back as JSON strings. Every request carries the
//! caller's timeout (connect and whole request).

mod endpoint;
mod keeper;
pub mod testing;

use std::fmt;
use std::io::Read;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

pub use endpoint::Endpoint;
pub use keeper::{LeaseGate, LeaseKeeper};

/// An error talking to the arbiter (etcd).
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// Could not connect, timed out, or the connection failed mid-request.
    #[error("Cannot reach the arbiter at {endpoint}: {cause}")]
    Unreachable {
        /// The endpoint we tried, as `etcd://HOST:PORT/prefix`.
        endpoint: String,
        /// What went wrong underneath (in the message, not a separate source, so that error
        /// chains do not say it twice).
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// etcd answered with a status other than 200.
    #[error("the arbiter answered HTTP {status}: {body}")]
    Http {
        /// The HTTP status.
        status: u16,
        /// The start of the response body (about 300 characters at most).
        body: String,
    },
    /// A response that does not parse as what etcd should have answered.
    #[error("unexpected answer from the arbiter: {0}")]
    Protocol(String),
    /// The lease (its id here) has expired or does not exist (any more).
    #[error("arbiter lease {0} ({0:#x}) has expired or does not exist")]
    LeaseExpired(i64),
}

/// A granted etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The lease id.
    pub id: i64,
    /// The TTL etcd granted (may be more than asked: etcd has a minimum TTL).
    pub ttl: Duration,
}

/// What a campaign requires of `{prefix}/standby`.
#[derive(Debug, Clone, Copy)]
enum StandbyRule<'a> {
    /// Nothing.
    Any,
    /// It names this session.
    Is(&'a str),
    /// It does not exist.
    Absent,
}

/// What a campaign found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// We hold `{prefix}/primary` now; `revision` is the key's create_revision (the fencing
    /// token, unique per primary term).
    Won {
        /// create_revision of our `{prefix}/primary` key.
        revision: i64,
    },
    /// Someone else holds the primary key: its value and create_revision, and its lease id.
    Held {
        /// The value of `{prefix}/primary` (the holder's name).
        holder: String,
        /// Its create_revision (the holder's fencing token).
        revision: i64,
        /// The lease the key is attached to (0 if none).
        lease: i64,
    },
    /// The primary key is free but `{prefix}/standby` does not hold the token we required:
    /// the backup we hold is not the current one (the primary ran on without us).
    StaleBackup {
        /// The value of `{prefix}/standby`, if the key exists.
        current: Option<String>,
    },
}

/// A client of the arbiter: etcd's v3 JSON gateway at one [`Endpoint`].
///
/// Cheap to clone: clones share one HTTP agent (and its connection pool).
#[derive(Clone)]
pub struct Arbiter {
    endpoint: Endpoint,
    timeout: Duration,
    agent: ureq::Agent,
    base_url: String,
    display: String,
}

impl fmt::Debug for Arbiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arbiter")
            .field("endpoint", &self.display)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A key/value as etcd's range returns it.
#[derive(Debug)]
struct Kv {
    value: String,
    create_revision: i64,
    lease: i64,
}

/// How much of an error body we keep, in bytes.
const MAX_ERROR_BODY: usize = 300;

impl Arbiter {
    /// A client of `endpoint`; every request (connect included) is bounded by
    /// `request_timeout`.
    pub fn new(endpoint: Endpoint, request_timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(request_timeout))
            .timeout_connect(Some(request_timeout))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let base_url = format!("http://{}", endpoint.host_port());
        let display = endpoint.to_string();
        Arbiter {
            endpoint,
            timeout: request_timeout,
            agent,
            base_url,
            display,
        }
    }

    /// The same arbiter over a new HTTP agent (its own connections).
    pub(crate) fn with_own_connection(&self) -> Self {
        Arbiter::new(self.endpoint.clone(), self.timeout)
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The per-request timeout given to [`Arbiter::new`].
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// Grants a lease of `ttl`, in whole seconds rounded up, at least 1 s. etcd may grant more
    /// (its minimum TTL): the returned [`Lease::ttl`] is what it granted.
    pub fn grant(&self, ttl: Duration) -> Result<Lease, ArbiterError> {
        let secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
        let v = self.post("/v3/lease/grant", &json!({ "TTL": secs.to_string() }))?;
        if let Some(err) = v.get("error") {
            return Err(ArbiterError::Protocol(format!("lease grant failed: {err}")));
        }
        let id = int_field(&v, "ID")?;
        let granted = int_field(&v, "TTL")?;
        if granted <= 0 {
            return Err(ArbiterError::Protocol(format!(
                "lease grant returned TTL {granted}"
            )));
        }
        Ok(Lease {
            id,
            ttl: Duration::from_secs(granted as u64),
        })
    }

    /// Renews `lease` once; returns the TTL etcd granted. [`ArbiterError::LeaseExpired`] when
    /// etcd says the lease has expired or does not exist.
    pub fn keep_alive(&self, lease: i64) -> Result<Duration, ArbiterError> {
        // The gateway answers with a stream of newline-separated JSON objects, one per
        // keepalive response: {"result":{"header":..,"ID":"..","TTL":".."}}. TTL is absent
        // when the lease has expired. We read the first object only.
        let url = format!("{}/v3/lease/keepalive", self.base_url);
        let body = json!({ "ID": lease.to_string() }).to_string();
        let resp = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(&body)
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let mut reader = resp.into_body().into_reader();
        if status != 200 {
            let mut text = String::new();
            let _ = reader.by_ref().take(64 * 1024).read_to_string(&mut text);
            if is_lease_not_found(&text) {
                return Err(ArbiterError::LeaseExpired(lease));
            }
            return Err(http_error(status, &text));
        }
        let first = serde_json::Deserializer::from_reader(reader)
            .into_iter::<Value>()
            .next();
        let v = match first {
            None => {
                return Err(ArbiterError::Protocol(
                    "empty lease keepalive stream".to_string(),
                ))
            }
            Some(Err(e)) if e.is_io() => return Err(self.unreachable(e)),
            Some(Err(e)) => {
                return Err(ArbiterError::Protocol(format!(
                    "lease keepalive stream: {e}"
                )))
            }
            Some(Ok(v)) => v,
        };
        if let Some(err) = v.get("error") {
            if is_lease_not_found(&err.to_string()) {
                return Err(ArbiterError::LeaseExpired(lease));
            }
            return Err(ArbiterError::Protocol(format!(
                "lease keepalive failed: {err}"
            )));
        }
        let result = v.get("result").ok_or_else(|| {
            ArbiterError::Protocol(format!("lease keepalive answer without result: {v}"))
        })?;
        match opt_int_field(result, "TTL")? {
            Some(ttl) if ttl > 0 => Ok(Duration::from_secs(ttl as u64)),
            _ => Err(ArbiterError::LeaseExpired(lease)),
        }
    }

    /// The remaining TTL of `lease` as etcd sees it now. [`ArbiterError::LeaseExpired`] when
    /// it has expired or does not exist.
    pub fn time_to_live(&self, lease: i64) -> Result<Duration, ArbiterError> {
        let v = self.post("/v3/lease/timetolive", &json!({ "ID": lease.to_string() }))?;
        match opt_int_field(&v, "TTL")? {
            Some(ttl) if ttl > 0 => Ok(Duration::from_secs(ttl as u64)),
            _ => Err(ArbiterError::LeaseExpired(lease)),
        }
    }

    /// Revokes `lease` (deleting the keys attached to it). Revoking an unknown lease is Ok.
    pub fn revoke(&self, lease: i64) -> Result<(), ArbiterError> {
        match self.post("/v3/lease/revoke", &json!({ "ID": lease.to_string() })) {
            Ok(_) => Ok(()),
            Err(ArbiterError::Http { body, .. }) if is_lease_not_found(&body) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One txn: IF create_revision(`{prefix}/primary`) == 0 [AND value(`{prefix}/standby`) ==
    /// token, when `standby_token` is Some] THEN put `{prefix}/primary` = `me` with `lease`
    /// ELSE range both keys; returns [`Campaign::Won`], [`Campaign::Held`] or
    /// [`Campaign::StaleBackup`] accordingly.
    ///
    /// A compare on the value of a key that does not exist is false in etcd: with a token
    /// required, an absent standby key gives `StaleBackup { current: None }`.
    /// If `lease` does not exist (any more), [`ArbiterError::LeaseExpired`].
    pub fn campaign(
        &self,
        me: &str,
        lease: i64,
        standby_token: Option<&str>,
    ) -> Result<Campaign, ArbiterError> {
        let rule = match standby_token {
            Some(t) => StandbyRule::Is(t),
            None => StandbyRule::Any,
        };
        self.campaign_with(me, lease, rule)
    }

    /// A campaign for a VM that starts afresh: wins only if no host is primary AND no standby
    /// holds the VM's current state (`{prefix}/standby` absent). When a standby record exists
    /// the answer is `StaleBackup { current: Some(token) }`: that standby's checkpoint, not a
    /// new VM, is the VM's state.
    pub fn campaign_fresh(&self, me: &str, lease: i64) -> Result<Campaign, ArbiterError> {
        self.campaign_with(me, lease, StandbyRule::Absent)
    }

    fn campaign_with(
        &self,
        me: &str,
        lease: i64,
        rule: StandbyRule<'_>,
    ) -> Result<Campaign, ArbiterError> {
        let primary = self.key("primary");
        let standby = self.key("standby");
        let mut compare = vec![json!({
            "key": primary, "target": "CREATE", "result": "EQUAL", "create_revision": "0"
        })];
        match rule {
            StandbyRule::Any => {}
            StandbyRule::Is(token) => compare.push(json!({
                "key": standby, "target": "VALUE", "result": "EQUAL", "value": B64.encode(token)
            })),
            StandbyRule::Absent => compare.push(json!({
                "key": standby, "target": "CREATE", "result": "EQUAL", "create_revision": "0"
            })),
        }
        let txn = json!({
            "compare": compare,
            "success": [{ "request_put": {
                "key": primary, "value": B64.encode(me), "lease": lease.to_string()
            }}],
            "failure": [
                { "request_range": { "key": primary } },
                { "request_range": { "key": standby } },
            ],
        });
        let v = match self.post("/v3/kv/txn", &txn) {
            Err(ArbiterError::Http { body, .. }) if is_lease_not_found(&body) => {
                return Err(ArbiterError::LeaseExpired(lease))
            }
            r => r?,
        };
        if succeeded(&v) {
            // The put created the key in this txn: its create_revision is the txn's revision.
            let revision = v
                .get("header")
                .map(|h| int_field(h, "revision"))
                .transpose()?
                .ok_or_else(|| ArbiterError::Protocol(format!("txn answer without header: {v}")))?;
            return Ok(Campaign::Won { revision });
        }
        let ranges = txn_ranges(&v, 2)?;
        if let Some(kv) = first_kv(&ranges[0])? {
            return Ok(Campaign::Held {
                holder: kv.value,
                revision: kv.create_revision,
                lease: kv.lease,
            });
        }
        if matches!(rule, StandbyRule::Any) {
            return Err(ArbiterError::Protocol(format!(
                "campaign txn failed but {} is free: {v}",
                self.key("primary")
            )));
        }
        let current = first_kv(&ranges[1])?.map(|kv| kv.value);
        Ok(Campaign::StaleBackup { current })
    }

    /// One txn guarded by "`{prefix}/primary` has create_revision == `revision`": put
    /// `{prefix}/standby` = `token` (with no lease: it must outlive the primary). Ok(false) when
    /// the guard failed (we are no longer primary).
    pub fn mark_standby(&self, revision: i64, token: &str) -> Result<bool, ArbiterError> {
        self.guarded(
            revision,
            json!({ "request_put": { "key": self.key("standby"), "value": B64.encode(token) } }),
        )
    }

    /// One txn guarded by "`{prefix}/primary` has create_revision == `revision`": deletes
    /// `{prefix}/standby`. Ok(false) when the guard failed (we are no longer primary).
    pub fn clear_standby(&self, revision: i64) -> Result<bool, ArbiterError> {
        self.guarded(
            revision,
            json!({ "request_delete_range": { "key": self.key("standby") } }),
        )
    }

    /// The current holder of `{prefix}/primary`: (value, create_revision, lease), or None.
    pub fn primary(&self) -> Result<Option<(String, i64, i64)>, ArbiterError> {
        Ok(self
            .get(&self.key("primary"))?
            .map(|kv| (kv.value, kv.create_revision, kv.lease)))
    }

    /// The value of `{prefix}/standby`, or None.
    pub fn standby_token(&self) -> Result<Option<String>, ArbiterError> {
        Ok(self.get(&self.key("standby"))?.map(|kv| kv.value))
    }

    fn guarded(&self, revision: i64, op: Value) -> Result<bool, ArbiterError> {
        let txn = json!({
            "compare": [{
                "key": self.key("primary"), "target": "CREATE", "result": "EQUAL",
                "create_revision": revision.to_string()
            }],
            "success": [op],
        });
        let v = self.post("/v3/kv/txn", &txn)?;
        Ok(succeeded(&v))
    }

    fn get(&self, key_b64: &str) -> Result<Option<Kv>, ArbiterError> {
        let v = self.post("/v3/kv/range", &json!({ "key": key_b64 }))?;
        first_kv(&v)
    }

    /// `{prefix}/{name}`, base64-encoded.
    fn key(&self, name: &str) -> String {
        B64.encode(format!("{}/{}", self.endpoint.prefix, name))
    }

    fn unreachable(&self, e: impl std::error::Error + Send + Sync + 'static) -> ArbiterError {
        ArbiterError::Unreachable {
            endpoint: self.display.clone(),
            cause: Box::new(e),
        }
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, ArbiterError> {
        let url = format!("{}{}", self.base_url, path);
        let mut resp = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(&body.to_string())
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        if status != 200 {
            return Err(http_error(status, &text));
        }
        serde_json::from_str(&text).map_err(|e| {
            ArbiterError::Protocol(format!("{path}: {e}: {}", truncate(&text, MAX_ERROR_BODY)))
        })
    }
}

fn http_error(status: u16, body: &str) -> ArbiterError {
    ArbiterError::Http {
        status,
        body: truncate(body, MAX_ERROR_BODY).to_string(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn is_lease_not_found(text: &str) -> bool {
    text.contains("requested lease not found")
}

fn succeeded(txn: &Value) -> bool {
    txn.get("succeeded")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The `request_range` answers of a failed txn (etcd omits empty fields, so an absent entry
/// is an empty range).
fn txn_ranges(txn: &Value, n: usize) -> Result<Vec<Value>, ArbiterError> {
    let responses = txn
        .get("responses")
        .and_then(Value::as_array)
        .ok_or_else(|| ArbiterError::Protocol(format!("txn answer without responses: {txn}")))?;
    if responses.len() != n {
        return Err(ArbiterError::Protocol(format!(
            "txn answer with {} responses, expected {n}: {txn}",
            responses.len()
        )));
    }
    responses
        .iter()
        .map(|r| {
            r.get("response_range")
                .cloned()
                .ok_or_else(|| ArbiterError::Protocol(format!("expected a range response: {r}")))
        })
        .collect()
}

/// The first kv of a range answer, if any.
fn first_kv(range: &Value) -> Result<Option<Kv>, ArbiterError> {
    let Some(kvs) = range.get("kvs") else {
        return Ok(None);
    };
    let Some(kv) = kvs.as_array().and_then(|a| a.first()) else {
        return Ok(None);
    };
    let value = match kv.get("value").and_then(Value::as_str) {
        None => String::new(),
        Some(b) => {
            let bytes = B64
                .decode(b)
                .map_err(|e| ArbiterError::Protocol(format!("bad base64 value {b:?}: {e}")))?;
            String::from_utf8(bytes)
                .map_err(|e| ArbiterError::Protocol(format!("value is not UTF-8: {e}")))?
        }
    };
    Ok(Some(Kv {
        value,
        create_revision: int_field(kv, "create_revision")?,
        lease: opt_int_field(kv, "lease")?.unwrap_or(0),
    }))
}

/// An int64 field: etcd's gateway sends them as strings; accept numbers too. None if absent.
fn opt_int_field(v: &Value, name: &str) -> Result<Option<i64>, ArbiterError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| ArbiterError::Protocol(format!("field {name} is not an int64: {s:?}"))),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| ArbiterError::Protocol(format!("field {name} is not an int64: {n}"))),
        Some(other) => Err(ArbiterError::Protocol(format!(
            "field {name} is not an int64: {other}"
        ))),
    }
}

fn int_field(v: &Value, name: &str) -> Result<i64, ArbiterError> {
    opt_int_field(v, name)?
        .ok_or_else(|| ArbiterError::Protocol(format!("missing field {name} in {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(200);
        let t = truncate(&s, 301);
        assert_eq!(t.len(), 300);
        assert_eq!(truncate("abc", 300), "abc");
    }

    #[test]
    fn int_fields() {
        let v = json!({ "a": "12", "b": 7, "c": "x" });
        assert_eq!(opt_int_field(&v, "a").unwrap(), Some(12));
        assert_eq!(opt_int_field(&v, "b").unwrap(), Some(7));
        assert!(opt_int_field(&v, "c").is_err());
        assert_eq!(opt_int_field(&v, "d").unwrap(), None);
        assert!(int_field(&v, "d").is_err());
    }

    #[test]
    fn kv_parsing() {
        let r = json!({ "kvs": [{ "key": "eA==", "value": B64.encode("me"),
            "create_revision": "5", "lease": "77" }], "count": "1" });
        let kv = first_kv(&r).unwrap().unwrap();
        assert_eq!(
            (kv.value.as_str(), kv.create_revision, kv.lease),
            ("me", 5, 77)
        );
        assert!(first_kv(&json!({ "header": {} })).unwrap().is_none());
    }
}
