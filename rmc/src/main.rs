//! The `rmc` command.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rmc::checker::Checker;
use rmc::events::{emit, Backup, Event, FailedOver, LossAction, TakeoverRefusal};
use rmc::fencing;
use rmc_guest_api::PAGE_SIZE;
use rmc_transport::link::Transport;
use rmc_vmm::service::Client;
use rmc_vmm::{DirtierConfig, Vm, VmConfig, Workload};
use tracing::info;

/// rmc keeps a KVM virtual machine alive when its host dies, by shipping micro-checkpoints to
/// a standby many times a second. `primary` runs a protected VM, `standby` receives its
/// checkpoints, `run` runs the same VM unprotected, `client` talks to the guest's service.
#[derive(Parser, Debug)]
#[command(name = "rmc", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info`, `debug`, `rmc_vmm=debug`.
    /// `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Print events (what programs read: addresses, sessions, failovers, results) as JSON
    /// lines tagged by `"event"` instead of human lines (docs/events.md). `rmc bench`: print
    /// its JSON document (docs/bench-json.md) instead of the tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the VM without protection: rmc's own guest with the chosen workloads.
    Run(RunArgs),
    /// Run the VM protected: checkpoint it to a standby every epoch (TCP).
    Primary(PrimaryArgs),
    /// Receive a primary's checkpoints and keep a backup of its VM.
    Standby(StandbyArgs),
    /// Send requests to the counter service and print the replies.
    Client(ClientArgs),
    /// Measure checkpoint pause, throughput and memory on this machine (standby in-process).
    Bench(BenchArgs),
    /// The whole story on this machine: primary, standby, a checking client; the primary is
    /// SIGKILLed and the standby takes over.
    Demo(DemoArgs),
    /// List the RDMA devices, ports, port states and GIDs, which local address maps to which
    /// device, and why a device cannot be used.
    Devices(DevicesArgs),
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
    #[command(flatten)]
    vm: VmArgs,
    /// Stop the VM after this many seconds (default: run until killed).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds between status lines (counter, requests, dirtier speed).
    #[arg(long, default_value_t = 1.0)]
    status_interval: f64,
}

#[derive(Parser, Debug)]
struct PrimaryArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// The standby's address (`rmc standby --listen`).
    #[arg(long)]
    standby: SocketAddr,
    /// Transport to the standby: `rdma` (verbs + rdma_cm: RoCE, InfiniBand, Soft-RoCE), `tcp`,
    /// or `auto`: RDMA when an RDMA device and route reach the standby and it accepts RDMA,
    /// TCP otherwise (the choice and the reason are printed).
    #[arg(long, default_value = "auto")]
    transport: Transport,
    #[command(flatten)]
    secret: SecretArgs,
    /// The longest an epoch runs, in milliseconds: a checkpoint at least this often (sooner
    /// when output waits, see --output-trigger, or --max-dirty-pages are dirty).
    #[arg(long, default_value_t = 20.0)]
    epoch_ms: f64,
    /// End an epoch early once this many pages are dirty (default: half a slot).
    #[arg(long)]
    max_dirty_pages: Option<usize>,
    /// Read the dirty log while the guest runs (`on`: the full sync in rounds while it runs,
    /// --max-dirty-pages watched every 2 ms) or only while it is paused (`off`: the first
    /// checkpoint carries what the guest dirtied during the full sync; --max-dirty-pages does
    /// not apply). `off` is for nested KVM under QEMU's emulation (the Soft-RoCE VM), where
    /// such reads make a Linux guest triple-fault.
    #[arg(long, value_enum, default_value = "on")]
    live_dirty_reads: OnOff,
    #[command(flatten)]
    output_trigger: OutputTriggerArgs,
    /// Pages per staging slot (default: an eighth of guest memory, 1,024 to 65,536).
    #[arg(long)]
    slot_pages: Option<usize>,
    /// Number of staging slots (at least 2): epochs that may be in flight at once.
    #[arg(long, default_value_t = 2)]
    slots: usize,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    arbiter: ArbiterArgs,
    /// Stop after protecting this many seconds (counted from the end of the full sync): take a
    /// last checkpoint with the guest left paused, wait for its ack, print figures and exit
    /// (default: until killed).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds between summary lines (epochs/s, pages per epoch, pause, ack latency).
    #[arg(long, default_value_t = 5.0)]
    summary_interval: f64,
    /// What to do when the standby is lost: `continue` running unprotected (held packets are
    /// released; with an arbiter, once it no longer names the standby) or `pause` the VM with
    /// its output held until a standby is back (the standby's checkpoint stays current, so
    /// with an arbiter it may still take over). Either way the primary reconnects every
    /// second; a standby that still holds a checkpoint of the last session gets only the
    /// pages changed since, any other a full sync.
    #[arg(long, value_enum, default_value = "continue")]
    on_standby_loss: StandbyLoss,
    /// Output commit: most bytes of guest packets held while their checkpoint is unacknowledged
    /// (beyond it the guest's NIC stops taking packets: backpressure, never a drop).
    #[arg(long, default_value_t = 16 << 20)]
    netbuf_bytes: usize,
    /// Output commit: most packets held.
    #[arg(long, default_value_t = 16_384)]
    netbuf_packets: usize,
    /// Testing only: break a guarantee on purpose, to show that the checks catch it. Never
    /// use it to protect a real VM.
    #[arg(long, value_enum, hide = true)]
    inject_fault: Option<Fault>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StandbyLoss {
    /// Keep running unprotected; reconnect in the background.
    Continue,
    /// Pause the VM until a new standby is connected.
    Pause,
}

#[derive(Parser, Debug)]
struct StandbyArgs {
    /// Address to listen on for the primary (for RDMA: an address of an RDMA device's port,
    /// see `rmc devices`).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// After a failover of a Linux guest (`rmc primary --kernel`): where its serial console
    /// goes, `stdout`, `none`, or a file to append to.
    #[arg(long, default_value = "stdout", value_name = "stdout|none|FILE")]
    console: String,
    /// Transport: `rdma`, `tcp`, or `auto`: RDMA when a usable RDMA device has the listen
    /// address (any usable device for 0.0.0.0), TCP otherwise (the choice is printed).
    #[arg(long, default_value = "auto")]
    transport: Transport,
    #[command(flatten)]
    secret: SecretArgs,
    /// Accept only primaries whose guest has this much memory (e.g. 256M). Default: whatever
    /// the first primary has; later ones must match the backup.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    /// Exit after serving this many primary connections (default: serve forever).
    #[arg(long)]
    sessions: Option<u64>,
    /// Where clients reach the service (normally the primary's --listen): on failover the
    /// standby's VM takes this UDP address over. `primary`: the address the primary's NIC
    /// served on, as its last checkpoint records it (hosts that share a floating service
    /// address, or both on one machine). Without it there is no failover.
    #[arg(long, value_parser = parse_service_addr)]
    service_addr: Option<ServiceAddr>,
    /// After a failover, stop the VM after this many seconds (default: run until killed).
    #[arg(long)]
    run_for: Option<f64>,
    /// Seconds a connection may take to authenticate and present its layout before it is
    /// cut (several handshakes run at once; a slow or hostile peer delays no other).
    #[arg(long, default_value_t = 5.0)]
    handshake_timeout: f64,
    #[command(flatten)]
    arbiter: ArbiterArgs,
    /// On failover, the longest to wait for the service address while the old primary may
    /// still hold it (same host), in seconds.
    #[arg(long, default_value_t = 10.0)]
    bind_timeout: f64,
    /// After a failover, protect the VM in turn: connect to the standby listening at this
    /// address (same secret, transport, heartbeat and arbiter) and keep checkpointing to it,
    /// reconnecting when it is lost (a chain: A fails, B takes over protected by C, ...).
    /// Default: the failed-over VM runs unprotected.
    #[arg(long)]
    protect_with: Option<SocketAddr>,
}

