//! The TCP transport: frames of [`crate::wire`] (written and read by [`crate::framing`]) over
//! one TCP connection per primary/standby pair.
//!
//! The primary connects, the standby listens. Epochs go primary -> standby; acks and
//! heartbeats go back on the same connection (TCP is full duplex, and one connection keeps
//! the failure model simple: any error on it ends the pairing). `TCP_NODELAY` is set so small
//! control messages (commits, acks, heartbeats) are not held back by Nagle's algorithm.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::framing::LinkError;

/// Connects to a standby with `TCP_NODELAY`.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, LinkError> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|source| LinkError::Io {
        what: "connecting to the standby",
        source,
    })?;
    configure(&s)?;
    Ok(s)
}

/// Sets the options every rmc connection uses.
pub fn configure(s: &TcpStream) -> Result<(), LinkError> {
    s.set_nodelay(true).map_err(|source| LinkError::Io {
        what: "setting TCP_NODELAY",
        source,
    })
}
