//! Keeping the primary's lease alive, and knowing until when it certainly is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::{Arbiter, ArbiterError, Lease};

/// State shared by the renew thread, the keeper and its gates.
#[derive(Debug)]
struct Shared {
    lease: i64,
    /// valid_until = base + valid_until_ns.
    base: Instant,
    valid_until_ns: AtomicU64,
    lost: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Shared {
    fn valid_until(&self) -> Instant {
        self.base + Duration::from_nanos(self.valid_until_ns.load(Ordering::Acquire))
    }

    fn is_valid(&self) -> bool {
        !self.lost.load(Ordering::Acquire) && Instant::now() < self.valid_until()
    }

    /// Moves valid_until forward to `until` (never back).
    fn extend(&self, until: Instant) {
        let ns = u64::try_from(until.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX);
        self.valid_until_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Marks the lease lost for good; the first reason sticks.
    fn mark_lost(&self, reason: String) {
        let mut r = self.reason.lock();
        if r.is_none() {
            *r = Some(reason);
        }
        // After the reason: whoever sees `lost` sees a reason.
        self.lost.store(true, Ordering::Release);
    }

    fn lost(&self) -> Option<String> {
        if !self.lost.load(Ordering::Acquire) {
            return None;
        }
        self.reason.lock().clone()
    }
}

/// Keeps a lease alive on its own thread (with its own connection, so no send of the
/// replication link can ever block it) and says, on the caller's monotonic clock, until when
/// the lease is CERTAINLY valid:
/// valid_until = (instant just before the keepalive request was sent) + granted TTL - margin.
/// etcd counts the TTL from when it processes the request, which is later, so the lease lives
/// at etcd at least `margin` past valid_until.
///
/// The initial valid_until comes from the grant: `granted_at` (an instant taken just before
/// the grant request was sent) + ttl - margin.
///
/// Dropping the keeper stops the renew thread (waiting for a request in flight, bounded by the
/// request timeout) and marks the lease lost ("the lease keeper was stopped") for every
/// [`LeaseGate`], but does not revoke it; [`LeaseKeeper::resign`] revokes it.
#[derive(Debug)]
pub struct LeaseKeeper {
    shared: Arc<Shared>,
    arbiter: Arbiter,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A cheap cloneable handle on a [`LeaseKeeper`]'s verdict, for other threads.
#[derive(Debug, Clone)]
pub struct LeaseGate {
    shared: Arc<Shared>,
}

impl LeaseGate {
    /// true while now < valid_until and the lease was not lost. Cheap (atomics).
    pub fn is_valid(&self) -> bool {
        self.shared.is_valid()
    }

    /// Some(reason) once the lease is lost for good.
    pub fn lost(&self) -> Option<String> {
        self.shared.lost()
    }

    /// Until when the lease is certainly valid (as of the last successful renewal).
    pub fn valid_until(&self) -> Instant {
        self.shared.valid_until()
    }
}

impl LeaseKeeper {
    /// Starts renewing `lease` every `renew_every` (e.g. ttl/4) on a thread named
    /// "rmc-lease", over its own connection to `arbiter`'s endpoint. `margin` (e.g. ttl/4, at
    /// least 100 ms) is taken off every validity window; it must be less than the TTL, or the
    /// lease is never valid. `granted_at` is an instant taken just before the grant request.
    pub fn start(
        arbiter: Arbiter,
        lease: Lease,
        granted_at: Instant,
        renew_every: Duration,
        margin: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            lease: lease.id,
            base: granted_at,
            valid_until_ns: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            reason: Mutex::new(None),
        });
        if let Some(until) = (granted_at + lease.ttl).checked_sub(margin) {
            shared.extend(until);
        }
        let (stop, stop_rx) = mpsc::channel();
        let renewer = Renewer {
            shared: shared.clone(),
            arbiter: arbiter.with_own_connection(),
            renew_every: renew_every.max(Duration::from_millis(1)),
            margin,
            stop: stop_rx,
        };
        let thread = std::thread::Builder::new()
            .name("rmc-lease".to_string())
            .spawn(move || renewer.run(granted_at));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                shared.mark_lost(format!("could not start the lease renew thread: {e}"));
                None
            }
        };
        LeaseKeeper {
            shared,
            arbiter,
            stop: Some(stop),
            thread,
        }
    }

    /// The lease id.
    pub fn lease(&self) -> i64 {
        self.shared.lease
    }

    /// true while now < valid_until and the lease was not lost. Cheap (atomics), callable
    /// from any thread, e.g. before every packet the VM sends.
    pub fn is_valid(&self) -> bool {
        self.shared.is_valid()
    }

    /// Until when the lease is certainly valid (as of the last successful renewal).
    pub fn valid_until(&self) -> Instant {
        self.shared.valid_until()
    }

    /// Some(reason) once the lease is lost for good: keepalive said it expired, or
    /// valid_until passed without a successful renewal. Once lost it never becomes valid again.
    pub fn lost(&self) -> Option<String> {
        self.shared.lost()
    }

    /// A cheap cloneable handle with is_valid()/lost()/valid_until() for other threads.
    pub fn gate(&self) -> LeaseGate {
        LeaseGate {
            shared: self.shared.clone(),
        }
    }

    /// Stops renewing and revokes the lease (best effort, bounded by the request timeout).
    /// Gates see the lease lost ("resigned") before it is revoked.
    pub fn resign(mut self) {
        self.stop_thread();
        self.shared
            .mark_lost("resigned: the lease was given up".to_string());
        if let Err(e) = self.arbiter.revoke(self.shared.lease) {
            tracing::warn!(
                lease = self.shared.lease,
                "could not revoke the arbiter lease: {e}"
            );
        }
    }

    fn stop_thread(&mut self) {
        // Dropping the sender wakes the thread (Disconnected).
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop_thread();
        self.shared
            .mark_lost("the lease keeper was stopped".to_string());
    }
}

