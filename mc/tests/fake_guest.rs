//! The real primary epoch loop (`rmc_mc::primary::Primary`) and the real standby, over TCP on
//! loopback, protecting an in-memory [`FakeGuest`]: no KVM, no `/dev/kvm`.
//!
//! The fake guest writes pages from a deterministic script each time the engine resumes it
//! (run `r` leaves `page_pattern(r, page)` in every page it writes), so a test knows, for any
//! run count, exactly which version of every page the guest holds (the *model*), and a copy
//! of the memory tells which run wrote each page it holds. The fake logs every call the
//! engine makes (pause, resume, harvest, put-back, state, output epochs); the standby's
//! [`Recorder`] (its `RestoreCheck`) places a mark in the same log each time it verifies a
//! checkpoint, right before applying and acknowledging it. Tests check the engine against
//! both:
//!
//! - the backup a standby holds after a stopped session is the guest, page by page and state,
//!   and it received every checkpoint, in order;
//! - output commit: every `ReleaseOutput { e }` follows the standby's verification of
//!   checkpoint `e`, names a checkpoint the session closed, never goes down, never passes
//!   what the standby applied; output epochs are closed only while the guest is paused and
//!   never go down within a session;
//! - nothing is lost when a session fails (standby gone, standby silent, guest faults): the
//!   guest's dirty log afterwards holds exactly the pages written since the last
//!   acknowledged checkpoint, and a resumed session that sends only that log leaves the
//!   standby holding exactly the guest.
//!
//! A standby that vanishes or goes silent is played by a [`Proxy`] between the two that
//! cuts or freezes the connection at a chosen run; the one engine bug found is reproduced
//! with a scripted standby ([`scripted_standby`]) speaking the protocol through
//! `rmc_transport::framing`.
//!
//! What is not here: the standby-loss *policies* (`--on-standby-loss pause|continue`) live in
//! the `rmc` binary (`protect()` in `rmc/src/main.rs`), not in `rmc-mc`: this file checks what
//! they rely on (the session fails with the guest running, its unacknowledged output never
//! released, its pages in the dirty log, and a later session resumes).
//!
//! Every wait is on an event (a call in the fake's log, a thread's result) with a hang guard
//! ([`HANG_GUARD`]); nothing is timed except the silence the heartbeat test needs and the
//! 300 ms in which the output test expects no checkpoint with its trigger off (epochs of an
//! hour: nothing else could end one, however slow the machine).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rmc_guest_api::fake::{Call, FakeGuest, Fault, InjectedFault, FAKE_STATE_VERSION};
use rmc_guest_api::{DirtyLog, Pausable, PAGE_SIZE};
use rmc_mc::primary::{Lineage, Primary, PrimaryConfig, PrimaryError, PrimaryStats};
use rmc_mc::protocol::{Heartbeat, OutputTrigger, ProtocolError};
use rmc_mc::standby::{error_chain, RestoreCheck, Session, Standby, StandbyConfig, StandbyError};
use rmc_mc::BoxError;
use rmc_transport::framing::{Abort, FrameReader, FrameWriter};
use rmc_transport::wire::{auth, EpochKind, Layout, Message, MsgType, NONCE_LEN};
use vm_memory::{Bytes, GuestAddress};

const SECRET: &[u8] = b"the shared secret of the fake guest tests";

/// How long any wait may last before the test is declared hung (not a speed requirement).
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Heartbeats of both sides where silence detection is not what is tested: a stall of a busy
/// machine is never a lost peer (a closed connection is seen at once anyway).
const HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    timeout: Duration::from_secs(10),
};

/// A run never reached: no stop.
const NEVER: u64 = u64::MAX;

// ---------------------------------------------------------------------------------------------
// The guest's workload and its model
// ---------------------------------------------------------------------------------------------

/// What run `r` of a guest of `pages` pages writes (sorted, no duplicates).
type Writes = fn(u64, u64) -> Vec<u64>;

/// Page 0 every run (a hot page, so it has many versions) and 7 pages spread over the guest.
fn spread(run: u64, pages: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..7).map(|k| (run * 7919 + k * 131) % pages).collect();
    v.push(0);
    v.sort_unstable();
    v.dedup();
    v
}

/// Which run wrote each page last after `runs` runs (0: the contents written before
/// protection began).
fn model(writes: Writes, pages: u64, runs: u64) -> Vec<u64> {
    let mut last = vec![0u64; pages as usize];
    for r in 1..=runs {
        for p in writes(r, pages) {
            last[p as usize] = r;
        }
    }
    last
}

/// The pages runs `after + 1 ..= upto` wrote.
fn dirtied(writes: Writes, pages: u64, after: u64, upto: u64) -> BTreeSet<u64> {
    (after + 1..=upto).flat_map(|r| writes(r, pages)).collect()
}

// ---------------------------------------------------------------------------------------------
// Rig: the guest, its script, its sessions
// ---------------------------------------------------------------------------------------------

type Action = Box<dyn FnOnce() + Send>;

/// What the guest's script does besides writing: stop the primary once a run is reached, run
/// actions (cut or freeze a connection) at chosen runs. It runs inside the fake's `resume`,
/// with the fake's lock held: actions must not call the guest.
struct Ctl {
    stop: AtomicBool,
    stop_at: AtomicU64,
    actions: Mutex<Vec<(u64, Action)>>,
}

impl Ctl {
    /// The primary is stopped by the resume of run `run` (its next checkpoint is the last).
    fn stop_at(&self, run: u64) {
        self.stop.store(false, Ordering::SeqCst);
        self.stop_at.store(run, Ordering::SeqCst);
    }

    fn at_run(&self, run: u64, action: impl FnOnce() + Send + 'static) {
        self.actions.lock().push((run, Box::new(action)));
    }

    fn on_run(&self, run: u64) {
        if run >= self.stop_at.load(Ordering::SeqCst) {
            self.stop.store(true, Ordering::SeqCst);
        }
        let due: Vec<Action> = {
            let mut actions = self.actions.lock();
            let (due, rest) = std::mem::take(&mut *actions)
                .into_iter()
                .partition(|(r, _)| *r <= run);
            *actions = rest;
            due.into_iter().map(|(_, a)| a).collect()
        };
        for action in due {
            action();
        }
    }
}

/// What a primary's session ended with.
struct Outcome {
    result: Result<PrimaryStats, PrimaryError>,
    resumed: bool,
}

struct Rig {
    guest: Arc<FakeGuest>,
    ctl: Arc<Ctl>,
    writes: Writes,
    /// Shared by every session's config: where the last session ended.
    lineage: Lineage,
    sessions: u32,
}

impl Rig {
    /// A guest whose every page holds run 0's pattern before protection begins, and whose
    /// runs write `writes`.
    fn new(guest: FakeGuest, writes: Writes) -> Rig {
        let pages = guest.pages();
        guest.write_pages(0, &(0..pages).collect::<Vec<_>>());
        let ctl = Arc::new(Ctl {
            stop: AtomicBool::new(false),
            stop_at: AtomicU64::new(NEVER),
            actions: Mutex::new(Vec::new()),
        });
        let c = ctl.clone();
        guest.set_script(move |run| {
            c.on_run(run);
            writes(run, pages)
        });
        Rig {
            guest: Arc::new(guest),
            ctl,
            writes,
            lineage: Lineage::default(),
            sessions: 0,
        }
    }

    fn pages(&self) -> u64 {
        self.guest.pages()
    }

