//! The boot GDT, IDT and identity-map page tables, and the vCPU state at the kernel's 64-bit
//! entry point.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::{
    BootInfo, LinuxBootError, BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER, PDPT_ADDR, PD_ADDR,
    PML4_ADDR,
};
use crate::GuestMem;

/// The boot GDT. The 64-bit boot protocol wants flat `__BOOT_CS` (0x10, execute/read) and
/// `__BOOT_DS` (0x18, read/write); slot 1 holds a TSS descriptor only so that TR (which KVM
/// takes from the segment cache, never from this table) describes something: VM entry in
/// long mode needs a usable 64-bit busy TSS in TR. The kernel loads its own GDT and TSS
/// before it uses either.
pub(crate) const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),            // null
    gdt_entry(0x808b, 0, 0xfffff), // TSS, 64-bit busy
    gdt_entry(0xa09b, 0, 0xfffff), // __BOOT_CS: code, long mode, present
    gdt_entry(0xc093, 0, 0xfffff), // __BOOT_DS: data, 4 GiB, present
];
/// Selector of the TSS in [`BOOT_GDT`].
pub(crate) const TSS_SELECTOR: u16 = 0x08;
/// Selector of `__BOOT_CS`.
pub(crate) const BOOT_CS: u16 = 0x10;
/// Selector of `__BOOT_DS`.
pub(crate) const BOOT_DS: u16 = 0x18;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page table entry bits: present, writable; page size (a 2 MiB page in a PD).
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_PS: u64 = 0x80;

/// LAPIC register offsets (LVT LINT0, LINT1) and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// MSR indexes.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE: fast string operations on.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// A segment descriptor from its flags (type, S, DPL, P in bits 0-7; AVL, L, D/B, G in
/// bits 12-15), base and 20-bit limit, as the kernel's `GDT_ENTRY` macro builds it.
pub(crate) const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment register (cache) KVM needs for descriptor `entry` loaded with `selector`.
pub(crate) fn segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        // The cache holds the byte limit: with G, the 20-bit limit counts 4 KiB pages.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, the null IDT and the page tables identity-mapping the first GiB
/// with 2 MiB pages (PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> i * 2 MiB). Whole table pages
/// are written, so memory need not be zero.
pub(crate) fn write_boot_tables(mem: &GuestMem) -> Result<(), LinuxBootError> {
    let write = |what: &'static str, addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| LinuxBootError::Memory {
                what,
                addr,
                source: source.into(),
            })
    };
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write("boot GDT", BOOT_GDT_ADDR, &gdt)?;
    write("boot IDT", BOOT_IDT_ADDR, &0u64.to_le_bytes())?;
    let table = |first: u64| -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        page[..8].copy_from_slice(&first.to_le_bytes());
        page
    };
    write("boot PML4", PML4_ADDR, &table(PDPT_ADDR | PTE_PRESENT_RW))?;
    write("boot PDPT", PDPT_ADDR, &table(PD_ADDR | PTE_PRESENT_RW))?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PTE_PS | PTE_PRESENT_RW).to_le_bytes())
        .collect();
    write("boot page directory", PD_ADDR, &pd)
}

/// Long mode with the boot GDT, null IDT and identity map: what the BSP gets.
pub(crate) fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 8 - 1;
    let code = segment(BOOT_GDT[usize::from(BOOT_CS / 8)], BOOT_CS);
    let data = segment(BOOT_GDT[usize::from(BOOT_DS / 8)], BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_GDT[usize::from(TSS_SELECTOR / 8)], TSS_SELECTOR);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The BSP's registers at the entry point: `rsi` = the zero page, interrupts off.
pub(crate) fn boot_regs(info: &BootInfo) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: info.entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: info.boot_params,
        ..Default::default()
    }
}

/// The MSRs every vCPU starts with (as a BIOS leaves them, zero for the syscall MSRs).
pub(crate) fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// A 32-bit LAPIC register from KVM's register page.
pub(crate) fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

