//! Liveness that busy work cannot starve (KVM): a 4 GiB guest's live full sync and a few
//! seconds of checkpoints, with a CPU hog on every core of the machine and the default
//! heartbeat settings, end without either side declaring the other lost. Heartbeats go out
//! from threads of their own (the standby's while it applies multi-MiB sync epochs), and the
//! default timeout is far above the scheduling delays measured on such a machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmc::restore::VmRestoreCheck;
use rmc_mc::primary::{Primary, PrimaryConfig};
use rmc_mc::protocol::Heartbeat;
use rmc_mc::standby::{Standby, StandbyConfig};
use rmc_mc::PAGE_SIZE;
use rmc_tests::{init_logs, kvm_available};
use rmc_vmm::{DirtierConfig, Vm, VmConfig, Workload};

const SECRET: &[u8] = b"liveness under load test secret";
const MEM: u64 = 4 << 30;

#[test]
fn a_multi_gib_full_sync_with_every_core_busy_is_no_loss() {
    if !kvm_available("a_multi_gib_full_sync_with_every_core_busy_is_no_loss") {
        return;
    }
    init_logs();
    let hogging = Arc::new(AtomicBool::new(true));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..cores)
        .map(|_| {
            let hogging = hogging.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while hogging.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();

    let mut sb = Standby::bind(
        "127.0.0.1:0".parse().unwrap(),
        StandbyConfig {
            secret: SECRET.to_vec(),
            memory_bytes: Some(MEM),
            heartbeat: Heartbeat::default(),
            restore: Some(Arc::new(VmRestoreCheck::default())),
            ..StandbyConfig::default()
        },
    )
    .unwrap();
    let addr = sb.local_addr();
    let standby = std::thread::spawn(move || sb.serve_one());

    let vm = Vm::new(&VmConfig {
        mem_size: MEM,
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
    })
    .unwrap();
    vm.resume();
    let mut config = PrimaryConfig::new(addr, SECRET.to_vec(), MEM / PAGE_SIZE);
    assert_eq!(config.heartbeat, Heartbeat::default());
    config.protect_for = Some(Duration::from_secs(3));
    let stop = AtomicBool::new(false);
    let result = Primary::connect(&vm, config).and_then(|p| p.run(&stop));
    hogging.store(false, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let stats = result.expect("no false loss of the standby under load");
    eprintln!(
        "4 GiB full sync of {} pages in {:.2} s with {cores} CPU hogs; {} checkpoints",
        stats.sync_pages,
        stats.sync_time.as_secs_f64(),
        stats.checkpoints_acked
    );
    assert!(
        stats.sync_pages >= MEM / PAGE_SIZE,
        "the whole guest was synced"
    );
    assert!(stats.checkpoints_acked >= 1);
    let session = standby.join().unwrap().unwrap();
    session
        .result
        .expect("no false loss of the primary under load: the session ended with a goodbye");
}
