//! Host side of the counter service: request/reply codec, a UDP client with retries, and the
//! consistency checker that the failover tests rely on. The wire format is described in
//! [`crate::guest`].

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::guest::{REPLY_LEN, REPLY_MAGIC, REQUEST_LEN, REQUEST_MAGIC, STATUS_OK, STATUS_STALE};

/// A counter request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Who asks (not 0).
    pub client_id: u64,
    /// The client's request number (from 1, rising).
    pub seq: u64,
}

impl Request {
    /// The UDP payload.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.client_id.to_le_bytes());
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b
    }
}

/// A counter reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// `STATUS_OK` or an error status from [`crate::guest`].
    pub status: u32,
    /// Echo of the request's client id.
    pub client_id: u64,
    /// Echo of the request's seq.
    pub seq: u64,
    /// The counter after the request was applied.
    pub counter: u64,
}

/// A reply that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    /// Wrong size.
    #[error("Reply is {0} bytes, expected {REPLY_LEN}")]
    Length(usize),
    /// Wrong magic.
    #[error("Reply magic {0:#x} is not {REPLY_MAGIC:#x}")]
    Magic(u32),
}

impl Reply {
    /// Decodes a reply payload.
    pub fn decode(b: &[u8]) -> Result<Self, ReplyError> {
        if b.len() != REPLY_LEN {
            return Err(ReplyError::Length(b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(0) != REPLY_MAGIC {
            return Err(ReplyError::Magic(u32_at(0)));
        }
        Ok(Reply {
            status: u32_at(4),
            client_id: u64_at(8),
            seq: u64_at(16),
            counter: u64_at(24),
        })
    }
}

/// A reply that contradicts an earlier one, or the service's rules.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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

/// What a client run saw.
#[derive(Debug, Default, Clone)]
pub struct ClientReport {
    /// Requests (distinct seqs) sent.
    pub sent: u64,
    /// Distinct seqs answered.
    pub answered: u64,
    /// Datagrams sent again after a timeout, plus deliberate repeats.
    pub retries: u64,
    /// Replies received (including answers to repeats).
    pub replies: u64,
    /// The last counter value seen.
    pub last_counter: Option<u64>,
    /// Longest time from first send of a seq to its answer.
    pub max_latency: Duration,
}

/// A blocking UDP client of the counter service.
///
/// [`Client::new`] talks to one server. [`Client::with_servers`] sends every request (and
/// every resend) to each of several servers, so that a test can ask every place a primary
/// may run at once: two live primaries then both answer, and a checker fed all the replies
/// sees them contradict each other.
#[derive(Debug)]
pub struct Client {
    socket: UdpSocket,
    /// The first (or only) server.
    server: SocketAddr,
    /// Every server each request goes to, `server` first.
    servers: Vec<SocketAddr>,
    client_id: u64,
    next_seq: u64,
    /// Time to wait for a reply before sending the same request again.
    pub retry_after: Duration,
    from_elsewhere: u64,
}

/// A request that got no answer in time.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket trouble.
    #[error("Client socket error")]
    Io(#[from] io::Error),
    /// No answer at all within the deadline.
    #[error("No reply to seq {seq} from {server} within {waited:?} ({tries} tries); is `rmc run` listening there?")]
    Timeout {
        /// Seq.
        seq: u64,
        /// Server address.
        server: SocketAddr,
        /// Time waited.
        waited: Duration,
        /// Sends made.
        tries: u64,
    },
    /// The reply was malformed.
    #[error("Malformed reply from {0}")]
    Reply(SocketAddr, #[source] ReplyError),
}

impl Client {
    /// A client talking to `server`.
    pub fn new(server: SocketAddr, client_id: u64) -> io::Result<Self> {
        Self::with_servers(vec![server], client_id)
    }

    /// A client that sends each request, and each resend, to every one of `servers` (in that
    /// order; at least one, all of one address family). A reply from any of them is a reply
    /// like any other (it does not count in [`Client::from_elsewhere`]); the first answer to
    /// the new seq, from whichever server, completes a request, and the others' answers to
    /// it arrive later, during the next request or [`Client::drain`], and are passed on too.
    /// A send that fails towards one server (no route to it, say) is skipped as long as
    /// another server could be sent to.
    pub fn with_servers(servers: Vec<SocketAddr>, client_id: u64) -> io::Result<Self> {
        let Some(&server) = servers.first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a client needs at least one server address",
            ));
        };
        if servers.iter().any(|s| s.is_ipv4() != server.is_ipv4()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a client's server addresses must all be IPv4 or all IPv6",
            ));
        }
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let socket = UdpSocket::bind(bind)?;
        Ok(Client {
            socket,
            server,
            servers,
            client_id,
            next_seq: 1,
            retry_after: Duration::from_millis(100),
            from_elsewhere: 0,
        })
    }

    /// The client id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Replies that came from an address other than the server's (other than every listed
    /// server's, for [`Client::with_servers`]); each was passed on to the caller all the same:
    /// a reply is a reply, whoever sent it.
    pub fn from_elsewhere(&self) -> u64 {
        self.from_elsewhere
    }

    /// The servers each request goes to, in the order they are sent to.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Numbers the next new request `seq` (to continue a client across runs).
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq.max(1);
    }

    /// The seq the next new request will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sends the next new request and waits for its answer, resending on timeout, giving up
    /// after `deadline`. Every reply that arrives meanwhile, from any address (late answers to
    /// earlier seqs, duplicates), is passed to `on_reply` too. Returns the reply for the new
    /// seq and the number of resends.
    pub fn request(
        &mut self,
        deadline: Duration,
        mut on_reply: impl FnMut(&Reply),
    ) -> Result<(Reply, u64), ClientError> {
        self.request_from(deadline, |r, _| on_reply(r))
    }

    /// [`Client::request`], telling `on_reply` also the address each reply came from.
    pub fn request_from(
        &mut self,
        deadline: Duration,
        mut on_reply: impl FnMut(&Reply, SocketAddr),
    ) -> Result<(Reply, u64), ClientError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.send_and_wait(seq, deadline, &mut on_reply)
    }

    /// Sends seq again (a deliberate repeat) and waits for its answer.
    pub fn repeat(
        &mut self,
        seq: u64,
        deadline: Duration,
        mut on_reply: impl FnMut(&Reply),
    ) -> Result<(Reply, u64), ClientError> {
        self.send_and_wait(seq, deadline, &mut |r, _| on_reply(r))
    }

    fn send_and_wait(
        &mut self,
        seq: u64,
        deadline: Duration,
        on_reply: &mut dyn FnMut(&Reply, SocketAddr),
    ) -> Result<(Reply, u64), ClientError> {
        let payload = Request {
            client_id: self.client_id,
            seq,
        }
        .encode();
        let start = Instant::now();
        let mut tries = 0u64;
        let mut buf = [0u8; 2048];
        loop {
            if start.elapsed() >= deadline {
                return Err(ClientError::Timeout {
                    seq,
                    server: self.server,
                    waited: start.elapsed(),
                    tries,
                });
            }
            self.send_to_all(&payload)?;
            tries += 1;
            let resend_at = Instant::now() + self.retry_after;
            loop {
                let now = Instant::now();
                if now >= resend_at {
                    break;
                }
                self.socket.set_read_timeout(Some(resend_at - now))?;
                let (n, from) = match self.socket.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::TimedOut =>
                    {
                        break
                    }
                    // ICMP port unreachable while the server is down: keep retrying.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::thread::sleep(resend_at.saturating_duration_since(Instant::now()));
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                let reply = self.received(&buf[..n], from)?;
                on_reply(&reply, from);
                if reply.seq == seq && reply.client_id == self.client_id {
                    return Ok((reply, tries - 1));
                }
            }
        }
    }

    /// Sends `payload` to every server. With one server its error is returned as is; with
    /// several, only when no server could be sent to (the first error).
    fn send_to_all(&self, payload: &[u8]) -> io::Result<()> {
        let mut first_error = None;
        let mut sent = false;
        for server in &self.servers {
            match self.socket.send_to(payload, server) {
                Ok(_) => sent = true,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if !sent => Err(e),
            _ => Ok(()),
        }
    }

    /// Reads every reply still arriving (late answers, duplicates of resends) and passes each
    /// to `on_reply`, until none came for `quiet` or `limit` has passed. Returns how many.
    pub fn drain(
        &mut self,
        quiet: Duration,
        limit: Duration,
        mut on_reply: impl FnMut(&Reply),
    ) -> Result<u64, ClientError> {
        self.drain_from(quiet, limit, |r, _| on_reply(r))
    }

    /// [`Client::drain`], telling `on_reply` also the address each reply came from.
    pub fn drain_from(
        &mut self,
        quiet: Duration,
        limit: Duration,
        mut on_reply: impl FnMut(&Reply, SocketAddr),
    ) -> Result<u64, ClientError> {
        let end = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        let mut n_read = 0;
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(n_read);
            }
            self.socket.set_read_timeout(Some(quiet.min(end - now)))?;
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Ok(n_read)
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e.into()),
            };
            let reply = self.received(&buf[..n], from)?;
            n_read += 1;
            on_reply(&reply, from);
        }
    }

    fn received(&mut self, payload: &[u8], from: SocketAddr) -> Result<Reply, ClientError> {
        if !self.servers.contains(&from) {
            self.from_elsewhere += 1;
        }
        Reply::decode(payload).map_err(|e| ClientError::Reply(from, e))
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

    #[test]
    fn reply_decode_rejects_bad_input() {
        assert_eq!(Reply::decode(&[0; 5]), Err(ReplyError::Length(5)));
        assert_eq!(Reply::decode(&[0; REPLY_LEN]), Err(ReplyError::Magic(0)));
        let mut b = [0u8; REPLY_LEN];
        b[..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        b[16..24].copy_from_slice(&9u64.to_le_bytes());
        assert_eq!(Reply::decode(&b).unwrap().seq, 9);
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

    /// A fake counter server on loopback that answers each of `n` requests with counter
    /// `base + seq`; returns its address.
    fn fake_server(base: u64, n: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            for _ in 0..n {
                let (len, from) = s.recv_from(&mut buf).unwrap();
                assert_eq!(len, REQUEST_LEN);
                let mut r = [0u8; REPLY_LEN];
                r[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
                r[4..8].copy_from_slice(&STATUS_OK.to_le_bytes());
                r[8..24].copy_from_slice(&buf[4..20]);
                let seq = u64::from_le_bytes(buf[12..20].try_into().unwrap());
                r[24..32].copy_from_slice(&(base + seq).to_le_bytes());
                s.send_to(&r, from).unwrap();
            }
        });
        (addr, h)
    }

    #[test]
    fn a_client_with_several_servers_asks_each_and_hears_all() {
        let (a, ha) = fake_server(100, 2);
        let (b, hb) = fake_server(200, 2);
        let mut c = Client::with_servers(vec![a, b], 5).unwrap();
        assert_eq!(c.servers(), &[a, b]);
        c.retry_after = Duration::from_secs(5);
        let mut heard = Vec::new();
        for _ in 0..2 {
            let (r, resent) = c
                .request_from(Duration::from_secs(10), |r, from| heard.push((r.seq, from)))
                .unwrap();
            assert_eq!(resent, 0);
            assert!(
                r.counter == 100 + r.seq || r.counter == 200 + r.seq,
                "{r:?}"
            );
        }
        c.drain_from(
            Duration::from_millis(200),
            Duration::from_secs(5),
            |r, from| heard.push((r.seq, from)),
        )
        .unwrap();
        heard.sort();
        let mut want = vec![(1, a), (1, b), (2, a), (2, b)];
        want.sort();
        assert_eq!(heard, want, "each request answered by both servers");
        assert_eq!(c.from_elsewhere(), 0, "listed servers are not `elsewhere`");
        ha.join().unwrap();
        hb.join().unwrap();
        // A one-server client, as before.
        let (a, ha) = fake_server(100, 1);
        let mut c = Client::new(a, 6).unwrap();
        assert_eq!(c.servers(), &[a]);
        c.request(Duration::from_secs(10), |_| {}).unwrap();
        ha.join().unwrap();
        assert_eq!(c.from_elsewhere(), 0);
    }

    #[test]
    fn a_client_needs_servers_of_one_family() {
        assert!(Client::with_servers(vec![], 1).is_err());
        let v4: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert!(Client::with_servers(vec![v4, v6], 1).is_err());
    }
}
