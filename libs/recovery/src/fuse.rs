//! Layered images as files in a FUSE directory: `tidemark mount
//! --mountpoint` (one file, `disk`, attached to a loop device) and the
//! target's drills (one file per filesystem found, each a byte range of the
//! view, handed to the filesystem checker).
//!
//! ```text
//!  Layered (view + copy-on-write overlay) ─┬─ range 0..size      ─▶ DIR/disk
//!                                          └─ range of partition ─▶ DIR/part1 …
//! ```
//!
//! Files are opened with direct I/O (no page cache): an NBD export may
//! change the same overlay behind the kernel's back. Writes land in the
//! overlay (refused when the layer is read-only); the image under it is
//! never written. Dropping the [`Mounted`] unmounts and removes the
//! directory.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::overlay::Layered;

/// One file of the directory: `len` bytes of `layer` from `offset`.
pub struct FileSpec {
    pub name: String,
    pub layer: Arc<Layered>,
    pub offset: u64,
    pub len: u64,
}

/// The mounted directory; unmounted and removed on drop.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    dir: Option<tempfile::TempDir>,
}

impl Mounted {
    /// The path of the file named `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.as_ref().map(|d| d.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Unmounts the FUSE filesystem.
        drop(self.session.take());
        if let Some(d) = self.dir.take() {
            let p = d.path().to_path_buf();
            if d.close().is_err() {
                // Still mounted (a client holds it): lazy unmount, then remove.
                let _ = std::process::Command::new("fusermount3").arg("-uz").arg(&p).output();
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
}

struct Files {
    files: Vec<FileSpec>,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

const TTL: Duration = Duration::from_secs(1);
/// The inode of `files[0]` (1 is the root directory).
const FIRST_INO: u64 = 2;

impl Files {
    fn file(&self, ino: u64) -> Option<&FileSpec> {
        let i = usize::try_from(ino.checked_sub(FIRST_INO)?).ok()?;
        self.files.get(i)
    }

    fn attr(&self, ino: u64) -> Option<fuser::FileAttr> {
        let (size, dir) = if ino == fuser::FUSE_ROOT_ID {
            (0, true)
        } else {
            (self.file(ino)?.len, false)
        };
        Some(fuser::FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: if dir {
                fuser::FileType::Directory
            } else {
                fuser::FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o600 },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl fuser::Filesystem for Files {
    fn lookup(&mut self, _req: &fuser::Request<'_>, parent: u64, name: &OsStr, reply: fuser::ReplyEntry) {
        let found = (parent == fuser::FUSE_ROOT_ID)
            .then(|| self.files.iter().position(|f| OsStr::new(&f.name) == name))
            .flatten()
            .and_then(|i| self.attr(FIRST_INO + i as u64));
        match found {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &fuser::Request<'_>, ino: u64, _fh: Option<u64>, reply: fuser::ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &fuser::Request<'_>, ino: u64, _flags: i32, reply: fuser::ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(libc::EISDIR);
        }
        reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &fuser::Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: fuser::ReplyData,
    ) {
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        let Some(f) = self.file(ino) else {
            return reply.error(libc::EISDIR);
        };
        let n = u64::from(size).min(f.len.saturating_sub(off));
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
        match f.layer.read_at(&mut buf, f.offset + off) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn write(
        &mut self,
        _req: &fuser::Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: fuser::ReplyWrite,
    ) {
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        let Some(f) = self.file(ino) else {
            return reply.error(libc::EISDIR);
        };
        if off.saturating_add(data.len() as u64) > f.len {
            return reply.error(libc::ENOSPC);
        }
        if !f.layer.writable() {
            return reply.error(libc::EROFS);
        }
        match f.layer.write_at(Some(data), f.offset + off, data.len() as u64) {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn flush(&mut self, _req: &fuser::Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: fuser::ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &fuser::Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: fuser::ReplyEmpty) {
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &fuser::Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: fuser::ReplyDirectory,
    ) {
        if ino != fuser::FUSE_ROOT_ID {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries = vec![
            (fuser::FUSE_ROOT_ID, fuser::FileType::Directory, "."),
            (fuser::FUSE_ROOT_ID, fuser::FileType::Directory, ".."),
        ];
        for (i, f) in self.files.iter().enumerate() {
            entries.push((FIRST_INO + i as u64, fuser::FileType::RegularFile, f.name.as_str()));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(usize::try_from(offset).unwrap_or(0)) {
            if reply.add(*ino, i64::try_from(i + 1).unwrap_or(i64::MAX), *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mount `files` in a new temp directory under `parent` (None: $TMPDIR)
/// and wait until they are visible.
pub fn mount(files: Vec<FileSpec>, parent: Option<&Path>) -> std::io::Result<Mounted> {
    let mut b = tempfile::Builder::new();
    b.prefix("tidemark-fuse-");
    let dir = match parent {
        Some(p) => b.tempdir_in(p)?,
        None => b.tempdir()?,
    };
    let first = files.first().map(|f| dir.path().join(&f.name));
    let fs = Files {
        files,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        started: SystemTime::now(),
    };
    let opts = [
        fuser::MountOption::FSName("tidemark".into()),
        fuser::MountOption::Subtype("tidemark".into()),
        fuser::MountOption::RW,
        fuser::MountOption::NoExec,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
    ];
    let session = fuser::spawn_mount2(fs, dir.path(), &opts).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("FUSE mount at {} (is /dev/fuse usable?): {e}", dir.path().display()),
        )
    })?;
    let m = Mounted {
        session: Some(session),
        dir: Some(dir),
    };
    if let Some(first) = first {
        let start = Instant::now();
        while !first.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(std::io::Error::other(format!(
                    "the FUSE file {} did not appear",
                    first.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(m)
}
