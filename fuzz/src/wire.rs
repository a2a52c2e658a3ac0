//! Target `wire_frames`: `rmc_transport::wire` and the TCP frame reader on hostile bytes.

use rmc_mc::protocol::msg_type;
use rmc_transport::framing::{FrameReader, LinkError};
use rmc_transport::wire::{
    self, auth, decode_frame_header, EpochHeader, EpochKind, FrameHeader, Message, MsgType,
    RegionKey, WireError, FRAME_HEADER_LEN, MAX_CONTROL_LEN, MAX_REASON_LEN, MAX_STATE_LEN,
    PROTOCOL_VERSION,
};

use crate::gen;
use crate::input::Input;

/// Runs one input; panics on a broken promise. The first byte picks the sub-target:
/// a byte stream through `FrameReader`, one payload through `decode`, a generated message
/// through `encode` and back, or a layout with headers and page indexes against the rules.
pub fn wire_frames(data: &[u8]) {
    let mut u = Input::new(data);
    match u.u8() % 4 {
        0 => stream(&mut u),
        1 => payload(&mut u),
        2 => message_round_trip(&mut u),
        _ => layout_rules(&mut u),
    }
}

fn never_idle(_: std::time::Instant) -> Result<(), rmc_transport::framing::Abort> {
    panic!("an in-memory stream never times out")
}

/// A header for `ty` and `len`, as bytes.
fn header_bytes(ty: u8, len: u64) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0] = ty;
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The type of a message type byte, if it is one.
pub(crate) fn msg_type_of(b: u8) -> Option<MsgType> {
    decode_frame_header(&header_bytes(b, 0), 0)
        .ok()
        .map(|h| h.ty)
}

/// A frame of stream bytes read as the standby's reader reads them, and decoded again by hand:
/// both must agree, and every message decoded must encode back to exactly its frame.
fn stream(u: &mut Input) {
    let max_body = u64::from(u.u16());
    let data = u.rest();
    let mut reader = FrameReader::new(data);
    let mut idle = never_idle;
    let mut pos = 0usize;
    loop {
        let h = match reader.read_header(max_body, &mut idle) {
            Ok(h) => h,
            Err(LinkError::Closed { got, want, .. }) => {
                assert_eq!(want, FRAME_HEADER_LEN);
                assert_eq!(got, data.len() - pos);
                return;
            }
            Err(LinkError::Wire(e)) => {
                let direct = decode_frame_header(
                    data[pos..pos + FRAME_HEADER_LEN].try_into().expect("16"),
                    max_body,
                );
                assert_eq!(direct, Err(e));
                return;
            }
            Err(e) => panic!("unexpected reader error {e}"),
        };
        let raw: &[u8; FRAME_HEADER_LEN] =
            data[pos..pos + FRAME_HEADER_LEN].try_into().expect("16");
        assert_eq!(decode_frame_header(raw, max_body), Ok(h));
        check_header(raw, max_body, h);
        pos += FRAME_HEADER_LEN;
        let len = h.len as usize;
        let left = data.len() - pos;
        if h.ty == MsgType::EpochBody {
            let mut body = vec![0u8; len];
            match reader.read_full(&mut body, "an epoch body", &mut idle) {
                Ok(()) => assert_eq!(body, &data[pos..pos + len]),
                Err(LinkError::Closed { got, want, .. }) => {
                    assert_eq!((got, want), (left, len));
                    return;
                }
                Err(e) => panic!("unexpected reader error {e}"),
            }
        } else {
            match reader.read_message(h, &mut idle) {
                Ok(m) => check_message(&m, h.ty, &data[pos - FRAME_HEADER_LEN..pos + len]),
                Err(LinkError::Wire(e)) => {
                    assert_eq!(wire::decode(h.ty, &data[pos..pos + len]), Err(e));
                }
                Err(LinkError::Closed { got, want, .. }) => {
                    assert_eq!((got, want), (left, len));
                    return;
                }
                Err(e) => panic!("unexpected reader error {e}"),
            }
        }
        pos += len;
    }
}

/// An accepted header has a known type, zero reserved bytes and a length within its limit.
fn check_header(raw: &[u8; FRAME_HEADER_LEN], max_body: u64, h: FrameHeader) {
    assert_eq!(raw[0], h.ty as u8);
    assert!(raw[1..8].iter().all(|&b| b == 0));
    assert_eq!(h.len, u64::from_le_bytes(raw[8..].try_into().expect("8")));
    let limit = if h.ty == MsgType::EpochBody {
        max_body
    } else {
        MAX_CONTROL_LEN
    };
    assert!(h.len <= limit, "{h:?} over the limit {limit}");
}

