//! The primary's protocol core.

use std::collections::VecDeque;
use std::time::Instant;

use rmc_transport::wire::{
    auth, EpochHeader, EpochKind, Layout, Message, RegionKey, WireError, NONCE_LEN,
    PROTOCOL_VERSION,
};

use super::{msg_type, Heartbeat, Liveness, ProtocolError, ResumePoint, MAX_EPOCH};

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
        /// Where epoch bodies go by RDMA WRITE (the standby's staging region, from its
        /// `RegionKey`), on a connection that places them ([`PrimaryCore::set_placement`]);
        /// `None` when they are streamed.
        region_key: Option<RegionKey>,
    },
    /// These epochs are now applied on the standby (oldest first); free their resources.
    Acked(Vec<InFlight<T>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrimaryPhase {
    AwaitChallenge,
    AwaitAccept,
    /// RDMA: accepted, the standby's `RegionKey` comes next.
    AwaitRegionKey {
        last_applied: u64,
        resume: bool,
    },
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
    /// Epoch bodies are placed by RDMA WRITE: a `RegionKey` follows the `Accept`.
    placement: bool,
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
            placement: false,
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

    /// Whether this connection places epoch bodies by RDMA WRITE (then the standby's
    /// `RegionKey` must follow its `Accept`, and nothing else may). Call before the handshake.
    pub fn set_placement(&mut self, placement: bool) {
        self.placement = placement;
    }

    /// The layout this primary proposed.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// When something is next due for the liveness of the connection, once established: the
    /// next heartbeat to send, or the instant after which the standby's silence is fatal.
    /// [`PrimaryCore::tick`] at that instant does what is due. `None` during the handshake
    /// (its deadline is the caller's).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.established().then(|| self.live.poll_timeout())
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
                self.next_epoch = last_applied + 1;
                self.last_acked = last_applied;
                if self.placement {
                    // Epoch bodies are RDMA-written: not before the standby said where.
                    self.phase = PrimaryPhase::AwaitRegionKey {
                        last_applied,
                        resume,
                    };
                    return Ok(PrimaryAction::None);
                }
                self.phase = PrimaryPhase::Established;
                Ok(PrimaryAction::Established {
                    last_applied,
                    resume,
                    region_key: None,
                })
            }
            (
                PrimaryPhase::AwaitRegionKey {
                    last_applied,
                    resume,
                },
                Message::RegionKey(key),
            ) => {
                self.phase = PrimaryPhase::Established;
                Ok(PrimaryAction::Established {
                    last_applied,
                    resume,
                    region_key: Some(key),
                })
            }
            (PrimaryPhase::Established, Message::Ack { epoch }) => self.on_ack(epoch),
            (PrimaryPhase::Established, Message::Heartbeat { .. }) => Ok(PrimaryAction::None),
            (PrimaryPhase::AwaitChallenge, _) => {
                Err(unexpected("waiting for the standby's challenge"))
            }
            (PrimaryPhase::AwaitAccept, _) => Err(unexpected("waiting for the standby to accept")),
            (PrimaryPhase::AwaitRegionKey { .. }, _) => {
                Err(unexpected("waiting for the standby's RDMA region key"))
            }
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
