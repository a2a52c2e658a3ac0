//! The standby: receives epochs, verifies them and applies them to its backup of the guest.
//!
//! Connections are accepted and authenticated on threads of their own, each within a hard
//! deadline (see [`Standby`]); only an authenticated primary whose guest this host can hold
//! becomes a session. For each epoch: the header is checked against the agreed layout
//! (StandbyCore), the body is read straight into a staging slot (or, for an epoch larger than
//! a slot, through an unlinked temporary file), the page index is validated (aligned, inside
//! guest memory, ascending), the body is hashed, and only when the commit arrives, its
//! checksum matches and (for a checkpoint) its state is restorable ([`RestoreCheck`]) is the
//! epoch applied to the backup and acknowledged. A connection that ends or misbehaves at any
//! point leaves the backup as it was after the last applied epoch, and is told why with a
//! `Refuse` when the fault was the peer's. Heartbeats go out from a thread of their own.
//!
//! The backup is guest memory (vm-memory, the same type the VMM uses, so a VM can later run on
//! it directly) plus the state blob of the last checkpoint epoch. Sync epochs (the initial full
//! copy) are applied too, but the backup is a consistent checkpoint only once a checkpoint
//! epoch has been applied after them ([`Backup::checkpoint`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rmc_staging::{SlotLayout, SlotRing, StagingError};
use rmc_transport::framing::{Abort, FrameReader, FrameWriter, Idle, LinkError};
use rmc_transport::link::{Closer, Conn, Listener, Rx, Transport, Tx};
use rmc_transport::wire::{
    self, auth, EpochHeader, EpochKind, Layout, Message, MsgType, WireError, MAX_STATE_LEN,
    NONCE_LEN,
};
use tracing::{debug, info, warn};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::protocol::{Heartbeat, LayoutRule, ProtocolError, StandbyAction, StandbyCore};
use crate::{BoxError, PAGE_SIZE};
use rmc_guest_api::PAGE_BYTES;

/// Memory of the backup: the VMM's guest memory type, so a VM can run on it.
pub type BackupMemory = GuestMemoryMmap<AtomicBitmap>;

/// What a standby serving another primary answers a new one (which may try again later).
pub const BUSY: &str = "This standby is protecting another primary";

/// Decides whether a checkpoint can become a running VM on this host. The VMM supplies it
/// (it knows its state encoding and its limits); without one the standby checks only what
/// the protocol itself can.
pub trait RestoreCheck: Send + Sync + std::fmt::Debug {
    /// The state encoding version this build restores; primaries announcing another are
    /// refused at the handshake.
    fn state_version(&self) -> u32;
    /// Whether a VM of this layout can be built here (vCPU count, memory size and regions).
    fn check_layout(&self, layout: &Layout) -> Result<(), BoxError>;
    /// Whether this checkpoint's state blob decodes and fits the layout (vCPU count, memory
    /// size): only then is the checkpoint applied and acknowledged.
    fn check_state(&self, state: &[u8], layout: &Layout) -> Result<(), BoxError>;
    /// The standby now holds this checkpoint (applied; its ack goes out next): what the
    /// guest's state carries for the standby to act on, such as console output it shows
    /// (output commit at the standby). Called once per checkpoint, in order. The default does
    /// nothing.
    fn checkpoint_held(&self, state: &[u8]) {
        let _ = state;
    }
}

/// Fencing on the standby's side: only the primary that holds the arbiter's primary key may
/// protect this standby (a primary that was frozen or cut off while another took over is
/// refused at the handshake).
pub trait FenceCheck: Send + Sync + std::fmt::Debug {
    /// Whether a primary presenting the fencing token `fence` (its revision of the arbiter's
    /// primary key; 0 without an arbiter) is the current primary. `Err`: why not.
    fn check_primary(&self, fence: u64) -> Result<(), BoxError>;
}

/// Standby settings.
#[derive(Debug, Clone)]
pub struct StandbyConfig {
    /// The shared secret.
    pub secret: Vec<u8>,
    /// Guest memory size to accept (`None`: whatever the first primary proposes, if this
    /// host can hold it).
    pub memory_bytes: Option<u64>,
    /// Heartbeats.
    pub heartbeat: Heartbeat,
    /// What a checkpoint must satisfy to be acknowledged (`None`: the protocol's checks only).
    pub restore: Option<Arc<dyn RestoreCheck>>,
    /// The longest a connection may take from accept to a verified layout; then it is cut,
    /// whatever it sends.
    pub handshake_timeout: Duration,
    /// Connections handshaking at once; a new one beyond that cuts the oldest (so a flood of
    /// idle connections cannot keep a primary out for longer than its own handshake takes).
    pub max_pending: usize,
    /// Which primaries the arbiter allows (`None`: any that authenticates).
    pub fencing: Option<Arc<dyn FenceCheck>>,
}

