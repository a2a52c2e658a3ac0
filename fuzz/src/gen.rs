//! Shared generators (layouts, page indexes) and independent oracles: the rules of
//! `rmc_transport::wire` restated from its documentation, so a target can compare what the
//! code does with what it promises.

use rmc_transport::wire::{EpochHeader, EpochKind, Layout, MAX_STATE_LEN};

use crate::input::Input;

/// The page size every valid layout has.
pub const PAGE: u64 = 4096;
/// Most regions a valid layout has.
pub const MAX_REGIONS: usize = 16;
/// Most staging slots a valid layout has.
pub const MAX_SLOTS: u32 = 64;
/// Largest valid guest (1 TiB).
pub const MAX_GUEST_BYTES: u64 = 1 << 40;

/// A layout from the input: mostly sane fields (so `validate` often accepts it), each of
/// which can also be arbitrary.
pub fn layout(u: &mut Input) -> Layout {
    let mode = u.u8();
    let page_size = if mode & 1 == 0 { 4096 } else { u.u32() };
    let vcpus = if mode & 2 == 0 {
        1 + u32::from(u.u8() % 64)
    } else {
        u.u32()
    };
    let slot_pages = if mode & 4 == 0 {
        1 + u32::from(u.u8())
    } else {
        u.u32()
    };
    let slot_count = if mode & 8 == 0 {
        2 + u32::from(u.u8() % 63)
    } else {
        u.u32()
    };
    let features = if mode & 16 == 0 { 0 } else { u.u32() };
    let state_version = if mode & 128 == 0 { 1 } else { u.u32() };
    let count = if mode & 32 == 0 {
        1 + usize::from(u.u8() % 3)
    } else {
        usize::from(u.u8() % 20)
    };
    let mut regions = Vec::with_capacity(count);
    if mode & 64 == 0 {
        // Ascending, page aligned; sizes from one page to terabytes, some gaps.
        let mut end = 0u64;
        for _ in 0..count {
            let gap = u64::from(u.u8() % 4) * u64::from(u.u16()) * PAGE;
            let pages = match u.u8() % 8 {
                0..=4 => 1 + u64::from(u.u8()),
                5 | 6 => 1 + u64::from(u.u16()),
                _ => 1 + u64::from(u.u32()),
            };
            let base = end.saturating_add(gap);
            let len = pages * PAGE;
            regions.push((base, len));
            end = base.saturating_add(len);
        }
    } else {
        for _ in 0..count {
            regions.push((u.u64_edge(), u.u64_edge()));
        }
    }
    Layout {
        page_size,
        regions,
        vcpus,
        slot_pages,
        slot_count,
        features,
        state_version,
    }
}

/// Whether `Layout::validate` must accept `l`, restated from its documentation: page size
/// 4096, 1..=16 regions, page-aligned, ascending, non-overlapping, non-empty, total at most
/// 1 TiB; 1..=64 vCPUs; 1 <= slot_pages <= the guest's pages; 2 <= slot_count <= 64;
/// features == 0 (any state version).
pub fn layout_valid(l: &Layout) -> bool {
    if l.page_size != 4096 || l.regions.is_empty() || l.regions.len() > MAX_REGIONS {
        return false;
    }
    let mut end: u128 = 0;
    let mut total: u128 = 0;
    for (i, &(base, len)) in l.regions.iter().enumerate() {
        let (b, n) = (u128::from(base), u128::from(len));
        if len == 0 || base % PAGE != 0 || len % PAGE != 0 || b + n > u128::from(u64::MAX) {
            return false;
        }
        if i > 0 && b < end {
            return false;
        }
        end = b + n;
        total += n;
    }
    total <= u128::from(MAX_GUEST_BYTES)
        && (1..=64).contains(&l.vcpus)
        && l.slot_pages >= 1
        && u128::from(l.slot_pages) <= total / u128::from(PAGE)
        && (2..=MAX_SLOTS).contains(&l.slot_count)
        && l.features == 0
}

/// Guest bytes of a layout (no overflow for a valid one).
pub fn guest_bytes(l: &Layout) -> u64 {
    l.regions.iter().map(|&(_, len)| len).sum()
}

/// What `EpochHeader::body_len` must return for a valid layout: `None` for a refusal.
pub fn body_len(h: &EpochHeader, l: &Layout) -> Option<u64> {
    let total = u128::from(guest_bytes(l) / PAGE);
    if u128::from(h.page_count) > total {
        return None;
    }
    match h.kind {
        EpochKind::Sync if h.state_len != 0 => return None,
        EpochKind::Checkpoint if h.state_len == 0 || h.state_len > MAX_STATE_LEN => return None,
        _ => {}
    }
    let len = u128::from(h.page_count) * u128::from(8 + PAGE) + u128::from(h.state_len);
    Some(u64::try_from(len).expect("a valid layout's bodies fit in u64"))
}

/// The first entry `validate_index` must refuse: not page aligned, outside every region, or
/// not above the entry before it. `None`: the index is valid.
pub fn index_first_bad(index: &[u64], l: &Layout) -> Option<usize> {
    let mut prev: Option<u64> = None;
    for (i, &a) in index.iter().enumerate() {
        let inside = l.regions.iter().any(|&(b, n)| {
            u128::from(a) >= u128::from(b) && u128::from(a) < u128::from(b) + u128::from(n)
        });
        if a % PAGE != 0 || !inside || prev.is_some_and(|p| a <= p) {
            return Some(i);
        }
        prev = Some(a);
    }
    None
}

/// The guest physical address of guest page number `n` (pages numbered through the regions
/// in order), or `None` past the end.
pub fn page_addr(l: &Layout, mut n: u64) -> Option<u64> {
    for &(base, len) in &l.regions {
        let pages = len / PAGE;
        if n < pages {
            return Some(base + n * PAGE);
        }
        n -= pages;
    }
    None
}

/// A page index of `count` entries for a valid layout: usually valid (ascending pages inside
/// guest memory, small gaps), sometimes with one entry spoiled (unaligned, outside, repeated,
/// out of order), sometimes arbitrary.
pub fn index(u: &mut Input, l: &Layout, count: usize) -> Vec<u64> {
    let total = guest_bytes(l) / PAGE;
    let mode = u.u8();
    if mode % 8 == 7 || count as u64 > total {
        return (0..count).map(|_| u.u64_edge()).collect();
    }
    let mut out = Vec::with_capacity(count);
    let mut next = 0u64;
    for i in 0..count as u64 {
        // Leave room for the entries still to come.
        let room = total.saturating_sub(next + (count as u64 - i));
        let gap = u64::from(u.u8() % 4).min(room);
        next += gap;
        out.push(page_addr(l, next).expect("room was left"));
        next += 1;
    }
    if mode % 8 == 6 && !out.is_empty() {
        let at = u.below(out.len() as u64) as usize;
        out[at] = match u.u8() % 5 {
            0 => out[at] + 1 + u64::from(u.u16() % 4095),
            1 => out[at].wrapping_add(u.u64_edge()),
            2 if at > 0 => out[at - 1],
            3 if at > 0 => out[at - 1].saturating_sub(PAGE),
            _ => u.u64_edge(),
        };
    }
    out
}
