//! A plain-file backend: the baseline the agent shim is measured against and
//! the backend of the `nbd-file-server` example.
//!
//! Small reads and writes call pread/pwrite directly on the runtime thread
//! (page-cache I/O takes microseconds; a hop to a blocking thread would cost
//! more than the I/O). Anything that may take long — large transfers,
//! fdatasync, fallocate, extent lookups — runs on tokio's blocking pool.
//!
//! This module needs `unsafe` for the libc calls that std does not wrap
//! (fallocate, lseek with SEEK_DATA/SEEK_HOLE, posix_fadvise); each block
//! says why it is sound.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::{Backend, ExportInfo, Extent, ZeroFlags};

/// Transfers up to this size run inline on the runtime thread.
const INLINE_MAX: usize = 64 << 10;
/// Extents returned per block-status call.
const MAX_EXTENTS: usize = 1024;
const ZERO_CHUNK: usize = 1 << 20;

/// Serves a regular file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    info: ExportInfo,
}

impl FileBackend {
    /// Opens `path` (read-write unless `read_only`); the export is named
    /// after the file and sized as it is now.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let path = path.as_ref();
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // seek(End) also works for block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut info = ExportInfo::new(name, size);
        info.description = format!("file {}", path.display());
        info.read_only = read_only;
        info.multi_conn = true; // one fd, so one fdatasync covers every connection
        Ok(FileBackend {
            file: Arc::new(file),
            info,
        })
    }

    /// The export description, to adjust before serving (block sizes, name, flags).
    pub fn info_mut(&mut self) -> &mut ExportInfo {
        &mut self.info
    }

    /// The open file, e.g. for a final fsync after [`crate::serve`] returned.
    pub fn file(&self) -> &File {
        &self.file
    }

    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("blocking I/O task failed: {e}"))))
    }
}

impl Backend for FileBackend {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, len: u32, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let len = len as usize;
        if len <= INLINE_MAX {
            pread_into(&self.file, &mut buf, len, offset)?;
            Ok(buf)
        } else {
            self.blocking(move |f| pread_into(f, &mut buf, len, offset).map(|()| buf))
                .await
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        if data.len() <= INLINE_MAX && !fua {
            return self.file.write_all_at(&data, offset);
        }
        self.blocking(move |f| {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.blocking(|f| f.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.blocking(move |f| {
            zero_range(
                f,
                offset,
                len,
                ZeroFlags {
                    fua,
                    no_hole: false,
                    fast_zero: false,
                },
            )
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.blocking(move |f| zero_range(f, offset, len, flags)).await
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is
        // open for as long as `self.file` lives.
        let rc = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        self.blocking(move |f| extents(f, offset, len)).await
    }
}

/// Reads exactly `len` bytes at `offset` into `buf` (replacing its
/// contents) without zeroing the buffer first.
fn pread_into(f: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
    buf.clear();
    buf.reserve_exact(len);
    let spare = buf.spare_capacity_mut();
    let mut done = 0usize;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the destination is the vector's spare capacity, which holds
        // at least `len` bytes; we pass a pointer `done` bytes in and a length
        // of `len - done`, so pread writes only inside it. The fd is open.
        let n = unsafe { libc::pread(f.as_raw_fd(), spare[done..].as_mut_ptr().cast(), len - done, at) };
        match n {
            n if n > 0 => done += n.unsigned_abs(),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: the loop above initialised exactly the first `len` bytes.
    unsafe { buf.set_len(len) };
    Ok(())
}

fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate takes plain integers and an fd that stays open while
    // `f` is borrowed; it touches no memory of ours.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, l) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == libc::EOPNOTSUPP || c == libc::ENOTSUP || c == libc::ENOSYS || c == libc::EINVAL)
}

/// Makes `[offset, offset+len)` read as zeros: punch a hole (unless the
/// range must stay allocated), else ZERO_RANGE, else write zeros — except
/// that a FAST_ZERO request fails with ENOTSUP instead of writing.
fn zero_range(f: &File, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
    let mut attempts = Vec::with_capacity(2);
    if !flags.no_hole {
        attempts.push(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
    }
    attempts.push(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
    let mut done = false;
    for mode in attempts {
        match fallocate(f, mode, offset, len) {
            Ok(()) => {
                done = true;
                break;
            }
            Err(e) if unsupported(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    if !done {
        if flags.fast_zero {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let mut at = offset;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        while at < end {
            let n = usize::try_from(end - at).unwrap_or(usize::MAX).min(zeros.len());
            f.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
    }
    if flags.fua {
        f.sync_data()?;
    }
    Ok(())
}

/// `base:allocation` via SEEK_DATA / SEEK_HOLE. Holes read as zeros.
fn extents(f: &File, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
    let runs = tidemark_util::fileops::allocation(f, offset, u64::from(len), MAX_EXTENTS)?;
    Ok(runs
        .into_iter()
        .map(|(l, hole)| Extent {
            length: u32::try_from(l).unwrap_or(u32::MAX),
            hole,
            zero: hole,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_backend_roundtrip_and_extents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let f = File::create(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        drop(f);
        let b = FileBackend::open(&path, false).unwrap();
        assert_eq!(b.info().size, 4 << 20);
        assert!(!b.info().read_only);
        b.write(1 << 20, vec![0xab; 8192], false).await.unwrap();
        b.write(2 << 20, vec![0xcd; 256 << 10], true).await.unwrap();
        let r = b.read(1 << 20, 8192, Vec::new()).await.unwrap();
        assert!(r.iter().all(|&x| x == 0xab));
        let r = b.read(2 << 20, 256 << 10, Vec::new()).await.unwrap();
        assert!(r.iter().all(|&x| x == 0xcd));
        b.flush().await.unwrap();

        let ext = b.block_status(0, 4 << 20).await.unwrap();
        let total: u64 = ext.iter().map(|e| u64::from(e.length)).sum();
        assert_eq!(total, 4 << 20);
        assert!(ext[0].hole, "{ext:?}");
        assert!(ext.iter().any(|e| !e.hole), "{ext:?}");

        b.trim(1 << 20, 8192, false).await.unwrap();
        let r = b.read(1 << 20, 8192, Vec::new()).await.unwrap();
        assert!(r.iter().all(|&x| x == 0));
        b.write_zeroes(
            2 << 20,
            4096,
            ZeroFlags {
                no_hole: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let r = b.read(2 << 20, 8192, Vec::new()).await.unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0) && r[4096..].iter().all(|&x| x == 0xcd));
        b.cache(0, 4096).await.unwrap();
    }
}
