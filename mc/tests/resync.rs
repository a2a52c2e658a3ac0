//! The standby's atomic re-sync with fencing: a real standby against a scripted primary.
//!
//! With an arbiter (`StandbyConfig::fencing`) a new session's sync epochs are acknowledged
//! but held back (deferred), and applied together with the session's first checkpoint, so the
//! backup stays the previous session's checkpoint, byte for byte, until then: if the new
//! session dies before its first checkpoint, the standby still holds a consistent image of
//! the old one, with that session's lineage, still armed (the arbiter decides whether it is
//! current). Without an arbiter, sync epochs are applied at once and the checkpoint is gone
//! (the contrast test).
//!
//! TCP on loopback; no KVM. Every wait is a hang guard ([`HANG_GUARD`]), not a speed
//! requirement.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmc_mc::protocol::Heartbeat;
use rmc_mc::standby::{error_chain, FenceCheck, Session, Standby, StandbyConfig, StandbyError};
use rmc_mc::BoxError;
use rmc_transport::framing::{FrameReader, FrameWriter, LinkError};
use rmc_transport::link::{Closer, Conn, Rx, Transport, Tx};
use rmc_transport::wire::{
    self, auth, EpochHeader, EpochKind, Layout, Message, NONCE_LEN, PROTOCOL_VERSION,
};
use vm_memory::{Bytes, GuestAddress};

const SECRET: &[u8] = b"the shared secret of the re-sync test";
const PAGE: usize = rmc_staging::PAGE_BYTES;
/// 1 MiB of guest memory: 256 pages.
const MEM: u64 = 1 << 20;

/// How long any wait may last before the test is declared hung (not a speed requirement).
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Heartbeat timeout long enough that a stall of a busy machine is never a lost primary.
const HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    timeout: Duration::from_secs(5),
};

/// The session tokens (Hello nonces) of the three sessions.
const N1: [u8; NONCE_LEN] = [0x11; NONCE_LEN];
const N2: [u8; NONCE_LEN] = [0x22; NONCE_LEN];
const N3: [u8; NONCE_LEN] = [0x33; NONCE_LEN];

/// The fencing token every scripted primary presents.
const FENCE: u64 = 1;

/// An arbiter that names every primary with a fencing token as current.
#[derive(Debug)]
struct AcceptAll;

impl FenceCheck for AcceptAll {
    fn check_primary(&self, fence: u64) -> Result<(), BoxError> {
        if fence == 0 {
            Err("no fencing token".into())
        } else {
            Ok(())
        }
    }
}

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

/// A standby on loopback, fenced by [`AcceptAll`] or not fenced at all. No `RestoreCheck`:
/// any state bytes are a restorable checkpoint.
fn standby(fenced: bool) -> Standby {
    let config = StandbyConfig {
        secret: SECRET.to_vec(),
        memory_bytes: Some(MEM),
        heartbeat: HEARTBEAT,
        fencing: fenced.then(|| Arc::new(AcceptAll) as Arc<dyn FenceCheck>),
        ..StandbyConfig::default()
    };
    let (sb, _) =
        Standby::bind_with("127.0.0.1:0".parse().unwrap(), Transport::Tcp, config).unwrap();
    sb
}

/// Serves one session on a thread; returns the standby and how the session went.
fn serve(mut sb: Standby) -> JoinHandle<(Standby, Session)> {
    std::thread::spawn(move || {
        let s = sb.serve_one().expect("a session");
        (sb, s)
    })
}

/// A scripted primary's connection.
struct Peer {
    r: FrameReader<Rx>,
    w: FrameWriter<Tx>,
    closer: Closer,
}

/// What the standby's Accept said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Accepted {
    last_applied: u64,
    lineage: [u8; NONCE_LEN],
}

