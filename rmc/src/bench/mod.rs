//! `rmc bench`: checkpoint latency and throughput measured on this machine, in one run.
//!
//! For every configuration of the sweep (transport x vCPUs x epoch length x dirty pages per
//! epoch) it starts a standby in this process (TCP loopback) and a VM whose dirtier vCPUs
//! rewrite a working set of exactly N pages, protects it for `--seconds`, and reports per
//! phase of an epoch (vCPU stop, harvest, state save, staging copy, the whole pause, transmit,
//! commit-to-ack, end to end) the percentiles p50/p90/p99/p99.9/max; epochs/s, pages/s,
//! bytes/s; the guest's slowdown against the same guest unprotected, measured just before in
//! the same invocation; and a raw-transport baseline between the same endpoints (a plain TCP
//! stream of epoch-sized writes), so efficiency is a ratio of what the link can do. After the
//! protected run it also measures the floors of a pause on the same VM: harvest of N dirty
//! pages, memcpy of N scattered pages, state save. The JSON schema is in docs/bench-json.md.

pub mod reply;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use rmc_mc::primary::{Primary, PrimaryConfig};
use rmc_mc::standby::{Standby, StandbyConfig};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use rmc_guest_api::PAGE_SIZE;
use rmc_transport::link::Transport;
use rmc_vmm::{DirtierConfig, Vm, VmConfig, Workload};

/// `PAGE_SIZE` as a `usize`, for buffer offsets.
const PAGE: usize = PAGE_SIZE as usize;

/// Version of the JSON document; bumped on any incompatible change.
pub const SCHEMA: u32 = 2;

/// Who dirties the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtySource {
    /// The guest's dirtier (real guest writes, at the guest's speed).
    Guest,
    /// A host thread writing guest memory through vm-memory, like a device doing DMA, as fast
    /// as it can: measures the checkpoint pipeline when the guest is not the bottleneck. It
    /// keeps writing during pauses, so its checkpoints are not consistent images: a speed test
    /// only.
    Host,
}

/// Settings of a sweep.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Guest memory.
    pub mem_size: u64,
    /// Dirty pages per epoch.
    pub dirty_pages: Vec<u64>,
    /// Epoch lengths in ms; 0 = each epoch ends as soon as N pages are dirty.
    pub epoch_ms: Vec<f64>,
    /// Transports: `Tcp` (loopback) and/or `Rdma` (to the first usable RDMA port's address);
    /// `Auto` is refused (a measurement names what it measured).
    pub transports: Vec<Transport>,
    /// Guest vCPUs (each one a dirtier with N / vcpus pages).
    pub vcpus: Vec<u32>,
    /// Protected run per configuration, seconds (after the full sync).
    pub seconds: f64,
    /// Who dirties the pages.
    pub source: DirtySource,
    /// A running `rmc standby` to use (address, shared secret) instead of one in this process.
    pub standby: Option<(std::net::SocketAddr, Vec<u8>)>,
    /// Heartbeats of the primary and the in-process standby.
    pub heartbeat: rmc_mc::protocol::Heartbeat,
}

/// Percentiles of one phase, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

