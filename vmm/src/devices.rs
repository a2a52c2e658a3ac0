//! Port I/O dispatch: the console, the NIC and the guest's blocking "wait" ports.

use std::time::Duration;

use parking_lot::Mutex;
use tracing::{error, info, warn};

use crate::layout::ports;
use crate::nic::Nic;
use crate::state::ConsoleState;
use crate::vcpu::Waker;
use crate::GuestMem;

/// How long one `NIC_RX_WAIT`, `NIC_TX_WAIT` or `IDLE` blocks at most; the guest loops.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Lines of console output kept for [`Devices::console_lines`].
const CONSOLE_HISTORY: usize = 256;

/// What the vCPU does after a port write.
#[derive(Debug)]
pub(crate) enum OutResult {
    /// Go back into the guest.
    Continue,
    /// Stop this vCPU for good, for the reason given.
    Stop(String),
}

#[derive(Debug, Default)]
struct Console {
    state: ConsoleState,
    history: Vec<String>,
}

/// The devices of a VM, shared by its vCPU threads.
#[derive(Debug)]
pub(crate) struct Devices {
    pub(crate) mem: GuestMem,
    pub(crate) nic: Mutex<Nic>,
    console: Mutex<Console>,
    stopped: Mutex<Vec<(usize, String)>>,
}

impl Devices {
    pub(crate) fn new(mem: GuestMem, nic: Nic, vcpus: usize) -> Self {
        Devices {
            mem,
            nic: Mutex::new(nic),
            console: Mutex::new(Console {
                state: ConsoleState {
                    partial: vec![Vec::new(); vcpus],
                },
                history: Vec::new(),
            }),
            stopped: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn io_out(
        &self,
        vcpu: usize,
        port: u16,
        value: u32,
        size: usize,
        waker: &Waker<'_>,
    ) -> OutResult {
        match port {
            ports::CONSOLE => self.console_byte(vcpu, value as u8),
            ports::NIC_TX_RING..=ports::NIC_RX_DOORBELL => {
                if size != 4 {
                    warn!(
                        vcpu,
                        port, size, "NIC registers take 32-bit writes; ignored"
                    );
                } else {
                    self.nic.lock().write_register(port, value, &self.mem);
                }
            }
            ports::NIC_RX_WAIT => self.wait_rx(value, waker),
            ports::NIC_TX_WAIT => {
                let used = {
                    let mut nic = self.nic.lock();
                    nic.process_tx(&self.mem);
                    nic.tx_used()
                };
                if used == value {
                    waker.sleep(Duration::from_millis(1));
                }
            }
            ports::SLEEP_US => {
                waker.sleep(Duration::from_micros(u64::from(value.min(1_000_000))));
            }
            ports::IDLE => waker.sleep(WAIT_SLICE),
            ports::GUEST_PANIC => {
                return OutResult::Stop(format!("the guest reported internal error {value}"));
            }
            _ => warn!(
                vcpu,
                port = format_args!("{port:#x}"),
                value,
                "write to an unhandled port ignored"
            ),
        }
        OutResult::Continue
    }

    fn wait_rx(&self, seen: u32, waker: &Waker<'_>) {
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
        if !waker.wait(fd, WAIT_SLICE) {
            self.nic.lock().fill_rx(&self.mem);
        }
    }

    fn console_byte(&self, vcpu: usize, b: u8) {
        let mut c = self.console.lock();
        let Some(line) = c.state.partial.get_mut(vcpu) else {
            return;
        };
        if b != b'\n' {
            if line.len() < 4096 {
                line.push(b);
            }
            return;
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        info!(target: "guest", vcpu, "{text}");
        if c.history.len() == CONSOLE_HISTORY {
            c.history.remove(0);
        }
        c.history.push(format!("vcpu{vcpu}: {text}"));
    }

    pub(crate) fn console_state(&self) -> ConsoleState {
        self.console.lock().state.clone()
    }

    pub(crate) fn set_console_state(&self, state: ConsoleState) {
        self.console.lock().state = state;
    }

    pub(crate) fn console_lines(&self) -> Vec<String> {
        self.console.lock().history.clone()
    }

    pub(crate) fn note_stopped(&self, vcpu: usize, why: String) {
        error!(vcpu, "vCPU {vcpu} stopped: {why}");
        self.stopped.lock().push((vcpu, why));
    }

    pub(crate) fn stopped_vcpus(&self) -> Vec<(usize, String)> {
        self.stopped.lock().clone()
    }
}
