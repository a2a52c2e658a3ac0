//! rmc-staging: the staging region, where an epoch's dirty pages and state wait to be sent.
//!
//! One region is allocated once (page-aligned anonymous mmap; 2 MiB huge pages where the
//! kernel has them reserved, transparent huge pages requested otherwise; pre-faulted, and
//! mlocked where permitted) and divided into a ring of `k >= 2` equal slots. Inside the
//! checkpoint pause the primary gathers the epoch's dirty pages from guest memory into a free
//! slot ([`Slot::gather`]) and stores the state blob; after the guest resumed, the transport
//! sends the slot; when the standby acknowledged the epoch, the slot goes back to the ring.
//! The standby receives each epoch into a slot of its own region before applying it. The
//! region exposes its address and length ([`StagingRegion::as_ptr`], [`StagingRegion::len`])
//! so that an RDMA transport can register it once.
//!
//! A slot's layout, each part starting on a page boundary:
//!
//! ```text
//! | page index: slot_pages x u64 guest physical address | page data: slot_pages x 4 KiB | state |
//! ```
//!
//! Ownership: [`SlotRing::acquire`] hands out a [`Slot`] that has exclusive access to its
//! bytes; dropping it returns the slot to the ring. To share a filled slot between the code
//! that sends it and the code that frees it on ack, wrap it in an `Arc`.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Guest page size handled by the staging region (the one definition, from rmc-guest-api).
pub use rmc_guest_api::PAGE_BYTES;
const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Sizes of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLayout {
    /// Pages a slot holds.
    pub slot_pages: usize,
    /// Largest state blob a slot holds.
    pub max_state: usize,
}

impl SlotLayout {
    fn round(n: usize) -> usize {
        n.div_ceil(PAGE_BYTES) * PAGE_BYTES
    }

    /// Offset of the page data inside a slot.
    pub fn data_offset(&self) -> usize {
        Self::round(self.slot_pages * 8)
    }

    /// Offset of the state blob inside a slot.
    pub fn state_offset(&self) -> usize {
        self.data_offset() + self.slot_pages * PAGE_BYTES
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.state_offset() + Self::round(self.max_state)
    }
}

