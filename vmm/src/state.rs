//! Checkpointable VM state: everything besides guest memory that a VM needs to continue
//! exactly where it stopped, on another KVM VM, process or host.
//!
//! A [`VmState`] is put together from the parts of the VM, each with its own state type,
//! save/restore code and encoding version ([`crate::persist`]): one [`VcpuState`] per vCPU
//! (saved by `vcpu.rs`) and the [`DeviceStates`] (each device's own, saved by the device).
//!
//! ```text
//! MAGIC "RMCS" | VERSION u32 LE | postcard(body)
//! body     = mem_size u64 (varint) | vcpus: seq of section | devices: seq of section
//! section  = name str | version u32 (varint) | bytes (length-prefixed): postcard(the part's state)
//! ```
//!
//! [`VERSION`] covers the framing and the set of parts; each section carries its part's own
//! version ([`Versioned::VERSION`]). A decoder refuses another [`VERSION`], another version of
//! any part (naming the part and both versions), an unknown, missing or repeated device,
//! truncated input and trailing bytes. Lengths inside are bounded by the input itself, so
//! hostile input cannot make it allocate much more than its own size.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

pub use crate::devices::cmos::CmosState;
pub use crate::devices::console::ConsoleState;
pub use crate::devices::serial::SerialState;
use crate::nic::NicState;
use crate::persist::{self, Section, Versioned};
pub use crate::platform::PlatformState;

/// First bytes of an encoded [`VmState`].
pub const MAGIC: [u8; 4] = *b"RMCS";
/// Current encoding version of the whole (framing and set of parts). Version 1 was one
/// postcard struct; version 2 has a versioned section per vCPU and per device.
pub const VERSION: u32 = 2;

/// Words in the XSAVE area a vCPU state carries (the classic 4 KiB `kvm_xsave`).
pub const XSAVE_WORDS: usize = 1024;

/// State of one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID the vCPU was given (restored first: it decides the XSAVE layout and valid MSRs).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers (segments, control registers, EFER, APIC base).
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state: the 4 KiB KVM_GET_XSAVE area as 1,024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Model-specific registers: (index, value) for every MSR KVM reports as saveable.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
}

impl Versioned for VcpuState {
    const NAME: &'static str = "vcpu";
    const VERSION: u32 = 1;

    fn check(&self) -> Result<(), String> {
        if self.xsave.len() != XSAVE_WORDS {
            return Err(format!(
                "XSAVE area has {} words, expected {XSAVE_WORDS}",
                self.xsave.len()
            ));
        }
        Ok(())
    }
}

/// The saved state of every device of the VM, one field per device. Each is encoded as its
/// own section, with the device's own version. Every VM has the NIC and the console; a VM
/// built to run a stock kernel (a PC VM) also has the PC platform (interrupt controllers,
/// PIT, clock, LAPICs), the COM1 UART and the CMOS: all three or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStates {
    /// The NIC.
    pub nic: NicState,
    /// The console.
    pub console: ConsoleState,
    /// The in-kernel platform devices (PC VMs only).
    pub platform: Option<PlatformState>,
    /// The COM1 UART (PC VMs only).
    pub serial: Option<SerialState>,
    /// The CMOS/RTC (PC VMs only).
    pub cmos: Option<CmosState>,
}

impl DeviceStates {
    /// The devices' sections' bytes, in encoding order.
    fn encode(&self) -> Vec<(&'static str, u32, Vec<u8>)> {
        fn part<S: Versioned>(s: &S) -> (&'static str, u32, Vec<u8>) {
            (S::NAME, S::VERSION, persist::to_bytes(s))
        }
        let mut parts = vec![part(&self.nic), part(&self.console)];
        if let Some(p) = &self.platform {
            parts.push(part(p));
        }
        if let Some(s) = &self.serial {
            parts.push(part(s));
        }
        if let Some(c) = &self.cmos {
            parts.push(part(c));
        }
        parts
    }

    /// Whether these are the devices of a PC VM (one that runs a stock kernel).
    pub fn is_pc(&self) -> bool {
        self.platform.is_some()
    }

