//! rmc-tests: end-to-end tests that run the real `rmc` binary (`tests/tests/*.rs`).
//!
//! [`rmc_bin`] finds the binary Cargo built for this workspace. The other helpers put a
//! deadline on everything a test waits for from a child process, so that a hung `rmc` fails
//! the test with what it printed instead of hanging the test run:
//!
//! - [`output_within`]: [`Command::output`] with a deadline;
//! - [`wait_within`]: [`Child::wait`] with a deadline;
//! - [`line_channel`] / [`forward_lines`] read a child's output on a thread, and
//!   [`next_line_within`], [`wait_for_event`] and [`rest_within`] take lines from it with a
//!   deadline.
//!
//! What a test reacts to in `rmc`'s output are its events (`rmc::events::Event`), read from
//! the JSON lines of `rmc --json`: [`wait_for_event`], [`events_in`] and
//! [`process::Rmc::wait_event`] are generic over the event type (anything `FromStr`, so this
//! crate does not depend on `rmc`); lines that do not parse (log lines) are skipped.
//!
//! [`netns`] builds two "hosts" (network namespaces on a bridge) for fault trials.

pub mod netns;
pub mod process;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the `rmc` binary built in this workspace's target directory.
pub fn rmc_bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("rmc");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p rmc-vmm`, or run `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// True when KVM can be used. Without /dev/kvm the test is skipped with a message, unless
/// `RMC_REQUIRE_KVM=1` (set by `.ci/run` on machines that have /dev/kvm), where it fails.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("RMC_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm cannot be opened, and RMC_REQUIRE_KVM=1 forbids skipping");
        }
        eprintln!("SKIPPED {test}: /dev/kvm cannot be opened (needs KVM and permission to use it)");
    }
    ok
}

/// How long a test waits for a killed child to go away and for its output to drain.
const GRACE: Duration = Duration::from_secs(5);

/// Polls `child` until it exits or `until` passes; `Ok(None)` at the deadline.
fn try_wait_until(child: &mut Child, until: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= until {
            return Ok(None);
        }
        std::thread::sleep(nap.min(until - now));
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion and returns what it printed, like [`Command::output`] (stdin is
/// /dev/null, stdout and stderr are captured, both read on threads so a chatty child never
/// blocks on a full pipe), but with a deadline: if `cmd` has not exited and closed its output
/// within `deadline`, it is killed (SIGKILL; processes it started are not) and this panics
/// with a message naming the command, the deadline and the output captured so far. It also
/// panics if the command cannot be started, or if it exits but a process it started keeps its
/// output pipes open past the deadline.
///
/// The deadline is a guard against hangs, not a speed criterion: choose it generously.
pub fn output_within(cmd: &mut Command, deadline: Duration) -> Output {
    let until = Instant::now() + deadline;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = capture(child.stdout.take().expect("piped"), done_tx.clone());
    let stderr = capture(child.stderr.take().expect("piped"), done_tx);
    let take = |buf: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *buf.lock().unwrap());
    let so_far =
        |buf: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    let Some(status) = try_wait_until(&mut child, until)
        .unwrap_or_else(|e| panic!("cannot wait for {cmd:?}: {e}"))
    else {
        let _ = child.kill();
        let _ = child.wait();
        // Let the readers pick up what was still in the pipes (unless a grandchild holds them).
        let grace = Instant::now() + GRACE;
        for _ in 0..2 {
            let left = grace.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        panic!(
            "{cmd:?} did not finish within {deadline:?}: killed it.\n--- stdout so far:\n{}\n\
             --- stderr so far:\n{}",
            so_far(&stdout),
            so_far(&stderr)
        );
    };
    // The child has exited: its pipes close now, unless a process it started holds them.
    let drain_until = until.max(Instant::now() + GRACE);
    for _ in 0..2 {
        let left = drain_until.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            panic!(
                "{cmd:?} exited ({status}) but its output stayed open past the {deadline:?} \
                 deadline (a process it started still holds it).\n--- stdout so far:\n{}\n\
                 --- stderr so far:\n{}",
                so_far(&stdout),
                so_far(&stderr)
            );
        }
    }
    Output {
        status,
        stdout: take(&stdout),
        stderr: take(&stderr),
    }
}

/// Reads `r` to its end on a thread into the returned buffer; sends on `done` at the end.
fn capture(mut r: impl Read + Send + 'static, done: Sender<()>) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
    buf
}

/// Waits for `child` (described by `what`, for messages) to exit, at most `deadline`: past it
/// the child is killed and this panics with a message naming `what` and the deadline. Returns
/// the exit status.
///
/// The deadline is a guard against hangs, not a speed criterion: choose it generously.
pub fn wait_within(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    match try_wait_until(child, Instant::now() + deadline)
        .unwrap_or_else(|e| panic!("cannot wait for {what}: {e}"))
    {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} (pid {}) did not exit within {deadline:?}: killed it",
                child.id()
            );
        }
    }
}

