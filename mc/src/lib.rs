//! rmc-mc: the epoch engine.
//!
//! - [`Guest`] (from `rmc-guest-api`, re-exported): what the engine needs from a VM, as narrow
//!   traits (pause, harvest dirty pages, save state, output commit). The engine knows nothing of
//!   KVM; `rmc-vmm` implements them, and `rmc_guest_api::fake::FakeGuest` does in tests.
//! - [`core`]: the sans-I/O protocol cores of the primary and the standby: events in, actions
//!   out, no sockets, no clocks (time comes in as values), so every failure case is a unit test.
//! - [`primary`]: the primary's epoch loop over a transport.
//! - [`standby`]: the standby: receive, verify, apply, ack.

pub mod core;
pub mod primary;
pub mod standby;

pub use rmc_guest_api::{
    dirty, DirtyLog, DirtySet, Guest, GuestError, GuestRam, OutputCommit, Pausable, Snapshottable,
    PAGE_SIZE,
};

/// Passes a protocol result through; on an error, first tells the peer why with a `Refuse`
/// (best effort: it may be gone), so both logs name the problem.
pub(crate) fn refuse_on_error<T, W: std::io::Write>(
    r: Result<T, core::ProtocolError>,
    writer: &mut rmc_transport::framing::FrameWriter<W>,
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
