//! Framing: [`crate::wire`] frames over any byte stream (a TCP socket, or the RDMA
//! transport's message stream), with the errors of a link.
//!
//! An epoch is written with vectored writes straight from the staging slot (header, body frame
//! header, page index, page data, state, commit: one `writev` call when the stream takes it),
//! so pages are not copied again on the way out. On the receiving side the body is read
//! straight into the standby's staging slot.
//!
//! Reads run with a read timeout: when it fires, the caller's `idle` callback runs with the
//! time the last bytes arrived (send a heartbeat, check the peer's liveness) and the read
//! resumes where it stopped, so a frame is never lost to a timeout, and a peer that is busy
//! streaming a large epoch is not mistaken for a silent one.

use std::io::{self, IoSlice, Read, Write};
use std::time::Instant;

use crate::wire::{self, EpochHeader, FrameHeader, Message, WireError, FRAME_HEADER_LEN};

/// Errors on a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the connection; `got` of `want` bytes of the current item arrived.
    #[error("Connection closed by the peer while reading {what} ({got} of {want} bytes received)")]
    Closed {
        /// What was being read.
        what: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A socket error.
    #[error("Socket error while {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A malformed frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The idle callback stopped the read, for the reason it gave (a silent peer, a missed
    /// deadline: the caller's own typed error, which shows through unchanged).
    #[error(transparent)]
    Aborted(Abort),
}

/// Why an idle callback stopped a read: the caller's own error, kept whole (downcast it, or
/// use [`LinkError::aborted_by`], to get it back).
pub type Abort = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a read runs while it waits: called with the time the last bytes arrived; an error
/// stops the read with [`LinkError::Aborted`].
pub type Idle<'a> = dyn FnMut(Instant) -> Result<(), Abort> + 'a;

impl LinkError {
    /// The idle callback's error, if it stopped the read with an `E`.
    pub fn aborted_by<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            LinkError::Aborted(e) => e.downcast_ref::<E>(),
            _ => None,
        }
    }
}

/// Reads frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    last_data: Instant,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `inner` (for a socket, set a read timeout to get `idle` calls).
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            last_data: Instant::now(),
        }
    }

    /// When the last bytes arrived.
    pub fn last_data(&self) -> Instant {
        self.last_data
    }

    /// Fills `out` completely. On a read timeout runs `idle` with the time the last bytes
    /// arrived; it may abort the read.
    pub fn read_full(
        &mut self,
        out: &mut [u8],
        what: &'static str,
        idle: &mut Idle<'_>,
    ) -> Result<(), LinkError> {
        let mut got = 0;
        while got < out.len() {
            match self.inner.read(&mut out[got..]) {
                Ok(0) => {
                    return Err(LinkError::Closed {
                        what,
                        got,
                        want: out.len(),
                    })
                }
                Ok(n) => {
                    got += n;
                    self.last_data = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    idle(self.last_data).map_err(LinkError::Aborted)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(LinkError::Io { what, source }),
            }
        }
        Ok(())
    }

    /// Reads and checks the next frame header.
    pub fn read_header(
        &mut self,
        max_body: u64,
        idle: &mut Idle<'_>,
    ) -> Result<FrameHeader, LinkError> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        self.read_full(&mut h, "a frame header", idle)?;
        Ok(wire::decode_frame_header(&h, max_body)?)
    }

    /// Reads the payload of a control frame and decodes it.
    pub fn read_message(
        &mut self,
        h: FrameHeader,
        idle: &mut Idle<'_>,
    ) -> Result<Message, LinkError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(h.len as usize, 0);
        let r = self.read_full(&mut buf, "a message", idle);
        let m = r.and_then(|()| Ok(wire::decode(h.ty, &buf)?));
        self.buf = buf;
        m
    }

    /// Reads the next frame, which must be a control message.
    pub fn next_message(&mut self, idle: &mut Idle<'_>) -> Result<Message, LinkError> {
        let h = self.read_header(0, idle)?;
        self.read_message(h, idle)
    }
}

