//! An in-memory [`Guest`](crate::Guest) for tests: real guest memory (anonymous mmap), dirty
//! pages written by a script each time the guest "runs" (on every resume), and failures that
//! a test injects. It records what the engine asked of it, so tests can assert on put-backs,
//! output epochs and pauses without KVM.
//!
//! ```
//! use rmc_guest_api::fake::FakeGuest;
//! use rmc_guest_api::{DirtyLog, Pausable};
//!
//! let guest = FakeGuest::new(64);
//! guest.set_script(|run| vec![run % 64, 7]);
//! guest.pause().unwrap();
//! guest.resume(); // the script writes pages 1 and 7
//! assert_eq!(guest.harvest().unwrap().len(), 2);
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{
    DirtyLog, DirtySet, GuestError, GuestRam, OutputCommit, Pausable, Snapshottable, PAGE_SIZE,
};

/// The state encoding version a fake guest announces.
pub const FAKE_STATE_VERSION: u32 = 0xfa4e;

/// Something the engine asked of the guest, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `pause` (whether it succeeded).
    Pause { ok: bool },
    /// `resume`.
    Resume,
    /// `harvest`, and how many pages it returned (`None`: it failed).
    Harvest { pages: Option<usize> },
    /// `put_back` of this many pages.
    PutBack { pages: usize },
    /// `save_state` (whether it succeeded).
    SaveState { ok: bool },
    /// `close_output_epoch(epoch)`.
    CloseOutput { epoch: u64 },
    /// `release_output(epoch)`.
    ReleaseOutput { epoch: u64 },
}

/// A failure a test arranges for the next call of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `pause` fails (as a vCPU that does not stop would).
    Pause,
    /// The next `harvest` fails.
    Harvest,
    /// The next `save_state` fails.
    SaveState,
}

/// The error an injected [`Fault`] produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFault(pub Fault);

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "injected fault: {:?}", self.0)
    }
}

impl std::error::Error for InjectedFault {}

type Script = Box<dyn FnMut(u64) -> Vec<u64> + Send>;

struct Inner {
    dirty: DirtySet,
    paused: bool,
    runs: u64,
    script: Option<Script>,
    faults: VecDeque<Fault>,
    calls: Vec<Call>,
}

/// An in-memory guest of one RAM region at guest physical 0.
pub struct FakeGuest {
    mem: GuestMemoryMmap,
    regions: Vec<(u64, u64)>,
    vcpus: u32,
    inner: Mutex<Inner>,
}

impl fmt::Debug for FakeGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("FakeGuest")
            .field("regions", &self.regions)
            .field("runs", &inner.runs)
            .field("paused", &inner.paused)
            .finish()
    }
}

impl FakeGuest {
    /// A guest of `pages` pages, all zero, none dirty, running, with no script.
    pub fn new(pages: u64) -> Self {
        let len = pages * PAGE_SIZE;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len as usize)])
            .expect("anonymous guest memory");
        let regions = vec![(0, len)];
        FakeGuest {
            mem,
            inner: Mutex::new(Inner {
                dirty: DirtySet::empty(&regions),
                paused: false,
                runs: 0,
                script: None,
                faults: VecDeque::new(),
                calls: Vec::new(),
            }),
            regions,
            vcpus: 1,
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.regions[0].1 / PAGE_SIZE
    }

    /// Sets what the guest writes each time it runs: `script(run)` (runs count from 1) names
    /// the pages written; each gets [`FakeGuest::page_pattern`]`(run, page)`.
    pub fn set_script(&self, script: impl FnMut(u64) -> Vec<u64> + Send + 'static) {
        self.inner.lock().script = Some(Box::new(script));
    }

    /// Arranges for the next call of `fault`'s kind to fail (faults queue up in order).
    pub fn inject(&self, fault: Fault) {
        self.inner.lock().faults.push_back(fault);
    }

    /// Writes `pages` as run `run` would (marking them dirty), whether or not the guest is
    /// paused: a device writing guest memory.
    pub fn write_pages(&self, run: u64, pages: &[u64]) {
        let mut inner = self.inner.lock();
        self.write_locked(&mut inner, run, pages);
    }

    /// The bytes every run writes into a page: 8 bytes of `run`, 8 of `page`, then a repeated
    /// byte derived from both (so a page carries which run wrote it).
    pub fn page_pattern(run: u64, page: u64) -> Vec<u8> {
        let mut p = vec![(run.wrapping_mul(31) ^ page) as u8; PAGE_SIZE as usize];
        p[..8].copy_from_slice(&run.to_le_bytes());
        p[8..16].copy_from_slice(&page.to_le_bytes());
        p
    }

    /// The current contents of page `page`.
    pub fn read_page(&self, page: u64) -> Vec<u8> {
        let mut buf = vec![0; PAGE_SIZE as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(page * PAGE_SIZE))
            .expect("page inside the guest");
        buf
    }

    /// How many times the guest ran (resumes).
    pub fn runs(&self) -> u64 {
        self.inner.lock().runs
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.inner.lock().paused
    }

    /// Everything the engine asked, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().calls.clone()
    }

    /// The state `save_state` produces now: the run count and a hash of every page.
    pub fn state(&self) -> Vec<u8> {
        let runs = self.inner.lock().runs;
        self.state_with(runs)
    }

    fn state_with(&self, runs: u64) -> Vec<u8> {
        let mut out = runs.to_le_bytes().to_vec();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for page in 0..self.pages() {
            for b in self.read_page(page) {
                h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
        out.extend_from_slice(&h.to_le_bytes());
        out
    }

    fn write_locked(&self, inner: &mut Inner, run: u64, pages: &[u64]) {
        for &page in pages {
            assert!(page < self.pages(), "page {page} outside the fake guest");
            let addr = page * PAGE_SIZE;
            self.mem
                .write_slice(&Self::page_pattern(run, page), GuestAddress(addr))
                .expect("page inside the guest");
            inner.dirty.insert(addr);
        }
    }

    fn take_fault(inner: &mut Inner, kind: Fault) -> bool {
        if inner.faults.front() == Some(&kind) {
            inner.faults.pop_front();
            true
        } else {
            false
        }
    }
}

impl GuestRam for FakeGuest {
    type Memory = GuestMemoryMmap;

    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.regions.clone()
    }
}

