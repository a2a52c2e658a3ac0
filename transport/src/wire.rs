//! The rmc replication wire protocol: framing, messages, bounds-checked decoders, mutual
//! authentication, and the epoch checksum. Shared by every transport (TCP now, RDMA later).
//!
//! ## Framing
//!
//! Every frame is a 16-byte header `type u8 | 7 reserved zero bytes | len u64 LE` followed by
//! `len` bytes of payload. All integers are little endian. A control message's payload is at
//! most [`MAX_CONTROL_LEN`]; an `EpochBody` is raw bytes whose exact length follows from its
//! `EpochHeader` and the agreed [`Layout`].
//!
//! ## Message sequence
//!
//! ```text
//! primary                                   standby
//!    | Hello(magic, version, nonce_p)          |
//!    |---------------------------------------->|  version must match
//!    |        Challenge(nonce_s, proof_s)      |  proof_s = HMAC(secret, "rmc standby v1" | nonce_p | nonce_s)
//!    |<----------------------------------------|
//!    | Auth(proof_p, layout, fence)            |  proof_p = HMAC(secret, "rmc primary v1" | nonce_s | nonce_p)
//!    |---------------------------------------->|  proof and layout checked
//!    |  Accept(last_applied, lineage) | Refuse |  lineage: session of the backup's checkpoint
//!    |<----------------------------------------|
//!    | EpochHeader(e, kind, pages, state_len)  |  e = last_applied + 1, +1 each epoch
//!    | EpochBody(index | pages | state)       |  streamed into a staging slot
//!    | Commit(e, checksum)                     |  checksum = xxh3-64 of the body
//!    |---------------------------------------->|  verify, apply to the backup, then:
//!    |        Ack(e)                           |  cumulative: all epochs <= e applied
//!    |<----------------------------------------|
//!    | Heartbeat <-------------------------->  |  both ways, when nothing else was sent
//!    | Goodbye(last epoch)                     |  protection ends on purpose: no failover
//!    |---------------------------------------->|  (a connection that ends without it means
//! ```                                             the primary was lost)
//!
//! ## States
//!
//! ```text
//! primary: Connecting -> AwaitChallenge -> AwaitAccept -> Syncing -> Protecting
//!          (Syncing: Sync epochs of the whole memory, sent while the guest runs;
//!           Protecting: Checkpoint epochs, one per pause)
//! standby: AwaitHello -> AwaitAuth -> Idle -> ReceivingBody -> AwaitCommit -> Applying -> Idle
//! ```
//!
//! A side refuses a message that is wrong for its state (a commit before the epoch's data, a
//! body without a header, an epoch out of order, an ack for an epoch never sent) and closes
//! the connection. The standby never applies an epoch before its commit arrived and the
//! checksum of what it received matched: a partial or corrupt epoch leaves the backup as it
//! was. The secret never crosses the wire; each side proves it holds it over both nonces, so a
//! recorded handshake cannot be replayed.
//!
//! ## Payloads
//!
//! ```text
//! Hello       magic[8] | version u16 | nonce[32]                                  (42 bytes)
//! Challenge   nonce[32] | proof[32]                                               (64)
//! Auth        proof[32] | layout | fence u64                                      (32 + 28 + 16 x regions + 8)
//!   layout    page_size u32 | vcpus u32 | slot_pages u32 | slot_count u32 | features u32 |
//!             state_version u32 | region_count u32 | region_count x (base u64 | len u64)
//! Accept      last_applied u64 | lineage[32]                                      (40)
//! Refuse      reason, UTF-8, at most 1,024 bytes
//! EpochHeader epoch u64 | kind u8 | 3 zero bytes | state_len u32 | page_count u64 (24)
//! EpochBody   page_count x u64 guest address | page_count x page | state
//! Commit      epoch u64 | checksum u64                                            (16)
//! Ack         epoch u64                                                           (8)
//! Heartbeat   seq u64                                                             (8)
//! Goodbye     last_epoch u64                                                      (8)
//! RegionKey   addr u64 | len u64 | slot_stride u64 | rkey u32 | 4 zero bytes       (32)
//! BodyPlaced  slot u32 | 4 zero bytes | len u64                                   (16)
//! ```
//!
//! ## Over RDMA
//!
//! The same frames travel as a byte stream of RDMA SENDs (see `rdma`), with two differences.
//! After `Accept` the standby sends `RegionKey`: the address, length, slot stride and rkey of
//! its staging region, the only memory it exposes to remote writes. An epoch's body is then
//! not streamed: the primary RDMA-WRITEs the index, pages and state from its slot `i` into the
//! standby's slot `i` and sends `BodyPlaced(i, len)` where `EpochBody` would go, followed by
//! `Commit` on the same queue pair, so RC ordering makes the data visible before the standby
//! reads either message. Slot `i` of the primary is reused only after the epoch that used it
//! was acknowledged, which is after the standby applied it, so the standby's slot `i` is free
//! whenever the primary writes into it (the standby still checks, and refuses otherwise).

/// The only page size the protocol speaks (the guest's, `rmc_guest_api::PAGE_SIZE`).
const PAGE_SIZE: u64 = rmc_staging::PAGE_BYTES as u64;