#[derive(Parser, Debug)]
struct DevicesArgs {
    /// Where the kernel lists RDMA devices.
    #[arg(long, default_value = rmc_transport::rdma_devices::SYSFS_ROOT)]
    sysfs: std::path::PathBuf,
}

#[derive(Parser, Debug)]
struct DemoArgs {
    /// The guest: `builtin` (the counter service, checked by clients) or `linux` (a stock
    /// kernel whose init prints `seq N` every 50 ms on its serial console, checked line by
    /// line; needs --initrd and a KVM that runs stock kernels, see docs/DEVELOPING.md).
    #[arg(long, value_enum, default_value = "builtin")]
    guest: GuestArg,
    /// With --guest linux: the kernel [default: the newest /boot/vmlinuz-*].
    #[arg(long, value_name = "BZIMAGE")]
    kernel: Option<std::path::PathBuf>,
    /// With --guest linux: an initramfs built by `guest-linux/build-initramfs.sh --service seq`.
    #[arg(long, value_name = "FILE")]
    initrd: Option<std::path::PathBuf>,
    /// With --guest linux: vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// With --guest linux: seconds the guest may take to boot.
    #[arg(long, default_value_t = 300.0)]
    boot_timeout: f64,
    /// Passed to the primary (see `rmc primary --help`).
    #[arg(long, value_enum, default_value = "on")]
    live_dirty_reads: OnOff,
    /// Guest memory size.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Trials: each starts a fresh primary and standby and kills the primary (later trials at
    /// a random moment). The exit status is 0 only if every trial stayed consistent.
    #[arg(long, default_value_t = 1)]
    trials: u32,
    /// Seconds of protected running before the primary is killed (the first trial; later ones
    /// pick a random moment between half and one and a half times this).
    #[arg(long, default_value_t = 3.0)]
    kill_after: f64,
    /// Seconds the client keeps going after the kill.
    #[arg(long, default_value_t = 2.0)]
    after: f64,
    /// Transport between primary and standby: `tcp`, `rdma` or `auto`.
    #[arg(long, default_value = "tcp")]
    transport: Transport,
    /// Address the standby listens on (default: 127.0.0.1, or with `--transport rdma` the
    /// address of the first usable RDMA port).
    #[arg(long)]
    standby_ip: Option<std::net::IpAddr>,
    /// Heartbeats of primary and standby (raise them on a software-emulated machine).
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    /// Concurrent clients. One checker sees every reply of all of them: a counter handed out
    /// twice, a reply older than one another client already saw, a repeat answered
    /// differently. With one client, each new request must raise the counter by exactly one.
    #[arg(long, default_value_t = 2)]
    clients: u32,
    /// Passed to the primary (see `rmc primary --help`).
    #[command(flatten)]
    output_trigger: OutputTriggerArgs,
    /// Testing only: passed to the primary (see `rmc primary --inject-fault`).
    #[arg(long, value_enum, hide = true)]
    inject_fault: Option<Fault>,
}

/// What `rmc demo` protects.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum GuestArg {
    /// The built-in counter service.
    Builtin,
    /// A stock Linux kernel.
    Linux,
}

/// A guarantee broken on purpose, so that tests can show the checkers catching it.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Release the guest's output at once instead of after the ack of its checkpoint (output
    /// commit off while protected).
    ReleaseBeforeAck,
}

#[derive(Parser, Debug)]
struct BenchArgs {
    /// Guest memory size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Dirty pages per epoch, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    dirty_pages: Vec<u64>,
    /// Epoch lengths in ms, comma separated; 0 = each epoch ends as soon as N pages are dirty
    /// (the guest dirties as fast as it can). With a length, the guest dirties N pages per
    /// epoch at an even rate.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    epoch_ms: Vec<f64>,
    /// Transports, comma separated: `tcp` (loopback) and/or `rdma` (to the first usable RDMA
    /// port's address; see `rmc devices`).
    #[arg(long, value_delimiter = ',', default_value = "tcp", value_parser = measured_transport())]
    transport: Vec<Transport>,
    /// Guest vCPU counts, comma separated; each vCPU dirties N / vcpus pages.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    vcpus: Vec<u32>,
    /// Seconds of protected run per configuration (after the full sync).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Who dirties the pages: `guest` (the guest's dirtier: real guest writes at the guest's
    /// speed) or `host` (a host thread writing guest memory like a device, as fast as it can,
    /// to measure the pipeline itself; its checkpoints are not consistent images).
    #[arg(long, default_value = "guest")]
    dirty_source: DirtySourceArg,
    /// Also write an SVG plot of pause and end-to-end latency against dirty pages.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    /// Use a running `rmc standby` at this address instead of one in this process (needs
    /// --secret-file; the standby must accept this guest's memory size and several sessions).
    #[arg(long, requires = "secret_file")]
    standby: Option<SocketAddr>,
    /// Shared secret file for --standby.
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// Heartbeats (raise them on a software-emulated machine such as the Soft-RoCE VM).
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    /// What to measure, comma separated: `sweep` (checkpoint latency and throughput over the
    /// dirty pages x epoch x vCPU sweep) and/or `reply` (reply latency of a client of the
    /// protected counter guest: unprotected, output trigger off, output trigger on).
    #[arg(long, value_delimiter = ',', default_value = "sweep,reply")]
    part: Vec<BenchPart>,
    /// Reply latency: the client loads, comma separated: `request` (one request at a time)
    /// and/or `stream` (--reply-window requests outstanding).
    #[arg(long, value_delimiter = ',', default_value = "request,stream")]
    reply_loads: Vec<ReplyLoadArg>,
    /// Reply latency: requests outstanding in the `stream` load.
    #[arg(long, default_value_t = 16)]
    reply_window: usize,
    /// Reply latency: the longest epoch (the primary's --epoch-ms), ms.
    #[arg(long, default_value_t = 20.0)]
    reply_epoch_ms: f64,
    /// Reply latency: the dirtier on the guest's second vCPU writes this many pages over and
    /// over ...
    #[arg(long, default_value_t = 1024)]
    reply_dirty_pages: u64,
    /// ... at this many pages per second (0: as fast as it can).
    #[arg(long, default_value_t = 10_000)]
    reply_dirty_rate: u64,
    /// Reply latency: output-trigger minimum gaps to measure, microseconds, comma separated
    /// (each combined with each --output-max-pause-percent; see `rmc primary --help`).
    #[arg(long, value_delimiter = ',', default_values_t = [rmc_mc::protocol::DEFAULT_OUTPUT_MIN_GAP.as_micros() as u64])]
    output_min_gap_us: Vec<u64>,
    /// Reply latency: output-trigger pause shares to measure, percent, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [rmc_mc::protocol::DEFAULT_MAX_PAUSE_SHARE * 100.0])]
    output_max_pause_percent: Vec<f64>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchPart {
    /// Checkpoint latency and throughput.
    Sweep,
    /// Reply latency.
    Reply,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ReplyLoadArg {
    /// One request at a time.
    Request,
    /// A window of requests outstanding.
    Stream,
}

/// `rmc bench --transport`: a transport it can measure (`tcp`, `rdma`; not `auto`).
fn measured_transport() -> impl clap::builder::TypedValueParser<Value = Transport> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["tcp", "rdma"])
        .map(|s| s.parse::<Transport>().expect("tcp and rdma are transports"))
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DirtySourceArg {
    /// The guest's dirtier.
    Guest,
    /// A host thread writing like a device.
    Host,
}

#[derive(Parser, Debug)]
struct SecretArgs {
    /// File holding the shared secret (both sides must use the same; at least 16 bytes;
    /// a trailing newline is ignored). The secret never crosses the wire.
    #[arg(long)]
    secret_file: std::path::PathBuf,
}

#[derive(Parser, Debug)]
struct ArbiterArgs {
    /// Fencing: `etcd://HOST:PORT[/PREFIX]`, one prefix per protected VM (default prefix
    /// /rmc/default). Going live (a primary starting, a standby taking over) requires winning
    /// the VM's primary key at this etcd; a primary releases output only while its lease is
    /// certainly valid and stops for good when it cannot renew it. Give the primary and the
    /// standby the same. Without it, a partition or a frozen primary can leave two primaries
    /// serving the VM.
    #[arg(long, value_parser = parse_arbiter)]
    arbiter: Option<rmc_arbiter::Endpoint>,
    /// Seconds of the arbiter lease (etcd grants at least 2): the longest a lost primary can
    /// keep its standby from taking over; renewed every quarter of it.
    #[arg(long, default_value_t = 2.0)]
    lease_ttl: f64,
}

impl ArbiterArgs {
    fn ttl(&self) -> Duration {
        Duration::from_secs_f64(self.lease_ttl.clamp(1.0, 3600.0))
    }

