//! The primary: protects a [`Guest`] by sending a checkpoint of it to a standby every epoch.
//!
//! ```text
//! connect, handshake (PrimaryCore)
//! full sync while the guest runs: every page, then the pages dirtied meanwhile, in rounds,
//!   as Sync epochs (chunks of at most one slot), until few pages are left
//! loop:
//!   wait for the epoch deadline (or --max-dirty-pages dirtied: peeked every DIRTY_PEEK_EVERY,
//!     or output waiting: the guest's waker sends an event, and the minimum spacing passed)
//!     (when: protocol::Scheduler; this loop waits for its events until Scheduler::poll_timeout)
//!   wait for a free slot (the guest keeps running; the epoch gets longer)
//!   PAUSE: harvest, save state, gather pages + state into the slot        <- the pause
//!   RESUME
//!   hand the slot to the sender thread (checksum + vectored write happen there)
//!   on ack(e): release the slots of epochs <= e
//! ```
//!
//! Threads: this loop (which owns the protocol core), a sender thread that writes epochs, and
//! a reader thread that reads acks and heartbeats. When the connection fails, the dirty sets of
//! every unacknowledged epoch are put back into the guest's dirty log, so nothing is lost.
//!
//! An epoch with more dirty pages than a slot holds cannot be staged; it is sent in
//! slot-sized pieces while the guest stays paused (a long pause, logged as a warning: raise
//! `--slot-pages` or lower `--max-dirty-pages`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rmc_staging::{Slot, SlotLayout, SlotRing, StagingError};
use rmc_transport::framing::{FrameReader, FrameWriter, LinkError};
use rmc_transport::link::{Closer, Conn, Rx, Transport, Tx};
use rmc_transport::wire::{self, auth, EpochHeader, EpochKind, Layout, Message, MAX_STATE_LEN};
use tracing::{debug, info, warn};
use vm_memory::GuestAddress;

use crate::protocol::{
    earliest, Heartbeat, InFlight, OutputTrigger, PrimaryAction, PrimaryCore, ProtocolError,
    ResumePoint, SchedulePolicy, Scheduler, Step, SyncStep, Trigger,
};
use crate::{BoxError, DirtySet, Guest, GuestError, OutputWaker, PAGE_SIZE};

/// Sync epochs carry at most this many pages (32 MiB), so none keeps the standby busy long.
const SYNC_CHUNK_PAGES: usize = 8192;

/// Fencing on the primary's side (the arbiter, seen from the protocol).
pub trait Fencing: Send + Sync + std::fmt::Debug {
    /// The fencing token stamped into the handshake: the arbiter's revision of the primary
    /// key this primary holds.
    fn fence(&self) -> u64;
    /// The standby of session `token` (hex of the primary's Hello nonce) now holds a
    /// consistent checkpoint: record it as the one that may take over. Called before the
    /// first output of a session is released; an error keeps the output held and ends the
    /// session.
    fn standby_current(&self, token: &str) -> Result<(), BoxError>;
}

/// Where the last session of a primary ended, shared by its sessions (clones of one config):
/// a standby that reconnects with that session's checkpoint resumes from it.
#[derive(Debug, Clone, Default)]
pub struct Lineage(Arc<Mutex<Option<ResumePoint>>>);

impl Lineage {
    /// Where the last session ended, if any.
    pub fn get(&self) -> Option<ResumePoint> {
        *self.0.lock()
    }

    fn set(&self, p: ResumePoint) {
        *self.0.lock() = Some(p);
    }
}

/// Primary settings.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// The standby's address.
    pub standby: SocketAddr,
    /// The transport (`Auto`: RDMA when it reaches the standby, TCP otherwise).
    pub transport: Transport,
    /// The shared secret.
    pub secret: Vec<u8>,
    /// Time between checkpoints.
    pub epoch_interval: Duration,
    /// End an epoch early once this many pages are dirty.
    pub max_dirty_pages: usize,
    /// End an epoch early when the guest has output waiting (`None`: never; see
    /// [`OutputTrigger`]).
    pub output_trigger: Option<OutputTrigger>,
    /// Read the dirty log while the guest runs (default): the full sync goes in rounds while
    /// it runs, and epochs are peeked at to end them at `max_dirty_pages`. `false`: only
    /// while it is paused; the first checkpoint then carries everything dirtied during the
    /// full sync, and `max_dirty_pages` does not end epochs. For platforms where reading the
    /// dirty log of a running guest is not safe: nested KVM under QEMU's emulation, where a
    /// Linux guest triple-faults within a minute of such reads (docs/DEVELOPING.md).
    pub live_dirty_reads: bool,
    /// Pages per staging slot.
    pub slot_pages: usize,
    /// Number of staging slots.
    pub slots: usize,
    /// Heartbeats.
    pub heartbeat: Heartbeat,
    /// How often to log a summary line (info level).
    pub summary_every: Duration,
    /// Stop by itself after protecting this long (counted from the end of the full sync), as
    /// if `stop` had been set.
    pub protect_for: Option<Duration>,
    /// The longest to wait for the standby's Accept: it allocates the backup and its staging
    /// slots first (and registers them for RDMA), which for a large guest on a busy machine
    /// takes seconds.
    pub handshake_timeout: Duration,
    /// The arbiter (`None`: no fencing).
    pub fencing: Option<Arc<dyn Fencing>>,
    /// Where the previous session ended (shared by the clones of this config).
    pub lineage: Lineage,
}

