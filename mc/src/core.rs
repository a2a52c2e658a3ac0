//! Sans-I/O protocol cores of the primary and the standby.
//!
//! Each core is a state machine fed with decoded messages, the progress of its own side
//! (an epoch was staged, a body arrived, an epoch was applied) and the current time as a value.
//! It answers with what to send and what to do; it never touches a socket or a clock, so each
//! failure case (ack lost, duplicate ack, ack for an unknown epoch, commit before data, a silent
//! peer, a wrong secret, a wrong version, a layout mismatch) is a plain unit test below. The
//! message sequence and the states are drawn in `rmc_transport::wire`.
//!
//! Primary: `AwaitChallenge -> AwaitAccept -> Established`. Established, it numbers epochs,
//! keeps each in flight until a (cumulative) ack covers it, and hands back whatever was in
//! flight when the connection is lost, so the caller can put the dirty pages back.
//!
//! Standby: `AwaitHello -> AwaitAuth -> Idle -> ReceivingBody -> AwaitCommit -> Applying ->
//! Idle`. It accepts epochs only in order, an epoch body only right after its header and with
//! exactly the announced length, and orders an apply only after the commit arrived and the
//! checksum of the received body matched it. Anything else is an error that ends the
//! connection; the backup is untouched by an epoch that did not complete.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rmc_transport::wire::{
    auth, EpochHeader, EpochKind, Layout, Message, MsgType, WireError, MAX_STATE_LEN, NONCE_LEN,
    PROTOCOL_VERSION,
};

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

