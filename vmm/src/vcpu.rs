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
//! restore their state.
//!
//! The vCPUs' states are saved at the same time ([`RunControl::save`]): the eight `KVM_GET_*`
//! ioctls of one vCPU take ~85 us on a nested host, and a serial save paid that per vCPU. The
//! saver puts a request in each vCPU's slot; a parked (or stopped) vCPU's thread takes its
//! own request, saves with the control lock released and hands the state back. Waking a
//! sleeping thread costs as much as a save on a nested host (50-130 us), so with several
//! vCPUs (and cores) a parked vCPU thread spins (yielding) for a short while before it
//! sleeps, since the checkpointer asks for the state within microseconds of the pause; and
//! the saver works too: it saves one vCPU itself (one whose thread spins on the saver's own
//! CPU, if any), then any vCPU whose thread has not yet taken its request (so never much
//! slower than a serial save). A request is taken once, by the vCPU's thread or the saver,
//! and only while its vCPU is parked or stopped, so a vCPU that is not parked is never
//! touched (the request waits for it to park); a vCPU being saved does not leave its park
//! point until the save is done. If the pause is lifted before every state is back (a
//! resume, a called-off pause, the VM's exit), the saver takes back the requests not yet
//! started, waits for those under way and fails with [`VmError::NotPaused`]: the states
//! might not be of one instant.
//!
//! The pauser waits until a deadline. A vCPU that has not parked by then (its thread is stuck
//! in a device, or starved) is named in a [`PauseTimeout`], and the pause is called off: the
//! vCPUs that did park run again, so the VM is never left half-paused and the caller decides.
//!
//! vCPU states: `Running -> Parked (paused) -> Running`, `Running -> Stopped` (the guest did
//! something fatal: triple fault, guest panic; a stopped vCPU counts as paused forever, and
//! is saved like a parked one), and any state `-> Exited` when the VM is dropped.
//!
//! Exits go to the VM's buses ([`crate::bus`]): port I/O to the port bus, MMIO to the MMIO
//! bus (empty so far; an MMIO access no device claims stops the vCPU, as it always did).

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::{Condvar, Mutex, MutexGuard};
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
    /// Per vCPU: the save asked of its thread (see [`RunControl::save`]).
    saves: Vec<Save>,
    /// Bumped each time the pause is lifted (resume, a called-off pause) or the VM exits: a
    /// save that sees it change knows its vCPUs may have run since it began.
    lifts: u64,
}

impl Ctl {
    /// vCPUs neither parked nor stopped.
    fn unsettled(&self) -> Vec<usize> {
        (0..self.parked.len())
            .filter(|&i| !self.parked[i] && !self.stopped[i])
            .collect()
    }
}

/// What a vCPU's thread needs to save its state (see [`RunControl::save`]).
#[derive(Debug)]
pub(crate) struct SaveRequest {
    /// The CPUID the VMM gave the vCPU (it never changes, so no ioctl).
    pub(crate) cpuid: CpuId,
    /// The MSRs to save.
    pub(crate) msrs: Vec<u32>,
}

/// One vCPU's save slot.
enum Save {
    /// Nothing asked.
    Idle,
    /// Asked; the vCPU's thread (at its park or stop point) or the saver takes it.
    Asked(SaveRequest),
    /// Being saved, by the vCPU's thread or the saver, without the control lock.
    Saving,
    /// Done: the state or the error, or the panic of the save (raised again in the saver).
    Done(Box<std::thread::Result<Result<VcpuState, VmError>>>),
}

impl std::fmt::Debug for Save {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Save::Idle => "Idle",
            Save::Asked(_) => "Asked",
            Save::Saving => "Saving",
            Save::Done(done) => match **done {
                Ok(Ok(_)) => "Done",
                Ok(Err(_)) => "Failed",
                Err(_) => "Panicked",
            },
        })
    }
}

