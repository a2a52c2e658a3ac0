//! Test fixtures: a real etcd on loopback, for this crate's tests and other crates'.
//!
//! ```no_run
//! use rmc_arbiter::testing::{etcd_available, EtcdServer};
//! if !etcd_available("my_test") {
//!     return;
//! }
//! let etcd = EtcdServer::start("/rmc/my_test").unwrap();
//! let arbiter = rmc_arbiter::Arbiter::new(etcd.endpoint.clone(), std::time::Duration::from_secs(1));
//! ```

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Arbiter, Endpoint};

/// The etcd binary we run.
const ETCD: &str = "etcd";

/// How long [`EtcdServer::start`] waits for etcd to answer.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Whether a test that needs etcd can run. When the `etcd` binary is missing: with
/// `RMC_REQUIRE_ETCD=1` (CI sets it) this panics, failing the test; otherwise it prints
/// "SKIPPED <test_name>: etcd not installed (apt-get install etcd-server)" and returns false.
pub fn etcd_available(test_name: &str) -> bool {
    let present = Command::new(ETCD)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if present {
        return true;
    }
    if std::env::var("RMC_REQUIRE_ETCD").as_deref() == Ok("1") {
        panic!(
            "{test_name}: etcd is not installed but RMC_REQUIRE_ETCD=1 (apt-get install etcd-server)"
        );
    }
    println!("SKIPPED {test_name}: etcd not installed (apt-get install etcd-server)");
    false
}

/// A single-node etcd on 127.0.0.1, with its data in a temporary directory; killed (and
/// waited for) on drop.
///
/// It runs with `--heartbeat-interval 50 --election-timeout 500`, which makes its minimum
/// lease TTL 1 s (2 s with etcd's defaults), so lease expiry tests are quick.
#[derive(Debug)]
pub struct EtcdServer {
    /// `etcd://127.0.0.1:PORT{prefix}`.
    pub endpoint: Endpoint,
    child: Child,
    frozen: AtomicBool,
    // Last: removed after the process is gone.
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports and waits (at most 20 s) until its
    /// `/v3/kv/range` answers. `prefix` becomes the endpoint's prefix (it must start with '/'
    /// and not end with '/').
    pub fn start(prefix: &str) -> Result<EtcdServer, String> {
        let mut last_error = String::new();
        // A port found free may be taken before etcd binds it: try a few times.
        for _ in 0..3 {
            match Self::try_start(prefix) {
                Ok(s) => return Ok(s),
                Err((retry, e)) => {
                    if !retry {
                        return Err(e);
                    }
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    /// Err((worth retrying, message)).
    fn try_start(prefix: &str) -> Result<EtcdServer, (bool, String)> {
        let (client, peer) = free_ports().map_err(|e| (false, format!("free ports: {e}")))?;
        let endpoint: Endpoint = format!("etcd://127.0.0.1:{client}{prefix}")
            .parse()
            .map_err(|e| (false, format!("bad prefix {prefix:?}: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("rmc-etcd-")
            .tempdir()
            .map_err(|e| (false, format!("temporary directory: {e}")))?;
        let log_path = dir.path().join("etcd.log");
        let log = File::create(&log_path).map_err(|e| (false, format!("{log_path:?}: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| (false, format!("{log_path:?}: {e}")))?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(ETCD)
            .arg("--name")
            .arg("t")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("t={peer_url}"))
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| (false, format!("cannot run {ETCD}: {e}")))?;
        let mut server = EtcdServer {
            endpoint,
            child,
            frozen: AtomicBool::new(false),
            dir,
        };
        let probe = Arbiter::new(server.endpoint.clone(), Duration::from_secs(1));
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = server.log_tail();
                let retry = log.contains("address already in use");
                return Err((retry, format!("etcd exited with {status}; its log:\n{log}")));
            }
            match probe.primary() {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() >= deadline => {
                    return Err((
                        false,
                        format!(
                            "etcd did not answer within {START_DEADLINE:?} ({e}); its log:\n{}",
                            server.log_tail()
                        ),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// etcd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// etcd's log file (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The last few KiB of etcd's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4096);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// The temporary directory etcd runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops etcd (SIGSTOP): it still accepts connections (the kernel does), but answers
    /// nothing until [`EtcdServer::thaw`].
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        self.frozen.store(true, Ordering::Release);
    }

    /// Whether etcd is frozen now.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Resumes etcd after [`EtcdServer::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
        self.frozen.store(false, Ordering::Release);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, which
        // we have not reaped (we wait for it only on drop), so it cannot name another process.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // SIGKILL works on a stopped process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct free loopback ports (bound to port 0, then released).
fn free_ports() -> std::io::Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}
