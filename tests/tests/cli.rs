//! End-to-end: the real `rmc` binary, a VM, and a client outside it.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use rmc::events::{Backup, Event, LossAction};
use rmc_tests::{
    events_in, forward_lines, kill_within, kvm_available, line_channel, output_within, rest_within,
    rmc_bin, wait_for_event, wait_within,
};
use rmc_transport::link::Transport;

// Deadlines: guards against hangs, not speed criteria (a loaded 2-core CI machine is slow).

/// A command that is refused, or a short client run.
const QUICK: Duration = Duration::from_secs(60);
/// A VM or a primary that runs for a few seconds.
const RUN: Duration = Duration::from_secs(120);
/// A bench sweep, or the 20 failover trials of `rmc demo`.
const LONG: Duration = Duration::from_secs(300);
/// A line a starting process prints once it is up (after a boot and a full sync).
const UP: Duration = Duration::from_secs(60);
/// A process that was told to stop, or that was SIGKILLed, going away.
const EXIT: Duration = Duration::from_secs(60);

/// Heartbeats for a busy machine, for every `rmc primary`, `rmc standby` and `rmc bench` the
/// tests start: the default (50 ms x 4 misses) ends a run on a 200 ms stall of a loaded CI
/// machine. A SIGKILLed peer is still seen at once, through its closed connection.
const HEARTBEAT: [&str; 4] = ["--heartbeat-ms", "100", "--heartbeat-misses", "30"];

/// A child process that is killed (and reaped) when this is dropped, also on a panic.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        kill_within(&mut self.0, EXIT, "a process started by the test");
    }
}

/// `rmc --json`: its events as JSON lines, for the test to read.
fn rmc() -> Command {
    let mut c = Command::new(rmc_bin());
    c.arg("--json");
    c
}

