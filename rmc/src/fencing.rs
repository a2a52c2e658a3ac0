//! Fencing through an arbiter (etcd): never two primaries.
//!
//! The arbiter holds two keys under the VM's prefix:
//!
//! - `primary`: the host that may run the VM and release its output, bound to that host's
//!   lease. Going live (a primary starting, a standby taking over) means winning it in one
//!   transaction; its create revision is the fencing token that the primary stamps into the
//!   replication handshake, so a standby refuses a primary the arbiter no longer names.
//! - `standby`: the session whose standby holds the current backup. The primary writes it
//!   before it releases the first output of a session, and deletes it before it runs on
//!   without a standby (releasing what it held). A standby takes over only if the key still
//!   names its session: otherwise the VM ran on past its checkpoint.
//!
//! A primary releases output only while its lease is certainly valid (the time before its
//! last renewal request plus the TTL, less a margin, on its own monotonic clock); when it
//! cannot renew in time it stops releasing and exits. A standby wins the primary key only
//! after the old primary's lease ran out, so a frozen or cut-off primary can never release
//! again once another host serves the VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rmc_arbiter::{Arbiter, ArbiterError, Campaign, Endpoint, Lease, LeaseGate, LeaseKeeper};

/// The arbiter's requests must answer within this.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// Who this process is, as the arbiter shows it.
pub fn identity(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{role} {host} pid {}", std::process::id())
}

/// A primary's hold on the arbiter's primary key.
pub struct Fence {
    arbiter: Arbiter,
    keeper: Option<LeaseKeeper>,
    revision: i64,
    /// Set when the key is given up on purpose: not a reason to stop.
    resigned: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("endpoint", &self.arbiter.endpoint().to_string())
            .field("revision", &self.revision)
            .finish()
    }
}

/// Why a standby did not take over.
#[derive(Debug)]
pub enum NoTakeover {
    /// The old primary still holds the key after its lease should have run out: it is alive.
    PrimaryAlive(String),
    /// Another host holds the key.
    OtherPrimary(String),
    /// The primary ran on without this standby: its backup is stale.
    StaleBackup(Option<String>),
    /// The arbiter could not be reached in time: going live without it could make two.
    Unreachable(String),
}

impl std::fmt::Display for NoTakeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoTakeover::PrimaryAlive(h) => write!(
                f,
                "the lost primary ({h}) still renews its arbiter lease: it is alive (a cut \
                 replication link?), so it keeps the VM"
            ),
            NoTakeover::OtherPrimary(h) => write!(f, "another host serves the VM ({h})"),
            NoTakeover::StaleBackup(current) => {
                write!(
                f,
                "the primary ran on without this standby after its last checkpoint: the backup \
                 is stale (the arbiter names {} as current)",
                current.as_deref().map_or("no standby".into(), |t| format!("session {t}"))
            )
            }
            NoTakeover::Unreachable(e) => write!(f, "the arbiter cannot be reached ({e})"),
        }
    }
}

fn keeper(arbiter: &Arbiter, lease: Lease, granted_at: Instant) -> LeaseKeeper {
    let renew = (lease.ttl / 4).max(Duration::from_millis(100));
    let margin = (lease.ttl / 4).max(Duration::from_millis(100));
    LeaseKeeper::start(arbiter.clone(), lease, granted_at, renew, margin)
}

