//! A disk's folder on the target and the replica inside it, in the disk's
//! format (`--format`, stored in its catalog row).
//!
//! ```text
//!  DIR/<disk-id>/
//!    replica.raw                 raw: sparse image, byte n = disk byte n
//!  or replica.vmdk               vmdk-flat: descriptor (createType monolithicFlat)
//!     replica-flat.vmdk            + its flat extent (sparse like raw)
//!  or replica.vmdk               vmdk-sparse: hosted sparse extent (monolithicSparse)
//!    replica.raw.old-<uuid>      a raw replica a forced rebind replaced
//!    replica.old-<uuid>/         a VMDK replica a forced rebind replaced (all its files)
//!    window.blocks               the dedup window of the live connection (scratch)
//! ```
//!
//! The image layouts belong to `tidemark_formats::replica`; every record is
//! applied through its [`ReplicaImage`] trait: Write/Sync `write_at`,
//! Zero/Trim `zero_range`, and the apply's fdatasync step is `flush`.
//!
//! - **raw** keeps its old behaviour: the file is created empty and grows
//!   (`set_len`) to the disk size from the Hello and to cover the end of
//!   every record applied; Zero and Trim punch holes.
//! - **VMDK** replicas have a fixed size: they are created when the disk is
//!   first seen with a known size (Hello `disk_size` ≠ 0), rounded up to a
//!   whole 512-byte sector. A record that ends beyond it is refused before
//!   anything of its batch is applied, and so is a Hello reporting a larger
//!   disk (a VMDK replica does not grow; rebind with a forced resync).
//!
//! This module writes; it never syncs behind the caller's back: durability
//! is the caller's ordered [`Replica::sync`] before the catalog commit.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

pub use tidemark_formats::replica::{ReplicaFormat, ReplicaImage};
use tidemark_formats::replica::{FLAT_EXTENT_FILE, RAW_FILE, VMDK_FILE};
use tidemark_util::crashsafe::fsync_dir;
use tidemark_util::fileops::{self, read_zero_fill, BackingKind};
use tidemark_wire::record::{RecordHeader, RecordKind};

use crate::error::{Error, ErrorKind, IoContext, Located, Result};

/// File name of a raw replica inside a disk's folder.
pub const REPLICA_FILE: &str = RAW_FILE;
/// File name of the dedup window inside a disk's folder.
pub const WINDOW_FILE: &str = "window.blocks";

pub use tidemark_catalog::layout::disk_dir;

/// Create a disk's folder durably if it does not exist.
pub(crate) fn ensure_disk_dir(data_dir: &Path, disk_id: &str) -> Result<PathBuf> {
    let dir = disk_dir(data_dir, disk_id);
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).io_at("create", &dir)?;
        fsync_dir(data_dir).io_at("sync", data_dir)?;
    }
    Ok(dir)
}

/// The size a VMDK replica of a `disk_size`-byte disk gets: rounded up to
/// a whole 512-byte sector.
pub fn vmdk_size(disk_size: u64) -> u64 {
    disk_size.div_ceil(512).saturating_mul(512)
}

