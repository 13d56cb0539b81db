//! Undo segments: the old contents of replica blocks, saved before a batch
//! overwrites them for the first time since the last recovery point, in
//! append-only files `DIR/<disk>/undo/<n>.undo` (n: 16 hex digits). The
//! catalog's `undo` table indexes every entry; a view at point P reads, for
//! each block, the entry with the lowest capture seq above P (or the
//! replica when there is none).
//!
//! ```text
//!  segment file
//!  +-----------------------------------------------------------------+
//!  | header, 64 bytes                                                |
//!  |   0  magic "TMUNDO\0\0"   8  version u32 (1)  12 header_len u32 |
//!  |  16  disk uuid [16]      32  segment number u64                 |
//!  |  40  created_ns u64      48  reserved (12 bytes, zero)          |
//!  |  60  sum32 of bytes 0..60                                      |
//!  +-----------------------------------------------------------------+
//!  | entry (at the offset the catalog's undo row names)              |
//!  |   0  magic "UNDE" u32     4  flags u32 (1 = ZERO: no sums/data)  |
//!  |   8  capture_seq u64      16 start_block u64 (4 KiB blocks)     |
//!  |  24  nblocks u32         28  reserved u32 (zero)                |
//!  |  32  reserved u32        36  sum32 of bytes 0..36              |
//!  |  40  unless ZERO: sum32 of each block   [nblocks × u32]        |
//!  |      then the blocks' old contents       [nblocks × 4096]       |
//!  +-----------------------------------------------------------------+
//!  | entry …                                                         |
//! ```
//!
//! `sum32` is the first 4 bytes (little-endian u32) of the blake3 hash of
//! the bytes named. All integers are little-endian. `capture_seq` is the seq of the record
//! whose write made the capture: the entry holds the blocks as they were
//! just before it. A data entry has at most [`MAX_ENTRY_BLOCKS`] blocks; a
//! ZERO entry (the blocks read zeros: holes, never written) any number.
//! Bytes past the length the catalog recorded for a segment are a capture
//! that was never marked (a crash before the mark): they are cut off when
//! the segment is opened for appending.
//!
//! This module owns the bytes; it never decides what to capture (that is
//! `apply`) and never deletes a segment a pinned view needs (that is the
//! expiry in `apply`, under the pins lock).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tidemark_util::bytes::{u32_at, u64_at};
use tidemark_util::crashsafe::fsync_dir;
use tidemark_util::fileops;

use crate::error::{Error, ErrorKind, IoContext, Result};

/// Size of a block, the unit of capture.
pub const BLOCK: u64 = 4096;
/// [`BLOCK`] as a buffer length.
pub const BLOCK_BYTES: usize = 4096;
/// Most blocks in one data entry (1 MiB).
pub const MAX_ENTRY_BLOCKS: u32 = 256;
/// The segment header's magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TMUNDO\0\0";
/// The segment format version this build writes (and the only one so far).
pub const SEGMENT_VERSION: u32 = 1;
/// Bytes in a segment header.
pub const SEGMENT_HEADER_LEN: u64 = 64;
const SEGMENT_HEADER_BYTES: usize = 64;
/// An entry's magic.
pub const ENTRY_MAGIC: [u8; 4] = *b"UNDE";
/// Bytes in an entry header.
pub const ENTRY_HEADER_LEN: u64 = 40;
const ENTRY_HEADER_BYTES: usize = 40;
/// Entry flag: the blocks read zeros; no sums or data follow.
pub const ENTRY_ZERO: u32 = 1;
/// The folder of a disk's undo segments.
pub const UNDO_DIR: &str = "undo";

fn corrupt(path: &Path, at: u64, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("undo segment {} at byte {at}: {what}", path.display()),
    )
}

/// The file name of segment `n`.
pub fn segment_name(n: u64) -> String {
    format!("{n:016x}.undo")
}

