//! A real standby against a scripted primary that misbehaves in one way per test. Each fault
//! must end the connection with the one error that names that problem (matched by variant and
//! fields, not by a word of its message), leave the standby's last good checkpoint untouched
//! (checked by hash), and the standby must accept a good primary afterwards.
//!
//! The generic faults run over TCP on loopback, or over RDMA with `RMC_TEST_TRANSPORT=rdma`
//! (there good epochs are placed by RDMA WRITE into the standby's slot). The `rdma_*` tests
//! inject RDMA-specific failures: they always use RDMA and are `#[ignore]`d, because they need
//! an RDMA device; `soft-roce/rdma-tests.sh` runs them by name with `--ignored --exact` inside
//! the Soft-RoCE VM. Run with `--ignored` on a host without RDMA they fail, never pass.
//!
//! Every wait is a hang guard of minutes ([`HANG_GUARD`]), not a speed requirement.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmc_mc::protocol::{Heartbeat, ProtocolError};
use rmc_mc::standby::{error_chain, RestoreCheck, Session, Standby, StandbyConfig, StandbyError};
use rmc_mc::BoxError;
use rmc_mc::PAGE_SIZE as PAGE;
use rmc_staging::PAGE_BYTES;
use rmc_staging::{SlotLayout, SlotRing};
use rmc_transport::framing::{Abort, FrameReader, FrameWriter, LinkError};
use rmc_transport::link::{first_rdma_ip, Closer, Conn, Rx, Transport, Tx};
use rmc_transport::wire::{
    self, auth, EpochHeader, EpochKind, Layout, Message, MsgType, WireError, MAX_CONTROL_LEN,
    MAX_STATE_LEN, PROTOCOL_VERSION,
};
use vm_memory::{Bytes, GuestAddress};

/// The transport of the generic fault tests: TCP on loopback unless `RMC_TEST_TRANSPORT=rdma`.
fn transport() -> Transport {
    match std::env::var("RMC_TEST_TRANSPORT").as_deref() {
        Ok("rdma") => Transport::Rdma,
        _ => Transport::Tcp,
    }
}

/// Why the `rdma_*` tests are ignored (soft-roce/rdma-tests.sh runs them by name).
const NEEDS_RDMA: &str =
    "needs an RDMA device: runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)";

fn listen_addr(t: Transport) -> SocketAddr {
    match t {
        Transport::Rdma => SocketAddr::new(
            first_rdma_ip().unwrap_or_else(|| {
                panic!(
                    "no usable RDMA port with an IP address on this host: this test {NEEDS_RDMA}"
                )
            }),
            0,
        ),
        _ => "127.0.0.1:0".parse().unwrap(),
    }
}

const SECRET: &[u8] = b"the shared secret of this test";
const MEM: u64 = 1 << 20;

/// How long any wait may last before the test is declared hung. A hang guard for a loaded
/// machine (or the emulated Soft-RoCE VM), not a speed requirement: nothing here is timed.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// The standby's heartbeats: no test but the queue-pair one depends on silence detection,
/// and that one allows for it, so the timeout is long enough that a scheduling stall on a busy
/// machine is never mistaken for a lost primary.
const HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    timeout: Duration::from_secs(5),
};

fn layout() -> Layout {
    Layout {
        page_size: PAGE as u32,
        regions: vec![(0, MEM)],
        vcpus: 1,
        slot_pages: 16,
        slot_count: 2,
        features: 0,
        state_version: 1,
    }
}

fn standby(t: Transport) -> Standby {
    standby_with(t, config())
}

/// The standby's configuration in these tests: `MEM` of guest memory, restorable states are
/// those [`StateCheck`] accepts.
fn config() -> StandbyConfig {
    StandbyConfig {
        secret: SECRET.to_vec(),
        memory_bytes: Some(MEM),
        heartbeat: HEARTBEAT,
        restore: Some(Arc::new(StateCheck)),
        ..StandbyConfig::default()
    }
}

fn standby_with(t: Transport, config: StandbyConfig) -> Standby {
    let (sb, _) = Standby::bind_with(listen_addr(t), t, config).unwrap();
    assert_eq!(sb.transport(), t);
    sb
}

/// What these tests' standby can restore: state encoding version 1, one vCPU, and state blobs
/// that start with `state-` (a stand-in for the VMM's decoder).
#[derive(Debug)]
struct StateCheck;

impl RestoreCheck for StateCheck {
    fn state_version(&self) -> u32 {
        1
    }

    fn check_layout(&self, layout: &Layout) -> Result<(), BoxError> {
        if layout.vcpus != 1 {
            return Err(Unrestorable::Vcpus(layout.vcpus).into());
        }
        Ok(())
    }

    fn check_state(&self, state: &[u8], _: &Layout) -> Result<(), BoxError> {
        if !state.starts_with(b"state-") {
            return Err(Unrestorable::NotAState.into());
        }
        Ok(())
    }
}