/// Keep the history of a rebound disk as a disk of its own, durably, in
/// folder `to` (its catalog rows were renamed by the rebind): a raw
/// replica is copied (sparse) to `to/replica.raw` and stays where it is,
/// so that the new disk's initial sync compares with it and sends only
/// what differs (`docs/failback.md`, section 4: a lost state directory);
/// a VMDK's files (descriptor and extent) move to `to` under their own
/// names; the undo data moves to `to` with them (it describes the old
/// replica only). Idempotent: a crash halfway is finished by the next call.
pub(crate) fn keep_history(dir: &Path, to: &Path) -> Result<()> {
    if !to.is_dir() {
        std::fs::create_dir_all(to).io_at("create", to)?;
    }
    let raw = dir.join(REPLICA_FILE);
    if raw.exists() {
        let kept = to.join(REPLICA_FILE);
        if !kept.exists() {
            tidemark_util::fileops::copy_sparse(&raw, &kept)
                .io_ctx(|| format!("keep a copy of {} as {}", raw.display(), kept.display()))?;
        }
    }
    for n in [VMDK_FILE, FLAT_EXTENT_FILE, crate::undo::UNDO_DIR] {
        let (a, b) = (dir.join(n), to.join(n));
        if a.exists() {
            if b.exists() {
                // Moved before a crash, and made again since: not ours.
                let junk = a.with_extension("stale");
                std::fs::rename(&a, &junk).io_ctx(|| format!("move {} aside", a.display()))?;
            } else {
                std::fs::rename(&a, &b).io_ctx(|| format!("move {} to {}", a.display(), b.display()))?;
            }
        }
    }
    fsync_dir(to).io_at("sync", to)?;
    fsync_dir(dir).io_at("sync", dir)?;
    Ok(())
}

fn fmt_err(e: impl std::fmt::Display) -> tidemark_formats::Error {
    tidemark_formats::Error::new(tidemark_formats::ErrorKind::Io, e.to_string())
}

/// The target's raw replica: a sparse file whose size follows the disk
/// (it grows; reads past its end are zeros), or a block device (a disk
/// `tidemark reprotect` adopted where it is; it cannot grow).
#[derive(Debug)]
struct GrowableRaw {
    file: File,
    path: PathBuf,
    size: u64,
    kind: BackingKind,
}

impl GrowableRaw {
    /// Open `path`, creating it (empty, durably) if missing.
    fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(REPLICA_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .io_at("open", &path)?;
        if !existed {
            fsync_dir(dir).io_at("sync", dir)?;
        }
        let kind = fileops::backing_kind(&file).io_at("stat", &path)?;
        let size = fileops::backing_size(&file).io_at("size of", &path)?;
        Ok(Self { file, path, size, kind })
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        if size > self.size && self.kind == BackingKind::BlockDevice {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} is a block device of {} bytes, smaller than the disk's {size}",
                    self.path.display(),
                    self.size
                ),
            ));
        }
        if size > self.size {
            self.file
                .set_len(size)
                .io_ctx(|| format!("grow {} to {size} bytes", self.path.display()))?;
            self.size = size;
        }
        Ok(())
    }
}

impl ReplicaImage for GrowableRaw {
    fn size(&self) -> u64 {
        self.size
    }
    fn format(&self) -> ReplicaFormat {
        ReplicaFormat::Raw
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> tidemark_formats::error::Result<()> {
        read_zero_fill(&self.file, buf, offset)
            .map_err(|e| fmt_err(format!("read {} at {offset}: {e}", self.path.display())))
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> tidemark_formats::error::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| fmt_err(format!("write {} at {offset}: {e}", self.path.display())))
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> tidemark_formats::error::Result<()> {
        if len == 0 {
            return Ok(());
        }
        fileops::discard_zeroing(&self.file, self.kind, offset, len)
            .map_err(|e| fmt_err(format!("zero {offset}+{len} of {}: {e}", self.path.display())))
    }
    fn flush(&mut self) -> tidemark_formats::error::Result<()> {
        fileops::fdatasync(&self.file).map_err(|e| fmt_err(format!("fdatasync {}: {e}", self.path.display())))
    }
    fn allocated(&self, offset: u64, len: u64) -> tidemark_formats::error::Result<Vec<(u64, u64, bool)>> {
        let offset = offset.min(self.size);
        let len = len.min(self.size - offset);
        let runs = fileops::allocation(&self.file, offset, len, usize::MAX)
            .map_err(|e| fmt_err(format!("allocation of {}: {e}", self.path.display())))?;
        let mut at = offset;
        let mut out = Vec::with_capacity(runs.len());
        for (l, hole) in runs {
            out.push((at, l, !hole));
            at += l;
        }
        Ok(out)
    }
}

/// What a replica is kept in: the growable raw file, or a fixed-size image.
enum Image {
    Raw(GrowableRaw),
    Fixed(Box<dyn ReplicaImage>),
}

/// An open replica, in its disk's format.
pub struct Replica {
    image: Image,
    dir: PathBuf,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("dir", &self.dir)
            .field("format", &self.format())
            .field("size", &self.size())
            .finish()
    }
}

