//! Booting a stock Linux kernel (a `bzImage`) through the x86-64 64-bit boot protocol: what
//! the VMM writes into guest memory before the first instruction, and the vCPU state the
//! kernel expects at its 64-bit entry point.
//!
//! A PC VM boots Linux in two calls, made after the guest memory and KVM's in-kernel
//! interrupt controllers exist and after each vCPU has its CPUID:
//!
//! 1. [`load`] fills guest memory, every byte through vm-memory so the dirty bitmap has it:
//!    - the kernel's protected-mode part (the `bzImage` minus its real-mode setup sectors) at
//!      1 MiB ([`HIMEM_START`]); its 64-bit entry point is [`KERNEL_64BIT_ENTRY_OFFSET`] past
//!      the load address. The kernel decompresses itself into a buffer that starts at
//!      `max(load address aligned up to kernel_alignment, pref_address)` and is `init_size`
//!      bytes long (both from the kernel's setup header): low RAM must reach that far;
//!    - the initrd, if any, page aligned at the top of low RAM (below 3 GiB, below the end of
//!      the first RAM region and below the header's `initrd_addr_max`), above the kernel's
//!      decompression buffer;
//!    - the command line, NUL terminated, at [`CMDLINE_ADDR`], at most as long as the header's
//!      `cmdline_size`;
//!    - the zero page ([`ZERO_PAGE_ADDR`]): a `boot_params` holding the kernel's own setup
//!      header, with the loader's fields filled in (`type_of_loader` 0xff "other",
//!      `boot_flag` 0xaa55, `HdrS`, command line pointer and size, ramdisk address and size)
//!      and the e820 memory map ([`e820_map`]);
//!    - the MP table ([`MPTABLE_ADDR`], in the EBDA, where Linux looks for it): one
//!      processor per vCPU, the ISA bus, the IOAPIC, ISA IRQs 0-15 on IOAPIC pins 0-15, LINT0
//!      ExtINT and LINT1 NMI (see [`mptable`]); with no ACPI tables, it is how the kernel
//!      finds the APs and the IOAPIC;
//!    - the boot GDT and a null IDT, and page tables identity-mapping the first GiB with
//!      2 MiB pages: enough for the kernel image, the zero page and the command line, which
//!      is all the decompressor touches before it builds its own page tables.
//! 2. [`setup_vcpu`] for each vCPU: the bootstrap processor (vCPU 0) gets long mode (CR0
//!    PE|PG, CR4 PAE, EFER LME|LMA, CR3 = the boot PML4), the boot GDT with `__BOOT_CS`
//!    (0x10) and `__BOOT_DS` (0x18) loaded as the protocol asks, `rip` at the entry point,
//!    `rsi` = the zero page, interrupts off. Every vCPU gets the FPU reset values, the boot
//!    MSRs and its LAPIC's LINT0 = ExtINT, LINT1 = NMI (virtual wire mode, as a BIOS leaves
//!    it). The APs stay in KVM's wait-for-SIPI state: the kernel starts them itself with
//!    INIT/SIPI through the in-kernel LAPICs, after reading the MP table.
//!
//! Guest physical layout (the low MiB follows the usual PC conventions):
//!
//! ```text
//! 0x0000_0500  boot GDT            null, TSS (0x08), __BOOT_CS (0x10), __BOOT_DS (0x18)
//! 0x0000_0520  boot IDT            null (interrupts stay off until the kernel has its own)
//! 0x0000_7000  zero page           struct boot_params, with the e820 map
//! 0x0000_8ff0  boot stack          top of the BSP's initial stack
//! 0x0000_9000  PML4                \
//! 0x0000_a000  PDPT                 > identity map of the first GiB, 2 MiB pages
//! 0x0000_b000  page directory      /
//! 0x0002_0000  command line        NUL terminated
//! 0x0009_fc00  MP table            floating pointer + config table (EBDA, e820-reserved)
//! 0x000a_0000  VGA/BIOS area       e820-reserved up to 1 MiB (RAM in KVM, unused)
//! 0x0010_0000  kernel              protected-mode part of the bzImage; decompresses above
//!    ...       initrd              page aligned, at the top of low RAM
//! 0xc000_0000  (hole)              3-4 GiB: no RAM; 0xfec0_0000 up is e820-reserved:
//! 0xfec0_0000  IOAPIC                KVM's in-kernel IOAPIC
//! 0xfee0_0000  LAPIC                 KVM's in-kernel LAPICs
//! 0xfffb_d000  KVM's TSS           (Intel real-mode emulation pages)
//! 0x1_0000_0000 RAM above 4 GiB    guests with more than 3 GiB
//! ```
//!
//! IRQ routing: the MP table routes ISA IRQ `n` to IOAPIC pin `n` for all 16, IRQ 0 (the
//! PIT) included. That is KVM's default GSI routing (GSI `n` goes to PIC pin `n` and IOAPIC
//! pin `n`), which a VM keeps as long as the VMM installs no routing table of its own; QEMU's
//! "IRQ 0 on pin 2" comes with routing QEMU sets itself.

