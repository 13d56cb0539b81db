//! The agent's change journal: an ordered, append-only log of change records
//! kept in preallocated segment files that are recycled once consumed, like
//! a database's write-ahead log.
//!
//! ```text
//!  journal/
//!    consumed                  "TMJCONSUMED 1 <seq> <crc32c>\n": highest seq the next hop holds
//!    seg-0000000000000007.tmj  live segments, in index order, seqs consecutive across them
//!    seg-0000000000000008.tmj  <- the current (last) segment: appends go here
//!    spare-0000000000000003.tmj  consumed segments waiting to be reused
//!
//!  segment file (preallocated to the segment size):
//!  byte 0          8         12          16        24          32          48          56      60     64
//!       +----------+---------+-----------+---------+-----------+-----------+-----------+-------+------+
//!       | magic    | version | header_len| index   | first_seq | disk_uuid | created_ns| crc32c| zero |
//!       |"TMJOURNL"| u32=1   | u32=64    | u64     | u64       | [16]      | u64       | 0..56 |      |
//!       +----------+---------+-----------+---------+-----------+-----------+-----------+-------+------+
//!    64 | record first_seq   (80-byte header + payload, see tidemark_wire::record)                  |
//!       | record first_seq+1                                                                        |
//!       | ...                                                                                       |
//!       | end: the first bytes that are not a valid record with the next seq (zeros, or stale      |
//!       |      records of a previous use of the file, whose seqs are all lower)                    |
//!       +-------------------------------------------------------------------------------------------+
//! ```
//!
//! Integrity: each record header has a crc32c and each payload a blake3, so
//! a torn append (a crash mid-write) is found on open and cut off there. A
//! record only counts if its seq is exactly the one expected next, so stale
//! records left in a recycled segment are never mistaken for new ones.
//! A record larger than the space left in a non-empty segment starts the
//! next segment; a record larger than a whole segment extends its file.

mod reader;
mod segment;
mod writer;

pub use reader::{JournalReader, RecordIter, Skipped};
pub use segment::{SegmentHeader, SEGMENT_HEADER_LEN};
pub use writer::{Journal, JournalConfig, OpenReport, SyncTargets};

/// Sort and merge overlapping or touching `(offset, length)` ranges (what
/// [`JournalReader::changed_ranges`] returns, joined with bitmap regions).
pub fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (off, len) in v {
        match out.last_mut() {
            Some(last) if off <= last.0 + last.1 => {
                let end = (last.0 + last.1).max(off.saturating_add(len));
                last.1 = end - last.0;
            }
            _ => out.push((off, len)),
        }
    }
    out
}

use std::path::{Path, PathBuf};

/// File name of live segment `index`.
pub fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("seg-{index:016x}.tmj"))
}

/// File name of spare segment `index`.
pub fn spare_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("spare-{index:016x}.tmj"))
}

/// Parse `seg-<hex>.tmj` / `spare-<hex>.tmj` names.
fn parse_name(name: &str, prefix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(".tmj")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// List (index, path) of files with `prefix` in `dir`, sorted by index.
fn list(dir: &Path, prefix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some(i) = e.file_name().to_str().and_then(|n| parse_name(n, prefix)) {
            v.push((i, e.path()));
        }
    }
    v.sort_by_key(|x| x.0);
    Ok(v)
}

#[cfg(test)]
mod tests;