/// Bytes in a frame header: `type u8 | reserved [u8; 7] (zero) | len u64 LE`.
pub const FRAME_HEADER_LEN: usize = 16;
/// First bytes of a Hello payload.
pub const MAGIC: [u8; 8] = *b"RMC-MC\r\n";
/// The protocol version this build speaks (2: the layout carries the state version; 3: `Auth`
/// carries the primary's fencing token).
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest payload of any control message (everything but `EpochBody`).
pub const MAX_CONTROL_LEN: u64 = 64 * 1024;
/// Largest vCPU/device state blob of an epoch.
pub const MAX_STATE_LEN: u32 = 4 << 20;
/// Length of nonces and proofs.
pub const NONCE_LEN: usize = 32;

/// Message types (the first byte of a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    /// primary -> standby: magic, version, nonce.
    Hello = 1,
    /// standby -> primary: nonce and the standby's proof.
    Challenge = 2,
    /// primary -> standby: the primary's proof and the memory layout.
    Auth = 3,
    /// standby -> primary: layout accepted; protection can start.
    Accept = 4,
    /// either way: refused, with a reason; the connection then closes.
    Refuse = 5,
    /// primary -> standby: an epoch begins.
    EpochHeader = 6,
    /// primary -> standby: page index, page data and state blob of the announced epoch
    /// (raw bytes, streamed into a staging slot; never decoded as a [`Message`]).
    EpochBody = 7,
    /// primary -> standby: the epoch is complete; its checksum.
    Commit = 8,
    /// standby -> primary: epochs up to this one are applied (cumulative).
    Ack = 9,
    /// either way: I am alive.
    Heartbeat = 10,
    /// primary -> standby: protection ends on purpose (not a failure: no failover).
    Goodbye = 11,
    /// standby -> primary, RDMA only, right after `Accept`: where the primary may RDMA-write
    /// epoch bodies (the standby's staging slots, and nothing else).
    RegionKey = 12,
    /// primary -> standby, RDMA only, in place of `EpochBody`: the body of the announced epoch
    /// has been RDMA-written into this staging slot of the standby.
    BodyPlaced = 13,
}

/// Kind of epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EpochKind {
    /// Part of the initial full sync, sent while the guest runs: applied to the backup, but
    /// the backup is not a consistent checkpoint until the first `Checkpoint` epoch commits.
    Sync = 0,
    /// A micro-checkpoint taken with the vCPUs paused: after it is applied the backup is a
    /// consistent image of the primary at the end of this epoch. Carries a state blob.
    Checkpoint = 1,
}

/// The memory layout and limits both sides agree on (sent by the primary in `Auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Page size in bytes (4096).
    pub page_size: u32,
    /// Guest RAM regions `(guest physical base, length in bytes)`, ascending, non-overlapping,
    /// page aligned; at most 16.
    pub regions: Vec<(u64, u64)>,
    /// Number of vCPUs (1..=64).
    pub vcpus: u32,
    /// Pages one staging slot holds.
    pub slot_pages: u32,
    /// Number of staging slots (>= 2).
    pub slot_count: u32,
    /// Feature bits; none defined yet, must be 0.
    pub features: u32,
    /// Encoding version of the vCPU/device state blobs the primary sends; a standby accepts
    /// only versions it can restore.
    pub state_version: u32,
}

/// An epoch announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochHeader {
    /// Epoch number (from 1, rising by one).
    pub epoch: u64,
    /// Sync or checkpoint.
    pub kind: EpochKind,
    /// Pages in this epoch (may exceed `slot_pages`; never the guest's page count).
    pub page_count: u64,
    /// Bytes of state blob (0 for `Sync`, 1..=MAX_STATE_LEN for `Checkpoint`).
    pub state_len: u32,
}

/// A decoded control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`MsgType::Hello`]. Payload: MAGIC | version u16 | nonce.
    Hello {
        /// Protocol version of the sender.
        version: u16,
        /// Fresh random nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// See [`MsgType::Challenge`]. Payload: nonce | proof.
    Challenge {
        /// Fresh random nonce.
        nonce: [u8; NONCE_LEN],
        /// `standby_proof(secret, hello.nonce, nonce)`.
        proof: [u8; NONCE_LEN],
    },
    /// See [`MsgType::Auth`]. Payload: proof | layout | fence.
    Auth {
        /// `primary_proof(secret, challenge.nonce, hello.nonce)`.
        proof: [u8; NONCE_LEN],
        /// Proposed layout.
        layout: Layout,
        /// The primary's fencing token: the arbiter's revision of the primary key it holds
        /// (0: no arbiter). A standby with an arbiter accepts only the current holder.
        fence: u64,
    },
    /// See [`MsgType::Accept`]. Payload: last_applied u64 | lineage.
    Accept {
        /// Last epoch the standby has applied from an earlier connection (0: none).
        last_applied: u64,
        /// When the backup is a consistent checkpoint of epoch `last_applied`: the session
        /// token (the primary's Hello nonce) of the session that produced it, so that the
        /// same primary can resume from it, sending only what changed since. Zeros: no
        /// consistent checkpoint.
        lineage: [u8; NONCE_LEN],
    },
    /// See [`MsgType::Refuse`]. Payload: UTF-8 reason (at most 1,024 bytes).
    Refuse {
        /// Why.
        reason: String,
    },
    /// See [`MsgType::EpochHeader`].
    EpochHeader(EpochHeader),
    /// See [`MsgType::Commit`]. Payload: epoch u64 | checksum u64.
    Commit {
        /// The epoch.
        epoch: u64,
        /// [`checksum`] of the epoch body.
        checksum: u64,
    },
    /// See [`MsgType::Ack`]. Payload: epoch u64.
    Ack {
        /// Highest epoch applied.
        epoch: u64,
    },
    /// See [`MsgType::Heartbeat`]. Payload: seq u64.
    Heartbeat {
        /// Sender's heartbeat counter.
        seq: u64,
    },
    /// See [`MsgType::Goodbye`]. Payload: last epoch sent u64.
    Goodbye {
        /// The last epoch the primary sent.
        last_epoch: u64,
    },
    /// See [`MsgType::RegionKey`]. Payload: addr u64 | len u64 | slot_stride u64 | rkey u32 |
    /// 4 zero bytes.
    RegionKey(RegionKey),
    /// See [`MsgType::BodyPlaced`]. Payload: slot u32 | 4 zero bytes | len u64.
    BodyPlaced {
        /// The standby's slot the body was written into.
        slot: u32,
        /// Bytes of the body (index, pages, state), as an `EpochBody` frame would carry.
        len: u64,
    },
}

