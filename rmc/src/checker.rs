//! The consistency checker of the counter service: fed every request sent and every reply
//! received (by every client, from every server), it finds replies that contradict each other
//! or the service's rules: a failover that lost acknowledged state, two primaries answering,
//! a counter handed out twice. `rmc demo`, `rmc client` and the failover tests rely on it.

use std::collections::HashMap;

use rmc_vmm::guest::{STATUS_OK, STATUS_STALE};
use rmc_vmm::service::Reply;

/// A reply that contradicts an earlier one, or the service's rules.
///
/// Its JSON form (in [`crate::events::Event`]) is tagged by `"kind"`: `repeat_differs`,
/// `not_rising`, `behind_seen`, `handed_out_twice`, `not_by_one`, `status`, `unexpected`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Inconsistency {
    /// A repeat of a seq got a different answer.
    #[error(
        "client {client_id:#x} seq {seq} was answered with counter {first} and later with {again}"
    )]
    RepeatDiffers {
        /// The client.
        client_id: u64,
        /// The seq.
        seq: u64,
        /// First answer.
        first: u64,
        /// Later answer.
        again: u64,
    },
    /// The counter did not rise across two of this client's new requests.
    #[error(
        "client {client_id:#x} seq {seq} got counter {counter}, but its earlier seq {prev_seq} \
         already got {prev}"
    )]
    NotRising {
        /// The client.
        client_id: u64,
        /// The seq.
        seq: u64,
        /// Its counter.
        counter: u64,
        /// Previous seq.
        prev_seq: u64,
        /// Its counter.
        prev: u64,
    },
    /// A request first sent after some client had received counter `seen` got a counter not
    /// above it: the service went back in time (a rollback that a client could see).
    #[error(
        "client {client_id:#x} seq {seq} got counter {counter}, but it was sent after a reply \
         with counter {seen} had been received: the service went back in time"
    )]
    BehindSeen {
        /// The client.
        client_id: u64,
        /// The seq.
        seq: u64,
        /// Its counter.
        counter: u64,
        /// The highest counter any client had received when the seq was first sent.
        seen: u64,
    },
    /// One counter value was handed to two different requests.
    #[error(
        "counter {counter} was handed to client {first_client:#x} seq {first_seq} and to \
         client {client_id:#x} seq {seq}"
    )]
    HandedOutTwice {
        /// The counter.
        counter: u64,
        /// The first request that got it.
        first_client: u64,
        /// Its seq.
        first_seq: u64,
        /// The second request that got it.
        client_id: u64,
        /// Its seq.
        seq: u64,
    },
    /// With no other client, the counter must rise by exactly one per new request.
    #[error(
        "client {client_id:#x} seq {seq} got counter {counter}, expected {expected} (the only \
         client)"
    )]
    NotByOne {
        /// The client.
        client_id: u64,
        /// The seq.
        seq: u64,
        /// Its counter.
        counter: u64,
        /// Expected.
        expected: u64,
    },
    /// The service answered with an error status (a `STATUS_STALE` is an error only for a seq
    /// that is still the client's newest).
    #[error("client {client_id:#x} seq {seq} was answered with status {status}")]
    Status {
        /// The client.
        client_id: u64,
        /// The seq.
        seq: u64,
        /// Status.
        status: u32,
    },
    /// A reply for a client that is not checked here, or for a seq never sent.
    #[error("reply for client {client_id:#x} seq {seq} does not match any request sent")]
    Unexpected {
        /// Client in the reply.
        client_id: u64,
        /// Seq in the reply.
        seq: u64,
    },
}

