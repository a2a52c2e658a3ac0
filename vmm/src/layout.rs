//! Guest physical memory layout and the port map: the contract between the VMM and the guest
//! program that [`crate::guest`] generates.
//!
//! ```text
//! 0x0000_0000  unused (a null page left unmapped by convention)
//! 0x0000_1000  GDT                      null, 64-bit code, data
//! 0x0000_2000  PML4                     identity map, 2 MiB pages
//! 0x0000_3000  PDPT
//! 0x0000_4000  page directories         one per GiB of guest physical address space
//! 0x0001_0000  config block             VMM -> guest, one 64-byte record per vCPU
//! 0x0001_1000  status block             guest -> VMM, one 64-byte record per vCPU
//! 0x0001_2000  counter state            global counter and statistics
//! 0x0002_0000  guest code               generated at VM creation (up to 64 KiB)
//! 0x0004_0000  stacks                   16 KiB per vCPU
//! 0x0010_0000  NIC TX ring              descriptors + used index (one page)
//! 0x0010_1000  NIC RX ring
//! 0x0011_0000  NIC TX buffers           RING_SIZE x 2 KiB
//! 0x0013_0000  NIC RX buffers           RING_SIZE x 2 KiB
//! 0x0020_0000  counter client table     4,096 entries x 32 bytes
//! 0x0040_0000  dirtier working sets     one after another, one per dirtier vCPU
//! ```
//!
//! RAM is one region from 0 up to 3 GiB; a guest with more memory gets the rest in a second
//! region at 4 GiB, leaving the usual hole below 4 GiB free for the architecture (TSS and
//! identity-map pages on Intel, the LAPIC).

/// Size of a guest page and of the dirty-tracking granule ([`PAGE_BYTES`]: the same as a
/// `usize`).
pub use rmc_guest_api::{PAGE_BYTES, PAGE_SIZE};

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x1000;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x2000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x3000;
/// First page directory; page directory `i` maps guest physical GiB `i`.
pub const PD_ADDR: u64 = 0x4000;
/// Number of page directories, so the identity map covers this many GiB.
pub const PD_COUNT: u64 = 12;

/// Per-vCPU configuration written by the VMM before the guest starts.
pub const CONFIG_ADDR: u64 = 0x1_0000;
/// Per-vCPU progress written by the guest.
pub const STATUS_ADDR: u64 = 0x1_1000;
/// Size of one per-vCPU record in the config and status blocks.
pub const VCPU_RECORD_SIZE: u64 = 64;
/// Counter service state: `counter: u64`, `requests: u64`, `repeats: u64`, `bad: u64`.
pub const COUNTER_STATE_ADDR: u64 = 0x1_2000;
/// Where the generated guest code is loaded.
pub const CODE_ADDR: u64 = 0x2_0000;
/// Room for the generated guest code.
pub const CODE_MAX: u64 = 0x2_0000;
/// Bottom of the stack area; vCPU `i`'s stack ends at `STACKS_ADDR + (i + 1) * STACK_SIZE`.
pub const STACKS_ADDR: u64 = 0x4_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x4000;

/// NIC transmit ring (guest -> host).
pub const TX_RING_ADDR: u64 = 0x10_0000;
/// NIC receive ring (host -> guest).
pub const RX_RING_ADDR: u64 = 0x10_1000;
/// Transmit buffers, `NIC_RING_SIZE` of `NIC_BUF_SIZE` bytes.
pub const TX_BUF_ADDR: u64 = 0x11_0000;
/// Receive buffers, `NIC_RING_SIZE` of `NIC_BUF_SIZE` bytes.
pub const RX_BUF_ADDR: u64 = 0x13_0000;
/// Entries in each ring the guest program uses.
pub const NIC_RING_SIZE: u32 = 64;
/// Size of each packet buffer the guest program uses.
pub const NIC_BUF_SIZE: u32 = 2048;

/// Counter service: table of clients, `CLIENT_TABLE_ENTRIES` x 32 bytes
/// (`client_id`, `last_seq`, `last_counter`, `last_status`).
pub const CLIENT_TABLE_ADDR: u64 = 0x20_0000;
/// Number of client table entries (a power of two).
pub const CLIENT_TABLE_ENTRIES: u64 = 4096;

/// First byte available to dirtier working sets.
pub const WORKSET_ADDR: u64 = 0x40_0000;

/// Smallest guest memory that holds the fixed layout above.
pub const MIN_MEM_SIZE: u64 = 16 << 20;
/// Largest guest memory supported (the identity map covers `PD_COUNT` GiB, one of them a hole).
pub const MAX_MEM_SIZE: u64 = (PD_COUNT - 1) << 30;
/// End of the low RAM region.
pub const LOW_RAM_END: u64 = 3 << 30;
/// Start of the high RAM region, used when memory exceeds `LOW_RAM_END`.
pub const HIGH_RAM_START: u64 = 4 << 30;

