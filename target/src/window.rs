//! The receiving end of the dedup window: the 4 KiB blocks a connection's
//! packed batches may refer back to, kept in `DIR/<disk-id>/window.blocks`
//! (slot `n` at byte `n * 4096`) so that memory stays flat however large the
//! window is.
//!
//! The file is scratch: truncated when a connection starts (both windows
//! start empty on every connection), never fsynced, never read after a
//! restart.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tidemark_wire::pack::{BlockStore, BLOCK};

/// A [`BlockStore`] over a file.
#[derive(Debug)]
pub struct WindowFile {
    file: File,
    path: PathBuf,
    slots: u32,
    /// The last I/O failure, so that the session can report a window I/O
    /// error as the target's fault rather than the peer's.
    failed: Option<io::Error>,
}

impl WindowFile {
    /// Create or empty `path` for a window of `slots` blocks.
    pub fn create(path: &Path, slots: u32) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            slots,
            failed: None,
        })
    }

    /// The I/O error behind the last failed put or get, if any (cleared).
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.failed.take()
    }

    fn at(&self, slot: u32, len: usize) -> io::Result<u64> {
        if slot >= self.slots || len != BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("window slot {slot} / {len} bytes outside a {}-slot window", self.slots),
            ));
        }
        Ok(u64::from(slot) * BLOCK as u64)
    }

    fn note<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.failed = Some(io::Error::new(e.kind(), format!("{}: {e}", self.path.display())));
        }
        r
    }
}

impl BlockStore for WindowFile {
    fn put(&mut self, slot: u32, block: &[u8]) -> io::Result<()> {
        let r = self
            .at(slot, block.len())
            .and_then(|at| self.file.write_all_at(block, at));
        self.note(r)
    }

    fn get(&mut self, slot: u32, out: &mut [u8]) -> io::Result<()> {
        let r = self.at(slot, out.len()).and_then(|at| self.file.read_exact_at(out, at));
        self.note(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_bounds_and_reset() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("window.blocks");
        let mut w = WindowFile::create(&p, 4).unwrap();
        let a = vec![7u8; BLOCK];
        w.put(3, &a).unwrap();
        let mut out = vec![0u8; BLOCK];
        w.get(3, &mut out).unwrap();
        assert_eq!(out, a);
        assert!(w.put(4, &a).is_err());
        assert!(w.take_error().is_some());
        assert!(w.take_error().is_none());
        assert!(w.put(0, &a[..10]).is_err());
        drop(w);
        let mut w = WindowFile::create(&p, 4).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        assert!(
            w.get(3, &mut out).is_err(),
            "a new connection starts with an empty window"
        );
    }
}