    /// A standby on loopback for this guest, whose checkpoint verifications are marked in
    /// the guest's log.
    fn standby(&self) -> Standby {
        let config = StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: Some(self.pages() * PAGE_SIZE),
            heartbeat: HEARTBEAT,
            restore: Some(Arc::new(Recorder(self.guest.clone()))),
            handshake_timeout: HANG_GUARD,
            ..StandbyConfig::default()
        };
        Standby::bind("127.0.0.1:0".parse().unwrap(), config).unwrap()
    }

    fn config(
        &self,
        standby: SocketAddr,
        epoch: Duration,
        slot_pages: usize,
        slots: usize,
    ) -> PrimaryConfig {
        let mut c = PrimaryConfig::new(standby, SECRET.to_vec(), self.pages());
        c.heartbeat = HEARTBEAT;
        c.epoch_interval = epoch;
        c.slot_pages = slot_pages;
        c.max_dirty_pages = slot_pages / 2;
        c.slots = slots;
        c.summary_every = Duration::from_secs(3600);
        c.handshake_timeout = HANG_GUARD;
        c.lineage = self.lineage.clone();
        c
    }

    /// Connects a primary with `config` and runs it until it stops or fails (on a thread,
    /// within the hang guard). Marks the session's start in the guest's log.
    fn session(&mut self, config: PrimaryConfig) -> Outcome {
        self.sessions += 1;
        self.guest.mark(session_mark(self.sessions));
        let (tx, rx) = mpsc::channel();
        let (guest, ctl) = (self.guest.clone(), self.ctl.clone());
        std::thread::spawn(move || {
            let primary = Primary::connect(&*guest, config)
                .unwrap_or_else(|e| panic!("cannot connect: {}", error_chain(&e)));
            let resumed = primary.resumed();
            let result = primary.run(&ctl.stop);
            let _ = tx.send(Outcome { result, resumed });
        });
        let out = rx.recv_timeout(HANG_GUARD).unwrap_or_else(|e| {
            panic!("the primary did not end within {HANG_GUARD:?} (hang guard): {e}")
        });
        self.guest.mark("test: the primary's run returned");
        out
    }

    fn log(&self) -> Log {
        Log::new(self.guest.calls())
    }

    /// The backup `sb` holds is the (stopped, paused) guest: every page is the version the
    /// model names for the guest's run count (naming the run it holds where not), and the
    /// state is the guest's, taken with exactly that memory.
    fn assert_backup_is_the_guest(&self, sb: &Standby, what: &str) {
        assert!(
            self.guest.is_paused(),
            "{what}: a stopped primary leaves the guest paused"
        );
        let b = sb.backup().expect("a backup");
        let runs = self.guest.runs();
        let want = model(self.writes, self.pages(), runs);
        let mut backup_pages = Vec::with_capacity(self.pages() as usize);
        for p in 0..self.pages() {
            let expected = FakeGuest::page_pattern(want[p as usize], p);
            assert_eq!(
                self.guest.read_page(p),
                expected,
                "{what}: the fake guest disagrees with the model at page {p} (test bug)"
            );
            let mut got = vec![0u8; PAGE_SIZE as usize];
            b.memory
                .read_slice(&mut got, GuestAddress(self.guest.page_addr(p)))
                .unwrap();
            if got != expected {
                let (run, page) = FakeGuest::pattern_tag(&got);
                panic!(
                    "{what}: backup page {p} holds the version of run {run} (tagged page {page}), \
                     the guest holds run {}'s (after {runs} runs)",
                    want[p as usize]
                );
            }
            backup_pages.push(got);
        }
        assert_eq!(
            b.state,
            self.guest.state(),
            "{what}: the backup's state is not the guest's"
        );
        let (state_runs, hash) = FakeGuest::decode_state(&b.state).expect("a fake guest state");
        assert_eq!(state_runs, runs, "{what}: the backup's state");
        assert_eq!(
            hash,
            FakeGuest::hash_pages(&backup_pages),
            "{what}: the backup's state was not taken with the memory the backup holds"
        );
        assert_eq!(
            b.checkpoint,
            Some(b.last_applied),
            "{what}: a consistent backup"
        );
    }

    /// After a failed session: the dirty log holds exactly the pages written since the last
    /// checkpoint the primary saw acknowledged (nothing lost, nothing extra), and is left as
    /// it was. Returns how many pages it holds.
    fn assert_dirty_log_holds_the_unacked_pages(&self, session: u32) -> usize {
        let rp = self
            .lineage
            .get()
            .expect("the session recorded where it ended");
        let log = self.log();
        let range = log.session(session);
        let acked = log
            .checkpoints(range)
            .into_iter()
            .find(|c| c.epoch == rp.acked)
            .unwrap_or_else(|| {
                panic!(
                    "the last acknowledged epoch {} is no checkpoint of session {session}",
                    rp.acked
                )
            });
        let runs = self.guest.runs();
        let want = dirtied(self.writes, self.pages(), acked.runs, runs);
        self.guest.mark("test: reading the dirty log");
        let set = self.guest.harvest().unwrap();
        let got: BTreeSet<u64> = (0..self.pages())
            .filter(|&p| set.contains(self.guest.page_addr(p)))
            .collect();
        assert_eq!(set.len(), got.len());
        let lost: Vec<u64> = want.difference(&got).copied().collect();
        let extra: Vec<u64> = got.difference(&want).copied().collect();
        assert!(
            lost.is_empty(),
            "{} pages written after the last acknowledged checkpoint (epoch {}, run {}; the \
             guest ran {runs} times) are missing from the dirty log, so no later session sends \
             them: {}",
            lost.len(),
            rp.acked,
            acked.runs,
            ranges(&lost)
        );
        assert!(
            extra.is_empty(),
            "the dirty log holds {} pages not written since the last acknowledged checkpoint: \
             {}",
            extra.len(),
            ranges(&extra)
        );
        self.guest.put_back(set);
        want.len()
    }

    /// A second session with the standby, resuming from the failed one: only the dirty log
    /// (`delta` pages) is sent; after three more runs the backup is the guest.
    fn resume_and_check(&mut self, sb: Standby, delta: usize) {
        let addr = sb.local_addr();
        let serving = serve(sb);
        self.ctl.stop_at(self.guest.runs() + 3);
        let session = self.sessions + 1;
        let out = self.session(self.config(addr, Duration::from_millis(10), 64, 2));
        let stats = out
            .result
            .unwrap_or_else(|e| panic!("the resumed session failed: {}", error_chain(&e)));
        assert!(
            out.resumed,
            "the standby holds a checkpoint of the failed session: it is resumed, not synced"
        );
        assert_eq!(
            stats.sync_pages, delta as u64,
            "a resumed session sends exactly the dirty log"
        );
        let (sb, s) = serving.finish("the resumed session");
        if let Err(e) = &s.result {
            panic!(
                "the resumed session must end with a goodbye: {}",
                error_chain(e)
            );
        }
        self.assert_backup_is_the_guest(&sb, "after the resumed session");
        let log = self.log();
        log.check_discipline();
        let b = sb.backup().unwrap();
        log.check_output_commit(log.session(session), b.last_applied);
        assert_eq!(
            log.releases(log.session(session)).last(),
            Some(&stats.last_acked)
        );
    }
}

/// Pages as ranges (`3, 7..=9`), the first few.
fn ranges(pages: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let mut j = i;
        while j + 1 < pages.len() && pages[j + 1] == pages[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            pages[i].to_string()
        } else {
            format!("{}..={}", pages[i], pages[j])
        });
        i = j + 1;
    }
    let more = out.len().saturating_sub(8);
    out.truncate(8);
    if more > 0 {
        out.push(format!("and {more} more ranges"));
    }
    out.join(", ")
}

fn session_mark(n: u32) -> String {
    format!("test: session {n}")
}

const VERIFIED: &str = "standby: verified the checkpoint of run ";

/// The standby's `RestoreCheck`: accepts the fake's states, and marks in the guest's log
/// each checkpoint it verified (right before it is applied and acknowledged).
#[derive(Debug)]
struct Recorder(Arc<FakeGuest>);

impl RestoreCheck for Recorder {
    fn state_version(&self) -> u32 {
        FAKE_STATE_VERSION
    }

    fn check_layout(&self, _: &Layout) -> Result<(), BoxError> {
        Ok(())
    }

