//! Frames: the one network protocol for both hops (agent → collector and
//! collector → target). TLS, when configured, wraps the byte stream; the
//! frames are the same.
//!
//! ```text
//!  byte 0        4     5      6        8            12           16
//!       +--------+-----+------+--------+------------+------------+
//!       | magic  | ver | type | flags  | body_len   | crc32c     |
//!       | "TMWF" | u8  | u8   | u16=0  | u32        | of 0..12   |
//!       |        |     |      |        | ≤ MAX_BODY | + body     |
//!       +--------+-----+------+--------+------------+------------+
//!    16 | body (body_len bytes), by type:                        |
//!       |  1 Hello   proto u16, role u8, disk_uuid [16],         |
//!       |            id_len u8, disk_id, token_len u16, token    |
//!       |  2 Welcome acked_seq u64 (highest durable seq held)    |
//!       |  3 Batch   first_seq u64, count u32, count records     |
//!       |            (tidemark_wire::record), seqs consecutive   |
//!       |  4 Ack     seq u64 (every seq ≤ it is durable)         |
//!       |  5 Error   code u16, reason_len u16, reason (UTF-8)    |
//!       +--------------------------------------------------------+
//! ```
//!
//! A reader takes the 16-byte header first, and [`FrameHeader::parse`]
//! bounds `body_len` before anything is allocated. The checksum covers the
//! header and the body; each record in a batch also carries its own blake3,
//! checked end to end at the target.

use crate::record::{Record, MAX_PAYLOAD};
use crate::{WireError, WireErrorKind};

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Magic at the start of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"TMWF";
/// The frame format version this code writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// The protocol version carried in Hello.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest body: one maximal record plus headroom for a batch of small ones.
pub const MAX_BODY: u32 = MAX_PAYLOAD + (8 << 20);
/// Longest error reason, in bytes.
pub const MAX_REASON: usize = 1024;
/// Longest shared-secret token.
pub const MAX_TOKEN: usize = 4096;

fn err(kind: WireErrorKind, msg: impl Into<String>) -> WireError {
    WireError { kind, msg: msg.into() }
}

/// Who is saying Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent = 1,
    Collector = 2,
}

/// Why a peer refused or stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadToken = 1,
    UnsupportedVersion = 2,
    DiskMismatch = 3,
    Malformed = 4,
    Internal = 5,
    Busy = 6,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::BadToken,
            2 => Self::UnsupportedVersion,
            3 => Self::DiskMismatch,
            4 => Self::Malformed,
            5 => Self::Internal,
            6 => Self::Busy,
            _ => return None,
        })
    }
}

/// The first frame on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u16,
    pub role: Role,
    pub disk_uuid: [u8; 16],
    pub disk_id: String,
    pub token: Vec<u8>,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// The receiver accepted the Hello; it durably holds every seq ≤ `acked_seq`.
    Welcome {
        acked_seq: u64,
    },
    /// Records with consecutive seqs.
    Batch(Vec<Record>),
    /// Every seq ≤ `seq` is durable at the receiver.
    Ack {
        seq: u64,
    },
    Error {
        code: ErrorCode,
        reason: String,
    },
}

/// A parsed, bounded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub body_len: u32,
    crc: u32,
}

impl FrameHeader {
    /// Parse and bound a header; the body is checked by [`Frame::decode`].
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < FRAME_HEADER_LEN {
            return Err(err(
                WireErrorKind::Truncated,
                format!("frame header needs 16 bytes, have {}", b.len()),
            ));
        }
        if b[0..4] != FRAME_MAGIC {
            return Err(err(WireErrorKind::Corrupt, "bad frame magic"));
        }
        if b[4] != FRAME_VERSION {
            return Err(err(
                WireErrorKind::UnsupportedVersion,
                format!("frame version {} (this build speaks {FRAME_VERSION})", b[4]),
            ));
        }
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags != 0 {
            return Err(err(WireErrorKind::Corrupt, format!("unknown frame flags {flags:#x}")));
        }
        let body_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if body_len > MAX_BODY {
            return Err(err(
                WireErrorKind::OutOfBounds,
                format!("frame body of {body_len} bytes exceeds the {MAX_BODY}-byte maximum"),
            ));
        }
        Ok(Self {
            kind: b[5],
            body_len,
            crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        })
    }

    /// Header plus body.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.body_len as usize
    }
}