/// The standby's staging region as the primary's RDMA WRITEs address it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionKey {
    /// Virtual address of the region in the standby.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Bytes from one slot to the next (slot `i` starts at `addr + i x slot_stride`).
    pub slot_stride: u64,
    /// Remote key of its memory registration.
    pub rkey: u32,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub ty: MsgType,
    /// Payload length.
    pub len: u64,
}

/// Everything a decoder can refuse. Each message names what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The first byte is no known message type.
    #[error("Unknown message type {0:#04x}")]
    UnknownType(u8),
    /// Reserved header bytes are not zero.
    #[error("Frame header has nonzero reserved bytes")]
    Reserved,
    /// A Hello without the rmc magic: not an rmc peer.
    #[error("Hello does not start with the rmc magic (not an rmc primary?)")]
    BadMagic,
    /// A length over its limit.
    #[error("Frame length {len} for {what:?} exceeds the limit {limit}")]
    TooLong {
        /// Message type.
        what: MsgType,
        /// Length found.
        len: u64,
        /// Limit.
        limit: u64,
    },
    /// A payload of the wrong size.
    #[error("{what:?} payload is {got} bytes, expected {expected}")]
    Length {
        /// Message type.
        what: MsgType,
        /// Expected size.
        expected: u64,
        /// Size found.
        got: u64,
    },
    /// An EpochBody where a control message was expected.
    #[error("An epoch body cannot be decoded as a control message")]
    BodyAsMessage,
    /// A field with an invalid value.
    #[error("Invalid {field}: {value}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What was wrong with it.
        value: String,
    },
    /// A page index entry outside guest memory.
    #[error("Page index entry {entry} ({addr:#x}) is outside guest memory")]
    IndexOutside {
        /// Entry number.
        entry: usize,
        /// Address.
        addr: u64,
    },
    /// A page index entry not on a page boundary.
    #[error("Page index entry {entry} ({addr:#x}) is not page aligned")]
    IndexUnaligned {
        /// Entry number.
        entry: usize,
        /// Address.
        addr: u64,
    },
    /// Page index entries not strictly ascending (a page twice, or out of order).
    #[error("Page index entry {entry} ({addr:#x}) does not follow {prev:#x} in ascending order")]
    IndexOrder {
        /// Entry number.
        entry: usize,
        /// Address.
        addr: u64,
        /// Previous entry.
        prev: u64,
    },
}

/// Largest Refuse reason.
pub const MAX_REASON_LEN: usize = 1024;
const MAX_REGIONS: usize = 16;
const MAX_VCPUS: u32 = 64;
const MAX_SLOTS: u32 = 64;
const MAX_GUEST_BYTES: u64 = 1 << 40;

impl MsgType {
    fn from_u8(b: u8) -> Result<Self, WireError> {
        Ok(match b {
            1 => MsgType::Hello,
            2 => MsgType::Challenge,
            3 => MsgType::Auth,
            4 => MsgType::Accept,
            5 => MsgType::Refuse,
            6 => MsgType::EpochHeader,
            7 => MsgType::EpochBody,
            8 => MsgType::Commit,
            9 => MsgType::Ack,
            10 => MsgType::Heartbeat,
            11 => MsgType::Goodbye,
            12 => MsgType::RegionKey,
            13 => MsgType::BodyPlaced,
            other => return Err(WireError::UnknownType(other)),
        })
    }
}

fn put_header(ty: MsgType, len: u64, out: &mut Vec<u8>) {
    out.push(ty as u8);
    out.extend_from_slice(&[0; 7]);
    out.extend_from_slice(&len.to_le_bytes());
}

