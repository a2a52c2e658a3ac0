//! The devices of a VM and the buses they sit on.
//!
//! Port I/O ([`crate::layout::ports`]):
//!
//! | ports | device | state in a checkpoint |
//! | --- | --- | --- |
//! | `CONSOLE` (1 port) | [`console::Console`] | [`console::ConsoleState`] |
//! | `NIC_BASE` .. `+ NIC_PORTS` | the NIC ([`crate::nic::device::NicDevice`]) | [`crate::nic::NicState`] |
//! | `CONTROL_BASE` .. `+ CONTROL_PORTS` | guest control ([`control::Control`]) | none |
//! | 0x3f8 .. 0x400 (PC VMs) | COM1 16550 ([`serial::SerialDevice`], IRQ 4) | [`serial::SerialState`] |
//! | 0x60 .. 0x65 (PC VMs) | i8042, reset line only ([`serial::I8042`]) | none |
//! | 0x70 .. 0x72 (PC VMs) | CMOS/RTC ([`cmos::Cmos`]) | [`cmos::CmosState`] |
//!
//! A PC VM (one that runs a stock kernel) also has KVM's in-kernel PICs, IOAPIC, LAPICs and
//! PIT ([`crate::platform`]); those are the VM's, not on a bus.
//!
//! MMIO: no device yet (the bus is there for the ones to come).
//!
//! Each device with state implements [`Persist`]; [`Devices::save`] and
//! [`Devices::restore`] put their states together as [`DeviceStates`].

pub mod cmos;
pub(crate) mod console;
pub(crate) mod control;
pub mod serial;

use std::sync::Arc;

use parking_lot::Mutex;
use tracing::error;

use crate::bus::{Bus, BusError};
use crate::layout::ports;
use crate::nic::device::NicDevice;
use crate::nic::Nic;
use crate::persist::{Persist, Versioned};
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
    /// COM1 (PC VMs, also on `pio`).
    pub(crate) serial: Option<Arc<serial::SerialDevice>>,
    /// The CMOS/RTC (PC VMs, also on `pio`).
    cmos: Option<Arc<cmos::Cmos>>,
    /// Ports an access to which found no device, each logged once.
    unhandled: Mutex<std::collections::BTreeSet<u16>>,
    /// vCPUs that stopped for good, with the reason.
    stopped: Mutex<Vec<(usize, String)>>,
}

impl Devices {
    /// The devices of a VM with `vcpus` vCPUs, on their buses.
    /// `pc`: COM1, for a PC VM (the i8042 comes with it).
    pub(crate) fn new(
        mem: GuestMem,
        nic: Nic,
        vcpus: usize,
        pc: Option<Arc<serial::SerialDevice>>,
    ) -> Result<Self, BusError> {
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
        let serial = match pc {
            Some(uart) => {
                pio.insert(
                    "serial",
                    serial::COM1.into(),
                    serial::UART_PORTS.into(),
                    uart.clone(),
                )?;
                pio.insert(
                    "i8042",
                    serial::I8042_BASE.into(),
                    serial::I8042_PORTS.into(),
                    Arc::new(serial::I8042::new()),
                )?;
                Some(uart)
            }
            None => None,
        };
        let cmos = match serial {
            Some(_) => {
                let c = Arc::new(cmos::Cmos::default());
                pio.insert(
                    "cmos",
                    cmos::CMOS_BASE.into(),
                    cmos::CMOS_PORTS.into(),
                    c.clone(),
                )?;
                Some(c)
            }
            None => None,
        };
        Ok(Devices {
            pio,
            mmio: Bus::new("MMIO"),
            nic,
            console,
            serial,
            cmos,
            unhandled: Mutex::default(),
            stopped: Mutex::new(Vec::new()),
        })
    }

    /// Every device's state (the vCPUs must be paused).
    pub(crate) fn save(&self) -> DeviceStates {
        DeviceStates {
            nic: self.nic.save(),
            console: self.console.save(),
            // The VM adds the platform's (it needs the VM's and vCPUs' fds).
            platform: None,
            serial: self.serial.as_ref().map(|s| s.save()),
            cmos: self.cmos.as_ref().map(|c| c.save()),
        }
    }

    /// Restores every device's saved state (each checks its own first).
    pub(crate) fn restore(&self, states: &DeviceStates) -> Result<(), StateError> {
        self.nic.restore(&states.nic)?;
        self.console.restore(&states.console)?;
        match (&self.serial, &states.serial) {
            (Some(dev), Some(s)) => dev.restore(s),
            (None, None) => Ok(()),
            (Some(_), None) => Err(StateError::MissingDevice(serial::SerialState::NAME)),
            (None, Some(_)) => Err(StateError::Mismatch(
                "the state is of a PC VM (it has a serial port), this VM runs the built-in guest"
                    .into(),
            )),
        }?;
        match (&self.cmos, &states.cmos) {
            (Some(dev), Some(s)) => dev.restore(s),
            (None, None) => Ok(()),
            (Some(_), None) => Err(StateError::MissingDevice(cmos::CmosState::NAME)),
            (None, Some(_)) => Err(StateError::Mismatch(
                "the state is of a PC VM (it has a CMOS), this VM runs the built-in guest".into(),
            )),
        }
    }

    /// An access to `port` found no device: whether this is the first (worth a warning; a
    /// stock kernel probes many legacy ports, each once or in a loop).
    pub(crate) fn first_unhandled(&self, port: u16) -> bool {
        self.unhandled.lock().insert(port)
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
        let d = Devices::new(mem, Nic::new(None).unwrap(), 1, None).unwrap();
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