/// Port I/O map. All NIC registers take 32-bit `out` writes.
pub mod ports {
    /// Console: each byte written is one character; lines go to the VMM's log.
    pub const CONSOLE: u16 = 0xe9;
    /// NIC register block base.
    pub const NIC_BASE: u16 = 0x600;
    /// Guest physical address of the TX ring (4 KiB aligned).
    pub const NIC_TX_RING: u16 = NIC_BASE;
    /// Guest physical address of the RX ring (4 KiB aligned).
    pub const NIC_RX_RING: u16 = NIC_BASE + 0x4;
    /// Entries per ring (power of two, 1..=255). Writing it (re)initialises both rings.
    pub const NIC_RING_SIZE: u16 = NIC_BASE + 0x8;
    /// TX doorbell: the value is the guest's new TX producer index.
    pub const NIC_TX_DOORBELL: u16 = NIC_BASE + 0xc;
    /// RX doorbell: the value is the guest's new RX producer index (buffers posted).
    pub const NIC_RX_DOORBELL: u16 = NIC_BASE + 0x10;
    /// Block until the RX used index differs from the value written (or a short timeout).
    pub const NIC_RX_WAIT: u16 = NIC_BASE + 0x14;
    /// Block until the TX used index differs from the value written (or a short timeout).
    pub const NIC_TX_WAIT: u16 = NIC_BASE + 0x18;
    /// Ports the NIC decodes, from [`NIC_BASE`].
    pub const NIC_PORTS: u16 = 0x1c;
    /// Guest control block base: [`SLEEP_US`], [`IDLE`], [`GUEST_PANIC`].
    pub const CONTROL_BASE: u16 = 0x620;
    /// Ports the guest control block decodes, from [`CONTROL_BASE`].
    pub const CONTROL_PORTS: u16 = 0xc;
    /// Sleep for the number of microseconds written (at most one second), or until paused.
    pub const SLEEP_US: u16 = CONTROL_BASE;
    /// Nothing to do: block for a while (the vCPU stays pausable).
    pub const IDLE: u16 = 0x624;
    /// The guest hit an internal error; the value is an error code. The vCPU stops.
    pub const GUEST_PANIC: u16 = 0x628;
}

/// Offsets inside a per-vCPU config record (at `CONFIG_ADDR + i * VCPU_RECORD_SIZE`).
pub mod config {
    /// `u64`: workload, see [`WORKLOAD_IDLE`] and friends.
    pub const WORKLOAD: u64 = 0;
    /// `u64`: dirtier working-set base (guest physical).
    pub const WS_BASE: u64 = 8;
    /// `u64`: dirtier working-set size in pages.
    pub const WS_PAGES: u64 = 16;
    /// `u64`: dirtier rate in pages per second, 0 = as fast as possible.
    pub const RATE: u64 = 24;
    /// `u64`: dirtier stops after this many page writes, 0 = never.
    pub const LIMIT: u64 = 32;
    /// `u64`: TSC frequency in kHz (for the dirtier's rate control).
    pub const TSC_KHZ: u64 = 40;

    /// Workload code for an idle vCPU.
    pub const WORKLOAD_IDLE: u64 = 0;
    /// Workload code for the counter service.
    pub const WORKLOAD_COUNTER: u64 = 1;
    /// Workload code for the memory dirtier.
    pub const WORKLOAD_DIRTIER: u64 = 2;
}

/// Offsets inside a per-vCPU status record (at `STATUS_ADDR + i * VCPU_RECORD_SIZE`).
pub mod status {
    /// `u64`: non-zero once the vCPU's workload has initialised.
    pub const READY: u64 = 0;
    /// `u64`: dirtier page writes done so far.
    pub const PROGRESS: u64 = 8;
}

/// Offsets inside a NIC ring page.
pub mod ring {
    /// Size of one descriptor: `addr: u64, len: u32, flags: u16, status: u16`.
    pub const DESC_SIZE: u64 = 16;
    /// Offset of `len` in a descriptor.
    pub const DESC_LEN: u64 = 8;
    /// Offset of `status` in a descriptor (written by the device).
    pub const DESC_STATUS: u64 = 14;
    /// Offset of the device's used index (`u32`) in the ring page.
    pub const USED_IDX: u64 = 0xff8;
    /// Largest ring the page can hold.
    pub const MAX_SIZE: u32 = 255;
    /// Descriptor status: done.
    pub const STATUS_OK: u16 = 1;
    /// Descriptor status: refused by the device (bad address or length).
    pub const STATUS_REFUSED: u16 = 2;
}

/// Guest RAM regions (start, length) for a memory size, as described in the module doc.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= LOW_RAM_END {
        vec![(0, mem_size)]
    } else {
        vec![(0, LOW_RAM_END), (HIGH_RAM_START, mem_size - LOW_RAM_END)]
    }
}