/// Checks the replies of every client of one counter service together, against each other
/// and against the service's rules (see [`crate::guest`]): one global counter, raised by one
/// for each new request, whose value the reply carries; a repeat gets the same reply again.
///
/// Output commit makes those rules hold across a failover, as seen from outside, so this is
/// the check the failover tests and `rmc demo` rely on. A reply breaks it when
/// - a repeated seq gets another counter ([`Inconsistency::RepeatDiffers`]);
/// - a client's counters do not rise with its seqs ([`Inconsistency::NotRising`]);
/// - a request first sent after any client had received counter `c` gets a counter `<= c`
///   ([`Inconsistency::BehindSeen`]): the real-time order every client can observe;
/// - a counter is handed to two different requests ([`Inconsistency::HandedOutTwice`]);
/// - with `exclusive` (one client only), the counter does not rise by exactly one per new
///   request ([`Inconsistency::NotByOne`]);
/// - the status is an error, or the reply matches no request sent.
///
/// Every reply counts, whichever address it came from and however late it arrives (after its
/// request was answered, after the last request): callers feed all of them. Several clients
/// share one checker (behind a lock, see [`SharedChecker`]); each sends one request at a time.
#[derive(Debug, Default)]
pub struct Checker {
    exclusive: bool,
    clients: HashMap<u64, ClientLog>,
    /// Counter value -> the (client, seq) that got it.
    owners: HashMap<u64, (u64, u64)>,
    /// The highest counter in any reply received so far.
    seen: u64,
    replies: u64,
    repeats: u64,
    stale_duplicates: u64,
    violations: Vec<Inconsistency>,
    violation_count: u64,
}

/// A checker shared by the threads of several concurrent clients.
pub type SharedChecker = std::sync::Arc<parking_lot::Mutex<Checker>>;

#[derive(Debug, Default)]
struct ClientLog {
    sent_up_to: u64,
    /// Seq -> the highest counter any client had received when the seq was first sent.
    floor: HashMap<u64, u64>,
    answers: HashMap<u64, u64>,
    highest: Option<(u64, u64)>,
    /// Seqs answered only after a resend.
    needed_resend: u64,
    resends: u64,
}

/// What a checker saw, over all its clients.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckSummary {
    /// Clients checked.
    pub clients: usize,
    /// Distinct requests (client, seq) sent.
    pub requests: u64,
    /// Distinct requests answered.
    pub answered: u64,
    /// Requests sent and never answered.
    pub unanswered: u64,
    /// Requests that needed a resend: the request or its reply was lost (held on a primary
    /// that died, say), or slower than the resend interval.
    pub needed_resend: u64,
    /// Datagrams sent again after a timeout.
    pub resends: u64,
    /// Replies received, all of them.
    pub replies: u64,
    /// Replies to a request answered before (late duplicates and answers to resends).
    pub repeats: u64,
    /// `STATUS_STALE` answers to a resend of an older seq that arrived after a newer one.
    pub stale_duplicates: u64,
    /// Contradictions found (the first few are kept in [`Checker::violations`]).
    pub violations: u64,
}

impl Checker {
    /// A checker. With `exclusive`, only one client uses the service, so each of its new
    /// requests must raise the counter by exactly one.
    pub fn new(exclusive: bool) -> Self {
        Checker {
            exclusive,
            ..Checker::default()
        }
    }

    /// The same checker, to be shared by several clients' threads.
    pub fn shared(exclusive: bool) -> SharedChecker {
        std::sync::Arc::new(parking_lot::Mutex::new(Checker::new(exclusive)))
    }

    /// Records that `client_id` sent `seq` (call before the first transmission). A new seq is
    /// placed in real time after every reply received so far.
    pub fn sent(&mut self, client_id: u64, seq: u64) {
        let seen = self.seen;
        let c = self.clients.entry(client_id).or_default();
        c.sent_up_to = c.sent_up_to.max(seq);
        c.floor.entry(seq).or_insert(seen);
    }

    /// Records that `seq` of `client_id` was sent `n` more times after its first transmission.
    pub fn resent(&mut self, client_id: u64, seq: u64, n: u64) {
        if n == 0 {
            return;
        }
        let c = self.clients.entry(client_id).or_default();
        c.resends += n;
        if c.answers.contains_key(&seq) || c.floor.contains_key(&seq) {
            c.needed_resend += 1;
        }
    }

