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

use crate::checker::{CheckSummary, Checker, SharedChecker};
use rmc_vmm::service::{Client, Reply};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Guest memory.
    pub memory: String,
    /// Keep the client going this long after the kill.
    pub after: Duration,
    /// Transport between primary and standby ("tcp", "rdma" or "auto").
    pub transport: String,
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
    /// The standby's own line about the failover.
    pub standby_line: String,
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(
    exe: &Path,
    name: &'static str,
    args: &[String],
) -> Result<(Proc, mpsc::Receiver<String>)> {
    let mut child = Command::new(exe)
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
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Errors (the processes run with --log error) join stdout, so a failed trial can show them.
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx2.send(line).is_err() {
                break;
            }
        }
    });
    Ok((Proc(child), rx))
}

fn wait_for(rx: &mpsc::Receiver<String>, prefix: &str, who: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return Ok(line[prefix.len()..].to_string()),
            Ok(_) => {}
            Err(_) => bail!("{who} did not print `{prefix}` within 20 s"),
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
            &c.transport,
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
    // "<transport> <address> (<why>)"
    let line = wait_for(&standby_out, "rmc: standby listening on ", "the standby")?;
    let mut words = line.split_whitespace();
    let transport = words.next().unwrap_or_default().to_string();
    let standby_addr = words.next().unwrap_or_default().to_string();
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
            &standby_addr,
            "--transport",
            &transport,
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
    let service: SocketAddr = wait_for(
        &primary_out,
        "rmc: counter service listening on udp ",
        "the primary",
    )?
    .trim()
    .parse()
    .context("the primary's service address")?;
    wait_for(
        &primary_out,
        "rmc: first checkpoint acknowledged",
        "the primary",
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
        let lines: Vec<String> = standby_out.try_iter().collect();
        lines[lines.len().saturating_sub(8)..].join("\n    ")
    };
    let checker = checker.lock();
    let check = checker.summary();
    if let Some(first) = checker.violations().first() {
        bail!(
            "INCONSISTENT: {} contradiction(s) among {} replies to {} client(s); the first: {first}\n  \
             the standby printed:\n    {}",
            check.violations,
            check.replies,
            check.clients,
            standby_tail()
        );
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
    let standby_line = wait_for(&standby_out, "rmc: failed over at epoch ", "the standby")?;
    Ok(Trial {
        check,
        late,
        from_elsewhere,
        failover,
        standby_line: format!("failed over at epoch {standby_line}"),
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