/// Connects, authenticates with Hello nonce `nonce` and fencing token [`FENCE`], and returns
/// the connection with the standby's Accept.
fn connect(addr: SocketAddr, nonce: [u8; NONCE_LEN]) -> (Peer, Accepted) {
    let (conn, _) = Conn::connect(addr, Transport::Tcp, HANG_GUARD).unwrap();
    let (r, w, closer) = conn.split(Duration::from_secs(1), HANG_GUARD).unwrap();
    let mut p = Peer {
        r: FrameReader::new(r),
        w: FrameWriter::new(w),
        closer,
    };
    p.w.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        nonce,
    })
    .unwrap();
    let Message::Challenge { nonce: c, .. } = next(&mut p) else {
        panic!("expected a challenge")
    };
    p.w.send(&Message::Auth {
        proof: auth::primary_proof(SECRET, &c, &nonce),
        layout: layout(),
        fence: FENCE,
    })
    .unwrap();
    match next(&mut p) {
        Message::Accept {
            last_applied,
            lineage,
        } => (
            p,
            Accepted {
                last_applied,
                lineage,
            },
        ),
        other => panic!("expected an Accept, got {other:?}"),
    }
}

/// What the hang guard of [`next`] stops a read with.
#[derive(Debug, thiserror::Error)]
#[error("nothing from the standby for {HANG_GUARD:?} (hang guard)")]
struct HangGuard;

/// The next message from the standby other than a heartbeat.
fn next(p: &mut Peer) -> Message {
    loop {
        let m =
            p.r.next_message(&mut |last: Instant| {
                if last.elapsed() > HANG_GUARD {
                    Err(HangGuard.into())
                } else {
                    Ok(())
                }
            })
            .unwrap();
        if !matches!(m, Message::Heartbeat { .. }) {
            return m;
        }
    }
}

/// Sends a well-formed epoch (pages given as (address, fill byte)) and waits for its ack.
fn epoch(p: &mut Peer, epoch: u64, kind: EpochKind, pages: &[(u64, u8)], state: &[u8]) {
    let index: Vec<u8> = pages.iter().flat_map(|(a, _)| a.to_le_bytes()).collect();
    let mut rest: Vec<u8> = pages.iter().flat_map(|&(_, b)| vec![b; PAGE]).collect();
    rest.extend_from_slice(state);
    let header = EpochHeader {
        epoch,
        kind,
        page_count: pages.len() as u64,
        state_len: state.len() as u32,
    };
    let commit = Message::Commit {
        epoch,
        checksum: wire::checksum(&[&index, &rest]),
    };
    p.w.send_epoch(&header, &[&index, &rest], &commit).unwrap();
    match next(p) {
        Message::Ack { epoch: e } if e == epoch => {}
        other => panic!("expected the ack of epoch {epoch}, got {other:?}"),
    }
}

/// Ends the connection without a goodbye (a primary that died) and waits for the session.
fn drop_connection(p: Peer, h: JoinHandle<(Standby, Session)>, what: &str) -> (Standby, Session) {
    p.closer.close();
    drop(p);
    let (sb, s) = h.join().expect("the standby's thread");
    match &s.result {
        Err(StandbyError::PrimaryLost) => {}
        other => panic!(
            "{what}: expected PrimaryLost, the session ended with {:?}",
            other.as_ref().map_err(|e| error_chain(e))
        ),
    }
    (sb, s)
}

/// The backup's whole memory.
fn backup_memory(sb: &Standby) -> Vec<u8> {
    let b = sb.backup().expect("a backup");
    let mut mem = vec![0u8; MEM as usize];
    b.memory.read_slice(&mut mem, GuestAddress(0)).unwrap();
    mem
}

/// Writes `pages` into the model of guest memory.
fn write_model(model: &mut [u8], pages: &[(u64, u8)]) {
    for &(addr, fill) in pages {
        model[addr as usize..addr as usize + PAGE].fill(fill);
    }
}

/// Asserts that the backup memory equals `model`, naming the first page that differs.
fn assert_memory(sb: &Standby, model: &[u8], what: &str) {
    let mem = backup_memory(sb);
    if let Some(page) = (0..MEM as usize / PAGE)
        .find(|&i| mem[i * PAGE..(i + 1) * PAGE] != model[i * PAGE..(i + 1) * PAGE])
    {
        panic!(
            "{what}: backup page {:#x} holds {:#04x}.., expected {:#04x}..",
            page * PAGE,
            mem[page * PAGE],
            model[page * PAGE]
        );
    }
}