impl Default for StandbyConfig {
    fn default() -> Self {
        StandbyConfig {
            secret: Vec::new(),
            memory_bytes: None,
            heartbeat: Heartbeat::default(),
            restore: None,
            handshake_timeout: Duration::from_secs(5),
            max_pending: 16,
            fencing: None,
        }
    }
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
    /// The checkpoint was applied by the latest session, which did not end with a goodbye:
    /// losing that primary is a reason to fail over to it. A goodbye disarms it; so does a
    /// new session until its first checkpoint, unless an arbiter decides (with fencing the
    /// backup stays intact during a re-sync, and the arbiter says whether it is current).
    pub armed: bool,
    /// The session (its token, the primary's Hello nonce) that produced the checkpoint.
    pub lineage: [u8; NONCE_LEN],
    /// The session before, when the latest checkpoint came from a later session of the same
    /// primary timeline (a re-sync): as long as the arbiter still names that earlier session,
    /// its primary released nothing past it, so the newer checkpoint may take over too.
    pub previous_lineage: Option<[u8; NONCE_LEN]>,
}

impl Backup {
    /// The checkpoint's session token as lowercase hex (as the arbiter stores it).
    pub fn lineage_hex(&self) -> String {
        crate::protocol::session_hex(&self.lineage)
    }

