//! Helpers shared by the fuzz targets.
//!
//! Every format checksums its headers (crc32c) and payloads (blake3), so
//! almost every mutated input is rejected at the first check. The targets
//! therefore run each input twice: as given, which exercises the rejection
//! paths, and with its checksums recomputed by the `repair_*` functions
//! here, which lets the fuzzer reach the field validation, sequencing and
//! recovery logic behind the checks. A checksum is no defence against a
//! buggy or hostile writer, so that logic must hold up on its own.

use std::path::{Path, PathBuf};

/// Bytes in a record header (`tidemark_wire::record::HEADER_LEN`).
pub const RECORD_HEADER_LEN: usize = tidemark_wire::record::HEADER_LEN;
/// Bytes in a journal segment header.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Magic at the start of a journal segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"TMJOURNL";
/// Most segment files one input is split into.
pub const MAX_SEGMENTS: usize = 4;

/// Little-endian u16 at `at`, if `b` is long enough.
pub fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

/// Little-endian u32 at `at`, if `b` is long enough.
pub fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

/// Little-endian u64 at `at`, if `b` is long enough.
pub fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// Recompute the payload hash and the header crc of the record at the
/// front of `b` (the payload is what follows the header, cut short at the
/// end of `b`). Returns the record's encoded length as its header states
/// it, or `None` if `b` is shorter than a header.
pub fn repair_record(b: &mut [u8]) -> Option<usize> {
    if b.len() < RECORD_HEADER_LEN {
        return None;
    }
    let plen = le_u32(b, 40)? as usize;
    let end = RECORD_HEADER_LEN.saturating_add(plen).min(b.len());
    let hash = blake3::hash(&b[RECORD_HEADER_LEN..end]);
    b[44..76].copy_from_slice(hash.as_bytes());
    let crc = crc32c::crc32c(&b[0..76]);
    b[76..80].copy_from_slice(&crc.to_le_bytes());
    Some(RECORD_HEADER_LEN.saturating_add(plen))
}

/// Recompute the segment header crc and the checksums of every record that
/// follows it, walking records by their stated lengths.
pub fn repair_segment(seg: &mut [u8]) {
    if seg.len() < SEGMENT_HEADER_LEN {
        return;
    }
    let crc = crc32c::crc32c(&seg[0..56]);
    seg[56..60].copy_from_slice(&crc.to_le_bytes());
    let mut pos = SEGMENT_HEADER_LEN;
    while pos < seg.len() {
        match repair_record(&mut seg[pos..]) {
            Some(n) => pos = pos.saturating_add(n),
            None => break,
        }
    }
}

/// Recompute the crc of a dirty bitmap header.
pub fn repair_bitmap_header(b: &mut [u8]) {
    if b.len() >= 36 {
        let crc = crc32c::crc32c(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Split an input into segment files at each later occurrence of the
/// segment magic, so one input can describe a multi-segment journal.
pub fn split_segments(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < MAX_SEGMENTS {
        let next = rest
            .windows(SEGMENT_MAGIC.len())
            .skip(1)
            .position(|w| w == SEGMENT_MAGIC)
            .map(|p| p + 1);
        match next {
            Some(p) => {
                out.push(&rest[..p]);
                rest = &rest[p..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

fn scratch_base() -> PathBuf {
    if let Some(d) = std::env::var_os("TIDEMARK_FUZZ_TMPDIR") {
        return PathBuf::from(d);
    }
    // tmpfs keeps the fsyncs the formats do cheap.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A fresh scratch directory, removed when dropped. Prefers
/// `$TIDEMARK_FUZZ_TMPDIR`, then `/dev/shm`, then the system temp dir.
pub fn scratch_dir() -> tempfile::TempDir {
    let b = tempfile::Builder::new().prefix("tidemark-fuzz-").clone();
    b.tempdir_in(scratch_base())
        .or_else(|_| b.tempdir())
        .expect("create a scratch directory for the fuzz target")
}