/// Session 1: a full sync (epoch 1, pages 0..16) and a checkpoint (epoch 2), then the
/// primary is lost (no goodbye). Returns the standby and the model of its memory.
fn first_session(sb: Standby) -> (Standby, Vec<u8>) {
    let addr = sb.local_addr();
    let h = serve(sb);
    let (mut p, a) = connect(addr, N1);
    assert_eq!(
        a,
        Accepted {
            last_applied: 0,
            lineage: [0; NONCE_LEN]
        },
        "a fresh standby"
    );
    let mut model = vec![0u8; MEM as usize];
    let sync: Vec<(u64, u8)> = (0..16).map(|i| (i * PAGE as u64, i as u8 + 1)).collect();
    epoch(&mut p, 1, EpochKind::Sync, &sync, b"");
    write_model(&mut model, &sync);
    let ckpt = [(0x3000, 0xaa), (0x20000, 0xab)];
    epoch(
        &mut p,
        2,
        EpochKind::Checkpoint,
        &ckpt,
        b"state of session 1",
    );
    write_model(&mut model, &ckpt);
    let (sb, s) = drop_connection(p, h, "session 1");
    assert_eq!(s.epochs, 2);
    assert_eq!(s.token, N1);
    assert_eq!(s.fence, FENCE);
    let b = sb.backup().unwrap();
    assert_eq!(b.checkpoint, Some(2));
    assert_eq!(b.last_applied, 2);
    assert_eq!(b.lineage, N1);
    assert_eq!(
        b.previous_lineage, None,
        "the first checkpoint has no session before it"
    );
    assert!(b.armed, "session 1 ended without a goodbye: armed");
    assert_eq!(b.state, b"state of session 1");
    assert!(sb.should_fail_over(&s));
    assert_memory(&sb, &model, "after session 1");
    (sb, model)
}

/// The sync epochs of a later session (numbered after checkpoint 2): they overwrite pages
/// session 1 wrote, with other bytes.
const RESYNC_3: [(u64, u8); 4] = [(0, 0xc1), (0x1000, 0xc1), (0x3000, 0xc1), (0x5000, 0xc1)];
const RESYNC_4: [(u64, u8); 3] = [(0x3000, 0xc2), (0x8000, 0xc2), (0x20000, 0xc2)];