/// Starts `rmc run` and returns it with the address its counter service listens on.
fn start_vm(extra: &[&str]) -> (Killed, String) {
    let mut child = rmc()
        .args(["run", "--listen", "127.0.0.1:0", "--log", "warn"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rmc run");
    // The thread behind the channel keeps draining stdout after the channel is dropped.
    let out = line_channel(child.stdout.take().unwrap());
    let vm = Killed(child);
    let addr = wait_for_event(&out, UP, "rmc run", "its service address", |e| match e {
        Event::ServiceListening { addr } => Some(addr),
        _ => None,
    });
    (vm, addr.to_string())
}

/// `rmc client`'s summary: its requests, replies, last counter, and whether `--check` found
/// it consistent.
fn client_summary(stdout: &str) -> (u64, u64, Option<u64>, bool) {
    events_in(stdout)
        .into_iter()
        .find_map(|e| match e {
            Event::ClientSummary {
                requests,
                replies,
                last_counter,
                consistent,
                ..
            } => Some((requests, replies, last_counter, consistent)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no `rmc client` summary in {stdout}"))
}

#[test]
fn client_check_passes_against_running_vm() {
    if !kvm_available("client_check_passes_against_running_vm") {
        return;
    }
    let (_vm, addr) = start_vm(&["--workload", "counter,dirtier", "--dirty-rate", "20000"]);
    let out = output_within(
        rmc()
            .args([
                "client",
                "--server",
                &addr,
                "-n",
                "100",
                "--repeat-every",
                "7",
            ])
            .args(["--check", "--exclusive", "--quiet", "--client-id", "77"]),
        QUICK,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 100 answers and 14 deliberate repeats (every 7th request); a retransmit may add replies.
    let (requests, replies, _, consistent) = client_summary(&stdout);
    assert_eq!(requests, 100, "{stdout}");
    assert!(replies >= 114, "{stdout}");
    assert!(consistent, "{stdout}");
    // A second client shares the service: its counter values continue above the first's.
    let out = output_within(
        rmc().args([
            "client",
            "--server",
            &addr,
            "-n",
            "3",
            "--check",
            "--client-id",
            "78",
        ]),
        QUICK,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        events_in(&stdout).contains(&Event::ClientReply {
            seq: 1,
            counter: 101,
            status: 0
        }),
        "{stdout}"
    );
}

#[test]
fn client_reports_a_missing_server_clearly() {
    // A silent server: bound for the whole test (so no other process can take its port), it
    // never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = output_within(
        Command::new(rmc_bin()).args([
            "client",
            "--server",
            &addr,
            "-n",
            "1",
            "--timeout",
            "0.3",
            "--retry-ms",
            "50",
        ]),
        QUICK,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("No reply to seq 1 from"), "{stderr}");
    drop(silent);
}

#[test]
fn run_refuses_bad_configuration_clearly() {
    for (args, want) in [
        (&["--memory", "8M"][..], "memory must be between 16 MiB"),
        (
            &["--workload", "counter,counter"][..],
            "only one vCPU can run the counter",
        ),
        (&["--vcpus", "5", "--workload", "idle"][..], "1 to 4 vCPUs"),
        (
            &["--memory", "64M", "--dirty-pages", "100000"][..],
            "dirtier working sets need",
        ),
    ] {
        let out = output_within(
            Command::new(rmc_bin())
                .args(["run", "--listen", "127.0.0.1:0"])
                .args(args),
            QUICK,
        );
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn run_stops_after_duration_and_reports() {
    if !kvm_available("run_stops_after_duration_and_reports") {
        return;
    }
    let out = output_within(
        rmc().args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "0.5",
            "--log",
            "warn",
        ]),
        RUN,
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        events_in(&s)
            .iter()
            .any(|e| matches!(e, Event::VmStopped { seconds, .. } if *seconds >= 0.5)),
        "{s}"
    );
}

/// A running `rmc standby`: killed when dropped.
struct Standby {
    proc: Killed,
    /// The TCP address it listens on.
    addr: String,
    /// Its stdout after the line that said where it listens.
    out: Receiver<String>,
}

impl Standby {
    /// Waits for the standby to exit by itself (after its sessions), asserts that it
    /// succeeded, and returns the events it reported after it listened, with its output.
    fn finish(mut self) -> (Vec<Event>, String) {
        let status = wait_within(&mut self.proc.0, EXIT, "rmc standby");
        let out = rest_within(&self.out, EXIT, "rmc standby");
        assert!(status.success(), "rmc standby failed ({status}):\n{out}");
        (events_in(&out), out)
    }

    /// Waits for its next session to end: the primary, whether it ended with an error, and
    /// what the backup holds.
    fn session_ended(&self) -> (Option<String>, Backup) {
        wait_for_event(
            &self.out,
            UP,
            "rmc standby",
            "the end of a session",
            |e| match e {
                Event::SessionEnded { error, backup, .. } => Some((error, backup)),
                _ => None,
            },
        )
    }
}

/// The sessions among `events` that the primary closed with a goodbye: what the backup held
/// after each.
fn goodbyes(events: &[Event]) -> Vec<Backup> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SessionEnded {
                error: None,
                backup,
                ..
            } => Some(*backup),
            _ => None,
        })
        .collect()
}

/// Starts `rmc standby` serving `sessions` connections.
fn start_standby(secret: &std::path::Path, sessions: u32) -> Standby {
    start_standby_with(secret, sessions, &[])
}

/// [`start_standby`] with `extra` options.
fn start_standby_with(secret: &std::path::Path, sessions: u32, extra: &[&str]) -> Standby {
    let mut child = rmc()
        .args([
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "warn",
            "--sessions",
        ])
        .arg(sessions.to_string())
        .args(HEARTBEAT)
        .args(extra)
        .arg("--secret-file")
        .arg(secret)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rmc standby");
    let out = line_channel(child.stdout.take().unwrap());
    let proc = Killed(child);
    let addr = wait_for_event(&out, UP, "rmc standby", "where it listens", |e| match e {
        Event::StandbyListening {
            transport, addr, ..
        } => {
            assert_eq!(transport, Transport::Tcp, "the default transport here");
            Some(addr)
        }
        _ => None,
    });
    Standby {
        proc,
        addr: addr.to_string(),
        out,
    }
}

/// A temporary directory for secret files, removed when dropped (also on a panic).
fn secret_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rmc-cli-")
        .tempdir()
        .expect("a temporary directory")
}

fn secret_file(dir: &std::path::Path, name: &str, content: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn primary_and_standby_binaries_protect_a_vm() {
    if !kvm_available("primary_and_standby_binaries_protect_a_vm") {
        return;
    }
    let dir = secret_dir();
    let secret = secret_file(
        dir.path(),
        "secret",
        "a secret of more than sixteen bytes\n",
    );
    let standby = start_standby(&secret, 1);
    let addr = standby.addr.clone();
    let out = output_within(
        rmc()
            .args([
                "primary",
                "--standby",
                &addr,
                "--listen",
                "127.0.0.1:0",
                "--memory",
                "64M",
            ])
            .args(["--duration", "2", "--log", "warn", "--dirty-pages", "500"])
            .args(HEARTBEAT)
            .arg("--secret-file")
            .arg(&secret),
        RUN,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Event> = events_in(&stdout);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Protected { standby, .. } if standby.to_string() == addr)),
        "{stdout}"
    );
    // Checkpoints were acknowledged (how many depends on the machine's speed).
    let acked =
        checkpoints_acked(&events).unwrap_or_else(|| panic!("no checkpoint count in {stdout}"));
    assert!(acked >= 1, "{stdout}");
    let (events, sout) = standby.finish();
    // A goodbye, and a consistent checkpoint in the backup (released: protection ended on
    // purpose).
    assert!(
        matches!(goodbyes(&events)[..], [b] if b.epoch().is_some()),
        "{sout}"
    );
}

