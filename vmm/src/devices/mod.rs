//! The devices of a VM and the buses they sit on.
//!
//! Port I/O ([`crate::layout::ports`]):
//!
//! | ports | device | state in a checkpoint |
//! | --- | --- | --- |
//! | `CONSOLE` (1 port) | [`console::Console`] | [`console::ConsoleState`] |
//! | `NIC_BASE` .. `+ NIC_PORTS` | the NIC ([`crate::nic::device::NicDevice`]) | [`crate::nic::NicState`] |
//! | `CONTROL_BASE` .. `+ CONTROL_PORTS` | guest control ([`control::Control`]) | none |
//!
//! MMIO: no device yet (the bus is there for the ones to come).
//!
//! Each device with state implements [`Persist`]; [`Devices::save`] and
//! [`Devices::restore`] put their states together as [`DeviceStates`].

pub(crate) mod console;
pub(crate) mod control;

use std::sync::Arc;

use parking_lot::Mutex;
use tracing::error;

use crate::bus::{Bus, BusError};
use crate::layout::ports;
use crate::nic::device::NicDevice;
use crate::nic::Nic;
use crate::persist::Persist;
use crate::state::{DeviceStates, StateError};
use crate::GuestMem;
use console::Console;
use control::Control;

/// The devices of a VM, shared by its vCPU threads.
#[derive(Debug)]
pub(crate) struct Devices {
    /// Port I/O.
    pub(crate) pio: Bus,
    /// Memory-mapped I/O (no device yet).
    pub(crate) mmio: Bus,
    /// The NIC (also on `pio`).
    pub(crate) nic: Arc<NicDevice>,
    /// The console (also on `pio`).
    console: Arc<Console>,
    /// vCPUs that stopped for good, with the reason.
    stopped: Mutex<Vec<(usize, String)>>,
}

impl Devices {
    /// The devices of a VM with `vcpus` vCPUs, on their buses.
    pub(crate) fn new(mem: GuestMem, nic: Nic, vcpus: usize) -> Result<Self, BusError> {
        let console = Arc::new(Console::new(vcpus));
        let nic = Arc::new(NicDevice::new(nic, mem));
        let mut pio = Bus::new("port I/O");
        pio.insert("console", ports::CONSOLE.into(), 1, console.clone())?;
        pio.insert(
            "nic",
            ports::NIC_BASE.into(),
            ports::NIC_PORTS.into(),
            nic.clone(),
        )?;
        pio.insert(
            "control",
            ports::CONTROL_BASE.into(),
            ports::CONTROL_PORTS.into(),
            Arc::new(Control),
        )?;
        Ok(Devices {
            pio,
            mmio: Bus::new("MMIO"),
            nic,
            console,
            stopped: Mutex::new(Vec::new()),
        })
    }

    /// Every device's state (the vCPUs must be paused).
    pub(crate) fn save(&self) -> DeviceStates {
        DeviceStates {
            nic: self.nic.save(),
            console: self.console.save(),
        }
    }

    /// Restores every device's saved state (each checks its own first).
    pub(crate) fn restore(&self, states: &DeviceStates) -> Result<(), StateError> {
        self.nic.restore(&states.nic)?;
        self.console.restore(&states.console)
    }

    /// Console lines the guest printed (most recent last).
    pub(crate) fn console_lines(&self) -> Vec<String> {
        self.console.lines()
    }

    pub(crate) fn note_stopped(&self, vcpu: usize, why: String) {
        error!(vcpu, "vCPU {vcpu} stopped: {why}");
        self.stopped.lock().push((vcpu, why));
    }

    pub(crate) fn stopped_vcpus(&self) -> Vec<(usize, String)> {
        self.stopped.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_the_guest_uses_reaches_its_device() {
        let mem = GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 16 << 20)]).unwrap();
        let d = Devices::new(mem, Nic::new(None).unwrap(), 1).unwrap();
        for (port, device) in [
            (ports::CONSOLE, "console"),
            (ports::NIC_TX_RING, "nic"),
            (ports::NIC_RX_RING, "nic"),
            (ports::NIC_RING_SIZE, "nic"),
            (ports::NIC_TX_DOORBELL, "nic"),
            (ports::NIC_RX_DOORBELL, "nic"),
            (ports::NIC_RX_WAIT, "nic"),
            (ports::NIC_TX_WAIT, "nic"),
            (ports::SLEEP_US, "control"),
            (ports::IDLE, "control"),
            (ports::GUEST_PANIC, "control"),
        ] {
            let r = d.pio.resolve(port.into());
            assert_eq!(r.map(|r| r.name), Some(device), "port {port:#x}");
        }
        for port in [0u16, 0xe8, 0xea, 0x5ff, 0x61c, 0x62c, 0x3f8] {
            assert!(d.pio.resolve(port.into()).is_none(), "port {port:#x}");
        }
        assert!(d.mmio.resolve(0xfee0_0000).is_none());
    }
}