impl Pausable for FakeGuest {
    fn pause(&self) -> Result<Duration, GuestError> {
        let mut inner = self.inner.lock();
        if Self::take_fault(&mut inner, Fault::Pause) {
            inner.calls.push(Call::Pause { ok: false });
            return Err(Box::new(InjectedFault(Fault::Pause)));
        }
        inner.paused = true;
        inner.calls.push(Call::Pause { ok: true });
        Ok(Duration::ZERO)
    }

    fn resume(&self) {
        let mut inner = self.inner.lock();
        inner.paused = false;
        inner.runs += 1;
        let run = inner.runs;
        inner.calls.push(Call::Resume);
        if let Some(mut script) = inner.script.take() {
            let pages = script(run);
            self.write_locked(&mut inner, run, &pages);
            inner.script = Some(script);
        }
    }
}

impl DirtyLog for FakeGuest {
    fn harvest(&self) -> Result<DirtySet, GuestError> {
        let mut inner = self.inner.lock();
        if Self::take_fault(&mut inner, Fault::Harvest) {
            inner.calls.push(Call::Harvest { pages: None });
            return Err(Box::new(InjectedFault(Fault::Harvest)));
        }
        let set = std::mem::replace(&mut inner.dirty, DirtySet::empty(&self.regions));
        inner.calls.push(Call::Harvest {
            pages: Some(set.len()),
        });
        Ok(set)
    }

    fn put_back(&self, set: DirtySet) {
        let mut inner = self.inner.lock();
        inner.calls.push(Call::PutBack { pages: set.len() });
        inner.dirty.union_with(&set);
    }
}

impl Snapshottable for FakeGuest {
    fn vcpus(&self) -> u32 {
        self.vcpus
    }

    fn state_version(&self) -> u32 {
        FAKE_STATE_VERSION
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let mut inner = self.inner.lock();
        if Self::take_fault(&mut inner, Fault::SaveState) {
            inner.calls.push(Call::SaveState { ok: false });
            return Err(Box::new(InjectedFault(Fault::SaveState)));
        }
        inner.calls.push(Call::SaveState { ok: true });
        let runs = inner.runs;
        drop(inner);
        Ok(self.state_with(runs))
    }
}

impl OutputCommit for FakeGuest {
    fn close_output_epoch(&self, epoch: u64) {
        self.inner.lock().calls.push(Call::CloseOutput { epoch });
    }

    fn release_output(&self, epoch: u64) {
        self.inner.lock().calls.push(Call::ReleaseOutput { epoch });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_write_their_script_and_faults_fire_once() {
        let g = FakeGuest::new(16);
        g.set_script(|run| vec![run, 15]);
        g.pause().unwrap();
        g.resume();
        assert_eq!(g.read_page(1), FakeGuest::page_pattern(1, 1));
        let set = g.harvest().unwrap();
        assert_eq!(
            set.pages().map(|a| a.0).collect::<Vec<_>>(),
            vec![PAGE_SIZE, 15 * PAGE_SIZE]
        );
        assert!(g.harvest().unwrap().is_empty());
        g.put_back(set);
        assert_eq!(g.harvest().unwrap().len(), 2);
        g.inject(Fault::Harvest);
        assert!(g.harvest().is_err());
        assert!(g.harvest().is_ok());
        g.inject(Fault::Pause);
        assert!(g.pause().is_err());
        assert!(!g.is_paused());
        let before = g.state();
        g.resume();
        assert_ne!(g.state(), before, "a run changes the state");
    }
}
