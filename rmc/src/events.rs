//! What `rmc` tells the world: every line a program (the demo, the tests, an operator's
//! script) may react to is an [`Event`].
//!
//! Each event has two forms:
//!
//! - the human line, its [`Display`](std::fmt::Display) (for example `rmc: standby listening on
//!   tcp 127.0.0.1:7070 (asked for)`), printed by default: on stdout, or on stderr for the
//!   warnings ([`Event::is_warning`]);
//! - one JSON object on one line, tagged by `"event"` (for example
//!   `{"event":"standby_listening","transport":"tcp","addr":"127.0.0.1:7070","why":"asked for"}`),
//!   printed on stdout instead when `rmc --json` is given; warnings too go to stdout then, so a
//!   reader has one stream to follow.
//!
//! [`emit`] prints an event in the form chosen by [`set_json`]; [`Event::parse_line`] reads the
//! JSON form back (a line that is not an event, such as a log line, gives `None`). Field names
//! and tags are a stable interface (docs/events.md): add fields and events, do not rename them.
//! Output that no program reacts to (`rmc devices`' listing, `rmc bench`'s tables and JSON
//! document, log lines, warnings about the configuration) is not an event.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use rmc_transport::link::Transport;
use serde::{Deserialize, Serialize};

use crate::checker::Inconsistency;

