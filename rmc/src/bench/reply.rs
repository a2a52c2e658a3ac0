//! Reply latency under output commit: what a protected service's clients feel.
//!
//! The guest serves the counter on vCPU 0 while a dirtier writes memory on vCPU 1. A client
//! on this host sends requests and times every reply, first against the guest unprotected
//! (the baseline), then protected with fixed epochs (output trigger off), then with the
//! output trigger on for each spacing asked for. Two loads:
//!
//! - `request`: one request at a time, the next sent when the reply arrived (what one
//!   interactive user does): latency is one round trip plus what output commit adds;
//! - `stream`: `window` requests outstanding at all times (a client pipelining requests, so
//!   many packets per epoch): replies per second and latency under load.
//!
//! Each protected row reports checkpoints per second, the pauses, and the dirtier's speed
//! against the same load unprotected (the guest's slowdown). The added latency of a row is
//! its percentile minus the baseline's percentile of the same load.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rmc_mc::primary::{Primary, PrimaryConfig};
use rmc_mc::protocol::OutputTrigger;
use rmc_transport::link::Transport;
use rmc_vmm::service::{Reply, Request};
use rmc_vmm::{DirtierConfig, Vm, VmConfig, Workload};
use serde::Serialize;

use super::{standby_for, summarize, BenchConfig, Percentiles};
use rmc_guest_api::PAGE_SIZE;

/// A client's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Load {
    /// One request at a time.
    Request,
    /// A window of requests outstanding.
    Stream,
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Load::Request => "request",
            Load::Stream => "stream",
        })
    }
}

/// How the guest runs in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// No primary, output leaves at once: the baseline.
    Unprotected,
    /// Protected with fixed epochs (`--output-trigger off`).
    TriggerOff,
    /// Protected, output ends epochs.
    TriggerOn(OutputTrigger),
}

/// Settings of the reply measurement.
#[derive(Debug, Clone)]
pub struct ReplyConfig {
    /// Loads to measure.
    pub loads: Vec<Load>,
    /// Output-trigger spacings to measure (each a row, after the baseline and trigger off).
    pub triggers: Vec<OutputTrigger>,
    /// The longest epoch (`--epoch-ms`), ms.
    pub epoch_ms: f64,
    /// Measured seconds per row (after a warm-up).
    pub seconds: f64,
    /// Requests outstanding in the `stream` load.
    pub window: usize,
    /// The dirtier on vCPU 1.
    pub dirtier: DirtierConfig,
}

/// One row: a load against the guest in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ReplyRow {
    /// Transport (`"tcp"` or `"rdma"`).
    #[serde(with = "crate::events::transport_serde")]
    pub transport: Transport,
    /// The load.
    pub load: Load,
    /// `"unprotected"`, `"off"` or `"on"`.
    pub trigger: &'static str,
    /// Output trigger's minimum gap, microseconds (null unless on).
    pub min_gap_us: Option<u64>,
    /// Output trigger's pause share, percent (null unless on).
    pub max_pause_percent: Option<f64>,
    /// The longest epoch, ms (null unprotected).
    pub epoch_ms: Option<f64>,
    /// Requests answered in the measured time.
    pub replies: u64,
    /// Replies per second.
    pub replies_per_s: f64,
    /// Requests sent again after no reply within a second (lost datagrams).
    pub resends: u64,
    /// From sending a request to its reply, microseconds.
    pub latency_us: Percentiles,
    /// Latency percentiles minus the unprotected row's of the same load (p50, p99, p99.9),
    /// microseconds; null for the baseline.
    pub added_us: Option<[i64; 3]>,
    /// Checkpoints acknowledged per second (null unprotected).
    pub checkpoints_per_s: Option<f64>,
    /// Share of those checkpoints that output triggered.
    pub output_share: Option<f64>,
    /// Pause per checkpoint, microseconds.
    pub pause_us: Option<Percentiles>,
    /// Dirtier page writes per second during the measurement.
    pub dirtier_pages_per_s: f64,
    /// 1 - dirtier speed / the unprotected row's (0: no slowdown); null for the baseline.
    pub slowdown: Option<f64>,
}