    /// Checks one received reply. Returns true the first time its request is answered. A
    /// contradiction is also kept (see [`Checker::violations`]).
    pub fn check(&mut self, r: &Reply) -> Result<bool, Inconsistency> {
        self.replies += 1;
        let result = self.check_one(r);
        if let Err(e) = &result {
            self.violation_count += 1;
            if self.violations.len() < 100 {
                self.violations.push(e.clone());
            }
        }
        result
    }

    fn check_one(&mut self, r: &Reply) -> Result<bool, Inconsistency> {
        let (client_id, seq) = (r.client_id, r.seq);
        let Some(c) = self
            .clients
            .get_mut(&client_id)
            .filter(|c| seq != 0 && c.floor.contains_key(&seq))
        else {
            return Err(Inconsistency::Unexpected { client_id, seq });
        };
        if r.status == STATUS_STALE && seq < c.sent_up_to {
            // A resend of an older seq overtaken by a newer request: the service rightly
            // refuses to apply it again.
            self.stale_duplicates += 1;
            return Ok(false);
        }
        if r.status != STATUS_OK {
            return Err(Inconsistency::Status {
                client_id,
                seq,
                status: r.status,
            });
        }
        if let Some(&first) = c.answers.get(&seq) {
            self.repeats += 1;
            return if first == r.counter {
                Ok(false)
            } else {
                Err(Inconsistency::RepeatDiffers {
                    client_id,
                    seq,
                    first,
                    again: r.counter,
                })
            };
        }
        let floor = c.floor[&seq];
        if r.counter <= floor {
            return Err(Inconsistency::BehindSeen {
                client_id,
                seq,
                counter: r.counter,
                seen: floor,
            });
        }
        if let Some((prev_seq, prev)) = c.highest {
            // Requests go out one at a time, so a new answer is for a seq above every earlier
            // one of this client.
            if seq < prev_seq || r.counter <= prev {
                return Err(Inconsistency::NotRising {
                    client_id,
                    seq,
                    counter: r.counter,
                    prev_seq,
                    prev,
                });
            }
            if self.exclusive && r.counter != prev + (seq - prev_seq) {
                return Err(Inconsistency::NotByOne {
                    client_id,
                    seq,
                    counter: r.counter,
                    expected: prev + (seq - prev_seq),
                });
            }
        }
        if let Some(&(first_client, first_seq)) = self.owners.get(&r.counter) {
            return Err(Inconsistency::HandedOutTwice {
                counter: r.counter,
                first_client,
                first_seq,
                client_id,
                seq,
            });
        }
        self.owners.insert(r.counter, (client_id, seq));
        c.answers.insert(seq, r.counter);
        c.highest = Some((seq, r.counter));
        self.seen = self.seen.max(r.counter);
        Ok(true)
    }

    /// The contradictions found so far (at most the first 100).
    pub fn violations(&self) -> &[Inconsistency] {
        &self.violations
    }

