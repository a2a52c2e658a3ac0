//! Sans-I/O protocol cores of the primary and the standby.
//!
//! Each core is a state machine fed with decoded messages, the progress of its own side
//! (an epoch was staged, a body arrived, an epoch was applied) and the current time as a value.
//! It answers with what to send and what to do; it never touches a socket or a clock, so each
//! failure case (ack lost, duplicate ack, ack for an unknown epoch, commit before data, a silent
//! peer, a wrong secret, a wrong version, a layout mismatch) is a plain unit test below. The
//! message sequence and the states are drawn in `rmc_transport::wire`.
//!
//! Primary ([`PrimaryCore`], in `primary.rs`): `AwaitChallenge -> AwaitAccept ->
//! [AwaitRegionKey, RDMA only] -> Established`. On RDMA the standby's `RegionKey` (where bodies
//! are RDMA-written) must follow its `Accept`, and nothing else may. Established, it numbers
//! epochs, keeps each in flight until a (cumulative) ack covers it, and hands back whatever was
//! in flight when the connection is lost, so the caller can put the dirty pages back. Its
//! timers (heartbeat due, standby silent) are values: [`PrimaryCore::poll_timeout`].
//!
//! When the primary checkpoints ([`Scheduler`], in `schedule.rs`): epoch deadline, dirty
//! limit, full-sync rounds, waiting for a free slot, draining the last acks, with its own
//! [`Scheduler::poll_timeout`].
//!
//! Standby ([`StandbyCore`], in `standby.rs`): `AwaitHello -> AwaitAuth -> Idle ->
//! ReceivingBody -> AwaitCommit -> Applying -> Idle`. It accepts epochs only in order, an epoch
//! body (streamed, or on RDMA placed in a slot and announced by `BodyPlaced`, only after the
//! `RegionKey` went out, and only in one of its slots) only right after its header and with
//! exactly the announced length, and orders an apply only after the commit arrived and the
//! checksum of the received body matched it. Anything else is an error that ends the
//! connection; the backup is untouched by an epoch that did not complete.

use std::time::{Duration, Instant};

use rmc_transport::wire::{Message, MsgType, WireError, NONCE_LEN, PROTOCOL_VERSION};

/// Epoch numbers stay below this (the primary refuses a standby that says it applied more).
pub const MAX_EPOCH: u64 = 1 << 63;

/// Heartbeat settings shared by both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// How often to send a heartbeat when nothing else was sent.
    pub interval: Duration,
    /// Silence after which the peer is declared dead.
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        // A loaded 2-core machine delayed a sleeping thread's wake-up by up to ~40 ms (and a
        // heavier load once stalled a peer for 463 ms): 1 s of silence is a lost peer, a busy
        // one is not. A peer that dies closes its connection and is seen at once anyway.
        Heartbeat {
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
        }
    }
}

