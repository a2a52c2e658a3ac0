//! The standby's protocol core.

use std::time::Instant;

use rmc_transport::wire::{
    auth, EpochHeader, Layout, Message, RegionKey, MAX_STATE_LEN, NONCE_LEN, PROTOCOL_VERSION,
};

use super::{msg_type, Heartbeat, Liveness, ProtocolError};

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
    /// RDMA: the body of this epoch was placed in this staging slot (a valid slot number);
    /// take it from there, check it like a received body, then call
    /// [`StandbyCore::body_received`].
    BodyPlaced {
        /// The epoch whose body it is.
        header: EpochHeader,
        /// The slot it is in.
        slot: u32,
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
    /// Epoch bodies are placed by RDMA WRITE (the `RegionKey` went out).
    placement: bool,
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
            placement: false,
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
            (_, Message::BodyPlaced { slot, len }) if self.layout.is_some() => {
                self.on_body_placed(slot, len)
            }
            (_, m) => Err(unexpected(&m)),
        }
    }

    /// RDMA: the primary says the announced epoch's body, `len` bytes, is in slot `slot`.
    fn on_body_placed(&self, slot: u32, len: u64) -> Result<StandbyAction, ProtocolError> {
        if !self.placement {
            return Err(ProtocolError::PlacedOverTcp);
        }
        let header = self.on_body_frame(len)?;
        let count = self.layout.as_ref().map_or(0, |l| l.slot_count);
        if slot >= count {
            return Err(ProtocolError::PlacedOutside {
                epoch: header.epoch,
                slot,
                count,
            });
        }
        Ok(StandbyAction::BodyPlaced { header, slot })
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

    /// RDMA: the `RegionKey` to send right after the Accept ([`StandbyCore::accept_from`]):
    /// from now on the primary places epoch bodies in this standby's slots, and the core
    /// accepts its `BodyPlaced` notices (on a connection without one, they are refused).
    ///
    /// # Panics
    /// Before the handshake completed, once epochs flow, or twice (a bug in the caller).
    pub fn region_key(&mut self, key: RegionKey) -> Message {
        assert!(
            self.phase == StandbyPhase::Idle && self.layout.is_some() && !self.placement,
            "region_key() outside a fresh session"
        );
        self.placement = true;
        Message::RegionKey(key)
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
