//! A real standby against a scripted primary that misbehaves in one way per test. Each fault
//! must end the connection with an error that names the problem, leave the standby's last good
//! checkpoint untouched (checked by hash), and the standby must accept a good primary
//! afterwards.
//!
//! The transport is TCP on loopback, or RDMA with `RMC_TEST_TRANSPORT=rdma` (run inside the
//! Soft-RoCE VM by `soft-roce/rdma-tests.sh`; there good epochs are placed by RDMA WRITE into
//! the standby's slot, and the `rdma_*` tests inject RDMA-specific failures).

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use rmc_mc::core::Heartbeat;
use rmc_mc::standby::{error_chain, Session, Standby, StandbyConfig};
use rmc_staging::{SlotLayout, SlotRing};
use rmc_transport::link::{first_rdma_ip, Closer, Conn, Rx, Transport, Tx};
use rmc_transport::tcp::{FrameReader, FrameWriter};
use rmc_transport::wire::{
    self, auth, EpochHeader, EpochKind, Layout, Message, MAX_STATE_LEN, PROTOCOL_VERSION,
};
use vm_memory::{Bytes, GuestAddress};

fn transport() -> Transport {
    match std::env::var("RMC_TEST_TRANSPORT").as_deref() {
        Ok("rdma") => Transport::Rdma,
        _ => Transport::Tcp,
    }
}

fn listen_addr() -> SocketAddr {
    match transport() {
        Transport::Rdma => SocketAddr::new(
            first_rdma_ip().expect("RMC_TEST_TRANSPORT=rdma, but no usable RDMA port has an IP"),
            0,
        ),
        _ => "127.0.0.1:0".parse().unwrap(),
    }
}

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
    Standby::bind_with(
        listen_addr(),
        transport(),
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
    .0
}

/// Serves one connection on a thread; returns the standby and how the session went.
fn serve(mut sb: Standby) -> JoinHandle<(Standby, Session)> {
    std::thread::spawn(move || {
        let s = sb.serve_one().unwrap();
        (sb, s)
    })
}

struct Peer {
    r: FrameReader<Rx>,
    w: FrameWriter<Tx>,
    closer: Closer,
    /// Staging slots the size the standby's have (RDMA placement writes from them).
    ring: SlotRing,
}