/// Sends each line read from `r` (a child's stdout or stderr) to `tx`, on a thread, until
/// the end of `r`. The thread keeps reading after the receiver is gone, so the child never
/// blocks writing to a pipe nobody reads any more.
pub fn forward_lines(r: impl Read + Send + 'static, tx: Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
}

/// The lines read from `r`, through a channel fed by [`forward_lines`]: take them with
/// [`next_line_within`], [`wait_for_line`] or [`rest_within`]. The channel disconnects at the
/// end of `r`.
pub fn line_channel(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    forward_lines(r, tx);
    rx
}

/// The next line from `rx` (the output of `what`), waiting at most `deadline`. Panics,
/// naming `what` and the deadline, on timeout or when the output ends first.
pub fn next_line_within(rx: &Receiver<String>, deadline: Duration, what: &str) -> String {
    match rx.recv_timeout(deadline) {
        Ok(line) => line,
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what} printed no line within {deadline:?}")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what} ended its output without a line"),
    }
}

/// Skips lines from `rx` (the output of `what`) until one parses as an event `E` (see the
/// crate doc) that `pick` takes, and returns what `pick` made of it, waiting at most
/// `deadline` in all. Panics on timeout or when the output ends first, naming `what`, the
/// `awaited` event and the deadline, and showing the lines skipped.
pub fn wait_for_event<E: FromStr, T>(
    rx: &Receiver<String>,
    deadline: Duration,
    what: &str,
    awaited: &str,
    mut pick: impl FnMut(E) -> Option<T>,
) -> T {
    let until = Instant::now() + deadline;
    let mut seen = String::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(t) = line.parse().ok().and_then(&mut pick) {
                    return t;
                }
                seen += &line;
                seen.push('\n');
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("{what} reported no {awaited} within {deadline:?}; it printed:\n{seen}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("{what} ended its output without reporting {awaited}; it printed:\n{seen}")
            }
        }
    }
}

/// The events `E` (see the crate doc) among the lines of `text` (a captured stdout), in
/// order; other lines are skipped.
pub fn events_in<E: FromStr>(text: &str) -> Vec<E> {
    text.lines().filter_map(|l| l.parse().ok()).collect()
}

/// Every line left in `rx` (the output of `what`) up to the end of the output, each followed
/// by a newline, waiting at most `deadline` for the end. Panics on timeout, naming `what` and
/// the deadline, and showing the lines read.
pub fn rest_within(rx: &Receiver<String>, deadline: Duration, what: &str) -> String {
    let until = Instant::now() + deadline;
    let mut all = String::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                all += &line;
                all.push('\n');
            }
            Err(RecvTimeoutError::Disconnected) => return all,
            Err(RecvTimeoutError::Timeout) => {
                panic!("the output of {what} did not end within {deadline:?}; it printed:\n{all}")
            }
        }
    }
}

/// Kills `child` (described by `what`) and reaps it, waiting at most `deadline`; never panics,
/// so it can serve in `Drop` during a panic. Returns false, after printing a warning, if the
/// child had not gone away by then.
pub fn kill_within(child: &mut Child, deadline: Duration, what: &str) -> bool {
    let _ = child.kill();
    // An error means there is no child left to wait for.
    let gone = !matches!(try_wait_until(child, Instant::now() + deadline), Ok(None));
    if !gone {
        eprintln!(
            "warning: {what} (pid {}) was still there {deadline:?} after SIGKILL",
            child.id()
        );
    }
    gone
}

/// Polls `cond` every 2 ms until it holds, failing the test after `timeout` (a hang guard, not
/// a speed requirement).
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Logs of the code under test, at `RUST_LOG` (default `warn`), into the test's output.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}