/// Writes frames to a stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    scratch: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            scratch: Vec::with_capacity(256),
        }
    }

    /// The stream written to.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Sends the control part of an epoch whose body was already placed in the peer's slot
    /// `slot` (RDMA): header, `BodyPlaced` and commit, as one write.
    pub fn send_placed(
        &mut self,
        header: &EpochHeader,
        slot: u32,
        len: u64,
        commit: &Message,
    ) -> Result<(), LinkError> {
        self.scratch.clear();
        wire::encode(&Message::EpochHeader(*header), &mut self.scratch);
        wire::encode(&Message::BodyPlaced { slot, len }, &mut self.scratch);
        wire::encode(commit, &mut self.scratch);
        self.write_scratch("sending an epoch's commit")
    }

    /// Sends one control message.
    pub fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.scratch.clear();
        wire::encode(msg, &mut self.scratch);
        self.write_scratch("sending a message")
    }

    /// Writes and flushes what was encoded into `scratch`.
    fn write_scratch(&mut self, what: &'static str) -> Result<(), LinkError> {
        self.inner
            .write_all(&self.scratch)
            .and_then(|()| self.inner.flush())
            .map_err(stalled)
            .map_err(|source| LinkError::Io { what, source })
    }

    /// Sends a whole epoch: header, body (the `parts`, in order: index, data, state) and
    /// commit, with vectored writes and no copy of the parts.
    pub fn send_epoch(
        &mut self,
        header: &EpochHeader,
        parts: &[&[u8]],
        commit: &Message,
    ) -> Result<(), LinkError> {
        self.scratch.clear();
        wire::encode(&Message::EpochHeader(*header), &mut self.scratch);
        let body_len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        wire::encode_body_header(body_len, &mut self.scratch);
        let head_len = self.scratch.len();
        wire::encode(commit, &mut self.scratch);
        let (head, tail) = self.scratch.split_at(head_len);
        let mut slices = Vec::with_capacity(parts.len() + 2);
        slices.push(IoSlice::new(head));
        slices.extend(
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| IoSlice::new(p)),
        );
        slices.push(IoSlice::new(tail));
        write_epoch_slices(&mut self.inner, &mut slices)
    }

    /// Starts an epoch whose body is sent in pieces (one larger than any buffer of the
    /// sender): sends its header and the body frame header for `body_len` bytes; the pieces
    /// follow through [`EpochStream::send`], hashed as they go, and [`EpochStream::finish`]
    /// sends the commit with their checksum. The bytes on the wire are those of
    /// [`FrameWriter::send_epoch`] with the same body.
    pub fn start_epoch(
        &mut self,
        header: &EpochHeader,
        body_len: u64,
    ) -> Result<EpochStream<'_, W>, LinkError> {
        self.scratch.clear();
        wire::encode(&Message::EpochHeader(*header), &mut self.scratch);
        wire::encode_body_header(body_len, &mut self.scratch);
        self.write_scratch("sending an epoch")?;
        Ok(EpochStream {
            writer: self,
            epoch: header.epoch,
            left: body_len,
            hasher: wire::Hasher::new(),
        })
    }

    /// Writes raw bytes (pieces of an epoch sent in parts).
    pub fn send_raw(&mut self, parts: &[&[u8]]) -> Result<(), LinkError> {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        write_epoch_slices(&mut self.inner, &mut slices)
    }
}

/// An epoch body on its way in pieces (see [`FrameWriter::start_epoch`]).
#[derive(Debug)]
pub struct EpochStream<'a, W> {
    writer: &'a mut FrameWriter<W>,
    epoch: u64,
    left: u64,
    hasher: wire::Hasher,
}

impl<W: Write> EpochStream<'_, W> {
    /// Sends the next pieces of the body, in order.
    ///
    /// # Panics
    /// If they go past the announced length (a bug in the caller).
    pub fn send(&mut self, parts: &[&[u8]]) -> Result<(), LinkError> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        assert!(len <= self.left, "more epoch body than announced");
        self.left -= len;
        parts.iter().for_each(|p| self.hasher.update(p));
        self.writer.send_raw(parts)
    }

    /// Sends the commit with the checksum of the whole body; returns the checksum.
    ///
    /// # Panics
    /// If less body was sent than announced (a bug in the caller).
    pub fn finish(self) -> Result<u64, LinkError> {
        assert_eq!(self.left, 0, "less epoch body than announced");
        let checksum = self.hasher.finish();
        self.writer.send(&Message::Commit {
            epoch: self.epoch,
            checksum,
        })?;
        Ok(checksum)
    }
}

/// A write that hit the socket's send timeout: say so instead of "try again".
fn stalled(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer took no data for the whole send timeout (a silent or stalled host)",
        ),
        _ => e,
    }
}