    /// The session tokens under which the arbiter may let this backup take over: its own and,
    /// after a re-sync, the session before (see [`Backup::previous_lineage`]).
    pub fn takeover_tokens(&self) -> Vec<String> {
        std::iter::once(self.lineage)
            .chain(self.previous_lineage)
            .map(|t| crate::protocol::session_hex(&t))
            .collect()
    }
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
    /// The handshake did not complete in time.
    #[error("No verified handshake within {0:?}: connection cut")]
    HandshakeTimeout(Duration),
    /// Cut to make room for a newer connection: `max_pending` were handshaking already.
    #[error("Cut during its handshake to make room for a newer connection ({0} were pending)")]
    Evicted(usize),
    /// A primary authenticated while another one is being served.
    #[error("{BUSY}")]
    Busy,
    /// A frame longer than any message allowed before authentication.
    #[error("{ty:?} frame of {len} bytes before authentication (at most {limit})")]
    PreAuthFrame {
        /// Its type.
        ty: MsgType,
        /// Its length.
        len: u64,
        /// The most that type may have there.
        limit: u64,
    },
    /// The primary's guest cannot be built on this host.
    #[error("The primary's guest cannot run on this host: {0}")]
    NotBuildable(BoxError),
    /// The primary is not the one the arbiter names (a stale primary, or one without an
    /// arbiter connecting to a fenced standby).
    #[error("Refused by fencing: {0}")]
    Fenced(BoxError),
    /// A checkpoint that arrived whole and verified, but could not become a running VM: it
    /// is refused and not acknowledged; the backup keeps the checkpoint before it.
    #[error("Checkpoint {epoch} cannot be restored: {reason}")]
    Unrestorable {
        /// The epoch.
        epoch: u64,
        /// Why (the [`RestoreCheck`]'s error).
        reason: BoxError,
    },
    /// The connection ended in the middle of an epoch, which is discarded.
    #[error("Connection closed in the middle of epoch {epoch}; the partial epoch is discarded")]
    Incomplete {
        /// The epoch.
        epoch: u64,
    },
    /// An RDMA-placed body names a slot that still holds an epoch not yet applied.
    #[error("Invalid RDMA placement: epoch {epoch} placed in slot {slot}, which still holds an unapplied epoch")]
    SlotBusy {
        /// The epoch.
        epoch: u64,
        /// The slot.
        slot: u32,
    },
    /// An epoch larger than a slot could not be kept in a temporary file.
    #[error("Epoch {epoch} is larger than a slot and could not be kept in a temporary file")]
    Spill {
        /// The epoch.
        epoch: u64,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Accepting the connection failed.
    #[error("Cannot accept a connection")]
    Accept(#[source] std::io::Error),
}

impl StandbyError {
    /// Whether the peer should be told with a `Refuse` (a protocol or content error); socket
    /// failures and ends of stream are not worth a message.
    fn refusable(&self) -> bool {
        match self {
            StandbyError::Link(LinkError::Wire(_)) => true,
            StandbyError::Link(_)
            | StandbyError::PrimaryLost
            | StandbyError::HandshakeClosed
            | StandbyError::Incomplete { .. }
            | StandbyError::Accept(_) => false,
            StandbyError::Protocol(p) => crate::protocol::refusal(p).is_some(),
            _ => true,
        }
    }
}

/// How a session with an authenticated primary went.
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
    /// The primary's fencing token (0: no arbiter).
    pub fence: u64,
    /// The session token (the primary's Hello nonce): the arbiter names the standby whose
    /// backup is current by it.
    pub token: [u8; NONCE_LEN],
}

impl Session {
    /// How long after the primary's last sign of life its loss was detected.
    pub fn detection_time(&self) -> std::time::Duration {
        self.ended.saturating_duration_since(self.last_heard)
    }
}

/// A connection that did not become a session: its handshake failed, timed out or was
/// refused. It never touches the backup and never causes a failover.
#[derive(Debug)]
pub struct Refusal {
    /// Who connected.
    pub peer: SocketAddr,
    /// Why it was refused.
    pub error: StandbyError,
}

/// A standby listening for its primary.
///
/// Connections are accepted on a thread of their own and each handshake runs on its own
/// thread with a hard deadline (`handshake_timeout`), frames limited to the sizes of the
/// messages allowed before authentication, and at most `max_pending` at once, so no
/// unauthenticated peer can delay an authenticated one. Only a primary that proved the secret
/// and whose layout this standby can hold becomes a [`Session`] ([`Standby::serve_one`]);
/// every other connection is a [`Refusal`] ([`Standby::refusals`]).
#[derive(Debug)]
pub struct Standby {
    local_addr: SocketAddr,
    transport: Transport,
    config: StandbyConfig,
    backup: Option<Backup>,
    ring: Option<SlotRing>,
    shared: Arc<Shared>,
    ready: Receiver<Handshake>,
    refused: Option<Receiver<Refusal>>,
    /// Sync epochs of the current session received while the backup holds a checkpoint
    /// (with fencing): applied together with the session's first checkpoint, so the backup
    /// stays that checkpoint until then, whatever happens to the session.
    deferred: Vec<(EpochHeader, Body)>,
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

impl Standby {
    /// Accepts no more connections (at failover, say). Over TCP a connection of our own wakes
    /// the accepting thread; over RDMA it ends at the next connection attempt.
    pub fn stop_listening(&self) {
        self.shared.closing.store(true, Ordering::Release);
        if self.transport == Transport::Tcp {
            let _ =
                std::net::TcpStream::connect_timeout(&self.local_addr, Duration::from_millis(100));
        }
    }
}

/// What the acceptor and the handshake threads share with the serving loop.
#[derive(Debug)]
struct Shared {
    /// The rule a new primary's layout must satisfy (updated when the backup changes).
    rule: Mutex<LayoutRule>,
    /// A session is being served.
    serving: AtomicBool,
    /// Handshakes under way, oldest first: (id, a handle to cut it, set when it was cut to
    /// make room).
    pending: Mutex<std::collections::VecDeque<(u64, Closer, Arc<AtomicBool>)>>,
    /// The standby is gone: accept nothing more.
    closing: AtomicBool,
}

/// What a session got done, kept when it ends in an error.
struct Progress {
    epochs: u64,
    last_heard: Instant,
}

/// An authenticated connection, handed from its handshake thread to the serving loop.
struct Handshake {
    peer: SocketAddr,
    reader: FrameReader<Rx>,
    writer: FrameWriter<Tx>,
    closer: Closer,
    core: StandbyCore,
    layout: Layout,
    fence: u64,
    token: [u8; NONCE_LEN],
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
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
        let shared = Arc::new(Shared {
            rule: Mutex::new(LayoutRule {
                memory_bytes: config.memory_bytes,
                existing: None,
                state_version: config.restore.as_ref().map(|r| r.state_version()),
                host_bytes: host_memory_bytes(),
            }),
            serving: AtomicBool::new(false),
            pending: Mutex::new(std::collections::VecDeque::new()),
            closing: AtomicBool::new(false),
        });
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (refused_tx, refused) = sync_channel(64);
        let local_addr = listener.local_addr();
        let transport = listener.transport();
        {
            let (config, shared) = (config.clone(), shared.clone());
            std::thread::Builder::new()
                .name("rmc-accept".into())
                .spawn(move || accept_loop(listener, config, shared, ready_tx, refused_tx))?;
        }
        Ok((
            Standby {
                deferred: Vec::new(),
                local_addr,
                transport,
                config,
                backup: None,
                ring: None,
                shared,
                ready,
                refused: Some(refused),
            },
            why,
        ))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The transport it listens with.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The backup, if any primary ever connected.
    pub fn backup(&self) -> Option<&Backup> {
        self.backup.as_ref()
    }

    /// Takes the backup out (to build a VM from it).
    pub fn take_backup(&mut self) -> Option<Backup> {
        self.backup.take()
    }

