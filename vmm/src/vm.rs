//! A KVM virtual machine running rmc's guest: creation, boot, pause/resume, state
//! save/restore and dirty-page harvest. This is what the epoch engine drives.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use tracing::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch;
use crate::bus::{BusDevice, BusError};
use crate::devices::Devices;
use crate::dirty::{DirtyTracker, HarvestError};
use crate::guest::GuestProgram;
use crate::layout::{self, config, status};
use crate::nic::Nic;
use crate::state::VmState;
use crate::vcpu::{install_kick_handler, RunControl, VcpuHandle};
use crate::GuestMem;
use rmc_guest_api::{DirtySet, GuestError};

/// Largest number of vCPUs.
pub const MAX_VCPUS: usize = 4;
/// Default guest memory size.
pub const DEFAULT_MEM_SIZE: u64 = 256 << 20;
/// How long [`Vm::pause`] waits for every vCPU to stop, unless [`Vm::set_pause_deadline`]
/// says otherwise. vCPUs normally stop within tens of microseconds; a loaded machine can
/// hold a thread back for hundreds of milliseconds, which this must not mistake for a stuck
/// vCPU.
pub const DEFAULT_PAUSE_DEADLINE: Duration = Duration::from_secs(2);

/// What one vCPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Nothing.
    Idle,
    /// The counter service on the NIC.
    Counter,
    /// The memory dirtier.
    Dirtier(DirtierConfig),
}

/// Dirtier parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtierConfig {
    /// Working-set size in pages.
    pub pages: u64,
    /// Pages written per second; 0 = as fast as the vCPU can.
    pub rate: u64,
    /// Stop after this many page writes; 0 = never.
    pub limit: u64,
}

impl Default for DirtierConfig {
    fn default() -> Self {
        DirtierConfig {
            pages: 1024,
            rate: 10_000,
            limit: 0,
        }
    }
}

/// Where a PC VM's serial console (COM1) goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConsoleTo {
    /// This process's standard output.
    #[default]
    Stdout,
    /// A file (created, or appended to).
    File(std::path::PathBuf),
    /// Nowhere.
    Discard,
}

impl ConsoleTo {
    /// Opens it.
    pub fn open(&self) -> std::io::Result<crate::ConsoleSink> {
        Ok(match self {
            ConsoleTo::Stdout => Box::new(std::io::stdout()),
            ConsoleTo::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            ConsoleTo::Discard => Box::new(std::io::sink()),
        })
    }
}

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory in bytes (multiple of 2 MiB; 16 MiB ..= 11 GiB for the built-in guest,
    /// up to [`crate::linux::MAX_MEM_SIZE`] for a PC VM).
    pub mem_size: u64,
    /// One workload per vCPU (1 to 4 vCPUs; at most one `Counter`). A Linux guest's vCPUs
    /// are all `Idle` here (up to [`crate::linux::MAX_VCPUS`]): the kernel decides what runs.
    pub workloads: Vec<Workload>,
    /// Address the NIC's UDP socket binds to; `None`: no socket (frames are discarded).
    pub nic_addr: Option<SocketAddr>,
    /// A PC VM: KVM's in-kernel PICs, IOAPIC, LAPICs and PIT, the KVM clock, COM1 and an
    /// i8042 besides the VM's own devices. Implied by `linux`; a restore takes it from the
    /// state it restores.
    pub pc: bool,
    /// Boot this stock kernel instead of the built-in guest program.
    pub linux: Option<crate::linux::LinuxBoot>,
    /// Where COM1's output goes (PC VMs).
    pub console: ConsoleTo,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: DEFAULT_MEM_SIZE,
            workloads: vec![Workload::Counter],
            nic_addr: None,
            pc: false,
            linux: None,
            console: ConsoleTo::Stdout,
        }
    }
}

impl VmConfig {
    /// Whether the VM is a PC VM (see [`VmConfig::pc`]).
    pub fn is_pc(&self) -> bool {
        self.pc || self.linux.is_some()
    }
}