/// Appends the frame for `msg` (header + payload) to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    put_header(MsgType::Hello, 0, out); // patched below
    let ty = match msg {
        Message::Hello { version, nonce } => {
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(nonce);
            MsgType::Hello
        }
        Message::Challenge { nonce, proof } => {
            out.extend_from_slice(nonce);
            out.extend_from_slice(proof);
            MsgType::Challenge
        }
        Message::Auth {
            proof,
            layout,
            fence,
        } => {
            out.extend_from_slice(proof);
            for v in [
                layout.page_size,
                layout.vcpus,
                layout.slot_pages,
                layout.slot_count,
                layout.features,
                layout.state_version,
                layout.regions.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for (b, l) in &layout.regions {
                out.extend_from_slice(&b.to_le_bytes());
                out.extend_from_slice(&l.to_le_bytes());
            }
            out.extend_from_slice(&fence.to_le_bytes());
            MsgType::Auth
        }
        Message::Accept {
            last_applied,
            lineage,
        } => {
            out.extend_from_slice(&last_applied.to_le_bytes());
            out.extend_from_slice(lineage);
            MsgType::Accept
        }
        Message::Refuse { reason } => {
            let mut end = reason.len().min(MAX_REASON_LEN);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            out.extend_from_slice(&reason.as_bytes()[..end]);
            MsgType::Refuse
        }
        Message::EpochHeader(h) => {
            out.extend_from_slice(&h.epoch.to_le_bytes());
            out.extend_from_slice(&[h.kind as u8, 0, 0, 0]);
            out.extend_from_slice(&h.state_len.to_le_bytes());
            out.extend_from_slice(&h.page_count.to_le_bytes());
            MsgType::EpochHeader
        }
        Message::Commit { epoch, checksum } => {
            out.extend_from_slice(&epoch.to_le_bytes());
            out.extend_from_slice(&checksum.to_le_bytes());
            MsgType::Commit
        }
        Message::Ack { epoch } => {
            out.extend_from_slice(&epoch.to_le_bytes());
            MsgType::Ack
        }
        Message::Heartbeat { seq } => {
            out.extend_from_slice(&seq.to_le_bytes());
            MsgType::Heartbeat
        }
        Message::Goodbye { last_epoch } => {
            out.extend_from_slice(&last_epoch.to_le_bytes());
            MsgType::Goodbye
        }
        Message::RegionKey(k) => {
            for v in [k.addr, k.len, k.slot_stride] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&k.rkey.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            MsgType::RegionKey
        }
        Message::BodyPlaced { slot, len } => {
            out.extend_from_slice(&slot.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&len.to_le_bytes());
            MsgType::BodyPlaced
        }
    };
    let len = (out.len() - start - FRAME_HEADER_LEN) as u64;
    out[start] = ty as u8;
    out[start + 8..start + 16].copy_from_slice(&len.to_le_bytes());
}

/// Appends the frame header of an `EpochBody` of `len` bytes (the body itself follows raw).
pub fn encode_body_header(len: u64, out: &mut Vec<u8>) {
    put_header(MsgType::EpochBody, len, out);
}

/// Decodes a frame header, checking the type, the reserved bytes, and the length against the
/// limit for that type (`MAX_CONTROL_LEN` for control messages, `max_body` for EpochBody).
pub fn decode_frame_header(
    b: &[u8; FRAME_HEADER_LEN],
    max_body: u64,
) -> Result<FrameHeader, WireError> {
    let ty = MsgType::from_u8(b[0])?;
    if b[1..8].iter().any(|&x| x != 0) {
        return Err(WireError::Reserved);
    }
    let len = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let limit = if ty == MsgType::EpochBody {
        max_body
    } else {
        MAX_CONTROL_LEN
    };
    if len > limit {
        return Err(WireError::TooLong {
            what: ty,
            len,
            limit,
        });
    }
    Ok(FrameHeader { ty, len })
}

/// A bounds-checked little-endian reader over a payload.
struct Cursor<'a> {
    b: &'a [u8],
    ty: MsgType,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take(2).try_into().expect("2 bytes"))
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().expect("8 bytes"))
    }
    fn arr(&mut self) -> [u8; NONCE_LEN] {
        self.take(NONCE_LEN).try_into().expect("32 bytes")
    }
    /// Requires exactly `n` bytes to be left.
    fn exact(&self, n: usize) -> Result<(), WireError> {
        if self.b.len() != n {
            return Err(WireError::Length {
                what: self.ty,
                expected: n as u64,
                got: self.b.len() as u64,
            });
        }
        Ok(())
    }
}