    /// What was seen so far.
    pub fn summary(&self) -> CheckSummary {
        let mut s = CheckSummary {
            clients: self.clients.len(),
            replies: self.replies,
            repeats: self.repeats,
            stale_duplicates: self.stale_duplicates,
            violations: self.violation_count,
            ..CheckSummary::default()
        };
        for c in self.clients.values() {
            s.requests += c.floor.len() as u64;
            s.answered += c.answers.len() as u64;
            s.needed_resend += c.needed_resend;
            s.resends += c.resends;
        }
        s.unanswered = s.requests - s.answered;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(seq: u64, counter: u64) -> Reply {
        Reply {
            status: STATUS_OK,
            client_id: 7,
            seq,
            counter,
        }
    }

    fn from(client_id: u64, seq: u64, counter: u64) -> Reply {
        Reply {
            client_id,
            ..reply(seq, counter)
        }
    }

    /// `c` sends seqs `1..=n` of client 7.
    fn sent(c: &mut Checker, n: u64) {
        for seq in 1..=n {
            c.sent(7, seq);
        }
    }

    #[test]
    fn checker_accepts_consistent_history() {
        let mut c = Checker::new(true);
        c.sent(7, 1);
        assert_eq!(c.check(&reply(1, 10)), Ok(true));
        assert_eq!(c.check(&reply(1, 10)), Ok(false));
        c.sent(7, 2);
        c.resent(7, 2, 2);
        assert_eq!(c.check(&reply(2, 11)), Ok(true));
        c.sent(7, 3);
        assert_eq!(c.check(&reply(3, 12)), Ok(true));
        // Late duplicates of older seqs: the same answer, or STALE for a resend overtaken by a
        // newer request.
        assert_eq!(c.check(&reply(2, 11)), Ok(false));
        let mut stale = reply(2, 0);
        stale.status = STATUS_STALE;
        assert_eq!(c.check(&stale), Ok(false));
        c.sent(7, 4);
        let s = c.summary();
        assert_eq!(
            s,
            CheckSummary {
                clients: 1,
                requests: 4,
                answered: 3,
                unanswered: 1,
                needed_resend: 1,
                resends: 2,
                replies: 6,
                repeats: 2,
                stale_duplicates: 1,
                violations: 0,
            }
        );
        assert!(c.violations().is_empty());
    }

    #[test]
    fn checker_catches_each_inconsistency_of_one_client() {
        let mut c = Checker::new(true);
        sent(&mut c, 5);
        c.check(&reply(1, 10)).unwrap();
        assert!(matches!(
            c.check(&reply(1, 11)),
            Err(Inconsistency::RepeatDiffers {
                seq: 1,
                first: 10,
                again: 11,
                ..
            })
        ));
        assert!(matches!(
            c.check(&reply(2, 12)),
            Err(Inconsistency::NotByOne {
                seq: 2,
                expected: 11,
                ..
            })
        ));
        assert!(matches!(
            c.check(&reply(9, 11)),
            Err(Inconsistency::Unexpected { seq: 9, .. })
        ));
        assert!(matches!(
            c.check(&from(8, 1, 11)),
            Err(Inconsistency::Unexpected { client_id: 8, .. })
        ));
        let mut bad = reply(2, 11);
        bad.status = 2;
        assert!(matches!(
            c.check(&bad),
            Err(Inconsistency::Status { status: 2, .. })
        ));
        // STALE for the client's newest seq: the service claims a newer request it never got.
        let mut stale = reply(5, 0);
        stale.status = STATUS_STALE;
        assert!(matches!(
            c.check(&stale),
            Err(Inconsistency::Status { seq: 5, .. })
        ));
        // Counters going down across a client's own requests.
        let mut shared = Checker::new(false);
        sent(&mut shared, 3);
        shared.check(&reply(2, 10)).unwrap();
        assert!(matches!(
            shared.check(&reply(3, 10)),
            Err(Inconsistency::NotRising { prev: 10, .. })
        ));
        assert_eq!(shared.summary().violations, 1);
        assert_eq!(c.summary().violations, 6);
        assert_eq!(c.violations().len(), 6);
    }

    #[test]
    fn checker_sees_across_clients() {
        // Shared service: rising is enough for one client.
        let mut c = Checker::new(false);
        c.sent(1, 1);
        c.sent(2, 1);
        c.sent(3, 1);
        assert_eq!(c.check(&from(1, 1, 10)), Ok(true));
        // Client 2's request was in flight before counter 10 was seen: a lower counter is fine.
        assert_eq!(c.check(&from(2, 1, 9)), Ok(true));
        // A counter handed to two requests (both in flight before either answer was seen).
        assert!(matches!(
            c.check(&from(3, 1, 9)),
            Err(Inconsistency::HandedOutTwice {
                counter: 9,
                first_client: 2,
                ..
            })
        ));
        // Client 2 sends after counter 10 was received by client 1: it must get more than 10,
        // even though 9 would still rise for client 2 itself (a rollback only client 1 can
        // tell).
        c.sent(2, 2);
        assert!(matches!(
            c.check(&from(2, 2, 10)),
            Err(Inconsistency::BehindSeen {
                seen: 10,
                counter: 10,
                ..
            })
        ));
        assert_eq!(c.check(&from(2, 2, 11)), Ok(true));
        assert_eq!(c.summary().clients, 3);
    }
}