    /// Says what running without an arbiter risks.
    fn warn_if_none(&self) {
        if self.arbiter.is_none() {
            eprintln!(
                "rmc: warning: no --arbiter: if the primary and the standby lose sight of each \
                 other while both run (a cut link, a frozen host), both can serve the VM: two \
                 primaries. Fence them with --arbiter etcd://HOST:PORT/PREFIX"
            );
        }
    }
}

fn parse_arbiter(s: &str) -> Result<rmc_arbiter::Endpoint, String> {
    s.parse()
}

#[derive(Parser, Debug, Clone)]
struct OutputTriggerArgs {
    /// Take a checkpoint as soon as the guest has output waiting, so a reply leaves about one
    /// checkpoint (pause, transmit, ack) after the guest sent it instead of at the end of its
    /// epoch: `on`, or `off` (fixed epochs: replies wait up to --epoch-ms plus the ack).
    #[arg(long, value_enum, default_value = "on")]
    output_trigger: OnOff,
    /// Output trigger: the least time from the start of one checkpoint to an output-triggered
    /// next one, in microseconds (bounds checkpoints per second under streaming output).
    #[arg(long, default_value_t = rmc_mc::protocol::DEFAULT_OUTPUT_MIN_GAP.as_micros() as u64)]
    output_min_gap_us: u64,
    /// Output trigger: the largest share of the guest's time, in percent, that
    /// output-triggered pauses may take (a checkpoint whose pause took P waits P / share
    /// before output may end the next epoch); bounds the guest's slowdown.
    #[arg(long, default_value_t = rmc_mc::protocol::DEFAULT_MAX_PAUSE_SHARE * 100.0)]
    output_max_pause_percent: f64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

impl OutputTriggerArgs {
    fn get(&self) -> Result<Option<rmc_mc::protocol::OutputTrigger>> {
        let percent = self.output_max_pause_percent;
        if !(percent > 0.0 && percent <= 100.0) {
            bail!("--output-max-pause-percent must be above 0 and at most 100, not {percent}");
        }
        Ok(
            (self.output_trigger == OnOff::On).then(|| rmc_mc::protocol::OutputTrigger {
                min_gap: Duration::from_micros(self.output_min_gap_us),
                max_pause_share: percent / 100.0,
            }),
        )
    }
}

#[derive(Parser, Debug)]
struct HeartbeatArgs {
    /// Milliseconds between heartbeats (sent from a thread of their own, so busy work does
    /// not delay them).
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Declare the peer dead after this many heartbeat intervals without hearing from it (a
    /// closed connection is detected at once; a silent peer after interval x misses). The
    /// default 1 s is ~25x the worst wake-up delay measured on a loaded 2-core machine
    /// (`cargo run --release -p rmc-mc --example jitter`; see docs/DEVELOPING.md).
    #[arg(long, default_value_t = 10)]
    heartbeat_misses: u32,
}

impl HeartbeatArgs {
    fn get(&self) -> rmc_mc::protocol::Heartbeat {
        let interval = Duration::from_millis(self.heartbeat_ms.max(1));
        rmc_mc::protocol::Heartbeat {
            interval,
            timeout: interval * self.heartbeat_misses.max(1),
        }
    }
}

impl SecretArgs {
    fn read(&self) -> Result<Vec<u8>> {
        let mut s = std::fs::read(&self.secret_file).with_context(|| {
            format!("Cannot read the secret file {}", self.secret_file.display())
        })?;
        while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            s.pop();
        }
        if s.len() < 16 {
            bail!(
                "The secret in {} is {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
                self.secret_file.display(),
                s.len(),
                self.secret_file.display()
            );
        }
        Ok(s)
    }
}

#[derive(Parser, Debug)]
struct VmArgs {
    /// Guest memory size: bytes, or with a K, M or G suffix (16M to 11G for the built-in
    /// guest; up to 64G with --kernel, where RAM above 3G sits above 4 GiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs (1 to 4 for the built-in guest, where vCPUs beyond the --workload list
    /// are idle; up to 254 with --kernel, default 1 there).
    #[arg(long)]
    vcpus: Option<usize>,
    /// Boot this stock Linux kernel (a bzImage, such as /boot/vmlinuz-*) instead of the
    /// built-in guest program. The VM then is a PC: in-kernel PIC, IOAPIC, LAPICs and PIT,
    /// the KVM clock, an MP table for SMP, a 16550 on COM1 as its console (see --console) and
    /// an i8042 for reboot; --workload does not apply. It needs a KVM that runs stock kernels
    /// (see docs/DEVELOPING.md, "Linux guests").
    #[arg(long, value_name = "BZIMAGE")]
    kernel: Option<std::path::PathBuf>,
    /// Initial ramdisk for --kernel (guest-linux/build-initramfs.sh builds one from the
    /// installed busybox-static and kernel modules).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// Kernel command line for --kernel [default: the VMM's, which puts the console on
    /// ttyS0 and reboots through the i8042 on panic; see `rmc_vmm::linux::DEFAULT_CMDLINE`].
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// Where the guest's serial console (COM1, with --kernel) goes: `stdout`, `none`, or a
    /// file to append to.
    #[arg(long, default_value = "stdout", value_name = "stdout|none|FILE")]
    console: String,
    /// With --kernel under protection: hold the serial console's output until the standby
    /// acknowledged the checkpoint that produced it, like network packets (`on`), or show it
    /// at once (`off`, for debugging: after a failover the console may repeat lines it showed).
    #[arg(long, value_enum, default_value = "on")]
    console_commit: OnOff,
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
    /// Seq of the first request (to continue an earlier run of the same --client-id).
    #[arg(long, default_value_t = 1)]
    first_seq: u64,
}

/// Whether a failed connection to the standby may succeed later: everything but a standby
/// that does not hold our secret, speaks another protocol version or refused this primary
/// for what it is (its layout, memory, state version) rather than for being busy.
fn retry_makes_sense(e: &rmc_mc::primary::PrimaryError) -> bool {
    use rmc_mc::primary::PrimaryError;
    use rmc_mc::protocol::ProtocolError;
    match e {
        PrimaryError::Protocol(
            ProtocolError::AuthFailed { .. } | ProtocolError::Version { .. },
        ) => false,
        PrimaryError::Protocol(ProtocolError::Refused { reason, .. }) => {
            reason.starts_with(rmc_mc::standby::BUSY) || reason.starts_with("No verified handshake")
        }
        _ => true,
    }
}

/// Where a failed-over VM serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceAddr {
    /// This address.
    Fixed(SocketAddr),
    /// The address the primary's NIC served on (from the checkpoint).
    Primary,
}

fn parse_service_addr(s: &str) -> Result<ServiceAddr, String> {
    if s == "primary" {
        return Ok(ServiceAddr::Primary);
    }
    s.parse().map(ServiceAddr::Fixed).map_err(|_| {
        format!("`{s}` is neither an address such as 10.0.0.5:7000 nor the word `primary`")
    })
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
    rmc::events::set_json(cli.json);
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Primary(a) => primary(a),
        Command::Standby(a) => standby(a),
        Command::Client(a) => client(a),
        Command::Bench(a) => bench(a, cli.json),
        Command::Demo(a) => demo(a),
        Command::Devices(a) => devices(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rmc: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds and starts the VM described by `a`; prints what runs and where it listens.
fn start_vm(a: &VmArgs) -> Result<(Vm, Vec<Workload>)> {
    if let Some(kernel) = &a.kernel {
        return start_linux(a, kernel);
    }
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
        ..Default::default()
    };
    let vm = Vm::new(&config).context("Cannot start the VM")?;
    vm.resume();
    let addr = vm.nic_addr().expect("the NIC has a socket");
    emit(&Event::VmRunning {
        memory_mib: a.memory >> 20,
        vcpus,
        workloads: workloads
            .iter()
            .map(|w| match w {
                Workload::Counter => "counter",
                Workload::Dirtier(_) => "dirtier",
                Workload::Idle => "idle",
            })
            .map(String::from)
            .collect(),
    });
    if workloads.contains(&Workload::Counter) {
        emit(&Event::ServiceListening { addr });
    }
    Ok((vm, workloads))
}

/// Where `--console` sends the serial console.
fn console_to(arg: &str) -> rmc_vmm::vm::ConsoleTo {
    match arg {
        "stdout" | "-" => rmc_vmm::vm::ConsoleTo::Stdout,
        "none" => rmc_vmm::vm::ConsoleTo::Discard,
        path => rmc_vmm::vm::ConsoleTo::File(path.into()),
    }
}

/// Builds and starts a PC VM booting the stock kernel of `--kernel`.
fn start_linux(a: &VmArgs, kernel: &std::path::Path) -> Result<(Vm, Vec<Workload>)> {
    let vcpus = a.vcpus.unwrap_or(1);
    let workloads = vec![Workload::Idle; vcpus];
    let config = VmConfig {
        mem_size: a.memory,
        workloads: workloads.clone(),
        nic_addr: Some(a.listen),
        pc: true,
        linux: Some(rmc_vmm::linux::LinuxBoot {
            kernel: kernel.to_path_buf(),
            initrd: a.initrd.clone(),
            cmdline: a
                .cmdline
                .clone()
                .unwrap_or_else(|| rmc_vmm::linux::DEFAULT_CMDLINE.to_string()),
        }),
        console: console_to(&a.console),
    };
    let vm = Vm::new(&config)
        .with_context(|| format!("Cannot start a VM with the kernel {}", kernel.display()))?;
    vm.set_console_commit(a.console_commit == OnOff::On);
    vm.resume();
    emit(&Event::VmRunning {
        memory_mib: a.memory >> 20,
        vcpus,
        workloads: vec!["linux".to_string(); vcpus],
    });
    Ok((vm, workloads))
}

fn run(a: RunArgs) -> Result<ExitCode> {
    let (vm, workloads) = start_vm(&a.vm)?;
    let vcpus = workloads.len();
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
    vm.pause().context("Cannot stop the VM")?;
    let s = vm.guest_status();
    emit(&Event::VmStopped {
        seconds: start.elapsed().as_secs_f64(),
        counter: s.counter,
        requests: s.requests,
        repeats: s.repeats,
        malformed: s.bad,
    });
    Ok(ExitCode::SUCCESS)
}

fn primary(a: PrimaryArgs) -> Result<ExitCode> {
    use rmc_mc::primary::PrimaryConfig;
    let secret = a.secret.read()?;
    a.arbiter.warn_if_none();
    // Going live needs the arbiter's primary key first.
    let fence = match &a.arbiter.arbiter {
        Some(ep) => {
            let ttl = a.arbiter.ttl();
            let f = fencing::Fence::go_live(
                ep,
                ttl,
                &fencing::identity("primary"),
                ttl * 2 + Duration::from_secs(1),
            )?;
            emit(&Event::ArbiterNamedPrimary {
                arbiter: ep.to_string(),
                fence: f.revision(),
            });
            f.exit_when_lost();
            Some(f)
        }
        None => None,
    };
    let (vm, _) = start_vm(&a.vm)?;
    let mut config = PrimaryConfig::new(a.standby, secret, a.vm.memory / PAGE_SIZE);
    if let Some(f) = &fence {
        let gate = f.gate();
        vm.set_send_gate(rmc_vmm::nic::SendGate::new(move || gate.is_valid()));
        config.fencing = Some(f.for_primary());
    }
    config.transport = a.transport;
    config.epoch_interval = Duration::from_secs_f64(a.epoch_ms.max(0.1) / 1000.0);
    if let Some(p) = a.slot_pages {
        config.slot_pages = p.max(1);
        config.max_dirty_pages = config.slot_pages / 2;
    }
    if let Some(m) = a.max_dirty_pages {
        config.max_dirty_pages = m.max(1);
    }
    config.output_trigger = a.output_trigger.get()?;
    if a.slots < 2 {
        bail!("--slots must be at least 2 (one epoch staged while another is in flight)");
    }
    config.slots = a.slots;
    config.live_dirty_reads = a.live_dirty_reads == OnOff::On;
    config.heartbeat = a.heartbeat.get();
    config.summary_every = Duration::from_secs_f64(a.summary_interval.max(0.1));
    config.protect_for = a.duration.map(|d| Duration::from_secs_f64(d.max(0.0)));
    let limits = rmc_netbuf::Limits {
        max_bytes: a.netbuf_bytes.max(1),
        max_packets: a.netbuf_packets.max(1),
    };
    let how = Protection {
        limits,
        on_standby_loss: a.on_standby_loss,
        output_commit: a.inject_fault != Some(Fault::ReleaseBeforeAck),
    };
    protect(&vm, config, &how, fence)
}

/// How a VM is protected, besides the replication settings.
struct Protection {
    limits: rmc_netbuf::Limits,
    on_standby_loss: StandbyLoss,
    output_commit: bool,
}

/// Protects `vm` by the standby of `config` until the protection ends on purpose (`--duration`)
/// or this host is fenced; reconnects whenever the standby is lost. The primary of
/// `rmc primary`, and the VM a standby took over when it is to be protected in turn.
fn protect(
    vm: &Vm,
    config: rmc_mc::primary::PrimaryConfig,
    how: &Protection,
    mut fence: Option<fencing::Fence>,
) -> Result<ExitCode> {
    use rmc_mc::primary::Primary;
    use std::sync::atomic::AtomicBool;
    let limits = how.limits;
    let standby = config.standby;
    let stop = AtomicBool::new(false);
    let mut sessions = 0u64;
    let mut paused = false;
    let output_commit = how.output_commit;
    if !output_commit {
        eprintln!(
            "rmc: FAULT INJECTED (testing only): output leaves before its checkpoint is \
             acknowledged; a failover can contradict replies"
        );
    }
    loop {
        // While no standby is connected the guest's output flows freely (an unreachable
        // standby must not stall the service for its connect timeout); it is held from the
        // moment a standby accepted, before the first checkpoint: the standby can fail over
        // only once it holds a checkpoint, and that one covers everything released before.
        let primary = match Primary::connect(vm, config.clone()) {
            Ok(p) => p,
            Err(e) => {
                if sessions == 0 {
                    // A standby that is not up yet, busy, or slowed by other connections is
                    // worth waiting for; one that refuses this primary for good is not.
                    if !retry_makes_sense(&e) {
                        return Err(anyhow::Error::new(e).context(format!(
                            "Cannot start protection with the standby at {}",
                            standby
                        )));
                    }
                    emit(&Event::ProtectionRetry {
                        standby,
                        error: rmc_mc::standby::error_chain(&e),
                    });
                } else {
                    tracing::debug!("standby at {} not back yet: {e}", standby);
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        sessions += 1;
        // Output commit from the first moment of protection: nothing the guest sends leaves
        // before the standby holds the checkpoint that produced it.
        if output_commit {
            vm.enable_output_commit(limits)?;
        }
        if paused {
            vm.resume();
            paused = false;
        }
        emit(&Event::Protected {
            standby,
            transport: primary.transport(),
            resumed: primary.resumed(),
        });
        // Tell when the standby first holds a consistent checkpoint (it can fail over from then
        // on; before, it only has the full sync). `rmc demo` waits for this line.
        let acked = primary.acked_counter();
        let session_over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let over = session_over.clone();
            std::thread::spawn(move || {
                while !over.load(std::sync::atomic::Ordering::Acquire) {
                    if acked.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                        emit(&Event::FirstCheckpointAcked);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let result = primary.run(&stop);
        session_over.store(true, std::sync::atomic::Ordering::Release);
        let _ = watcher.join();
        match result {
            Ok(stats) => {
                if let Some(o) = vm.output_stats() {
                    emit(&Event::OutputCommit {
                        released_packets: o.released_packets,
                        released_bytes: o.released_bytes,
                        held_packets: o.held_packets as u64,
                        backpressure_events: o.refused,
                    });
                }
                vm.disable_output_commit();
                if let Some(f) = fence.take() {
                    f.resign();
                }
                emit(&Event::ProtectionEnded {
                    checkpoints_acked: stats.checkpoints_acked,
                    output_triggered: stats.output_checkpoints,
                    last_epoch: stats.last_acked,
                    seconds: stats.protected_time.as_secs_f64(),
                    sync_pages: stats.sync_pages,
                    sync_seconds: stats.sync_time.as_secs_f64(),
                    first_pause_us: stats.first_pause.map_or(0, |d| d.as_micros() as u64),
                    pause_p50_us: stats.pause_us.value_at_quantile(0.5),
                    pause_p99_us: stats.pause_us.value_at_quantile(0.99),
                    pages_per_epoch: stats.pages.mean(),
                    ack_p50_us: stats.ack_us.value_at_quantile(0.5),
                    ack_p99_us: stats.ack_us.value_at_quantile(0.99),
                    oversize: stats.oversize,
                });
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                if how.on_standby_loss == StandbyLoss::Pause {
                    // The guest stops and nothing it sent leaves: the standby's checkpoint
                    // stays current (an arbiter still names it), and what is held leaves with
                    // the next session's first checkpoint.
                    // (A VM that does not pause exits here, its output still held.)
                    vm.pause()
                        .context("Cannot pause the VM after losing its standby")?;
                    paused = true;
                    emit(&Event::StandbyLost {
                        standby,
                        error: rmc_mc::standby::error_chain(&e),
                        action: LossAction::Pause,
                    });
                } else {
                    // The guest's state is the only copy now: its held output may leave, once
                    // the arbiter no longer lets the standby take over from its older
                    // checkpoint.
                    if let Some(f) = &fence {
                        if let Err(why) = f.forget_standby() {
                            emit(&Event::Fenced {
                                error: rmc_mc::standby::error_chain(&e),
                                why: why.to_string(),
                            });
                            return Ok(ExitCode::from(3));
                        }
                    }
                    vm.disable_output_commit();
                    emit(&Event::StandbyLost {
                        standby,
                        error: rmc_mc::standby::error_chain(&e),
                        action: LossAction::Continue,
                    });
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn standby(a: StandbyArgs) -> Result<ExitCode> {
    use rmc_mc::standby::{error_chain, Standby, StandbyConfig};
    let secret = a.secret.read()?;
    // What protects the VM after a failover, if anything.
    let next = a.protect_with.map(|addr| {
        let mut c = rmc_mc::primary::PrimaryConfig::new(addr, secret.clone(), 0);
        c.transport = a.transport;
        c.heartbeat = a.heartbeat.get();
        c
    });
    let config = StandbyConfig {
        secret,
        memory_bytes: a.memory,
        heartbeat: a.heartbeat.get(),
        // Acknowledge only checkpoints this VMM can restore.
        // Show the console output of a Linux guest's checkpoints once they are held.
        restore: Some(std::sync::Arc::new(
            rmc::restore::VmRestoreCheck::with_console(
                console_to(&a.console)
                    .open()
                    .with_context(|| format!("Cannot open the console output {}", a.console))?,
            ),
        )),
        handshake_timeout: Duration::from_secs_f64(a.handshake_timeout.max(0.1)),
        // Only the primary the arbiter names may protect this standby.
        fencing: a.arbiter.arbiter.as_ref().map(|ep| {
            std::sync::Arc::new(fencing::StandbyFencing::new(ep))
                as std::sync::Arc<dyn rmc_mc::standby::FenceCheck>
        }),
        ..StandbyConfig::default()
    };
    a.arbiter.warn_if_none();
    let (mut sb, why) = Standby::bind_with(a.listen, a.transport, config)
        .with_context(|| format!("Cannot listen on {} ({})", a.listen, a.transport))?;
    emit(&Event::StandbyListening {
        transport: sb.transport(),
        addr: sb.local_addr(),
        why,
    });
    // Connections that never became a session (failed or slow handshakes, a standby busy with
    // another primary) are reported as they happen; they never touch the backup.
    if let Some(refusals) = sb.refusals() {
        std::thread::spawn(move || {
            for r in refusals {
                emit(&Event::Refused {
                    peer: r.peer,
                    error: error_chain(&r.error),
                });
            }
        });
    }
    let mut served = 0;
    while a.sessions.is_none_or(|n| served < n) {
        let s = sb.serve_one()?;
        let mut stale = false;
        served += 1;
        if sb.should_fail_over(&s) {
            if let Some(service) = a.service_addr {
                let bind_timeout = Duration::from_secs_f64(a.bind_timeout.max(0.0));
                let Some(ep) = &a.arbiter.arbiter else {
                    return failover(
                        &mut sb,
                        &s,
                        service,
                        a.run_for,
                        None,
                        bind_timeout,
                        next,
                        console_to(&a.console),
                    );
                };
                // Go live only after winning the arbiter's primary key: the lost primary's
                // lease must run out first, so it can never release again.
                let ttl = a.arbiter.ttl();
                let me = fencing::identity("standby");
                match fencing::Fence::take_over(
                    ep,
                    ttl,
                    &me,
                    // The session whose checkpoint the backup holds (with an arbiter, sync
                    // epochs of a later session leave it intact).
                    &sb.backup().map(|b| b.takeover_tokens()).unwrap_or_default(),
                    s.fence,
                    ttl * 2 + Duration::from_secs(1),
                ) {
                    Ok(f) => {
                        return failover(
                            &mut sb,
                            &s,
                            service,
                            a.run_for,
                            Some(f),
                            bind_timeout,
                            next,
                            console_to(&a.console),
                        )
                    }
                    Err(why) => {
                        stale = matches!(why, fencing::NoTakeover::StaleBackup(_));
                        emit(&Event::NotTakingOver {
                            reason: match why {
                                fencing::NoTakeover::PrimaryAlive(_) => {
                                    TakeoverRefusal::PrimaryAlive
                                }
                                fencing::NoTakeover::OtherPrimary(_) => {
                                    TakeoverRefusal::OtherPrimary
                                }
                                fencing::NoTakeover::StaleBackup(_) => TakeoverRefusal::StaleBackup,
                                fencing::NoTakeover::Unreachable(_) => TakeoverRefusal::Unreachable,
                            },
                            why: why.to_string(),
                        })
                    }
                }
            }
        }
        let backup = sb.backup();
        emit(&Event::SessionEnded {
            peer: s.peer,
            epochs: s.epochs,
            error: s.result.as_ref().err().map(|e| error_chain(e)),
            backup: match backup.map(|b| (b.checkpoint, b.armed)) {
                Some((Some(epoch), _)) if stale => Backup::Stale { epoch },
                Some((Some(epoch), true)) => Backup::Consistent { epoch },
                Some((Some(epoch), false)) => Backup::Released { epoch },
                _ => Backup::NoCheckpoint,
            },
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn devices(a: DevicesArgs) -> Result<ExitCode> {
    use rmc_transport::rdma_devices;
    match rdma_devices::list(&a.sysfs) {
        Ok(devs) => {
            print!("{}", rdma_devices::report(&devs));
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ rdma_devices::DevicesError::NoRdmaStack(_)) => {
            println!("No RDMA devices: {e}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

fn demo(a: DemoArgs) -> Result<ExitCode> {
    let c = rmc::demo::DemoConfig {
        memory: a.memory.clone(),
        after: Duration::from_secs_f64(a.after.max(0.2)),
        transport: a.transport,
        heartbeat: vec![
            "--heartbeat-ms".into(),
            a.heartbeat.heartbeat_ms.to_string(),
            "--heartbeat-misses".into(),
            a.heartbeat.heartbeat_misses.to_string(),
        ],
        standby_ip: match (a.standby_ip, a.transport) {
            (Some(ip), _) => ip,
            (None, Transport::Rdma) => rmc_transport::link::first_rdma_ip().ok_or_else(|| {
                anyhow::anyhow!(
                    "--transport rdma: no usable RDMA port with an IP address (see `rmc devices`)"
                )
            })?,
            (None, _) => std::net::Ipv4Addr::LOCALHOST.into(),
        },
        clients: a.clients.max(1),
        primary_extra: {
            a.output_trigger.get()?;
            let t = &a.output_trigger;
            let mut extra = vec![
                "--output-trigger".to_string(),
                format!("{:?}", t.output_trigger).to_lowercase(),
                "--output-min-gap-us".into(),
                t.output_min_gap_us.to_string(),
                "--output-max-pause-percent".into(),
                t.output_max_pause_percent.to_string(),
            ];
            if a.live_dirty_reads == OnOff::Off {
                extra.extend(["--live-dirty-reads".into(), "off".into()]);
            }
            if a.inject_fault == Some(Fault::ReleaseBeforeAck) {
                extra.extend(["--inject-fault".into(), "release-before-ack".into()]);
            }
            extra
        },
    };
    if a.guest == GuestArg::Linux {
        return demo_linux(&a, &c);
    }
    let trials = a.trials.max(1);
    let exe = rmc::demo::current_exe()?;
    emit(&Event::DemoStarted { trials });
    let mut times = Vec::new();
    let start = Instant::now();
    let moments = kill_moments(Duration::from_secs_f64(a.kill_after.max(0.1)), trials);
    for (i, kill_after) in moments.into_iter().enumerate() {
        let i = i as u32;
        let mut say = |m: &str| {
            emit(&Event::DemoStory {
                text: m.to_string(),
            })
        };
        let t = match rmc::demo::run_trial(&exe, &c, kill_after, i, &mut say) {
            Ok(t) => t,
            Err(e) => {
                emit(&Event::DemoTrialFailed {
                    trial: i + 1,
                    error: format!("{e:#}"),
                    inconsistency: e
                        .downcast_ref::<rmc::demo::Inconsistent>()
                        .map(|i| i.first.clone()),
                });
                return Ok(ExitCode::FAILURE);
            }
        };
        emit(&Event::DemoTrial {
            trial: i + 1,
            kill_after_s: kill_after.as_secs_f64(),
            clients: t.check.clients,
            requests: t.check.requests,
            replies: t.check.replies,
            late: t.late,
            from_elsewhere: t.from_elsewhere,
            needed_resend: t.check.needed_resend,
            resends: t.check.resends,
            failover_ms: t.failover.as_millis() as u64,
        });
        if i == 0 {
            emit(&Event::DemoStandby(t.standby));
        }
        times.push(t.failover.as_secs_f64() * 1000.0);
    }
    emit_demo_summary(times, start);
    Ok(ExitCode::SUCCESS)
}

/// The demo's last line: every trial passed, with the failover times (ms) of all of them.
fn emit_demo_summary(mut times: Vec<f64>, start: Instant) {
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    emit(&Event::DemoSummary {
        trials: times.len(),
        seconds: start.elapsed().as_secs_f64(),
        min_ms: q(0.0),
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        max_ms: q(1.0),
    });
}

/// Kill moments: the first at `base`, the others spread over [0.5, 1.5) of it in a
/// low-discrepancy sequence seeded by the clock, so every run hits other moments.
fn kill_moments(base: Duration, trials: u32) -> Vec<Duration> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| f64::from(d.subsec_nanos()) / 1e9)
        .unwrap_or(0.0);
    (0..trials)
        .map(|i| match i {
            0 => base,
            _ => base.mul_f64(0.5 + (seed + f64::from(i) * 0.618_034).fract()),
        })
        .collect()
}

/// `rmc demo --guest linux`.
fn demo_linux(a: &DemoArgs, c: &rmc::demo::DemoConfig) -> Result<ExitCode> {
    let kernel = match &a.kernel {
        Some(k) => k.clone(),
        None => rmc_vmm::linux::newest_kernel()
            .context("No /boot/vmlinuz-* (install linux-image-amd64 or give --kernel)")?,
    };
    let initrd = a.initrd.clone().context(
        "--guest linux needs --initrd: build one with `guest-linux/build-initramfs.sh --service seq -o seq.cpio.gz`",
    )?;
    let lc = rmc::demo_linux::LinuxDemoConfig {
        kernel,
        initrd,
        memory: c.memory.clone(),
        vcpus: a.vcpus.max(1),
        transport: c.transport,
        standby_ip: c.standby_ip,
        heartbeat: c.heartbeat.clone(),
        boot_timeout: Duration::from_secs_f64(a.boot_timeout.max(1.0)),
        // One second of output at 50 ms a line.
        after_lines: 20,
        primary_extra: c.primary_extra.clone(),
    };
    let trials = a.trials.max(1);
    let exe = rmc::demo::current_exe()?;
    emit(&Event::DemoStarted { trials });
    let start = Instant::now();
    let mut times = Vec::new();
    let moments = kill_moments(Duration::from_secs_f64(a.kill_after.max(0.1)), trials);
    for (i, kill_after) in moments.into_iter().enumerate() {
        let i = i as u32;
        let mut say = |m: &str| {
            emit(&Event::DemoStory {
                text: m.to_string(),
            })
        };
        let t = match rmc::demo_linux::run_linux_trial(&exe, &lc, kill_after, i, &mut say) {
            Ok(t) => t,
            Err(e) => {
                emit(&Event::DemoTrialFailed {
                    trial: i + 1,
                    error: format!("{e:#}"),
                    inconsistency: None,
                });
                return Ok(ExitCode::FAILURE);
            }
        };
        emit(&Event::DemoLinuxTrial {
            trial: i + 1,
            kill_after_s: kill_after.as_secs_f64(),
            boot_s: t.boot.as_secs_f64(),
            shown_at_kill: t.shown_at_kill,
            last: t.last,
            failover_ms: t.failover.as_millis() as u64,
        });
        if i == 0 {
            emit(&Event::DemoStandby(t.standby));
        }
        times.push(t.failover.as_secs_f64() * 1000.0);
    }
    emit_demo_summary(times, start);
    Ok(ExitCode::SUCCESS)
}

fn bench(a: BenchArgs, json: bool) -> Result<ExitCode> {
    use rmc::bench::{self, DirtySource};
    let c = bench::BenchConfig {
        source: match a.dirty_source {
            DirtySourceArg::Guest => DirtySource::Guest,
            DirtySourceArg::Host => DirtySource::Host,
        },
        mem_size: a.memory,
        dirty_pages: a.dirty_pages,
        epoch_ms: a.epoch_ms,
        transports: a.transport,
        vcpus: a.vcpus,
        seconds: a.seconds,
        heartbeat: a.heartbeat.get(),
        standby: match (a.standby, &a.secret_file) {
            (Some(addr), Some(f)) => Some((
                addr,
                SecretArgs {
                    secret_file: f.clone(),
                }
                .read()?,
            )),
            _ => None,
        },
    };
    let mut triggers = Vec::new();
    for &gap in &a.output_min_gap_us {
        for &percent in &a.output_max_pause_percent {
            if !(percent > 0.0 && percent <= 100.0) {
                bail!("--output-max-pause-percent must be above 0 and at most 100, not {percent}");
            }
            triggers.push(rmc_mc::protocol::OutputTrigger {
                min_gap: Duration::from_micros(gap),
                max_pause_share: percent / 100.0,
            });
        }
    }
    let r = bench::reply::ReplyConfig {
        loads: a
            .reply_loads
            .iter()
            .map(|l| match l {
                ReplyLoadArg::Request => bench::reply::Load::Request,
                ReplyLoadArg::Stream => bench::reply::Load::Stream,
            })
            .collect(),
        triggers,
        epoch_ms: a.reply_epoch_ms,
        seconds: a.seconds,
        window: a.reply_window,
        dirtier: rmc_vmm::DirtierConfig {
            pages: a.reply_dirty_pages.max(1),
            rate: a.reply_dirty_rate,
            limit: 0,
        },
    };
    bench::check_transports(&c)?;
    let mut progress = |m: &str| eprintln!("rmc bench: {m}");
    let rows = if a.part.contains(&BenchPart::Sweep) {
        bench::run(&c, &mut progress)?
    } else {
        Vec::new()
    };
    let mut reply = Vec::new();
    if a.part.contains(&BenchPart::Reply) {
        for &t in &c.transports {
            reply.extend(bench::reply::run(&c, &r, t, &mut progress)?);
        }
    }
    if let Some(path) = &a.svg {
        bench::svg(&rows, path).with_context(|| format!("Cannot write {}", path.display()))?;
        eprintln!("rmc bench: plot written to {}", path.display());
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "schema": bench::SCHEMA,
                "memory_bytes": a.memory,
                "rows": rows,
                "reply": reply,
            })
        );
    } else {
        if !rows.is_empty() {
            print!("{}", bench::table(&rows, a.memory));
        }
        if !reply.is_empty() {
            print!("{}", bench::reply::table(&reply, &r));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The primary is lost: run the VM from the backup on the service address.
#[allow(clippy::too_many_arguments)] // what the standby loop knows, each used once
fn failover(
    sb: &mut rmc_mc::standby::Standby,
    session: &rmc_mc::standby::Session,
    service: ServiceAddr,
    run_for: Option<f64>,
    fence: Option<fencing::Fence>,
    bind_timeout: Duration,
    next: Option<rmc_mc::primary::PrimaryConfig>,
    console: rmc_vmm::vm::ConsoleTo,
) -> Result<ExitCode> {
    sb.stop_listening();
    let backup = sb.take_backup().expect("checked by the caller");
    let epoch = backup.checkpoint.expect("checked by the caller");
    let state = rmc_vmm::VmState::decode(&backup.state).context("The backup's state blob")?;
    let service = match service {
        ServiceAddr::Fixed(a) => a,
        ServiceAddr::Primary => state.devices.nic.host_addr.context(
            "Failover: --service-addr primary, but the primary's checkpoint records no service address",
        )?,
    };
    let config = VmConfig {
        mem_size: backup.layout.total_pages() * PAGE_SIZE,
        // Restoring ignores the workloads: the vCPUs continue from their saved state.
        workloads: vec![Workload::Idle; backup.layout.vcpus as usize],
        nic_addr: Some(service),
        // A PC VM (a Linux guest) if the state is of one.
        console,
        ..Default::default()
    };
    // The address may still be held by the old primary (same host): a dying one lets go at
    // once; a frozen one, fenced, exits when it wakes.
    let start = Instant::now();
    let mut said = false;
    let vm = loop {
        match Vm::restore_on(&config, &state, backup.memory.clone()) {
            Ok(vm) => break vm,
            Err(rmc_vmm::VmError::Bind { .. }) if start.elapsed() < bind_timeout => {
                if !said && start.elapsed() > Duration::from_millis(500) {
                    eprintln!(
                        "rmc: failover: udp {service} is still in use (the old primary on this \
                         host?); retrying for up to {bind_timeout:?}"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e @ rmc_vmm::VmError::Bind { .. }) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "Failover: udp {service} was still in use after {bind_timeout:?} (is the old \
                     primary still running on this host? raise --bind-timeout); the backup of \
                     epoch {epoch} is lost with this process"
                )))
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context("Failover: cannot build the VM from the backup")
                )
            }
        }
    };
    if let Some(f) = &fence {
        let gate = f.gate();
        vm.set_send_gate(rmc_vmm::nic::SendGate::new(move || gate.is_valid()));
        f.exit_when_lost();
    }
    vm.resume();
    emit(&Event::FailedOver(FailedOver {
        epoch,
        cause: session
            .result
            .as_ref()
            .err()
            .map(|e| rmc_mc::standby::error_chain(e))
            .unwrap_or_default(),
        detected_ms: session.detection_time().as_millis() as u64,
        resumed_ms: session.ended.elapsed().as_millis() as u64,
        service,
    }));
    if let Some(mut config) = next {
        // The chain goes on: this VM is the primary now, protected by the next standby.
        config = rmc_mc::primary::PrimaryConfig {
            fencing: fence.as_ref().map(|f| f.for_primary()),
            protect_for: run_for.map(|d| Duration::from_secs_f64(d.max(0.0))),
            ..rmc_mc::primary::PrimaryConfig::new(
                config.standby,
                config.secret,
                backup.layout.total_pages(),
            )
            .with_link(config.transport, config.heartbeat)
        };
        emit(&Event::ProtectingFailedOver {
            standby: config.standby,
        });
        let how = Protection {
            limits: rmc_netbuf::Limits::default(),
            on_standby_loss: StandbyLoss::Continue,
            output_commit: true,
        };
        return protect(&vm, config, &how, fence);
    }
    let until = run_for.map(|d| Instant::now() + Duration::from_secs_f64(d.max(0.0)));
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some((i, why)) = vm.stopped_vcpus().first() {
            bail!("vCPU {i} of the failed-over VM stopped: {why}");
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            let s = vm.guest_status();
            emit(&Event::FailedOverVmStopped {
                counter: s.counter,
                requests: s.requests,
            });
            return Ok(ExitCode::SUCCESS);
        }
    }
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
    c.set_next_seq(a.first_seq);
    let first = a.first_seq.max(1);
    let mut last_counter = None;
    let deadline = Duration::from_secs_f64(a.timeout.max(0.001));
    let mut checker = Checker::new(a.exclusive);
    let mut latencies = Vec::with_capacity(a.requests as usize);
    let start = Instant::now();
    emit(&Event::ClientStarted {
        client_id,
        server: a.server,
    });
    let inconsistent = |checker: &Checker| -> Option<ExitCode> {
        let first = checker.violations().first()?;
        emit(&Event::ClientInconsistent {
            violation: first.clone(),
        });
        Some(ExitCode::FAILURE)
    };
    for i in 1..=a.requests {
        let seq = first + i - 1;
        checker.sent(client_id, seq);
        let mut on_reply = |r: &rmc_vmm::service::Reply| {
            // Contradictions are kept by the checker and reported below.
            let _ = checker.check(r);
        };
        let sent_at = Instant::now();
        let (r, resent) = c.request(deadline, &mut on_reply)?;
        latencies.push(sent_at.elapsed());
        checker.resent(client_id, seq, resent);
        last_counter = Some(r.counter);
        if !a.quiet {
            emit(&Event::ClientReply {
                seq: r.seq,
                counter: r.counter,
                status: r.status,
            });
        }
        if a.repeat_every > 0 && i % a.repeat_every == 0 {
            let (again, resent) = c.repeat(r.seq, deadline, |r| {
                let _ = checker.check(r);
            })?;
            checker.resent(client_id, seq, resent);
            if !a.quiet {
                emit(&Event::ClientRepeat {
                    seq: again.seq,
                    counter: again.counter,
                });
            }
        }
        if a.check {
            if let Some(code) = inconsistent(&checker) {
                return Ok(code);
            }
        }
    }
    // Replies still on their way (answers to resends) count too.
    let late = c.drain(
        Duration::from_millis(a.retry_ms.clamp(50, 1000)),
        Duration::from_secs(2),
        |r| {
            let _ = checker.check(r);
        },
    )?;
    if a.check {
        if let Some(code) = inconsistent(&checker) {
            return Ok(code);
        }
    }
    let s = checker.summary();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0, |d| d.as_micros())
    };
    emit(&Event::ClientSummary {
        requests: a.requests,
        replies: s.replies,
        late,
        from_elsewhere: c.from_elsewhere(),
        needed_resend: s.needed_resend,
        resends_and_repeats: s.resends + a.requests.checked_div(a.repeat_every).unwrap_or(0),
        seconds: start.elapsed().as_secs_f64(),
        latency_p50_us: pct(0.5) as u64,
        latency_p99_us: pct(0.99) as u64,
        last_counter,
        consistent: a.check,
    });
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
    fn service_addresses() {
        assert_eq!(parse_service_addr("primary"), Ok(ServiceAddr::Primary));
        assert_eq!(
            parse_service_addr("10.0.0.5:7000"),
            Ok(ServiceAddr::Fixed("10.0.0.5:7000".parse().unwrap()))
        );
        assert!(parse_service_addr("10.0.0.5")
            .unwrap_err()
            .contains("nor the word `primary`"));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
