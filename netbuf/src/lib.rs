//! rmc-netbuf: the per-epoch outbound packet buffer (not yet implemented; issue "Output commit
//! and failover").
//!
//! It will tag every packet the guest sends with the epoch it was sent in and release the
//! packets of epoch e only after the standby acknowledged checkpoint e, bounded by bytes and
//! packets, with backpressure into the guest's TX ring when full.
