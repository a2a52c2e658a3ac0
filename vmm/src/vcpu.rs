//! vCPU threads, the pause/resume protocol, and the save/restore of a vCPU's state.
//!
//! Each vCPU runs `KVM_RUN` on its own thread. Another thread pauses all of them by
//! [`RunControl::pause`]: it raises the pause flag, then for each vCPU writes its kick eventfd
//! (wakes a vCPU blocked in a device wait) and sends it `SIGRTMIN` (the handler sets
//! `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` whether the signal lands inside the
//! ioctl or just before it; Firecracker does the same). A vCPU that sees the flag first
//! completes a pending port I/O (one `KVM_RUN` with `immediate_exit` set, so its state is
//! consistent and the `out` is not executed twice after a restore), releases its `VcpuFd` lock
//! and parks. The pauser returns once every vCPU is parked; it may then lock the `VcpuFd`s to
//! save or restore their state.
//!
//! The pauser waits until a deadline. A vCPU that has not parked by then (its thread is stuck
//! in a device, or starved) is named in a [`PauseTimeout`], and the pause is called off: the
//! vCPUs that did park run again, so the VM is never left half-paused and the caller decides.
//!
//! vCPU states: `Running -> Parked (paused) -> Running`, `Running -> Stopped` (the guest did
//! something fatal: triple fault, guest panic; a stopped vCPU counts as paused forever), and
//! any state `-> Exited` when the VM is dropped.
//!
//! Exits go to the VM's buses ([`crate::bus`]): port I/O to the port bus, MMIO to the MMIO
//! bus (empty so far; an MMIO access no device claims stops the vCPU, as it always did).

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::{Condvar, Mutex};
use tracing::{error, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{le_value, IoAction, IoContext};
use crate::devices::Devices;
use crate::state::{StateError, VcpuState};
use crate::vm::{kvm_err, VmError};

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs (null outside vCPU threads).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's vCPU `kvm_run` mapping; the thread sets it only while it
        // owns the `VcpuFd` (whose mapping outlives the thread) and clears it before exiting.
        // A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick signal handler once per process.
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let result = ONCE.get_or_init(|| {
        register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno())
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

#[derive(Debug)]
struct Ctl {
    pause: bool,
    exit: bool,
    /// Per vCPU: parked right now (paused).
    parked: Vec<bool>,
    /// Per vCPU: stopped for good.
    stopped: Vec<bool>,
}

impl Ctl {
    /// vCPUs neither parked nor stopped.
    fn unsettled(&self) -> Vec<usize> {
        (0..self.parked.len())
            .filter(|&i| !self.parked[i] && !self.stopped[i])
            .collect()
    }
}

/// Some vCPUs did not park before the pause's deadline; the pause was called off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PauseTimeout {
    /// The vCPUs that had not parked (nor stopped), ascending.
    pub(crate) vcpus: Vec<usize>,
    /// How long the pauser waited.
    pub(crate) waited: Duration,
}

/// Shared pause/resume state of all vCPUs of a VM.
#[derive(Debug)]
pub(crate) struct RunControl {
    flag: AtomicBool,
    ctl: Mutex<Ctl>,
    cond: Condvar,
    count: usize,
    /// Parked plus stopped vCPUs, readable without the lock: the pauser spins on it briefly
    /// before sleeping, since vCPUs usually park within tens of microseconds and a futex sleep
    /// and wake-up would add as much again to every checkpoint pause.
    settled: AtomicUsize,
    /// Spin only when every vCPU can run beside the spinning pauser: with more vCPUs than
    /// spare cores the spin steals the CPU they need to reach their park point (measured: 4
    /// busy vCPUs on 2 cores took 3x longer to pause with spinning).
    spin: bool,
}

/// How long the pauser spins before it sleeps on the condition variable.
const PAUSE_SPIN: Duration = Duration::from_micros(200);

impl RunControl {
    /// A control for `count` vCPUs that starts paused.
    pub(crate) fn new(count: usize) -> Self {
        RunControl {
            flag: AtomicBool::new(true),
            ctl: Mutex::new(Ctl {
                pause: true,
                exit: false,
                parked: vec![false; count],
                stopped: vec![false; count],
            }),
            cond: Condvar::new(),
            count,
            settled: AtomicUsize::new(0),
            spin: std::thread::available_parallelism().map_or(1, |n| n.get()) > count,
        }
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Parks vCPU `id` (the caller) until resumed; returns true when the VM is exiting.
    fn park(&self, id: usize) -> bool {
        let mut c = self.ctl.lock();
        c.parked[id] = true;
        self.settled.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
        while c.pause && !c.exit {
            self.cond.wait(&mut c);
        }
        c.parked[id] = false;
        self.settled.fetch_sub(1, Ordering::Release);
        c.exit
    }

    /// Parks vCPU `id` (the caller), which cannot run any more, until the VM exits.
    fn stop(&self, id: usize) {
        let mut c = self.ctl.lock();
        c.stopped[id] = true;
        self.settled.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
        while !c.exit {
            self.cond.wait(&mut c);
        }
    }

    /// Pauses all vCPUs: raises the flag, calls `kick` for each vCPU index, and returns once
    /// each is parked or stopped. If some are not by `deadline` (counted from the call), the
    /// pause is called off (the parked vCPUs run again, a late one never parks for it) and
    /// the error names them.
    pub(crate) fn pause(
        &self,
        kick: impl Fn(usize),
        deadline: Duration,
    ) -> Result<(), PauseTimeout> {
        let start = Instant::now();
        self.ctl.lock().pause = true;
        self.flag.store(true, Ordering::Release);
        for i in 0..self.count {
            kick(i);
        }
        if self.spin {
            let spin_until = start + PAUSE_SPIN.min(deadline);
            while self.settled.load(Ordering::Acquire) < self.count && Instant::now() < spin_until {
                // Yield rather than burn: a vCPU woken from a device wait may need this core.
                std::thread::yield_now();
            }
        }
        // `None`: a deadline too far to represent, i.e. none.
        let until = start.checked_add(deadline);
        let mut c = self.ctl.lock();
        loop {
            let late = c.unsettled();
            if late.is_empty() {
                return Ok(());
            }
            let timed_out = match until {
                Some(until) => self.cond.wait_until(&mut c, until).timed_out(),
                None => {
                    self.cond.wait(&mut c);
                    false
                }
            };
            if timed_out {
                let late = c.unsettled();
                if late.is_empty() {
                    return Ok(());
                }
                // Call the pause off: parked vCPUs go back into the guest, and a late one
                // that reaches its park point now finds nothing to park for.
                c.pause = false;
                self.flag.store(false, Ordering::Release);
                self.cond.notify_all();
                return Err(PauseTimeout {
                    vcpus: late,
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Lets all vCPUs run.
    pub(crate) fn resume(&self) {
        let mut c = self.ctl.lock();
        c.pause = false;
        self.flag.store(false, Ordering::Release);
        self.cond.notify_all();
    }

    /// Whether the vCPUs are paused (or asked to pause).
    pub(crate) fn is_paused(&self) -> bool {
        self.ctl.lock().pause
    }

    /// Number of vCPUs that stopped for good.
    pub(crate) fn stopped(&self) -> usize {
        self.ctl.lock().stopped.iter().filter(|s| **s).count()
    }

    /// Tells every vCPU thread to exit; `kick` is called for each vCPU index.
    pub(crate) fn exit(&self, kick: impl Fn(usize)) {
        self.ctl.lock().exit = true;
        self.flag.store(true, Ordering::Release);
        self.cond.notify_all();
        for i in 0..self.count {
            kick(i);
        }
    }
}

/// One vCPU: its KVM fd (locked by its thread while running), its kick eventfd and thread.
#[derive(Debug)]
pub(crate) struct VcpuHandle {
    pub(crate) fd: Arc<Mutex<VcpuFd>>,
    kick: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Spawns the thread of vCPU `id`; it parks at once (the control starts paused).
    pub(crate) fn spawn(
        id: usize,
        fd: VcpuFd,
        ctl: Arc<RunControl>,
        devices: Arc<Devices>,
    ) -> std::io::Result<Self> {
        let fd = Arc::new(Mutex::new(fd));
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let thread = {
            let (fd, kick) = (fd.clone(), kick.clone());
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(id, &fd, &kick, &ctl, &devices))?
        };
        Ok(VcpuHandle {
            fd,
            kick,
            thread: Some(thread),
        })
    }

    /// Wakes the vCPU from a device wait and out of `KVM_RUN` (see the module doc).
    pub(crate) fn kick(&self) {
        let _ = self.kick.write(1);
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(kick_signal()) {
                // The thread already ended (it can only do so on exit).
                warn!("cannot signal a vCPU thread: {e}");
            }
        }
    }

    /// Waits for the thread to end (after [`RunControl::exit`]).
    pub(crate) fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Saves the state of this vCPU (`id`); it must be parked. `cpuid` is what the VMM gave
    /// it (it never changes, so no ioctl), `msrs` the MSRs to save.
    pub(crate) fn save_state(
        &self,
        id: usize,
        cpuid: CpuId,
        msrs: &[u32],
    ) -> Result<VcpuState, VmError> {
        let fd = self.fd.lock();
        let mut msr_values = Msrs::from_entries(
            &msrs
                .iter()
                .map(|&index| kvm_bindings::kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VmError::Config("too many MSRs".into()))?;
        let n = fd.get_msrs(&mut msr_values).map_err(kvm_err("GET_MSRS"))?;
        if n != msrs.len() {
            return Err(VmError::Msr {
                vcpu: id,
                index: msrs[n],
            });
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            regs: fd.get_regs().map_err(kvm_err("GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm_err("GET_SREGS"))?,
            xsave: fd
                .get_xsave()
                .map_err(kvm_err("GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: fd.get_xcrs().map_err(kvm_err("GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm_err("GET_DEBUGREGS"))?,
            msrs: msr_values
                .as_slice()
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
            events: fd.get_vcpu_events().map_err(kvm_err("GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(kvm_err("GET_MP_STATE"))?,
        })
    }

    /// Restores a saved state into this vCPU (`id`); it must be parked. The VM's host checked
    /// (`create`) that its XSAVE area fits the 4 KiB `kvm_xsave`.
    pub(crate) fn restore_state(&self, id: usize, s: &VcpuState) -> Result<(), VmError> {
        let fd = self.fd.lock();
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|_| VmError::Config("saved CPUID has too many entries".into()))?;
        // Order as in Firecracker: CPUID, MP state, registers, XSAVE, XCRs, debug registers,
        // MSRs, then events last (they may depend on the rest).
        fd.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(kvm_err("SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(kvm_err("SET_REGS"))?;
        fd.set_sregs(&s.sregs).map_err(kvm_err("SET_SREGS"))?;
        let mut xsave = kvm_bindings::kvm_xsave::default();
        if s.xsave.len() != xsave.region.len() {
            return Err(StateError::Mismatch(format!(
                "vCPU {id}: XSAVE area has {} words, expected {}",
                s.xsave.len(),
                xsave.region.len()
            ))
            .into());
        }
        xsave.region.copy_from_slice(&s.xsave);
        // SAFETY: `Vm::create` checked that this host's XSAVE area (KVM_CAP_XSAVE2) fits the
        // 4 KiB `kvm_xsave`, so KVM reads no further than the struct we pass.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err("SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(kvm_err("SET_XCRS"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(kvm_err("SET_DEBUGREGS"))?;
        let entries: Vec<_> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| VmError::Config("saved state has too many MSRs".into()))?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
        if n != entries.len() {
            return Err(VmError::Msr {
                vcpu: id,
                index: entries[n].index,
            });
        }
        fd.set_vcpu_events(&s.events)
            .map_err(kvm_err("SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// What a device wait should watch: the vCPU's kick eventfd, plus the pause flag.
pub(crate) struct Waker<'a> {
    kick: &'a EventFd,
    ctl: &'a RunControl,
}

impl<'a> Waker<'a> {
    /// A waker that watches `kick` and the pause flag of `ctl`.
    pub(crate) fn new(kick: &'a EventFd, ctl: &'a RunControl) -> Self {
        Waker { kick, ctl }
    }

    /// Blocks until `fd` (if any) is readable, the vCPU is kicked, or `timeout` passes.
    /// Returns true if the vCPU should stop waiting because it was kicked.
    pub(crate) fn wait(&self, fd: Option<i32>, timeout: Duration) -> bool {
        if self.ctl.requested() {
            return true;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fd.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of two pollfd that outlives the call; a negative fd
        // is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        n > 0 && fds[0].revents != 0
    }

    /// Sleeps up to `d`, returning early when kicked.
    pub(crate) fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= end || self.wait(None, end - now) {
                return;
            }
        }
    }
}

fn run_vcpu(id: usize, fd: &Mutex<VcpuFd>, kick: &EventFd, ctl: &RunControl, devices: &Devices) {
    let mut vcpu = fd.lock();
    KVM_RUN.with(|r| r.set(vcpu.get_kvm_run()));
    let waker = Waker::new(kick, ctl);
    let io = IoContext::new(id, &waker);
    let mut pending_io = false;
    loop {
        if ctl.requested() {
            if pending_io {
                complete_pending_io(&mut vcpu, id);
                pending_io = false;
            }
            vcpu.set_kvm_immediate_exit(0);
            let exiting = parking_lot::MutexGuard::unlocked(&mut vcpu, || ctl.park(id));
            let _ = kick.read();
            if exiting {
                break;
            }
            continue;
        }
        let fatal = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                pending_io = true;
                match devices.pio.write(&io, u64::from(port), data) {
                    Some(IoAction::Continue) => None,
                    Some(IoAction::Stop(why)) => Some(why),
                    None => {
                        warn!(
                            vcpu = id,
                            port = format_args!("{port:#x}"),
                            value = le_value(data),
                            "write to an unhandled port ignored"
                        );
                        None
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                pending_io = true;
                if !devices.pio.read(&io, u64::from(port), data) {
                    // No device there: all ones, like an empty ISA bus.
                    data.fill(0xff);
                    warn!(vcpu = id, port, "guest read from an unhandled port");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                pending_io = true;
                if devices.mmio.read(&io, addr, data) {
                    None
                } else {
                    Some(format!(
                        "unexpected exit MmioRead({addr:#x}, {} bytes): no device there",
                        data.len()
                    ))
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                pending_io = true;
                match devices.mmio.write(&io, addr, data) {
                    Some(IoAction::Continue) => None,
                    Some(IoAction::Stop(why)) => Some(why),
                    None => Some(format!(
                        "unexpected exit MmioWrite({addr:#x}, {data:?}): no device there"
                    )),
                }
            }
            Ok(VcpuExit::Hlt) => {
                // No interrupts exist, so a halted vCPU would sleep forever: treat as idle.
                waker.sleep(Duration::from_millis(10));
                None
            }
            Ok(VcpuExit::Shutdown) => Some("the guest shut down (triple fault)".to_string()),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union
                // is the one KVM filled in.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Some(format!(
                    "KVM internal error, suberror {} (1 = instruction emulation failed), data {:x?}",
                    internal.suberror,
                    &internal.data[..n]
                ))
            }
            Ok(other) => Some(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(why) = fatal {
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            devices.note_stopped(id, format!("{why} (rip {rip:#x})"));
            parking_lot::MutexGuard::unlocked(&mut vcpu, || ctl.stop(id));
            break;
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

/// Lets KVM finish the port I/O instruction the vCPU exited on (advancing RIP, storing `in`
/// data) without running guest code, so saved state never sits in the middle of an I/O.
fn complete_pending_io(vcpu: &mut VcpuFd, id: usize) {
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => error!(vcpu = id, "completing pending I/O failed: {e}"),
        Ok(exit) => error!(vcpu = id, "completing pending I/O ran the guest: {exit:?}"),
    }
    vcpu.set_kvm_immediate_exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;

    /// A hang guard: how long a stuck test vCPU waits to be released, and any wait here. If
    /// [`RunControl::pause`] ignored its deadline it would return only when the stuck vCPU
    /// is released by this guard, and return `Ok`: the test fails, it does not hang.
    const HANG_GUARD: Duration = Duration::from_secs(60);

    /// A vCPU thread without KVM: runs (counting) until asked to pause, parks, exits when told.
    fn well_behaved(ctl: Arc<RunControl>, id: usize, runs: Arc<AtomicU64>) -> JoinHandle<()> {
        std::thread::spawn(move || loop {
            if ctl.requested() {
                if ctl.park(id) {
                    return;
                }
                continue;
            }
            runs.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        })
    }

    /// Waits for `cond`, failing the test after [`HANG_GUARD`] (not a speed requirement).
    fn wait_until(what: &str, cond: impl FnMut() -> bool) {
        rmc_tests::wait_for(what, HANG_GUARD, cond);
    }

    #[test]
    fn a_pause_past_its_deadline_names_the_late_vcpu_and_leaves_every_vcpu_running() {
        let ctl = Arc::new(RunControl::new(3));
        let runs: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut threads = vec![
            well_behaved(ctl.clone(), 0, runs[0].clone()),
            well_behaved(ctl.clone(), 2, runs[2].clone()),
        ];
        // vCPU 1 gets stuck (as in a device that ignores kicks) until released.
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        threads.push({
            let (ctl, runs) = (ctl.clone(), runs[1].clone());
            std::thread::spawn(move || {
                // Starts parked, like every vCPU.
                if ctl.park(1) {
                    return;
                }
                entered_tx.send(()).unwrap();
                let _ = release_rx.recv_timeout(HANG_GUARD);
                loop {
                    if ctl.requested() {
                        if ctl.park(1) {
                            return;
                        }
                        continue;
                    }
                    runs.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        });
        let kicks = AtomicU64::new(0);
        let kick = |_: usize| {
            kicks.fetch_add(1, Ordering::Relaxed);
        };

        // All three park at start: a pause with every vCPU parked succeeds at once.
        ctl.pause(kick, HANG_GUARD).unwrap();
        ctl.resume();
        entered_rx
            .recv_timeout(HANG_GUARD)
            .expect("vCPU 1 got stuck (a hang guard)");

        let deadline = Duration::from_millis(50);
        let err = ctl
            .pause(kick, deadline)
            .expect_err("a pause must give up on a vCPU that does not stop by its deadline");
        assert_eq!(err.vcpus, vec![1]);
        assert!(err.waited >= deadline, "{err:?}");
        assert_eq!(
            kicks.load(Ordering::Relaxed),
            6,
            "each vCPU kicked per pause"
        );
        // Not half-paused: the pause is off and the vCPUs that had parked run again.
        assert!(!ctl.is_paused());
        for i in [0, 2] {
            let seen = runs[i].load(Ordering::Relaxed);
            wait_until(&format!("vCPU {i} running again"), || {
                runs[i].load(Ordering::Relaxed) > seen
            });
        }

        // Once vCPU 1 is free, a pause succeeds and holds every vCPU still.
        release_tx.send(()).unwrap();
        wait_until("vCPU 1 running", || runs[1].load(Ordering::Relaxed) > 0);
        ctl.pause(kick, HANG_GUARD).unwrap();
        assert!(ctl.is_paused());
        let before: Vec<u64> = runs.iter().map(|r| r.load(Ordering::Relaxed)).collect();
        std::thread::sleep(Duration::from_millis(20));
        let after: Vec<u64> = runs.iter().map(|r| r.load(Ordering::Relaxed)).collect();
        assert_eq!(before, after, "a paused vCPU does not run");

        ctl.exit(kick);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_stopped_vcpu_counts_as_paused() {
        let ctl = Arc::new(RunControl::new(2));
        let runs = Arc::new(AtomicU64::new(0));
        let t0 = well_behaved(ctl.clone(), 0, runs);
        let t1 = {
            let ctl = ctl.clone();
            std::thread::spawn(move || ctl.stop(1))
        };
        wait_until("vCPU 1 stopped", || ctl.stopped() == 1);
        ctl.resume();
        ctl.pause(|_| {}, HANG_GUARD).unwrap();
        ctl.exit(|_| {});
        t0.join().unwrap();
        t1.join().unwrap();
    }
}