    /// Whether `session`'s end is a reason to fail over: an authenticated primary that was
    /// protecting a consistent checkpoint was lost (no goodbye).
    pub fn should_fail_over(&self, session: &Session) -> bool {
        session.result.is_err()
            && self
                .backup
                .as_ref()
                .is_some_and(|b| b.armed && b.checkpoint.is_some())
    }

    /// The connections that did not become sessions, as they happen (the first caller takes
    /// the receiver; refusals beyond 64 unread ones are only logged).
    pub fn refusals(&mut self) -> Option<Receiver<Refusal>> {
        self.refused.take()
    }

    /// Bytes this standby holds besides the backup: its staging slots.
    pub fn staging_bytes(&self) -> usize {
        self.ring.as_ref().map_or(0, |r| r.region().len())
    }

    /// Waits for the next primary that completes its handshake and serves it until the
    /// session ends. Connections that fail their handshake do not end this call.
    pub fn serve_one(&mut self) -> Result<Session, StandbyError> {
        let h = self.ready.recv().map_err(|_| {
            StandbyError::Accept(std::io::Error::other("the accepting thread ended"))
        })?;
        self.shared.serving.store(true, Ordering::Release);
        let peer = h.peer;
        let (fence, token) = (h.fence, h.token);
        let mut progress = Progress {
            epochs: 0,
            last_heard: Instant::now(),
        };
        let result = self.serve(h, &mut progress);
        let Progress { epochs, last_heard } = progress;
        let ended = Instant::now();
        match &result {
            Ok(()) => info!(%peer, epochs, "primary closed the connection"),
            Err(e) => warn!(%peer, epochs, "session ended: {}", error_chain(e)),
        }
        let existing = self.backup.as_ref().map(|b| b.layout.clone());
        self.shared.rule.lock().existing = existing;
        self.shared.serving.store(false, Ordering::Release);
        Ok(Session {
            peer,
            epochs,
            result,
            last_heard,
            ended,
            fence,
            token,
        })
    }

    fn serve(&mut self, h: Handshake, progress: &mut Progress) -> Result<(), StandbyError> {
        let Handshake {
            mut reader,
            writer,
            closer,
            mut core,
            layout,
            token,
            ..
        } = h;
        let writer = Arc::new(Mutex::new(writer));
        // Heartbeats go out from their own thread, so that applying a large epoch, a busy CPU
        // or a long read cannot delay them past the primary's timeout.
        let beating = Arc::new(AtomicBool::new(true));
        // 0 until the Accept is out, then the count of messages sent besides heartbeats.
        let sent = Arc::new(AtomicU64::new(0));
        let beat = spawn_heartbeat(
            writer.clone(),
            beating.clone(),
            sent.clone(),
            self.config.heartbeat,
        );
        let result = self.serve_session(
            &mut reader,
            &writer,
            &mut core,
            (&layout, token),
            &sent,
            progress,
        );
        // What a session that ended left unapplied is dropped: the backup is still the last
        // checkpoint.
        self.deferred.clear();
        if let Err(e) = &result {
            if e.refusable() {
                let _ = writer.lock().send(&Message::Refuse {
                    reason: error_chain(e),
                });
            }
        }
        beating.store(false, Ordering::Release);
        closer.close();
        let _ = beat.join();
        result
    }