/// Percentiles of a histogram.
pub fn summarize(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// Names of the phases, in epoch order.
pub const PHASES: [&str; 8] = [
    "stop",
    "harvest",
    "state_save",
    "stage",
    "pause",
    "transmit",
    "commit_to_ack",
    "end_to_end",
];

/// One configuration's results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Transport (`"tcp"` or `"rdma"`).
    #[serde(with = "crate::events::transport_serde")]
    pub transport: Transport,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Epoch length asked for, ms (0: ends on the dirty-page count).
    pub epoch_ms: f64,
    /// Dirty pages per epoch asked for.
    pub dirty_pages: u64,
    /// Who dirtied the pages.
    pub source: DirtySource,
    /// Checkpoints acknowledged.
    pub checkpoints: u64,
    /// Checkpoints per second over the protected run.
    pub checkpoints_per_s: f64,
    /// Mean dirty pages per checkpoint measured.
    pub pages_per_epoch: f64,
    /// Pages checkpointed per second.
    pub pages_per_s: f64,
    /// Checkpoint bytes on the wire per second.
    pub bytes_per_s: f64,
    /// Per-phase percentiles (keys: [`PHASES`]), microseconds.
    pub phases: BTreeMap<String, Percentiles>,
    /// First checkpoint's pause (after the live full sync), microseconds.
    pub first_pause_us: u64,
    /// Pages sent by the full sync.
    pub sync_pages: u64,
    /// Full sync duration, ms.
    pub sync_ms: f64,
    /// Floor: harvest of N dirty pages (median), microseconds.
    pub harvest_floor_us: f64,
    /// Floor: memcpy of N scattered pages (median), microseconds.
    pub memcpy_floor_us: f64,
    /// Floor: vCPU + device state save (median), microseconds.
    pub state_save_floor_us: f64,
    /// DESIGN's pause goal: 2 x (harvest + memcpy) + 100 us.
    pub pause_goal_us: f64,
    /// Guest page writes per second while protected.
    pub guest_pages_per_s: f64,
    /// The same guest unprotected, just before (pages per second).
    pub unprotected_pages_per_s: f64,
    /// 1 - protected / unprotected guest speed (0 = no slowdown); null for a host source.
    pub slowdown: Option<f64>,
    /// Raw transport: a plain stream of epoch-sized writes between the same endpoints, bytes/s.
    pub raw_bytes_per_s: f64,
    /// Checkpoint bytes / transmit time (median epoch), bytes/s.
    pub transmit_bytes_per_s: f64,
    /// transmit_bytes_per_s / raw_bytes_per_s.
    pub link_efficiency: f64,
    /// Primary memory beyond the guest's (staging), as a multiple of guest memory.
    pub primary_extra: f64,
    /// Standby memory (backup + staging) as a multiple of guest memory; null for an external
    /// standby.
    pub standby_total: Option<f64>,
}

const SECRET: &[u8] = b"rmc bench in-process secret";

/// Refuses a transport that cannot be measured, before anything boots.
pub fn check_transports(c: &BenchConfig) -> Result<()> {
    anyhow::ensure!(
        !c.transports.contains(&Transport::Auto),
        "rmc bench measures tcp or rdma, not auto"
    );
    if c.standby.is_none() {
        for &t in &c.transports {
            local_addr(t)?;
        }
    }
    Ok(())
}

/// Runs every configuration; `progress` gets a line per configuration (for stderr).
pub fn run(c: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let total = c.transports.len() * c.vcpus.len() * c.epoch_ms.len() * c.dirty_pages.len();
    check_transports(c)?;
    for &t in &c.transports {
        for &v in &c.vcpus {
            for &e in &c.epoch_ms {
                for &n in &c.dirty_pages {
                    progress(&format!(
                        "[{}/{total}] {t}, {v} vCPU(s), epoch {}, {n} dirty pages: full sync, then {:.1} s protected",
                        rows.len() + 1,
                        if e > 0.0 { format!("{e} ms") } else { "on count".into() },
                        c.seconds
                    ));
                    rows.push(row(c, t, v, e, n).with_context(|| {
                        format!("{t}, {v} vCPU(s), epoch {e} ms, {n} dirty pages")
                    })?);
                }
            }
        }
    }
    Ok(rows)
}