impl PrimaryConfig {
    /// Defaults for a guest of `guest_pages` pages: slots of an eighth of the guest (between
    /// 1,024 and 65,536 pages), two of them, epochs end early at half a slot.
    pub fn new(standby: SocketAddr, secret: Vec<u8>, guest_pages: u64) -> Self {
        let slot_pages = (guest_pages / 8).clamp(1024, 65_536) as usize;
        PrimaryConfig {
            standby,
            transport: Transport::Tcp,
            secret,
            epoch_interval: Duration::from_millis(20),
            max_dirty_pages: slot_pages / 2,
            output_trigger: Some(OutputTrigger::default()),
            live_dirty_reads: true,
            slot_pages,
            slots: 2,
            heartbeat: Heartbeat::default(),
            summary_every: Duration::from_secs(5),
            protect_for: None,
            handshake_timeout: Duration::from_secs(30),
            fencing: None,
            lineage: Lineage::default(),
        }
    }

    /// The same with this transport and heartbeat.
    pub fn with_link(mut self, transport: Transport, heartbeat: Heartbeat) -> Self {
        self.transport = transport;
        self.heartbeat = heartbeat;
        self
    }
}

/// Why the primary stopped protecting.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// The connection failed.
    #[error("Link to the standby failed")]
    Link(#[from] LinkError),
    /// The standby broke the protocol, refused, or went silent.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The guest failed (pause, harvest, state).
    #[error("Guest operation failed: {0}")]
    Guest(GuestError),
    /// Staging failed.
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// The arbiter could not record the standby as current: its output stays held.
    #[error("The arbiter could not record the standby as current: {0}")]
    Fence(BoxError),
}

/// Figures of a protection run.
#[derive(Debug)]
pub struct PrimaryStats {
    /// Checkpoint epochs acknowledged.
    pub checkpoints_acked: u64,
    /// Last acknowledged epoch.
    pub last_acked: u64,
    /// Pages sent during the full sync.
    pub sync_pages: u64,
    /// Pause of the first checkpoint.
    pub first_pause: Option<Duration>,
    /// Pause per checkpoint (vCPUs stopped), microseconds.
    pub pause_us: Histogram<u64>,
    /// Stopping the vCPUs (part of the pause), microseconds.
    pub stop_us: Histogram<u64>,
    /// Harvesting the dirty log (part of the pause), microseconds.
    pub harvest_us: Histogram<u64>,
    /// Saving vCPU and device state (part of the pause), microseconds.
    pub state_us: Histogram<u64>,
    /// Copying pages and state into the staging slot (part of the pause), microseconds.
    pub stage_us: Histogram<u64>,
    /// Writing the epoch to the transport (checksum + send, guest running), microseconds.
    pub transmit_us: Histogram<u64>,
    /// From the end of the write to the ack, microseconds (1 when the ack was seen before the
    /// sender reported the write done: on RDMA the standby can answer while the sender is
    /// still returning from posting the commit).
    pub commit_ack_us: Histogram<u64>,
    /// From the start of the pause to the ack, microseconds.
    pub e2e_us: Histogram<u64>,
    /// Bytes of checkpoint epochs sent (headers, index, pages, state, commit).
    pub checkpoint_bytes: u64,
    /// Dirty pages per checkpoint.
    pub pages: Histogram<u64>,
    /// From handing an epoch to the sender until its ack, microseconds.
    pub ack_us: Histogram<u64>,
    /// Epochs too large for a slot (sent while paused).
    pub oversize: u64,
    /// Checkpoints taken because output was waiting ([`Trigger::Output`]).
    pub output_checkpoints: u64,
    /// How long the full sync took.
    pub sync_time: Duration,
    /// How long checkpoints were taken (from the end of the full sync to the last ack).
    pub protected_time: Duration,
}

impl PrimaryStats {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        PrimaryStats {
            checkpoints_acked: 0,
            last_acked: 0,
            sync_pages: 0,
            first_pause: None,
            pause_us: h(),
            stop_us: h(),
            harvest_us: h(),
            state_us: h(),
            stage_us: h(),
            transmit_us: h(),
            commit_ack_us: h(),
            e2e_us: h(),
            checkpoint_bytes: 0,
            pages: h(),
            ack_us: h(),
            oversize: 0,
            output_checkpoints: 0,
            sync_time: Duration::ZERO,
            protected_time: Duration::ZERO,
        }
    }
}

struct Payload {
    _slot: Option<Arc<Slot>>,
    dirty: DirtySet,
    /// When the checkpoint's pause began (None for sync epochs).
    paused_at: Option<Instant>,
}

/// Pairs each checkpoint's end of write (reported by the sender thread) with its ack (read by
/// the reader thread) to time commit-to-ack. The two reports reach the loop in either order:
/// on RDMA the standby's ack can arrive while the sender is still returning from posting the
/// commit. Both come in epoch order, so a report for epoch `e` drops the other side's older
/// entries (epochs that will never be paired: a failed write, a lost connection).
#[derive(Debug, Default)]
struct WriteAckPairs {
    written: VecDeque<(u64, Instant)>,
    acked: VecDeque<(u64, Instant)>,
}

