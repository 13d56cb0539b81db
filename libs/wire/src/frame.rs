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
//!       |  1 Hello   proto u16, role u8, flags u32,              |
//!       |            disk_uuid [16], disk_size u64, id_len u8,   |
//!       |            disk_id, token_len u16, token,              |
//!       |            generation [16], parent [16], fork_seq u64  |
//!       |  2 Welcome acked_seq u64 (highest durable seq held),   |
//!       |            flags u32, generation [16]                  |
//!       |  3 Batch   first_seq u64, count u32, count records     |
//!       |            (tidemark_wire::record), seqs consecutive   |
//!       |  4 Ack     seq u64 (every seq ≤ it is durable)         |
//!       |  5 Error   code u16, reason_len u16, reason (UTF-8)    |
//!       |  6 Progress source_seq u64, mode u8, sync_done u64,    |
//!       |            sync_total u64, full_resyncs u64,           |
//!       |            backlog_bytes u64, written_bytes u64,       |
//!       |            time_ns u64, nonce u64                      |
//!       |  7 Request kind u8 (1 status-now, 2 resync, 3 full     |
//!       |            resync, 4 quiesce), seq u64 (status-now,    |
//!       |            quiesce: its nonce),                        |
//!       |            offset u64, length u64                      |
//!       |  8 Packed  first_seq u64, count u32, flags u32,        |
//!       |            raw_len u32, zstd data (see crate::pack)    |
//!       |  9 TargetState applied_seq u64, state u8,             |
//!       |            halted_seq u64, pending_bytes u64           |
//!       | 10 HashQuery offset u64, length u64 (both multiples   |
//!       |            of HASH_CHUNK, length ≤ MAX_HASH_SPAN)      |
//!       | 11 ChunkHashes offset u64, count u32, count × blake3  |
//!       |            [32] of the HASH_CHUNK chunks from offset   |
//!       |            (count 0: not compared, send the data)      |
//!       | 12 Enroll  token_len u16, token (UTF-8; empty: a       |
//!       |            renewal by an authenticated peer),          |
//!       |            key_len u16, public key (raw, ≤ 1024)       |
//!       | 13 Enrolled cert_len u16, certificate PEM, ca_len u16, |
//!       |            CA certificate PEM (each ≤ 16 KiB)          |
//!       | 14 Crl     crl_len u32, revocation list PEM (≤ 1 MiB;  |
//!       |            empty: a request for the CA's list)         |
//!       | 15 Call    nonce u64, len u32, JSON request (UTF-8,    |
//!       |            ≤ 64 KiB): an operator's question down the  |
//!       |            line (collector → target, collector → agent)|
//!       | 16 Reply   nonce u64, ok u8, len u32, JSON answer      |
//!       |            (UTF-8, ≤ 4 MiB) to the Call with that nonce|
//!       +--------------------------------------------------------+
//! ```
//!
//! A reader takes the 16-byte header first, and [`FrameHeader::parse`]
//! bounds `body_len` before anything is allocated. The checksum covers the
//! header and the body; each record in a batch also carries its own blake3,
//! checked end to end at the target.

use crate::disk_id::DiskId;
use crate::pack::{PackedBatch, MAX_RAW};
use crate::record::{Record, MAX_PAYLOAD};
use crate::{WireError, WireErrorKind};

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Magic at the start of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"TMWF";
/// The frame format version this code writes and reads. Version 1 (no
/// flags in Hello and Welcome, no types 6–9), version 2 (no generations
/// in Hello and Welcome), version 3 (no types 10–11) and version 4 (no
/// types 15–16) were never spoken by a release.
pub const FRAME_VERSION: u8 = 5;
/// The protocol version carried in Hello.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest body: one maximal record plus headroom for a batch of small ones.
pub const MAX_BODY: u32 = MAX_PAYLOAD + (8 << 20);
/// The chunk a hash-compare resync compares (docs/failback.md, section 4):
/// chunks are aligned on it from the start of the disk; the last one ends
/// at the disk's end.
pub const HASH_CHUNK: u64 = 64 << 10;
/// Most bytes one [`Frame::HashQuery`] may ask about (512 hashes).
pub const MAX_HASH_SPAN: u64 = 32 << 20;
/// Longest error reason, in bytes.
pub const MAX_REASON: usize = 1024;
/// Longest shared-secret token.
pub const MAX_TOKEN: usize = 4096;
/// Hello flag: the sender was told to rebind this disk id to a new UUID
/// (`--force-resync`); the receiver drops what it held for the old one.
pub const HELLO_FORCE_RESYNC: u32 = 1;
/// Welcome flag: the receiver holds no usable history for this disk UUID;
/// the sender must make sure a whole-disk sync follows.
pub const WELCOME_NEED_FULL_SYNC: u32 = 1;
/// Packed flag: records before this batch were lost; the target accepts
/// the gap and waits for a full sync.
pub const PACKED_GAP: u32 = 1;

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
    /// The sender's data generation ended with a failover: it is fenced.
    StaleGeneration = 7,
    /// The peer's identity (its certificate) may not do this: another
    /// identity's disk, or a role that is not the one this listener takes.
    Forbidden = 8,
}

