//! The PC platform of a VM that runs a stock kernel: KVM's in-kernel interrupt controllers
//! (two 8259 PICs, the IOAPIC, one LAPIC per vCPU), the 8254 PIT and the KVM clock, created
//! with the VM and carried in every checkpoint ([`PlatformState`]).
//!
//! KVM emulates all of them, so the VMM's part is to create them before the vCPUs
//! ([`create`]), and to save and restore their state with the vCPUs paused ([`save`],
//! [`restore`]). Order on restore matters: the vCPUs' own state first (the APIC base MSR),
//! then the chips, the PIT, the clock, each vCPU's LAPIC, and last the TSC-deadline MSR again,
//! which KVM ignores while the LAPIC is not in TSC-deadline mode (so the value the vCPU
//! restore wrote earlier may have been dropped).
//!
//! The clock is restored to the value it had at the checkpoint: the guest does not see the
//! time between the checkpoint and its restore (a failover's gap) as time it ran.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_lapic_state, kvm_msr_entry, kvm_pit_config, kvm_pit_state2,
    Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::persist::{self, Versioned};
use crate::vm::{kvm_err, VmError};

/// Where KVM puts the TSS it needs for real-mode emulation on Intel (3 pages below the
/// LAPIC/IOAPIC area, in the hole below 4 GiB that no RAM uses).
pub const TSS_ADDR: usize = 0xfffb_d000;
/// The TSC-deadline MSR.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Saved state of the in-kernel platform devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformState {
    /// The first 8259.
    pub pic_master: kvm_irqchip,
    /// The second 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// Each vCPU's local APIC, in vCPU order.
    pub lapics: Vec<kvm_lapic_state>,
}

impl PartialEq for PlatformState {
    /// Equal when they encode alike (the KVM structs hold unions).
    fn eq(&self, other: &Self) -> bool {
        persist::to_bytes(self) == persist::to_bytes(other)
    }
}

impl Eq for PlatformState {}

impl Versioned for PlatformState {
    const NAME: &'static str = "platform";
    const VERSION: u32 = 1;

    fn check(&self) -> Result<(), String> {
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(format!(
                    "interrupt controller {} has chip id {}",
                    id, chip.chip_id
                ));
            }
        }
        if self.lapics.is_empty() {
            return Err("no local APIC".into());
        }
        Ok(())
    }
}

/// Creates the interrupt controllers and the PIT. Call before the first vCPU exists.
pub(crate) fn create(vm: &VmFd) -> Result<(), VmError> {
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("CREATE_PIT2"))
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm_err("GET_IRQCHIP"))?;
    Ok(c)
}

/// The platform's state (the vCPUs must be paused; `vcpus` in order).
pub(crate) fn save(vm: &VmFd, vcpus: &[&VcpuFd]) -> Result<PlatformState, VmError> {
    let mut clock = vm.get_clock().map_err(kvm_err("GET_CLOCK"))?;
    // Only KVM_CLOCK_REALTIME would mean anything to KVM_SET_CLOCK, and the clock is to
    // continue from this value, not from the wall clock.
    clock.flags = 0;
    Ok(PlatformState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("GET_PIT2"))?,
        clock,
        lapics: vcpus
            .iter()
            .map(|v| v.get_lapic().map_err(kvm_err("GET_LAPIC")))
            .collect::<Result<_, _>>()?,
    })
}

/// Restores a saved platform after the vCPUs' own state; `tsc_deadlines` is each vCPU's
/// saved TSC-deadline MSR, if it had one.
pub(crate) fn restore(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    state: &PlatformState,
    tsc_deadlines: &[Option<u64>],
) -> Result<(), VmError> {
    persist::check(state, &format_args!("device {}", PlatformState::NAME))?;
    if state.lapics.len() != vcpus.len() {
        return Err(crate::state::StateError::Mismatch(format!(
            "the platform state has {} local APICs, the VM {} vCPUs",
            state.lapics.len(),
            vcpus.len()
        ))
        .into());
    }
    for c in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(c).map_err(kvm_err("SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm_err("SET_PIT2"))?;
    vm.set_clock(&state.clock).map_err(kvm_err("SET_CLOCK"))?;
    for (i, (v, lapic)) in vcpus.iter().zip(&state.lapics).enumerate() {
        v.set_lapic(lapic).map_err(kvm_err("SET_LAPIC"))?;
        if let Some(value) = tsc_deadlines.get(i).copied().flatten() {
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_TSC_DEADLINE,
                data: value,
                ..Default::default()
            }])
            .expect("one entry fits");
            let n = v.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
            if n != 1 {
                return Err(VmError::Msr {
                    vcpu: i,
                    index: MSR_IA32_TSC_DEADLINE,
                });
            }
        }
    }
    Ok(())
}