/// Errors building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is not valid.
    #[error("Invalid VM configuration: {0}")]
    Config(String),
    /// `/dev/kvm` could not be opened.
    #[error("Cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("Cannot allocate {size} bytes of guest memory")]
    Memory {
        /// Requested size.
        size: u64,
        /// The error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Writing the boot image into guest memory failed.
    #[error("Cannot write the boot image into guest memory")]
    Boot(#[source] vm_memory::GuestMemoryError),
    /// The guest program did not assemble.
    #[error(transparent)]
    Assemble(#[from] crate::guest::AssembleError),
    /// The NIC socket could not be bound.
    #[error("Cannot bind the NIC's UDP socket to {addr}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Creating a thread, eventfd or signal handler failed.
    #[error("Cannot set up vCPU threads")]
    Threads(#[source] std::io::Error),
    /// An operation that needs paused vCPUs was called on a running VM.
    #[error("The VM must be paused for {0}")]
    NotPaused(&'static str),
    /// A state does not fit this VM.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// Restoring an MSR failed.
    #[error("KVM refused to restore MSR {index:#x} on vCPU {vcpu}")]
    Msr {
        /// vCPU index.
        vcpu: usize,
        /// The MSR.
        index: u32,
    },
    /// Reading the dirty log failed.
    #[error(transparent)]
    Harvest(#[from] HarvestError),
    /// Some vCPUs did not stop within the pause deadline. The pause was called off: every
    /// vCPU that did stop runs again, so the VM is running, not half-paused.
    #[error(
        "{} did not stop within the pause deadline of {deadline:?} (waited {waited:?}); the pause was called off and the VM runs on",
        vcpu_list(.vcpus)
    )]
    PauseTimeout {
        /// The vCPUs that did not stop, ascending.
        vcpus: Vec<usize>,
        /// How long the pause waited.
        waited: Duration,
        /// The deadline it had.
        deadline: Duration,
    },
    /// A device could not be put on its bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    LinuxBoot(#[from] crate::linux::LinuxBootError),
    /// The serial console's output could not be opened.
    #[error("Cannot open the serial console's output {what}")]
    Console {
        /// Where it was to go.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// "vCPU 1", "vCPUs 0, 2".
fn vcpu_list(vcpus: &[usize]) -> String {
    let list: Vec<String> = vcpus.iter().map(usize::to_string).collect();
    match vcpus.len() {
        1 => format!("vCPU {}", list[0]),
        _ => format!("vCPUs {}", list.join(", ")),
    }
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Guest-visible progress, read from guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStatus {
    /// The counter service's counter.
    pub counter: u64,
    /// Requests applied (new seqs).
    pub requests: u64,
    /// Repeated requests answered again.
    pub repeats: u64,
    /// Malformed requests.
    pub bad: u64,
}

/// A running (or paused) VM. Dropping it stops its vCPU threads.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: threads and vCPU fds go before the VM fd and the memory that
    // the KVM memory slots point at.
    vcpus: Vec<VcpuHandle>,
    ctl: Arc<RunControl>,
    devices: Arc<Devices>,
    vm: VmFd,
    _kvm: Kvm,
    mem: GuestMem,
    regions: Vec<(u64, u64)>,
    dirty: DirtyTracker,
    msr_list: Vec<u32>,
    cpuid: CpuId,
    config: VmConfig,
    output: parking_lot::Mutex<Option<Arc<crate::nic::OutputCommit>>>,
    /// Who to wake when output starts waiting (see `watch_output`).
    output_waker: parking_lot::Mutex<Option<rmc_guest_api::OutputWaker>>,
    /// Fencing gate asked before each packet leaves (see [`Vm::set_send_gate`]).
    send_gate: parking_lot::Mutex<Option<crate::nic::SendGate>>,
    /// See [`Vm::set_pause_deadline`].
    pause_deadline: parking_lot::Mutex<Duration>,
    /// COM1's output path (PC VMs).
    console: Option<Arc<crate::ConsoleOutput>>,
    /// Hold COM1's output with output commit (see [`Vm::set_console_commit`]).
    console_commit: std::sync::atomic::AtomicBool,
}

/// A device put on the port bus beside the VM's own: (name, first port, ports, device).
type ExtraDevice = (&'static str, u16, u16, Arc<dyn BusDevice>);

impl Vm {
    /// Builds a VM and boots the guest program; the vCPUs start paused (call [`Vm::resume`]).
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        Self::boot(config, Vec::new())
    }

    /// [`Vm::new`] with more devices on the port bus (tests that need a device the guest
    /// program does not have).
    fn boot(config: &VmConfig, extra: Vec<ExtraDevice>) -> Result<Self, VmError> {
        let vm = Self::create(config, None, extra)?;
        if let Some(linux) = &config.linux {
            vm.boot_linux(linux)?;
            return Ok(vm);
        }
        if config.mem_size > layout::MAX_MEM_SIZE || config.workloads.len() > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "the built-in guest runs on up to {MAX_VCPUS} vCPUs and {} GiB",
                layout::MAX_MEM_SIZE >> 30
            )));
        }
        let program = GuestProgram::build()?;
        let mem = &vm.mem;
        arch::write_boot_tables(mem).map_err(VmError::Boot)?;
        mem.write_slice(&program.code, GuestAddress(layout::CODE_ADDR))
            .map_err(VmError::Boot)?;
        let tsc_khz = vm.tsc_khz()?;
        let mut ws_next = layout::WORKSET_ADDR;
        for (i, w) in config.workloads.iter().enumerate() {
            let rec = layout::CONFIG_ADDR + i as u64 * layout::VCPU_RECORD_SIZE;
            let (code, entry, d) = match w {
                Workload::Idle => (config::WORKLOAD_IDLE, program.idle_entry, None),
                Workload::Counter => (config::WORKLOAD_COUNTER, program.counter_entry, None),
                Workload::Dirtier(d) => (config::WORKLOAD_DIRTIER, program.dirtier_entry, Some(d)),
            };
            let mut fields = vec![
                (config::WORKLOAD, code),
                (config::TSC_KHZ, u64::from(tsc_khz)),
            ];
            if let Some(d) = d {
                fields.extend([
                    (config::WS_BASE, ws_next),
                    (config::WS_PAGES, d.pages),
                    (config::RATE, d.rate),
                    (config::LIMIT, d.limit),
                ]);
                ws_next += d.pages * layout::PAGE_SIZE;
            }
            for (off, v) in fields {
                mem.write_obj(v, GuestAddress(rec + off))
                    .map_err(VmError::Boot)?;
            }
            let stack_top = layout::STACKS_ADDR + (i as u64 + 1) * layout::STACK_SIZE;
            let fd = vm.vcpus[i].fd.lock();
            fd.set_cpuid2(&arch::vcpu_cpuid(
                &vm.cpuid,
                i as u8,
                config.workloads.len() as u8,
            ))
            .map_err(kvm_err("SET_CPUID2"))?;
            let sregs = fd.get_sregs().map_err(kvm_err("GET_SREGS"))?;
            fd.set_sregs(&arch::long_mode_sregs(sregs))
                .map_err(kvm_err("SET_SREGS"))?;
            fd.set_regs(&arch::initial_regs(entry, stack_top, i as u64, rec))
                .map_err(kvm_err("SET_REGS"))?;
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            fd.set_fpu(&fpu).map_err(kvm_err("SET_FPU"))?;
            fd.set_xcrs(&arch::initial_xcrs())
                .map_err(kvm_err("SET_XCRS"))?;
        }
        Ok(vm)
    }

    /// Loads a stock kernel (with its initrd and command line, boot parameters and MP table)
    /// and puts the vCPUs where the 64-bit boot protocol wants them. Every byte goes in
    /// through guest memory, so the dirty log has it.
    fn boot_linux(&self, boot: &crate::linux::LinuxBoot) -> Result<(), VmError> {
        let n = self.vcpus.len();
        let info = crate::linux::load(&self.mem, &self.regions, n as u8, boot)?;
        for (i, v) in self.vcpus.iter().enumerate() {
            crate::linux::setup_vcpu(&v.fd.lock(), i, &info).map_err(kvm_err("vCPU boot setup"))?;
        }
        debug!(
            kernel = %boot.kernel.display(),
            entry = format_args!("{:#x}", info.entry),
            vcpus = n,
            "Linux kernel loaded"
        );
        Ok(())
    }

    /// Builds a VM from a saved state; `fill` writes the saved guest memory into the new VM's
    /// memory. The vCPUs start paused (call [`Vm::resume`]). The dirty log starts empty.
    pub fn restore<E>(
        config: &VmConfig,
        state: &VmState,
        fill: impl FnOnce(&GuestMem) -> Result<(), E>,
    ) -> Result<Self, VmError>
    where
        E: std::fmt::Display,
    {
        let config = &for_state(config, state);
        check_fits(config, state)?;
        let vm = Self::create(config, None, Vec::new())?;
        fill(&vm.mem).map_err(|e| VmError::Config(format!("cannot fill guest memory: {e}")))?;
        vm.load_state(state)?;
        Ok(vm)
    }

    /// Builds a VM that runs directly on `mem` (e.g. a standby's backup; no copy) with the
    /// saved `state`. The vCPUs start paused (call [`Vm::resume`]).
    pub fn restore_on(config: &VmConfig, state: &VmState, mem: GuestMem) -> Result<Self, VmError> {
        let config = &for_state(config, state);
        check_fits(config, state)?;
        let vm = Self::create(config, Some(mem), Vec::new())?;
        vm.load_state(state)?;
        Ok(vm)
    }

    fn load_state(&self, state: &VmState) -> Result<(), VmError> {
        for (i, (v, s)) in self.vcpus.iter().zip(&state.vcpus).enumerate() {
            v.restore_state(i, s)?;
        }
        self.devices.restore(&state.devices)?;
        if let Some(p) = &state.devices.platform {
            let fds: Vec<_> = self.vcpus.iter().map(|v| v.fd.lock()).collect();
            let refs: Vec<&VcpuFd> = fds.iter().map(|f| &**f).collect();
            let deadlines: Vec<Option<u64>> = state
                .vcpus
                .iter()
                .map(|v| {
                    v.msrs
                        .iter()
                        .find(|(i, _)| *i == crate::platform::MSR_IA32_TSC_DEADLINE)
                        .map(|(_, value)| *value)
                })
                .collect();
            crate::platform::restore(&self.vm, &refs, p, &deadlines)?;
        }
        self.dirty.clear(&self.vm, &self.mem)?;
        Ok(())
    }

    fn create(
        config: &VmConfig,
        mem: Option<GuestMem>,
        extra: Vec<ExtraDevice>,
    ) -> Result<Self, VmError> {
        validate(config)?;
        install_kick_handler().map_err(VmError::Threads)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        let xsave_size = vm.check_extension_int(Cap::Xsave2);
        if xsave_size > std::mem::size_of::<kvm_bindings::kvm_xsave>() as i32 {
            return Err(VmError::Config(format!(
                "this host's XSAVE area is {xsave_size} bytes; rmc saves the classic 4 KiB area only"
            )));
        }
        let regions = layout::ram_regions(config.mem_size);
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(b, l)| (GuestAddress(b), l as usize))
            .collect();
        let mem = match mem {
            Some(m) => {
                let have: Vec<(u64, u64)> = m.iter().map(|r| (r.start_addr().0, r.len())).collect();
                if have != regions {
                    return Err(VmError::Config(format!(
                        "memory regions {have:x?} do not match the configuration's {regions:x?}"
                    )));
                }
                m
            }
            None => GuestMem::from_ranges(&ranges).map_err(|source| VmError::Memory {
                size: config.mem_size,
                source,
            })?,
        };
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range is the region's own mmap of `memory_size` bytes, which
            // `mem` (a field of the returned Vm, dropped after `vm`) keeps mapped for the whole
            // life of the KVM VM; slots do not overlap.
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        if config.is_pc() {
            crate::platform::create(&vm)?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let mut fds: Vec<VcpuFd> = (0..config.workloads.len())
            .map(|i| vm.create_vcpu(i as u64).map_err(kvm_err("CREATE_VCPU")))
            .collect::<Result<_, _>>()?;
        // CPUID first: it decides which MSRs exist.
        for (i, fd) in fds.iter_mut().enumerate() {
            fd.set_cpuid2(&arch::vcpu_cpuid(
                &cpuid,
                i as u8,
                config.workloads.len() as u8,
            ))
            .map_err(kvm_err("SET_CPUID2"))?;
        }
        let msr_list = saveable_msrs(&kvm, &fds[0])?;
        let nic = match config.nic_addr {
            Some(addr) => {
                Some(UdpSocket::bind(addr).map_err(|source| VmError::Bind { addr, source })?)
            }
            None => None,
        };
        let nic = Nic::new(nic).map_err(VmError::Threads)?;
        let (serial, console) = if config.is_pc() {
            let sink = config.console.open().map_err(|source| VmError::Console {
                what: format!("{:?}", config.console),
                source,
            })?;
            let out = Arc::new(crate::ConsoleOutput::new(sink));
            let irq = crate::devices::serial::IrqLine::new().map_err(VmError::Threads)?;
            vm.register_irqfd(irq.fd(), crate::devices::serial::COM1_IRQ)
                .map_err(kvm_err("IRQFD"))?;
            let uart = crate::devices::serial::SerialDevice::new(irq, out.clone())
                .map_err(VmError::Threads)?;
            (Some(Arc::new(uart)), Some(out))
        } else {
            (None, None)
        };
        let mut devices = Devices::new(mem.clone(), nic, fds.len(), serial)?;
        for (name, base, len, device) in extra {
            devices.pio.insert(name, base.into(), len.into(), device)?;
        }
        let devices = Arc::new(devices);
        let ctl = Arc::new(RunControl::new(fds.len()));
        let vcpus = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| VcpuHandle::spawn(i, fd, ctl.clone(), devices.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::Threads)?;
        debug!(
            mem = config.mem_size,
            vcpus = vcpus.len(),
            msrs = msr_list.len(),
            "VM created"
        );
        Ok(Vm {
            vcpus,
            ctl,
            devices,
            vm,
            _kvm: kvm,
            mem,
            dirty: DirtyTracker::new(regions.clone()),
            regions,
            msr_list,
            cpuid,
            config: config.clone(),
            output: parking_lot::Mutex::new(None),
            output_waker: parking_lot::Mutex::new(None),
            send_gate: parking_lot::Mutex::new(None),
            pause_deadline: parking_lot::Mutex::new(DEFAULT_PAUSE_DEADLINE),
            console,
            console_commit: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn tsc_khz(&self) -> Result<u32, VmError> {
        self.vcpus[0]
            .fd
            .lock()
            .get_tsc_khz()
            .map_err(kvm_err("GET_TSC_KHZ"))
    }

    /// Loads extra code into guest memory and points vCPU `i` at it, for tests that need a
    /// guest which misbehaves on purpose. The VM must be paused and not yet have run.
    pub fn load_custom_entry(&self, i: usize, addr: u64, code: &[u8]) -> Result<(), VmError> {
        self.require_paused("loading code")?;
        self.mem
            .write_slice(code, GuestAddress(addr))
            .map_err(VmError::Boot)?;
        let fd = self.vcpus[i].fd.lock();
        let mut regs = fd.get_regs().map_err(kvm_err("GET_REGS"))?;
        regs.rip = addr;
        fd.set_regs(&regs).map_err(kvm_err("SET_REGS"))
    }

    /// Stops all vCPUs; returns how long that took. Devices are quiet while paused.
    ///
    /// Waits at most the pause deadline ([`DEFAULT_PAUSE_DEADLINE`], see
    /// [`Vm::set_pause_deadline`]). A vCPU that has not stopped by then (stuck in a device,
    /// or starved of CPU) makes it fail with [`VmError::PauseTimeout`], naming it; the pause
    /// is then called off and every vCPU runs (none is left paused), so the caller decides
    /// what to do.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let t = Instant::now();
        let deadline = self.pause_deadline();
        self.ctl
            .pause(|i| self.vcpus[i].kick(), deadline)
            .map_err(|e| VmError::PauseTimeout {
                vcpus: e.vcpus,
                waited: e.waited,
                deadline,
            })?;
        Ok(t.elapsed())
    }

    /// How long [`Vm::pause`] waits for the vCPUs to stop from now on.
    pub fn set_pause_deadline(&self, deadline: Duration) {
        *self.pause_deadline.lock() = deadline;
    }

    /// How long [`Vm::pause`] waits for the vCPUs to stop.
    pub fn pause_deadline(&self) -> Duration {
        *self.pause_deadline.lock()
    }

    /// Lets all vCPUs run.
    pub fn resume(&self) {
        self.ctl.resume();
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    fn require_paused(&self, what: &'static str) -> Result<(), VmError> {
        if self.ctl.is_paused() {
            Ok(())
        } else {
            Err(VmError::NotPaused(what))
        }
    }

    /// Saves vCPU and device state. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        self.require_paused("saving state")?;
        let n = self.vcpus.len();
        // All at once, on the vCPUs' threads and this one (see `RunControl::save`): one
        // vCPU's ioctls cost about 85 us on a nested host, and a serial save paid that per vCPU.
        let requests = (0..n)
            .map(|i| crate::vcpu::SaveRequest {
                // The CPUID is what the VMM gave this vCPU; it never changes.
                cpuid: arch::vcpu_cpuid(&self.cpuid, i as u8, n as u8),
                msrs: self.msr_list.clone(),
            })
            .collect();
        let vcpus = self
            .ctl
            .save(requests, &|i, r| self.vcpus[i].save_state(i, r))?;
        let mut devices = self.devices.save();
        if self.config.is_pc() {
            let fds: Vec<_> = self.vcpus.iter().map(|v| v.fd.lock()).collect();
            let refs: Vec<&VcpuFd> = fds.iter().map(|f| &**f).collect();
            devices.platform = Some(crate::platform::save(&self.vm, &refs)?);
        }
        Ok(VmState {
            mem_size: self.config.mem_size,
            vcpus,
            devices,
        })
    }

    /// The vCPU states as [`Vm::save_state`] saved them before it saved them all at once: one
    /// vCPU after the other, from this thread (tests compare the two).
    #[cfg(test)]
    pub(crate) fn save_vcpus_one_by_one(&self) -> Result<Vec<crate::state::VcpuState>, VmError> {
        self.require_paused("saving state")?;
        let n = self.vcpus.len();
        (0..n)
            .map(|i| {
                let request = crate::vcpu::SaveRequest {
                    cpuid: arch::vcpu_cpuid(&self.cpuid, i as u8, n as u8),
                    msrs: self.msr_list.clone(),
                };
                self.vcpus[i].save_state(i, &request)
            })
            .collect()
    }

    /// Pages written since the previous harvest, by the guest or by the VMM's devices. Call it
    /// paused to get a set consistent with [`Vm::save_state`].
    pub fn harvest_dirty(&self) -> Result<DirtySet, VmError> {
        Ok(self.dirty.harvest(&self.vm, &self.mem)?)
    }

    /// Gives back a harvested set that could not be used; the next harvest includes it.
    pub fn put_back_dirty(&self, set: DirtySet) {
        self.dirty.put_back(set);
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// RAM regions `(guest physical base, length)`.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Where the NIC's socket listens.
    pub fn nic_addr(&self) -> Option<SocketAddr> {
        self.devices.nic.lock().local_addr()
    }

    /// Turns output commit on: from now on every packet the guest sends is held until
    /// [`rmc_guest_api::OutputCommit::release_output`] covers the checkpoint it belongs to. When it is still
    /// on (a session ended with output kept back), what is held waits for the next session.
    pub fn enable_output_commit(&self, limits: rmc_netbuf::Limits) -> Result<(), VmError> {
        if let Some(c) = &self.console {
            if self
                .console_commit
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                // A new session after a lost one: what is held waits for its first ack.
                c.hold();
            }
        }
        if let Some(held) = self.output.lock().as_ref() {
            // Still on from a session that ended (its output kept back): the new session's
            // first checkpoint releases it.
            held.reopen();
            return Ok(());
        }
        let mut nic = self.devices.nic.lock();
        let Some(socket) = nic.socket_clone() else {
            if self.console.is_some() {
                // A PC VM without the NIC's socket: the console is its only output.
                return Ok(());
            }
            return Err(VmError::Config(
                "output commit needs the NIC's socket".into(),
            ));
        };
        let gate = Arc::new(crate::nic::OutputCommit::new(
            socket,
            limits,
            self.send_gate.lock().clone(),
        ));
        gate.set_waker(self.output_waker.lock().clone());
        *self.output.lock() = Some(gate.clone());
        nic.set_output(Some(gate));
        Ok(())
    }

    /// Fencing: from now on every packet the guest sends leaves only if `gate` allows it at
    /// that moment (with output commit on or off); see [`crate::nic::SendGate`].
    pub fn set_send_gate(&self, gate: crate::nic::SendGate) {
        if let Some(c) = &self.console {
            c.set_gate(Some(gate.clone()));
        }
        *self.send_gate.lock() = Some(gate.clone());
        self.devices.nic.lock().set_gate(Some(gate));
    }

    /// Turns output commit off (protection lost): every held packet leaves now, new ones at once.
    pub fn disable_output_commit(&self) {
        if let Some(c) = &self.console {
            c.release_all();
        }
        self.devices.nic.lock().set_output(None);
        if let Some(gate) = self.output.lock().take() {
            gate.release_all();
        }
    }

    /// Whether output commit holds the serial console's output too (default: yes). Off is
    /// for debugging a guest: its console output then leaves at once and a failover can
    /// repeat lines the console already showed. Takes effect at the next
    /// [`Vm::enable_output_commit`].
    pub fn set_console_commit(&self, on: bool) {
        self.console_commit
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// The serial console's counters (PC VMs).
    pub fn console_stats(&self) -> Option<crate::ConsoleStats> {
        self.console.as_ref().map(|c| c.stats())
    }

    /// Types `bytes` at the serial console (PC VMs): as many as the UART's FIFO takes now;
    /// returns how many.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.devices.serial.as_ref().map_or(0, |s| s.input(bytes))
    }

    /// Output-commit counters, when it is on.
    pub fn output_stats(&self) -> Option<rmc_netbuf::Stats> {
        self.output.lock().as_ref().map(|g| g.stats())
    }

    /// NIC counters.
    pub fn nic_stats(&self) -> crate::nic::NicStats {
        self.devices.nic.lock().state().stats
    }

    /// The counter service's state, read from guest memory.
    pub fn guest_status(&self) -> GuestStatus {
        let read = |off: u64| -> u64 {
            self.mem
                .read_obj(GuestAddress(layout::COUNTER_STATE_ADDR + off))
                .unwrap_or(0)
        };
        GuestStatus {
            counter: read(0),
            requests: read(8),
            repeats: read(16),
            bad: read(24),
        }
    }

    /// Whether vCPU `i`'s workload has initialised.
    pub fn vcpu_ready(&self, i: usize) -> bool {
        self.read_status(i, status::READY) != 0
    }

    /// Page writes the dirtier on vCPU `i` has done.
    pub fn dirtier_progress(&self, i: usize) -> u64 {
        self.read_status(i, status::PROGRESS)
    }

    fn read_status(&self, i: usize, off: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(
                layout::STATUS_ADDR + i as u64 * layout::VCPU_RECORD_SIZE + off,
            ))
            .unwrap_or(0)
    }

    /// Guest physical range `(base, pages)` of the dirtier working set of vCPU `i`.
    pub fn dirtier_working_set(&self, i: usize) -> (u64, u64) {
        let rec = layout::CONFIG_ADDR + i as u64 * layout::VCPU_RECORD_SIZE;
        let base = self
            .mem
            .read_obj(GuestAddress(rec + config::WS_BASE))
            .unwrap_or(0);
        let pages = self
            .mem
            .read_obj(GuestAddress(rec + config::WS_PAGES))
            .unwrap_or(0);
        (base, pages)
    }

    /// Console lines the guest printed (most recent last).
    pub fn console_lines(&self) -> Vec<String> {
        self.devices.console_lines()
    }

    /// vCPUs that stopped for good, with the reason.
    pub fn stopped_vcpus(&self) -> Vec<(usize, String)> {
        self.devices.stopped_vcpus()
    }

    /// A copy of all guest memory, region by region.
    pub fn memory_image(&self) -> Vec<(u64, Vec<u8>)> {
        self.mem
            .iter()
            .map(|r| {
                let mut buf = vec![0u8; r.len() as usize];
                self.mem
                    .read_slice(&mut buf, r.start_addr())
                    .expect("a region reads within itself");
                (r.start_addr().0, buf)
            })
            .collect()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.ctl.exit(|i| self.vcpus[i].kick());
        for v in &mut self.vcpus {
            v.join();
        }
        if self.ctl.stopped() > 0 {
            warn!("VM dropped with stopped vCPUs: {:?}", self.stopped_vcpus());
        }
    }
}

/// What a standby checks before it acknowledges a checkpoint of an rmc VM: the guest's shape
/// (vCPUs, RAM regions) is one this VMM builds, and each checkpoint's state decodes (this
/// build's encoding) and fits it, so the acknowledged checkpoint can always become the running
/// VM. The wire protocol's side of it lives in the application (`rmc::restore`).
#[derive(Debug, Default, Clone, Copy)]
pub struct RestoreCheck;

impl RestoreCheck {
    fn config(vcpus: u32, regions: &[(u64, u64)]) -> VmConfig {
        // The handshake does not say which guest runs: the larger (PC VM) limits apply; the
        // state, once it comes, says whether it is a PC VM.
        VmConfig {
            mem_size: regions.iter().map(|r| r.1).sum(),
            workloads: vec![Workload::Idle; vcpus as usize],
            nic_addr: None,
            pc: true,
            linux: None,
            console: ConsoleTo::Discard,
        }
    }

    /// Whether this VMM builds a guest of `vcpus` vCPUs with these RAM regions.
    pub fn check_guest(vcpus: u32, regions: &[(u64, u64)]) -> Result<(), VmError> {
        let config = Self::config(vcpus, regions);
        validate(&config)?;
        let expected = layout::ram_regions(config.mem_size);
        if regions != expected.as_slice() {
            return Err(VmError::Config(format!(
                "memory regions {regions:x?} are not those of a {} MiB rmc guest ({expected:x?})",
                config.mem_size >> 20
            )));
        }
        Ok(())
    }

    /// Whether `state` decodes and can be restored into a guest of that shape.
    pub fn check_state(state: &[u8], vcpus: u32, regions: &[(u64, u64)]) -> Result<(), VmError> {
        let state = VmState::decode(state)?;
        check_fits(&for_state(&Self::config(vcpus, regions), &state), &state)
    }
}

/// Whether `state` can be restored into a VM built from `config`: the same memory size and
/// vCPU count, and every part passes its own checks ([`VmState::check`]: a NIC ring the
/// device accepts, a whole XSAVE area, ...).
fn check_fits(config: &VmConfig, state: &VmState) -> Result<(), VmError> {
    if state.mem_size != config.mem_size {
        return Err(crate::state::StateError::Mismatch(format!(
            "state has {} bytes of memory, the VM {}",
            state.mem_size, config.mem_size
        ))
        .into());
    }
    if state.vcpus.len() != config.workloads.len() {
        return Err(crate::state::StateError::Mismatch(format!(
            "state has {} vCPUs, the VM {}",
            state.vcpus.len(),
            config.workloads.len()
        ))
        .into());
    }
    Ok(state.check()?)
}

/// `config` for restoring `state`: a PC VM if the state is of one.
fn for_state(config: &VmConfig, state: &VmState) -> VmConfig {
    VmConfig {
        pc: state.devices.is_pc(),
        linux: None,
        ..config.clone()
    }
}

/// Largest memory and vCPU count: the built-in guest's identity map and per-vCPU records
/// bound its own; a PC VM's are those of [`crate::linux`]. A PC VM restored from a state may
/// run either guest, so it gets the larger ones; booting the built-in guest checks its own.
fn limits(c: &VmConfig) -> (u64, usize) {
    if c.is_pc() {
        (crate::linux::MAX_MEM_SIZE, crate::linux::MAX_VCPUS)
    } else {
        (layout::MAX_MEM_SIZE, MAX_VCPUS)
    }
}

fn validate(c: &VmConfig) -> Result<(), VmError> {
    let bad = |m: String| Err(VmError::Config(m));
    let (max_mem, max_vcpus) = limits(c);
    if c.mem_size < layout::MIN_MEM_SIZE || c.mem_size > max_mem {
        return bad(format!(
            "memory must be between {} MiB and {} GiB, not {} bytes",
            layout::MIN_MEM_SIZE >> 20,
            max_mem >> 30,
            c.mem_size
        ));
    }
    if c.linux.is_some() && c.workloads.iter().any(|w| *w != Workload::Idle) {
        return bad("a Linux guest runs no built-in workload (give its vCPUs as Idle)".into());
    }
    if !c.mem_size.is_multiple_of(2 << 20) {
        return bad(format!(
            "memory must be a multiple of 2 MiB, not {} bytes",
            c.mem_size
        ));
    }
    if c.workloads.is_empty() || c.workloads.len() > max_vcpus {
        return bad(format!(
            "a VM has 1 to {max_vcpus} vCPUs, not {}",
            c.workloads.len()
        ));
    }
    if c.workloads
        .iter()
        .filter(|w| **w == Workload::Counter)
        .count()
        > 1
    {
        return bad("only one vCPU can run the counter service (it owns the NIC)".into());
    }
    let low_end = c.mem_size.min(layout::LOW_RAM_END);
    let mut ws = layout::WORKSET_ADDR;
    for w in &c.workloads {
        if let Workload::Dirtier(d) = w {
            if d.pages == 0 {
                return bad("a dirtier needs a working set of at least one page".into());
            }
            ws += d.pages * layout::PAGE_SIZE;
        }
    }
    if ws > low_end {
        return bad(format!(
            "the dirtier working sets need {} MiB above {} MiB, but the guest has only {} MiB there",
            (ws - layout::WORKSET_ADDR) >> 20,
            layout::WORKSET_ADDR >> 20,
            (low_end - layout::WORKSET_ADDR) >> 20
        ));
    }
    Ok(())
}

/// MSRs that KVM lists as saveable and that this vCPU can read and write back (some hosts
/// list MSRs they then refuse to restore, e.g. MSR_KVM_POLL_CONTROL under PVM).
fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("GET_MSR_INDEX_LIST"))?;
    let mut out = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one entry fits");
        let readable = vcpu.get_msrs(&mut one).map(|n| n == 1).unwrap_or(false);
        if readable && vcpu.set_msrs(&one).map(|n| n == 1).unwrap_or(false) {
            out.push(index);
        } else {
            debug!(
                index = format_args!("{index:#x}"),
                readable, "MSR listed by KVM but cannot be saved and restored here; skipped"
            );
        }
    }
    Ok(out)
}

