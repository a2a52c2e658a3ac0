//! Kernel, initrd and command line loading, the zero page and the e820 map.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{
    mptable, regs, BootInfo, LinuxBoot, LinuxBootError, CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START,
    HIMEM_START, KERNEL_64BIT_ENTRY_OFFSET, MAX_VCPUS, MPTABLE_ADDR, PLATFORM_RESERVED_END,
    PLATFORM_RESERVED_START, ZERO_PAGE_ADDR,
};
use crate::layout::LOW_RAM_END;
use crate::GuestMem;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `boot_flag` value: the 0xaa55 boot sector signature.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value: "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Offset of the setup header in a bzImage (and in the zero page).
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Oldest boot protocol with a 64-bit entry point (`XLF_KERNEL_64` in `xloadflags`).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Alignment of the initrd.
const INITRD_ALIGN: u64 = 4096;
/// Kernel alignment assumed if the header gives none.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x20_0000;
/// The initrd is copied in chunks this big (one `read` of a regular file may stop short at
/// 2 GiB).
const INITRD_CHUNK: u64 = 64 << 20;

/// One e820 entry: a range of guest physical memory and its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

impl E820Entry {
    /// End (exclusive).
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// The e820 map for RAM `regions` ((start, size), sorted, not overlapping, the first at 0):
/// each region is RAM except the EBDA/BIOS area [`EBDA_START`]..1 MiB, which is reserved
/// (the MP table is in it), and the platform area [`PLATFORM_RESERVED_START`]..4 GiB is
/// reserved. Anything else that is not RAM (the rest of the 3-4 GiB hole, above the top of
/// RAM) is left out of the map. Sorted by address.
pub fn e820_map(regions: &[(u64, u64)]) -> Result<Vec<E820Entry>, LinuxBootError> {
    let bad = |reason: &str| LinuxBootError::BadRegions {
        regions: regions.to_vec(),
        reason: reason.into(),
    };
    match regions.first() {
        None => return Err(bad("no RAM")),
        Some(&(start, size)) if start != 0 || size < HIMEM_START => {
            return Err(bad(
                "the first region must start at 0 and hold the first MiB",
            ))
        }
        _ => {}
    }
    let mut prev_end = 0;
    for (i, &(start, size)) in regions.iter().enumerate() {
        let end = start
            .checked_add(size)
            .ok_or_else(|| bad("a region wraps around"))?;
        if size == 0 || (i > 0 && start < prev_end) {
            return Err(bad("regions must be non-empty, sorted and not overlap"));
        }
        if start < PLATFORM_RESERVED_END && end > PLATFORM_RESERVED_START {
            return Err(bad("RAM overlaps the IOAPIC/LAPIC area 0xfec00000..4 GiB"));
        }
        prev_end = end;
    }

    let mut map = Vec::with_capacity(regions.len() + 3);
    for &(start, size) in regions {
        let end = start + size;
        // RAM below the EBDA, and from 1 MiB up.
        for (lo, hi) in [(start, end.min(EBDA_START)), (start.max(HIMEM_START), end)] {
            if lo < hi {
                map.push(E820Entry {
                    addr: lo,
                    size: hi - lo,
                    kind: E820_RAM,
                });
            }
        }
    }
    map.push(E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820_RESERVED,
    });
    map.push(E820Entry {
        addr: PLATFORM_RESERVED_START,
        size: PLATFORM_RESERVED_END - PLATFORM_RESERVED_START,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(bad("more e820 entries than the zero page holds"));
    }
    Ok(map)
}

/// What the kernel's setup header says, checked.
struct Kernel {
    /// The header as read from the image.
    hdr: setup_header,
    /// End of the memory the kernel decompresses into.
    mem_end: u64,
    /// Longest command line it takes (without the NUL).
    cmdline_max: u64,
}

/// Reads and checks the setup header of the bzImage `path`, for a load at [`HIMEM_START`].
fn inspect_kernel(path: &Path, file: &mut File) -> Result<Kernel, LinuxBootError> {
    let io = |source| LinuxBootError::Io {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let not = |reason: String| LinuxBootError::NotBzImage {
        path: path.to_path_buf(),
        reason,
    };
    let len = file.metadata().map_err(io)?.len();
    let mut hdr = setup_header::default();
    let hdr_end = SETUP_HEADER_OFFSET + hdr.as_slice().len() as u64;
    if len < hdr_end {
        return Err(not(format!(
            "{len} bytes, too short to hold a setup header (which ends at byte {hdr_end})"
        )));
    }
    let mut head = vec![0u8; hdr_end as usize];
    file.read_exact(&mut head).map_err(io)?;
    hdr.as_mut_slice()
        .copy_from_slice(&head[SETUP_HEADER_OFFSET as usize..]);

    let magic = hdr.header;
    if magic != KERNEL_HDR_MAGIC {
        return Err(not(format!(
            "no \"HdrS\" magic at offset 0x202 (found {:02x?})",
            magic.to_le_bytes()
        )));
    }
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not(format!(
            "boot protocol {}.{:02} without a 64-bit entry point (needs 2.12 or later with \
             XLF_KERNEL_64)",
            version >> 8,
            version & 0xff
        )));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(not("a zImage (loaded low), not a bzImage".into()));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    if len <= setup_size {
        return Err(not(format!(
            "{len} bytes, no kernel after its {setup_size} bytes of setup code"
        )));
    }
    let payload = len - setup_size;

    // The decompressor (arch/x86/boot/compressed/head_64.S) works in a buffer of `init_size`
    // bytes at the load address aligned up to `kernel_alignment` (relocatable kernels), but
    // never below `pref_address` (LOAD_PHYSICAL_ADDR).
    let align = match hdr.kernel_alignment {
        0 => DEFAULT_KERNEL_ALIGNMENT,
        a => a,
    };
    let base = if hdr.relocatable_kernel != 0 {
        HIMEM_START.next_multiple_of(u64::from(align))
    } else {
        0
    };
    let base = base.max(hdr.pref_address);
    let mem_end = (base + u64::from(hdr.init_size))
        .max(HIMEM_START + payload)
        .next_multiple_of(INITRD_ALIGN);
    let cmdline_max = u64::from(hdr.cmdline_size).min(CMDLINE_MAX_SIZE - 1);
    Ok(Kernel {
        hdr,
        mem_end,
        cmdline_max,
    })
}

/// Checks the command line against the kernel's limit.
fn check_cmdline(cmdline: &str, max: u64) -> Result<(), LinuxBootError> {
    if let Some(at) = cmdline.bytes().position(|b| b == 0) {
        return Err(LinuxBootError::CmdlineNul(at));
    }
    if cmdline.len() as u64 > max {
        return Err(LinuxBootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Where the initrd of `size` bytes goes: page aligned, as high as possible below `top`,
/// not below `floor`.
fn place_initrd(size: u64, floor: u64, top: u64) -> Option<u64> {
    let start = top.checked_sub(size)? / INITRD_ALIGN * INITRD_ALIGN;
    (start >= floor).then_some(start)
}

/// Wraps a guest memory error.
fn mem_err(
    what: &'static str,
    addr: u64,
) -> impl FnOnce(vm_memory::GuestMemoryError) -> LinuxBootError {
    move |source| LinuxBootError::Memory {
        what,
        addr,
        source: source.into(),
    }
}

/// See [`super::load`].
pub(super) fn load(
    mem: &GuestMem,
    regions: &[(u64, u64)],
    vcpus: u8,
    boot: &LinuxBoot,
) -> Result<BootInfo, LinuxBootError> {
    // Everything that can be checked first, before any write.
    if vcpus == 0 || usize::from(vcpus) > MAX_VCPUS {
        return Err(LinuxBootError::BadVcpuCount {
            vcpus: vcpus.into(),
            max: MAX_VCPUS,
        });
    }
    let e820 = e820_map(regions)?;
    let low_ram_end = (regions[0].0 + regions[0].1).min(LOW_RAM_END);

    let kernel_path = &boot.kernel;
    let mut kernel_file = File::open(kernel_path).map_err(|source| LinuxBootError::Io {
        what: "kernel",
        path: kernel_path.clone(),
        source,
    })?;
    let kernel = inspect_kernel(kernel_path, &mut kernel_file)?;
    check_cmdline(&boot.cmdline, kernel.cmdline_max)?;
    if kernel.mem_end > low_ram_end {
        return Err(LinuxBootError::MemoryTooSmall {
            path: kernel_path.clone(),
            needed: kernel.mem_end,
            low_ram_end,
        });
    }

    let initrd = match &boot.initrd {
        None => None,
        Some(path) => {
            let io = |source| LinuxBootError::Io {
                what: "initrd",
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            if size == 0 {
                return Err(LinuxBootError::InitrdEmpty { path: path.clone() });
            }
            let max = u64::from(kernel.hdr.initrd_addr_max);
            let top = low_ram_end.min(max.saturating_add(1));
            let addr = place_initrd(size, kernel.mem_end, top).ok_or_else(|| {
                LinuxBootError::InitrdTooBig {
                    path: path.clone(),
                    size,
                    room: top.saturating_sub(kernel.mem_end),
                    kernel_mem_end: kernel.mem_end,
                    top,
                }
            })?;
            Some((file, path, addr, size))
        }
    };

    // The kernel: linux-loader reads the header again and copies the protected-mode part to
    // `code32_start` (1 MiB), refusing a load below HIMEM_START.
    let loaded = BzImage::load(mem, None, &mut kernel_file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| LinuxBootError::KernelLoad {
            path: kernel_path.clone(),
            source,
        })?;
    let kernel_load = loaded.kernel_load.0;
    let entry = kernel_load + KERNEL_64BIT_ENTRY_OFFSET;
    let mut hdr = loaded.setup_header.unwrap_or(kernel.hdr);

    // The initrd, in chunks.
    let initrd = match initrd {
        None => None,
        Some((mut file, path, addr, size)) => {
            let mut done = 0;
            while done < size {
                let n = (size - done).min(INITRD_CHUNK);
                mem.read_exact_volatile_from(GuestAddress(addr + done), &mut file, n as usize)
                    .map_err(|e| LinuxBootError::Io {
                        what: "initrd",
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    })?;
                done += n;
            }
            Some((addr, size))
        }
    };

    // The command line.
    let mut cmdline = boot.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("command line", CMDLINE_ADDR))?;

    // The zero page.
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    let (ramdisk_image, ramdisk_size) = initrd.unwrap_or((0, 0));
    hdr.ramdisk_image = ramdisk_image as u32;
    hdr.ramdisk_size = ramdisk_size as u32;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| LinuxBootError::Memory {
        what: "zero page",
        addr: ZERO_PAGE_ADDR,
        source: e.into(),
    })?;

    // GDT, IDT, page tables; the MP table.
    regs::write_boot_tables(mem)?;
    let mptable = mptable::build(MPTABLE_ADDR, vcpus)?;
    mem.write_slice(&mptable, GuestAddress(MPTABLE_ADDR))
        .map_err(mem_err("MP table", MPTABLE_ADDR))?;

    Ok(BootInfo {
        entry,
        boot_params: ZERO_PAGE_ADDR,
        kernel_load,
        kernel_end: loaded.kernel_end,
        kernel_mem_end: kernel.mem_end,
        initrd,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: boot.cmdline.len() as u64,
        mptable_addr: MPTABLE_ADDR,
        mptable_len: mptable.len() as u64,
        vcpus,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::layout::ram_regions;
    use crate::linux::{LinuxBoot, DEFAULT_CMDLINE, MAX_MEM_SIZE};

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// A scratch file that is removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("rmc-linux-test-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }

        /// A sparse file of `len` bytes (nothing is written).
        fn sparse(name: &str, len: u64) -> Self {
            let f = Self::new(name, &[]);
            File::options()
                .write(true)
                .open(&f.0)
                .unwrap()
                .set_len(len)
                .unwrap();
            f
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A minimal bzImage: a setup header like a 6.1 x86-64 kernel's (protocol 2.15, 64-bit
    /// entry, relocatable, 2 MiB aligned, loads at 16 MiB) and `payload` bytes of "kernel".
    fn fake_bzimage(payload: usize, init_size: u32, xloadflags: u16) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        let mut hdr = setup_header {
            setup_sects,
            boot_flag: 0xaa55,
            header: KERNEL_HDR_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: HIMEM_START as u32,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size,
            ..Default::default()
        };
        hdr.syssize = (payload / 16) as u32;
        img[SETUP_HEADER_OFFSET as usize..][..hdr.as_slice().len()].copy_from_slice(hdr.as_slice());
        img.extend((0..payload).map(|i| (i % 251) as u8));
        img
    }

    fn mem(size: u64) -> (GuestMem, Vec<(u64, u64)>) {
        let regions = ram_regions(size);
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        (GuestMem::from_ranges(&ranges).unwrap(), regions)
    }

    fn dirty(mem: &GuestMem, addr: u64) -> bool {
        let r = mem.find_region(GuestAddress(addr)).unwrap();
        let off = addr - r.start_addr().0;
        std::ops::Deref::deref(r).bitmap().dirty_at(off as usize)
    }

    fn zero_page(mem: &GuestMem) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    /// The newest /boot/vmlinuz-*, or None (skip) when there is none; with
    /// RMC_REQUIRE_KVM=1 (CI), a missing kernel fails the test instead.
    fn host_kernel(test: &str) -> Option<PathBuf> {
        let newest = std::fs::read_dir("/boot").ok().and_then(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .max()
                .map(|(_, p)| p)
        });
        if newest.is_none() {
            if std::env::var("RMC_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: no /boot/vmlinuz-* kernel, and RMC_REQUIRE_KVM=1 forbids skipping");
            }
            eprintln!("SKIPPED {test}: no /boot/vmlinuz-* kernel to load");
        }
        newest
    }

    #[test]
    fn e820_covers_ram_except_bios_area() {
        for size in [64 * MIB, 3 * GIB, 8 * GIB, MAX_MEM_SIZE] {
            let regions = ram_regions(size);
            let map = e820_map(&regions).unwrap();
            // Sorted, not overlapping.
            for w in map.windows(2) {
                assert!(w[0].end() <= w[1].addr, "{size:#x}: {map:x?}");
            }
            // RAM is exactly the regions minus EBDA_START..1 MiB.
            let ram: Vec<(u64, u64)> = map
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| (e.addr, e.end()))
                .collect();
            let mut want = vec![(0, EBDA_START), (HIMEM_START, regions[0].1)];
            want.extend(regions[1..].iter().map(|&(s, l)| (s, s + l)));
            assert_eq!(ram, want, "{size:#x}");
            let total: u64 = map
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(total, size - (HIMEM_START - EBDA_START));
            // The BIOS area and the platform area are reserved; nothing in 3-4 GiB is RAM.
            assert!(map.contains(&E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820_RESERVED
            }));
            assert!(map.contains(&E820Entry {
                addr: 0xfec0_0000,
                size: (4 * GIB) - 0xfec0_0000,
                kind: E820_RESERVED
            }));
            assert!(!map
                .iter()
                .any(|e| e.kind == E820_RAM && e.addr < 4 * GIB && e.end() > 3 * GIB));
        }
    }

    #[test]
    fn e820_refuses_bad_regions() {
        for regions in [
            vec![],
            vec![(0x1000, 64 * MIB)],
            vec![(0, 4 * GIB)],
            vec![(0, 64 * MIB), (32 * MIB, 64 * MIB)],
        ] {
            let err = e820_map(&regions).unwrap_err();
            assert!(matches!(err, LinuxBootError::BadRegions { .. }), "{err}");
        }
    }

    #[test]
    fn fake_kernel_loads_with_initrd_and_cmdline() {
        let (mem, regions) = mem(256 * MIB);
        let kernel = TempFile::new("fake-kernel", &fake_bzimage(300_000, 0x300_0000, 1));
        let initrd_bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let initrd = TempFile::new("fake-initrd", &initrd_bytes);
        let boot = LinuxBoot {
            kernel: kernel.0.clone(),
            initrd: Some(initrd.0.clone()),
            cmdline: format!("{DEFAULT_CMDLINE} rdinit=/bin/sh"),
        };
        let info = load(&mem, &regions, 2, &boot).unwrap();
        assert_eq!(info.kernel_load, HIMEM_START);
        assert_eq!(info.entry, HIMEM_START + 0x200);
        assert_eq!(info.kernel_end, HIMEM_START + 300_000);
        // Decompression buffer: max(1 MiB aligned to 2 MiB, 16 MiB) + init_size.
        assert_eq!(info.kernel_mem_end, 0x100_0000 + 0x300_0000);
        let (rd, rd_len) = info.initrd.unwrap();
        assert_eq!(rd_len, initrd_bytes.len() as u64);
        assert_eq!(rd % 4096, 0);
        assert!(rd >= info.kernel_mem_end && rd + rd_len <= 256 * MIB);
        assert!(256 * MIB - (rd + rd_len) < 4096, "as high as possible");
        let mut back = vec![0u8; initrd_bytes.len()];
        mem.read_slice(&mut back, GuestAddress(rd)).unwrap();
        assert_eq!(back, initrd_bytes);
        // The kernel payload is at 1 MiB.
        let mut k = [0u8; 16];
        mem.read_slice(&mut k, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(k.to_vec(), (0..16u8).collect::<Vec<_>>());

        let p = zero_page(&mem);
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.ramdisk_image }, rd as u32);
        assert_eq!({ hdr.ramdisk_size }, rd_len as u32);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, boot.cmdline.len() as u32 + 1);
        let mut cl = vec![0u8; boot.cmdline.len() + 1];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl[..boot.cmdline.len()], boot.cmdline.as_bytes());
        assert_eq!(cl[boot.cmdline.len()], 0);
        // The e820 map in the zero page is e820_map's.
        let want = e820_map(&regions).unwrap();
        assert_eq!(usize::from(p.e820_entries), want.len());
        for (got, want) in p.e820_table.iter().zip(&want) {
            let got = *got;
            assert_eq!(
                ({ got.addr }, { got.size }, { got.r#type }),
                (want.addr, want.size, want.kind)
            );
        }
        // Every write went through vm-memory: the dirty bitmap has it.
        for addr in [
            HIMEM_START,
            rd,
            CMDLINE_ADDR,
            ZERO_PAGE_ADDR,
            MPTABLE_ADDR,
            crate::linux::PML4_ADDR,
            crate::linux::BOOT_GDT_ADDR,
        ] {
            assert!(dirty(&mem, addr), "{addr:#x} not dirty");
        }
        assert_eq!(info.mptable_addr, MPTABLE_ADDR);
        assert_eq!(info.mptable_len, mptable::size(2) as u64);
        assert_eq!(info.vcpus, 2);
        mptable::tests::check_table(&mem, 2);
    }

    #[test]
    fn host_kernel_loads() {
        let Some(kernel) = host_kernel("host_kernel_loads") else {
            return;
        };
        let (mem, regions) = mem(256 * MIB);
        let initrd = TempFile::new("host-initrd", &[0x5a; 3 * 4096 + 17]);
        let boot = LinuxBoot {
            kernel: kernel.clone(),
            initrd: Some(initrd.0.clone()),
            cmdline: DEFAULT_CMDLINE.into(),
        };
        let info = load(&mem, &regions, 4, &boot).unwrap();
        let p = zero_page(&mem);
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC, "HdrS");
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert!({ hdr.version } >= MIN_BOOT_PROTOCOL);
        assert_eq!({ hdr.code32_start }, HIMEM_START as u32);
        assert_eq!(info.entry, info.kernel_load + 0x200);
        assert_eq!(info.kernel_load, HIMEM_START);
        // The payload really is the file minus its setup sectors.
        let file = std::fs::read(&kernel).unwrap();
        let setup = (usize::from(hdr.setup_sects) + 1) * 512;
        assert_eq!(
            info.kernel_end - info.kernel_load,
            (file.len() - setup) as u64
        );
        let mut head = vec![0u8; 4096];
        mem.read_slice(&mut head, GuestAddress(HIMEM_START))
            .unwrap();
        assert_eq!(head, file[setup..setup + 4096]);
        // Command line.
        let ptr = u64::from(hdr.cmd_line_ptr);
        let mut cl = vec![0u8; DEFAULT_CMDLINE.len() + 1];
        mem.read_slice(&mut cl, GuestAddress(ptr)).unwrap();
        assert_eq!(&cl[..DEFAULT_CMDLINE.len()], DEFAULT_CMDLINE.as_bytes());
        assert_eq!(cl[DEFAULT_CMDLINE.len()], 0);
        // Ramdisk: as placed, page aligned, in RAM, after the kernel's buffer.
        let (rd, rd_len) = info.initrd.unwrap();
        assert_eq!(u64::from(hdr.ramdisk_image), rd);
        assert_eq!(u64::from(hdr.ramdisk_size), rd_len);
        assert_eq!(rd_len, 3 * 4096 + 17);
        assert_eq!(rd % 4096, 0);
        assert!(rd >= info.kernel_mem_end && info.kernel_mem_end > info.kernel_end);
        assert!(rd + rd_len <= 256 * MIB);
        assert!(rd + rd_len <= u64::from(hdr.initrd_addr_max) + 1);
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(rd + rd_len - 4))
            .unwrap();
        assert_eq!(b, [0x5a; 4]);
        assert!(usize::from(p.e820_entries) >= 3);
        eprintln!(
            "{}: entry {:#x}, image to {:#x}, buffer to {:#x}, initrd at {rd:#x}",
            kernel.display(),
            info.entry,
            info.kernel_end,
            info.kernel_mem_end
        );
    }

    #[test]
    fn initrd_too_big_is_refused() {
        let (mem, regions) = mem(256 * MIB);
        let kernel = TempFile::new("big-rd-kernel", &fake_bzimage(4096, 0x300_0000, 1));
        // Larger than all of memory, and larger than the room above the kernel's buffer
        // (256 - 64 MiB) though smaller than memory.
        for (name, len) in [("huge-rd", 300 * MIB), ("big-rd", 200 * MIB)] {
            let initrd = TempFile::sparse(name, len);
            let boot = LinuxBoot {
                kernel: kernel.0.clone(),
                initrd: Some(initrd.0.clone()),
                cmdline: String::new(),
            };
            let err = load(&mem, &regions, 1, &boot).unwrap_err();
            match &err {
                LinuxBootError::InitrdTooBig {
                    size,
                    room,
                    kernel_mem_end,
                    top,
                    ..
                } => {
                    assert_eq!(*size, len);
                    assert_eq!(*kernel_mem_end, 64 * MIB);
                    assert_eq!(*top, 256 * MIB);
                    assert_eq!(*room, 192 * MIB);
                }
                e => panic!("{e}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains(name) && msg.contains(&len.to_string()),
                "{msg}"
            );
        }
        // Nothing was loaded: the checks come first.
        assert!(!dirty(&mem, HIMEM_START));
    }

    #[test]
    fn not_a_bzimage_is_refused() {
        let (mem, regions) = mem(256 * MIB);
        let cases: [(&str, Vec<u8>, &str); 4] = [
            (
                "elf",
                {
                    let mut v = vec![0u8; 8192];
                    v[..4].copy_from_slice(b"\x7fELF");
                    v
                },
                "HdrS",
            ),
            ("short", b"hello".to_vec(), "too short"),
            ("no64", fake_bzimage(4096, 0x300_0000, 0), "64-bit entry"),
            (
                "nopayload",
                fake_bzimage(0, 0x300_0000, 1),
                "no kernel after",
            ),
        ];
        for (name, bytes, want) in cases {
            let f = TempFile::new(name, &bytes);
            let boot = LinuxBoot {
                kernel: f.0.clone(),
                initrd: None,
                cmdline: String::new(),
            };
            let err = load(&mem, &regions, 1, &boot).unwrap_err();
            assert!(
                matches!(err, LinuxBootError::NotBzImage { .. }),
                "{name}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
        }
        let boot = LinuxBoot {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load(&mem, &regions, 1, &boot).unwrap_err();
        assert!(
            matches!(err, LinuxBootError::Io { what: "kernel", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/nonexistent/vmlinuz"));
    }

    #[test]
    fn bad_cmdline_vcpus_and_memory_are_refused() {
        let (mem, regions) = mem(256 * MIB);
        let kernel = TempFile::new("cl-kernel", &fake_bzimage(4096, 0x300_0000, 1));
        let boot = |cmdline: String| LinuxBoot {
            kernel: kernel.0.clone(),
            initrd: None,
            cmdline,
        };
        let err = load(&mem, &regions, 1, &boot("x".repeat(2048))).unwrap_err();
        assert!(
            matches!(
                err,
                LinuxBootError::CmdlineTooLong {
                    len: 2048,
                    max: 2047
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("2048") && err.to_string().contains("2047"));
        load(&mem, &regions, 1, &boot("x".repeat(2047))).unwrap();
        let err = load(&mem, &regions, 1, &boot("a\0b".into())).unwrap_err();
        assert!(matches!(err, LinuxBootError::CmdlineNul(1)), "{err}");

        for vcpus in [0u8, 255] {
            let err = load(&mem, &regions, vcpus, &boot(String::new())).unwrap_err();
            assert!(matches!(err, LinuxBootError::BadVcpuCount { .. }), "{err}");
        }

        // A kernel that needs 16 + 48 MiB does not fit in 32 MiB.
        let (small, small_regions) = self::mem(32 * MIB);
        let err = load(&small, &small_regions, 1, &boot(String::new())).unwrap_err();
        match err {
            LinuxBootError::MemoryTooSmall {
                needed,
                low_ram_end,
                ..
            } => assert_eq!((needed, low_ram_end), (64 * MIB, 32 * MIB)),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn default_cmdline_is_single_spaced() {
        let words: Vec<&str> = DEFAULT_CMDLINE.split(' ').collect();
        assert!(words.iter().all(|w| !w.is_empty()), "{DEFAULT_CMDLINE:?}");
        for w in [
            "console=ttyS0",
            "reboot=k",
            "panic=1",
            "pci=off",
            "tsc=reliable",
        ] {
            assert!(words.contains(&w), "{w}");
        }
        assert!(DEFAULT_CMDLINE.len() < 2047);
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(place_initrd(4096, 0, 8192), Some(4096));
        assert_eq!(place_initrd(4097, 0, 8192), Some(0));
        assert_eq!(place_initrd(100, 0, 8192 + 50), Some(4096));
        assert_eq!(place_initrd(4097, 1, 8192), None);
        assert_eq!(place_initrd(9000, 0, 8192), None);
    }
}
