//! Target `standby_core`: `rmc_mc::protocol::StandbyCore` driven as `rmc_mc::standby` drives it
//! (one core per connection, `on_body_frame` before a body, `applied` right after `Apply`,
//! a new connection after an error or a goodbye, the backup's layout and last epoch carried
//! over), by events the input chooses: well-behaved protocol steps, mangled ones, raw
//! frames, ticks with arbitrary time steps.
//!
//! Beside "never panics", a model of the protocol (its rules restated from the docs of
//! `rmc_transport::wire` and `rmc_mc::protocol`) predicts every answer, and the core must give
//! exactly that answer (the error variant, for refusals). The model encodes the invariants:
//! nothing is accepted before the primary proved the secret; epochs only in order; a body
//! only right after its header and of exactly its length; `Apply` only after the body
//! arrived and a `Commit` for that epoch whose checksum equals the body's; the last applied
//! epoch rises by exactly one per apply, across connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmc_mc::protocol::{refusal, Heartbeat, LayoutRule, ProtocolError, StandbyAction, StandbyCore};
use rmc_transport::wire::{
    self, auth, EpochHeader, EpochKind, Layout, Message, MsgType, RegionKey, MAX_STATE_LEN,
    PROTOCOL_VERSION,
};

use crate::gen;
use crate::input::Input;
use crate::wire::{arbitrary_message, decode_frame, expected_after_wire, msg_type_of};

/// The secret both sides hold.
pub const SECRET: &[u8] = b"rmc fuzz secret";
/// Bodies up to this size are built byte by byte (index, pages, state) and hashed; larger
/// ones get a checksum from the input.
const BODY_BYTES: u64 = 64 << 10;
/// Connections per input.
const MAX_SESSIONS: usize = 4;
/// Events per connection.
const MAX_EVENTS: usize = 400;

/// Epochs applied by every run so far (to see that inputs get deep into the protocol).
pub static APPLIED: AtomicU64 = AtomicU64::new(0);

/// Runs one input; panics on a broken promise.
pub fn standby_core(data: &[u8]) {
    let mut u = Input::new(data);
    let interval = Duration::from_millis(1 + u64::from(u.u8()));
    let hb = Heartbeat {
        interval,
        timeout: interval * (1 + u32::from(u.u8() % 8)),
    };
    let intended = valid_layout(&mut u);
    let existing = match u.u8() % 3 {
        0 => None,
        1 => Some(intended.clone()),
        _ => Some(valid_layout(&mut u)),
    };
    let memory_bytes = match u.u8() % 4 {
        1 => Some(gen::guest_bytes(&intended)),
        2 => Some(u.u64_edge()),
        _ => None,
    };
    // A standby without a backup starts from epoch 0; one with a backup from any epoch.
    let last_applied = match (existing.is_some(), u.u8() % 3) {
        (false, _) | (true, 0) => 0,
        (true, 1) => u64::from(u.u32()),
        (true, _) => u.u64() >> 1,
    };
    let state_version = match u.u8() % 4 {
        0 => None,
        1 => Some(u.u32()),
        _ => Some(1),
    };
    let host_bytes = match u.u8() % 4 {
        0 => None,
        1 => Some(u.u64_edge()),
        _ => Some(24 << 30),
    };
    // One byte: bit 0, messages go through the wire encoding; bit 1, the connections are
    // RDMA (a RegionKey follows the Accept, bodies may be placed).
    let mode = u.u8();
    let via_wire = mode & 1 == 1;
    let rdma = mode & 2 == 2;
    // `rmc_mc::standby` creates the core with last epoch 0 and sets the backup's when the
    // session starts (`accept_from`); a core can also be created with it.
    let from_start = u.bool();
    let mut backup = Backup {
        rule: LayoutRule {
            memory_bytes,
            existing,
            state_version,
            host_bytes,
        },
        last_applied,
        from_start,
    };
    let t0 = Instant::now();
    let mut at = Duration::ZERO;
    for _ in 0..MAX_SESSIONS {
        if u.is_empty() {
            break;
        }
        let mut s = Session::new(&backup, hb, t0, at, via_wire, intended.clone());
        s.rdma = rdma;
        s.backup_last = backup.last_applied;
        for _ in 0..MAX_EVENTS {
            if u.is_empty() || s.step(&mut u) == Flow::End {
                break;
            }
            s.check();
        }
        s.check();
        at = s.m.now;
        // What outlives the connection: the backup's layout (set up at the handshake) and
        // its last epoch (moved only by a session that completed its handshake).
        if let Some(l) = s.m.layout {
            assert!(s.m.last_applied >= backup.last_applied);
            backup.last_applied = s.m.last_applied;
            backup.rule.existing = Some(l);
        }
    }
}

