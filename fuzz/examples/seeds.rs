//! Writes starting inputs for the coverage-guided fuzzer (AFL++ wants a few seeds per
//! target): `cargo run -p rmc-fuzz --example seeds -- DIR` fills `DIR/<target>/`.
//!
//! wire_frames: streams of every message's frame and each payload alone; the protocol
//! targets: inputs whose every byte is below 144, which the targets read as "the next
//! well-behaved step" wherever an event is chosen (so they go deep: handshake, epochs,
//! commits), and plain random bytes; vm_state: encodings of realistic states (whole, and
//! the body alone) and random bytes per mode.

use std::path::Path;

use rmc_fuzz::input::Rng;
use rmc_transport::wire::{
    self, EpochHeader, EpochKind, Layout, Message, RegionKey, PROTOCOL_VERSION,
};
use rmc_vmm::nic::{NicState, NicStats};
use rmc_vmm::state::{ConsoleState, DeviceStates, VcpuState, VmState, XSAVE_WORDS};

fn messages() -> Vec<Message> {
    let layout = Layout {
        page_size: 4096,
        regions: vec![(0, 64 << 20), (4 << 30, 1 << 20)],
        vcpus: 2,
        slot_pages: 1024,
        slot_count: 2,
        features: 0,
        state_version: 1,
    };
    vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            nonce: [3; 32],
        },
        Message::Challenge {
            nonce: [4; 32],
            proof: [5; 32],
        },
        Message::Auth {
            proof: [6; 32],
            layout,
            fence: 0,
        },
        Message::Accept {
            last_applied: 7,
            lineage: [7; 32],
        },
        Message::Refuse {
            reason: "layout mismatch: é".into(),
        },
        Message::EpochHeader(EpochHeader {
            epoch: 8,
            kind: EpochKind::Checkpoint,
            page_count: 2,
            state_len: 100,
        }),
        Message::Commit {
            epoch: 8,
            checksum: 0xdead_beef,
        },
        Message::Ack { epoch: 8 },
        Message::Heartbeat { seq: 1 },
        Message::Goodbye { last_epoch: 8 },
        Message::RegionKey(RegionKey {
            addr: 0x7f00_0000_0000,
            len: 3 << 20,
            slot_stride: 1 << 20,
            rkey: 0x1234,
        }),
        Message::BodyPlaced { slot: 1, len: 8300 },
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("writable seed directory");
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: seeds DIR");
    let out = Path::new(&out);
    let mut rng = Rng::new(0x5eed);
    for (name, _) in rmc_fuzz::TARGETS {
        std::fs::create_dir_all(out.join(name)).expect("creatable seed directory");
    }

    let dir = out.join("wire_frames");
    let mut stream = vec![0u8, 0xff, 0x7f];
    for (i, m) in messages().iter().enumerate() {
        let mut frame = Vec::new();
        wire::encode(m, &mut frame);
        let mut one = vec![1u8, frame[0]];
        one.extend_from_slice(&frame[16..]);
        write(&dir, &format!("payload-{i:02}"), &one);
        stream.extend_from_slice(&frame);
    }
    wire::encode_body_header(8, &mut stream);
    stream.extend_from_slice(&[0xaa; 8]);
    write(&dir, "stream", &stream);
    for mode in [2u8, 3] {
        for i in 0..8 {
            let mut v = vec![mode];
            v.extend(rng.bytes(200));
            write(&dir, &format!("mode{mode}-{i}"), &v);
        }
    }

    for name in ["standby_core", "primary_core"] {
        let dir = out.join(name);
        for i in 0..12 {
            let len = 200 + rng.below(1800) as usize;
            let good: Vec<u8> = (0..len).map(|_| (rng.below(144)) as u8).collect();
            write(&dir, &format!("good-{i:02}"), &good);
        }
        for i in 0..4 {
            write(&dir, &format!("random-{i}"), &rng.bytes(600));
        }
    }

    let dir = out.join("vm_state");
    // Modes 0 and 1: whole encodings of realistic states (with and without their header), so
    // the fuzzer starts from blobs that decode; modes 2 and 3 build states from the bytes.
    for (i, state) in vm_states().iter().enumerate() {
        let enc = state.encode();
        write(&dir, &format!("state-{i}"), &[&[0u8][..], &enc].concat());
        write(
            &dir,
            &format!("body-{i}"),
            &[&[1u8][..], &enc[8..]].concat(),
        );
    }
    for mode in 0..4u8 {
        for i in 0..6 {
            let mut v = vec![mode];
            let n = 100 + rng.below(3000) as usize;
            v.extend(rng.bytes(n));
            write(&dir, &format!("mode{mode}-{i}"), &v);
        }
    }
}

/// States like the VMM saves: 1 and 2 vCPUs, a NIC in use or not, console lines in progress.
fn vm_states() -> Vec<VmState> {
    let vcpu = |rip: u64| VcpuState {
        cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806f8,
            ..Default::default()
        }],
        regs: kvm_bindings::kvm_regs {
            rip,
            rsp: 0x4_4000,
            rflags: 2,
            ..Default::default()
        },
        sregs: kvm_bindings::kvm_sregs {
            cr0: 0x8001_0033,
            cr3: 0x2000,
            cr4: 0x4_0620,
            efer: 0x500,
            ..Default::default()
        },
        xsave: (0..XSAVE_WORDS as u32).map(|w| w % 7).collect(),
        xcrs: kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        },
        debugregs: Default::default(),
        msrs: vec![(0x10, 123_456), (0xc000_0080, 0x500), (0x1b, 0xfee0_0900)],
        events: Default::default(),
        mp_state: Default::default(),
    };
    vec![
        VmState {
            mem_size: 64 << 20,
            vcpus: vec![vcpu(0x2_0000)],
            devices: DeviceStates::default(),
        },
        VmState {
            mem_size: 4 << 30,
            vcpus: vec![vcpu(0x2_0100), vcpu(0x2_0200)],
            devices: DeviceStates {
                nic: NicState {
                    tx_ring: 0x10_0000,
                    rx_ring: 0x10_1000,
                    size: 64,
                    tx_prod: 70,
                    tx_used: 70,
                    rx_prod: 130,
                    rx_used: 66,
                    stats: NicStats {
                        tx_frames: 70,
                        tx_refused: 1,
                        rx_frames: 66,
                        rx_dropped: 0,
                    },
                    host_addr: Some("127.0.0.1:4000".parse().expect("an address")),
                },
                console: ConsoleState {
                    partial: vec![b"count".to_vec(), Vec::new()],
                },
                ..DeviceStates::default()
            },
        },
    ]
}
