//! rmc-netbuf: output commit. Every packet the guest sends is held until the standby has
//! acknowledged the checkpoint of the epoch in which the guest sent it.
//!
//! ```text
//! guest TX -> push(pkt)          the packet joins the open epoch
//! pause     -> close_epoch(e)    every open packet now belongs to checkpoint e
//! ack(e)    -> release(e)        packets of epochs <= e leave, in the order they were sent
//! ```
//!
//! The buffer is bounded by bytes and by packets. When a packet does not fit, [`NetBuf::push`]
//! hands it back ([`Full`]) instead of dropping it: the caller leaves it in the guest's TX ring
//! (backpressure), and takes it again after a release made room. Inbound packets never pass
//! through here.
//!
//! The VMM's NIC pushes on its TX path; the primary closes the epoch in each checkpoint's
//! pause and releases on each ack. [`NetBuf::open_packets`] tells whether anything waits for
//! a checkpoint not taken yet (what ends an epoch early to answer fast).

use std::collections::VecDeque;

/// Bounds of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes held (payload bytes).
    pub max_bytes: usize,
    /// Most packets held.
    pub max_packets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 16 << 20,
            max_packets: 16 * 1024,
        }
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets held now.
    pub held_packets: usize,
    /// Bytes held now.
    pub held_bytes: usize,
    /// Packets released so far.
    pub released_packets: u64,
    /// Bytes released so far.
    pub released_bytes: u64,
    /// Pushes refused for lack of room (each one a backpressure event, not a loss).
    pub refused: u64,
}

/// Something with a size in bytes.
pub trait PacketSize {
    /// Bytes it counts against [`Limits::max_bytes`].
    fn size(&self) -> usize;
}

impl PacketSize for Vec<u8> {
    fn size(&self) -> usize {
        self.len()
    }
}

impl<A> PacketSize for (A, Vec<u8>) {
    fn size(&self) -> usize {
        self.1.len()
    }
}

/// A packet that did not fit; the caller keeps it and retries after a release.
#[derive(Debug, PartialEq, Eq)]
pub struct Full<P>(pub P);

/// The output-commit buffer.
#[derive(Debug)]
pub struct NetBuf<P> {
    limits: Limits,
    open: VecDeque<P>,
    closed: VecDeque<(u64, P)>,
    last_closed: u64,
    stats: Stats,
}

impl<P: PacketSize> NetBuf<P> {
    /// An empty buffer.
    pub fn new(limits: Limits) -> Self {
        NetBuf {
            limits,
            open: VecDeque::new(),
            closed: VecDeque::new(),
            last_closed: 0,
            stats: Stats::default(),
        }
    }

    /// Holds `p` in the open epoch, or hands it back if the buffer is full.
    pub fn push(&mut self, p: P) -> Result<(), Full<P>> {
        let size = p.size();
        if !self.has_room(size) {
            self.stats.refused += 1;
            return Err(Full(p));
        }
        self.stats.held_packets += 1;
        self.stats.held_bytes += size;
        self.open.push_back(p);
        Ok(())
    }

    /// Whether a packet of `size` bytes would be taken now. An empty buffer takes any packet,
    /// even one larger than the byte budget, so such a packet cannot block the guest forever.
    pub fn has_room(&self, size: usize) -> bool {
        self.stats.held_packets == 0
            || (self.stats.held_packets < self.limits.max_packets
                && self.stats.held_bytes + size <= self.limits.max_bytes)
    }

    /// Ends the open epoch: its packets wait for the ack of checkpoint `epoch` (call it in the
    /// pause that takes that checkpoint). Epochs never go down; the same epoch may be closed
    /// again when its checkpoint failed and is retried under the same number.
    pub fn close_epoch(&mut self, epoch: u64) {
        assert!(
            epoch >= self.last_closed,
            "epochs must not go down: {epoch} after {}",
            self.last_closed
        );
        self.last_closed = epoch;
        self.closed.extend(self.open.drain(..).map(|p| (epoch, p)));
    }