/// How a vCPU's thread saves its state on request: `VcpuFd` ioctls (see [`save_vcpu`]), or
/// anything, in tests without KVM.
type SaveFn<'a> = &'a dyn Fn(&SaveRequest) -> Result<VcpuState, VmError>;

/// How the saver saves vCPU `i` ([`VcpuHandle::save_state`]).
pub(crate) type SaveAnyFn<'a> = &'a dyn Fn(usize, &SaveRequest) -> Result<VcpuState, VmError>;

/// The CPU the calling thread runs on, or -1 if unknown.
fn current_cpu() -> i32 {
    // SAFETY: takes no arguments and touches no memory of ours.
    unsafe { libc::sched_getcpu() }
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
    /// Where the pauser and the saver wait: a vCPU parked or stopped, a save done, the pause
    /// lifted.
    cond: Condvar,
    /// Per vCPU: where its thread waits at its park or stop point (for a resume, the exit, a
    /// save request), so that waking one does not wake them all.
    wake: Vec<Condvar>,
    count: usize,
    /// Parked plus stopped vCPUs, readable without the lock: the pauser spins on it briefly
    /// before sleeping, since vCPUs usually park within tens of microseconds and a futex sleep
    /// and wake-up would add as much again to every checkpoint pause.
    settled: AtomicUsize,
    /// Spin only when every vCPU can run beside the spinning pauser: with more vCPUs than
    /// spare cores the spin steals the CPU they need to reach their park point (measured: 4
    /// busy vCPUs on 2 cores took 3x longer to pause with spinning).
    spin: bool,
    /// Held by a save for its whole length: one save at a time owns the save slots.
    saving: Mutex<()>,
    /// Cores of this machine: the saver spins for the vCPU threads' saves only when they
    /// leave it one.
    cores: usize,
    /// Per vCPU: a save request waits for it. A hint, read without the lock by the vCPU's
    /// thread spinning for one (the slot in [`Ctl::saves`] is what counts).
    asked: Vec<AtomicBool>,
    /// Whether a parked vCPU spins for a save request for [`PARKED_SPIN`] before it sleeps:
    /// waking a sleeping thread costs 50-130 us on a nested host, as much as the save itself,
    /// and the checkpointer asks within microseconds of the pause. Not with one vCPU (the
    /// saver saves it) nor on one core (nothing runs beside the saver). The spin yields: a
    /// vCPU still on its way to its park point, or the saver, gets the core (measured, 4
    /// vCPUs on 2 cores: the pause took no longer).
    save_spin: bool,
    /// Per vCPU: the CPU its thread is spinning on, or -1 (not spinning). The saver takes
    /// the request of a vCPU spinning on its own CPU, which could not save beside it anyway
    /// (measured, 2 vCPUs on 2 cores: otherwise ~40% of the saves were serial).
    spinning_on: Vec<AtomicI32>,
}

/// How long the pauser spins before it sleeps on the condition variable.
const PAUSE_SPIN: Duration = Duration::from_micros(200);
/// How long the saver spins for the vCPU threads' saves before it sleeps: a save takes
/// ~85 us, a futex wake-up of the saver would add tens of microseconds more.
const SAVE_SPIN: Duration = Duration::from_micros(200);
/// How long a parked vCPU spins for a save request (see [`RunControl::save_spin`]).
const PARKED_SPIN: Duration = Duration::from_micros(300);