/// In the operator's words, for messages and logs.
impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BadToken => "bad token",
            Self::UnsupportedVersion => "unsupported protocol version",
            Self::DiskMismatch => "disk mismatch",
            Self::Malformed => "malformed frame",
            Self::Internal => "internal error",
            Self::Busy => "busy",
            Self::StaleGeneration => "stale generation",
            Self::Forbidden => "forbidden for this identity",
        })
    }
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
            7 => Self::StaleGeneration,
            8 => Self::Forbidden,
            _ => return None,
        })
    }
}

/// The first frame on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u16,
    pub role: Role,
    /// `HELLO_*` bits.
    pub flags: u32,
    pub disk_uuid: [u8; 16],
    /// The protected disk's size in bytes (0: not known to the sender).
    pub disk_size: u64,
    pub disk_id: DiskId,
    pub token: Vec<u8>,
    /// The sender's data generation (`docs/failback.md`, section 1).
    pub lineage: Lineage,
}

/// A side's current data generation as a Hello carries it: its id, the
/// generation it forked from and the parent's seq at the fork. All zero:
/// not known (a collector relaying a disk whose agent has not said Hello
/// since it was upgraded). The full history stays with each side
/// (`tidemark_formats::generation`); one step back is what a peer needs
/// to tell "forked from mine at F" from "another line".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    pub generation: [u8; 16],
    /// All zero: a root generation (or not known).
    pub parent: [u8; 16],
    pub fork_seq: u64,
}

impl Lineage {
    /// Whether the sender said which generation it holds.
    pub fn is_known(&self) -> bool {
        self.generation != [0; 16]
    }

    fn check(&self) -> Result<(), WireError> {
        let zero = [0u8; 16];
        let bad = if self.generation == zero && (self.parent != zero || self.fork_seq != 0) {
            Some("a parent without a generation")
        } else if self.parent == zero && self.fork_seq != 0 {
            Some("a fork seq without a parent")
        } else if self.generation != zero && self.parent == self.generation {
            Some("a generation that is its own parent")
        } else {
            None
        };
        match bad {
            Some(what) => Err(err(WireErrorKind::Corrupt, format!("hello lineage names {what}"))),
            None => Ok(()),
        }
    }
}

/// What the agent is doing, as reported in [`Progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    Streaming = 1,
    InitialSync = 2,
    Resync = 3,
    FullResync = 4,
    Bitmap = 5,
}

impl AgentMode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Streaming,
            2 => Self::InitialSync,
            3 => Self::Resync,
            4 => Self::FullResync,
            5 => Self::Bitmap,
            _ => return None,
        })
    }

    /// The name used by status output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Streaming => "streaming",
            Self::InitialSync => "initial-sync",
            Self::Resync => "resync",
            Self::FullResync => "full-resync",
            Self::Bitmap => "bitmap",
        }
    }
}

/// The agent's periodic report (every 500 ms, and on request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Highest seq journaled.
    pub source_seq: u64,
    pub mode: AgentMode,
    /// Bytes of the running sync done so far, and its total.
    pub sync_done: u64,
    pub sync_total: u64,
    /// Full resyncs since the disk was first protected (not the initial sync).
    pub full_resyncs: u64,
    /// Journal bytes not yet acknowledged by the collector.
    pub backlog_bytes: u64,
    /// Client write bytes since the agent started (for rates).
    pub written_bytes: u64,
    /// The agent's wall clock, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The nonce of the `StatusNow` this answers (0: a periodic report). The
    /// report is built after the request was read, so its `source_seq`
    /// covers every write acknowledged before the request.
    pub nonce: u64,
}

/// Something a downstream hop asks of its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Send a fresh [`Progress`] now, echoing `nonce`.
    StatusNow { nonce: u64 },
    /// The record at `seq` could not be applied: resync `offset..offset+length`.
    Resync { seq: u64, offset: u64, length: u64 },
    /// Resync the whole disk.
    FullResync,
    /// Stop taking writes (a planned failback, docs/failback.md section 6):
    /// the agent refuses every write from now on, journals a final tag,
    /// makes it durable and answers with a [`Progress`] echoing `nonce`
    /// whose `source_seq` is the tag's seq (0: it could not quiesce).
    Quiesce { nonce: u64 },
}

/// The state of a disk's replica, as the target reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// The replica equals the source at `applied_seq`.
    Consistent = 1,
    /// Waiting for a full sync or a resync to complete.
    Syncing = 2,
    /// A record failed its check and was not applied; waiting for its resync.
    Halted = 3,
}

impl ReplicaState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Consistent,
            2 => Self::Syncing,
            3 => Self::Halted,
            _ => return None,
        })
    }

    /// The name used by status output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Consistent => "consistent",
            Self::Syncing => "syncing",
            Self::Halted => "halted",
        }
    }
}