/// The segment number of a file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".undo")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// The bytes of a segment header.
pub fn encode_segment_header(uuid: &[u8; 16], segment: u64, created_ns: u64) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&64u32.to_le_bytes());
    h[16..32].copy_from_slice(uuid);
    h[32..40].copy_from_slice(&segment.to_le_bytes());
    h[40..48].copy_from_slice(&created_ns.to_le_bytes());
    let crc = sum32(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The checksum of the format: the first 4 bytes of the blake3 hash.
pub fn sum32(b: &[u8]) -> u32 {
    let h = blake3::hash(b);
    u32_at(h.as_bytes(), 0)
}

/// Check a segment header; returns (uuid, segment number).
pub fn decode_segment_header(path: &Path, h: &[u8]) -> Result<([u8; 16], u64)> {
    if h.len() < SEGMENT_HEADER_BYTES {
        return Err(corrupt(path, 0, "shorter than its header"));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err(corrupt(path, 0, "bad magic (not an undo segment)"));
    }
    let version = u32_at(h, 8);
    if version != SEGMENT_VERSION {
        return Err(Error::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "undo segment {}: version {version} (this build reads {SEGMENT_VERSION})",
                path.display()
            ),
        ));
    }
    if u32_at(h, 60) != sum32(&h[..60]) {
        return Err(corrupt(path, 0, "header checksum mismatch"));
    }
    if u64::from(u32_at(h, 12)) != SEGMENT_HEADER_LEN {
        return Err(corrupt(path, 12, "unexpected header length"));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&h[16..32]);
    Ok((uuid, u64_at(h, 32)))
}

