//! Target `vm_state`: `rmc_vmm::VmState::decode`, which reads the state blob of a
//! checkpoint epoch (bytes the primary sent) when the standby fails over.
//!
//! Any bytes: decoding never panics, and whatever decodes encodes to a blob that decodes to
//! the same state again (encode . decode is a fixed point). A state built from the input:
//! its encoding decodes, to an equal state, every proper prefix of it is refused, and so is
//! one more byte. A state built from the input and framed by hand, section by section (the
//! encoding of `rmc_vmm::state`), with one edit: the devices in either order decode to the
//! same state; another version of a part, a renamed, missing, repeated, cut or lengthened
//! section is refused with the error that names it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use rmc_vmm::nic::{NicState, NicStats};
use rmc_vmm::persist::Versioned;
use rmc_vmm::state::{
    CmosState, ConsoleState, DeviceStates, PlatformState, SerialState, StateError, VcpuState,
    MAGIC, VERSION,
};
use rmc_vmm::VmState;
use serde::de::DeserializeOwned;

use crate::input::Input;

/// Runs one input; panics on a broken promise. The first byte picks: the rest as a blob,
/// the rest behind a valid header (so mutations reach the body), a state built from it, or
/// such a state framed by hand with one edit of its sections.
pub fn vm_state(data: &[u8]) {
    let mut u = Input::new(data);
    match u.u8() % 4 {
        0 => decodes_consistently(u.rest()),
        1 => {
            let mut blob = MAGIC.to_vec();
            blob.extend_from_slice(&VERSION.to_le_bytes());
            blob.extend_from_slice(u.rest());
            decodes_consistently(&blob);
        }
        2 => round_trip(&mut u),
        _ => sections(&mut u),
    }
}

fn decodes_consistently(blob: &[u8]) {
    match VmState::decode(blob) {
        Ok(s) => {
            let e = s.encode();
            let again = VmState::decode(&e).expect("a decoded state re-encodes decodably");
            assert_eq!(again.encode(), e, "encode . decode is not a fixed point");
            same(&again, &s);
        }
        Err(e) => {
            let _ = e.to_string();
            if blob.len() < 8 || blob[..4] != MAGIC {
                assert!(matches!(e, StateError::BadMagic), "{e:?}");
            }
        }
    }
}

/// A kvm-bindings struct from the input bytes (zero-padded), through its own serde impl.
fn kvm<T: DeserializeOwned>(u: &mut Input) -> T {
    let mut raw = vec![0u8; std::mem::size_of::<T>()];
    let b = u.bytes(raw.len());
    raw[..b.len()].copy_from_slice(b);
    let enc = postcard::to_allocvec(&raw).expect("bytes serialize");
    postcard::from_bytes(&enc).expect("kvm-bindings take any bytes of their size")
}

fn vcpu(u: &mut Input) -> VcpuState {
    VcpuState {
        cpuid: (0..u.u8() % 4).map(|_| kvm(u)).collect(),
        regs: kvm(u),
        sregs: kvm(u),
        xsave: (0..usize::from(u.u16() % 1100)).map(|_| u.u32()).collect(),
        xcrs: kvm(u),
        debugregs: kvm(u),
        msrs: (0..u.u8() % 8).map(|_| (u.u32(), u.u64_edge())).collect(),
        events: kvm(u),
        mp_state: kvm(u),
    }
}

fn host_addr(u: &mut Input) -> Option<SocketAddr> {
    match u.u8() % 3 {
        0 => None,
        1 => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u.u32()),
            u.u16(),
        ))),
        _ => {
            let ip = Ipv6Addr::from(u128::from(u.u64()) << 64 | u128::from(u.u64()));
            // serde writes an IPv6 socket address as (ip, port): flow info and scope id
            // are not kept (see the report), so a state carries them as zero.
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u.u16(), 0, 0)))
        }
    }
}

