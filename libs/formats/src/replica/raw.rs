//! Raw replicas: the disk's bytes at the same offsets in one file. Also the
//! data path of a VMDK flat extent, which is the same thing at a sector
//! offset named by its descriptor. Zeroed ranges become holes.
//!
//! ```text
//!  replica.raw (or replica-flat.vmdk, from byte `base`):
//!  byte 0                                                       size
//!       +---------------------------------------------------------+
//!       | disk byte 0 … disk byte size-1   (holes read zeros)     |
//!       +---------------------------------------------------------+
//! ```

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use tidemark_util::fileops::read_zero_fill;
use tidemark_util::{crashsafe, fileops};

use super::{check_range, file_allocation, read_only, ReplicaFormat, ReplicaImage};
use crate::error::{Error, ErrorKind, IoContext, Result};

/// A byte range of one plain file holding a disk image.
#[derive(Debug)]
pub(crate) struct FileExtent {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// Where the image starts in the file.
    pub(crate) base: u64,
    pub(crate) size: u64,
    pub(crate) writable: bool,
}

impl FileExtent {
    /// Create `path` (which must not exist) as a sparse file of `size` bytes.
    pub(crate) fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .ctx("create", path)?;
        file.set_len(size).ctx("size", path)?;
        file.sync_all().ctx("fsync", path)?;
        crashsafe::fsync_dir(super::parent_dir(path)).ctx("fsync the folder of", path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            base: 0,
            size,
            writable: true,
        })
    }

    /// Open `path`, whose bytes `[base, base+size)` are the image; the file
    /// must be at least that long.
    pub(crate) fn open(path: &Path, base: u64, size: u64, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .ctx("open", path)?;
        let len = fileops::backing_size(&file).ctx("size of", path)?;
        let need = base
            .checked_add(size)
            .ok_or_else(|| Error::corrupt(path, format!("extent {base}+{size} overflows")))?;
        if len < need {
            return Err(Error::corrupt(
                path,
                format!("file is {len} bytes, shorter than the {need} bytes its image needs"),
            ));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            base,
            size,
            writable,
        })
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        read_zero_fill(&self.file, buf, self.base + offset)
            .ctx(&format!("read {}+{} of", offset, buf.len()), &self.path)
    }

    pub(crate) fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(read_only(&self.path));
        }
        check_range(&self.path, self.size, offset, data.len() as u64)?;
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, self.base + offset)
            .ctx(&format!("write {}+{} to", offset, data.len()), &self.path)
    }

    pub(crate) fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(read_only(&self.path));
        }
        check_range(&self.path, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let kind = fileops::backing_kind(&self.file).ctx("stat", &self.path)?;
        fileops::discard_zeroing(&self.file, kind, self.base + offset, len)
            .ctx(&format!("zero {offset}+{len} of"), &self.path)
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        fileops::fdatasync(&self.file).ctx("fdatasync", &self.path)
    }

    pub(crate) fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let offset = offset.min(self.size);
        let len = len.min(self.size - offset);
        if len == 0 {
            return Ok(Vec::new());
        }
        file_allocation(&self.file, self.base, offset, len).ctx("find the allocation of", &self.path)
    }
}

/// A raw replica file.
#[derive(Debug)]
pub struct RawImage {
    inner: FileExtent,
}

impl RawImage {
    /// Create `path` (which must not exist) as a sparse, all-zero disk of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        Ok(Self {
            inner: FileExtent::create(path, size)?,
        })
    }

    /// Open an existing raw replica; its size is the file's.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let f = File::open(path).ctx("open", path)?;
        let size = fileops::backing_size(&f).ctx("size of", path)?;
        drop(f);
        if size == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{}: raw replica is empty", path.display()),
            ));
        }
        Ok(Self {
            inner: FileExtent::open(path, 0, size, writable)?,
        })
    }
}

impl ReplicaImage for RawImage {
    fn size(&self) -> u64 {
        self.inner.size
    }
    fn format(&self) -> ReplicaFormat {
        ReplicaFormat::Raw
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(data, offset)
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        self.inner.zero_range(offset, len)
    }
    fn flush(&mut self) -> Result<()> {
        self.inner.flush()
    }
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        self.inner.allocated(offset, len)
    }
}