/// The `Refuse` to send the peer before closing on `e` (none when the peer refused first).
pub fn refusal(e: &ProtocolError) -> Option<Message> {
    match e {
        ProtocolError::Refused { .. } => None,
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
struct Liveness {
    hb: Heartbeat,
    last_heard: Instant,
    last_sent: Instant,
    seq: u64,
}

impl Liveness {
    fn new(hb: Heartbeat, now: Instant) -> Self {
        Liveness {
            hb,
            last_heard: now,
            last_sent: now,
            seq: 0,
        }
    }

    fn tick(&mut self, now: Instant, peer: &'static str) -> Result<Option<Message>, ProtocolError> {
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

/// An epoch sent and not yet acknowledged, with what the caller attached to it.
#[derive(Debug)]
pub struct InFlight<T> {
    /// Epoch number.
    pub epoch: u64,
    /// Kind.
    pub kind: EpochKind,
    /// When it was handed to the transport.
    pub sent_at: Instant,
    /// The caller's data (e.g. the staging slot and the dirty set).
    pub payload: T,
}

/// What the primary core asks for after a message.
#[derive(Debug)]
pub enum PrimaryAction<T> {
    /// Nothing to do.
    None,
    /// Send this message.
    Send(Message),
    /// The standby accepted: protection can start. Its last applied epoch (from an earlier
    /// connection) is given; new epochs are numbered after it.
    Established {
        /// The standby's last applied epoch.
        last_applied: u64,
        /// The standby holds a checkpoint of this primary's earlier session (see
        /// [`PrimaryCore::set_resume_point`]): send only the pages dirtied since, no full sync.
        resume: bool,
    },
    /// These epochs are now applied on the standby (oldest first); free their resources.
    Acked(Vec<InFlight<T>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrimaryPhase {
    AwaitChallenge,
    AwaitAccept,
    Established,
}

/// The primary's protocol state.
#[derive(Debug)]
pub struct PrimaryCore<T> {
    secret: Vec<u8>,
    layout: Layout,
    hello_nonce: [u8; NONCE_LEN],
    fence: u64,
    resume_point: Option<ResumePoint>,
    phase: PrimaryPhase,
    next_epoch: u64,
    last_acked: u64,
    in_flight: VecDeque<InFlight<T>>,
    live: Liveness,
}

impl<T> PrimaryCore<T> {
    /// A core that proposes `layout`; returns it with the Hello to send first.
    pub fn new(
        secret: &[u8],
        layout: Layout,
        hello_nonce: [u8; NONCE_LEN],
        hb: Heartbeat,
        now: Instant,
    ) -> (Self, Message) {
        let core = PrimaryCore {
            secret: secret.to_vec(),
            layout,
            hello_nonce,
            fence: 0,
            resume_point: None,
            phase: PrimaryPhase::AwaitChallenge,
            next_epoch: 1,
            last_acked: 0,
            in_flight: VecDeque::new(),
            live: Liveness::new(hb, now),
        };
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            nonce: hello_nonce,
        };
        (core, hello)
    }

    /// Sets the fencing token sent in `Auth` (the arbiter's revision of the primary key this
    /// primary holds; 0, the default, without an arbiter). Call before the handshake.
    pub fn set_fence(&mut self, fence: u64) {
        self.fence = fence;
    }

    /// Where this primary's previous session ended, so a standby that still holds its
    /// checkpoint resumes from it. Call before the handshake.
    pub fn set_resume_point(&mut self, point: Option<ResumePoint>) {
        self.resume_point = point;
    }

    /// Where this session stands, for the next session to resume from.
    pub fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            lineage: self.hello_nonce,
            acked: self.last_acked,
            sent: self.next_epoch - 1,
        }
    }

    /// The session token: this primary's Hello nonce, which the standby learns too. The
    /// arbiter records it as the standby whose backup is current.
    pub fn session(&self) -> [u8; NONCE_LEN] {
        self.hello_nonce
    }

    /// Whether the handshake completed.
    pub fn established(&self) -> bool {
        self.phase == PrimaryPhase::Established
    }

    /// Handles a message from the standby.
    pub fn on_message(
        &mut self,
        msg: Message,
        now: Instant,
    ) -> Result<PrimaryAction<T>, ProtocolError> {
        self.live.last_heard = now;
        let got = msg_type(&msg);
        let unexpected = |state| ProtocolError::Unexpected { got, state };
        match (self.phase, msg) {
            (_, Message::Refuse { reason }) => Err(ProtocolError::Refused {
                peer: "standby",
                reason,
            }),
            (PrimaryPhase::AwaitChallenge, Message::Challenge { nonce, proof }) => {
                let expected = auth::standby_proof(&self.secret, &self.hello_nonce, &nonce);
                if !auth::proofs_equal(&expected, &proof) {
                    return Err(ProtocolError::AuthFailed { peer: "standby" });
                }
                self.phase = PrimaryPhase::AwaitAccept;
                Ok(PrimaryAction::Send(Message::Auth {
                    proof: auth::primary_proof(&self.secret, &nonce, &self.hello_nonce),
                    layout: self.layout.clone(),
                    fence: self.fence,
                }))
            }
            (
                PrimaryPhase::AwaitAccept,
                Message::Accept {
                    last_applied,
                    lineage,
                },
            ) => {
                // Epoch numbers count up from the standby's last applied one; one so large
                // that they would overflow (2^63 epochs are millions of years) is hostile.
                if last_applied >= MAX_EPOCH {
                    return Err(ProtocolError::Wire(WireError::Field {
                        field: "accepted epoch",
                        value: format!("{last_applied} (at most {})", MAX_EPOCH - 1),
                    }));
                }
                let resume = self
                    .resume_point
                    .is_some_and(|p| p.allows(last_applied, &lineage));
                self.phase = PrimaryPhase::Established;
                self.next_epoch = last_applied + 1;
                self.last_acked = last_applied;
                Ok(PrimaryAction::Established {
                    last_applied,
                    resume,
                })
            }
            (PrimaryPhase::Established, Message::Ack { epoch }) => self.on_ack(epoch),
            (PrimaryPhase::Established, Message::Heartbeat { .. }) => Ok(PrimaryAction::None),
            (PrimaryPhase::AwaitChallenge, _) => {
                Err(unexpected("waiting for the standby's challenge"))
            }
            (PrimaryPhase::AwaitAccept, _) => Err(unexpected("waiting for the standby to accept")),
            (PrimaryPhase::Established, _) => Err(unexpected("protecting")),
        }
    }

    fn on_ack(&mut self, epoch: u64) -> Result<PrimaryAction<T>, ProtocolError> {
        let newest = self.next_epoch - 1;
        if epoch > newest {
            return Err(ProtocolError::AckForUnknownEpoch { epoch, newest });
        }
        // Acks are cumulative: a lost ack is covered by the next one, and an old or repeated
        // ack releases nothing.
        let mut done = Vec::new();
        while self.in_flight.front().is_some_and(|f| f.epoch <= epoch) {
            done.extend(self.in_flight.pop_front());
        }
        self.last_acked = self.last_acked.max(epoch);
        Ok(PrimaryAction::Acked(done))
    }

    /// Registers a new epoch handed to the transport; returns its header.
    ///
    /// # Panics
    /// If the handshake has not completed (a bug in the caller).
    pub fn begin_epoch(
        &mut self,
        kind: EpochKind,
        page_count: u64,
        state_len: u32,
        payload: T,
        now: Instant,
    ) -> EpochHeader {
        assert!(self.established(), "epoch before the handshake completed");
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.in_flight.push_back(InFlight {
            epoch,
            kind,
            sent_at: now,
            payload,
        });
        EpochHeader {
            epoch,
            kind,
            page_count,
            state_len,
        }
    }

    /// Call regularly: returns a heartbeat to send when one is due, or the standby's death.
    pub fn tick(&mut self, now: Instant) -> Result<Option<Message>, ProtocolError> {
        self.live.tick(now, "standby")
    }

    /// Notes that something was sent (a heartbeat is not needed soon).
    pub fn sent(&mut self, now: Instant) {
        self.live.last_sent = now;
    }

    /// Evidence of life from the standby at `t`: it took a whole epoch off the connection.
    pub fn heard(&mut self, t: Instant) {
        self.live.last_heard = self.live.last_heard.max(t);
    }

    /// The connection is gone: everything still in flight, oldest first.
    pub fn abandon(&mut self) -> Vec<InFlight<T>> {
        self.in_flight.drain(..).collect()
    }

    /// The caller's data of an epoch still in flight.
    pub fn payload_mut(&mut self, epoch: u64) -> Option<&mut T> {
        self.in_flight
            .iter_mut()
            .find(|f| f.epoch == epoch)
            .map(|f| &mut f.payload)
    }

    /// Epochs sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Highest acknowledged epoch.
    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }

    /// Number the next epoch will get.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }
}

/// What the standby core asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyAction {
    /// Nothing to do.
    None,
    /// Send this message.
    Send(Message),
    /// The handshake completed with this layout; send the Accept given.
    Established {
        /// The agreed layout.
        layout: Layout,
        /// The primary's fencing token (see [`Message::Auth`]).
        fence: u64,
        /// The session token: the primary's Hello nonce.
        session: [u8; NONCE_LEN],
        /// The Accept to send.
        accept: Message,
    },
    /// The next frame must be this epoch's body, of `len` bytes.
    ExpectBody {
        /// The announced epoch.
        header: EpochHeader,
        /// Body length.
        len: u64,
    },
    /// The epoch is complete and verified: apply it to the backup, then call
    /// [`StandbyCore::applied`].
    Apply(EpochHeader),
    /// The primary ends protection on purpose: close without failing over.
    Goodbye,
}

/// How a standby decides whether a primary's layout is acceptable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayoutRule {
    /// Guest memory size the standby was configured for, if any.
    pub memory_bytes: Option<u64>,
    /// Layout of the backup the standby already holds, if any.
    pub existing: Option<Layout>,
    /// The only state encoding version the standby restores, if it checks.
    pub state_version: Option<u32>,
    /// Most bytes the backup and the staging slots may take on this host, if bounded.
    pub host_bytes: Option<u64>,
}