/// A state from the input.
fn build(u: &mut Input) -> VmState {
    VmState {
        mem_size: u.u64_edge(),
        vcpus: (0..u.u8() % 5).map(|_| vcpu(u)).collect(),
        devices: DeviceStates {
            nic: nic(u),
            console: ConsoleState {
                partial: (0..u.u8() % 5)
                    .map(|_| {
                        let n = usize::from(u.u8());
                        u.bytes(n).to_vec()
                    })
                    .collect(),
            },
            // A PC VM's parts, all or some (a state missing one must be refused by `check`).
            platform: (u.u8() % 2 == 1).then(|| platform(u)),
            serial: (u.u8() % 2 == 1).then(|| SerialState {
                line_control: u.u8(),
                interrupt_enable: u.u8(),
                in_buffer: {
                    let n = usize::from(u.u8() % 80);
                    u.bytes(n).to_vec()
                },
                output_offset: u.u64_edge(),
                output: {
                    let n = usize::from(u.u8());
                    u.bytes(n).to_vec()
                },
                ..SerialState::default()
            }),
            cmos: (u.u8() % 2 == 1).then(|| CmosState { index: u.u8() }),
        },
    }
}

fn platform(u: &mut Input) -> PlatformState {
    let chip = |u: &mut Input| kvm_bindings::kvm_irqchip {
        chip_id: u32::from(u.u8() % 4),
        ..Default::default()
    };
    let clock = kvm_bindings::kvm_clock_data {
        clock: u.u64_edge(),
        ..Default::default()
    };
    PlatformState {
        pic_master: chip(u),
        pic_slave: chip(u),
        ioapic: chip(u),
        pit: Default::default(),
        clock,
        lapics: (0..u.u8() % 5)
            .map(|_| {
                let mut l = kvm_bindings::kvm_lapic_state::default();
                l.regs[0x20] = u.u8() as std::os::raw::c_char;
                l
            })
            .collect(),
    }
}

fn nic(u: &mut Input) -> NicState {
    NicState {
        tx_ring: u.u64_edge(),
        rx_ring: u.u64_edge(),
        size: u.u32(),
        tx_prod: u.u32(),
        tx_used: u.u32(),
        rx_prod: u.u32(),
        rx_used: u.u32(),
        stats: NicStats {
            tx_frames: u.u64(),
            tx_refused: u.u64(),
            rx_frames: u.u64(),
            rx_dropped: u.u64(),
        },
        host_addr: host_addr(u),
    }
}

/// Two states are the same, field by field (kvm structs by their bytes, as encoded).
fn same(a: &VmState, b: &VmState) {
    assert_eq!(a.mem_size, b.mem_size);
    assert_eq!(a.devices, b.devices);
    assert_eq!(a.vcpus.len(), b.vcpus.len());
    for (x, y) in a.vcpus.iter().zip(&b.vcpus) {
        assert_eq!(x.xsave, y.xsave);
        assert_eq!(x.msrs, y.msrs);
        assert_eq!(x.cpuid.len(), y.cpuid.len());
        let bytes = |v: &VcpuState| postcard::to_allocvec(v).expect("serializable");
        assert_eq!(bytes(x), bytes(y));
    }
}

fn round_trip(u: &mut Input) {
    let s = build(u);
    let e = s.encode();
    let back = VmState::decode(&e).expect("a valid encoding decodes");
    same(&back, &s);
    assert_eq!(back.encode(), e);
    // A proper prefix is never a whole state; one byte more is trailing data.
    for _ in 0..4 {
        let cut = u.below(e.len() as u64) as usize;
        assert!(
            VmState::decode(&e[..cut]).is_err(),
            "prefix of {cut} bytes decoded"
        );
    }
    let mut long = e.clone();
    long.push(u.u8());
    assert!(matches!(
        VmState::decode(&long),
        Err(StateError::Mismatch(_))
    ));
    // Mutations of a valid encoding: never a panic, and consistent when they decode.
    let mut m = e;
    for _ in 0..1 + u.u8() % 4 {
        let at = u.below(m.len() as u64) as usize;
        m[at] = u.u8();
    }
    decodes_consistently(&m);
}

/// One section of the encoding, as `rmc_vmm::state` documents it: name, version, bytes.
type Section = (String, u32, Vec<u8>);