/// One thing `rmc` reports (see the module doc). Each variant's doc gives its human line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    // ---- the VM (`rmc run`, `rmc primary`) ----
    /// `rmc: VM running: {memory_mib} MiB, {vcpus} vCPU(s) [{workloads}]`: the VM was built
    /// and its vCPUs run.
    VmRunning {
        /// Guest memory, MiB.
        memory_mib: u64,
        /// vCPUs.
        vcpus: usize,
        /// Workload of each vCPU (`counter`, `dirtier`, `idle`).
        workloads: Vec<String>,
    },
    /// `rmc: counter service listening on udp {addr}`: where clients reach the guest's
    /// counter service (the port bound, also for `--listen ...:0`).
    ServiceListening {
        /// The UDP address.
        addr: SocketAddr,
    },
    /// `rmc: VM stopped after {seconds:.1} s: counter {counter}, {requests} requests, {repeats}
    /// repeats, {malformed} malformed`: `rmc run --duration` ended.
    VmStopped {
        /// Seconds the VM ran.
        seconds: f64,
        /// The counter service's counter.
        counter: u64,
        /// New requests served.
        requests: u64,
        /// Repeated requests answered again.
        repeats: u64,
        /// Malformed requests.
        malformed: u64,
    },

    // ---- the primary ----
    /// `rmc: the arbiter at {arbiter} names this host the VM's primary (fence {fence})`: this
    /// primary won the arbiter's primary key; `fence` is its fencing token.
    ArbiterNamedPrimary {
        /// The arbiter's endpoint.
        arbiter: String,
        /// The fencing token (the key's create revision).
        fence: i64,
    },
    /// Warning. `rmc: cannot start protection with the standby at {standby} yet: {error};
    /// retrying every second`.
    ProtectionRetry {
        /// The standby's address.
        standby: SocketAddr,
        /// Why the connection failed.
        error: String,
    },
    /// `rmc: protected by the standby at {standby} over {transport}` and, when `resumed`,
    /// ` (resumed: it still holds a checkpoint of the last session, only what changed since is
    /// sent)`: a session with a standby began (its full sync or resume is under way).
    Protected {
        /// The standby's address.
        standby: SocketAddr,
        /// The transport used (`tcp` or `rdma`).
        #[serde(with = "transport_serde")]
        transport: Transport,
        /// The standby still held a checkpoint of the last session: only the pages changed
        /// since were sent.
        resumed: bool,
    },
    /// `rmc: first checkpoint acknowledged: failover possible from now on`: the standby holds
    /// a consistent checkpoint of this session and, with an arbiter, the arbiter records it as
    /// the standby that may take over (once per session).
    FirstCheckpointAcked,
    /// `rmc: output commit: {released_packets} packets ({released_bytes} bytes) released after
    /// their checkpoint's ack, {held_packets} held at the end, {backpressure_events}
    /// backpressure events`: output commit's figures at the end of protection.
    OutputCommit {
        /// Packets released after their checkpoint's ack.
        released_packets: u64,
        /// Their bytes.
        released_bytes: u64,
        /// Packets still held at the end.
        held_packets: u64,
        /// Packets the guest's NIC had to retry because the buffer was full.
        backpressure_events: u64,
    },
    /// `rmc: {checkpoints_acked} checkpoints acknowledged (last epoch {last_epoch}) in
    /// {seconds:.1} s, {output_triggered} of them for waiting output; full sync {sync_pages} pages in {sync_seconds:.2} s; first pause
    /// {first_pause_us} us; pause p50 {pause_p50_us} us p99 {pause_p99_us} us; pages/epoch mean
    /// {pages_per_epoch:.0}; ack p50 {ack_p50_us} us p99 {ack_p99_us} us; {oversize}
    /// oversize`: protection ended on purpose (`--duration`), the standby said goodbye.
    ProtectionEnded {
        /// Checkpoints the standby acknowledged.
        checkpoints_acked: u64,
        /// Checkpoints taken because output was waiting (`--output-trigger`).
        output_triggered: u64,
        /// The last acknowledged epoch.
        last_epoch: u64,
        /// Seconds of protection (after the full sync).
        seconds: f64,
        /// Pages of the full sync.
        sync_pages: u64,
        /// Seconds of the full sync.
        sync_seconds: f64,
        /// The first pause, microseconds (0: none).
        first_pause_us: u64,
        /// Median pause, microseconds.
        pause_p50_us: u64,
        /// 99th percentile pause, microseconds.
        pause_p99_us: u64,
        /// Mean pages per epoch.
        pages_per_epoch: f64,
        /// Median time from commit to ack, microseconds.
        ack_p50_us: u64,
        /// 99th percentile time from commit to ack, microseconds.
        ack_p99_us: u64,
        /// Epochs larger than a slot (sent while paused).
        oversize: u64,
    },
    /// Warning. `rmc: lost the standby: {error}; running unprotected, reconnecting to
    /// {standby} every second` (`action` `continue`) or `...; VM paused with its output held,
    /// reconnecting to {standby} every second` (`pause`).
    StandbyLost {
        /// The standby's address.
        standby: SocketAddr,
        /// Why the session ended.
        error: String,
        /// What the primary does now (`--on-standby-loss`).
        action: LossAction,
    },
    /// Warning. `rmc: FENCED: lost the standby ({error}) and {why}: stopping this VM for good;
    /// its held output never left`: the primary could not take the standby's record back
    /// from the arbiter, so it exits (status 3).
    Fenced {
        /// Why the standby was lost.
        error: String,
        /// What the arbiter said.
        why: String,
    },
    /// Warning. `rmc: the arbiter names another primary ({holder}); waiting up to {wait_ms} ms
    /// for its lease to run out`: a primary going live found the VM's primary key held.
    ArbiterWaiting {
        /// Who holds the primary key.
        holder: String,
        /// How long it waits for that lease, milliseconds.
        wait_ms: u64,
    },
    /// Warning. `rmc: FENCED: {why}; another host may serve the VM now: stopping this VM for
    /// good (no output left it after its lease was uncertain)`: the primary's lease could not
    /// be renewed in time, so it exits (status 3).
    LeaseLost {
        /// Why the lease is uncertain.
        why: String,
    },

    // ---- the standby ----
    /// `rmc: standby listening on {transport} {addr} ({why})`: the standby is ready for its
    /// primary (the port bound, also for `--listen ...:0`).
    StandbyListening {
        /// The transport listened on (`tcp` or `rdma`; `auto` resolved).
        #[serde(with = "transport_serde")]
        transport: Transport,
        /// The address.
        addr: SocketAddr,
        /// Why this transport (`asked for`, or the `auto` choice).
        why: String,
    },
    /// `rmc: refused a connection from {peer}: {error}`: a connection that never became a
    /// session (failed or slow handshake, busy); the backup is untouched.
    Refused {
        /// Who connected.
        peer: SocketAddr,
        /// Why it was refused.
        error: String,
    },
    /// `rmc: not taking over: {why}; waiting for a primary`: the primary is lost but the
    /// arbiter does not let this standby go live.
    NotTakingOver {
        /// Why, in short.
        reason: TakeoverRefusal,
        /// Why, in words.
        why: String,
    },
    /// `rmc: session with {peer} ended after {epochs} epochs: closed by the primary` (no
    /// `error`) or `...: error: {error}`, then `; backup: {backup}`.
    SessionEnded {
        /// The primary.
        peer: SocketAddr,
        /// Epochs received in the session.
        epochs: u64,
        /// Why the session ended; none: the primary said goodbye.
        error: Option<String>,
        /// What the backup holds now.
        backup: Backup,
    },
    /// `rmc: failed over at epoch {epoch}: primary lost ({cause}), detected {detected_ms} ms
    /// after its last message, VM resumed {resumed_ms} ms later, serving on udp {service}`:
    /// the standby runs the VM from its backup.
    FailedOver(FailedOver),
    /// `rmc: protecting the failed-over VM with the standby at {standby}` (`--protect-with`).
    ProtectingFailedOver {
        /// The next standby's address.
        standby: SocketAddr,
    },
    /// `rmc: failed-over VM stopped: counter {counter}, {requests} requests` (`--run-for`).
    FailedOverVmStopped {
        /// The counter service's counter.
        counter: u64,
        /// New requests served.
        requests: u64,
    },

    // ---- `rmc client` ----
    /// `rmc client {client_id:#x} -> {server}`.
    ClientStarted {
        /// The client id.
        client_id: u64,
        /// The service's address.
        server: SocketAddr,
    },
    /// `seq {seq} -> counter {counter} (status {status})`: the answer to a new request
    /// (not with `--quiet`).
    ClientReply {
        /// The request's seq.
        seq: u64,
        /// The counter in the reply.
        counter: u64,
        /// The reply's status (0: ok).
        status: u32,
    },
    /// `seq {seq} again -> counter {counter}`: the answer to a deliberate repeat
    /// (`--repeat-every`, not with `--quiet`).
    ClientRepeat {
        /// The seq repeated.
        seq: u64,
        /// The counter in the reply.
        counter: u64,
    },
    /// `rmc client: {requests} requests, {replies} replies ({late} late, {from_elsewhere} from
    /// other addresses), {needed_resend} needed a resend, {resends_and_repeats}
    /// resends/repeats in {seconds:.2} s, latency p50 {latency_p50_us} us p99
    /// {latency_p99_us} us, last counter {last_counter or -}` and `, consistent` when
    /// `consistent`.
    ClientSummary {
        /// New requests sent.
        requests: u64,
        /// Replies received (repeats and late ones included).
        replies: u64,
        /// Replies received after the last request was answered.
        late: u64,
        /// Replies from an address other than the server's.
        from_elsewhere: u64,
        /// Requests answered only after a resend.
        needed_resend: u64,
        /// Datagrams resent plus deliberate repeats.
        resends_and_repeats: u64,
        /// Seconds of the run.
        seconds: f64,
        /// Median request latency, microseconds.
        latency_p50_us: u64,
        /// 99th percentile request latency, microseconds.
        latency_p99_us: u64,
        /// The counter of the last reply, if any.
        last_counter: Option<u64>,
        /// `--check` found no contradiction.
        consistent: bool,
    },
    /// Warning. `rmc client: INCONSISTENT: {violation}`: `--check` found a contradiction
    /// (the client exits with status 1).
    ClientInconsistent {
        /// The first contradiction.
        violation: Inconsistency,
    },

    // ---- `rmc demo` ----
    /// `rmc demo: {trials} trial(s)`.
    DemoStarted {
        /// Trials to run.
        trials: u32,
    },
    /// `  {text}`: a line of the demo's story (first trial only).
    DemoStory {
        /// The line.
        text: String,
    },
    /// `trial {trial:>2}: killed the primary after {kill_after_s:.2} s; {clients} client(s),
    /// {requests} requests, {replies} replies ({late} late, {from_elsewhere} from other
    /// addresses), {needed_resend} needed a resend ({resends} resends); failover (kill to first
    /// reply) {failover_ms} ms; consistent`: a trial that stayed consistent.
    DemoTrial {
        /// The trial, from 1.
        trial: u32,
        /// Seconds of protection before the kill.
        kill_after_s: f64,
        /// Clients.
        clients: usize,
        /// Requests sent.
        requests: u64,
        /// Replies received.
        replies: u64,
        /// Late replies.
        late: u64,
        /// Replies from other addresses.
        from_elsewhere: u64,
        /// Requests that needed a resend.
        needed_resend: u64,
        /// Resends.
        resends: u64,
        /// From the kill to the first reply after it, ms.
        failover_ms: u64,
    },
    /// `trial {trial}: killed the primary {kill_after_s:.2} s into the guest's output (booted in
    /// {boot_s:.1} s); seq 1..{shown_at_kill} shown before the kill, then the standby's guest
    /// went on to {last}, none repeated or skipped; failover (kill to next line) {failover_ms}
    /// ms`: a trial of `rmc demo --guest linux` whose console stayed consistent.
    DemoLinuxTrial {
        /// The trial, from 1.
        trial: u32,
        /// Seconds from the guest's first `seq` line to the kill.
        kill_after_s: f64,
        /// Seconds from starting the primary to the first `seq` line shown.
        boot_s: f64,
        /// The highest number shown when the primary was killed.
        shown_at_kill: u64,
        /// The highest number shown at the end (1..=last, each once).
        last: u64,
        /// From the kill to the next number shown, ms.
        failover_ms: u64,
    },
    /// `  standby: failed over at epoch ...`: what the standby said about the failover of the
    /// first trial.
    DemoStandby(FailedOver),
    /// `rmc demo: trial {trial} FAILED: {error}`: the demo stops (status 1). `inconsistency`:
    /// the first contradiction the clients' checker found, if that is why.
    DemoTrialFailed {
        /// The trial, from 1.
        trial: u32,
        /// What went wrong.
        error: String,
        /// The first contradiction, when the trial failed for one.
        inconsistency: Option<Inconsistency>,
    },
    /// `rmc demo: {trials} trial(s) in {seconds:.0} s, all consistent; failover time ms: min
    /// {min_ms:.0} p50 {p50_ms:.0} p90 {p90_ms:.0} max {max_ms:.0}`: every trial passed.
    DemoSummary {
        /// Trials run.
        trials: usize,
        /// Seconds in all.
        seconds: f64,
        /// Shortest failover time, ms.
        min_ms: f64,
        /// Median failover time, ms.
        p50_ms: f64,
        /// 90th percentile failover time, ms.
        p90_ms: f64,
        /// Longest failover time, ms.
        max_ms: f64,
    },
}

