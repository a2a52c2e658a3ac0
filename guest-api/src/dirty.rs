//! Dirty page sets: which guest pages an epoch changed, one bit per page per RAM region.
//!
//! A [`crate::DirtyLog`] harvests one per epoch (for a KVM guest: the dirty log UNION the pages
//! the VMM wrote) and takes it back if the epoch could not be sent.

use vm_memory::GuestAddress;

use crate::PAGE_SIZE;

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

    /// ORs `bits` into region `i`'s bitmap (words beyond the region are ignored).
    pub fn or_region(&mut self, i: usize, bits: &[u64]) {
        or_into(&mut self.regions[i].bits, bits);
    }

    /// All pages of the given regions.
    pub fn full(regions: &[(u64, u64)]) -> Self {
        let mut set = Self::empty(regions);
        for r in &mut set.regions {
            for (w, word) in r.bits.iter_mut().enumerate() {
                let left = r.pages - (w as u64 * 64).min(r.pages);
                *word = if left >= 64 {
                    u64::MAX
                } else {
                    (1u64 << left) - 1
                };
            }
        }
        set
    }
}

fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
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

    #[test]
    fn full_set_has_every_page_and_no_more() {
        let f = DirtySet::full(&[(0, 70 * 4096), (1 << 30, 64 * 4096)]);
        assert_eq!(f.len(), 134);
        assert!(f.contains(69 * 4096) && !f.contains(70 * 4096));
        assert!(f.contains((1 << 30) + 63 * 4096));
    }
}
