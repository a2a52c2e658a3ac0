//! When the primary checkpoints: the epoch scheduling policy, sans-I/O.
//!
//! The [`Scheduler`] sees no clock and no guest: the primary's loop feeds it the time, the
//! dirty-page counts it observed and whether a staging slot is free, and asks it what to do
//! ([`Scheduler::poll`]) and when to ask again ([`Scheduler::poll_timeout`]). Between those
//! instants the loop only waits for its events (acks, epochs written: the only things that
//! free a slot), so every decision below is a unit test with made-up instants.
//!
//! ```text
//! full sync : rounds of every dirty page while the guest runs, until a round leaves at most
//!             `sync_threshold` pages dirty, or after `max_sync_rounds`   (sync_round_done)
//! epoch     : runs from the last checkpoint until the first of
//!               - its deadline, `epoch_interval` after it began           Trigger::Deadline
//!               - `max_dirty_pages` dirty, peeked every `dirty_peek`      Trigger::DirtyLimit
//!               - output waiting (the guest sent a packet), once the       Trigger::Output
//!                 epoch ran `OutputTrigger::min_gap` and long enough that
//!                 pauses take at most `max_pause_share` of the guest's time
//!               - a stop request: the last checkpoint                     Trigger::Last
//!             then a checkpoint as soon as a slot is free (none: wait, the guest runs on)
//! drain     : after the last checkpoint, every epoch acknowledged within `drain_timeout`
//! ```
//!
//! ## Why output ends an epoch
//!
//! Output commit holds every packet until the checkpoint taken after it is acknowledged. With
//! fixed epochs a reply waits for the rest of its epoch and then for the ack: half an epoch
//! on average, a whole one at worst. Ending the epoch as soon as output waits makes that wait
//! one checkpoint (pause, transmit, ack: well under a millisecond for a small dirty set), the
//! way COLO answers fast. The price is more checkpoints, so more pauses: the spacing rules
//! bound how much of the guest's time they may take. A guest that sends nothing never
//! triggers one, and `--epoch-ms` stays the longest any epoch runs.

use std::time::{Duration, Instant};

use super::ProtocolError;

/// How often the dirty log is peeked between checkpoints to end an epoch early once
/// `max_dirty_pages` are dirty. A peek harvests the log (a KVM ioctl per memory slot), so this
/// trades the precision of the dirty limit against CPU time taken from the guest.
pub const DIRTY_PEEK_EVERY: Duration = Duration::from_millis(2);
/// The full sync stops after this many rounds even if the guest dirties pages faster than
/// they are sent (what is left goes into the first checkpoint).
pub const MAX_SYNC_ROUNDS: usize = 8;
/// How long the primary waits for the acks of the epochs in flight when protection ends.
pub const ACK_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// When waiting output ends an epoch early ([`Trigger::Output`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputTrigger {
    /// An output-triggered checkpoint starts at least this long after the previous
    /// checkpoint started.
    pub min_gap: Duration,
    /// ... and no sooner than the previous pause divided by this share (in (0, 1]), so
    /// output-triggered pauses take at most this share of the guest's time however long a
    /// pause gets (a guest that dirties more pauses longer and is checkpointed less often).
    pub max_pause_share: f64,
}

impl Default for OutputTrigger {
    /// The defaults chosen by measurement (`rmc bench --reply`, see the README).
    fn default() -> Self {
        OutputTrigger {
            min_gap: DEFAULT_OUTPUT_MIN_GAP,
            max_pause_share: DEFAULT_MAX_PAUSE_SHARE,
        }
    }
}

impl OutputTrigger {
    /// How long after the start of the previous checkpoint, whose pause took `last_pause`,
    /// output may end the epoch.
    pub fn gap(&self, last_pause: Duration) -> Duration {
        let share = self.max_pause_share.clamp(1e-3, 1.0);
        self.min_gap.max(last_pause.div_f64(share))
    }
}

