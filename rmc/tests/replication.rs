//! End to end with a real VM: a primary checkpoints to a standby for many epochs under load
//! (over TCP loopback: at least 500; over RDMA, inside the Soft-RoCE VM where everything runs
//! emulated: at least 200); at a quiescent point the standby's backup equals the primary
//! (memory page by page, and state byte for byte); a VM built on the backup continues the
//! counter from its last acknowledged value.
//!
//! Nothing here is a speed requirement: every wait is a hang guard of minutes (the loops fail
//! only when nothing moved for [`HANG_GUARD`]); speed is measured by the benchmarks.
//!
//! The tests named `rdma_*` always use RDMA and are `#[ignore]`d: they need an RDMA device
//! and run inside the Soft-RoCE VM (`soft-roce/rdma-tests.sh` runs them by name with
//! `--ignored --exact`). Run with `--ignored` on a host without RDMA (or KVM) they fail, never
//! pass.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rmc_mc::primary::{Primary, PrimaryConfig};
use rmc_mc::protocol::Heartbeat;
use rmc_mc::standby::{Standby, StandbyConfig};
use rmc_mc::PAGE_SIZE;
use rmc_staging::PAGE_BYTES;
use rmc_tests::{init_logs, kvm_available, wait_for};
use rmc_transport::link::{first_rdma_ip, Transport};
use rmc_vmm::service::{Client, Reply};
use rmc_vmm::{DirtierConfig, Vm, VmConfig, VmState, Workload};
use vm_memory::{Bytes, GuestAddress};

const SECRET: &[u8] = b"replication test secret";

/// How long a wait may see nothing move before the test is declared hung. A hang guard for
/// a loaded machine (or the emulated Soft-RoCE VM), not a speed requirement.
const HANG_GUARD: Duration = Duration::from_secs(180);

/// Heartbeats on the host (TCP): no test here measures silence detection, so the timeout is
/// long enough that a scheduling stall on a busy machine is never taken for a lost peer.
const TCP_HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    timeout: Duration::from_secs(5),
};

/// Heartbeats in the Soft-RoCE VM, where everything is software-emulated (~30x slower):
/// liveness is judged over seconds.
const RDMA_HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(200),
    timeout: Duration::from_secs(5),
};

/// The IP address of this host's first usable RDMA port; fails the test where there is none.
fn rdma_ip() -> std::net::IpAddr {
    first_rdma_ip().unwrap_or_else(|| {
        panic!(
            "no usable RDMA port with an IP address on this host: this test needs an RDMA \
             device and runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)"
        )
    })
}

/// For the `#[ignore]`d RDMA tests: they run only where asked for by name, so a missing KVM
/// fails them instead of skipping them.
fn require_kvm(test: &str) {
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "{test}: /dev/kvm cannot be opened; this test needs KVM (nested, inside the Soft-RoCE VM)"
    );
}

/// Waits for `cond`, failing after [`HANG_GUARD`].
fn eventually(what: &str, cond: impl FnMut() -> bool) {
    wait_for(
        &format!("{what} (a hang guard, not a speed requirement)"),
        HANG_GUARD,
        cond,
    );
}

/// One request to the guest's counter service; a reply that never comes fails the test after
/// [`HANG_GUARD`] (the client resends meanwhile).
fn request(client: &mut Client) -> Reply {
    client
        .request(HANG_GUARD, |_| {})
        .unwrap_or_else(|e| panic!("{e} (a hang guard, not a speed requirement)"))
        .0
}

/// A deliberate repeat of `seq`, with the same hang guard.
fn repeat(client: &mut Client, seq: u64) -> Reply {
    client
        .repeat(seq, HANG_GUARD, |_| {})
        .unwrap_or_else(|e| panic!("{e} (a hang guard, not a speed requirement)"))
        .0
}

/// Fails the test when the observed values stay unchanged for [`HANG_GUARD`].
struct Stall<T> {
    last: T,
    since: Instant,
}

impl<T: PartialEq + std::fmt::Debug> Stall<T> {
    fn new(now: T) -> Self {
        Stall {
            last: now,
            since: Instant::now(),
        }
    }

