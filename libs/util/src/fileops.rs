//! Operations on backing files and block devices that std lacks: punching
//! holes, zeroing ranges, finding data and holes, advisory locks, which
//! other processes hold a file open.
//!
//! A TRIM must leave the range reading zeros on every kind of backing store:
//! a regular file gets a punched hole; a block device gets a zero-out,
//! because a block device's discard need not zero.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

/// What a backing path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    File,
    BlockDevice,
}

/// Classify an open backing store, refusing anything that is neither a
/// regular file nor a block device.
pub fn backing_kind(f: &File) -> io::Result<BackingKind> {
    let ft = f.metadata()?.file_type();
    if ft.is_file() {
        Ok(BackingKind::File)
    } else if ft.is_block_device() {
        Ok(BackingKind::BlockDevice)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or a block device",
        ))
    }
}

/// Size in bytes of a regular file or block device.
pub fn backing_size(f: &File) -> io::Result<u64> {
    match backing_kind(f)? {
        BackingKind::File => Ok(f.metadata()?.len()),
        BackingKind::BlockDevice => {
            let off = lseek(f.as_raw_fd(), 0, Whence::SeekEnd).map_err(io::Error::from)?;
            u64::try_from(off).map_err(|_| io::Error::other("negative device size"))
        }
    }
}

fn to_off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc_efbig()))
}

const fn libc_efbig() -> i32 {
    27 // EFBIG
}

/// Deallocate a range of a regular file (it then reads zeros).
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        to_off(offset)?,
        to_off(len)?,
    )
    .map_err(io::Error::from)
}

/// Zero a range and keep it allocated (FALLOC_FL_ZERO_RANGE), falling back
/// to writing zeros where the filesystem or device does not support it.
pub fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        to_off(offset)?,
        to_off(len)?,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::EINVAL) => write_zeros(f, offset, len),
        Err(e) => Err(e.into()),
    }
}

/// Write explicit zeros over a range, 1 MiB at a time.
pub fn write_zeros(f: &File, mut offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; usize::try_from(CHUNK.min(len)).unwrap_or(1 << 20)];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64);
        f.write_all_at(&zeros[..usize::try_from(n).unwrap_or(zeros.len())], offset)?;
        offset += n;
    }
    Ok(())
}

/// `pread` of a whole buffer that fills with zeros whatever lies past the
/// end of the file (replicas and images grow sparsely).
pub fn read_zero_fill(f: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Make a range read zeros on whatever the backing store is: punch a hole in
/// a file, zero-out on a block device.
pub fn discard_zeroing(f: &File, kind: BackingKind, offset: u64, len: u64) -> io::Result<()> {
    match kind {
        BackingKind::File => match punch_hole(f, offset, len) {
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EOPNOTSUPP as i32) => zero_range(f, offset, len),
            r => r,
        },
        BackingKind::BlockDevice => zero_range(f, offset, len),
    }
}

