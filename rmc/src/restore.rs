//! The standby's restore check: [`rmc_mc::standby::RestoreCheck`] for an rmc VM, on top of the
//! VMM's own checks ([`rmc_vmm::RestoreCheck`]), which know nothing of the wire protocol.

use rmc_transport::wire::Layout;

/// What a standby checks before it acknowledges a checkpoint of an rmc VM: the guest's layout
/// is one this VMM builds, and each checkpoint's state decodes and fits it. Once it holds a
/// checkpoint of a Linux guest, it shows the serial console output the checkpoint carries
/// (see `rmc_vmm::ConsoleEmitter`).
#[derive(Debug, Default)]
pub struct VmRestoreCheck {
    console: Option<rmc_vmm::ConsoleEmitter>,
}

impl VmRestoreCheck {
    /// A check that shows carried console output on `console`.
    pub fn with_console(console: rmc_vmm::ConsoleSink) -> Self {
        VmRestoreCheck {
            console: Some(rmc_vmm::ConsoleEmitter::new(console)),
        }
    }
}

impl rmc_mc::standby::RestoreCheck for VmRestoreCheck {
    fn state_version(&self) -> u32 {
        rmc_vmm::state::VERSION
    }

    fn check_layout(&self, layout: &Layout) -> Result<(), rmc_mc::BoxError> {
        Ok(rmc_vmm::RestoreCheck::check_guest(
            layout.vcpus,
            &layout.regions,
        )?)
    }

    fn check_state(&self, state: &[u8], layout: &Layout) -> Result<(), rmc_mc::BoxError> {
        Ok(rmc_vmm::RestoreCheck::check_state(
            state,
            layout.vcpus,
            &layout.regions,
        )?)
    }

    fn checkpoint_held(&self, state: &[u8]) {
        let Some(console) = &self.console else { return };
        // Checked before it was applied, so it decodes.
        if let Ok(s) = rmc_vmm::VmState::decode(state) {
            if let Some(serial) = &s.devices.serial {
                console.checkpoint_held(serial);
            }
        }
    }
}
