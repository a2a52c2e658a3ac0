//! vCPU threads and the pause/resume protocol.
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
//! vCPU states: `Running -> Parked (paused) -> Running`, `Running -> Stopped` (the guest did
//! something fatal: triple fault, guest panic; a stopped vCPU counts as paused forever), and
//! any state `-> Exited` when the VM is dropped.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::{Condvar, Mutex};
use tracing::{error, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::{Devices, OutResult};

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

#[derive(Debug, Default)]
struct Ctl {
    pause: bool,
    exit: bool,
    parked: usize,
    stopped: usize,
}

/// Shared pause/resume state of all vCPUs of a VM.
#[derive(Debug)]
pub(crate) struct RunControl {
    flag: AtomicBool,
    ctl: Mutex<Ctl>,
    cond: Condvar,
    count: usize,
    /// `parked + stopped`, readable without the lock: the pauser spins on it briefly before
    /// sleeping, since vCPUs usually park within tens of microseconds and a futex sleep and
    /// wake-up would add as much again to every checkpoint pause.
    settled: std::sync::atomic::AtomicUsize,
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
                ..Default::default()
            }),
            cond: Condvar::new(),
            count,
            settled: std::sync::atomic::AtomicUsize::new(0),
            spin: std::thread::available_parallelism().map_or(1, |n| n.get()) > count,
        }
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Parks the calling vCPU until resumed; returns true when the VM is exiting.
    fn park(&self) -> bool {
        let mut c = self.ctl.lock();
        c.parked += 1;
        self.settled.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
        while c.pause && !c.exit {
            self.cond.wait(&mut c);
        }
        c.parked -= 1;
        self.settled.fetch_sub(1, Ordering::Release);
        c.exit
    }

    /// Parks a vCPU that cannot run any more until the VM exits.
    fn stop(&self) {
        let mut c = self.ctl.lock();
        c.stopped += 1;
        self.settled.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
        while !c.exit {
            self.cond.wait(&mut c);
        }
    }

    /// Pauses all vCPUs; returns once each is parked or stopped.
    pub(crate) fn pause(&self, vcpus: &[VcpuHandle]) {
        self.ctl.lock().pause = true;
        self.flag.store(true, Ordering::Release);
        for v in vcpus {
            v.kick();
        }
        if self.spin {
            let spin_until = Instant::now() + PAUSE_SPIN;
            while self.settled.load(Ordering::Acquire) < self.count && Instant::now() < spin_until {
                // Yield rather than burn: a vCPU woken from a device wait may need this core.
                std::thread::yield_now();
            }
        }
        let mut c = self.ctl.lock();
        while c.parked + c.stopped < self.count {
            self.cond.wait(&mut c);
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
        self.ctl.lock().stopped
    }

    /// Tells every vCPU thread to exit.
    pub(crate) fn exit(&self, vcpus: &[VcpuHandle]) {
        self.ctl.lock().exit = true;
        self.flag.store(true, Ordering::Release);
        self.cond.notify_all();
        for v in vcpus {
            v.kick();
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

    fn kick(&self) {
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
}

/// What a device wait should watch: the vCPU's kick eventfd, plus the pause flag.
pub(crate) struct Waker<'a> {
    kick: &'a EventFd,
    ctl: &'a RunControl,
}

impl Waker<'_> {
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
    let waker = Waker { kick, ctl };
    let mut pending_io = false;
    loop {
        if ctl.requested() {
            if pending_io {
                complete_pending_io(&mut vcpu, id);
                pending_io = false;
            }
            vcpu.set_kvm_immediate_exit(0);
            let exiting = parking_lot::MutexGuard::unlocked(&mut vcpu, || ctl.park());
            let _ = kick.read();
            if exiting {
                break;
            }
            continue;
        }
        let fatal = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                pending_io = true;
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                match devices.io_out(id, port, u32::from_le_bytes(v), n, &waker) {
                    OutResult::Continue => None,
                    OutResult::Stop(why) => Some(why),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                pending_io = true;
                // No device answers reads: all ones, like an empty ISA bus.
                data.fill(0xff);
                warn!(vcpu = id, port, "guest read from an unhandled port");
                None
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
            parking_lot::MutexGuard::unlocked(&mut vcpu, || ctl.stop());
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
