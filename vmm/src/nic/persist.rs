//! Save and restore of the NIC, and the version of [`NicState`]'s encoding.

use super::device::NicDevice;
use super::{NicState, MAX_RING_SIZE};
use crate::persist::{self, Persist, Versioned};
use crate::state::StateError;

impl Versioned for NicState {
    const NAME: &'static str = "nic";
    const VERSION: u32 = 1;

    /// The ring size is one the device accepts (`enable` refuses any other).
    fn check(&self) -> Result<(), String> {
        if self.size != 0 && (!self.size.is_power_of_two() || self.size > MAX_RING_SIZE) {
            return Err(format!(
                "NIC ring of {} entries (0 or a power of two up to {MAX_RING_SIZE})",
                self.size
            ));
        }
        Ok(())
    }
}

impl Persist for NicDevice {
    type State = NicState;

    fn save(&self) -> NicState {
        self.lock().state().clone()
    }

    /// The host address stays this NIC's own (see [`super::Nic::set_state`]).
    fn restore(&self, state: &NicState) -> Result<(), StateError> {
        persist::check(state, &format_args!("device {}", NicState::NAME))?;
        self.lock().set_state(state.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_the_device_never_accepts_are_refused() {
        for size in [0, 1, 2, 64, MAX_RING_SIZE] {
            let s = NicState {
                size,
                ..Default::default()
            };
            s.check().unwrap();
        }
        for size in [3, 96, 2 * MAX_RING_SIZE, 4096, u32::MAX] {
            let s = NicState {
                size,
                ..Default::default()
            };
            let err = s.check().unwrap_err();
            assert!(
                err.contains(&format!("NIC ring of {size} entries")),
                "{err}"
            );
        }
    }
}