impl WriteAckPairs {
    /// Checkpoint `epoch` was written by `t`: its commit-to-ack time if its ack came first.
    fn written(&mut self, epoch: u64, t: Instant) -> Option<Duration> {
        Self::pair(&mut self.acked, &mut self.written, epoch, t)
            .map(|acked| acked.saturating_duration_since(t))
    }

    /// Checkpoint `epoch` was acknowledged at `t`: its commit-to-ack time if it was reported
    /// written first.
    fn acked(&mut self, epoch: u64, t: Instant) -> Option<Duration> {
        Self::pair(&mut self.written, &mut self.acked, epoch, t)
            .map(|written| t.saturating_duration_since(written))
    }

    /// The other side's time for `epoch`, or `None` after remembering `t` on this side.
    fn pair(
        other: &mut VecDeque<(u64, Instant)>,
        this: &mut VecDeque<(u64, Instant)>,
        epoch: u64,
        t: Instant,
    ) -> Option<Instant> {
        while other.front().is_some_and(|&(e, _)| e < epoch) {
            other.pop_front();
        }
        match other.front() {
            Some(&(e, at)) if e == epoch => {
                other.pop_front();
                Some(at)
            }
            _ => {
                this.push_back((epoch, t));
                None
            }
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.written.len() + self.acked.len()
    }
}

struct Job {
    header: EpochHeader,
    slot: Arc<Slot>,
}

enum Event {
    Message(Message),
    /// Epoch written: when the write started and ended, and how many bytes.
    Sent {
        epoch: u64,
        checkpoint: bool,
        started: Instant,
        ended: Instant,
        bytes: u64,
    },
    Failed(LinkError),
    /// The guest has output waiting for a checkpoint (its [`OutputWaker`]).
    Output,
}

/// A primary connected to its standby.
pub struct Primary<'g, G: Guest> {
    guest: &'g G,
    config: PrimaryConfig,
    ring: SlotRing,
    core: PrimaryCore<Payload>,
    writer: Arc<Mutex<FrameWriter<Tx>>>,
    jobs: Option<Sender<Job>>,
    events: Receiver<Event>,
    /// For the guest's output waker.
    wake: Sender<Event>,
    /// An [`Event::Output`] arrived since the loop last looked.
    output_event: bool,
    threads: Vec<std::thread::JoinHandle<()>>,
    closer: Closer,
    transport: Transport,
    sent_up_to: u64,
    staged_up_to: u64,
    stats: PrimaryStats,
    last_summary: (Instant, u64),
    /// Pages peeked from the dirty log during the current epoch (put back on failure).
    pending: DirtySet,
    /// Times commit-to-ack from the sender's and the reader's reports.
    write_ack: WriteAckPairs,
    /// Checkpoints acknowledged so far (readable while `run` goes on). With an arbiter it
    /// counts only once the arbiter records this standby as current: from a non-zero count on,
    /// the standby may take over.
    acked: Arc<AtomicU64>,
    /// This session's token (the Hello nonce, hex).
    token: String,
    /// The standby holds a checkpoint of the previous session: send only what changed.
    resumed: bool,
    /// Whether the arbiter records this session's standby as current.
    marked: bool,
}

impl<G: Guest> std::fmt::Debug for Primary<'_, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("config", &self.config)
            .field("last_acked", &self.core.last_acked())
            .finish()
    }
}

impl<'g, G: Guest> Primary<'g, G> {
    /// Connects to the standby and completes the handshake.
    pub fn connect(guest: &'g G, config: PrimaryConfig) -> Result<Self, PrimaryError> {
        let layout = Layout {
            page_size: PAGE_SIZE as u32,
            regions: guest.regions(),
            vcpus: guest.vcpus(),
            slot_pages: config.slot_pages as u32,
            slot_count: config.slots as u32,
            features: 0,
            state_version: guest.state_version(),
        };
        let ring = SlotRing::new(
            SlotLayout {
                slot_pages: config.slot_pages,
                max_state: MAX_STATE_LEN as usize,
            },
            config.slots,
        )?;
        let (conn, why) = Conn::connect(config.standby, config.transport, Duration::from_secs(5))?;
        let transport = conn.transport();
        info!(standby = %config.standby, %transport, "connected ({why})");
        let (rx, tx, closer) = conn.split(config.heartbeat.interval, config.heartbeat.timeout)?;
        let mut reader = FrameReader::new(rx);
        let mut writer = FrameWriter::new(tx);
        let now = Instant::now();
        let (mut core, hello) =
            PrimaryCore::new(&config.secret, layout, auth::nonce(), config.heartbeat, now);
        if let Some(f) = &config.fencing {
            core.set_fence(f.fence());
        }
        core.set_resume_point(config.lineage.get());
        // RDMA: bodies are placed in the standby's slots, so the core expects its RegionKey.
        let mut placement = writer.get_mut().rdma().is_some();
        core.set_placement(placement);
        let token = crate::protocol::session_hex(&core.session());
        writer.send(&hello)?;
        let limit = config.handshake_timeout;
        let deadline = now + limit;
        let resumed: bool;
        let mut idle = |_| {
            if Instant::now() > deadline {
                Err(ProtocolError::HandshakeTimeout {
                    peer: "standby",
                    limit,
                }
                .into())
            } else {
                Ok(())
            }
        };
        loop {
            let msg = crate::refuse_on_wire_error(reader.next_message(&mut idle), &mut writer)?;
            let action = crate::refuse_on_error(core.on_message(msg, Instant::now()), &mut writer)?;
            match action {
                PrimaryAction::Send(m) => writer.send(&m)?,
                PrimaryAction::Established {
                    last_applied,
                    resume,
                    region_key,
                } => {
                    resumed = resume;
                    if let Some(key) = region_key {
                        let tx = writer.get_mut().rdma().expect("placement is RDMA only");
                        tx.enable_placement(&ring, key)
                            .map_err(|source| LinkError::Io {
                                what: "setting up RDMA placement",
                                source,
                            })?;
                        placement = false;
                    }
                    debug_assert!(!placement, "an RDMA connection got no region key");
                    info!(standby = %config.standby, last_applied, resume, %transport, "standby accepted: protection starting");
                    break;
                }
                PrimaryAction::None | PrimaryAction::Acked(_) => {}
            }
        }
        let writer = Arc::new(Mutex::new(writer));
        let (ev_tx, events) = unbounded();
        let (jobs, job_rx) = unbounded::<Job>();
        let threads = vec![
            spawn_sender(writer.clone(), job_rx, ev_tx.clone()),
            spawn_reader(reader, ev_tx.clone()),
        ];
        Ok(Primary {
            guest,
            config,
            ring,
            last_summary: (Instant::now(), core.last_acked()),
            sent_up_to: core.next_epoch() - 1,
            staged_up_to: core.next_epoch() - 1,
            core,
            writer,
            jobs: Some(jobs),
            events,
            wake: ev_tx,
            output_event: false,
            threads,
            closer,
            transport,
            stats: PrimaryStats::new(),
            pending: DirtySet::empty(&guest.regions()),
            write_ack: WriteAckPairs::default(),
            acked: Arc::new(AtomicU64::new(0)),
            token,
            resumed,
            marked: false,
        })
    }