/// The target's report, after acks that change it and every few seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetState {
    pub applied_seq: u64,
    pub state: ReplicaState,
    /// The seq that halted the disk (0 if not halted).
    pub halted_seq: u64,
    /// Bytes still to be resynced before the disk is consistent again.
    pub pending_bytes: u64,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// The receiver accepted the Hello; it durably holds every seq ≤ `acked_seq`.
    Welcome {
        acked_seq: u64,
        /// `WELCOME_*` bits.
        flags: u32,
        /// The data generation the receiver holds for the disk (all zero:
        /// none yet).
        generation: [u8; 16],
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
    Progress(Progress),
    Request(Request),
    /// A compressed, deduplicated batch (collector → target).
    Packed(PackedBatch),
    TargetState(TargetState),
    /// The agent asks (through the collector) for the replica's hashes of
    /// `offset..offset+length` (a hash-compare resync).
    HashQuery {
        offset: u64,
        length: u64,
    },
    /// The answer: the blake3 of each [`HASH_CHUNK`] chunk from `offset`
    /// (the last one cut at the disk's end), as the replica holds them now.
    /// Empty: the target cannot compare there; the sender sends the data.
    ChunkHashes {
        offset: u64,
        hashes: Vec<[u8; 32]>,
    },
    /// Instead of a Hello (agent → collector, `docs/security.md`): trade a
    /// one-time enrollment token (empty: renew this connection's own
    /// identity) and a new public key for a certificate.
    Enroll {
        token: String,
        public_key: Vec<u8>,
    },
    /// The answer to `Enroll`: the certificate and the CA's, as PEM.
    Enrolled {
        cert_pem: String,
        ca_pem: String,
    },
    /// Instead of a Hello, from an authenticated peer: empty, a request
    /// for the CA's revocation list; the answer carries it (empty: the CA
    /// has revoked nothing yet).
    Crl {
        pem: String,
    },
    /// An operator's question for the receiver (collector → target:
    /// points, drills, policy; collector → agent: tags), as a JSON object
    /// with an `op` key (`docs/pipeline.md`, "Calls"). Answered by a
    /// `Reply` with the same nonce; never part of the record stream.
    Call {
        nonce: u64,
        body: String,
    },
    /// The answer to the `Call` with `nonce`: a JSON value, or (`ok`
    /// false) the reason it was refused.
    Reply {
        nonce: u64,
        ok: bool,
        body: String,
    },
}

/// Longest JSON body of a `Call`.
pub const MAX_CALL_BODY: usize = 64 * 1024;
/// Longest JSON body of a `Reply`.
pub const MAX_REPLY_BODY: usize = 4 << 20;

/// Longest revocation list in a `Crl`.
pub const MAX_CRL_PEM: usize = 1 << 20;

/// Longest public key in an `Enroll`.
pub const MAX_ENROLL_KEY: usize = 1024;
/// Longest certificate (and CA certificate) in an `Enrolled`.
pub const MAX_ENROLL_PEM: usize = 16 * 1024;

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

/// A hash span: aligned on [`HASH_CHUNK`], not empty, at most
/// [`MAX_HASH_SPAN`], not past the end of the address space.
fn check_hash_span(offset: u64, length: u64) -> Result<(), WireError> {
    if !offset.is_multiple_of(HASH_CHUNK) || !length.is_multiple_of(HASH_CHUNK) {
        return Err(err(
            WireErrorKind::Corrupt,
            format!("hash span {offset}+{length} is not aligned on {HASH_CHUNK} bytes"),
        ));
    }
    if length == 0 || length > MAX_HASH_SPAN || offset.checked_add(length).is_none() {
        return Err(err(
            WireErrorKind::OutOfBounds,
            format!("hash span {offset}+{length} is empty, longer than {MAX_HASH_SPAN} bytes or past the end"),
        ));
    }
    Ok(())
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
    /// A u16 length, at most `max`, then that many bytes.
    fn bytes16(&mut self, max: usize, what: &str) -> Result<&'a [u8], WireError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(err(
                WireErrorKind::OutOfBounds,
                format!("{what} of {n} bytes, over {max}"),
            ));
        }
        self.take(n, what)
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

