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