/// What every decoded message promises: its type, the decoder's own checks, and that
/// encoding it gives back exactly the frame it came from (one encoding per message).
fn check_message(m: &Message, ty: MsgType, frame: &[u8]) {
    assert_eq!(msg_type(m), ty);
    match m {
        Message::Auth { layout, .. } => {
            assert!(
                layout.validate().is_ok(),
                "decoded an invalid layout {layout:?}"
            );
            assert!(
                gen::layout_valid(layout),
                "decoded an invalid layout {layout:?}"
            );
        }
        Message::EpochHeader(h) => assert_ne!(h.epoch, 0, "decoded epoch 0"),
        Message::Refuse { reason } => assert!(reason.len() <= MAX_REASON_LEN),
        _ => {}
    }
    let mut out = Vec::new();
    wire::encode(m, &mut out);
    assert_eq!(out, frame, "{m:?} does not encode back to its frame");
}

/// One payload decoded as the type the input names.
fn payload(u: &mut Input) {
    let b = u.u8();
    let payload = u.rest();
    let Some(ty) = msg_type_of(b % 16) else {
        return;
    };
    match wire::decode(ty, payload) {
        Ok(m) => {
            let mut frame = header_bytes(ty as u8, payload.len() as u64).to_vec();
            frame.extend_from_slice(payload);
            check_message(&m, ty, &frame);
        }
        Err(e) => {
            // The error names a reason that fits this type.
            match (&e, ty) {
                (WireError::BodyAsMessage, MsgType::EpochBody) => {}
                (WireError::BodyAsMessage, _) => panic!("{ty:?} refused as a body"),
                (WireError::UnknownType(_), _) => panic!("decode gave {e:?}"),
                _ => {}
            }
            let _ = e.to_string();
        }
    }
}

/// A message built from the input; its frame must decode back to it, or be refused when the
/// message is one no decoder can accept (invalid layout, epoch 0, a reason over the limit is
/// cut at a character boundary by `encode`).
pub(crate) fn arbitrary_message(u: &mut Input) -> Message {
    match u.u8() % 13 {
        0 => Message::Hello {
            version: if u.bool() { PROTOCOL_VERSION } else { u.u16() },
            nonce: u.arr32(),
        },
        1 => Message::Challenge {
            nonce: u.arr32(),
            proof: u.arr32(),
        },
        2 => Message::Auth {
            proof: u.arr32(),
            layout: gen::layout(u),
            fence: u.u64_edge(),
        },
        3 => Message::Accept {
            last_applied: u.u64_edge(),
            lineage: u.arr32(),
        },
        4 => {
            let n = usize::from(u.u16() % 1400);
            let bytes = u.bytes(n);
            Message::Refuse {
                reason: String::from_utf8_lossy(bytes).into_owned(),
            }
        }
        5 => Message::EpochHeader(EpochHeader {
            epoch: u.u64_edge(),
            kind: if u.bool() {
                EpochKind::Checkpoint
            } else {
                EpochKind::Sync
            },
            page_count: u.u64_edge(),
            state_len: u.u64_edge() as u32,
        }),
        6 => Message::Commit {
            epoch: u.u64_edge(),
            checksum: u.u64(),
        },
        7 => Message::Ack {
            epoch: u.u64_edge(),
        },
        8 => Message::Heartbeat { seq: u.u64_edge() },
        9 => Message::Goodbye {
            last_epoch: u.u64_edge(),
        },
        10 => Message::RegionKey(RegionKey {
            addr: u.u64_edge(),
            len: u.u64_edge(),
            slot_stride: u.u64_edge(),
            rkey: u.u32(),
        }),
        11 => Message::BodyPlaced {
            slot: u.u32(),
            len: u.u64_edge(),
        },
        _ => Message::Ack { epoch: u.u64() },
    }
}

/// Decodes a whole frame (header and payload) as a control message.
pub(crate) fn decode_frame(frame: &[u8]) -> Result<Message, WireError> {
    let h = decode_frame_header(frame[..FRAME_HEADER_LEN].try_into().expect("16"), 0)?;
    assert_eq!(h.len as usize, frame.len() - FRAME_HEADER_LEN);
    wire::decode(h.ty, &frame[FRAME_HEADER_LEN..])
}

/// What a decoder gives back for `m` after `encode`: `None` when it must refuse it.
pub(crate) fn expected_after_wire(m: &Message) -> Option<Message> {
    match m {
        Message::Auth { layout, .. } if !gen::layout_valid(layout) => None,
        Message::EpochHeader(h) if h.epoch == 0 => None,
        Message::Refuse { reason } => {
            let mut end = reason.len().min(MAX_REASON_LEN);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            Some(Message::Refuse {
                reason: reason[..end].to_string(),
            })
        }
        m => Some(m.clone()),
    }
}