fn valid_layout(u: &mut Input) -> Layout {
    let l = gen::layout(u);
    if gen::layout_valid(&l) {
        l
    } else {
        Layout {
            page_size: 4096,
            regions: vec![(0, 16 * gen::PAGE), (1 << 20, 8 * gen::PAGE)],
            vcpus: 1,
            slot_pages: 4,
            slot_count: 2,
            features: 0,
            state_version: 1,
        }
    }
}

#[derive(Debug)]
struct Backup {
    rule: LayoutRule,
    last_applied: u64,
    /// Give the core the backup's last epoch at creation, not with `accept_from`.
    from_start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

/// The model's view of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitAuth {
        hello: [u8; 32],
        challenge: [u8; 32],
    },
    Idle,
    Receiving {
        header: EpochHeader,
        len: u64,
    },
    Received {
        header: EpochHeader,
        checksum: u64,
    },
}

#[derive(Debug)]
struct Model {
    phase: Phase,
    rule: LayoutRule,
    layout: Option<Layout>,
    last_applied: u64,
    /// The RegionKey went out: bodies may be placed by RDMA.
    placement: bool,
    hb: Heartbeat,
    now: Duration,
    last_heard: Duration,
    last_sent: Duration,
    seq: u64,
}

struct Session {
    core: StandbyCore,
    m: Model,
    /// The backup's last epoch, given with `accept_from` after the handshake.
    backup_last: u64,
    t0: Instant,
    via_wire: bool,
    /// An RDMA connection: `region_key` right after `accept_from`, as `rmc_mc::standby` does.
    rdma: bool,
    intended: Layout,
}

