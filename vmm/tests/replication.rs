//! End to end over TCP loopback with a real VM: a primary checkpoints to a standby for at
//! least 500 epochs under load; at a quiescent point the standby's backup equals the primary
//! (memory page by page, and state byte for byte); a VM built on the backup continues the
//! counter from its last acknowledged value.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{init_logs, kvm_available, wait_for};
use rmc_mc::core::Heartbeat;
use rmc_mc::primary::{Primary, PrimaryConfig};
use rmc_mc::standby::{Standby, StandbyConfig};
use rmc_vmm::service::Client;
use rmc_vmm::{DirtierConfig, Vm, VmConfig, VmState, Workload};
use vm_memory::{Bytes, GuestAddress};

const SECRET: &[u8] = b"replication test secret";
const T: Duration = Duration::from_secs(20);

#[test]
fn replicates_500_epochs_then_backup_equals_primary_and_runs() {
    if !kvm_available("replicates_500_epochs_then_backup_equals_primary_and_runs") {
        return;
    }
    init_logs();
    let mut sb = Standby::bind(
        "127.0.0.1:0".parse().unwrap(),
        StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: Some(64 << 20),
            heartbeat: Heartbeat::default(),
        },
    )
    .unwrap();
    let standby_addr = sb.local_addr();
    let standby = std::thread::spawn(move || {
        let session = sb.serve_one().unwrap();
        (sb, session)
    });

    const LIMIT: u64 = 50_000;
    let cfg = VmConfig {
        mem_size: 64 << 20,
        workloads: vec![
            Workload::Counter,
            Workload::Dirtier(DirtierConfig {
                pages: 3000,
                rate: 15_000,
                limit: LIMIT,
            }),
        ],
        nic_addr: Some("127.0.0.1:0".parse().unwrap()),
    };
    let vm = Vm::new(&cfg).unwrap();
    vm.resume();
    let mut config = PrimaryConfig::new(standby_addr, SECRET.to_vec(), (64 << 20) / 4096);
    config.epoch_interval = Duration::from_millis(4);
    let primary = Primary::connect(&vm, config).unwrap();
    let stop = AtomicBool::new(false);
    let mut client = Client::new(vm.nic_addr().unwrap(), 11).unwrap();
    let mut last_reply = None;
    let stats = std::thread::scope(|s| {
        let run = s.spawn(|| primary.run(&stop));
        let start = Instant::now();
        // Load: requests while the dirtier runs, until it reaches its limit.
        while vm.dirtier_progress(1) < LIMIT || start.elapsed() < Duration::from_secs(3) {
            last_reply = Some(client.request(T, |_| {}).unwrap().0);
            std::thread::sleep(Duration::from_millis(5));
            assert!(start.elapsed() < T, "dirtier too slow");
        }
        // Quiescent: dirtier done, no requests in flight. The last checkpoint pauses the guest.
        stop.store(true, Ordering::Release);
        run.join().unwrap()
    })
    .unwrap();
    let last_reply = last_reply.unwrap();
    eprintln!(
        "{} checkpoints, pause p50 {} us p99 {} us, ack p50 {} us",
        stats.checkpoints_acked,
        stats.pause_us.value_at_quantile(0.5),
        stats.pause_us.value_at_quantile(0.99),
        stats.ack_us.value_at_quantile(0.5)
    );
    assert!(
        stats.checkpoints_acked >= 500,
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
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    for &(base, len) in vm.regions() {
        for addr in (base..base + len).step_by(4096) {
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
    const MSR_IA32_TSC: u32 = 0x10;
    let now = vm.save_state().unwrap();
    let saved = VmState::decode(&backup.state).unwrap();
    assert_eq!(now.nic, saved.nic);
    assert_eq!(now.console, saved.console);
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
                .filter(|(i, _)| *i != MSR_IA32_TSC)
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(other(&a.msrs), other(&b.msrs));
        let tsc = |m: &[(u32, u64)]| m.iter().find(|(i, _)| *i == MSR_IA32_TSC).map(|x| x.1);
        assert!(tsc(&a.msrs) >= tsc(&b.msrs), "the TSC only moves forward");
    }
    let counter = vm.guest_status().counter;
    assert_eq!(counter, last_reply.counter);
    drop(vm);

    // The standby's VM: built on the backup memory, it continues the service.
    let state = VmState::decode(&backup.state).unwrap();
    let vm2 = Vm::restore_on(&cfg, &state, backup.memory).unwrap();
    vm2.resume();
    let mut client = Client::new(vm2.nic_addr().unwrap(), 11).unwrap();
    let (again, _) = client.repeat(last_reply.seq, T, |_| {}).unwrap();
    assert_eq!(
        again, last_reply,
        "the last acknowledged reply is answered identically"
    );
    let (next, _) = client.repeat(last_reply.seq + 1, T, |_| {}).unwrap();
    assert_eq!(
        next.counter,
        counter + 1,
        "the counter continues from the last acknowledged value"
    );
    wait_for("no vCPU stopped", Duration::from_millis(50), || {
        vm2.stopped_vcpus().is_empty()
    });
}