    /// A counter of checkpoints acknowledged, to watch progress while [`Primary::run`] runs.
    /// It stays 0 until the standby may take over: with fencing, until the arbiter records it
    /// as current (an ack alone does not let it go live).
    pub fn acked_counter(&self) -> Arc<AtomicU64> {
        self.acked.clone()
    }

    /// A handle that cuts the connection to the standby abruptly (no goodbye), as if this
    /// host had died: for failover tests.
    pub fn kill_switch(&self) -> std::io::Result<Closer> {
        self.closer.try_clone()
    }

    /// The transport the connection uses (what `auto` chose).
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Runs the full sync, then checkpoints until `stop` is set or the link fails. When `stop`
    /// is set it takes a last checkpoint, leaves the guest paused, waits for the ack and returns:
    /// the standby then holds exactly the paused guest (the caller resumes or drops it). On
    /// failure every unacknowledged epoch's dirty pages are put back into the guest's log and
    /// the guest keeps running.
    pub fn run(mut self, stop: &AtomicBool) -> Result<PrimaryStats, PrimaryError> {
        let result = self.protect(stop);
        // Where this session ended (on failure, after the unacknowledged epochs' pages went
        // back to the log): a standby holding its checkpoint can resume from here.
        let record = |p: &Self| p.config.lineage.set(p.core.resume_point());
        if let Err(e) = &result {
            // Tell the standby what it did wrong, when it did (best effort: it may be gone,
            // and the sender thread may hold the connection).
            let reason = match e {
                PrimaryError::Protocol(p) => crate::protocol::refusal(p),
                PrimaryError::Link(LinkError::Wire(w)) => Some(Message::Refuse {
                    reason: w.to_string(),
                }),
                _ => None,
            };
            if let Some(refuse) = reason {
                if let Some(mut w) = self.writer.try_lock_for(Duration::from_millis(100)) {
                    let _ = w.send(&refuse);
                }
            }
        }
        if result.is_ok() {
            record(&self);
        }
        if result.is_err() {
            let empty = DirtySet::empty(&self.guest.regions());
            self.guest
                .put_back(std::mem::replace(&mut self.pending, empty));
            let lost = self.core.abandon();
            let n = lost.len();
            for f in lost {
                self.guest.put_back(f.payload.dirty);
            }
            if n > 0 {
                warn!(epochs = n, "dirty pages of unacknowledged epochs put back");
            }
            record(&self);
        }
        self.shutdown();
        result.map(|()| self.stats)
    }

    /// Whether the standby resumed from a checkpoint of the previous session (no full sync).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The scheduling policy of this primary's settings.
    fn policy(&self) -> SchedulePolicy {
        let policy = SchedulePolicy::new(
            self.config.epoch_interval,
            self.config.max_dirty_pages,
            self.config.slot_pages,
        )
        .with_output(self.config.output_trigger);
        if self.config.live_dirty_reads {
            policy
        } else {
            policy.without_dirty_peek()
        }
    }

    /// The dirty log during the full sync: read while the guest runs, or, without
    /// [`PrimaryConfig::live_dirty_reads`], in a short pause.
    fn sync_harvest(&self) -> Result<DirtySet, PrimaryError> {
        if self.config.live_dirty_reads {
            return self.guest.harvest().map_err(PrimaryError::Guest);
        }
        self.guest.pause().map_err(PrimaryError::Guest)?;
        let set = self.guest.harvest();
        self.guest.resume();
        set.map_err(PrimaryError::Guest)
    }