/// The checkpoints acknowledged in a protection that ended on purpose.
fn checkpoints_acked(events: &[Event]) -> Option<u64> {
    events.iter().find_map(|e| match e {
        Event::ProtectionEnded {
            checkpoints_acked, ..
        } => Some(*checkpoints_acked),
        _ => None,
    })
}

#[test]
fn primary_with_wrong_secret_is_refused() {
    if !kvm_available("primary_with_wrong_secret_is_refused") {
        return;
    }
    let dir = secret_dir();
    let good = secret_file(dir.path(), "good", "the standby's secret, long enough");
    let bad = secret_file(dir.path(), "bad", "another secret, also long enough");
    let standby = start_standby(&good, 1);
    let out = output_within(
        rmc()
            .args([
                "primary",
                "--standby",
                &standby.addr,
                "--listen",
                "127.0.0.1:0",
                "--memory",
                "32M",
            ])
            .args(HEARTBEAT)
            .args(["--log", "warn", "--secret-file"])
            .arg(&bad),
        RUN,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Authentication failed: the standby does not hold the same secret"),
        "{stderr}"
    );
    // The standby refused the connection; it never became a session, so the standby still
    // waits for its one session: a good primary gets it.
    let (peer, error) = wait_for_event(
        &standby.out,
        UP,
        "rmc standby",
        "a refused connection",
        |e| match e {
            Event::Refused { peer, error } => Some((peer, error)),
            _ => None,
        },
    );
    assert_eq!(peer.ip(), std::net::Ipv4Addr::LOCALHOST, "{error}");
    // The primary finds the standby's proof wrong first and says so with a Refuse.
    assert!(
        error.ends_with(
            "The primary refused the connection: Authentication failed: the standby does not \
             hold the same secret"
        ),
        "{error}"
    );
    protect_briefly(&standby.addr, &good);
    let (events, sout) = standby.finish();
    // A goodbye, and a consistent checkpoint in the backup (released: protection ended on
    // purpose).
    assert!(
        matches!(goodbyes(&events)[..], [b] if b.epoch().is_some()),
        "{sout}"
    );
    // A too-short secret is refused before anything starts.
    let short = secret_file(dir.path(), "short", "tiny");
    let out = output_within(
        Command::new(rmc_bin())
            .args(["standby", "--listen", "127.0.0.1:0"])
            .args(HEARTBEAT)
            .arg("--secret-file")
            .arg(&short),
        QUICK,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("use at least 16"), "{stderr}");
}