    fn serve_session(
        &mut self,
        reader: &mut FrameReader<Rx>,
        writer: &Mutex<FrameWriter<Tx>>,
        core: &mut StandbyCore,
        (layout, token): (&Layout, [u8; NONCE_LEN]),
        sent: &AtomicU64,
        progress: &mut Progress,
    ) -> Result<(), StandbyError> {
        // The rule may have changed while this primary was handshaking (another session).
        self.shared
            .rule
            .lock()
            .clone()
            .accepts(layout)
            .map_err(StandbyError::Protocol)?;
        self.prepare(layout)?;
        self.deferred.clear();
        let fenced = self.config.fencing.is_some();
        if let Some(b) = &mut self.backup {
            // Without an arbiter, only this session's checkpoints arm a failover from now on.
            // With one, the backup stays the old checkpoint until this session's first (its
            // sync epochs are deferred) and the arbiter says whether it is still current.
            if !fenced {
                b.armed = false;
            }
        }
        let last = self.backup.as_ref().map_or(0, |b| b.last_applied);
        // A consistent checkpoint's session, so that its primary can resume from it.
        let lineage = self
            .backup
            .as_ref()
            .filter(|b| b.checkpoint == Some(b.last_applied))
            .map_or([0; NONCE_LEN], |b| b.lineage);
        let accept = core.accept_from(last, lineage);
        // RDMA: register the staging region (the only memory the primary may write) and tell
        // the primary where it is, right after the Accept.
        {
            let mut w = writer.lock();
            let key = match w.get_mut().rdma() {
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
            w.send(&accept)?;
            if let Some(key) = key {
                w.send(&core.region_key(key))?;
            }
            // Heartbeats may flow once the primary has its Accept (and RDMA region key).
            sent.store(1, Ordering::Release);
        }
        info!(
            regions = ?layout.regions,
            vcpus = layout.vcpus,
            last_applied = last,
            "primary authenticated; receiving epochs"
        );
        let mut body: Option<Body> = None;
        loop {
            progress.last_heard = reader.last_data();
            let max_body = max_body_len(layout);
            let read = reader.read_header(max_body, &mut idler(core));
            let h = match read {
                Ok(h) => h,
                Err(LinkError::Closed { got: 0, .. }) => {
                    return Err(match core.epoch_in_progress() {
                        Some(epoch) => StandbyError::Incomplete { epoch },
                        // Closed without a Goodbye: the primary is gone.
                        None => StandbyError::PrimaryLost,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            if h.ty == MsgType::EpochBody {
                let header = core.on_body_frame(h.len)?;
                let b = self.receive_body(reader, header, &mut idler(core))?;
                self.received(core, header, b, &mut body)?;
                continue;
            }
            let msg = reader.read_message(h, &mut idler(core))?;
            match core.on_message(msg, auth::nonce(), Instant::now())? {
                StandbyAction::Goodbye => {
                    if let Some(b) = &mut self.backup {
                        // A deliberate end: the backup is released, no failover to it.
                        b.armed = false;
                    }
                    return Ok(());
                }
                StandbyAction::None | StandbyAction::ExpectBody { .. } => {}
                StandbyAction::BodyPlaced { header, slot } => {
                    // RDMA: the body is already in one of our slots.
                    let b = self.placed_body(header, slot)?;
                    self.received(core, header, b, &mut body)?;
                }
                StandbyAction::Send(m) => writer.lock().send(&m)?,
                StandbyAction::Established { .. } => {
                    unreachable!("the handshake completed before the session")
                }
                StandbyAction::Apply(header) => {
                    let b = body.take().expect("core orders apply only after a body");
                    self.check_restorable(&header, &b, layout)?;
                    let defer = fenced
                        && header.kind == EpochKind::Sync
                        && self.backup.as_ref().is_some_and(|b| b.checkpoint.is_some());
                    if defer {
                        // Out of the slot (the primary reuses it after the ack) into a file.
                        let kept = b.into_owned(header.epoch)?;
                        self.deferred.push((header, kept));
                    } else {
                        if header.kind == EpochKind::Checkpoint {
                            for (h, d) in std::mem::take(&mut self.deferred) {
                                self.apply(&h, &d)?;
                            }
                        }
                        self.apply(&header, &b)?;
                        if header.kind == EpochKind::Checkpoint {
                            if let Some(backup) = &mut self.backup {
                                if backup.lineage != token {
                                    // A checkpoint of a new session: the previous one stays
                                    // a valid name for it until the primary records this one.
                                    backup.previous_lineage = (backup.lineage != [0; NONCE_LEN])
                                        .then_some(backup.lineage);
                                    backup.lineage = token;
                                }
                            }
                        }
                    }
                    core.heard(Instant::now());
                    progress.epochs += 1;
                    let ack = core.applied();
                    writer.lock().send(&ack)?;
                    sent.fetch_add(1, Ordering::AcqRel);
                    core.sent(Instant::now());
                }
            }
        }
    }

    /// A checkpoint is acknowledged only if a VM can be built from it here.
    fn check_restorable(
        &self,
        header: &EpochHeader,
        body: &Body,
        layout: &Layout,
    ) -> Result<(), StandbyError> {
        if header.kind != EpochKind::Checkpoint {
            return Ok(());
        }
        let Some(check) = &self.config.restore else {
            return Ok(());
        };
        let state = body.state();
        check
            .check_state(state, layout)
            .map_err(|reason| StandbyError::Unrestorable {
                epoch: header.epoch,
                reason,
            })
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
                armed: false,
                lineage: [0; NONCE_LEN],
                previous_lineage: None,
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

    /// The body the primary RDMA-wrote into our slot `slot` (a slot of the layout: the core
    /// checked).
    fn placed_body(&self, header: EpochHeader, slot: u32) -> Result<Body, StandbyError> {
        let ring = self.ring.as_ref().expect("prepared at handshake");
        let mut s = ring
            .try_acquire_index(slot as usize)
            .ok_or(StandbyError::SlotBusy {
                epoch: header.epoch,
                slot,
            })?;
        // Marks the slot as holding that many pages and state bytes; the bytes are there.
        s.receive_areas(header.page_count as usize, header.state_len as usize)?;
        Ok(Body::Slot(s))
    }

    fn receive_body(
        &mut self,
        reader: &mut FrameReader<Rx>,
        header: EpochHeader,
        idle: &mut Idle<'_>,
    ) -> Result<Body, StandbyError> {
        let pages = header.page_count as usize;
        let state_len = header.state_len as usize;
        let ring = self.ring.as_ref().expect("prepared at handshake");
        let Some(mut slot) = ring.try_acquire().filter(|s| s.capacity() >= pages) else {
            debug!(
                epoch = header.epoch,
                pages, "epoch larger than a slot: its pages go through a temporary file"
            );
            return spill(reader, header, idle);
        };
        let a = slot.receive_areas(pages, state_len)?;
        reader.read_full(a.index, "an epoch's page index", idle)?;
        reader.read_full(a.data, "an epoch's page data", idle)?;
        reader.read_full(a.state, "an epoch's state", idle)?;
        let body = Body::Slot(slot);
        Ok(body)
    }

    fn apply(&mut self, header: &EpochHeader, body: &Body) -> Result<(), StandbyError> {
        let backup = self.backup.as_mut().expect("prepared at handshake");
        let (index, state) = (body.index_bytes(), body.state());
        let mut page = [0u8; PAGE_BYTES];
        for (i, chunk) in index.chunks_exact(8).enumerate() {
            let addr = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let data = match body {
                Body::Slot(s) => &s.data()[i * PAGE_BYTES..(i + 1) * PAGE_BYTES],
                Body::Spilled { file, .. } => {
                    std::os::unix::fs::FileExt::read_exact_at(
                        file,
                        &mut page,
                        i as u64 * PAGE_SIZE,
                    )
                    .map_err(|e| {
                        StandbyError::Backup(format!(
                            "cannot read page {addr:#x} back from its temporary file: {e}"
                        ))
                    })?;
                    &page[..]
                }
            };
            backup
                .memory
                .write_slice(data, GuestAddress(addr))
                .map_err(|e| StandbyError::Backup(format!("cannot write page {addr:#x}: {e}")))?;
        }
        backup.last_applied = header.epoch;
        match header.kind {
            EpochKind::Sync => backup.checkpoint = None,
            EpochKind::Checkpoint => {
                backup.state.clear();
                backup.state.extend_from_slice(state);
                backup.checkpoint = Some(header.epoch);
                backup.armed = true;
                if let Some(check) = &self.config.restore {
                    check.checkpoint_held(state);
                }
            }
        }
        debug!(epoch = header.epoch, pages = index.len() / 8, kind = ?header.kind, "epoch applied");
        Ok(())
    }
}

/// A received epoch body: in a staging slot, or, when larger than a slot, its page index and
/// state in memory and its pages in an unlinked temporary file (so no buffer of the epoch's
/// size is ever needed).
#[derive(Debug)]
enum Body {
    Slot(rmc_staging::Slot),
    Spilled {
        index: Vec<u8>,
        file: std::fs::File,
        state: Vec<u8>,
        checksum: u64,
    },
}

impl Body {
    /// The same body held outside the staging slots (its pages in an unlinked temporary
    /// file), so that its slot can be reused.
    fn into_owned(self, epoch: u64) -> Result<Body, StandbyError> {
        let Body::Slot(s) = self else {
            return Ok(self);
        };
        let fail = |e: std::io::Error| StandbyError::Spill { epoch, source: e };
        let file = temp_file(epoch).map_err(fail)?;
        std::os::unix::fs::FileExt::write_all_at(&file, s.data(), 0).map_err(fail)?;
        Ok(Body::Spilled {
            index: s.index_bytes().to_vec(),
            file,
            state: s.state().to_vec(),
            checksum: wire::checksum(&[s.index_bytes(), s.data(), s.state()]),
        })
    }

    fn index_bytes(&self) -> &[u8] {
        match self {
            Body::Slot(s) => s.index_bytes(),
            Body::Spilled { index, .. } => index,
        }
    }

    fn state(&self) -> &[u8] {
        match self {
            Body::Slot(s) => s.state(),
            Body::Spilled { state, .. } => state,
        }
    }

    fn index(&self) -> Vec<u64> {
        self.index_bytes()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }

    fn checksum(&self) -> u64 {
        match self {
            Body::Slot(s) => wire::checksum(&[s.index_bytes(), s.data(), s.state()]),
            Body::Spilled { checksum, .. } => *checksum,
        }
    }
}

/// Receives an epoch larger than a slot: index and state into memory (8 bytes a page, and at
/// most `MAX_STATE_LEN`), pages through a 1 MiB buffer into an unlinked temporary file,
/// hashing as they pass.
fn spill(
    reader: &mut FrameReader<Rx>,
    header: EpochHeader,
    idle: &mut Idle<'_>,
) -> Result<Body, StandbyError> {
    let pages = header.page_count as usize;
    let fail = |e: std::io::Error| StandbyError::Spill {
        epoch: header.epoch,
        source: e,
    };
    let file = temp_file(header.epoch).map_err(fail)?;
    let mut hash = wire::Hasher::new();
    let mut index = vec![0u8; pages * 8];
    reader.read_full(&mut index, "an epoch's page index", idle)?;
    hash.update(&index);
    let mut chunk = vec![0u8; 256 * PAGE_BYTES];
    let mut left = pages * PAGE_BYTES;
    let mut at = 0u64;
    while left > 0 {
        let n = left.min(chunk.len());
        reader.read_full(&mut chunk[..n], "an epoch's page data", idle)?;
        hash.update(&chunk[..n]);
        std::os::unix::fs::FileExt::write_all_at(&file, &chunk[..n], at).map_err(fail)?;
        at += n as u64;
        left -= n;
    }
    let mut state = vec![0u8; header.state_len as usize];
    reader.read_full(&mut state, "an epoch's state", idle)?;
    hash.update(&state);
    Ok(Body::Spilled {
        index,
        file,
        state,
        checksum: hash.finish(),
    })
}

/// A new temporary file for an epoch's pages, unlinked at once: the pages vanish with the
/// file handle, whatever happens.
fn temp_file(epoch: u64) -> std::io::Result<std::fs::File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "rmc-standby-{}-epoch-{epoch}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// While a read waits: give up when the primary went silent (heartbeats go out from their
/// own thread).
fn idler(core: &mut StandbyCore) -> impl FnMut(Instant) -> Result<(), Abort> + '_ {
    move |last_data| {
        core.heard(last_data);
        core.tick(Instant::now()).map(|_| ()).map_err(Abort::from)
    }
}

/// Sends a heartbeat whenever nothing was sent for an interval (`sent` counts the other
/// messages; 0 until the Accept is out), until `beating` is cleared or a send fails (the
/// session then sees the failure too).
fn spawn_heartbeat(
    writer: Arc<Mutex<FrameWriter<Tx>>>,
    beating: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    hb: Heartbeat,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("rmc-heartbeat".into())
        .spawn(move || {
            let mut seq = 0u64;
            let tick = (hb.interval / 4).max(Duration::from_millis(1));
            let mut next = Instant::now() + hb.interval;
            let mut seen = 0;
            while beating.load(Ordering::Acquire) {
                std::thread::sleep(tick);
                let now_sent = sent.load(Ordering::Acquire);
                if now_sent != seen {
                    // Something else went out: the primary heard from us.
                    seen = now_sent;
                    next = Instant::now() + hb.interval;
                    continue;
                }
                if now_sent == 0 || Instant::now() < next {
                    continue;
                }
                seq += 1;
                if writer.lock().send(&Message::Heartbeat { seq }).is_err() {
                    return;
                }
                next = Instant::now() + hb.interval;
            }
        })
        .expect("spawn heartbeat thread")
}

/// Accepts connections and starts a handshake thread for each, at most `max_pending` at once.
fn accept_loop(
    listener: Listener,
    config: StandbyConfig,
    shared: Arc<Shared>,
    ready: Sender<Handshake>,
    refused: SyncSender<Refusal>,
) {
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                warn!("accepting a connection failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(closer) = conn.closer() else {
            continue;
        };
        let evicted = Arc::new(AtomicBool::new(false));
        let id = next_id;
        next_id += 1;
        {
            let mut pending = shared.pending.lock();
            while pending.len() >= config.max_pending.max(1) {
                let (_, oldest, flag) = pending.pop_front().expect("not empty");
                flag.store(true, Ordering::Release);
                oldest.close();
            }
            pending.push_back((id, closer, evicted.clone()));
        }
        let (config, shared, ready, refused) = (
            config.clone(),
            shared.clone(),
            ready.clone(),
            refused.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("rmc-handshake".into())
            .spawn(move || {
                let result = handshake(conn, peer, &config, &shared);
                let mut pending = shared.pending.lock();
                let n = pending.len();
                pending.retain(|(i, ..)| *i != id);
                drop(pending);
                let result = match result {
                    Err(_) if evicted.load(Ordering::Acquire) => Err(StandbyError::Evicted(n)),
                    r => r,
                };
                match result {
                    Ok(h) => {
                        info!(%peer, "primary authenticated");
                        if ready.send(h).is_err() {
                            // The standby is gone.
                        }
                    }
                    Err(e) => refuse(&refused, peer, e),
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start a handshake thread: {e}");
        }
    }
}

fn refuse(refused: &SyncSender<Refusal>, peer: SocketAddr, error: StandbyError) {
    warn!(%peer, "connection refused: {}", error_chain(&error));
    let _ = refused.try_send(Refusal { peer, error });
}

/// The most a frame of each type may carry before the primary is authenticated.
fn pre_auth_limit(ty: MsgType) -> u64 {
    match ty {
        MsgType::Hello => 8 + 2 + NONCE_LEN as u64,
        MsgType::Auth => NONCE_LEN as u64 + 28 + 16 * 16 + 8,
        MsgType::Refuse => wire::MAX_REASON_LEN as u64,
        _ => 16,
    }
}

/// Authenticates a new connection and checks its layout, within the handshake deadline.
fn handshake(
    conn: Conn,
    peer: SocketAddr,
    config: &StandbyConfig,
    shared: &Shared,
) -> Result<Handshake, StandbyError> {
    let hb = config.heartbeat;
    let (rx, tx, closer) = conn.split(hb.interval / 2, hb.timeout)?;
    // A hard deadline, whatever the peer sends (a byte now and then keeps a read going): a
    // watchdog cuts the connection when it passes.
    let deadline = config.handshake_timeout;
    let done = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let cut = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, cut) = (done.clone(), cut.clone());
        let closer = closer.try_clone().map_err(|source| LinkError::Io {
            what: "setting up the handshake deadline",
            source,
        })?;
        std::thread::Builder::new()
            .name("rmc-handshake-deadline".into())
            .spawn(move || {
                let (lock, cv) = &*done;
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (guard, _) = cv
                    .wait_timeout_while(guard, deadline, |finished| !*finished)
                    .unwrap_or_else(|e| e.into_inner());
                if !*guard {
                    cut.store(true, Ordering::Release);
                    closer.close();
                }
            })
            .map_err(|source| LinkError::Io {
                what: "starting the handshake deadline",
                source,
            })?
    };
    let mut reader = FrameReader::new(rx);
    let mut writer = FrameWriter::new(tx);
    let result = authenticate(&mut reader, &mut writer, config, shared);
    {
        let (lock, cv) = &*done;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
    let _ = watchdog.join();
    let result = match result {
        Err(_) if cut.load(Ordering::Acquire) => Err(StandbyError::HandshakeTimeout(deadline)),
        r => r,
    };
    match result {
        Ok((core, layout, fence, token)) => Ok(Handshake {
            peer,
            reader,
            writer,
            closer,
            core,
            layout,
            fence,
            token,
        }),
        Err(e) => {
            if e.refusable() {
                let _ = writer.send(&Message::Refuse {
                    reason: error_chain(&e),
                });
            }
            closer.close();
            Err(e)
        }
    }
}

fn authenticate(
    reader: &mut FrameReader<Rx>,
    writer: &mut FrameWriter<Tx>,
    config: &StandbyConfig,
    shared: &Shared,
) -> Result<(StandbyCore, Layout, u64, [u8; NONCE_LEN]), StandbyError> {
    let rule = shared.rule.lock().clone();
    let mut core = StandbyCore::new(&config.secret, rule, 0, config.heartbeat, Instant::now());
    let mut idle = |_| Ok(());
    loop {
        let h = match reader.read_header(0, &mut idle) {
            Ok(h) => h,
            Err(LinkError::Closed { got: 0, .. }) => return Err(StandbyError::HandshakeClosed),
            Err(e) => return Err(e.into()),
        };
        let limit = pre_auth_limit(h.ty);
        if h.len > limit {
            return Err(StandbyError::PreAuthFrame {
                ty: h.ty,
                len: h.len,
                limit,
            });
        }
        let msg = reader.read_message(h, &mut idle)?;
        match core.on_message(msg, auth::nonce(), Instant::now())? {
            StandbyAction::Send(m) => writer.send(&m)?,
            StandbyAction::Established {
                layout,
                fence,
                session,
                ..
            } => {
                if let Some(check) = &config.restore {
                    check
                        .check_layout(&layout)
                        .map_err(StandbyError::NotBuildable)?;
                }
                if let Some(f) = &config.fencing {
                    f.check_primary(fence).map_err(StandbyError::Fenced)?;
                }
                if shared.serving.load(Ordering::Acquire) {
                    return Err(StandbyError::Busy);
                }
                return Ok((core, layout, fence, session));
            }
            // Nothing else is allowed before the handshake completes (the core refuses it).
            _ => unreachable!("the core allows only the handshake here"),
        }
    }
}

/// The memory this host has (`MemTotal`), for bounding what a primary may make the standby
/// allocate.
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
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
