//! rmc-fuzz: fuzz targets for everything a peer controls.
//!
//! Each target takes arbitrary bytes, drives one piece of rmc with them, and panics only when
//! rmc breaks a promise (a panic of rmc's own is one too):
//!
//! - [`wire_frames`]: frame headers, control messages and the TCP frame reader
//!   (`rmc_transport::wire`, `rmc_transport::framing::FrameReader`), layouts, body lengths, page
//!   indexes, against rules restated from their documentation;
//! - [`standby_core`]: the standby's protocol core (`rmc_mc::protocol::StandbyCore`) over whole
//!   connections, against a model of the protocol;
//! - [`primary_core`]: the primary's protocol core (`rmc_mc::protocol::PrimaryCore`) fed by a
//!   standby, against a model;
//! - [`vm_state`]: the VM state decoder (`rmc_vmm::VmState::decode`).
//!
//! The targets build on stable Rust with the workspace. `tests/targets.rs` replays the corpus
//! under `fuzz/corpus/<target>/` and runs a few seconds of random inputs per target; the
//! coverage-guided harness is `fuzz/afl/` (cargo-afl), see docs/DEVELOPING.md, "Fuzzing".

pub mod gen;
pub mod input;
mod primary;
mod standby;
mod state;
mod wire;

pub use primary::{primary_core, ACKED};
pub use standby::{standby_core, APPLIED};
pub use state::vm_state;
pub use wire::wire_frames;

/// A fuzz target.
pub type Target = fn(&[u8]);

/// Every target by name (the name is its corpus directory and its AFL binary).
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_frames", wire_frames),
    ("standby_core", standby_core),
    ("primary_core", primary_core),
    ("vm_state", vm_state),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
}
