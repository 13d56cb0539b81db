//! Segment header encoding and the record scanner shared by the writer (on
//! open) and the reader.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tidemark_util::bytes::{u32_at, u64_at};
use tidemark_wire::record::{RecordHeader, HEADER_LEN};

use crate::error::{Error, ErrorKind, IoContext, Result};

/// Bytes before the first record of a segment.
pub const SEGMENT_HEADER_LEN: u64 = HDR as u64;
const HDR: usize = 64;
const MAGIC: [u8; 8] = *b"TMJOURNL";
/// Largest seq (and segment index) a valid segment header may carry.
pub const MAX_SEQ: u64 = 1 << 62;
const VERSION: u32 = 1;

/// The header at the start of every segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub index: u64,
    pub first_seq: u64,
    pub disk_uuid: [u8; 16],
    pub created_ns: u64,
}

impl SegmentHeader {
    /// Encode into the fixed 64-byte layout.
    pub fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&64u32.to_le_bytes());
        b[16..24].copy_from_slice(&self.index.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        b[32..48].copy_from_slice(&self.disk_uuid);
        b[48..56].copy_from_slice(&self.created_ns.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate a segment header read from `path`.
    pub fn decode(b: &[u8], path: &Path) -> Result<Self> {
        if b.len() < HDR {
            return Err(Error::corrupt(path, "segment shorter than its header"));
        }
        if b[0..8] != MAGIC {
            return Err(Error::corrupt(path, "not a journal segment (bad magic)"));
        }
        if u32_at(b, 56) != crc32c::crc32c(&b[0..56]) {
            return Err(Error::corrupt(path, "segment header checksum mismatch"));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "{}: journal segment version {version}, this build reads {VERSION}",
                    path.display()
                ),
            ));
        }
        if u64::from(u32_at(b, 12)) != SEGMENT_HEADER_LEN {
            return Err(Error::corrupt(path, format!("segment header length {}", u32_at(b, 12))));
        }
        let first_seq = u64_at(b, 24);
        // Seqs start at 1; anything near the top of the range could only
        // come from corruption and would overflow.
        if first_seq == 0 || first_seq > MAX_SEQ {
            return Err(Error::corrupt(
                path,
                format!("segment first seq {first_seq} is out of range"),
            ));
        }
        let index = u64_at(b, 16);
        if index > MAX_SEQ {
            return Err(Error::corrupt(path, format!("segment index {index} is out of range")));
        }
        let mut disk_uuid = [0u8; 16];
        disk_uuid.copy_from_slice(&b[32..48]);
        Ok(Self {
            index: u64_at(b, 16),
            first_seq: u64_at(b, 24),
            disk_uuid,
            created_ns: u64_at(b, 48),
        })
    }

    /// Read and decode the header of an open segment file.
    pub fn read(f: &File, path: &Path) -> Result<Self> {
        let mut b = [0u8; HDR];
        f.read_exact_at(&mut b, 0).ctx("read segment header of", path)?;
        Self::decode(&b, path)
    }
}

/// Where and why a scan of one segment stopped.
#[derive(Debug)]
pub(crate) struct ScanEnd {
    /// Offset just past the last valid record.
    pub pos: u64,
    /// The seq the next record would have.
    pub next_seq: u64,
    /// Set when the bytes at `pos` look like a torn append of `next_seq`
    /// (not a clean end): a description and how many bytes it may span.
    pub torn: Option<(String, u64)>,
}

/// One step of a scan: the next valid record at `pos`, or where it ends.
pub(crate) enum Step {
    Record(RecordHeader),
    End(Option<(String, u64)>),
}

/// Read the record at `pos` if it is valid and carries `expected` seq.
/// `payload` is filled with its payload (reused buffer).
pub(crate) fn read_record_at(f: &File, path: &Path, pos: u64, expected: u64, payload: &mut Vec<u8>) -> Result<Step> {
    let mut hb = [0u8; HEADER_LEN];
    let n = read_up_to(f, &mut hb, pos).ctx("read journal record of", path)?;
    let seq_bytes_match = n >= 16 && hb[8..16] == expected.to_le_bytes();
    if n < HEADER_LEN {
        return Ok(Step::End((n > 0 && hb[..n].iter().any(|&b| b != 0)).then(|| {
            (
                format!("{n} bytes of a partial record header at offset {pos}"),
                n as u64,
            )
        })));
    }
    let h = match RecordHeader::decode(&hb) {
        Ok(h) if h.seq == expected => h,
        Ok(_) => return Ok(Step::End(None)),
        Err(e) => {
            // A header that names the expected seq but fails its checks was
            // being written when the process or machine stopped.
            return Ok(Step::End(seq_bytes_match.then(|| {
                (
                    format!("torn record header for seq {expected} at offset {pos}: {}", e.msg),
                    HEADER_LEN as u64,
                )
            })));
        }
    };
    let plen = h.payload_len as usize;
    payload.clear();
    payload.resize(plen, 0);
    let got = read_up_to(f, payload, pos + HEADER_LEN as u64).ctx("read journal payload of", path)?;
    let span = HEADER_LEN as u64 + plen as u64;
    if got < plen {
        return Ok(Step::End(Some((
            format!("seq {expected} at offset {pos}: payload cut short ({got} of {plen} bytes)"),
            span,
        ))));
    }
    if let Err(e) = h.verify_payload(payload) {
        return Ok(Step::End(Some((
            format!("seq {expected} at offset {pos}: {}", e.msg),
            span,
        ))));
    }
    Ok(Step::Record(h))
}

/// Scan every valid record of a segment from its first, calling `f` for each.
pub(crate) fn scan(
    file: &File,
    path: &Path,
    header: &SegmentHeader,
    mut f: impl FnMut(&RecordHeader, &[u8]) -> Result<()>,
) -> Result<ScanEnd> {
    let mut pos = SEGMENT_HEADER_LEN;
    let mut seq = header.first_seq;
    let mut payload = Vec::new();
    loop {
        match read_record_at(file, path, pos, seq, &mut payload)? {
            Step::Record(h) => {
                f(&h, &payload)?;
                pos += h.encoded_len();
                seq += 1;
            }
            Step::End(torn) => {
                return Ok(ScanEnd {
                    pos,
                    next_seq: seq,
                    torn,
                })
            }
        }
    }
}

/// Like `read_exact_at` but returns how much was read before end of file.
pub(crate) fn read_up_to(f: &File, buf: &mut [u8], mut pos: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                pos += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