fn message_round_trip(u: &mut Input) {
    let m = arbitrary_message(u);
    let mut frame = Vec::new();
    wire::encode(&m, &mut frame);
    assert!(frame.len() as u64 <= FRAME_HEADER_LEN as u64 + MAX_CONTROL_LEN);
    let got = decode_frame(&frame);
    match expected_after_wire(&m) {
        Some(want) => {
            assert_eq!(got.as_ref(), Ok(&want), "{m:?} did not survive the wire");
            check_message(&want, msg_type(&want), &frame);
        }
        None => assert!(got.is_err(), "{m:?} should be refused, decoded as {got:?}"),
    }
    // An epoch body's header carries its length, checked against the caller's limit.
    let len = u.u64_edge();
    let max = u.u64_edge();
    let mut h = Vec::new();
    wire::encode_body_header(len, &mut h);
    let r = decode_frame_header(h[..].try_into().expect("16"), max);
    if len <= max {
        assert_eq!(
            r,
            Ok(FrameHeader {
                ty: MsgType::EpochBody,
                len
            })
        );
    } else {
        assert!(matches!(r, Err(WireError::TooLong { .. })), "{r:?}");
    }
}

/// A layout against the documented rules; for a valid one, epoch headers (body lengths) and
/// page indexes against theirs; the checksum and the proof comparison against their
/// definitions.
fn layout_rules(u: &mut Input) {
    let l = gen::layout(u);
    let valid = gen::layout_valid(&l);
    match l.validate() {
        Ok(()) => assert!(valid, "accepted an invalid layout {l:?}"),
        Err(e) => {
            assert!(!valid, "refused a valid layout {l:?}: {e}");
            assert!(matches!(e, WireError::Field { .. }), "{e:?}");
        }
    }
    if valid {
        // Total pages, body lengths and indexes are only ever computed for a valid layout.
        let total = gen::guest_bytes(&l) / gen::PAGE;
        assert_eq!(l.total_pages(), total);
        for _ in 0..1 + u.u8() % 4 {
            let h = EpochHeader {
                epoch: u.u64_edge(),
                kind: if u.bool() {
                    EpochKind::Checkpoint
                } else {
                    EpochKind::Sync
                },
                page_count: match u.u8() % 3 {
                    0 => u.near(total),
                    1 => u64::from(u.u8()),
                    _ => u.u64_edge(),
                },
                state_len: match u.u8() % 3 {
                    0 => u.near(u64::from(MAX_STATE_LEN)) as u32,
                    1 => u32::from(u.u8()),
                    _ => u.u32(),
                },
            };
            match (h.body_len(&l), gen::body_len(&h, &l)) {
                (Ok(a), Some(b)) => assert_eq!(a, b, "{h:?}"),
                (Err(e), None) => assert!(matches!(e, WireError::Field { .. }), "{e:?}"),
                (got, want) => panic!("{h:?} on {l:?}: body_len {got:?}, expected {want:?}"),
            }
        }
        let count = (u.u8() % 64) as usize;
        let index = gen::index(u, &l, count);
        let got = wire::validate_index(&index, &l);
        match (got, gen::index_first_bad(&index, &l)) {
            (Ok(()), None) => {}
            (Err(e), Some(bad)) => {
                let (entry, addr) = match e {
                    WireError::IndexUnaligned { entry, addr } => {
                        assert_ne!(addr % gen::PAGE, 0);
                        (entry, addr)
                    }
                    WireError::IndexOutside { entry, addr } => (entry, addr),
                    WireError::IndexOrder { entry, addr, prev } => {
                        assert!(entry > 0 && index[entry - 1] == prev && addr <= prev);
                        (entry, addr)
                    }
                    e => panic!("validate_index gave {e:?}"),
                };
                assert_eq!((entry, addr), (bad, index[bad]), "{index:x?}");
            }
            (got, want) => panic!("index {index:x?} on {l:?}: {got:?}, first bad {want:?}"),
        }
    }
    // The checksum is xxh3-64 of the concatenation, however the body is split.
    let n = usize::from(u.u16() % 9000);
    let body = u.bytes(n);
    let a = u.below(body.len() as u64 + 1) as usize;
    let b = a + u.below((body.len() - a) as u64 + 1) as usize;
    assert_eq!(
        wire::checksum(&[&body[..a], &body[a..b], &body[b..]]),
        xxhash_rust::xxh3::xxh3_64(body)
    );
    // Proofs compare equal exactly when they are equal.
    let p = u.arr32();
    let mut q = p;
    if u.bool() {
        q[usize::from(u.u8() % 32)] ^= 1 << (u.u8() % 8);
    }
    assert_eq!(auth::proofs_equal(&p, &q), p == q);
}
