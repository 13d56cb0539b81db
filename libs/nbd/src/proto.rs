//! Wire constants, request parsing, request validation and reply encoding.
//!
//! Everything here is pure (no I/O) so that it can be unit-tested and fuzzed
//! on its own. Values come from the NBD protocol specification
//! (`doc/proto.md` of the reference implementation); names follow it.
//!
//! ```text
//! request (28 bytes, big-endian):
//!   +0  u32 magic 0x25609513   +4  u16 flags   +6  u16 type
//!   +8  u64 cookie             +16 u64 offset  +24 u32 length
//!   [length bytes of payload for NBD_CMD_WRITE]
//! simple reply (16 bytes):
//!   +0  u32 magic 0x67446698   +4  u32 error   +8  u64 cookie   [data]
//! structured reply chunk (20 bytes + payload):
//!   +0  u32 magic 0x668e33ef   +4  u16 flags   +6  u16 type
//!   +8  u64 cookie             +16 u32 payload length
//! ```
//!
//! This module must never panic on any input: every length and offset is
//! checked with checked arithmetic.

use std::io;

use crate::{ExportInfo, ZeroFlags};

// --- Handshake -------------------------------------------------------------

/// "NBDMAGIC", the first thing the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT", sent by the server after NBDMAGIC and by the client before each option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every fixed-newstyle option reply.
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub(crate) const REP_ERR_INVALID: u32 = 0x8000_0003;
pub(crate) const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub(crate) const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub(crate) const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// The one metadata context this server knows.
pub(crate) const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id we hand out for `base:allocation` (any value is allowed; 0 is
/// reserved for NBD_OPT_LIST_META_CONTEXT replies).
pub(crate) const META_BASE_ALLOCATION_ID: u32 = 1;

// --- Transmission flags ----------------------------------------------------

pub(crate) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub(crate) const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- Requests and replies --------------------------------------------------

pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub(crate) const REQUEST_LEN: usize = 28;

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub(crate) const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = 0x8001;

pub(crate) const NBD_EPERM: u32 = 1;
pub(crate) const NBD_EIO: u32 = 5;
pub(crate) const NBD_ENOMEM: u32 = 12;
pub(crate) const NBD_EINVAL: u32 = 22;
pub(crate) const NBD_ENOSPC: u32 = 28;
pub(crate) const NBD_EOVERFLOW: u32 = 75;
pub(crate) const NBD_ENOTSUP: u32 = 95;

/// Largest READ/WRITE payload we ever advertise, whatever the backend says:
/// keeps every reply length (payload + 8) inside a u32 and bounds memory.
pub(crate) const MAX_PAYLOAD_CAP: u32 = 64 << 20;

/// Extents per block-status reply; the spec asks for at most 2^20.
pub(crate) const MAX_EXTENTS: usize = 1 << 20;

/// Longest error message we put into a structured error chunk.
const MAX_ERROR_MESSAGE: usize = 256;

/// One request header as sent by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a request header; `Err` carries the bad magic.
pub(crate) fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, u32> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        typ: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

/// What was negotiated for one connection: the export's properties (already
/// sanitized) plus the options the client turned on.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    pub size: u64,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_fast_zero: bool,
    pub can_cache: bool,
    pub multi_conn: bool,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    pub structured: bool,
    /// The id of `base:allocation` if the client selected it.
    pub meta_context: Option<u32>,
}

impl Params {
    /// Derives the connection parameters from what the backend offers,
    /// forcing the block sizes into what the spec allows (a misconfigured
    /// backend must not make us send constraints clients reject).
    pub(crate) fn from_info(info: &ExportInfo) -> (Params, Vec<String>) {
        let mut warnings = Vec::new();
        let mut min = info.min_block;
        if min == 0 || !min.is_power_of_two() || min > 65536 {
            warnings.push(format!("min_block {min} is not a power of two <= 65536; using 1"));
            min = 1;
        }
        let mut pref = info.preferred_block;
        let pref_floor = min.max(512);
        if !pref.is_power_of_two() || pref < pref_floor {
            warnings.push(format!(
                "preferred_block {pref} invalid; using {}",
                pref_floor.max(4096)
            ));
            pref = pref_floor.max(4096);
        }
        let mut max = info.max_payload;
        if max > MAX_PAYLOAD_CAP {
            max = MAX_PAYLOAD_CAP;
        }
        if max < pref {
            warnings.push(format!("max_payload {max} below preferred_block {pref}; using {pref}"));
            max = pref;
        }
        let rw = !info.read_only;
        let p = Params {
            size: info.size,
            read_only: info.read_only,
            can_flush: info.can_flush,
            can_fua: info.can_fua,
            can_trim: info.can_trim && rw,
            can_zero: info.can_zero && rw,
            can_fast_zero: info.can_fast_zero && info.can_zero && rw,
            can_cache: info.can_cache,
            multi_conn: info.multi_conn,
            min_block: min,
            preferred_block: pref,
            max_payload: max,
            structured: false,
            meta_context: None,
        };
        (p, warnings)
    }