/// Runs `rmc primary` against the standby at `addr` for a second of protection; it must end
/// with a goodbye and success.
fn protect_briefly(addr: &str, secret: &std::path::Path) -> String {
    let out = output_within(
        rmc()
            .args(["primary", "--standby", addr, "--listen", "127.0.0.1:0"])
            .args(["--memory", "32M", "--duration", "1", "--log", "warn"])
            .args(HEARTBEAT)
            .arg("--secret-file")
            .arg(secret),
        RUN,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(checkpoints_acked(&events_in(&stdout)).is_some(), "{stdout}");
    stdout
}

/// Connections that never authenticate (a bare connect and close, a wrong secret, fifty idle
/// connections, a peer trickling a byte every 80 ms) neither fail the standby over after a
/// primary said goodbye, nor keep the next primary out.
#[test]
fn unauthenticated_peers_neither_fail_over_nor_keep_a_primary_out() {
    if !kvm_available("unauthenticated_peers_neither_fail_over_nor_keep_a_primary_out") {
        return;
    }
    let dir = secret_dir();
    let secret = secret_file(dir.path(), "secret", "the secret of the hostile-peer test");
    let standby = start_standby_with(
        &secret,
        2,
        &["--service-addr", "primary", "--handshake-timeout", "2"],
    );
    // A primary protects, then ends protection on purpose.
    protect_briefly(&standby.addr, &secret);
    let ended = standby.session_ended();
    assert!(
        matches!(ended, (None, Backup::Released { .. })),
        "{ended:?}"
    );
    // Now peers that never authenticate: none may bring the stopped VM back.
    let addr: std::net::SocketAddr = standby.addr.parse().unwrap();
    drop(std::net::TcpStream::connect(addr).unwrap());
    let wrong = secret_file(dir.path(), "wrong", "not the standby's secret at all");
    let refused = output_within(
        Command::new(rmc_bin())
            .args([
                "primary",
                "--standby",
                &standby.addr,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--memory", "32M", "--log", "warn"])
            .args(HEARTBEAT)
            .arg("--secret-file")
            .arg(&wrong),
        RUN,
    );
    assert!(!refused.status.success());
    let idle: Vec<_> = (0..50)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let trickling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let trickler = {
        let trickling = trickling.clone();
        std::thread::spawn(move || {
            while trickling.load(std::sync::atomic::Ordering::Acquire) {
                let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                    return;
                };
                // Bytes of a frame that never completes, one every 80 ms, until cut.
                while trickling.load(std::sync::atomic::Ordering::Acquire)
                    && std::io::Write::write_all(&mut s, b"R").is_ok()
                {
                    std::thread::sleep(Duration::from_millis(80));
                }
            }
        })
    };
    // A new primary is protected all the same, promptly after its first try or a retry.
    protect_briefly(&standby.addr, &secret);
    trickling.store(false, std::sync::atomic::Ordering::Release);
    trickler.join().unwrap();
    drop(idle);
    let (events, sout) = standby.finish();
    assert!(
        !events.iter().any(|e| matches!(e, Event::FailedOver(_))),
        "{sout}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Refused { error, .. }
            if error.contains("Authentication failed: the standby does not hold the same secret"))),
        "{sout}"
    );
    // One more session (the second primary's), ended.
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::SessionEnded { .. }))
            .count(),
        1,
        "{sout}"
    );
}