fn section<S: Versioned>(s: &S) -> Section {
    let data = postcard::to_allocvec(s).expect("serializable");
    (S::NAME.to_string(), S::VERSION, data)
}

/// Frames a body by hand: `MAGIC | VERSION | postcard(mem_size, vcpus, devices)`.
fn frame(mem_size: u64, vcpus: &[Section], devices: &[Section]) -> Vec<u8> {
    let mut blob = MAGIC.to_vec();
    blob.extend_from_slice(&VERSION.to_le_bytes());
    blob.extend(postcard::to_allocvec(&(mem_size, vcpus, devices)).expect("serializable"));
    blob
}

/// Names a renamed section may get: the required devices', a vCPU's, unknown ones. (Not an
/// optional device's: a section renamed to one absent from the state may well decode as it.)
const NAMES: [&str; 5] = ["vcpu", "nic", "console", "floppy", ""];

/// Devices every state has (the PC VM's are optional).
const REQUIRED: [&str; 2] = ["nic", "console"];

fn sections(u: &mut Input) {
    let s = build(u);
    let mut vcpus: Vec<Section> = s.vcpus.iter().map(section).collect();
    let mut devices = vec![section(&s.devices.nic), section(&s.devices.console)];
    devices.extend(s.devices.platform.as_ref().map(section));
    devices.extend(s.devices.serial.as_ref().map(section));
    devices.extend(s.devices.cmos.as_ref().map(section));
    // The hand framing is the encoder's.
    assert_eq!(frame(s.mem_size, &vcpus, &devices), s.encode());
    if u.u8() & 1 == 1 {
        devices.swap(0, 1);
    }
    let n = vcpus.len() + devices.len();
    let pick = u.below(n as u64) as usize;
    let (list, i) = if pick < vcpus.len() {
        (&mut vcpus, pick)
    } else {
        (&mut devices, pick - vcpus.len())
    };
    let is_device = pick >= s.vcpus.len();
    // The edit, and what it must make of the decode: None = the state itself.
    let expect: Option<fn(&StateError) -> bool> = match u.u8() % 7 {
        0 => None,
        1 => {
            let v = u.u32();
            if v == list[i].1 {
                None
            } else {
                list[i].1 = v;
                Some(|e| matches!(e, StateError::PartVersion { .. }))
            }
        }
        2 => {
            let name = NAMES[usize::from(u.u8()) % NAMES.len()];
            if name == list[i].0 {
                None
            } else {
                list[i].0 = name.to_string();
                // Another part's name in the vCPU list; among the devices, an unknown one, or
                // the other device's (then it is there twice, or its bytes are not that
                // device's).
                Some(|e| {
                    matches!(
                        e,
                        StateError::Mismatch(_)
                            | StateError::UnknownDevice(_)
                            | StateError::DuplicateDevice(_)
                            | StateError::PartBody { .. }
                    )
                })
            }
        }
        3 if is_device && REQUIRED.contains(&list[i].0.as_str()) => {
            list.remove(i);
            Some(|e| matches!(e, StateError::MissingDevice(_)))
        }
        4 if is_device => {
            let d = list[i].clone();
            let at = u.below(list.len() as u64 + 1) as usize;
            list.insert(at, d);
            Some(|e| matches!(e, StateError::DuplicateDevice(_)))
        }
        5 => {
            let cut = u.below(list[i].2.len() as u64) as usize;
            list[i].2.truncate(cut);
            Some(|e| matches!(e, StateError::PartBody { .. }))
        }
        6 => {
            list[i].2.push(u.u8());
            Some(|e| matches!(e, StateError::Mismatch(_)))
        }
        _ => None,
    };
    let blob = frame(s.mem_size, &vcpus, &devices);
    match (VmState::decode(&blob), expect) {
        (Ok(back), None) => {
            same(&back, &s);
            assert_eq!(back.encode(), s.encode());
        }
        (Err(e), None) => panic!("an intact state framed by hand is refused: {e}"),
        (Ok(_), Some(_)) => panic!("an edited section decoded"),
        (Err(e), Some(ok)) => assert!(ok(&e), "unexpected error: {e:?}"),
    }
    decodes_consistently(&blob);
}