impl Fence {
    /// Wins the primary key for a primary that starts. A key left by a primary that died
    /// frees itself when its lease runs out: waits for that up to `wait`, saying so.
    pub fn go_live(endpoint: &Endpoint, ttl: Duration, me: &str, wait: Duration) -> Result<Fence> {
        let arbiter = Arbiter::new(endpoint.clone(), REQUEST_TIMEOUT);
        let deadline = Instant::now() + wait;
        let mut said = false;
        loop {
            let granted_at = Instant::now();
            let lease = arbiter
                .grant(ttl)
                .context("Going live needs a lease from the arbiter")?;
            match arbiter.campaign_fresh(me, lease.id) {
                Ok(Campaign::Won { revision }) => {
                    let keeper = keeper(&arbiter, lease, granted_at);
                    return Ok(Fence {
                        arbiter,
                        keeper: Some(keeper),
                        revision,
                        resigned: Arc::default(),
                    });
                }
                Ok(Campaign::Held { holder, .. }) => {
                    let _ = arbiter.revoke(lease.id);
                    if Instant::now() >= deadline {
                        bail!(
                            "The arbiter at {endpoint} names another primary for this VM ({holder}); \
                             it renewed its lease for {wait:?}: it is alive. Stop it first, or use \
                             another --arbiter prefix for another VM"
                        );
                    }
                    if !said {
                        crate::events::emit(&crate::events::Event::ArbiterWaiting {
                            holder: holder.to_string(),
                            wait_ms: wait.as_millis() as u64,
                        });
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(Campaign::StaleBackup { current }) => {
                    let _ = arbiter.revoke(lease.id);
                    bail!(
                        "The arbiter at {endpoint} says a standby holds this VM's current state \
                         (session {}): that standby takes over from it; a new VM must not go live \
                         over it. If that state is to be discarded: etcdctl del {}/standby",
                        current.as_deref().unwrap_or("?"),
                        endpoint.prefix
                    );
                }
                Err(e) => {
                    let _ = arbiter.revoke(lease.id);
                    return Err(
                        anyhow::Error::new(e).context("Going live needs the arbiter's primary key")
                    );
                }
            }
        }
    }

    /// A standby takes over: wins the primary key once the lost primary's lease ran out,
    /// provided the arbiter still names one of `tokens` (the sessions under which this
    /// standby's backup is current, its own first) as holding the current backup. Retries
    /// until `wait` passes.
    pub fn take_over(
        endpoint: &Endpoint,
        ttl: Duration,
        me: &str,
        tokens: &[String],
        lost_fence: u64,
        wait: Duration,
    ) -> Result<Fence, NoTakeover> {
        let mut token = tokens.first().map(String::as_str).unwrap_or_default();
        let arbiter = Arbiter::new(endpoint.clone(), REQUEST_TIMEOUT);
        let deadline = Instant::now() + wait;
        let mut last_err = String::new();
        let mut lease: Option<(Lease, Instant)> = None;
        loop {
            // A fresh lease for each try: the one that wins must have most of its TTL left.
            if let Some((l, at)) = &lease {
                if at.elapsed() > ttl / 4 {
                    let _ = arbiter.revoke(l.id);
                    lease = None;
                }
            }
            if lease.is_none() {
                let at = Instant::now();
                match arbiter.grant(ttl) {
                    Ok(l) => lease = Some((l, at)),
                    Err(e) => last_err = e.to_string(),
                }
            }
            if let Some(id) = lease.as_ref().map(|(l, _)| l.id) {
                match arbiter.campaign(me, id, Some(token)) {
                    Ok(Campaign::Won { revision }) => {
                        let (l, granted_at) = lease.take().expect("a lease was granted");
                        let fence = Fence {
                            keeper: Some(keeper(&arbiter, l, granted_at)),
                            arbiter,
                            revision,
                            resigned: Arc::default(),
                        };
                        // This host serves the VM now, unprotected: no standby holds its
                        // backup any more.
                        let _ = fence.arbiter.clear_standby(revision);
                        return Ok(fence);
                    }
                    Ok(Campaign::Held {
                        holder, revision, ..
                    }) => {
                        if revision as u64 != lost_fence {
                            let _ = arbiter.revoke(id);
                            return Err(NoTakeover::OtherPrimary(holder));
                        }
                        // No use waiting for the lease when the backup is stale anyway.
                        if let Ok(current) = arbiter.standby_token() {
                            match current.as_deref() {
                                Some(c) if tokens.iter().any(|t| t == c) => {}
                                _ => {
                                    let _ = arbiter.revoke(id);
                                    return Err(NoTakeover::StaleBackup(current));
                                }
                            }
                        }
                        if Instant::now() >= deadline {
                            let _ = arbiter.revoke(id);
                            return Err(NoTakeover::PrimaryAlive(holder));
                        }
                        last_err = format!("the primary key is still held by {holder}");
                    }
                    Ok(Campaign::StaleBackup { current }) => {
                        match current.as_deref() {
                            // Named under another of our sessions: try with that one.
                            Some(c)
                                if c != token
                                    && tokens.iter().any(|t| t == c)
                                    && Instant::now() < deadline =>
                            {
                                token = tokens.iter().find(|t| *t == c).expect("found");
                                continue;
                            }
                            _ => {
                                let _ = arbiter.revoke(id);
                                return Err(NoTakeover::StaleBackup(current));
                            }
                        }
                    }
                    Err(e) => {
                        last_err = e.to_string();
                        // A lease we may have lost track of: ask for a new one next time.
                        if matches!(e, ArbiterError::LeaseExpired(_)) {
                            lease = None;
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                if let Some((l, _)) = lease {
                    let _ = arbiter.revoke(l.id);
                }
                return Err(NoTakeover::Unreachable(last_err));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The fencing token (the key's create revision).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Whether output may leave now (the lease is certainly valid), from any thread.
    pub fn gate(&self) -> LeaseGate {
        self.keeper.as_ref().expect("held until resign").gate()
    }

    /// The protocol's view of this fence, for the replication link.
    pub fn for_primary(&self) -> Arc<dyn rmc_mc::primary::Fencing> {
        Arc::new(PrimaryFencing {
            arbiter: self.arbiter.clone(),
            revision: self.revision,
        })
    }

    /// Before running on without a standby (releasing held output): the arbiter must stop
    /// naming any standby as current, or that standby could take over from a checkpoint the
    /// VM has moved past. Retries while the lease is valid; `Err` when this host is no
    /// longer the primary or its lease ran out.
    pub fn forget_standby(&self) -> Result<()> {
        let gate = self.gate();
        loop {
            if let Some(why) = gate.lost() {
                bail!("the arbiter lease is lost ({why})");
            }
            // Only while the lease is certainly valid (a primary that was frozen waits for its
            // keeper's verdict): a host that may already be fenced must not take the standby's
            // right to take over away.
            if !gate.is_valid() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            match self.arbiter.clear_standby(self.revision) {
                Ok(true) => return Ok(()),
                Ok(false) => bail!("the arbiter names another primary now"),
                Err(e) => {
                    tracing::warn!("cannot tell the arbiter the standby is gone yet: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Stops the process for good as soon as the lease is lost: from then on another host
    /// may serve the VM. The send gate already lets nothing out by then.
    pub fn exit_when_lost(&self) {
        let gate = self.gate();
        let resigned = self.resigned.clone();
        std::thread::Builder::new()
            .name("rmc-fence-watch".into())
            .spawn(move || loop {
                if resigned.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                if let Some(why) = gate.lost() {
                    if resigned.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    crate::events::emit(&crate::events::Event::LeaseLost {
                        why: why.to_string(),
                    });
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_millis(10));
            })
            .expect("spawn the fence watcher");
    }

    /// Gives the VM up (a primary that ends on purpose, after its standby's goodbye): no
    /// standby holds its current state any more and another may go live at once.
    pub fn resign(mut self) {
        self.resigned
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.arbiter.clear_standby(self.revision);
        if let Some(k) = self.keeper.take() {
            k.resign();
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        // The process is ending on its own terms (its error says why): the keeper stopping
        // with it is no fencing.
        self.resigned
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The primary key's revision as the handshake's fencing token, and the standby record.
#[derive(Debug)]
struct PrimaryFencing {
    arbiter: Arbiter,
    revision: i64,
}

impl rmc_mc::primary::Fencing for PrimaryFencing {
    fn fence(&self) -> u64 {
        self.revision as u64
    }

    fn standby_current(&self, token: &str) -> Result<(), rmc_mc::BoxError> {
        match self.arbiter.mark_standby(self.revision, token) {
            Ok(true) => Ok(()),
            Ok(false) => Err("the arbiter names another primary now".into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The standby's check of a connecting primary: it must hold the arbiter's primary key.
#[derive(Debug)]
pub struct StandbyFencing {
    arbiter: Arbiter,
}

impl StandbyFencing {
    /// A check against the arbiter at `endpoint`.
    pub fn new(endpoint: &Endpoint) -> Self {
        StandbyFencing {
            arbiter: Arbiter::new(endpoint.clone(), REQUEST_TIMEOUT),
        }
    }
}

impl rmc_mc::standby::FenceCheck for StandbyFencing {
    fn check_primary(&self, fence: u64) -> Result<(), rmc_mc::BoxError> {
        if fence == 0 {
            return Err("the primary runs without an arbiter, this standby with one (give both the same --arbiter)".into());
        }
        match self.arbiter.primary() {
            Ok(Some((_, revision, _))) if revision as u64 == fence => Ok(()),
            Ok(Some((holder, revision, _))) => Err(format!(
                "a stale primary: the arbiter names {holder} (fence {revision}), this primary presented fence {fence}"
            )
            .into()),
            Ok(None) => Err(format!(
                "the arbiter names no primary (this primary presented fence {fence}: its lease ran out)"
            )
            .into()),
            Err(e) => Err(format!("cannot ask the arbiter: {e}").into()),
        }
    }
}