/// Default [`OutputTrigger::min_gap`]: none. Measured (`rmc bench --part reply`, README): any
/// gap adds to every reply of a one-request-at-a-time client about what it is long, and the
/// pause share below already spaces checkpoints under streaming output.
pub const DEFAULT_OUTPUT_MIN_GAP: Duration = Duration::from_micros(0);
/// Default [`OutputTrigger::max_pause_share`]: half. Measured: the same reply latency as no
/// bound for one request at a time (a reply takes longer than a pause anyway), more replies
/// per second under streaming output (fewer, fuller checkpoints), and a CPU-bound guest never
/// paused more than half the time; a quarter doubles the added latency.
pub const DEFAULT_MAX_PAUSE_SHARE: f64 = 0.5;

/// The scheduling policy's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulePolicy {
    /// Time between checkpoints.
    pub epoch_interval: Duration,
    /// End an epoch early once this many pages are dirty.
    pub max_dirty_pages: usize,
    /// How often to peek at the dirty log during an epoch ([`DIRTY_PEEK_EVERY`]); `None`:
    /// never while the guest runs, so `max_dirty_pages` does not end epochs (see
    /// [`SchedulePolicy::without_dirty_peek`]).
    pub dirty_peek: Option<Duration>,
    /// A full-sync round that leaves at most this many pages dirty is the last one.
    pub sync_threshold: usize,
    /// Full-sync rounds at most ([`MAX_SYNC_ROUNDS`]).
    pub max_sync_rounds: usize,
    /// How long to wait for the last acks ([`ACK_DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
    /// End an epoch early when output waits (`None`: only deadline and dirty limit).
    pub output: Option<OutputTrigger>,
}

impl SchedulePolicy {
    /// The policy of a primary with these settings and slots of `slot_pages` pages: a sync
    /// round is the last once at most `max_dirty_pages` and at most half a slot are dirty.
    pub fn new(epoch_interval: Duration, max_dirty_pages: usize, slot_pages: usize) -> Self {
        SchedulePolicy {
            epoch_interval,
            max_dirty_pages,
            dirty_peek: Some(DIRTY_PEEK_EVERY),
            sync_threshold: max_dirty_pages.min(slot_pages / 2).max(1),
            max_sync_rounds: MAX_SYNC_ROUNDS,
            drain_timeout: ACK_DRAIN_TIMEOUT,
            output: None,
        }
    }

    /// Never peek at the dirty log while the guest runs: epochs end by time or output only,
    /// and the dirty log is read while the guest is paused. For platforms where reading it
    /// under a running guest is not safe (see `PrimaryConfig::live_dirty_reads`).
    pub fn without_dirty_peek(mut self) -> Self {
        self.dirty_peek = None;
        self
    }

    /// The same, with output ending epochs early by `trigger` (`None`: never).
    pub fn with_output(mut self, trigger: Option<OutputTrigger>) -> Self {
        self.output = trigger;
        self
    }
}

/// Why a checkpoint is taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The epoch reached its deadline.
    Deadline,
    /// The epoch dirtied `max_dirty_pages` before its deadline.
    DirtyLimit,
    /// The guest has output waiting for a checkpoint ([`OutputTrigger`]).
    Output,
    /// Protection ends: the last checkpoint, after which the guest stays paused.
    Last,
}

/// What the primary does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Take a checkpoint now (a slot is free), then call [`Scheduler::checkpoint_taken`].
    Checkpoint(Trigger),
    /// Peek at the dirty log and report the epoch's dirty pages so far with
    /// [`Scheduler::dirty_observed`].
    PeekDirty,
    /// Nothing to do before [`Scheduler::poll_timeout`] or the next event (an ack, an epoch
    /// written: what frees a slot).
    Wait,
}

/// What the full sync does after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStep {
    /// Send the pages dirtied meanwhile in another round.
    Another,
    /// Stop: what is still dirty goes into the first checkpoint.
    Done,
}