/// A standby's failover ([`Event::FailedOver`], [`Event::DemoStandby`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedOver {
    /// The epoch of the checkpoint the VM runs from.
    pub epoch: u64,
    /// Why the primary was declared lost.
    pub cause: String,
    /// From the primary's last message to the loss being declared, ms.
    pub detected_ms: u64,
    /// From the loss to the VM running, ms.
    pub resumed_ms: u64,
    /// Where the VM serves.
    pub service: SocketAddr,
}

impl FailedOver {
    /// The line without the leading `rmc: `.
    fn fmt_bare(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "failed over at epoch {}: primary lost ({}), detected {} ms after its last message, \
             VM resumed {} ms later, serving on udp {}",
            self.epoch, self.cause, self.detected_ms, self.resumed_ms, self.service
        )
    }
}

/// What a primary does when it loses its standby ([`Event::StandbyLost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAction {
    /// Runs on unprotected (its held output released).
    Continue,
    /// Paused with its output held.
    Pause,
}

/// Why a standby does not take over ([`Event::NotTakingOver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TakeoverRefusal {
    /// The lost primary still renews its lease: it is alive.
    PrimaryAlive,
    /// Another host holds the primary key.
    OtherPrimary,
    /// The primary ran on without this standby: its backup is stale.
    StaleBackup,
    /// The arbiter could not be reached in time.
    Unreachable,
}

