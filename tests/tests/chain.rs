//! Chains of protection with an arbiter (KVM + etcd), on loopback, under checking clients.
//!
//! - `chain_a_b_c_with_a_checking_client`: primary A protected by standby B, which is told to
//!   protect the VM in turn with standby C once it takes over (`--protect-with`). A is
//!   SIGKILLed: B takes over and protects the VM with C; B is SIGKILLed: C takes over. The
//!   clients ask A's service address the whole time (B and C take it over with
//!   `--service-addr primary`).
//! - `resume_after_the_standby_was_frozen`: the standby SIGSTOPped for 2 s: the primary
//!   loses it, runs on, and protection resumes from the checkpoint the standby still holds
//!   (only what changed since is sent); then the primary is SIGKILLed and the standby takes
//!   over.
//!
//! Clients run in this process (`rmc_vmm::service::Client`), one request at a time each, all
//! checked by one `Checker`: no reply may contradict another, and every request must be
//! answered (resent until answered, within [`REQUEST_DEADLINE`]). With an arbiter a standby
//! takes over only once the lost primary's lease ran out: the service gap after a SIGKILL is
//! about the lease TTL (2 s).
//!
//! Skipped with a message without /dev/kvm or etcd, unless `RMC_REQUIRE_KVM=1` /
//! `RMC_REQUIRE_ETCD=1`, which make them fail instead. Every wait has a deadline: a hang
//! guard, not a speed criterion.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmc::checker::{Checker, SharedChecker};
use rmc::events::{Event, FailedOver, LossAction};
use rmc_arbiter::testing::{etcd_available, EtcdServer};
use rmc_tests::process::Rmc;
use rmc_tests::{kvm_available, rmc_bin};
use rmc_vmm::service::{Client, ClientError, Reply};

/// A line a starting process prints once it is up (a boot, a full sync, a first checkpoint).
const UP: Duration = Duration::from_secs(60);
/// A failover line after a SIGKILL: the lease TTL (2 s) plus building the VM, on a loaded
/// machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// A request whose resends got no answer for this long counts as unanswered.
const REQUEST_DEADLINE: Duration = Duration::from_secs(15);
/// A client resends its request after this long without an answer.
const RETRY: Duration = Duration::from_millis(50);
/// How long the clients must be served by a new primary before the next step (a hang guard
/// for "some requests sent after the kill were answered").
const SERVED: Duration = Duration::from_secs(60);
/// Requests sent after a kill that must be answered before the test moves on.
const SERVED_REQUESTS: usize = 20;
/// Failure detection on both sides: 10 x 100 ms (the product's default).
const HEARTBEAT: [&str; 4] = ["--heartbeat-ms", "100", "--heartbeat-misses", "10"];
/// Concurrent checking clients.
const CLIENTS: u32 = 2;

/// Both tests boot VMs on a 2-core machine: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// KVM and etcd; otherwise skipped with a message (failed with RMC_REQUIRE_KVM=1 or
/// RMC_REQUIRE_ETCD=1).
fn can_run(test: &str) -> bool {
    kvm_available(test) && etcd_available(test)
}

/// A shared secret in a temporary directory (removed when the directory is dropped).
fn secret_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("rmc-chain-")
        .tempdir()
        .expect("a temporary directory");
    let path = dir.path().join("secret");
    std::fs::write(&path, "the secret of the chain tests, long enough\n").expect("secret file");
    (dir, path)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; pid is our own unreaped child.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Starts `rmc --json ARGS`; `what` names it in messages.
fn spawn_rmc(what: &str, args: &[&str]) -> Rmc {
    let mut cmd = Command::new(rmc_bin());
    cmd.arg("--json").args(args);
    Rmc::spawn(format!("{what} (rmc {})", args[0]), cmd)
}

/// Waits for `p`'s failover.
fn failed_over(p: &mut Rmc) -> FailedOver {
    p.wait_event("a failover", FAILOVER, |e| match e {
        Event::FailedOver(f) => Some(f),
        _ => None,
    })
}