#[test]
fn bench_smoke_run_reports_every_figure() {
    if !kvm_available("bench_smoke_run_reports_every_figure") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("rmc-bench-smoke-")
        .tempdir()
        .expect("a temporary directory");
    let svg = dir.path().join("bench.svg");
    let out = output_within(
        Command::new(rmc_bin())
            .args([
                "--log",
                "warn",
                "bench",
                "--memory",
                "64M",
                "--dirty-pages",
                "100,400",
            ])
            .args(HEARTBEAT)
            .args(["--epoch-ms", "0,10", "--seconds", "1", "--json", "--svg"])
            .arg(&svg),
        LONG,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("rmc bench: [4/4]"),
        "progress on stderr: {stderr}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("bench --json prints JSON");
    assert_eq!(v["schema"], 2);
    assert_eq!(v["memory_bytes"], 64u64 << 20);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "one row per configuration");
    for row in rows {
        assert!(row["checkpoints"].as_u64().unwrap() > 0, "{row}");
        for phase in [
            "stop",
            "harvest",
            "state_save",
            "stage",
            "pause",
            "transmit",
            "commit_to_ack",
            "end_to_end",
        ] {
            let p = &row["phases"][phase];
            assert!(
                p["count"].as_u64().unwrap() > 0,
                "phase {phase} has no samples: {row}"
            );
            let [p50, p99, max] = ["p50", "p99", "max"].map(|key| {
                p[key]
                    .as_u64()
                    .unwrap_or_else(|| panic!("phase {phase} has no integer {key}: {row}"))
            });
            assert!(p50 <= p99 && p99 <= max, "phase {phase}: {p}");
        }
        for key in [
            "harvest_floor_us",
            "memcpy_floor_us",
            "state_save_floor_us",
            "raw_bytes_per_s",
            "link_efficiency",
            "checkpoints_per_s",
        ] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key}: {row}");
        }
        assert!(row["slowdown"].is_number(), "{row}");
    }
    assert!(rows[0]["standby_total"].as_f64().unwrap() >= 1.0);
    // The reply-latency part (on by default): per load, the baseline, trigger off, trigger on.
    let reply = v["reply"].as_array().expect("reply rows");
    let kinds: Vec<(String, String)> = reply
        .iter()
        .map(|r| (r["load"].to_string(), r["trigger"].to_string()))
        .collect();
    let want: Vec<(String, String)> = ["request", "stream"]
        .iter()
        .flat_map(|l| {
            ["unprotected", "off", "on"].map(|t| (format!("\"{l}\""), format!("\"{t}\"")))
        })
        .collect();
    assert_eq!(kinds, want, "{stdout}");
    for r in reply {
        assert!(r["replies"].as_u64().unwrap() > 0, "{r}");
        let l = &r["latency_us"];
        let [p50, p99, max] = ["p50", "p99", "max"].map(|k| l[k].as_u64().unwrap());
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{r}");
        assert!(r["dirtier_pages_per_s"].as_f64().unwrap() > 0.0, "{r}");
        match r["trigger"].as_str().unwrap() {
            "unprotected" => {
                assert!(
                    r["added_us"].is_null() && r["checkpoints_per_s"].is_null(),
                    "{r}"
                )
            }
            protected => {
                assert_eq!(r["added_us"].as_array().unwrap().len(), 3, "{r}");
                assert!(r["slowdown"].is_number(), "{r}");
                assert!(r["checkpoints_per_s"].as_f64().unwrap() > 0.0, "{r}");
                assert!(r["pause_us"]["count"].as_u64().unwrap() > 0, "{r}");
                let share = r["output_share"].as_f64().unwrap();
                if protected == "off" {
                    assert_eq!(share, 0.0, "the trigger is off: {r}");
                } else {
                    assert!(share > 0.0, "a client's requests trigger checkpoints: {r}");
                }
            }
        }
    }
    assert!(
        stderr.contains("rmc bench: reply [6/6]"),
        "reply progress on stderr: {stderr}"
    );
    let plot = std::fs::read_to_string(&svg).expect("the SVG plot");
    assert!(plot.contains("<svg") && plot.contains("dirty pages per epoch"));
    // `--transport rdma`: measured when `rmc devices` finds a usable RDMA port, otherwise
    // refused clearly before anything boots.
    let devices = output_within(Command::new(rmc_bin()).arg("devices"), QUICK);
    let listing = String::from_utf8_lossy(&devices.stdout);
    assert!(
        devices.status.success(),
        "rmc devices failed: {listing}{}",
        String::from_utf8_lossy(&devices.stderr)
    );
    // ("NOT usable by rmc: <why>" marks a port that cannot be used.)
    if listing.lines().any(|l| l.trim() == "usable by rmc") {
        let out = output_within(rmc_bench_rdma().arg("--json"), LONG);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rmc devices lists a usable RDMA port ({listing}), but bench over RDMA failed: \
             {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("bench --json prints JSON");
        let rows = v["rows"].as_array().expect("rows");
        assert!(!rows.is_empty(), "{stdout}");
        for row in rows {
            assert_eq!(row["transport"], "rdma", "{row}");
            assert!(row["checkpoints"].as_u64().unwrap() > 0, "{row}");
        }
    } else {
        let out = output_within(&mut rmc_bench_rdma(), QUICK);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{listing}{err}");
        assert!(
            err.contains("--transport rdma: no usable RDMA port") && err.contains("rmc devices"),
            "{err}"
        );
        assert!(
            !err.contains("full sync"),
            "refused only after starting: {err}"
        );
    }
}