    /// Each known device exactly once, in any order.
    fn decode(sections: &[Section<'_>]) -> Result<Self, StateError> {
        fn take<S: Versioned>(
            slot: &mut Option<S>,
            section: &Section<'_>,
        ) -> Result<(), StateError> {
            if slot.is_some() {
                return Err(StateError::DuplicateDevice(S::NAME));
            }
            *slot = Some(section.decode(&format_args!("device {}", S::NAME))?);
            Ok(())
        }
        let mut nic = None;
        let mut console = None;
        let mut platform = None;
        let mut serial = None;
        let mut cmos = None;
        for section in sections {
            if section.name == NicState::NAME {
                take(&mut nic, section)?;
            } else if section.name == ConsoleState::NAME {
                take(&mut console, section)?;
            } else if section.name == PlatformState::NAME {
                take(&mut platform, section)?;
            } else if section.name == SerialState::NAME {
                take(&mut serial, section)?;
            } else if section.name == CmosState::NAME {
                take(&mut cmos, section)?;
            } else {
                return Err(StateError::UnknownDevice(persist::shorten(section.name)));
            }
        }
        Ok(DeviceStates {
            nic: nic.ok_or(StateError::MissingDevice(NicState::NAME))?,
            console: console.ok_or(StateError::MissingDevice(ConsoleState::NAME))?,
            platform,
            serial,
            cmos,
        })
    }

    /// [`Versioned::check`] of every device.
    fn check(&self) -> Result<(), StateError> {
        fn one<S: Versioned>(s: &S) -> Result<(), StateError> {
            persist::check(s, &format_args!("device {}", S::NAME))
        }
        one(&self.nic)?;
        one(&self.console)?;
        match (&self.platform, &self.serial, &self.cmos) {
            (Some(p), Some(s), Some(c)) => {
                one(p)?;
                one(s)?;
                one(c)
            }
            (None, None, None) => Ok(()),
            (None, ..) => Err(StateError::MissingDevice(PlatformState::NAME)),
            (_, None, _) => Err(StateError::MissingDevice(SerialState::NAME)),
            (.., None) => Err(StateError::MissingDevice(CmosState::NAME)),
        }
    }
}

/// Everything except guest memory.
#[derive(Debug, Clone)]
pub struct VmState {
    /// Guest memory size in bytes (a restore must use the same).
    pub mem_size: u64,
    /// One entry per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DeviceStates,
}

/// An encoded state could not be decoded, or a decoded one cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Input too short or not starting with [`MAGIC`].
    #[error("Not an rmc VM state (bad magic or shorter than its header)")]
    BadMagic,
    /// Written by another encoding version.
    #[error("VM state version {found} is not supported (this build reads version {VERSION})")]
    Version {
        /// Version found in the header.
        found: u32,
    },
    /// The body (the framing of the sections) did not decode.
    #[error("VM state body is malformed")]
    Body(#[source] postcard::Error),
    /// A part (a vCPU, a device) was saved with another version of its encoding.
    #[error("The saved state of {part} has version {found}; this build restores version {supported} of it only")]
    PartVersion {
        /// Which part: "vCPU 1", "device nic".
        part: String,
        /// Version found in its section.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A part's bytes did not decode.
    #[error("The saved state of {part} is malformed")]
    PartBody {
        /// Which part.
        part: String,
        /// The error.
        #[source]
        source: postcard::Error,
    },
    /// A part's state decoded but is not one it could have saved.
    #[error("The saved state of {part} cannot be restored: {reason}")]
    Invalid {
        /// Which part.
        part: String,
        /// What is wrong.
        reason: String,
    },
    /// A section names a device this build does not have.
    #[error("VM state holds a device this build does not know: {0:?}")]
    UnknownDevice(String),
    /// A device of this build has no section.
    #[error("VM state has no state for device {0}")]
    MissingDevice(&'static str),
    /// A device has two sections.
    #[error("VM state holds two states for device {0}")]
    DuplicateDevice(&'static str),
    /// The state does not fit the VM it is restored into.
    #[error("VM state does not fit this VM: {0}")]
    Mismatch(String),
}

#[derive(Serialize, Deserialize)]
struct Body<'a> {
    mem_size: u64,
    #[serde(borrow)]
    vcpus: Vec<Section<'a>>,
    #[serde(borrow)]
    devices: Vec<Section<'a>>,
}

impl VmState {
    /// Encodes the state with its header.
    pub fn encode(&self) -> Vec<u8> {
        let vcpus: Vec<Vec<u8>> = self.vcpus.iter().map(persist::to_bytes).collect();
        let devices = self.devices.encode();
        let body = Body {
            mem_size: self.mem_size,
            vcpus: vcpus.iter().map(|d| Section::of::<VcpuState>(d)).collect(),
            devices: devices
                .iter()
                .map(|(name, version, data)| Section {
                    name,
                    version: *version,
                    data,
                })
                .collect(),
        };
        let parts: usize = vcpus
            .iter()
            .chain(devices.iter().map(|d| &d.2))
            .map(Vec::len)
            .sum();
        let mut out = Vec::with_capacity(64 + parts);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        // Encoding into a Vec only fails for types serde cannot express; ours all can.
        postcard::to_io(&body, &mut out).expect("VmState is always serializable");
        out
    }

    /// Decodes a state, refusing other versions (of the whole or of any part), unknown,
    /// missing or repeated devices, and trailing garbage. It does not check that the parts
    /// can be restored: see [`VmState::check`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < 8 || bytes[..4] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let found = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if found != VERSION {
            return Err(StateError::Version { found });
        }
        let (body, rest): (Body<'_>, _) =
            postcard::take_from_bytes(&bytes[8..]).map_err(StateError::Body)?;
        if !rest.is_empty() {
            return Err(StateError::Mismatch(format!(
                "{} bytes of trailing data after the state",
                rest.len()
            )));
        }
        let vcpus = body
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, s)| s.decode(&format_args!("vCPU {i}")))
            .collect::<Result<_, _>>()?;
        Ok(VmState {
            mem_size: body.mem_size,
            vcpus,
            devices: DeviceStates::decode(&body.devices)?,
        })
    }