/// Why [`StateCheck`] refuses.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Unrestorable {
    #[error("{0} vCPUs (this host builds 1)")]
    Vcpus(u32),
    #[error("not a state blob of this test")]
    NotAState,
}

/// Whether `e` is `want`, as a [`StateCheck`] reported it.
fn refused_as(e: &BoxError, want: Unrestorable) -> bool {
    e.downcast_ref::<Unrestorable>() == Some(&want)
}

/// Serves one connection on a thread; returns the standby and how the session went.
fn serve(mut sb: Standby) -> JoinHandle<(Standby, Session)> {
    std::thread::spawn(move || {
        let s = sb.serve_one().unwrap();
        (sb, s)
    })
}

struct Peer {
    transport: Transport,
    r: FrameReader<Rx>,
    w: FrameWriter<Tx>,
    closer: Closer,
    /// Staging slots the size the standby's have (RDMA placement writes from them).
    ring: SlotRing,
}

fn connect(addr: SocketAddr, t: Transport) -> Peer {
    let (conn, _) = Conn::connect(addr, t, HANG_GUARD).unwrap();
    assert_eq!(conn.transport(), t);
    // Reads wake every second to run their idle callback (the hang guard), and on RDMA to
    // check the queue pair's state; a send that waits for the standby's acknowledgements
    // gives up after the hang guard.
    let (r, w, closer) = conn.split(Duration::from_secs(1), HANG_GUARD).unwrap();
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
        transport: t,
        r: FrameReader::new(r),
        w: FrameWriter::new(w),
        closer,
        ring,
    }
}

/// An idle callback for the peer's reads: fails the read once nothing arrived for
/// [`HANG_GUARD`].
fn hang_guard(what: &'static str) -> impl FnMut(Instant) -> Result<(), Abort> {
    move |last_data: Instant| {
        if last_data.elapsed() > HANG_GUARD {
            Err(HangGuard(what).into())
        } else {
            Ok(())
        }
    }
}

