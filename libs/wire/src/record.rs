//! The change record: one ordered event on a protected disk.
//!
//! ```text
//!  byte  0        4     5     6        8              16             24
//!        +--------+-----+-----+--------+--------------+--------------+
//!        | magic  | ver |kind | flags  |     seq      |   time_ns    |
//!        | "TMRC" | u8  | u8  |  u16   |     u64      |     u64      |
//!        +--------+-----+-----+--------+--------------+--------------+
//!    24  |    offset (u64)   |  length (u64)  | payload_len (u32)   |
//!    44  |            blake3 of the payload (32 bytes)              |
//!    76  | crc32c of bytes 0..76 (u32) |
//!    80  +-----------------------------+
//!        | payload (payload_len bytes): data for Write/Sync, the    |
//!        | UTF-8 name for Tag, nothing for the others               |
//!        +----------------------------------------------------------+
//! ```
//!
//! All integers are little-endian. `length` is the number of disk bytes the
//! record covers (the data length for Write/Sync, the range for Zero/Trim, 0
//! otherwise). The disk a record belongs to is implied by its container (a
//! journal segment or a wire batch), which names the disk once.
//!
//! The header checksum catches torn and corrupt headers before anything is
//! allocated; the blake3 hash travels end to end and is checked before a
//! record is applied anywhere.

use std::fmt;

/// Bytes in an encoded record header.
pub const HEADER_LEN: usize = 80;
/// Magic at the start of every record header.
pub const MAGIC: [u8; 4] = *b"TMRC";
/// The record format version this code writes.
pub const VERSION: u8 = 1;
/// Largest payload a record may carry (the NBD maximum request size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest tag name, in bytes.
pub const MAX_TAG_LEN: u32 = 255;
/// Flag on a Tag record: the point is application-consistent (freeze/VSS).
pub const FLAG_APP_CONSISTENT: u16 = 1;
/// Zero flag: the range was produced by a sync (initial sync or resync),
/// not by a client write.
pub const FLAG_SYNC: u16 = 2;
/// Sync, Zero (with [`FLAG_SYNC`]), SyncBegin and SyncDone flag: part of a
/// whole-disk sync. On SyncDone, `offset` is the seq at which that sync
/// started (its SyncBegin).
pub const FLAG_FULL: u16 = 4;

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// New data written by the client at `offset`.
    Write = 1,
    /// `length` bytes at `offset` now read as zeros (WRITE_ZEROES).
    Zero = 2,
    /// `length` bytes at `offset` were discarded; they read as zeros.
    Trim = 3,
    /// Everything before this record was made durable by the client.
    Flush = 4,
    /// A named consistency point; the payload is the name.
    Tag = 5,
    /// Initial-sync or resync data for `offset`.
    Sync = 6,
    /// The initial sync or resync that began earlier is complete.
    SyncDone = 7,
    /// A sync begins: until the SyncDone whose `offset` is this record's seq
    /// (or later), the replica is not a consistent copy of the source.
    SyncBegin = 8,
}