    /// The standby acknowledged every checkpoint up to `acked`: returns their packets, in the
    /// order the guest sent them.
    pub fn release(&mut self, acked: u64) -> Vec<P> {
        let mut out = Vec::new();
        while self.closed.front().is_some_and(|(e, _)| *e <= acked) {
            let (_, p) = self.closed.pop_front().expect("checked");
            self.account_release(&p);
            out.push(p);
        }
        out
    }

    /// A new session, whose checkpoints are numbered afresh, takes over what is held: every
    /// packet goes back to the open epoch, in the order the guest sent them, to leave with
    /// the new session's first acknowledged checkpoint (taken after all of them, so it covers
    /// what each depended on). Nothing is released or dropped.
    pub fn reopen(&mut self) {
        let mut open: VecDeque<P> = self.closed.drain(..).map(|(_, p)| p).collect();
        open.append(&mut self.open);
        self.open = open;
        self.last_closed = 0;
    }

    /// Everything held, closed epochs first (no standby any more: the primary runs
    /// unprotected and lets its output go).
    pub fn release_all(&mut self) -> Vec<P> {
        let mut out: Vec<P> = self.closed.drain(..).map(|(_, p)| p).collect();
        out.extend(self.open.drain(..));
        for p in &out {
            self.stats.released_packets += 1;
            self.stats.released_bytes += p.size() as u64;
        }
        self.stats.held_packets = 0;
        self.stats.held_bytes = 0;
        out
    }

    fn account_release(&mut self, p: &P) {
        self.stats.held_packets -= 1;
        self.stats.held_bytes -= p.size();
        self.stats.released_packets += 1;
        self.stats.released_bytes += p.size() as u64;
    }