/// What [`hang_guard`] stops a read with.
#[derive(Debug, thiserror::Error)]
#[error(
    "nothing from the standby for {HANG_GUARD:?} while waiting for {0} \
     (a hang guard, not a speed requirement)"
)]
struct HangGuard(&'static str);

fn next(p: &mut Peer) -> Message {
    p.r.next_message(&mut hang_guard("the standby's answer"))
        .unwrap()
}

/// After a fault the standby answers with (at most) a Refuse and closes: reads until the
/// connection ends, so the peer disconnects only once the standby has judged everything it
/// sent (on RDMA a disconnect would flush SENDs not yet delivered).
fn until_standby_closes(p: &mut Peer) {
    loop {
        match p.r.next_message(&mut hang_guard("the standby to close")) {
            Ok(_) => {}
            Err(e @ LinkError::Aborted(_)) => panic!("{e}"),
            Err(_) => return,
        }
    }
}

/// Sends `bytes` and returns once the standby's side has received all of them, so that a
/// disconnect right after cannot lose any: over RDMA the last byte (which must be 0) goes
/// with `Tx::drain`, which waits for the completion of every work request posted so far
/// (its one byte is that last byte, so the stream is exactly `bytes`); over TCP, bytes written
/// before the close are delivered before the end of the stream.
fn send_delivered(p: &mut Peer, bytes: &[u8]) {
    match p.transport {
        Transport::Rdma => {
            let (last, head) = bytes.split_last().expect("something to send");
            assert_eq!(
                *last, 0,
                "send_delivered: the last byte must be 0 (Tx::drain sends it)"
            );
            p.w.send_raw(&[head]).unwrap();
            p.w.get_mut()
                .rdma()
                .unwrap()
                .drain()
                .expect("the standby acknowledges everything sent");
        }
        _ => p.w.send_raw(&[bytes]).unwrap(),
    }
}

/// Completes the handshake with `secret` and `layout`; returns the standby's last applied epoch.
fn handshake(p: &mut Peer, secret: &[u8], layout: Layout) -> u64 {
    let last = match offer_with(p, secret, layout) {
        Message::Accept { last_applied, .. } => last_applied,
        other => panic!("expected accept, got {other:?}"),
    };
    if p.transport == Transport::Rdma {
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
    let mut slot = p
        .ring
        .acquire_timeout(HANG_GUARD)
        .expect("a free local slot (hang guard, not a speed requirement)");
    let a = slot.receive_areas(pages.len(), state.len()).unwrap();
    for (i, &(addr, fill)) in pages.iter().enumerate() {
        a.index[i * 8..(i + 1) * 8].copy_from_slice(&addr.to_le_bytes());
        a.data[i * PAGE_BYTES..(i + 1) * PAGE_BYTES].fill(fill);
    }
    a.state.copy_from_slice(state);
    let len = p.w.get_mut().rdma().unwrap().place(&slot, true).unwrap();
    (slot, len)
}

/// An epoch's body: pages (address, fill byte) and state.
fn body(pages: &[(u64, u8)], state: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let index: Vec<u8> = pages.iter().flat_map(|(a, _)| a.to_le_bytes()).collect();
    let mut data: Vec<u8> = pages
        .iter()
        .flat_map(|&(_, b)| vec![b; PAGE_BYTES])
        .collect();
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
    let _slot = if p.transport == Transport::Rdma {
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
fn standby_with_checkpoint(t: Transport) -> (Standby, (u64, Option<u64>, u64)) {
    let sb = standby(t);
    let addr = sb.local_addr();
    let h = serve(sb);
    let mut p = connect(addr, t);
    assert_eq!(handshake(&mut p, SECRET, layout()), 0);
    let all: Vec<(u64, u8)> = (0..16).map(|i| (i * PAGE, i as u8)).collect();
    good_epoch(&mut p, 1, EpochKind::Sync, &all, b"");
    good_epoch(
        &mut p,
        2,
        EpochKind::Checkpoint,
        &[(0x3000, 0xaa), (0x9000, 0xbb)],
        b"state-2",
    );
    p.w.send(&Message::Goodbye { last_epoch: 2 }).unwrap();
    until_standby_closes(&mut p);
    drop(p);
    let (sb, s) = h.join().unwrap();
    s.result.expect("good session");
    let hash = backup_hash(&sb);
    assert_eq!(hash.1, Some(2));
    (sb, hash)
}

/// Runs `fault` as a primary over `t` against a standby with a good checkpoint; checks that
/// the session ends with the error `is_expected` accepts (`expected` describes it), that the
/// checkpoint is intact, and that a good primary is accepted afterwards.
fn check_fault(
    t: Transport,
    expected: &str,
    is_expected: impl FnOnce(&StandbyError) -> bool,
    fault: impl FnOnce(&mut Peer),
) {
    let (sb, before) = standby_with_checkpoint(t);
    let addr = sb.local_addr();
    let h = serve(sb);
    let mut p = connect(addr, t);
    fault(&mut p);
    drop(p);
    let (sb, s) = h.join().unwrap();
    let e = s
        .result
        .expect_err("the fault must end the session with an error");
    assert!(
        is_expected(&e),
        "expected {expected}; the session ended with {:?} ({e:?})",
        error_chain(&e)
    );
    assert_eq!(backup_hash(&sb), before, "the last good checkpoint changed");
    good_primary_continues(sb);
}

/// Runs `fault` as a would-be primary whose connection must never become a session: the
/// standby reports a refusal with the error `is_expected` accepts (`expected` describes it),
/// the checkpoint is intact, and a good primary is accepted afterwards.
fn check_refused(
    t: Transport,
    expected: &str,
    is_expected: impl FnOnce(&StandbyError) -> bool,
    fault: impl FnOnce(&mut Peer),
) {
    let (mut sb, before) = standby_with_checkpoint(t);
    let refusals = sb.refusals().expect("the refusals receiver");
    let mut p = connect(sb.local_addr(), t);
    fault(&mut p);
    drop(p);
    let r = refusals
        .recv_timeout(HANG_GUARD)
        .expect("a refusal (hang guard, not a speed requirement)");
    assert!(
        is_expected(&r.error),
        "expected {expected}; the connection was refused with {:?} ({:?})",
        error_chain(&r.error),
        r.error
    );
    assert_eq!(backup_hash(&sb), before, "the last good checkpoint changed");
    good_primary_continues(sb);
}

/// Reads until the standby's Refuse; returns its reason (then the standby closes).
fn refusal(p: &mut Peer) -> String {
    loop {
        match p.r.next_message(&mut hang_guard("the standby's Refuse")) {
            Ok(Message::Refuse { reason }) => return reason,
            Ok(_) => {}
            Err(e) => panic!("the standby closed without a Refuse: {e}"),
        }
    }
}

/// After a fault: a good primary is accepted and continues from epoch 3 (the checkpoint the
/// fault must not have disturbed is epoch 2).
fn good_primary_continues(sb: Standby) {
    let addr = sb.local_addr();
    let t = sb.transport();
    let h = serve(sb);
    let mut p = connect(addr, t);
    assert_eq!(handshake(&mut p, SECRET, layout()), 2);
    good_epoch(
        &mut p,
        3,
        EpochKind::Checkpoint,
        &[(0x5000, 0x55)],
        b"state-3",
    );
    p.w.send(&Message::Goodbye { last_epoch: 3 }).unwrap();
    until_standby_closes(&mut p);
    drop(p);
    let (sb, s) = h.join().unwrap();
    s.result.expect("good session after the fault");
    assert_eq!(sb.backup().unwrap().checkpoint, Some(3));
}

/// The frames of `msgs`, encoded back to back.
fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut f = Vec::new();
    for m in msgs {
        wire::encode(m, &mut f);
    }
    f
}

#[test]
fn wrong_secret() {
    check_refused(
        transport(),
        "AuthFailed { peer: \"primary\" }",
        |e| {
            matches!(
                e,
                StandbyError::Protocol(ProtocolError::AuthFailed { peer: "primary" })
            )
        },
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
                fence: 0,
            })
            .unwrap();
            let why = refusal(p);
            assert!(why.starts_with("Authentication failed"), "{why}");
            until_standby_closes(p);
        },
    );
}

