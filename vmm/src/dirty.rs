//! Dirty page tracking: which guest pages changed since the previous harvest.
//!
//! Two writers change guest memory: the guest itself, which KVM tracks in its dirty log
//! (memory slots registered with `KVM_MEM_LOG_DIRTY_PAGES`, read and cleared by
//! `KVM_GET_DIRTY_LOG`), and the VMM's device emulation (the NIC writing received packets),
//! which vm-memory tracks in each region's [`vm_memory::bitmap::AtomicBitmap`]. A harvest is the union of both,
//! plus any set a caller put back.
//!
//! Both logs are cleared as they are read, so a caller that harvested a set and then failed to
//! use it (staging or sending failed) must hand it back with [`DirtyTracker::put_back`]; the
//! next harvest then includes those pages again.

use kvm_ioctls::VmFd;
use parking_lot::Mutex;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use rmc_guest_api::DirtySet;

use crate::GuestMem;

/// Harvests dirty pages from KVM and from vm-memory; keeps sets that were put back.
#[derive(Debug)]
pub struct DirtyTracker {
    regions: Vec<(u64, u64)>,
    put_back: Mutex<Option<DirtySet>>,
}

/// Reading KVM's dirty log failed.
#[derive(Debug, thiserror::Error)]
#[error("Cannot read KVM's dirty log for memory slot {slot}")]
pub struct HarvestError {
    slot: u32,
    #[source]
    source: kvm_ioctls::Error,
}

impl DirtyTracker {
    /// A tracker for RAM regions `(base, length)`, registered as KVM slots 0, 1, ...
    pub fn new(regions: Vec<(u64, u64)>) -> Self {
        DirtyTracker {
            regions,
            put_back: Mutex::new(None),
        }
    }

    /// Returns every page written since the previous harvest (by the guest or by the VMM) and
    /// clears the logs. Call it with the vCPUs paused to get a set consistent with the state.
    pub fn harvest(&self, vm: &VmFd, mem: &GuestMem) -> Result<DirtySet, HarvestError> {
        let mut set = DirtySet::empty(&self.regions);
        for (i, &(base, len)) in self.regions.iter().enumerate() {
            let slot = i as u32;
            let kvm = vm
                .get_dirty_log(slot, len as usize)
                .map_err(|source| HarvestError { slot, source })?;
            set.or_region(i, &kvm);
            if let Some(r) = mem.find_region(GuestAddress(base)) {
                // The region derefs to its MmapRegion, whose `bitmap()` is the whole AtomicBitmap.
                set.or_region(i, &std::ops::Deref::deref(r).bitmap().get_and_reset());
            }
        }
        if let Some(back) = self.put_back.lock().take() {
            set.union_with(&back);
        }
        Ok(set)
    }

    /// Hands back a harvested set that could not be used, so the next harvest includes it.
    pub fn put_back(&self, set: DirtySet) {
        let mut slot = self.put_back.lock();
        match slot.as_mut() {
            Some(existing) => existing.union_with(&set),
            None => *slot = Some(set),
        }
    }

    /// Forgets every dirty page so far (both logs and any put-back set), e.g. right after the
    /// whole memory was copied.
    pub fn clear(&self, vm: &VmFd, mem: &GuestMem) -> Result<(), HarvestError> {
        self.harvest(vm, mem).map(drop)
    }
}