impl Frame {
    /// The frame type's name as `docs/formats.md` spells it, for messages
    /// and logs (`expected Hello, got a Batch frame`).
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Batch(_) => "Batch",
            Frame::Ack { .. } => "Ack",
            Frame::Error { .. } => "Error",
            Frame::Progress(_) => "Progress",
            Frame::Request(_) => "Request",
            Frame::Packed(_) => "Packed",
            Frame::TargetState(_) => "TargetState",
            Frame::HashQuery { .. } => "HashQuery",
            Frame::ChunkHashes { .. } => "ChunkHashes",
            Frame::Enroll { .. } => "Enroll",
            Frame::Enrolled { .. } => "Enrolled",
            Frame::Crl { .. } => "Crl",
            Frame::Call { .. } => "Call",
            Frame::Reply { .. } => "Reply",
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Welcome { .. } => 2,
            Frame::Batch(_) => 3,
            Frame::Ack { .. } => 4,
            Frame::Error { .. } => 5,
            Frame::Progress(_) => 6,
            Frame::Request(_) => 7,
            Frame::Packed(_) => 8,
            Frame::TargetState(_) => 9,
            Frame::HashQuery { .. } => 10,
            Frame::ChunkHashes { .. } => 11,
            Frame::Enroll { .. } => 12,
            Frame::Enrolled { .. } => 13,
            Frame::Crl { .. } => 14,
            Frame::Call { .. } => 15,
            Frame::Reply { .. } => 16,
        }
    }

    /// Encode into one buffer. Fails if a field is out of bounds (a token
    /// too long, a batch larger than a frame may be, seqs that are not
    /// consecutive).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut body = Vec::new();
        match self {
            Frame::Hello(h) => {
                if h.token.len() > MAX_TOKEN {
                    return Err(err(WireErrorKind::OutOfBounds, "token longer than 4096 bytes"));
                }
                body.extend_from_slice(&h.protocol.to_le_bytes());
                body.push(h.role as u8);
                body.extend_from_slice(&h.flags.to_le_bytes());
                body.extend_from_slice(&h.disk_uuid);
                body.extend_from_slice(&h.disk_size.to_le_bytes());
                body.push(u8::try_from(h.disk_id.len()).unwrap_or(0));
                body.extend_from_slice(h.disk_id.as_bytes());
                body.extend_from_slice(&u16::try_from(h.token.len()).unwrap_or(0).to_le_bytes());
                body.extend_from_slice(&h.token);
                h.lineage.check()?;
                body.extend_from_slice(&h.lineage.generation);
                body.extend_from_slice(&h.lineage.parent);
                body.extend_from_slice(&h.lineage.fork_seq.to_le_bytes());
            }
            Frame::Welcome {
                acked_seq,
                flags,
                generation,
            } => {
                body.extend_from_slice(&acked_seq.to_le_bytes());
                body.extend_from_slice(&flags.to_le_bytes());
                body.extend_from_slice(generation);
            }
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
            Frame::Progress(p) => {
                body.extend_from_slice(&p.source_seq.to_le_bytes());
                body.push(p.mode as u8);
                for v in [
                    p.sync_done,
                    p.sync_total,
                    p.full_resyncs,
                    p.backlog_bytes,
                    p.written_bytes,
                    p.time_ns,
                    p.nonce,
                ] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
            }
            Frame::Request(r) => {
                let (kind, seq, offset, length) = match *r {
                    Request::StatusNow { nonce } => (1u8, nonce, 0, 0),
                    Request::Resync { seq, offset, length } => (2, seq, offset, length),
                    Request::FullResync => (3, 0, 0, 0),
                    Request::Quiesce { nonce } => (4, nonce, 0, 0),
                };
                body.push(kind);
                for v in [seq, offset, length] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
            }
            Frame::Packed(p) => {
                if p.count == 0 || p.raw_len > MAX_RAW {
                    return Err(err(WireErrorKind::OutOfBounds, "packed batch empty or too large"));
                }
                body.extend_from_slice(&p.first_seq.to_le_bytes());
                body.extend_from_slice(&p.count.to_le_bytes());
                body.extend_from_slice(&p.flags.to_le_bytes());
                body.extend_from_slice(&p.raw_len.to_le_bytes());
                body.extend_from_slice(&p.data);
            }
            Frame::TargetState(t) => {
                body.extend_from_slice(&t.applied_seq.to_le_bytes());
                body.push(t.state as u8);
                body.extend_from_slice(&t.halted_seq.to_le_bytes());
                body.extend_from_slice(&t.pending_bytes.to_le_bytes());
            }
            Frame::HashQuery { offset, length } => {
                check_hash_span(*offset, *length)?;
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&length.to_le_bytes());
            }
            Frame::ChunkHashes { offset, hashes } => {
                let n = u32::try_from(hashes.len())
                    .ok()
                    .filter(|n| u64::from(*n) <= MAX_HASH_SPAN / HASH_CHUNK)
                    .ok_or_else(|| err(WireErrorKind::OutOfBounds, "more chunk hashes than one frame may carry"))?;
                check_hash_span(*offset, u64::from(n.max(1)) * HASH_CHUNK)?;
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&n.to_le_bytes());
                for h in hashes {
                    body.extend_from_slice(h);
                }
            }
            Frame::Enroll { token, public_key } => {
                if token.len() > MAX_TOKEN || public_key.len() > MAX_ENROLL_KEY {
                    return Err(err(WireErrorKind::OutOfBounds, "enrollment token or key too long"));
                }
                put_bytes16(&mut body, token.as_bytes());
                put_bytes16(&mut body, public_key);
            }
            Frame::Enrolled { cert_pem, ca_pem } => {
                if cert_pem.len() > MAX_ENROLL_PEM || ca_pem.len() > MAX_ENROLL_PEM {
                    return Err(err(WireErrorKind::OutOfBounds, "certificate longer than 16 KiB"));
                }
                put_bytes16(&mut body, cert_pem.as_bytes());
                put_bytes16(&mut body, ca_pem.as_bytes());
            }
            Frame::Crl { pem } => {
                let n = u32::try_from(pem.len())
                    .ok()
                    .filter(|n| *n as usize <= MAX_CRL_PEM)
                    .ok_or_else(|| err(WireErrorKind::OutOfBounds, "revocation list longer than 1 MiB"))?;
                body.extend_from_slice(&n.to_le_bytes());
                body.extend_from_slice(pem.as_bytes());
            }
            Frame::Call { nonce, body: json } => {
                if json.len() > MAX_CALL_BODY {
                    return Err(err(WireErrorKind::OutOfBounds, "call longer than 64 KiB"));
                }
                body.extend_from_slice(&nonce.to_le_bytes());
                body.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_le_bytes());
                body.extend_from_slice(json.as_bytes());
            }
            Frame::Reply { nonce, ok, body: json } => {
                if json.len() > MAX_REPLY_BODY {
                    return Err(err(WireErrorKind::OutOfBounds, "reply longer than 4 MiB"));
                }
                body.extend_from_slice(&nonce.to_le_bytes());
                body.push(u8::from(*ok));
                body.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_le_bytes());
                body.extend_from_slice(json.as_bytes());
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
                let flags = c.u32("hello")?;
                if flags & !HELLO_FORCE_RESYNC != 0 {
                    return Err(err(WireErrorKind::Corrupt, format!("unknown hello flags {flags:#x}")));
                }
                let mut disk_uuid = [0u8; 16];
                disk_uuid.copy_from_slice(c.take(16, "hello disk uuid")?);
                let disk_size = c.u64("hello disk size")?;
                let n = c.u8("hello")? as usize;
                let disk_id = std::str::from_utf8(c.take(n, "hello disk id")?)
                    .ok()
                    .and_then(|s| DiskId::parse(s).ok())
                    .ok_or_else(|| err(WireErrorKind::Corrupt, "hello disk id is not 1-64 of [A-Za-z0-9._-]"))?;
                let t = c.u16("hello")? as usize;
                if t > MAX_TOKEN {
                    return Err(err(WireErrorKind::OutOfBounds, "hello token longer than 4096 bytes"));
                }
                let token = c.take(t, "hello token")?.to_vec();
                let mut lineage = Lineage::default();
                lineage.generation.copy_from_slice(c.take(16, "hello generation")?);
                lineage.parent.copy_from_slice(c.take(16, "hello parent generation")?);
                lineage.fork_seq = c.u64("hello fork seq")?;
                lineage.check()?;
                Frame::Hello(Hello {
                    protocol,
                    role,
                    flags,
                    disk_uuid,
                    disk_size,
                    disk_id,
                    token,
                    lineage,
                })
            }
            2 => {
                let acked_seq = c.u64("welcome")?;
                let flags = c.u32("welcome")?;
                if flags & !WELCOME_NEED_FULL_SYNC != 0 {
                    return Err(err(WireErrorKind::Corrupt, format!("unknown welcome flags {flags:#x}")));
                }
                let mut generation = [0u8; 16];
                generation.copy_from_slice(c.take(16, "welcome generation")?);
                Frame::Welcome {
                    acked_seq,
                    flags,
                    generation,
                }
            }
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
            6 => {
                let source_seq = c.u64("progress")?;
                let m = c.u8("progress")?;
                let mode = AgentMode::from_u8(m)
                    .ok_or_else(|| err(WireErrorKind::Corrupt, format!("unknown agent mode {m}")))?;
                Frame::Progress(Progress {
                    source_seq,
                    mode,
                    sync_done: c.u64("progress")?,
                    sync_total: c.u64("progress")?,
                    full_resyncs: c.u64("progress")?,
                    backlog_bytes: c.u64("progress")?,
                    written_bytes: c.u64("progress")?,
                    time_ns: c.u64("progress")?,
                    nonce: c.u64("progress")?,
                })
            }
            7 => {
                let kind = c.u8("request")?;
                let (seq, offset, length) = (c.u64("request")?, c.u64("request")?, c.u64("request")?);
                // Fields a kind does not use must be zero: one encoding per request.
                let unused_zero = match kind {
                    1 | 4 => offset == 0 && length == 0,
                    3 => seq == 0 && offset == 0 && length == 0,
                    _ => true,
                };
                if !unused_zero {
                    return Err(err(
                        WireErrorKind::Corrupt,
                        format!("request kind {kind} with non-zero fields it does not use"),
                    ));
                }
                Frame::Request(match kind {
                    1 => Request::StatusNow { nonce: seq },
                    2 => {
                        if length == 0 || offset.checked_add(length).is_none() {
                            return Err(err(WireErrorKind::OutOfBounds, "resync request with a bad range"));
                        }
                        Request::Resync { seq, offset, length }
                    }
                    3 => Request::FullResync,
                    4 => Request::Quiesce { nonce: seq },
                    k => return Err(err(WireErrorKind::Corrupt, format!("unknown request kind {k}"))),
                })
            }
            8 => {
                let first_seq = c.u64("packed")?;
                let count = c.u32("packed")?;
                let flags = c.u32("packed")?;
                let raw_len = c.u32("packed")?;
                if count == 0 {
                    return Err(err(WireErrorKind::Corrupt, "an empty packed batch"));
                }
                if flags & !PACKED_GAP != 0 {
                    return Err(err(WireErrorKind::Corrupt, format!("unknown packed flags {flags:#x}")));
                }
                if raw_len > MAX_RAW {
                    return Err(err(
                        WireErrorKind::OutOfBounds,
                        format!("packed batch of {raw_len} bytes exceeds the {MAX_RAW}-byte maximum"),
                    ));
                }
                let data = c.take(c.0.len(), "packed data")?.to_vec();
                Frame::Packed(PackedBatch {
                    first_seq,
                    count,
                    flags,
                    raw_len,
                    data,
                })
            }
            9 => {
                let applied_seq = c.u64("target state")?;
                let s = c.u8("target state")?;
                let state = ReplicaState::from_u8(s)
                    .ok_or_else(|| err(WireErrorKind::Corrupt, format!("unknown replica state {s}")))?;
                Frame::TargetState(TargetState {
                    applied_seq,
                    state,
                    halted_seq: c.u64("target state")?,
                    pending_bytes: c.u64("target state")?,
                })
            }
            10 => {
                let (offset, length) = (c.u64("hash query")?, c.u64("hash query")?);
                check_hash_span(offset, length)?;
                Frame::HashQuery { offset, length }
            }
            11 => {
                let offset = c.u64("chunk hashes")?;
                let n = u64::from(c.u32("chunk hashes")?);
                if n > MAX_HASH_SPAN / HASH_CHUNK {
                    return Err(err(
                        WireErrorKind::OutOfBounds,
                        format!("{n} chunk hashes, more than one frame may carry"),
                    ));
                }
                check_hash_span(offset, n.max(1) * HASH_CHUNK)?;
                let mut hashes = Vec::new();
                for _ in 0..n {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c.take(32, "chunk hashes")?);
                    hashes.push(h);
                }
                Frame::ChunkHashes { offset, hashes }
            }
            12 => {
                let token = c.bytes16(MAX_TOKEN, "enrollment token")?;
                let token = std::str::from_utf8(token)
                    .map_err(|_| err(WireErrorKind::Corrupt, "enrollment token is not UTF-8"))?
                    .to_string();
                let public_key = c.bytes16(MAX_ENROLL_KEY, "enrollment key")?.to_vec();
                Frame::Enroll { token, public_key }
            }
            13 => {
                let mut pem = |what| -> Result<String, WireError> {
                    let b = c.bytes16(MAX_ENROLL_PEM, what)?;
                    std::str::from_utf8(b)
                        .map(str::to_string)
                        .map_err(|_| err(WireErrorKind::Corrupt, format!("{what} is not UTF-8")))
                };
                let cert_pem = pem("certificate")?;
                let ca_pem = pem("CA certificate")?;
                Frame::Enrolled { cert_pem, ca_pem }
            }
            14 => {
                let n = c.u32("revocation list length")? as usize;
                if n > MAX_CRL_PEM {
                    return Err(err(
                        WireErrorKind::OutOfBounds,
                        format!("revocation list of {n} bytes, over {MAX_CRL_PEM}"),
                    ));
                }
                let pem = std::str::from_utf8(c.take(n, "revocation list")?)
                    .map_err(|_| err(WireErrorKind::Corrupt, "revocation list is not UTF-8"))?
                    .to_string();
                Frame::Crl { pem }
            }
            15 => {
                let nonce = c.u64("call nonce")?;
                let body = json_text(&mut c, MAX_CALL_BODY, "call")?;
                Frame::Call { nonce, body }
            }
            16 => {
                let nonce = c.u64("reply nonce")?;
                let ok = match c.u8("reply ok")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(err(
                            WireErrorKind::Corrupt,
                            format!("reply ok byte {v} (expected 0 or 1)"),
                        ))
                    }
                };
                let body = json_text(&mut c, MAX_REPLY_BODY, "reply")?;
                Frame::Reply { nonce, ok, body }
            }
            k => return Err(err(WireErrorKind::Corrupt, format!("unknown frame type {k}"))),
        };
        c.end("the frame")?;
        Ok((f, total))
    }
}

