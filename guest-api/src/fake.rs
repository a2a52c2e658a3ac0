//! An in-memory [`Guest`](crate::Guest) for tests: real guest memory (anonymous mmap), dirty
//! pages written by a script each time the guest "runs" (on every resume), and failures that
//! a test injects. It records what the engine asked of it, so tests can assert on put-backs,
//! output epochs and pauses without KVM.
//!
//! Pages are numbered from 0 across the RAM regions in order ([`FakeGuest::page_addr`] gives
//! a page's guest physical address); a guest from [`FakeGuest::new`] has one region at 0, so
//! page `n` is at `n * PAGE_SIZE`. Every write of run `r` leaves
//! [`FakeGuest::page_pattern`]`(r, page)` in the page, so a copy of the memory tells exactly
//! which run wrote each page it holds. The state blob ([`FakeGuest::state`]) is the run
//! count and a hash of every page ([`FakeGuest::decode_state`], [`FakeGuest::hash_pages`]).
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
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
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
    /// Not a call of the engine: the guest queued output ([`FakeGuest::send_output`]), and
    /// whether that woke the engine (the first output since the last closed epoch, with a
    /// waker set).
    Output { woke: bool },
    /// Not a call of the engine: an event a test placed in the log with [`FakeGuest::mark`]
    /// (a standby verifying a checkpoint, the start of a session), so that the order of the
    /// engine's calls can be checked against it.
    Mark(String),
}

/// A failure a test arranges for a later call of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `pause` fails (as a vCPU that does not stop would).
    Pause,
    /// The next `harvest` fails, whether the guest is paused or running.
    Harvest,
    /// The next `save_state` fails.
    SaveState,
    /// The next `harvest` made while the guest runs fails (the engine peeking at the dirty
    /// log between checkpoints).
    HarvestRunning,
    /// The next `harvest` made while the guest is paused fails (a checkpoint's harvest).
    HarvestPaused,
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

/// A condition on the call log (everything logged before the call in question).
type When = Box<dyn Fn(&[Call]) -> bool + Send>;

/// A fault waiting for its call.
struct Armed {
    fault: Fault,
    /// It fires only once the guest ran at least this many times.
    after_runs: u64,
    /// ... and only when this holds for the log so far.
    when: Option<When>,
    /// Matching calls (once the conditions above hold) that still succeed before it fires.
    skip: u32,
}

struct Inner {
    dirty: DirtySet,
    paused: bool,
    runs: u64,
    script: Option<Script>,
    faults: VecDeque<Armed>,
    calls: Vec<Call>,
    /// Outputs queued since the last `close_output_epoch`.
    open_outputs: u64,
    waker: Option<crate::OutputWaker>,
}

/// An in-memory guest: RAM regions of anonymous memory, a number of vCPUs (only announced:
/// the state blob does not depend on it).
pub struct FakeGuest {
    mem: GuestMemoryMmap,
    regions: Vec<(u64, u64)>,
    vcpus: u32,
    inner: Mutex<Inner>,
    /// Notified whenever a call is logged ([`FakeGuest::wait_for`]).
    logged: Condvar,
}

impl fmt::Debug for FakeGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("FakeGuest")
            .field("regions", &self.regions)
            .field("vcpus", &self.vcpus)
            .field("runs", &inner.runs)
            .field("paused", &inner.paused)
            .finish()
    }
}

impl FakeGuest {
    /// A guest of `pages` pages (one region at guest physical 0, one vCPU), all zero, none
    /// dirty, running, with no script.
    pub fn new(pages: u64) -> Self {
        Self::with_regions(&[(0, pages)], 1)
    }

