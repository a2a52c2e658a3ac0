//! The Intel MultiProcessor Specification (1.4) table: how a kernel without ACPI finds the
//! processors, the IOAPIC and the routing of the ISA interrupts.
//!
//! Two parts, back to back at [`super::MPTABLE_ADDR`] (the first KiB of the EBDA, one of the
//! places Linux scans for the floating pointer):
//!
//! ```text
//! floating pointer   16 bytes   "_MP_", address of the configuration table, length 1
//!                               (16-byte units), spec 1.4, checksum; feature bytes 0: a
//!                               configuration table follows, no IMCR (virtual wire mode)
//! configuration      44 bytes   "PCMP", base table length, spec 1.4, checksum, OEM "RMC",
//!   table header                product "KVM VM", entry count, LAPIC address 0xfee00000
//! processor entries  20 bytes   one per vCPU: APIC id = vCPU index, enabled, BSP flag on 0
//! bus entry           8 bytes   bus 0, "ISA   "
//! IOAPIC entry        8 bytes   id = number of vCPUs, version 0x11, usable, 0xfec00000
//! I/O interrupts      8 bytes   x16: INT, conforming polarity/trigger, ISA IRQ n -> pin n
//! local interrupts    8 bytes   x2: ExtINT -> LAPIC 0 LINT0; NMI -> all LAPICs LINT1
//! ```
//!
//! Each structure is laid out byte by byte here (little endian, offsets as in the spec);
//! both checksums make their structure's bytes sum to 0 (mod 256).

use super::{LinuxBootError, IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS};

/// Floating pointer signature.
pub const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
/// Configuration table signature.
pub const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
/// Size of the floating pointer structure.
pub const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
pub const MPC_HEADER_SIZE: usize = 44;
/// Size of a processor entry.
pub const CPU_ENTRY_SIZE: usize = 20;
/// Size of every other entry.
pub const ENTRY_SIZE: usize = 8;
/// Number of ISA interrupts routed to the IOAPIC.
pub const ISA_IRQS: u8 = 16;

/// Entry types.
pub const MP_PROCESSOR: u8 = 0;
/// Bus entry.
pub const MP_BUS: u8 = 1;
/// IOAPIC entry.
pub const MP_IOAPIC: u8 = 2;
/// I/O interrupt assignment entry.
pub const MP_INTSRC: u8 = 3;
/// Local interrupt assignment entry.
pub const MP_LINTSRC: u8 = 4;

/// Interrupt types of the interrupt assignment entries.
pub const MP_INT: u8 = 0;
/// NMI.
pub const MP_NMI: u8 = 1;
/// ExtINT (the 8259's vector).
pub const MP_EXTINT: u8 = 3;

/// Processor flags: enabled.
pub const CPU_ENABLED: u8 = 1;
/// Processor flags: the bootstrap processor.
pub const CPU_BOOTPROCESSOR: u8 = 2;