/// A u32 length and that much UTF-8 (at most `max` bytes): a call's or a
/// reply's JSON.
fn json_text(c: &mut Body<'_>, max: usize, what: &str) -> Result<String, WireError> {
    let n = c.u32(what)? as usize;
    if n > max {
        return Err(err(
            WireErrorKind::OutOfBounds,
            format!("{what} of {n} bytes, over {max}"),
        ));
    }
    std::str::from_utf8(c.take(n, what)?)
        .map(str::to_string)
        .map_err(|_| err(WireErrorKind::Corrupt, format!("{what} is not UTF-8")))
}

/// A u16 length and `b` (checked by the caller to fit).
fn put_bytes16(body: &mut Vec<u8>, b: &[u8]) {
    body.extend_from_slice(&u16::try_from(b.len()).unwrap_or(u16::MAX).to_le_bytes());
    body.extend_from_slice(b);
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

    /// Pins frame version 5: a change to these bytes needs a version bump.
    #[test]
    fn golden_bytes_v5() {
        let hello = Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Agent,
            flags: HELLO_FORCE_RESYNC,
            disk_uuid: [0x11; 16],
            disk_size: 1 << 30,
            disk_id: "db".parse().unwrap(),
            token: b"s3".to_vec(),
            lineage: Lineage {
                generation: [0x22; 16],
                parent: [0x33; 16],
                fork_seq: 5,
            },
        });
        let frames = [
            hello,
            Frame::Welcome {
                acked_seq: 9,
                flags: WELCOME_NEED_FULL_SYNC,
                generation: [0x44; 16],
            },
            Frame::Ack { seq: 7 },
            Frame::Error {
                code: ErrorCode::BadToken,
                reason: "no".into(),
            },
            Frame::Progress(Progress {
                source_seq: 1,
                mode: AgentMode::Resync,
                sync_done: 2,
                sync_total: 3,
                full_resyncs: 4,
                backlog_bytes: 5,
                written_bytes: 6,
                time_ns: 7,
                nonce: 8,
            }),
            Frame::Request(Request::Resync {
                seq: 3,
                offset: 4096,
                length: 512,
            }),
            Frame::Packed(PackedBatch {
                first_seq: 2,
                count: 1,
                flags: PACKED_GAP,
                raw_len: 80,
                data: vec![0xab],
            }),
            Frame::TargetState(TargetState {
                applied_seq: 5,
                state: ReplicaState::Halted,
                halted_seq: 4,
                pending_bytes: 512,
            }),
            Frame::HashQuery {
                offset: HASH_CHUNK,
                length: 2 * HASH_CHUNK,
            },
            Frame::ChunkHashes {
                offset: HASH_CHUNK,
                hashes: vec![[0x55; 32]],
            },
            Frame::Call {
                nonce: 3,
                body: "{}".into(),
            },
            Frame::Reply {
                nonce: 3,
                ok: true,
                body: "1".into(),
            },
        ];
        let got: Vec<String> = frames.iter().map(|f| hex(&f.encode().unwrap())).collect();
        // Header (magic, version, type, flags, body length, crc), then the body.
        let want = [
            concat!(
                "544d5746050100004e000000f3902033 0100 01 01000000 11111111111111111111111111111111",
                " 0000004000000000 02 6462 0200 7333 22222222222222222222222222222222",
                " 33333333333333333333333333333333 0500000000000000"
            ),
            "544d5746050200001c000000a229bea0 0900000000000000 01000000 44444444444444444444444444444444",
            "544d574605040000080000003de80015 0700000000000000",
            "544d5746050500000600000091c18eb8 0100 0200 6e6f",
            concat!(
                "544d57460506000041000000a7c99e28 0100000000000000 03 0200000000000000 0300000000000000",
                " 0400000000000000 0500000000000000 0600000000000000 0700000000000000 0800000000000000"
            ),
            "544d57460507000019000000633abb36 02 0300000000000000 0010000000000000 0002000000000000",
            "544d57460508000015000000452eeb48 0200000000000000 01000000 01000000 50000000 ab",
            "544d57460509000019000000fc45aa10 0500000000000000 03 0400000000000000 0002000000000000",
            "544d5746050a0000100000006dbcbd82 0000010000000000 0000020000000000",
            concat!(
                "544d5746050b00002c000000df45ceaf 0000010000000000 01000000",
                " 5555555555555555555555555555555555555555555555555555555555555555"
            ),
            "544d5746050f00000e00000065154ce9 0300000000000000 02000000 7b7d",
            "544d5746051000000e000000e29cb064 0300000000000000 01 01000000 31",
        ];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g, &w.replace(' ', ""));
        }
    }

    #[test]
    fn names_are_the_documented_ones() {
        assert_eq!(Frame::Ack { seq: 1 }.name(), "Ack");
        assert_eq!(Frame::Request(Request::FullResync).name(), "Request");
        assert_eq!(Frame::Batch(vec![]).name(), "Batch");
    }

    /// Found by the frame_decode fuzzer: a status-now request carrying an
    /// offset decoded, then re-encoded without it.
    #[test]
    fn requests_have_one_encoding() {
        let mut f = Frame::Request(Request::StatusNow { nonce: 1 }).encode().unwrap();
        f[25] = 0xfe; // inside the offset field
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f[0..12]), &f[16..]);
        f[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(Frame::decode(&f).unwrap_err().msg.contains("non-zero"));
        let mut g = Frame::Request(Request::FullResync).encode().unwrap();
        g[17] = 1; // the seq field
        let crc = crc32c::crc32c_append(crc32c::crc32c(&g[0..12]), &g[16..]);
        g[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(Frame::decode(&g).is_err());
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
        // A Hello cannot carry a bad disk id (`DiskId`); one on the wire is refused.
        assert!(DiskId::parse("a/b").is_err());
        let mut bad_id = Frame::Hello(Hello {
            protocol: 1,
            role: Role::Agent,
            flags: 0,
            disk_uuid: [0; 16],
            disk_size: 0,
            disk_id: "a-b".parse().unwrap(),
            token: vec![],
            lineage: Lineage::default(),
        })
        .encode()
        .unwrap();
        bad_id[FRAME_HEADER_LEN + 33] = b'/'; // "a-b" at body offset 32
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bad_id[0..12]), &bad_id[16..]);
        bad_id[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(Frame::decode(&bad_id).unwrap_err().msg.contains("disk id"));
    }

    /// A Hello's lineage must be a generation with its own parent: each
    /// inconsistent one is refused at encode and on the wire, by name.
    #[test]
    fn inconsistent_lineages_are_refused() {
        let hello = |l: Lineage| Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Agent,
            flags: 0,
            disk_uuid: [1; 16],
            disk_size: 0,
            disk_id: "d".parse().unwrap(),
            token: vec![],
            lineage: l,
        };
        let cases = [
            (
                Lineage {
                    generation: [0; 16],
                    parent: [2; 16],
                    fork_seq: 0,
                },
                "a parent without a generation",
            ),
            (
                Lineage {
                    generation: [1; 16],
                    parent: [0; 16],
                    fork_seq: 5,
                },
                "a fork seq without a parent",
            ),
            (
                Lineage {
                    generation: [3; 16],
                    parent: [3; 16],
                    fork_seq: 1,
                },
                "its own parent",
            ),
        ];
        let good = Frame::Hello(hello(Lineage {
            generation: [1; 16],
            ..Lineage::default()
        }))
        .encode()
        .unwrap();
        for (l, why) in cases {
            let e = Frame::Hello(hello(l)).encode().unwrap_err();
            assert!(e.msg.contains(why), "{}", e.msg);
            // The same lineage put on the wire by hand (checksum fixed up).
            let mut b = good.clone();
            let at = b.len() - 40;
            b[at..at + 16].copy_from_slice(&l.generation);
            b[at + 16..at + 32].copy_from_slice(&l.parent);
            b[at + 32..].copy_from_slice(&l.fork_seq.to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..]);
            b[12..16].copy_from_slice(&crc.to_le_bytes());
            let e = Frame::decode(&b).unwrap_err();
            assert!(e.msg.contains(why), "{}", e.msg);
        }
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                "[a-z0-9._-]{1,64}",
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<[u8; 16]>(),
                any::<bool>(),
                (any::<[u8; 16]>(), any::<u64>()),
            )
                .prop_filter("not . or ..", |(id, ..)| id != "." && id != "..")
                .prop_map(|(id, token, uuid, agent, (g, fork_seq))| Frame::Hello(Hello {
                    protocol: PROTOCOL_VERSION,
                    role: if agent { Role::Agent } else { Role::Collector },
                    flags: u32::from(agent),
                    disk_uuid: uuid,
                    disk_size: u64::from(agent) << 20,
                    disk_id: DiskId::parse(&id).unwrap(),
                    token,
                    // A root (agent) or a fork of a generation that differs.
                    lineage: Lineage {
                        generation: [g[0] | 1; 16],
                        parent: if agent { [0; 16] } else { [(g[0] & !1) | 2; 16] },
                        fork_seq: if agent { 0 } else { fork_seq },
                    },
                })),
            ("[ -~]{0,80}", proptest::collection::vec(any::<u8>(), 0..100))
                .prop_map(|(token, public_key)| Frame::Enroll { token, public_key }),
            ("[ -~\n]{0,200}", "[ -~\n]{0,200}").prop_map(|(cert_pem, ca_pem)| Frame::Enrolled { cert_pem, ca_pem }),
            "[ -~\n]{0,300}".prop_map(|pem| Frame::Crl { pem }),
            (any::<u64>(), "[ -~]{0,200}").prop_map(|(nonce, body)| Frame::Call { nonce, body }),
            (any::<u64>(), any::<bool>(), "[ -~]{0,200}").prop_map(|(nonce, ok, body)| Frame::Reply {
                nonce,
                ok,
                body
            }),
            (any::<u64>(), 0u32..2, any::<[u8; 16]>()).prop_map(|(s, flags, generation)| Frame::Welcome {
                acked_seq: s,
                flags,
                generation
            }),
            (any::<u64>(), 1u8..6, any::<[u64; 6]>()).prop_map(|(s, m, v)| Frame::Progress(Progress {
                source_seq: s,
                mode: AgentMode::from_u8(m).unwrap(),
                sync_done: v[0],
                sync_total: v[1],
                full_resyncs: v[2],
                backlog_bytes: v[3],
                written_bytes: v[4],
                time_ns: v[5],
                nonce: v[0] ^ v[5],
            })),
            prop_oneof![
                any::<u64>().prop_map(|nonce| Request::StatusNow { nonce }),
                Just(Request::FullResync),
                (any::<u64>(), 0u64..1 << 40, 1u64..1 << 30).prop_map(|(seq, offset, length)| Request::Resync {
                    seq,
                    offset,
                    length
                }),
            ]
            .prop_map(Frame::Request),
            (
                any::<u64>(),
                1u32..1000,
                0u32..2,
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(first_seq, count, flags, data)| Frame::Packed(PackedBatch {
                    first_seq,
                    count,
                    flags,
                    raw_len: 4096,
                    data
                })),
            (any::<u64>(), 1u8..4, any::<u64>(), any::<u64>()).prop_map(|(a, s, h, p)| Frame::TargetState(
                TargetState {
                    applied_seq: a,
                    state: ReplicaState::from_u8(s).unwrap(),
                    halted_seq: h,
                    pending_bytes: p
                }
            )),
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
