//! rmc-mc: the epoch engine.
//!
//! - [`Guest`] (from `rmc-guest-api`, re-exported): what the engine needs from a VM, as narrow
//!   traits (pause, harvest dirty pages, save state, output commit). The engine knows nothing of
//!   KVM; `rmc-vmm` implements them, and `rmc_guest_api::fake::FakeGuest` does in tests.
//! - [`protocol`]: the sans-I/O protocol cores of the primary and the standby: events in, actions
//!   out, no sockets, no clocks (time comes in as values), so every failure case is a unit test;
//!   and the primary's epoch scheduler (when to checkpoint, with its timers as values).
//! - [`primary`]: the primary's epoch loop over a transport.
//! - [`standby`]: the standby: receive, verify, apply, ack.

pub mod primary;
pub mod protocol;
pub mod standby;

/// An error an implementor of the engine's traits reports ([`standby::RestoreCheck`],
/// [`standby::FenceCheck`], [`primary::Fencing`]): its own type, shown as it displays itself
/// and recoverable by downcasting.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub use rmc_guest_api::{
    dirty, DirtyLog, DirtySet, Guest, GuestError, GuestRam, OutputCommit, OutputWaker, Pausable,
    Snapshottable, PAGE_SIZE,
};

/// Passes a protocol result through; on an error, first tells the peer why with a `Refuse`
/// (best effort: it may be gone), so both logs name the problem.
pub(crate) fn refuse_on_error<T, W: std::io::Write>(
    r: Result<T, protocol::ProtocolError>,
    writer: &mut rmc_transport::framing::FrameWriter<W>,
) -> Result<T, protocol::ProtocolError> {
    if let Err(e) = &r {
        if let Some(refuse) = protocol::refusal(e) {
            let _ = writer.send(&refuse);
        }
    }
    r
}

/// Passes a read through; on a malformed frame, first tells the peer what was wrong with a
/// `Refuse` (best effort), so both logs name the problem.
pub(crate) fn refuse_on_wire_error<T, W: std::io::Write>(
    r: Result<T, rmc_transport::framing::LinkError>,
    writer: &mut rmc_transport::framing::FrameWriter<W>,
) -> Result<T, rmc_transport::framing::LinkError> {
    if let Err(rmc_transport::framing::LinkError::Wire(e)) = &r {
        let _ = writer.send(&rmc_transport::wire::Message::Refuse {
            reason: e.to_string(),
        });
    }
    r
}
