//! A disk's folder on the target and the raw replica inside it.
//!
//! ```text
//!  DIR/<disk-id>/
//!    replica.raw                 sparse raw image: byte n = disk byte n
//!    replica.raw.old-<uuid>      the replica of a disk id rebound with FORCE_RESYNC
//!    window.blocks               the dedup window of the live connection (scratch)
//! ```
//!
//! The disk size is not on the wire: the replica grows (`set_len`) to cover
//! the end of every record applied to it, so after an initial sync (which
//! ends with the disk's last range) it has the source's size. Zero and Trim
//! punch holes, so the replica stays as sparse as the source. This module
//! writes; it never syncs behind the caller's back: durability is the
//! caller's ordered `sync()` before the catalog commit.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use tidemark_formats::apply::{apply_record, whole};
use tidemark_util::crashsafe::fsync_dir;
use tidemark_util::fileops::{self, BackingKind};
use tidemark_wire::record::RecordHeader;

use crate::error::{IoContext, Result};

/// File name of the replica inside a disk's folder.
pub const REPLICA_FILE: &str = "replica.raw";
/// File name of the dedup window inside a disk's folder.
pub const WINDOW_FILE: &str = "window.blocks";

/// The folder of `disk_id` (already validated as 1-64 of `[A-Za-z0-9._-]`,
/// not `.` or `..`, by the frame decoder).
pub fn disk_dir(data_dir: &Path, disk_id: &str) -> PathBuf {
    data_dir.join(disk_id)
}

/// Create a disk's folder durably if it does not exist.
pub(crate) fn ensure_disk_dir(data_dir: &Path, disk_id: &str) -> Result<PathBuf> {
    let dir = disk_dir(data_dir, disk_id);
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).io_ctx(|| format!("create {}", dir.display()))?;
        fsync_dir(data_dir).io_ctx(|| format!("sync {}", data_dir.display()))?;
    }
    Ok(dir)
}

/// Move the replica of a rebound disk aside as `replica.raw.old-<uuid>`
/// (durably). Nothing to do if there is no replica.
pub(crate) fn move_aside(dir: &Path, old_uuid: &str) -> Result<Option<PathBuf>> {
    let from = dir.join(REPLICA_FILE);
    if !from.exists() {
        return Ok(None);
    }
    let to = dir.join(format!("{REPLICA_FILE}.old-{old_uuid}"));
    std::fs::rename(&from, &to).io_ctx(|| format!("move {} aside to {}", from.display(), to.display()))?;
    fsync_dir(dir).io_ctx(|| format!("sync {}", dir.display()))?;
    Ok(Some(to))
}

/// `pread` that fills with zeros whatever lies past the end of the file.
pub(crate) fn read_zero_fill(f: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An open raw replica.
#[derive(Debug)]
pub struct Replica {
    file: File,
    path: PathBuf,
    size: u64,
}

impl Replica {
    /// Open `dir/replica.raw`, creating it (empty, durably) if missing.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(REPLICA_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .io_ctx(|| format!("open {}", path.display()))?;
        if !existed {
            fsync_dir(dir).io_ctx(|| format!("sync {}", dir.display()))?;
        }
        let size = file.metadata().io_ctx(|| format!("stat {}", path.display()))?.len();
        Ok(Self { file, path, size })
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The replica's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Apply one verified record (growing the file to cover its range).
    /// Idempotent: applying it again leaves the same bytes.
    pub fn apply(&mut self, h: &RecordHeader, payload: &[u8]) -> Result<()> {
        if h.length > 0 {
            let end = h.offset.saturating_add(h.length);
            if end > self.size {
                self.file
                    .set_len(end)
                    .io_ctx(|| format!("grow {} to {end} bytes for seq {}", self.path.display(), h.seq))?;
                self.size = end;
            }
        }
        apply_record(&self.file, &self.path, BackingKind::File, self.size, h, payload, whole)?;
        Ok(())
    }

    /// Grow the replica to `size` bytes (the disk's size, from the hello);
    /// never shrinks it. The new tail reads zeros.
    pub fn ensure_size(&mut self, size: u64) -> Result<()> {
        if size > self.size {
            self.file
                .set_len(size)
                .io_ctx(|| format!("grow {} to the disk size {size}", self.path.display()))?;
            fileops::fdatasync(&self.file).io_ctx(|| format!("fdatasync {}", self.path.display()))?;
            self.size = size;
        }
        Ok(())
    }

    /// Fill `buf` from `offset`; what lies past the end reads zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_zero_fill(&self.file, buf, offset).io_ctx(|| format!("read {} at {offset}", self.path.display()))
    }

    /// The first byte at or after `offset` that may hold data (None: only
    /// holes follow).
    pub fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size {
            return Ok(None);
        }
        fileops::seek_data(&self.file, offset).io_ctx(|| format!("seek data in {}", self.path.display()))
    }

    /// fdatasync: every applied record (and the size) is durable after this.
    pub fn sync(&self) -> Result<()> {
        fileops::fdatasync(&self.file).io_ctx(|| format!("fdatasync {}", self.path.display()))
    }
}