    /// Every part's own checks ([`Versioned::check`]): what a restore refuses whatever the VM.
    pub fn check(&self) -> Result<(), StateError> {
        for (i, v) in self.vcpus.iter().enumerate() {
            persist::check(v, &format_args!("vCPU {i}"))?;
        }
        if let Some(p) = &self.devices.platform {
            if p.lapics.len() != self.vcpus.len() {
                return Err(StateError::Mismatch(format!(
                    "{} local APICs for {} vCPUs",
                    p.lapics.len(),
                    self.vcpus.len()
                )));
            }
        }
        self.devices.check()
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    /// A small but complete VM state.
    pub(super) fn sample() -> VmState {
        let regs = kvm_regs {
            rip: 0x2_0000,
            rax: 42,
            ..Default::default()
        };
        let mut xsave = vec![0u32; 1024];
        xsave[7] = 0xdead_beef;
        VmState {
            mem_size: 256 << 20,
            vcpus: vec![VcpuState {
                cpuid: vec![kvm_cpuid_entry2::default()],
                regs,
                sregs: kvm_sregs::default(),
                xsave,
                xcrs: kvm_xcrs::default(),
                debugregs: kvm_debugregs::default(),
                msrs: vec![(0x10, 123), (0xc000_0080, 0x500)],
                events: kvm_vcpu_events::default(),
                mp_state: kvm_mp_state::default(),
            }],
            devices: DeviceStates {
                nic: NicState {
                    size: 64,
                    rx_used: 9,
                    ..Default::default()
                },
                console: ConsoleState {
                    partial: vec![b"abc".to_vec()],
                },
                ..Default::default()
            },
        }
    }

    /// [`sample`] as a PC VM's state (platform and UART).
    pub(super) fn pc_sample() -> VmState {
        let mut s = sample();
        let chip = |id| kvm_bindings::kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x20] = 5;
        s.devices.platform = Some(PlatformState {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC),
            pit: Default::default(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 123_456_789,
                ..Default::default()
            },
            lapics: vec![lapic],
        });
        s.devices.serial = Some(SerialState {
            output_offset: 77,
            output: b"seq 9\n".to_vec(),
            ..Default::default()
        });
        s.devices.cmos = Some(CmosState { index: 0x0a });
        s
    }
}