    /// Tells the scheduler whether output waits, after an [`Event::Output`] (asking the guest:
    /// the event may be of output the last checkpoint already took).
    fn note_output(&mut self, sched: &mut Scheduler) {
        if std::mem::take(&mut self.output_event) && self.guest.output_waiting() {
            sched.output_waiting();
        }
    }

    /// The next instant something is due: the scheduler's, or the connection's (heartbeat,
    /// the standby's silence).
    fn wake_at(&self, sched: Option<&Scheduler>) -> Option<Instant> {
        earliest(
            self.core.poll_timeout(),
            sched.and_then(Scheduler::poll_timeout),
        )
    }

    fn protect(&mut self, stop: &AtomicBool) -> Result<(), PrimaryError> {
        self.full_sync()?;
        let protect_start = Instant::now();
        let mut sched = Scheduler::new(self.policy(), protect_start);
        if self.config.output_trigger.is_some() {
            let wake = self.wake.clone();
            self.guest.watch_output(Some(OutputWaker::new(move || {
                let _ = wake.send(Event::Output);
            })));
            // Output held over from before (the full sync, a previous session).
            self.output_event = true;
        }
        loop {
            self.note_output(&mut sched);
            let now = Instant::now();
            if stop.load(Ordering::Acquire)
                || self
                    .config
                    .protect_for
                    .is_some_and(|d| now.saturating_duration_since(protect_start) >= d)
            {
                sched.stop();
            }
            match sched.poll(now, self.ring.free_count() > 0) {
                Step::Wait => {
                    let acked = self.core.last_acked();
                    self.process_events(self.wake_at(Some(&sched)))?;
                    if self.core.last_acked() != acked {
                        sched.acked(Instant::now());
                    }
                }
                Step::PeekDirty => {
                    // Let the epoch run, peeking at the dirty log to end it early.
                    let peeked = self.guest.harvest().map_err(PrimaryError::Guest)?;
                    self.pending.union_with(&peeked);
                    sched.dirty_observed(self.pending.len(), Instant::now());
                }
                Step::Checkpoint(why) => {
                    let Some(slot) = self.ring.try_acquire() else {
                        continue;
                    };
                    sched.checkpoint_taken(Instant::now());
                    let last = why == Trigger::Last;
                    if why == Trigger::Output {
                        self.stats.output_checkpoints += 1;
                    }
                    let pending = std::mem::replace(
                        &mut self.pending,
                        DirtySet::empty(&self.guest.regions()),
                    );
                    let pause = self.checkpoint(slot, pending, !last)?;
                    sched.paused_for(pause);
                    self.summary();
                    if last {
                        let r = self.drain_acks(&mut sched).and_then(|()| {
                            let goodbye = Message::Goodbye {
                                last_epoch: self.core.last_acked(),
                            };
                            Ok(self.writer.lock().send(&goodbye)?)
                        });
                        self.stats.protected_time = protect_start.elapsed();
                        if r.is_err() {
                            self.guest.resume();
                        }
                        return r;
                    }
                }
            }
        }
    }

    fn full_sync(&mut self) -> Result<(), PrimaryError> {
        let start = Instant::now();
        let sched = Scheduler::new(self.policy(), start);
        let mut to_send = if self.resumed {
            // The standby holds a checkpoint of the previous session: everything written
            // since is in the dirty log (see `ResumePoint`).
            let delta = self.sync_harvest()?;
            info!(
                pages = delta.len(),
                from_epoch = self.core.last_acked(),
                "the standby resumes from its checkpoint: sending only the pages changed since"
            );
            delta
        } else {
            self.sync_harvest()?;
            DirtySet::full(&self.guest.regions())
        };
        for round in 0.. {
            let n = to_send.len();
            let pages: Vec<GuestAddress> = to_send.pages().collect();
            for chunk in pages.chunks(self.config.slot_pages.min(SYNC_CHUNK_PAGES)) {
                let mut slot = self.wait_for_slot()?;
                slot.gather(self.guest.memory(), chunk)?;
                let mut set = DirtySet::empty(&self.guest.regions());
                chunk.iter().for_each(|p| set.insert(p.0));
                self.hand_over(EpochKind::Sync, slot, set, None)?;
            }
            self.stats.sync_pages += n as u64;
            if !self.config.live_dirty_reads {
                // One round: what the guest dirtied meanwhile goes into the first checkpoint
                // (harvested in its pause).
                to_send = DirtySet::empty(&self.guest.regions());
                break;
            }
            to_send = self.guest.harvest().map_err(PrimaryError::Guest)?;
            debug!(round, sent = n, dirtied = to_send.len(), "full sync round");
            if sched.sync_round_done(round, to_send.len()) == SyncStep::Done {
                break;
            }
        }
        // What is still dirty goes into the first checkpoint.
        self.guest.put_back(to_send);
        self.stats.sync_time = start.elapsed();
        info!(
            pages = self.stats.sync_pages,
            ms = start.elapsed().as_millis() as u64,
            "full sync sent while the guest ran"
        );
        Ok(())
    }

