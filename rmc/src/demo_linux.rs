//! `rmc demo --guest linux`: a stock Linux kernel under protection. A standby and a primary
//! (real `rmc` processes) protect a Linux VM whose init prints `seq N` on its serial console
//! every 50 ms (an initramfs from `guest-linux/build-initramfs.sh --service seq`); the primary
//! is SIGKILLed at a chosen moment; the standby restores the VM and the guest goes on
//! printing. The check is on what a user saw: the primary's console (what it printed before
//! protection began) followed by the standby's (what the checkpoints it held carried, then
//! the restored guest) must read `seq 1`, `seq 2`, ... with no number repeated or skipped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::demo::{spawn, wait_for_within, Line};
use crate::events::{Event, FailedOver};
use rmc_transport::link::Transport;

/// Linux demo settings.
#[derive(Debug, Clone)]
pub struct LinuxDemoConfig {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs whose init prints `seq N` every 50 ms.
    pub initrd: PathBuf,
    /// Guest memory.
    pub memory: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Transport between primary and standby.
    pub transport: Transport,
    /// The standby's listen address.
    pub standby_ip: std::net::IpAddr,
    /// Heartbeat arguments for both.
    pub heartbeat: Vec<String>,
    /// How long the guest may take to boot and print its first lines.
    pub boot_timeout: Duration,
    /// Numbers the restored guest must print after the kill.
    pub after_lines: u64,
    /// Extra arguments for the primary.
    pub primary_extra: Vec<String>,
}

/// What one trial showed.
#[derive(Debug, Clone)]
pub struct LinuxTrial {
    /// From starting the primary to the first `seq` line a user saw.
    pub boot: Duration,
    /// The highest number shown when the primary was killed.
    pub shown_at_kill: u64,
    /// The highest number shown at the end (all of 1..=last, once each).
    pub last: u64,
    /// From the kill to the first new number shown.
    pub failover: Duration,
    /// The standby's report.
    pub standby: FailedOver,
}

