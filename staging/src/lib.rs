//! rmc-staging: the registered staging region (not yet implemented; issue "Micro-checkpointing
//! over TCP").
//!
//! It will hold one page-aligned region allocated once (huge pages where available, mlocked
//! where permitted) and divided into a ring of k >= 2 slots; each slot carries one epoch's page
//! index, page data and vCPU/device state blob. The primary gathers an epoch's dirty pages from
//! guest memory into a free slot inside the checkpoint pause; the transport sends the slot
//! while the guest runs. The region exposes its address and length so the RDMA transport can
//! register it once.