impl RecordKind {
    /// Decode a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Trim,
            4 => Self::Flush,
            5 => Self::Tag,
            6 => Self::Sync,
            7 => Self::SyncDone,
            8 => Self::SyncBegin,
            _ => return None,
        })
    }

    /// Lower-case name used in dumps and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Zero => "zero",
            Self::Trim => "trim",
            Self::Flush => "flush",
            Self::Tag => "tag",
            Self::Sync => "sync",
            Self::SyncDone => "sync-done",
            Self::SyncBegin => "sync-begin",
        }
    }

    /// Whether the payload is disk data covering `length` bytes.
    pub fn carries_data(self) -> bool {
        matches!(self, Self::Write | Self::Sync)
    }

    /// Whether applying it changes `offset..offset+length` of the disk.
    pub fn changes_disk(self) -> bool {
        matches!(self, Self::Write | Self::Zero | Self::Trim | Self::Sync)
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The broad class of a [`WireError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireErrorKind {
    /// Bytes that do not form a valid record (bad magic, checksum, hash, or
    /// fields that contradict each other).
    Corrupt,
    /// A record written by a format version this code does not read.
    UnsupportedVersion,
    /// A length or offset beyond what the format allows.
    OutOfBounds,
    /// Fewer bytes than the header or payload needs.
    Truncated,
}

/// A record that could not be decoded; the message says which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {msg}")]
pub struct WireError {
    /// Broad class, for callers that react differently (torn tail vs corruption).
    pub kind: WireErrorKind,
    /// What exactly was wrong.
    pub msg: String,
}

impl WireError {
    fn new(kind: WireErrorKind, msg: impl Into<String>) -> Self {
        Self { kind, msg: msg.into() }
    }
}

/// A decoded record header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u16,
    pub seq: u64,
    /// Wall-clock time the record was created, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub offset: u64,
    pub length: u64,
    pub payload_len: u32,
    /// blake3 of the payload.
    pub hash: [u8; 32],
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl RecordHeader {
    /// Build a header for `payload`, hashing it. `length` is taken from the
    /// payload for data records.
    pub fn new(kind: RecordKind, seq: u64, time_ns: u64, offset: u64, length: u64, payload: &[u8]) -> Self {
        Self::with_hash(
            kind,
            seq,
            time_ns,
            offset,
            length,
            payload.len(),
            *blake3::hash(payload).as_bytes(),
        )
    }

    /// Build a header whose payload hash was computed by the caller (so the
    /// hash can be computed outside a lock).
    pub fn with_hash(
        kind: RecordKind,
        seq: u64,
        time_ns: u64,
        offset: u64,
        length: u64,
        payload_len: usize,
        hash: [u8; 32],
    ) -> Self {
        Self {
            kind,
            flags: 0,
            seq,
            time_ns,
            offset,
            length,
            payload_len: u32::try_from(payload_len).unwrap_or(u32::MAX),
            hash,
        }
    }

    /// Encode into the fixed 80-byte layout.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.time_ns.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..44].copy_from_slice(&self.payload_len.to_le_bytes());
        b[44..76].copy_from_slice(&self.hash);
        let crc = crc32c::crc32c(&b[0..76]);
        b[76..80].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate a header. Checks magic, version, checksum, the
    /// kind, and that the fields agree with each other; the payload is
    /// checked separately with [`RecordHeader::verify_payload`].
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < HEADER_LEN {
            return Err(WireError::new(
                WireErrorKind::Truncated,
                format!("record header needs {HEADER_LEN} bytes, have {}", b.len()),
            ));
        }
        if b[0..4] != MAGIC {
            return Err(WireError::new(WireErrorKind::Corrupt, "bad record magic"));
        }
        let want = rd_u32(b, 76);
        let got = crc32c::crc32c(&b[0..76]);
        if want != got {
            return Err(WireError::new(
                WireErrorKind::Corrupt,
                format!("record header checksum mismatch (stored {want:#010x}, computed {got:#010x})"),
            ));
        }
        if b[4] != VERSION {
            return Err(WireError::new(
                WireErrorKind::UnsupportedVersion,
                format!("record version {} (this build reads {VERSION})", b[4]),
            ));
        }
        let kind = RecordKind::from_u8(b[5])
            .ok_or_else(|| WireError::new(WireErrorKind::Corrupt, format!("unknown record kind {}", b[5])))?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[44..76]);
        let h = Self {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            seq: rd_u64(b, 8),
            time_ns: rd_u64(b, 16),
            offset: rd_u64(b, 24),
            length: rd_u64(b, 32),
            payload_len: rd_u32(b, 40),
            hash,
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), WireError> {
        let bad = |m: String| Err(WireError::new(WireErrorKind::Corrupt, m));
        if self.payload_len > MAX_PAYLOAD {
            return Err(WireError::new(
                WireErrorKind::OutOfBounds,
                format!(
                    "seq {}: payload of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
                    self.seq, self.payload_len
                ),
            ));
        }
        if self.offset.checked_add(self.length).is_none() {
            return Err(WireError::new(
                WireErrorKind::OutOfBounds,
                format!(
                    "seq {}: offset {} + length {} overflows",
                    self.seq, self.offset, self.length
                ),
            ));
        }
        match self.kind {
            RecordKind::Write | RecordKind::Sync => {
                if self.length == 0 || self.length != u64::from(self.payload_len) {
                    return bad(format!(
                        "seq {}: {} record with length {} but payload {}",
                        self.seq, self.kind, self.length, self.payload_len
                    ));
                }
            }
            RecordKind::Zero | RecordKind::Trim => {
                if self.payload_len != 0 || self.length == 0 {
                    return bad(format!(
                        "seq {}: {} record must cover bytes and carry no payload",
                        self.seq, self.kind
                    ));
                }
            }
            RecordKind::Flush | RecordKind::SyncDone | RecordKind::SyncBegin => {
                if self.payload_len != 0 || self.length != 0 {
                    return bad(format!("seq {}: {} record must carry no range", self.seq, self.kind));
                }
            }
            RecordKind::Tag => {
                if self.payload_len == 0 || self.payload_len > MAX_TAG_LEN || self.length != 0 {
                    return bad(format!("seq {}: tag name must be 1..={MAX_TAG_LEN} bytes", self.seq));
                }
            }
        }
        let allowed = match self.kind {
            RecordKind::Tag => FLAG_APP_CONSISTENT,
            RecordKind::Zero => FLAG_SYNC | FLAG_FULL,
            RecordKind::Sync | RecordKind::SyncDone | RecordKind::SyncBegin => FLAG_FULL,
            _ => 0,
        };
        if self.flags & !allowed != 0 || (self.kind == RecordKind::Zero && self.flags == FLAG_FULL) {
            return bad(format!(
                "seq {}: unknown flags {:#x} on a {} record",
                self.seq, self.flags, self.kind
            ));
        }
        Ok(())
    }

    /// Check a payload against this header's length and hash.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), WireError> {
        if payload.len() != self.payload_len as usize {
            return Err(WireError::new(
                WireErrorKind::Truncated,
                format!(
                    "seq {}: payload has {} bytes, header says {}",
                    self.seq,
                    payload.len(),
                    self.payload_len
                ),
            ));
        }
        if blake3::hash(payload).as_bytes() != &self.hash {
            return Err(WireError::new(
                WireErrorKind::Corrupt,
                format!("seq {}: payload blake3 mismatch", self.seq),
            ));
        }
        if self.kind == RecordKind::Tag && std::str::from_utf8(payload).is_err() {
            return Err(WireError::new(
                WireErrorKind::Corrupt,
                format!("seq {}: tag name is not UTF-8", self.seq),
            ));
        }
        Ok(())
    }

    /// Total encoded size of header plus payload.
    pub fn encoded_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.payload_len)
    }

    /// Whether this Tag marks an application-consistent point.
    pub fn app_consistent(&self) -> bool {
        self.flags & FLAG_APP_CONSISTENT != 0
    }
}

/// A header with its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    pub payload: Vec<u8>,
}

impl Record {
    /// Decode one record from the front of `b`, verifying the payload hash.
    /// Returns the record and the number of bytes it used.
    pub fn decode(b: &[u8]) -> Result<(Self, usize), WireError> {
        let header = RecordHeader::decode(b)?;
        let end = HEADER_LEN + header.payload_len as usize;
        if b.len() < end {
            return Err(WireError::new(
                WireErrorKind::Truncated,
                format!("seq {}: record needs {end} bytes, have {}", header.seq, b.len()),
            ));
        }
        let payload = b[HEADER_LEN..end].to_vec();
        header.verify_payload(&payload)?;
        Ok((Self { header, payload }, end))
    }

    /// Encode header and payload into one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header.encode());
        v.extend_from_slice(&self.payload);
        v
    }

    /// The tag name of a Tag record.
    pub fn tag_name(&self) -> Option<&str> {
        (self.header.kind == RecordKind::Tag)
            .then(|| std::str::from_utf8(&self.payload).ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOLDEN_V1: &str = concat!(
        "544d524301010000",                                                 // magic ver kind flags
        "0700000000000000",                                                 // seq
        "00002a36fe9c9717",                                                 // time_ns
        "0010000000000000",                                                 // offset
        "0400000000000000",                                                 // length
        "04000000",                                                         // payload_len
        "8c9c9881805d1a847102d7a42e58b990d088dd88a84f7314d71c838107571f2b", // blake3
        "e557ec68",                                                         // crc32c
        "61626364",                                                         // payload
    );

    /// Pins format version 1: if these bytes change, the version must change.
    #[test]
    fn golden_bytes_v1() {
        let r = Record {
            header: RecordHeader::new(RecordKind::Write, 7, 1_700_000_000_000_000_000, 4096, 4, b"abcd"),
            payload: b"abcd".to_vec(),
        };
        let enc = r.encode();
        let hex: String = enc.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_V1);
    }

    #[test]
    fn rejects_bad_headers() {
        let h = RecordHeader::new(RecordKind::Write, 1, 0, 0, 3, b"xyz");
        let mut b = h.encode();
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        b[10] ^= 1;
        assert_eq!(RecordHeader::decode(&b).unwrap_err().kind, WireErrorKind::Corrupt);
        assert_eq!(
            RecordHeader::decode(&b[..10]).unwrap_err().kind,
            WireErrorKind::Truncated
        );
        let mut big = h.clone();
        big.payload_len = MAX_PAYLOAD + 1;
        big.length = u64::from(MAX_PAYLOAD) + 1;
        assert_eq!(
            RecordHeader::decode(&big.encode()).unwrap_err().kind,
            WireErrorKind::OutOfBounds
        );
        let mut v2 = h.encode();
        v2[4] = 2;
        let crc = crc32c::crc32c(&v2[0..76]);
        v2[76..80].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            RecordHeader::decode(&v2).unwrap_err().kind,
            WireErrorKind::UnsupportedVersion
        );
        assert!(h.verify_payload(b"xyZ").is_err());
        let zero_with_payload = RecordHeader::new(RecordKind::Zero, 1, 0, 0, 3, b"xyz");
        assert!(RecordHeader::decode(&zero_with_payload.encode()).is_err());
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            1u8..=8,
            any::<u64>(),
            any::<u64>(),
            0u64..(1 << 40),
            1u64..(1 << 30),
            proptest::collection::vec(any::<u8>(), 1..600),
            any::<bool>(),
        )
            .prop_map(|(k, seq, t, off, len, data, app)| {
                let kind = RecordKind::from_u8(k).unwrap();
                let (length, payload) = match kind {
                    RecordKind::Write | RecordKind::Sync => (data.len() as u64, data),
                    RecordKind::Zero | RecordKind::Trim => (len, vec![]),
                    RecordKind::Tag => (0, format!("tag-{}", data.len()).into_bytes()),
                    RecordKind::Flush | RecordKind::SyncDone | RecordKind::SyncBegin => (0, vec![]),
                };
                let off = if length == 0 { 0 } else { off };
                let mut header = RecordHeader::new(kind, seq, t, off, length, &payload);
                if kind == RecordKind::Tag && app {
                    header.flags = FLAG_APP_CONSISTENT;
                }
                Record { header, payload }
            })
    }

    proptest! {
        #[test]
        fn round_trip(r in arb_record()) {
            let enc = r.encode();
            let (dec, used) = Record::decode(&enc).unwrap();
            prop_assert_eq!(used, enc.len());
            prop_assert_eq!(dec, r);
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&b);
        }

        #[test]
        fn any_flipped_bit_is_caught(r in arb_record(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut enc = r.encode();
            let i = pos.index(enc.len());
            enc[i] ^= 1 << bit;
            prop_assert!(Record::decode(&enc).is_err());
        }
    }
}
