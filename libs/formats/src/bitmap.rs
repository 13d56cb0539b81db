//! The persistent dirty bitmap: which regions of a disk were written while
//! the journal could not take them (bitmap mode), so they can be resynced.
//!
//! ```text
//!  byte 0          8         12            16            24         32     36     64
//!       +----------+---------+-------------+-------------+----------+------+------+
//!       | magic    | version | granularity | disk_size   | nbits    |crc32c| zero |
//!       |"TMBITMAP"|  u32=1  | u32 (bytes) | u64 (bytes) | u64      | 0..32|      |
//!       +----------+---------+-------------+-------------+----------+------+------+
//!    64 | bits: bit i (byte i/8, bit i%8, LSB first) = region i dirty            |
//!       | region i covers [i*granularity, (i+1)*granularity) ∩ [0, disk_size)    |
//!       +-------------------------------------------------------------------------+
//! ```
//!
//! The header is checksummed; the bits are not (a bit set by mistake costs a
//! resync of one region, a bit lost would cost data, so bits are written
//! before the data they cover and are only cleared after a resync).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, IoContext, Result};

const MAGIC: [u8; 8] = *b"TMBITMAP";
const VERSION: u32 = 1;
/// Bytes before the bits.
pub const HEADER_LEN: u64 = HDR as u64;
const HDR: usize = 64;
/// Default region size: 64 KiB.
pub const DEFAULT_GRANULARITY: u32 = 64 << 10;

/// An open dirty bitmap file with its bits cached in memory.
#[derive(Debug)]
pub struct DirtyBitmap {
    path: PathBuf,
    file: File,
    granularity: u64,
    disk_size: u64,
    bits: Vec<u8>,
    /// Number of set bits, kept in step with `bits`.
    ndirty: u64,
}