/// The primary's epoch scheduler (see the module docs).
#[derive(Debug)]
pub struct Scheduler {
    policy: SchedulePolicy,
    epoch_start: Instant,
    next_peek: Option<Instant>,
    dirty: usize,
    /// Output waits for a checkpoint (reported by [`Scheduler::output_waiting`]).
    output: bool,
    /// The previous checkpoint's pause (spaces output-triggered checkpoints).
    last_pause: Duration,
    last: bool,
    /// A checkpoint is due but no slot is free: nothing is due until an event frees one.
    awaiting_slot: bool,
    drain_deadline: Option<Instant>,
}

impl Scheduler {
    /// A scheduler whose first epoch begins at `now`.
    pub fn new(policy: SchedulePolicy, now: Instant) -> Self {
        Scheduler {
            policy,
            epoch_start: now,
            next_peek: policy.dirty_peek.map(|p| now + p),
            dirty: 0,
            output: false,
            last_pause: Duration::ZERO,
            last: false,
            awaiting_slot: false,
            drain_deadline: None,
        }
    }

    /// Its policy.
    pub fn policy(&self) -> &SchedulePolicy {
        &self.policy
    }

    /// After full-sync round `round` (from 0) the guest had dirtied `dirtied` pages: whether
    /// to send them in another round.
    pub fn sync_round_done(&self, round: usize, dirtied: usize) -> SyncStep {
        if dirtied <= self.policy.sync_threshold || round + 1 >= self.policy.max_sync_rounds {
            SyncStep::Done
        } else {
            SyncStep::Another
        }
    }

    /// Protection is to end: the next checkpoint is the last, taken as soon as a slot is free.
    pub fn stop(&mut self) {
        self.last = true;
    }

    /// What to do at `now`; `slot_free`: a staging slot can be taken.
    pub fn poll(&mut self, now: Instant, slot_free: bool) -> Step {
        let due = if self.last {
            Some(Trigger::Last)
        } else if now >= self.epoch_start + self.policy.epoch_interval {
            Some(Trigger::Deadline)
        } else if self.dirty >= self.policy.max_dirty_pages {
            Some(Trigger::DirtyLimit)
        } else if self.output_due().is_some_and(|t| now >= t) {
            Some(Trigger::Output)
        } else {
            None
        };
        self.awaiting_slot = false;
        match due {
            Some(why) if slot_free => Step::Checkpoint(why),
            // The standby is slow: the guest keeps running and the epoch gets longer.
            Some(_) => {
                self.awaiting_slot = true;
                Step::Wait
            }
            None if self.next_peek.is_some_and(|p| now >= p) => Step::PeekDirty,
            None => Step::Wait,
        }
    }

    /// The epoch has `pages` dirty pages so far (all its peeks together), seen at `now`.
    pub fn dirty_observed(&mut self, pages: usize, now: Instant) {
        self.dirty = pages;
        self.next_peek = self.policy.dirty_peek.map(|p| now + p);
    }

    /// The guest has output waiting for a checkpoint not taken yet (the output-triggered
    /// checkpoint comes once the spacing allows; ignored without an [`OutputTrigger`]).
    pub fn output_waiting(&mut self) {
        self.output = true;
    }

    /// When output may end this epoch, if it waits and the policy lets it.
    fn output_due(&self) -> Option<Instant> {
        let trigger = self.policy.output.as_ref()?;
        self.output
            .then(|| self.epoch_start + trigger.gap(self.last_pause))
    }

    /// The standby acknowledged a checkpoint at `now`: peek at the dirty log now rather than
    /// at the next peek period. An ack is when the standby has room for the next epoch, so
    /// an epoch whose dirty limit was reached meanwhile ends without waiting out the period
    /// (with `--epoch-ms 0` and a few hundred pages per epoch this is worth ~15% more
    /// checkpoints per second).
    pub fn acked(&mut self, now: Instant) {
        self.next_peek = self.next_peek.map(|p| p.min(now));
    }

    /// A checkpoint was taken (its pause began at `now`): the next epoch begins, and the
    /// output waiting so far is the checkpoint's.
    pub fn checkpoint_taken(&mut self, now: Instant) {
        self.epoch_start = now;
        self.next_peek = self.policy.dirty_peek.map(|p| now + p);
        self.dirty = 0;
        self.output = false;
        self.awaiting_slot = false;
    }