    /// Packets in the open epoch: sent since the last [`NetBuf::close_epoch`], waiting for a
    /// checkpoint not taken yet.
    pub fn open_packets(&self) -> usize {
        self.open.len()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len]
    }

    #[test]
    fn packets_leave_only_after_their_checkpoint_is_acked_in_order() {
        let mut nb = NetBuf::new(Limits::default());
        nb.push(pkt(1, 10)).unwrap();
        nb.push(pkt(2, 10)).unwrap();
        nb.close_epoch(5);
        nb.push(pkt(3, 10)).unwrap();
        assert!(
            nb.release(4).is_empty(),
            "ack of an older epoch releases nothing"
        );
        nb.close_epoch(6);
        nb.push(pkt(4, 10)).unwrap();
        assert_eq!(nb.release(5), vec![pkt(1, 10), pkt(2, 10)]);
        // Acks are cumulative: a lost ack 6 is covered by ack 7.
        nb.close_epoch(7);
        assert_eq!(nb.release(7), vec![pkt(3, 10), pkt(4, 10)]);
        assert!(nb.release(100).is_empty());
        let s = nb.stats();
        assert_eq!(
            (
                s.held_packets,
                s.held_bytes,
                s.released_packets,
                s.released_bytes
            ),
            (0, 0, 4, 40)
        );
    }

    #[test]
    fn open_packets_counts_what_no_checkpoint_covers_yet() {
        let mut nb = NetBuf::new(Limits::default());
        assert_eq!(nb.open_packets(), 0);
        nb.push(pkt(1, 10)).unwrap();
        nb.push(pkt(2, 10)).unwrap();
        assert_eq!(nb.open_packets(), 2);
        nb.close_epoch(1);
        assert_eq!(
            nb.open_packets(),
            0,
            "closed packets wait for an ack, not a checkpoint"
        );
        nb.push(pkt(3, 10)).unwrap();
        assert_eq!(nb.open_packets(), 1);
        // A new session takes everything held back into the open epoch.
        nb.reopen();
        assert_eq!(nb.open_packets(), 3);
    }

    #[test]
    fn a_standby_that_never_acks_lets_nothing_out() {
        let mut nb = NetBuf::new(Limits::default());
        for e in 1..=50 {
            nb.push(pkt(e as u8, 100)).unwrap();
            nb.close_epoch(e);
        }
        assert_eq!(nb.stats().held_packets, 50);
        assert!(nb.release(0).is_empty());
    }

    #[test]
    fn a_burst_past_the_limits_gets_backpressure_not_loss() {
        let limits = Limits {
            max_bytes: 1000,
            max_packets: 4,
        };
        let mut nb = NetBuf::new(limits);
        let mut waiting = VecDeque::new();
        for i in 0..10u8 {
            if let Err(Full(p)) = nb.push(pkt(i, 300)) {
                waiting.push_back(p);
            }
        }
        // 3 x 300 fit in 1,000 bytes; the other 7 are handed back, none is lost.
        assert_eq!(nb.stats().held_packets, 3);
        assert_eq!(waiting.len(), 7);
        assert_eq!(nb.stats().refused, 7);
        assert!(!nb.has_room(300));
        let mut sent = Vec::new();
        let mut epoch = 0;
        while !waiting.is_empty() || nb.stats().held_packets > 0 {
            epoch += 1;
            nb.close_epoch(epoch);
            sent.extend(nb.release(epoch));
            while let Some(p) = waiting.pop_front() {
                if let Err(Full(p)) = nb.push(p) {
                    waiting.push_front(p);
                    break;
                }
            }
            assert!(nb.stats().held_bytes <= 1000 && nb.stats().held_packets <= 4);
        }
        let tags: Vec<u8> = sent.iter().map(|p| p[0]).collect();
        assert_eq!(tags, (0..10).collect::<Vec<_>>(), "every packet, in order");
    }

    #[test]
    fn packet_limit_and_oversized_packets() {
        let mut nb = NetBuf::new(Limits {
            max_bytes: 100,
            max_packets: 2,
        });
        nb.push(pkt(1, 1)).unwrap();
        nb.push(pkt(2, 1)).unwrap();
        assert!(matches!(nb.push(pkt(3, 1)), Err(Full(_))));
        nb.release_all();
        // Alone, a packet over the byte budget still goes (it could never fit otherwise).
        nb.push(pkt(4, 500)).unwrap();
        assert!(matches!(nb.push(pkt(5, 1)), Err(Full(_))));
    }

    #[test]
    fn a_retried_epoch_may_be_closed_again() {
        let mut nb = NetBuf::new(Limits::default());
        nb.push(pkt(1, 1)).unwrap();
        nb.close_epoch(3);
        nb.push(pkt(2, 1)).unwrap();
        nb.close_epoch(3);
        assert_eq!(nb.release(3), vec![pkt(1, 1), pkt(2, 1)]);
    }

    #[test]
    fn reopen_keeps_every_packet_for_the_next_sessions_first_checkpoint() {
        let mut nb = NetBuf::new(Limits::default());
        nb.push(pkt(1, 1)).unwrap();
        nb.close_epoch(50);
        nb.push(pkt(2, 1)).unwrap();
        nb.close_epoch(51);
        nb.push(pkt(3, 1)).unwrap();
        // The session failed before 50 was acked; the next one starts at 49.
        nb.reopen();
        assert!(
            nb.release(51).is_empty(),
            "nothing leaves before a new checkpoint"
        );
        nb.push(pkt(4, 1)).unwrap();
        nb.close_epoch(49);
        nb.push(pkt(5, 1)).unwrap();
        assert!(nb.release(48).is_empty());
        assert_eq!(
            nb.release(49),
            vec![pkt(1, 1), pkt(2, 1), pkt(3, 1), pkt(4, 1)]
        );
        assert_eq!(nb.stats().held_packets, 1);
    }

    #[test]
    fn release_all_keeps_order_and_empties() {
        let mut nb = NetBuf::new(Limits::default());
        nb.push(pkt(1, 3)).unwrap();
        nb.close_epoch(1);
        nb.push(pkt(2, 3)).unwrap();
        assert_eq!(nb.release_all(), vec![pkt(1, 3), pkt(2, 3)]);
        assert_eq!(nb.stats().held_packets, 0);
        assert_eq!(nb.stats().released_packets, 2);
    }
}