impl rmc_guest_api::GuestRam for Vm {
    type Memory = GuestMem;

    fn memory(&self) -> &GuestMem {
        &self.mem
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.regions.clone()
    }
}

impl rmc_guest_api::Pausable for Vm {
    /// [`Vm::pause`]; its [`VmError::PauseTimeout`] names the vCPUs that did not stop (the
    /// VM runs on).
    fn pause(&self) -> Result<Duration, GuestError> {
        Ok(Vm::pause(self)?)
    }

    fn resume(&self) {
        Vm::resume(self)
    }
}

impl rmc_guest_api::DirtyLog for Vm {
    fn harvest(&self) -> Result<DirtySet, GuestError> {
        Ok(self.harvest_dirty()?)
    }

    fn put_back(&self, set: DirtySet) {
        self.put_back_dirty(set)
    }
}

impl rmc_guest_api::Snapshottable for Vm {
    fn state_version(&self) -> u32 {
        crate::state::VERSION
    }

    fn vcpus(&self) -> u32 {
        self.vcpus.len() as u32
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(Vm::save_state(self)?.encode())
    }
}

impl rmc_guest_api::OutputCommit for Vm {
    fn close_output_epoch(&self, epoch: u64) {
        if let Some(g) = self.output.lock().as_ref() {
            g.close_epoch(epoch);
        }
        if let Some(c) = &self.console {
            c.close_epoch(epoch);
        }
    }