impl Replica {
    /// Open the replica in `dir`, which must be kept in `format` (the
    /// disk's, from the catalog), creating it if there is none: raw empty
    /// (it grows), VMDK at `disk_size` rounded up to 512 bytes (refused
    /// while the size is unknown, 0). A raw replica grows to `disk_size`;
    /// a VMDK one smaller than `disk_size` is refused.
    pub fn open(dir: &Path, format: ReplicaFormat, disk_size: u64) -> Result<Self> {
        let present = dir.join(REPLICA_FILE).exists() || dir.join(VMDK_FILE).exists();
        if present {
            let found = tidemark_formats::replica::detect(dir)?;
            if found != format {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{}: the catalog says the replica is {format}, the folder holds a {found} replica",
                        dir.display()
                    ),
                ));
            }
        }
        let mut r = match format {
            ReplicaFormat::Raw => Self {
                image: Image::Raw(GrowableRaw::open(dir)?),
                dir: dir.to_path_buf(),
            },
            _ if present => Self {
                image: Image::Fixed(tidemark_formats::replica::open(dir)?),
                dir: dir.to_path_buf(),
            },
            _ => {
                if disk_size == 0 {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "{}: a {format} replica is created with the disk's size, and the Hello did not carry it (disk_size 0)",
                            dir.display()
                        ),
                    ));
                }
                // A flat extent without its descriptor is what a create
                // interrupted by a crash leaves (the descriptor is written
                // last, and nothing is applied before it exists).
                let stray = dir.join(FLAT_EXTENT_FILE);
                if stray.exists() {
                    std::fs::remove_file(&stray).io_at("remove", &stray)?;
                }
                let size = vmdk_size(disk_size);
                let image = tidemark_formats::replica::create(dir, format, size)?;
                tracing::info!("created a {format} replica of {size} bytes in {}", dir.display());
                Self {
                    image: Image::Fixed(image),
                    dir: dir.to_path_buf(),
                }
            }
        };
        r.ensure_size(disk_size)?;
        Ok(r)
    }

    fn image(&self) -> &dyn ReplicaImage {
        match &self.image {
            Image::Raw(r) => r,
            Image::Fixed(b) => b.as_ref(),
        }
    }

    fn image_mut(&mut self) -> &mut dyn ReplicaImage {
        match &mut self.image {
            Image::Raw(r) => r,
            Image::Fixed(b) => b.as_mut(),
        }
    }

    /// The replica's format.
    pub fn format(&self) -> ReplicaFormat {
        self.image().format()
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.image().size()
    }

    /// The disk's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a record's range can be applied: always for raw (it grows),
    /// within the size for a fixed-size (VMDK) replica.
    pub fn check_fits(&self, h: &RecordHeader) -> Result<()> {
        if h.length == 0 || !has_range(h.kind) {
            return Ok(());
        }
        if let Image::Fixed(img) = &self.image {
            let end = h.offset.saturating_add(h.length);
            if end > img.size() {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "seq {}: range {}+{} ends beyond the {}-byte {} replica in {} (a VMDK replica keeps the size the disk had when first seen)",
                        h.seq,
                        h.offset,
                        h.length,
                        img.size(),
                        img.format(),
                        self.dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Apply one verified record (a raw replica grows to cover its range).
    /// Idempotent: applying it again leaves the same bytes.
    pub fn apply(&mut self, h: &RecordHeader, payload: &[u8]) -> Result<()> {
        if h.length == 0 || !has_range(h.kind) {
            return Ok(());
        }
        self.check_fits(h)?;
        if let Image::Raw(r) = &mut self.image {
            r.grow(h.offset.saturating_add(h.length)).map_err(|e| e.seq(h.seq))?;
        }
        // Whatever the replica's format says, applying failed on I/O; the
        // cause and where stay attached.
        let ctx = |e: tidemark_formats::Error| {
            let mut e = Error::from(e).seq(h.seq);
            e.kind = ErrorKind::Io;
            e
        };
        match h.kind {
            RecordKind::Write | RecordKind::Sync => {
                let n = usize::try_from(h.length).unwrap_or(usize::MAX);
                let data = payload.get(..n).ok_or_else(|| {
                    Error::malformed(format!("seq {}: payload shorter than its {} bytes", h.seq, h.length))
                })?;
                self.image_mut().write_at(data, h.offset).map_err(ctx)
            }
            RecordKind::Zero | RecordKind::Trim => self.image_mut().zero_range(h.offset, h.length).map_err(ctx),
            _ => Ok(()),
        }
    }

    /// Grow a raw replica to `size` bytes (the disk's size, from the
    /// hello); never shrinks it. A VMDK replica cannot grow: a larger size
    /// is an error.
    pub fn ensure_size(&mut self, size: u64) -> Result<()> {
        let dir = self.dir.clone();
        match &mut self.image {
            Image::Raw(r) => {
                if size > r.size {
                    r.grow(size)?;
                    fileops::fdatasync(&r.file).io_at("fdatasync", &r.path)?;
                }
                Ok(())
            }
            Image::Fixed(img) if size > img.size() => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{}: the disk is now {size} bytes, its {} replica {} bytes; a VMDK replica does not grow (rebind the disk with a forced resync to start a new one)",
                    dir.display(),
                    img.format(),
                    img.size()
                ),
            )),
            Image::Fixed(_) => Ok(()),
        }
    }

    /// Fill `buf` from `offset`; what lies past the end reads zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let inside = usize::try_from(size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (a, b) = buf.split_at_mut(inside);
        b.fill(0);
        if a.is_empty() {
            return Ok(());
        }
        self.image().read_at(a, offset).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("read the replica in {}: {e}", self.dir.display()),
            )
        })
    }

    /// The first byte in `[offset, end)` that may hold data (None: only
    /// zeros there), from the image's allocation.
    pub fn next_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        let end = end.min(self.size());
        if offset >= end {
            return Ok(None);
        }
        let ext = self
            .image()
            .allocated(offset, end - offset)
            .map_err(|e| Error::new(ErrorKind::Io, format!("allocation in {}: {e}", self.dir.display())))?;
        Ok(ext.iter().find(|e| e.2 && e.1 > 0).map(|e| e.0.max(offset)))
    }

    /// Make every applied record durable (fdatasync; for VMDK, data first,
    /// then the metadata that points at it).
    pub fn sync(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        self.image_mut()
            .flush()
            .map_err(|e| Error::new(ErrorKind::Io, format!("flush the replica in {}: {e}", dir.display())))
    }
}

