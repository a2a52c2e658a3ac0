//! rmc-vmm: a minimal KVM virtual machine monitor with rmc's own guest program, checkpointable
//! vCPU and device state, and dirty page tracking.
//!
//! The pieces, in the order a VM is built:
//!
//! - [`layout`]: guest physical memory layout and port map (the guest/VMM contract);
//! - [`arch`]: long-mode boot state (identity map, GDT, SSE on);
//! - [`guest`]: the guest program (counter service, dirtier, idle), generated with iced-x86;
//! - [`bus`]: the port I/O and MMIO buses: address ranges mapped to devices;
//! - [`nic`]: the paravirtual NIC (rings in guest memory, UDP on the host side); the console
//!   and the guest control ports are the other devices on the port bus;
//! - for a PC VM, one that boots a stock Linux kernel: [`linux`] (bzImage loading, boot
//!   parameters, MP table, boot vCPU state), [`platform`] (KVM's in-kernel PICs, IOAPIC,
//!   LAPICs, PIT and clock) and COM1 + i8042 on the port bus, COM1's output held by output
//!   commit ([`ConsoleOutput`]);
//! - [`vm`]: the [`Vm`]: create, boot, pause/resume (with a deadline), save/restore, harvest
//!   dirty pages;
//! - [`state`]: the vCPU + device state a checkpoint carries, put together from the parts'
//!   own versioned states ([`persist`]);
//! - [`dirty`]: KVM dirty log UNION vm-memory's bitmap, with put-back;
//! - [`service`]: host-side codec and UDP client of the counter protocol.
//!
//! The epoch engine (`rmc-mc`) drives a [`Vm`] through the narrow traits of `rmc-guest-api`
//! (`Pausable`, `DirtyLog`, `Snapshottable`, `OutputCommit`, `GuestRam`); nothing in this crate
//! knows about checkpoints travelling anywhere, and it links no transport.

pub mod arch;
pub mod bus;
mod devices;
pub mod dirty;
pub mod guest;
pub mod layout;
pub mod linux;
pub mod nic;
pub mod persist;
pub mod platform;
pub mod service;
pub mod state;
mod vcpu;
pub mod vm;

pub use devices::serial::{ConsoleEmitter, ConsoleOutput, ConsoleSink, ConsoleStats};
pub use dirty::DirtyTracker;
pub use rmc_guest_api::DirtySet;
pub use state::{DeviceStates, VmState};
pub use vm::{
    DirtierConfig, GuestStatus, RestoreCheck, Vm, VmConfig, VmError, Workload,
    DEFAULT_PAUSE_DEADLINE,
};

/// Guest memory: vm-memory's mmap backend with a dirty bitmap per region, so every write the
/// VMM makes through it is tracked.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