impl Session {
    fn new(
        b: &Backup,
        hb: Heartbeat,
        t0: Instant,
        at: Duration,
        via_wire: bool,
        intended: Layout,
    ) -> Self {
        let first = if b.from_start { b.last_applied } else { 0 };
        Session {
            core: StandbyCore::new(SECRET, b.rule.clone(), first, hb, t0 + at),
            backup_last: b.last_applied,
            m: Model {
                phase: Phase::AwaitHello,
                rule: b.rule.clone(),
                layout: None,
                last_applied: first,
                placement: false,
                hb,
                now: at,
                last_heard: at,
                last_sent: at,
                seq: 0,
            },
            t0,
            via_wire,
            rdma: false,
            intended,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + self.m.now
    }

    /// The core's observable state agrees with the model's.
    fn check(&self) {
        assert_eq!(self.core.last_applied(), self.m.last_applied);
        assert_eq!(self.core.layout(), self.m.layout.as_ref());
        assert_eq!(self.core.in_handshake(), self.m.layout.is_none());
        let in_progress = match &self.m.phase {
            Phase::Receiving { header, .. } | Phase::Received { header, .. } => Some(header.epoch),
            _ => None,
        };
        assert_eq!(self.core.epoch_in_progress(), in_progress);
    }

    fn step(&mut self, u: &mut Input) -> Flow {
        let op = u.u8();
        if op < 144 {
            return self.good_step(u);
        }
        match op % 16 {
            0 => self.feed(
                Message::Hello {
                    version: u.near(u64::from(PROTOCOL_VERSION)) as u16,
                    nonce: u.arr32(),
                },
                u,
            ),
            1 => {
                let proof = match (&self.m.phase, u.bool()) {
                    (Phase::AwaitAuth { hello, challenge }, true) => {
                        auth::primary_proof(SECRET, challenge, hello)
                    }
                    _ => u.arr32(),
                };
                let layout = gen::layout(u);
                self.feed_auth(proof, layout, u)
            }
            2 => {
                let total = self.m.layout.as_ref().map_or(0, |l| l.total_pages());
                let h = EpochHeader {
                    epoch: u.near(self.m.last_applied + 1),
                    kind: if u.bool() {
                        EpochKind::Checkpoint
                    } else {
                        EpochKind::Sync
                    },
                    page_count: u.near(total),
                    state_len: u.near(u64::from(MAX_STATE_LEN)) as u32,
                };
                self.feed(Message::EpochHeader(h), u)
            }
            3 => {
                let len = match &self.m.phase {
                    Phase::Receiving { len, .. } => u.near(*len),
                    _ => u.u64_edge(),
                };
                self.body(len, u)
            }
            4 => {
                // A body reported without its frame having been checked.
                let checksum = u.u64();
                self.body_received(checksum)
            }
            5 => {
                let (epoch, checksum) = match &self.m.phase {
                    Phase::Received { header, checksum } => (header.epoch, *checksum),
                    Phase::Receiving { header, .. } => (header.epoch, u.u64()),
                    _ => (self.m.last_applied + 1, u.u64()),
                };
                let epoch = u.near(epoch);
                let checksum = if u.bool() { checksum } else { u.u64() };
                self.feed(Message::Commit { epoch, checksum }, u)
            }
            6 => self.feed(Message::Heartbeat { seq: u.u64() }, u),
            7 => self.feed(
                Message::Goodbye {
                    last_epoch: u.u64_edge(),
                },
                u,
            ),
            8 => {
                let n = usize::from(u.u8());
                let reason = String::from_utf8_lossy(u.bytes(n)).into_owned();
                self.feed(Message::Refuse { reason }, u)
            }
            9 => {
                // A raw frame, decoded as the standby's reader decodes it.
                let Some(ty) = msg_type_of(u.u8() % 16) else {
                    return Flow::End;
                };
                let n = usize::from(u.u8());
                let payload = u.bytes(n);
                if ty == MsgType::EpochBody {
                    return self.body(n as u64, u);
                }
                match wire::decode(ty, payload) {
                    Ok(m) => self.feed_direct(m, u),
                    Err(_) => Flow::End,
                }
            }
            10 => {
                let m = arbitrary_message(u);
                self.feed(m, u)
            }
            11 | 12 => {
                let limit = self.m.hb.timeout.as_micros() as u64 * 3 / 2 + 1;
                let step = Duration::from_micros(u.below(limit));
                self.tick(step)
            }
            13 => {
                // Evidence of life at some time up to now.
                let back = Duration::from_micros(u64::from(u.u32()));
                let t = self.m.now.saturating_sub(back);
                self.core.heard(self.t0 + t);
                self.m.last_heard = self.m.last_heard.max(t);
                Flow::Continue
            }
            14 => {
                self.core.sent(self.now());
                self.m.last_sent = self.m.now;
                Flow::Continue
            }
            _ => {
                // Time passes without a tick.
                self.m.now += Duration::from_micros(u64::from(u.u16()));
                Flow::Continue
            }
        }
    }

    /// The next step of a well-behaved primary.
    fn good_step(&mut self, u: &mut Input) -> Flow {
        match self.m.phase.clone() {
            Phase::AwaitHello => self.feed(
                Message::Hello {
                    version: PROTOCOL_VERSION,
                    nonce: u.arr32(),
                },
                u,
            ),
            Phase::AwaitAuth { hello, challenge } => {
                let proof = auth::primary_proof(SECRET, &challenge, &hello);
                let mut layout = self.intended.clone();
                match u.u8() % 8 {
                    0 => layout = gen::layout(u),
                    1 => {
                        layout.slot_pages = 1 + u32::from(u.u16());
                        layout.slot_count = 2 + u32::from(u.u8() % 4);
                    }
                    _ => {}
                }
                self.feed_auth(proof, layout, u)
            }
            Phase::Idle => match u.u8() % 32 {
                0 => self.feed(
                    Message::Goodbye {
                        last_epoch: self.m.last_applied,
                    },
                    u,
                ),
                1 | 2 => self.feed(Message::Heartbeat { seq: u.u64() }, u),
                3 | 4 => {
                    let step = self.m.hb.interval / (1 + u32::from(u.u8() % 4));
                    self.tick(step)
                }
                _ => {
                    let total = self.m.layout.as_ref().map_or(0, |l| l.total_pages());
                    let kind = if u.bool() {
                        EpochKind::Checkpoint
                    } else {
                        EpochKind::Sync
                    };
                    let page_count = match u.u8() % 16 {
                        0 => u.below(total + 1),
                        1 => total,
                        _ => u.below(total.min(8) + 1),
                    };
                    let state_len = match (kind, u.u8() % 16) {
                        (EpochKind::Sync, _) => 0,
                        (EpochKind::Checkpoint, 0) => MAX_STATE_LEN,
                        (EpochKind::Checkpoint, _) => 1 + u32::from(u.u16() % 2048),
                    };
                    let h = EpochHeader {
                        epoch: self.m.last_applied + 1,
                        kind,
                        page_count,
                        state_len,
                    };
                    self.feed(Message::EpochHeader(h), u)
                }
            },
            Phase::Receiving { len, .. } if self.m.placement && u.bool() => {
                let count = self.m.layout.as_ref().map_or(0, |l| l.slot_count);
                let slot = u.below(u64::from(count)) as u32;
                self.feed(Message::BodyPlaced { slot, len }, u)
            }
            Phase::Receiving { len, .. } => self.body(len, u),
            Phase::Received { header, checksum } => self.feed(
                Message::Commit {
                    epoch: header.epoch,
                    checksum,
                },
                u,
            ),
        }
    }

    /// An Auth with this proof and layout and a fencing token from the input.
    fn feed_auth(&mut self, proof: [u8; 32], layout: Layout, u: &mut Input) -> Flow {
        let fence = u.u64_edge();
        self.feed(
            Message::Auth {
                proof,
                layout,
                fence,
            },
            u,
        )
    }

    /// A message as it arrives: through `encode` and the decoder first when the session
    /// goes over the wire (a message no decoder accepts ends the connection there).
    fn feed(&mut self, m: Message, u: &mut Input) -> Flow {
        if !self.via_wire {
            return self.feed_direct(m, u);
        }
        let mut frame = Vec::new();
        wire::encode(&m, &mut frame);
        let got = decode_frame(&frame);
        match expected_after_wire(&m) {
            Some(want) => {
                assert_eq!(got.as_ref(), Ok(&want), "{m:?} did not survive the wire");
                self.feed_direct(want, u)
            }
            None => {
                assert!(got.is_err(), "{m:?} should be refused, decoded as {got:?}");
                Flow::End
            }
        }
    }

    fn feed_direct(&mut self, m: Message, u: &mut Input) -> Flow {
        let challenge = u.arr32();
        let (want, next) = self.predict(&m, &challenge);
        let got = self.core.on_message(m.clone(), challenge, self.now());
        self.m.last_heard = self.m.now;
        assert_same(&got, &want, &m, &self.m.phase);
        let action = match got {
            Ok(a) => a,
            Err(e) => return self.refused(&e),
        };
        if let Some(p) = next {
            self.m.phase = p;
        }
        match action {
            StandbyAction::None | StandbyAction::Send(_) | StandbyAction::ExpectBody { .. } => {
                Flow::Continue
            }
            StandbyAction::BodyPlaced { header, .. } => {
                // As `rmc_mc::standby` does: the body is taken from the slot, then checked
                // like a streamed one.
                let Message::BodyPlaced { len, .. } = m else {
                    unreachable!("placed by a BodyPlaced")
                };
                self.body_content(header, len, u)
            }
            StandbyAction::Established { layout, .. } => {
                self.m.layout = Some(layout);
                // As `rmc_mc::standby` does: epochs continue from the backup's last one.
                let accept = self.core.accept_from(self.backup_last, [5; 32]);
                assert_eq!(
                    accept,
                    Message::Accept {
                        last_applied: self.backup_last,
                        lineage: [5; 32],
                    }
                );
                self.m.last_applied = self.backup_last;
                if self.rdma {
                    let key = RegionKey {
                        addr: 0x7f00_0000_0000,
                        len: 1 << 30,
                        slot_stride: 1 << 20,
                        rkey: 7,
                    };
                    assert_eq!(self.core.region_key(key), Message::RegionKey(key));
                    self.m.placement = true;
                }
                Flow::Continue
            }
            StandbyAction::Apply(header) => {
                // The invariants the model already enforced, spelled out.
                assert!(self.m.layout.is_some(), "apply before authentication");
                assert_eq!(header.epoch, self.m.last_applied + 1, "epoch out of order");
                let ack = self.core.applied();
                assert_eq!(
                    ack,
                    Message::Ack {
                        epoch: header.epoch
                    }
                );
                self.m.last_applied = header.epoch;
                self.m.phase = Phase::Idle;
                APPLIED.fetch_add(1, Ordering::Relaxed);
                Flow::Continue
            }
            StandbyAction::Goodbye => Flow::End,
        }
    }

    /// The connection ends on `e`: the refusal told to the primary must survive the wire.
    fn refused(&mut self, e: &ProtocolError) -> Flow {
        match (e, refusal(e)) {
            (ProtocolError::Refused { .. }, None) => {}
            (e, Some(r @ Message::Refuse { .. })) => {
                let mut frame = Vec::new();
                wire::encode(&r, &mut frame);
                let back = decode_frame(&frame);
                assert_eq!(
                    back.as_ref(),
                    Ok(&expected_after_wire(&r).expect("a refusal"))
                );
                let Message::Refuse { reason } = r else {
                    unreachable!()
                };
                assert_eq!(reason, e.to_string());
            }
            (e, r) => panic!("refusal of {e:?} is {r:?}"),
        }
        Flow::End
    }

    /// What the core must answer to `m` in the model's state, and the state after it.
    fn predict(
        &self,
        m: &Message,
        challenge: &[u8; 32],
    ) -> (Result<StandbyAction, ProtocolError>, Option<Phase>) {
        let unexpected = Err(ProtocolError::Unexpected {
            got: rmc_mc::protocol::msg_type(m),
            state: "",
        });
        match (&self.m.phase, m) {
            (_, Message::Refuse { reason }) => (
                Err(ProtocolError::Refused {
                    peer: "primary",
                    reason: reason.clone(),
                }),
                None,
            ),
            (Phase::AwaitHello | Phase::AwaitAuth { .. }, Message::Heartbeat { .. }) => {
                (unexpected, None)
            }
            (_, Message::Heartbeat { .. }) => (Ok(StandbyAction::None), None),
            (Phase::AwaitHello, Message::Hello { version, nonce }) => {
                if *version != PROTOCOL_VERSION {
                    return (Err(ProtocolError::Version { found: *version }), None);
                }
                let proof = auth::standby_proof(SECRET, nonce, challenge);
                (
                    Ok(StandbyAction::Send(Message::Challenge {
                        nonce: *challenge,
                        proof,
                    })),
                    Some(Phase::AwaitAuth {
                        hello: *nonce,
                        challenge: *challenge,
                    }),
                )
            }
            (
                Phase::AwaitAuth { hello, challenge },
                Message::Auth {
                    proof,
                    layout,
                    fence,
                },
            ) => {
                // Authentication first: nothing of an unauthenticated peer is looked at.
                if *proof != auth::primary_proof(SECRET, challenge, hello) {
                    return (Err(ProtocolError::AuthFailed { peer: "primary" }), None);
                }
                if !gen::layout_valid(layout) {
                    return (Err(ProtocolError::Wire(wire_field())), None);
                }
                let rule = &self.m.rule;
                if let Some(supported) = rule.state_version {
                    if layout.state_version != supported {
                        return (
                            Err(ProtocolError::StateVersion {
                                found: layout.state_version,
                                supported,
                            }),
                            None,
                        );
                    }
                }
                if let Some(limit) = rule.host_bytes {
                    // The backup and the staging slots (each: index, pages, largest state).
                    let slot = u128::from(layout.slot_pages) * u128::from(8 + gen::PAGE)
                        + u128::from(MAX_STATE_LEN);
                    let need =
                        u128::from(gen::guest_bytes(layout)) + slot * u128::from(layout.slot_count);
                    if need > u128::from(limit) {
                        return (
                            Err(ProtocolError::TooLarge {
                                need: (need >> 20) as u64,
                                limit: limit >> 20,
                            }),
                            None,
                        );
                    }
                }
                let size_ok = rule
                    .memory_bytes
                    .is_none_or(|want| gen::guest_bytes(layout) == want);
                let same_guest = rule.existing.as_ref().is_none_or(|e| {
                    e.regions == layout.regions
                        && e.vcpus == layout.vcpus
                        && e.page_size == layout.page_size
                });
                if !size_ok || !same_guest {
                    return (Err(ProtocolError::LayoutMismatch(String::new())), None);
                }
                (
                    Ok(StandbyAction::Established {
                        layout: layout.clone(),
                        fence: *fence,
                        session: *hello,
                        accept: Message::Accept {
                            last_applied: self.m.last_applied,
                            lineage: [0; 32],
                        },
                    }),
                    Some(Phase::Idle),
                )
            }
            // A placement notice, once authenticated: only on RDMA, only for the epoch whose
            // body is awaited, of its length, in one of the standby's slots.
            (_, Message::BodyPlaced { .. }) if self.m.layout.is_some() && !self.m.placement => {
                (Err(ProtocolError::PlacedOverTcp), None)
            }
            (Phase::Receiving { header, len }, Message::BodyPlaced { slot, len: got }) => {
                if got != len {
                    return (
                        Err(ProtocolError::BodyLength {
                            epoch: header.epoch,
                            got: *got,
                            expected: *len,
                        }),
                        None,
                    );
                }
                let count = self.m.layout.as_ref().map_or(0, |l| l.slot_count);
                if *slot >= count {
                    return (
                        Err(ProtocolError::PlacedOutside {
                            epoch: header.epoch,
                            slot: *slot,
                            count,
                        }),
                        None,
                    );
                }
                (
                    Ok(StandbyAction::BodyPlaced {
                        header: *header,
                        slot: *slot,
                    }),
                    None,
                )
            }
            (Phase::Idle | Phase::Received { .. }, Message::BodyPlaced { .. }) => {
                (Err(ProtocolError::BodyWithoutHeader), None)
            }
            (Phase::Idle, Message::Goodbye { .. }) => (Ok(StandbyAction::Goodbye), None),
            (Phase::Idle, Message::EpochHeader(h)) => {
                let expected = self.m.last_applied + 1;
                if h.epoch != expected {
                    return (
                        Err(ProtocolError::EpochOutOfOrder {
                            got: h.epoch,
                            expected,
                        }),
                        None,
                    );
                }
                let layout = self.m.layout.as_ref().expect("Idle is after the handshake");
                match gen::body_len(h, layout) {
                    None => (Err(ProtocolError::Wire(wire_field())), None),
                    Some(len) => (
                        Ok(StandbyAction::ExpectBody { header: *h, len }),
                        Some(Phase::Receiving { header: *h, len }),
                    ),
                }
            }
            (Phase::Idle | Phase::Receiving { .. }, Message::Commit { epoch, .. }) => {
                (Err(ProtocolError::CommitBeforeData { epoch: *epoch }), None)
            }
            (
                Phase::Received { header, checksum },
                Message::Commit {
                    epoch,
                    checksum: committed,
                },
            ) => {
                if *epoch != header.epoch {
                    return (
                        Err(ProtocolError::CommitMismatch {
                            commit: *epoch,
                            current: header.epoch,
                        }),
                        None,
                    );
                }
                if committed != checksum {
                    return (
                        Err(ProtocolError::Checksum {
                            epoch: *epoch,
                            expected: *committed,
                            actual: *checksum,
                        }),
                        None,
                    );
                }
                (Ok(StandbyAction::Apply(*header)), None)
            }
            _ => (unexpected, None),
        }
    }

    /// A body frame of `len` bytes (an `EpochBody` header, or an RDMA `BodyPlaced`): checked
    /// with the core, then, as `rmc_mc::standby` does, read whole, its index validated, hashed
    /// and reported.
    fn body(&mut self, len: u64, u: &mut Input) -> Flow {
        let got = self.core.on_body_frame(len);
        let header = match &self.m.phase {
            Phase::Receiving { header, len: want } if *want == len => {
                assert_eq!(got, Ok(*header));
                *header
            }
            Phase::Receiving { header, len: want } => {
                assert_eq!(
                    got,
                    Err(ProtocolError::BodyLength {
                        epoch: header.epoch,
                        got: len,
                        expected: *want,
                    })
                );
                return self.refused(&got.expect_err("checked"));
            }
            _ => {
                assert_eq!(got, Err(ProtocolError::BodyWithoutHeader));
                return self.refused(&got.expect_err("checked"));
            }
        };
        self.body_content(header, len, u)
    }

    /// The body of `header`, `len` bytes, checked by the core: built from the input, its
    /// index validated, hashed and reported, as `rmc_mc::standby` does with a streamed or a
    /// placed body.
    fn body_content(&mut self, header: EpochHeader, len: u64, u: &mut Input) -> Flow {
        let checksum = if len <= BODY_BYTES {
            let layout = self
                .m
                .layout
                .clone()
                .expect("a body is after the handshake");
            let pages = header.page_count as usize;
            let index = gen::index(u, &layout, pages);
            let index_bytes: Vec<u8> = index.iter().flat_map(|a| a.to_le_bytes()).collect();
            let mut data = vec![0u8; pages * gen::PAGE as usize];
            let n = usize::from(u.u8()).min(data.len());
            u.fill(&mut data[..n]);
            let mut state = vec![0u8; header.state_len as usize];
            let n = usize::from(u.u8() % 64).min(state.len());
            u.fill(&mut state[..n]);
            assert_eq!(
                (index_bytes.len() + data.len() + state.len()) as u64,
                len,
                "the announced length is index + pages + state"
            );
            match (
                wire::validate_index(&index, &layout),
                gen::index_first_bad(&index, &layout),
            ) {
                (Ok(()), None) => {}
                // The standby ends the connection on a bad index.
                (Err(_), Some(_)) => return Flow::End,
                (got, want) => panic!("index {index:x?}: {got:?}, first bad entry {want:?}"),
            }
            wire::checksum(&[&index_bytes, &data, &state])
        } else {
            u.u64()
        };
        self.body_received(checksum)
    }

    fn body_received(&mut self, checksum: u64) -> Flow {
        let got = self.core.body_received(checksum, self.now());
        self.m.last_heard = self.m.now;
        match self.m.phase.clone() {
            Phase::Receiving { header, .. } => {
                assert_eq!(got, Ok(()));
                self.m.phase = Phase::Received { header, checksum };
                Flow::Continue
            }
            _ => {
                assert_eq!(got, Err(ProtocolError::BodyWithoutHeader));
                self.refused(&got.expect_err("checked"))
            }
        }
    }

    /// Time passes by `step`, then the core's tick.
    fn tick(&mut self, step: Duration) -> Flow {
        self.m.now += step;
        let got = self.core.tick(self.now());
        let silent = self.m.now.saturating_sub(self.m.last_heard);
        if silent > self.m.hb.timeout {
            assert_eq!(
                got,
                Err(ProtocolError::PeerSilent {
                    peer: "primary",
                    silent,
                    timeout: self.m.hb.timeout,
                })
            );
            return self.refused(&got.expect_err("checked"));
        }
        let mut want = None;
        if self.m.now.saturating_sub(self.m.last_sent) >= self.m.hb.interval {
            self.m.last_sent = self.m.now;
            self.m.seq += 1;
            // No heartbeats before the handshake completed.
            if self.m.layout.is_some() {
                want = Some(Message::Heartbeat { seq: self.m.seq });
            }
        }
        assert_eq!(got, Ok(want));
        Flow::Continue
    }
}

fn wire_field() -> rmc_transport::wire::WireError {
    rmc_transport::wire::WireError::Field {
        field: "",
        value: String::new(),
    }
}

/// The core's answer matches the model's: equal when accepted; for a refusal the same
/// variant, with equal fields where the model can know them.
fn assert_same(
    got: &Result<StandbyAction, ProtocolError>,
    want: &Result<StandbyAction, ProtocolError>,
    m: &Message,
    phase: &Phase,
) {
    let same = match (got, want) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => match (a, b) {
            (ProtocolError::Wire(_), ProtocolError::Wire(_))
            | (ProtocolError::LayoutMismatch(_), ProtocolError::LayoutMismatch(_)) => true,
            (
                ProtocolError::Unexpected { got: a, .. },
                ProtocolError::Unexpected { got: b, .. },
            ) => a == b,
            (a, b) => a == b,
        },
        _ => false,
    };
    assert!(
        same,
        "standby in {phase:?} given {m:?}: core answered {got:?}, the protocol says {want:?}"
    );
}
