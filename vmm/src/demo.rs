//! `rmc demo`: the whole story on one machine. A standby and a primary (real `rmc` processes,
//! TCP loopback) protect the counter guest; a client sends requests continuously and checks
//! every reply; the primary is SIGKILLed; the standby takes over the service address; the
//! client keeps going. With several trials the kill lands at a random moment each time.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::service::{Checker, Client, ClientError};

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
}

/// What one trial saw.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Requests (distinct seqs) sent.
    pub sent: u64,
    /// Replies received (including answers to resends).
    pub replies: u64,
    /// Resends after a timeout.
    pub retries: u64,
    /// From SIGKILL to the first reply from the new primary.
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

fn free_udp_port() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
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
    let service = free_udp_port()?;
    let listen = SocketAddr::new(c.standby_ip, 0).to_string();
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
            &service.to_string(),
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
            "standby listening on {transport} {standby_addr}; it takes over udp {service} on failover"
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
            &service.to_string(),
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
        .collect::<Vec<_>>(),
    )?;
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
    }

    // The client: one request at a time, each checked against every earlier reply.
    let client_id = 0x00de_0000 + u64::from(index) + 1;
    let stop = AtomicBool::new(false);
    let (kill_tx, kill_rx) = mpsc::channel::<Instant>();
    let client = std::thread::scope(|s| {
        let stop = &stop;
        let h = s.spawn(move || -> Result<(u64, u64, u64, Option<Duration>)> {
            let mut client = Client::new(service, client_id)?;
            client.retry_after = Duration::from_millis(20);
            let mut checker = Checker::new(client_id, true);
            let (mut sent, mut replies, mut retries) = (0u64, 0u64, 0u64);
            let mut killed_at: Option<Instant> = None;
            let mut failover = None;
            while !stop.load(Ordering::Acquire) {
                sent += 1;
                checker.sent(sent);
                let mut bad = None;
                let r = client.request(Duration::from_secs(10), |reply| {
                    replies += 1;
                    if let Err(e) = checker.check(reply) {
                        bad.get_or_insert(e);
                    }
                });
                if let Some(e) = bad {
                    bail!("INCONSISTENT reply: {e}");
                }
                let (_, resent) = r.map_err(|e: ClientError| anyhow::anyhow!(e))?;
                retries += resent;
                if killed_at.is_none() {
                    killed_at = kill_rx.try_recv().ok();
                } else if failover.is_none() {
                    failover = killed_at.map(|k| k.elapsed());
                }
            }
            Ok((sent, replies, retries, failover))
        });
        std::thread::sleep(kill_after);
        // SIGKILL: no goodbye, no flush, like a host that dies.
        let _ = primary.0.kill();
        let killed = Instant::now();
        let _ = kill_tx.send(killed);
        let _ = primary.0.wait();
        std::thread::sleep(c.after);
        stop.store(true, Ordering::Release);
        h.join().expect("client thread")
    });
    let client = client.map_err(|e| {
        // Say what the standby had to say (its failover line, or why there was none).
        let lines: Vec<String> = standby_out.try_iter().collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n    ");
        e.context(format!("the standby printed:\n    {tail}"))
    })?;
    let (sent, replies, retries, failover) = client;
    let failover = failover.context("the client got no reply after the primary was killed")?;
    let standby_line = wait_for(&standby_out, "rmc: failed over at epoch ", "the standby")?;
    Ok(Trial {
        sent,
        replies,
        retries,
        failover,
        standby_line: format!("failed over at epoch {standby_line}"),
    })
}

/// The `rmc` executable to start the processes from.
pub fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().context("Cannot find the rmc executable")
}
