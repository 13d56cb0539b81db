//! VMDK monolithicFlat: a text descriptor and one flat extent holding the
//! disk's bytes as they are, the way ESXi keeps disks. The data path is the
//! raw replica's (holes for zeroed ranges); this module owns the
//! descriptor's contents and how it names the extent.
//!
//! ```text
//!  replica.vmdk (text, written once, crash-safe: temp → fsync → rename → fsync dir)
//!  +--------------------------------------------------------------+
//!  | # Disk DescriptorFile                                        |
//!  | version=1 / CID=… / parentCID=ffffffff                       |
//!  | createType="monolithicFlat"                                  |
//!  | RW <size/512> FLAT "replica-flat.vmdk" 0                     |
//!  | ddb.* (geometry 16 heads × 63 sectors, adapter ide)          |
//!  +--------------------------------------------------------------+
//!  replica-flat.vmdk (created first, so a descriptor never names a missing extent)
//!  byte 0                                                    size
//!  +--------------------------------------------------------------+
//!  | disk bytes, sparse                                           |
//!  +--------------------------------------------------------------+
//! ```
//!
//! Reading also accepts descriptors written by others: createType "vmfs"
//! (extent type VMFS) and a FLAT extent at a non-zero sector offset. The
//! extent must be named by a plain file name in the descriptor's folder.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use tidemark_util::crashsafe;

use super::descriptor::{Access, Descriptor, ExtentKind, MAX_DESCRIPTOR};
use super::{capacity_sectors, file_name, new_cid, unsupported_create_type, SECTOR};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::replica::raw::FileExtent;
use crate::replica::{ReplicaFormat, ReplicaImage};

/// A monolithicFlat VMDK.
#[derive(Debug)]
pub struct FlatImage {
    descriptor: PathBuf,
    extent: FileExtent,
}

/// The flat extent's name for a descriptor at `desc` ("x.vmdk" → "x-flat.vmdk").
pub fn extent_name_for(desc: &Path) -> Result<String> {
    let name = file_name(desc)?;
    let stem = name.strip_suffix(".vmdk").unwrap_or(&name);
    Ok(format!("{stem}-flat.vmdk"))
}

/// Write the descriptor of a monolithicFlat disk of `capacity` bytes whose
/// extent is `extent_name` beside it (crash-safe).
pub fn write_descriptor(desc: &Path, extent_name: &str, capacity: u64) -> Result<()> {
    let sectors = capacity_sectors(desc, capacity)?;
    let text = Descriptor::render(
        "monolithicFlat",
        new_cid(desc),
        &format!("RW {sectors} FLAT \"{extent_name}\" 0"),
        sectors,
    );
    crashsafe::write_atomic(desc, text.as_bytes()).ctx("write descriptor", desc)
}

/// Read and parse the descriptor file at `path` (bounded to
/// [`MAX_DESCRIPTOR`] bytes).
pub fn read_descriptor(path: &Path) -> Result<Descriptor> {
    let f = File::open(path).ctx("open", path)?;
    let mut bytes = Vec::new();
    f.take(MAX_DESCRIPTOR as u64 + 1)
        .read_to_end(&mut bytes)
        .ctx("read", path)?;
    if bytes.len() < 4 {
        return Err(Error::corrupt(path, "too short to be a VMDK descriptor or extent"));
    }
    Descriptor::parse(&bytes, path)
}

impl FlatImage {
    /// Create `desc` (monolithicFlat descriptor) and `<stem>-flat.vmdk`
    /// beside it for an all-zero disk of `size` bytes (a multiple of 512).
    pub fn create(desc: &Path, size: u64) -> Result<Self> {
        capacity_sectors(desc, size)?;
        let extent_name = extent_name_for(desc)?;
        let extent = FileExtent::create(&desc.with_file_name(&extent_name), size)?;
        write_descriptor(desc, &extent_name, size)?;
        Ok(Self {
            descriptor: desc.to_path_buf(),
            extent,
        })
    }

    /// Open the monolithicFlat (or vmfs) disk described by `desc`.
    pub fn open(desc: &Path, writable: bool) -> Result<Self> {
        let d = read_descriptor(desc)?;
        if !matches!(d.create_type.as_str(), "monolithicFlat" | "vmfs") {
            return Err(unsupported_create_type(desc, &d.create_type));
        }
        if d.extents.len() != 1 {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "{}: {} extents; only single-extent flat disks are supported",
                    desc.display(),
                    d.extents.len()
                ),
            ));
        }
        let e = &d.extents[0];
        if !matches!(e.kind, ExtentKind::Flat | ExtentKind::Vmfs) {
            return Err(Error::corrupt(
                desc,
                format!(
                    "createType {:?} with a {} extent (expected FLAT)",
                    d.create_type, e.kind_name
                ),
            ));
        }
        if writable && e.access != Access::Rw {
            return Err(Error::new(
                ErrorKind::Mismatch,
                format!(
                    "{}: extent is {:?}, cannot open it for writing",
                    desc.display(),
                    e.access
                ),
            ));
        }
        if e.file.is_empty() || e.file.contains('/') || e.file == "." || e.file == ".." {
            return Err(Error::corrupt(
                desc,
                format!(
                    "extent file {:?} is not a plain file name in the descriptor's folder",
                    e.file
                ),
            ));
        }
        let size = e
            .sectors
            .checked_mul(SECTOR)
            .filter(|&s| s > 0)
            .ok_or_else(|| Error::corrupt(desc, format!("extent of {} sectors is not a disk size", e.sectors)))?;
        let base = e
            .offset
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::corrupt(desc, format!("extent offset {} sectors overflows", e.offset)))?;
        let extent = FileExtent::open(&desc.with_file_name(&e.file), base, size, writable)?;
        Ok(Self {
            descriptor: desc.to_path_buf(),
            extent,
        })
    }

    /// The descriptor's path.
    pub fn descriptor_path(&self) -> &Path {
        &self.descriptor
    }
}

impl ReplicaImage for FlatImage {
    fn size(&self) -> u64 {
        self.extent.size
    }
    fn format(&self) -> ReplicaFormat {
        ReplicaFormat::VmdkFlat
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.extent.read_at(buf, offset)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.extent.write_at(data, offset)
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        self.extent.zero_range(offset, len)
    }
    fn flush(&mut self) -> Result<()> {
        self.extent.flush()
    }
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        self.extent.allocated(offset, len)
    }
}