    fn check(&mut self, now: T, what: &str) {
        if now != self.last {
            self.last = now;
            self.since = Instant::now();
        }
        assert!(
            self.since.elapsed() < HANG_GUARD,
            "hung: {what} stayed at {:?} for {HANG_GUARD:?} (a hang guard, not a speed \
             requirement)",
            self.last
        );
    }
}

#[test]
fn replicates_500_epochs_then_backup_equals_primary_and_runs() {
    if !kvm_available("replicates_500_epochs_then_backup_equals_primary_and_runs") {
        return;
    }
    replicate(Transport::Tcp, 500, 50_000, TCP_HEARTBEAT);
}

/// The same over RDMA (inside the Soft-RoCE VM).
#[test]
#[ignore = "needs an RDMA device: runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)"]
fn rdma_replicates_200_epochs_then_backup_equals_primary_and_runs() {
    rdma_ip();
    require_kvm("rdma_replicates_200_epochs_then_backup_equals_primary_and_runs");
    replicate(Transport::Rdma, 200, 20_000, RDMA_HEARTBEAT);
}

/// With the dirtier still writing when the last checkpoint is taken (no quiescent point): the
/// backup must equal the paused primary all the same, and the VM built on it must keep both
/// vCPUs running. Over TCP, or over RDMA with `RMC_TEST_TRANSPORT=rdma` (in the Soft-RoCE VM).
#[test]
fn replicates_with_the_guest_busy_then_backup_equals_primary_and_runs() {
    let name = "replicates_with_the_guest_busy_then_backup_equals_primary_and_runs";
    if !kvm_available(name) {
        return;
    }
    let (transport, hb) = match std::env::var("RMC_TEST_TRANSPORT").as_deref() {
        Ok("rdma") => (Transport::Rdma, RDMA_HEARTBEAT),
        _ => (Transport::Tcp, TCP_HEARTBEAT),
    };
    replicate(transport, 200, 0, hb);
}

/// A standby for a 64 MiB guest on `transport` (loopback for TCP, the first RDMA port's
/// address for RDMA), serving one session on a thread that returns it and the session.
fn spawn_standby(
    transport: Transport,
    hb: Heartbeat,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<(Standby, rmc_mc::standby::Session)>,
) {
    let listen = match transport {
        Transport::Rdma => std::net::SocketAddr::new(rdma_ip(), 0),
        _ => "127.0.0.1:0".parse().unwrap(),
    };
    let (mut sb, _) = Standby::bind_with(
        listen,
        transport,
        StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: Some(64 << 20),
            heartbeat: hb,
            ..StandbyConfig::default()
        },
    )
    .unwrap();
    assert_eq!(sb.transport(), transport);
    let addr = sb.local_addr();
    let handle = std::thread::spawn(move || {
        let session = sb.serve_one().unwrap();
        (sb, session)
    });
    (addr, handle)
}