    fn wait_for_slot(&mut self) -> Result<Slot, PrimaryError> {
        loop {
            if let Some(s) = self.ring.try_acquire() {
                return Ok(s);
            }
            // All slots in flight: the standby is slow. The guest keeps running meanwhile.
            // Only an event frees a slot (an ack, or the sender done with an epoch).
            self.process_events(self.wake_at(None))?;
        }
    }

    /// One checkpoint: the pause is everything between `pause()` and `resume()`, and what it
    /// returns. With `resume == false` the guest stays paused afterwards (the last checkpoint).
    fn checkpoint(
        &mut self,
        mut slot: Slot,
        pending: DirtySet,
        resume: bool,
    ) -> Result<Duration, PrimaryError> {
        let guest = self.guest;
        let t0 = Instant::now();
        if let Err(e) = guest.pause() {
            // The guest is not paused (a vCPU did not stop in time): nothing was harvested.
            guest.put_back(pending);
            return Err(PrimaryError::Guest(e));
        }
        let t_stopped = Instant::now();
        let mut dirty = match guest.harvest() {
            Ok(d) => d,
            Err(e) => {
                guest.put_back(pending);
                guest.resume();
                return Err(PrimaryError::Guest(e));
            }
        };
        dirty.union_with(&pending);
        // Output commit: what the guest sent until now is released with this checkpoint's ack.
        guest.close_output_epoch(self.core.next_epoch());
        let t_harvested = Instant::now();
        let mut t_saved = t_harvested;
        let staged = (|| {
            let state = guest.save_state().map_err(PrimaryError::Guest)?;
            t_saved = Instant::now();
            let pages: Vec<GuestAddress> = dirty.pages().collect();
            if pages.len() > slot.capacity() {
                return Ok((state, pages, false));
            }
            slot.gather(guest.memory(), &pages)?;
            slot.set_state(&state)?;
            Ok::<_, PrimaryError>((state, pages, true))
        })();
        let t_staged = Instant::now();
        let us =
            |a: Instant, b: Instant| (b.saturating_duration_since(a).as_micros() as u64).max(1);
        let _ = self.stats.stop_us.record(us(t0, t_stopped));
        let _ = self.stats.harvest_us.record(us(t_stopped, t_harvested));
        let _ = self.stats.state_us.record(us(t_harvested, t_saved));
        let (state, pages, fits) = match staged {
            Ok(x) => x,
            Err(e) => {
                // Nothing of this epoch was sent: its pages go back to the log.
                guest.put_back(dirty);
                guest.resume();
                return Err(e);
            }
        };
        if !fits {
            let r = self.send_oversize(slot, dirty, &state, &pages);
            if resume || r.is_err() {
                guest.resume();
            }
            let pause = t0.elapsed();
            self.record_pause(pause, pages.len());
            warn!(
                pages = pages.len(),
                slot_pages = self.config.slot_pages,
                pause_ms = pause.as_millis() as u64,
                "epoch larger than a slot was sent while paused (raise --slot-pages or lower --max-dirty-pages)"
            );
            return r.map(|()| pause);
        }
        let _ = self.stats.stage_us.record(us(t_saved, t_staged));
        if resume {
            guest.resume();
        }
        let pause = t0.elapsed();
        self.record_pause(pause, pages.len());
        debug!(
            epoch = self.core.next_epoch(),
            pages = pages.len(),
            state_bytes = state.len(),
            pause_us = pause.as_micros() as u64,
            in_flight = self.core.in_flight(),
            "checkpoint staged"
        );
        let r = self.hand_over(EpochKind::Checkpoint, slot, dirty, Some(t0));
        if r.is_err() && !resume {
            guest.resume();
        }
        r.map(|()| pause)
    }

    fn record_pause(&mut self, pause: Duration, pages: usize) {
        if self.stats.first_pause.is_none() {
            self.stats.first_pause = Some(pause);
            info!(
                pause_us = pause.as_micros() as u64,
                pages, "first checkpoint taken"
            );
        }
        let _ = self
            .stats
            .pause_us
            .record((pause.as_micros() as u64).max(1));
        let _ = self.stats.pages.record((pages as u64).max(1));
    }

    fn hand_over(
        &mut self,
        kind: EpochKind,
        slot: Slot,
        dirty: DirtySet,
        paused_at: Option<Instant>,
    ) -> Result<(), PrimaryError> {
        let slot = Arc::new(slot);
        let state_len = if kind == EpochKind::Checkpoint {
            slot.state().len() as u32
        } else {
            0
        };
        let header = self.core.begin_epoch(
            kind,
            slot.pages() as u64,
            state_len,
            Payload {
                _slot: Some(slot.clone()),
                dirty,
                paused_at,
            },
            Instant::now(),
        );
        self.staged_up_to = header.epoch;
        let jobs = self.jobs.as_ref().expect("sender running");
        if jobs.send(Job { header, slot }).is_err() {
            // The sender thread ended: it reported why on the event channel.
            self.process_events(Some(Instant::now() + Duration::from_millis(100)))?;
        }
        Ok(())
    }