    fn release_output(&self, epoch: u64) {
        if let Some(g) = self.output.lock().as_ref() {
            g.release(epoch);
        }
        if let Some(c) = &self.console {
            c.release(epoch);
        }
    }

    fn watch_output(&self, waker: Option<rmc_guest_api::OutputWaker>) {
        // Kept for a gate enabled later, and given to the one that is on now.
        *self.output_waker.lock() = waker.clone();
        if let Some(c) = &self.console {
            c.set_waker(waker.clone());
        }
        if let Some(g) = self.output.lock().as_ref() {
            g.set_waker(waker);
        }
    }

    fn output_waiting(&self) -> bool {
        self.output.lock().as_ref().is_some_and(|g| g.waiting())
            || self.console.as_ref().is_some_and(|c| c.waiting())
    }
}

#[cfg(test)]
mod pause_deadline_tests {
    use std::sync::mpsc;

    use super::*;
    use crate::bus::{IoAction, IoContext};

    /// Hang guard of every wait here, and how long the stuck device holds its vCPU at most:
    /// were the pause deadline ignored, the pause would return `Ok` when this runs out, and
    /// the test would fail (not hang).
    const HANG_GUARD: Duration = Duration::from_secs(120);
    /// A port no device of the VM uses.
    const STUCK_PORT: u16 = 0x700;