#[test]
fn wrong_protocol_version() {
    check_refused(
        transport(),
        "Version { found: 7 }",
        |e| {
            matches!(
                e,
                StandbyError::Protocol(ProtocolError::Version { found: 7 })
            )
        },
        |p| {
            p.w.send(&Message::Hello {
                version: 7,
                nonce: auth::nonce(),
            })
            .unwrap();
            let why = refusal(p);
            assert!(why.contains("protocol version 7"), "{why}");
            until_standby_closes(p);
        },
    );
}

#[test]
fn layout_mismatch() {
    check_refused(
        transport(),
        "LayoutMismatch (2 MiB proposed, 1 MiB configured)",
        |e| {
            matches!(
                e,
                StandbyError::Protocol(ProtocolError::LayoutMismatch(why))
                    if why == "the primary's guest has 2 MiB of memory, this standby is configured for 1 MiB"
            )
        },
        |p| {
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
                fence: 0,
            })
            .unwrap();
            let why = refusal(p);
            assert!(why.starts_with("Memory layout mismatch"), "{why}");
            until_standby_closes(p);
        },
    );
}

#[test]
fn truncated_epoch() {
    // 16 index bytes, then 5000 of the 8192 bytes of page data, then the connection ends.
    check_fault(
        transport(),
        "Closed while reading an epoch's page data, 5000 of 8192 bytes",
        |e| {
            matches!(
                e,
                StandbyError::Link(LinkError::Closed {
                    what: "an epoch's page data",
                    got: 5000,
                    want: 8192,
                })
            )
        },
        |p| {
            handshake(p, SECRET, layout());
            // The second page is zeros, so the last byte sent is 0 (see send_delivered).
            let (index, rest) = body(&[(0x1000, 1), (0x2000, 0)], b"st");
            let mut f = frames(&[Message::EpochHeader(header(3, EpochKind::Checkpoint, 2, 2))]);
            wire::encode_body_header((index.len() + rest.len()) as u64, &mut f);
            f.extend_from_slice(&index);
            f.extend_from_slice(&rest[..5000]);
            send_delivered(p, &f);
        },
    );
}

#[test]
fn corrupted_page_data() {
    let (index, mut rest) = body(&[(0x1000, 1), (0x2000, 2)], b"st");
    let checksum = wire::checksum(&[&index, &rest]);
    rest[100] ^= 0x40;
    let corrupted = wire::checksum(&[&index, &rest]);
    assert_ne!(checksum, corrupted);
    check_fault(
        transport(),
        &format!("Checksum {{ epoch: 3, expected: {checksum:#x}, actual: {corrupted:#x} }}"),
        |e| {
            matches!(
                e,
                StandbyError::Protocol(ProtocolError::Checksum { epoch: 3, expected, actual })
                    if *expected == checksum && *actual == corrupted
            )
        },
        |p| {
            handshake(p, SECRET, layout());
            p.w.send_epoch(
                &header(3, EpochKind::Checkpoint, 2, 2),
                &[&index, &rest],
                &Message::Commit { epoch: 3, checksum },
            )
            .unwrap();
            until_standby_closes(p);
        },
    );
}

#[test]
fn page_index_outside_guest_memory() {
    check_fault(
        transport(),
        "Index { epoch: 3, source: IndexOutside { entry: 1, addr: MEM + 0x1000 } }",
        |e| {
            matches!(
                e,
                StandbyError::Index {
                    epoch: 3,
                    source: WireError::IndexOutside { entry: 1, addr },
                } if *addr == MEM + 0x1000
            )
        },
        |p| {
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
            until_standby_closes(p);
        },
    );
}