    /// Sends an epoch that does not fit a slot, piece by piece, with the guest paused.
    fn send_oversize(
        &mut self,
        mut slot: Slot,
        dirty: DirtySet,
        state: &[u8],
        pages: &[GuestAddress],
    ) -> Result<(), PrimaryError> {
        self.stats.oversize += 1;
        // Everything queued before must be on the wire first.
        while self.sent_up_to < self.staged_up_to {
            if let Err(e) = self.process_events(self.wake_at(None)) {
                // Not handed to the core yet, so not among the epochs `run` puts back: its
                // pages go back to the log here, or a resumed standby would never get them.
                self.guest.put_back(dirty);
                return Err(e);
            }
        }
        let header = self.core.begin_epoch(
            EpochKind::Checkpoint,
            pages.len() as u64,
            state.len() as u32,
            Payload {
                _slot: None,
                dirty,
                paused_at: None,
            },
            Instant::now(),
        );
        // Framing and checksum as for any epoch: the pieces are hashed as they go out.
        let body_len = header
            .body_len(self.core.layout())
            .map_err(ProtocolError::from)?;
        let index: Vec<u8> = pages.iter().flat_map(|p| p.0.to_le_bytes()).collect();
        let mut w = self.writer.lock();
        let mut body = w.start_epoch(&header, body_len)?;
        body.send(&[&index])?;
        for chunk in pages.chunks(slot.capacity()) {
            slot.clear();
            slot.gather(self.guest.memory(), chunk)?;
            body.send(&[slot.data()])?;
        }
        body.send(&[state])?;
        body.finish()?;
        self.staged_up_to = header.epoch;
        self.sent_up_to = header.epoch;
        Ok(())
    }