/// Waits for `p` to be protected (a session with a standby began): the standby's address and
/// whether the session resumed from the checkpoint it held.
fn protected(p: &mut Rmc) -> (SocketAddr, bool) {
    p.wait_event("protection by a standby", UP, |e| match e {
        Event::Protected {
            standby, resumed, ..
        } => Some((standby, resumed)),
        _ => None,
    })
}

/// Waits for `p`'s standby to acknowledge the session's first checkpoint.
fn first_checkpoint_acked(p: &mut Rmc) {
    p.wait_event("the first acknowledged checkpoint", UP, |e: Event| {
        (e == Event::FirstCheckpointAcked).then_some(())
    });
}

/// Waits for `p` to lose its standby: what it does now, and the event.
fn standby_lost(p: &mut Rmc) -> (LossAction, Event) {
    p.wait_event("the loss of its standby", UP, |e| match e {
        Event::StandbyLost { action, .. } => Some((action, e)),
        _ => None,
    })
}

/// Starts `rmc standby` (`what` names it in messages) with `--service-addr primary`, the
/// arbiter at `arbiter` and, if given, `--protect-with`; returns it and its listen address.
fn start_standby(
    what: &str,
    secret: &Path,
    arbiter: &str,
    protect_with: Option<&str>,
) -> (Rmc, String) {
    let secret = secret.display().to_string();
    let mut args = vec![
        "standby",
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        &secret,
        "--service-addr",
        "primary",
        "--transport",
        "tcp",
        "--log",
        "warn",
        "--arbiter",
        arbiter,
    ];
    args.extend(HEARTBEAT);
    if let Some(next) = protect_with {
        args.extend(["--protect-with", next]);
    }
    let mut sb = spawn_rmc(what, &args);
    let addr = sb.wait_event("where it listens", UP, |e| match e {
        Event::StandbyListening {
            transport, addr, ..
        } => {
            assert_eq!(transport.to_string(), "tcp");
            Some(addr)
        }
        _ => None,
    });
    (sb, addr.to_string())
}

/// Starts `rmc primary` protected by the standby at `standby`; returns it and its service
/// address, once the standby acknowledged its first checkpoint.
fn start_primary(what: &str, secret: &Path, arbiter: &str, standby: &str) -> (Rmc, SocketAddr) {
    start_primary_with(what, secret, arbiter, standby, "continue")
}

/// [`start_primary`] with this `--on-standby-loss`.
fn start_primary_with(
    what: &str,
    secret: &Path,
    arbiter: &str,
    standby: &str,
    on_standby_loss: &str,
) -> (Rmc, SocketAddr) {
    let secret = secret.display().to_string();
    let mut args = vec![
        "primary",
        "--standby",
        standby,
        "--listen",
        "127.0.0.1:0",
        "--memory",
        "64M",
        "--workload",
        "counter,dirtier",
        "--secret-file",
        &secret,
        "--transport",
        "tcp",
        "--on-standby-loss",
        on_standby_loss,
        "--log",
        "warn",
        "--arbiter",
        arbiter,
    ];
    args.extend(HEARTBEAT);
    let mut p = spawn_rmc(what, &args);
    let service = p.wait_event("its service address", UP, |e| match e {
        Event::ServiceListening { addr } => Some(addr),
        _ => None,
    });
    let (by, _) = protected(&mut p);
    assert_eq!(by.to_string(), standby);
    first_checkpoint_acked(&mut p);
    (p, service)
}

/// What one client saw besides what the shared checker records.
#[derive(Debug, Default)]
struct ClientOutcome {
    /// Requests whose resends got no answer within [`REQUEST_DEADLINE`].
    timeouts: u64,
    /// Requests that got no reply at all by the end, not even a late one.
    never_answered: u64,
    /// Failures other than a timeout (socket errors, malformed replies).
    errors: Vec<String>,
}

