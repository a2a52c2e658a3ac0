//! The NIC on the port bus: its register block ([`ports::NIC_TX_RING`] ..=
//! [`ports::NIC_RX_DOORBELL`], 32-bit writes) and its two blocking wait ports
//! ([`ports::NIC_RX_WAIT`], [`ports::NIC_TX_WAIT`]), all in [`ports::NIC_BASE`] ..
//! `NIC_BASE + NIC_PORTS`.

use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tracing::warn;

use super::Nic;
use crate::bus::{le_value, BusDevice, IoAction, IoContext};
use crate::layout::ports;
use crate::GuestMem;

/// How long one `NIC_RX_WAIT` or `NIC_TX_WAIT` blocks at most; the guest loops.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// The NIC and the guest memory its rings live in.
#[derive(Debug)]
pub(crate) struct NicDevice {
    nic: Mutex<Nic>,
    mem: GuestMem,
}

impl NicDevice {
    pub(crate) fn new(nic: Nic, mem: GuestMem) -> Self {
        NicDevice {
            nic: Mutex::new(nic),
            mem,
        }
    }

    /// The NIC, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Nic> {
        self.nic.lock()
    }

    fn wait_rx(&self, seen: u32, io: &IoContext<'_>) {
        let fd = {
            let mut nic = self.nic.lock();
            // Packets held back by a full output buffer are retried whenever the guest waits.
            nic.process_tx(&self.mem);
            nic.fill_rx(&self.mem);
            if nic.rx_used() != seen {
                return;
            }
            nic.socket_fd()
        };
        // Without the lock: the wait may last a while.
        if !io.wait(fd, WAIT_SLICE) {
            self.nic.lock().fill_rx(&self.mem);
        }
    }

    fn wait_tx(&self, seen: u32, io: &IoContext<'_>) {
        let used = {
            let mut nic = self.nic.lock();
            nic.process_tx(&self.mem);
            nic.tx_used()
        };
        if used == seen {
            io.sleep(Duration::from_millis(1));
        }
    }
}

impl BusDevice for NicDevice {
    fn write(&self, io: &IoContext<'_>, offset: u64, data: &[u8]) -> IoAction {
        let port = ports::NIC_BASE + offset as u16;
        let value = le_value(data);
        match port {
            ports::NIC_TX_RING..=ports::NIC_RX_DOORBELL => {
                if data.len() != 4 {
                    warn!(
                        vcpu = io.vcpu(),
                        port,
                        size = data.len(),
                        "NIC registers take 32-bit writes; ignored"
                    );
                } else {
                    self.nic.lock().write_register(port, value, &self.mem);
                }
            }
            ports::NIC_RX_WAIT => self.wait_rx(value, io),
            ports::NIC_TX_WAIT => self.wait_tx(value, io),
            _ => warn!(
                vcpu = io.vcpu(),
                port = format_args!("{port:#x}"),
                value,
                "write to an unhandled port ignored"
            ),
        }
        IoAction::Continue
    }
}
