//! Two "hosts" on one machine, for fault trials: network namespaces joined like this
//!
//! ```text
//!   root namespace: bridge rmcbr<tag> 10.77.X.1/24   (clients, etcd)
//!        |                         |
//!   uplink 10.77.X.2/24       uplink 10.77.X.3/24
//!   namespace P (primary) --- namespace S (standby)
//!         repl 10.78.X.1/30 <-> repl 10.78.X.2/30      (replication, a direct veth pair)
//! ```
//!
//! [`Topology::create`] builds it (names unique to this process and topology; `X` is
//! reserved through a lock file so that concurrent runs get different subnets) and dropping it
//! removes it again, also during a panic: processes still in the namespaces are SIGKILLed by
//! pid, the namespaces (and with them their veth pairs) and the bridge deleted. Leftovers of a
//! test process that died without cleaning up (SIGKILLed, say) are removed by the next
//! [`Topology::create`].
//!
//! Processes run on a host with [`Topology::command`] (`ip netns exec NS PROGRAM`, which
//! execs `PROGRAM`: the child's pid is the program's). Faults: [`Topology::set_link`],
//! [`Topology::set_host_links`], [`Topology::shape_replication`]; [`Topology::reset`] undoes
//! them all. [`Etcd`] runs a single-member etcd on the bridge address, reachable from both
//! hosts.
//!
//! Everything here needs root and the `ip`, `tc` and `ss` commands (iproute2): check with
//! [`netns_available`] first.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{kill_within, output_within};

/// One of the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    /// Namespace P, where the primary runs.
    Primary,
    /// Namespace S, where the standby runs.
    Standby,
}

impl Host {
    /// Both hosts.
    pub const BOTH: [Host; 2] = [Host::Primary, Host::Standby];

    fn index(self) -> usize {
        match self {
            Host::Primary => 0,
            Host::Standby => 1,
        }
    }

    /// "primary" or "standby".
    pub fn name(self) -> &'static str {
        match self {
            Host::Primary => "primary",
            Host::Standby => "standby",
        }
    }
}

/// The name, inside each host's namespace, of its link to the bridge.
pub const UPLINK: &str = "uplink";
/// The name, inside each host's namespace, of its end of the replication link.
pub const REPL: &str = "repl";

/// A deadline for one `ip`/`tc`/`ss` command (a hang guard).
const COMMAND: Duration = Duration::from_secs(30);

/// True when this process can build a [`Topology`]: it runs as root and `ip netns`, `tc` and
/// `ss` work. Otherwise the test is skipped with a message, unless `RMC_REQUIRE_KVM=1` (CI,
/// where skipping is forbidden), where it fails.
pub fn netns_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let why = if !root {
        Some("not running as root (network namespaces need it)")
    } else if !works("ip", &["netns", "list"]) {
        Some("`ip netns list` does not work (iproute2 missing?)")
    } else if !works("tc", &["-V"]) || !works("ss", &["-V"]) {
        Some("`tc` or `ss` is missing (iproute2)")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            if std::env::var("RMC_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: {why}, and RMC_REQUIRE_KVM=1 forbids skipping");
            }
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// Runs `program args` with a deadline and panics, showing its stderr, unless it succeeds.
/// Returns its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = output_within(Command::new(program).args(args), COMMAND);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `program args` and says whether it succeeded; never panics (for cleanup, also
/// during a panic).
fn try_run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid encoded in one of our names: `<prefix><pid in hex>n<instance>`.
fn pid_of_name(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let (hex, instance) = rest.split_once('n')?;
    instance.parse::<u32>().ok()?;
    u32::from_str_radix(hex, 16).ok()
}

/// Namespace and bridge name prefixes (the rest is `<pid in hex>n<instance>`).
const NS_PREFIX: [&str; 2] = ["rmcP", "rmcS"];
const BRIDGE_PREFIX: &str = "rmcbr";
const PORT_PREFIX: [&str; 2] = ["rmcp", "rmcs"];

/// Removes namespaces and bridges of earlier test processes that are gone.
fn sweep_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if NS_PREFIX
            .iter()
            .filter_map(|p| pid_of_name(name, p))
            .any(|pid| !pid_alive(pid))
        {
            try_run("ip", &["netns", "del", name]);
        }
    }
    let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "12: rmcbr1a2bn0: <BROADCAST,...> ..."
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        if pid_of_name(name, BRIDGE_PREFIX).is_some_and(|pid| !pid_alive(pid)) {
            try_run("ip", &["link", "del", "dev", name]);
        }
    }
}

/// A reservation of the subnets' `X` for this process: a lock file naming our pid, removed on
/// drop (and taken over when its process is gone).
#[derive(Debug)]
struct SubnetLock {
    x: u8,
    path: PathBuf,
}