mod boot;
pub mod mptable;
mod regs;

use std::path::PathBuf;

pub use boot::{e820_map, E820Entry, E820_RAM, E820_RESERVED};
pub use regs::setup_vcpu;

use crate::GuestMem;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBoot {
    /// The kernel, a `bzImage` (boot protocol 2.12 or later, with a 64-bit entry point).
    pub kernel: PathBuf,
    /// The initial RAM disk, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (no NUL bytes; at most the kernel's `cmdline_size` bytes).
    pub cmdline: String,
}

/// Default command line. Each word, for the VM this crate builds (COM1, an i8042 with only
/// its reset line, KVM's in-kernel PICs/IOAPIC/PIT, no PCI, no ACPI):
///
/// - `console=ttyS0`: the kernel console on COM1, the VM's console;
/// - `reboot=k`: reboot through the keyboard controller's reset line (the i8042 the VM has),
///   not ACPI or a triple fault;
/// - `panic=1`: on a panic, reboot after 1 s instead of hanging forever;
/// - `pci=off`: there is no PCI bus, so do not probe configuration space;
/// - `nomodules`: everything the VM needs is built in; loading nothing keeps boot short;
/// - `8250.nr_uarts=1`: only COM1 exists, so do not register and probe COM2-4;
/// - `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd`: the i8042 has no mouse port, no
///   multiplexer, is not listed by PnP/ACPI, and does not answer keyboard commands;
/// - `tsc=reliable`: a VM that is paused for checkpoints and resumed elsewhere sees time
///   jump; this keeps the clocksource watchdog from declaring the TSC unstable for it;
/// - `no_timer_check`: skip the boot-time check that the IOAPIC timer interrupt arrives
///   fast enough, which a busy host can fail.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodules \
     8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable \
     no_timer_check";

/// Highest memory size supported for a Linux guest: 64 GiB.
///
/// Nothing in the boot protocol limits it (e820 entries are 64-bit; the boot page tables
/// only need to map the kernel, and the kernel maps the rest itself). The bound keeps the
/// top of guest RAM (4 GiB + 61 GiB = 65 GiB) far below 2^39 bytes (512 GiB), the smallest
/// physical address width of the x86-64 CPUs KVM runs such guests on, and keeps the dirty
/// bitmaps (one bit per 4 KiB page: 2 MiB at 64 GiB) and a full-memory checkpoint copy to
/// sizes a checkpointing VM can afford.
pub const MAX_MEM_SIZE: u64 = 64 << 30;

/// Most vCPUs a Linux guest can have: 254.
///
/// The MP table gives each processor and the IOAPIC an 8-bit APIC id; 0xff is the broadcast
/// id, so the vCPUs take ids 0..=253 and the IOAPIC the next one (254). Without x2APIC
/// tables (there is no ACPI MADT) that is the xAPIC limit. The table itself (5,300 bytes
/// for 254 vCPUs) fits easily in the reserved area below 1 MiB.
pub const MAX_VCPUS: usize = 254;

/// Where the boot GDT goes.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Where the (null) boot IDT goes.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// The zero page: `struct boot_params`.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the bootstrap processor.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// Boot page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Boot page directory (512 x 2 MiB pages: the first GiB).
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line and its NUL (up to the next thing in the layout, with margin);
/// the kernel's own `cmdline_size` is normally the tighter limit (2,047 bytes on x86-64).
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;
/// Start of the extended BIOS data area: the MP table goes here; up to [`HIMEM_START`] the
/// e820 map says "reserved".
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the MP floating pointer (followed by the configuration table) goes.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// Where the kernel is loaded: 1 MiB, the start of "high" memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Offset of the 64-bit entry point (`startup_64`) from the kernel's load address.
pub const KERNEL_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Physical address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Physical address of the local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// From here to 4 GiB the e820 map says "reserved": the IOAPIC, the LAPICs, KVM's TSS and
/// identity-map pages, where a PC has its BIOS ROM.
pub const PLATFORM_RESERVED_START: u64 = IOAPIC_ADDR as u64;
/// End of the platform area: 4 GiB.
pub const PLATFORM_RESERVED_END: u64 = 1 << 32;

