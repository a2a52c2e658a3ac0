//! `rmc bench`: checkpoint figures measured on this machine, in one run.
//!
//! For each requested number of dirty pages per epoch, it starts a standby (in this process,
//! TCP loopback) and a VM whose dirtier rewrites a working set of exactly that many pages as
//! fast as it can; the primary ends each epoch once that many pages are dirty. After the
//! protected run it measures, on the same VM, the two costs a pause cannot avoid: harvesting
//! that many dirty pages and copying that many scattered pages (memcpy), so every pause figure
//! stands next to its floor. Goal (DESIGN): pause <= 2 x (harvest + memcpy) + 100 us.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rmc_mc::primary::{Primary, PrimaryConfig};
use rmc_mc::standby::{Standby, StandbyConfig};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::{DirtierConfig, Vm, VmConfig, Workload};

/// One row of results.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Dirty pages per epoch asked for.
    pub dirty_pages: u64,
    /// Mean dirty pages per checkpoint measured.
    pub pages_per_epoch: f64,
    /// Checkpoints acknowledged.
    pub checkpoints: u64,
    /// Checkpoints per second over the protected run.
    pub checkpoints_per_s: f64,
    /// Pages per second the guest's dirtier wrote during the protected run.
    pub guest_pages_per_s: f64,
    /// The same dirtier without protection, measured just before (pages per second).
    pub unprotected_pages_per_s: f64,
    /// Pause percentiles, microseconds.
    pub pause_p50_us: u64,
    /// 99th percentile pause.
    pub pause_p99_us: u64,
    /// First checkpoint's pause (after the live full sync).
    pub first_pause_us: u64,
    /// Harvest of this many dirty pages (median), microseconds.
    pub harvest_us: f64,
    /// memcpy of this many scattered pages (median), microseconds.
    pub memcpy_us: f64,
    /// Saving vCPU + device state (median), microseconds.
    pub save_state_us: f64,
    /// Who dirtied the pages.
    pub source: DirtySource,
    /// The goal: 2 x (harvest + memcpy) + 100 us.
    pub goal_us: f64,
    /// Ack latency p50 (handed to the sender until acked), microseconds.
    pub ack_p50_us: u64,
    /// Full sync: pages sent while the guest ran.
    pub sync_pages: u64,
    /// Primary memory beyond the guest's (staging), as a multiple of guest memory.
    pub primary_extra: f64,
    /// Standby memory (backup + staging) as a multiple of guest memory.
    pub standby_total: f64,
}

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

/// Settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Who dirties the pages.
    pub source: DirtySource,
    /// Guest memory.
    pub mem_size: u64,
    /// Dirty pages per epoch, one row each.
    pub dirty_pages: Vec<u64>,
    /// Protected run length per row.
    pub seconds: f64,
}

const SECRET: &[u8] = b"rmc bench in-process secret";

/// Runs every row.
pub fn run(c: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    c.dirty_pages
        .iter()
        .map(|&n| {
            progress(&format!(
                "{} dirty pages per epoch: full sync, then {:.0} s of checkpoints",
                n, c.seconds
            ));
            row(c, n)
        })
        .collect()
}