    /// The checkpoint's pause took `pause` (spaces the output-triggered checkpoints).
    pub fn paused_for(&mut self, pause: Duration) {
        self.last_pause = pause;
    }

    /// The last checkpoint is out (at `now`): from now on only its acks are awaited, until
    /// [`SchedulePolicy::drain_timeout`].
    pub fn start_drain(&mut self, now: Instant) {
        self.drain_deadline = Some(now + self.policy.drain_timeout);
    }

    /// Whether every epoch is acknowledged (`in_flight` are not) at `now`: `Ok(false)` while
    /// some may still be, an error once the drain deadline passed.
    ///
    /// # Panics
    /// Before [`Scheduler::start_drain`] (a bug in the caller).
    pub fn drained(&self, now: Instant, in_flight: usize) -> Result<bool, ProtocolError> {
        let deadline = self.drain_deadline.expect("drained() before start_drain()");
        if in_flight == 0 {
            return Ok(true);
        }
        if now > deadline {
            return Err(ProtocolError::AcksOverdue {
                epochs: in_flight,
                within: self.policy.drain_timeout,
            });
        }
        Ok(false)
    }

    /// The next instant [`Scheduler::poll`] (or, draining, [`Scheduler::drained`]) has
    /// something new to say, if nothing else happens: the epoch's deadline, its next dirty
    /// peek or when waiting output may end it, or the drain deadline. `None` while only an event can change anything (a
    /// checkpoint waits for a slot). The caller waits for its events until then, or until its
    /// connection's own timers ([`super::PrimaryCore::poll_timeout`]), whichever is first.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let Some(d) = self.drain_deadline {
            return Some(d + Duration::from_nanos(1));
        }
        if self.awaiting_slot || self.last {
            return None;
        }
        let dirty = if self.dirty >= self.policy.max_dirty_pages {
            Some(self.epoch_start)
        } else {
            self.next_peek
        };
        let due = earliest(Some(self.epoch_start + self.policy.epoch_interval), dirty);
        earliest(due, self.output_due())
    }
}

