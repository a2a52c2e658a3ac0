//! The real `rmc standby` against a scripted primary: a checkpoint that arrives whole and
//! verified, but whose VM state the standby could not restore, is refused and never
//! acknowledged, and the loss of that primary then fails nothing over (the standby holds no
//! checkpoint it could run).

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rmc::events::{Backup, Event};
use rmc_guest_api::PAGE_SIZE;
use rmc_tests::{line_channel, rmc_bin, wait_for_event, wait_within};
use rmc_transport::framing::{Abort, FrameReader, FrameWriter, LinkError};
use rmc_transport::wire::{self, auth, EpochHeader, EpochKind, Layout, Message, PROTOCOL_VERSION};

const SECRET: &str = "the secret of the scripted-primary test";
const HANG_GUARD: Duration = Duration::from_secs(60);

fn hang_guard() -> impl FnMut(Instant) -> Result<(), Abort> {
    let start = Instant::now();
    move |_| {
        if start.elapsed() > HANG_GUARD {
            Err("no answer from rmc standby (hang guard)".into())
        } else {
            Ok(())
        }
    }
}

/// Sends epoch `epoch`: one page at address 0 filled with the epoch's number, and `state`.
fn send_epoch(w: &mut FrameWriter<TcpStream>, epoch: u64, kind: EpochKind, state: &[u8]) {
    let index: Vec<u8> = 0u64.to_le_bytes().to_vec();
    let mut rest = vec![epoch as u8; PAGE_SIZE as usize];
    rest.extend_from_slice(state);
    let header = EpochHeader {
        epoch,
        kind,
        page_count: 1,
        state_len: state.len() as u32,
    };
    let commit = Message::Commit {
        epoch,
        checksum: wire::checksum(&[&index, &rest]),
    };
    w.send_epoch(&header, &[&index, &rest], &commit).unwrap();
}

#[test]
fn a_checkpoint_the_standby_cannot_restore_is_refused_never_acked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let mut child = Command::new(rmc_bin())
        .args([
            "--json",
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .args(["--service-addr", "127.0.0.1:0", "--sessions", "1"])
        .args(["--heartbeat-ms", "100", "--heartbeat-misses", "30"])
        .arg("--secret-file")
        .arg(&secret)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rmc standby");
    let out = line_channel(child.stdout.take().unwrap());
    let addr = wait_for_event(
        &out,
        HANG_GUARD,
        "rmc standby",
        "where it listens",
        |e| match e {
            Event::StandbyListening { addr, .. } => Some(addr),
            _ => None,
        },
    );

    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut r = FrameReader::new(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s.try_clone().unwrap());
    let nonce = auth::nonce();
    w.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        nonce,
    })
    .unwrap();
    let Message::Challenge { nonce: c, .. } = r.next_message(&mut hang_guard()).unwrap() else {
        panic!("expected a challenge")
    };
    // A guest rmc's VMM builds: 32 MiB, one vCPU, this build's state encoding.
    let layout = Layout {
        page_size: PAGE_SIZE as u32,
        regions: vec![(0, 32 << 20)],
        vcpus: 1,
        slot_pages: 1024,
        slot_count: 2,
        features: 0,
        state_version: rmc_vmm::state::VERSION,
    };
    w.send(&Message::Auth {
        proof: auth::primary_proof(SECRET.as_bytes(), &c, &nonce),
        layout,
        fence: 0,
    })
    .unwrap();
    let answer = r.next_message(&mut hang_guard()).unwrap();
    assert_eq!(
        answer,
        Message::Accept {
            last_applied: 0,
            lineage: [0; 32]
        }
    );
    send_epoch(&mut w, 1, EpochKind::Sync, b"");
    // Checksummed and in order, but its state is not an rmc VM state.
    send_epoch(&mut w, 2, EpochKind::Checkpoint, b"not an rmc VM state");
    let mut acked = Vec::new();
    let reason = loop {
        match r.next_message(&mut hang_guard()) {
            Ok(Message::Ack { epoch }) => acked.push(epoch),
            Ok(Message::Refuse { reason }) => break reason,
            Ok(_) => {}
            Err(LinkError::Closed { .. }) => panic!("closed without a Refuse"),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(acked, vec![1], "only the sync epoch is acknowledged");
    assert!(
        reason.starts_with("Checkpoint 2 cannot be restored: Not an rmc VM state"),
        "{reason}"
    );
    drop((r, w));
    let _ = s.shutdown(std::net::Shutdown::Both);
    // Its primary is gone without a goodbye, but the standby holds no checkpoint it could
    // run: it says so and does not fail over.
    let (error, backup) = wait_for_event(
        &out,
        HANG_GUARD,
        "rmc standby",
        "the end of the session",
        |e| match e {
            Event::SessionEnded { error, backup, .. } => Some((error, backup)),
            _ => None,
        },
    );
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("Checkpoint 2 cannot be restored"))
            && backup == Backup::NoCheckpoint,
        "{error:?}, backup {backup:?}"
    );
    // Its one session is over: it exits, having failed nothing over.
    let status = wait_within(&mut child, HANG_GUARD, "rmc standby");
    assert!(status.success(), "{status}");
}
