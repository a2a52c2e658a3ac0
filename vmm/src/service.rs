//! Host side of the counter service: the request/reply codec and a UDP client with retries.
//! The wire format is described in [`crate::guest`]. The consistency checker that judges a
//! failover lives with the application (`rmc::checker`).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::guest::{REPLY_LEN, REPLY_MAGIC, REQUEST_LEN, REQUEST_MAGIC};

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
    use crate::guest::STATUS_OK;

    #[test]
    fn reply_decode_rejects_bad_input() {
        assert_eq!(Reply::decode(&[0; 5]), Err(ReplyError::Length(5)));
        assert_eq!(Reply::decode(&[0; REPLY_LEN]), Err(ReplyError::Magic(0)));
        let mut b = [0u8; REPLY_LEN];
        b[..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        b[16..24].copy_from_slice(&9u64.to_le_bytes());
        assert_eq!(Reply::decode(&b).unwrap().seq, 9);
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