fn row(c: &BenchConfig, transport: Transport, vcpus: u32, epoch_ms: f64, n: u64) -> Result<Row> {
    let vcpus = vcpus.clamp(1, rmc_vmm::vm::MAX_VCPUS as u32);
    let per_vcpu = n.div_ceil(u64::from(vcpus)).max(1);
    // Rate: as fast as possible when epochs end on the count; N pages per epoch otherwise.
    let rate = match (c.source, epoch_ms > 0.0) {
        (DirtySource::Host, _) => 1,
        (DirtySource::Guest, false) => 0,
        (DirtySource::Guest, true) => ((per_vcpu as f64) * 1000.0 / epoch_ms).ceil() as u64,
    };
    let cfg = VmConfig {
        mem_size: c.mem_size,
        workloads: vec![
            Workload::Dirtier(DirtierConfig {
                pages: per_vcpu,
                rate,
                limit: 0
            });
            vcpus as usize
        ],
        nic_addr: None,
        ..Default::default()
    };
    let vm = Vm::new(&cfg)?;
    vm.resume();
    let progress = |vm: &Vm| {
        (0..vcpus as usize)
            .map(|i| vm.dirtier_progress(i))
            .sum::<u64>()
    };
    std::thread::sleep(Duration::from_millis(200));
    let (p0, t0) = (progress(&vm), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let unprotected_pages_per_s = (progress(&vm) - p0) as f64 / t0.elapsed().as_secs_f64();

    let (addr, secret, standby) = standby_for(c, transport)?;
    let mut pc = PrimaryConfig::new(addr, secret, c.mem_size / PAGE_SIZE);
    pc.transport = transport;
    pc.heartbeat = c.heartbeat;
    pc.slot_pages = pc.slot_pages.max(2 * n as usize + 64);
    pc.max_dirty_pages = n as usize;
    pc.epoch_interval = if epoch_ms > 0.0 {
        Duration::from_secs_f64(epoch_ms / 1000.0)
    } else {
        Duration::from_secs(1)
    };
    pc.summary_every = Duration::from_secs(3600);
    pc.protect_for = Some(Duration::from_secs_f64(c.seconds));
    let primary = Primary::connect(&vm, pc.clone()).context("Cannot connect to the standby")?;
    let slot_size = rmc_staging::SlotLayout {
        slot_pages: pc.slot_pages,
        max_state: rmc_transport::wire::MAX_STATE_LEN as usize,
    }
    .slot_size();
    let primary_extra = (pc.slots * slot_size) as f64 / c.mem_size as f64;
    let stop = AtomicBool::new(false);
    let p_start = progress(&vm);
    let host_done = AtomicBool::new(false);
    let ws: Vec<u64> = (0..vcpus as usize)
        .map(|i| vm.dirtier_working_set(i).0)
        .collect();
    let stats = std::thread::scope(|s| {
        if c.source == DirtySource::Host {
            let (mem, done, ws) = (vm.memory(), &host_done, &ws);
            s.spawn(move || {
                let mut v = 0u64;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    for p in 0..n {
                        v += 1;
                        let _ = mem.write_obj(v, GuestAddress(host_page(ws, p)));
                    }
                }
            });
        }
        let r = primary.run(&stop);
        host_done.store(true, std::sync::atomic::Ordering::Release);
        r
    })?;
    let run_s = (stats.sync_time + stats.protected_time).as_secs_f64();
    let guest_pages_per_s = (progress(&vm) - p_start) as f64 / run_s;
    let standby_total = match standby {
        Some(h) => {
            let (sb, session) = h.join().expect("standby thread");
            session?.result?;
            Some((c.mem_size as f64 + sb.staging_bytes() as f64) / c.mem_size as f64)
        }
        None => None,
    };

    // Floors, on the same VM (the primary left it paused after its last checkpoint).
    // It leaves the VM paused.
    let mut harvest = harvest_floor(&vm, c.source, &ws, per_vcpu, n)?;
    let mut save = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        std::hint::black_box(vm.save_state()?.encode());
        save.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let memcpy = memcpy_floor(&vm, &ws, n, vcpus)?;
    let (harvest_floor_us, state_save_floor_us) = (median(&mut harvest), median(&mut save));

    let epoch_bytes = if stats.checkpoints_acked > 0 {
        stats.checkpoint_bytes as f64 / stats.checkpoints_acked as f64
    } else {
        0.0
    };
    // Between the same endpoints: this host to the standby's host (loopback when in-process;
    // the raw stream then goes to a sink on this host, the best the local stack can do).
    let chunk = epoch_bytes.max(PAGE_SIZE as f64) as usize;
    let raw_bytes_per_s = match transport {
        Transport::Rdma => raw_rdma(chunk, Duration::from_millis(500))?,
        // (`run` refuses `Auto`.)
        Transport::Tcp | Transport::Auto => raw_tcp(chunk, Duration::from_millis(500))?,
    };
    let phases: BTreeMap<String, Percentiles> = [
        ("stop", &stats.stop_us),
        ("harvest", &stats.harvest_us),
        ("state_save", &stats.state_us),
        ("stage", &stats.stage_us),
        ("pause", &stats.pause_us),
        ("transmit", &stats.transmit_us),
        ("commit_to_ack", &stats.commit_ack_us),
        ("end_to_end", &stats.e2e_us),
    ]
    .into_iter()
    .map(|(k, h)| (k.to_string(), summarize(h)))
    .collect();
    let transmit_p50 = phases["transmit"].p50.max(1) as f64 / 1e6;
    let transmit_bytes_per_s = epoch_bytes / transmit_p50;
    let protected_s = stats.protected_time.as_secs_f64().max(1e-9);
    Ok(Row {
        transport,
        vcpus,
        epoch_ms,
        dirty_pages: n,
        source: c.source,
        checkpoints: stats.checkpoints_acked,
        checkpoints_per_s: stats.checkpoints_acked as f64 / protected_s,
        pages_per_epoch: stats.pages.mean(),
        pages_per_s: stats.pages.mean() * stats.checkpoints_acked as f64 / protected_s,
        bytes_per_s: stats.checkpoint_bytes as f64 / protected_s,
        phases,
        first_pause_us: stats.first_pause.map_or(0, |d| d.as_micros() as u64),
        sync_pages: stats.sync_pages,
        sync_ms: stats.sync_time.as_secs_f64() * 1000.0,
        harvest_floor_us,
        memcpy_floor_us: memcpy,
        state_save_floor_us,
        pause_goal_us: 2.0 * (harvest_floor_us + memcpy) + 100.0,
        guest_pages_per_s,
        unprotected_pages_per_s,
        slowdown: (c.source == DirtySource::Guest && unprotected_pages_per_s > 0.0)
            .then(|| 1.0 - guest_pages_per_s / unprotected_pages_per_s),
        raw_bytes_per_s,
        transmit_bytes_per_s,
        link_efficiency: transmit_bytes_per_s / raw_bytes_per_s,
        primary_extra,
        standby_total,
    })
}