fn row(c: &BenchConfig, n: u64) -> Result<Row> {
    let mut sb = Standby::bind(
        "127.0.0.1:0".parse().expect("valid"),
        StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: Some(c.mem_size),
            heartbeat: Default::default(),
        },
    )
    .context("Cannot start the in-process standby")?;
    let addr = sb.local_addr();
    let standby = std::thread::spawn(move || {
        let s = sb.serve_one();
        (sb, s)
    });
    let workload = match c.source {
        DirtySource::Guest => Workload::Dirtier(DirtierConfig {
            pages: n,
            rate: 0,
            limit: 0,
        }),
        // The dirtier still runs (its working set is where the host writes), but slowly.
        DirtySource::Host => Workload::Dirtier(DirtierConfig {
            pages: n,
            rate: 1,
            limit: 0,
        }),
    };
    let cfg = VmConfig {
        mem_size: c.mem_size,
        workloads: vec![workload],
        nic_addr: None,
    };
    let vm = Vm::new(&cfg)?;
    vm.resume();
    // The guest's speed unprotected, as the baseline for its speed under protection.
    std::thread::sleep(Duration::from_millis(200));
    let (p0, t0) = (vm.dirtier_progress(0), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let unprotected_pages_per_s = (vm.dirtier_progress(0) - p0) as f64 / t0.elapsed().as_secs_f64();
    let mut pc = PrimaryConfig::new(addr, SECRET.to_vec(), c.mem_size / 4096);
    pc.slot_pages = pc.slot_pages.max(2 * n as usize + 64);
    pc.max_dirty_pages = n as usize;
    // Epochs end on the dirty-page count; the interval only caps a slow guest.
    pc.epoch_interval = Duration::from_secs(1);
    pc.summary_every = Duration::from_secs(3600);
    pc.protect_for = Some(Duration::from_secs_f64(c.seconds));
    let primary = Primary::connect(&vm, pc.clone()).context("Cannot connect to the standby")?;
    let primary_extra = (pc.slots
        * rmc_staging::SlotLayout {
            slot_pages: pc.slot_pages,
            max_state: rmc_transport::wire::MAX_STATE_LEN as usize,
        }
        .slot_size()) as f64
        / c.mem_size as f64;
    let stop = AtomicBool::new(false);
    let p_start = vm.dirtier_progress(0);
    let host_done = AtomicBool::new(false);
    let (ws_base, _) = vm.dirtier_working_set(0);
    let stats = std::thread::scope(|s| {
        if c.source == DirtySource::Host {
            let (mem, done) = (vm.memory(), &host_done);
            s.spawn(move || {
                let mut v = 0u64;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    for p in 0..n {
                        v += 1;
                        let _ = mem.write_obj(v, GuestAddress(ws_base + p * 4096));
                    }
                }
            });
        }
        let r = primary.run(&stop);
        host_done.store(true, std::sync::atomic::Ordering::Release);
        r
    })?;
    let guest_pages_per_s = (vm.dirtier_progress(0) - p_start) as f64
        / (stats.sync_time + stats.protected_time).as_secs_f64();
    let (sb, session) = standby.join().expect("standby thread");
    session?.result?;
    let standby_total = (c.mem_size as f64 + sb.staging_bytes() as f64) / c.mem_size as f64;

    // Floors, on the same VM: harvest of n dirty pages, memcpy of n scattered pages.
    vm.resume();
    let (ws, _) = vm.dirtier_working_set(0);
    let mut harvest = Vec::new();
    for _ in 0..11 {
        match c.source {
            DirtySource::Guest => {
                let p = vm.dirtier_progress(0);
                while vm.dirtier_progress(0) < p + n + 1 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            DirtySource::Host => {
                for p in 0..n {
                    vm.memory()
                        .write_obj(1u64, GuestAddress(ws_base + p * 4096))?;
                }
            }
        }
        vm.pause();
        let t = Instant::now();
        let set = vm.harvest_dirty()?;
        harvest.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(
            set.len() as u64 >= n,
            "harvest found {} of {n} pages",
            set.len()
        );
        vm.resume();
    }
    vm.pause();
    let mut save = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        std::hint::black_box(vm.save_state()?.encode());
        save.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut src = vec![0u8; (n * 4096) as usize];
    vm.memory()
        .read_slice(&mut src, GuestAddress(ws))
        .context("reading the working set")?;
    let mut dst = vec![0u8; (n * 4096) as usize];
    // Scattered: pages in a shuffled order, like a dirty set spread over memory.
    let order: Vec<usize> = (0..n as usize).map(|i| (i * 7919) % n as usize).collect();
    let mut memcpy = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        for (k, &i) in order.iter().enumerate() {
            dst[k * 4096..(k + 1) * 4096].copy_from_slice(&src[i * 4096..(i + 1) * 4096]);
        }
        std::hint::black_box(&dst);
        memcpy.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (harvest_us, memcpy_us) = (median(&mut harvest), median(&mut memcpy));
    Ok(Row {
        dirty_pages: n,
        pages_per_epoch: stats.pages.mean(),
        checkpoints: stats.checkpoints_acked,
        checkpoints_per_s: stats.checkpoints_acked as f64 / stats.protected_time.as_secs_f64(),
        guest_pages_per_s,
        unprotected_pages_per_s,
        pause_p50_us: stats.pause_us.value_at_quantile(0.5),
        pause_p99_us: stats.pause_us.value_at_quantile(0.99),
        first_pause_us: stats.first_pause.map_or(0, |d| d.as_micros() as u64),
        harvest_us,
        memcpy_us,
        save_state_us: median(&mut save),
        source: c.source,
        goal_us: 2.0 * (harvest_us + memcpy_us) + 100.0,
        ack_p50_us: stats.ack_us.value_at_quantile(0.5),
        sync_pages: stats.sync_pages,
        primary_extra,
        standby_total,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The human table.
pub fn table(rows: &[Row], mem_size: u64) -> String {
    let mut s = format!(
        "guest {} MiB, TCP loopback, {} rewriting exactly N pages per epoch (state save {:.0} us)\n\
         {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>8} {:>8} {:>9}\n",
        mem_size >> 20,
        match rows.first().map(|r| r.source) {
            Some(DirtySource::Host) => "a host thread (device-like writes)",
            _ => "the guest's dirtier",
        },
        rows.first().map_or(0.0, |r| r.save_state_us),
        "N", "pages/ep", "ckpt/s", "pause50", "pause99", "harvest", "memcpy", "goal", "1stpause", "ok", "ack50", "prim+", "stby", "guest"
    );
    for r in rows {
        s += &format!(
            "{:>7} {:>8.0} {:>8.0} {:>7}us {:>7}us {:>7.0}us {:>7.0}us {:>7.0}us {:>7}us {:>6} {:>7}us {:>7.2}x {:>7.2}x {:>9}\n",
            r.dirty_pages,
            r.pages_per_epoch,
            r.checkpoints_per_s,
            r.pause_p50_us,
            r.pause_p99_us,
            r.harvest_us,
            r.memcpy_us,
            r.goal_us,
            r.first_pause_us,
            if (r.pause_p50_us as f64) <= r.goal_us { "yes" } else { "NO" },
            r.ack_p50_us,
            r.primary_extra,
            r.standby_total,
            match r.source {
                DirtySource::Guest => format!("{:.0}%", 100.0 * r.guest_pages_per_s / r.unprotected_pages_per_s),
                DirtySource::Host => "n/a".to_string(),
            }
        );
    }
    s
}
