//! rmc-transport: the wire protocol and its RDMA and TCP backends (not yet implemented; issues
//! "Micro-checkpointing over TCP" and "RDMA transport").
//!
//! It will hold the versioned, authenticated handshake, the per-epoch frames (header, page
//! index, page data, state blob, commit with checksum, ack, heartbeat) with decoders that treat
//! input as hostile, a TCP backend (vectored writes straight from a staging slot), and an RDMA
//! backend on rdma-sys (RDMA WRITE into the standby's staging slot, commit on the same RC QP).