/// Measures every load in every mode, over `transport`; `progress` gets a line per row.
pub fn run(
    c: &BenchConfig,
    r: &ReplyConfig,
    transport: Transport,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ReplyRow>> {
    let mut modes = vec![Mode::Unprotected, Mode::TriggerOff];
    modes.extend(r.triggers.iter().map(|&t| Mode::TriggerOn(t)));
    let total = r.loads.len() * modes.len();
    let mut rows: Vec<ReplyRow> = Vec::new();
    for &load in &r.loads {
        let mut base: Option<ReplyRow> = None;
        for &mode in &modes {
            progress(&format!(
                "reply [{}/{total}] {transport}, {load} load, {}: {:.1} s",
                rows.len() + 1,
                describe(mode),
                r.seconds
            ));
            let mut row = one(c, r, transport, load, mode)
                .with_context(|| format!("reply latency, {load} load, {}", describe(mode)))?;
            if let Some(b) = &base {
                let l = &row.latency_us;
                let bl = &b.latency_us;
                row.added_us = Some([
                    l.p50 as i64 - bl.p50 as i64,
                    l.p99 as i64 - bl.p99 as i64,
                    l.p999 as i64 - bl.p999 as i64,
                ]);
                row.slowdown = (b.dirtier_pages_per_s > 0.0)
                    .then(|| 1.0 - row.dirtier_pages_per_s / b.dirtier_pages_per_s);
            } else {
                base = Some(row.clone());
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

fn describe(mode: Mode) -> String {
    match mode {
        Mode::Unprotected => "unprotected".into(),
        Mode::TriggerOff => "protected, output trigger off".into(),
        Mode::TriggerOn(t) => format!(
            "protected, output trigger on (gap {} us, pauses <= {}%)",
            t.min_gap.as_micros(),
            t.max_pause_share * 100.0
        ),
    }
}

/// A request slower than this is sent again (a lost datagram on loopback is rare; this only
/// keeps a row from hanging on one).
const RESEND_AFTER: Duration = Duration::from_secs(1);

fn one(
    c: &BenchConfig,
    r: &ReplyConfig,
    transport: Transport,
    load: Load,
    mode: Mode,
) -> Result<ReplyRow> {
    let vm = Vm::new(&VmConfig {
        mem_size: c.mem_size,
        workloads: vec![Workload::Counter, Workload::Dirtier(r.dirtier)],
        nic_addr: Some("127.0.0.1:0".parse().expect("valid")),
        ..Default::default()
    })?;
    let server = vm.nic_addr().context("the VM's NIC has no address")?;
    vm.resume();
    let mut client = LoadClient::new(server)?;
    // The service answers (unprotected, nothing held yet).
    client.request_response(Duration::from_millis(100), &mut Histogram::new(3)?)?;

    let stop = AtomicBool::new(false);
    let protected = !matches!(mode, Mode::Unprotected);
    let (addr, secret, standby) = if protected {
        standby_for(c, transport)?
    } else {
        (server, Vec::new(), None)
    };
    std::thread::scope(|s| -> Result<ReplyRow> {
        let primary = if protected {
            vm.enable_output_commit(rmc_netbuf::Limits::default())?;
            let mut pc = PrimaryConfig::new(addr, secret, c.mem_size / PAGE_SIZE);
            pc.transport = transport;
            pc.heartbeat = c.heartbeat;
            pc.epoch_interval = Duration::from_secs_f64(r.epoch_ms.max(0.1) / 1000.0);
            pc.summary_every = Duration::from_secs(3600);
            pc.output_trigger = match mode {
                Mode::TriggerOn(t) => Some(t),
                _ => None,
            };
            let p = Primary::connect(&vm, pc).context("Cannot connect to the standby")?;
            let acked = p.acked_counter();
            let (vm, stop) = (&vm, &stop);
            let h = s.spawn(move || {
                let r = p.run(stop);
                // The last checkpoint left the guest paused; its output left with the ack.
                vm.disable_output_commit();
                r
            });
            // Protecting once the first checkpoint is acknowledged (after the full sync).
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.load(Ordering::Relaxed) == 0 {
                if h.is_finished() || Instant::now() > deadline {
                    stop.store(true, Ordering::Release);
                    let err = match h.join().expect("primary thread") {
                        Err(e) => anyhow::Error::from(e),
                        Ok(_) => anyhow::anyhow!("the primary stopped before protecting"),
                    };
                    return Err(err.context("no checkpoint acknowledged within 60 s"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Some((h, acked))
        } else {
            None
        };
        let dirtier = || vm.dirtier_progress(1);
        // Warm-up: the load runs a while before anything is counted.
        let mut warm = Histogram::new(3)?;
        client.run(load, r.window, Duration::from_millis(300), &mut warm)?;
        let mut lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let (d0, a0) = (
            dirtier(),
            primary.as_ref().map(|(_, a)| a.load(Ordering::Relaxed)),
        );
        let start = Instant::now();
        let replies = client.run(load, r.window, Duration::from_secs_f64(r.seconds), &mut lat)?;
        let secs = start.elapsed().as_secs_f64();
        let (d1, a1) = (
            dirtier(),
            primary.as_ref().map(|(_, a)| a.load(Ordering::Relaxed)),
        );
        let stats = match primary {
            Some((h, _)) => {
                stop.store(true, Ordering::Release);
                Some(h.join().expect("primary thread")?)
            }
            None => None,
        };
        if let Some(h) = standby {
            let (_, session) = h.join().expect("standby thread");
            session?.result?;
        }
        Ok(ReplyRow {
            transport,
            load,
            trigger: match mode {
                Mode::Unprotected => "unprotected",
                Mode::TriggerOff => "off",
                Mode::TriggerOn(_) => "on",
            },
            min_gap_us: match mode {
                Mode::TriggerOn(t) => Some(t.min_gap.as_micros() as u64),
                _ => None,
            },
            max_pause_percent: match mode {
                Mode::TriggerOn(t) => Some(t.max_pause_share * 100.0),
                _ => None,
            },
            epoch_ms: protected.then_some(r.epoch_ms),
            replies,
            replies_per_s: replies as f64 / secs,
            resends: client.resends,
            latency_us: summarize(&lat),
            added_us: None,
            checkpoints_per_s: a0.zip(a1).map(|(a0, a1)| (a1 - a0) as f64 / secs),
            output_share: stats
                .as_ref()
                .map(|s| s.output_checkpoints as f64 / s.checkpoints_acked.max(1) as f64),
            pause_us: stats.as_ref().map(|s| summarize(&s.pause_us)),
            dirtier_pages_per_s: (d1 - d0) as f64 / secs,
            slowdown: None,
        })
    })
}

/// A client of the counter service timing every reply.
struct LoadClient {
    socket: UdpSocket,
    id: u64,
    next_seq: u64,
    last_counter: u64,
    resends: u64,
}

impl LoadClient {
    fn new(server: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(server)?;
        Ok(LoadClient {
            socket,
            id: 0x6265_6e63_6800_0000 | u64::from(std::process::id()),
            next_seq: 1,
            last_counter: 0,
            resends: 0,
        })
    }

    /// Runs `load` for `d`, recording each reply's latency (microseconds); returns replies.
    fn run(
        &mut self,
        load: Load,
        window: usize,
        d: Duration,
        lat: &mut Histogram<u64>,
    ) -> Result<u64> {
        match load {
            Load::Request => self.request_response(d, lat),
            Load::Stream => self.stream(window.max(1), d, lat),
        }
    }

    fn send(&self, seq: u64) -> Result<()> {
        let req = Request {
            client_id: self.id,
            seq,
        };
        self.socket.send(&req.encode())?;
        Ok(())
    }

    /// The next reply, or `None` when none came by `until`. Checks it: the counter rises with
    /// every new request of this (only) client.
    fn receive(&mut self, until: Instant) -> Result<Option<Reply>> {
        let mut buf = [0u8; 64];
        let wait = until.saturating_duration_since(Instant::now());
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_micros(50))))?;
        let n = match self.socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        let reply = Reply::decode(&buf[..n])?;
        if reply.client_id != self.id || reply.status != rmc_vmm::guest::STATUS_OK {
            bail!("unexpected reply {reply:?} (client {:#x})", self.id);
        }
        if reply.counter <= self.last_counter {
            bail!(
                "the counter went back: {} after {} (seq {})",
                reply.counter,
                self.last_counter,
                reply.seq
            );
        }
        self.last_counter = reply.counter;
        Ok(Some(reply))
    }

    fn request_response(&mut self, d: Duration, lat: &mut Histogram<u64>) -> Result<u64> {
        let end = Instant::now() + d;
        let mut replies = 0;
        while Instant::now() < end {
            let seq = self.next_seq;
            self.next_seq += 1;
            let sent = Instant::now();
            self.send(seq)?;
            let mut resend_at = sent + RESEND_AFTER;
            loop {
                match self.receive(resend_at)? {
                    Some(r) if r.seq == seq => break,
                    // A late answer to an earlier resend.
                    Some(_) => continue,
                    None => {
                        self.resends += 1;
                        self.send(seq)?;
                        resend_at = Instant::now() + RESEND_AFTER;
                        if sent.elapsed() > 10 * RESEND_AFTER {
                            bail!("no reply to seq {seq} within {:?}", 10 * RESEND_AFTER);
                        }
                    }
                }
            }
            let _ = lat.record((sent.elapsed().as_micros() as u64).max(1));
            replies += 1;
        }
        Ok(replies)
    }

    /// `window` requests outstanding; replies come in order (one socket, loopback, output
    /// released in the order the guest sent it). A window that gets no reply for a second is
    /// sent again (the guest answers a repeat of an older seq as stale, so the client moves
    /// on to new seqs and counts the lost ones as resends).
    fn stream(&mut self, window: usize, d: Duration, lat: &mut Histogram<u64>) -> Result<u64> {
        let end = Instant::now() + d;
        let mut outstanding: std::collections::VecDeque<(u64, Instant)> = Default::default();
        let mut replies = 0;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            while now < end && outstanding.len() < window {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.send(seq)?;
                outstanding.push_back((seq, now));
            }
            if outstanding.is_empty() {
                break;
            }
            match self.receive(last_progress + RESEND_AFTER)? {
                Some(r) => {
                    // Everything before it is lost (or answered already).
                    while let Some(&(seq, sent)) = outstanding.front() {
                        if seq > r.seq {
                            break;
                        }
                        outstanding.pop_front();
                        if seq == r.seq {
                            let _ = lat.record((sent.elapsed().as_micros() as u64).max(1));
                            replies += 1;
                        } else {
                            self.resends += 1;
                        }
                    }
                    last_progress = Instant::now();
                }
                None => {
                    // Nothing for a second: give the outstanding requests up.
                    self.resends += outstanding.len() as u64;
                    outstanding.clear();
                    last_progress = Instant::now();
                }
            }
        }
        Ok(replies)
    }
}

/// The reply rows as a table.
pub fn table(rows: &[ReplyRow], r: &ReplyConfig) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nreply latency: one client (request: one at a time; stream: {} outstanding), counter \
         guest with a dirtier on its second vCPU ({} pages at {} pages/s), longest epoch {} ms",
        r.window,
        r.dirtier.pages,
        if r.dirtier.rate == 0 {
            "full speed".to_string()
        } else {
            r.dirtier.rate.to_string()
        },
        r.epoch_ms
    );
    let _ = writeln!(
        out,
        "{:>3} {:>7} {:>11} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8}",
        "tr",
        "load",
        "trigger",
        "gap",
        "share",
        "reply/s",
        "p50",
        "p99",
        "p99.9",
        "+p50",
        "+p99",
        "ckpt/s",
        "by out",
        "pause50",
        "slowdown"
    );
    let us = |v: u64| format!("{v}us");
    for row in rows {
        let l = &row.latency_us;
        let _ = writeln!(
            out,
            "{:>3} {:>7} {:>11} {:>6} {:>5} {:>8.0} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8}",
            row.transport.to_string(),
            row.load.to_string(),
            row.trigger,
            row.min_gap_us.map_or("-".into(), |g| format!("{g}us")),
            row.max_pause_percent
                .map_or("-".into(), |p| format!("{p:.0}%")),
            row.replies_per_s,
            us(l.p50),
            us(l.p99),
            us(l.p999),
            row.added_us.map_or("-".into(), |a| format!("{}us", a[0])),
            row.added_us.map_or("-".into(), |a| format!("{}us", a[1])),
            row.checkpoints_per_s
                .map_or("-".into(), |c| format!("{c:.0}")),
            row.output_share
                .map_or("-".into(), |s| format!("{:.0}%", s * 100.0)),
            row.pause_us.map_or("-".into(), |p| us(p.p50)),
            row.slowdown
                .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReplyRow {
        let p = Percentiles {
            count: 10,
            p50: 500,
            p90: 700,
            p99: 900,
            p999: 1000,
            max: 1100,
        };
        ReplyRow {
            transport: Transport::Tcp,
            load: Load::Request,
            trigger: "on",
            min_gap_us: Some(0),
            max_pause_percent: Some(100.0),
            epoch_ms: Some(20.0),
            replies: 10,
            replies_per_s: 1000.0,
            resends: 0,
            latency_us: p,
            added_us: Some([400, 600, 700]),
            checkpoints_per_s: Some(1000.0),
            output_share: Some(0.98),
            pause_us: Some(p),
            dirtier_pages_per_s: 10_000.0,
            slowdown: Some(0.01),
        }
    }

    #[test]
    fn json_reply_row_has_exactly_the_documented_keys() {
        let doc = include_str!("../../../docs/bench-json.md");
        let reply = &doc[doc.find("## Reply latency").expect("a reply section")..];
        let v = serde_json::to_value(sample()).unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(
                reply.contains(&format!("| `{k}` |")),
                "key {k} is not documented"
            );
        }
        let documented = reply.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(
            documented,
            v.as_object().unwrap().len(),
            "a documented key is gone"
        );
        assert_eq!(v["load"], "request");
        assert_eq!(v["transport"], "tcp");
    }

    #[test]
    fn table_renders_every_row() {
        let mut base = sample();
        base.trigger = "unprotected";
        base.added_us = None;
        base.slowdown = None;
        let r = ReplyConfig {
            loads: vec![Load::Request],
            triggers: vec![],
            epoch_ms: 20.0,
            seconds: 1.0,
            window: 16,
            dirtier: DirtierConfig::default(),
        };
        let t = table(&[base, sample()], &r);
        assert_eq!(
            t.lines().filter(|l| l.contains("request")).count(),
            3,
            "{t}"
        );
        assert!(t.contains("+400us") || t.contains("400us"), "{t}");
        assert!(t.contains("1.0%"), "{t}");
    }
}
