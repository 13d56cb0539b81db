//! What the recovery tools read a disk through: the [`Image`] trait (a
//! pinned [`View`] or a raw file), and [`Layered`], an image with an
//! optional copy-on-write overlay on top (`tidemark mount --writable`, and
//! the throwaway layer under `--mountpoint`, since a crash-consistent ext4
//! replays its journal even on a read-only mount).
//!
//! ```text
//!  Image (View: replica + undo, pinned; or FileImage) ──▶ Layered
//!     read-only, or with an overlay: an unlinked sparse temp file
//!     + a bitmap of written 4 KiB blocks
//! ```
//!
//! The image under an overlay is never written; the overlay is gone when
//! the process ends.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{IoContext, Result};

use crate::view::View;

/// A disk image read at random offsets: a pinned view of a recovery
/// point, or a plain raw file (`--image`).
pub trait Image: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Fill `buf` from `offset` (`offset + buf.len() <= size`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Extents `(offset, len, data)` covering `[offset, offset+len)`;
    /// `data == false` reads as zeros.
    fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>>;
}

/// A raw image file, read-only.
pub struct FileImage {
    file: File,
    size: u64,
}

impl FileImage {
    pub fn open(path: &Path) -> Result<FileImage> {
        let file = File::open(path).io_at("open", path)?;
        let size = tidemark_util::fileops::backing_size(&file).io_at("size of", path)?;
        Ok(FileImage { file, size })
    }
}

impl Image for FileImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let runs = match tidemark_util::fileops::allocation(&self.file, offset, len, 1024) {
            Ok(r) => r,
            // A block device or a filesystem without SEEK_DATA: all data.
            Err(_) => return Ok(vec![(offset, len, true)]),
        };
        let mut pos = offset;
        let mut out = Vec::with_capacity(runs.len() + 1);
        for (l, hole) in runs {
            out.push((pos, l, !hole));
            pos += l;
        }
        if pos < offset + len {
            out.push((pos, offset + len - pos, true));
        }
        Ok(out)
    }
}

impl Image for View {
    fn size(&self) -> u64 {
        View::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        View::read_at(self, buf, offset)
    }
    fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        View::allocated(self, offset, len)
    }
}

/// Granularity of the copy-on-write overlay.
pub const BLOCK: u64 = 4096;

/// An image, read-only or with a copy-on-write overlay on top.
pub struct Layered {
    base: Arc<dyn Image>,
    size: u64,
    cow: Option<Cow>,
}

/// The overlay: written blocks live in an unlinked sparse temp file at
/// their own offsets; `written` says which.
struct Cow {
    file: File,
    written: RwLock<Vec<u64>>,
    /// Writers one at a time: a partial block is read, merged and written
    /// whole, and must not interleave with another write to it.
    write: Mutex<()>,
}