fn encode_header(granularity: u32, disk_size: u64, nbits: u64) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&granularity.to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    h[24..32].copy_from_slice(&nbits.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

impl DirtyBitmap {
    /// Open the bitmap at `path`, creating an empty one for `disk_size` if
    /// it does not exist. An existing bitmap must match the disk size.
    pub fn open_or_create(path: &Path, disk_size: u64, granularity: u32) -> Result<Self> {
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!("bitmap granularity {granularity} is not a power of two ≥ 512"),
            ));
        }
        let nbits = disk_size.div_ceil(u64::from(granularity));
        let nbytes = usize::try_from(nbits.div_ceil(8))
            .map_err(|_| Error::new(ErrorKind::OutOfBounds, "disk too large for a bitmap"))?;
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx("open bitmap", path)?;
        if !exists || file.metadata().ctx("stat bitmap", path)?.len() == 0 {
            file.write_all_at(&encode_header(granularity, disk_size, nbits), 0)
                .ctx("write bitmap header", path)?;
            file.set_len(HEADER_LEN + nbytes as u64).ctx("size bitmap", path)?;
            file.sync_all().ctx("sync bitmap", path)?;
            if let Some(dir) = path.parent() {
                tidemark_util::crashsafe::fsync_dir(dir).ctx("sync directory of", path)?;
            }
            return Ok(Self {
                path: path.to_path_buf(),
                file,
                granularity: u64::from(granularity),
                disk_size,
                bits: vec![0; nbytes],
                ndirty: 0,
            });
        }
        Self::load(file, path, disk_size, granularity, nbits, nbytes)
    }

    /// Open an existing bitmap at `path` for reading only (tools, on a
    /// live or stopped agent's state directory); it must match the disk.
    pub fn open_read_only(path: &Path, disk_size: u64, granularity: u32) -> Result<Self> {
        let nbits = disk_size.div_ceil(u64::from(granularity.max(1)));
        let nbytes = usize::try_from(nbits.div_ceil(8))
            .map_err(|_| Error::new(ErrorKind::OutOfBounds, "disk too large for a bitmap"))?;
        let file = File::open(path).ctx("open bitmap", path)?;
        Self::load(file, path, disk_size, granularity, nbits, nbytes)
    }

    fn load(file: File, path: &Path, disk_size: u64, granularity: u32, nbits: u64, nbytes: usize) -> Result<Self> {
        let mut h = [0u8; HDR];
        file.read_exact_at(&mut h, 0).ctx("read bitmap header", path)?;
        if h[0..8] != MAGIC {
            return Err(Error::corrupt(path, "not a dirty bitmap (bad magic)"));
        }
        let crc = u32::from_le_bytes([h[32], h[33], h[34], h[35]]);
        if crc != crc32c::crc32c(&h[0..32]) {
            return Err(Error::corrupt(path, "bitmap header checksum mismatch"));
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!("{}: bitmap version {version}", path.display()),
            ));
        }
        let g = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let mut d = [0u8; 8];
        d.copy_from_slice(&h[16..24]);
        let size = u64::from_le_bytes(d);
        if g != granularity || size != disk_size {
            return Err(Error::new(
                ErrorKind::Mismatch,
                format!(
                    "{}: bitmap is for a {size}-byte disk at {g}-byte regions, not {disk_size} at {granularity}",
                    path.display()
                ),
            ));
        }
        let mut bits = vec![0u8; nbytes];
        file.read_exact_at(&mut bits, HEADER_LEN)
            .ctx("read bitmap bits", path)?;
        // Bits past the last region are meaningless; never count them.
        let tail = nbits % 8;
        if tail != 0 {
            if let Some(last) = bits.last_mut() {
                *last &= (1u8 << tail) - 1;
            }
        }
        let ndirty = bits.iter().map(|b| u64::from(b.count_ones())).sum();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            granularity: u64::from(granularity),
            disk_size,
            bits,
            ndirty,
        })
    }

    /// Mark `[offset, offset+len)` dirty, writing changed bytes to the file
    /// (page cache; [`DirtyBitmap::sync`] makes them durable).
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        if offset >= end {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!("bitmap mark at {offset}+{len} beyond disk size {}", self.disk_size),
            ));
        }
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for i in first..=last {
            let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
            let bit = 1u8 << (i % 8);
            if self.bits[byte] & bit == 0 {
                self.bits[byte] |= bit;
                self.ndirty += 1;
                lo = lo.min(byte);
                hi = hi.max(byte);
            }
        }
        self.write_bits(lo, hi)
    }

    /// Write bytes `lo..=hi` of the bits to the file (page cache).
    fn write_bits(&self, lo: usize, hi: usize) -> Result<()> {
        if lo <= hi {
            self.file
                .write_all_at(&self.bits[lo..=hi], HEADER_LEN + lo as u64)
                .ctx("write bitmap bits", &self.path)?;
        }
        Ok(())
    }

    /// Mark every region dirty (a whole-disk sync).
    pub fn mark_all(&mut self) -> Result<()> {
        self.mark(0, self.disk_size)
    }

    /// Clear the regions that lie wholly inside `[offset, offset+len)` (a
    /// region cut short by the end of the disk counts as wholly inside when
    /// the range reaches the end), writing changed bytes to the file (page
    /// cache). Call only once the range has been resynced: its records are
    /// in the journal.
    pub fn unmark(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.disk_size);
        if offset >= end {
            return Ok(());
        }
        let first = offset.div_ceil(self.granularity);
        let last_excl = if end == self.disk_size {
            self.disk_size.div_ceil(self.granularity)
        } else {
            end / self.granularity
        };
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for i in first..last_excl {
            let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
            let bit = 1u8 << (i % 8);
            if self.bits[byte] & bit != 0 {
                self.bits[byte] &= !bit;
                self.ndirty -= 1;
                lo = lo.min(byte);
                hi = hi.max(byte);
            }
        }
        self.write_bits(lo, hi)
    }

    /// The first run of dirty regions at or after the region holding
    /// `from`, as `(offset, len)` clipped to the disk; `None` if no region
    /// from there on is dirty. Skips clean bytes eight regions at a time.
    pub fn next_dirty(&self, from: u64) -> Option<(u64, u64)> {
        let nbits = self.disk_size.div_ceil(self.granularity);
        let bit = |i: u64| -> bool {
            usize::try_from(i / 8)
                .ok()
                .and_then(|b| self.bits.get(b))
                .is_some_and(|b| b & (1u8 << (i % 8)) != 0)
        };
        let mut i = from / self.granularity;
        while i < nbits {
            if i.is_multiple_of(8) {
                let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
                if self.bits.get(byte) == Some(&0) {
                    i += 8;
                    continue;
                }
            }
            if bit(i) {
                break;
            }
            i += 1;
        }
        if i >= nbits {
            return None;
        }
        let mut j = i;
        while j < nbits && bit(j) {
            j += 1;
        }
        let start = i * self.granularity;
        let end = (j * self.granularity).min(self.disk_size);
        Some((start, end - start))
    }

    /// Make the bits durable.
    pub fn sync(&self) -> Result<()> {
        tidemark_util::fileops::fdatasync(&self.file).ctx("sync bitmap", &self.path)
    }

    /// The dirty regions, merged into `(offset, len)` ranges clipped to the disk.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let nbits = self.disk_size.div_ceil(self.granularity);
        for i in 0..nbits {
            let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
            if self.bits[byte] & (1u8 << (i % 8)) == 0 {
                continue;
            }
            let start = i * self.granularity;
            let end = (start + self.granularity).min(self.disk_size);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l = end - *o,
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Whether `offset` falls in a dirty region.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let i = offset / self.granularity;
        usize::try_from(i / 8)
            .ok()
            .and_then(|b| self.bits.get(b))
            .is_some_and(|b| b & (1u8 << (i % 8)) != 0)
    }

    /// The parts of `[offset, offset+len)` that fall outside dirty regions.
    pub fn clean_parts(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let end = offset.saturating_add(len);
        let mut o = offset;
        while o < end {
            let region_end = (o / self.granularity)
                .checked_add(1)
                .and_then(|r| r.checked_mul(self.granularity))
                .unwrap_or(u64::MAX);
            let piece_end = region_end.min(end);
            if !self.is_dirty(o) {
                match out.last_mut() {
                    Some((po, pl)) if *po + *pl == o => *pl += piece_end - o,
                    _ => out.push((o, piece_end - o)),
                }
            }
            o = piece_end;
        }
        out
    }

    /// A duplicate handle on the file, to fdatasync outside a lock.
    pub fn sync_handle(&self) -> Result<File> {
        self.file.try_clone().ctx("dup bitmap handle", &self.path)
    }

    /// Number of dirty regions.
    pub fn count(&self) -> u64 {
        self.ndirty
    }

    /// Bytes covered by dirty regions.
    pub fn dirty_bytes(&self) -> u64 {
        let nbits = self.disk_size.div_ceil(self.granularity);
        let mut bytes = self.ndirty * self.granularity;
        // The last region may be cut short by the end of the disk.
        if nbits > 0 && self.is_dirty((nbits - 1) * self.granularity) {
            bytes -= nbits * self.granularity - self.disk_size;
        }
        bytes
    }

    /// The disk size the bitmap covers.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Region size in bytes.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Clear every bit, durably (after a completed resync).
    pub fn clear(&mut self) -> Result<()> {
        self.bits.iter_mut().for_each(|b| *b = 0);
        self.ndirty = 0;
        self.file
            .write_all_at(&self.bits, HEADER_LEN)
            .ctx("clear bitmap", &self.path)?;
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header's bytes, pinned: a change here is a format change and
    /// needs a version bump (and a reader for version 1).
    #[test]
    fn golden_header_bytes() {
        let h = encode_header(64 << 10, 0x1_0000_0000, 0x1_0000);
        let want_prefix: [u8; 32] = [
            b'T', b'M', b'B', b'I', b'T', b'M', b'A', b'P', // magic
            1, 0, 0, 0, // version
            0, 0, 1, 0, // granularity 64 KiB
            0, 0, 0, 0, 1, 0, 0, 0, // disk size 4 GiB
            0, 0, 1, 0, 0, 0, 0, 0, // 65536 bits
        ];
        assert_eq!(h[..32], want_prefix);
        assert_eq!(
            u32::from_le_bytes([h[32], h[33], h[34], h[35]]),
            crc32c::crc32c(&want_prefix),
            "the checksum covers bytes 0..32"
        );
        assert!(h[36..].iter().all(|&b| b == 0), "bytes 36..64 are zero");
    }

    #[test]
    fn marks_persist_and_merge() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.bitmap");
        let size = 10 * 65536 + 100;
        {
            let mut b = DirtyBitmap::open_or_create(&p, size, DEFAULT_GRANULARITY).unwrap();
            b.mark(100, 10).unwrap();
            b.mark(65536, 65537).unwrap();
            b.mark(10 * 65536, 50).unwrap();
            assert!(b.mark(size + 1, 1).is_err());
        }
        let b = DirtyBitmap::open_or_create(&p, size, DEFAULT_GRANULARITY).unwrap();
        assert_eq!(b.dirty_ranges(), vec![(0, 3 * 65536), (10 * 65536, 100)]);
        assert_eq!(b.count(), 4);
        assert!(b.is_dirty(65536 * 2 + 5));
        assert!(!b.is_dirty(65536 * 5));
        assert_eq!(b.clean_parts(65536 * 2 + 10, 65536 * 2), vec![(65536 * 3, 65536 + 10)]);
        assert_eq!(b.clean_parts(0, 10), vec![]);
        let err = DirtyBitmap::open_or_create(&p, size * 2, DEFAULT_GRANULARITY).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Mismatch);
    }

    #[test]
    fn unmark_next_dirty_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.bitmap");
        let g = u64::from(DEFAULT_GRANULARITY);
        let size = 20 * g + 100;
        let mut b = DirtyBitmap::open_or_create(&p, size, DEFAULT_GRANULARITY).unwrap();
        assert_eq!(b.next_dirty(0), None);
        b.mark_all().unwrap();
        assert_eq!(b.count(), 21);
        assert_eq!(b.dirty_bytes(), size);
        assert_eq!(b.next_dirty(0), Some((0, size)));
        assert_eq!(b.next_dirty(5 * g + 7), Some((5 * g, size - 5 * g)));
        // Only whole regions are cleared.
        b.unmark(g / 2, 3 * g).unwrap();
        assert_eq!(b.count(), 19);
        assert!(b.is_dirty(0) && !b.is_dirty(g) && !b.is_dirty(2 * g) && b.is_dirty(3 * g));
        assert_eq!(b.next_dirty(g), Some((3 * g, size - 3 * g)));
        // The short last region is cleared by a range reaching the end.
        b.unmark(3 * g, size - 3 * g).unwrap();
        assert_eq!(b.count(), 1);
        assert_eq!(b.dirty_bytes(), g);
        assert_eq!(b.next_dirty(g), None);
        assert_eq!(b.next_dirty(0), Some((0, g)));
        drop(b);
        // Clears reach the file like marks do.
        let mut b = DirtyBitmap::open_or_create(&p, size, DEFAULT_GRANULARITY).unwrap();
        assert_eq!(b.count(), 1);
        assert_eq!(b.dirty_ranges(), vec![(0, g)]);
        b.mark(20 * g, 1).unwrap();
        assert_eq!(b.dirty_bytes(), g + 100);
        b.clear().unwrap();
        assert_eq!((b.count(), b.dirty_bytes()), (0, 0));
    }

    #[test]
    fn corrupt_header_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.bitmap");
        DirtyBitmap::open_or_create(&p, 1 << 20, DEFAULT_GRANULARITY).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], 13).unwrap();
        let err = DirtyBitmap::open_or_create(&p, 1 << 20, DEFAULT_GRANULARITY).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