#[test]
fn oversized_length_field() {
    check_fault(
        transport(),
        "TooLong { what: Commit, len: 1 TiB, limit: MAX_CONTROL_LEN }",
        |e| {
            matches!(
                e,
                StandbyError::Link(LinkError::Wire(WireError::TooLong {
                    what: MsgType::Commit,
                    len,
                    limit,
                })) if *len == 1 << 40 && *limit == MAX_CONTROL_LEN
            )
        },
        |p| {
            handshake(p, SECRET, layout());
            // A Commit frame claiming a 1 TiB payload.
            let mut f = frames(&[Message::Commit {
                epoch: 3,
                checksum: 0,
            }]);
            f[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
            p.w.send_raw(&[&f]).unwrap();
            until_standby_closes(p);
        },
    );
}

#[test]
fn unknown_message_type() {
    check_fault(
        transport(),
        "UnknownType(0x77)",
        |e| {
            matches!(
                e,
                StandbyError::Link(LinkError::Wire(WireError::UnknownType(0x77)))
            )
        },
        |p| {
            handshake(p, SECRET, layout());
            let mut f = frames(&[Message::Heartbeat { seq: 1 }]);
            f[0] = 0x77;
            p.w.send_raw(&[&f]).unwrap();
            until_standby_closes(p);
        },
    );
}

#[test]
fn connection_dropped_mid_epoch() {
    check_fault(
        transport(),
        "Incomplete { epoch: 3 }",
        |e| matches!(e, StandbyError::Incomplete { epoch: 3 }),
        |p| {
            handshake(p, SECRET, layout());
            // The state ends in 0, so the last byte sent is 0 (see send_delivered).
            let (index, rest) = body(&[(0x1000, 1)], b"s\0");
            let mut f = frames(&[Message::EpochHeader(header(3, EpochKind::Checkpoint, 1, 2))]);
            wire::encode_body_header((index.len() + rest.len()) as u64, &mut f);
            f.extend_from_slice(&index);
            f.extend_from_slice(&rest);
            // The whole body, but the connection drops before the commit.
            send_delivered(p, &f);
        },
    );
}

#[test]
fn primary_lost_without_goodbye() {
    check_fault(
        transport(),
        "PrimaryLost",
        |e| matches!(e, StandbyError::PrimaryLost),
        |p| {
            handshake(p, SECRET, layout());
            // Closes between epochs, but without a goodbye: a primary that died.
        },
    );
}

#[test]
fn commit_before_data() {
    check_fault(
        transport(),
        "CommitBeforeData { epoch: 3 }",
        |e| {
            matches!(
                e,
                StandbyError::Protocol(ProtocolError::CommitBeforeData { epoch: 3 })
            )
        },
        |p| {
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
            until_standby_closes(p);
        },
    );
}

#[test]
#[ignore = "needs an RDMA device: runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)"]
fn rdma_disconnect_after_placing_before_commit() {
    // The body is in the standby's slot, the header and BodyPlaced arrived, then the
    // primary disconnects (rdma_disconnect) before the commit.
    check_fault(
        Transport::Rdma,
        "Incomplete { epoch: 3 }",
        |e| matches!(e, StandbyError::Incomplete { epoch: 3 }),
        |p| {
            handshake(p, SECRET, layout());
            let (slot, len) = place(p, &[(0x1000, 0x11), (0x2000, 0x22)], b"st");
            let f = frames(&[
                Message::EpochHeader(header(3, EpochKind::Checkpoint, 2, 2)),
                Message::BodyPlaced {
                    slot: slot.index() as u32,
                    len,
                },
            ]);
            // Returns once the WRITEs and both frames have reached the standby.
            send_delivered(p, &f);
            p.closer.close();
        },
    );
}

#[test]
#[ignore = "needs an RDMA device: runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)"]
fn rdma_disconnect_mid_placement() {
    // Header delivered, RDMA WRITEs of the body posted, disconnect at once: some or all of
    // the body may have landed in the standby's slot, none of it may reach the backup.
    check_fault(
        Transport::Rdma,
        "Incomplete { epoch: 3 }",
        |e| matches!(e, StandbyError::Incomplete { epoch: 3 }),
        |p| {
            handshake(p, SECRET, layout());
            let f = frames(&[Message::EpochHeader(header(
                3,
                EpochKind::Checkpoint,
                16,
                2,
            ))]);
            send_delivered(p, &f);
            let pages: Vec<(u64, u8)> = (0..16).map(|i| (i * PAGE, 0xee)).collect();
            let _ = place(p, &pages, b"st");
            p.closer.close();
        },
    );
}

#[test]
#[ignore = "needs an RDMA device: runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)"]
fn rdma_body_placed_in_a_slot_that_does_not_exist() {
    check_fault(
        Transport::Rdma,
        "PlacedOutside { epoch: 3, slot: 7, count: 2 }",
        |e| {
            matches!(
                e,
                StandbyError::Protocol(ProtocolError::PlacedOutside {
                    epoch: 3,
                    slot: 7,
                    count: 2
                })
            )
        },
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
                len: 8 + PAGE + 2,
            })
            .unwrap();
            until_standby_closes(p);
        },
    );
}

