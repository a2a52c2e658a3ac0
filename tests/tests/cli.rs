//! End-to-end: the real `rmc` binary, a VM, and a client outside it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rmc_tests::{kvm_available, rmc_bin};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `rmc run` and returns it with the address its counter service listens on.
fn start_vm(extra: &[&str]) -> (Killed, String) {
    let mut child = Command::new(rmc_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--log", "warn"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rmc run");
    let out = child.stdout.take().unwrap();
    let vm = Killed(child);
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("rmc: counter service listening on udp ") {
            return (vm, addr.to_string());
        }
    }
    panic!("rmc run exited without saying where it listens");
}

#[test]
fn client_check_passes_against_running_vm() {
    if !kvm_available("client_check_passes_against_running_vm") {
        return;
    }
    let (_vm, addr) = start_vm(&["--workload", "counter,dirtier", "--dirty-rate", "20000"]);
    let out = Command::new(rmc_bin())
        .args([
            "client",
            "--server",
            &addr,
            "-n",
            "100",
            "--repeat-every",
            "7",
        ])
        .args(["--check", "--exclusive", "--quiet", "--client-id", "77"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("100 requests, 114 replies"), "{stdout}");
    assert!(stdout.ends_with("consistent\n"), "{stdout}");
    // A second client shares the service: its counter values continue above the first's.
    let out = Command::new(rmc_bin())
        .args([
            "client",
            "--server",
            &addr,
            "-n",
            "3",
            "--check",
            "--client-id",
            "78",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("seq 1 -> counter 101 (status 0)"),
        "{stdout}"
    );
}

#[test]
fn client_reports_a_missing_server_clearly() {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    drop(sock);
    let out = Command::new(rmc_bin())
        .args([
            "client",
            "--server",
            &addr,
            "-n",
            "1",
            "--timeout",
            "0.3",
            "--retry-ms",
            "50",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("No reply to seq 1 from"), "{stderr}");
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
        let out = Command::new(rmc_bin())
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
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
    let out = Command::new(rmc_bin())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "0.5",
            "--log",
            "warn",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Killed(out);
    let mut child = out;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let mut s = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut s).unwrap();
    assert!(s.contains("rmc: VM stopped after"), "{s}");
}

/// Starts `rmc standby` serving `sessions` connections; returns it and its address.
fn start_standby(secret: &std::path::Path, sessions: u32) -> (Child, String) {
    let mut child = Command::new(rmc_bin())
        .args([
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "warn",
            "--sessions",
        ])
        .arg(sessions.to_string())
        .arg("--secret-file")
        .arg(secret)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rmc standby");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("rmc: standby listening on tcp ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    // Keep reading its output in the background; hand it back through the child's stdout.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        let _ = tx.send(rest);
    });
    STANDBY_OUT.with(|o| *o.borrow_mut() = Some(rx));
    (child, addr)
}

thread_local! {
    static STANDBY_OUT: std::cell::RefCell<Option<std::sync::mpsc::Receiver<String>>> =
        const { std::cell::RefCell::new(None) };
}

