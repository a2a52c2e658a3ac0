//! Output commit with a real VM: no reply leaves the primary before the standby acknowledged
//! the checkpoint that produced it. A scripted standby (the real protocol core, with its acks
//! delayed or withheld, recording when each commit arrived and when each ack left) shows
//! replies waiting for acks; a tiny output buffer under a burst shows backpressure without
//! loss.
//!
//! The primary and the standby run on threads that return their outcome; every test joins
//! them and checks it. Every wait has a deadline, and nothing waits by sleeping.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmc_mc::primary::{Primary, PrimaryConfig, PrimaryError, PrimaryStats};
use rmc_mc::protocol::{
    msg_type, refusal, Heartbeat, LayoutRule, ProtocolError, StandbyAction, StandbyCore,
};
use rmc_mc::standby::{error_chain, Standby, StandbyConfig};
use rmc_mc::PAGE_SIZE;
use rmc_tests::{init_logs, kvm_available, wait_for};
use rmc_transport::framing::{Abort, FrameReader, FrameWriter, LinkError};
use rmc_transport::wire::{self, auth, EpochKind, Layout, Message, MsgType, MAX_STATE_LEN};
use rmc_vmm::guest::STATUS_OK;
use rmc_vmm::service::{Reply, Request};
use rmc_vmm::{Vm, VmConfig, VmState, Workload};

const SECRET: &[u8] = b"output commit test secret";
/// Guest memory.
const MEM: u64 = 32 << 20;
/// Heartbeats for a busy 2-core machine: a peer is declared dead after 5 s of silence only.
const HB: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    timeout: Duration::from_secs(5),
};
/// Hang guard for waits that normally take milliseconds.
const LONG: Duration = Duration::from_secs(30);
/// Hang guard for a whole scripted standby session.
const SESSION_LIMIT: Duration = Duration::from_secs(120);

// ---- the scripted standby ----

/// Which epochs the scripted standby acknowledges. Sync epochs (the full sync) are always
/// acked at once: the primary takes checkpoints only once the full sync is through.
#[derive(Debug, Clone, Copy)]
enum Acks {
    /// No checkpoint epoch, ever.
    NoCheckpoint,
    /// Every checkpoint epoch, this long after its commit arrived.
    CheckpointsAfter(Duration),
}

/// An epoch whose commit arrived and matched the body received (the standby applied it).
#[derive(Debug, Clone, Copy)]
struct Committed {
    epoch: u64,
    kind: EpochKind,
    /// When the standby read the commit.
    at: Instant,
    /// For a checkpoint: frames the guest's NIC had taken from its TX ring (into the output
    /// buffer) when the checkpoint's pause began, read from the checkpoint's device state.
    tx_frames: Option<u64>,
}

/// An ack the standby sent.
#[derive(Debug, Clone, Copy)]
struct Acked {
    epoch: u64,
    kind: EpochKind,
    /// Taken just before the ack was written: the primary cannot have had it earlier.
    sent_at: Instant,
}

/// What the scripted standby saw and did, in order.
#[derive(Debug, Default)]
struct Record {
    commits: Vec<Committed>,
    acks: Vec<Acked>,
}

impl Record {
    fn checkpoints(&self) -> impl Iterator<Item = &Committed> {
        self.commits
            .iter()
            .filter(|c| c.kind == EpochKind::Checkpoint)
    }
}

/// How a scripted session ended (when it did not fail).
#[derive(Debug, PartialEq, Eq)]
enum SessionEnd {
    /// The primary said goodbye (a deliberate stop).
    Goodbye,
    /// The test asked the standby to close the connection, and the primary closed its end.
    ClosedByStandby,
}

/// A standby that speaks the protocol through the real core (handshake, epoch order, body
/// length, checksum in the commit) but acks as its [`Acks`] says, and keeps heartbeating, so the
/// primary does not give up on it.
struct ScriptedStandby {
    addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    close: Arc<AtomicBool>,
    thread: JoinHandle<Result<SessionEnd, String>>,
}

