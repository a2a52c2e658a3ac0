//! rmc-mc: the epoch engine (not yet implemented; issue "Micro-checkpointing over TCP").
//!
//! It will hold the sans-I/O protocol cores of the primary and the standby, the primary's
//! epoch loop (pause, harvest, save state, gather into staging, resume, transmit, free on ack),
//! the standby's verify-then-apply path and failover. It drives the VM through a narrow
//! `Guest` trait and never names KVM.