/// Decodes the payload of a control message of type `ty`. `EpochBody` is refused here.
/// Layouts in `Auth` are validated with [`Layout::validate`].
pub fn decode(ty: MsgType, payload: &[u8]) -> Result<Message, WireError> {
    let mut c = Cursor { b: payload, ty };
    Ok(match ty {
        MsgType::Hello => {
            c.exact(8 + 2 + NONCE_LEN)?;
            if c.take(8) != MAGIC {
                return Err(WireError::BadMagic);
            }
            Message::Hello {
                version: c.u16(),
                nonce: c.arr(),
            }
        }
        MsgType::Challenge => {
            c.exact(2 * NONCE_LEN)?;
            Message::Challenge {
                nonce: c.arr(),
                proof: c.arr(),
            }
        }
        MsgType::Auth => {
            if payload.len() < NONCE_LEN + 28 {
                c.exact(NONCE_LEN + 28)?;
            }
            let proof = c.arr();
            let (page_size, vcpus, slot_pages, slot_count, features, state_version, count) = (
                c.u32(),
                c.u32(),
                c.u32(),
                c.u32(),
                c.u32(),
                c.u32(),
                c.u32(),
            );
            if count as usize > MAX_REGIONS {
                return Err(WireError::Field {
                    field: "layout region count",
                    value: format!("{count} (at most {MAX_REGIONS})"),
                });
            }
            c.exact(count as usize * 16 + 8)?;
            let regions = (0..count).map(|_| (c.u64(), c.u64())).collect();
            let fence = c.u64();
            let layout = Layout {
                page_size,
                regions,
                vcpus,
                slot_pages,
                slot_count,
                features,
                state_version,
            };
            layout.validate()?;
            Message::Auth {
                proof,
                layout,
                fence,
            }
        }
        MsgType::Accept => {
            c.exact(8 + NONCE_LEN)?;
            Message::Accept {
                last_applied: c.u64(),
                lineage: c.arr(),
            }
        }
        MsgType::Refuse => {
            if payload.len() > MAX_REASON_LEN {
                return Err(WireError::TooLong {
                    what: ty,
                    len: payload.len() as u64,
                    limit: MAX_REASON_LEN as u64,
                });
            }
            let reason = std::str::from_utf8(payload).map_err(|e| WireError::Field {
                field: "refusal reason",
                value: format!("not UTF-8 ({e})"),
            })?;
            Message::Refuse {
                reason: reason.to_string(),
            }
        }
        MsgType::EpochHeader => {
            c.exact(24)?;
            let epoch = c.u64();
            let kind = match c.take(4) {
                [0, 0, 0, 0] => EpochKind::Sync,
                [1, 0, 0, 0] => EpochKind::Checkpoint,
                other => {
                    return Err(WireError::Field {
                        field: "epoch kind",
                        value: format!("{other:?}"),
                    })
                }
            };
            let state_len = c.u32();
            let page_count = c.u64();
            if epoch == 0 {
                return Err(WireError::Field {
                    field: "epoch number",
                    value: "0".into(),
                });
            }
            Message::EpochHeader(EpochHeader {
                epoch,
                kind,
                page_count,
                state_len,
            })
        }
        MsgType::EpochBody => return Err(WireError::BodyAsMessage),
        MsgType::Commit => {
            c.exact(16)?;
            Message::Commit {
                epoch: c.u64(),
                checksum: c.u64(),
            }
        }
        MsgType::Ack => {
            c.exact(8)?;
            Message::Ack { epoch: c.u64() }
        }
        MsgType::Heartbeat => {
            c.exact(8)?;
            Message::Heartbeat { seq: c.u64() }
        }
        MsgType::Goodbye => {
            c.exact(8)?;
            Message::Goodbye {
                last_epoch: c.u64(),
            }
        }
        MsgType::RegionKey => {
            c.exact(32)?;
            let (addr, len, slot_stride, rkey) = (c.u64(), c.u64(), c.u64(), c.u32());
            if c.take(4) != [0; 4] {
                return Err(WireError::Reserved);
            }
            Message::RegionKey(RegionKey {
                addr,
                len,
                slot_stride,
                rkey,
            })
        }
        MsgType::BodyPlaced => {
            c.exact(16)?;
            let slot = c.u32();
            if c.take(4) != [0; 4] {
                return Err(WireError::Reserved);
            }
            Message::BodyPlaced { slot, len: c.u64() }
        }
    })
}

impl Layout {
    /// Checks the layout is sane: page size 4096, 1..=16 regions, page-aligned, ascending,
    /// non-overlapping, non-empty, total at most 1 TiB; 1..=64 vCPUs; 1 <= slot_pages <=
    /// the guest's pages; 2 <= slot_count <= 64; features == 0. (Whether this host can hold
    /// it is the standby's own check.)
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |field, value: String| Err(WireError::Field { field, value });
        if u64::from(self.page_size) != PAGE_SIZE {
            return bad(
                "layout page size",
                format!("{} (only {PAGE_SIZE} is supported)", self.page_size),
            );
        }
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS {
            return bad(
                "layout region count",
                format!("{} (1 to {MAX_REGIONS})", self.regions.len()),
            );
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for (i, &(base, len)) in self.regions.iter().enumerate() {
            let region_end = base.checked_add(len);
            if len == 0 || base % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || region_end.is_none() {
                return bad(
                    "layout region",
                    format!("{i}: {base:#x}+{len:#x} (must be non-empty and page aligned)"),
                );
            }
            if i > 0 && base < end {
                return bad(
                    "layout region",
                    format!("{i}: {base:#x} overlaps or precedes the region before"),
                );
            }
            end = region_end.expect("checked");
            total += len;
        }
        if total > MAX_GUEST_BYTES {
            return bad("layout size", format!("{total} bytes (at most 1 TiB)"));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(
                "layout vCPU count",
                format!("{} (1 to {MAX_VCPUS})", self.vcpus),
            );
        }
        if self.slot_pages == 0 || u64::from(self.slot_pages) > total / PAGE_SIZE {
            return bad(
                "layout slot size",
                format!(
                    "{} pages (1 to the guest's {} pages)",
                    self.slot_pages,
                    total / PAGE_SIZE
                ),
            );
        }
        if !(2..=MAX_SLOTS).contains(&self.slot_count) {
            return bad(
                "layout slot count",
                format!("{} (2 to {MAX_SLOTS})", self.slot_count),
            );
        }
        if self.features != 0 {
            return bad(
                "layout features",
                format!("{:#x} (none are defined)", self.features),
            );
        }
        Ok(())
    }

    /// Total guest pages.
    pub fn total_pages(&self) -> u64 {
        self.regions
            .iter()
            .map(|&(_, l)| l / u64::from(self.page_size.max(1)))
            .sum()
    }
}

