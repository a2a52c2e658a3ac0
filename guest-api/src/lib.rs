//! rmc-guest-api: what rmc's epoch engine needs from a virtual machine, and nothing else.
//!
//! The engine (`rmc-mc`) and the VMM (`rmc-vmm`) both depend on this crate and not on each
//! other: the VMM links no transport and no RDMA library, and the engine knows nothing of KVM.
//! The interface is split the way cloud-hypervisor splits `Pausable` / `Snapshottable`, so a
//! caller (or a test double) needs only the part it uses:
//!
//! - [`GuestRam`]: the guest's memory and its RAM regions;
//! - [`Pausable`]: stop every vCPU (with a deadline) and let them run again;
//! - [`DirtyLog`]: harvest the pages written since the last harvest, give a set back;
//! - [`Snapshottable`]: vCPU count, state encoding version, the serialized vCPU + device state;
//! - [`OutputCommit`]: tie the guest's outgoing packets to the checkpoint they belong to.
//!
//! [`Guest`] is all of them; every type that implements the five is a `Guest`. [`fake`] is an
//! in-memory guest (scripted dirtying, injectable failures) that runs the epoch loops in tests
//! without KVM.

pub mod dirty;
pub mod fake;

use std::sync::Arc;
use std::time::Duration;

pub use dirty::{DirtySet, RegionDirty};

/// The page size of guest memory, of dirty tracking, of the wire protocol and of the staging
/// slots: the one definition every rmc crate uses.
pub const PAGE_SIZE: u64 = 4096;

/// [`PAGE_SIZE`] as a `usize`, for buffer lengths.
pub const PAGE_BYTES: usize = PAGE_SIZE as usize;

/// An error from the guest: the VMM's own typed error, boxed (callers that know the VMM can
/// downcast it).
pub type GuestError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The guest's memory.
pub trait GuestRam {
    /// The guest memory type.
    type Memory: vm_memory::GuestMemory + Send + Sync;

    /// Guest memory.
    fn memory(&self) -> &Self::Memory;
    /// RAM regions `(guest physical base, length in bytes)`.
    fn regions(&self) -> Vec<(u64, u64)>;
}

/// Stopping and restarting the guest's vCPUs (and so its devices).
pub trait Pausable {
    /// Stops every vCPU; returns how long stopping took, or an error naming the vCPU that did
    /// not stop within the VMM's deadline (the guest is then not paused).
    fn pause(&self) -> Result<Duration, GuestError>;
    /// Lets the vCPUs run again.
    fn resume(&self);
}

/// Dirty page tracking.
pub trait DirtyLog {
    /// Pages written since the previous harvest (by the guest or its devices); clears the log.
    fn harvest(&self) -> Result<DirtySet, GuestError>;
    /// Gives back a harvested set that could not be sent, so the next harvest includes it.
    fn put_back(&self, set: DirtySet);
}

/// The guest's vCPU and device state.
pub trait Snapshottable {
    /// Number of vCPUs.
    fn vcpus(&self) -> u32;
    /// Encoding version of what [`Snapshottable::save_state`] produces (announced in the
    /// handshake, so a standby that cannot restore it refuses the primary up front).
    fn state_version(&self) -> u32;
    /// The vCPU and device state, serialized (the guest must be paused).
    fn save_state(&self) -> Result<Vec<u8>, GuestError>;
}

/// Called by the guest when output starts waiting for a checkpoint (see
/// [`OutputCommit::watch_output`]). It runs on whatever thread queued the output (a vCPU
/// thread), so it must be quick and must not block: the primary's waker sends an event.
#[derive(Clone)]
pub struct OutputWaker(Arc<dyn Fn() + Send + Sync>);

impl OutputWaker {
    /// A waker that calls `wake`.
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Self {
        OutputWaker(Arc::new(wake))
    }

    /// Output started waiting.
    pub fn wake(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for OutputWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputWaker")
    }
}

/// Output commit: packets the guest sends leave only once the checkpoint that produced them
/// is acknowledged. The defaults hold nothing (a guest without a network device).
pub trait OutputCommit {
    /// The packets the guest sent since the previous call belong to checkpoint `epoch` and
    /// must wait for its ack. Called with the guest paused.
    fn close_output_epoch(&self, epoch: u64) {
        let _ = epoch;
    }
    /// The standby acknowledged every checkpoint up to `epoch`: their packets may leave.
    fn release_output(&self, epoch: u64) {
        let _ = epoch;
    }
    /// From now on call `waker` whenever the guest queues output while none was waiting for
    /// the next checkpoint (the first packet after [`OutputCommit::close_output_epoch`]), so
    /// the primary can end the epoch early; `None` stops the calls. The default never calls
    /// it (no output).
    fn watch_output(&self, waker: Option<OutputWaker>) {
        let _ = waker;
    }
    /// Whether output is waiting for a checkpoint not taken yet (queued since the last
    /// [`OutputCommit::close_output_epoch`]).
    fn output_waiting(&self) -> bool {
        false
    }
}

/// Everything the epoch engine drives. Implemented for every type that has the five parts.
pub trait Guest:
    GuestRam + Pausable + DirtyLog + Snapshottable + OutputCommit + Send + Sync
{
}

impl<T> Guest for T where
    T: GuestRam + Pausable + DirtyLog + Snapshottable + OutputCommit + Send + Sync
{
}