/// The bytes of an entry header.
pub fn encode_entry_header(flags: u32, capture_seq: u64, start_block: u64, nblocks: u32) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0..4].copy_from_slice(&ENTRY_MAGIC);
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..16].copy_from_slice(&capture_seq.to_le_bytes());
    h[16..24].copy_from_slice(&start_block.to_le_bytes());
    h[24..28].copy_from_slice(&nblocks.to_le_bytes());
    let crc = sum32(&h[..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A decoded entry header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub flags: u32,
    pub capture_seq: u64,
    pub start_block: u64,
    pub nblocks: u32,
}

impl EntryHeader {
    /// Bytes of the whole entry (header, sums, data).
    pub fn entry_len(&self) -> u64 {
        if self.flags & ENTRY_ZERO != 0 {
            ENTRY_HEADER_LEN
        } else {
            ENTRY_HEADER_LEN + u64::from(self.nblocks) * (4 + BLOCK)
        }
    }
}

/// Check an entry header read at `at`.
pub fn decode_entry_header(path: &Path, at: u64, h: &[u8]) -> Result<EntryHeader> {
    if h.len() < ENTRY_HEADER_BYTES || h[0..4] != ENTRY_MAGIC {
        return Err(corrupt(path, at, "no entry here (bad magic)"));
    }
    if u32_at(h, 36) != sum32(&h[..36]) {
        return Err(corrupt(path, at, "entry header checksum mismatch"));
    }
    let e = EntryHeader {
        flags: u32_at(h, 4),
        capture_seq: u64_at(h, 8),
        start_block: u64_at(h, 16),
        nblocks: u32_at(h, 24),
    };
    if e.flags & !ENTRY_ZERO != 0 {
        return Err(corrupt(path, at, format!("unknown entry flags {:#x}", e.flags)));
    }
    if e.nblocks == 0 || (e.flags & ENTRY_ZERO == 0 && e.nblocks > MAX_ENTRY_BLOCKS) {
        return Err(corrupt(path, at, format!("entry of {} blocks", e.nblocks)));
    }
    Ok(e)
}

/// The segment a disk appends its captures to.
#[derive(Debug)]
pub struct SegmentWriter {
    file: File,
    path: PathBuf,
    /// The segment's number.
    pub number: u64,
    /// Bytes written (the catalog records this at the mark).
    pub len: u64,
}

impl SegmentWriter {
    /// Create segment `number` in `dir` (the undo folder), durably.
    pub fn create(dir: &Path, number: u64, uuid: &[u8; 16], created_ns: u64) -> Result<Self> {
        let path = dir.join(segment_name(number));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ctx("create", &path)?;
        file.write_all_at(&encode_segment_header(uuid, number, created_ns), 0)
            .ctx("write", &path)?;
        fileops::fdatasync(&file).ctx("fdatasync", &path)?;
        fsync_dir(dir).ctx("sync", dir)?;
        Ok(Self {
            file,
            path,
            number,
            len: SEGMENT_HEADER_LEN,
        })
    }

    /// Open segment `number` to append after `len` bytes (what the catalog
    /// recorded); anything beyond is an unmarked capture and is cut off.
    pub fn open_append(dir: &Path, number: u64, uuid: &[u8; 16], len: u64) -> Result<Self> {
        let path = dir.join(segment_name(number));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        let mut h = [0u8; 64];
        file.read_exact_at(&mut h, 0).ctx("read", &path)?;
        let (u, n) = decode_segment_header(&path, &h)?;
        if u != *uuid || n != number {
            return Err(corrupt(&path, 0, "belongs to another disk or segment"));
        }
        let have = file.metadata().ctx("stat", &path)?.len();
        if have < len {
            return Err(corrupt(
                &path,
                have,
                format!("{have} bytes, the catalog recorded {len}"),
            ));
        }
        if have > len {
            file.set_len(len).ctx("truncate", &path)?;
            fileops::fdatasync(&file).ctx("fdatasync", &path)?;
        }
        Ok(Self {
            file,
            path,
            number,
            len,
        })
    }

    /// Append an entry for `blocks` (a whole number of blocks) captured
    /// before seq `capture_seq`; returns its offset. All-zero blocks make a
    /// ZERO entry.
    pub fn append(&mut self, capture_seq: u64, start_block: u64, blocks: &[u8]) -> Result<(u64, bool)> {
        let n = u32::try_from(blocks.len() as u64 / BLOCK).unwrap_or(u32::MAX);
        debug_assert!(blocks.len() as u64 == u64::from(n) * BLOCK && n <= MAX_ENTRY_BLOCKS);
        if blocks.iter().all(|&b| b == 0) {
            return Ok((self.append_zero(capture_seq, start_block, n)?, true));
        }
        let mut buf = Vec::with_capacity(ENTRY_HEADER_BYTES + blocks.len() / BLOCK_BYTES * 4 + blocks.len());
        buf.extend_from_slice(&encode_entry_header(0, capture_seq, start_block, n));
        for b in blocks.chunks(BLOCK_BYTES) {
            buf.extend_from_slice(&sum32(b).to_le_bytes());
        }
        buf.extend_from_slice(blocks);
        self.put(&buf).map(|at| (at, false))
    }

    /// Append a ZERO entry for `nblocks` blocks; returns its offset.
    pub fn append_zero(&mut self, capture_seq: u64, start_block: u64, nblocks: u32) -> Result<u64> {
        self.put(&encode_entry_header(ENTRY_ZERO, capture_seq, start_block, nblocks))
    }

    fn put(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.len;
        self.file.write_all_at(bytes, at).ctx("write", &self.path)?;
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// fdatasync: every entry appended is durable after this.
    pub fn sync(&self) -> Result<()> {
        fileops::fdatasync(&self.file).ctx("fdatasync", &self.path)
    }
}

/// Read block `index` of the entry at `at` of an open segment into `out`
/// (4096 bytes), checking the header and the block's checksum.
pub fn read_block(file: &File, path: &Path, at: u64, block: u64, out: &mut [u8]) -> Result<()> {
    let mut h = [0u8; ENTRY_HEADER_BYTES];
    file.read_exact_at(&mut h, at)
        .map_err(|e| Error::io(&format!("read at byte {at} of"), path, e))?;
    let e = decode_entry_header(path, at, &h)?;
    if block < e.start_block || block - e.start_block >= u64::from(e.nblocks) {
        return Err(corrupt(
            path,
            at,
            format!("block {block} is not in the entry (the index disagrees)"),
        ));
    }
    if e.flags & ENTRY_ZERO != 0 {
        out.fill(0);
        return Ok(());
    }
    let i = block - e.start_block;
    let mut sum = [0u8; 4];
    file.read_exact_at(&mut sum, at + ENTRY_HEADER_LEN + i * 4)
        .map_err(|e| Error::io(&format!("read at byte {at} of"), path, e))?;
    let data_at = at + ENTRY_HEADER_LEN + u64::from(e.nblocks) * 4 + i * BLOCK;
    file.read_exact_at(out, data_at)
        .map_err(|e| Error::io(&format!("read at byte {data_at} of"), path, e))?;
    if sum32(out) != u32::from_le_bytes(sum) {
        return Err(corrupt(path, data_at, format!("block {block}: checksum mismatch")));
    }
    Ok(())
}

/// A set of block numbers, as sorted disjoint half-open runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockSet(BTreeMap<u64, u64>);

impl BlockSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `[s, e)`.
    pub fn insert(&mut self, mut s: u64, mut e: u64) {
        if e <= s {
            return;
        }
        // Merge with a run that starts before s and reaches it.
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.0.remove(&ps);
            }
        }
        // Absorb runs starting inside [s, e].
        let inside: Vec<(u64, u64)> = self.0.range(s..=e).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in inside {
            e = e.max(b);
            self.0.remove(&a);
        }
        self.0.insert(s, e);
    }

    /// The parts of `[s, e)` not in the set, in order.
    pub fn missing(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = s;
        if let Some((_, &pe)) = self.0.range(..=s).next_back() {
            pos = pos.max(pe);
        }
        for (&a, &b) in self.0.range(s..e) {
            if a > pos {
                out.push((pos, a));
            }
            pos = pos.max(b);
        }
        if pos < e {
            out.push((pos, e));
        }
        out
    }

    /// Whether any block of `[s, e)` is in the set.
    pub fn overlaps(&self, s: u64, e: u64) -> bool {
        self.missing(s, e) != [(s, e)] && e > s
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The blocks `[first, end)` a byte range touches.
pub fn blocks_of(offset: u64, length: u64) -> (u64, u64) {
    (offset / BLOCK, offset.saturating_add(length).div_ceil(BLOCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_CRC: u32 = 0x58d9_7e3b;

    #[test]
    fn golden_bytes_pin_the_format() {
        let h = encode_segment_header(&[0xab; 16], 3, 7);
        assert_eq!(&h[..8], b"TMUNDO\0\0");
        assert_eq!(
            h[8..16],
            [1, 0, 0, 0, 64, 0, 0, 0],
            "version 1, header 64 bytes: a change here needs a version bump"
        );
        assert_eq!(u32_at(&h, 60), GOLDEN_CRC, "{:#x}", u32_at(&h, 60));
        let e = encode_entry_header(ENTRY_ZERO, 0x0102, 5, 9);
        assert_eq!(
            e[..28],
            [b'U', b'N', b'D', b'E', 1, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0]
        );
        let p = Path::new("x");
        assert_eq!(
            decode_entry_header(p, 0, &e).unwrap(),
            EntryHeader {
                flags: ENTRY_ZERO,
                capture_seq: 0x0102,
                start_block: 5,
                nblocks: 9
            }
        );
        assert_eq!(decode_segment_header(p, &h).unwrap(), ([0xab; 16], 3));
        let mut bad = h;
        bad[20] ^= 1;
        assert!(decode_segment_header(p, &bad)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut v2 = h;
        v2[8] = 2;
        assert_eq!(
            decode_segment_header(p, &v2).unwrap_err().kind,
            ErrorKind::UnsupportedVersion
        );
        assert_eq!(parse_segment_name(&segment_name(0x1f)), Some(0x1f));
        assert_eq!(parse_segment_name("x.undo"), None);
    }

    #[test]
    fn append_read_reopen_and_cut_an_unmarked_tail() {
        let d = tempfile::tempdir().unwrap();
        let u = [1u8; 16];
        let mut w = SegmentWriter::create(d.path(), 0, &u, 1).unwrap();
        let mut data = vec![0u8; 2 * BLOCK_BYTES];
        data[..4096].fill(7);
        data[4096..].fill(9);
        let (a, zero) = w.append(10, 100, &data).unwrap();
        assert!(!zero);
        let (z, zero) = w.append(11, 200, &vec![0u8; 4096]).unwrap();
        assert!(zero);
        w.sync().unwrap();
        let marked = w.len;
        w.append(12, 300, &data).unwrap();
        drop(w);
        let path = d.path().join(segment_name(0));
        let f = File::open(&path).unwrap();
        let mut out = vec![1u8; 4096];
        read_block(&f, &path, a, 101, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 9));
        read_block(&f, &path, z, 200, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        assert!(read_block(&f, &path, a, 102, &mut out).is_err());
        // A flipped data bit is caught.
        let mut raw = std::fs::read(&path).unwrap();
        let at = usize::try_from(a + ENTRY_HEADER_LEN + 8).unwrap() + 5;
        raw[at] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        let f = File::open(&path).unwrap();
        assert!(read_block(&f, &path, a, 100, &mut out)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        raw[at] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        // Reopening cuts the unmarked entry; another disk's uuid is refused.
        let w = SegmentWriter::open_append(d.path(), 0, &u, marked).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), marked);
        drop(w);
        assert!(SegmentWriter::open_append(d.path(), 0, &[2; 16], marked).is_err());
    }

    #[test]
    fn block_sets_merge_and_report_holes() {
        let mut s = BlockSet::new();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(s.missing(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(s.missing(12, 18), vec![]);
        assert_eq!(s.missing(15, 35), vec![(20, 30)]);
        s.insert(20, 30);
        assert_eq!(s.missing(0, 50), vec![(0, 10), (40, 50)]);
        s.insert(5, 45);
        assert_eq!(s.missing(0, 50), vec![(0, 5), (45, 50)]);
        assert!(s.overlaps(44, 46));
        assert!(!s.overlaps(45, 50));
        assert_eq!(blocks_of(4095, 2), (0, 2));
        assert_eq!(blocks_of(4096, 4096), (1, 2));
    }
}