/// A protocol violation or failure; the connection ends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The peer speaks another protocol version.
    #[error("Peer speaks protocol version {found}; this build speaks version {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        found: u16,
    },
    /// A proof did not verify.
    #[error("Authentication failed: the {peer} does not hold the same secret")]
    AuthFailed {
        /// Which side failed to prove itself.
        peer: &'static str,
    },
    /// The peer refused the connection.
    #[error("The {peer} refused the connection: {reason}")]
    Refused {
        /// Which peer.
        peer: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The layouts of the two sides do not match.
    #[error("Memory layout mismatch: {0}")]
    LayoutMismatch(String),
    /// The primary's vCPU/device state encoding is not one this standby can restore.
    #[error(
        "The primary's VM state encoding is version {found}; this standby restores version \
         {supported} only (run the same rmc version on both hosts)"
    )]
    StateVersion {
        /// The primary's.
        found: u32,
        /// This standby's.
        supported: u32,
    },
    /// The layout needs more memory than this host may give it.
    #[error(
        "The primary's guest needs {need} MiB here (backup and staging slots), more than this \
         host's {limit} MiB"
    )]
    TooLarge {
        /// MiB the backup and the slots need.
        need: u64,
        /// MiB this host has.
        limit: u64,
    },
    /// A message that is wrong for the current state.
    #[error("Unexpected {got:?} message while {state}")]
    Unexpected {
        /// Type received.
        got: MsgType,
        /// What the receiver was doing.
        state: &'static str,
    },
    /// An ack for an epoch that was never sent.
    #[error("Ack for epoch {epoch}, but the newest epoch sent is {newest}")]
    AckForUnknownEpoch {
        /// Acked epoch.
        epoch: u64,
        /// Newest epoch sent.
        newest: u64,
    },
    /// An epoch out of sequence.
    #[error("Epoch {got} is out of order: expected epoch {expected}")]
    EpochOutOfOrder {
        /// Epoch received.
        got: u64,
        /// Epoch expected.
        expected: u64,
    },
    /// A commit before the epoch's data was received.
    #[error("Commit for epoch {epoch} arrived before that epoch's data")]
    CommitBeforeData {
        /// The epoch.
        epoch: u64,
    },
    /// A commit naming another epoch than the one received.
    #[error("Commit for epoch {commit} while epoch {current} was received")]
    CommitMismatch {
        /// Epoch in the commit.
        commit: u64,
        /// Epoch received.
        current: u64,
    },
    /// The received body does not hash to the committed checksum.
    #[error("Checksum mismatch in epoch {epoch}: the commit says {expected:#018x}, the data hashes to {actual:#018x}")]
    Checksum {
        /// The epoch.
        epoch: u64,
        /// From the commit.
        expected: u64,
        /// Computed over the body.
        actual: u64,
    },
    /// An epoch body that was not announced.
    #[error("Epoch body received without an epoch header")]
    BodyWithoutHeader,
    /// An epoch body of the wrong length.
    #[error("Epoch {epoch} body is {got} bytes, but its header announced {expected}")]
    BodyLength {
        /// The epoch.
        epoch: u64,
        /// Length received.
        got: u64,
        /// Length announced.
        expected: u64,
    },
    /// A bad field in a message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer did not complete the handshake in time.
    #[error("The {peer} did not complete the handshake within {limit:?}")]
    HandshakeTimeout {
        /// Which peer.
        peer: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// Epochs sent at the end of protection were not all acknowledged in time.
    #[error("The standby did not acknowledge the last {epochs} epochs within {within:?}")]
    AcksOverdue {
        /// Epochs still unacknowledged.
        epochs: usize,
        /// How long the primary waited.
        within: Duration,
    },
    /// An RDMA placement notice on a connection that does not place bodies.
    #[error("Invalid RDMA placement: BodyPlaced on a TCP connection")]
    PlacedOverTcp,
    /// An RDMA placement notice naming a slot the standby does not have.
    #[error("Invalid RDMA placement: epoch {epoch} placed in slot {slot} of {count}")]
    PlacedOutside {
        /// The epoch.
        epoch: u64,
        /// The slot named.
        slot: u32,
        /// The standby's slots.
        count: u32,
    },
    /// Nothing heard from the peer for too long.
    #[error("Nothing heard from the {peer} for {silent:?} (heartbeat timeout {timeout:?})")]
    PeerSilent {
        /// Which peer.
        peer: &'static str,
        /// How long.
        silent: Duration,
        /// The limit.
        timeout: Duration,
    },
}

/// The `Refuse` to send the peer before closing on `e` (none when the peer refused first, or
/// when it is only late: a handshake or acknowledgements that did not come in time end the
/// connection without blaming the peer).
pub fn refusal(e: &ProtocolError) -> Option<Message> {
    match e {
        ProtocolError::Refused { .. }
        | ProtocolError::HandshakeTimeout { .. }
        | ProtocolError::AcksOverdue { .. } => None,
        e => Some(Message::Refuse {
            reason: e.to_string(),
        }),
    }
}

