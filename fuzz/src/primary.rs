//! Target `primary_core`: `rmc_mc::protocol::PrimaryCore`, the other side a peer controls (the
//! standby's challenge, accept, acks, heartbeats and refusals), driven as `rmc_mc::primary`
//! drives it, with a model predicting every answer: the standby must prove the secret before
//! the primary reveals its proof and layout; epochs are numbered from the standby's last
//! applied epoch, one by one; an ack releases exactly the epochs in flight up to it, oldest
//! first, and an ack for an epoch never sent is refused; `abandon` hands back exactly what
//! was in flight.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmc_mc::protocol::{msg_type, Heartbeat, PrimaryAction, PrimaryCore, ProtocolError};
use rmc_transport::wire::{
    self, auth, EpochHeader, EpochKind, Layout, Message, RegionKey, PROTOCOL_VERSION,
};

use crate::gen;
use crate::input::Input;
use crate::standby::SECRET;
use crate::wire::{arbitrary_message, decode_frame, expected_after_wire, msg_type_of};

const MAX_EVENTS: usize = 400;

/// Epochs acknowledged by every run so far (to see that inputs get deep into the protocol).
pub static ACKED: AtomicU64 = AtomicU64::new(0);

/// Runs one input; panics on a broken promise.
pub fn primary_core(data: &[u8]) {
    run(data);
}

fn run(data: &[u8]) {
    let mut u = Input::new(data);
    let interval = Duration::from_millis(1 + u64::from(u.u8()));
    let hb = Heartbeat {
        interval,
        timeout: interval * (1 + u32::from(u.u8() % 8)),
    };
    let layout = {
        let l = gen::layout(&mut u);
        if gen::layout_valid(&l) {
            l
        } else {
            Layout {
                page_size: 4096,
                regions: vec![(0, 64 * gen::PAGE)],
                vcpus: 1,
                slot_pages: 4,
                slot_count: 2,
                features: 0,
                state_version: 1,
            }
        }
    };
    let hello_nonce = u.arr32();
    // One byte: bit 0, messages go through the wire encoding; bit 1, the connection is RDMA
    // (the standby's RegionKey must follow its Accept).
    let mode = u.u8();
    let via_wire = mode & 1 == 1;
    let rdma = mode & 2 == 2;
    let t0 = Instant::now();
    let (mut core, hello) = PrimaryCore::new(SECRET, layout.clone(), hello_nonce, hb, t0);
    core.set_placement(rdma);
    assert_eq!(
        hello,
        Message::Hello {
            version: PROTOCOL_VERSION,
            nonce: hello_nonce
        }
    );
    let mut s = Session {
        core,
        layout,
        hello_nonce,
        via_wire,
        rdma,
        t0,
        hb,
        phase: Phase::AwaitChallenge,
        next_epoch: 1,
        last_acked: 0,
        in_flight: VecDeque::new(),
        payload: 0,
        now: Duration::ZERO,
        last_heard: Duration::ZERO,
        last_sent: Duration::ZERO,
        seq: 0,
    };
    for _ in 0..MAX_EVENTS {
        if u.is_empty() || s.step(&mut u) == Flow::End {
            break;
        }
        s.check();
    }
    s.check();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitChallenge,
    AwaitAccept,
    AwaitRegionKey,
    Established,
}

struct Session {
    core: PrimaryCore<u32>,
    layout: Layout,
    hello_nonce: [u8; 32],
    via_wire: bool,
    rdma: bool,
    t0: Instant,
    hb: Heartbeat,
    phase: Phase,
    next_epoch: u64,
    last_acked: u64,
    in_flight: VecDeque<(u64, EpochKind, u32)>,
    payload: u32,
    now: Duration,
    last_heard: Duration,
    last_sent: Duration,
    seq: u64,
}

impl Session {
    fn now(&self) -> Instant {
        self.t0 + self.now
    }

    fn check(&self) {
        assert_eq!(self.core.established(), self.phase == Phase::Established);
        assert_eq!(self.core.in_flight(), self.in_flight.len());
        assert_eq!(self.core.last_acked(), self.last_acked);
        assert_eq!(self.core.next_epoch(), self.next_epoch);
    }

