//! The standby's restore check: [`rmc_mc::standby::RestoreCheck`] for an rmc VM, on top of the
//! VMM's own checks ([`rmc_vmm::RestoreCheck`]), which know nothing of the wire protocol.

use rmc_transport::wire::Layout;

/// What a standby checks before it acknowledges a checkpoint of an rmc VM: the guest's layout
/// is one this VMM builds, and each checkpoint's state decodes and fits it.
#[derive(Debug, Default, Clone, Copy)]
pub struct VmRestoreCheck;

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
}