/// The type of a message.
pub fn msg_type(m: &Message) -> MsgType {
    match m {
        Message::Hello { .. } => MsgType::Hello,
        Message::Challenge { .. } => MsgType::Challenge,
        Message::Auth { .. } => MsgType::Auth,
        Message::Accept { .. } => MsgType::Accept,
        Message::Refuse { .. } => MsgType::Refuse,
        Message::EpochHeader(_) => MsgType::EpochHeader,
        Message::Commit { .. } => MsgType::Commit,
        Message::Ack { .. } => MsgType::Ack,
        Message::Heartbeat { .. } => MsgType::Heartbeat,
        Message::Goodbye { .. } => MsgType::Goodbye,
        Message::RegionKey(_) => MsgType::RegionKey,
        Message::BodyPlaced { .. } => MsgType::BodyPlaced,
    }
}

#[derive(Debug)]
pub(crate) struct Liveness {
    pub(crate) hb: Heartbeat,
    pub(crate) last_heard: Instant,
    pub(crate) last_sent: Instant,
    pub(crate) seq: u64,
}

impl Liveness {
    pub(crate) fn new(hb: Heartbeat, now: Instant) -> Self {
        Liveness {
            hb,
            last_heard: now,
            last_sent: now,
            seq: 0,
        }
    }

    /// The next instant [`Liveness::tick`] has something to do: a heartbeat to send, or the
    /// first instant at which the silence exceeds the timeout.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let heartbeat = self.last_sent + self.hb.interval;
        let silence = self.last_heard + self.hb.timeout + Duration::from_nanos(1);
        heartbeat.min(silence)
    }

    pub(crate) fn tick(
        &mut self,
        now: Instant,
        peer: &'static str,
    ) -> Result<Option<Message>, ProtocolError> {
        let silent = now.saturating_duration_since(self.last_heard);
        if silent > self.hb.timeout {
            return Err(ProtocolError::PeerSilent {
                peer,
                silent,
                timeout: self.hb.timeout,
            });
        }
        if now.saturating_duration_since(self.last_sent) >= self.hb.interval {
            self.last_sent = now;
            self.seq += 1;
            return Ok(Some(Message::Heartbeat { seq: self.seq }));
        }
        Ok(None)
    }
}

/// A session token (a Hello nonce) as lowercase hex, as the arbiter stores it.
pub fn session_hex(token: &[u8; NONCE_LEN]) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a primary's earlier session with a standby ended: the standby that holds a
/// checkpoint of that session, at an epoch between `acked` and `sent`, can resume from it.
/// Every page written after `acked` is still in the guest's dirty log (the dirty sets of
/// unacknowledged epochs are put back when a session fails), so sending the log's pages
/// brings that standby up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    /// The session's token (its Hello nonce).
    pub lineage: [u8; NONCE_LEN],
    /// The last epoch the standby acknowledged in it.
    pub acked: u64,
    /// The last epoch sent in it.
    pub sent: u64,
}

impl ResumePoint {
    /// Whether a standby whose Accept says `last_applied`, `lineage` can resume from here.
    pub fn allows(&self, last_applied: u64, lineage: &[u8; NONCE_LEN]) -> bool {
        *lineage != [0; NONCE_LEN]
            && *lineage == self.lineage
            && self.acked <= last_applied
            && last_applied <= self.sent
    }
}

mod primary;
mod schedule;
mod standby;

pub use primary::*;
pub use schedule::*;
pub use standby::*;

#[cfg(test)]
mod tests {
    use super::*;
    use rmc_guest_api::PAGE_BYTES;
    use rmc_transport::wire::{auth, EpochHeader, EpochKind, Layout, RegionKey};

    const SECRET: &[u8] = b"correct horse battery staple";

    fn layout() -> Layout {
        Layout {
            page_size: PAGE_BYTES as u32,
            regions: vec![(0, 64 << 20)],
            vcpus: 2,
            slot_pages: 1024,
            slot_count: 2,
            features: 0,
            state_version: 1,
        }
    }

    /// Runs the handshake between a primary and a standby core; returns both established.
    fn pair(now: Instant) -> (PrimaryCore<u32>, StandbyCore) {
        established_primary(Heartbeat::default(), now)
    }