/// What the clients share.
#[derive(Debug)]
struct ClientShared {
    stop: AtomicBool,
    checker: SharedChecker,
    /// When each reply arrived.
    arrivals: Mutex<Vec<Instant>>,
    /// Each request answered: when it was first sent, and when its answer came.
    answered: Mutex<Vec<(Instant, Instant)>>,
}

/// Checking clients of one service address, on threads of their own.
struct Clients {
    shared: Arc<ClientShared>,
    threads: Vec<JoinHandle<ClientOutcome>>,
    started: Instant,
}

impl Clients {
    /// `n` clients (ids from `id_base + 1`), one request at a time each, to `service`.
    fn start(service: SocketAddr, n: u32, id_base: u64) -> Clients {
        let shared = Arc::new(ClientShared {
            stop: AtomicBool::new(false),
            checker: Checker::shared(false),
            arrivals: Mutex::new(Vec::new()),
            answered: Mutex::new(Vec::new()),
        });
        let threads = (1..=u64::from(n))
            .map(|k| {
                let shared = shared.clone();
                std::thread::spawn(move || client_run(service, id_base + k, &shared))
            })
            .collect();
        Clients {
            shared,
            threads,
            started: Instant::now(),
        }
    }

    /// Requests first sent at or after `t` that were answered.
    fn answered_since(&self, t: Instant) -> usize {
        lock(&self.shared.answered)
            .iter()
            .filter(|(sent, _)| *sent >= t)
            .count()
    }