    fn step(&mut self, u: &mut Input) -> Flow {
        let op = u.u8();
        if op < 144 {
            return self.good_step(u);
        }
        match op % 12 {
            0 => {
                let proof = if u.bool() {
                    u.arr32()
                } else {
                    auth::standby_proof(SECRET, &self.hello_nonce, &u.arr32())
                };
                self.feed(
                    Message::Challenge {
                        nonce: u.arr32(),
                        proof,
                    },
                    u,
                )
            }
            1 => self.feed(
                Message::Accept {
                    last_applied: u.u64_edge(),
                    lineage: u.arr32(),
                },
                u,
            ),
            2 => {
                let epoch = u.near(self.next_epoch.wrapping_sub(1));
                self.feed(Message::Ack { epoch }, u)
            }
            3 => self.feed(Message::Heartbeat { seq: u.u64() }, u),
            4 => {
                let n = usize::from(u.u8());
                let reason = String::from_utf8_lossy(u.bytes(n)).into_owned();
                self.feed(Message::Refuse { reason }, u)
            }
            5 => {
                let Some(ty) = msg_type_of(u.u8() % 16) else {
                    return Flow::End;
                };
                let n = usize::from(u.u8());
                match wire::decode(ty, u.bytes(n)) {
                    Ok(m) => self.feed_direct(m),
                    Err(_) => Flow::End,
                }
            }
            6 => {
                let m = arbitrary_message(u);
                self.feed(m, u)
            }
            7 => {
                let limit = self.hb.timeout.as_micros() as u64 * 3 / 2 + 1;
                let step = Duration::from_micros(u.below(limit));
                self.tick(step)
            }
            8 => {
                let back = Duration::from_micros(u64::from(u.u32()));
                let t = self.now.saturating_sub(back);
                self.core.heard(self.t0 + t);
                self.last_heard = self.last_heard.max(t);
                Flow::Continue
            }
            9 => {
                self.core.sent(self.now());
                self.last_sent = self.now;
                Flow::Continue
            }
            10 => {
                // The caller's data of an epoch, in flight or not.
                let epoch = u.near(self.last_acked + 1);
                let want = self.in_flight.iter().find(|f| f.0 == epoch).map(|f| f.2);
                assert_eq!(self.core.payload_mut(epoch).map(|p| *p), want);
                Flow::Continue
            }
            _ => {
                // The connection is lost: everything in flight comes back, oldest first.
                let left: Vec<_> = self
                    .core
                    .abandon()
                    .into_iter()
                    .map(|f| (f.epoch, f.kind, f.payload))
                    .collect();
                assert_eq!(left, Vec::from(std::mem::take(&mut self.in_flight)));
                Flow::End
            }
        }
    }

    fn good_step(&mut self, u: &mut Input) -> Flow {
        match self.phase {
            Phase::AwaitChallenge => {
                let nonce = u.arr32();
                let proof = auth::standby_proof(SECRET, &self.hello_nonce, &nonce);
                self.feed(Message::Challenge { nonce, proof }, u)
            }
            Phase::AwaitAccept => {
                let last_applied = match u.u8() % 4 {
                    0 => 0,
                    1 => u.u64_edge(),
                    _ => u64::from(u.u16()),
                };
                let lineage = if u.bool() {
                    self.hello_nonce
                } else {
                    u.arr32()
                };
                self.feed(
                    Message::Accept {
                        last_applied,
                        lineage,
                    },
                    u,
                )
            }
            Phase::AwaitRegionKey => {
                let key = RegionKey {
                    addr: u.u64(),
                    len: u.u64(),
                    slot_stride: u.u64(),
                    rkey: u.u32(),
                };
                self.feed(Message::RegionKey(key), u)
            }
            Phase::Established => match u.u8() % 8 {
                0..=3 => {
                    let kind = if u.bool() {
                        EpochKind::Checkpoint
                    } else {
                        EpochKind::Sync
                    };
                    let (pages, state) = (u.u64(), u.u32());
                    self.payload += 1;
                    let h = self
                        .core
                        .begin_epoch(kind, pages, state, self.payload, self.now());
                    assert_eq!(
                        h,
                        EpochHeader {
                            epoch: self.next_epoch,
                            kind,
                            page_count: pages,
                            state_len: state,
                        }
                    );
                    self.in_flight
                        .push_back((self.next_epoch, kind, self.payload));
                    self.next_epoch += 1;
                    Flow::Continue
                }
                4 | 5 => {
                    let newest = self.next_epoch - 1;
                    let epoch = self.last_acked + u.below(newest - self.last_acked + 1);
                    self.feed(Message::Ack { epoch }, u)
                }
                6 => self.feed(Message::Heartbeat { seq: u.u64() }, u),
                _ => {
                    let step = self.hb.interval / (1 + u32::from(u.u8() % 4));
                    self.tick(step)
                }
            },
        }
    }

    fn feed(&mut self, m: Message, _u: &mut Input) -> Flow {
        if !self.via_wire {
            return self.feed_direct(m);
        }
        let mut frame = Vec::new();
        wire::encode(&m, &mut frame);
        let got = decode_frame(&frame);
        match expected_after_wire(&m) {
            Some(want) => {
                assert_eq!(got.as_ref(), Ok(&want));
                self.feed_direct(want)
            }
            None => {
                assert!(got.is_err());
                Flow::End
            }
        }
    }

