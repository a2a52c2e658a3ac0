//! A real standby on loopback against a scripted primary that misbehaves in one way per test.
//! Each fault must end the connection with an error that names the problem, leave the
//! standby's last good checkpoint untouched (checked by hash), and the standby must accept a
//! good primary afterwards.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use rmc_mc::core::Heartbeat;
use rmc_mc::standby::{error_chain, Session, Standby, StandbyConfig};
use rmc_transport::tcp::{FrameReader, FrameWriter};
use rmc_transport::wire::{self, auth, EpochHeader, EpochKind, Layout, Message, PROTOCOL_VERSION};
use vm_memory::{Bytes, GuestAddress};

const SECRET: &[u8] = b"the shared secret of this test";
const MEM: u64 = 1 << 20;

fn layout() -> Layout {
    Layout {
        page_size: 4096,
        regions: vec![(0, MEM)],
        vcpus: 1,
        slot_pages: 16,
        slot_count: 2,
        features: 0,
    }
}

fn standby() -> Standby {
    Standby::bind(
        "127.0.0.1:0".parse().unwrap(),
        StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: Some(MEM),
            heartbeat: Heartbeat {
                interval: Duration::from_millis(50),
                timeout: Duration::from_secs(2),
            },
        },
    )
    .unwrap()
}

/// Serves one connection on a thread; returns the standby and how the session went.
fn serve(mut sb: Standby) -> JoinHandle<(Standby, Session)> {
    std::thread::spawn(move || {
        let s = sb.serve_one().unwrap();
        (sb, s)
    })
}

struct Peer {
    r: FrameReader<TcpStream>,
    w: FrameWriter<TcpStream>,
    raw: TcpStream,
}

fn connect(addr: SocketAddr) -> Peer {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    Peer {
        r: FrameReader::new(s.try_clone().unwrap()),
        w: FrameWriter::new(s.try_clone().unwrap()),
        raw: s,
    }
}

fn next(p: &mut Peer) -> Message {
    p.r.next_message(&mut |_| Err("no answer from the standby".into()))
        .unwrap()
}

/// Completes the handshake with `secret` and `layout`; returns the standby's last applied epoch.
fn handshake(p: &mut Peer, secret: &[u8], layout: Layout) -> u64 {
    let nonce = auth::nonce();
    p.w.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        nonce,
    })
    .unwrap();
    let Message::Challenge { nonce: c, .. } = next(p) else {
        panic!("expected a challenge")
    };
    p.w.send(&Message::Auth {
        proof: auth::primary_proof(secret, &c, &nonce),
        layout,
    })
    .unwrap();
    match next(p) {
        Message::Accept { last_applied } => last_applied,
        other => panic!("expected accept, got {other:?}"),
    }
}

/// An epoch's body: pages (address, fill byte) and state.
fn body(pages: &[(u64, u8)], state: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let index: Vec<u8> = pages.iter().flat_map(|(a, _)| a.to_le_bytes()).collect();
    let mut data: Vec<u8> = pages.iter().flat_map(|&(_, b)| vec![b; 4096]).collect();
    data.extend_from_slice(state);
    (index, data)
}

fn header(epoch: u64, kind: EpochKind, pages: usize, state: usize) -> EpochHeader {
    EpochHeader {
        epoch,
        kind,
        page_count: pages as u64,
        state_len: state as u32,
    }
}

/// Sends a well-formed epoch and waits for its ack.
fn good_epoch(p: &mut Peer, epoch: u64, kind: EpochKind, pages: &[(u64, u8)], state: &[u8]) {
    let (index, rest) = body(pages, state);
    let h = header(epoch, kind, pages.len(), state.len());
    let commit = Message::Commit {
        epoch,
        checksum: wire::checksum(&[&index, &rest]),
    };
    p.w.send_epoch(&h, &[&index, &rest], &commit).unwrap();
    loop {
        match next(p) {
            Message::Ack { epoch: e } if e == epoch => return,
            Message::Heartbeat { .. } => {}
            other => panic!("expected ack {epoch}, got {other:?}"),
        }
    }
}