/// Errors of the staging region.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The region could not be allocated.
    #[error(
        "Cannot allocate a staging region of {len} bytes ({slots} slots of {slot_size} bytes)"
    )]
    Alloc {
        /// Bytes asked for.
        len: usize,
        /// Slots.
        slots: usize,
        /// Bytes per slot.
        slot_size: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The layout is not usable.
    #[error("Invalid staging layout: {0}")]
    Layout(String),
    /// More pages than the slot holds.
    #[error("Slot holds {capacity} pages; {wanted} do not fit")]
    SlotFull {
        /// Slot capacity in pages.
        capacity: usize,
        /// Pages offered.
        wanted: usize,
    },
    /// The state blob is larger than the slot's state area.
    #[error("State blob of {len} bytes exceeds the slot's {max} bytes")]
    StateTooLarge {
        /// Blob size.
        len: usize,
        /// Capacity.
        max: usize,
    },
    /// A page could not be read from guest memory.
    #[error("Cannot read guest page {addr:#x}")]
    GuestRead {
        /// Guest physical address.
        addr: u64,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The staging region: one mapping, `count` slots of `layout.slot_size()` bytes.
#[derive(Debug)]
pub struct StagingRegion {
    ptr: NonNull<u8>,
    len: usize,
    layout: SlotLayout,
    count: usize,
    huge_pages: bool,
    locked: bool,
}

// SAFETY: the region is plain memory owned by this struct; concurrent access to its bytes is
// coordinated by `SlotRing`, which gives each slot to one owner at a time.
unsafe impl Send for StagingRegion {}
// SAFETY: as above; `&StagingRegion` only exposes the address, sizes and flags.
unsafe impl Sync for StagingRegion {}

impl StagingRegion {
    /// Allocates and pre-faults a region of `count` slots.
    pub fn new(layout: SlotLayout, count: usize) -> Result<Self, StagingError> {
        if count < 2 {
            return Err(StagingError::Layout(format!(
                "need at least 2 slots, not {count}"
            )));
        }
        if layout.slot_pages == 0 {
            return Err(StagingError::Layout(
                "a slot must hold at least one page".into(),
            ));
        }
        let slot_size = layout.slot_size();
        let len = slot_size
            .checked_mul(count)
            .ok_or_else(|| StagingError::Layout("region size overflows".into()))?;
        let alloc_err = |source| StagingError::Alloc {
            len,
            slots: count,
            slot_size,
            source,
        };
        let (ptr, huge_pages) = match map(len.div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE, true) {
            Ok(p) => (p, true),
            Err(_) => (map(len, false).map_err(alloc_err)?, false),
        };
        let len = if huge_pages {
            len.div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
        } else {
            len
        };
        if !huge_pages {
            // SAFETY: `ptr..ptr+len` is the mapping just created; MADV_HUGEPAGE is advice only.
            unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: the range is our own mapping; mlock only pins it and fails harmlessly
        // (EPERM / ENOMEM) without CAP_IPC_LOCK or enough RLIMIT_MEMLOCK.
        let locked = unsafe { libc::mlock(ptr.as_ptr().cast(), len) } == 0;
        if !locked {
            // Pre-fault instead, so no page fault lands inside a checkpoint pause.
            for off in (0..len).step_by(PAGE_BYTES) {
                // SAFETY: `off < len`, inside the writable mapping.
                unsafe { ptr.as_ptr().add(off).write_volatile(0) };
            }
        }
        let region = StagingRegion {
            ptr,
            len,
            layout,
            count,
            huge_pages,
            locked,
        };
        info!(
            bytes = len,
            slots = count,
            slot_pages = layout.slot_pages,
            huge_pages,
            locked,
            "staging region allocated"
        );
        Ok(region)
    }

    /// Address of the region (for RDMA registration).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region has at least two slots.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Slot layout.
    pub fn layout(&self) -> SlotLayout {
        self.layout
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.count
    }

    /// Whether the region sits on reserved 2 MiB huge pages.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// Whether the region is mlocked.
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Offset of slot `i` from the start of the region.
    pub fn slot_offset(&self, i: usize) -> usize {
        i * self.layout.slot_size()
    }
}

impl Drop for StagingRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no slot outlives the region
        // (slots hold an Arc to the ring that owns it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn map(len: usize, huge: bool) -> std::io::Result<NonNull<u8>> {
    // No MAP_NORESERVE: with it, a hugetlb mapping succeeds even when no huge pages are
    // reserved and then faults (SIGBUS) on first touch; without it, mmap fails up front and we
    // fall back to normal pages.
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if huge {
        flags |= libc::MAP_HUGETLB;
    }
    // SAFETY: an anonymous mapping at a kernel-chosen address touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

#[derive(Debug)]
struct RingInner {
    region: StagingRegion,
    free: Mutex<Vec<usize>>,
    freed: Condvar,
}

/// The ring of slots of one staging region.
#[derive(Debug, Clone)]
pub struct SlotRing {
    inner: Arc<RingInner>,
}

impl SlotRing {
    /// A ring over a new region.
    pub fn new(layout: SlotLayout, count: usize) -> Result<Self, StagingError> {
        let region = StagingRegion::new(layout, count)?;
        Ok(SlotRing {
            inner: Arc::new(RingInner {
                free: Mutex::new((0..count).rev().collect()),
                freed: Condvar::new(),
                region,
            }),
        })
    }

    /// The region (address, length, layout).
    pub fn region(&self) -> &StagingRegion {
        &self.inner.region
    }

    /// A free slot, if any.
    pub fn try_acquire(&self) -> Option<Slot> {
        let index = self.inner.free.lock().pop()?;
        Some(self.slot(index))
    }

    /// A free slot, waiting up to `timeout` for one to be released.
    pub fn acquire_timeout(&self, timeout: Duration) -> Option<Slot> {
        let deadline = Instant::now() + timeout;
        let mut free = self.inner.free.lock();
        loop {
            if let Some(index) = free.pop() {
                drop(free);
                return Some(self.slot(index));
            }
            if self.inner.freed.wait_until(&mut free, deadline).timed_out() {
                return None;
            }
        }
    }

    /// Slot `index`, if it is free (the standby takes the slot the primary wrote into).
    pub fn try_acquire_index(&self, index: usize) -> Option<Slot> {
        let mut free = self.inner.free.lock();
        let pos = free.iter().position(|&i| i == index)?;
        free.swap_remove(pos);
        drop(free);
        Some(self.slot(index))
    }

    /// Slots currently free.
    pub fn free_count(&self) -> usize {
        self.inner.free.lock().len()
    }

    fn slot(&self, index: usize) -> Slot {
        Slot {
            ring: self.inner.clone(),
            index,
            pages: 0,
            state_len: 0,
        }
    }
}

/// The parts of a slot that a received epoch body is read into.
#[derive(Debug)]
pub struct ReceiveAreas<'a> {
    /// Page index (`pages x 8` bytes).
    pub index: &'a mut [u8],
    /// Page data (`pages x 4096` bytes).
    pub data: &'a mut [u8],
    /// State blob.
    pub state: &'a mut [u8],
}

/// Exclusive access to one slot; returned to its ring when dropped.
#[derive(Debug)]
pub struct Slot {
    ring: Arc<RingInner>,
    index: usize,
    pages: usize,
    state_len: usize,
}

impl Slot {
    /// Slot number within the ring.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The sizes of the slot.
    pub fn layout(&self) -> SlotLayout {
        self.ring.region.layout
    }

    /// Pages currently held.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Capacity in pages.
    pub fn capacity(&self) -> usize {
        self.ring.region.layout.slot_pages
    }

    /// Offset of this slot in the region (for RDMA addressing).
    pub fn offset(&self) -> usize {
        self.ring.region.slot_offset(self.index)
    }

    fn bytes(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= self.ring.region.layout.slot_size());
        let base = self.ring.region.as_ptr();
        // SAFETY: `off + len` is within this slot (layout math); the region outlives `self` (Arc
        // to its ring); nothing else writes the slot while we own it (RDMA: see rmc_transport).
        unsafe { std::slice::from_raw_parts(base.add(self.offset() + off), len) }
    }

    fn bytes_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(off + len <= self.ring.region.layout.slot_size());
        // SAFETY: as in `bytes`, and `&mut self` makes this the only live view of the slot.
        unsafe {
            std::slice::from_raw_parts_mut(self.ring.region.as_ptr().add(self.offset() + off), len)
        }
    }

    /// Empties the slot.
    pub fn clear(&mut self) {
        self.pages = 0;
        self.state_len = 0;
    }

    /// Copies guest pages into the slot after those already there, recording each page's
    /// guest physical address in the index. Returns how many pages the slot now holds. Fails,
    /// copying nothing, if they do not all fit.
    pub fn gather<M: GuestMemory>(
        &mut self,
        mem: &M,
        pages: &[GuestAddress],
    ) -> Result<usize, StagingError> {
        let capacity = self.capacity();
        if self.pages + pages.len() > capacity {
            return Err(StagingError::SlotFull {
                capacity,
                wanted: self.pages + pages.len(),
            });
        }
        let data_off = self.ring.region.layout.data_offset();
        let first = self.pages;
        for (i, &addr) in pages.iter().enumerate() {
            let n = first + i;
            self.bytes_mut(n * 8, 8)
                .copy_from_slice(&addr.0.to_le_bytes());
            let dst = self.bytes_mut(data_off + n * PAGE_BYTES, PAGE_BYTES);
            mem.read_slice(dst, addr)
                .map_err(|source| StagingError::GuestRead {
                    addr: addr.0,
                    source,
                })?;
        }
        self.pages += pages.len();
        Ok(self.pages)
    }

    /// Stores the state blob.
    pub fn set_state(&mut self, blob: &[u8]) -> Result<(), StagingError> {
        let max = self.ring.region.layout.max_state;
        if blob.len() > max {
            return Err(StagingError::StateTooLarge {
                len: blob.len(),
                max,
            });
        }
        let off = self.ring.region.layout.state_offset();
        self.bytes_mut(off, blob.len()).copy_from_slice(blob);
        self.state_len = blob.len();
        Ok(())
    }

    /// Prepares the slot to receive `pages` pages and `state_len` bytes of state (standby
    /// side) and returns the index, data and state areas to fill.
    pub fn receive_areas(
        &mut self,
        pages: usize,
        state_len: usize,
    ) -> Result<ReceiveAreas<'_>, StagingError> {
        let layout = self.ring.region.layout;
        if pages > layout.slot_pages {
            return Err(StagingError::SlotFull {
                capacity: layout.slot_pages,
                wanted: pages,
            });
        }
        if state_len > layout.max_state {
            return Err(StagingError::StateTooLarge {
                len: state_len,
                max: layout.max_state,
            });
        }
        self.pages = pages;
        self.state_len = state_len;
        let all = self.bytes_mut(0, layout.slot_size());
        let (index, rest) = all.split_at_mut(layout.data_offset());
        let (data, state) = rest.split_at_mut(layout.slot_pages * PAGE_BYTES);
        Ok(ReceiveAreas {
            index: &mut index[..pages * 8],
            data: &mut data[..pages * PAGE_BYTES],
            state: &mut state[..state_len],
        })
    }

    /// The page index as bytes (little-endian u64 guest addresses).
    pub fn index_bytes(&self) -> &[u8] {
        self.bytes(0, self.pages * 8)
    }

    /// Guest physical address of page `i`.
    pub fn page_addr(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.bytes(i * 8, 8).try_into().expect("8 bytes"))
    }

    /// The page data.
    pub fn data(&self) -> &[u8] {
        self.bytes(
            self.ring.region.layout.data_offset(),
            self.pages * PAGE_BYTES,
        )
    }

    /// The state blob.
    pub fn state(&self) -> &[u8] {
        self.bytes(self.ring.region.layout.state_offset(), self.state_len)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.ring.free.lock().push(self.index);
        self.ring.freed.notify_one();
        debug!(slot = self.index, "slot released");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn layout() -> SlotLayout {
        SlotLayout {
            slot_pages: 8,
            max_state: 100,
        }
    }

    #[test]
    fn layout_is_page_aligned() {
        let l = layout();
        assert_eq!(l.data_offset(), 4096);
        assert_eq!(l.state_offset(), 4096 + 8 * 4096);
        assert_eq!(l.slot_size(), 4096 + 8 * 4096 + 4096);
    }

    #[test]
    fn ring_hands_out_each_slot_once_and_takes_it_back() {
        let ring = SlotRing::new(layout(), 2).unwrap();
        assert!(ring.region().len() >= 2 * layout().slot_size());
        let a = ring.try_acquire().unwrap();
        let b = ring.try_acquire().unwrap();
        assert_ne!(a.index(), b.index());
        assert!(ring.try_acquire().is_none());
        assert!(ring.acquire_timeout(Duration::from_millis(10)).is_none());
        let idx = a.index();
        let waiter = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                ring.acquire_timeout(Duration::from_secs(5))
                    .map(|s| s.index())
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        assert_eq!(waiter.join().unwrap(), Some(idx));
        assert_eq!(ring.free_count(), 1);
        drop(b);
        assert_eq!(ring.free_count(), 2);
    }

    #[test]
    fn gather_copies_pages_and_index() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for p in 0..16u64 {
            mem.write_slice(&[p as u8 + 1; 4096], GuestAddress(p * 4096))
                .unwrap();
        }
        let ring = SlotRing::new(layout(), 2).unwrap();
        let mut s = ring.try_acquire().unwrap();
        assert_eq!(
            s.gather(&mem, &[GuestAddress(0x3000), GuestAddress(0x5000)])
                .unwrap(),
            2
        );
        assert_eq!(s.gather(&mem, &[GuestAddress(0x9000)]).unwrap(), 3);
        assert_eq!(s.page_addr(2), 0x9000);
        assert_eq!(s.data().len(), 3 * 4096);
        assert!(s.data()[..4096].iter().all(|&b| b == 4));
        assert!(s.data()[4096..8192].iter().all(|&b| b == 6));
        assert!(s.data()[8192..].iter().all(|&b| b == 10));
        let too_many: Vec<_> = (0..6).map(|p| GuestAddress(p * 4096)).collect();
        assert!(matches!(
            s.gather(&mem, &too_many),
            Err(StagingError::SlotFull {
                capacity: 8,
                wanted: 9
            })
        ));
        assert_eq!(s.pages(), 3, "a refused gather copies nothing");
        assert!(matches!(
            s.gather(&mem, &[GuestAddress(2 << 20)]),
            Err(StagingError::GuestRead {
                addr: 0x20_0000,
                ..
            })
        ));
        s.set_state(b"state").unwrap();
        assert_eq!(s.state(), b"state");
        assert!(matches!(
            s.set_state(&[0; 101]),
            Err(StagingError::StateTooLarge { .. })
        ));
    }

    #[test]
    fn receive_areas_fit_the_layout() {
        let ring = SlotRing::new(layout(), 3).unwrap();
        let mut s = ring.try_acquire().unwrap();
        let a = s.receive_areas(2, 10).unwrap();
        assert_eq!((a.index.len(), a.data.len(), a.state.len()), (16, 8192, 10));
        a.index[..8].copy_from_slice(&0x7000u64.to_le_bytes());
        assert_eq!(s.page_addr(0), 0x7000);
        assert!(s.receive_areas(9, 0).is_err());
        assert!(s.receive_areas(1, 101).is_err());
    }
}
