//! Replica images: the disk the target keeps up to date, in one of three
//! live formats, and the files a failover exports. This module owns the
//! image files' layouts (raw, VMDK monolithicFlat, VMDK monolithicSparse,
//! and the export-only VMDK streamOptimized), their readers and writers,
//! and the crash-safe order of their writes. It never decides what to
//! write or when: the target applies records, the tools export views.
//!
//! ```text
//!  <dir>/  (one disk's folder, as the target keeps it)
//!    replica.raw           --format raw: the disk's bytes, sparse (holes read zeros)
//!  or
//!    replica.vmdk          --format vmdk-flat: text descriptor, createType="monolithicFlat",
//!    replica-flat.vmdk        one extent line: RW <sectors> FLAT "replica-flat.vmdk" 0
//!                             (the flat extent holds the disk's bytes, sparse like raw)
//!  or
//!    replica.vmdk          --format vmdk-sparse: hosted sparse extent, createType="monolithicSparse"
//!      sector 0        header "KDMV" (see vmdk::sparse)
//!      sector 1..21    embedded descriptor: RW <sectors> SPARSE "replica.vmdk"
//!      sector 21..     redundant grain directory, redundant grain tables,
//!                      grain directory, grain tables (all preallocated, zero = hole)
//!      overhead..      64 KiB grains, appended in the order they are first written
//!
//!  export only (vmdk::stream): <out>.vmdk, createType="streamOptimized"
//!      header (gd at end) | descriptor | [marker lba,size | zlib grain]… |
//!      [GT marker | GT]… | GD marker | GD | footer marker | footer | end-of-stream
//! ```
//!
//! The format of an existing folder is detected from the files present, and
//! a VMDK's subformat from its first bytes (magic "KDMV" → sparse extent,
//! text → descriptor). Every length read from a file is bounded before it
//! is allocated; a damaged header or descriptor is an error naming the file
//! and what was wrong.

pub mod raw;
pub mod vmdk;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tidemark_util::{crashsafe, fileops};

use crate::error::{Error, ErrorKind, IoContext, Result, Where};

/// File name of a raw replica inside a disk's folder.
pub const RAW_FILE: &str = "replica.raw";
/// File name of a VMDK replica (descriptor or sparse extent) inside a disk's folder.
pub const VMDK_FILE: &str = "replica.vmdk";
/// File name of the flat extent of a monolithicFlat replica.
pub const FLAT_EXTENT_FILE: &str = "replica-flat.vmdk";

/// The live formats a replica can be kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaFormat {
    /// `replica.raw`, a sparse file of the disk's bytes.
    Raw,
    /// VMDK monolithicFlat: `replica.vmdk` descriptor + `replica-flat.vmdk`.
    VmdkFlat,
    /// VMDK monolithicSparse: `replica.vmdk`, a hosted sparse extent.
    VmdkSparse,
}

impl ReplicaFormat {
    /// The name used on command lines and in config ("raw", "vmdk-flat", "vmdk-sparse").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::VmdkFlat => "vmdk-flat",
            Self::VmdkSparse => "vmdk-sparse",
        }
    }
}

impl fmt::Display for ReplicaFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplicaFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Self::Raw),
            "vmdk-flat" => Ok(Self::VmdkFlat),
            "vmdk-sparse" => Ok(Self::VmdkSparse),
            other => Err(Error::new(
                ErrorKind::Mismatch,
                format!("unknown replica format {other:?} (raw, vmdk-flat, vmdk-sparse)"),
            )),
        }
    }
}

/// The formats a disk can be exported to: the live ones and streamOptimized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// A raw file (sparse where the disk reads zeros).
    Raw,
    /// VMDK monolithicFlat: `<out>` descriptor + `<stem>-flat.vmdk` beside it.
    VmdkFlat,
    /// VMDK monolithicSparse, one file.
    VmdkSparse,
    /// VMDK streamOptimized (deflate-compressed grains), one file.
    VmdkStream,
}

impl ExportFormat {
    /// The name used on command lines ("raw", "vmdk-flat", "vmdk-sparse", "vmdk-stream").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::VmdkFlat => "vmdk-flat",
            Self::VmdkSparse => "vmdk-sparse",
            Self::VmdkStream => "vmdk-stream",
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExportFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Self::Raw),
            "vmdk-flat" => Ok(Self::VmdkFlat),
            "vmdk-sparse" => Ok(Self::VmdkSparse),
            "vmdk-stream" => Ok(Self::VmdkStream),
            other => Err(Error::new(
                ErrorKind::Mismatch,
                format!("unknown export format {other:?} (raw, vmdk-flat, vmdk-sparse, vmdk-stream)"),
            )),
        }
    }
}

impl From<ReplicaFormat> for ExportFormat {
    fn from(f: ReplicaFormat) -> Self {
        match f {
            ReplicaFormat::Raw => Self::Raw,
            ReplicaFormat::VmdkFlat => Self::VmdkFlat,
            ReplicaFormat::VmdkSparse => Self::VmdkSparse,
        }
    }
}