fn backup_hash(sb: &Standby) -> (u64, Option<u64>, u64) {
    let b = sb.backup().expect("backup");
    let mut mem = vec![0u8; MEM as usize];
    b.memory.read_slice(&mut mem, GuestAddress(0)).unwrap();
    (
        wire::checksum(&[&mem, &b.state]),
        b.checkpoint,
        b.last_applied,
    )
}

/// A standby holding a good checkpoint (sync epoch 1, checkpoint epoch 2).
fn standby_with_checkpoint() -> (Standby, (u64, Option<u64>, u64)) {
    let sb = standby();
    let addr = sb.local_addr();
    let h = serve(sb);
    let mut p = connect(addr);
    assert_eq!(handshake(&mut p, SECRET, layout()), 0);
    let all: Vec<(u64, u8)> = (0..16).map(|i| (i * 4096, i as u8)).collect();
    good_epoch(&mut p, 1, EpochKind::Sync, &all, b"");
    good_epoch(
        &mut p,
        2,
        EpochKind::Checkpoint,
        &[(0x3000, 0xaa), (0x9000, 0xbb)],
        b"state-2",
    );
    p.w.send(&Message::Goodbye { last_epoch: 2 }).unwrap();
    drop(p);
    let (sb, s) = h.join().unwrap();
    s.result.expect("good session");
    let hash = backup_hash(&sb);
    assert_eq!(hash.1, Some(2));
    (sb, hash)
}

/// Runs `fault` as a primary against a standby with a good checkpoint; checks the error names
/// the problem, the checkpoint is intact, and a good primary is accepted afterwards.
fn check_fault(expect: &str, fault: impl FnOnce(&mut Peer)) {
    let (sb, before) = standby_with_checkpoint();
    let addr = sb.local_addr();
    let h = serve(sb);
    let mut p = connect(addr);
    fault(&mut p);
    drop(p);
    let (sb, s) = h.join().unwrap();
    let err = error_chain(
        &s.result
            .expect_err("the fault must end the session with an error"),
    );
    assert!(
        err.contains(expect),
        "error {err:?} does not name {expect:?}"
    );
    assert_eq!(backup_hash(&sb), before, "the last good checkpoint changed");
    // A good primary afterwards: continues from epoch 3.
    let h = serve(sb);
    let mut p = connect(addr);
    assert_eq!(handshake(&mut p, SECRET, layout()), 2);
    good_epoch(
        &mut p,
        3,
        EpochKind::Checkpoint,
        &[(0x5000, 0x55)],
        b"state-3",
    );
    p.w.send(&Message::Goodbye { last_epoch: 3 }).unwrap();
    drop(p);
    let (sb, s) = h.join().unwrap();
    s.result.expect("good session after the fault");
    assert_eq!(sb.backup().unwrap().checkpoint, Some(3));
}

#[test]
fn wrong_secret() {
    check_fault(
        "Authentication failed: the primary does not hold the same secret",
        |p| {
            let nonce = auth::nonce();
            p.w.send(&Message::Hello {
                version: PROTOCOL_VERSION,
                nonce,
            })
            .unwrap();
            let Message::Challenge { nonce: c, .. } = next(p) else {
                panic!()
            };
            let proof = auth::primary_proof(b"not the secret at all", &c, &nonce);
            p.w.send(&Message::Auth {
                proof,
                layout: layout(),
            })
            .unwrap();
        },
    );
}

#[test]
fn wrong_protocol_version() {
    check_fault("protocol version 7", |p| {
        p.w.send(&Message::Hello {
            version: 7,
            nonce: auth::nonce(),
        })
        .unwrap();
    });
}

#[test]
fn layout_mismatch() {
    check_fault("Memory layout mismatch", |p| {
        let mut l = layout();
        l.regions = vec![(0, 2 * MEM)];
        let nonce = auth::nonce();
        p.w.send(&Message::Hello {
            version: PROTOCOL_VERSION,
            nonce,
        })
        .unwrap();
        let Message::Challenge { nonce: c, .. } = next(p) else {
            panic!()
        };
        p.w.send(&Message::Auth {
            proof: auth::primary_proof(SECRET, &c, &nonce),
            layout: l,
        })
        .unwrap();
    });
}