/// The numbers of the `seq N` lines of `text`, in order.
pub fn seq_numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("seq "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Whether `numbers` is exactly 1, 2, ..., n: `Err` names the first repeat or gap.
pub fn check_sequence(numbers: &[u64]) -> std::result::Result<u64, String> {
    let mut want = 1;
    for (i, &n) in numbers.iter().enumerate() {
        if n != want {
            let what = if n < want { "repeated" } else { "skipped" };
            return Err(format!(
                "line {} of the seq output says seq {n} where seq {want} was due: {what} \
                 (context: {:?})",
                i + 1,
                &numbers[i.saturating_sub(3)..(i + 4).min(numbers.len())]
            ));
        }
        want += 1;
    }
    Ok(want - 1)
}

/// Both consoles as a user saw them: the primary's, then the standby's.
fn shown(primary: &Path, standby: &Path) -> String {
    let mut s = std::fs::read_to_string(primary).unwrap_or_default();
    s.push_str(&std::fs::read_to_string(standby).unwrap_or_default());
    s
}

fn highest(primary: &Path, standby: &Path) -> u64 {
    seq_numbers(&shown(primary, standby))
        .into_iter()
        .max()
        .unwrap_or(0)
}

/// Waits until the consoles show a number above `n`; returns when that was seen.
fn wait_beyond(
    primary: &Path,
    standby: &Path,
    n: u64,
    within: Duration,
    what: &str,
) -> Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        if highest(primary, standby) > n {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: no seq line above {n} within {within:?}; the consoles end with:\n{}",
                tail(&shown(primary, standby), 12)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs one trial: the primary is killed `kill_after` after the guest's first `seq` line.
pub fn run_linux_trial(
    exe: &Path,
    c: &LinuxDemoConfig,
    kill_after: Duration,
    index: u32,
    say: &mut dyn FnMut(&str),
) -> Result<LinuxTrial> {
    let dir = std::env::temp_dir().join(format!("rmc-demo-linux-{}-{index}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = trial(exe, c, &dir, kill_after, index, say);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn trial(
    exe: &Path,
    c: &LinuxDemoConfig,
    dir: &Path,
    kill_after: Duration,
    index: u32,
    say: &mut dyn FnMut(&str),
) -> Result<LinuxTrial> {
    let verbose = index == 0;
    let secret = dir.join("secret");
    let key: String = rmc_transport::wire::auth::nonce()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&secret, key)?;
    let secret_s = secret.display().to_string();
    let (p_console, s_console) = (dir.join("primary-console"), dir.join("standby-console"));
    for f in [&p_console, &s_console] {
        std::fs::write(f, "")?;
    }
    let listen = std::net::SocketAddr::new(c.standby_ip, 0).to_string();
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
            "--console",
            &s_console.display().to_string(),
            "--log",
            "error",
        ]
        .map(String::from)
        .into_iter()
        .chain(c.heartbeat.iter().cloned())
        .collect::<Vec<_>>(),
    )?;
    let (transport, standby_addr) = wait_for_within(
        &standby_out,
        "the standby",
        "where it listens",
        Duration::from_secs(60),
        |e| match e {
            Event::StandbyListening {
                transport, addr, ..
            } => Some((transport, addr)),
            _ => None,
        },
    )?;
    let cmdline = format!("{} quiet", rmc_vmm::linux::DEFAULT_CMDLINE);
    let started = Instant::now();
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
            "--vcpus",
            &c.vcpus.to_string(),
            "--kernel",
            &c.kernel.display().to_string(),
            "--initrd",
            &c.initrd.display().to_string(),
            "--cmdline",
            &cmdline,
            "--console",
            &p_console.display().to_string(),
            "--log",
            "error",
        ]
        .map(String::from)
        .into_iter()
        .chain(c.heartbeat.iter().cloned())
        .chain(c.primary_extra.iter().cloned())
        .collect::<Vec<_>>(),
    )?;
    if verbose {
        say(&format!(
            "standby listening on {transport} {standby_addr}; primary booting {} ({} vCPUs, {} memory) with {}",
            c.kernel.display(),
            c.vcpus,
            c.memory,
            c.initrd.display()
        ));
    }
    wait_for_within(
        &primary_out,
        "the primary",
        "its first acknowledged checkpoint",
        c.boot_timeout,
        |e| (e == Event::FirstCheckpointAcked).then_some(()),
    )?;
    let first = wait_beyond(&p_console, &s_console, 0, c.boot_timeout, "boot")
        .with_context(|| drain(&primary_out))?;
    let boot = first - started;
    if verbose {
        say(&format!(
            "the guest prints seq N every 50 ms, {:.1} s after the primary started; under \
             protection the standby shows the console, line by line as it holds the \
             checkpoints that printed them",
            boot.as_secs_f64()
        ));
    }
    std::thread::sleep(kill_after);
    let killed = Instant::now();
    let _ = primary.0.kill();
    let _ = primary.0.wait();
    let shown_at_kill = highest(&p_console, &s_console);
    let standby = wait_for_within(
        &standby_out,
        "the standby",
        "its failover",
        Duration::from_secs(120),
        |e| match e {
            Event::FailedOver(f) => Some(f),
            _ => None,
        },
    )?;
    let next = wait_beyond(
        &p_console,
        &s_console,
        shown_at_kill,
        Duration::from_secs(120),
        "after the failover",
    )?;
    wait_beyond(
        &p_console,
        &s_console,
        shown_at_kill + c.after_lines,
        Duration::from_secs(120),
        "after the failover",
    )?;
    let text = shown(&p_console, &s_console);
    let last = check_sequence(&seq_numbers(&text)).map_err(|e| {
        anyhow::anyhow!(
            "INCONSISTENT: {e}; consoles kept in {} (primary-console, standby-console)",
            dir.display()
        )
    })?;
    if text.matches("rmc-guest: init up").count() > 1 {
        bail!("INCONSISTENT: the guest's init started twice (a reboot shown as a failover)");
    }
    Ok(LinuxTrial {
        boot,
        shown_at_kill,
        last,
        failover: next - killed,
        standby,
    })
}

/// What a process printed so far (for an error).
fn drain(rx: &std::sync::mpsc::Receiver<Line>) -> String {
    let lines: Vec<String> = rx.try_iter().map(|l| l.to_string()).collect();
    format!(
        "the primary printed:\n    {}",
        lines[lines.len().saturating_sub(10)..].join("\n    ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_finds_repeats_and_gaps_and_ignores_other_lines() {
        let ok = "[ 1.0] boot\nrmc-guest: init up\nseq 1\nseq 2\r\nnoise\nseq 3\n";
        assert_eq!(check_sequence(&seq_numbers(ok)), Ok(3));
        let repeat = "seq 1\nseq 2\nseq 3\nseq 2\nseq 3\n";
        let e = check_sequence(&seq_numbers(repeat)).unwrap_err();
        assert!(e.contains("seq 2 where seq 4 was due: repeated"), "{e}");
        let gap = "seq 1\nseq 2\nseq 4\n";
        let e = check_sequence(&seq_numbers(gap)).unwrap_err();
        assert!(e.contains("skipped"), "{e}");
        assert!(
            check_sequence(&seq_numbers("seq 2\n")).is_err(),
            "must start at 1"
        );
        assert_eq!(check_sequence(&[]), Ok(0));
    }
}
