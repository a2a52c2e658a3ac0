//! The standby: receives epochs, verifies them and applies them to its backup of the guest.
//!
//! For each epoch: the header is checked against the agreed layout (StandbyCore), the body is
//! read straight into a staging slot (or, for an epoch larger than a slot, into a buffer of its
//! exact size), the page index is validated (aligned, inside guest memory, ascending), the body
//! is hashed, and only when the commit arrives and its checksum matches is the epoch applied to
//! the backup and acknowledged. A connection that ends or misbehaves at any point leaves the
//! backup as it was after the last applied epoch; the standby then accepts a new connection.
//!
//! The backup is guest memory (vm-memory, the same type the VMM uses, so a VM can later run on
//! it directly) plus the state blob of the last checkpoint epoch. Sync epochs (the initial full
//! copy) are applied too, but the backup is a consistent checkpoint only once a checkpoint
//! epoch has been applied after them ([`Backup::checkpoint`]).

use std::net::SocketAddr;
use std::time::Instant;

use rmc_staging::{SlotLayout, SlotRing, StagingError};
use rmc_transport::link::{Conn, Listener, Rx, Transport, Tx};
use rmc_transport::tcp::{FrameReader, FrameWriter, LinkError};
use rmc_transport::wire::{
    self, auth, EpochHeader, EpochKind, Layout, Message, MsgType, WireError, MAX_STATE_LEN,
};
use tracing::{debug, info};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::core::{Heartbeat, LayoutRule, ProtocolError, StandbyAction, StandbyCore};

/// Memory of the backup: the VMM's guest memory type, so a VM can run on it.
pub type BackupMemory = GuestMemoryMmap<AtomicBitmap>;

/// Standby settings.
#[derive(Debug, Clone)]
pub struct StandbyConfig {
    /// The shared secret.
    pub secret: Vec<u8>,
    /// Guest memory size to accept (`None`: whatever the first primary proposes).
    pub memory_bytes: Option<u64>,
    /// Heartbeats.
    pub heartbeat: Heartbeat,
}

/// The standby's copy of the guest.
#[derive(Debug)]
pub struct Backup {
    /// Guest memory.
    pub memory: BackupMemory,
    /// Its layout.
    pub layout: Layout,
    /// vCPU and device state of the last checkpoint epoch.
    pub state: Vec<u8>,
    /// Last epoch applied.
    pub last_applied: u64,
    /// The checkpoint epoch the backup is a consistent image of; `None` while it is not one
    /// (before the first checkpoint, or after sync epochs of a new session).
    pub checkpoint: Option<u64>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    /// Socket trouble or a malformed frame.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The primary broke the protocol, failed to authenticate or went silent.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The page index of an epoch is invalid.
    #[error("Epoch {epoch} has an invalid page index")]
    Index {
        /// The epoch.
        epoch: u64,
        /// What is wrong.
        #[source]
        source: WireError,
    },
    /// Staging could not be set up.
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// The backup could not be allocated or written.
    #[error("Backup memory: {0}")]
    Backup(String),
    /// The connection ended without a Goodbye: the primary died or was cut off.
    #[error("Connection closed by the primary without a goodbye: the primary is lost")]
    PrimaryLost,
    /// The primary closed the connection before the handshake completed.
    #[error("Connection closed by the primary during the handshake")]
    HandshakeClosed,
    /// The connection ended in the middle of an epoch, which is discarded.
    #[error("Connection closed in the middle of epoch {epoch}; the partial epoch is discarded")]
    Incomplete {
        /// The epoch.
        epoch: u64,
    },
    /// An RDMA-placed body names a slot it cannot be in.
    #[error("Invalid RDMA placement: {0}")]
    Placement(String),
    /// Accepting the connection failed.
    #[error("Cannot accept a connection")]
    Accept(#[source] std::io::Error),
}

/// How a connection went.
#[derive(Debug)]
pub struct Session {
    /// The primary's address.
    pub peer: SocketAddr,
    /// Epochs applied in this session.
    pub epochs: u64,
    /// How it ended: `Ok` when the primary said goodbye; any error means the primary is lost
    /// or misbehaved.
    pub result: Result<(), StandbyError>,
    /// When the last bytes from the primary arrived.
    pub last_heard: Instant,
    /// When the standby declared the session over.
    pub ended: Instant,
}

impl Session {
    /// How long after the primary's last sign of life its loss was detected.
    pub fn detection_time(&self) -> std::time::Duration {
        self.ended.saturating_duration_since(self.last_heard)
    }
}

/// A standby listening for its primary.
#[derive(Debug)]
pub struct Standby {
    listener: Listener,
    config: StandbyConfig,
    backup: Option<Backup>,
    ring: Option<SlotRing>,
}

impl Standby {
    /// Listens on `addr` over TCP.
    pub fn bind(addr: SocketAddr, config: StandbyConfig) -> std::io::Result<Self> {
        Ok(Self::bind_with(addr, Transport::Tcp, config)?.0)
    }

