//! x86-64 boot state: the VMM puts every vCPU straight into 64-bit long mode, with an identity
//! map of the guest physical address space (2 MiB pages), a flat GDT and SSE enabled.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, CpuId};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{GDT_ADDR, PAGE_SIZE, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
/// XCR0 bits the guest enables: x87 and SSE state.
pub const XCR0_X87_SSE: u64 = 0b11;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;

/// GDT entries: null, 64-bit code (selector 0x8), data (selector 0x10).
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
const CODE_SELECTOR: u16 = 0x8;
const DATA_SELECTOR: u16 = 0x10;

/// Writes the GDT and the identity-mapping page tables into guest memory.
pub fn write_boot_tables<M: GuestMemory>(mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(PDPT_ADDR | PTE_PRESENT | PTE_RW, GuestAddress(PML4_ADDR))?;
    for gib in 0..PD_COUNT {
        let pd = PD_ADDR + gib * PAGE_SIZE;
        mem.write_obj(pd | PTE_PRESENT | PTE_RW, GuestAddress(PDPT_ADDR + gib * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| {
                let addr = (gib << 30) | (i << 21);
                (addr | PTE_PRESENT | PTE_RW | PTE_PS).to_le_bytes()
            })
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode special registers, starting from the vCPU's current ones.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(CODE_SELECTOR, true);
    let data = segment(DATA_SELECTOR, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = PML4_ADDR;
    // OSXSAVE with XCR0 = x87|SSE: some hosts (PVM) run guest code with the host's CR4, where
    // SSE instructions fault unless XCR0 enables SSE state.
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Initial general registers: `rip` at the workload's entry, a stack, `rdi` = vCPU index,
/// `rsi` = the vCPU's config record. Interrupts stay disabled (the guest polls).
pub fn initial_regs(rip: u64, rsp: u64, vcpu: u64, config: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rdi: vcpu,
        rsi: config,
        rflags: 0x2,
        ..Default::default()
    }
}

/// The CPUID a vCPU sees: what KVM supports, with the vCPU's own APIC id filled in.
pub fn vcpu_cpuid(supported: &CpuId, vcpu: u8, vcpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processor count.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(vcpu) << 24) | (u32::from(vcpus) << 16);
                // ECX[31]: running under a hypervisor. A stock kernel looks for KVM's leaves
                // (0x4000_0000, which KVM supplies) only then, and so finds the KVM clock.
                entry.ecx |= 1 << 31;
            }
            0xb | 0x1f => entry.edx = u32::from(vcpu),
            _ => {}
        }
    }
    cpuid
}

/// Extended control registers at boot: XCR0 = x87 | SSE.
pub fn initial_xcrs() -> kvm_xcrs {
    let mut x = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    x.xcrs[0].xcr = 0;
    x.xcrs[0].value = XCR0_X87_SSE;
    x
}