impl EpochHeader {
    /// Checks the header against the layout (page_count <= total pages, state_len rules by
    /// kind) and returns the exact length its EpochBody must have:
    /// `page_count * 8 + page_count * page_size + state_len`.
    pub fn body_len(&self, layout: &Layout) -> Result<u64, WireError> {
        let total = layout.total_pages();
        if self.page_count > total {
            return Err(WireError::Field {
                field: "epoch page count",
                value: format!("{} (the guest has {total} pages)", self.page_count),
            });
        }
        match self.kind {
            EpochKind::Sync if self.state_len != 0 => {
                return Err(WireError::Field {
                    field: "sync epoch state length",
                    value: format!("{} (must be 0)", self.state_len),
                })
            }
            EpochKind::Checkpoint if self.state_len == 0 || self.state_len > MAX_STATE_LEN => {
                return Err(WireError::Field {
                    field: "checkpoint state length",
                    value: format!("{} (1 to {MAX_STATE_LEN})", self.state_len),
                })
            }
            _ => {}
        }
        // Cannot overflow: page_count <= 2^28 (1 TiB of 4 KiB pages).
        Ok(self.page_count * (8 + u64::from(layout.page_size)) + u64::from(self.state_len))
    }
}

/// Checks a page index: every entry is a page-aligned guest physical address inside one of
/// the layout's regions, and entries are strictly ascending.
pub fn validate_index(index: &[u64], layout: &Layout) -> Result<(), WireError> {
    let page = u64::from(layout.page_size);
    let mut prev: Option<u64> = None;
    for (entry, &addr) in index.iter().enumerate() {
        if addr % page != 0 {
            return Err(WireError::IndexUnaligned { entry, addr });
        }
        if !layout
            .regions
            .iter()
            .any(|&(b, l)| addr >= b && addr - b < l)
        {
            return Err(WireError::IndexOutside { entry, addr });
        }
        if let Some(p) = prev {
            if addr <= p {
                return Err(WireError::IndexOrder {
                    entry,
                    addr,
                    prev: p,
                });
            }
        }
        prev = Some(addr);
    }
    Ok(())
}

/// The checksum of an epoch body: xxh3-64 over the concatenation of `parts` (index bytes,
/// page data, state blob), computed without concatenating them.
pub fn checksum(parts: &[&[u8]]) -> u64 {
    let mut h = Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finish()
}

