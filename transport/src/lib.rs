//! rmc-transport: the replication wire protocol ([`wire`]) and the transports that carry it
//! (TCP now; RDMA in a later issue, behind the same framing).

pub mod link;
pub mod rdma;
pub mod rdma_devices;
pub mod tcp;
pub mod wire;