impl ScriptedStandby {
    fn start(acks: Acks) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the scripted standby");
        let addr = listener
            .local_addr()
            .expect("the scripted standby's address");
        let record = Arc::new(Mutex::new(Record::default()));
        let close = Arc::new(AtomicBool::new(false));
        let thread = {
            let (record, close) = (record.clone(), close.clone());
            std::thread::spawn(move || serve_scripted(listener, acks, &record, &close))
        };
        ScriptedStandby {
            addr,
            record,
            close,
            thread,
        }
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().expect("the scripted standby's record")
    }

    /// Closes the connection (the primary loses its standby) and returns how the session went.
    fn close(self) -> Result<SessionEnd, String> {
        self.close.store(true, Ordering::Release);
        join("the scripted standby", self.thread, LONG)
    }

    /// Waits for the session to end by itself.
    fn join(self) -> Result<SessionEnd, String> {
        join("the scripted standby", self.thread, LONG)
    }
}

/// Why the scripted standby's idle callback stops a read.
#[derive(Debug, thiserror::Error)]
enum Stop {
    /// The test asked to close.
    #[error("closing on the test's request")]
    Closing,
    /// The hang guard.
    #[error("the session outlived its {SESSION_LIMIT:?} limit")]
    Outlived,
    /// Sending a due ack or a heartbeat failed.
    #[error("{0}")]
    Send(String),
    /// The core gave up on the primary (its heartbeat timeout).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// One session of the scripted standby: accept one primary, serve it until it says goodbye,
/// until the test sets `close`, or until anything goes wrong (returned as the error).
fn serve_scripted(
    listener: TcpListener,
    acks: Acks,
    record: &Mutex<Record>,
    close: &AtomicBool,
) -> Result<SessionEnd, String> {
    let deadline = Instant::now() + SESSION_LIMIT;
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    listener
        .set_nonblocking(true)
        .map_err(io("making the listener non-blocking"))?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if close.load(Ordering::Acquire) || Instant::now() > deadline {
                    return Err("no primary connected".into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("accepting the primary: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(io("making the connection blocking"))?;
    stream
        .set_nodelay(true)
        .map_err(io("setting TCP_NODELAY"))?;
    // Short read timeouts: idle calls send due acks and heartbeats and notice `close`.
    stream
        .set_read_timeout(Some(Duration::from_millis(2)))
        .map_err(io("setting a read timeout"))?;
    let mut reader = FrameReader::new(stream.try_clone().map_err(io("cloning the socket"))?);
    let mut s = Scripted {
        core: StandbyCore::new(SECRET, LayoutRule::default(), 0, HB, Instant::now()),
        writer: FrameWriter::new(stream.try_clone().map_err(io("cloning the socket"))?),
        due: VecDeque::new(),
        record,
        close,
        deadline,
    };
    let ended = |e: LinkError| match e {
        e if matches!(e.aborted_by::<Stop>(), Some(Stop::Closing)) => close_session(&stream),
        e => Err(format!("reading from the primary: {}", error_chain(&e))),
    };
    let mut body = Vec::new();
    let mut tx_frames = None;
    loop {
        let max_body = s.core.layout().map_or(0, max_body_len);
        let h = match reader.read_header(max_body, &mut |t| s.idle(t)) {
            Ok(h) => h,
            Err(e) => return ended(e),
        };
        if h.ty == MsgType::EpochBody {
            let header = s.core.on_body_frame(h.len).map_err(|e| s.refuse(e))?;
            body.resize(h.len as usize, 0);
            if let Err(e) = reader.read_full(&mut body, "an epoch body", &mut |t| s.idle(t)) {
                return ended(e);
            }
            s.core
                .body_received(wire::checksum(&[body.as_slice()]), Instant::now())
                .map_err(|e| s.refuse(e))?;
            tx_frames = match header.kind {
                EpochKind::Sync => None,
                EpochKind::Checkpoint => {
                    let state = &body[body.len() - header.state_len as usize..];
                    let state = VmState::decode(state).map_err(|e| {
                        format!(
                            "epoch {}: undecodable state: {}",
                            header.epoch,
                            error_chain(&e)
                        )
                    })?;
                    Some(state.devices.nic.stats.tx_frames)
                }
            };
            s.flush()?;
            continue;
        }
        let msg = match reader.read_message(h, &mut |t| s.idle(t)) {
            Ok(m) => m,
            Err(e) => return ended(e),
        };
        let now = Instant::now();
        match s.core.on_message(msg, auth::nonce(), now) {
            Err(e) => return Err(s.refuse(e)),
            Ok(StandbyAction::Send(m)) => s.send(&m)?,
            Ok(StandbyAction::Established { accept, .. }) => s.send(&accept)?,
            Ok(StandbyAction::Apply(header)) => {
                // Verified (checksum) and taken; only the ack is scripted.
                let ack = s.core.applied();
                s.lock().commits.push(Committed {
                    epoch: header.epoch,
                    kind: header.kind,
                    at: now,
                    tx_frames: tx_frames.take(),
                });
                let due = match (header.kind, acks) {
                    (EpochKind::Sync, _) => Some(now),
                    (EpochKind::Checkpoint, Acks::NoCheckpoint) => None,
                    (EpochKind::Checkpoint, Acks::CheckpointsAfter(d)) => Some(now + d),
                };
                if let Some(due) = due {
                    s.due.push_back((due, header.epoch, header.kind, ack));
                }
            }
            Ok(StandbyAction::Goodbye) => {
                if !s.due.is_empty() {
                    return Err(format!(
                        "goodbye while acks were still due: {:?}",
                        s.due.iter().map(|d| d.1).collect::<Vec<_>>()
                    ));
                }
                return Ok(SessionEnd::Goodbye);
            }
            Ok(StandbyAction::None | StandbyAction::ExpectBody { .. }) => {}
            Ok(StandbyAction::BodyPlaced { .. }) => {
                // The core refuses placements on a connection that sent no RegionKey.
                return Err("an RDMA placement on a TCP connection was accepted".into());
            }
        }
        s.flush()?;
    }
}

/// The scripted standby's protocol side: its core, its writer and the acks it owes.
struct Scripted<'a> {
    core: StandbyCore,
    writer: FrameWriter<TcpStream>,
    /// Acks to send (due time, epoch, kind, ack), in epoch order.
    due: VecDeque<(Instant, u64, EpochKind, Message)>,
    record: &'a Mutex<Record>,
    close: &'a AtomicBool,
    deadline: Instant,
}

impl Scripted<'_> {
    fn lock(&self) -> MutexGuard<'_, Record> {
        // The test thread only reads the record; a poisoned lock still holds good data.
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// While a read waits: stop if asked to, send due acks and heartbeats, and give up on a
    /// silent primary (heartbeat timeout) or a session past its hang guard.
    fn idle(&mut self, last_data: Instant) -> Result<(), Abort> {
        self.core.heard(last_data);
        if self.close.load(Ordering::Acquire) {
            return Err(Stop::Closing.into());
        }
        if Instant::now() > self.deadline {
            return Err(Stop::Outlived.into());
        }
        self.flush().map_err(Stop::Send)?;
        match self.core.tick(Instant::now()) {
            Ok(Some(hb)) => Ok(self.send(&hb).map_err(Stop::Send)?),
            Ok(None) => Ok(()),
            Err(e) => Err(Stop::Protocol(e).into()),
        }
    }

    /// Sends every ack that is due, oldest first.
    fn flush(&mut self) -> Result<(), String> {
        let now = Instant::now();
        while self.due.front().is_some_and(|d| d.0 <= now) {
            let (_, epoch, kind, ack) = self.due.pop_front().expect("checked");
            let sent_at = Instant::now();
            self.lock().acks.push(Acked {
                epoch,
                kind,
                sent_at,
            });
            self.send(&ack)?;
        }
        Ok(())
    }

    fn send(&mut self, m: &Message) -> Result<(), String> {
        self.writer
            .send(m)
            .map_err(|e| format!("sending {:?}: {}", msg_type(m), error_chain(&e)))?;
        self.core.sent(Instant::now());
        Ok(())
    }

    /// Tells the primary why the session ends (as the real standby does); returns the reason.
    fn refuse(&mut self, e: ProtocolError) -> String {
        if let Some(m) = refusal(&e) {
            let _ = self.writer.send(&m);
        }
        format!("protocol error: {e}")
    }
}

/// Ends a session from the standby's side: no more output (the primary reads the end of the
/// stream), then reads until the primary closed its end too, so that no unread byte turns the
/// close into a reset.
fn close_session(stream: &TcpStream) -> Result<SessionEnd, String> {
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutting down the connection: {e}"))?;
    let deadline = Instant::now() + LONG;
    let mut sink = vec![0u8; 64 << 10];
    let mut r = stream;
    loop {
        match r.read(&mut sink) {
            Ok(0) => return Ok(SessionEnd::ClosedByStandby),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("reading after closing: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!("the primary did not close its end within {LONG:?}"));
        }
    }
}

fn max_body_len(l: &Layout) -> u64 {
    l.total_pages() * (8 + u64::from(l.page_size)) + u64::from(MAX_STATE_LEN)
}

// ---- the primary ----

/// A primary protecting a VM on its own thread, which returns `run`'s outcome.
struct PrimaryThread {
    stop: Arc<AtomicBool>,
    /// Checkpoints acknowledged so far.
    acked: Arc<AtomicU64>,
    thread: JoinHandle<Result<PrimaryStats, PrimaryError>>,
}

impl PrimaryThread {
    /// Connects to `standby` (the handshake done) and starts protecting `vm` with epochs of
    /// 10 ms and `slots` staging slots.
    fn start(vm: &Arc<Vm>, standby: SocketAddr, slots: usize) -> Self {
        Self::start_with(vm, standby, |cfg| {
            cfg.epoch_interval = Duration::from_millis(10);
            cfg.slots = slots;
        })
    }

    /// The same with the defaults of `PrimaryConfig` changed by `set`.
    fn start_with(vm: &Arc<Vm>, standby: SocketAddr, set: impl FnOnce(&mut PrimaryConfig)) -> Self {
        let mut cfg = PrimaryConfig::new(standby, SECRET.to_vec(), MEM / PAGE_SIZE);
        cfg.heartbeat = HB;
        set(&mut cfg);
        let stop = Arc::new(AtomicBool::new(false));
        let (connected, acked) = mpsc::channel();
        let thread = {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                let p = Primary::connect(&*vm, cfg)?;
                let _ = connected.send(p.acked_counter());
                p.run(&stop)
            })
        };
        let acked = match acked.recv_timeout(LONG) {
            Ok(a) => a,
            Err(e) => {
                let why = match join("the primary", thread, LONG) {
                    Err(e) => error_chain(&e),
                    Ok(_) => format!("it returned without connecting ({e})"),
                };
                panic!("the primary did not connect to its standby: {why}");
            }
        };
        PrimaryThread {
            stop,
            acked,
            thread,
        }
    }

    /// Stops protecting (a last checkpoint, its ack, a goodbye) and returns the figures.
    fn stop(self) -> PrimaryStats {
        self.stop.store(true, Ordering::Release);
        join("the primary", self.thread, LONG)
            .unwrap_or_else(|e| panic!("the primary failed: {}", error_chain(&e)))
    }
}

// ---- shared helpers ----

/// Joins a helper thread within `within` (a hang guard); a panic on it fails the test.
fn join<T>(what: &str, thread: JoinHandle<T>, within: Duration) -> T {
    wait_for(&format!("{what} to end"), within, || thread.is_finished());
    thread
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Raises flags when dropped, so that when an assertion fails the helper threads end too (the
/// primary stops, the scripted standby closes) instead of running on under the next test.
struct RaiseOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for RaiseOnDrop {
    fn drop(&mut self) {
        for f in &self.0 {
            f.store(true, Ordering::Release);
        }
    }
}

/// A real standby serving one session on a thread.
fn real_standby() -> (
    SocketAddr,
    JoinHandle<Result<rmc_mc::standby::Session, rmc_mc::standby::StandbyError>>,
) {
    let mut sb = Standby::bind(
        "127.0.0.1:0".parse().unwrap(),
        StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: Some(MEM),
            heartbeat: HB,
            ..StandbyConfig::default()
        },
    )
    .unwrap();
    (sb.local_addr(), std::thread::spawn(move || sb.serve_one()))
}

/// Joins a [`real_standby`]; its session must have ended well (a goodbye).
fn finish_standby(
    standby: JoinHandle<Result<rmc_mc::standby::Session, rmc_mc::standby::StandbyError>>,
) -> rmc_mc::standby::Session {
    let session = join("the standby", standby, LONG).expect("the standby's session");
    if let Err(e) = &session.result {
        panic!("the standby's session failed: {}", error_chain(e));
    }
    session
}

/// A running counter guest with output commit on (as `rmc primary` does before it connects).
fn counter_vm(limits: rmc_netbuf::Limits) -> Arc<Vm> {
    let vm = Arc::new(
        Vm::new(&VmConfig {
            mem_size: MEM,
            workloads: vec![Workload::Counter],
            nic_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        })
        .unwrap(),
    );
    vm.resume();
    vm.enable_output_commit(limits).unwrap();
    vm
}

fn ask(sock: &UdpSocket, server: SocketAddr, client_id: u64, seq: u64) {
    sock.send_to(&Request { client_id, seq }.encode(), server)
        .unwrap();
}

/// The next reply on `sock` within `wait`, and when it arrived.
fn answer(sock: &UdpSocket, wait: Duration) -> Option<(Reply, Instant)> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    let (n, _) = sock.recv_from(&mut b).ok()?;
    let at = Instant::now();
    Some((Reply::decode(&b[..n]).unwrap(), at))
}

// ---- the tests ----

#[test]
fn a_standby_that_never_acks_lets_no_reply_out() {
    if !kvm_available("a_standby_that_never_acks_lets_no_reply_out") {
        return;
    }
    init_logs();
    // Each unacknowledged checkpoint keeps its staging slot: the primary commits one
    // checkpoint per slot, then waits (heartbeating) for an ack that never comes.
    const SLOTS: usize = 4;
    let standby = ScriptedStandby::start(Acks::NoCheckpoint);
    let _end_standby = RaiseOnDrop(vec![standby.close.clone()]);
    let vm = counter_vm(Default::default());
    let server = vm.nic_addr().unwrap();

    // A request answered before protection starts: its reply waits in the output buffer, in
    // the open epoch, which the first checkpoint closes. So every checkpoint the primary takes
    // comes after this reply.
    let early = UdpSocket::bind("127.0.0.1:0").unwrap();
    ask(&early, server, 1, 1);
    wait_for("the guest to answer the first request", LONG, || {
        vm.nic_stats().tx_frames == 1
    });
    let primary = PrimaryThread::start(&vm, standby.addr, SLOTS);
    let _end_primary = RaiseOnDrop(vec![primary.stop.clone()]);

    // A request while protected (checkpoints being committed).
    wait_for("the first checkpoint's commit", LONG, || {
        standby.record().checkpoints().count() > 0
    });
    let late = UdpSocket::bind("127.0.0.1:0").unwrap();
    ask(&late, server, 2, 1);
    wait_for("the guest to answer the second request", LONG, || {
        vm.nic_stats().tx_frames == 2
    });
    wait_for(
        &format!("{SLOTS} checkpoints committed to the standby"),
        LONG,
        || standby.record().checkpoints().count() >= SLOTS,
    );

    // Several checkpoints holding the replies were committed and none was acknowledged...
    {
        let rec = standby.record();
        let checkpoints: Vec<_> = rec.checkpoints().collect();
        assert!(
            checkpoints
                .iter()
                .all(|c| c.tx_frames.is_some_and(|n| n >= 1)),
            "every checkpoint was taken after the guest sent the first reply: {checkpoints:?}"
        );
        assert!(
            !rec.acks.is_empty() && rec.acks.iter().all(|a| a.kind == EpochKind::Sync),
            "the standby acked the full sync and no checkpoint: {:?}",
            rec.acks
        );
        eprintln!(
            "{} checkpoints committed, none acked; {} of them hold the second reply",
            checkpoints.len(),
            checkpoints
                .iter()
                .filter(|c| c.tx_frames.is_some_and(|n| n >= 2))
                .count()
        );
    }
    // ...so no reply left: both are held, and the primary is still protecting.
    for (sock, which) in [(&early, "first"), (&late, "second")] {
        if let Some((r, _)) = answer(sock, Duration::from_millis(200)) {
            panic!("the {which} reply left without an ack: {r:?}");
        }
    }
    let out = vm.output_stats().expect("output commit is on");
    assert_eq!(
        (out.held_packets, out.released_packets),
        (2, 0),
        "both replies held, none released: {out:?}"
    );
    assert_eq!(vm.guest_status().requests, 2);
    assert!(
        !primary.thread.is_finished(),
        "the primary stopped protecting while the standby was still there"
    );

    // The standby goes away: the primary's run ends with the link closed...
    assert_eq!(standby.close(), Ok(SessionEnd::ClosedByStandby));
    let err = join("the primary", primary.thread, LONG)
        .expect_err("protection must end when the standby goes away");
    let msg = error_chain(&err);
    assert!(
        matches!(err, PrimaryError::Link(LinkError::Closed { got: 0, .. })),
        "expected the standby's connection closed between frames, got: {msg}"
    );
    assert!(
        msg.contains("Connection closed by the peer while reading a frame header"),
        "{msg}"
    );
    // ...and, as `rmc primary` does then, output commit ends: the held replies leave, none
    // lost, each applied once.
    vm.disable_output_commit();
    let (r, _) = answer(&early, LONG).expect("the first reply, released");
    assert_eq!(
        (r.status, r.client_id, r.seq, r.counter),
        (STATUS_OK, 1, 1, 1)
    );
    let (r, _) = answer(&late, LONG).expect("the second reply, released");
    assert_eq!(
        (r.status, r.client_id, r.seq, r.counter),
        (STATUS_OK, 2, 1, 2)
    );
}

#[test]
fn delayed_acks_delay_replies_accordingly() {
    if !kvm_available("delayed_acks_delay_replies_accordingly") {
        return;
    }
    init_logs();
    const DELAY: Duration = Duration::from_millis(150);
    let standby = ScriptedStandby::start(Acks::CheckpointsAfter(DELAY));
    let _end_standby = RaiseOnDrop(vec![standby.close.clone()]);
    let vm = counter_vm(Default::default());
    let server = vm.nic_addr().unwrap();
    let primary = PrimaryThread::start(&vm, standby.addr, 2);
    let _end_primary = RaiseOnDrop(vec![primary.stop.clone()]);
    // Past the full sync: checkpoints are being acknowledged.
    wait_for("the first checkpoint acknowledged", LONG, || {
        primary.acked.load(Ordering::Relaxed) > 0
    });
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for seq in 1..=5 {
        let sent = Instant::now();
        ask(&sock, server, 2, seq);
        let (r, at) = answer(&sock, LONG).expect("reply");
        assert_eq!(
            (r.status, r.client_id, r.seq, r.counter),
            (STATUS_OK, 2, seq, seq)
        );
        // The reply is produced after `sent`, so the checkpoint it belongs to commits after
        // `sent` and is acked DELAY after that: the reply cannot be out sooner.
        let latency = at - sent;
        assert!(
            latency >= DELAY,
            "reply {seq} after {latency:?}, before its ack could arrive"
        );
        // Precisely: the first checkpoint committed after the request was sent was acked
        // before the reply arrived (acks leave in epoch order; the reply's checkpoint is that
        // one or a later one).
        let rec = standby.record();
        let first = rec.checkpoints().find(|c| c.at > sent).unwrap_or_else(|| {
            panic!(
                "reply {seq} arrived {latency:?} after its request, before any checkpoint \
                     was committed after the request"
            )
        });
        let ack = rec
            .acks
            .iter()
            .find(|a| a.epoch >= first.epoch)
            .unwrap_or_else(|| {
                panic!(
                    "reply {seq} arrived before checkpoint {} (committed {:?} after the \
                     request) was acked",
                    first.epoch,
                    first.at - sent
                )
            });
        assert!(
            ack.sent_at < at,
            "reply {seq} arrived {:?} before the standby sent the ack of checkpoint {}",
            ack.sent_at - at,
            ack.epoch
        );
    }
    let stats = primary.stop();
    assert!(stats.checkpoints_acked > 0, "{stats:?}");
    assert_eq!(standby.join(), Ok(SessionEnd::Goodbye));
}

/// A real standby, epochs of an hour: with the output trigger (on by default) every reply
/// leaves one checkpoint after the guest sent it, so a client doing one request at a time is
/// answered at all. Each reply still waits for its checkpoint's ack (the scripted-standby
/// tests above run with the trigger on too).
///
/// Catches: the NIC not waking the primary when a packet is held (replies would wait an
/// hour), the trigger off by default, a checkpoint per packet of a request's reply missing.
#[test]
fn with_the_output_trigger_replies_leave_one_checkpoint_after_they_were_sent() {
    if !kvm_available("with_the_output_trigger_replies_leave_one_checkpoint_after_they_were_sent") {
        return;
    }
    init_logs();
    const REQUESTS: u64 = 20;
    let (addr, standby) = real_standby();
    let vm = counter_vm(Default::default());
    let server = vm.nic_addr().unwrap();
    let primary = PrimaryThread::start_with(&vm, addr, |cfg| {
        assert!(
            cfg.output_trigger.is_some(),
            "the output trigger is on by default"
        );
        cfg.epoch_interval = Duration::from_secs(3600);
    });
    let _end_primary = RaiseOnDrop(vec![primary.stop.clone()]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for seq in 1..=REQUESTS {
        ask(&sock, server, 7, seq);
        // No resend: the reply must come, long before any epoch's end.
        let (r, _) = answer(&sock, LONG).unwrap_or_else(|| {
            panic!(
                "no reply to request {seq} within {LONG:?} with epochs of an hour: output {:?}, \
                 checkpoints acknowledged {}",
                vm.output_stats(),
                primary.acked.load(Ordering::Relaxed)
            )
        });
        assert_eq!(
            (r.status, r.client_id, r.seq, r.counter),
            (STATUS_OK, 7, seq, seq)
        );
    }
    let out = vm.output_stats().unwrap();
    assert_eq!(
        (out.released_packets, out.held_packets),
        (REQUESTS, 0),
        "every reply went through output commit: {out:?}"
    );
    let stats = primary.stop();
    assert!(
        stats.output_checkpoints >= REQUESTS,
        "a checkpoint for each reply: {} of {} checkpoints were for output",
        stats.output_checkpoints,
        stats.checkpoints_acked
    );
    finish_standby(standby);
}

#[test]
fn a_burst_past_the_output_buffer_gets_backpressure_not_loss() {
    if !kvm_available("a_burst_past_the_output_buffer_gets_backpressure_not_loss") {
        return;
    }
    init_logs();
    let (addr, standby) = real_standby();
    let limits = rmc_netbuf::Limits {
        max_bytes: 1 << 20,
        max_packets: 4,
    };
    let vm = counter_vm(limits);
    let server = vm.nic_addr().unwrap();
    let primary = PrimaryThread::start(&vm, addr, 2);
    let _end_primary = RaiseOnDrop(vec![primary.stop.clone()]);
    wait_for("the first checkpoint acknowledged", LONG, || {
        primary.acked.load(Ordering::Relaxed) > 0
    });
    // 60 clients at once (the guest's RX ring holds 64): far more replies than the 4 the
    // output buffer may hold.
    let socks: Vec<UdpSocket> = (0..60)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, s) in socks.iter().enumerate() {
        ask(s, server, 100 + i as u64, 1);
    }
    let mut max_held = 0;
    let mut counters = Vec::new();
    for (i, s) in socks.iter().enumerate() {
        let id = 100 + i as u64;
        // No resend: a reply that went missing fails the test.
        let (r, _) = answer(s, LONG).unwrap_or_else(|| {
            panic!(
                "no reply to client {id} within {LONG:?}: output {:?}, NIC {:?}, guest {:?}",
                vm.output_stats(),
                vm.nic_stats(),
                vm.guest_status()
            )
        });
        assert_eq!((r.status, r.client_id, r.seq), (STATUS_OK, id, 1));
        counters.push(r.counter);
        max_held = max_held.max(vm.output_stats().unwrap().held_packets);
    }
    counters.sort_unstable();
    assert_eq!(
        counters,
        (1..=60).collect::<Vec<_>>(),
        "every request applied exactly once, every reply delivered"
    );
    let stats = vm.output_stats().unwrap();
    assert!(
        stats.refused > 0,
        "the burst must have hit the limit: {stats:?}"
    );
    assert!(max_held <= 4, "held {max_held} packets with a limit of 4");
    assert_eq!(
        (stats.released_packets, stats.held_packets),
        (60, 0),
        "{stats:?}"
    );
    let nic = vm.nic_stats();
    assert_eq!((nic.tx_frames, nic.tx_refused), (60, 0), "{nic:?}");

    let pstats = primary.stop();
    assert!(pstats.checkpoints_acked > 0, "{pstats:?}");
    let session = finish_standby(standby);
    assert!(session.epochs > 0, "{session:?}");
}