#[cfg(test)]
mod pc_tests {
    use super::tests_support::pc_sample;
    use super::*;

    #[test]
    fn a_pc_vms_state_round_trips_and_its_parts_are_checked() {
        let s = pc_sample();
        let back = VmState::decode(&s.encode()).unwrap();
        assert_eq!(back.devices, s.devices);
        assert_eq!(back.encode(), s.encode());
        back.check().unwrap();

        let mut no_uart = s.clone();
        no_uart.devices.serial = None;
        let e = VmState::decode(&no_uart.encode())
            .unwrap()
            .check()
            .unwrap_err();
        assert!(matches!(e, StateError::MissingDevice("serial")), "{e}");

        let mut two_vcpus_one_lapic = s.clone();
        two_vcpus_one_lapic.vcpus.push(s.vcpus[0].clone());
        let e = two_vcpus_one_lapic.check().unwrap_err();
        assert!(e.to_string().contains("1 local APICs for 2 vCPUs"), "{e}");

        let mut wrong_chip = s.clone();
        wrong_chip.devices.platform.as_mut().unwrap().ioapic.chip_id = 0;
        let e = wrong_chip.check().unwrap_err();
        assert!(e.to_string().contains("device platform"), "{e}");

        let mut big = s.clone();
        big.devices.serial.as_mut().unwrap().output =
            vec![b'x'; crate::devices::serial::MAX_HELD_BYTES + 1];
        let e = big.check().unwrap_err();
        assert!(e.to_string().contains("device serial"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::sample;
    use super::*;

    #[test]
    fn round_trip() {
        let s = sample();
        let back = VmState::decode(&s.encode()).unwrap();
        assert_eq!(back.vcpus[0].regs.rax, 42);
        assert_eq!(back.vcpus[0].xsave[7], 0xdead_beef);
        assert_eq!(back.vcpus[0].msrs, s.vcpus[0].msrs);
        assert_eq!(back.devices, s.devices);
        assert_eq!(back.encode(), s.encode());
        back.check().unwrap();
    }

    #[test]
    fn refuses_bad_input() {
        let enc = sample().encode();
        assert!(matches!(VmState::decode(b"RMC"), Err(StateError::BadMagic)));
        // Version 1, the encoding before per-part versions, is refused by its number.
        let mut v1 = enc.clone();
        v1[4] = 1;
        let err = VmState::decode(&v1).unwrap_err();
        assert!(matches!(err, StateError::Version { found: 1 }));
        assert!(err.to_string().contains("version 1"));
        assert!(matches!(
            VmState::decode(&enc[..enc.len() - 10]),
            Err(StateError::Body(_))
        ));
        let mut long = enc.clone();
        long.push(0);
        assert!(matches!(
            VmState::decode(&long),
            Err(StateError::Mismatch(_))
        ));
        // Every proper prefix is refused.
        for cut in 0..enc.len() {
            assert!(
                VmState::decode(&enc[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
    }

    /// Encodes a body built by hand (sections of any name, version and bytes).
    fn encode_body(mem_size: u64, vcpus: &[Section<'_>], devices: &[Section<'_>]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_le_bytes());
        let body = Body {
            mem_size,
            vcpus: vcpus.to_vec(),
            devices: devices.to_vec(),
        };
        out.extend(postcard::to_allocvec(&body).unwrap());
        out
    }

    #[test]
    fn refuses_other_part_versions_naming_the_part() {
        let s = sample();
        let vcpu = persist::to_bytes(&s.vcpus[0]);
        let nic = persist::to_bytes(&s.devices.nic);
        let console = persist::to_bytes(&s.devices.console);
        let good = [
            Section::of::<NicState>(&nic),
            Section::of::<ConsoleState>(&console),
        ];
        let vcpus = [Section::of::<VcpuState>(&vcpu)];
        // By hand, the same bytes as `encode`; the devices may come in any order.
        assert_eq!(encode_body(s.mem_size, &vcpus, &good), s.encode());
        let swapped = encode_body(s.mem_size, &vcpus, &[good[1], good[0]]);
        assert_eq!(VmState::decode(&swapped).unwrap().encode(), s.encode());

        let nic_v9 = Section {
            version: 9,
            ..good[0]
        };
        let err =
            VmState::decode(&encode_body(s.mem_size, &vcpus, &[nic_v9, good[1]])).unwrap_err();
        assert!(
            matches!(&err, StateError::PartVersion { part, found: 9, supported } if part == "device nic" && *supported == NicState::VERSION),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "The saved state of device nic has version 9; this build restores version {} of it only",
                NicState::VERSION
            )
        );
        let vcpu_v0 = Section {
            version: 0,
            ..vcpus[0]
        };
        let err =
            VmState::decode(&encode_body(s.mem_size, &[vcpus[0], vcpu_v0], &good)).unwrap_err();
        assert!(
            err.to_string().contains("state of vCPU 1 has version 0"),
            "{err}"
        );
        // A device's bytes that do not decode, a vCPU list holding a device.
        let err = VmState::decode(&encode_body(
            s.mem_size,
            &vcpus,
            &[
                Section {
                    data: &[],
                    ..good[0]
                },
                good[1],
            ],
        ))
        .unwrap_err();
        assert!(
            matches!(&err, StateError::PartBody { part, .. } if part == "device nic"),
            "{err:?}"
        );
        let err = VmState::decode(&encode_body(s.mem_size, &[good[0]], &good)).unwrap_err();
        assert!(
            err.to_string().contains("vCPU 0 holds a state of \"nic\""),
            "{err}"
        );
    }

    #[test]
    fn refuses_unknown_missing_and_repeated_devices() {
        let s = sample();
        let vcpu = persist::to_bytes(&s.vcpus[0]);
        let vcpus = [Section::of::<VcpuState>(&vcpu)];
        let nic = persist::to_bytes(&s.devices.nic);
        let console = persist::to_bytes(&s.devices.console);
        let (nic, console) = (
            Section::of::<NicState>(&nic),
            Section::of::<ConsoleState>(&console),
        );
        let decode = |devices: &[Section<'_>]| {
            VmState::decode(&encode_body(s.mem_size, &vcpus, devices)).unwrap_err()
        };
        let floppy = Section {
            name: "floppy",
            version: 1,
            data: &[],
        };
        let err = decode(&[nic, floppy, console]);
        assert!(
            matches!(&err, StateError::UnknownDevice(n) if n == "floppy"),
            "{err:?}"
        );
        assert!(matches!(
            decode(&[nic]),
            StateError::MissingDevice("console")
        ));
        assert!(matches!(
            decode(&[console]),
            StateError::MissingDevice("nic")
        ));
        assert!(matches!(decode(&[]), StateError::MissingDevice("nic")));
        assert!(matches!(
            decode(&[nic, console, nic]),
            StateError::DuplicateDevice("nic")
        ));
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating_them() {
        // Counts and lengths far beyond the input: each is refused as truncated input.
        let header = |body: &[u8]| {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&VERSION.to_le_bytes());
            v.extend_from_slice(body);
            v
        };
        let huge = [0xff, 0xff, 0xff, 0xff, 0x0f]; // varint u32::MAX
        for body in [
            [&[0u8][..], &huge].concat(),                      // 2^32 vCPU sections
            [&[0u8, 0][..], &huge].concat(),                   // 2^32 devices
            [&[0u8, 1, 4][..], b"vcpu", &[1], &huge].concat(), // a 4 GiB vCPU section
            [&[0u8, 0, 1, 3][..], b"nic", &[1], &huge].concat(), // a 4 GiB NIC section
            [&[0u8, 1, 0xff, 0xff, 0xff, 0xff, 0x0f][..]].concat(), // a 4 GiB name
        ] {
            let err = VmState::decode(&header(&body)).unwrap_err();
            assert!(matches!(err, StateError::Body(_)), "{err:?}");
        }
        // A section whose xsave claims 2^32 words.
        let mut vcpu = postcard::to_allocvec(&Vec::<kvm_cpuid_entry2>::new()).unwrap();
        vcpu.extend(postcard::to_allocvec(&kvm_regs::default()).unwrap());
        vcpu.extend(postcard::to_allocvec(&kvm_sregs::default()).unwrap());
        vcpu.extend_from_slice(&huge);
        let s = sample();
        let nic = persist::to_bytes(&s.devices.nic);
        let console = persist::to_bytes(&s.devices.console);
        let bytes = encode_body(
            s.mem_size,
            &[Section::of::<VcpuState>(&vcpu)],
            &[
                Section::of::<NicState>(&nic),
                Section::of::<ConsoleState>(&console),
            ],
        );
        let err = VmState::decode(&bytes).unwrap_err();
        assert!(
            matches!(&err, StateError::PartBody { part, .. } if part == "vCPU 0"),
            "{err:?}"
        );
    }

    #[test]
    fn checks_name_the_part_that_cannot_be_restored() {
        let mut s = sample();
        s.vcpus.push(s.vcpus[0].clone());
        s.vcpus[1].xsave.pop();
        let err = s.check().unwrap_err();
        assert_eq!(
            err.to_string(),
            "The saved state of vCPU 1 cannot be restored: XSAVE area has 1023 words, expected 1024"
        );
        let mut s = sample();
        s.devices.nic.size = 129;
        let err = s.check().unwrap_err();
        assert!(
            matches!(&err, StateError::Invalid { part, .. } if part == "device nic"),
            "{err:?}"
        );
    }
}

#[cfg(test)]
mod restore_check_tests {
    use super::tests_support::sample;
    use crate::RestoreCheck;

    #[test]
    fn a_standby_acks_only_states_it_can_restore() {
        let good = sample();
        let regions = crate::layout::ram_regions(good.mem_size);
        RestoreCheck::check_guest(1, &regions).unwrap();
        RestoreCheck::check_state(&good.encode(), 1, &regions).unwrap();
        // Garbage with a good checksum, another encoding version, another vCPU count, another
        // memory size, an impossible NIC ring: each is refused with what is wrong.
        let err = |bytes: &[u8], vcpus: u32, regions: &[(u64, u64)]| {
            RestoreCheck::check_state(bytes, vcpus, regions)
                .unwrap_err()
                .to_string()
        };
        assert!(err(b"definitely not a state", 1, &regions).contains("Not an rmc VM state"));
        let mut other = good.encode();
        other[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(err(&other, 1, &regions).contains("version 7"));
        assert!(err(&good.encode(), 2, &regions).contains("state has 1 vCPUs"));
        let small = crate::layout::ram_regions(512 << 20);
        assert!(err(&good.encode(), 1, &small).contains("bytes of memory"));
        let mut ring = good.clone();
        ring.devices.nic.size = 4096;
        assert!(err(&ring.encode(), 1, &regions).contains("NIC ring of 4096 entries"));
        // Guests this VMM does not build.
        let guest_err = |vcpus: u32, regions: &[(u64, u64)]| {
            RestoreCheck::check_guest(vcpus, regions)
                .unwrap_err()
                .to_string()
        };
        assert!(guest_err(1, &crate::layout::ram_regions(8 << 20)).contains("memory must be"));
        // The handshake does not say which guest runs: a Linux guest's limits apply.
        let too_many = crate::linux::MAX_VCPUS as u32 + 1;
        assert!(guest_err(too_many, &crate::layout::ram_regions(256 << 20)).contains("vCPUs"));
        RestoreCheck::check_guest(16, &crate::layout::ram_regions(64 << 30)).unwrap();
        assert!(
            guest_err(1, &[(0x10_0000, 256 << 20)]).contains("not those of a 256 MiB rmc guest")
        );
    }
}