/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
/// Local APIC version (KVM's LAPIC reports 0x14).
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version (KVM's IOAPIC reports 0x11).
const IOAPIC_VERSION: u8 = 0x11;
/// Processor signature: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// Processor features: FPU and APIC (CPUID.1:EDX bits 0 and 9).
const CPU_FEATURES: u32 = 0x201;
/// Destination "all local APICs".
const ALL_LAPICS: u8 = 0xff;

/// Bytes of MP table for `vcpus` vCPUs.
pub fn size(vcpus: u8) -> usize {
    MPF_SIZE
        + MPC_HEADER_SIZE
        + CPU_ENTRY_SIZE * usize::from(vcpus)
        + ENTRY_SIZE * (2 + usize::from(ISA_IRQS) + 2)
}

/// Two's complement of the byte sum: the checksum byte that makes `bytes` sum to 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP table for `vcpus` vCPUs, to be written at guest physical `addr`.
pub fn build(addr: u64, vcpus: u8) -> Result<Vec<u8>, LinuxBootError> {
    if vcpus == 0 || usize::from(vcpus) > MAX_VCPUS {
        return Err(LinuxBootError::BadVcpuCount {
            vcpus: vcpus.into(),
            max: MAX_VCPUS,
        });
    }
    let table_addr = u32::try_from(addr + MPF_SIZE as u64)
        .ok()
        .filter(|a| u64::from(*a) + size(vcpus) as u64 <= 1 << 20)
        .ok_or_else(|| LinuxBootError::BadRegions {
            regions: vec![(addr, size(vcpus) as u64)],
            reason: "the MP table must lie below 1 MiB".into(),
        })?;
    let ioapic_id = vcpus;

    // Configuration table entries.
    let mut entries = Vec::with_capacity(size(vcpus));
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend([MP_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([MP_BUS, 0]);
    entries.extend(b"ISA   ");
    count += 1;
    entries.extend([MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Polarity and trigger 0: as the bus says (ISA: active high, edge).
        entries.extend([MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend([MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([MP_LINTSRC, MP_NMI, 0, 0, 0, 0, ALL_LAPICS, 1]);
    count += 2;

    // Configuration table header.
    let length = u16::try_from(MPC_HEADER_SIZE + entries.len()).expect("MP table < 64 KiB");
    let mut table = Vec::with_capacity(size(vcpus));
    table.extend(MPC_SIGNATURE);
    table.extend(length.to_le_bytes());
    table.extend([SPEC_REV, 0]); // checksum at offset 7, below
    table.extend(b"RMC     "); // OEM id, 8 bytes
    table.extend(b"KVM VM      "); // product id, 12 bytes
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend(LAPIC_ADDR.to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table length
    table.extend([0u8, 0]); // extended table checksum, reserved
    debug_assert_eq!(table.len(), MPC_HEADER_SIZE);
    table.extend(entries);
    table[7] = checksum(&table);

    // Floating pointer.
    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend(MPF_SIGNATURE);
    mpf.extend(table_addr.to_le_bytes());
    mpf.extend([1, SPEC_REV, 0]); // length in 16-byte units, spec, checksum at offset 10
    mpf.extend([0u8; 5]); // feature bytes: a table follows, no IMCR
    mpf[10] = checksum(&mpf);

    mpf.extend(table);
    debug_assert_eq!(mpf.len(), size(vcpus));
    Ok(mpf)
}

#[cfg(test)]
pub(crate) mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::linux::{EBDA_START, MPTABLE_ADDR};
    use crate::GuestMem;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Parses the MP table back from guest memory the way Linux finds it, and checks it.
    pub(crate) fn check_table(mem: &GuestMem, vcpus: u8) {
        // The floating pointer: on a 16-byte boundary in the first KiB of the EBDA.
        let mut ebda = vec![0u8; 1024];
        mem.read_slice(&mut ebda, GuestAddress(EBDA_START)).unwrap();
        let off = (0..1024)
            .step_by(16)
            .find(|&o| &ebda[o..o + 4] == MPF_SIGNATURE)
            .expect("_MP_ in the EBDA");
        let mpf = &ebda[off..off + 16];
        assert_eq!(sum(mpf), 0, "floating pointer checksum");
        assert_eq!(mpf[8], 1, "length in 16-byte units");
        assert_eq!(mpf[9], 4, "spec 1.4");
        assert_eq!(mpf[11], 0, "a configuration table follows");

        let physptr = u64::from(u32_at(mpf, 4));
        let mut head = [0u8; MPC_HEADER_SIZE];
        mem.read_slice(&mut head, GuestAddress(physptr)).unwrap();
        assert_eq!(&head[..4], MPC_SIGNATURE);
        let length = usize::from(u16_at(&head, 4));
        let mut table = vec![0u8; length];
        mem.read_slice(&mut table, GuestAddress(physptr)).unwrap();
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(table[6], 4);
        assert_eq!(u32_at(&table, 36), 0xfee0_0000, "LAPIC address");
        let count = usize::from(u16_at(&table, 34));

        let mut cpus = Vec::new();
        let mut buses = Vec::new();
        let mut ioapics = Vec::new();
        let mut intsrcs = Vec::new();
        let mut lintsrcs = Vec::new();
        let mut at = MPC_HEADER_SIZE;
        let mut seen = 0;
        while at < length {
            let e = &table[at..];
            match e[0] {
                MP_PROCESSOR => {
                    cpus.push((e[1], e[3]));
                    at += CPU_ENTRY_SIZE;
                }
                MP_BUS => {
                    buses.push((e[1], e[2..8].to_vec()));
                    at += ENTRY_SIZE;
                }
                MP_IOAPIC => {
                    ioapics.push((e[1], e[3], u32_at(e, 4)));
                    at += ENTRY_SIZE;
                }
                MP_INTSRC => {
                    intsrcs.push((e[1], u16_at(e, 2), e[4], e[5], e[6], e[7]));
                    at += ENTRY_SIZE;
                }
                MP_LINTSRC => {
                    lintsrcs.push((e[1], e[6], e[7]));
                    at += ENTRY_SIZE;
                }
                t => panic!("unknown entry type {t} at {at}"),
            }
            seen += 1;
        }
        assert_eq!(at, length, "entries end with the table");
        assert_eq!(seen, count, "entry count");

        assert_eq!(cpus.len(), usize::from(vcpus));
        for (i, &(id, flags)) in cpus.iter().enumerate() {
            assert_eq!(usize::from(id), i, "APIC ids 0..n");
            assert_ne!(flags & CPU_ENABLED, 0, "enabled");
            assert_eq!(flags & CPU_BOOTPROCESSOR != 0, i == 0, "BSP flag only on 0");
        }
        assert_eq!(buses, vec![(0, b"ISA   ".to_vec())]);
        assert_eq!(ioapics, vec![(vcpus, 1, 0xfec0_0000)]);
        assert_eq!(intsrcs.len(), 16);
        for (irq, &(kind, flags, bus, src, dst, pin)) in intsrcs.iter().enumerate() {
            assert_eq!((kind, flags, bus), (MP_INT, 0, 0));
            assert_eq!((usize::from(src), usize::from(pin)), (irq, irq));
            assert_eq!(dst, vcpus, "to the IOAPIC");
        }
        assert_eq!(
            lintsrcs,
            vec![(MP_EXTINT, 0, 0), (MP_NMI, 0xff, 1)],
            "LINT0 ExtINT on the BSP, LINT1 NMI everywhere"
        );
    }

    #[test]
    fn mptable_parses_back() {
        for vcpus in [1u8, 2, 16, MAX_VCPUS as u8] {
            let mem = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
            let table = build(MPTABLE_ADDR, vcpus).unwrap();
            assert_eq!(table.len(), size(vcpus));
            // Below 1 MiB (in the e820-reserved area) even for MAX_VCPUS.
            assert!(MPTABLE_ADDR + table.len() as u64 <= 1 << 20);
            mem.write_slice(&table, GuestAddress(MPTABLE_ADDR)).unwrap();
            check_table(&mem, vcpus);
        }
    }

    #[test]
    fn mptable_refuses_bad_vcpu_counts() {
        for vcpus in [0u8, MAX_VCPUS as u8 + 1, 255] {
            let err = build(MPTABLE_ADDR, vcpus).unwrap_err();
            assert!(
                matches!(err, LinuxBootError::BadVcpuCount { max: MAX_VCPUS, .. }),
                "{err}"
            );
            assert!(err.to_string().contains(&vcpus.to_string()));
        }
        assert!(build(0xf_ff00, 4).is_err(), "past 1 MiB");
    }

    #[test]
    fn checksum_makes_sum_zero() {
        for bytes in [&b""[..], b"\x01", b"_MP_\x10\xfc\x09\x00", &[0xff; 300]] {
            let c = checksum(bytes);
            assert_eq!(sum(bytes).wrapping_add(c), 0);
        }
    }
}
