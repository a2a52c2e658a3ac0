//! One connection between a primary and its standby, over TCP or RDMA, behind the same
//! byte-stream halves ([`Rx`]: `Read`, [`Tx`]: `Write`) that [`crate::framing::FrameReader`] and
//! [`crate::framing::FrameWriter`] frame. The one difference the protocol code sees is
//! [`Tx::rdma`]: on RDMA, epoch bodies are placed by RDMA WRITE instead of streamed.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::framing::LinkError;
use crate::rdma;
use crate::rdma_devices;
use crate::tcp;

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// RDMA (verbs + rdma_cm): RoCE or InfiniBand.
    Rdma,
    /// RDMA when a usable device and route exist, TCP otherwise.
    Auto,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "rdma" => Ok(Transport::Rdma),
            "auto" => Ok(Transport::Auto),
            other => Err(format!("unknown transport {other:?} (tcp, rdma or auto)")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Rdma => "rdma",
            Transport::Auto => "auto",
        })
    }
}

/// Why `auto` would not use RDMA for local address `ip` (`None`: it would). `ip` unspecified
/// means any usable device will do.
pub fn rdma_unusable(ip: IpAddr) -> Option<String> {
    let devices = match rdma_devices::list(Path::new(rdma_devices::SYSFS_ROOT)) {
        Ok(d) => d,
        Err(e) => return Some(e.to_string()),
    };
    if ip.is_unspecified() {
        let usable = devices
            .iter()
            .any(|d| d.ports.iter().any(|p| p.unusable_reason().is_none()));
        return (!usable).then(|| {
            format!(
                "no usable RDMA port among {} device(s) (see `rmc devices`)",
                devices.len()
            )
        });
    }
    match rdma_devices::device_for_ip(&devices, ip) {
        Some((_, p, _)) => p.unusable_reason(),
        None => Some(format!(
            "no RDMA device has a GID for {ip} (see `rmc devices`)"
        )),
    }
}

/// The IP address of the first usable RDMA port (its RoCE v2 GID), if any: where a standby
/// can listen for RDMA on this host.
pub fn first_rdma_ip() -> Option<IpAddr> {
    let devices = rdma_devices::list(Path::new(rdma_devices::SYSFS_ROOT)).ok()?;
    let ips: Vec<IpAddr> = devices
        .iter()
        .flat_map(|d| d.ports.iter())
        .filter(|p| p.unusable_reason().is_none())
        .flat_map(|p| p.gids.iter().filter_map(|g| g.ip()))
        .collect();
    // IPv4 first; an IPv6 link-local address would need a scope id to be usable.
    let v4 = ips.iter().find(|ip| ip.is_ipv4());
    let v6 = ips.iter().find(|ip| match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        IpAddr::V4(_) => false,
    });
    v4.or(v6).copied()
}

/// A listening endpoint of either transport.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// RDMA (rdma_cm).
    Rdma(rdma::Listener),
}

impl Listener {
    /// Listens on `addr` with `transport`; `auto` picks RDMA if a usable device serves `addr`
    /// and says why not otherwise (second value).
    pub fn bind(addr: SocketAddr, transport: Transport) -> io::Result<(Listener, String)> {
        match transport {
            Transport::Tcp => Ok((Listener::Tcp(TcpListener::bind(addr)?), "asked for".into())),
            Transport::Rdma => Ok((
                Listener::Rdma(rdma::Listener::bind(addr)?),
                "asked for".into(),
            )),
            Transport::Auto => match rdma_unusable(addr.ip()) {
                None => match rdma::Listener::bind(addr) {
                    Ok(l) => Ok((
                        Listener::Rdma(l),
                        "auto: a usable RDMA device serves this address".into(),
                    )),
                    Err(e) => Ok((
                        Listener::Tcp(TcpListener::bind(addr)?),
                        format!("auto: RDMA listener failed ({e})"),
                    )),
                },
                Some(why) => Ok((
                    Listener::Tcp(TcpListener::bind(addr)?),
                    format!("auto: {why}"),
                )),
            },
        }
    }

    /// The transport listened on.
    pub fn transport(&self) -> Transport {
        match self {
            Listener::Tcp(_) => Transport::Tcp,
            Listener::Rdma(_) => Transport::Rdma,
        }
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        match self {
            Listener::Tcp(l) => l.local_addr().expect("bound listener"),
            Listener::Rdma(l) => l.local_addr(),
        }
    }

    /// Waits for and accepts one connection.
    pub fn accept(&self) -> io::Result<(Conn, SocketAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                Ok((Conn::Tcp(s), peer))
            }
            Listener::Rdma(l) => {
                let c = l.accept()?;
                let peer = c.peer();
                Ok((Conn::Rdma(c), peer))
            }
        }
    }
}

/// A connection of either transport.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// RDMA.
    Rdma(rdma::Connection),
}

