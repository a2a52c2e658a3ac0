//! rmc-transport: the replication wire protocol ([`wire`]) and the transports that carry it
//! (TCP and RDMA, behind the same [`framing`]).

pub mod framing;
pub mod link;
pub mod rdma;
pub mod rdma_devices;
pub mod tcp;
pub mod wire;