    /// A guest of several RAM regions `(guest physical base, pages)` (page-aligned,
    /// ascending, not overlapping) and `vcpus` vCPUs; otherwise as [`FakeGuest::new`].
    ///
    /// # Panics
    /// If the regions cannot be mapped (overlapping, unaligned, empty).
    pub fn with_regions(regions: &[(u64, u64)], vcpus: u32) -> Self {
        assert!(!regions.is_empty(), "a fake guest needs a RAM region");
        assert!(vcpus > 0, "a fake guest needs a vCPU");
        let regions: Vec<(u64, u64)> = regions
            .iter()
            .map(|&(base, pages)| {
                assert_eq!(
                    base % PAGE_SIZE,
                    0,
                    "region base {base:#x} is not page-aligned"
                );
                assert!(pages > 0, "an empty region at {base:#x}");
                (base, pages * PAGE_SIZE)
            })
            .collect();
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(base, len)| (GuestAddress(base), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory");
        FakeGuest {
            mem,
            inner: Mutex::new(Inner {
                dirty: DirtySet::empty(&regions),
                paused: false,
                runs: 0,
                script: None,
                faults: VecDeque::new(),
                calls: Vec::new(),
                open_outputs: 0,
                waker: None,
            }),
            regions,
            vcpus,
            logged: Condvar::new(),
        }
    }

    /// Number of pages (of every region).
    pub fn pages(&self) -> u64 {
        self.regions.iter().map(|&(_, len)| len / PAGE_SIZE).sum()
    }

    /// The guest physical address of page `page` (pages are numbered across the regions in
    /// order).
    ///
    /// # Panics
    /// If there is no such page.
    pub fn page_addr(&self, page: u64) -> u64 {
        let mut first = 0;
        for &(base, len) in &self.regions {
            let n = len / PAGE_SIZE;
            if page < first + n {
                return base + (page - first) * PAGE_SIZE;
            }
            first += n;
        }
        panic!("page {page} outside the fake guest ({first} pages)")
    }

    /// Sets what the guest writes each time it runs: `script(run)` (runs count from 1) names
    /// the pages written; each gets [`FakeGuest::page_pattern`]`(run, page)`. The script runs
    /// inside `resume`, with the guest's lock held: it must not call the guest (it may set
    /// flags or cut connections, to make something happen at a chosen run).
    pub fn set_script(&self, script: impl FnMut(u64) -> Vec<u64> + Send + 'static) {
        self.inner.lock().script = Some(Box::new(script));
    }

    /// Arranges for the next call of `fault`'s kind to fail (faults queue up in order: only
    /// the oldest one not yet fired can fire).
    pub fn inject(&self, fault: Fault) {
        self.inject_after(0, fault);
    }

    /// Arranges for the first call of `fault`'s kind once the guest ran at least `runs`
    /// times to fail (queued behind the faults injected before).
    pub fn inject_after(&self, runs: u64, fault: Fault) {
        self.inject_after_skipping(runs, 0, fault);
    }

    /// As [`FakeGuest::inject_after`], but `skip` matching calls (counted once the guest ran
    /// `runs` times) still succeed; the next one fails.
    pub fn inject_after_skipping(&self, runs: u64, skip: u32, fault: Fault) {
        self.inner.lock().faults.push_back(Armed {
            fault,
            after_runs: runs,
            when: None,
            skip,
        });
    }

    /// Arranges for the first call of `fault`'s kind made when `when` holds for the log so
    /// far (the calls before that one) to fail: a fault at a chosen point of the engine's
    /// work ("the first pause after a peek that found pages"). `when` runs with the guest's
    /// lock held: it must not call the guest.
    pub fn inject_when(&self, fault: Fault, when: impl Fn(&[Call]) -> bool + Send + 'static) {
        self.inner.lock().faults.push_back(Armed {
            fault,
            after_runs: 0,
            when: Some(Box::new(when)),
            skip: 0,
        });
    }

    /// Faults injected that have not fired yet.
    pub fn pending_faults(&self) -> Vec<Fault> {
        self.inner.lock().faults.iter().map(|a| a.fault).collect()
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

    /// The run and page a page's contents name (its first 16 bytes, see
    /// [`FakeGuest::page_pattern`]); a page never written is all zeros.
    pub fn pattern_tag(contents: &[u8]) -> (u64, u64) {
        let word = |i: usize| {
            u64::from_le_bytes(contents[i..i + 8].try_into().expect("16 bytes at least"))
        };
        (word(0), word(8))
    }

    /// The current contents of page `page`.
    pub fn read_page(&self, page: u64) -> Vec<u8> {
        let mut buf = vec![0; PAGE_SIZE as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(self.page_addr(page)))
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

    /// Places [`Call::Mark`]`(label)` in the log: an event of the test's own, ordered with
    /// the engine's calls.
    pub fn mark(&self, label: impl Into<String>) {
        let mut inner = self.inner.lock();
        self.log(&mut inner, Call::Mark(label.into()));
    }

    /// The guest sends a packet: it waits for the next `close_output_epoch`, and the first one
    /// since the last wakes the engine's [`crate::OutputWaker`] (as a NIC does). Logged as
    /// [`Call::Output`].
    pub fn send_output(&self) {
        let mut inner = self.inner.lock();
        inner.open_outputs += 1;
        let waker = (inner.open_outputs == 1)
            .then(|| inner.waker.clone())
            .flatten();
        self.log(
            &mut inner,
            Call::Output {
                woke: waker.is_some(),
            },
        );
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Waits until `done` holds for the log (checked now and after every call logged), for
    /// at most `timeout`; returns whether it held.
    pub fn wait_for(&self, timeout: Duration, mut done: impl FnMut(&[Call]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.inner.lock();
        loop {
            if done(&inner.calls) {
                return true;
            }
            if self.logged.wait_until(&mut inner, deadline).timed_out() {
                return done(&inner.calls);
            }
        }
    }

    /// The state `save_state` produces now: the run count and a hash of every page.
    pub fn state(&self) -> Vec<u8> {
        let runs = self.inner.lock().runs;
        self.state_with(runs)
    }

    /// The run count and memory hash a state blob of a fake guest holds (`None`: not one).
    pub fn decode_state(state: &[u8]) -> Option<(u64, u64)> {
        if state.len() != 16 {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(state[i..i + 8].try_into().expect("8 bytes"));
        Some((word(0), word(8)))
    }

    /// The hash of guest memory a state blob carries, over the pages in order (for a copy of
    /// the memory: a standby's backup, a model): FNV-1a over little-endian 64-bit words.
    pub fn hash_pages(pages: impl IntoIterator<Item = impl AsRef<[u8]>>) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for page in pages {
            for word in page.as_ref().chunks(8) {
                let mut w = [0u8; 8];
                w[..word.len()].copy_from_slice(word);
                h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x100_0000_01b3);
            }
        }
        h
    }

    fn state_with(&self, runs: u64) -> Vec<u8> {
        let h = Self::hash_pages((0..self.pages()).map(|p| self.read_page(p)));
        let mut out = runs.to_le_bytes().to_vec();
        out.extend_from_slice(&h.to_le_bytes());
        out
    }

    fn log(&self, inner: &mut Inner, call: Call) {
        inner.calls.push(call);
        self.logged.notify_all();
    }

    fn write_locked(&self, inner: &mut Inner, run: u64, pages: &[u64]) {
        for &page in pages {
            assert!(page < self.pages(), "page {page} outside the fake guest");
            let addr = self.page_addr(page);
            self.mem
                .write_slice(&Self::page_pattern(run, page), GuestAddress(addr))
                .expect("page inside the guest");
            inner.dirty.insert(addr);
        }
    }

    /// Fires the oldest armed fault if it is of a kind `matches` accepts and is due.
    fn take_fault(inner: &mut Inner, matches: impl Fn(Fault) -> bool) -> Option<Fault> {
        let runs = inner.runs;
        let calls = &inner.calls;
        let armed = inner.faults.front_mut()?;
        if !matches(armed.fault)
            || runs < armed.after_runs
            || armed.when.as_ref().is_some_and(|when| !when(calls))
        {
            return None;
        }
        if armed.skip > 0 {
            armed.skip -= 1;
            return None;
        }
        inner.faults.pop_front().map(|a| a.fault)
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
        if let Some(f) = Self::take_fault(&mut inner, |f| f == Fault::Pause) {
            self.log(&mut inner, Call::Pause { ok: false });
            return Err(Box::new(InjectedFault(f)));
        }
        inner.paused = true;
        self.log(&mut inner, Call::Pause { ok: true });
        Ok(Duration::ZERO)
    }

    fn resume(&self) {
        let mut inner = self.inner.lock();
        inner.paused = false;
        inner.runs += 1;
        let run = inner.runs;
        self.log(&mut inner, Call::Resume);
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
        let paused = inner.paused;
        let fault = Self::take_fault(&mut inner, |f| match f {
            Fault::Harvest => true,
            Fault::HarvestRunning => !paused,
            Fault::HarvestPaused => paused,
            Fault::Pause | Fault::SaveState => false,
        });
        if let Some(f) = fault {
            self.log(&mut inner, Call::Harvest { pages: None });
            return Err(Box::new(InjectedFault(f)));
        }
        let set = std::mem::replace(&mut inner.dirty, DirtySet::empty(&self.regions));
        let pages = Some(set.len());
        self.log(&mut inner, Call::Harvest { pages });
        Ok(set)
    }

    fn put_back(&self, set: DirtySet) {
        let mut inner = self.inner.lock();
        self.log(&mut inner, Call::PutBack { pages: set.len() });
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
        if let Some(f) = Self::take_fault(&mut inner, |f| f == Fault::SaveState) {
            self.log(&mut inner, Call::SaveState { ok: false });
            return Err(Box::new(InjectedFault(f)));
        }
        self.log(&mut inner, Call::SaveState { ok: true });
        let runs = inner.runs;
        drop(inner);
        Ok(self.state_with(runs))
    }
}

impl OutputCommit for FakeGuest {
    fn close_output_epoch(&self, epoch: u64) {
        let mut inner = self.inner.lock();
        inner.open_outputs = 0;
        self.log(&mut inner, Call::CloseOutput { epoch });
    }

    fn watch_output(&self, waker: Option<crate::OutputWaker>) {
        self.inner.lock().waker = waker;
    }

    fn output_waiting(&self) -> bool {
        self.inner.lock().open_outputs > 0
    }

    fn release_output(&self, epoch: u64) {
        let mut inner = self.inner.lock();
        self.log(&mut inner, Call::ReleaseOutput { epoch });
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

    #[test]
    fn faults_wait_for_their_run_their_turn_and_the_guest_state() {
        let g = FakeGuest::new(8);
        g.inject_after(2, Fault::HarvestPaused);
        g.inject_after_skipping(2, 1, Fault::HarvestRunning);
        g.pause().unwrap();
        assert!(g.harvest().is_ok(), "not due before run 2");
        g.resume();
        g.pause().unwrap();
        g.resume();
        assert!(
            g.harvest().is_ok(),
            "running: the paused harvest fault waits"
        );
        g.pause().unwrap();
        let e = g.harvest().unwrap_err();
        assert_eq!(
            e.downcast_ref::<InjectedFault>(),
            Some(&InjectedFault(Fault::HarvestPaused))
        );
        g.resume();
        assert!(g.harvest().is_ok(), "the first running harvest is skipped");
        assert_eq!(g.pending_faults(), vec![Fault::HarvestRunning]);
        let e = g.harvest().unwrap_err();
        assert_eq!(
            e.downcast_ref::<InjectedFault>(),
            Some(&InjectedFault(Fault::HarvestRunning))
        );
        assert!(g.pending_faults().is_empty());
        g.inject_when(Fault::SaveState, |calls| {
            calls.last() == Some(&Call::Harvest { pages: Some(0) })
        });
        assert!(g.save_state().is_ok(), "not after an empty harvest");
        assert!(g.harvest().is_ok());
        assert!(g.save_state().is_err());
        assert_eq!(
            g.calls()
                .iter()
                .filter(|c| **c == Call::Harvest { pages: None })
                .count(),
            2
        );
    }

    #[test]
    fn regions_vcpus_marks_and_states() {
        let g = FakeGuest::with_regions(&[(0, 4), (1 << 20, 2)], 3);
        assert_eq!(g.pages(), 6);
        assert_eq!(g.vcpus(), 3);
        assert_eq!(g.page_addr(3), 3 * PAGE_SIZE);
        assert_eq!(g.page_addr(4), 1 << 20);
        assert_eq!(
            g.regions(),
            vec![(0, 4 * PAGE_SIZE), (1 << 20, 2 * PAGE_SIZE)]
        );
        g.write_pages(9, &[5]);
        assert_eq!(FakeGuest::pattern_tag(&g.read_page(5)), (9, 5));
        let set = g.harvest().unwrap();
        assert!(set.contains((1 << 20) + PAGE_SIZE));
        assert_eq!(set.len(), 1);
        let (runs, hash) = FakeGuest::decode_state(&g.state()).unwrap();
        assert_eq!(runs, 0);
        let pages: Vec<Vec<u8>> = (0..6).map(|p| g.read_page(p)).collect();
        assert_eq!(hash, FakeGuest::hash_pages(&pages));
        g.mark("here");
        assert!(g.wait_for(Duration::ZERO, |c| c.last()
            == Some(&Call::Mark("here".into()))));
        assert!(!g.wait_for(Duration::from_millis(1), |c| c.len() > 10));
        let g = std::sync::Arc::new(g);
        let g2 = g.clone();
        let t = std::thread::spawn(move || {
            g2.wait_for(Duration::from_secs(60), |c| c.contains(&Call::Resume))
        });
        g.pause().unwrap();
        g.resume();
        assert!(t.join().unwrap());
    }
}