/// The epoch checksum computed piece by piece: the same value as [`checksum`] of the pieces
/// in order, for a body that is never in memory whole.
#[derive(Clone)]
pub struct Hasher(xxhash_rust::xxh3::Xxh3);

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher").finish_non_exhaustive()
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    /// An empty checksum.
    pub fn new() -> Self {
        Hasher(xxhash_rust::xxh3::Xxh3::new())
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

/// Mutual challenge/response authentication with a shared secret (HMAC-SHA256). The secret
/// never crosses the wire; each side proves it holds it over both sides' fresh nonces.
pub mod auth {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    use super::NONCE_LEN;

    fn mac(secret: &[u8], label: &[u8], a: &[u8; NONCE_LEN], b: &[u8; NONCE_LEN]) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }

    /// A fresh random nonce from the OS.
    pub fn nonce() -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        getrandom::fill(&mut n).expect("the OS random source works");
        n
    }

    /// The standby's proof: HMAC(secret, "rmc standby v1" | hello_nonce | challenge_nonce).
    pub fn standby_proof(
        secret: &[u8],
        hello_nonce: &[u8; NONCE_LEN],
        challenge_nonce: &[u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        mac(secret, b"rmc standby v1", hello_nonce, challenge_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The primary's proof: HMAC(secret, "rmc primary v1" | challenge_nonce | hello_nonce).
    pub fn primary_proof(
        secret: &[u8],
        challenge_nonce: &[u8; NONCE_LEN],
        hello_nonce: &[u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        mac(secret, b"rmc primary v1", challenge_nonce, hello_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Constant-time comparison of a received proof with the expected one.
    pub fn proofs_equal(a: &[u8; NONCE_LEN], b: &[u8; NONCE_LEN]) -> bool {
        // CtOutput's equality is constant time (the `subtle` crate underneath).
        hmac::digest::CtOutput::<Hmac<Sha256>>::new((*a).into())
            == hmac::digest::CtOutput::<Hmac<Sha256>>::new((*b).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            page_size: 4096,
            regions: vec![(0, 3 << 30), (4 << 30, 1 << 30)],
            vcpus: 2,
            slot_pages: 1024,
            slot_count: 2,
            features: 0,
            state_version: 1,
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                nonce: [3; NONCE_LEN],
            },
            Message::Challenge {
                nonce: [4; NONCE_LEN],
                proof: [5; NONCE_LEN],
            },
            Message::Auth {
                proof: [6; NONCE_LEN],
                layout: layout(),
                fence: 0x0102_0304_0506_0708,
            },
            Message::Accept {
                last_applied: 77,
                lineage: [8; NONCE_LEN],
            },
            Message::Refuse {
                reason: "layout mismatch: é".into(),
            },
            Message::EpochHeader(EpochHeader {
                epoch: 9,
                kind: EpochKind::Checkpoint,
                page_count: 300,
                state_len: 8000,
            }),
            Message::EpochHeader(EpochHeader {
                epoch: 1,
                kind: EpochKind::Sync,
                page_count: 1,
                state_len: 0,
            }),
            Message::Commit {
                epoch: 9,
                checksum: 0xdead_beef_0bad_f00d,
            },
            Message::Ack { epoch: 9 },
            Message::Heartbeat { seq: u64::MAX },
            Message::Goodbye { last_epoch: 12 },
            Message::RegionKey(RegionKey {
                addr: 0x7f00_1234_5000,
                len: 3 << 20,
                slot_stride: 1 << 20,
                rkey: 0xabcd_0123,
            }),
            Message::BodyPlaced {
                slot: 1,
                len: 300 * 4104 + 8000,
            },
        ]
    }

    fn frame(m: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        encode(m, &mut v);
        v
    }

    fn decode_frame(f: &[u8]) -> Result<Message, WireError> {
        let h = decode_frame_header(f[..FRAME_HEADER_LEN].try_into().unwrap(), 0)?;
        assert_eq!(h.len as usize, f.len() - FRAME_HEADER_LEN);
        decode(h.ty, &f[FRAME_HEADER_LEN..])
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            assert_eq!(decode_frame(&frame(&m)).unwrap(), m);
        }
    }

    #[test]
    fn frame_headers_are_checked() {
        let mut f = frame(&Message::Ack { epoch: 1 });
        f[0] = 0x2a;
        assert_eq!(decode_frame(&f), Err(WireError::UnknownType(0x2a)));
        assert_eq!(
            WireError::UnknownType(0x2a).to_string(),
            "Unknown message type 0x2a"
        );
        let mut f = frame(&Message::Ack { epoch: 1 });
        f[3] = 1;
        assert_eq!(decode_frame(&f), Err(WireError::Reserved));
        let mut f = frame(&Message::Ack { epoch: 1 });
        f[8..16].copy_from_slice(&(MAX_CONTROL_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode_frame(&f),
            Err(WireError::TooLong {
                what: MsgType::Ack,
                ..
            })
        ));
        let mut body = Vec::new();
        encode_body_header(1000, &mut body);
        let b: &[u8; 16] = body[..16].try_into().unwrap();
        assert_eq!(decode_frame_header(b, 1000).unwrap().len, 1000);
        assert!(matches!(
            decode_frame_header(b, 999),
            Err(WireError::TooLong {
                what: MsgType::EpochBody,
                ..
            })
        ));
        assert_eq!(
            decode(MsgType::EpochBody, &[]),
            Err(WireError::BodyAsMessage)
        );
    }

    #[test]
    fn payload_sizes_and_fields_are_checked() {
        // Short and long payloads.
        assert!(matches!(
            decode(MsgType::Ack, &[0; 7]),
            Err(WireError::Length {
                expected: 8,
                got: 7,
                ..
            })
        ));
        assert!(matches!(
            decode(MsgType::Commit, &[0; 17]),
            Err(WireError::Length {
                expected: 16,
                got: 17,
                ..
            })
        ));
        // Bad magic, other version decoded for the caller to report.
        let mut hello = frame(&Message::Hello {
            version: 1,
            nonce: [0; 32],
        });
        hello[FRAME_HEADER_LEN] = b'X';
        assert_eq!(decode_frame(&hello), Err(WireError::BadMagic));
        let v9 = decode_frame(&frame(&Message::Hello {
            version: 9,
            nonce: [0; 32],
        }))
        .unwrap();
        assert!(matches!(v9, Message::Hello { version: 9, .. }));
        // Epoch kind, epoch 0.
        let mut h = frame(&Message::EpochHeader(EpochHeader {
            epoch: 1,
            kind: EpochKind::Sync,
            page_count: 1,
            state_len: 0,
        }));
        h[FRAME_HEADER_LEN + 8] = 7;
        assert!(matches!(
            decode_frame(&h),
            Err(WireError::Field {
                field: "epoch kind",
                ..
            })
        ));
        let h0 = frame(&Message::EpochHeader(EpochHeader {
            epoch: 0,
            kind: EpochKind::Sync,
            page_count: 1,
            state_len: 0,
        }));
        assert!(matches!(
            decode_frame(&h0),
            Err(WireError::Field {
                field: "epoch number",
                ..
            })
        ));
        // A region count that promises more than the payload holds, or too many.
        let mut a = frame(&Message::Auth {
            proof: [0; 32],
            layout: layout(),
            fence: 0,
        });
        let count_at = FRAME_HEADER_LEN + 32 + 24;
        a[count_at..count_at + 4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            decode_frame(&a),
            Err(WireError::Length {
                what: MsgType::Auth,
                ..
            })
        ));
        a[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&a),
            Err(WireError::Field {
                field: "layout region count",
                ..
            })
        ));
        // Refuse reasons must be UTF-8.
        assert!(matches!(
            decode(MsgType::Refuse, &[0xff, 0xfe]),
            Err(WireError::Field { .. })
        ));
    }

    #[test]
    fn layouts_are_validated() {
        assert!(layout().validate().is_ok());
        let bad = [
            Layout {
                page_size: 8192,
                ..layout()
            },
            Layout {
                regions: vec![],
                ..layout()
            },
            Layout {
                regions: vec![(0, 4096), (0, 4096)],
                ..layout()
            },
            Layout {
                regions: vec![(1, 4096)],
                ..layout()
            },
            Layout {
                regions: vec![(0, 0)],
                ..layout()
            },
            Layout {
                regions: vec![(u64::MAX - 4095, 8192)],
                ..layout()
            },
            Layout {
                vcpus: 0,
                ..layout()
            },
            Layout {
                slot_count: 1,
                ..layout()
            },
            Layout {
                slot_pages: 0,
                ..layout()
            },
            Layout {
                slot_pages: 1 << 30,
                ..layout()
            },
            Layout {
                slot_count: 65,
                ..layout()
            },
            Layout {
                features: 1,
                ..layout()
            },
        ];
        for l in bad {
            assert!(
                matches!(l.validate(), Err(WireError::Field { .. })),
                "{l:?} accepted"
            );
        }
        assert_eq!(layout().total_pages(), (4u64 << 30) / 4096);
    }

    #[test]
    fn body_lengths_follow_header_and_layout() {
        let h = |kind, page_count, state_len| EpochHeader {
            epoch: 1,
            kind,
            page_count,
            state_len,
        };
        let l = layout();
        assert_eq!(
            h(EpochKind::Checkpoint, 2, 10).body_len(&l),
            Ok(2 * 8 + 2 * 4096 + 10)
        );
        assert_eq!(h(EpochKind::Sync, 3, 0).body_len(&l), Ok(3 * 4104));
        assert!(h(EpochKind::Sync, 1, 5).body_len(&l).is_err());
        assert!(h(EpochKind::Checkpoint, 1, 0).body_len(&l).is_err());
        assert!(h(EpochKind::Checkpoint, 1, MAX_STATE_LEN + 1)
            .body_len(&l)
            .is_err());
        assert!(h(EpochKind::Checkpoint, l.total_pages() + 1, 1)
            .body_len(&l)
            .is_err());
        assert!(h(EpochKind::Checkpoint, u64::MAX, 1).body_len(&l).is_err());
    }

    #[test]
    fn page_indexes_are_validated() {
        let l = layout();
        assert!(validate_index(&[0, 4096, 4 << 30], &l).is_ok());
        assert_eq!(
            validate_index(&[0, 4097], &l),
            Err(WireError::IndexUnaligned {
                entry: 1,
                addr: 4097
            })
        );
        assert_eq!(
            validate_index(&[3 << 30], &l),
            Err(WireError::IndexOutside {
                entry: 0,
                addr: 3 << 30
            })
        );
        assert_eq!(
            validate_index(&[5 << 30], &l),
            Err(WireError::IndexOutside {
                entry: 0,
                addr: 5 << 30
            })
        );
        assert_eq!(
            validate_index(&[8192, 4096], &l),
            Err(WireError::IndexOrder {
                entry: 1,
                addr: 4096,
                prev: 8192
            })
        );
        assert_eq!(
            validate_index(&[4096, 4096], &l),
            Err(WireError::IndexOrder {
                entry: 1,
                addr: 4096,
                prev: 4096
            })
        );
        assert!(WireError::IndexOutside {
            entry: 3,
            addr: 0x1000
        }
        .to_string()
        .contains("entry 3 (0x1000)"));
    }

    #[test]
    fn checksum_is_xxh3_of_the_concatenation() {
        let (a, b, c) = (vec![1u8; 5000], vec![2u8; 3], b"state".to_vec());
        let whole = [a.clone(), b.clone(), c.clone()].concat();
        assert_eq!(checksum(&[&a, &b, &c]), xxhash_rust::xxh3::xxh3_64(&whole));
        assert_ne!(checksum(&[&a, &b, &c]), checksum(&[&a, &c, &b]));
    }

    #[test]
    fn proofs_bind_secret_direction_and_nonces() {
        let (n1, n2) = ([1u8; 32], [2u8; 32]);
        let p = auth::primary_proof(b"secret", &n1, &n2);
        assert!(auth::proofs_equal(
            &p,
            &auth::primary_proof(b"secret", &n1, &n2)
        ));
        assert!(!auth::proofs_equal(
            &p,
            &auth::primary_proof(b"secreT", &n1, &n2)
        ));
        assert!(!auth::proofs_equal(
            &p,
            &auth::primary_proof(b"secret", &n2, &n1)
        ));
        assert!(!auth::proofs_equal(
            &p,
            &auth::standby_proof(b"secret", &n1, &n2)
        ));
        assert_ne!(auth::nonce(), auth::nonce());
    }

    #[test]
    fn random_and_truncated_input_never_panics() {
        // A small xorshift generator: deterministic, no extra dependency.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let frames: Vec<Vec<u8>> = all_messages().iter().map(frame).collect();
        for i in 0..20_000 {
            let mut f = frames[i % frames.len()].clone();
            match rnd() % 3 {
                0 => f.truncate((rnd() as usize) % (f.len() + 1)),
                1 => {
                    let at = (rnd() as usize) % f.len();
                    f[at] = rnd() as u8;
                }
                _ => f = (0..(rnd() % 200) as usize).map(|_| rnd() as u8).collect(),
            }
            if f.len() >= FRAME_HEADER_LEN {
                if let Ok(h) = decode_frame_header(f[..16].try_into().unwrap(), 1 << 20) {
                    let end = FRAME_HEADER_LEN + (h.len as usize).min(f.len() - FRAME_HEADER_LEN);
                    let _ = decode(h.ty, &f[FRAME_HEADER_LEN..end]);
                }
            }
            let _ = decode(MsgType::Auth, &f);
        }
    }
}