/// How the standby may end a session whose primary's queue pair went to the error state
/// (the primary stays connected but neither receives nor acknowledges anything); `None` for
/// any other error. rxe (Soft-RoCE) does not answer the standby's SENDs to a QP in error, and
/// was seen not to report IBV_WC_RETRY_EXC_ERR for seconds (docs/NEXT.md), so which of these
/// comes first depends on the provider:
fn queue_pair_error_outcome(e: &StandbyError) -> Option<&'static str> {
    let hb = HEARTBEAT;
    match e {
        // The heartbeat timeout: nothing heard from the primary.
        StandbyError::Link(e)
            if matches!(
                e.aborted_by::<ProtocolError>(),
                Some(ProtocolError::PeerSilent { peer: "primary", timeout, .. })
                    if *timeout == hb.timeout
            ) =>
        {
            Some("heartbeat silence")
        }
        // The send timeout (= heartbeat timeout): heartbeats sent, none acknowledged, until
        // the send buffers ran out.
        StandbyError::Link(e)
            if matches!(
                e.aborted_by::<LinkError>(),
                Some(LinkError::Io { what: "sending a message", source })
                    if source.to_string()
                        == format!(
                            "the peer acknowledged none of our RDMA sends for {:?} (it is \
                             gone, or its link is)",
                            hb.timeout
                        )
            ) =>
        {
            Some("RDMA send timeout")
        }
        // The transport retries of a heartbeat SEND ran out.
        StandbyError::Link(e)
            if matches!(
                e.aborted_by::<LinkError>(),
                Some(LinkError::Io { what: "sending a message", source })
                    if source.to_string().starts_with(
                        "RDMA send completion failed: transport retry counter exceeded"
                    )
            ) =>
        {
            Some("RDMA retries exceeded")
        }
        // After that, the standby's own queue pair is in error too: its reads see it first.
        StandbyError::Link(LinkError::Io {
            what: "a frame header",
            source,
        }) if source.kind() == std::io::ErrorKind::ConnectionAborted
            && (source
                .to_string()
                .starts_with("RDMA receive flushed: the queue pair is in the error state (")
                || source.to_string()
                    == "RDMA receive impossible: the queue pair is in the error state") =>
        {
            Some("standby's queue pair in error after its retries ran out")
        }
        _ => None,
    }
}

#[test]
#[ignore = "needs an RDMA device: runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)"]
fn rdma_queue_pair_forced_into_error() {
    let (sb, before) = standby_with_checkpoint(Transport::Rdma);
    let addr = sb.local_addr();
    let h = serve(sb);
    let mut p = connect(addr, Transport::Rdma);
    handshake(&mut p, SECRET, layout());
    // Our QP goes to the error state: our posted receives are flushed (or, where the provider
    // does not flush them, the read finds the QP in error when it times out), so our side
    // reports it at once; the standby stops hearing from us and must end the session.
    p.closer.rdma().unwrap().force_qp_error().unwrap();
    let err =
        p.r.next_message(&mut |_| Err("no error reported for the queue pair in error".into()))
            .expect_err("a flushed queue pair is an error");
    assert!(
        matches!(
            &err,
            LinkError::Io { what: "a frame header", source }
                if source.kind() == std::io::ErrorKind::ConnectionAborted
                    && (source.to_string().starts_with(
                        "RDMA receive flushed: the queue pair is in the error state ("
                    ) || source.to_string()
                        == "RDMA receive impossible: the queue pair is in the error state")
        ),
        "primary side: expected the queue pair's error state, got {:?} ({err:?})",
        error_chain(&err)
    );
    let (sb, s) = h.join().unwrap();
    let e = s.result.expect_err("the standby must end the session");
    let outcome = queue_pair_error_outcome(&e);
    eprintln!(
        "primary side: {}\nstandby side: {} ({e:?}): {outcome:?}",
        error_chain(&err),
        error_chain(&e)
    );
    assert!(
        outcome.is_some(),
        "standby side: expected heartbeat silence, the RDMA send timeout, RDMA retries \
         exceeded or its own queue pair in error; got {:?} ({e:?})",
        error_chain(&e)
    );
    assert_eq!(backup_hash(&sb), before, "the last good checkpoint changed");
    drop(p);
    good_primary_continues(sb);
}

/// Sends a Hello and an Auth with `layout`; returns what the standby answered the Auth with.
fn offer(p: &mut Peer, layout: Layout) -> Message {
    offer_with(p, SECRET, layout)
}

/// [`offer`] proving `secret`.
fn offer_with(p: &mut Peer, secret: &[u8], layout: Layout) -> Message {
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
        fence: 0,
    })
    .unwrap();
    next(p)
}

#[test]
fn state_encoding_this_standby_cannot_restore() {
    check_refused(
        transport(),
        "StateVersion { found: 9, supported: 1 }",
        |e| {
            matches!(
                e,
                StandbyError::Protocol(ProtocolError::StateVersion {
                    found: 9,
                    supported: 1
                })
            )
        },
        |p| {
            let reply = offer(
                p,
                Layout {
                    state_version: 9,
                    ..layout()
                },
            );
            assert!(
                matches!(&reply, Message::Refuse { reason } if reason.contains("version 9")),
                "{reply:?}"
            );
            until_standby_closes(p);
        },
    );
}

/// The VMM's own limits (here: one vCPU), checked at the handshake of a fresh standby.
#[test]
fn a_guest_this_host_cannot_build() {
    let (reply, error) = offer_to_a_fresh_standby(
        transport(),
        config(),
        Layout {
            vcpus: 2,
            ..layout()
        },
    );
    assert!(
        matches!(&reply, Message::Refuse { reason } if reason.ends_with("2 vCPUs (this host builds 1)")),
        "{reply:?}"
    );
    assert!(
        matches!(&error, StandbyError::NotBuildable(why) if refused_as(why, Unrestorable::Vcpus(2))),
        "{error:?}"
    );
}