    /// A device whose write blocks, deaf to kicks, until the test releases it: the vCPU that
    /// writes it cannot stop.
    struct Stuck {
        entered: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
        release: parking_lot::Mutex<mpsc::Receiver<()>>,
    }

    impl BusDevice for Stuck {
        fn write(&self, _: &IoContext<'_>, _: u64, _: &[u8]) -> IoAction {
            if let Some(tx) = self.entered.lock().take() {
                let _ = tx.send(());
            }
            let _ = self.release.lock().recv_timeout(HANG_GUARD);
            IoAction::Continue
        }
    }

    /// Writes `STUCK_PORT` once, then counts in vCPU `vcpu`'s status record (PROGRESS).
    fn stuck_guest(base: u64, vcpu: u64) -> Vec<u8> {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(dx, u32::from(STUCK_PORT)).unwrap();
        a.out(dx, al).unwrap();
        a.mov(
            rbx,
            layout::STATUS_ADDR + vcpu * layout::VCPU_RECORD_SIZE + status::PROGRESS,
        )
        .unwrap();
        let mut lp = a.create_label();
        a.set_label(&mut lp).unwrap();
        a.inc(qword_ptr(rbx)).unwrap();
        a.jmp(lp).unwrap();
        a.assemble(base).unwrap()
    }