impl RunControl {
    /// A control for `count` vCPUs that starts paused.
    pub(crate) fn new(count: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        RunControl {
            flag: AtomicBool::new(true),
            ctl: Mutex::new(Ctl {
                pause: true,
                exit: false,
                parked: vec![false; count],
                stopped: vec![false; count],
                saves: (0..count).map(|_| Save::Idle).collect(),
                lifts: 0,
            }),
            cond: Condvar::new(),
            wake: (0..count).map(|_| Condvar::new()).collect(),
            count,
            settled: AtomicUsize::new(0),
            spin: cores > count,
            saving: Mutex::new(()),
            cores,
            asked: (0..count).map(|_| AtomicBool::new(false)).collect(),
            save_spin: cores > 1 && count > 1,
            spinning_on: (0..count).map(|_| AtomicI32::new(-1)).collect(),
        }
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Parks vCPU `id` (the caller) until resumed, saving its state with `save` when asked;
    /// returns true when the VM is exiting.
    fn park(&self, id: usize, save: SaveFn<'_>) -> bool {
        let mut c = self.ctl.lock();
        c.parked[id] = true;
        self.settled.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
        if self.save_spin {
            MutexGuard::unlocked(&mut c, || {
                let until = Instant::now() + PARKED_SPIN;
                while !self.asked[id].load(Ordering::Acquire)
                    && self.requested()
                    && Instant::now() < until
                {
                    self.spinning_on[id].store(current_cpu(), Ordering::Relaxed);
                    std::thread::yield_now();
                }
                self.spinning_on[id].store(-1, Ordering::Relaxed);
            });
        }
        loop {
            if !c.pause || c.exit {
                // Not while the saver is saving this vCPU: it must not run meanwhile.
                if !matches!(c.saves[id], Save::Saving) {
                    break;
                }
            } else if self.serve_save(&mut c, id, save) {
                continue;
            }
            self.wake[id].wait(&mut c);
        }
        c.parked[id] = false;
        self.settled.fetch_sub(1, Ordering::Release);
        c.exit
    }

    /// Parks vCPU `id` (the caller), which cannot run any more, until the VM exits; saves its
    /// state with `save` when asked.
    fn stop(&self, id: usize, save: SaveFn<'_>) {
        let mut c = self.ctl.lock();
        c.stopped[id] = true;
        self.settled.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
        while !c.exit {
            if !self.serve_save(&mut c, id, save) {
                self.wake[id].wait(&mut c);
            }
        }
    }

    /// On vCPU `id`'s thread, at its park or stop point: runs the save asked of it, if any,
    /// with the control lock released (the vCPUs save at the same time), and hands the result
    /// back. Returns whether there was one.
    fn serve_save(&self, c: &mut MutexGuard<'_, Ctl>, id: usize, save: SaveFn<'_>) -> bool {
        if !matches!(c.saves[id], Save::Asked(_)) {
            return false;
        }
        let request = self.take_save(c, id);
        // A panicking save must not kill the vCPU thread with the saver waiting for it: the
        // panic goes to the saver, which raises it, as it did when it saved by itself.
        let done = MutexGuard::unlocked(c, || catch_unwind(AssertUnwindSafe(|| save(&request))));
        c.saves[id] = Save::Done(Box::new(done));
        self.cond.notify_all();
        true
    }

    /// Saves every vCPU's state, at the same time, on the vCPUs' threads and this one (see
    /// the module doc); `requests` has one per vCPU, `save_here` saves a vCPU from this
    /// thread. The vCPUs must be paused: fails with [`VmError::NotPaused`] if they are not, or
    /// if the pause is lifted before every state is back. A vCPU still on its way to its park
    /// point (a pause under way) is saved when it gets there. The first vCPU's error, in vCPU
    /// order, is returned; a panicking save panics here.
    pub(crate) fn save(
        &self,
        requests: Vec<SaveRequest>,
        save_here: SaveAnyFn<'_>,
    ) -> Result<Vec<VcpuState>, VmError> {
        assert_eq!(requests.len(), self.count, "one save request per vCPU");
        let _one_save = self.saving.lock();
        let mut c = self.ctl.lock();
        if !c.pause || c.exit {
            return Err(VmError::NotPaused("saving state"));
        }
        let lifts = c.lifts;
        for (i, request) in requests.into_iter().enumerate() {
            c.saves[i] = Save::Asked(request);
        }
        // Take one before waking the vCPU threads, so that one's thread is not woken for it:
        // preferably one spinning on this CPU.
        let here = current_cpu();
        let mut mine = (0..self.count)
            .find(|&i| {
                here >= 0 && self.spinning_on[i].load(Ordering::Relaxed) == here && c.parked[i]
            })
            .map(|i| (i, self.take_save(&mut c, i)))
            .or_else(|| self.take_for_saver(&mut c));
        for i in 0..self.count {
            if matches!(c.saves[i], Save::Asked(_)) {
                self.asked[i].store(true, Ordering::Release);
                self.wake[i].notify_one();
            }
        }
        let mut spin_until = None;
        loop {
            if let Some((i, request)) = mine.take() {
                let done = MutexGuard::unlocked(&mut c, || {
                    catch_unwind(AssertUnwindSafe(|| save_here(i, &request)))
                });
                c.saves[i] = Save::Done(Box::new(done));
                if c.lifts != lifts {
                    // vCPU `i` may be waiting to leave its park point.
                    self.wake[i].notify_one();
                }
                continue;
            }
            if c.lifts != lifts {
                // Take back what nobody started; what is under way finishes (its vCPU stays
                // parked till then), and its result must not outlive this save.
                for (i, slot) in c.saves.iter_mut().enumerate() {
                    if matches!(slot, Save::Asked(_)) {
                        *slot = Save::Idle;
                        self.asked[i].store(false, Ordering::Release);
                    }
                }
                if !c.saves.iter().any(|s| matches!(s, Save::Saving)) {
                    c.saves.iter_mut().for_each(|s| *s = Save::Idle);
                    return Err(VmError::NotPaused("saving state"));
                }
            } else if c.saves.iter().all(|s| matches!(s, Save::Done(_))) {
                break;
            } else {
                mine = self.take_for_saver(&mut c);
                if mine.is_some() {
                    continue;
                }
                // Spin while the vCPU threads' saves leave this core free.
                let busy = c.saves.iter().filter(|s| matches!(s, Save::Saving)).count();
                let until = *spin_until.get_or_insert_with(|| Instant::now() + SAVE_SPIN);
                if busy < self.cores && Instant::now() < until {
                    MutexGuard::unlocked(&mut c, std::thread::yield_now);
                    continue;
                }
            }
            self.cond.wait(&mut c);
        }
        let done: Vec<Save> = c
            .saves
            .iter_mut()
            .map(|s| std::mem::replace(s, Save::Idle))
            .collect();
        drop(c);
        let mut results = Vec::with_capacity(done.len());
        for slot in done {
            match slot {
                Save::Done(done) => match *done {
                    Ok(result) => results.push(result),
                    Err(panic) => resume_unwind(panic),
                },
                other => unreachable!("a finished save left a slot {other:?}"),
            }
        }
        results.into_iter().collect()
    }

    /// A request the saver may take: the last one still asked whose vCPU is parked or stopped.
    fn take_for_saver(&self, c: &mut Ctl) -> Option<(usize, SaveRequest)> {
        let i = (0..c.saves.len())
            .rev()
            .find(|&i| matches!(c.saves[i], Save::Asked(_)) && (c.parked[i] || c.stopped[i]))?;
        Some((i, self.take_save(c, i)))
    }

    /// Takes vCPU `i`'s asked save request, marking it under way.
    fn take_save(&self, c: &mut Ctl, i: usize) -> SaveRequest {
        self.asked[i].store(false, Ordering::Release);
        match std::mem::replace(&mut c.saves[i], Save::Saving) {
            Save::Asked(request) => request,
            other => unreachable!("vCPU {i}'s save taken in state {other:?}"),
        }
    }

    /// Wakes every thread waiting on the control: the pause was lifted or the VM exits.
    fn wake_all(&self) {
        self.cond.notify_all();
        for w in &self.wake {
            w.notify_all();
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
                c.lifts += 1;
                self.flag.store(false, Ordering::Release);
                self.wake_all();
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
        c.lifts += 1;
        self.flag.store(false, Ordering::Release);
        self.wake_all();
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
        {
            let mut c = self.ctl.lock();
            c.exit = true;
            c.lifts += 1;
        }
        self.flag.store(true, Ordering::Release);
        self.wake_all();
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

    /// Saves the state of this vCPU (`id`) from the calling thread; it must be parked or
    /// stopped (see [`RunControl::save`]).
    pub(crate) fn save_state(
        &self,
        id: usize,
        request: &SaveRequest,
    ) -> Result<VcpuState, VmError> {
        save_vcpu(id, &self.fd.lock(), request)
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

/// Saves the state of vCPU `id` (`fd`), as `request` asks: on the vCPU's own thread at its
/// park or stop point, or on the saver's (see [`RunControl::save`]).
fn save_vcpu(id: usize, fd: &VcpuFd, request: &SaveRequest) -> Result<VcpuState, VmError> {
    let msrs = &request.msrs;
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
        cpuid: request.cpuid.as_slice().to_vec(),
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
    // At its park and stop points the thread has released `fd`: it takes it again to save.
    let save = |request: &SaveRequest| save_vcpu(id, &fd.lock(), request);
    loop {
        if ctl.requested() {
            if pending_io {
                complete_pending_io(&mut vcpu, id);
                pending_io = false;
            }
            vcpu.set_kvm_immediate_exit(0);
            let exiting = parking_lot::MutexGuard::unlocked(&mut vcpu, || ctl.park(id, &save));
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
                        if devices.first_unhandled(port) {
                            warn!(
                                vcpu = id,
                                port = format_args!("{port:#x}"),
                                value = le_value(data),
                                "write to an unhandled port ignored (further accesses to this \
                                 port are not reported)"
                            );
                        }
                        None
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                pending_io = true;
                if !devices.pio.read(&io, u64::from(port), data) {
                    // No device there: all ones, like an empty ISA bus.
                    data.fill(0xff);
                    if devices.first_unhandled(port) {
                        warn!(
                            vcpu = id,
                            port = format_args!("{port:#x}"),
                            "guest read from an unhandled port (further accesses to this port \
                             are not reported)"
                        );
                    }
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
            parking_lot::MutexGuard::unlocked(&mut vcpu, || ctl.stop(id, &save));
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

    /// How a test vCPU saves: given its index.
    type TestSave = Arc<dyn Fn(usize, &SaveRequest) -> Result<VcpuState, VmError> + Send + Sync>;

    /// A state that says which vCPU it is (in `rax`).
    fn fake_state(id: usize) -> VcpuState {
        VcpuState {
            cpuid: Vec::new(),
            regs: kvm_bindings::kvm_regs {
                rax: id as u64,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Vec::new(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
            mp_state: Default::default(),
        }
    }

    fn fake_save() -> TestSave {
        Arc::new(|id, _| Ok(fake_state(id)))
    }

    fn requests(n: usize) -> Vec<SaveRequest> {
        (0..n)
            .map(|_| SaveRequest {
                cpuid: CpuId::new(0).unwrap(),
                msrs: Vec::new(),
            })
            .collect()
    }

    /// A vCPU thread without KVM: runs (counting) until asked to pause, parks, exits when told.
    fn well_behaved(ctl: Arc<RunControl>, id: usize, runs: Arc<AtomicU64>) -> JoinHandle<()> {
        saving_vcpu(ctl, id, runs, fake_save())
    }

    /// [`well_behaved`], named like a vCPU thread, saving with `save` when parked.
    fn saving_vcpu(
        ctl: Arc<RunControl>,
        id: usize,
        runs: Arc<AtomicU64>,
        save: TestSave,
    ) -> JoinHandle<()> {
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let save = |r: &SaveRequest| save(id, r);
                loop {
                    if ctl.requested() {
                        if ctl.park(id, &save) {
                            return;
                        }
                        continue;
                    }
                    runs.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .unwrap()
    }

    /// Runs `f` on a new thread; its result comes on the receiver.
    fn in_background<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx
    }

    fn slot(ctl: &RunControl, id: usize) -> String {
        format!("{:?}", ctl.ctl.lock().saves[id])
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
                let save = |_: &SaveRequest| Ok(fake_state(1));
                if ctl.park(1, &save) {
                    return;
                }
                entered_tx.send(()).unwrap();
                let _ = release_rx.recv_timeout(HANG_GUARD);
                loop {
                    if ctl.requested() {
                        if ctl.park(1, &save) {
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
            std::thread::spawn(move || ctl.stop(1, &|_| Ok(fake_state(1))))
        };
        wait_until("vCPU 1 stopped", || ctl.stopped() == 1);
        ctl.resume();
        ctl.pause(|_| {}, HANG_GUARD).unwrap();
        ctl.exit(|_| {});
        t0.join().unwrap();
        t1.join().unwrap();
    }

    #[test]
    fn each_vcpu_is_saved_once_on_its_thread_or_the_savers_all_at_once() {
        const N: usize = 3;
        let ctl = Arc::new(RunControl::new(N));
        let inside = Arc::new(AtomicUsize::new(0));
        let by = Arc::new(Mutex::new(Vec::new()));
        let save: TestSave = {
            let (inside, by) = (inside.clone(), by.clone());
            Arc::new(move |id, _| {
                let name = std::thread::current().name().unwrap_or("").to_string();
                by.lock().push((id, name));
                // Every save waits for all: saves one after the other would fail here (not
                // hang).
                inside.fetch_add(1, Ordering::SeqCst);
                wait_until("every vCPU saved at once", || {
                    inside.load(Ordering::SeqCst) % N == 0
                });
                Ok(fake_state(id))
            })
        };
        let runs: Vec<Arc<AtomicU64>> = (0..N).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let threads: Vec<_> = (0..N)
            .map(|i| saving_vcpu(ctl.clone(), i, runs[i].clone(), save.clone()))
            .collect();
        let me = std::thread::current().name().unwrap_or("").to_string();
        for round in 0..3 {
            // Right after start the vCPUs may not have parked yet: their saves wait for it.
            let states = ctl.save(requests(N), &|i, r| save(i, r)).unwrap();
            let ids: Vec<u64> = states.iter().map(|s| s.regs.rax).collect();
            assert_eq!(ids, (0..N as u64).collect::<Vec<_>>(), "in vCPU order");
            let mut by = std::mem::take(&mut *by.lock());
            by.sort();
            assert_eq!(by.len(), N, "round {round}: each vCPU saved once: {by:?}");
            for (i, (id, name)) in by.iter().enumerate() {
                assert_eq!(*id, i, "{by:?}");
                assert!(
                    *name == format!("vcpu{id}") || *name == me,
                    "vCPU {id} saved on thread {name}"
                );
            }
            ctl.resume();
            for (i, r) in runs.iter().enumerate() {
                let seen = r.load(Ordering::Relaxed);
                wait_until(&format!("vCPU {i} running"), || {
                    r.load(Ordering::Relaxed) > seen
                });
            }
            ctl.pause(|_| {}, HANG_GUARD).unwrap();
        }
        ctl.exit(|_| {});
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_save_needs_the_pause_for_its_whole_length_and_parked_vcpus() {
        let ctl = Arc::new(RunControl::new(2));
        let runs: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        let saves_of_1 = Arc::new(AtomicUsize::new(0));
        // vCPU 0's first save blocks until released; vCPU 1's saves are counted.
        let save: TestSave = {
            let saves_of_1 = saves_of_1.clone();
            let first = AtomicBool::new(true);
            Arc::new(move |id, _| {
                if id == 0 && first.swap(false, Ordering::SeqCst) {
                    entered_tx.lock().send(()).unwrap();
                    let _ = release_rx.lock().recv_timeout(HANG_GUARD);
                }
                if id == 1 {
                    saves_of_1.fetch_add(1, Ordering::SeqCst);
                }
                Ok(fake_state(id))
            })
        };
        let t0 = saving_vcpu(ctl.clone(), 0, runs[0].clone(), save.clone());
        // vCPU 1's thread is not there yet, so it cannot be parked.
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let t1 = {
            let (ctl, runs, save) = (ctl.clone(), runs[1].clone(), save.clone());
            std::thread::spawn(move || {
                go_rx.recv_timeout(HANG_GUARD).unwrap();
                saving_vcpu(ctl, 1, runs, save).join().unwrap();
            })
        };

        let saved = in_background({
            let (ctl, save) = (ctl.clone(), save.clone());
            move || ctl.save(requests(2), &|i, r| save(i, r))
        });
        entered_rx
            .recv_timeout(HANG_GUARD)
            .expect("vCPU 0 saving (a hang guard)");
        wait_until("vCPU 1's request waiting", || slot(&ctl, 1) == "Asked");
        // Lifted while vCPU 0 is being saved (by its thread or the saver): it stays parked
        // until done, and the saver waits for it before it fails.
        ctl.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            saved.try_recv().is_err(),
            "the saver waits for the save under way"
        );
        assert_eq!(
            runs[0].load(Ordering::Relaxed),
            0,
            "a vCPU being saved does not run"
        );
        release_tx.send(()).unwrap();
        let err = saved.recv_timeout(HANG_GUARD).expect("a hang guard");
        assert!(matches!(err, Err(VmError::NotPaused(_))), "{err:?}");
        wait_until("vCPU 0 running", || runs[0].load(Ordering::Relaxed) > 0);
        assert_eq!(
            (slot(&ctl, 0), slot(&ctl, 1)),
            ("Idle".into(), "Idle".into())
        );

        // Not paused: refused at once. vCPU 1, which never parked, was never saved.
        assert!(matches!(
            ctl.save(requests(2), &|i, r| save(i, r)),
            Err(VmError::NotPaused(_))
        ));
        go_tx.send(()).unwrap();
        wait_until("vCPU 1 running", || runs[1].load(Ordering::Relaxed) > 0);
        assert_eq!(saves_of_1.load(Ordering::SeqCst), 0);

        // Paused again, a save sees no leftover of the failed one.
        ctl.pause(|_| {}, HANG_GUARD).unwrap();
        let states = ctl.save(requests(2), &|i, r| save(i, r)).unwrap();
        assert_eq!((states[0].regs.rax, states[1].regs.rax), (0, 1));
        assert_eq!(saves_of_1.load(Ordering::SeqCst), 1);
        ctl.exit(|_| {});
        t0.join().unwrap();
        t1.join().unwrap();
    }

    #[test]
    fn a_stopped_vcpu_is_saved_and_a_failing_save_names_its_vcpu() {
        let ctl = Arc::new(RunControl::new(3));
        let fail = Arc::new(AtomicBool::new(false));
        let panic = Arc::new(AtomicBool::new(false));
        let save: TestSave = {
            let (fail, panic) = (fail.clone(), panic.clone());
            Arc::new(move |id, _| {
                if id == 1 && panic.load(Ordering::SeqCst) {
                    panic!("vCPU 1's save panics (on purpose)");
                }
                if id == 1 && fail.load(Ordering::SeqCst) {
                    return Err(VmError::Msr {
                        vcpu: id,
                        index: 0x10,
                    });
                }
                Ok(fake_state(id))
            })
        };
        let runs = Arc::new(AtomicU64::new(0));
        let t0 = saving_vcpu(ctl.clone(), 0, runs.clone(), save.clone());
        let t2 = saving_vcpu(ctl.clone(), 2, runs, save.clone());
        let t1 = {
            let (ctl, save) = (ctl.clone(), save.clone());
            std::thread::spawn(move || ctl.stop(1, &|r| save(1, r)))
        };
        wait_until("vCPU 1 stopped", || ctl.stopped() == 1);
        ctl.resume();
        ctl.pause(|_| {}, HANG_GUARD).unwrap();
        let save_all = || ctl.save(requests(3), &|i, r| save(i, r));
        let ids: Vec<u64> = save_all().unwrap().iter().map(|s| s.regs.rax).collect();
        assert_eq!(ids, vec![0, 1, 2]);

        fail.store(true, Ordering::SeqCst);
        match save_all() {
            Err(VmError::Msr {
                vcpu: 1,
                index: 0x10,
            }) => {}
            other => panic!("not vCPU 1's MSR error: {other:?}"),
        }
        // A panicking save panics the saver, and every vCPU thread lives on.
        panic.store(true, Ordering::SeqCst);
        let caught = std::panic::catch_unwind(AssertUnwindSafe(save_all));
        assert!(caught.is_err(), "the save's panic reaches the saver");
        panic.store(false, Ordering::SeqCst);
        fail.store(false, Ordering::SeqCst);
        assert_eq!(save_all().unwrap().len(), 3);
        ctl.exit(|_| {});
        for t in [t0, t1, t2] {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_parallel_save_equals_a_serial_one_field_by_field() {
        use crate::vm::{DirtierConfig, Vm, VmConfig, Workload};
        if !rmc_tests::kvm_available("a_parallel_save_equals_a_serial_one_field_by_field") {
            return;
        }
        let dirtier = Workload::Dirtier(DirtierConfig {
            pages: 64,
            rate: 0,
            limit: 0,
        });
        for workloads in [
            vec![dirtier, Workload::Idle],
            vec![dirtier, Workload::Counter, Workload::Idle, dirtier],
        ] {
            let n = workloads.len();
            let dirtiers: Vec<usize> = (0..n).filter(|&i| workloads[i] == dirtier).collect();
            let vm = Vm::new(&VmConfig {
                mem_size: 64 << 20,
                workloads,
                nic_addr: None,
                ..Default::default()
            })
            .unwrap();
            vm.resume();
            for &i in &dirtiers {
                wait_until(&format!("vCPU {i} dirtying"), || {
                    vm.dirtier_progress(i) > 1000
                });
            }
            assert!(matches!(vm.save_state(), Err(VmError::NotPaused(_))));
            for _ in 0..3 {
                vm.pause().unwrap();
                let parallel = vm.save_state().unwrap().vcpus;
                let serial = vm.save_vcpus_one_by_one().unwrap();
                assert_eq!(parallel.len(), n);
                for (i, (p, s)) in parallel.iter().zip(&serial).enumerate() {
                    let (p, s) = (field_by_field(p), field_by_field(s));
                    assert_eq!(p, s, "vCPU {i} of {n}");
                }
                vm.resume();
            }
            assert!(vm.stopped_vcpus().is_empty(), "{:?}", vm.stopped_vcpus());
        }
    }

    /// A vCPU state's fields, printed, without the TSC (it runs on while paused).
    fn field_by_field(s: &VcpuState) -> Vec<(&'static str, String)> {
        let msrs: Vec<_> = s.msrs.iter().filter(|(i, _)| *i != 0x10).collect();
        vec![
            ("cpuid", format!("{:?}", s.cpuid)),
            ("regs", format!("{:?}", s.regs)),
            ("sregs", format!("{:?}", s.sregs)),
            ("xsave", format!("{:?}", s.xsave)),
            ("xcrs", format!("{:?}", s.xcrs)),
            ("debugregs", format!("{:?}", s.debugregs)),
            ("msrs", format!("{msrs:x?}")),
            ("events", format!("{:?}", s.events)),
            ("mp_state", format!("{:?}", s.mp_state)),
        ]
    }
}