/// What a standby's backup holds ([`Event::SessionEnded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Backup {
    /// `no consistent checkpoint`.
    NoCheckpoint,
    /// `consistent checkpoint of epoch {epoch}`: it can fail over to it.
    Consistent {
        /// Its epoch.
        epoch: u64,
    },
    /// `consistent checkpoint of epoch {epoch}, stale (the primary ran on past it)`.
    Stale {
        /// Its epoch.
        epoch: u64,
    },
    /// `consistent checkpoint of epoch {epoch}, released (no failover to it until a primary
    /// protects again)`: the primary ended protection on purpose.
    Released {
        /// Its epoch.
        epoch: u64,
    },
}

impl Backup {
    /// The epoch of the consistent checkpoint it holds, if any (current, stale or released).
    pub fn epoch(&self) -> Option<u64> {
        match *self {
            Backup::NoCheckpoint => None,
            Backup::Consistent { epoch } | Backup::Stale { epoch } | Backup::Released { epoch } => {
                Some(epoch)
            }
        }
    }
}

impl fmt::Display for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backup::NoCheckpoint => f.write_str("no consistent checkpoint"),
            Backup::Consistent { epoch } => write!(f, "consistent checkpoint of epoch {epoch}"),
            Backup::Stale { epoch } => write!(
                f,
                "consistent checkpoint of epoch {epoch}, stale (the primary ran on past it)"
            ),
            Backup::Released { epoch } => write!(
                f,
                "consistent checkpoint of epoch {epoch}, released (no failover to it until a \
                 primary protects again)"
            ),
        }
    }
}

impl Event {
    /// The event of a JSON line (the form `rmc --json` prints); `None` for any other line
    /// (human lines, log lines, JSON that is not an event).
    pub fn parse_line(line: &str) -> Option<Event> {
        let line = line.trim();
        if !line.starts_with('{') {
            return None;
        }
        serde_json::from_str(line).ok()
    }

    /// The JSON form: one object on one line, tagged by `"event"`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }

    /// A warning: its human line goes to stderr (the JSON form goes to stdout like every
    /// other event).
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Event::ProtectionRetry { .. }
                | Event::StandbyLost { .. }
                | Event::Fenced { .. }
                | Event::ArbiterWaiting { .. }
                | Event::LeaseLost { .. }
                | Event::ClientInconsistent { .. }
        )
    }
}