/// Writes every byte of `slices` (pieces of an epoch) and flushes.
fn write_epoch_slices<W: Write>(w: &mut W, slices: &mut [IoSlice<'_>]) -> Result<(), LinkError> {
    write_all_vectored(w, slices)
        .and_then(|()| w.flush())
        .map_err(stalled)
        .map_err(|source| LinkError::Io {
            what: "sending an epoch",
            source,
        })
}

fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer stopped taking data",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::EpochKind;

    /// A reader that hands out at most `step` bytes per call and times out every other call.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        flip: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.flip = !self.flip;
            if self.flip {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn epoch_round_trips_through_slow_reads_with_idle_calls() {
        let header = EpochHeader {
            epoch: 3,
            kind: EpochKind::Checkpoint,
            page_count: 1,
            state_len: 5,
        };
        let index = 0x2000u64.to_le_bytes();
        let page = [7u8; rmc_staging::PAGE_BYTES];
        let commit = Message::Commit {
            epoch: 3,
            checksum: 99,
        };
        let mut w = FrameWriter::new(Vec::new());
        w.send_epoch(&header, &[&index, &page, b"state"], &commit)
            .unwrap();
        w.send(&Message::Ack { epoch: 1 }).unwrap();
        let bytes = w.inner;
        let idles = std::cell::Cell::new(0);
        let mut idle = |_| {
            idles.set(idles.get() + 1);
            Ok(())
        };
        let mut r = FrameReader::new(Trickle {
            data: bytes,
            pos: 0,
            step: 7,
            flip: false,
        });
        assert_eq!(
            r.next_message(&mut idle).unwrap(),
            Message::EpochHeader(header)
        );
        let h = r.read_header(1 << 20, &mut idle).unwrap();
        assert_eq!(h.len, 8 + rmc_staging::PAGE_BYTES as u64 + 5);
        let mut body = vec![0u8; h.len as usize];
        r.read_full(&mut body, "body", &mut idle).unwrap();
        assert_eq!(&body[..8], &index);
        assert_eq!(&body[8 + rmc_staging::PAGE_BYTES..], b"state");
        assert_eq!(r.next_message(&mut idle).unwrap(), commit);
        assert_eq!(
            r.next_message(&mut idle).unwrap(),
            Message::Ack { epoch: 1 }
        );
        assert!(idles.get() > 100);
        // End of stream in the middle of nothing: Closed with 0 of 16 bytes.
        let err = r.next_message(&mut idle).unwrap_err();
        assert!(matches!(
            err,
            LinkError::Closed {
                got: 0,
                want: 16,
                ..
            }
        ));
    }

    #[test]
    fn an_epoch_sent_in_pieces_is_the_same_bytes_as_one_sent_whole() {
        let header = EpochHeader {
            epoch: 9,
            kind: EpochKind::Checkpoint,
            page_count: 2,
            state_len: 3,
        };
        let index: Vec<u8> = [0u64, 0x1000]
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .collect();
        let pages = vec![5u8; 2 * rmc_staging::PAGE_BYTES];
        let state = b"abc";
        let body_len = (index.len() + pages.len() + state.len()) as u64;
        let mut pieces = FrameWriter::new(Vec::new());
        let mut body = pieces.start_epoch(&header, body_len).unwrap();
        body.send(&[&index]).unwrap();
        for page in pages.chunks(rmc_staging::PAGE_BYTES) {
            body.send(&[page]).unwrap();
        }
        body.send(&[state]).unwrap();
        let checksum = body.finish().unwrap();
        assert_eq!(checksum, wire::checksum(&[&index, &pages, state]));
        let mut whole = FrameWriter::new(Vec::new());
        whole
            .send_epoch(
                &header,
                &[&index, &pages, state],
                &Message::Commit { epoch: 9, checksum },
            )
            .unwrap();
        assert_eq!(pieces.inner, whole.inner);
    }

    #[test]
    fn truncated_frame_and_aborting_idle_are_errors() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Message::Ack { epoch: 1 }).unwrap();
        let mut bytes = w.inner;
        bytes.truncate(bytes.len() - 3);
        let mut r = FrameReader::new(&bytes[..]);
        let err = r.next_message(&mut |_| Ok(())).unwrap_err();
        assert!(
            matches!(
                err,
                LinkError::Closed {
                    got: 5,
                    want: 8,
                    ..
                }
            ),
            "{err}"
        );
        let mut r = FrameReader::new(Trickle {
            data: vec![0; 64],
            pos: 0,
            step: 1,
            flip: false,
        });
        #[derive(Debug, thiserror::Error)]
        #[error("peer silent")]
        struct Silent;
        let err = r.next_message(&mut |_| Err(Silent.into())).unwrap_err();
        assert!(err.aborted_by::<Silent>().is_some(), "{err:?}");
        // The callback's error shows through unchanged.
        assert_eq!(err.to_string(), "peer silent");
    }
}