    /// Transmission flags announced in NBD_INFO_EXPORT / after NBD_OPT_EXPORT_NAME.
    pub(crate) fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS;
        let mut set = |cond: bool, bit: u16| {
            if cond {
                f |= bit;
            }
        };
        set(self.read_only, TFLAG_READ_ONLY);
        set(self.can_flush, TFLAG_SEND_FLUSH);
        set(self.can_fua, TFLAG_SEND_FUA);
        set(self.can_trim, TFLAG_SEND_TRIM);
        set(self.can_zero, TFLAG_SEND_WRITE_ZEROES);
        set(self.multi_conn, TFLAG_CAN_MULTI_CONN);
        set(self.can_cache, TFLAG_SEND_CACHE);
        set(self.can_fast_zero, TFLAG_SEND_FAST_ZERO);
        f
    }
}

/// A validated request, ready for the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    /// A request that succeeds without touching the backend (zero lengths,
    /// CACHE on an export that does not cache).
    Nothing,
    /// A zero-length READ: success with no data.
    EmptyRead,
}

/// Why a request was refused before reaching the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reject {
    pub errno: u32,
    pub msg: &'static str,
}

fn reject(errno: u32, msg: &'static str) -> Reject {
    Reject { errno, msg }
}

/// Checks one request against the negotiated parameters, in the order the
/// spec suggests: command, flags, permission, feature, payload size, range,
/// alignment.
pub(crate) fn validate(req: &Request, p: &Params) -> Result<Op, Reject> {
    let is_write_like = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let mut allowed = if p.can_fua { CMD_FLAG_FUA } else { 0 };
    match req.typ {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
        CMD_WRITE_ZEROES => {
            allowed |= CMD_FLAG_NO_HOLE;
            if p.can_fast_zero {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
        // DISC is handled by the reader and never gets here.
        _ => return Err(reject(NBD_EINVAL, "unknown command")),
    }
    if req.flags & !allowed != 0 {
        return Err(reject(NBD_EINVAL, "command flag not valid for this command"));
    }
    if is_write_like && p.read_only {
        return Err(reject(NBD_EPERM, "export is read-only"));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.typ {
        CMD_FLUSH if !p.can_flush => return Err(reject(NBD_EINVAL, "flush not supported")),
        CMD_TRIM if !p.can_trim => return Err(reject(NBD_EINVAL, "trim not supported")),
        CMD_WRITE_ZEROES if !p.can_zero => return Err(reject(NBD_EINVAL, "write zeroes not supported")),
        CMD_BLOCK_STATUS if p.meta_context.is_none() => {
            return Err(reject(NBD_EINVAL, "no metadata context was negotiated"))
        }
        CMD_FLUSH => {
            if req.offset != 0 || req.len != 0 {
                return Err(reject(NBD_EINVAL, "flush with nonzero offset or length"));
            }
            return Ok(Op::Flush);
        }
        _ => {}
    }
    if matches!(req.typ, CMD_READ | CMD_WRITE) && req.len > p.max_payload {
        return Err(reject(NBD_EINVAL, "length exceeds the maximum payload"));
    }
    let Some(end) = req.offset.checked_add(u64::from(req.len)) else {
        return Err(reject(NBD_EINVAL, "offset + length overflows"));
    };
    if end > p.size {
        // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
        return Err(if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            reject(NBD_ENOSPC, "request extends beyond the end of the export")
        } else {
            reject(NBD_EINVAL, "request extends beyond the end of the export")
        });
    }
    if p.min_block > 1 && req.typ != CMD_BLOCK_STATUS {
        // min_block is a power of two (Params::from_info makes sure).
        let mask = u64::from(p.min_block) - 1;
        if req.offset & mask != 0 || (u64::from(req.len) & mask != 0 && end != p.size) {
            return Err(reject(NBD_EINVAL, "request not aligned to the minimum block size"));
        }
    }
    let (offset, len) = (req.offset, req.len);
    if len == 0 {
        return match req.typ {
            CMD_READ => Ok(Op::EmptyRead),
            CMD_BLOCK_STATUS => Err(reject(NBD_EINVAL, "zero-length block status")),
            _ => Ok(Op::Nothing),
        };
    }
    Ok(match req.typ {
        CMD_READ => Op::Read { offset, len },
        CMD_WRITE => Op::Write { offset, len, fua },
        CMD_TRIM => Op::Trim { offset, len, fua },
        CMD_CACHE if !p.can_cache => Op::Nothing,
        CMD_CACHE => Op::Cache { offset, len },
        CMD_WRITE_ZEROES => Op::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                fua,
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast_zero: req.flags & CMD_FLAG_FAST_ZERO != 0,
            },
        },
        _ => Op::BlockStatus {
            offset,
            len,
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
        },
    })
}

