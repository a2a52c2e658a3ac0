//! The console port ([`crate::layout::ports::CONSOLE`]): each byte written is one character;
//! complete lines go to the VMM's log (target `guest`) and to a short history. Partial lines
//! are per vCPU and are part of a checkpoint ([`ConsoleState`]).

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::bus::{BusDevice, IoAction, IoContext};
use crate::persist::{self, Persist, Versioned};
use crate::state::StateError;

/// Lines of console output kept for [`Console::lines`].
const HISTORY: usize = 256;
/// Longest partial line kept; further bytes up to the newline are dropped.
const MAX_LINE: usize = 4096;

/// Console state: partial lines not yet logged, per vCPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Bytes after the last newline, per vCPU.
    pub partial: Vec<Vec<u8>>,
}

impl Versioned for ConsoleState {
    const NAME: &'static str = "console";
    const VERSION: u32 = 1;
}

#[derive(Debug, Default)]
struct Inner {
    state: ConsoleState,
    history: Vec<String>,
}

/// The console device.
#[derive(Debug, Default)]
pub(crate) struct Console(Mutex<Inner>);

impl Console {
    /// A console for `vcpus` vCPUs.
    pub(crate) fn new(vcpus: usize) -> Self {
        Console(Mutex::new(Inner {
            state: ConsoleState {
                partial: vec![Vec::new(); vcpus],
            },
            history: Vec::new(),
        }))
    }

    fn byte(&self, vcpu: usize, b: u8) {
        let mut c = self.0.lock();
        let Some(line) = c.state.partial.get_mut(vcpu) else {
            return;
        };
        if b != b'\n' {
            if line.len() < MAX_LINE {
                line.push(b);
            }
            return;
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        info!(target: "guest", vcpu, "{text}");
        if c.history.len() == HISTORY {
            c.history.remove(0);
        }
        c.history.push(format!("vcpu{vcpu}: {text}"));
    }

    /// Lines printed so far (the last [`HISTORY`]), most recent last.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.0.lock().history.clone()
    }
}

impl BusDevice for Console {
    /// The first byte of the access is the character (an `out` of 2 or 4 bytes prints its low
    /// byte).
    fn write(&self, io: &IoContext<'_>, _offset: u64, data: &[u8]) -> IoAction {
        if let Some(&b) = data.first() {
            self.byte(io.vcpu(), b);
        }
        IoAction::Continue
    }
}

impl Persist for Console {
    type State = ConsoleState;

    fn save(&self) -> ConsoleState {
        self.0.lock().state.clone()
    }

    fn restore(&self, state: &ConsoleState) -> Result<(), StateError> {
        persist::check(state, &format_args!("device {}", ConsoleState::NAME))?;
        self.0.lock().state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::{RunControl, Waker};
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn lines_per_vcpu_and_partial_lines_in_the_state() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctl = RunControl::new(2);
        let waker = Waker::new(&kick, &ctl);
        let (io0, io1) = (IoContext::new(0, &waker), IoContext::new(1, &waker));
        let c = Console::new(2);
        for &b in b"hel" {
            c.write(&io0, 0, &[b]);
        }
        for &b in b"ab\ncd" {
            // Wider writes print their low byte.
            c.write(&io1, 0, &[b, 0, 0, 0]);
        }
        assert_eq!(c.lines(), vec!["vcpu1: ab".to_string()]);
        let saved = c.save();
        assert_eq!(saved.partial, vec![b"hel".to_vec(), b"cd".to_vec()]);
        let other = Console::new(2);
        other.restore(&saved).unwrap();
        for &b in b"lo\n" {
            other.write(&io0, 0, &[b]);
        }
        assert_eq!(other.lines(), vec!["vcpu0: hello".to_string()]);
        // A vCPU the state does not know is ignored, as before.
        let io7 = IoContext::new(7, &waker);
        other.write(&io7, 0, b"x");
        other.write(&io7, 0, b"\n");
        assert_eq!(other.lines().len(), 1);
    }
}