impl Conn {
    /// Connects to `addr` with `transport`. With `auto` it tries RDMA first and falls back to
    /// TCP when RDMA cannot reach the peer; the second value says what was chosen and why.
    pub fn connect(
        addr: SocketAddr,
        transport: Transport,
        timeout: Duration,
    ) -> Result<(Conn, String), LinkError> {
        let io = |source| LinkError::Io {
            what: "connecting to the standby over RDMA",
            source,
        };
        match transport {
            Transport::Tcp => Ok((Conn::Tcp(tcp::connect(addr, timeout)?), "asked for".into())),
            Transport::Rdma => Ok((
                Conn::Rdma(rdma::Connection::connect(addr, timeout).map_err(io)?),
                "asked for".into(),
            )),
            Transport::Auto => {
                let why = match rdma_devices::list(Path::new(rdma_devices::SYSFS_ROOT)) {
                    Err(e) => e.to_string(),
                    Ok(d) if d.is_empty() => "no RDMA device".to_string(),
                    Ok(_) => match rdma::Connection::connect(addr, timeout) {
                        Ok(c) => {
                            let why = format!("auto: RDMA reaches {addr} via {}", c.device());
                            return Ok((Conn::Rdma(c), why));
                        }
                        Err(e) => e.to_string(),
                    },
                };
                Ok((
                    Conn::Tcp(tcp::connect(addr, timeout)?),
                    format!("auto: {why}"),
                ))
            }
        }
    }

    /// The transport of this connection.
    pub fn transport(&self) -> Transport {
        match self {
            Conn::Tcp(_) => Transport::Tcp,
            Conn::Rdma(_) => Transport::Rdma,
        }
    }

    /// A handle that closes this connection from another thread, before or after it is
    /// split (a handshake deadline, say).
    pub fn closer(&self) -> io::Result<Closer> {
        match self {
            Conn::Tcp(s) => Ok(Closer::Tcp(s.try_clone()?)),
            Conn::Rdma(c) => Ok(Closer::Rdma(c.closer())),
        }
    }

    /// Splits into the reading and writing halves and a closer. Reads give `WouldBlock` (or
    /// `TimedOut`) after `read_timeout` without data. A send fails after `send_timeout` without
    /// progress: on TCP a write the peer takes no byte of for that long, on RDMA a send that
    /// waits that long for the peer's acknowledgements.
    pub fn split(
        self,
        read_timeout: Duration,
        send_timeout: Duration,
    ) -> Result<(Rx, Tx, Closer), LinkError> {
        let io = |source| LinkError::Io {
            what: "setting up the connection",
            source,
        };
        match self {
            Conn::Tcp(s) => {
                tcp::configure(&s)?;
                s.set_read_timeout(Some(read_timeout)).map_err(io)?;
                // No write may block longer than this: a peer that stops reading (a host that
                // went silent) fails the send instead of stalling the sender for good.
                s.set_write_timeout(Some(send_timeout)).map_err(io)?;
                let r = s.try_clone().map_err(io)?;
                let w = s.try_clone().map_err(io)?;
                Ok((Rx::Tcp(r), Tx::Tcp(w), Closer::Tcp(s)))
            }
            Conn::Rdma(c) => {
                let (r, w, k) = c.split(read_timeout, send_timeout);
                Ok((Rx::Rdma(r), Tx::Rdma(w), Closer::Rdma(k)))
            }
        }
    }
}

/// The reading half.
#[derive(Debug)]
pub enum Rx {
    /// TCP.
    Tcp(TcpStream),
    /// RDMA: receives of the control stream.
    Rdma(rdma::Rx),
}

impl Read for Rx {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Rx::Tcp(s) => s.read(buf),
            Rx::Rdma(r) => r.read(buf),
        }
    }
}

/// The writing half.
#[derive(Debug)]
pub enum Tx {
    /// TCP.
    Tcp(TcpStream),
    /// RDMA: sends of the control stream, and placement of epoch bodies.
    Rdma(rdma::Tx),
}

impl Tx {
    /// The RDMA half, if this is RDMA.
    pub fn rdma(&mut self) -> Option<&mut rdma::Tx> {
        match self {
            Tx::Tcp(_) => None,
            Tx::Rdma(t) => Some(t),
        }
    }
}

impl Write for Tx {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Tx::Tcp(s) => s.write(buf),
            Tx::Rdma(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Tx::Tcp(s) => s.write_vectored(bufs),
            Tx::Rdma(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Tx::Tcp(s) => s.flush(),
            Tx::Rdma(t) => t.flush(),
        }
    }
}

/// Ends a connection from any thread, waking whoever waits on it.
#[derive(Debug)]
pub enum Closer {
    /// TCP.
    Tcp(TcpStream),
    /// RDMA.
    Rdma(rdma::Closer),
}

impl Closer {
    /// Another handle to the same connection.
    pub fn try_clone(&self) -> io::Result<Closer> {
        Ok(match self {
            Closer::Tcp(s) => Closer::Tcp(s.try_clone()?),
            Closer::Rdma(k) => Closer::Rdma(k.handle()),
        })
    }

    /// Shuts the connection down.
    pub fn close(&self) {
        match self {
            Closer::Tcp(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Closer::Rdma(k) => k.close(),
        }
    }

    /// The RDMA closer, if this is RDMA (tests force queue-pair errors through it).
    pub fn rdma(&self) -> Option<&rdma::Closer> {
        match self {
            Closer::Tcp(_) => None,
            Closer::Rdma(k) => Some(k),
        }
    }
}