fn connect(addr: SocketAddr) -> Peer {
    let (conn, _) = Conn::connect(addr, transport(), Duration::from_secs(5)).unwrap();
    let (r, w, closer) = conn
        .split(Duration::from_secs(5), Duration::from_secs(5))
        .unwrap();
    let l = layout();
    let ring = SlotRing::new(
        SlotLayout {
            slot_pages: l.slot_pages as usize,
            max_state: MAX_STATE_LEN as usize,
        },
        l.slot_count as usize,
    )
    .unwrap();
    Peer {
        r: FrameReader::new(r),
        w: FrameWriter::new(w),
        closer,
        ring,
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
    let last = match next(p) {
        Message::Accept { last_applied } => last_applied,
        other => panic!("expected accept, got {other:?}"),
    };
    if transport() == Transport::Rdma {
        let Message::RegionKey(key) = next(p) else {
            panic!("expected the standby's RDMA region key")
        };
        let ring = p.ring.clone();
        p.w.get_mut()
            .rdma()
            .unwrap()
            .enable_placement(&ring, key)
            .unwrap();
    }
    last
}

/// RDMA: writes an epoch's index, pages and state into a local slot and RDMA-writes it into
/// the standby's slot of the same number; returns the slot (hold it until the ack) and the
/// body length.
fn place(p: &mut Peer, pages: &[(u64, u8)], state: &[u8]) -> (rmc_staging::Slot, u64) {
    let mut slot = p.ring.acquire_timeout(Duration::from_secs(5)).unwrap();
    let a = slot.receive_areas(pages.len(), state.len()).unwrap();
    for (i, &(addr, fill)) in pages.iter().enumerate() {
        a.index[i * 8..(i + 1) * 8].copy_from_slice(&addr.to_le_bytes());
        a.data[i * 4096..(i + 1) * 4096].fill(fill);
    }
    a.state.copy_from_slice(state);
    let len = p.w.get_mut().rdma().unwrap().place(&slot, true).unwrap();
    (slot, len)
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
    let _slot = if transport() == Transport::Rdma {
        let (slot, len) = place(p, pages, state);
        assert_eq!(len as usize, index.len() + rest.len());
        p.w.send_placed(&h, slot.index() as u32, len, &commit)
            .unwrap();
        Some(slot)
    } else {
        p.w.send_epoch(&h, &[&index, &rest], &commit).unwrap();
        None
    };
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
    good_primary_continues(sb);
}

/// After a fault: a good primary is accepted and continues from epoch 3 (the checkpoint the
/// fault must not have disturbed is epoch 2).
fn good_primary_continues(sb: Standby) {
    let addr = sb.local_addr();
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
        p.w.send_raw(&[&f]).unwrap();
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
        p.w.send_raw(&[&f]).unwrap();
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

/// RDMA only: a test of an RDMA failure; elsewhere it says why it does not run.
fn rdma_only(test: &str) -> bool {
    let rdma = transport() == Transport::Rdma;
    if !rdma {
        eprintln!(
            "SKIPPED {test}: RDMA-specific; runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, \
             part of `make test`) with RMC_TEST_TRANSPORT=rdma"
        );
    }
    rdma
}

#[test]
fn rdma_disconnect_after_placing_before_commit() {
    if !rdma_only("rdma_disconnect_after_placing_before_commit") {
        return;
    }
    // The body is in the standby's slot, the header and BodyPlaced arrived, then the
    // primary disconnects (rdma_disconnect) before the commit.
    check_fault("Connection closed in the middle of epoch 3", |p| {
        handshake(p, SECRET, layout());
        let (slot, len) = place(p, &[(0x1000, 0x11), (0x2000, 0x22)], b"st");
        p.w.send(&Message::EpochHeader(header(
            3,
            EpochKind::Checkpoint,
            2,
            2,
        )))
        .unwrap();
        p.w.send(&Message::BodyPlaced {
            slot: slot.index() as u32,
            len,
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        p.closer.close();
    });
}

#[test]
fn rdma_disconnect_mid_placement() {
    if !rdma_only("rdma_disconnect_mid_placement") {
        return;
    }
    // Header sent, RDMA WRITEs of the body posted, disconnect at once: some or all of the
    // body may have landed in the standby's slot, none of it may reach the backup.
    check_fault("Connection closed in the middle of epoch 3", |p| {
        handshake(p, SECRET, layout());
        p.w.send(&Message::EpochHeader(header(
            3,
            EpochKind::Checkpoint,
            16,
            2,
        )))
        .unwrap();
        let pages: Vec<(u64, u8)> = (0..16).map(|i| (i * 4096, 0xee)).collect();
        let _ = place(p, &pages, b"st");
        p.closer.close();
    });
}

#[test]
fn rdma_body_placed_in_a_slot_that_does_not_exist() {
    if !rdma_only("rdma_body_placed_in_a_slot_that_does_not_exist") {
        return;
    }
    check_fault(
        "Invalid RDMA placement: epoch 3 placed in slot 7 of 2",
        |p| {
            handshake(p, SECRET, layout());
            p.w.send(&Message::EpochHeader(header(
                3,
                EpochKind::Checkpoint,
                1,
                2,
            )))
            .unwrap();
            p.w.send(&Message::BodyPlaced {
                slot: 7,
                len: 8 + 4096 + 2,
            })
            .unwrap();
            let _ = p.r.next_message(&mut |_| Err("closed".into()));
        },
    );
}

#[test]
fn rdma_queue_pair_forced_into_error() {
    if !rdma_only("rdma_queue_pair_forced_into_error") {
        return;
    }
    let (sb, before) = standby_with_checkpoint();
    let addr = sb.local_addr();
    let h = serve(sb);
    let mut p = connect(addr);
    handshake(&mut p, SECRET, layout());
    // Our QP goes to the error state: our posted receives are flushed, so our side reports
    // it at once; the standby stops hearing from us and must end the session.
    p.closer.rdma().unwrap().force_qp_error().unwrap();
    let err =
        p.r.next_message(&mut |_| Err("no error reported".into()))
            .expect_err("a flushed queue pair is an error");
    let err = error_chain(&err);
    assert!(err.contains("error state"), "primary side: {err}");
    let (sb, s) = h.join().unwrap();
    let e = s.result.expect_err("the standby must end the session");
    let serr = error_chain(&e);
    eprintln!("primary side: {err}\nstandby side: {serr} ({e:?})");
    assert!(
        serr.contains("Nothing heard from the primary") || serr.contains("RDMA"),
        "standby side: {serr} ({e:?})"
    );
    assert_eq!(backup_hash(&sb), before, "the last good checkpoint changed");
    drop(p);
    good_primary_continues(sb);
}