    fn check_state(&self, state: &[u8], _: &Layout) -> Result<(), BoxError> {
        let (runs, _) = FakeGuest::decode_state(state).ok_or("not a fake guest's state")?;
        self.0.mark(format!("{VERIFIED}{runs}"));
        Ok(())
    }
}

/// A standby serving one session on a thread.
struct Serving(mpsc::Receiver<(Standby, Session)>);

fn serve(mut sb: Standby) -> Serving {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let s = sb.serve_one().expect("a session");
        let _ = tx.send((sb, s));
    });
    Serving(rx)
}

impl Serving {
    fn finish(self, what: &str) -> (Standby, Session) {
        self.0.recv_timeout(HANG_GUARD).unwrap_or_else(|e| {
            panic!("{what}: the standby's session did not end within {HANG_GUARD:?}: {e}")
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The guest's call log
// ---------------------------------------------------------------------------------------------

/// A checkpoint as the guest saw it: the output epoch closed in its pause.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    epoch: u64,
    /// Runs of the guest when it was taken (the run count its state carries).
    runs: u64,
    /// Index of its `CloseOutput` in the log.
    at: usize,
    /// Pages harvested for it (peeks since the last resume, and its own harvest).
    pages: usize,
}

struct Log {
    calls: Vec<Call>,
    /// `runs[i]`: resumes before call `i`.
    runs: Vec<u64>,
}

impl Log {
    fn new(calls: Vec<Call>) -> Log {
        let mut n = 0;
        let runs = calls
            .iter()
            .map(|c| {
                let before = n;
                if *c == Call::Resume {
                    n += 1;
                }
                before
            })
            .collect();
        Log { calls, runs }
    }

    fn is_test_mark(c: &Call) -> bool {
        matches!(c, Call::Mark(m) if m.starts_with("test:"))
    }

    /// Session `n`: from its mark to the next mark of the test.
    fn session(&self, n: u32) -> Range<usize> {
        let start = self
            .calls
            .iter()
            .position(|c| *c == Call::Mark(session_mark(n)))
            .unwrap_or_else(|| panic!("no session {n} in the log"));
        let end = self.calls[start + 1..]
            .iter()
            .position(Self::is_test_mark)
            .map_or(self.calls.len(), |i| start + 1 + i);
        start..end
    }

    /// Pages harvested between the later of the last resume and the last put-back before
    /// call `i`, and `i`: what the engine held from the dirty log at call `i`.
    fn harvested_before(&self, i: usize) -> usize {
        let from = self.calls[..i]
            .iter()
            .rposition(|c| matches!(c, Call::Resume | Call::PutBack { .. }))
            .map_or(0, |j| j + 1);
        self.calls[from..i]
            .iter()
            .map(|c| match c {
                Call::Harvest { pages: Some(n) } => *n,
                _ => 0,
            })
            .sum()
    }

    fn checkpoints(&self, range: Range<usize>) -> Vec<Checkpoint> {
        range
            .filter_map(|i| match self.calls[i] {
                Call::CloseOutput { epoch } => Some(Checkpoint {
                    epoch,
                    runs: self.runs[i],
                    at: i,
                    pages: self.harvested_before(i),
                }),
                _ => None,
            })
            .collect()
    }

    fn releases(&self, range: Range<usize>) -> Vec<u64> {
        self.calls[range]
            .iter()
            .filter_map(|c| match c {
                Call::ReleaseOutput { epoch } => Some(*epoch),
                _ => None,
            })
            .collect()
    }

    fn put_backs(&self, range: Range<usize>) -> Vec<usize> {
        self.calls[range]
            .iter()
            .filter_map(|c| match c {
                Call::PutBack { pages } => Some(*pages),
                _ => None,
            })
            .collect()
    }

    /// The run counts of the checkpoints the standby verified.
    fn verified(&self, range: Range<usize>) -> Vec<u64> {
        self.calls[range]
            .iter()
            .filter_map(|c| match c {
                Call::Mark(m) => m.strip_prefix(VERIFIED).map(|r| r.parse().unwrap()),
                _ => None,
            })
            .collect()
    }

    fn position(&self, range: Range<usize>, what: impl Fn(&Call) -> bool) -> Option<usize> {
        let start = range.start;
        self.calls[range].iter().position(what).map(|i| start + i)
    }

    /// Pausing and resuming alternate; state is saved and output epochs closed only while
    /// the guest is paused.
    fn check_discipline(&self) {
        let mut paused = false;
        for (i, c) in self.calls.iter().enumerate() {
            match c {
                Call::Pause { ok } => {
                    assert!(!paused, "call {i}: pause of a paused guest");
                    paused = *ok;
                }
                Call::Resume => {
                    assert!(paused, "call {i}: resume of a running guest");
                    paused = false;
                }
                Call::SaveState { .. } => {
                    assert!(paused, "call {i}: state saved while the guest runs")
                }
                Call::CloseOutput { epoch } => assert!(
                    paused,
                    "call {i}: output epoch {epoch} closed while the guest runs"
                ),
                _ => {}
            }
        }
    }

    /// Output commit in one session: output epochs never go down; every release names a
    /// checkpoint the session closed and the standby verified before, never goes down and
    /// never passes `applied` (the standby's last applied epoch).
    fn check_output_commit(&self, range: Range<usize>, applied: u64) {
        let checkpoints = self.checkpoints(range.clone());
        let (mut closed, mut released) = (0, 0);
        for i in range.clone() {
            match self.calls[i] {
                Call::CloseOutput { epoch } => {
                    assert!(
                        epoch >= closed,
                        "call {i}: output epoch {epoch} closed after epoch {closed}"
                    );
                    closed = epoch;
                }
                Call::ReleaseOutput { epoch } => {
                    let c = checkpoints
                        .iter()
                        .rev()
                        .find(|c| c.epoch == epoch && c.at < i)
                        .unwrap_or_else(|| {
                            panic!(
                                "call {i}: output released up to epoch {epoch}, which no \
                                 checkpoint of this session closed before"
                            )
                        });
                    let verified = Call::Mark(format!("{VERIFIED}{}", c.runs));
                    assert!(
                        self.calls[c.at..i].contains(&verified),
                        "call {i}: output of epoch {epoch} (the checkpoint of run {}) released \
                         before the standby verified and acknowledged that checkpoint",
                        c.runs
                    );
                    assert!(
                        epoch >= released,
                        "call {i}: output released up to {epoch} after {released}"
                    );
                    assert!(
                        epoch <= applied,
                        "call {i}: output released up to {epoch}, beyond the standby's last \
                         applied epoch {applied}"
                    );
                    released = epoch;
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A proxy that can cut or freeze the connection
// ---------------------------------------------------------------------------------------------

/// A TCP proxy between primary and standby (one connection): cutting it is a standby that
/// vanished (its connection reset), freezing it a standby that stopped answering (nothing
/// passes either way any more, no connection closes).
struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
}

#[derive(Default)]
struct ProxyShared {
    streams: Mutex<Vec<TcpStream>>,
    frozen: AtomicBool,
    cut: Mutex<bool>,
    cut_now: Condvar,
}

impl ProxyShared {
    fn cut(&self) {
        *self.cut.lock() = true;
        self.cut_now.notify_all();
        for s in self.streams.lock().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    fn wait_cut(&self) {
        let mut cut = self.cut.lock();
        while !*cut {
            self.cut_now.wait(&mut cut);
        }
    }
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(ProxyShared::default());
        let sh = shared.clone();
        std::thread::spawn(move || {
            let (down, _) = listener.accept().unwrap();
            let up = TcpStream::connect(upstream).unwrap();
            for s in [&down, &up] {
                s.set_nodelay(true).unwrap();
                sh.streams.lock().push(s.try_clone().unwrap());
            }
            let (d, u, s) = (
                down.try_clone().unwrap(),
                up.try_clone().unwrap(),
                sh.clone(),
            );
            std::thread::spawn(move || pump(d, u, &s));
            pump(up, down, &sh);
        });
        Proxy { addr, shared }
    }

    fn handle(&self) -> Arc<ProxyShared> {
        self.shared.clone()
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, shared: &ProxyShared) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.frozen.load(Ordering::SeqCst) {
            // Frozen: what arrives from now on is never delivered; the connection stays up
            // until the test cuts it.
            shared.wait_cut();
            return;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// After a stopped session the standby holds exactly the paused guest (every page the
/// version of the right run, the state taken with that memory), it verified every
/// checkpoint in order, and every output release followed the standby's verification of its
/// checkpoint. A second session resumes from that checkpoint sending only what the guest
/// wrote since.
///
/// Catches: pages gathered before the harvest or from the wrong address, a dirty set that
/// misses pages or a harvest that is dropped, state saved at another moment than the pages,
/// epochs skipped or reordered, output released before the ack (release-before-ack), a stop
/// that does not leave the guest paused, a lineage not recorded after a clean stop.
#[test]
fn acked_checkpoints_hold_exactly_the_guest_and_output_waits_for_the_ack() {
    const RUNS: u64 = 24;
    let mut rig = Rig::new(FakeGuest::new(512), spread);
    let sb = rig.standby();
    let addr = sb.local_addr();
    let serving = serve(sb);
    rig.ctl.stop_at(RUNS);
    // Epochs of 10 ms: pages are found by peeking at the dirty log while the guest runs.
    let out = rig.session(rig.config(addr, Duration::from_millis(10), 64, 2));
    let stats = out
        .result
        .unwrap_or_else(|e| panic!("the session failed: {}", error_chain(&e)));
    assert!(!out.resumed, "a fresh standby gets a full sync");
    assert_eq!(
        stats.sync_pages,
        rig.pages(),
        "a full sync sends every page"
    );
    let (sb, s) = serving.finish("session 1");
    if let Err(e) = &s.result {
        panic!("a stopped primary says goodbye: {}", error_chain(e));
    }
    assert_eq!(
        rig.guest.runs(),
        RUNS,
        "the stop was seen at the next checkpoint"
    );
    // A checkpoint after the full sync and after every run: runs 0..=RUNS.
    assert_eq!(stats.checkpoints_acked, RUNS + 1);
    let b = sb.backup().unwrap();
    assert_eq!(b.checkpoint, Some(stats.last_acked));
    assert_eq!(b.last_applied, stats.last_acked);
    assert_eq!(b.layout.regions, vec![(0, rig.pages() * PAGE_SIZE)]);
    rig.assert_backup_is_the_guest(&sb, "after session 1");

    let log = rig.log();
    let range = log.session(1);
    log.check_discipline();
    assert_eq!(
        log.verified(range.clone()),
        (0..=RUNS).collect::<Vec<_>>(),
        "the standby verifies every checkpoint once, in order"
    );
    log.check_output_commit(range.clone(), b.last_applied);
    let checkpoints = log.checkpoints(range.clone());
    assert_eq!(checkpoints.len() as u64, RUNS + 1);
    assert_eq!(
        checkpoints.last().map(|c| c.epoch),
        Some(stats.last_acked),
        "the last checkpoint is the last epoch acknowledged"
    );
    let releases = log.releases(range.clone());
    assert_eq!(
        releases.last(),
        Some(&stats.last_acked),
        "all output is released once the last checkpoint is acknowledged"
    );
    assert!(
        releases.len() >= 2,
        "output is released as checkpoints are acknowledged, not only at the end: {releases:?}"
    );
    assert_eq!(
        log.put_backs(range.clone()).iter().sum::<usize>(),
        0,
        "nothing failed, nothing is put back (but the full sync's empty rest)"
    );

    // The guest runs on unprotected for one run, then a new session resumes.
    rig.ctl.stop_at(RUNS + 4);
    rig.guest.resume();
    let delta = spread(RUNS + 1, rig.pages()).len();
    rig.resume_and_check(sb, delta);
}

/// The standby's connection is reset in the middle of the run (a proxy cut when the guest
/// starts run 6, right after a checkpoint was staged and before it is sent): the primary
/// reports a link error, leaves the guest running, releases no output of an unacknowledged
/// checkpoint, puts back the pages of every unacknowledged epoch (one `PutBack` per epoch,
/// of exactly the pages harvested for it), so that the dirty log holds exactly what the
/// standby lacks; a second session resumes from the standby's checkpoint.
///
/// Catches: a failed epoch whose pages are dropped (lost forever: a resumed standby is
/// silently stale), put-backs of the wrong sets, output released for a checkpoint the
/// standby never acknowledged, a guest left paused after a failure.
#[test]
fn a_standby_that_vanishes_fails_the_session_and_its_unacked_pages_go_back() {
    const CUT_AT: u64 = 6;
    let mut rig = Rig::new(FakeGuest::new(512), spread);
    let sb = rig.standby();
    let proxy = Proxy::start(sb.local_addr());
    let serving = serve(sb);
    let p = proxy.handle();
    rig.ctl.at_run(CUT_AT, move || p.cut());
    // Epochs of 0 ms: every checkpoint carries exactly one run's pages, found by its own
    // harvest while paused.
    let out = rig.session(rig.config(proxy.addr, Duration::ZERO, 64, 2));
    let err = out
        .result
        .expect_err("the session fails when the standby vanishes");
    assert!(
        matches!(err, PrimaryError::Link(_)),
        "a reset connection is a link error, got: {}",
        error_chain(&err)
    );
    assert!(
        !rig.guest.is_paused(),
        "after a failed session the guest runs"
    );
    let (sb, s) = serving.finish("the cut session");
    assert!(
        matches!(
            s.result,
            Err(StandbyError::PrimaryLost | StandbyError::Incomplete { .. })
        ),
        "the standby sees its primary lost: {:?}",
        s.result.as_ref().map_err(|e| error_chain(e))
    );

    let rp = rig
        .lineage
        .get()
        .expect("a failed session records where it ended (its resume point)");
    let log = rig.log();
    let range = log.session(1);
    log.check_discipline();
    let b = sb.backup().unwrap();
    log.check_output_commit(range.clone(), b.last_applied);
    assert!(
        log.releases(range.clone()).iter().all(|&e| e <= rp.acked),
        "no output of an unacknowledged checkpoint is released"
    );
    let checkpoints = log.checkpoints(range.clone());
    let unacked: Vec<Checkpoint> = checkpoints
        .iter()
        .copied()
        .filter(|c| c.epoch > rp.acked)
        .collect();
    assert!(
        unacked.iter().any(|c| c.runs == CUT_AT - 1),
        "the checkpoint staged before the cut was never acknowledged: {unacked:?}, acked {}",
        rp.acked
    );
    assert_eq!(
        unacked.last().map(|c| c.epoch),
        Some(rp.sent),
        "the last checkpoint staged is the last epoch sent"
    );
    let first_pause = log
        .position(range.clone(), |c| *c == Call::Pause { ok: true })
        .unwrap();
    // Each unacknowledged epoch's pages, oldest first (and nothing peeked for the next one:
    // there are no peeks with 0 ms epochs; empty put-backs do not count).
    assert!(unacked.iter().all(|c| c.pages > 0));
    let put_backs: Vec<usize> = log
        .put_backs(first_pause..range.end)
        .into_iter()
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(
        put_backs,
        unacked.iter().map(|c| c.pages).collect::<Vec<_>>(),
        "every unacknowledged epoch's pages are put back, once"
    );
    let delta = rig.assert_dirty_log_holds_the_unacked_pages(1);
    rig.resume_and_check(sb, delta);
}

/// Whether, since the guest last resumed (its run count at least `runs`), the engine peeked
/// at the dirty log and found pages: from then on it holds pages that a failure must not
/// lose.
fn after_a_peek(runs: u64) -> impl Fn(&[Call]) -> bool + Send + 'static {
    move |calls| {
        let resumes = calls.iter().filter(|c| **c == Call::Resume).count() as u64;
        let since = calls.iter().rposition(|c| *c == Call::Resume);
        resumes >= runs
            && since.is_some_and(|i| {
                calls[i..]
                    .iter()
                    .any(|c| matches!(c, Call::Harvest { pages: Some(n) } if *n > 0))
            })
    }
}

/// One injected guest fault, due once the guest ran 5 times and, except for a state save,
/// only once the engine peeked at the dirty log and found pages since the guest last resumed
/// (epochs of 5 ms, so it peeks while the guest runs): the session ends with
/// `PrimaryError::Guest` carrying that fault, the guest is left running, what the engine held
/// from the dirty log when the call failed is put back at once, the engine asks nothing more
/// of the guest (after a failed pause: no harvest, no state), no output of an
/// unacknowledged checkpoint leaves, the dirty log then holds exactly the pages the standby
/// lacks, and a second session resumes from the standby's checkpoint.
fn guest_fault(fault: Fault) {
    const FAULT_AT: u64 = 5;
    let mut rig = Rig::new(FakeGuest::new(512), spread);
    let sb = rig.standby();
    let addr = sb.local_addr();
    let serving = serve(sb);
    match fault {
        Fault::SaveState => rig.guest.inject_after(FAULT_AT, fault),
        _ => rig.guest.inject_when(fault, after_a_peek(FAULT_AT)),
    }
    // Should the fault never come due, the session ends by itself (and the test fails).
    rig.ctl.stop_at(FAULT_AT + 200);
    let out = rig.session(rig.config(addr, Duration::from_millis(5), 64, 2));
    let err = out
        .result
        .err()
        .unwrap_or_else(|| panic!("{fault:?}: the session must fail"));
    match &err {
        PrimaryError::Guest(e) => assert_eq!(
            e.downcast_ref::<InjectedFault>(),
            Some(&InjectedFault(fault)),
            "the guest's own error is reported: {e}"
        ),
        other => panic!(
            "{fault:?}: expected a guest error, got {}",
            error_chain(other)
        ),
    }
    assert!(rig.guest.pending_faults().is_empty(), "the fault fired");
    assert!(
        !rig.guest.is_paused(),
        "{fault:?}: after a failed session the guest runs"
    );
    let (sb, s) = serving.finish("the failed session");
    assert!(
        matches!(
            s.result,
            Err(StandbyError::PrimaryLost | StandbyError::Incomplete { .. })
        ),
        "the standby sees its primary lost: {:?}",
        s.result.as_ref().map_err(|e| error_chain(e))
    );

    let rp = rig
        .lineage
        .get()
        .expect("a failed session records where it ended (its resume point)");
    let log = rig.log();
    let range = log.session(1);
    log.check_discipline();
    log.check_output_commit(range.clone(), sb.backup().unwrap().last_applied);
    assert!(
        log.releases(range.clone()).iter().all(|&e| e <= rp.acked),
        "no output of an unacknowledged checkpoint is released"
    );
    let failed = match fault {
        Fault::Pause => Call::Pause { ok: false },
        Fault::SaveState => Call::SaveState { ok: false },
        Fault::Harvest | Fault::HarvestPaused | Fault::HarvestRunning => {
            Call::Harvest { pages: None }
        }
    };
    let f = log
        .position(range.clone(), |c| *c == failed)
        .unwrap_or_else(|| panic!("no {failed:?} in the log"));
    assert!(log.runs[f] >= FAULT_AT);
    let held = log.harvested_before(f);
    assert!(held > 0, "the engine held pages when the call failed");
    let put_back = log
        .position(
            f..range.end,
            |c| matches!(c, Call::PutBack { pages } if *pages > 0),
        )
        .expect("a put-back after the failure");
    assert_eq!(
        log.calls[put_back],
        Call::PutBack { pages: held },
        "{fault:?}: the pages harvested since the guest last resumed go back first"
    );
    if let Some(c) = log.calls[f + 1..range.end]
        .iter()
        .find(|c| !matches!(c, Call::PutBack { .. } | Call::Resume | Call::Mark(_)))
    {
        panic!("{fault:?}: after the failed call the engine still called {c:?}");
    }
    if fault == Fault::SaveState {
        // The checkpoint whose state failed had closed its output epoch: it never leaves.
        let failed = log.checkpoints(range.clone()).last().copied().unwrap();
        assert!(failed.at < f && failed.epoch > rp.acked, "{failed:?}");
        assert!(!log.releases(range).contains(&failed.epoch));
    }
    let delta = rig.assert_dirty_log_holds_the_unacked_pages(1);
    rig.resume_and_check(sb, delta);
}

/// Catches: a failed pause whose peeked pages are dropped, or that goes on to harvest or
/// save state of a running guest.
#[test]
fn a_pause_that_fails_harvests_nothing_and_loses_no_page() {
    guest_fault(Fault::Pause);
}

/// Catches: a failed checkpoint harvest that drops the pages peeked during the epoch, or
/// leaves the guest paused.
#[test]
fn a_failed_checkpoint_harvest_loses_no_page() {
    guest_fault(Fault::HarvestPaused);
}

/// A peek at the dirty log fails after an earlier peek of the same epoch found pages.
/// Catches: pages peeked earlier in the epoch dropped when a later peek fails.
#[test]
fn a_failed_peek_at_the_dirty_log_loses_no_page() {
    guest_fault(Fault::HarvestRunning);
}

/// Catches: a failed state save that drops the checkpoint's harvested pages, leaves the
/// guest paused, or lets the output epoch it closed leave.
#[test]
fn a_failed_state_save_loses_no_page_and_releases_nothing() {
    guest_fault(Fault::SaveState);
}

/// Runs 2, 6, 10, ... write 40 consecutive pages (more than a 16-page slot); the others 3.
fn bursts(run: u64, pages: u64) -> Vec<u64> {
    let mut v: Vec<u64> = if run % 4 == 2 {
        (0..40).map(|k| (run * 37 + k) % pages).collect()
    } else {
        (0..3).map(|k| (run * 53 + k * 71) % pages).collect()
    };
    v.sort_unstable();
    v.dedup();
    v
}

/// Checkpoints with more dirty pages than a slot holds (16) are sent in pieces while the
/// guest is paused, and still reach the standby whole, verified and acknowledged: the
/// backup is the guest, every checkpoint was verified in order, and each carried exactly the
/// pages of its run. The last checkpoint (taken with the guest left paused) is one of them.
///
/// Catches: an oversize epoch cut short or sent interleaved with the epochs queued before it
/// (the standby refuses it, or the backup misses pages), its state or checksum wrong, an
/// oversize last checkpoint that resumes the guest.
#[test]
fn oversize_epochs_reach_the_standby_whole() {
    const RUNS: u64 = 10;
    const SLOT: usize = 16;
    let mut rig = Rig::new(FakeGuest::new(256), bursts);
    let pages = rig.pages();
    let sb = rig.standby();
    let addr = sb.local_addr();
    let serving = serve(sb);
    rig.ctl.stop_at(RUNS);
    let out = rig.session(rig.config(addr, Duration::ZERO, SLOT, 2));
    let stats = out
        .result
        .unwrap_or_else(|e| panic!("the session failed: {}", error_chain(&e)));
    let (sb, s) = serving.finish("session 1");
    if let Err(e) = &s.result {
        panic!("a stopped primary says goodbye: {}", error_chain(e));
    }
    let oversize = (1..=RUNS)
        .filter(|&r| bursts(r, pages).len() > SLOT)
        .count() as u64;
    assert_eq!(oversize, 3, "runs 2, 6 and 10 (the last checkpoint's)");
    assert_eq!(stats.oversize, oversize, "oversize checkpoints counted");
    assert_eq!(stats.checkpoints_acked, RUNS + 1);
    rig.assert_backup_is_the_guest(&sb, "after oversize checkpoints");
    let log = rig.log();
    let range = log.session(1);
    log.check_discipline();
    log.check_output_commit(range.clone(), sb.backup().unwrap().last_applied);
    assert_eq!(log.verified(range.clone()), (0..=RUNS).collect::<Vec<_>>());
    let sizes: Vec<usize> = log
        .checkpoints(range.clone())
        .iter()
        .map(|c| c.pages)
        .collect();
    let expected: Vec<usize> = std::iter::once(0)
        .chain((1..=RUNS).map(|r| bursts(r, pages).len()))
        .collect();
    assert_eq!(sizes, expected, "each checkpoint carries its run's pages");
    assert_eq!(log.releases(range).last(), Some(&stats.last_acked));
}

/// The standby stops answering when the guest starts run 6 (a frozen proxy: no ack, no
/// heartbeat passes, no connection closes). The primary (heartbeat timeout 1.5 s) declares
/// it silent — `ProtocolError::PeerSilent`, after at least the timeout — and ends the
/// session with the guest running; the output of the checkpoint staged at the freeze and of
/// every later one is never released, their pages are in the dirty log, and a second
/// session resumes from the standby's checkpoint.
///
/// The standby-loss policies (`rmc primary --on-standby-loss pause|continue`: pause the VM
/// with its output held, or release it and run unprotected) are applied by the `rmc` binary
/// to exactly this outcome; they are not part of `rmc-mc` and not reachable from here.
///
/// Catches: a silent standby never detected (the session hangs: hang guard), detected
/// before its timeout, output released without an ack, pages of unacknowledged epochs lost.
#[test]
fn a_silent_standby_is_detected_by_the_heartbeat_timeout_and_its_output_stays_held() {
    const FREEZE_AT: u64 = 6;
    let hb = Heartbeat {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(1500),
    };
    let mut rig = Rig::new(FakeGuest::new(512), spread);
    let sb = rig.standby();
    let proxy = Proxy::start(sb.local_addr());
    let serving = serve(sb);
    let p = proxy.handle();
    rig.ctl.at_run(FREEZE_AT, move || p.freeze());
    let mut config = rig.config(proxy.addr, Duration::from_millis(5), 64, 2);
    config.heartbeat = hb;
    let out = rig.session(config);
    let err = out.result.expect_err("a silent standby ends the session");
    match &err {
        PrimaryError::Protocol(ProtocolError::PeerSilent {
            peer,
            silent,
            timeout,
        }) => {
            assert_eq!(*peer, "standby");
            assert_eq!(*timeout, hb.timeout);
            assert!(silent >= timeout, "declared silent after {silent:?}");
        }
        other => panic!(
            "expected the heartbeat timeout, got: {}",
            error_chain(other)
        ),
    }
    assert!(
        rig.guest.runs() >= FREEZE_AT,
        "silence detected before the standby froze (a stall longer than {:?}?)",
        hb.timeout
    );
    assert!(
        !rig.guest.is_paused(),
        "after a failed session the guest runs"
    );
    proxy.handle().cut();
    let (sb, s) = serving.finish("the frozen session");
    assert!(s.result.is_err(), "no goodbye passed the frozen proxy");

    let rp = rig
        .lineage
        .get()
        .expect("a failed session records where it ended (its resume point)");
    let log = rig.log();
    let range = log.session(1);
    log.check_discipline();
    log.check_output_commit(range.clone(), sb.backup().unwrap().last_applied);
    let frozen = log
        .checkpoints(range.clone())
        .into_iter()
        .find(|c| c.runs == FREEZE_AT - 1)
        .expect("the checkpoint staged when the standby froze");
    assert!(
        rp.acked < frozen.epoch,
        "the primary saw no ack of a checkpoint sent after the freeze"
    );
    let releases = log.releases(range);
    assert!(
        releases.iter().all(|&e| e <= rp.acked && e < frozen.epoch),
        "output of unacknowledged checkpoints stays held: released {releases:?}, acked {}",
        rp.acked
    );
    let delta = rig.assert_dirty_log_holds_the_unacked_pages(1);
    rig.resume_and_check(sb, delta);
}

/// Epochs of an hour, so only output (or the stop) ends one: each packet the guest sends is
/// followed by a checkpoint that closes its output epoch, and is released once the standby
/// acknowledged that checkpoint, without waiting for any deadline. With the trigger off the
/// same packet waits: no checkpoint follows it until the stop's last one.
///
/// Catches: a waker that is never called or whose event the loop ignores, a checkpoint
/// triggered without output waiting (or twice for one packet), output held over from before
/// the session start never triggering, a trigger that `output_trigger: None` does not turn
/// off, an output checkpoint that does not close the output epoch or whose output leaves
/// before its ack.
#[test]
fn waiting_output_ends_the_epoch_and_leaves_with_its_ack() {
    const PACKETS: usize = 4;
    let mut rig = Rig::new(FakeGuest::new(512), spread);
    let hour = Duration::from_secs(3600);
    let is_output = |c: &Call| matches!(c, Call::Output { .. });

    for trigger in [true, false] {
        let sb = rig.standby();
        let addr = sb.local_addr();
        let serving = serve(sb);
        let mut config = rig.config(addr, hour, 64, 2);
        if trigger {
            config.output_trigger = Some(OutputTrigger {
                min_gap: Duration::ZERO,
                max_pause_share: 1.0,
            });
        } else {
            config.output_trigger = None;
        }
        rig.ctl.stop.store(false, Ordering::SeqCst);
        let (guest, ctl) = (rig.guest.clone(), rig.ctl.clone());
        let session = rig.sessions + 1;
        let sender = std::thread::spawn(move || {
            let send = || {
                let mark = Call::Mark(session_mark(session));
                assert!(
                    guest.wait_for(HANG_GUARD, |calls| calls.contains(&mark)),
                    "the session started"
                );
                let start = guest.calls().len();
                packets(&guest, trigger, start)
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(send));
            // Whatever happened, the session ends (a failed check must not hang it).
            ctl.stop.store(true, Ordering::SeqCst);
            if let Err(p) = r {
                std::panic::resume_unwind(p);
            }
        });
        fn packets(guest: &FakeGuest, trigger: bool, start: usize) {
            let is_close = |c: &Call| matches!(c, Call::CloseOutput { .. });
            for k in 0..if trigger { PACKETS } else { 1 } {
                // One packet, sent while no checkpoint is pending (the first one possibly
                // before the session protects: it waits from then on).
                let before = guest.calls().len();
                guest.send_output();
                let sent = before
                    + guest.calls()[before..]
                        .iter()
                        .position(|c| matches!(c, Call::Output { .. }))
                        .expect("the packet is logged");
                let released = |calls: &[Call]| {
                    let Some(j) = calls[sent..].iter().position(is_close) else {
                        return false;
                    };
                    let Call::CloseOutput { epoch } = calls[sent + j] else {
                        unreachable!()
                    };
                    calls[sent + j..]
                        .iter()
                        .any(|c| matches!(c, Call::ReleaseOutput { epoch: e } if *e >= epoch))
                };
                if trigger {
                    assert!(
                        guest.wait_for(HANG_GUARD, released),
                        "packet {k}: no checkpoint released it within {HANG_GUARD:?}, with \
                         epochs of an hour"
                    );
                } else {
                    // Nothing but the deadline (in an hour) or the stop ends the epoch. The
                    // session has protected once a heartbeat's worth of time passed after
                    // the full sync.
                    let synced = |calls: &[Call]| {
                        calls[start..]
                            .iter()
                            .any(|c| matches!(c, Call::PutBack { .. }))
                    };
                    assert!(guest.wait_for(HANG_GUARD, synced), "the full sync ended");
                    std::thread::sleep(Duration::from_millis(300));
                    assert!(
                        !guest.calls()[sent..].iter().any(is_close),
                        "a checkpoint followed output with the trigger off"
                    );
                }
            }
        }
        let out = rig.session(config);
        sender.join().expect("the sending thread's checks");
        let stats = out
            .result
            .unwrap_or_else(|e| panic!("the session failed: {}", error_chain(&e)));
        let (sb, s) = serving.finish("the output session");
        if let Err(e) = &s.result {
            panic!("a stopped primary says goodbye: {}", error_chain(e));
        }
        rig.assert_backup_is_the_guest(&sb, "after the output session");
        let log = rig.log();
        let range = log.session(session);
        log.check_discipline();
        log.check_output_commit(range.clone(), stats.last_acked);
        let checkpoints = log.checkpoints(range.clone());
        let outputs: Vec<usize> = range
            .clone()
            .filter(|&i| is_output(&log.calls[i]))
            .collect();
        if trigger {
            // One checkpoint per packet, each after its packet, and the stop's last one.
            assert_eq!(stats.output_checkpoints, PACKETS as u64, "{checkpoints:?}");
            assert_eq!(checkpoints.len(), PACKETS + 1, "{checkpoints:?}");
            for (k, (&o, c)) in outputs.iter().zip(&checkpoints).enumerate() {
                assert!(c.at > o, "checkpoint {k} was taken before its packet");
            }
        } else {
            assert_eq!(stats.output_checkpoints, 0);
            assert_eq!(
                checkpoints.len(),
                1,
                "only the last checkpoint: {checkpoints:?}"
            );
        }
        // Every packet left, with the last acknowledged checkpoint at the latest.
        assert_eq!(log.releases(range).last(), Some(&stats.last_acked));
        rig.guest.resume();
    }
}

/// Without live dirty reads (platforms where reading the dirty log of a running guest is not
/// safe) the engine reads it only while the guest is paused, peeks at nothing during epochs,
/// and still leaves the standby holding exactly the guest: what the guest dirtied during the
/// one-round full sync goes into the first checkpoint.
///
/// Catches: a harvest of a running guest slipping through (the full sync's first or later
/// rounds, an epoch's peek), pages dirtied during the sync lost.
#[test]
fn without_live_dirty_reads_the_log_is_read_only_while_paused() {
    const RUNS: u64 = 12;
    let mut rig = Rig::new(FakeGuest::new(512), spread);
    let sb = rig.standby();
    let addr = sb.local_addr();
    let serving = serve(sb);
    rig.ctl.stop_at(RUNS);
    let mut config = rig.config(addr, Duration::from_millis(10), 64, 2);
    config.live_dirty_reads = false;
    let out = rig.session(config);
    let stats = out
        .result
        .unwrap_or_else(|e| panic!("the session failed: {}", error_chain(&e)));
    let (sb, s) = serving.finish("session 1");
    if let Err(e) = &s.result {
        panic!("a stopped primary says goodbye: {}", error_chain(e));
    }
    assert_eq!(stats.sync_pages, rig.pages(), "one round: every page once");
    rig.assert_backup_is_the_guest(&sb, "after a session without live dirty reads");
    let log = rig.log();
    log.check_discipline();
    let mut paused = false;
    let mut harvests = 0;
    for (i, c) in log.calls.iter().enumerate() {
        match c {
            Call::Pause { ok } => paused = *ok,
            Call::Resume => paused = false,
            Call::Harvest { .. } => {
                assert!(paused, "call {i}: the dirty log read while the guest runs");
                harvests += 1;
            }
            _ => {}
        }
    }
    assert!(harvests as u64 >= RUNS, "{harvests} harvests");
}

/// An arbiter that records the current standby only when the test lets it: it reports each
/// request, then waits for the test's word.
#[derive(Debug)]
struct SlowArbiter {
    asked: Mutex<mpsc::Sender<String>>,
    answer: Mutex<mpsc::Receiver<()>>,
}

impl rmc_mc::primary::Fencing for SlowArbiter {
    fn fence(&self) -> u64 {
        7
    }

    fn standby_current(&self, token: &str) -> Result<(), BoxError> {
        let _ = self.asked.lock().send(token.to_string());
        self.answer
            .lock()
            .recv_timeout(HANG_GUARD)
            .map_err(|e| format!("the test never answered: {e}").into())
    }
}

/// With an arbiter, a standby may take over only once the arbiter records it as current. Until
/// then the primary's count of acknowledged checkpoints (what `rmc` reports as "the first
/// checkpoint acknowledged", after which tests and operators may kill the primary) stays 0
/// and no output leaves, although the standby already acknowledged a checkpoint.
///
/// Catches: the count published at the ack, before the arbiter's record (a primary killed in
/// that window leaves a standby the arbiter calls stale: no failover), output released first.
#[test]
fn acks_count_and_output_leaves_only_once_the_arbiter_records_the_standby() {
    const RUNS: u64 = 8;
    let mut rig = Rig::new(FakeGuest::new(256), spread);
    let sb = rig.standby();
    let addr = sb.local_addr();
    let serving = serve(sb);
    let (asked_tx, asked) = mpsc::channel();
    let (answer, answer_rx) = mpsc::channel();
    let arbiter = Arc::new(SlowArbiter {
        asked: Mutex::new(asked_tx),
        answer: Mutex::new(answer_rx),
    });
    let mut config = rig.config(addr, Duration::from_millis(10), 64, 2);
    config.fencing = Some(arbiter);
    rig.ctl.stop_at(RUNS);
    rig.guest.mark(session_mark(1));
    rig.sessions += 1;
    let (guest, ctl) = (rig.guest.clone(), rig.ctl.clone());
    let (counter_tx, counter) = mpsc::channel();
    let primary = std::thread::spawn(move || {
        let p = Primary::connect(&*guest, config)
            .unwrap_or_else(|e| panic!("cannot connect: {}", error_chain(&e)));
        counter_tx.send(p.acked_counter()).unwrap();
        p.run(&ctl.stop)
    });
    let acked = counter
        .recv_timeout(HANG_GUARD)
        .expect("the primary connected");
    let token = asked
        .recv_timeout(HANG_GUARD)
        .expect("the primary asks the arbiter to record its standby");
    assert_eq!(token.len(), 2 * NONCE_LEN, "the session's token: {token}");
    let log = rig.log();
    let range = log.session(1);
    assert!(
        !log.verified(range.clone()).is_empty(),
        "the standby verified a checkpoint before the primary asked the arbiter"
    );
    assert_eq!(
        acked.load(Ordering::SeqCst),
        0,
        "a checkpoint counted as acknowledged before the arbiter recorded the standby"
    );
    assert_eq!(
        log.releases(range),
        Vec::<u64>::new(),
        "output released before the arbiter recorded the standby"
    );
    answer.send(()).unwrap();
    let stats = primary
        .join()
        .expect("the primary thread")
        .unwrap_or_else(|e| panic!("the session failed: {}", error_chain(&e)));
    assert_eq!(acked.load(Ordering::SeqCst), stats.checkpoints_acked);
    assert_eq!(stats.checkpoints_acked, RUNS + 1);
    let (_sb, s) = serving.finish("session 1");
    if let Err(e) = &s.result {
        panic!("a stopped primary says goodbye: {}", error_chain(e));
    }
    let log = rig.log();
    let range = log.session(1);
    assert_eq!(log.releases(range).last(), Some(&stats.last_acked));
    assert!(
        asked.try_recv().is_err(),
        "the arbiter is asked once per session"
    );
}

/// A guest of two RAM regions with a gap between them (0 and 1 GiB) and two vCPUs: the
/// layout reaches the standby, pages of both regions land at their guest addresses.
///
/// Catches: pages addressed by index instead of guest address, a second region ignored by
/// the full sync or the dirty sets, the vCPU count not announced.
#[test]
fn two_regions_and_two_vcpus_replicate_exactly() {
    const RUNS: u64 = 12;
    let guest = FakeGuest::with_regions(&[(0, 192), (1 << 30, 64)], 2);
    let regions = rmc_guest_api::GuestRam::regions(&guest);
    let mut rig = Rig::new(guest, spread);
    assert!(
        (1..=RUNS).any(|r| spread(r, rig.pages()).iter().any(|&p| p >= 192)),
        "the workload writes the second region"
    );
    let sb = rig.standby();
    let addr = sb.local_addr();
    let serving = serve(sb);
    rig.ctl.stop_at(RUNS);
    let out = rig.session(rig.config(addr, Duration::from_millis(10), 32, 3));
    let stats = out
        .result
        .unwrap_or_else(|e| panic!("the session failed: {}", error_chain(&e)));
    let (sb, s) = serving.finish("session 1");
    if let Err(e) = &s.result {
        panic!("a stopped primary says goodbye: {}", error_chain(e));
    }
    let b = sb.backup().unwrap();
    assert_eq!(b.layout.regions, regions);
    assert_eq!(b.layout.vcpus, 2);
    assert_eq!(stats.sync_pages, rig.pages());
    rig.assert_backup_is_the_guest(&sb, "two regions");
    let log = rig.log();
    let range = log.session(1);
    log.check_discipline();
    log.check_output_commit(range.clone(), b.last_applied);
    assert_eq!(log.verified(range), (0..=RUNS).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// The bug: an oversize checkpoint's pages dropped
// ---------------------------------------------------------------------------------------------

/// Run 3 writes pages 0..2048 (exactly a 2048-page slot), run 4 pages 1996..4096 (2100: more
/// than a slot), the others as [`spread`].
fn blocker_then_oversize(run: u64, pages: u64) -> Vec<u64> {
    match run {
        3 => (0..2048).collect(),
        4 => (1996..4096).collect(),
        _ => spread(run, pages),
    }
}

/// Whether the log shows a checkpoint that harvested `pages` pages and saved its state.
fn staged(calls: &[Call], pages: usize) -> bool {
    calls
        .iter()
        .position(|c| *c == Call::Harvest { pages: Some(pages) })
        .is_some_and(|i| calls[i..].contains(&Call::SaveState { ok: true }))
}

/// `Primary::send_oversize` first waits until every epoch queued before is on the wire and
/// only then registers the oversize epoch with the core (`begin_epoch`, which keeps its dirty
/// set for the put-back). An error in that wait (the link fails, the standby refuses or goes
/// silent) must put the epoch's dirty set back itself: `run` puts back only the in-flight
/// epochs, which do not include it. Without that the pages are gone from the dirty log, a
/// session that resumes from the standby's checkpoint never sends them and the standby's
/// backup is silently stale (found by this test; it lost 2,041 pages every time).
///
/// Reproduced deterministically: a scripted standby acknowledges epochs until a 2048-page
/// checkpoint (run 3's pages), which it does not read (with a small receive buffer the
/// primary's sender blocks on it); it waits until the primary staged the next checkpoint, of
/// 2100 pages (oversize, waiting for the one before), then refuses the session.
#[test]
fn an_oversize_checkpoint_that_fails_before_it_is_sent_is_put_back() {
    let mut rig = Rig::new(FakeGuest::new(4096), blocker_then_oversize);
    let oversize = blocker_then_oversize(4, 4096).len();
    let (addr, standby) = scripted_standby(rig.guest.clone(), 2048, move |calls| {
        staged(calls, oversize)
    });
    let out = rig.session(rig.config(addr, Duration::ZERO, 2048, 2));
    let err = out.result.expect_err("the standby refused the session");
    assert!(
        matches!(
            err,
            PrimaryError::Protocol(ProtocolError::Refused {
                peer: "standby",
                ..
            })
        ),
        "{}",
        error_chain(&err)
    );
    standby.join().expect("the scripted standby");
    let log = rig.log();
    let range = log.session(1);
    assert!(
        staged(&log.calls[range.clone()], oversize),
        "the oversize checkpoint was staged"
    );
    log.check_discipline();
    assert!(!rig.guest.is_paused());
    rig.assert_dirty_log_holds_the_unacked_pages(1);
}

/// A standby speaking the protocol by hand: authenticates, acknowledges every epoch it
/// reads, until the header of a checkpoint of at least `block_pages` pages; that one it does
/// not read (its receive buffer is small, so the primary's sender blocks on it). It waits
/// until the guest's log satisfies `then`, refuses the session, and closes once the test
/// marked that the primary's run returned.
fn scripted_standby(
    guest: Arc<FakeGuest>,
    block_pages: u64,
    then: impl Fn(&[Call]) -> bool + Send + 'static,
) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // Accepted connections inherit it: the kernel holds at most this much of what the
    // standby does not read (beyond the primary's send buffer).
    small_receive_buffer(&listener, 64 << 10);
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap());
        let mut w = FrameWriter::new(s);
        let mut idle = |last: Instant| -> Result<(), Abort> {
            if last.elapsed() > HANG_GUARD {
                Err(format!("nothing from the primary for {HANG_GUARD:?}").into())
            } else {
                Ok(())
            }
        };
        let Message::Hello { nonce: hello, .. } = r.next_message(&mut idle).unwrap() else {
            panic!("expected a Hello")
        };
        let challenge = auth::nonce();
        w.send(&Message::Challenge {
            nonce: challenge,
            proof: auth::standby_proof(SECRET, &hello, &challenge),
        })
        .unwrap();
        let Message::Auth { proof, .. } = r.next_message(&mut idle).unwrap() else {
            panic!("expected an Auth")
        };
        assert!(auth::proofs_equal(
            &proof,
            &auth::primary_proof(SECRET, &challenge, &hello)
        ));
        w.send(&Message::Accept {
            last_applied: 0,
            lineage: [0; NONCE_LEN],
        })
        .unwrap();
        let mut body = Vec::new();
        loop {
            let h = r.read_header(1 << 40, &mut idle).unwrap();
            if h.ty == MsgType::EpochBody {
                body.resize(h.len as usize, 0);
                r.read_full(&mut body, "an epoch body", &mut idle).unwrap();
                continue;
            }
            match r.read_message(h, &mut idle).unwrap() {
                Message::EpochHeader(e)
                    if e.kind == EpochKind::Checkpoint && e.page_count >= block_pages =>
                {
                    assert!(
                        guest.wait_for(HANG_GUARD, &then),
                        "the primary never got where the scripted standby waits for it"
                    );
                    w.send(&Message::Refuse {
                        reason: "the scripted standby refuses".into(),
                    })
                    .unwrap();
                    let returned = Call::Mark("test: the primary's run returned".into());
                    assert!(guest.wait_for(HANG_GUARD, |c| c.contains(&returned)));
                    return;
                }
                Message::Commit { epoch, .. } => w.send(&Message::Ack { epoch }).unwrap(),
                Message::EpochHeader(_) | Message::Heartbeat { .. } => {}
                other => panic!("the scripted standby got {other:?}"),
            }
        }
    });
    (addr, t)
}

/// Sets `SO_RCVBUF` of a socket (Linux), which also turns off the kernel's growing of it.
fn small_receive_buffer(socket: &impl std::os::fd::AsRawFd, bytes: i32) {
    extern "C" {
        fn setsockopt(
            fd: i32,
            level: i32,
            name: i32,
            value: *const std::ffi::c_void,
            len: u32,
        ) -> i32;
    }
    /// `SOL_SOCKET` and `SO_RCVBUF` of Linux's generic socket ABI (x86, Arm, RISC-V).
    const SOL_SOCKET: i32 = 1;
    const SO_RCVBUF: i32 = 8;
    // SAFETY: the descriptor is an open socket owned by `socket`, which outlives the call;
    // the value points to an i32 that lives across it, and its length is given.
    let r = unsafe {
        setsockopt(
            socket.as_raw_fd(),
            SOL_SOCKET,
            SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}
