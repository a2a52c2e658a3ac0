//! The CMOS/RTC ports (0x70 index, 0x71 data) of a PC VM, enough for a stock kernel: the
//! clock reads the host's UTC time in BCD and is never busy updating (status A's UIP bit
//! clear), status D says the battery is good, every other byte reads 0 and writes are
//! ignored. Without it the kernel reads 0xff (an empty bus) and waits forever for the
//! update-in-progress bit to clear. The wall clock a KVM guest keeps comes from the KVM clock;
//! this only has to answer.
//!
//! The index register is state: a checkpoint can fall between the guest's write of the index
//! and its read of the data.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, IoAction, IoContext};
use crate::persist::{self, Persist, Versioned};
use crate::state::StateError;

/// The index port; the data port is the next.
pub const CMOS_BASE: u16 = 0x70;
/// Ports the device decodes.
pub const CMOS_PORTS: u16 = 2;

/// The CMOS device's state in a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register (bit 7, the NMI mask, dropped).
    pub index: u8,
}

impl Versioned for CmosState {
    const NAME: &'static str = "cmos";
    const VERSION: u32 = 1;

    fn check(&self) -> Result<(), String> {
        if self.index > 0x7f {
            return Err(format!("register index {:#x} is past the CMOS", self.index));
        }
        Ok(())
    }
}

/// The device.
#[derive(Debug, Default)]
pub(crate) struct Cmos(Mutex<CmosState>);

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Register `index` of a CMOS whose clock reads `unix` seconds.
fn register(index: u8, unix: u64) -> u8 {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    let (y, m, d) = civil(days);
    match index {
        0x00 => bcd(secs % 60),
        0x02 => bcd(secs / 60 % 60),
        0x04 => bcd(secs / 3600),
        // Day of the week, 1 = Sunday (1970-01-01 was a Thursday).
        0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64),
        0x07 => bcd(d),
        0x08 => bcd(m),
        0x09 => bcd(y.rem_euclid(100) as u64),
        // Status A: divider on, rate 1 kHz, no update in progress.
        0x0a => 0x26,
        // Status B: 24-hour mode, BCD, no interrupts.
        0x0b => 0x02,
        // Status D: the battery is good.
        0x0d => 0x80,
        0x32 => bcd((y / 100) as u64),
        _ => 0,
    }
}

impl BusDevice for Cmos {
    fn read(&self, _io: &IoContext<'_>, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            data[0] = register(self.0.lock().index, unix);
        }
    }

    fn write(&self, _io: &IoContext<'_>, offset: u64, data: &[u8]) -> IoAction {
        if let (0, Some(&b)) = (offset, data.first()) {
            self.0.lock().index = b & 0x7f;
        }
        IoAction::Continue
    }
}

impl Persist for Cmos {
    type State = CmosState;

    fn save(&self) -> CmosState {
        *self.0.lock()
    }

    fn restore(&self, state: &CmosState) -> Result<(), StateError> {
        persist::check(state, &format_args!("device {}", CmosState::NAME))?;
        *self.0.lock() = *state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_utc_in_bcd_and_is_never_busy() {
        // 2026-11-28 09:05:07 UTC, a Saturday.
        let t = 1_795_856_707;
        assert_eq!(register(0x00, t), 0x07);
        assert_eq!(register(0x02, t), 0x05);
        assert_eq!(register(0x04, t), 0x09);
        assert_eq!(register(0x06, t), 0x07, "Saturday");
        assert_eq!(register(0x07, t), 0x28);
        assert_eq!(register(0x08, t), 0x11);
        assert_eq!(register(0x09, t), 0x26);
        assert_eq!(register(0x32, t), 0x20);
        assert_eq!(register(0x0a, t) & 0x80, 0, "no update in progress");
        assert_eq!(register(0x0d, t), 0x80);
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn the_index_is_state() {
        let c = Cmos::default();
        c.0.lock().index = 0x0a;
        let saved = c.save();
        let other = Cmos::default();
        other.restore(&saved).unwrap();
        assert_eq!(other.save().index, 0x0a);
        assert!(other.restore(&CmosState { index: 0x80 }).is_err());
    }
}