#[test]
fn bench_against_an_external_standby() {
    if !kvm_available("bench_against_an_external_standby") {
        return;
    }
    let dir = secret_dir();
    let secret = secret_file(dir.path(), "secret", "bench against an external standby");
    let standby = start_standby(&secret, 2);
    let out = output_within(
        Command::new(rmc_bin())
            .args([
                "--log",
                "warn",
                "bench",
                "--memory",
                "32M",
                "--dirty-pages",
                "100,200",
                // Two sessions, as many as the standby serves (the reply part would need six).
                "--part",
                "sweep",
            ])
            .args(HEARTBEAT)
            .args([
                "--seconds",
                "0.5",
                "--json",
                "--standby",
                &standby.addr,
                "--secret-file",
            ])
            .arg(&secret),
        LONG,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for row in v["rows"].as_array().unwrap() {
        assert!(row["checkpoints"].as_u64().unwrap() > 0, "{row}");
        assert!(row["standby_total"].is_null(), "{row}");
    }
    // Both sessions ended with a goodbye: the standby exits cleanly after its 2 sessions.
    let (events, sout) = standby.finish();
    assert_eq!(goodbyes(&events).len(), 2, "{sout}");
}

/// `rmc bench --transport rdma` on a small guest, for a short run (log level info: a refusal
/// must come before the "full sync" line). The dirty-page sweep fits the 32 MiB guest (the
/// default sweep's 10,000 pages do not).
fn rmc_bench_rdma() -> Command {
    let mut c = Command::new(rmc_bin());
    c.args([
        "bench",
        "--memory",
        "32M",
        "--transport",
        "rdma",
        "--seconds",
        "0.1",
        "--dirty-pages",
        "100,1000",
        "--part",
        "sweep",
    ])
    .args(HEARTBEAT);
    c
}

#[test]
fn standby_loss_then_reprotection_with_the_vm_running() {
    if !kvm_available("standby_loss_then_reprotection_with_the_vm_running") {
        return;
    }
    let dir = secret_dir();
    let secret = secret_file(dir.path(), "secret", "the secret for the standby-loss test");
    let mut standby = start_standby(&secret, 1);
    let standby_addr = standby.addr.clone();
    let mut primary = rmc()
        .args([
            "primary",
            "--standby",
            &standby_addr,
            "--listen",
            "127.0.0.1:0",
            "--memory",
            "32M",
        ])
        .args([
            "--workload",
            "counter",
            "--log",
            "warn",
            "--on-standby-loss",
            "continue",
        ])
        .args(HEARTBEAT)
        .arg("--secret-file")
        .arg(&secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = primary.stdout.take().unwrap();
    let err = primary.stderr.take().unwrap();
    let primary = Killed(primary);
    // Its stdout and stderr (shown if a wait fails), line by line, in one channel; its
    // events come on stdout.
    let (tx, rx) = mpsc::channel();
    forward_lines(out, tx.clone());
    forward_lines(err, tx);
    let next = |awaited: &str, want: fn(&Event) -> bool| -> Event {
        wait_for_event(&rx, UP, "rmc primary", awaited, |e: Event| {
            want(&e).then_some(e)
        })
    };
    let service = match next("its service address", |e| {
        matches!(e, Event::ServiceListening { .. })
    }) {
        Event::ServiceListening { addr } => addr.to_string(),
        _ => unreachable!(),
    };
    let protected: fn(&Event) -> bool = |e| matches!(e, Event::Protected { .. });
    next("protection", protected);
    // One client for the whole test: its checker spans both protections and the gap.
    let mut client = rmc_vmm_client(&service);
    client(10);
    // The standby dies.
    standby.proc.0.kill().unwrap();
    wait_within(&mut standby.proc.0, EXIT, "the SIGKILLed rmc standby");
    let lost = next("the loss of the standby", |e| {
        matches!(e, Event::StandbyLost { .. })
    });
    assert!(
        matches!(
            lost,
            Event::StandbyLost {
                action: LossAction::Continue,
                ..
            }
        ),
        "{lost}"
    );
    client(10); // still answered, unprotected
                // A new standby on the same address: protection resumes, the VM never stopped.
    let mut standby2 = Killed(
        Command::new(rmc_bin())
            .args([
                "standby",
                "--listen",
                &standby_addr,
                "--sessions",
                "1",
                "--log",
                "warn",
            ])
            .args(HEARTBEAT)
            .arg("--secret-file")
            .arg(&secret)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    next("protection again", protected);
    client(10);
    let _ = standby2.0.kill();
    drop(primary);
}

/// A checking client for `service` that sends `n` more requests per call.
fn rmc_vmm_client(service: &str) -> impl FnMut(u64) {
    let service = service.to_string();
    let mut next = 1u64;
    let mut last = 0u64;
    move |n| {
        for _ in 0..n {
            let out = output_within(
                rmc()
                    .args([
                        "client",
                        "--server",
                        &service,
                        "-n",
                        "1",
                        "--client-id",
                        "4242",
                        "--quiet",
                    ])
                    .args(["--first-seq", &next.to_string()]),
                QUICK,
            );
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let counter = client_summary(&stdout)
                .2
                .unwrap_or_else(|| panic!("no counter in {stdout}"));
            assert_eq!(
                counter,
                last + 1,
                "the counter went from {last} to {counter}"
            );
            last = counter;
            next += 1;
        }
    }
}
