//! The guest control ports ([`crate::layout::ports::CONTROL_BASE`]): sleep for a while, idle,
//! and report an internal error (which stops the vCPU). The device has no state.

use std::time::Duration;

use tracing::warn;

use crate::bus::{le_value, BusDevice, IoAction, IoContext};
use crate::layout::ports;

/// How long one `IDLE` blocks at most; the guest loops.
const IDLE_SLICE: Duration = Duration::from_millis(100);
/// Longest `SLEEP_US` honoured.
const MAX_SLEEP_US: u32 = 1_000_000;

/// The guest control block.
#[derive(Debug, Default)]
pub(crate) struct Control;

impl BusDevice for Control {
    fn write(&self, io: &IoContext<'_>, offset: u64, data: &[u8]) -> IoAction {
        let port = ports::CONTROL_BASE + offset as u16;
        let value = le_value(data);
        match port {
            ports::SLEEP_US => {
                io.sleep(Duration::from_micros(u64::from(value.min(MAX_SLEEP_US))));
            }
            ports::IDLE => io.sleep(IDLE_SLICE),
            ports::GUEST_PANIC => {
                return IoAction::Stop(format!("the guest reported internal error {value}"));
            }
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