    /// Waits for `cond`, failing the test after [`HANG_GUARD`] (not a speed requirement).
    fn eventually(what: &str, cond: impl FnMut() -> bool) {
        rmc_tests::wait_for(what, HANG_GUARD, cond);
    }

    #[test]
    fn a_vcpu_that_cannot_stop_fails_the_pause_and_the_vm_runs_on() {
        if !rmc_tests::kvm_available("a_vcpu_that_cannot_stop_fails_the_pause_and_the_vm_runs_on") {
            return;
        }
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let stuck = Arc::new(Stuck {
            entered: parking_lot::Mutex::new(Some(entered_tx)),
            release: parking_lot::Mutex::new(release_rx),
        });
        let cfg = VmConfig {
            mem_size: 64 << 20,
            workloads: vec![
                Workload::Dirtier(DirtierConfig {
                    pages: 64,
                    rate: 0,
                    limit: 0,
                }),
                Workload::Idle,
            ],
            nic_addr: None,
            ..Default::default()
        };
        let vm = Vm::boot(&cfg, vec![("stuck", STUCK_PORT, 1, stuck)]).unwrap();
        let base = layout::CODE_ADDR + 0x1_8000;
        vm.load_custom_entry(1, base, &stuck_guest(base, 1))
            .unwrap();
        assert_eq!(vm.pause_deadline(), DEFAULT_PAUSE_DEADLINE);
        let deadline = Duration::from_millis(100);
        vm.set_pause_deadline(deadline);
        vm.resume();
        entered_rx
            .recv_timeout(HANG_GUARD)
            .expect("vCPU 1 reached the stuck device (a hang guard)");

        // Through the guest interface, as the epoch engine pauses.
        let err = rmc_guest_api::Pausable::pause(&vm)
            .expect_err("a pause must give up on a vCPU that cannot stop by its deadline");
        let text = err.to_string();
        match *err.downcast::<VmError>().expect("a VmError") {
            VmError::PauseTimeout {
                vcpus,
                waited,
                deadline: d,
            } => {
                assert_eq!(vcpus, vec![1]);
                assert_eq!(d, deadline);
                assert!(waited >= deadline, "waited {waited:?}");
            }
            other => panic!("not a pause timeout: {other}"),
        }
        assert!(text.starts_with("vCPU 1 did not stop"), "{text}");
        // Not half-paused: vCPU 0 runs on, and nothing takes the VM for paused.
        assert!(!vm.is_paused());
        assert!(matches!(vm.save_state(), Err(VmError::NotPaused(_))));
        let p = vm.dirtier_progress(0);
        eventually("vCPU 0 runs after the failed pause", || {
            vm.dirtier_progress(0) > p
        });

        // Released, vCPU 1 runs on too, and a pause succeeds.
        release_tx.send(()).unwrap();
        eventually("vCPU 1 runs after its device returned", || {
            vm.dirtier_progress(1) > 0
        });
        vm.set_pause_deadline(HANG_GUARD);
        vm.pause().unwrap();
        let state = vm.save_state().unwrap();
        assert_eq!(state.vcpus.len(), 2);
        let (p0, p1) = (vm.dirtier_progress(0), vm.dirtier_progress(1));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            (vm.dirtier_progress(0), vm.dirtier_progress(1)),
            (p0, p1),
            "a paused VM does not run"
        );
        vm.resume();
        assert!(vm.stopped_vcpus().is_empty(), "{:?}", vm.stopped_vcpus());
    }
}