fn replicate(transport: Transport, min_epochs: u64, limit: u64, hb: Heartbeat) {
    init_logs();
    let (standby_addr, standby) = spawn_standby(transport, hb);

    let cfg = VmConfig {
        mem_size: 64 << 20,
        workloads: vec![
            Workload::Counter,
            Workload::Dirtier(DirtierConfig {
                pages: 3000,
                rate: 15_000,
                limit,
            }),
        ],
        nic_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let vm = Vm::new(&cfg).unwrap();
    vm.resume();
    let mut config = PrimaryConfig::new(standby_addr, SECRET.to_vec(), (64 << 20) / PAGE_SIZE);
    config.epoch_interval = Duration::from_millis(4);
    config.transport = transport;
    config.heartbeat = hb;
    let primary = Primary::connect(&vm, config).unwrap();
    assert_eq!(primary.transport(), transport);
    let acked = primary.acked_counter();
    let stop = AtomicBool::new(false);
    let mut client = Client::new(vm.nic_addr().unwrap(), 11).unwrap();
    let mut last_reply = None;
    let stats = std::thread::scope(|s| {
        let run = s.spawn(|| primary.run(&stop));
        let start = Instant::now();
        let mut stall = Stall::new((0, 0));
        // Load for at least 3 s: requests while the dirtier runs, until it reaches its limit
        // and at least `min_epochs` checkpoints are acknowledged, however long that takes.
        // (limit 0: the dirtier never stops; the last checkpoint then catches it mid-stream.)
        while (limit > 0 && vm.dirtier_progress(1) < limit)
            || start.elapsed() < Duration::from_secs(3)
            || acked.load(Ordering::Relaxed) < min_epochs
        {
            if run.is_finished() {
                let r = run.join().unwrap();
                panic!(
                    "the primary stopped before it was asked to, after {} checkpoints: {:?}",
                    acked.load(Ordering::Relaxed),
                    r.map(|_| ()).map_err(|e| rmc_mc::standby::error_chain(&e))
                );
            }
            last_reply = Some(request(&mut client));
            // Pacing of the load (a request every ~5 ms), not a synchronization.
            std::thread::sleep(Duration::from_millis(5));
            stall.check(
                (vm.dirtier_progress(1), acked.load(Ordering::Relaxed)),
                "(dirtier page writes, acknowledged checkpoints)",
            );
        }
        // Quiescent: dirtier done, no requests in flight. The last checkpoint pauses the guest.
        stop.store(true, Ordering::Release);
        run.join().unwrap()
    })
    .unwrap_or_else(|e| panic!("the primary failed: {}", rmc_mc::standby::error_chain(&e)));
    let last_reply = last_reply.unwrap();
    eprintln!(
        "{transport}: {} checkpoints, pause p50 {} us p99 {} us, ack p50 {} us",
        stats.checkpoints_acked,
        stats.pause_us.value_at_quantile(0.5),
        stats.pause_us.value_at_quantile(0.99),
        stats.ack_us.value_at_quantile(0.5)
    );
    assert!(
        stats.checkpoints_acked >= min_epochs,
        "only {} checkpoints",
        stats.checkpoints_acked
    );
    assert!(
        vm.is_paused(),
        "the last checkpoint leaves the guest paused"
    );

    let (mut sb, session) = standby.join().unwrap();
    session.result.expect("the session ends cleanly");
    let backup = sb.take_backup().expect("a backup");
    assert_eq!(backup.checkpoint, Some(stats.last_acked));
    assert_eq!(backup.last_applied, stats.last_acked);

    // Memory, page by page.
    let mut differing = Vec::new();
    let (mut a, mut b) = (vec![0u8; PAGE_BYTES], vec![0u8; PAGE_BYTES]);
    for &(base, len) in vm.regions() {
        for addr in (base..base + len).step_by(PAGE_BYTES) {
            vm.memory().read_slice(&mut a, GuestAddress(addr)).unwrap();
            backup
                .memory
                .read_slice(&mut b, GuestAddress(addr))
                .unwrap();
            if a != b {
                differing.push(addr);
            }
        }
    }
    assert!(
        differing.is_empty(),
        "{} pages differ, first {:#x?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );
    // State: the guest is still paused at the checkpoint's instant, so everything matches
    // except the TSC, which counts on while a vCPU is paused (KVM reads it as host TSC +
    // offset), so a second read of MSR_IA32_TSC is later than the checkpoint's.
    // Likewise the Hyper-V time MSRs that KVM lists when it runs nested (as in the Soft-RoCE
    // VM): HV_X64_MSR_VP_RUNTIME and HV_X64_MSR_TIME_REF_COUNT are read from clocks, not from
    // the vCPU's saved state.
    const MSR_IA32_TSC: u32 = 0x10;
    const CLOCKS: [u32; 3] = [MSR_IA32_TSC, 0x4000_0010, 0x4000_0020];
    let now = vm.save_state().unwrap();
    let saved = VmState::decode(&backup.state).unwrap();
    assert_eq!(now.devices, saved.devices);
    assert_eq!(now.vcpus.len(), saved.vcpus.len());
    for (a, b) in now.vcpus.iter().zip(&saved.vcpus) {
        assert_eq!(format!("{:?}", a.regs), format!("{:?}", b.regs));
        assert_eq!(format!("{:?}", a.sregs), format!("{:?}", b.sregs));
        assert_eq!(a.xsave, b.xsave);
        assert_eq!(
            format!("{:?}{:?}", a.xcrs, a.debugregs),
            format!("{:?}{:?}", b.xcrs, b.debugregs)
        );
        assert_eq!(
            format!("{:?}{:?}", a.events, a.mp_state),
            format!("{:?}{:?}", b.events, b.mp_state)
        );
        let other = |m: &[(u32, u64)]| {
            m.iter()
                .filter(|(i, _)| !CLOCKS.contains(i))
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(other(&a.msrs), other(&b.msrs));
        // The TSC re-read later is at least the saved one, on real KVM. Not over RDMA: that
        // variant runs in the Soft-RoCE VM, KVM nested in a software-emulated CPU, where a
        // paused vCPU's TSC was seen to step backwards between two reads.
        let get = |m: &[(u32, u64)], i: u32| m.iter().find(|x| x.0 == i).map(|x| x.1);
        if transport == Transport::Tcp {
            assert!(
                get(&a.msrs, MSR_IA32_TSC) >= get(&b.msrs, MSR_IA32_TSC),
                "the TSC only moves forward"
            );
        }
    }
    let counter = vm.guest_status().counter;
    assert_eq!(counter, last_reply.counter);
    drop(vm);

    // The standby's VM: built on the backup memory, it continues the service.
    let state = VmState::decode(&backup.state).unwrap();
    let vm2 = Vm::restore_on(&cfg, &state, backup.memory).unwrap();
    vm2.resume();
    let mut client = Client::new(vm2.nic_addr().unwrap(), 11).unwrap();
    let again = repeat(&mut client, last_reply.seq);
    assert_eq!(
        again, last_reply,
        "the last acknowledged reply is answered identically"
    );
    let next = repeat(&mut client, last_reply.seq + 1);
    assert_eq!(
        next.counter,
        counter + 1,
        "the counter continues from the last acknowledged value"
    );
    keeps_running(&vm2, &mut client, &next, limit == 0, "");
}

/// Both vCPUs of a VM built on a backup keep running: vCPU 0 answers at least 20 more
/// requests over at least 500 ms, each continuing the counter from `newest` (the newest reply
/// to `client`); with `dirtier_runs`, the dirtier on vCPU 1 writes at least 5,000 more pages;
/// and no vCPU stopped meanwhile. (The 500 ms are a window of observation, not a time limit.)
fn keeps_running(vm: &Vm, client: &mut Client, newest: &Reply, dirtier_runs: bool, ctx: &str) {
    let p0 = vm.dirtier_progress(1);
    client.set_next_seq(newest.seq + 1);
    let mut counter = newest.counter;
    let start = Instant::now();
    let mut answered = 0;
    while answered < 20 || start.elapsed() < Duration::from_millis(500) {
        let r = request(client);
        assert_eq!(r.counter, counter + 1, "{ctx}the counter continues");
        counter = r.counter;
        answered += 1;
        assert!(
            vm.stopped_vcpus().is_empty(),
            "{ctx}a vCPU of the VM on the backup stopped: {:?}",
            vm.stopped_vcpus()
        );
    }
    if dirtier_runs {
        eventually(&format!("{ctx}the dirtier continues on the backup"), || {
            vm.dirtier_progress(1) >= p0 + 5_000 || !vm.stopped_vcpus().is_empty()
        });
    }
    assert!(
        vm.stopped_vcpus().is_empty(),
        "{ctx}a vCPU of the VM on the backup stopped: {:?}",
        vm.stopped_vcpus()
    );
}

/// Failover over RDMA, ten trials in this process: while a client talks to the guest (output
/// commit on, the dirtier busy), the primary's connection is cut abruptly at a different moment
/// each time (rdma_disconnect, no goodbye: as if its host died). The standby must end the
/// session as a lost primary with a consistent checkpoint, and a VM built on its backup must
/// answer the client's last request identically, continue the counter by one, and keep both
/// vCPUs running. Runs inside the Soft-RoCE VM.
#[test]
#[ignore = "needs an RDMA device: runs inside the Soft-RoCE VM (soft-roce/rdma-tests.sh, part of make test)"]
fn rdma_failover_trials_in_process() {
    rdma_ip();
    require_kvm("rdma_failover_trials_in_process");
    init_logs();
    let hb = RDMA_HEARTBEAT;
    for trial in 0..10u64 {
        let (addr, standby) = spawn_standby(Transport::Rdma, hb);
        let cfg = VmConfig {
            mem_size: 64 << 20,
            workloads: vec![
                Workload::Counter,
                Workload::Dirtier(DirtierConfig {
                    pages: 2000,
                    rate: 10_000,
                    limit: 0,
                }),
            ],
            nic_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let vm = Vm::new(&cfg).unwrap();
        vm.enable_output_commit(rmc_netbuf::Limits {
            max_bytes: 1 << 20,
            max_packets: 1024,
        })
        .unwrap();
        vm.resume();
        let mut config = PrimaryConfig::new(addr, SECRET.to_vec(), (64 << 20) / PAGE_SIZE);
        config.transport = Transport::Rdma;
        config.heartbeat = hb;
        let primary = Primary::connect(&vm, config).unwrap();
        assert_eq!(primary.transport(), Transport::Rdma);
        let acked = primary.acked_counter();
        let kill = primary.kill_switch().unwrap();
        let client_id = 0x5000 + trial;
        let mut client = Client::new(vm.nic_addr().unwrap(), client_id).unwrap();
        let stop = AtomicBool::new(false);
        let last = std::thread::scope(|s| {
            let run = s.spawn(|| primary.run(&stop));
            eventually(
                &format!("trial {trial}: the first acknowledged checkpoint"),
                || acked.load(Ordering::Relaxed) > 0 || run.is_finished(),
            );
            if run.is_finished() {
                let r = run.join().unwrap();
                panic!(
                    "trial {trial}: the primary stopped before it was cut: {:?}",
                    r.map(|_| ()).map_err(|e| rmc_mc::standby::error_chain(&e))
                );
            }
            // Cut at a different moment each trial; no request is in flight at the cut.
            let until = Instant::now() + Duration::from_millis(150 * (1 + trial % 7));
            let mut last = None;
            while last.is_none() || Instant::now() < until {
                last = Some(request(&mut client));
            }
            // Replies come slowly under emulation (one per acknowledged checkpoint), so also
            // let a varying part of the next epoch pass before the cut. This varies the moment
            // of the cut; it synchronizes nothing.
            std::thread::sleep(Duration::from_millis(97 * trial % 450));
            kill.close();
            let r = run.join().unwrap();
            assert!(r.is_err(), "the primary must see its link cut");
            last.unwrap()
        });
        drop(vm);
        let (mut sb, session) = standby.join().unwrap();
        let err = rmc_mc::standby::error_chain(
            &session
                .result
                .expect_err("a cut without goodbye is a lost primary"),
        );
        let backup = sb.take_backup().unwrap();
        let epoch = backup
            .checkpoint
            .expect("the backup is a consistent checkpoint");
        let state = VmState::decode(&backup.state).unwrap();
        let vm2 = Vm::restore_on(&cfg, &state, backup.memory).unwrap();
        vm2.resume();
        let mut client = Client::new(vm2.nic_addr().unwrap(), client_id).unwrap();
        let again = repeat(&mut client, last.seq);
        assert_eq!(
            again, last,
            "trial {trial}: the last reply is answered identically"
        );
        let next = repeat(&mut client, last.seq + 1);
        assert_eq!(
            next.counter,
            last.counter + 1,
            "trial {trial}: the counter continues"
        );
        keeps_running(&vm2, &mut client, &next, true, &format!("trial {trial}: "));
        eprintln!(
            "trial {trial}: cut {} ms after a reply, {} checkpoints acknowledged; standby: {err}; VM on the backup of epoch {epoch} answered seq {} identically and continued",
            97 * trial % 450,
            acked.load(Ordering::Relaxed),
            last.seq
        );
    }
}
