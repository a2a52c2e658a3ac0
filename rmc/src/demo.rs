//! `rmc demo`: the whole story on one machine. A standby and a primary (real `rmc` processes,
//! TCP loopback) protect the counter guest; clients send requests continuously and one checker
//! checks every reply any of them receives (late ones included) against all the others; the
//! primary is SIGKILLed; the standby takes over the service address; the clients keep going.
//! With several trials the kill lands at a random moment each time.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::checker::{CheckSummary, Checker, Inconsistency, SharedChecker};
use crate::events::{Event, FailedOver};
use rmc_transport::link::Transport;
use rmc_vmm::service::{Client, Reply};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Guest memory.
    pub memory: String,
    /// Keep the client going this long after the kill.
    pub after: Duration,
    /// Transport between primary and standby.
    pub transport: Transport,
    /// Address the standby listens on.
    pub standby_ip: std::net::IpAddr,
    /// Heartbeat options passed to both processes.
    pub heartbeat: Vec<String>,
    /// Concurrent clients, all checked together.
    pub clients: u32,
    /// Further options for the primary (tests pass a fault to inject here).
    pub primary_extra: Vec<String>,
}

/// What one trial saw.
#[derive(Debug, Clone)]
pub struct Trial {
    /// What the clients' checker saw (requests, replies, resends, lost requests...).
    pub check: CheckSummary,
    /// Replies read after the clients' last requests were answered (late duplicates).
    pub late: u64,
    /// Replies that came from an address other than the service's.
    pub from_elsewhere: u64,
    /// From SIGKILL to the first reply any client received after it.
    pub failover: Duration,
    /// What the standby said about the failover.
    pub standby: FailedOver,
}

/// A trial whose clients saw a contradiction: the error [`run_trial`] returns then (inside
/// an `anyhow::Error`; `downcast_ref` finds it).
#[derive(Debug, Clone)]
pub struct Inconsistent {
    /// The first contradiction.
    pub first: Inconsistency,
    /// What the checker saw.
    pub check: CheckSummary,
    /// The standby's last lines.
    pub standby_tail: String,
}

impl std::fmt::Display for Inconsistent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "INCONSISTENT: {} contradiction(s) among {} replies to {} client(s); the first: {}\n  \
             the standby printed:\n    {}",
            self.check.violations,
            self.check.replies,
            self.check.clients,
            self.first,
            self.standby_tail
        )
    }
}

impl std::error::Error for Inconsistent {}

/// A child process killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A line of a child's output: an event (stdout, `--json`) or any other line (its log on
/// stderr, which joins the events so that a failed trial can show it).
pub(crate) enum Line {
    Event(Event),
    Text(String),
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Line::Event(e) => e.fmt(f),
            Line::Text(t) => f.write_str(t),
        }
    }
}

/// Starts `rmc --json ARGS`; its events and other lines come through the channel.
pub(crate) fn spawn(
    exe: &Path,
    name: &'static str,
    args: &[String],
) -> Result<(Proc, mpsc::Receiver<Line>)> {
    let mut child = Command::new(exe)
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("Cannot start {name}"))?;
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let line = Event::parse_line(&line).map_or(Line::Text(line), Line::Event);
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Errors (the processes run with --log error) join the events.
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx2.send(Line::Text(line)).is_err() {
                break;
            }
        }
    });
    Ok((Proc(child), rx))
}

/// Waits (at most 20 s) for the first event of `who` that `pick` takes; `what` names it in
/// the error.
fn wait_for<T>(
    rx: &mpsc::Receiver<Line>,
    who: &str,
    what: &str,
    pick: impl FnMut(Event) -> Option<T>,
) -> Result<T> {
    wait_for_within(rx, who, what, Duration::from_secs(20), pick)
}

/// [`wait_for`] with another limit.
pub(crate) fn wait_for_within<T>(
    rx: &mpsc::Receiver<Line>,
    who: &str,
    what: &str,
    within: Duration,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Line::Event(e)) => {
                if let Some(t) = pick(e) {
                    return Ok(t);
                }
            }
            Ok(Line::Text(_)) => {}
            Err(_) => bail!("{who} did not report {what} within {within:?}"),
        }
    }
}