impl SubnetLock {
    fn take(first: u32) -> SubnetLock {
        let root_addrs = run("ip", &["-4", "-o", "addr", "show"]);
        for i in 0..250 {
            let x = ((first + i) % 250 + 1) as u8;
            if root_addrs.contains(&format!(" 10.77.{x}.")) {
                continue;
            }
            let path = std::env::temp_dir().join(format!("rmc-netns-10.77.{x}.lock"));
            for _ in 0..2 {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut f) => {
                        let _ = write!(f, "{}", std::process::id());
                        return SubnetLock { x, path };
                    }
                    Err(_) => {
                        // Taken: by a live process (try the next X) or a dead one (take over).
                        let owner = std::fs::read_to_string(&path)
                            .ok()
                            .and_then(|s| s.trim().parse::<u32>().ok());
                        match owner {
                            Some(pid) if !pid_alive(pid) => {
                                let _ = std::fs::remove_file(&path);
                            }
                            _ => break,
                        }
                    }
                }
            }
        }
        panic!("no free subnet 10.77.X.0/24 (X in 1..=250) for a test topology");
    }
}

impl Drop for SubnetLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Two hosts (network namespaces) on a bridge, with a direct replication link: see the
/// module documentation. Removed when dropped.
#[derive(Debug)]
pub struct Topology {
    bridge: String,
    /// The bridge's port to each host (root namespace).
    ports: [String; 2],
    /// Each host's namespace.
    ns: [String; 2],
    /// The reservation of X (dropped after `drop`, so once the addresses are gone).
    lock: SubnetLock,
}

impl Topology {
    /// Builds a fresh topology; panics (after removing what was built) if any step fails.
    pub fn create() -> Topology {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let instance = INSTANCE.fetch_add(1, Ordering::Relaxed);
        assert!(instance < 1000, "too many topologies in one process");
        let pid = std::process::id();
        sweep_leftovers();
        let tag = format!("{pid:x}n{instance}");
        let lock = SubnetLock::take(pid.wrapping_mul(7).wrapping_add(instance * 31));
        let t = Topology {
            bridge: format!("{BRIDGE_PREFIX}{tag}"),
            ports: PORT_PREFIX.map(|p| format!("{p}{tag}")),
            ns: NS_PREFIX.map(|p| format!("{p}{tag}")),
            lock,
        };
        debug_assert!(t.bridge.len() <= 15 && t.ports.iter().all(|p| p.len() <= 15));
        let x = t.x();
        run("ip", &["link", "add", "name", &t.bridge, "type", "bridge"]);
        run(
            "ip",
            &["addr", "add", &format!("10.77.{x}.1/24"), "dev", &t.bridge],
        );
        run("ip", &["link", "set", "dev", &t.bridge, "up"]);
        for h in Host::BOTH {
            let (ns, port) = (t.namespace(h), &t.ports[h.index()]);
            run("ip", &["netns", "add", ns]);
            run("ip", &["-n", ns, "link", "set", "dev", "lo", "up"]);
            run(
                "ip",
                &[
                    "link", "add", "name", port, "type", "veth", "peer", "name", UPLINK, "netns",
                    ns,
                ],
            );
            run("ip", &["link", "set", "dev", port, "master", &t.bridge]);
            run("ip", &["link", "set", "dev", port, "up"]);
            let addr = format!("{}/24", t.service_ip(h));
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", UPLINK]);
            run("ip", &["-n", ns, "link", "set", "dev", UPLINK, "up"]);
        }
        let (p, s) = (t.namespace(Host::Primary), t.namespace(Host::Standby));
        run(
            "ip",
            &[
                "-n", p, "link", "add", "name", REPL, "type", "veth", "peer", "name", REPL,
                "netns", s,
            ],
        );
        for h in Host::BOTH {
            let addr = format!("{}/30", t.repl_ip(h));
            run(
                "ip",
                &["-n", t.namespace(h), "addr", "add", &addr, "dev", REPL],
            );
            run(
                "ip",
                &["-n", t.namespace(h), "link", "set", "dev", REPL, "up"],
            );
        }
        t
    }

    /// The `X` of this topology's subnets (1..=250).
    pub fn x(&self) -> u8 {
        self.lock.x
    }

