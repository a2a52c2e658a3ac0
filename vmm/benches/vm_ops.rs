//! VM operation latencies the checkpoint pause is made of:
//! pause + resume of all vCPUs (1 and 4 vCPUs), and the dirty-page harvest of 1,000 dirty
//! pages in a 256 MiB and a 4 GiB guest.
//!
//! `cargo bench -p rmc-vmm --bench vm_ops` (needs /dev/kvm). Criterion prints the median
//! ("time: [low median high]") of each.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rmc_vmm::{DirtierConfig, Vm, VmConfig, Workload};

fn vm(mem_size: u64, workloads: Vec<Workload>) -> Vm {
    let vm = Vm::new(&VmConfig {
        mem_size,
        workloads,
        nic_addr: None,
        ..Default::default()
    })
    .expect("VM (does this machine have /dev/kvm?)");
    vm.resume();
    vm
}

fn pause_resume(c: &mut Criterion) {
    let mut g = c.benchmark_group("pause_resume");
    g.sample_size(200);
    // Busy vCPUs (dirtiers running flat out) must each be kicked out of KVM_RUN by a signal;
    // idle ones are blocked in a device wait and are woken through their eventfd.
    let busy = Workload::Dirtier(DirtierConfig {
        pages: 64,
        rate: 0,
        limit: 0,
    });
    for (name, vcpus, workload) in [
        ("1_vcpu_busy", 1usize, busy),
        ("4_vcpus_busy", 4, busy),
        ("4_vcpus_waiting", 4, Workload::Idle),
    ] {
        let vm = vm(256 << 20, vec![workload; vcpus]);
        std::thread::sleep(Duration::from_millis(50));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    vm.pause().expect("pause");
                    vm.resume();
                    total += t.elapsed();
                    // Let the vCPUs get back into the guest before the next pause.
                    std::thread::sleep(Duration::from_micros(200));
                }
                total
            })
        });
    }
    g.finish();
}

fn harvest(c: &mut Criterion) {
    const PAGES: u64 = 1000;
    let mut g = c.benchmark_group("harvest_1000_dirty_pages");
    g.sample_size(20);
    for (name, mem) in [("256MiB", 256u64 << 20), ("4GiB", 4u64 << 30)] {
        let vm = vm(
            mem,
            vec![Workload::Dirtier(DirtierConfig {
                pages: PAGES,
                rate: 0,
                limit: 0,
            })],
        );
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Let the dirtier rewrite its whole working set, then harvest paused.
                    let start = vm.dirtier_progress(0);
                    while vm.dirtier_progress(0) < start + PAGES + 1 {
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    vm.pause().expect("pause");
                    let t = Instant::now();
                    let set = vm.harvest_dirty().expect("harvest");
                    total += t.elapsed();
                    assert!(set.len() as u64 >= PAGES, "only {} dirty pages", set.len());
                    vm.resume();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pause_resume, harvest);
criterion_main!(benches);