    /// Handles link events, waiting for the first one until `until` (`None`: only what is
    /// already there), then does what the connection's timers ask (a heartbeat).
    fn process_events(&mut self, until: Option<Instant>) -> Result<(), PrimaryError> {
        let mut first = true;
        loop {
            let ev = match (first, until) {
                (true, Some(t)) => match self.events.recv_deadline(t) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        unreachable!("the primary holds a sender")
                    }
                },
                _ => match self.events.try_recv() {
                    Ok(ev) => ev,
                    Err(_) => break,
                },
            };
            first = false;
            match ev {
                Event::Failed(e) => return Err(e.into()),
                Event::Sent {
                    epoch,
                    checkpoint,
                    started,
                    ended,
                    bytes,
                } => {
                    self.sent_up_to = epoch;
                    self.core.sent(ended);
                    // The standby took the whole epoch off the connection: it is alive.
                    self.core.heard(ended);
                    if checkpoint {
                        let us = ended.saturating_duration_since(started).as_micros() as u64;
                        let _ = self.stats.transmit_us.record(us.max(1));
                        self.stats.checkpoint_bytes += bytes;
                        if let Some(d) = self.write_ack.written(epoch, ended) {
                            let _ = self
                                .stats
                                .commit_ack_us
                                .record((d.as_micros() as u64).max(1));
                        }
                    }
                }
                Event::Output => self.output_event = true,
                Event::Message(m) => {
                    let now = Instant::now();
                    if let PrimaryAction::Acked(done) = self.core.on_message(m, now)? {
                        self.acked(done, now)?;
                    }
                }
            }
        }
        if let Some(hb) = self.core.tick(Instant::now())? {
            // Never wait for the writer: the sender thread may hold it for a whole epoch (and
            // its bytes are traffic the standby sees anyway). A standby that went silent is
            // noticed by `tick` above whatever a send is doing.
            if let Some(mut w) = self.writer.try_lock() {
                w.send(&hb)?;
            }
        }
        Ok(())
    }

    fn acked(&mut self, done: Vec<InFlight<Payload>>, now: Instant) -> Result<(), PrimaryError> {
        for f in done {
            debug!(
                epoch = f.epoch,
                ack_us = now.saturating_duration_since(f.sent_at).as_micros() as u64,
                "epoch acknowledged"
            );
            if f.kind == EpochKind::Checkpoint {
                self.stats.checkpoints_acked += 1;
                let since =
                    |t: Instant| (now.saturating_duration_since(t).as_micros() as u64).max(1);
                let _ = self.stats.ack_us.record(since(f.sent_at));
                if let Some(p) = f.payload.paused_at {
                    // Sent by the sender thread (not oversize): its write is reported too.
                    let _ = self.stats.e2e_us.record(since(p));
                    if let Some(d) = self.write_ack.acked(f.epoch, now) {
                        let _ = self
                            .stats
                            .commit_ack_us
                            .record((d.as_micros() as u64).max(1));
                    }
                }
            }
            self.stats.last_acked = f.epoch;
            // Dropping the payload releases its slot (once the sender is done with it too).
        }
        if self.stats.checkpoints_acked > 0 && !self.marked {
            // The standby holds a consistent checkpoint: with an arbiter, it becomes the one
            // that may take over before any output of this session leaves.
            if let Some(f) = &self.config.fencing {
                f.standby_current(&self.token)
                    .map_err(PrimaryError::Fence)?;
                info!(token = %self.token, "the arbiter records this standby as current");
            }
            self.marked = true;
        }
        if self.marked {
            self.acked
                .store(self.stats.checkpoints_acked, Ordering::Release);
            self.guest.release_output(self.core.last_acked());
        }
        Ok(())
    }

    /// Waits until every epoch is acknowledged, within the scheduler's drain deadline.
    fn drain_acks(&mut self, sched: &mut Scheduler) -> Result<(), PrimaryError> {
        sched.start_drain(Instant::now());
        while !sched.drained(Instant::now(), self.core.in_flight())? {
            self.process_events(self.wake_at(Some(sched)))?;
        }
        Ok(())
    }

    fn summary(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_summary.0);
        if elapsed < self.config.summary_every {
            return;
        }
        let s = &self.stats;
        let epochs = s.checkpoints_acked - self.last_summary.1;
        info!(
            epochs_per_s = format_args!("{:.0}", epochs as f64 / elapsed.as_secs_f64()),
            pages_per_epoch = format_args!("{:.0}", s.pages.mean()),
            pause_p50_us = s.pause_us.value_at_quantile(0.5),
            pause_p99_us = s.pause_us.value_at_quantile(0.99),
            ack_p50_us = s.ack_us.value_at_quantile(0.5),
            output_triggered = s.output_checkpoints,
            last_acked = s.last_acked,
            "protecting"
        );
        self.last_summary = (now, s.checkpoints_acked);
    }

    fn shutdown(&mut self) {
        self.guest.watch_output(None);
        self.jobs = None;
        self.closer.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn_sender(
    writer: Arc<Mutex<FrameWriter<Tx>>>,
    jobs: Receiver<Job>,
    events: Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("rmc-sender".into())
        .spawn(move || {
            for job in jobs {
                let slot = &job.slot;
                let parts = [slot.index_bytes(), slot.data(), slot.state()];
                let parts = if job.header.kind == EpochKind::Sync {
                    &parts[..2]
                } else {
                    &parts[..]
                };
                let commit = Message::Commit {
                    epoch: job.header.epoch,
                    checksum: wire::checksum(parts),
                };
                let started = Instant::now();
                let r = {
                    let mut w = writer.lock();
                    match w.get_mut().rdma() {
                        // RDMA: the body goes by RDMA WRITE into the standby's slot of the
                        // same number; header, BodyPlaced and commit follow as one SEND.
                        Some(tx) => tx
                            .place(slot, job.header.kind == EpochKind::Checkpoint)
                            .map_err(|source| LinkError::Io {
                                what: "placing an epoch by RDMA WRITE",
                                source,
                            })
                            .and_then(|len| {
                                w.send_placed(&job.header, slot.index() as u32, len, &commit)
                            }),
                        None => w.send_epoch(&job.header, parts, &commit),
                    }
                };
                let bytes = parts.iter().map(|p| p.len() as u64).sum::<u64>()
                    + 3 * wire::FRAME_HEADER_LEN as u64
                    + 40;
                // Done with the slot before saying so: once its epoch is acknowledged too, the
                // slot is free, and the loop, which waits for events, sees it at this one.
                let epoch = job.header.epoch;
                let checkpoint = job.header.kind == EpochKind::Checkpoint;
                drop(job);
                let ev = match r {
                    Ok(()) => Event::Sent {
                        epoch,
                        checkpoint,
                        started,
                        ended: Instant::now(),
                        bytes,
                    },
                    Err(e) => Event::Failed(e),
                };
                let failed = matches!(ev, Event::Failed(_));
                if events.send(ev).is_err() || failed {
                    return;
                }
            }
        })
        .expect("spawn sender thread")
}

fn spawn_reader(mut reader: FrameReader<Rx>, events: Sender<Event>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("rmc-reader".into())
        .spawn(move || loop {
            // Read timeouts only let the loop notice that the primary went away; liveness is
            // judged by the core from the messages that do arrive.
            let mut idle = |_| Ok(());
            let ev = match reader.next_message(&mut idle) {
                Ok(m) => Event::Message(m),
                Err(e) => Event::Failed(e),
            };
            let failed = matches!(ev, Event::Failed(_));
            if events.send(ev).is_err() || failed {
                return;
            }
        })
        .expect("spawn reader thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_to_ack_is_timed_whichever_report_comes_first() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut p = WriteAckPairs::default();

        // Written, then acknowledged: the usual order.
        assert_eq!(p.written(1, at(1)), None);
        assert_eq!(p.acked(1, at(4)), Some(Duration::from_millis(3)));

        // The ack is read before the sender reports the write (RDMA: the standby answered
        // while the sender was still returning from posting the commit).
        assert_eq!(p.acked(2, at(5)), None);
        assert_eq!(p.written(2, at(6)), Some(Duration::ZERO));
        assert_eq!(p.acked(3, at(9)), None);
        assert_eq!(p.written(3, at(7)), Some(Duration::from_millis(2)));
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn reports_that_will_never_be_paired_are_dropped() {
        let t0 = Instant::now();
        let mut p = WriteAckPairs::default();
        // Epochs 1 and 2 written, never acknowledged on their own (the connection went away
        // and a new one began at 3), then 3 acked first and written after.
        assert_eq!(p.written(1, t0), None);
        assert_eq!(p.written(2, t0), None);
        assert_eq!(p.acked(3, t0), None);
        assert_eq!(
            p.pending(),
            1,
            "the acks of 3 dropped the writes of 1 and 2"
        );
        assert!(p.written(3, t0).is_some());
        // An ack of an epoch never reported written (a failed write), then later epochs.
        assert_eq!(p.acked(4, t0), None);
        assert_eq!(p.written(5, t0), None);
        assert_eq!(p.pending(), 1, "the write of 5 dropped the ack of 4");
        assert!(p.acked(5, t0).is_some());
        assert_eq!(p.pending(), 0);
    }
}