/// A standby thread serving one session.
type StandbyThread = std::thread::JoinHandle<(
    Standby,
    Result<rmc_mc::standby::Session, rmc_mc::standby::StandbyError>,
)>;

/// Where the primary of one measurement connects: `--standby`, or a standby in this process
/// serving one session on a thread (returned, to join).
fn standby_for(
    c: &BenchConfig,
    transport: Transport,
) -> Result<(std::net::SocketAddr, Vec<u8>, Option<StandbyThread>)> {
    Ok(match &c.standby {
        Some((addr, secret)) => (*addr, secret.clone(), None),
        None => {
            let (mut sb, _) = Standby::bind_with(
                local_addr(transport)?,
                transport,
                StandbyConfig {
                    secret: SECRET.to_vec(),
                    memory_bytes: Some(c.mem_size),
                    heartbeat: c.heartbeat,
                    restore: Some(std::sync::Arc::new(
                        crate::restore::VmRestoreCheck::default(),
                    )),
                    ..Default::default()
                },
            )
            .context("Cannot start the in-process standby")?;
            let addr = sb.local_addr();
            let h = std::thread::spawn(move || {
                let s = sb.serve_one();
                (sb, s)
            });
            (addr, SECRET.to_vec(), Some(h))
        }
    })
}

/// How long the harvest floor waits for the dirtiers to rewrite their working sets before it
/// gives up: a hang guard for a loaded machine, not a speed requirement.
const FLOOR_WAIT: Duration = Duration::from_secs(120);