    /// [`pair`] with these heartbeat settings.
    pub(crate) fn established_primary(
        hb: Heartbeat,
        now: Instant,
    ) -> (PrimaryCore<u32>, StandbyCore) {
        let (mut p, hello) = PrimaryCore::new(SECRET, layout(), [1; 32], hb, now);
        p.set_fence(0x5eed);
        let mut s = StandbyCore::new(SECRET, LayoutRule::default(), 0, hb, now);
        let StandbyAction::Send(challenge) = s.on_message(hello, [2; 32], now).unwrap() else {
            panic!("standby must answer a hello with a challenge")
        };
        let PrimaryAction::Send(auth) = p.on_message(challenge, now).unwrap() else {
            panic!("primary must answer a valid challenge with auth")
        };
        let StandbyAction::Established {
            accept,
            layout: l,
            fence,
            session,
        } = s.on_message(auth, [0; 32], now).unwrap()
        else {
            panic!("standby must accept")
        };
        assert_eq!(l, layout());
        // The fencing token and the session token reach the standby as the primary has them.
        assert_eq!(fence, 0x5eed);
        assert_eq!(session, p.session());
        assert!(matches!(
            p.on_message(accept, now).unwrap(),
            PrimaryAction::Established {
                last_applied: 0,
                resume: false,
                region_key: None,
            }
        ));
        (p, s)
    }

    fn acked(a: PrimaryAction<u32>) -> Vec<u64> {
        match a {
            PrimaryAction::Acked(v) => v.into_iter().map(|f| f.epoch).collect(),
            other => panic!("expected Acked, got {other:?}"),
        }
    }

    #[test]
    fn ack_lost_is_covered_by_the_next_ack() {
        let now = Instant::now();
        let (mut p, _) = pair(now);
        for i in 0..3 {
            p.begin_epoch(EpochKind::Checkpoint, 1, 1, i, now);
        }
        // Ack 1 is lost; ack 2 releases epochs 1 and 2.
        assert_eq!(
            acked(p.on_message(Message::Ack { epoch: 2 }, now).unwrap()),
            vec![1, 2]
        );
        assert_eq!(p.in_flight(), 1);
        assert_eq!(p.last_acked(), 2);
    }