fn standby_output() -> String {
    STANDBY_OUT.with(|o| {
        o.borrow_mut()
            .take()
            .unwrap()
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
    })
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
    let dir = std::env::temp_dir().join(format!("rmc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = secret_file(&dir, "secret", "a secret of more than sixteen bytes\n");
    let (standby, addr) = start_standby(&secret, 1);
    let standby = Killed(standby);
    let out = Command::new(rmc_bin())
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
        .arg("--secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("rmc: protected by the standby at {addr}")),
        "{stdout}"
    );
    let acked: u64 = stdout
        .split("rmc: ")
        .find_map(|l| l.split(" checkpoints acknowledged").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint count in {stdout}"));
    assert!(acked > 20, "{stdout}");
    let mut standby = standby;
    assert!(standby.0.wait().unwrap().success());
    let sout = standby_output();
    assert!(
        sout.contains("closed by the primary; backup: consistent checkpoint of epoch"),
        "{sout}"
    );
}

#[test]
fn primary_with_wrong_secret_is_refused() {
    if !kvm_available("primary_with_wrong_secret_is_refused") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("rmc-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = secret_file(&dir, "good", "the standby's secret, long enough");
    let bad = secret_file(&dir, "bad", "another secret, also long enough");
    let (standby, addr) = start_standby(&good, 1);
    let mut standby = Killed(standby);
    let out = Command::new(rmc_bin())
        .args([
            "primary",
            "--standby",
            &addr,
            "--listen",
            "127.0.0.1:0",
            "--memory",
            "32M",
        ])
        .args(["--log", "warn", "--secret-file"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Authentication failed: the standby does not hold the same secret"),
        "{stderr}"
    );
    assert!(standby.0.wait().unwrap().success());
    let sout = standby_output();
    assert!(sout.contains("ended after 0 epochs: error:"), "{sout}");
    // A too-short secret is refused before anything starts.
    let short = secret_file(&dir, "short", "tiny");
    let out = Command::new(rmc_bin())
        .args(["standby", "--listen", "127.0.0.1:0", "--secret-file"])
        .arg(&short)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("use at least 16"));
}

#[test]
fn bench_smoke_run_reports_every_figure() {
    if !kvm_available("bench_smoke_run_reports_every_figure") {
        return;
    }
    let svg = std::env::temp_dir().join(format!("rmc-bench-smoke-{}.svg", std::process::id()));
    let out = Command::new(rmc_bin())
        .args([
            "--log",
            "warn",
            "bench",
            "--memory",
            "64M",
            "--dirty-pages",
            "100,400",
        ])
        .args(["--epoch-ms", "0,10", "--seconds", "1", "--json", "--svg"])
        .arg(&svg)
        .output()
        .unwrap();
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
    let epochs: u64 = rows
        .iter()
        .map(|r| r["checkpoints"].as_u64().unwrap())
        .sum();
    assert!(epochs >= 200, "a few hundred epochs, not {epochs}");
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
            assert!(
                p["p50"].as_u64() <= p["p99"].as_u64() && p["p99"].as_u64() <= p["max"].as_u64(),
                "{p}"
            );
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
    let plot = std::fs::read_to_string(&svg).expect("the SVG plot");
    assert!(plot.contains("<svg") && plot.contains("dirty pages per epoch"));
    let _ = std::fs::remove_file(&svg);
    // Without an RDMA device, `--transport rdma` is refused clearly before anything boots (with
    // one, soft-roce/rdma-tests.sh measures it inside the Soft-RoCE VM).
    if !std::path::Path::new("/sys/class/infiniband").exists() {
        let out = rmc_bench_rdma().output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
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
    let dir = std::env::temp_dir().join(format!("rmc-cli-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = secret_file(&dir, "secret", "bench against an external standby");
    let (standby, addr) = start_standby(&secret, 2);
    let mut standby = Killed(standby);
    let out = Command::new(rmc_bin())
        .args([
            "--log",
            "warn",
            "bench",
            "--memory",
            "32M",
            "--dirty-pages",
            "100,200",
        ])
        .args([
            "--seconds",
            "0.5",
            "--json",
            "--standby",
            &addr,
            "--secret-file",
        ])
        .arg(&secret)
        .output()
        .unwrap();
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
    assert!(standby.0.wait().unwrap().success());
    assert_eq!(standby_output().matches("closed by the primary").count(), 2);
}

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
    ]);
    c
}

#[test]
fn failover_trials_stay_consistent() {
    if !kvm_available("failover_trials_stay_consistent") {
        return;
    }
    // 20 trials, each killing the primary at a different moment under continuous load.
    let out = Command::new(rmc_bin())
        .args([
            "demo",
            "--trials",
            "20",
            "--memory",
            "64M",
            "--kill-after",
            "0.8",
            "--after",
            "0.4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("; consistent").count(), 20, "{stdout}");
    assert!(stdout.contains("rmc demo: 20 trial(s)"), "{stdout}");
    assert!(
        stdout.contains("all consistent; failover time ms: min"),
        "{stdout}"
    );
    assert!(stdout.contains("standby: failed over at epoch"), "{stdout}");
}

#[test]
fn standby_loss_then_reprotection_with_the_vm_running() {
    if !kvm_available("standby_loss_then_reprotection_with_the_vm_running") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("rmc-cli-loss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = secret_file(&dir, "secret", "the secret for the standby-loss test");
    let (standby, standby_addr) = start_standby(&secret, 1);
    let mut standby = Killed(standby);
    let mut primary = Command::new(rmc_bin())
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
        .arg("--secret-file")
        .arg(&secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = primary.stdout.take().unwrap();
    let err = primary.stderr.take().unwrap();
    let primary = Killed(primary);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .for_each(|l| drop(tx.send(l)))
    });
    std::thread::spawn(move || {
        BufReader::new(err)
            .lines()
            .map_while(Result::ok)
            .for_each(|l| drop(tx2.send(l)))
    });
    let wait_line = |prefix: &str| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let l = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line starting {prefix:?}"));
            if l.starts_with(prefix) {
                return l;
            }
        }
    };
    let service = wait_line("rmc: counter service listening on udp ")
        .trim_start_matches("rmc: counter service listening on udp ")
        .to_string();
    wait_line("rmc: protected by the standby at");
    // One client for the whole test: its checker spans both protections and the gap.
    let mut client = rmc_vmm_client(&service);
    client(10);
    // The standby dies.
    standby.0.kill().unwrap();
    standby.0.wait().unwrap();
    let lost = wait_line("rmc: lost the standby");
    assert!(lost.contains("running unprotected"), "{lost}");
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
                "--secret-file",
            ])
            .arg(&secret)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_line("rmc: protected by the standby at");
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
            let out = Command::new(rmc_bin())
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
                .args(["--first-seq", &next.to_string()])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let counter: u64 = stdout
                .split("last counter ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.trim_end_matches(',').parse().ok())
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
