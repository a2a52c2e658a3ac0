//! Runs a Linux guest while doing one kind of checkpoint work to it at a fixed rate, and
//! reports whether (and when) a vCPU stopped. Used to find which of a checkpoint's steps a
//! platform does not survive (see docs/DEVELOPING.md, "Linux guests"):
//!
//! ```text
//! cargo run --release -p rmc-vmm --example linux_stress -- \
//!     KERNEL INITRD VCPUS SECONDS MODE EVERY_MS CONSOLE_FILE
//! ```
//!
//! MODE is one of
//! - `none`: the guest only runs (the baseline);
//! - `pause`: stop and resume the vCPUs;
//! - `harvest`: read the dirty log while the guest runs;
//! - `pause-harvest`: pause, read the dirty log, resume;
//! - `save`: pause, read the dirty log, save the whole state, resume (a checkpoint's pause).
//!
//! Prints one line per second (work done, pauses' median) and exits 0 if every vCPU is still
//! running at the end, 1 with the stopped vCPUs' reasons otherwise.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rmc_vmm::linux::{LinuxBoot, DEFAULT_CMDLINE};
use rmc_vmm::vm::ConsoleTo;
use rmc_vmm::{Vm, VmConfig, Workload};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 7 {
        eprintln!("usage: linux_stress KERNEL INITRD VCPUS SECONDS none|pause|harvest|pause-harvest|save EVERY_MS CONSOLE_FILE");
        std::process::exit(2);
    }
    let vcpus: usize = args[2].parse().expect("VCPUS is a number");
    let seconds: f64 = args[3].parse().expect("SECONDS is a number");
    let mode = args[4].as_str();
    assert!(
        ["none", "pause", "harvest", "pause-harvest", "save"].contains(&mode),
        "MODE is none, pause, harvest, pause-harvest or save"
    );
    let every = Duration::from_secs_f64(args[5].parse::<f64>().expect("EVERY_MS") / 1000.0);
    let config = VmConfig {
        mem_size: 256 << 20,
        workloads: vec![Workload::Idle; vcpus],
        nic_addr: None,
        pc: true,
        linux: Some(LinuxBoot {
            kernel: PathBuf::from(&args[0]),
            initrd: Some(PathBuf::from(&args[1])),
            cmdline: DEFAULT_CMDLINE.to_string(),
        }),
        console: ConsoleTo::File(PathBuf::from(&args[6])),
    };
    let vm = Vm::new(&config).expect("the VM starts");
    vm.set_console_commit(false);
    vm.resume();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let (mut done, mut report) = (0u64, start + Duration::from_secs(1));
    let mut pauses = Vec::new();
    while Instant::now() < end {
        std::thread::sleep(every);
        match mode {
            "pause" => {
                pauses.push(vm.pause().expect("pause"));
                vm.resume();
            }
            "harvest" => {
                vm.harvest_dirty().expect("harvest");
            }
            "pause-harvest" => {
                pauses.push(vm.pause().expect("pause"));
                vm.harvest_dirty().expect("harvest");
                vm.resume();
            }
            "save" => {
                let t = Instant::now();
                vm.pause().expect("pause");
                vm.harvest_dirty().expect("harvest");
                vm.save_state().expect("save");
                vm.resume();
                pauses.push(t.elapsed());
            }
            _ => {}
        }
        done += 1;
        let stopped = vm.stopped_vcpus();
        if !stopped.is_empty() {
            println!(
                "after {:.1} s and {done} rounds of {mode}: vCPU(s) stopped: {stopped:?}",
                start.elapsed().as_secs_f64()
            );
            std::process::exit(1);
        }
        if Instant::now() >= report {
            pauses.sort();
            let median = pauses.get(pauses.len() / 2).copied().unwrap_or_default();
            println!(
                "{:.0} s: {done} rounds of {mode}, pause median {median:?}",
                start.elapsed().as_secs_f64()
            );
            pauses.clear();
            report += Duration::from_secs(1);
        }
    }
    println!("{mode}: {done} rounds in {seconds} s, every vCPU still running");
}