/// Reads the JSON form ([`Event::parse_line`]), so that readers generic over `FromStr` (the
/// test helpers) can take events.
impl std::str::FromStr for Event {
    type Err = String;
    fn from_str(s: &str) -> Result<Event, String> {
        Event::parse_line(s).ok_or_else(|| format!("not an rmc event: {s}"))
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::VmRunning {
                memory_mib,
                vcpus,
                workloads,
            } => write!(
                f,
                "rmc: VM running: {memory_mib} MiB, {vcpus} vCPU(s) [{}]",
                workloads.join(",")
            ),
            Event::ServiceListening { addr } => {
                write!(f, "rmc: counter service listening on udp {addr}")
            }
            Event::VmStopped {
                seconds,
                counter,
                requests,
                repeats,
                malformed,
            } => write!(
                f,
                "rmc: VM stopped after {seconds:.1} s: counter {counter}, {requests} requests, \
                 {repeats} repeats, {malformed} malformed"
            ),
            Event::ArbiterNamedPrimary { arbiter, fence } => write!(
                f,
                "rmc: the arbiter at {arbiter} names this host the VM's primary (fence {fence})"
            ),
            Event::ProtectionRetry { standby, error } => write!(
                f,
                "rmc: cannot start protection with the standby at {standby} yet: {error}; \
                 retrying every second"
            ),
            Event::Protected {
                standby,
                transport,
                resumed,
            } => write!(
                f,
                "rmc: protected by the standby at {standby} over {transport}{}",
                if *resumed {
                    " (resumed: it still holds a checkpoint of the last session, only what \
                     changed since is sent)"
                } else {
                    ""
                }
            ),
            Event::FirstCheckpointAcked => {
                f.write_str("rmc: first checkpoint acknowledged: failover possible from now on")
            }
            Event::OutputCommit {
                released_packets,
                released_bytes,
                held_packets,
                backpressure_events,
            } => write!(
                f,
                "rmc: output commit: {released_packets} packets ({released_bytes} bytes) released \
                 after their checkpoint's ack, {held_packets} held at the end, \
                 {backpressure_events} backpressure events"
            ),
            Event::ProtectionEnded {
                checkpoints_acked,
                output_triggered,
                last_epoch,
                seconds,
                sync_pages,
                sync_seconds,
                first_pause_us,
                pause_p50_us,
                pause_p99_us,
                pages_per_epoch,
                ack_p50_us,
                ack_p99_us,
                oversize,
            } => write!(
                f,
                "rmc: {checkpoints_acked} checkpoints acknowledged (last epoch {last_epoch}) in \
                 {seconds:.1} s, {output_triggered} of them for waiting output; full sync {sync_pages} pages in {sync_seconds:.2} s; first pause \
                 {first_pause_us} us; pause p50 {pause_p50_us} us p99 {pause_p99_us} us; \
                 pages/epoch mean {pages_per_epoch:.0}; ack p50 {ack_p50_us} us p99 {ack_p99_us} \
                 us; {oversize} oversize"
            ),
            Event::StandbyLost {
                standby,
                error,
                action,
            } => write!(
                f,
                "rmc: lost the standby: {error}; {}, reconnecting to {standby} every second",
                match action {
                    LossAction::Continue => "running unprotected",
                    LossAction::Pause => "VM paused with its output held",
                }
            ),
            Event::Fenced { error, why } => write!(
                f,
                "rmc: FENCED: lost the standby ({error}) and {why}: stopping this VM for good; \
                 its held output never left"
            ),
            Event::ArbiterWaiting { holder, wait_ms } => write!(
                f,
                "rmc: the arbiter names another primary ({holder}); waiting up to {wait_ms} ms \
                 for its lease to run out"
            ),
            Event::LeaseLost { why } => write!(
                f,
                "rmc: FENCED: {why}; another host may serve the VM now: stopping this VM for \
                 good (no output left it after its lease was uncertain)"
            ),
            Event::StandbyListening {
                transport,
                addr,
                why,
            } => write!(f, "rmc: standby listening on {transport} {addr} ({why})"),
            Event::Refused { peer, error } => {
                write!(f, "rmc: refused a connection from {peer}: {error}")
            }
            Event::NotTakingOver { why, .. } => {
                write!(f, "rmc: not taking over: {why}; waiting for a primary")
            }
            Event::SessionEnded {
                peer,
                epochs,
                error,
                backup,
            } => {
                write!(f, "rmc: session with {peer} ended after {epochs} epochs: ")?;
                match error {
                    None => f.write_str("closed by the primary")?,
                    Some(e) => write!(f, "error: {e}")?,
                }
                write!(f, "; backup: {backup}")
            }
            Event::FailedOver(fo) => {
                f.write_str("rmc: ")?;
                fo.fmt_bare(f)
            }
            Event::ProtectingFailedOver { standby } => write!(
                f,
                "rmc: protecting the failed-over VM with the standby at {standby}"
            ),
            Event::FailedOverVmStopped { counter, requests } => write!(
                f,
                "rmc: failed-over VM stopped: counter {counter}, {requests} requests"
            ),
            Event::ClientStarted { client_id, server } => {
                write!(f, "rmc client {client_id:#x} -> {server}")
            }
            Event::ClientReply {
                seq,
                counter,
                status,
            } => write!(f, "seq {seq} -> counter {counter} (status {status})"),
            Event::ClientRepeat { seq, counter } => {
                write!(f, "seq {seq} again -> counter {counter}")
            }
            Event::ClientSummary {
                requests,
                replies,
                late,
                from_elsewhere,
                needed_resend,
                resends_and_repeats,
                seconds,
                latency_p50_us,
                latency_p99_us,
                last_counter,
                consistent,
            } => write!(
                f,
                "rmc client: {requests} requests, {replies} replies ({late} late, \
                 {from_elsewhere} from other addresses), {needed_resend} needed a resend, \
                 {resends_and_repeats} resends/repeats in {seconds:.2} s, latency p50 \
                 {latency_p50_us} us p99 {latency_p99_us} us, last counter {}{}",
                last_counter.map_or("-".to_string(), |c| c.to_string()),
                if *consistent { ", consistent" } else { "" }
            ),
            Event::ClientInconsistent { violation } => {
                write!(f, "rmc client: INCONSISTENT: {violation}")
            }
            Event::DemoStarted { trials } => write!(f, "rmc demo: {trials} trial(s)"),
            Event::DemoStory { text } => write!(f, "  {text}"),
            Event::DemoTrial {
                trial,
                kill_after_s,
                clients,
                requests,
                replies,
                late,
                from_elsewhere,
                needed_resend,
                resends,
                failover_ms,
            } => write!(
                f,
                "trial {trial:>2}: killed the primary after {kill_after_s:.2} s; {clients} \
                 client(s), {requests} requests, {replies} replies ({late} late, \
                 {from_elsewhere} from other addresses), {needed_resend} needed a resend \
                 ({resends} resends); failover (kill to first reply) {failover_ms} ms; consistent"
            ),
            Event::DemoLinuxTrial {
                trial,
                kill_after_s,
                boot_s,
                shown_at_kill,
                last,
                failover_ms,
            } => write!(
                f,
                "trial {trial:>2}: killed the primary {kill_after_s:.2} s into the guest's output \
                 (booted in {boot_s:.1} s); seq 1..{shown_at_kill} shown before the kill, then \
                 the standby's guest went on to {last}, none repeated or skipped; failover \
                 (kill to next line) {failover_ms} ms"
            ),
            Event::DemoStandby(fo) => {
                f.write_str("  standby: ")?;
                fo.fmt_bare(f)
            }
            Event::DemoTrialFailed { trial, error, .. } => {
                write!(f, "rmc demo: trial {trial} FAILED: {error}")
            }
            Event::DemoSummary {
                trials,
                seconds,
                min_ms,
                p50_ms,
                p90_ms,
                max_ms,
            } => write!(
                f,
                "rmc demo: {trials} trial(s) in {seconds:.0} s, all consistent; failover time \
                 ms: min {min_ms:.0} p50 {p50_ms:.0} p90 {p90_ms:.0} max {max_ms:.0}"
            ),
        }
    }
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Chooses the form [`emit`] prints: JSON lines (`rmc --json`) or human lines (the default).
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Whether [`emit`] prints JSON lines.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Prints `e` as one line: its JSON form on stdout with `--json`; otherwise its human line,
/// on stderr for a warning, on stdout for the rest.
pub fn emit(e: &Event) {
    if json() {
        println!("{}", e.to_json());
    } else if e.is_warning() {
        eprintln!("{e}");
    } else {
        println!("{e}");
    }
}