    /// Waits (at most [`SERVED`]) until `n` requests first sent at or after `t` were
    /// answered; `what` names the server for the message.
    fn wait_served_since(&self, t: Instant, n: usize, what: &str) {
        let until = Instant::now() + SERVED;
        while self.answered_since(t) < n {
            assert!(
                Instant::now() < until,
                "{what}: only {} request(s) sent since were answered within {SERVED:?} \
                 (checker: {:?})",
                self.answered_since(t),
                self.shared.checker.lock().summary()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// When the first reply after `t` arrived.
    fn first_reply_after(&self, t: Instant) -> Option<Instant> {
        lock(&self.shared.arrivals)
            .iter()
            .copied()
            .filter(|&a| a > t)
            .min()
    }

    /// Answered requests first sent in `from..to`.
    fn answered_between(&self, from: Instant, to: Instant) -> usize {
        lock(&self.shared.answered)
            .iter()
            .filter(|(sent, _)| *sent >= from && *sent < to)
            .count()
    }

    /// Stops the clients (each finishes its request and reads the replies still coming).
    fn stop(&mut self) -> Vec<ClientOutcome> {
        self.shared.stop.store(true, Ordering::Release);
        self.threads
            .drain(..)
            .map(|h| h.join().expect("a client thread panicked"))
            .collect()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        // On a panic too: the threads end after their current request.
        self.shared.stop.store(true, Ordering::Release);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client: new requests, one at a time, until `stop`; then the replies still arriving.
/// Every reply goes to the shared checker.
fn client_run(service: SocketAddr, id: u64, shared: &ClientShared) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    let mut client = match Client::new(service, id) {
        Ok(c) => c,
        Err(e) => {
            out.errors.push(format!("client {id:#x}: no socket: {e}"));
            return out;
        }
    };
    client.retry_after = RETRY;
    let mut replied = std::collections::HashSet::new();
    let mut on_reply = |r: &Reply| {
        replied.insert(r.seq);
        // A contradiction is kept by the checker and asserted at the end.
        let _ = shared.checker.lock().check(r);
        lock(&shared.arrivals).push(Instant::now());
    };
    while !shared.stop.load(Ordering::Acquire) {
        let seq = client.next_seq();
        shared.checker.lock().sent(id, seq);
        let sent = Instant::now();
        match client.request(REQUEST_DEADLINE, &mut on_reply) {
            Ok((_, resent)) => {
                lock(&shared.answered).push((sent, Instant::now()));
                shared.checker.lock().resent(id, seq, resent);
            }
            Err(ClientError::Timeout { tries, .. }) => {
                out.timeouts += 1;
                shared
                    .checker
                    .lock()
                    .resent(id, seq, tries.saturating_sub(1));
            }
            Err(e) => {
                out.errors.push(format!("client {id:#x} seq {seq}: {e}"));
                break;
            }
        }
    }
    if let Err(e) = client.drain(
        Duration::from_millis(300),
        Duration::from_secs(3),
        &mut on_reply,
    ) {
        out.errors.push(format!("client {id:#x} draining: {e}"));
    }
    out.never_answered = (1..client.next_seq())
        .filter(|seq| !replied.contains(seq))
        .count() as u64;
    out
}

/// What the clients saw, checked: no contradiction, nothing unanswered, no client failure.
/// Returns the checker's summary line.
fn check_clients(clients: &Clients, outcomes: &[ClientOutcome], tails: &str) -> String {
    let checker = clients.shared.checker.lock();
    let s = checker.summary();
    let timeouts: u64 = outcomes.iter().map(|o| o.timeouts).sum();
    let never: u64 = outcomes.iter().map(|o| o.never_answered).sum();
    let errors: Vec<&String> = outcomes.iter().flat_map(|o| &o.errors).collect();
    let line = format!(
        "{} clients, {} requests, {} replies ({} repeats, {} needed a resend), {} \
         contradiction(s), {} unanswered (never answered, even late: {}), {:.1} s",
        s.clients,
        s.requests,
        s.replies,
        s.repeats,
        s.needed_resend,
        s.violations,
        timeouts,
        never,
        clients.started.elapsed().as_secs_f64()
    );
    assert!(
        s.violations == 0,
        "{line}\ncontradictions: {:#?}\n{tails}",
        checker.violations().iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        timeouts == 0 && never == 0 && s.unanswered == 0,
        "{line}\n{tails}"
    );
    assert!(
        errors.is_empty(),
        "{line}\nclient errors: {errors:?}\n{tails}"
    );
    assert!(s.requests > 0 && s.replies >= s.requests, "{line}\n{tails}");
    line
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[test]
fn chain_a_b_c_with_a_checking_client() {
    const NAME: &str = "chain_a_b_c_with_a_checking_client";
    if !can_run(NAME) {
        return;
    }
    let _serial = serial();
    let etcd = EtcdServer::start("/rmc/chain-abc").unwrap_or_else(|e| panic!("etcd: {e}"));
    let arbiter = etcd.endpoint.to_string();
    let (_dir, secret) = secret_file();
    let (mut c, c_addr) = start_standby("C", &secret, &arbiter, None);
    let (mut b, b_addr) = start_standby("B", &secret, &arbiter, Some(&c_addr));
    let (mut a, service) = start_primary("A", &secret, &arbiter, &b_addr);
    let mut clients = Clients::start(service, CLIENTS, 0xc4a1_0000_0000);
    std::thread::sleep(Duration::from_secs(1));

    // A dies: B takes over once A's lease ran out, and protects the VM with C.
    let killed_a = a.kill();
    let b_failed = Event::FailedOver(failed_over(&mut b));
    let b_failed_at = killed_a.elapsed();
    let protecting = b.wait_event("protection of the failed-over VM", UP, |e| match e {
        Event::ProtectingFailedOver { standby } => Some(standby),
        _ => None,
    });
    assert_eq!(protecting.to_string(), c_addr);
    let (by, _) = protected(&mut b);
    assert_eq!(by.to_string(), c_addr);
    first_checkpoint_acked(&mut b);
    let b_protected_at = killed_a.elapsed();
    // B serves: requests sent after A was gone are answered (by B, the only VM running).
    clients.wait_served_since(killed_a, SERVED_REQUESTS, "B after A was killed");

    // B dies: C takes over once B's lease ran out.
    let killed_b = b.kill();
    let c_failed = Event::FailedOver(failed_over(&mut c));
    let c_failed_at = killed_b.elapsed();
    clients.wait_served_since(killed_b, SERVED_REQUESTS, "C after B was killed");
    // Two more seconds of service by C.
    std::thread::sleep(Duration::from_secs(2));
    let outcomes = clients.stop();
    let stopped = Instant::now();

    // Everything has stopped: collect the output.
    let c_early = c.finish();
    for p in [&mut a, &mut b] {
        p.poll();
    }
    let tails = [a.report(), b.report(), c.report()].join("\n");
    assert!(
        c_early.is_none(),
        "{} (C should have been serving)\n{tails}",
        c_early.unwrap_or_default()
    );
    let summary = check_clients(&clients, &outcomes, &tails);
    let by_b = clients.answered_between(killed_a, killed_b);
    let by_c = clients.answered_between(killed_b, stopped);
    assert!(by_b > 0 && by_c > 0, "{by_b} {by_c}\n{tails}");
    let gap = |killed: Instant| {
        clients
            .first_reply_after(killed)
            .map_or("none".to_string(), |t| format!("{} ms", ms(t - killed)))
    };
    println!("chain A -> B -> C: {summary}");
    println!(
        "  A killed: B {} (line {} ms after the kill; protected by C and its first checkpoint \
         acknowledged {} ms after it); first reply {}; {by_b} requests sent after the kill \
         answered before B's",
        b_failed,
        ms(b_failed_at),
        ms(b_protected_at),
        gap(killed_a)
    );
    println!(
        "  B killed: C {} (line {} ms after the kill); first reply {}; {by_c} requests sent \
         after the kill answered",
        c_failed,
        ms(c_failed_at),
        gap(killed_b)
    );
    println!("{tails}");
    drop(etcd);
}

#[test]
fn resume_after_the_standby_was_frozen() {
    const NAME: &str = "resume_after_the_standby_was_frozen";
    if !can_run(NAME) {
        return;
    }
    let _serial = serial();
    let etcd = EtcdServer::start("/rmc/chain-resume").unwrap_or_else(|e| panic!("etcd: {e}"));
    let arbiter = etcd.endpoint.to_string();
    let (_dir, secret) = secret_file();
    let (mut b, b_addr) = start_standby("B", &secret, &arbiter, None);
    let (mut a, service) = start_primary("A", &secret, &arbiter, &b_addr);
    let mut clients = Clients::start(service, CLIENTS, 0x2e50_0000_0000);
    std::thread::sleep(Duration::from_secs(1));

    // B frozen for 2 s: longer than the heartbeat timeout (1 s).
    let frozen = Instant::now();
    signal(b.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(2));
    signal(b.pid(), libc::SIGCONT);
    let (action, lost) = standby_lost(&mut a);
    assert_eq!(action, LossAction::Continue, "{lost}");
    let (by, resumed) = protected(&mut a);
    assert!(
        by.to_string() == b_addr && resumed,
        "A reconnected to B without resuming: {by}, resumed {resumed}\n{}\n{}",
        a.report(),
        b.report()
    );
    first_checkpoint_acked(&mut a);
    let reprotected_at = frozen.elapsed();
    // B saw the primary lost, but its backup is stale (A ran on): it must not take over.
    let not_taking = b.wait_event("a refused takeover", UP, |e| {
        matches!(e, Event::NotTakingOver { .. }).then_some(e)
    });
    assert!(
        b.find_event(|e| matches!(e, Event::FailedOver(_)).then_some(()))
            .is_none(),
        "B took over from a stale backup:\n{}\n{}",
        a.report(),
        b.report()
    );
    let resumed_at = Instant::now();
    clients.wait_served_since(resumed_at, SERVED_REQUESTS, "A after protection resumed");

    // A dies: B takes over from the resumed session's checkpoint.
    let killed_a = a.kill();
    let b_failed = Event::FailedOver(failed_over(&mut b));
    let b_failed_at = killed_a.elapsed();
    clients.wait_served_since(killed_a, SERVED_REQUESTS, "B after A was killed");
    std::thread::sleep(Duration::from_secs(2));
    let outcomes = clients.stop();
    let stopped = Instant::now();

    let b_early = b.finish();
    a.poll();
    let tails = [a.report(), b.report()].join("\n");
    assert!(
        b_early.is_none(),
        "{} (B should have been serving)\n{tails}",
        b_early.unwrap_or_default()
    );
    let summary = check_clients(&clients, &outcomes, &tails);
    let by_b = clients.answered_between(killed_a, stopped);
    assert!(by_b > 0, "{tails}");
    let gap = |from: Instant| {
        clients
            .first_reply_after(from)
            .map_or("none".to_string(), |t| format!("{} ms", ms(t - from)))
    };
    println!("standby frozen, resumed, primary killed: {summary}");
    println!(
        "  B frozen 2 s: A {lost}; resumed protection, first checkpoint acknowledged {} ms \
         after the freeze began; B: {not_taking}",
        ms(reprotected_at)
    );
    println!(
        "  A killed: B {b_failed} (line {} ms after the kill); first reply {}; {by_b} \
         requests sent after the kill answered",
        ms(b_failed_at),
        gap(killed_a)
    );
    println!("{tails}");
    drop(etcd);
}

/// `--on-standby-loss pause` keeps everything the guest sent held and the arbiter's record of
/// the standby: a primary that loses its standby and then dies leaves that standby's
/// checkpoint current, so the standby takes over once it is back, with no contradiction.
#[test]
fn a_paused_primary_keeps_its_standby_current() {
    const NAME: &str = "a_paused_primary_keeps_its_standby_current";
    if !can_run(NAME) {
        return;
    }
    let _serial = serial();
    let etcd = EtcdServer::start("/rmc/chain-pause").unwrap_or_else(|e| panic!("etcd: {e}"));
    let arbiter = etcd.endpoint.to_string();
    let (_dir, secret) = secret_file();
    let (mut b, b_addr) = start_standby("B", &secret, &arbiter, None);
    let (mut a, service) = start_primary_with("A", &secret, &arbiter, &b_addr, "pause");
    let mut clients = Clients::start(service, CLIENTS, 0x2e60_0000_0000);
    clients.wait_served_since(Instant::now(), SERVED_REQUESTS, "A while protected");

    // B frozen: A notices, pauses its VM and holds what it sent.
    signal(b.pid(), libc::SIGSTOP);
    let (action, lost) = standby_lost(&mut a);
    assert_eq!(action, LossAction::Pause, "{lost}");
    // A dies while B is still frozen; then B comes back.
    let killed_a = a.kill();
    signal(b.pid(), libc::SIGCONT);
    let b_failed = Event::FailedOver(failed_over(&mut b));
    clients.wait_served_since(killed_a, SERVED_REQUESTS, "B after A was killed");
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = clients.stop();
    let stopped = Instant::now();

    let b_early = b.finish();
    a.poll();
    let tails = [a.report(), b.report()].join("\n");
    assert!(
        b_early.is_none(),
        "{} (B should have been serving)\n{tails}",
        b_early.unwrap_or_default()
    );
    assert!(
        b.find_event(|e| matches!(e, Event::NotTakingOver { .. }).then_some(()))
            .is_none(),
        "{tails}"
    );
    let summary = check_clients(&clients, &outcomes, &tails);
    let by_b = clients.answered_between(killed_a, stopped);
    assert!(by_b > 0, "{tails}");
    println!("paused primary killed, its standby back: {summary}");
    println!("  A {lost}; B {b_failed}; {by_b} requests sent after the kill answered");
    drop(etcd);
}