/// A replica disk image of a fixed size. Reads may run concurrently with
/// each other; writes take `&mut self`.
pub trait ReplicaImage: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// The format this image is kept in.
    fn format(&self) -> ReplicaFormat;
    /// Fill `buf` from `offset`; what was never written (or was zeroed) reads zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write `data` at `offset`; `offset + data.len()` must not exceed the size.
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()>;
    /// Make `[offset, offset+len)` read zeros (punching holes where it can).
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Make everything written so far durable (data first, then the
    /// metadata that points at it).
    fn flush(&mut self) -> Result<()>;
    /// Extents `(offset, len, data?)` covering `[offset, offset+len)` clipped
    /// to the size, in order; `data == false` means the extent reads zeros.
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>>;
}

/// Create a new, all-zero replica of `size` bytes in `dir` (which must
/// exist and hold no replica yet). VMDK sizes must be a multiple of 512.
pub fn create(dir: &Path, format: ReplicaFormat, size: u64) -> Result<Box<dyn ReplicaImage>> {
    for name in [RAW_FILE, VMDK_FILE, FLAT_EXTENT_FILE] {
        let p = dir.join(name);
        if p.exists() {
            return Err(Error::io(
                "create replica: already exists:",
                &p,
                io::Error::from(io::ErrorKind::AlreadyExists),
            ));
        }
    }
    match format {
        ReplicaFormat::Raw => Ok(Box::new(raw::RawImage::create(&dir.join(RAW_FILE), size)?)),
        ReplicaFormat::VmdkFlat => Ok(Box::new(vmdk::flat::FlatImage::create(&dir.join(VMDK_FILE), size)?)),
        ReplicaFormat::VmdkSparse => Ok(Box::new(vmdk::sparse::SparseImage::create(&dir.join(VMDK_FILE), size)?)),
    }
}

/// Open the replica in `dir` for reading and writing, detecting its format.
pub fn open(dir: &Path) -> Result<Box<dyn ReplicaImage>> {
    open_mode(dir, true)
}

/// Open the replica in `dir` read-only; writes fail.
pub fn open_read_only(dir: &Path) -> Result<Box<dyn ReplicaImage>> {
    open_mode(dir, false)
}

/// The format of the replica in `dir`, from the files present (and, for a
/// VMDK, its first bytes).
pub fn detect(dir: &Path) -> Result<ReplicaFormat> {
    let raw = dir.join(RAW_FILE);
    let vmdk = dir.join(VMDK_FILE);
    match (raw.exists(), vmdk.exists()) {
        (true, true) => Err(Error::new(
            ErrorKind::Mismatch,
            format!(
                "{}: holds both {RAW_FILE} and {VMDK_FILE}; which is the replica?",
                dir.display()
            ),
        )),
        (true, false) => Ok(ReplicaFormat::Raw),
        (false, true) => vmdk::detect(&vmdk),
        (false, false) => Err(Error::io(
            "open replica: no replica.raw or replica.vmdk in",
            dir,
            io::Error::from(io::ErrorKind::NotFound),
        )),
    }
}

fn open_mode(dir: &Path, writable: bool) -> Result<Box<dyn ReplicaImage>> {
    match detect(dir)? {
        ReplicaFormat::Raw => Ok(Box::new(raw::RawImage::open(&dir.join(RAW_FILE), writable)?)),
        ReplicaFormat::VmdkFlat | ReplicaFormat::VmdkSparse => vmdk::open(&dir.join(VMDK_FILE), writable),
    }
}

/// Bytes read from the source per step of an export (and per progress call).
const EXPORT_CHUNK: usize = 1 << 20;