/// Serde for a [`Transport`] as its `--transport` word (`tcp`, `rdma`, `auto`), through its
/// `Display` and `FromStr`: `#[serde(with = "rmc::events::transport_serde")]`.
pub mod transport_serde {
    use rmc_transport::link::Transport;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the word.
    pub fn serialize<S: Serializer>(t: &Transport, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }

    /// Reads the word.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Transport, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn failed_over() -> FailedOver {
        FailedOver {
            epoch: 42,
            cause: "Connection closed".into(),
            detected_ms: 3,
            resumed_ms: 17,
            service: addr("127.0.0.1:7000"),
        }
    }

    /// One of every event, with its human line.
    fn every_event() -> Vec<(Event, &'static str)> {
        vec![
            (
                Event::VmRunning {
                    memory_mib: 256,
                    vcpus: 2,
                    workloads: vec!["counter".into(), "dirtier".into()],
                },
                "rmc: VM running: 256 MiB, 2 vCPU(s) [counter,dirtier]",
            ),
            (
                Event::ServiceListening {
                    addr: addr("127.0.0.1:7000"),
                },
                "rmc: counter service listening on udp 127.0.0.1:7000",
            ),
            (
                Event::VmStopped {
                    seconds: 0.54,
                    counter: 3,
                    requests: 3,
                    repeats: 1,
                    malformed: 0,
                },
                "rmc: VM stopped after 0.5 s: counter 3, 3 requests, 1 repeats, 0 malformed",
            ),
            (
                Event::ArbiterNamedPrimary {
                    arbiter: "etcd://10.0.0.1:2379/rmc/default".into(),
                    fence: 7,
                },
                "rmc: the arbiter at etcd://10.0.0.1:2379/rmc/default names this host the VM's \
                 primary (fence 7)",
            ),
            (
                Event::ProtectionRetry {
                    standby: addr("10.0.0.2:7070"),
                    error: "Connection refused".into(),
                },
                "rmc: cannot start protection with the standby at 10.0.0.2:7070 yet: Connection \
                 refused; retrying every second",
            ),
            (
                Event::Protected {
                    standby: addr("10.0.0.2:7070"),
                    transport: Transport::Tcp,
                    resumed: false,
                },
                "rmc: protected by the standby at 10.0.0.2:7070 over tcp",
            ),
            (
                Event::Protected {
                    standby: addr("10.0.0.2:7070"),
                    transport: Transport::Rdma,
                    resumed: true,
                },
                "rmc: protected by the standby at 10.0.0.2:7070 over rdma (resumed: it still \
                 holds a checkpoint of the last session, only what changed since is sent)",
            ),
            (
                Event::FirstCheckpointAcked,
                "rmc: first checkpoint acknowledged: failover possible from now on",
            ),
            (
                Event::OutputCommit {
                    released_packets: 10,
                    released_bytes: 640,
                    held_packets: 0,
                    backpressure_events: 2,
                },
                "rmc: output commit: 10 packets (640 bytes) released after their checkpoint's \
                 ack, 0 held at the end, 2 backpressure events",
            ),
            (
                Event::ProtectionEnded {
                    checkpoints_acked: 100,
                    output_triggered: 60,
                    last_epoch: 101,
                    seconds: 2.04,
                    sync_pages: 16384,
                    sync_seconds: 0.123,
                    first_pause_us: 250,
                    pause_p50_us: 300,
                    pause_p99_us: 900,
                    pages_per_epoch: 499.6,
                    ack_p50_us: 1000,
                    ack_p99_us: 3000,
                    oversize: 0,
                },
                "rmc: 100 checkpoints acknowledged (last epoch 101) in 2.0 s, 60 of them for \
                 waiting output; full sync 16384 pages in 0.12 s; first pause 250 us; pause p50 300 us p99 900 us; pages/epoch \
                 mean 500; ack p50 1000 us p99 3000 us; 0 oversize",
            ),
            (
                Event::StandbyLost {
                    standby: addr("10.0.0.2:7070"),
                    error: "Heartbeat timeout".into(),
                    action: LossAction::Continue,
                },
                "rmc: lost the standby: Heartbeat timeout; running unprotected, reconnecting to \
                 10.0.0.2:7070 every second",
            ),
            (
                Event::StandbyLost {
                    standby: addr("10.0.0.2:7070"),
                    error: "Heartbeat timeout".into(),
                    action: LossAction::Pause,
                },
                "rmc: lost the standby: Heartbeat timeout; VM paused with its output held, \
                 reconnecting to 10.0.0.2:7070 every second",
            ),
            (
                Event::Fenced {
                    error: "Heartbeat timeout".into(),
                    why: "the lease is lost".into(),
                },
                "rmc: FENCED: lost the standby (Heartbeat timeout) and the lease is lost: \
                 stopping this VM for good; its held output never left",
            ),
            (
                Event::ArbiterWaiting {
                    holder: "host-a".into(),
                    wait_ms: 5000,
                },
                "rmc: the arbiter names another primary (host-a); waiting up to 5000 ms for its \
                 lease to run out",
            ),
            (
                Event::LeaseLost {
                    why: "no lease renewal for 1.5 s".into(),
                },
                "rmc: FENCED: no lease renewal for 1.5 s; another host may serve the VM now: \
                 stopping this VM for good (no output left it after its lease was uncertain)",
            ),
            (
                Event::StandbyListening {
                    transport: Transport::Tcp,
                    addr: addr("127.0.0.1:7070"),
                    why: "asked for".into(),
                },
                "rmc: standby listening on tcp 127.0.0.1:7070 (asked for)",
            ),
            (
                Event::Refused {
                    peer: addr("127.0.0.1:5555"),
                    error: "Authentication failed".into(),
                },
                "rmc: refused a connection from 127.0.0.1:5555: Authentication failed",
            ),
            (
                Event::NotTakingOver {
                    reason: TakeoverRefusal::StaleBackup,
                    why: "the backup is stale".into(),
                },
                "rmc: not taking over: the backup is stale; waiting for a primary",
            ),
            (
                Event::SessionEnded {
                    peer: addr("127.0.0.1:5555"),
                    epochs: 12,
                    error: None,
                    backup: Backup::Released { epoch: 11 },
                },
                "rmc: session with 127.0.0.1:5555 ended after 12 epochs: closed by the primary; \
                 backup: consistent checkpoint of epoch 11, released (no failover to it until a \
                 primary protects again)",
            ),
            (
                Event::SessionEnded {
                    peer: addr("127.0.0.1:5555"),
                    epochs: 2,
                    error: Some("Checkpoint 2 cannot be restored".into()),
                    backup: Backup::NoCheckpoint,
                },
                "rmc: session with 127.0.0.1:5555 ended after 2 epochs: error: Checkpoint 2 \
                 cannot be restored; backup: no consistent checkpoint",
            ),
            (
                Event::SessionEnded {
                    peer: addr("127.0.0.1:5555"),
                    epochs: 5,
                    error: Some("lost".into()),
                    backup: Backup::Stale { epoch: 4 },
                },
                "rmc: session with 127.0.0.1:5555 ended after 5 epochs: error: lost; backup: \
                 consistent checkpoint of epoch 4, stale (the primary ran on past it)",
            ),
            (
                Event::SessionEnded {
                    peer: addr("127.0.0.1:5555"),
                    epochs: 5,
                    error: None,
                    backup: Backup::Consistent { epoch: 4 },
                },
                "rmc: session with 127.0.0.1:5555 ended after 5 epochs: closed by the primary; \
                 backup: consistent checkpoint of epoch 4",
            ),
            (
                Event::FailedOver(failed_over()),
                "rmc: failed over at epoch 42: primary lost (Connection closed), detected 3 ms \
                 after its last message, VM resumed 17 ms later, serving on udp 127.0.0.1:7000",
            ),
            (
                Event::ProtectingFailedOver {
                    standby: addr("10.0.0.3:7070"),
                },
                "rmc: protecting the failed-over VM with the standby at 10.0.0.3:7070",
            ),
            (
                Event::FailedOverVmStopped {
                    counter: 9,
                    requests: 9,
                },
                "rmc: failed-over VM stopped: counter 9, 9 requests",
            ),
            (
                Event::ClientStarted {
                    client_id: 77,
                    server: addr("127.0.0.1:7000"),
                },
                "rmc client 0x4d -> 127.0.0.1:7000",
            ),
            (
                Event::ClientReply {
                    seq: 1,
                    counter: 101,
                    status: 0,
                },
                "seq 1 -> counter 101 (status 0)",
            ),
            (
                Event::ClientRepeat {
                    seq: 7,
                    counter: 107,
                },
                "seq 7 again -> counter 107",
            ),
            (
                Event::ClientSummary {
                    requests: 100,
                    replies: 114,
                    late: 0,
                    from_elsewhere: 0,
                    needed_resend: 1,
                    resends_and_repeats: 15,
                    seconds: 0.254,
                    latency_p50_us: 80,
                    latency_p99_us: 400,
                    last_counter: Some(100),
                    consistent: true,
                },
                "rmc client: 100 requests, 114 replies (0 late, 0 from other addresses), 1 \
                 needed a resend, 15 resends/repeats in 0.25 s, latency p50 80 us p99 400 us, \
                 last counter 100, consistent",
            ),
            (
                Event::ClientSummary {
                    requests: 0,
                    replies: 0,
                    late: 0,
                    from_elsewhere: 0,
                    needed_resend: 0,
                    resends_and_repeats: 0,
                    seconds: 0.0,
                    latency_p50_us: 0,
                    latency_p99_us: 0,
                    last_counter: None,
                    consistent: false,
                },
                "rmc client: 0 requests, 0 replies (0 late, 0 from other addresses), 0 needed a \
                 resend, 0 resends/repeats in 0.00 s, latency p50 0 us p99 0 us, last counter -",
            ),
            (
                Event::ClientInconsistent {
                    violation: Inconsistency::Status {
                        client_id: 1,
                        seq: 2,
                        status: 3,
                    },
                },
                "rmc client: INCONSISTENT: client 0x1 seq 2 was answered with status 3",
            ),
            (Event::DemoStarted { trials: 1 }, "rmc demo: 1 trial(s)"),
            (
                Event::DemoStory {
                    text: "standby listening".into(),
                },
                "  standby listening",
            ),
            (
                Event::DemoTrial {
                    trial: 1,
                    kill_after_s: 3.0,
                    clients: 2,
                    requests: 5000,
                    replies: 5002,
                    late: 2,
                    from_elsewhere: 0,
                    needed_resend: 2,
                    resends: 3,
                    failover_ms: 25,
                },
                "trial  1: killed the primary after 3.00 s; 2 client(s), 5000 requests, 5002 \
                 replies (2 late, 0 from other addresses), 2 needed a resend (3 resends); \
                 failover (kill to first reply) 25 ms; consistent",
            ),
            (
                Event::DemoLinuxTrial {
                    trial: 1,
                    kill_after_s: 2.0,
                    boot_s: 41.04,
                    shown_at_kill: 52,
                    last: 92,
                    failover_ms: 850,
                },
                "trial  1: killed the primary 2.00 s into the guest's output (booted in 41.0 s); \
                 seq 1..52 shown before the kill, then the standby's guest went on to 92, none \
                 repeated or skipped; failover (kill to next line) 850 ms",
            ),
            (
                Event::DemoStandby(failed_over()),
                "  standby: failed over at epoch 42: primary lost (Connection closed), detected \
                 3 ms after its last message, VM resumed 17 ms later, serving on udp \
                 127.0.0.1:7000",
            ),
            (
                Event::DemoTrialFailed {
                    trial: 2,
                    error: "INCONSISTENT: 1 contradiction(s)".into(),
                    inconsistency: Some(Inconsistency::BehindSeen {
                        client_id: 1,
                        seq: 2,
                        counter: 3,
                        seen: 4,
                    }),
                },
                "rmc demo: trial 2 FAILED: INCONSISTENT: 1 contradiction(s)",
            ),
            (
                Event::DemoSummary {
                    trials: 20,
                    seconds: 95.4,
                    min_ms: 12.0,
                    p50_ms: 20.4,
                    p90_ms: 30.6,
                    max_ms: 41.0,
                },
                "rmc demo: 20 trial(s) in 95 s, all consistent; failover time ms: min 12 p50 20 \
                 p90 31 max 41",
            ),
        ]
    }

    #[test]
    fn human_lines_are_the_documented_ones() {
        for (e, line) in every_event() {
            assert_eq!(e.to_string(), line, "{e:?}");
        }
    }

    #[test]
    fn json_lines_round_trip_and_are_tagged() {
        for (e, _) in every_event() {
            let json = e.to_json();
            assert!(!json.contains('\n'), "{json}");
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert!(v["event"].is_string(), "{json}");
            assert_eq!(Event::parse_line(&json), Some(e.clone()), "{json}");
            assert_eq!(json.parse::<Event>(), Ok(e), "{json}");
        }
    }

    #[test]
    fn json_form_is_stable() {
        assert_eq!(
            Event::StandbyListening {
                transport: Transport::Tcp,
                addr: addr("127.0.0.1:7070"),
                why: "asked for".into(),
            }
            .to_json(),
            r#"{"event":"standby_listening","transport":"tcp","addr":"127.0.0.1:7070","why":"asked for"}"#
        );
        assert_eq!(
            Event::FirstCheckpointAcked.to_json(),
            r#"{"event":"first_checkpoint_acked"}"#
        );
        assert_eq!(
            Event::FailedOver(failed_over()).to_json(),
            r#"{"event":"failed_over","epoch":42,"cause":"Connection closed","detected_ms":3,"resumed_ms":17,"service":"127.0.0.1:7000"}"#
        );
        assert_eq!(
            Event::SessionEnded {
                peer: addr("127.0.0.1:5555"),
                epochs: 3,
                error: None,
                backup: Backup::Consistent { epoch: 2 },
            }
            .to_json(),
            r#"{"event":"session_ended","peer":"127.0.0.1:5555","epochs":3,"error":null,"backup":{"state":"consistent","epoch":2}}"#
        );
    }

    #[test]
    fn backup_epochs() {
        assert_eq!(Backup::NoCheckpoint.epoch(), None);
        for b in [
            Backup::Consistent { epoch: 3 },
            Backup::Stale { epoch: 3 },
            Backup::Released { epoch: 3 },
        ] {
            assert_eq!(b.epoch(), Some(3), "{b}");
        }
    }

    #[test]
    fn other_lines_are_not_events() {
        for line in [
            "",
            "rmc: standby listening on tcp 127.0.0.1:7070 (asked for)",
            "2024-01-01T00:00:00Z  WARN rmc: something",
            r#"{"schema":2,"rows":[]}"#,
            r#"{"event":"no_such_event"}"#,
            r#"{"event":"service_listening","addr":"not an address"}"#,
        ] {
            assert_eq!(Event::parse_line(line), None, "{line}");
        }
        // Leading and trailing white space is fine.
        assert_eq!(
            Event::parse_line("  {\"event\":\"first_checkpoint_acked\"}\r"),
            Some(Event::FirstCheckpointAcked)
        );
    }

    #[test]
    fn warnings_are_the_ones_printed_on_stderr_before() {
        let warnings: Vec<&'static str> = every_event()
            .into_iter()
            .filter(|(e, _)| e.is_warning())
            .map(|(_, l)| l)
            .collect();
        assert_eq!(warnings.len(), 7, "{warnings:#?}");
        assert!(warnings
            .iter()
            .all(|l| l.starts_with("rmc: cannot start protection")
                || l.starts_with("rmc: lost the standby")
                || l.starts_with("rmc: FENCED")
                || l.starts_with("rmc: the arbiter names another primary")
                || l.starts_with("rmc client: INCONSISTENT")));
    }
}