    #[test]
    fn duplicate_ack_releases_nothing() {
        let now = Instant::now();
        let (mut p, _) = pair(now);
        p.begin_epoch(EpochKind::Checkpoint, 1, 1, 7, now);
        p.begin_epoch(EpochKind::Checkpoint, 1, 1, 8, now);
        assert_eq!(
            acked(p.on_message(Message::Ack { epoch: 1 }, now).unwrap()),
            vec![1]
        );
        assert_eq!(
            acked(p.on_message(Message::Ack { epoch: 1 }, now).unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(p.in_flight(), 1);
    }

    #[test]
    fn ack_for_unknown_epoch_is_an_error() {
        let now = Instant::now();
        let (mut p, _) = pair(now);
        p.begin_epoch(EpochKind::Checkpoint, 1, 1, 0, now);
        let err = p.on_message(Message::Ack { epoch: 9 }, now).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::AckForUnknownEpoch {
                epoch: 9,
                newest: 1
            }
        );
        assert!(err.to_string().contains("epoch 9"));
    }

    #[test]
    fn abandon_returns_unacked_epochs_for_put_back() {
        let now = Instant::now();
        let (mut p, _) = pair(now);
        for i in 0..3 {
            p.begin_epoch(EpochKind::Checkpoint, 1, 1, i * 10, now);
        }
        p.on_message(Message::Ack { epoch: 1 }, now).unwrap();
        let left: Vec<u32> = p.abandon().into_iter().map(|f| f.payload).collect();
        assert_eq!(left, vec![10, 20]);
    }

    fn header(epoch: u64) -> EpochHeader {
        EpochHeader {
            epoch,
            kind: EpochKind::Checkpoint,
            page_count: 2,
            state_len: 100,
        }
    }

    #[test]
    fn standby_applies_only_after_commit_with_matching_checksum() {
        let now = Instant::now();
        let (_, mut s) = pair(now);
        let a = s
            .on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        assert_eq!(
            a,
            StandbyAction::ExpectBody {
                header: header(1),
                len: BODY_LEN
            }
        );
        assert_eq!(s.on_body_frame(BODY_LEN).unwrap(), header(1));
        s.body_received(0xabc, now).unwrap();
        let a = s
            .on_message(
                Message::Commit {
                    epoch: 1,
                    checksum: 0xabc,
                },
                [0; 32],
                now,
            )
            .unwrap();
        assert_eq!(a, StandbyAction::Apply(header(1)));
        assert_eq!(s.applied(), Message::Ack { epoch: 1 });
        assert_eq!(s.last_applied(), 1);
    }

    #[test]
    fn commit_before_data_is_an_error() {
        let now = Instant::now();
        let (_, mut s) = pair(now);
        let err = s
            .on_message(
                Message::Commit {
                    epoch: 1,
                    checksum: 0,
                },
                [0; 32],
                now,
            )
            .unwrap_err();
        assert_eq!(err, ProtocolError::CommitBeforeData { epoch: 1 });
        let (_, mut s) = pair(now);
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        let err = s
            .on_message(
                Message::Commit {
                    epoch: 1,
                    checksum: 0,
                },
                [0; 32],
                now,
            )
            .unwrap_err();
        assert_eq!(err, ProtocolError::CommitBeforeData { epoch: 1 });
    }

    #[test]
    fn corrupt_body_is_never_applied() {
        let now = Instant::now();
        let (_, mut s) = pair(now);
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        s.body_received(0x1111, now).unwrap();
        let err = s
            .on_message(
                Message::Commit {
                    epoch: 1,
                    checksum: 0x2222,
                },
                [0; 32],
                now,
            )
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Checksum { epoch: 1, .. }));
        assert_eq!(s.last_applied(), 0);
    }

    #[test]
    fn standby_refuses_out_of_order_epochs_and_wrong_bodies() {
        let now = Instant::now();
        let (_, mut s) = pair(now);
        let err = s
            .on_message(Message::EpochHeader(header(2)), [0; 32], now)
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError::EpochOutOfOrder {
                got: 2,
                expected: 1
            }
        );
        let (_, mut s) = pair(now);
        assert_eq!(
            s.on_body_frame(10).unwrap_err(),
            ProtocolError::BodyWithoutHeader
        );
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        assert!(matches!(
            s.on_body_frame(10).unwrap_err(),
            ProtocolError::BodyLength { got: 10, .. }
        ));
    }

    #[test]
    fn heartbeat_timeout_declares_the_peer_dead() {
        let t0 = Instant::now();
        let (mut p, mut s) = pair(t0);
        let hb = Heartbeat::default();
        // Heartbeats are sent at the interval...
        assert_eq!(
            p.tick(t0 + hb.interval).unwrap(),
            Some(Message::Heartbeat { seq: 1 })
        );
        assert_eq!(p.tick(t0 + hb.interval).unwrap(), None);
        // ...hearing from the peer keeps it alive...
        p.on_message(Message::Heartbeat { seq: 1 }, t0 + hb.timeout)
            .unwrap();
        assert!(p.tick(t0 + hb.timeout + hb.interval).is_ok());
        // ...and silence past the timeout kills it, on both sides.
        let err = p
            .tick(t0 + hb.timeout * 2 + Duration::from_millis(1))
            .unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::PeerSilent {
                peer: "standby",
                ..
            }
        ));
        let err = s
            .tick(t0 + hb.timeout + Duration::from_millis(1))
            .unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::PeerSilent {
                peer: "primary",
                ..
            }
        ));
    }

    #[test]
    fn wrong_secret_fails_on_both_sides() {
        let now = Instant::now();
        // The primary detects a standby with another secret.
        let (mut p, hello) =
            PrimaryCore::<u32>::new(SECRET, layout(), [1; 32], Heartbeat::default(), now);
        let mut s = StandbyCore::new(
            b"other",
            LayoutRule::default(),
            0,
            Heartbeat::default(),
            now,
        );
        let StandbyAction::Send(challenge) = s.on_message(hello.clone(), [2; 32], now).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            p.on_message(challenge, now).unwrap_err(),
            ProtocolError::AuthFailed { peer: "standby" }
        );
        // The standby detects a primary that answers without the secret (here: one that
        // replays a proof computed for other nonces).
        let mut s = StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
        s.on_message(hello, [2; 32], now).unwrap();
        let forged = Message::Auth {
            proof: auth::primary_proof(SECRET, &[9; 32], &[1; 32]),
            layout: layout(),
            fence: 0,
        };
        assert_eq!(
            s.on_message(forged, [0; 32], now).unwrap_err(),
            ProtocolError::AuthFailed { peer: "primary" }
        );
    }

    #[test]
    fn wrong_version_and_layout_mismatch_are_refused() {
        let now = Instant::now();
        let mut s = StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
        let err = s
            .on_message(
                Message::Hello {
                    version: 99,
                    nonce: [1; 32],
                },
                [2; 32],
                now,
            )
            .unwrap_err();
        assert_eq!(err, ProtocolError::Version { found: 99 });
        assert!(err.to_string().contains("version 99"));

        let refused = |rule: LayoutRule| {
            let (mut p, hello) =
                PrimaryCore::<u32>::new(SECRET, layout(), [1; 32], Heartbeat::default(), now);
            let mut s = StandbyCore::new(SECRET, rule, 0, Heartbeat::default(), now);
            let StandbyAction::Send(c) = s.on_message(hello, [2; 32], now).unwrap() else {
                panic!()
            };
            let PrimaryAction::Send(a) = p.on_message(c, now).unwrap() else {
                panic!()
            };
            s.on_message(a, [0; 32], now).unwrap_err()
        };
        let err = refused(LayoutRule {
            memory_bytes: Some(128 << 20),
            ..LayoutRule::default()
        });
        assert!(matches!(err, ProtocolError::LayoutMismatch(_)));
        assert!(
            err.to_string().contains("64 MiB") && err.to_string().contains("128 MiB"),
            "{err}"
        );
        // A state encoding this standby cannot restore.
        let err = refused(LayoutRule {
            state_version: Some(7),
            ..LayoutRule::default()
        });
        assert_eq!(
            err,
            ProtocolError::StateVersion {
                found: 1,
                supported: 7
            }
        );
        // More memory than the host has (the backup plus the staging slots count).
        let need = LayoutRule::footprint(&layout());
        assert!(need > 64 << 20);
        let err = refused(LayoutRule {
            host_bytes: Some(64 << 20),
            ..LayoutRule::default()
        });
        assert_eq!(
            err,
            ProtocolError::TooLarge {
                need: need >> 20,
                limit: 64
            }
        );
        assert!(LayoutRule {
            host_bytes: Some(need),
            ..LayoutRule::default()
        }
        .accepts(&layout())
        .is_ok());
    }

    /// A primary resumes a standby only from a checkpoint of its own previous session, at an
    /// epoch whose later pages it still has in its dirty log (between what was acked and
    /// what was sent); anything else is a full sync.
    #[test]
    fn resume_only_from_this_primarys_own_checkpoint() {
        let now = Instant::now();
        let point = ResumePoint {
            lineage: [7; 32],
            acked: 40,
            sent: 44,
        };
        let accept = |point: Option<ResumePoint>, last_applied: u64, lineage: [u8; 32]| {
            let (mut p, hello) =
                PrimaryCore::<u32>::new(SECRET, layout(), [1; 32], Heartbeat::default(), now);
            p.set_resume_point(point);
            let mut s =
                StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
            let StandbyAction::Send(c) = s.on_message(hello, [2; 32], now).unwrap() else {
                panic!()
            };
            let PrimaryAction::Send(_) = p.on_message(c, now).unwrap() else {
                panic!()
            };
            let accept = Message::Accept {
                last_applied,
                lineage,
            };
            match p.on_message(accept, now).unwrap() {
                PrimaryAction::Established {
                    last_applied: l,
                    resume,
                    region_key: None,
                } => {
                    assert_eq!(l, last_applied);
                    // Epochs go on after the standby's, resumed or not.
                    assert_eq!(p.next_epoch(), last_applied + 1);
                    resume
                }
                other => panic!("{other:?}"),
            }
        };
        for last in [40, 42, 44] {
            assert!(accept(Some(point), last, [7; 32]), "epoch {last}");
        }
        // Acked pages are gone from the log; epochs never sent cannot be on the standby.
        assert!(!accept(Some(point), 39, [7; 32]));
        assert!(!accept(Some(point), 45, [7; 32]));
        // Another session's checkpoint (another primary, or a backup of another VM), none at
        // all, or no earlier session here.
        assert!(!accept(Some(point), 42, [8; 32]));
        assert!(!accept(Some(point), 42, [0; 32]));
        assert!(!accept(None, 42, [7; 32]));
        let zero = ResumePoint {
            lineage: [0; 32],
            ..point
        };
        assert!(!accept(Some(zero), 42, [0; 32]));
    }

    #[test]
    fn an_accept_near_the_end_of_epoch_numbers_is_refused() {
        let now = Instant::now();
        for last in [u64::MAX, u64::MAX - 1, MAX_EPOCH] {
            let (mut p, hello) =
                PrimaryCore::<u32>::new(SECRET, layout(), [1; 32], Heartbeat::default(), now);
            let mut s =
                StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
            let StandbyAction::Send(c) = s.on_message(hello, [2; 32], now).unwrap() else {
                panic!()
            };
            let PrimaryAction::Send(_) = p.on_message(c, now).unwrap() else {
                panic!()
            };
            let err = p
                .on_message(
                    Message::Accept {
                        last_applied: last,
                        lineage: [0; 32],
                    },
                    now,
                )
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    ProtocolError::Wire(WireError::Field {
                        field: "accepted epoch",
                        ..
                    })
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn messages_out_of_place_are_refused() {
        let now = Instant::now();
        let mut s = StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
        let err = s
            .on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::Unexpected {
                got: MsgType::EpochHeader,
                ..
            }
        ));
        let (mut p, _) = pair(now);
        let err = p
            .on_message(Message::EpochHeader(header(1)), now)
            .unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::Unexpected {
                got: MsgType::EpochHeader,
                ..
            }
        ));
        let err = p
            .on_message(
                Message::Refuse {
                    reason: "busy".into(),
                },
                now,
            )
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError::Refused {
                peer: "standby",
                reason: "busy".into()
            }
        );
    }

    fn key() -> RegionKey {
        RegionKey {
            addr: 0x7f00_0000_0000,
            len: 2 << 20,
            slot_stride: 1 << 20,
            rkey: 42,
        }
    }

    /// Runs the handshake of an RDMA connection up to the standby's Accept: the primary
    /// expects the RegionKey next.
    fn rdma_pair(now: Instant) -> (PrimaryCore<u32>, StandbyCore, Message) {
        let (mut p, hello) = PrimaryCore::new(SECRET, layout(), [1; 32], Heartbeat::default(), now);
        p.set_placement(true);
        let mut s = StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
        let StandbyAction::Send(challenge) = s.on_message(hello, [2; 32], now).unwrap() else {
            panic!()
        };
        let PrimaryAction::Send(auth) = p.on_message(challenge, now).unwrap() else {
            panic!()
        };
        let StandbyAction::Established { .. } = s.on_message(auth, [0; 32], now).unwrap() else {
            panic!()
        };
        let accept = s.accept_from(0, [0; 32]);
        // Accepted, but no epoch may go out before the standby said where bodies go.
        assert!(matches!(
            p.on_message(accept, now).unwrap(),
            PrimaryAction::None
        ));
        assert!(!p.established());
        let region_key = s.region_key(key());
        (p, s, region_key)
    }

    #[test]
    fn rdma_primary_is_established_by_the_region_key_after_the_accept() {
        let now = Instant::now();
        let (mut p, _, region_key) = rdma_pair(now);
        assert_eq!(region_key, Message::RegionKey(key()));
        assert!(matches!(
            p.on_message(region_key, now).unwrap(),
            PrimaryAction::Established {
                last_applied: 0,
                resume: false,
                region_key: Some(k),
            } if k == key()
        ));
        assert!(p.established());
        assert_eq!(p.next_epoch(), 1);
        // A second key is out of place.
        let err = p.on_message(Message::RegionKey(key()), now).unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::Unexpected {
                got: MsgType::RegionKey,
                state: "protecting"
            }
        ));
    }

    #[test]
    fn rdma_primary_refuses_anything_but_the_region_key_after_the_accept() {
        let now = Instant::now();
        for m in [
            Message::Heartbeat { seq: 1 },
            Message::Ack { epoch: 0 },
            Message::Accept {
                last_applied: 0,
                lineage: [0; 32],
            },
        ] {
            let (mut p, _, _) = rdma_pair(now);
            let ty = msg_type(&m);
            let err = p.on_message(m, now).unwrap_err();
            assert_eq!(
                err,
                ProtocolError::Unexpected {
                    got: ty,
                    state: "waiting for the standby's RDMA region key"
                }
            );
            assert!(!p.established());
        }
        let (mut p, _, _) = rdma_pair(now);
        let err = p
            .on_message(
                Message::Refuse {
                    reason: "no".into(),
                },
                now,
            )
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Refused { .. }));
        // Over TCP a region key is never expected.
        let (mut p, _) = pair(now);
        let err = p.on_message(Message::RegionKey(key()), now).unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::Unexpected {
                got: MsgType::RegionKey,
                ..
            }
        ));
    }

    fn placed(slot: u32, len: u64) -> Message {
        Message::BodyPlaced { slot, len }
    }

    const BODY_LEN: u64 = 2 * 8 + 2 * PAGE_BYTES as u64 + 100;

    #[test]
    fn standby_takes_a_placed_body_of_the_epoch_in_progress() {
        let now = Instant::now();
        let (_, mut s, _) = rdma_pair(now);
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        assert_eq!(
            s.on_message(placed(1, BODY_LEN), [0; 32], now).unwrap(),
            StandbyAction::BodyPlaced {
                header: header(1),
                slot: 1
            }
        );
        // Checked like a streamed body, then committed and applied.
        s.body_received(0xabc, now).unwrap();
        let a = s
            .on_message(
                Message::Commit {
                    epoch: 1,
                    checksum: 0xabc,
                },
                [0; 32],
                now,
            )
            .unwrap();
        assert_eq!(a, StandbyAction::Apply(header(1)));
        assert_eq!(s.applied(), Message::Ack { epoch: 1 });
    }

    #[test]
    fn standby_refuses_placements_that_do_not_fit() {
        let now = Instant::now();
        // Over TCP: no placement at all.
        let (_, mut s) = pair(now);
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        assert_eq!(
            s.on_message(placed(0, BODY_LEN), [0; 32], now).unwrap_err(),
            ProtocolError::PlacedOverTcp
        );
        // Without a header.
        let (_, mut s, _) = rdma_pair(now);
        assert_eq!(
            s.on_message(placed(0, BODY_LEN), [0; 32], now).unwrap_err(),
            ProtocolError::BodyWithoutHeader
        );
        // Of another length than announced.
        let (_, mut s, _) = rdma_pair(now);
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        assert_eq!(
            s.on_message(placed(0, BODY_LEN + 1), [0; 32], now)
                .unwrap_err(),
            ProtocolError::BodyLength {
                epoch: 1,
                got: BODY_LEN + 1,
                expected: BODY_LEN
            }
        );
        // In a slot the standby does not have.
        let (_, mut s, _) = rdma_pair(now);
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        let err = s.on_message(placed(2, BODY_LEN), [0; 32], now).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::PlacedOutside {
                epoch: 1,
                slot: 2,
                count: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "Invalid RDMA placement: epoch 1 placed in slot 2 of 2"
        );
        // A second placement of the same body (it is already there).
        let (_, mut s, _) = rdma_pair(now);
        s.on_message(Message::EpochHeader(header(1)), [0; 32], now)
            .unwrap();
        s.on_message(placed(0, BODY_LEN), [0; 32], now).unwrap();
        s.body_received(1, now).unwrap();
        assert_eq!(
            s.on_message(placed(0, BODY_LEN), [0; 32], now).unwrap_err(),
            ProtocolError::BodyWithoutHeader
        );
        // Before the handshake it is just out of place.
        let mut s = StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
        assert!(matches!(
            s.on_message(placed(0, BODY_LEN), [0; 32], now).unwrap_err(),
            ProtocolError::Unexpected {
                got: MsgType::BodyPlaced,
                ..
            }
        ));
    }
}
