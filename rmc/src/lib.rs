//! rmc: the application on top of the epoch engine (`rmc-mc`) and the VMM (`rmc-vmm`).
//!
//! The `rmc` binary (`main.rs`) parses the command line and runs one of these:
//!
//! - [`fencing`]: the arbiter (etcd) that decides which host may run the VM;
//! - [`restore`]: the standby's check that a checkpoint can become this VMM's VM;
//! - [`checker`]: the counter service's consistency checker (what judges a failover);
//! - [`demo`]: `rmc demo`, primary + standby + checking clients, the primary SIGKILLed;
//! - [`bench`]: `rmc bench`, checkpoint latency and throughput on this machine;
//! - [`events`]: the lines `rmc` prints for programs to read (human or `--json`), and their
//!   parser.
//!
//! Dependency arrows point one way: this crate uses `rmc-mc` (which uses `rmc-transport`) and
//! `rmc-vmm`; both of those use only `rmc-guest-api` to meet (see docs/ARCHITECTURE.md).

pub mod bench;
pub mod checker;
pub mod demo;
pub mod demo_linux;
pub mod events;
pub mod fencing;
pub mod restore;