/// The renew thread's state.
struct Renewer {
    shared: Arc<Shared>,
    arbiter: Arbiter,
    renew_every: Duration,
    margin: Duration,
    stop: mpsc::Receiver<()>,
}

impl Renewer {
    fn run(self, granted_at: Instant) {
        let lease = self.shared.lease;
        let retry = (self.renew_every / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut next = granted_at + self.renew_every;
        let mut last_error: Option<String> = None;
        loop {
            // Sleep until the next renewal, or until the validity runs out, or a stop.
            let now = Instant::now();
            let wake = next.min(self.shared.valid_until());
            match self.stop.recv_timeout(wake.saturating_duration_since(now)) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.expired(&last_error) {
                return;
            }
            if Instant::now() < next {
                continue;
            }
            let t0 = Instant::now();
            match self.arbiter.keep_alive(lease) {
                Ok(ttl) => {
                    if let Some(until) = (t0 + ttl).checked_sub(self.margin) {
                        self.shared.extend(until);
                    }
                    last_error = None;
                    next = t0 + self.renew_every;
                }
                Err(ArbiterError::LeaseExpired(_)) => {
                    self.shared.mark_lost(format!(
                        "the arbiter says lease {lease} ({lease:#x}) has expired"
                    ));
                    tracing::error!(lease, "the arbiter lease has expired");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease, "could not renew the arbiter lease: {e}");
                    last_error = Some(e.to_string());
                    next = Instant::now() + retry;
                }
            }
            if self.expired(&last_error) {
                return;
            }
        }
    }

    /// Marks the lease lost if valid_until has passed.
    fn expired(&self, last_error: &Option<String>) -> bool {
        if Instant::now() < self.shared.valid_until() {
            return false;
        }
        let why = last_error
            .as_deref()
            .unwrap_or("no renewal succeeded in time");
        self.shared.mark_lost(format!(
            "could not renew the arbiter lease before it could have expired: {why}"
        ));
        tracing::error!(lease = self.shared.lease, "lost the arbiter lease: {why}");
        true
    }
}