    fn feed_direct(&mut self, m: Message) -> Flow {
        let got = self.core.on_message(m.clone(), self.now());
        self.last_heard = self.now;
        match (self.phase, &m) {
            (_, Message::Refuse { reason }) => {
                let e = got.expect_err("a refusal ends the connection");
                assert_eq!(
                    e,
                    ProtocolError::Refused {
                        peer: "standby",
                        reason: reason.clone()
                    }
                );
                Flow::End
            }
            (Phase::AwaitChallenge, Message::Challenge { nonce, proof }) => {
                if *proof != auth::standby_proof(SECRET, &self.hello_nonce, nonce) {
                    assert_eq!(
                        got.expect_err("a wrong proof"),
                        ProtocolError::AuthFailed { peer: "standby" }
                    );
                    return Flow::End;
                }
                // Only now, the standby proven, the primary proves itself and shows its layout.
                match got {
                    Ok(PrimaryAction::Send(Message::Auth {
                        proof,
                        layout,
                        fence,
                    })) => {
                        assert_eq!(proof, auth::primary_proof(SECRET, nonce, &self.hello_nonce));
                        assert_eq!(layout, self.layout);
                        // No fence was set on this core.
                        assert_eq!(fence, 0);
                    }
                    other => panic!("challenge answered with {other:?}"),
                }
                self.phase = Phase::AwaitAccept;
                Flow::Continue
            }
            (Phase::AwaitAccept, Message::Accept { last_applied, .. })
                if *last_applied >= rmc_mc::protocol::MAX_EPOCH =>
            {
                // Epoch numbers that would overflow: refused, not trusted.
                assert!(
                    matches!(
                        got,
                        Err(ProtocolError::Wire(rmc_transport::wire::WireError::Field {
                            field: "accepted epoch",
                            ..
                        }))
                    ),
                    "accept of {last_applied} answered with {got:?}"
                );
                Flow::End
            }
            (Phase::AwaitAccept, Message::Accept { last_applied, .. }) if self.rdma => {
                // Accepted, but no epoch before the standby said where bodies go.
                assert!(matches!(got, Ok(PrimaryAction::None)), "{got:?}");
                self.phase = Phase::AwaitRegionKey;
                self.next_epoch = last_applied + 1;
                self.last_acked = *last_applied;
                Flow::Continue
            }
            (Phase::AwaitAccept, Message::Accept { last_applied, .. }) => {
                match got {
                    Ok(PrimaryAction::Established {
                        last_applied: l,
                        resume,
                        region_key: None,
                    }) => {
                        assert_eq!(l, *last_applied);
                        // This core has no earlier session: never a resume, whatever the
                        // standby claims.
                        assert!(!resume);
                    }
                    other => panic!("accept answered with {other:?}"),
                }
                self.phase = Phase::Established;
                self.next_epoch = last_applied + 1;
                self.last_acked = *last_applied;
                Flow::Continue
            }
            (Phase::AwaitRegionKey, Message::RegionKey(key)) => {
                match got {
                    Ok(PrimaryAction::Established {
                        last_applied,
                        resume,
                        region_key: Some(k),
                    }) => {
                        assert_eq!(last_applied, self.next_epoch - 1);
                        assert!(!resume);
                        assert_eq!(k, *key);
                    }
                    other => panic!("region key answered with {other:?}"),
                }
                self.phase = Phase::Established;
                Flow::Continue
            }
            (Phase::Established, Message::Ack { epoch }) => {
                let newest = self.next_epoch - 1;
                if *epoch > newest {
                    assert_eq!(
                        got.expect_err("ack for an epoch never sent"),
                        ProtocolError::AckForUnknownEpoch {
                            epoch: *epoch,
                            newest
                        }
                    );
                    return Flow::End;
                }
                let mut want = Vec::new();
                while self.in_flight.front().is_some_and(|f| f.0 <= *epoch) {
                    want.extend(self.in_flight.pop_front());
                }
                match got {
                    Ok(PrimaryAction::Acked(done)) => {
                        let done: Vec<_> = done
                            .into_iter()
                            .map(|f| (f.epoch, f.kind, f.payload))
                            .collect();
                        assert_eq!(done, want);
                        ACKED.fetch_add(want.len() as u64, Ordering::Relaxed);
                    }
                    other => panic!("ack answered with {other:?}"),
                }
                self.last_acked = self.last_acked.max(*epoch);
                Flow::Continue
            }
            (Phase::Established, Message::Heartbeat { .. }) => {
                assert!(matches!(got, Ok(PrimaryAction::None)), "{got:?}");
                Flow::Continue
            }
            _ => {
                match got {
                    Err(ProtocolError::Unexpected { got: t, .. }) => assert_eq!(t, msg_type(&m)),
                    other => panic!("{:?} in {:?} answered with {other:?}", m, self.phase),
                }
                Flow::End
            }
        }
    }

    fn tick(&mut self, step: Duration) -> Flow {
        self.now += step;
        let got = self.core.tick(self.now());
        let silent = self.now.saturating_sub(self.last_heard);
        if silent > self.hb.timeout {
            assert_eq!(
                got,
                Err(ProtocolError::PeerSilent {
                    peer: "standby",
                    silent,
                    timeout: self.hb.timeout,
                })
            );
            return Flow::End;
        }
        let mut want = None;
        if self.now.saturating_sub(self.last_sent) >= self.hb.interval {
            self.last_sent = self.now;
            self.seq += 1;
            want = Some(Message::Heartbeat { seq: self.seq });
        }
        assert_eq!(got, Ok(want));
        Flow::Continue
    }
}