    /// The bridge's address in the root namespace (10.77.X.1): clients and etcd.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.x(), 1)
    }

    /// A host's address on the bridge (10.77.X.2 primary, 10.77.X.3 standby): where it serves.
    pub fn service_ip(&self, h: Host) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.x(), 2 + h.index() as u8)
    }

    /// A host's end of the replication link (10.78.X.1 primary, 10.78.X.2 standby).
    pub fn repl_ip(&self, h: Host) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.x(), 1 + h.index() as u8)
    }

    /// A host's network namespace.
    pub fn namespace(&self, h: Host) -> &str {
        &self.ns[h.index()]
    }

    /// A command that runs `program` on host `h` (`ip netns exec NS program`; that execs
    /// `program`, so a spawned child's pid is the program's).
    pub fn command(&self, h: Host, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.namespace(h)]).arg(program);
        c
    }

    /// Sets `link` (`UPLINK` or `REPL`) of host `h` up or down (panics if `ip` fails).
    pub fn set_link(&self, h: Host, link: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        run(
            "ip",
            &["-n", self.namespace(h), "link", "set", "dev", link, state],
        );
    }

    /// Sets both links of host `h` up or down: down, the host neither sends nor receives.
    pub fn set_host_links(&self, h: Host, up: bool) {
        for link in [UPLINK, REPL] {
            self.set_link(h, link, up);
        }
    }

    /// Limits the primary's sending on the replication link to `rate` (`tc` syntax, e.g.
    /// `1gbit`), so that a large epoch stays in flight for a while.
    pub fn shape_replication(&self, rate: &str) {
        run(
            "tc",
            &[
                "-n",
                self.namespace(Host::Primary),
                "qdisc",
                "replace",
                "dev",
                REPL,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "100ms",
            ],
        );
    }

    /// Bytes the primary's TCP connections to the standby's replication address hold unsent
    /// or unacknowledged (Send-Q, from `ss`): a large value means an epoch is in flight.
    pub fn replication_send_queue(&self) -> u64 {
        let dst = self.repl_ip(Host::Standby).to_string();
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                self.namespace(Host::Primary),
                "ss",
                "-tnH",
                "state",
                "established",
                "dst",
                &dst,
            ],
        );
        // "Recv-Q Send-Q Local:Port Peer:Port" (the state column is left out with a filter).
        out.lines()
            .filter_map(|l| {
                let numbers: Vec<u64> =
                    l.split_whitespace().map_while(|w| w.parse().ok()).collect();
                numbers.get(1).copied()
            })
            .sum()
    }

    /// Every link up and no shaping: the state [`Topology::create`] left.
    pub fn reset(&self) {
        try_run(
            "tc",
            &[
                "-n",
                self.namespace(Host::Primary),
                "qdisc",
                "del",
                "dev",
                REPL,
                "root",
            ],
        );
        for h in Host::BOTH {
            self.set_host_links(h, true);
        }
    }

    /// The pids of the processes running on host `h`.
    pub fn pids(&self, h: Host) -> Vec<u32> {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", self.namespace(h)])
            .stderr(Stdio::null())
            .output()
        else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes started on the hosts (normally gone already): SIGKILL, by pid.
        for h in Host::BOTH {
            for pid in self.pids(h) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        // Deleting a namespace deletes the veths in it, and with them their peers.
        for ns in &self.ns {
            if !try_run("ip", &["netns", "del", ns]) {
                eprintln!("warning: could not delete network namespace {ns}");
            }
        }
        if !try_run("ip", &["link", "del", "dev", &self.bridge]) {
            eprintln!("warning: could not delete bridge {}", self.bridge);
        }
    }
}

/// A free TCP port on `ip` (bound and released: another process could take it in between,
/// which etcd would then report clearly).
fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
        .port()
}

/// A single-member etcd serving clients on `ip` (the bridge's address, so both hosts reach
/// it), its data in a temporary directory. Killed and removed when dropped.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    endpoint: String,
}

impl Etcd {
    /// How long etcd may take to become healthy (a hang guard).
    const READY: Duration = Duration::from_secs(30);

    /// Starts etcd (`/usr/bin/etcd` or the one on `PATH`) and waits until
    /// `etcdctl endpoint health` says it is healthy.
    pub fn start(ip: Ipv4Addr) -> Etcd {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rmc-etcd-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd's directory");
        let log_path = dir.join("etcd.log");
        let log = File::create(&log_path).expect("etcd's log file");
        let client_port = free_port(ip);
        let peer_port = free_port(Ipv4Addr::LOCALHOST);
        let endpoint = format!("http://{ip}:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        let mut etcd = Etcd {
            child,
            dir,
            endpoint,
        };
        let until = Instant::now() + Self::READY;
        loop {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                panic!(
                    "etcd exited ({status}) before it was healthy; its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            let health = output_within(
                Command::new("etcdctl").args([
                    "--endpoints",
                    &etcd.endpoint,
                    "--dial-timeout",
                    "1s",
                    "--command-timeout",
                    "2s",
                    "endpoint",
                    "health",
                ]),
                COMMAND,
            );
            if health.status.success() {
                return etcd;
            }
            if Instant::now() >= until {
                let _ = etcd.child.kill();
                panic!(
                    "etcd at {} was not healthy within {:?}: {}; its log:\n{}",
                    etcd.endpoint,
                    Self::READY,
                    String::from_utf8_lossy(&health.stderr).trim(),
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client endpoint, `http://IP:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// An arbiter URL for rmc: `etcd://IP:PORT/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        let host = self.endpoint.trim_start_matches("http://");
        format!("etcd://{host}/{prefix}")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        kill_within(&mut self.child, Duration::from_secs(10), "etcd");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_pid() {
        assert_eq!(pid_of_name("rmcP1a2bn0", "rmcP"), Some(0x1a2b));
        assert_eq!(
            pid_of_name("rmcbr400000n999", BRIDGE_PREFIX),
            Some(0x400000)
        );
        assert_eq!(pid_of_name("rmcbrother", BRIDGE_PREFIX), None);
        assert_eq!(pid_of_name("rmcP1a2b", "rmcP"), None);
        // The longest names fit the 15 bytes of an interface name.
        assert!(format!("{BRIDGE_PREFIX}{:x}n999", 0x40_0000).len() <= 15);
    }
}