fn bit(bits: &[u64], block: u64) -> bool {
    let i = usize::try_from(block / 64).unwrap_or(usize::MAX);
    bits.get(i).is_some_and(|w| w & (1 << (block % 64)) != 0)
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

impl Layered {
    /// `writable`: give it an overlay (an unlinked temp file in $TMPDIR).
    pub fn new(base: Arc<dyn Image>, writable: bool) -> io::Result<Layered> {
        let size = base.size();
        let cow = if writable {
            let file = tempfile::tempfile()?;
            file.set_len(size)?;
            let words = to_usize(size.div_ceil(BLOCK).div_ceil(64))?;
            Some(Cow {
                file,
                written: RwLock::new(vec![0; words]),
                write: Mutex::new(()),
            })
        } else {
            None
        };
        Ok(Layered { base, size, cow })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn writable(&self) -> bool {
        self.cow.is_some()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// Runs of `[offset, offset+len)` that are (`true`) or are not in the
    /// overlay.
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let Some(cow) = &self.cow else {
            return vec![(offset, len, false)];
        };
        let bits = cow.written.read().unwrap_or_else(|p| p.into_inner());
        let end = offset + len;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let w = bit(&bits, pos / BLOCK);
            let next = ((pos / BLOCK + 1) * BLOCK).min(end);
            match out.last_mut() {
                Some(r) if r.2 == w => r.1 += next - pos,
                _ => out.push((pos, next - pos, w)),
            }
            pos = next;
        }
        out
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        for (o, l, over) in self.runs(offset, buf.len() as u64) {
            let s = to_usize(o - offset)?;
            let part = &mut buf[s..s + to_usize(l)?];
            match (&self.cow, over) {
                (Some(c), true) => c.file.read_exact_at(part, o)?,
                _ => self.base.read_at(part, o)?,
            }
        }
        Ok(())
    }

    fn cow(&self) -> io::Result<&Cow> {
        self.cow
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))
    }

    /// Write into the overlay; `None` data writes zeros.
    pub fn write_at(&self, data: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        let cow = self.cow()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _w = cow.write.lock().unwrap_or_else(|p| p.into_inner());
        let first = offset / BLOCK;
        let last = (offset + len - 1) / BLOCK;
        let start = first * BLOCK;
        let end = ((last + 1) * BLOCK).min(self.size);
        // Whole interior blocks of a zero write become a hole in the overlay.
        let (zs, ze) = (
            offset.div_ceil(BLOCK) * BLOCK,
            ((offset + len) / BLOCK * BLOCK).max(offset),
        );
        if data.is_none() && ze > zs && ze - zs >= 1 << 20 {
            tidemark_util::fileops::punch_hole(&cow.file, zs, ze - zs)?;
            if zs > offset {
                self.write_span(cow, None, offset, zs - offset)?;
            }
            if offset + len > ze {
                self.write_span(cow, None, ze, offset + len - ze)?;
            }
            self.mark(cow, zs / BLOCK, (ze - 1) / BLOCK);
            return Ok(());
        }
        if end - start > 32 << 20 {
            // A large zero write that is not block-aligned enough to punch:
            // in bounded pieces.
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(16 << 20);
                let piece = data.map(|d| &d[to_usize(pos - offset).unwrap_or(0)..][..to_usize(n).unwrap_or(0)]);
                self.write_span(cow, piece, pos, n)?;
                pos += n;
            }
            return Ok(());
        }
        self.write_span(cow, data, offset, len)
    }

    /// Read-merge-write the blocks covering `[offset, offset+len)` (at most
    /// a few tens of MiB); called with the writer lock held.
    fn write_span(&self, cow: &Cow, data: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        let first = offset / BLOCK;
        let last = (offset + len - 1) / BLOCK;
        let start = first * BLOCK;
        let end = ((last + 1) * BLOCK).min(self.size);
        let mut buf = vec![0u8; to_usize(end - start)?];
        if offset > start {
            let n = to_usize(BLOCK.min(end - start))?;
            self.read_at(&mut buf[..n], start)?;
        }
        if offset + len < end {
            let tail = (end - 1) / BLOCK * BLOCK;
            let s = to_usize(tail - start)?;
            self.read_at(&mut buf[s..], tail)?;
        }
        let s = to_usize(offset - start)?;
        match data {
            Some(d) => buf[s..s + d.len()].copy_from_slice(d),
            None => buf[s..s + to_usize(len)?].fill(0),
        }
        cow.file.write_all_at(&buf, start)?;
        self.mark(cow, first, last);
        Ok(())
    }

    fn mark(&self, cow: &Cow, first: u64, last: u64) {
        let mut bits = cow.written.write().unwrap_or_else(|p| p.into_inner());
        for b in first..=last {
            if let Some(w) = bits.get_mut(usize::try_from(b / 64).unwrap_or(usize::MAX)) {
                *w |= 1 << (b % 64);
            }
        }
    }

    /// Extents `(offset, len, data)` over `[offset, offset+len)`.
    pub fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        self.check(offset, len)?;
        let mut out = Vec::new();
        for (o, l, over) in self.runs(offset, len) {
            if over {
                out.push((o, l, true));
            } else {
                out.extend(self.base.allocated(o, l)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);

    impl Image for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
            Ok(vec![(offset, len, true)])
        }
    }

    fn base(n: usize) -> Arc<dyn Image> {
        Arc::new(Mem((0..n).map(|i| (i % 251) as u8).collect()))
    }

    #[test]
    fn read_only_refuses_writes() {
        let l = Layered::new(base(3 * 4096 + 100), false).unwrap();
        let e = l.write_at(Some(&[1]), 0, 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let mut b = vec![0u8; 10];
        l.read_at(&mut b, 4096 * 3 + 90).unwrap();
        assert_eq!(b[0], ((4096 * 3 + 90) % 251) as u8);
        assert!(l.read_at(&mut b, 4096 * 3 + 91).is_err());
    }

    #[test]
    fn overlay_matches_a_model_and_leaves_the_base_alone() {
        use rand::{Rng, SeedableRng};
        let size = 64 * 4096 + 1234;
        let b = base(size);
        let l = Layered::new(b.clone(), true).unwrap();
        let mut model: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..400 {
            let off = rng.gen_range(0..size - 1);
            let len = rng.gen_range(1..=(size - off).min(20_000));
            if i % 5 == 0 {
                l.write_at(None, off as u64, len as u64).unwrap();
                model[off..off + len].fill(0);
            } else {
                let d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                l.write_at(Some(&d), off as u64, len as u64).unwrap();
                model[off..off + len].copy_from_slice(&d);
            }
            let (ro, rl) = (rng.gen_range(0..size), 0);
            let rl = rng.gen_range(rl..=(size - ro).min(30_000));
            let mut got = vec![0u8; rl];
            l.read_at(&mut got, ro as u64).unwrap();
            assert_eq!(got, model[ro..ro + rl], "step {i}");
        }
        let mut all = vec![0u8; size];
        l.read_at(&mut all, 0).unwrap();
        assert_eq!(all, model);
        let mut orig = vec![0u8; size];
        b.read_at(&mut orig, 0).unwrap();
        assert!(orig.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
        let ext = l.allocated(0, size as u64).unwrap();
        assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), size as u64);
    }

    #[test]
    fn big_zero_writes_punch_the_overlay() {
        let size = 8 << 20;
        let l = Layered::new(base(size), true).unwrap();
        l.write_at(None, 100, (size - 200) as u64).unwrap();
        let mut b = vec![1u8; size];
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(b[99], 99);
        assert!(b[100..size - 100].iter().all(|&x| x == 0));
        assert_eq!(b[size - 100], ((size - 100) % 251) as u8);
    }

    #[test]
    fn file_image_reports_holes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        let img = FileImage::open(&p).unwrap();
        assert_eq!(img.size(), 4 << 20);
        let ext = img.allocated(0, 4 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), 4 << 20);
        assert!(ext.iter().any(|e| e.2 && e.0 <= 1 << 20 && e.0 + e.1 > 1 << 20));
        let mut b = [0u8; 4];
        img.read_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, [7; 4]);
    }
}
