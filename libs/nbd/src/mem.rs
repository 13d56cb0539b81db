//! An in-memory backend for tests and fuzzing.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::{Backend, ExportInfo, ZeroFlags};

/// A disk held in a `Vec<u8>`. Every feature is on; FLUSH only counts.
#[derive(Debug)]
pub struct MemBackend {
    info: ExportInfo,
    data: Mutex<Vec<u8>>,
    flushes: AtomicU64,
}

impl MemBackend {
    /// A zeroed disk of `size` bytes named "mem".
    pub fn new(size: usize) -> Self {
        Self::with_info(ExportInfo::new("mem", size as u64))
    }

    /// A zeroed disk described by `info` (its `size` must fit in memory).
    ///
    /// # Panics
    /// If `info.size` does not fit in `usize`.
    pub fn with_info(info: ExportInfo) -> Self {
        let size = usize::try_from(info.size).expect("MemBackend size must fit in memory");
        MemBackend {
            data: Mutex::new(vec![0; size]),
            info,
            flushes: AtomicU64::new(0),
        }
    }

    /// A copy of the whole disk.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// How many FLUSH requests reached the backend.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<Range<usize>> {
        let bad = || io::Error::from_raw_os_error(libc::EINVAL);
        let start = usize::try_from(offset).map_err(|_| bad())?;
        let end = start
            .checked_add(usize::try_from(len).map_err(|_| bad())?)
            .ok_or_else(bad)?;
        if end > self.lock().len() {
            return Err(bad());
        }
        Ok(start..end)
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        Ok(())
    }
}

impl Backend for MemBackend {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, len: u32, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let r = self.range(offset, u64::from(len))?;
        buf.clear();
        buf.extend_from_slice(&self.lock()[r]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        self.lock()[r].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.zero(offset, len)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> io::Result<()> {
        self.zero(offset, len)
    }
}