/// The earlier of two optional instants (`None`: never).
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Heartbeat, PrimaryCore};

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> SchedulePolicy {
        SchedulePolicy::new(20 * MS, 100, 1024)
    }

    #[test]
    fn without_dirty_peeks_only_time_and_output_end_an_epoch() {
        let t0 = Instant::now();
        let policy = policy()
            .with_output(Some(OutputTrigger {
                min_gap: 5 * MS,
                max_pause_share: 1.0,
            }))
            .without_dirty_peek();
        let mut s = Scheduler::new(policy, t0);
        assert_eq!(s.poll_timeout(), Some(t0 + 20 * MS), "no peek timer");
        s.acked(t0 + MS);
        assert_eq!(s.poll(t0 + MS, true), Step::Wait, "an ack brings no peek");
        assert_eq!(s.poll(t0 + 19 * MS, true), Step::Wait);
        assert_eq!(
            s.poll(t0 + 20 * MS, true),
            Step::Checkpoint(Trigger::Deadline)
        );
        let t1 = t0 + 20 * MS;
        s.checkpoint_taken(t1);
        s.output_waiting();
        assert_eq!(s.poll_timeout(), Some(t1 + 5 * MS));
        assert_eq!(s.poll(t1 + 5 * MS, true), Step::Checkpoint(Trigger::Output));
    }

    #[test]
    fn an_ack_brings_the_next_peek_forward() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(policy(), t0);
        let t1 = t0 + DIRTY_PEEK_EVERY / 4;
        assert_eq!(s.poll(t1, true), Step::Wait);
        s.acked(t1);
        assert_eq!(s.poll_timeout(), Some(t1));
        assert_eq!(s.poll(t1, true), Step::PeekDirty);
        s.dirty_observed(100, t1);
        assert_eq!(s.poll(t1, true), Step::Checkpoint(Trigger::DirtyLimit));
        // An ack never delays a peek that is due sooner.
        s.checkpoint_taken(t1);
        s.acked(t1 + DIRTY_PEEK_EVERY * 2);
        assert_eq!(s.poll_timeout(), Some(t1 + DIRTY_PEEK_EVERY));
    }

    #[test]
    fn a_checkpoint_at_the_epoch_deadline_with_peeks_meanwhile() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(policy(), t0);
        // Nothing before the first peek; that is when to wake up.
        assert_eq!(s.poll(t0, true), Step::Wait);
        assert_eq!(s.poll_timeout(), Some(t0 + DIRTY_PEEK_EVERY));
        let mut peeks = 0;
        let t = loop {
            let t = s
                .poll_timeout()
                .expect("a timer is always set during an epoch");
            match s.poll(t, true) {
                Step::PeekDirty => {
                    peeks += 1;
                    s.dirty_observed(10 * peeks, t);
                }
                Step::Checkpoint(why) => {
                    assert_eq!(why, Trigger::Deadline);
                    break t;
                }
                Step::Wait => panic!("woken up for nothing at {:?}", t - t0),
            }
        };
        assert_eq!(t, t0 + 20 * MS);
        assert_eq!(peeks, 9, "a peek every 2 ms before the 20 ms deadline");
        // The next epoch runs from the checkpoint.
        s.checkpoint_taken(t);
        assert_eq!(s.poll(t, true), Step::Wait);
        assert_eq!(s.poll_timeout(), Some(t + DIRTY_PEEK_EVERY));
        assert_eq!(
            s.poll(t + 20 * MS, true),
            Step::Checkpoint(Trigger::Deadline)
        );
    }

    #[test]
    fn reaching_the_dirty_limit_ends_the_epoch_early() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(policy(), t0);
        assert_eq!(s.poll(t0 + 2 * MS, true), Step::PeekDirty);
        s.dirty_observed(99, t0 + 2 * MS);
        assert_eq!(s.poll(t0 + 4 * MS, true), Step::PeekDirty);
        s.dirty_observed(100, t0 + 4 * MS);
        // Due at once, long before the deadline.
        assert!(s.poll_timeout().unwrap() <= t0 + 4 * MS);
        assert_eq!(
            s.poll(t0 + 4 * MS, true),
            Step::Checkpoint(Trigger::DirtyLimit)
        );
        s.checkpoint_taken(t0 + 5 * MS);
        // The count starts again with the new epoch.
        assert_eq!(s.poll(t0 + 6 * MS, true), Step::Wait);
        assert_eq!(s.poll(t0 + 7 * MS, true), Step::PeekDirty);
    }

    #[test]
    fn no_checkpoint_while_no_slot_is_free() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(policy(), t0);
        let late = t0 + 25 * MS;
        assert_eq!(s.poll(late, false), Step::Wait);
        // Only an event (an ack, an epoch written) can free a slot: no timer, no peeking.
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll(late + 5 * MS, false), Step::Wait);
        assert_eq!(
            s.poll(late + 6 * MS, true),
            Step::Checkpoint(Trigger::Deadline)
        );
        // The last checkpoint waits for a slot too.
        s.checkpoint_taken(late + 6 * MS);
        s.stop();
        assert_eq!(s.poll(late + 7 * MS, false), Step::Wait);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll(late + 8 * MS, true), Step::Checkpoint(Trigger::Last));
    }

    #[test]
    fn a_stop_makes_the_next_checkpoint_the_last_without_waiting() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(policy(), t0);
        s.stop();
        assert_eq!(s.poll(t0 + MS, true), Step::Checkpoint(Trigger::Last));
    }

    fn with_output(min_gap: Duration, max_pause_share: f64) -> SchedulePolicy {
        policy().with_output(Some(OutputTrigger {
            min_gap,
            max_pause_share,
        }))
    }

    #[test]
    fn waiting_output_ends_the_epoch_at_once() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(with_output(Duration::ZERO, 1.0), t0);
        let t1 = t0 + MS / 2;
        assert_eq!(s.poll(t1, true), Step::Wait);
        s.output_waiting();
        // Due now: the loop that reported it polls at once.
        assert_eq!(s.poll_timeout(), Some(t0));
        assert_eq!(s.poll(t1, true), Step::Checkpoint(Trigger::Output));
        // The checkpoint takes the output with it: the next epoch runs to its deadline.
        s.checkpoint_taken(t1);
        s.paused_for(MS / 5);
        assert_eq!(s.poll(t1 + MS, true), Step::Wait);
        assert_eq!(s.poll_timeout(), Some(t1 + DIRTY_PEEK_EVERY));
        assert_eq!(
            s.poll(t1 + 20 * MS, true),
            Step::Checkpoint(Trigger::Deadline)
        );
    }

    #[test]
    fn output_waits_for_the_minimum_gap_after_the_last_checkpoint() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(with_output(MS, 1.0), t0);
        s.checkpoint_taken(t0);
        s.paused_for(MS / 10);
        s.output_waiting();
        // Not before 1 ms after the previous checkpoint began, and that is when to wake.
        assert_eq!(s.poll(t0 + MS / 10, true), Step::Wait);
        assert_eq!(s.poll_timeout(), Some(t0 + MS));
        assert_eq!(s.poll(t0 + MS - Duration::from_nanos(1), true), Step::Wait);
        assert_eq!(s.poll(t0 + MS, true), Step::Checkpoint(Trigger::Output));
    }

    #[test]
    fn long_pauses_space_output_checkpoints_to_their_share_of_time() {
        let t0 = Instant::now();
        // Pauses may take a quarter of the guest's time: a 400 us pause, 1.6 ms apart.
        let mut s = Scheduler::new(with_output(MS / 2, 0.25), t0);
        s.checkpoint_taken(t0);
        s.paused_for(Duration::from_micros(400));
        s.output_waiting();
        assert_eq!(s.poll(t0 + MS, true), Step::Wait);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_micros(1600)));
        assert_eq!(
            s.poll(t0 + Duration::from_micros(1600), true),
            Step::Checkpoint(Trigger::Output)
        );
        // Short pauses: the minimum gap is what counts.
        let t1 = t0 + 2 * MS;
        s.checkpoint_taken(t1);
        s.paused_for(Duration::from_micros(50));
        s.output_waiting();
        assert_eq!(s.poll_timeout(), Some(t1 + MS / 2));
        // And the trigger's gap never exceeds the epoch's deadline: that still ends it.
        let t2 = t1 + MS;
        s.checkpoint_taken(t2);
        s.paused_for(Duration::from_secs(1));
        s.output_waiting();
        assert_eq!(s.poll_timeout(), Some(t2 + DIRTY_PEEK_EVERY));
        assert_eq!(
            s.poll(t2 + 20 * MS, true),
            Step::Checkpoint(Trigger::Deadline)
        );
        let trigger = OutputTrigger {
            min_gap: Duration::ZERO,
            max_pause_share: 0.0,
        };
        assert_eq!(
            trigger.gap(MS),
            Duration::from_secs(1),
            "share clamped to 0.1%"
        );
    }

    #[test]
    fn output_is_ignored_without_the_trigger() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(policy(), t0);
        s.output_waiting();
        assert_eq!(s.poll(t0 + MS, true), Step::Wait);
        assert_eq!(s.poll_timeout(), Some(t0 + DIRTY_PEEK_EVERY));
        assert_eq!(
            s.poll(t0 + 20 * MS, true),
            Step::Checkpoint(Trigger::Deadline)
        );
    }

    #[test]
    fn an_output_checkpoint_waits_for_a_free_slot_and_yields_to_the_deadline() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(with_output(Duration::ZERO, 1.0), t0);
        s.output_waiting();
        assert_eq!(s.poll(t0 + MS, false), Step::Wait);
        assert_eq!(s.poll_timeout(), None, "only an event frees a slot");
        assert_eq!(s.poll(t0 + 2 * MS, true), Step::Checkpoint(Trigger::Output));
        // Deadline, dirty limit and stop come first when they are due too.
        s.output_waiting();
        assert_eq!(
            s.poll(t0 + 20 * MS, true),
            Step::Checkpoint(Trigger::Deadline)
        );
        s.dirty_observed(100, t0 + MS);
        assert_eq!(s.poll(t0 + MS, true), Step::Checkpoint(Trigger::DirtyLimit));
        s.stop();
        assert_eq!(s.poll(t0 + MS, true), Step::Checkpoint(Trigger::Last));
    }

    #[test]
    fn sync_rounds_go_on_until_few_pages_are_left_or_the_rounds_run_out() {
        // Threshold: the dirty limit (100) or half a slot (512), the smaller.
        let s = Scheduler::new(policy(), Instant::now());
        assert_eq!(s.policy().sync_threshold, 100);
        assert_eq!(s.sync_round_done(0, 5000), SyncStep::Another);
        assert_eq!(s.sync_round_done(1, 101), SyncStep::Another);
        assert_eq!(s.sync_round_done(2, 100), SyncStep::Done);
        assert_eq!(s.sync_round_done(6, 5000), SyncStep::Another);
        assert_eq!(s.sync_round_done(MAX_SYNC_ROUNDS - 1, 5000), SyncStep::Done);
        let small_slots = SchedulePolicy::new(20 * MS, 100_000, 64);
        assert_eq!(small_slots.sync_threshold, 32);
        assert_eq!(SchedulePolicy::new(20 * MS, 0, 1).sync_threshold, 1);
    }

    #[test]
    fn draining_acks_times_out() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(policy(), t0);
        s.stop();
        s.checkpoint_taken(t0);
        s.start_drain(t0);
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + ACK_DRAIN_TIMEOUT + Duration::from_nanos(1))
        );
        assert_eq!(s.drained(t0 + MS, 2), Ok(false));
        assert_eq!(s.drained(t0 + ACK_DRAIN_TIMEOUT, 1), Ok(false));
        assert_eq!(s.drained(t0 + ACK_DRAIN_TIMEOUT, 0), Ok(true));
        let err = s
            .drained(s.poll_timeout().unwrap(), 2)
            .expect_err("acks overdue");
        assert_eq!(
            err,
            ProtocolError::AcksOverdue {
                epochs: 2,
                within: ACK_DRAIN_TIMEOUT
            }
        );
        assert_eq!(
            err.to_string(),
            "The standby did not acknowledge the last 2 epochs within 10s"
        );
    }

    /// The connection's timers the primary's loop waits for besides the scheduler's: the next
    /// heartbeat to send and the standby's silence.
    #[test]
    fn heartbeat_due_and_silence_detected_at_the_poll_timeout() {
        let t0 = Instant::now();
        let hb = Heartbeat {
            interval: 100 * MS,
            timeout: 250 * MS,
        };
        let (mut p, _) = crate::protocol::tests::established_primary(hb, t0);
        let mut s = Scheduler::new(SchedulePolicy::new(Duration::from_secs(1), 100, 1024), t0);
        s.stop();
        assert_eq!(s.poll(t0, false), Step::Wait);
        // Waiting for a slot: only the connection's timers are due.
        let wake =
            |p: &PrimaryCore<u32>, s: &Scheduler| earliest(p.poll_timeout(), s.poll_timeout());
        let t = wake(&p, &s).unwrap();
        assert_eq!(t, t0 + 100 * MS);
        assert_eq!(
            p.tick(t).unwrap(),
            Some(rmc_transport::wire::Message::Heartbeat { seq: 1 })
        );
        let t = wake(&p, &s).unwrap();
        assert_eq!(t, t0 + 200 * MS);
        assert!(p.tick(t).unwrap().is_some());
        // Nothing heard since t0: the silence is due right after the timeout.
        let t = wake(&p, &s).unwrap();
        assert_eq!(t, t0 + 250 * MS + Duration::from_nanos(1));
        assert!(matches!(
            p.tick(t),
            Err(ProtocolError::PeerSilent {
                peer: "standby",
                ..
            })
        ));
        // Not a moment before.
        let (mut p, _) = crate::protocol::tests::established_primary(hb, t0);
        assert!(p.tick(t0 + 250 * MS).is_ok());
    }
}
