//! Host side of the counter service: request/reply codec, a UDP client with retries, and the
//! consistency checker that the failover tests rely on. The wire format is described in
//! [`crate::guest`].

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::guest::{REPLY_LEN, REPLY_MAGIC, REQUEST_LEN, REQUEST_MAGIC, STATUS_OK};

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
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Inconsistency {
    /// A repeat of a seq got a different answer.
    #[error("seq {seq} was answered with counter {first} and later with {again}")]
    RepeatDiffers {
        /// The seq.
        seq: u64,
        /// First answer.
        first: u64,
        /// Later answer.
        again: u64,
    },
    /// The counter did not rise across two of this client's new requests.
    #[error("seq {seq} got counter {counter}, but the earlier seq {prev_seq} already got {prev}")]
    NotRising {
        /// The seq.
        seq: u64,
        /// Its counter.
        counter: u64,
        /// Previous seq.
        prev_seq: u64,
        /// Its counter.
        prev: u64,
    },
    /// With no other client, the counter must rise by exactly one per new request.
    #[error("seq {seq} got counter {counter}, expected {expected} (this client is the only one)")]
    NotByOne {
        /// The seq.
        seq: u64,
        /// Its counter.
        counter: u64,
        /// Expected.
        expected: u64,
    },
    /// The service answered with an error status.
    #[error("seq {seq} was answered with status {status}")]
    Status {
        /// The seq.
        seq: u64,
        /// Status.
        status: u32,
    },
    /// A reply for another client or a seq never sent.
    #[error("reply for client {client_id} seq {seq} does not match any request sent")]
    Unexpected {
        /// Client in the reply.
        client_id: u64,
        /// Seq in the reply.
        seq: u64,
    },
}

/// Checks every reply a client receives against the ones before it.
#[derive(Debug)]
pub struct Checker {
    client_id: u64,
    exclusive: bool,
    answers: HashMap<u64, u64>,
    highest: Option<(u64, u64)>,
    sent_up_to: u64,
}

impl Checker {
    /// A checker for `client_id`. With `exclusive`, no other client uses the service, so each
    /// new request must raise the counter by exactly one.
    pub fn new(client_id: u64, exclusive: bool) -> Self {
        Checker {
            client_id,
            exclusive,
            answers: HashMap::new(),
            highest: None,
            sent_up_to: 0,
        }
    }

    /// Records that requests up to `seq` were sent.
    pub fn sent(&mut self, seq: u64) {
        self.sent_up_to = self.sent_up_to.max(seq);
    }

    /// Checks a reply. Returns true the first time a seq is answered.
    pub fn check(&mut self, r: &Reply) -> Result<bool, Inconsistency> {
        if r.client_id != self.client_id || r.seq == 0 || r.seq > self.sent_up_to {
            return Err(Inconsistency::Unexpected {
                client_id: r.client_id,
                seq: r.seq,
            });
        }
        if r.status != STATUS_OK {
            return Err(Inconsistency::Status {
                seq: r.seq,
                status: r.status,
            });
        }
        if let Some(&first) = self.answers.get(&r.seq) {
            return if first == r.counter {
                Ok(false)
            } else {
                Err(Inconsistency::RepeatDiffers {
                    seq: r.seq,
                    first,
                    again: r.counter,
                })
            };
        }
        // Requests go out one at a time, so a new answer is for a seq above every earlier one.
        if let Some((prev_seq, prev)) = self.highest {
            if r.seq < prev_seq || r.counter <= prev {
                return Err(Inconsistency::NotRising {
                    seq: r.seq,
                    counter: r.counter,
                    prev_seq,
                    prev,
                });
            }
            if self.exclusive && r.counter != prev + (r.seq - prev_seq) {
                return Err(Inconsistency::NotByOne {
                    seq: r.seq,
                    counter: r.counter,
                    expected: prev + (r.seq - prev_seq),
                });
            }
        }
        self.answers.insert(r.seq, r.counter);
        self.highest = Some((r.seq, r.counter));
        Ok(true)
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
#[derive(Debug)]
pub struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    client_id: u64,
    next_seq: u64,
    /// Time to wait for a reply before sending the same request again.
    pub retry_after: Duration,
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
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let socket = UdpSocket::bind(bind)?;
        Ok(Client {
            socket,
            server,
            client_id,
            next_seq: 1,
            retry_after: Duration::from_millis(100),
        })
    }

    /// The client id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Numbers the next new request `seq` (to continue a client across runs).
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq.max(1);
    }

    /// Sends the next new request and waits for its answer, resending on timeout, giving up
    /// after `deadline`. Every reply that arrives meanwhile (late answers to earlier seqs)
    /// is passed to `on_reply` too. Returns the reply for the new seq and the number of resends.
    pub fn request(
        &mut self,
        deadline: Duration,
        mut on_reply: impl FnMut(&Reply),
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
        self.send_and_wait(seq, deadline, &mut on_reply)
    }

    fn send_and_wait(
        &mut self,
        seq: u64,
        deadline: Duration,
        on_reply: &mut dyn FnMut(&Reply),
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
            self.socket.send_to(&payload, self.server)?;
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
                if from != self.server {
                    continue;
                }
                let reply = Reply::decode(&buf[..n]).map_err(|e| ClientError::Reply(from, e))?;
                on_reply(&reply);
                if reply.seq == seq && reply.client_id == self.client_id {
                    return Ok((reply, tries - 1));
                }
            }
        }
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

    #[test]
    fn checker_accepts_consistent_history() {
        let mut c = Checker::new(7, true);
        c.sent(3);
        assert_eq!(c.check(&reply(1, 10)), Ok(true));
        assert_eq!(c.check(&reply(1, 10)), Ok(false));
        assert_eq!(c.check(&reply(2, 11)), Ok(true));
        assert_eq!(c.check(&reply(3, 12)), Ok(true));
    }

    #[test]
    fn checker_catches_each_inconsistency() {
        let mut c = Checker::new(7, true);
        c.sent(5);
        c.check(&reply(1, 10)).unwrap();
        assert!(matches!(
            c.check(&reply(1, 11)),
            Err(Inconsistency::RepeatDiffers { .. })
        ));
        assert!(matches!(
            c.check(&reply(2, 10)),
            Err(Inconsistency::NotRising { .. })
        ));
        assert!(matches!(
            c.check(&reply(2, 12)),
            Err(Inconsistency::NotByOne { .. })
        ));
        assert!(matches!(
            c.check(&reply(9, 11)),
            Err(Inconsistency::Unexpected { .. })
        ));
        let mut bad = reply(2, 11);
        bad.status = 2;
        assert!(matches!(c.check(&bad), Err(Inconsistency::Status { .. })));
        // Shared service: rising is enough.
        let mut shared = Checker::new(7, false);
        shared.sent(2);
        shared.check(&reply(1, 10)).unwrap();
        assert_eq!(shared.check(&reply(2, 15)), Ok(true));
    }
}