fn has_range(k: RecordKind) -> bool {
    matches!(
        k,
        RecordKind::Write | RecordKind::Sync | RecordKind::Zero | RecordKind::Trim
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: RecordKind, seq: u64, offset: u64, payload: &[u8], length: u64) -> RecordHeader {
        RecordHeader::new(kind, seq, 0, offset, length, payload)
    }

    #[test]
    fn vmdk_replicas_need_a_size_are_rounded_and_never_grow() {
        for format in [ReplicaFormat::VmdkFlat, ReplicaFormat::VmdkSparse] {
            let d = tempfile::tempdir().unwrap();
            let e = Replica::open(d.path(), format, 0).unwrap_err();
            assert!(e.to_string().contains("disk_size 0"), "{e}");
            let mut r = Replica::open(d.path(), format, 1000).unwrap();
            assert_eq!((r.format(), r.size()), (format, 1024), "rounded up to a sector");
            assert_eq!(r.next_data(0, 1024).unwrap(), None, "a new replica holds no data");
            let data = vec![7u8; 24];
            r.apply(&rec(RecordKind::Write, 1, 1000, &data, 24), &data).unwrap();
            r.apply(&rec(RecordKind::Trim, 2, 1008, b"", 8), b"").unwrap();
            let past = rec(RecordKind::Write, 3, 1020, &data, 24);
            assert!(r.check_fits(&past).unwrap_err().to_string().contains("ends beyond"));
            assert!(r.apply(&past, &data).is_err());
            r.sync().unwrap();
            let mut buf = vec![1u8; 40];
            r.read_at(&mut buf, 1000).unwrap();
            let mut want = vec![7u8; 24];
            want[8..16].fill(0);
            want.resize(40, 0);
            assert_eq!(buf, want, "what lies past the end reads zeros");
            assert!(r.next_data(0, 1024).unwrap().is_some());
            let e = r.ensure_size(4096).unwrap_err();
            assert!(e.to_string().contains("does not grow"), "{e}");
            drop(r);
            // The catalog's format must match the folder's.
            let e = Replica::open(d.path(), ReplicaFormat::Raw, 1024).unwrap_err();
            assert!(e.to_string().contains(&format!("holds a {format} replica")), "{e}");
            let r = Replica::open(d.path(), format, 1024).unwrap();
            assert_eq!(r.size(), 1024);
            drop(r);
            // A forced rebind moves every file of the VMDK to the kept
            // history's folder, together (and again is a no-op).
            let to = d.path().join("kept");
            keep_history(d.path(), &to).unwrap();
            assert!(!d.path().join(VMDK_FILE).exists() && !d.path().join(FLAT_EXTENT_FILE).exists());
            keep_history(d.path(), &to).unwrap();
            let old = tidemark_formats::replica::open_read_only(&to).unwrap();
            let mut b = [0u8; 8];
            old.read_at(&mut b, 1000).unwrap();
            assert_eq!(b, [7; 8], "the moved replica still opens");
        }
    }

    #[test]
    fn raw_grows_and_a_stray_flat_extent_is_cleared() {
        let d = tempfile::tempdir().unwrap();
        let mut r = Replica::open(d.path(), ReplicaFormat::Raw, 0).unwrap();
        assert_eq!(r.size(), 0);
        let data = vec![3u8; 4096];
        r.apply(&rec(RecordKind::Write, 1, 8192, &data, 4096), &data).unwrap();
        assert_eq!(r.size(), 12288);
        r.ensure_size(1 << 20).unwrap();
        assert_eq!(r.size(), 1 << 20);
        r.apply(&rec(RecordKind::Zero, 2, 8192, b"", 4096), b"").unwrap();
        r.sync().unwrap();
        assert_eq!(r.next_data(0, 1 << 20).unwrap(), None, "zero punched a hole");
        drop(r);
        std::fs::create_dir(d.path().join(crate::undo::UNDO_DIR)).unwrap();
        let to = d.path().join("kept");
        keep_history(d.path(), &to).unwrap();
        keep_history(d.path(), &to).unwrap();
        assert!(
            d.path().join(REPLICA_FILE).exists(),
            "a raw replica stays (the new disk's sync compares with it)"
        );
        assert!(to.join(REPLICA_FILE).exists() && to.join(crate::undo::UNDO_DIR).is_dir());
        assert!(
            !d.path().join(crate::undo::UNDO_DIR).exists(),
            "the undo data moved with the history"
        );

        // A create interrupted before its descriptor leaves only the extent.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FLAT_EXTENT_FILE), b"junk").unwrap();
        let r = Replica::open(d.path(), ReplicaFormat::VmdkFlat, 4096).unwrap();
        let mut b = [1u8; 4];
        r.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 4]);
    }
}