/// An LVT entry with its delivery mode (bits 8-10) replaced.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Puts vCPU `index` in the state Linux's 64-bit boot protocol expects.
///
/// Every vCPU: FPU reset values (FCW 0x37f, MXCSR 0x1f80), the boot MSRs (SYSENTER_*, STAR,
/// LSTAR, CSTAR, KERNEL_GS_BASE, SYSCALL_MASK zero, TSC 0, MISC_ENABLE fast strings,
/// MTRRdefType enabled write-back) and the LAPIC's LINT0 = ExtINT, LINT1 = NMI. vCPU 0, the
/// bootstrap processor, also gets long mode (boot GDT, CR3 = the boot PML4) and `rip` =
/// `info.entry`, `rsi` = `info.boot_params`, `rsp` = the boot stack. The others (APs) keep
/// their reset state: with KVM's in-kernel LAPIC they wait for the INIT/SIPI the kernel
/// sends them.
///
/// Needs the in-kernel irqchip (KVM_CREATE_IRQCHIP before the vCPUs) for the LAPIC, and the
/// vCPU's CPUID set first (KVM accepts some MSRs only when CPUID lists them). Does not set
/// CPUID. An MSR KVM refuses, or an `index` the MP table does not list, fails with EINVAL.
pub fn setup_vcpu(fd: &VcpuFd, index: usize, info: &BootInfo) -> Result<(), kvm_ioctls::Error> {
    if index >= usize::from(info.vcpus) {
        tracing::warn!(
            index,
            vcpus = info.vcpus,
            "vCPU is not in the MP table the kernel was loaded with"
        );
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    let written = fd.set_msrs(&msrs)?;
    if written != entries.len() {
        tracing::warn!(
            index,
            msr = format_args!("{:#x}", entries[written].index),
            "KVM refused a boot MSR"
        );
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }

    let mut lapic = fd.get_lapic()?;
    let lint0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    fd.set_lapic(&lapic)?;

    if index == 0 {
        let sregs = fd.get_sregs()?;
        fd.set_sregs(&boot_sregs(sregs))?;
        fd.set_regs(&boot_regs(info))?;
    }
    fd.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::linux::ZERO_PAGE_ADDR;

    #[test]
    fn gdt_entries_match_the_kernel_macro() {
        // GDT_ENTRY(0xa09b, 0, 0xfffff) etc., as the kernel and other VMMs encode them.
        assert_eq!(BOOT_GDT[0], 0);
        assert_eq!(BOOT_GDT[1], 0x008f_8b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        let cs = segment(BOOT_GDT[2], BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(
            (cs.base, cs.limit, cs.selector, cs.unusable),
            (0, 0xffff_ffff, 0x10, 0)
        );
        let ds = segment(BOOT_GDT[3], BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 3, 0x18));
        let tr = segment(BOOT_GDT[1], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn boot_tables_identity_map_the_first_gib() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        // Garbage first: the tables must not rely on zeroed memory.
        mem.write_slice(&[0xee; 0xd000], GuestAddress(0)).unwrap();
        write_boot_tables(&mem).unwrap();
        let q = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        for (i, e) in BOOT_GDT.iter().enumerate() {
            assert_eq!(q(BOOT_GDT_ADDR + 8 * i as u64), *e);
        }
        assert_eq!(q(BOOT_IDT_ADDR), 0);
        assert_eq!(q(PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(q(PDPT_ADDR), PD_ADDR | 3);
        for i in 1..512 {
            assert_eq!(q(PML4_ADDR + 8 * i), 0);
            assert_eq!(q(PDPT_ADDR + 8 * i), 0);
        }
        // Walk a few addresses through the tables.
        for va in [0u64, 0x7000, 0x10_0200, 0x3fff_ffff, 0x2345_6789] {
            let pml4e = q(PML4_ADDR + 8 * ((va >> 39) & 511));
            let pdpte = q((pml4e & !0xfff) + 8 * ((va >> 30) & 511));
            let pde = q((pdpte & !0xfff) + 8 * ((va >> 21) & 511));
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB");
            assert_eq!((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff), va);
        }
    }

    #[test]
    fn lvt_delivery_mode() {
        // Masked (bit 16) LINT0 with vector 0: only the mode bits change.
        assert_eq!(with_delivery_mode(0x1_0000, APIC_MODE_EXTINT), 0x1_0700);
        assert_eq!(with_delivery_mode(0x0700, APIC_MODE_NMI), 0x0400);
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT1, 0x8000_0400);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x8000_0400);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0);
    }

    /// KVM: a VM with the in-kernel irqchip, two vCPUs with the supported CPUID (as the VMM
    /// sets it), set up, read back.
    #[test]
    fn kvm_vcpu_boot_state() {
        if !rmc_tests::kvm_available("linux::regs::kvm_vcpu_boot_state") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let info = BootInfo {
            entry: 0x10_0200,
            boot_params: ZERO_PAGE_ADDR,
            kernel_load: 0x10_0000,
            kernel_end: 0x90_0000,
            kernel_mem_end: 0x500_0000,
            initrd: None,
            cmdline_addr: crate::linux::CMDLINE_ADDR,
            cmdline_len: 0,
            mptable_addr: crate::linux::MPTABLE_ADDR,
            mptable_len: 0,
            vcpus: 2,
        };
        let vcpus: Vec<_> = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
        for (i, fd) in vcpus.iter().enumerate() {
            fd.set_cpuid2(&cpuid).unwrap();
            setup_vcpu(fd, i, &info).unwrap();
        }

        let bsp = &vcpus[0];
        let sregs = bsp.get_sregs().unwrap();
        assert_ne!(sregs.efer & EFER_LMA, 0, "long mode active");
        assert_ne!(sregs.efer & EFER_LME, 0);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (BOOT_CS, 1));
        assert_eq!((sregs.ds.selector, sregs.ss.selector), (BOOT_DS, BOOT_DS));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_ADDR, 31));
        let regs = bsp.get_regs().unwrap();
        assert_eq!(regs.rip, 0x10_0200);
        assert_eq!(regs.rsi, ZERO_PAGE_ADDR);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rflags & (1 << 9), 0, "interrupts off");
        // The FPU as the checkpoint saves it (XSAVE legacy area: FCW at byte 0, MXCSR at byte
        // 24); some hosts' KVM_GET_FPU reports MXCSR 0 whatever was set.
        let xsave = bsp.get_xsave().unwrap();
        assert_eq!(xsave.region[0] & 0xffff, 0x37f, "FCW");
        assert_eq!(xsave.region[6], 0x1f80, "MXCSR");
        assert_eq!(bsp.get_fpu().unwrap().fcw, 0x37f);

        for (i, fd) in vcpus.iter().enumerate() {
            let lapic = fd.get_lapic().unwrap();
            assert_eq!(
                (lapic_reg(&lapic, APIC_LVT0) >> 8) & 7,
                APIC_MODE_EXTINT,
                "vCPU {i}"
            );
            assert_eq!(
                (lapic_reg(&lapic, APIC_LVT1) >> 8) & 7,
                APIC_MODE_NMI,
                "vCPU {i}"
            );
            let mut msrs = Msrs::from_entries(&[
                kvm_msr_entry {
                    index: MSR_IA32_MISC_ENABLE,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: MSR_MTRR_DEF_TYPE,
                    ..Default::default()
                },
            ])
            .unwrap();
            assert_eq!(fd.get_msrs(&mut msrs).unwrap(), 2);
            assert_eq!(msrs.as_slice()[0].data & 1, 1, "fast strings");
            assert_eq!(msrs.as_slice()[1].data, MTRR_ENABLE_WB);
        }
        // The AP stays as reset: not in long mode.
        let ap = vcpus[1].get_sregs().unwrap();
        assert_eq!(ap.efer & EFER_LMA, 0);
        assert_eq!(ap.cr0 & X86_CR0_PG, 0);

        // A vCPU the MP table does not list is refused.
        let extra = vm.create_vcpu(2).unwrap();
        assert!(setup_vcpu(&extra, 2, &info).is_err());
    }
}