/// Offers `layout` to a new standby with `config`; returns the standby's answer and the error
/// it refused the connection with, after checking it allocated nothing for it.
fn offer_to_a_fresh_standby(
    t: Transport,
    config: StandbyConfig,
    layout: Layout,
) -> (Message, StandbyError) {
    let mut sb = standby_with(t, config);
    let refusals = sb.refusals().unwrap();
    let mut p = connect(sb.local_addr(), t);
    let reply = offer(&mut p, layout);
    let r = refusals
        .recv_timeout(HANG_GUARD)
        .expect("a refusal (hang guard, not a speed requirement)");
    assert!(
        sb.backup().is_none(),
        "nothing allocated for a refused guest"
    );
    (reply, r.error)
}

/// A standby without `--memory` still refuses a guest larger than this host's memory, before
/// allocating anything for it.
#[test]
fn a_guest_larger_than_this_host_is_refused() {
    let (reply, error) = offer_to_a_fresh_standby(
        Transport::Tcp,
        StandbyConfig {
            memory_bytes: None,
            ..config()
        },
        Layout {
            regions: vec![(0, 1 << 39)],
            ..layout()
        },
    );
    assert!(
        matches!(&reply, Message::Refuse { reason } if reason.contains("more than this host's")),
        "{reply:?}"
    );
    assert!(
        matches!(error, StandbyError::Protocol(ProtocolError::TooLarge { need, .. }) if need >= 512 << 10),
        "{error:?}"
    );
}

/// A checkpoint that arrives whole and verified but whose state could not be restored is
/// refused and never acknowledged; the checkpoint before it stays.
#[test]
fn unrestorable_checkpoint_is_refused_not_acked() {
    check_fault(
        transport(),
        "Unrestorable { epoch: 3 }",
        |e| matches!(e, StandbyError::Unrestorable { epoch: 3, reason } if refused_as(reason, Unrestorable::NotAState)),
        |p| {
            handshake(p, SECRET, layout());
            let (index, rest) = body(&[(0x1000, 1)], b"garbage");
            p.w.send_epoch(
                &header(3, EpochKind::Checkpoint, 1, 7),
                &[&index, &rest],
                &Message::Commit {
                    epoch: 3,
                    checksum: wire::checksum(&[&index, &rest]),
                },
            )
            .unwrap();
            loop {
                match p
                    .r
                    .next_message(&mut hang_guard("the standby's answer to epoch 3"))
                {
                    Ok(Message::Refuse { reason }) => {
                        assert!(
                            reason.contains("Checkpoint 3 cannot be restored"),
                            "{reason}"
                        );
                        break;
                    }
                    Ok(Message::Ack { epoch }) => panic!("epoch {epoch} was acknowledged"),
                    Ok(_) => {}
                    Err(e) => panic!("closed without a Refuse: {e}"),
                }
            }
            until_standby_closes(p);
        },
    );
}