/// A cursor over a body that never reads past its end.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(err(WireErrorKind::Truncated, format!("frame body ends inside {what}")));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn end(&self, what: &str) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(err(
                WireErrorKind::Corrupt,
                format!("{} bytes after the end of {what}", self.0.len()),
            ))
        }
    }
}

/// Disk ids: 1–64 of `[A-Za-z0-9._-]`.
fn valid_disk_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && id != "."
        && id != ".."
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Welcome { .. } => 2,
            Frame::Batch(_) => 3,
            Frame::Ack { .. } => 4,
            Frame::Error { .. } => 5,
        }
    }

    /// Encode into one buffer. Fails if a field is out of bounds (a disk id
    /// or token too long, a batch larger than a frame may be, seqs that are
    /// not consecutive).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut body = Vec::new();
        match self {
            Frame::Hello(h) => {
                if !valid_disk_id(&h.disk_id) {
                    return Err(err(
                        WireErrorKind::OutOfBounds,
                        format!("disk id {:?} is not 1-64 of [A-Za-z0-9._-]", h.disk_id),
                    ));
                }
                if h.token.len() > MAX_TOKEN {
                    return Err(err(WireErrorKind::OutOfBounds, "token longer than 4096 bytes"));
                }
                body.extend_from_slice(&h.protocol.to_le_bytes());
                body.push(h.role as u8);
                body.extend_from_slice(&h.disk_uuid);
                body.push(u8::try_from(h.disk_id.len()).unwrap_or(0));
                body.extend_from_slice(h.disk_id.as_bytes());
                body.extend_from_slice(&u16::try_from(h.token.len()).unwrap_or(0).to_le_bytes());
                body.extend_from_slice(&h.token);
            }
            Frame::Welcome { acked_seq } => body.extend_from_slice(&acked_seq.to_le_bytes()),
            Frame::Batch(records) => {
                let first = records
                    .first()
                    .map(|r| r.header.seq)
                    .ok_or_else(|| err(WireErrorKind::OutOfBounds, "an empty batch"))?;
                for (i, r) in records.iter().enumerate() {
                    if Some(r.header.seq) != first.checked_add(i as u64) {
                        return Err(err(WireErrorKind::Corrupt, "batch seqs are not consecutive"));
                    }
                }
                body.extend_from_slice(&first.to_le_bytes());
                let count =
                    u32::try_from(records.len()).map_err(|_| err(WireErrorKind::OutOfBounds, "batch too long"))?;
                body.extend_from_slice(&count.to_le_bytes());
                for r in records {
                    body.extend_from_slice(&r.encode());
                }
            }
            Frame::Ack { seq } => body.extend_from_slice(&seq.to_le_bytes()),
            Frame::Error { code, reason } => {
                // Long reasons are cut at a character boundary.
                let mut cut = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                let reason = &reason.as_bytes()[..cut];
                body.extend_from_slice(&(*code as u16).to_le_bytes());
                body.extend_from_slice(&u16::try_from(reason.len()).unwrap_or(0).to_le_bytes());
                body.extend_from_slice(reason);
            }
        }
        let body_len = u32::try_from(body.len())
            .ok()
            .filter(|l| *l <= MAX_BODY)
            .ok_or_else(|| {
                err(
                    WireErrorKind::OutOfBounds,
                    format!("frame body of {} bytes is too large", body.len()),
                )
            })?;
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
        out.extend_from_slice(&FRAME_MAGIC);
        out.push(FRAME_VERSION);
        out.push(self.kind());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[0..12]), &body);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decode one frame from the front of `b`; returns it and the bytes used.
    /// Every record of a batch is verified (header checksum, payload hash)
    /// and its seq checked.
    pub fn decode(b: &[u8]) -> Result<(Self, usize), WireError> {
        let h = FrameHeader::parse(b)?;
        let total = h.frame_len();
        if b.len() < total {
            return Err(err(
                WireErrorKind::Truncated,
                format!("frame needs {total} bytes, have {}", b.len()),
            ));
        }
        let body = &b[FRAME_HEADER_LEN..total];
        if crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), body) != h.crc {
            return Err(err(WireErrorKind::Corrupt, "frame checksum mismatch"));
        }
        let mut c = Body(body);
        let f = match h.kind {
            1 => {
                let protocol = c.u16("hello")?;
                let role = match c.u8("hello")? {
                    1 => Role::Agent,
                    2 => Role::Collector,
                    r => return Err(err(WireErrorKind::Corrupt, format!("unknown role {r}"))),
                };
                let mut disk_uuid = [0u8; 16];
                disk_uuid.copy_from_slice(c.take(16, "hello disk uuid")?);
                let n = c.u8("hello")? as usize;
                let disk_id = std::str::from_utf8(c.take(n, "hello disk id")?)
                    .ok()
                    .filter(|s| valid_disk_id(s))
                    .ok_or_else(|| err(WireErrorKind::Corrupt, "hello disk id is not 1-64 of [A-Za-z0-9._-]"))?
                    .to_string();
                let t = c.u16("hello")? as usize;
                if t > MAX_TOKEN {
                    return Err(err(WireErrorKind::OutOfBounds, "hello token longer than 4096 bytes"));
                }
                let token = c.take(t, "hello token")?.to_vec();
                Frame::Hello(Hello {
                    protocol,
                    role,
                    disk_uuid,
                    disk_id,
                    token,
                })
            }
            2 => Frame::Welcome {
                acked_seq: c.u64("welcome")?,
            },
            3 => {
                let first = c.u64("batch")?;
                let count = c.u32("batch")?;
                if count == 0 {
                    return Err(err(WireErrorKind::Corrupt, "an empty batch"));
                }
                let mut records = Vec::new();
                for i in 0..u64::from(count) {
                    let (r, used) = Record::decode(c.0)?;
                    if Some(r.header.seq) != first.checked_add(i) {
                        return Err(err(
                            WireErrorKind::Corrupt,
                            format!(
                                "batch record {i} has seq {}, expected {}",
                                r.header.seq,
                                first.saturating_add(i)
                            ),
                        ));
                    }
                    c.take(used, "batch record")?;
                    records.push(r);
                }
                Frame::Batch(records)
            }
            4 => Frame::Ack { seq: c.u64("ack")? },
            5 => {
                let code = c.u16("error")?;
                let code = ErrorCode::from_u16(code)
                    .ok_or_else(|| err(WireErrorKind::Corrupt, format!("unknown error code {code}")))?;
                let n = c.u16("error")? as usize;
                if n > MAX_REASON {
                    return Err(err(WireErrorKind::OutOfBounds, "error reason longer than 1024 bytes"));
                }
                let reason = std::str::from_utf8(c.take(n, "error reason")?)
                    .map_err(|_| err(WireErrorKind::Corrupt, "error reason is not UTF-8"))?
                    .to_string();
                Frame::Error { code, reason }
            }
            k => return Err(err(WireErrorKind::Corrupt, format!("unknown frame type {k}"))),
        };
        c.end("the frame")?;
        Ok((f, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecordHeader, RecordKind};
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn rec(seq: u64, data: &[u8]) -> Record {
        Record {
            header: RecordHeader::new(RecordKind::Write, seq, 0, 512, data.len() as u64, data),
            payload: data.to_vec(),
        }
    }

    /// Pins frame version 1: a change to these bytes needs a version bump.
    #[test]
    fn golden_bytes_v1() {
        let hello = Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Agent,
            disk_uuid: [0x11; 16],
            disk_id: "db".into(),
            token: b"s3".to_vec(),
        });
        assert_eq!(
            hex(&hello.encode().unwrap()),
            concat!(
                "544d5746",
                "01",
                "01",
                "0000",
                "1a000000",
                "e660fbf4", // magic ver type flags len crc
                "0100",
                "01",
                "11111111111111111111111111111111", // protocol role uuid
                "02",
                "6462",
                "0200",
                "7333" // id "db", token "s3"
            )
        );
        let ack = Frame::Ack { seq: 7 }.encode().unwrap();
        assert_eq!(hex(&ack), "544d57460104000008000000d64404d30700000000000000");
        let e = Frame::Error {
            code: ErrorCode::BadToken,
            reason: "no".into(),
        }
        .encode()
        .unwrap();
        assert_eq!(hex(&e), "544d5746010500000600000078e27fed010002006e6f");
    }

    #[test]
    fn bounds_and_garbage_are_named() {
        let mut big = Frame::Ack { seq: 1 }.encode().unwrap();
        big[8..12].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert_eq!(FrameHeader::parse(&big).unwrap_err().kind, WireErrorKind::OutOfBounds);
        let mut v2 = Frame::Ack { seq: 1 }.encode().unwrap();
        v2[4] = 2;
        assert_eq!(Frame::decode(&v2).unwrap_err().kind, WireErrorKind::UnsupportedVersion);
        let ok = Frame::Ack { seq: 1 }.encode().unwrap();
        assert_eq!(Frame::decode(&ok[..10]).unwrap_err().kind, WireErrorKind::Truncated);
        assert_eq!(Frame::decode(&ok[..20]).unwrap_err().kind, WireErrorKind::Truncated);
        assert!(Frame::decode(b"GET / HTTP/1.1\r\n\r\n")
            .unwrap_err()
            .msg
            .contains("magic"));
        let gap = Frame::Batch(vec![rec(5, b"a"), rec(7, b"b")]);
        assert!(gap.encode().is_err());
        assert!(Frame::Batch(vec![]).encode().is_err());
        let bad_id = Frame::Hello(Hello {
            protocol: 1,
            role: Role::Agent,
            disk_uuid: [0; 16],
            disk_id: "a/b".into(),
            token: vec![],
        });
        assert!(bad_id.encode().is_err());
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                "[a-z0-9._-]{1,64}",
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<[u8; 16]>(),
                any::<bool>()
            )
                .prop_filter("not . or ..", |(id, ..)| id != "." && id != "..")
                .prop_map(|(id, token, uuid, agent)| Frame::Hello(Hello {
                    protocol: PROTOCOL_VERSION,
                    role: if agent { Role::Agent } else { Role::Collector },
                    disk_uuid: uuid,
                    disk_id: id,
                    token,
                })),
            any::<u64>().prop_map(|s| Frame::Welcome { acked_seq: s }),
            any::<u64>().prop_map(|s| Frame::Ack { seq: s }),
            "[ -~]{0,100}".prop_map(|r| Frame::Error {
                code: ErrorCode::Internal,
                reason: r
            }),
            (
                1u64..1 << 40,
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..8)
            )
                .prop_map(|(first, datas)| Frame::Batch(
                    datas
                        .iter()
                        .enumerate()
                        .map(|(i, d)| rec(first + i as u64, d))
                        .collect()
                )),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(f in arb_frame()) {
            let enc = f.encode().unwrap();
            let (dec, used) = Frame::decode(&enc).unwrap();
            prop_assert_eq!(used, enc.len());
            prop_assert_eq!(dec, f);
        }

        #[test]
        fn any_flipped_bit_is_caught(f in arb_frame(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut enc = f.encode().unwrap();
            let i = pos.index(enc.len());
            enc[i] ^= 1 << bit;
            prop_assert!(Frame::decode(&enc).is_err());
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::decode(&b);
        }
    }
}