/// Export a disk image read through `read(offset, buf)` as a file of
/// `format` at `out` (for vmdk-flat, also `<stem>-flat.vmdk` beside it),
/// calling `progress(done, total)` after each chunk. Regions that read zeros
/// are not written (holes, unallocated grains). The output is written under
/// a temporary name and renamed into place once durable, so a failed export
/// leaves no file that looks complete. VMDK outputs whose size is not a
/// multiple of 512 are padded with zeros to the next sector.
pub fn export(
    read: &dyn Fn(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    out: &Path,
    format: ExportFormat,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut reader = ExportReader {
        read,
        size,
        done: 0,
        progress,
    };
    match format {
        ExportFormat::Raw => export_plain(&mut reader, out, size),
        ExportFormat::VmdkFlat => {
            let extent_name = vmdk::flat::extent_name_for(out)?;
            let extent = out.with_file_name(&extent_name);
            let cap = round_up_sector(size)?;
            export_plain(&mut reader, &extent, cap)?;
            vmdk::flat::write_descriptor(out, &extent_name, cap)
        }
        ExportFormat::VmdkSparse => vmdk::sparse::export(&mut reader, out),
        ExportFormat::VmdkStream => vmdk::stream::export(&mut reader, out),
    }
}

/// The files an export to `out` in `format` creates (a flat VMDK is a
/// descriptor and an extent beside it). Each is written as its
/// [`part_path`] first and renamed into place when complete.
pub fn export_outputs(out: &Path, format: ExportFormat) -> Result<Vec<PathBuf>> {
    let mut files = vec![out.to_path_buf()];
    if format == ExportFormat::VmdkFlat {
        files.push(out.with_file_name(vmdk::flat::extent_name_for(out)?));
    }
    Ok(files)
}

/// The source of an export: reads chunks in order and reports progress.
pub(crate) struct ExportReader<'a> {
    read: &'a dyn Fn(u64, &mut [u8]) -> io::Result<()>,
    pub(crate) size: u64,
    done: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl ExportReader<'_> {
    /// Read the next chunk (at most `EXPORT_CHUNK` bytes) into `buf`, which
    /// is resized to it; `None` at the end. Returns the chunk's offset.
    pub(crate) fn next_chunk(&mut self, buf: &mut Vec<u8>) -> Result<Option<u64>> {
        if self.done >= self.size {
            return Ok(None);
        }
        let n = usize::try_from((self.size - self.done).min(EXPORT_CHUNK as u64)).unwrap_or(EXPORT_CHUNK);
        buf.clear();
        buf.resize(n, 0);
        let at = self.done;
        (self.read)(at, buf).map_err(|e| Error {
            kind: ErrorKind::Io,
            context: String::new(),
            at: Box::new(Where {
                op: Some("export: read the source".into()),
                offset: Some(at),
                ..Where::default()
            }),
            source: Some(e),
        })?;
        self.done += n as u64;
        (self.progress)(self.done, self.size);
        Ok(Some(at))
    }
}

/// A temporary name beside `path` for an output being written.
pub fn part_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::new(
            ErrorKind::OutOfBounds,
            format!("export: {} has no file name", path.display()),
        )
    })?;
    let mut tmp = name.to_os_string();
    tmp.push(".part");
    Ok(path.with_file_name(tmp))
}

/// fsync `tmp`, rename it to `path`, fsync the folder.
pub(crate) fn commit_part(file: &File, tmp: &Path, path: &Path) -> Result<()> {
    file.sync_all().ctx("fsync", tmp)?;
    fs::rename(tmp, path).ctx(&format!("rename {} to", tmp.display()), path)?;
    crashsafe::fsync_dir(parent_dir(path)).ctx("fsync the folder of", path)
}

pub(crate) fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Export as a plain file of `len` bytes (≥ the source size; the tail reads zeros).
fn export_plain(reader: &mut ExportReader<'_>, out: &Path, len: u64) -> Result<()> {
    let tmp = part_path(out)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx("create", &tmp)?;
    f.set_len(len).ctx("size", &tmp)?;
    let mut buf = Vec::new();
    while let Some(at) = reader.next_chunk(&mut buf)? {
        for (i, piece) in buf.chunks(ZERO_CHECK).enumerate() {
            if !is_zero(piece) {
                f.write_all_at(piece, at + (i * ZERO_CHECK) as u64).ctx("write", &tmp)?;
            }
        }
    }
    commit_part(&f, &tmp, out)
}

/// Granularity at which exports look for zeros to leave as holes.
const ZERO_CHECK: usize = 64 << 10;

pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// `size` rounded up to a whole number of 512-byte sectors.
pub(crate) fn round_up_sector(size: u64) -> Result<u64> {
    size.checked_add(511)
        .map(|s| s & !511)
        .ok_or_else(|| Error::new(ErrorKind::OutOfBounds, format!("size {size} is too large")))
}

/// Check `[offset, offset+len)` against an image of `size` bytes.
pub(crate) fn check_range(path: &Path, size: u64, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!(
                "{}: range {offset}+{len} is beyond the {size}-byte disk",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The error for a write to an image opened read-only.
pub(crate) fn read_only(path: &Path) -> Error {
    Error::io(
        "write to read-only replica",
        path,
        io::Error::from(io::ErrorKind::PermissionDenied),
    )
}

/// Allocation of a byte range of a plain file (raw replica, flat extent) as
/// `(offset, len, data?)` in image coordinates (`base` = where the image
/// starts in the file).
pub(crate) fn file_allocation(f: &File, base: u64, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
    let runs = fileops::allocation(f, base + offset, len, usize::MAX)?;
    let mut out: Vec<(u64, u64, bool)> = Vec::with_capacity(runs.len());
    let mut at = offset;
    for (l, hole) in runs {
        push_extent(&mut out, at, l, !hole);
        at += l;
    }
    Ok(out)
}

/// Append an extent, merging it with the previous one when they agree.
pub(crate) fn push_extent(out: &mut Vec<(u64, u64, bool)>, offset: u64, len: u64, data: bool) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.2 == data && last.0 + last.1 == offset {
            last.1 += len;
            return;
        }
    }
    out.push((offset, len, data));
}