/// The pages a host source writes for an epoch of `n` pages: page `p` goes to working set
/// `p % vcpus`, at page `p / vcpus` of it (`n` distinct pages).
fn host_page(ws: &[u64], p: u64) -> u64 {
    let v = ws.len() as u64;
    ws[(p % v) as usize] + (p / v) * PAGE_SIZE
}

/// Harvest of N dirty pages on the paused `vm` (11 samples, microseconds). Each sample is
/// taken only once every page of the epoch was really written, and checks that the harvest
/// found each of them:
///
/// - guest source: every dirtier vCPU has rewritten its whole working set (`per_vcpu` pages,
///   `vcpus x per_vcpu >= n` in all). Progress is counted per vCPU, not summed: with more busy
///   vCPUs than host cores one vCPU can wrap its working set several times while another is
///   not scheduled at all, so a summed count says nothing about distinct pages. A vCPU counts
///   as done after `per_vcpu + 1` progress steps from its paused value: the pause may fall
///   between a page store and the progress store that counts it (that write then belongs to
///   the previous harvest), so `per_vcpu + 1` steps guarantee `per_vcpu` consecutive writes,
///   i.e. every page of its set, inside this epoch.
/// - host source: the N pages written by this thread (vm-memory's bitmap).
fn harvest_floor(
    vm: &Vm,
    source: DirtySource,
    ws: &[u64],
    per_vcpu: u64,
    n: u64,
) -> Result<Vec<f64>> {
    let vcpus = ws.len();
    let written: Vec<u64> = match source {
        DirtySource::Guest => ws
            .iter()
            .flat_map(|&base| (0..per_vcpu).map(move |p| base + p * PAGE_SIZE))
            .collect(),
        DirtySource::Host => (0..n).map(|p| host_page(ws, p)).collect(),
    };
    if !vm.is_paused() {
        vm.pause()?;
    }
    // Start from a clean log: each sample covers exactly the epoch that follows.
    vm.harvest_dirty()?;
    let mut samples = Vec::new();
    for _ in 0..11 {
        match source {
            DirtySource::Guest => {
                // Read while paused: exact but for the one write a pause may split (above).
                let start: Vec<u64> = (0..vcpus).map(|i| vm.dirtier_progress(i)).collect();
                vm.resume();
                let deadline = Instant::now() + FLOOR_WAIT;
                let behind =
                    || (0..vcpus).find(|&i| vm.dirtier_progress(i) < start[i] + per_vcpu + 1);
                while let Some(i) = behind() {
                    let stopped = vm.stopped_vcpus();
                    anyhow::ensure!(stopped.is_empty(), "vCPUs stopped: {stopped:?}");
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "the dirtier of vCPU {i} made {} of {} page writes in {FLOOR_WAIT:?} \
                         (a hang guard, not a speed requirement)",
                        vm.dirtier_progress(i) - start[i],
                        per_vcpu + 1
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            DirtySource::Host => {
                vm.resume();
                for &page in &written {
                    vm.memory().write_obj(1u64, GuestAddress(page))?;
                }
            }
        }
        vm.pause()?;
        let t = Instant::now();
        let set = vm.harvest_dirty()?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        let missed: Vec<u64> = written
            .iter()
            .copied()
            .filter(|&a| !set.contains(a))
            .collect();
        anyhow::ensure!(
            missed.is_empty(),
            "the harvest missed {} of the {} pages written since the previous one (first: {:#x}): \
             dirty tracking lost writes",
            missed.len(),
            written.len(),
            missed[0]
        );
    }
    Ok(samples)
}

/// memcpy of N scattered pages of the working sets into a packed buffer (median of 11).
fn memcpy_floor(vm: &Vm, ws: &[u64], n: u64, vcpus: u32) -> Result<f64> {
    let per = n.div_ceil(u64::from(vcpus));
    let mut src = vec![0u8; (per * u64::from(vcpus) * PAGE_SIZE) as usize];
    for (i, &base) in ws.iter().enumerate() {
        let off = i * (per * PAGE_SIZE) as usize;
        vm.memory()
            .read_slice(
                &mut src[off..off + (per * PAGE_SIZE) as usize],
                GuestAddress(base),
            )
            .context("reading the working set")?;
    }
    let mut dst = vec![0u8; (n * PAGE_SIZE) as usize];
    let pages = (src.len() / PAGE).max(1);
    let order: Vec<usize> = (0..n as usize).map(|i| (i * 7919) % pages).collect();
    let mut t = Vec::new();
    for _ in 0..11 {
        let start = Instant::now();
        for (k, &i) in order.iter().enumerate() {
            dst[k * PAGE..(k + 1) * PAGE].copy_from_slice(&src[i * PAGE..(i + 1) * PAGE]);
        }
        std::hint::black_box(&dst);
        t.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(&mut t))
}

/// Where the in-process standby listens: loopback for TCP, the first usable RDMA port's
/// address for RDMA.
fn local_addr(t: Transport) -> Result<std::net::SocketAddr> {
    Ok(match t {
        Transport::Auto => anyhow::bail!("rmc bench measures tcp or rdma, not auto"),
        Transport::Tcp => "127.0.0.1:0".parse().expect("valid"),
        Transport::Rdma => std::net::SocketAddr::new(
            rmc_transport::link::first_rdma_ip().context(
                "--transport rdma: no usable RDMA port with an IP address (see `rmc devices`)",
            )?,
            0,
        ),
    })
}

/// Bytes per second of plain RDMA WRITEs of `chunk` bytes (rounded up to pages), back to back
/// into a registered region of a peer in this process over the first usable RDMA port, for
/// `d`: the RDMA counterpart of [`raw_tcp`] (what the link does without the protocol).
pub fn raw_rdma(chunk: usize, d: Duration) -> Result<f64> {
    use rmc_transport::rdma;
    let layout = rmc_staging::SlotLayout {
        slot_pages: chunk.div_ceil(PAGE).max(1),
        max_state: 0,
    };
    let listener = rdma::Listener::bind(local_addr(Transport::Rdma)?)?;
    let addr = listener.local_addr();
    let (key_tx, key_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let sink = std::thread::spawn(move || -> Result<()> {
        let conn = listener.accept()?;
        let (_rx, mut tx, _closer) = conn.split(Duration::from_secs(1), Duration::from_secs(10));
        let ring = rmc_staging::SlotRing::new(layout, 2)?;
        key_tx.send(tx.expose(&ring)?).ok();
        let _ = done_rx.recv();
        Ok(())
    });
    let conn = rdma::Connection::connect(addr, Duration::from_secs(10))?;
    let (_rx, mut tx, _closer) = conn.split(Duration::from_secs(1), Duration::from_secs(10));
    let key = key_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the RDMA sink did not register its region")?;
    let ring = rmc_staging::SlotRing::new(layout, 2)?;
    tx.enable_placement(&ring, key)?;
    let mut slot = ring.try_acquire().context("a free slot")?;
    slot.receive_areas(layout.slot_pages, 0)?;
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < d {
        sent += tx.place(&slot, false)?;
    }
    tx.drain()?;
    let secs = start.elapsed().as_secs_f64();
    drop(done_tx);
    sink.join().expect("sink thread")?;
    Ok(sent as f64 / secs)
}

/// Bytes per second of a plain TCP stream of `chunk`-byte writes over loopback for `d`.
pub fn raw_tcp(chunk: usize, d: Duration) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(total),
                k => total += k as u64,
            }
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; chunk];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < d {
        s.write_all(&buf)?;
        sent += chunk as u64;
    }
    drop(s);
    let received = sink.join().expect("sink thread")?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        received == sent,
        "raw TCP sink got {received} of {sent} bytes"
    );
    Ok(received as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The human tables: one line per configuration, then the phases.
pub fn table(rows: &[Row], mem_size: u64) -> String {
    let mut s = format!(
        "guest {} MiB, standby {}, dirtied by {}\n\
         {:>4} {:>4} {:>6} {:>6} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>5} {:>9} {:>9}\n",
        mem_size >> 20,
        if rows.first().is_some_and(|r| r.standby_total.is_none()) {
            "external (--standby)"
        } else {
            "in-process over loopback"
        },
        match rows.first().map(|r| r.source) {
            Some(DirtySource::Host) => "a host thread (device-like writes; speed test only)",
            _ => "the guest's dirtier vCPUs",
        },
        "tr",
        "vcpu",
        "epoch",
        "N",
        "pages/ep",
        "ckpt/s",
        "pause50",
        "pause99",
        "e2e50",
        "e2e99",
        "goal",
        "ok",
        "slowdown",
        "link-eff"
    );
    for r in rows {
        let p = &r.phases;
        s += &format!(
            "{:>4} {:>4} {:>6} {:>6} {:>8.0} {:>7.0} {:>7}us {:>7}us {:>7}us {:>7}us {:>6.0}us {:>5} {:>9} {:>8.0}%\n",
            r.transport.to_string(),
            r.vcpus,
            if r.epoch_ms > 0.0 { format!("{}ms", r.epoch_ms) } else { "count".into() },
            r.dirty_pages,
            r.pages_per_epoch,
            r.checkpoints_per_s,
            p["pause"].p50,
            p["pause"].p99,
            p["end_to_end"].p50,
            p["end_to_end"].p99,
            r.pause_goal_us,
            if p["pause"].p50 as f64 <= r.pause_goal_us { "yes" } else { "NO" },
            r.slowdown.map_or("n/a".into(), |x| format!("{:.0}%", x * 100.0)),
            r.link_efficiency * 100.0
        );
    }
    s += "\nphases, p50 / p99 in microseconds:\n";
    s += &format!("{:>6} {:>6}", "epoch", "N");
    for ph in PHASES {
        s += &format!(" {:>15}", ph);
    }
    s += "\n";
    for r in rows {
        s += &format!(
            "{:>6} {:>6}",
            if r.epoch_ms > 0.0 {
                format!("{}ms", r.epoch_ms)
            } else {
                "count".into()
            },
            r.dirty_pages
        );
        for ph in PHASES {
            let x = r.phases[ph];
            s += &format!(" {:>15}", format!("{} / {}", x.p50, x.p99));
        }
        s += "\n";
    }
    s
}

/// Writes an SVG: pause and end-to-end latency percentiles against dirty pages per epoch, one
/// line per transport / vCPUs / epoch length.
pub fn svg(rows: &[Row], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_n = rows
        .iter()
        .map(|r| r.dirty_pages)
        .max()
        .unwrap_or(10)
        .max(10) as f64;
    let min_n = rows.iter().map(|r| r.dirty_pages).min().unwrap_or(1).max(1) as f64;
    let max_us = rows
        .iter()
        .map(|r| r.phases["end_to_end"].p99.max(r.phases["pause"].p99))
        .max()
        .unwrap_or(10)
        .max(10) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "rmc checkpoint latency vs dirty pages per epoch",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (min_n * 0.8..max_n * 1.25).log_scale(),
            (10.0..max_us * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("dirty pages per epoch")
        .y_desc("microseconds")
        .draw()?;
    let mut groups: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        groups
            .entry(format!(
                "{:?} {}vcpu {}",
                r.transport,
                r.vcpus,
                if r.epoch_ms > 0.0 {
                    format!("{}ms", r.epoch_ms)
                } else {
                    "count".into()
                }
            ))
            .or_default()
            .push(r);
    }
    let palette = [&RED, &BLUE, &GREEN, &MAGENTA, &CYAN, &BLACK];
    let mut color = 0;
    for (name, group) in groups {
        for (phase, q) in [
            ("pause", 0.5),
            ("pause", 0.99),
            ("end_to_end", 0.5),
            ("end_to_end", 0.99),
        ] {
            let c = palette[color % palette.len()];
            color += 1;
            let pts: Vec<(f64, f64)> = group
                .iter()
                .map(|r| {
                    let p = r.phases[phase];
                    (
                        r.dirty_pages as f64,
                        (if q < 0.9 { p.p50 } else { p.p99 }).max(1) as f64,
                    )
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c))?
                .label(format!("{name} {phase} p{}", if q < 0.9 { 50 } else { 99 }))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        assert_eq!(
            summarize(&h),
            Percentiles::default(),
            "an empty phase has no samples"
        );
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let p = summarize(&h);
        assert_eq!(p.count, 1000);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500, 900, 990, 999, 1000)
        );
        h.record(50_000).unwrap();
        let p = summarize(&h);
        assert_eq!(p.count, 1001);
        assert!((49_990..=50_100).contains(&p.max), "{}", p.max);
    }

    fn sample_row() -> Row {
        Row {
            transport: Transport::Tcp,
            vcpus: 1,
            epoch_ms: 20.0,
            dirty_pages: 300,
            source: DirtySource::Guest,
            checkpoints: 10,
            checkpoints_per_s: 50.0,
            pages_per_epoch: 300.0,
            pages_per_s: 15000.0,
            bytes_per_s: 6e7,
            phases: PHASES
                .iter()
                .map(|p| (p.to_string(), Percentiles::default()))
                .collect(),
            first_pause_us: 1,
            sync_pages: 1,
            sync_ms: 1.0,
            harvest_floor_us: 1.0,
            memcpy_floor_us: 1.0,
            state_save_floor_us: 1.0,
            pause_goal_us: 104.0,
            guest_pages_per_s: 1.0,
            unprotected_pages_per_s: 1.0,
            slowdown: Some(0.0),
            raw_bytes_per_s: 1.0,
            transmit_bytes_per_s: 1.0,
            link_efficiency: 1.0,
            primary_extra: 0.25,
            standby_total: Some(1.25),
        }
    }

    /// The JSON keys are the documented schema (docs/bench-json.md): a change here is a schema
    /// change and must bump SCHEMA and the document.
    #[test]
    fn json_row_has_exactly_the_documented_keys() {
        let doc = include_str!("../../../docs/bench-json.md");
        let v = serde_json::to_value(sample_row()).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        for k in &keys {
            assert!(doc.contains(&format!("`{k}`")), "key {k} is not documented");
        }
        let phases = v["phases"].as_object().unwrap();
        for p in PHASES {
            assert!(
                doc.contains(&format!("`{p}`")),
                "phase {p} is not documented"
            );
            for q in ["count", "p50", "p90", "p99", "p999", "max"] {
                assert!(phases[p][q].is_u64(), "{p}.{q}");
            }
        }
        assert!(doc.contains(&format!("\"schema\": {SCHEMA}")));
        assert_eq!(v["transport"], "tcp");
        assert_eq!(v["source"], "guest");
    }

    #[test]
    fn table_and_svg_render() {
        let mut a = sample_row();
        a.phases.insert(
            "pause".into(),
            Percentiles {
                count: 3,
                p50: 200,
                p90: 250,
                p99: 300,
                p999: 300,
                max: 300,
            },
        );
        let mut b = a.clone();
        b.dirty_pages = 3000;
        let t = table(&[a.clone(), b.clone()], 1 << 30);
        assert!(t.contains("guest 1024 MiB") && t.contains(" 3000 "), "{t}");
        let path = std::env::temp_dir().join(format!("rmc-bench-test-{}.svg", std::process::id()));
        svg(&[a, b], &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("dirty pages per epoch"));
        let _ = std::fs::remove_file(&path);
    }
}