/// Where things went, for the vCPU setup (and for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// The kernel's 64-bit entry point: `kernel_load + 0x200`.
    pub entry: u64,
    /// The zero page (`rsi` at entry).
    pub boot_params: u64,
    /// Where the kernel's protected-mode part was loaded.
    pub kernel_load: u64,
    /// End of the loaded image (exclusive).
    pub kernel_end: u64,
    /// End (exclusive) of the memory the kernel decompresses into: nothing the kernel must
    /// keep was placed below it (above 1 MiB).
    pub kernel_mem_end: u64,
    /// The initrd: (address, size), page aligned.
    pub initrd: Option<(u64, u64)>,
    /// The command line's address.
    pub cmdline_addr: u64,
    /// The command line's length, without its NUL.
    pub cmdline_len: u64,
    /// Where the MP table starts (its floating pointer).
    pub mptable_addr: u64,
    /// Bytes of MP table (floating pointer + configuration table).
    pub mptable_len: u64,
    /// The number of vCPUs the MP table describes.
    pub vcpus: u8,
}

/// Why a Linux boot could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// A file could not be opened or read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The kernel file is not a bzImage this loader can boot.
    #[error("{} is not a bootable bzImage: {reason}", path.display())]
    NotBzImage {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// linux-loader refused the kernel.
    #[error("cannot load the kernel {}: {source}", path.display())]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: linux_loader::loader::Error,
    },
    /// Low RAM does not hold the kernel while it decompresses itself.
    #[error(
        "the kernel {} needs RAM up to {needed:#x} ({} MiB) to decompress itself, but low RAM \
         ends at {low_ram_end:#x} ({} MiB): give the VM more memory",
        path.display(), needed.div_ceil(1 << 20), low_ram_end >> 20
    )]
    MemoryTooSmall {
        /// The kernel.
        path: PathBuf,
        /// End of the memory it needs.
        needed: u64,
        /// End of the low RAM region.
        low_ram_end: u64,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "the initrd {} is {size} bytes, but only {room} bytes are free between the kernel's \
         decompression buffer (ending at {kernel_mem_end:#x}) and the highest initrd address \
         ({top:#x}): give the VM more memory or use a smaller initrd",
        path.display()
    )]
    InitrdTooBig {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Bytes free for it.
        room: u64,
        /// End of the kernel's buffer.
        kernel_mem_end: u64,
        /// Top of the initrd area: min(end of low RAM, 3 GiB, `initrd_addr_max` + 1).
        top: u64,
    },
    /// The initrd is empty.
    #[error("the initrd {} is empty", path.display())]
    InitrdEmpty {
        /// The initrd.
        path: PathBuf,
    },
    /// The command line is longer than the kernel takes.
    #[error("the command line is {len} bytes, but the kernel takes at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit (the kernel header's `cmdline_size`, at most [`CMDLINE_MAX_SIZE`] - 1).
        max: u64,
    },
    /// The command line holds a NUL byte, which would end it early.
    #[error("the command line contains a NUL byte at offset {0}")]
    CmdlineNul(usize),
    /// The MP table cannot describe that many vCPUs.
    #[error("{vcpus} vCPUs: a Linux guest has 1 to {max} (the MP table's 8-bit APIC ids)")]
    BadVcpuCount {
        /// Requested.
        vcpus: usize,
        /// [`MAX_VCPUS`].
        max: usize,
    },
    /// The RAM regions are not a layout this loader handles.
    #[error("unsupported RAM layout {regions:x?}: {reason}")]
    BadRegions {
        /// The regions, (start, size).
        regions: Vec<(u64, u64)>,
        /// What is wrong.
        reason: String,
    },
    /// Writing guest memory failed (the regions do not match the memory).
    #[error("cannot write the {what} at {addr:#x} into guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// The cause (vm-memory's, or linux-loader's for the zero page).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Loads the kernel (+ initrd and command line) into `mem`, and writes the zero page (with
/// the e820 map built from `regions`, (start, size) pairs as [`crate::layout::ram_regions`]
/// returns them), the MP table for `vcpus` vCPUs, the boot GDT/IDT and the identity-map
/// page tables. Every write goes through `mem`, so it is dirty-tracked.
///
/// Checks everything it can before writing anything: the vCPU count, the regions, the
/// command line, the kernel's header and the room for the kernel and the initrd.
pub fn load(
    mem: &GuestMem,
    regions: &[(u64, u64)],
    vcpus: u8,
    boot: &LinuxBoot,
) -> Result<BootInfo, LinuxBootError> {
    boot::load(mem, regions, vcpus, boot)
}

/// The newest stock kernel installed, `/boot/vmlinuz-*` by version order (`None`: none).
pub fn newest_kernel() -> Option<PathBuf> {
    let mut kernels: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let version = name.strip_prefix("vmlinuz-")?;
            // Numeric parts compared as numbers: 6.1.0-56 after 6.1.0-9.
            let key = version
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            Some((key, p))
        })
        .collect();
    kernels.sort();
    kernels.pop().map(|(_, p)| p)
}