#[test]
fn a_new_sessions_sync_epochs_leave_the_checkpoint_intact_until_its_first_checkpoint() {
    let (sb, model1) = first_session(standby(true));
    let addr = sb.local_addr();

    // Session 2: resumes from checkpoint 2 of session 1, syncs, dies before a checkpoint.
    let h = serve(sb);
    let (mut p, a) = connect(addr, N2);
    assert_eq!(
        a,
        Accepted {
            last_applied: 2,
            lineage: N1
        },
        "session 2 is offered checkpoint 2 of session 1"
    );
    epoch(&mut p, 3, EpochKind::Sync, &RESYNC_3, b"");
    epoch(&mut p, 4, EpochKind::Sync, &RESYNC_4, b"");
    let (sb, s) = drop_connection(p, h, "session 2");
    assert_eq!(s.epochs, 2, "both sync epochs were acknowledged");
    assert_eq!(s.token, N2);
    assert_memory(
        &sb,
        &model1,
        "after session 2's sync epochs (no checkpoint)",
    );
    let b = sb.backup().unwrap();
    assert_eq!(b.checkpoint, Some(2), "still session 1's checkpoint");
    assert_eq!(
        b.last_applied, 2,
        "the deferred sync epochs were never applied"
    );
    assert_eq!(b.lineage, N1);
    assert_eq!(b.state, b"state of session 1");
    assert!(
        b.armed,
        "with fencing a re-sync does not disarm (the arbiter decides)"
    );
    assert!(
        sb.should_fail_over(&s),
        "losing session 2 may fail over to checkpoint 2 (if the arbiter agrees)"
    );

    // Session 3: the same re-sync, then a checkpoint: all of it lands together.
    let h = serve(sb);
    let (mut p, a) = connect(addr, N3);
    assert_eq!(
        a,
        Accepted {
            last_applied: 2,
            lineage: N1
        },
        "session 3 is offered checkpoint 2 of session 1 again"
    );
    epoch(&mut p, 3, EpochKind::Sync, &RESYNC_3, b"");
    epoch(&mut p, 4, EpochKind::Sync, &RESYNC_4, b"");
    let ckpt = [(0x5000, 0xc3), (0x9000, 0xc3)];
    epoch(
        &mut p,
        5,
        EpochKind::Checkpoint,
        &ckpt,
        b"state of session 3",
    );
    p.w.send(&Message::Goodbye { last_epoch: 5 }).unwrap();
    // The standby closes after a goodbye.
    loop {
        match p.r.next_message(&mut |_| Ok(())) {
            Ok(_) => {}
            Err(e @ LinkError::Aborted(_)) => panic!("{e}"),
            Err(_) => break,
        }
    }
    drop(p);
    let (sb, s) = h.join().expect("the standby's thread");
    if let Err(e) = &s.result {
        panic!("session 3 must end with its goodbye: {}", error_chain(e));
    }
    assert_eq!(s.epochs, 3);
    let mut model3 = model1.clone();
    write_model(&mut model3, &RESYNC_3);
    write_model(&mut model3, &RESYNC_4);
    write_model(&mut model3, &ckpt);
    assert_ne!(model3, model1);
    assert_memory(&sb, &model3, "after session 3's checkpoint");
    let b = sb.backup().unwrap();
    assert_eq!(b.checkpoint, Some(5));
    assert_eq!(b.last_applied, 5);
    assert_eq!(b.lineage, N3);
    // Until the primary records session 3, the arbiter may still name session 1, under which
    // this newer checkpoint is current too.
    assert_eq!(b.previous_lineage, Some(N1));
    assert_eq!(b.takeover_tokens().len(), 2);
    assert_eq!(b.takeover_tokens()[0], b.lineage_hex());
    assert_eq!(b.state, b"state of session 3");
    assert!(!b.armed, "a goodbye releases the backup");
    assert!(!sb.should_fail_over(&s));
}

/// The contrast: without an arbiter a new session's sync epochs are applied at once, so the
/// old checkpoint is gone before the new session has one, and losing that session fails
/// nothing over.
#[test]
fn without_fencing_sync_epochs_are_applied_at_once() {
    let (sb, model1) = first_session(standby(false));
    let addr = sb.local_addr();
    let h = serve(sb);
    let (mut p, a) = connect(addr, N2);
    assert_eq!(
        a,
        Accepted {
            last_applied: 2,
            lineage: N1
        }
    );
    epoch(&mut p, 3, EpochKind::Sync, &RESYNC_3, b"");
    epoch(&mut p, 4, EpochKind::Sync, &RESYNC_4, b"");
    let (sb, s) = drop_connection(p, h, "session 2 without fencing");
    let mut model2 = model1.clone();
    write_model(&mut model2, &RESYNC_3);
    write_model(&mut model2, &RESYNC_4);
    assert_memory(
        &sb,
        &model2,
        "after session 2's sync epochs, without fencing",
    );
    let b = sb.backup().unwrap();
    assert_eq!(b.checkpoint, None, "no consistent checkpoint any more");
    assert_eq!(b.last_applied, 4);
    assert!(!b.armed, "a new session disarms until its first checkpoint");
    assert!(!sb.should_fail_over(&s));
    // The next primary is offered no checkpoint to resume from.
    let h = serve(sb);
    let (p, a) = connect(addr, N3);
    assert_eq!(
        a,
        Accepted {
            last_applied: 4,
            lineage: [0; NONCE_LEN]
        }
    );
    drop_connection(p, h, "session 3 without fencing");
}