/// A peer that never finishes its handshake (a byte now and then keeps every read going) is
/// cut at the handshake deadline, and meanwhile a good primary is served.
#[test]
fn a_trickling_peer_is_cut_and_delays_no_primary() {
    let t = Transport::Tcp;
    let mut sb = standby_with(
        t,
        StandbyConfig {
            handshake_timeout: Duration::from_secs(2),
            ..config()
        },
    );
    let refusals = sb.refusals().unwrap();
    let addr = sb.local_addr();
    let trickler = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut hello = Vec::new();
        wire::encode(
            &Message::Hello {
                version: PROTOCOL_VERSION,
                nonce: auth::nonce(),
            },
            &mut hello,
        );
        // One byte every 10 ms, and never the last one.
        for b in &hello[..hello.len() - 1] {
            if std::io::Write::write_all(&mut s, &[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut sink = [0u8; 64];
        let _ = std::io::Read::read(&mut s, &mut sink);
    });
    // While it trickles, a good primary completes its handshake and a checkpoint.
    let h = serve(sb);
    let mut p = connect(addr, t);
    assert_eq!(handshake(&mut p, SECRET, layout()), 0);
    good_epoch(&mut p, 1, EpochKind::Sync, &[(0, 1)], b"");
    good_epoch(&mut p, 2, EpochKind::Checkpoint, &[(0x2000, 2)], b"state-2");
    p.w.send(&Message::Goodbye { last_epoch: 2 }).unwrap();
    until_standby_closes(&mut p);
    let (_sb, s) = h.join().unwrap();
    s.result.expect("the good primary's session");
    let r = refusals
        .recv_timeout(HANG_GUARD)
        .expect("the trickler refused (hang guard)");
    assert!(
        matches!(r.error, StandbyError::HandshakeTimeout(d) if d == Duration::from_secs(2)),
        "{:?}",
        r.error
    );
    trickler.join().unwrap();
}

/// Fifty idle connections (more than may handshake at once) do not keep a primary out: the
/// oldest are cut to make room.
#[test]
fn idle_connections_do_not_keep_a_primary_out() {
    let t = Transport::Tcp;
    let mut sb = standby(t);
    let refusals = sb.refusals().unwrap();
    let addr = sb.local_addr();
    let idle: Vec<_> = (0..50)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let h = serve(sb);
    let mut p = connect(addr, t);
    assert_eq!(handshake(&mut p, SECRET, layout()), 0);
    good_epoch(&mut p, 1, EpochKind::Sync, &[(0, 1)], b"");
    p.w.send(&Message::Goodbye { last_epoch: 1 }).unwrap();
    until_standby_closes(&mut p);
    let (_sb, s) = h.join().unwrap();
    s.result.expect("the primary's session");
    // Each cut connection is reported once its handshake thread notices.
    let mut evicted = 0;
    while evicted < 50 - 16 {
        let r = refusals
            .recv_timeout(HANG_GUARD)
            .expect("the cut idle connections reported (hang guard)");
        assert!(matches!(r.error, StandbyError::Evicted(_)), "{:?}", r.error);
        evicted += 1;
    }
    drop(idle);
}

/// Before authentication a frame may be only as long as the messages allowed there.
#[test]
fn long_frames_before_authentication_are_refused() {
    check_refused(
        transport(),
        "PreAuthFrame { ty: Hello, len: 60000, limit: 42 }",
        |e| {
            matches!(
                e,
                StandbyError::PreAuthFrame {
                    ty: MsgType::Hello,
                    len: 60_000,
                    limit: 42
                }
            )
        },
        |p| {
            let mut f = Vec::new();
            wire::encode(
                &Message::Hello {
                    version: PROTOCOL_VERSION,
                    nonce: auth::nonce(),
                },
                &mut f,
            );
            f[8..16].copy_from_slice(&60_000u64.to_le_bytes());
            p.w.send_raw(&[&f]).unwrap();
            let why = refusal(p);
            assert!(why.contains("before authentication"), "{why}");
            until_standby_closes(p);
        },
    );
}

/// An epoch larger than a slot (here 200 pages against 16-page slots) never needs a buffer of
/// its size: its pages pass through a temporary file, are hashed on the way, and are applied
/// only when whole and verified; a corrupt one leaves the backup as it was.
#[test]
fn an_epoch_larger_than_a_slot_is_applied_only_whole_and_verified() {
    let t = transport();
    let sb = standby(t);
    let addr = sb.local_addr();
    let h = serve(sb);
    let mut p = connect(addr, t);
    assert_eq!(handshake(&mut p, SECRET, layout()), 0);
    let pages: Vec<(u64, u8)> = (0..200).map(|i| (i * PAGE, (i % 251) as u8 + 1)).collect();
    // Over TCP as a body frame; over RDMA too (larger than a slot, it cannot be placed).
    let (index, rest) = body(&pages, b"");
    p.w.send_epoch(
        &header(1, EpochKind::Sync, pages.len(), 0),
        &[&index, &rest],
        &Message::Commit {
            epoch: 1,
            checksum: wire::checksum(&[&index, &rest]),
        },
    )
    .unwrap();
    loop {
        match next(&mut p) {
            Message::Ack { epoch: 1 } => break,
            Message::Heartbeat { .. } => {}
            other => panic!("expected ack 1, got {other:?}"),
        }
    }
    good_epoch(&mut p, 2, EpochKind::Checkpoint, &[(0x1000, 9)], b"state-2");
    p.w.send(&Message::Goodbye { last_epoch: 2 }).unwrap();
    until_standby_closes(&mut p);
    drop(p);
    let (sb, s) = h.join().unwrap();
    s.result.expect("a good session");
    let b = sb.backup().unwrap();
    let mut page = vec![0u8; PAGE_BYTES];
    for &(addr, fill) in &pages {
        b.memory.read_slice(&mut page, GuestAddress(addr)).unwrap();
        let want = if addr == 0x1000 { 9 } else { fill };
        assert!(page.iter().all(|&x| x == want), "page {addr:#x}");
    }
    let before = backup_hash(&sb);
    // The same size again, corrupted: refused, nothing applied.
    let h = serve(sb);
    let mut p = connect(addr, t);
    assert_eq!(handshake(&mut p, SECRET, layout()), 2);
    let (index, mut rest) = body(&pages, b"");
    let checksum = wire::checksum(&[&index, &rest]);
    rest[150 * PAGE_BYTES] ^= 0xff;
    p.w.send_epoch(
        &header(3, EpochKind::Sync, pages.len(), 0),
        &[&index, &rest],
        &Message::Commit { epoch: 3, checksum },
    )
    .unwrap();
    until_standby_closes(&mut p);
    drop(p);
    let (sb, s) = h.join().unwrap();
    let e = s.result.expect_err("a corrupt epoch ends the session");
    assert!(
        matches!(
            e,
            StandbyError::Protocol(ProtocolError::Checksum { epoch: 3, .. })
        ),
        "{e:?}"
    );
    assert_eq!(
        backup_hash(&sb),
        before,
        "the corrupt epoch changed the backup"
    );
}