/// Runs one trial in which the primary is killed `kill_after` into protection; `say` gets the
/// lines of the story (first trial only).
pub fn run_trial(
    exe: &Path,
    c: &DemoConfig,
    kill_after: Duration,
    index: u32,
    say: &mut dyn FnMut(&str),
) -> Result<Trial> {
    let dir = std::env::temp_dir().join(format!("rmc-demo-{}-{index}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let secret = dir.join("secret");
    let key: String = rmc_transport::wire::auth::nonce()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&secret, key)?;
    let result = trial(exe, c, &secret, kill_after, index, say);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn trial(
    exe: &Path,
    c: &DemoConfig,
    secret: &Path,
    kill_after: Duration,
    index: u32,
    say: &mut dyn FnMut(&str),
) -> Result<Trial> {
    let verbose = index == 0;
    let secret_s = secret.display().to_string();
    let listen = SocketAddr::new(c.standby_ip, 0).to_string();
    // Every address is bound by the process that uses it (port 0) and read back from its
    // output: the standby fails over onto the address the primary's NIC served on.
    let (_standby, standby_out) = spawn(
        exe,
        "the standby",
        &[
            "standby",
            "--listen",
            &listen,
            "--transport",
            &c.transport.to_string(),
            "--secret-file",
            &secret_s,
            "--sessions",
            "1",
            "--service-addr",
            "primary",
            "--log",
            "error",
        ]
        .map(String::from)
        .into_iter()
        .chain(c.heartbeat.iter().cloned())
        .collect::<Vec<_>>(),
    )?;
    let (transport, standby_addr) = wait_for(
        &standby_out,
        "the standby",
        "where it listens",
        |e| match e {
            Event::StandbyListening {
                transport, addr, ..
            } => Some((transport, addr)),
            _ => None,
        },
    )?;
    if verbose {
        say(&format!(
            "standby listening on {transport} {standby_addr}; on failover it takes over the primary's service address"
        ));
    }
    let (mut primary, primary_out) = spawn(
        exe,
        "the primary",
        &[
            "primary",
            "--standby",
            &standby_addr.to_string(),
            "--transport",
            &transport.to_string(),
            "--secret-file",
            &secret_s,
            "--listen",
            "127.0.0.1:0",
            "--memory",
            &c.memory,
            "--workload",
            "counter,dirtier",
            "--log",
            "error",
        ]
        .map(String::from)
        .into_iter()
        .chain(c.heartbeat.iter().cloned())
        .chain(c.primary_extra.iter().cloned())
        .collect::<Vec<_>>(),
    )?;
    let service = wait_for(
        &primary_out,
        "the primary",
        "its service address",
        |e| match e {
            Event::ServiceListening { addr } => Some(addr),
            _ => None,
        },
    )?;
    wait_for(
        &primary_out,
        "the primary",
        "its first acknowledged checkpoint",
        |e| (e == Event::FirstCheckpointAcked).then_some(()),
    )?;
    if verbose {
        say(&format!(
            "primary running the counter guest ({} memory, dirtier at 10,000 pages/s), protected, service on udp {service}",
            c.memory
        ));
        say(&format!(
            "{} client(s) sending requests, every reply checked against all others",
            c.clients.max(1)
        ));
    }

    // The clients: each sends one request at a time; every reply any of them receives is
    // checked against every earlier one, across clients.
    let checker = Checker::shared(c.clients == 1);
    let stop = AtomicBool::new(false);
    let killed_at = OnceLock::new();
    let runs = std::thread::scope(|s| {
        let clients: Vec<_> = (0..c.clients.max(1))
            .map(|k| {
                let id = 0x00de_0000_0000 + (u64::from(index) << 16) + u64::from(k) + 1;
                let (stop, checker, killed_at) = (&stop, &checker, &killed_at);
                s.spawn(move || client_run(service, id, stop, checker, killed_at))
            })
            .collect();
        std::thread::sleep(kill_after);
        // SIGKILL: no goodbye, no flush, like a host that dies. The failover time runs from
        // the kill, but only replies received once the process is gone count (one already on
        // its way when the signal landed is no failover).
        let killed = Instant::now();
        let _ = primary.0.kill();
        let _ = primary.0.wait();
        let _ = killed_at.set(killed);
        std::thread::sleep(c.after);
        stop.store(true, Ordering::Release);
        clients
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<Vec<_>>()
    });
    let standby_tail = || {
        let lines: Vec<String> = standby_out.try_iter().map(|l| l.to_string()).collect();
        lines[lines.len().saturating_sub(8)..].join("\n    ")
    };
    let checker = checker.lock();
    let check = checker.summary();
    if let Some(first) = checker.violations().first() {
        return Err(Inconsistent {
            first: first.clone(),
            check,
            standby_tail: standby_tail(),
        }
        .into());
    }
    let mut late = 0;
    let mut from_elsewhere = 0;
    let mut failover: Option<Duration> = None;
    for run in runs {
        let run = run.with_context(|| format!("the standby printed:\n    {}", standby_tail()))?;
        late += run.late;
        from_elsewhere += run.from_elsewhere;
        failover = match (failover, run.first_after_kill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    if check.unanswered > 0 {
        bail!("{} request(s) were never answered", check.unanswered);
    }
    let failover = failover.context("no client got a reply after the primary was killed")?;
    let standby = wait_for(&standby_out, "the standby", "its failover", |e| match e {
        Event::FailedOver(f) => Some(f),
        _ => None,
    })?;
    Ok(Trial {
        check,
        late,
        from_elsewhere,
        failover,
        standby,
    })
}

/// What one demo client saw beyond what the shared checker records.
struct ClientRun {
    late: u64,
    from_elsewhere: u64,
    first_after_kill: Option<Duration>,
}

/// One client of the demo: new requests one at a time until `stop`, then every late reply,
/// all checked by `checker`. Ends early once the checker found a contradiction.
fn client_run(
    service: SocketAddr,
    id: u64,
    stop: &AtomicBool,
    checker: &SharedChecker,
    killed_at: &OnceLock<Instant>,
) -> Result<ClientRun> {
    let mut client = Client::new(service, id)?;
    client.retry_after = Duration::from_millis(20);
    let mut first_after_kill = None;
    let mut on_reply = |r: &Reply| {
        // A contradiction is kept by the checker and reported by the trial.
        let _ = checker.lock().check(r);
        if first_after_kill.is_none() {
            first_after_kill = killed_at.get().map(|k: &Instant| k.elapsed());
        }
    };
    while !stop.load(Ordering::Acquire) {
        let seq = client.next_seq();
        checker.lock().sent(id, seq);
        let (_, resent) = client
            .request(Duration::from_secs(10), &mut on_reply)
            .with_context(|| format!("client {id:#x}"))?;
        let mut checker = checker.lock();
        checker.resent(id, seq, resent);
        if !checker.violations().is_empty() {
            break;
        }
    }
    // Replies still on their way (answers to resends) are checked too.
    let late = client.drain(
        Duration::from_millis(300),
        Duration::from_secs(3),
        &mut on_reply,
    )?;
    Ok(ClientRun {
        late,
        from_elsewhere: client.from_elsewhere(),
        first_after_kill,
    })
}

/// The `rmc` executable to start the processes from.
pub fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().context("Cannot find the rmc executable")
}
