//! rmc-mc: the epoch engine.
//!
//! - [`Guest`]: what the engine needs from a VM (pause, resume, harvest dirty pages, save
//!   state). It knows nothing of KVM; `rmc-vmm` implements it.
//! - [`dirty`]: dirty page sets.
//! - [`core`]: the sans-I/O protocol cores of the primary and the standby: events in, actions
//!   out, no sockets, no clocks (time comes in as values), so every failure case is a unit test.
//! - [`primary`]: the primary's epoch loop over a transport.
//! - [`standby`]: the standby: receive, verify, apply, ack.

pub mod core;
pub mod dirty;
pub mod primary;
pub mod standby;

use std::time::Duration;

pub use dirty::DirtySet;

/// Passes a protocol result through; on an error, first tells the peer why with a `Refuse`
/// (best effort: it may be gone), so both logs name the problem.
pub(crate) fn refuse_on_error<T, W: std::io::Write>(
    r: Result<T, core::ProtocolError>,
    writer: &mut rmc_transport::tcp::FrameWriter<W>,
) -> Result<T, core::ProtocolError> {
    if let Err(e) = &r {
        if let Some(refuse) = core::refusal(e) {
            let _ = writer.send(&refuse);
        }
    }
    r
}

/// Passes a read through; on a malformed frame, first tells the peer what was wrong with a
/// `Refuse` (best effort), so both logs name the problem.
pub(crate) fn refuse_on_wire_error<T, W: std::io::Write>(
    r: Result<T, rmc_transport::tcp::LinkError>,
    writer: &mut rmc_transport::tcp::FrameWriter<W>,
) -> Result<T, rmc_transport::tcp::LinkError> {
    if let Err(rmc_transport::tcp::LinkError::Wire(e)) = &r {
        let _ = writer.send(&rmc_transport::wire::Message::Refuse {
            reason: e.to_string(),
        });
    }
    r
}

/// An error from the guest (the VMM's own error type, boxed).
pub type GuestError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the epoch engine drives. Implemented by `rmc_vmm::Vm`.
pub trait Guest: Send + Sync {
    /// The guest's memory.
    type Memory: vm_memory::GuestMemory + Send + Sync;

    /// Guest memory.
    fn memory(&self) -> &Self::Memory;
    /// RAM regions `(guest physical base, length)`.
    fn regions(&self) -> Vec<(u64, u64)>;
    /// Number of vCPUs.
    fn vcpus(&self) -> u32;
    /// Encoding version of what [`Guest::save_state`] produces (announced in the handshake,
    /// so a standby that cannot restore it refuses the primary up front).
    fn state_version(&self) -> u32;
    /// Stops every vCPU (and so every device); returns how long stopping took.
    fn pause(&self) -> Duration;
    /// Lets the vCPUs run again.
    fn resume(&self);
    /// Pages written since the previous harvest (by the guest or its devices); clears the log.
    fn harvest(&self) -> Result<DirtySet, GuestError>;
    /// Gives back a harvested set that could not be sent, so the next harvest includes it.
    fn put_back(&self, set: DirtySet);
    /// The vCPU and device state, serialized (the VM must be paused).
    fn save_state(&self) -> Result<Vec<u8>, GuestError>;
    /// Output commit: the packets the guest sent since the previous call belong to checkpoint
    /// `epoch` and must wait for its ack. Called with the VM paused. Default: no output held.
    fn close_output_epoch(&self, epoch: u64) {
        let _ = epoch;
    }
    /// The standby acknowledged every checkpoint up to `epoch`: their packets may leave.
    fn release_output(&self, epoch: u64) {
        let _ = epoch;
    }
}