/// Next data offset at or after `offset` (SEEK_DATA), or `None` if only a
/// hole remains up to the end.
pub fn seek_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    match lseek(f.as_raw_fd(), to_off(offset)?, Whence::SeekData) {
        Ok(o) => Ok(Some(u64::try_from(o).unwrap_or(0))),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Next hole offset at or after `offset` (SEEK_HOLE); the end of the file
/// counts as a hole.
pub fn seek_hole(f: &File, offset: u64) -> io::Result<u64> {
    let o = lseek(f.as_raw_fd(), to_off(offset)?, Whence::SeekHole).map_err(io::Error::from)?;
    Ok(u64::try_from(o).unwrap_or(0))
}

/// Allocation of `[offset, offset+len)` as `(length, is_hole)` runs, in
/// order, from SEEK_DATA/SEEK_HOLE; at most `max` runs (the last may end
/// before `offset+len`). Where SEEK_DATA is not supported (some block
/// devices, old filesystems) the whole range is reported as data.
pub fn allocation(f: &File, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, bool)>> {
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max {
        let next_data = match seek_data(f, pos) {
            Ok(v) => v,
            Err(e) if matches!(e.raw_os_error(), Some(c) if c == nix::libc::EINVAL || c == nix::libc::EOPNOTSUPP) => {
                out.push((end - pos, false));
                break;
            }
            Err(e) => return Err(e),
        };
        match next_data {
            None => {
                out.push((end - pos, true));
                break;
            }
            Some(d) if d > pos => {
                let stop = d.min(end);
                out.push((stop - pos, true));
                pos = stop;
            }
            Some(_) => {
                let h = seek_hole(f, pos)?;
                let stop = if h > pos { h.min(end) } else { end };
                out.push((stop - pos, false));
                pos = stop;
            }
        }
    }
    Ok(out)
}

/// Copy `from` (a file or a block device) to `to`, keeping holes holes,
/// crash-safe: written as `to.partial` (a stale one is replaced), made
/// durable, renamed into place and the folder synced; `to` never holds a
/// partial copy. Returns the data bytes copied.
pub fn copy_sparse(from: &std::path::Path, to: &std::path::Path) -> io::Result<u64> {
    let mut part = to.as_os_str().to_owned();
    part.push(".partial");
    let part = std::path::PathBuf::from(part);
    let _ = std::fs::remove_file(&part);
    let src = File::open(from)?;
    let size = backing_size(&src)?;
    let dst = std::fs::OpenOptions::new().write(true).create_new(true).open(&part)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let mut copied = 0u64;
    while pos < size {
        let runs = allocation(&src, pos, size - pos, 1024)?;
        if runs.is_empty() {
            break;
        }
        for (len, hole) in runs {
            if !hole {
                let mut done = 0u64;
                while done < len {
                    let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
                    src.read_exact_at(&mut buf[..n], pos + done)?;
                    dst.write_all_at(&buf[..n], pos + done)?;
                    done += n as u64;
                }
                copied += len;
            }
            pos += len;
        }
    }
    dst.set_len(size)?;
    dst.sync_all()?;
    std::fs::rename(&part, to)?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    crate::crashsafe::fsync_dir(dir)?;
    Ok(copied)
}

/// `fdatasync(2)`.
pub fn fdatasync(f: &File) -> io::Result<()> {
    nix::unistd::fdatasync(f.as_raw_fd()).map_err(io::Error::from)
}

/// Preallocate `len` bytes of a file (keeps existing data).
pub fn preallocate(f: &File, len: u64) -> io::Result<()> {
    match fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, to_off(len)?) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate: extend sparsely; appends will allocate.
        Err(nix::errno::Errno::EOPNOTSUPP) => f.set_len(len.max(f.metadata()?.len())),
        Err(e) => Err(e.into()),
    }
}

/// Take an exclusive, non-blocking advisory lock on a file for as long as
/// the returned guard lives.
pub fn lock_exclusive(f: File) -> io::Result<nix::fcntl::Flock<File>> {
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| io::Error::from(e))
}

/// The other processes that hold `path` open (the same file or device:
/// device and inode compared), as (pid, command name), by reading every
/// `/proc/PID/fd` this process may read (all of them as root). What
/// `fuser` does; no crate does it without pulling in a process-listing
/// library. Processes that vanish or hide their fds are skipped.
pub fn open_elsewhere(path: &std::path::Path) -> io::Result<Vec<(u32, String)>> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(path)?;
    let key = |m: &std::fs::Metadata| {
        if m.file_type().is_block_device() {
            (0, m.rdev())
        } else {
            (m.dev(), m.ino())
        }
    };
    let want = key(&want);
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| key(&m) == want));
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            out.push((pid, name.trim().to_string()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn punch_and_seek() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        punch_hole(&f, 0, 512 << 10).unwrap();
        let mut buf = vec![1u8; 4096];
        f.read_exact_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(seek_data(&f, 0).unwrap(), Some(512 << 10));
        assert_eq!(seek_hole(&f, 512 << 10).unwrap(), 1 << 20);
        assert_eq!(
            allocation(&f, 4096, (1 << 20) - 4096, 16).unwrap(),
            vec![((512 << 10) - 4096, true), (512 << 10, false)]
        );
        assert_eq!(allocation(&f, 0, 1 << 20, 1).unwrap(), vec![(512 << 10, true)]);
        zero_range(&f, 512 << 10, 4096).unwrap();
        f.read_exact_at(&mut buf, 512 << 10).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(backing_kind(&f).unwrap(), BackingKind::File);
        assert_eq!(backing_size(&f).unwrap(), 1 << 20);
    }

    #[test]
    fn reads_past_the_end_are_zeros() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 100]).unwrap();
        let mut buf = [1u8; 64];
        read_zero_fill(&f, &mut buf, 80).unwrap();
        assert!(buf[..20].iter().all(|&b| b == 7));
        assert!(buf[20..].iter().all(|&b| b == 0));
        read_zero_fill(&f, &mut buf, 1000).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