/// Maps a backend error to the NBD error value.
pub(crate) fn errno_of(e: &io::Error) -> u32 {
    if let Some(code) = e.raw_os_error() {
        return match code {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
            libc::EINVAL => NBD_EINVAL,
            libc::EPERM | libc::EROFS => NBD_EPERM,
            libc::EOVERFLOW => NBD_EOVERFLOW,
            libc::ENOMEM => NBD_ENOMEM,
            c if c == libc::EOPNOTSUPP || c == libc::ENOTSUP => NBD_ENOTSUP,
            _ => NBD_EIO,
        };
    }
    match e.kind() {
        io::ErrorKind::InvalidInput => NBD_EINVAL,
        io::ErrorKind::PermissionDenied => NBD_EPERM,
        io::ErrorKind::Unsupported => NBD_ENOTSUP,
        io::ErrorKind::OutOfMemory => NBD_ENOMEM,
        _ => NBD_EIO,
    }
}

// --- Encoding --------------------------------------------------------------

/// Appends a fixed-newstyle option reply.
pub(crate) fn put_option_reply(out: &mut Vec<u8>, opt: u32, typ: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Lengths we encode are bounded by construction (option data <= 64 KiB,
/// payloads <= MAX_PAYLOAD_CAP); saturate rather than panic if that ever breaks.
pub(crate) fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub(crate) fn put_simple_reply(out: &mut Vec<u8>, cookie: u64, errno: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

pub(crate) fn put_chunk_header(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// An error reply: a structured NBD_REPLY_TYPE_ERROR chunk (with a message
/// for the human at the other end) when structured replies are on, else a
/// simple reply.
pub(crate) fn put_error(out: &mut Vec<u8>, structured: bool, cookie: u64, errno: u32, msg: &str) {
    if !structured {
        put_simple_reply(out, cookie, errno);
        return;
    }
    let msg = truncate_utf8(msg, MAX_ERROR_MESSAGE);
    let mlen = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg[..usize::from(mlen)];
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + u32::from(mlen));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&mlen.to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// The header in front of READ data (`len` bytes at `offset` follow).
pub(crate) fn put_read_header(out: &mut Vec<u8>, structured: bool, cookie: u64, offset: u64, len: u32) {
    if structured {
        put_chunk_header(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            len.saturating_add(8),
        );
        out.extend_from_slice(&offset.to_be_bytes());
    } else {
        put_simple_reply(out, cookie, 0);
    }
}

/// Success without data. Structured replies may still use a simple reply
/// here (the spec allows it for everything but READ), which is 4 bytes shorter.
pub(crate) fn put_ok(out: &mut Vec<u8>, cookie: u64) {
    put_simple_reply(out, cookie, 0);
}

/// A successful zero-length READ.
pub(crate) fn put_empty_read(out: &mut Vec<u8>, structured: bool, cookie: u64) {
    if structured {
        put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    } else {
        put_simple_reply(out, cookie, 0);
    }
}

/// Cleans up what a backend returned for `base:allocation` so the reply is
/// always valid: drops zero-length extents, stops at `len` (and at one
/// extent with REQ_ONE), caps the count. Returns an empty list if nothing
/// usable is left.
pub(crate) fn sanitize_extents(raw: &[crate::Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out = Vec::with_capacity(raw.len().min(64));
    let mut covered: u32 = 0;
    for e in raw {
        if e.length == 0 {
            continue;
        }
        let left = len - covered;
        if left == 0 || out.len() >= MAX_EXTENTS {
            break;
        }
        let l = e.length.min(left);
        let flags = u32::from(e.hole) | (u32::from(e.zero) << 1);
        out.push((l, flags));
        covered += l;
        if req_one {
            break;
        }
    }
    out
}

pub(crate) fn put_block_status(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let payload = 4 + 8 * extents.len();
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len_u32(payload));
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// Longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Extent;

    fn params() -> Params {
        let info = ExportInfo::new("t", 1 << 20);
        let (mut p, w) = Params::from_info(&info);
        assert!(w.is_empty(), "{w:?}");
        p.structured = true;
        p.meta_context = Some(META_BASE_ALLOCATION_ID);
        p.max_payload = 64 << 10;
        p
    }

    fn req(typ: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            typ,
            cookie: 7,
            offset,
            len,
        }
    }

    fn encode(r: &Request) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&r.flags.to_be_bytes());
        b[6..8].copy_from_slice(&r.typ.to_be_bytes());
        b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&r.offset.to_be_bytes());
        b[24..28].copy_from_slice(&r.len.to_be_bytes());
        b
    }

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 0x1122_3344_5566_7788, 0xdead_beef);
        assert_eq!(parse_request(&encode(&r)), Ok(r));
        let mut b = encode(&r);
        b[0] = 0;
        assert_eq!(parse_request(&b), Err(0x0060_9513));
    }

    #[test]
    fn golden_request_bytes() {
        let b: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0,
            0x10, 0,
        ];
        let r = parse_request(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: 1,
                typ: 1,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 4096
            }
        );
    }

    #[test]
    fn validation_accepts_good_requests() {
        let p = params();
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, 4096), &p),
            Ok(Op::Read { offset: 0, len: 4096 })
        );
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512), &p),
            Ok(Op::Write {
                offset: 4096,
                len: 512,
                fua: true
            })
        );
        assert_eq!(validate(&req(CMD_FLUSH, 0, 0, 0), &p), Ok(Op::Flush));
        // TRIM and WRITE_ZEROES are not limited by max_payload.
        assert_eq!(
            validate(&req(CMD_TRIM, 0, 0, 1 << 20), &p),
            Ok(Op::Trim {
                offset: 0,
                len: 1 << 20,
                fua: false
            })
        );
        let wz = validate(
            &req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 0, 1 << 20),
            &p,
        );
        assert_eq!(
            wz,
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                flags: ZeroFlags {
                    fua: false,
                    no_hole: true,
                    fast_zero: true
                }
            })
        );
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &p),
            Ok(Op::BlockStatus {
                offset: 0,
                len: 1 << 20,
                req_one: true
            })
        );
        assert_eq!(
            validate(&req(CMD_CACHE, 0, 0, 4096), &p),
            Ok(Op::Cache { offset: 0, len: 4096 })
        );
        // The very end of the export is fine.
        assert!(validate(&req(CMD_READ, 0, (1 << 20) - 512, 512), &p).is_ok());
    }

    #[test]
    fn validation_zero_lengths() {
        let p = params();
        assert_eq!(validate(&req(CMD_READ, 0, 0, 0), &p), Ok(Op::EmptyRead));
        assert_eq!(validate(&req(CMD_WRITE, 0, 1 << 20, 0), &p), Ok(Op::Nothing));
        assert_eq!(validate(&req(CMD_TRIM, 0, 0, 0), &p), Ok(Op::Nothing));
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, 0, 0, 0), &p).unwrap_err().errno,
            NBD_EINVAL
        );
        // Zero length past the end is still out of range.
        assert_eq!(
            validate(&req(CMD_READ, 0, (1 << 20) + 1, 0), &p).unwrap_err().errno,
            NBD_EINVAL
        );
    }

    #[test]
    fn validation_rejects_bad_requests() {
        let p = params();
        let e = |r: Request| validate(&r, &p).unwrap_err().errno;
        assert_eq!(e(req(99, 0, 0, 0)), NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, 1 << 7, 0, 512)), NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512)), NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512)), NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, 1 << 2, 0, 512)), NBD_EINVAL, "DF is not advertised");
        assert_eq!(e(req(CMD_READ, 0, u64::MAX, 512)), NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, 0, 1 << 20, 1)), NBD_EINVAL);
        assert_eq!(e(req(CMD_TRIM, 0, 1 << 20, 1)), NBD_EINVAL);
        assert_eq!(e(req(CMD_BLOCK_STATUS, 0, 1 << 20, 1)), NBD_EINVAL);
        assert_eq!(e(req(CMD_WRITE, 0, 1 << 20, 1)), NBD_ENOSPC);
        assert_eq!(e(req(CMD_WRITE_ZEROES, 0, (1 << 20) - 1, 2)), NBD_ENOSPC);
        assert_eq!(e(req(CMD_WRITE, 0, u64::MAX - 1, 4)), NBD_EINVAL);
        assert_eq!(e(req(CMD_READ, 0, 0, (64 << 10) + 1)), NBD_EINVAL);
        assert_eq!(e(req(CMD_WRITE, 0, 0, (64 << 10) + 1)), NBD_EINVAL);
        assert_eq!(e(req(CMD_FLUSH, 0, 1, 0)), NBD_EINVAL);
        assert_eq!(e(req(CMD_FLUSH, 0, 0, 1)), NBD_EINVAL);

        let mut ro = p.clone();
        ro.read_only = true;
        let e = |r: Request| validate(&r, &ro).unwrap_err().errno;
        assert_eq!(e(req(CMD_WRITE, 0, 0, 512)), NBD_EPERM);
        assert_eq!(e(req(CMD_TRIM, 0, 0, 512)), NBD_EPERM);
        assert_eq!(e(req(CMD_WRITE_ZEROES, 0, 0, 512)), NBD_EPERM);
        assert!(validate(&req(CMD_READ, 0, 0, 512), &ro).is_ok());

        let mut bare = p.clone();
        bare.can_fua = false;
        bare.can_flush = false;
        bare.can_trim = false;
        bare.can_zero = false;
        bare.can_fast_zero = false;
        bare.meta_context = None;
        let e = |r: Request| validate(&r, &bare).unwrap_err().errno;
        assert_eq!(e(req(CMD_WRITE, CMD_FLAG_FUA, 0, 512)), NBD_EINVAL);
        assert_eq!(e(req(CMD_FLUSH, 0, 0, 0)), NBD_EINVAL);
        assert_eq!(e(req(CMD_TRIM, 0, 0, 512)), NBD_EINVAL);
        assert_eq!(e(req(CMD_WRITE_ZEROES, 0, 0, 512)), NBD_EINVAL);
        assert_eq!(e(req(CMD_BLOCK_STATUS, 0, 0, 512)), NBD_EINVAL);

        let mut nofast = p.clone();
        nofast.can_fast_zero = false;
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &nofast)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
    }

    #[test]
    fn validation_alignment() {
        let mut p = params();
        p.min_block = 512;
        p.size = (1 << 20) + 100; // unaligned tail
        assert_eq!(validate(&req(CMD_READ, 0, 1, 512), &p).unwrap_err().errno, NBD_EINVAL);
        assert_eq!(validate(&req(CMD_WRITE, 0, 0, 100), &p).unwrap_err().errno, NBD_EINVAL);
        assert!(
            validate(&req(CMD_READ, 0, 1 << 20, 100), &p).is_ok(),
            "tail may be short"
        );
        assert!(validate(&req(CMD_BLOCK_STATUS, 0, 1, 1), &p).is_ok());
    }

    #[test]
    fn errno_mapping() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(errno_of(&os(libc::ENOSPC)), NBD_ENOSPC);
        assert_eq!(errno_of(&os(libc::EDQUOT)), NBD_ENOSPC);
        assert_eq!(errno_of(&os(libc::EINVAL)), NBD_EINVAL);
        assert_eq!(errno_of(&os(libc::EOPNOTSUPP)), NBD_ENOTSUP);
        assert_eq!(errno_of(&os(libc::ENOTSUP)), NBD_ENOTSUP);
        assert_eq!(errno_of(&os(libc::EPERM)), NBD_EPERM);
        assert_eq!(errno_of(&os(libc::EROFS)), NBD_EPERM);
        assert_eq!(errno_of(&os(libc::EOVERFLOW)), NBD_EOVERFLOW);
        assert_eq!(errno_of(&os(libc::ENOMEM)), NBD_ENOMEM);
        assert_eq!(errno_of(&os(libc::EBADF)), NBD_EIO);
        assert_eq!(errno_of(&io::Error::other("x")), NBD_EIO);
        assert_eq!(errno_of(&io::Error::from(io::ErrorKind::InvalidInput)), NBD_EINVAL);
    }

    #[test]
    fn sanitize_extents_clips_and_limits() {
        let ext = |length, hole, zero| Extent { length, hole, zero };
        let raw = [ext(0, false, false), ext(100, true, true), ext(1000, false, false)];
        assert_eq!(sanitize_extents(&raw, 500, false), vec![(100, 3), (400, 0)]);
        assert_eq!(sanitize_extents(&raw, 500, true), vec![(100, 3)]);
        assert_eq!(sanitize_extents(&raw, 50, false), vec![(50, 3)]);
        assert!(sanitize_extents(&[ext(0, false, false)], 50, false).is_empty());
    }

    #[test]
    fn golden_reply_bytes() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 0x0102_0304_0506_0708, NBD_EINVAL);
        assert_eq!(out, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]);
        out.clear();
        put_error(&mut out, true, 9, NBD_EIO, "ab");
        assert_eq!(
            out,
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0, 5, 0, 2, b'a', b'b']
        );
        out.clear();
        put_block_status(&mut out, 1, 1, &[(4096, 3)]);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0x10, 0, 0,
                0, 0, 3
            ]
        );
        out.clear();
        put_option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        assert_eq!(
            out,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn sanitizes_bad_block_sizes() {
        let mut info = ExportInfo::new("t", 1 << 20);
        info.min_block = 3;
        info.preferred_block = 100;
        info.max_payload = 10;
        let (p, w) = Params::from_info(&info);
        assert_eq!(w.len(), 3);
        assert_eq!((p.min_block, p.preferred_block, p.max_payload), (1, 4096, 4096));
        info.max_payload = u32::MAX;
        info.min_block = 512;
        info.preferred_block = 4096;
        let (p, _) = Params::from_info(&info);
        assert_eq!(p.max_payload, MAX_PAYLOAD_CAP);
    }

    #[test]
    fn truncate_utf8_keeps_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }

    proptest::proptest! {
        #[test]
        fn parse_and_validate_never_panic_and_stay_in_bounds(
            bytes in proptest::array::uniform28(proptest::prelude::any::<u8>()),
            size in proptest::prelude::any::<u64>(),
            max in proptest::prelude::any::<u32>(),
            min_exp in 0u32..18,
            ro in proptest::prelude::any::<bool>(),
            magic in proptest::prelude::any::<bool>(),
        ) {
            let mut bytes = bytes;
            if magic {
                bytes[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let Ok(r) = parse_request(&bytes) else { return Ok(()) };
            let mut info = ExportInfo::new("p", size);
            info.max_payload = max;
            info.min_block = 1 << min_exp;
            info.read_only = ro;
            let (p, _) = Params::from_info(&info);
            if let Ok(op) = validate(&r, &p) {
                let (offset, len) = match op {
                    Op::Read { offset, len } | Op::Write { offset, len, .. } => {
                        proptest::prop_assert!(len <= p.max_payload);
                        (offset, len)
                    }
                    Op::Trim { offset, len, .. }
                    | Op::Cache { offset, len }
                    | Op::WriteZeroes { offset, len, .. }
                    | Op::BlockStatus { offset, len, .. } => (offset, len),
                    Op::Flush | Op::Nothing | Op::EmptyRead => (0, 0),
                };
                proptest::prop_assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= p.size));
                if ro {
                    let writes = matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. });
                    proptest::prop_assert!(!writes, "write-like op on a read-only export");
                }
            }
        }

        #[test]
        fn sanitized_extents_are_valid(
            raw in proptest::collection::vec((proptest::prelude::any::<u32>(), proptest::prelude::any::<bool>()), 0..50),
            len in 1u32..,
            req_one in proptest::prelude::any::<bool>(),
        ) {
            let raw: Vec<Extent> = raw.into_iter().map(|(length, hole)| Extent { length, hole, zero: hole }).collect();
            let e = sanitize_extents(&raw, len, req_one);
            proptest::prop_assert!(e.iter().all(|(l, _)| *l > 0));
            proptest::prop_assert!(e.iter().map(|(l, _)| u64::from(*l)).sum::<u64>() <= u64::from(len));
            if req_one {
                proptest::prop_assert!(e.len() <= 1);
            }
        }
    }
}