#[test]
fn truncated_epoch() {
    check_fault("while reading an epoch's page data", |p| {
        handshake(p, SECRET, layout());
        let (index, rest) = body(&[(0x1000, 1), (0x2000, 2)], b"st");
        let mut head = Vec::new();
        wire::encode(
            &Message::EpochHeader(header(3, EpochKind::Checkpoint, 2, 2)),
            &mut head,
        );
        wire::encode_body_header((index.len() + rest.len()) as u64, &mut head);
        p.w.send_raw(&[&head, &index, &rest[..5000]]).unwrap();
    });
}

#[test]
fn corrupted_page_data() {
    check_fault("Checksum mismatch in epoch 3", |p| {
        handshake(p, SECRET, layout());
        let (index, mut rest) = body(&[(0x1000, 1), (0x2000, 2)], b"st");
        let checksum = wire::checksum(&[&index, &rest]);
        rest[100] ^= 0x40;
        p.w.send_epoch(
            &header(3, EpochKind::Checkpoint, 2, 2),
            &[&index, &rest],
            &Message::Commit { epoch: 3, checksum },
        )
        .unwrap();
        let _ = p.r.next_message(&mut |_| Err("closed".into()));
    });
}

#[test]
fn page_index_outside_guest_memory() {
    check_fault("Epoch 3 has an invalid page index", |p| {
        handshake(p, SECRET, layout());
        let (index, rest) = body(&[(0x1000, 1), (MEM + 0x1000, 2)], b"st");
        p.w.send_epoch(
            &header(3, EpochKind::Checkpoint, 2, 2),
            &[&index, &rest],
            &Message::Commit {
                epoch: 3,
                checksum: wire::checksum(&[&index, &rest]),
            },
        )
        .unwrap();
        let _ = p.r.next_message(&mut |_| Err("closed".into()));
    });
}

#[test]
fn oversized_length_field() {
    check_fault("exceeds", |p| {
        handshake(p, SECRET, layout());
        // A Commit frame claiming a 1 TiB payload.
        let mut f = Vec::new();
        wire::encode(
            &Message::Commit {
                epoch: 3,
                checksum: 0,
            },
            &mut f,
        );
        f[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        p.raw.write_all(&f).unwrap();
        let _ = p.r.next_message(&mut |_| Err("closed".into()));
    });
}

#[test]
fn unknown_message_type() {
    check_fault("0x77", |p| {
        handshake(p, SECRET, layout());
        let mut f = Vec::new();
        wire::encode(&Message::Heartbeat { seq: 1 }, &mut f);
        f[0] = 0x77;
        p.raw.write_all(&f).unwrap();
        let _ = p.r.next_message(&mut |_| Err("closed".into()));
    });
}

#[test]
fn connection_dropped_mid_epoch() {
    check_fault("Connection closed in the middle of epoch 3", |p| {
        handshake(p, SECRET, layout());
        let (index, rest) = body(&[(0x1000, 1)], b"st");
        let mut head = Vec::new();
        wire::encode(
            &Message::EpochHeader(header(3, EpochKind::Checkpoint, 1, 2)),
            &mut head,
        );
        wire::encode_body_header((index.len() + rest.len()) as u64, &mut head);
        // The whole body, but the connection drops before the commit.
        p.w.send_raw(&[&head, &index, &rest]).unwrap();
    });
}

#[test]
fn primary_lost_without_goodbye() {
    check_fault("the primary is lost", |p| {
        handshake(p, SECRET, layout());
        // Closes between epochs, but without a goodbye: a primary that died.
    });
}

#[test]
fn commit_before_data() {
    check_fault("Commit for epoch 3 arrived before that epoch's data", |p| {
        handshake(p, SECRET, layout());
        p.w.send(&Message::EpochHeader(header(
            3,
            EpochKind::Checkpoint,
            1,
            2,
        )))
        .unwrap();
        p.w.send(&Message::Commit {
            epoch: 3,
            checksum: 0,
        })
        .unwrap();
        let _ = p.r.next_message(&mut |_| Err("closed".into()));
    });
}