    /// Listens on `addr` with `transport` (`Auto`: RDMA if a usable RDMA device serves the
    /// address); also returns why that transport was chosen.
    pub fn bind_with(
        addr: SocketAddr,
        transport: Transport,
        config: StandbyConfig,
    ) -> std::io::Result<(Self, String)> {
        let (listener, why) = Listener::bind(addr, transport)?;
        Ok((
            Standby {
                listener,
                config,
                backup: None,
                ring: None,
            },
            why,
        ))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// The transport it listens with.
    pub fn transport(&self) -> Transport {
        self.listener.transport()
    }

    /// The backup, if any primary ever connected.
    pub fn backup(&self) -> Option<&Backup> {
        self.backup.as_ref()
    }

    /// Takes the backup out (to build a VM from it).
    pub fn take_backup(&mut self) -> Option<Backup> {
        self.backup.take()
    }

    /// Bytes this standby holds besides the backup: its staging slots.
    pub fn staging_bytes(&self) -> usize {
        self.ring.as_ref().map_or(0, |r| r.region().len())
    }

    /// Accepts one connection and serves it until it ends.
    pub fn serve_one(&mut self) -> Result<Session, StandbyError> {
        let (conn, peer) = self.listener.accept().map_err(StandbyError::Accept)?;
        info!(%peer, transport = %conn.transport(), "primary connected");
        let mut epochs = 0;
        let mut last_heard = Instant::now();
        let result = self.serve(conn, &mut epochs, &mut last_heard);
        let ended = Instant::now();
        match &result {
            Ok(()) => info!(%peer, epochs, "primary closed the connection"),
            Err(e) => info!(%peer, epochs, "connection ended: {}", error_chain(e)),
        }
        Ok(Session {
            peer,
            epochs,
            result,
            last_heard,
            ended,
        })
    }

    fn serve(
        &mut self,
        conn: Conn,
        epochs: &mut u64,
        last_heard: &mut Instant,
    ) -> Result<(), StandbyError> {
        let (rx, tx, _closer) = conn.split(
            self.config.heartbeat.interval / 2,
            self.config.heartbeat.timeout,
        )?;
        let mut reader = FrameReader::new(rx);
        let mut writer = FrameWriter::new(tx);
        let rule = LayoutRule {
            memory_bytes: self.config.memory_bytes,
            existing: self.backup.as_ref().map(|b| b.layout.clone()),
        };
        let last = self.backup.as_ref().map_or(0, |b| b.last_applied);
        let mut core = StandbyCore::new(
            &self.config.secret,
            rule,
            last,
            self.config.heartbeat,
            Instant::now(),
        );
        let mut body: Option<Body> = None;
        loop {
            *last_heard = reader.last_data();
            let max_body = core.layout().map_or(0, max_body_len);
            let read = reader.read_header(max_body, &mut idler(&mut core, &mut writer));
            let h = match read {
                Ok(h) => h,
                Err(LinkError::Closed { got: 0, .. }) => {
                    return Err(match core.epoch_in_progress() {
                        Some(epoch) => StandbyError::Incomplete { epoch },
                        None if core.in_handshake() => StandbyError::HandshakeClosed,
                        // Closed without a Goodbye: the primary is gone.
                        None => StandbyError::PrimaryLost,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            if h.ty == MsgType::BodyPlaced {
                // RDMA: the body is already in one of our slots.
                let msg = reader.read_message(h, &mut idler(&mut core, &mut writer))?;
                let Message::BodyPlaced { slot, len } = msg else {
                    unreachable!("decoded by type")
                };
                if writer.get_mut().rdma().is_none() {
                    return Err(StandbyError::Placement(
                        "BodyPlaced on a TCP connection".into(),
                    ));
                }
                let header = core.on_body_frame(len)?;
                let b = self.placed_body(header, slot)?;
                self.received(&mut core, header, b, &mut body)?;
                continue;
            }
            if h.ty == MsgType::EpochBody {
                let header = core.on_body_frame(h.len)?;
                let b =
                    self.receive_body(&mut reader, header, &mut idler(&mut core, &mut writer))?;
                self.received(&mut core, header, b, &mut body)?;
                continue;
            }
            let msg = reader.read_message(h, &mut idler(&mut core, &mut writer))?;
            let action = crate::refuse_on_error(
                core.on_message(msg, auth::nonce(), Instant::now()),
                &mut writer,
            )?;
            match action {
                StandbyAction::Goodbye => return Ok(()),
                StandbyAction::None | StandbyAction::ExpectBody { .. } => {}
                StandbyAction::Send(m) => writer.send(&m)?,
                StandbyAction::Established { layout, accept } => {
                    self.prepare(&layout)?;
                    // RDMA: register the staging region (the only memory the primary may
                    // write) and tell the primary where it is, right after the Accept.
                    let key = match writer.get_mut().rdma() {
                        Some(tx) => {
                            let ring = self.ring.as_ref().expect("prepared");
                            Some(tx.expose(ring).map_err(|source| LinkError::Io {
                                what: "registering the staging region for RDMA",
                                source,
                            })?)
                        }
                        None => None,
                    };
                    core.heard(Instant::now());
                    writer.send(&accept)?;
                    if let Some(key) = key {
                        writer.send(&Message::RegionKey(key))?;
                    }
                    core.sent(Instant::now());
                    info!(
                        regions = ?layout.regions,
                        vcpus = layout.vcpus,
                        last_applied = last,
                        "primary authenticated; receiving epochs"
                    );
                }
                StandbyAction::Apply(header) => {
                    let b = body.take().expect("core orders apply only after a body");
                    self.apply(&header, &b)?;
                    core.heard(Instant::now());
                    *epochs += 1;
                    let ack = core.applied();
                    writer.send(&ack)?;
                    core.sent(Instant::now());
                }
            }
        }
    }

    /// Allocates the backup (first session, or a new layout) and the staging slots.
    fn prepare(&mut self, layout: &Layout) -> Result<(), StandbyError> {
        if self
            .backup
            .as_ref()
            .is_none_or(|b| b.layout.regions != layout.regions)
        {
            let ranges: Vec<_> = layout
                .regions
                .iter()
                .map(|&(b, l)| (GuestAddress(b), l as usize))
                .collect();
            let memory = BackupMemory::from_ranges(&ranges).map_err(|e| {
                StandbyError::Backup(format!("cannot allocate {:?}: {e}", layout.regions))
            })?;
            self.backup = Some(Backup {
                memory,
                layout: layout.clone(),
                state: Vec::new(),
                last_applied: 0,
                checkpoint: None,
            });
        }
        let slot_layout = SlotLayout {
            slot_pages: layout.slot_pages as usize,
            max_state: MAX_STATE_LEN as usize,
        };
        if self.ring.as_ref().is_none_or(|r| {
            r.region().layout() != slot_layout
                || r.region().slot_count() != layout.slot_count as usize
        }) {
            self.ring = None;
            self.ring = Some(SlotRing::new(slot_layout, layout.slot_count as usize)?);
        }
        if let Some(b) = &mut self.backup {
            b.layout = layout.clone();
        }
        Ok(())
    }

    /// Checks a received body's index and records its checksum with the core.
    fn received(
        &self,
        core: &mut StandbyCore,
        header: EpochHeader,
        b: Body,
        body: &mut Option<Body>,
    ) -> Result<(), StandbyError> {
        let layout = core.layout().expect("established");
        let index = b.index();
        wire::validate_index(&index, layout).map_err(|source| StandbyError::Index {
            epoch: header.epoch,
            source,
        })?;
        core.body_received(b.checksum(), Instant::now())?;
        *body = Some(b);
        Ok(())
    }

    /// The body the primary RDMA-wrote into our slot `slot`.
    fn placed_body(&self, header: EpochHeader, slot: u32) -> Result<Body, StandbyError> {
        let ring = self.ring.as_ref().expect("prepared at handshake");
        let count = ring.region().slot_count();
        let mut s = ring.try_acquire_index(slot as usize).ok_or_else(|| {
            StandbyError::Placement(if slot as usize >= count {
                format!("epoch {} placed in slot {slot} of {count}", header.epoch)
            } else {
                format!(
                    "epoch {} placed in slot {slot}, which still holds an unapplied epoch",
                    header.epoch
                )
            })
        })?;
        // Marks the slot as holding that many pages and state bytes; the bytes are there.
        s.receive_areas(header.page_count as usize, header.state_len as usize)?;
        Ok(Body::Slot(s))
    }

    fn receive_body(
        &mut self,
        reader: &mut FrameReader<Rx>,
        header: EpochHeader,
        idle: &mut dyn FnMut(Instant) -> Result<(), String>,
    ) -> Result<Body, StandbyError> {
        let pages = header.page_count as usize;
        let state_len = header.state_len as usize;
        let ring = self.ring.as_ref().expect("prepared at handshake");
        let mut body = match ring.try_acquire() {
            Some(slot) if slot.capacity() >= pages => Body::Slot(slot),
            _ => Body::Buffer {
                bytes: vec![0u8; pages * (8 + 4096) + state_len],
                pages,
            },
        };
        match &mut body {
            Body::Slot(slot) => {
                let a = slot.receive_areas(pages, state_len)?;
                reader.read_full(a.index, "an epoch's page index", idle)?;
                reader.read_full(a.data, "an epoch's page data", idle)?;
                reader.read_full(a.state, "an epoch's state", idle)?;
            }
            Body::Buffer { bytes, .. } => {
                debug!(
                    epoch = header.epoch,
                    pages, "epoch larger than a slot: buffered"
                );
                reader.read_full(bytes, "an epoch body", idle)?;
            }
        }
        Ok(body)
    }

    fn apply(&mut self, header: &EpochHeader, body: &Body) -> Result<(), StandbyError> {
        let backup = self.backup.as_mut().expect("prepared at handshake");
        let (index, data, state) = body.parts();
        for (i, chunk) in index.chunks_exact(8).enumerate() {
            let addr = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            backup
                .memory
                .write_slice(&data[i * 4096..(i + 1) * 4096], GuestAddress(addr))
                .map_err(|e| StandbyError::Backup(format!("cannot write page {addr:#x}: {e}")))?;
        }
        backup.last_applied = header.epoch;
        match header.kind {
            EpochKind::Sync => backup.checkpoint = None,
            EpochKind::Checkpoint => {
                backup.state.clear();
                backup.state.extend_from_slice(state);
                backup.checkpoint = Some(header.epoch);
            }
        }
        debug!(epoch = header.epoch, pages = index.len() / 8, kind = ?header.kind, "epoch applied");
        Ok(())
    }
}

/// A received epoch body: in a staging slot, or in a buffer when larger than a slot.
enum Body {
    Slot(rmc_staging::Slot),
    Buffer { bytes: Vec<u8>, pages: usize },
}

impl Body {
    fn parts(&self) -> (&[u8], &[u8], &[u8]) {
        match self {
            Body::Slot(s) => (s.index_bytes(), s.data(), s.state()),
            Body::Buffer { bytes, pages } => {
                let (index, rest) = bytes.split_at(pages * 8);
                let (data, state) = rest.split_at(pages * 4096);
                (index, data, state)
            }
        }
    }

    fn index(&self) -> Vec<u64> {
        self.parts()
            .0
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }

    fn checksum(&self) -> u64 {
        let (i, d, s) = self.parts();
        wire::checksum(&[i, d, s])
    }
}

/// While a read waits: send heartbeats when due, give up when the primary went silent.
fn idler<'a>(
    core: &'a mut StandbyCore,
    writer: &'a mut FrameWriter<Tx>,
) -> impl FnMut(Instant) -> Result<(), String> + 'a {
    move |last_data| {
        core.heard(last_data);
        idle_tick(core, writer)
    }
}

fn idle_tick(core: &mut StandbyCore, writer: &mut FrameWriter<Tx>) -> Result<(), String> {
    match core.tick(Instant::now()) {
        Ok(Some(hb)) => writer.send(&hb).map_err(|e| error_chain(&e)),
        Ok(None) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn max_body_len(l: &Layout) -> u64 {
    l.total_pages() * (8 + u64::from(l.page_size)) + u64::from(MAX_STATE_LEN)
}

/// An error with its sources, for one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