impl LayoutRule {
    /// Bytes a standby allocates for `l`: the backup of guest memory and the staging slots.
    pub fn footprint(l: &Layout) -> u64 {
        let page = u64::from(l.page_size);
        let slot = u64::from(l.slot_pages) * (8 + page) + u64::from(MAX_STATE_LEN);
        l.total_pages() * page + slot * u64::from(l.slot_count)
    }

    /// Whether a primary with layout `l` is acceptable.
    pub fn accepts(&self, l: &Layout) -> Result<(), ProtocolError> {
        self.check(l)
    }

    fn check(&self, l: &Layout) -> Result<(), ProtocolError> {
        if let Some(supported) = self.state_version {
            if l.state_version != supported {
                return Err(ProtocolError::StateVersion {
                    found: l.state_version,
                    supported,
                });
            }
        }
        if let Some(limit) = self.host_bytes {
            let need = Self::footprint(l);
            if need > limit {
                return Err(ProtocolError::TooLarge {
                    need: need >> 20,
                    limit: limit >> 20,
                });
            }
        }
        self.check_shape(l).map_err(ProtocolError::LayoutMismatch)
    }

    fn check_shape(&self, l: &Layout) -> Result<(), String> {
        let total = l.total_pages() * u64::from(l.page_size);
        if let Some(want) = self.memory_bytes {
            if total != want {
                return Err(format!(
                    "the primary's guest has {} MiB of memory, this standby is configured for {} MiB",
                    total >> 20,
                    want >> 20
                ));
            }
        }
        if let Some(e) = &self.existing {
            if e.regions != l.regions || e.vcpus != l.vcpus || e.page_size != l.page_size {
                return Err(format!(
                    "the standby holds a backup of a guest with regions {:x?} and {} vCPUs; the primary's has {:x?} and {}",
                    e.regions, e.vcpus, l.regions, l.vcpus
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum StandbyPhase {
    AwaitHello,
    AwaitAuth {
        hello_nonce: [u8; NONCE_LEN],
        nonce: [u8; NONCE_LEN],
    },
    Idle,
    ReceivingBody {
        header: EpochHeader,
        len: u64,
    },
    AwaitCommit {
        header: EpochHeader,
        checksum: u64,
    },
    Applying(EpochHeader),
}

impl StandbyPhase {
    fn describe(&self) -> &'static str {
        match self {
            StandbyPhase::AwaitHello => "waiting for the primary's hello",
            StandbyPhase::AwaitAuth { .. } => "waiting for the primary's authentication",
            StandbyPhase::Idle => "waiting for an epoch",
            StandbyPhase::ReceivingBody { .. } => "waiting for an epoch's body",
            StandbyPhase::AwaitCommit { .. } => "waiting for an epoch's commit",
            StandbyPhase::Applying(_) => "applying an epoch",
        }
    }
}

/// The standby's protocol state for one connection.
#[derive(Debug)]
pub struct StandbyCore {
    secret: Vec<u8>,
    rule: LayoutRule,
    phase: StandbyPhase,
    layout: Option<Layout>,
    last_applied: u64,
    live: Liveness,
}

impl StandbyCore {
    /// A core for a new connection; `last_applied` is the last epoch of the backup it holds.
    pub fn new(
        secret: &[u8],
        rule: LayoutRule,
        last_applied: u64,
        hb: Heartbeat,
        now: Instant,
    ) -> Self {
        StandbyCore {
            secret: secret.to_vec(),
            rule,
            phase: StandbyPhase::AwaitHello,
            layout: None,
            last_applied,
            live: Liveness::new(hb, now),
        }
    }

    /// Whether the handshake is still under way.
    pub fn in_handshake(&self) -> bool {
        self.layout.is_none()
    }

    /// The agreed layout, once established.
    pub fn layout(&self) -> Option<&Layout> {
        self.layout.as_ref()
    }

    /// Last epoch applied.
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// The epoch being received or applied, if any.
    pub fn epoch_in_progress(&self) -> Option<u64> {
        match &self.phase {
            StandbyPhase::ReceivingBody { header, .. }
            | StandbyPhase::AwaitCommit { header, .. }
            | StandbyPhase::Applying(header) => Some(header.epoch),
            _ => None,
        }
    }

    /// Handles a control message from the primary. `challenge_nonce` is used if it is a Hello.
    pub fn on_message(
        &mut self,
        msg: Message,
        challenge_nonce: [u8; NONCE_LEN],
        now: Instant,
    ) -> Result<StandbyAction, ProtocolError> {
        self.live.last_heard = now;
        let state = self.phase.describe();
        let unexpected = |m: &Message| ProtocolError::Unexpected {
            got: msg_type(m),
            state,
        };
        match (&self.phase, msg) {
            (_, Message::Refuse { reason }) => Err(ProtocolError::Refused {
                peer: "primary",
                reason,
            }),
            (_, Message::Heartbeat { .. })
                if !matches!(
                    self.phase,
                    StandbyPhase::AwaitHello | StandbyPhase::AwaitAuth { .. }
                ) =>
            {
                Ok(StandbyAction::None)
            }
            (StandbyPhase::AwaitHello, Message::Hello { version, nonce }) => {
                if version != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version { found: version });
                }
                let proof = auth::standby_proof(&self.secret, &nonce, &challenge_nonce);
                self.phase = StandbyPhase::AwaitAuth {
                    hello_nonce: nonce,
                    nonce: challenge_nonce,
                };
                Ok(StandbyAction::Send(Message::Challenge {
                    nonce: challenge_nonce,
                    proof,
                }))
            }
            (
                StandbyPhase::AwaitAuth { hello_nonce, nonce },
                Message::Auth {
                    proof,
                    layout,
                    fence,
                },
            ) => {
                let session = *hello_nonce;
                let expected = auth::primary_proof(&self.secret, nonce, hello_nonce);
                if !auth::proofs_equal(&expected, &proof) {
                    return Err(ProtocolError::AuthFailed { peer: "primary" });
                }
                layout.validate()?;
                self.rule.check(&layout)?;
                self.phase = StandbyPhase::Idle;
                self.layout = Some(layout.clone());
                Ok(StandbyAction::Established {
                    layout,
                    fence,
                    session,
                    accept: Message::Accept {
                        last_applied: self.last_applied,
                        lineage: [0; NONCE_LEN],
                    },
                })
            }
            (StandbyPhase::Idle, Message::Goodbye { .. }) => Ok(StandbyAction::Goodbye),
            (StandbyPhase::Idle, Message::EpochHeader(header)) => {
                let expected = self.last_applied + 1;
                if header.epoch != expected {
                    return Err(ProtocolError::EpochOutOfOrder {
                        got: header.epoch,
                        expected,
                    });
                }
                let layout = self.layout.as_ref().expect("Idle implies a layout");
                let len = header.body_len(layout)?;
                self.phase = StandbyPhase::ReceivingBody { header, len };
                Ok(StandbyAction::ExpectBody { header, len })
            }
            (
                StandbyPhase::Idle | StandbyPhase::ReceivingBody { .. },
                Message::Commit { epoch, .. },
            ) => Err(ProtocolError::CommitBeforeData { epoch }),
            (
                StandbyPhase::AwaitCommit { header, checksum },
                Message::Commit {
                    epoch,
                    checksum: expected,
                },
            ) => {
                if epoch != header.epoch {
                    return Err(ProtocolError::CommitMismatch {
                        commit: epoch,
                        current: header.epoch,
                    });
                }
                if expected != *checksum {
                    return Err(ProtocolError::Checksum {
                        epoch,
                        expected,
                        actual: *checksum,
                    });
                }
                let header = *header;
                self.phase = StandbyPhase::Applying(header);
                Ok(StandbyAction::Apply(header))
            }
            (_, m) => Err(unexpected(&m)),
        }
    }

    /// A body frame of `len` bytes is next: checks it is the one announced.
    pub fn on_body_frame(&self, len: u64) -> Result<EpochHeader, ProtocolError> {
        match &self.phase {
            StandbyPhase::ReceivingBody {
                header,
                len: expected,
            } => {
                if len != *expected {
                    return Err(ProtocolError::BodyLength {
                        epoch: header.epoch,
                        got: len,
                        expected: *expected,
                    });
                }
                Ok(*header)
            }
            _ => Err(ProtocolError::BodyWithoutHeader),
        }
    }

    /// The body was read whole and its index validated; `checksum` is what it hashes to.
    pub fn body_received(&mut self, checksum: u64, now: Instant) -> Result<(), ProtocolError> {
        self.live.last_heard = now;
        match self.phase {
            StandbyPhase::ReceivingBody { header, .. } => {
                self.phase = StandbyPhase::AwaitCommit { header, checksum };
                Ok(())
            }
            _ => Err(ProtocolError::BodyWithoutHeader),
        }
    }

    /// The Accept that starts epochs after `last_applied`, the backup's last applied epoch
    /// when the session starts (it may have moved on since this core was created, while the
    /// primary was handshaking).
    ///
    /// # Panics
    /// Before the handshake completed or once epochs flow (a bug in the caller).
    pub fn accept_from(&mut self, last_applied: u64, lineage: [u8; NONCE_LEN]) -> Message {
        assert!(
            self.phase == StandbyPhase::Idle && self.layout.is_some(),
            "accept_from() outside a fresh session"
        );
        self.last_applied = last_applied;
        Message::Accept {
            last_applied,
            lineage,
        }
    }

    /// The epoch ordered by [`StandbyAction::Apply`] is applied; returns the ack to send.
    ///
    /// # Panics
    /// If no epoch was being applied (a bug in the caller).
    pub fn applied(&mut self) -> Message {
        let StandbyPhase::Applying(header) = self.phase else {
            panic!("applied() without an epoch being applied");
        };
        self.last_applied = header.epoch;
        self.phase = StandbyPhase::Idle;
        Message::Ack {
            epoch: header.epoch,
        }
    }

    /// Evidence of life from the primary at `t` (bytes arrived), or time the standby spent on
    /// its own work (allocating, applying), which must not count as the primary's silence.
    pub fn heard(&mut self, t: Instant) {
        self.live.last_heard = self.live.last_heard.max(t);
    }

    /// Call regularly: returns a heartbeat to send when one is due, or the primary's death.
    /// Before the handshake completes there are no heartbeats, only the timeout.
    pub fn tick(&mut self, now: Instant) -> Result<Option<Message>, ProtocolError> {
        let hb = self.live.tick(now, "primary")?;
        Ok(hb.filter(|_| self.layout.is_some()))
    }

    /// Notes that something was sent.
    pub fn sent(&mut self, now: Instant) {
        self.live.last_sent = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    fn layout() -> Layout {
        Layout {
            page_size: 4096,
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
        let (mut p, hello) = PrimaryCore::new(SECRET, layout(), [1; 32], Heartbeat::default(), now);
        p.set_fence(0x5eed);
        let mut s = StandbyCore::new(SECRET, LayoutRule::default(), 0, Heartbeat::default(), now);
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
                resume: false
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
                len: 2 * 8 + 2 * 4096 + 100
            }
        );
        assert_eq!(s.on_body_frame(2 * 8 + 2 * 4096 + 100).unwrap(), header(1));
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
}
