//! The rmc replication wire protocol: framing, messages, bounds-checked decoders, mutual
//! authentication, and the epoch checksum. (Module doc with the message sequence and the
//! states of both sides: to be written, see the helper task.)

/// Bytes in a frame header: `type u8 | reserved [u8; 7] (zero) | len u64 LE`.
pub const FRAME_HEADER_LEN: usize = 16;
/// First bytes of a Hello payload.
pub const MAGIC: [u8; 8] = *b"RMC-MC\r\n";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
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
    /// See [`MsgType::Auth`]. Payload: proof | layout.
    Auth {
        /// `primary_proof(secret, challenge.nonce, hello.nonce)`.
        proof: [u8; NONCE_LEN],
        /// Proposed layout.
        layout: Layout,
    },
    /// See [`MsgType::Accept`]. Payload: last_applied u64.
    Accept {
        /// Last epoch the standby has applied from an earlier connection (0: none).
        last_applied: u64,
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
    // Variants to be designed by the implementer; they must at least distinguish:
    // unknown message type (with the byte), nonzero reserved bytes, bad magic, unsupported
    // version (found and supported), a length over its limit (what, len, limit), a payload
    // shorter or longer than its message needs (what, expected, got), a bad field value
    // (layout: page size, regions, slot count...; epoch kind; UTF-8 reason), page index entries
    // that are outside guest memory / unaligned / not strictly ascending (with the entry number
    // and address), and a body length that does not match its header.
    /// Placeholder: to be replaced.
    #[error("unimplemented")]
    Todo,
}

/// Appends the frame for `msg` (header + payload) to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let _ = (msg, out);
    todo!()
}

/// Appends the frame header of an `EpochBody` of `len` bytes (the body itself follows raw).
pub fn encode_body_header(len: u64, out: &mut Vec<u8>) {
    let _ = (len, out);
    todo!()
}

/// Decodes a frame header, checking the type, the reserved bytes, and the length against the
/// limit for that type (`MAX_CONTROL_LEN` for control messages, `max_body` for EpochBody).
pub fn decode_frame_header(
    b: &[u8; FRAME_HEADER_LEN],
    max_body: u64,
) -> Result<FrameHeader, WireError> {
    let _ = (b, max_body);
    todo!()
}

/// Decodes the payload of a control message of type `ty`. `EpochBody` is refused here.
/// Layouts in `Auth` are validated with [`Layout::validate`].
pub fn decode(ty: MsgType, payload: &[u8]) -> Result<Message, WireError> {
    let _ = (ty, payload);
    todo!()
}

impl Layout {
    /// Checks the layout is sane: page size 4096, 1..=16 regions, page-aligned, ascending,
    /// non-overlapping, non-empty, total at most 1 TiB; 1..=64 vCPUs; slot_pages >= 1;
    /// slot_count >= 2; features == 0.
    pub fn validate(&self) -> Result<(), WireError> {
        todo!()
    }

    /// Total guest pages.
    pub fn total_pages(&self) -> u64 {
        todo!()
    }
}

impl EpochHeader {
    /// Checks the header against the layout (page_count <= total pages, state_len rules by
    /// kind) and returns the exact length its EpochBody must have:
    /// `page_count * 8 + page_count * page_size + state_len`.
    pub fn body_len(&self, layout: &Layout) -> Result<u64, WireError> {
        let _ = layout;
        todo!()
    }
}

/// Checks a page index: every entry is a page-aligned guest physical address inside one of
/// the layout's regions, and entries are strictly ascending.
pub fn validate_index(index: &[u64], layout: &Layout) -> Result<(), WireError> {
    let _ = (index, layout);
    todo!()
}

/// The checksum of an epoch body: xxh3-64 over the concatenation of `parts` (index bytes,
/// page data, state blob), computed without concatenating them.
pub fn checksum(parts: &[&[u8]]) -> u64 {
    let _ = parts;
    todo!()
}

/// Mutual challenge/response authentication with a shared secret (HMAC-SHA256). The secret
/// never crosses the wire; each side proves it holds it over both sides' fresh nonces.
pub mod auth {
    use super::NONCE_LEN;

    /// A fresh random nonce from the OS.
    pub fn nonce() -> [u8; NONCE_LEN] {
        todo!()
    }

    /// The standby's proof: HMAC(secret, "rmc standby v1" | hello_nonce | challenge_nonce).
    pub fn standby_proof(
        secret: &[u8],
        hello_nonce: &[u8; NONCE_LEN],
        challenge_nonce: &[u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        let _ = (secret, hello_nonce, challenge_nonce);
        todo!()
    }

    /// The primary's proof: HMAC(secret, "rmc primary v1" | challenge_nonce | hello_nonce).
    pub fn primary_proof(
        secret: &[u8],
        challenge_nonce: &[u8; NONCE_LEN],
        hello_nonce: &[u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        let _ = (secret, challenge_nonce, hello_nonce);
        todo!()
    }

    /// Constant-time comparison of a received proof with the expected one.
    pub fn proofs_equal(a: &[u8; NONCE_LEN], b: &[u8; NONCE_LEN]) -> bool {
        let _ = (a, b);
        todo!()
    }
}
