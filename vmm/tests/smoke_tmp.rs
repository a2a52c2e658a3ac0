use std::time::Duration;
use rmc_vmm::*;
use rmc_vmm::service::*;

#[test]
fn smoke() {
    tracing_subscriber::fmt().with_test_writer().with_env_filter("debug").try_init().ok();
    let cfg = VmConfig { mem_size: 64 << 20, workloads: vec![Workload::Counter, Workload::Dirtier(DirtierConfig{pages: 256, rate: 0, limit: 0})], nic_addr: Some("127.0.0.1:0".parse().unwrap()) };
    let vm = Vm::new(&cfg).unwrap();
    vm.resume();
    std::thread::sleep(Duration::from_millis(200));
    println!("console {:?} stopped {:?}", vm.console_lines(), vm.stopped_vcpus());
    println!("progress {}", vm.dirtier_progress(1));
    let mut c = Client::new(vm.nic_addr().unwrap(), 5).unwrap();
    for _ in 0..5 { let r = c.request(Duration::from_secs(2), |_| {}).unwrap(); println!("{r:?}"); }
    let d = vm.pause();
    println!("pause {d:?}");
    let s = vm.save_state().unwrap();
    println!("msrs {}", s.vcpus[0].msrs.len()); for v in &s.vcpus { println!("cr0 {:#x} cr4 {:#x} efer {:#x} xcr0 {:?} events {:?}", v.sregs.cr0, v.sregs.cr4, v.sregs.efer, v.xcrs.xcrs[0], v.events.exception); }
    let set = vm.harvest_dirty().unwrap();
    println!("dirty {}", set.len());
}
