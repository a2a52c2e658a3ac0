//! Dirty page tracking: which guest pages changed since the previous harvest.
//!
//! Two writers change guest memory: the guest itself, which KVM tracks in its dirty log
//! (memory slots registered with `KVM_MEM_LOG_DIRTY_PAGES`, read and cleared by
//! `KVM_GET_DIRTY_LOG`), and the VMM's device emulation (the NIC writing received packets),
//! which vm-memory tracks in each region's [`AtomicBitmap`]. A harvest is the union of both,
//! plus any set a caller put back.
//!
//! Both logs are cleared as they are read, so a caller that harvested a set and then failed to
//! use it (staging or sending failed) must hand it back with [`DirtyTracker::put_back`]; the
//! next harvest then includes those pages again.

use kvm_ioctls::VmFd;
use parking_lot::Mutex;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::PAGE_SIZE;
use crate::GuestMem;

/// The dirty pages of one RAM region, one bit per page (bit `i` of word `w` is page `64w + i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionDirty {
    /// Guest physical address of the region's first page.
    pub base: u64,
    /// Number of pages in the region.
    pub pages: u64,
    /// The bitmap.
    pub bits: Vec<u64>,
}

/// A set of dirty guest pages, per RAM region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    regions: Vec<RegionDirty>,
}

impl DirtySet {
    /// An empty set shaped like the given regions `(base, length in bytes)`.
    pub fn empty(regions: &[(u64, u64)]) -> Self {
        DirtySet {
            regions: regions
                .iter()
                .map(|&(base, len)| {
                    let pages = len / PAGE_SIZE;
                    RegionDirty {
                        base,
                        pages,
                        bits: vec![0; pages.div_ceil(64) as usize],
                    }
                })
                .collect(),
        }
    }

    /// Number of dirty pages.
    pub fn len(&self) -> usize {
        self.regions
            .iter()
            .map(|r| {
                r.bits
                    .iter()
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>()
            })
            .sum()
    }

    /// True when no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.regions.iter().all(|r| r.bits.iter().all(|&w| w == 0))
    }

    /// Whether the page containing `addr` is in the set.
    pub fn contains(&self, addr: u64) -> bool {
        self.regions.iter().any(|r| {
            addr >= r.base && {
                let page = (addr - r.base) / PAGE_SIZE;
                page < r.pages && r.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
            }
        })
    }

    /// Marks the page containing `addr`; addresses outside every region are ignored.
    pub fn insert(&mut self, addr: u64) {
        for r in &mut self.regions {
            if addr >= r.base && (addr - r.base) / PAGE_SIZE < r.pages {
                let page = (addr - r.base) / PAGE_SIZE;
                r.bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }

    /// Adds every page of `other` (which must have the same shape) to this set.
    pub fn union_with(&mut self, other: &DirtySet) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            debug_assert_eq!(mine.base, theirs.base);
            or_into(&mut mine.bits, &theirs.bits);
        }
    }

    /// Guest physical addresses of the dirty pages, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.regions.iter().flat_map(|r| {
            r.bits.iter().enumerate().flat_map(move |(w, &word)| {
                let mut word = word;
                std::iter::from_fn(move || {
                    if word == 0 {
                        return None;
                    }
                    let bit = word.trailing_zeros() as u64;
                    word &= word - 1;
                    Some(GuestAddress(r.base + (w as u64 * 64 + bit) * PAGE_SIZE))
                })
            })
        })
    }

    /// The per-region bitmaps.
    pub fn regions(&self) -> &[RegionDirty] {
        &self.regions
    }
}

fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

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
        for (slot, (region, (_, len))) in set.regions.iter_mut().zip(&self.regions).enumerate() {
            let slot = slot as u32;
            let kvm = vm
                .get_dirty_log(slot, *len as usize)
                .map_err(|source| HarvestError { slot, source })?;
            or_into(&mut region.bits, &kvm);
            if let Some(r) = mem.find_region(GuestAddress(region.base)) {
                // The region derefs to its MmapRegion, whose `bitmap()` is the whole AtomicBitmap.
                or_into(
                    &mut region.bits,
                    &std::ops::Deref::deref(r).bitmap().get_and_reset(),
                );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let regions = [(0, 1 << 20), (4 << 30, 1 << 20)];
        let mut a = DirtySet::empty(&regions);
        assert!(a.is_empty());
        a.insert(0x1000);
        a.insert((4 << 30) + 0x3fff);
        a.insert(3 << 30); // in the hole: ignored
        assert_eq!(a.len(), 2);
        assert!(a.contains(0x1fff));
        assert!(!a.contains(0x2000));
        let mut b = DirtySet::empty(&regions);
        b.insert(0x1000);
        b.insert(0xff000);
        a.union_with(&b);
        let pages: Vec<u64> = a.pages().map(|g| g.0).collect();
        assert_eq!(pages, vec![0x1000, 0xff000, (4 << 30) + 0x3000]);
    }
}
