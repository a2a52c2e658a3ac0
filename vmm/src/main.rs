//! The `rmc` command.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rmc_vmm::service::{Checker, Client};
use rmc_vmm::{DirtierConfig, Vm, VmConfig, Workload};
use tracing::info;

/// rmc keeps a KVM virtual machine alive when its host dies, by shipping micro-checkpoints to
/// a standby many times a second. This build has the VM itself (`run`) and the counter
/// service's client (`client`); protection (primary/standby) comes next.
#[derive(Parser, Debug)]
#[command(name = "rmc", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info`, `debug`, `rmc_vmm=debug`.
    /// `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the VM without protection: rmc's own guest with the chosen workloads.
    Run(RunArgs),
    /// Send requests to the counter service and print the replies.
    Client(ClientArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum WorkloadArg {
    /// Request/response counter service on the NIC (at most one vCPU).
    Counter,
    /// Writes memory at --dirty-rate pages/s over --dirty-pages pages.
    Dirtier,
    /// Does nothing.
    Idle,
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Guest memory size: bytes, or with a K, M or G suffix (16M to 11G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs (1 to 4). vCPUs beyond the --workload list are idle.
    #[arg(long)]
    vcpus: Option<usize>,
    /// Workloads, one per vCPU in order, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "counter,dirtier")]
    workload: Vec<WorkloadArg>,
    /// UDP address the guest's NIC (and so the counter service) listens on.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Dirtier working set in pages (4 KiB each), per dirtier vCPU.
    #[arg(long, default_value_t = 1024)]
    dirty_pages: u64,
    /// Dirtier rate in pages per second (0 = as fast as the vCPU can).
    #[arg(long, default_value_t = 10_000)]
    dirty_rate: u64,
    /// Stop each dirtier after this many page writes (0 = never).
    #[arg(long, default_value_t = 0)]
    dirty_limit: u64,
    /// Stop the VM after this many seconds (default: run until killed).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds between status lines (counter, requests, dirtier speed).
    #[arg(long, default_value_t = 1.0)]
    status_interval: f64,
}

#[derive(Parser, Debug)]
struct ClientArgs {
    /// Address of the counter service (what `rmc run` printed).
    #[arg(long, default_value = "127.0.0.1:7000")]
    server: SocketAddr,
    /// Number of new requests to send, one at a time.
    #[arg(long, short = 'n', default_value_t = 10)]
    requests: u64,
    /// Client id (not 0). Default: derived from the process id and the time, so each run is a
    /// new client.
    #[arg(long)]
    client_id: Option<u64>,
    /// Verify the replies: the counter rises with each new request (by exactly one with
    /// --exclusive) and repeats are answered identically. Exit status 1 on any contradiction.
    #[arg(long)]
    check: bool,
    /// With --check: no other client uses the service, so each new request must raise the
    /// counter by exactly one.
    #[arg(long)]
    exclusive: bool,
    /// Also resend every K-th request after its answer, to check repeats (0 = never).
    #[arg(long, default_value_t = 0)]
    repeat_every: u64,
    /// Milliseconds to wait for a reply before sending the same request again.
    #[arg(long, default_value_t = 100)]
    retry_ms: u64,
    /// Seconds to keep retrying one request before giving up.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print only the summary, not every reply.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 256M, 4G, 1048576)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Client(a) => client(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rmc: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: RunArgs) -> Result<ExitCode> {
    let vcpus = a.vcpus.unwrap_or(a.workload.len());
    if a.workload.len() > vcpus {
        bail!(
            "{} workloads were given for {vcpus} vCPUs; give at most one workload per vCPU",
            a.workload.len()
        );
    }
    let dirtier = DirtierConfig {
        pages: a.dirty_pages,
        rate: a.dirty_rate,
        limit: a.dirty_limit,
    };
    let workloads: Vec<Workload> = (0..vcpus)
        .map(|i| match a.workload.get(i) {
            Some(WorkloadArg::Counter) => Workload::Counter,
            Some(WorkloadArg::Dirtier) => Workload::Dirtier(dirtier),
            Some(WorkloadArg::Idle) | None => Workload::Idle,
        })
        .collect();
    let config = VmConfig {
        mem_size: a.memory,
        workloads: workloads.clone(),
        nic_addr: Some(a.listen),
    };
    let vm = Vm::new(&config).context("Cannot start the VM")?;
    vm.resume();
    let addr = vm.nic_addr().expect("the NIC has a socket");
    println!(
        "rmc: VM running: {} MiB, {} vCPU(s) [{}]",
        a.memory >> 20,
        vcpus,
        workloads
            .iter()
            .map(|w| match w {
                Workload::Counter => "counter",
                Workload::Dirtier(_) => "dirtier",
                Workload::Idle => "idle",
            })
            .collect::<Vec<_>>()
            .join(",")
    );
    if workloads.contains(&Workload::Counter) {
        println!("rmc: counter service listening on udp {addr}");
    }
    let start = Instant::now();
    let interval = Duration::from_secs_f64(a.status_interval.max(0.05));
    let end = a
        .duration
        .map(|d| start + Duration::from_secs_f64(d.max(0.0)));
    let dirtiers: Vec<usize> = (0..vcpus)
        .filter(|&i| matches!(workloads[i], Workload::Dirtier(_)))
        .collect();
    let mut last = (
        Instant::now(),
        dirtiers
            .iter()
            .map(|&i| vm.dirtier_progress(i))
            .sum::<u64>(),
    );
    loop {
        let now = Instant::now();
        let next = now + interval;
        let wake = end.map_or(next, |e| e.min(next));
        std::thread::sleep(wake.saturating_duration_since(now));
        let stopped = vm.stopped_vcpus();
        if !stopped.is_empty() {
            bail!("vCPU(s) stopped: {stopped:?}");
        }
        let progress: u64 = dirtiers.iter().map(|&i| vm.dirtier_progress(i)).sum();
        let t = Instant::now();
        let rate = (progress - last.1) as f64 / t.duration_since(last.0).as_secs_f64();
        last = (t, progress);
        let s = vm.guest_status();
        let nic = vm.nic_stats();
        info!(
            counter = s.counter,
            requests = s.requests,
            repeats = s.repeats,
            bad = s.bad,
            rx = nic.rx_frames,
            tx = nic.tx_frames,
            dirtier_pages_per_s = rate.round() as u64,
            "status"
        );
        if end.is_some_and(|e| Instant::now() >= e) {
            break;
        }
    }
    vm.pause();
    let s = vm.guest_status();
    println!(
        "rmc: VM stopped after {:.1} s: counter {}, {} requests, {} repeats, {} malformed",
        start.elapsed().as_secs_f64(),
        s.counter,
        s.requests,
        s.repeats,
        s.bad
    );
    Ok(ExitCode::SUCCESS)
}

fn client(a: ClientArgs) -> Result<ExitCode> {
    let client_id = a.client_id.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        (u64::from(std::process::id()) << 40) ^ t | 1
    });
    if client_id == 0 {
        bail!("--client-id must not be 0 (the service reserves it)");
    }
    let mut c = Client::new(a.server, client_id).context("Cannot open a UDP socket")?;
    c.retry_after = Duration::from_millis(a.retry_ms.max(1));
    let deadline = Duration::from_secs_f64(a.timeout.max(0.001));
    let mut checker = Checker::new(client_id, a.exclusive);
    let mut retries = 0u64;
    let mut replies = 0u64;
    let mut contradiction = None;
    let start = Instant::now();
    println!("rmc client {client_id:#x} -> {}", a.server);
    for i in 1..=a.requests {
        checker.sent(i);
        let mut on_reply = |r: &rmc_vmm::service::Reply| {
            replies += 1;
            if a.check && contradiction.is_none() {
                if let Err(e) = checker.check(r) {
                    contradiction = Some(e);
                }
            }
        };
        let (r, resent) = c.request(deadline, &mut on_reply)?;
        retries += resent;
        if !a.quiet {
            println!(
                "seq {} -> counter {} (status {})",
                r.seq, r.counter, r.status
            );
        }
        if a.repeat_every > 0 && i % a.repeat_every == 0 {
            let (again, resent) = c.repeat(r.seq, deadline, &mut on_reply)?;
            retries += resent + 1;
            if !a.quiet {
                println!("seq {} again -> counter {}", again.seq, again.counter);
            }
        }
        if let Some(e) = &contradiction {
            eprintln!("rmc client: INCONSISTENT: {e}");
            return Ok(ExitCode::FAILURE);
        }
    }
    println!(
        "rmc client: {} requests, {} replies, {} resends/repeats in {:.2} s{}",
        a.requests,
        replies,
        retries,
        start.elapsed().as_secs_f64(),
        if a.check { ", consistent" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
