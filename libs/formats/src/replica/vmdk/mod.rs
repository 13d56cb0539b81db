//! VMDK replicas and exports, written from the VMware Virtual Disk Format
//! 1.1 description: the text descriptor ([`descriptor`]), monolithicFlat
//! ([`flat`]), monolithicSparse ([`sparse`]) and the export-only
//! streamOptimized ([`stream`]). This module decides which of them a file
//! is; it never reads parents (differencing disks) or split extents.
//!
//! ```text
//!  a .vmdk file starts with either
//!    "KDMV" (4B 44 4D 56)  → a sparse extent with its descriptor inside
//!                            (createType "monolithicSparse"; "streamOptimized"
//!                            when its grains are compressed: export-only)
//!    text                   → a descriptor naming its extents
//!                            (createType "monolithicFlat" or "vmfs": one FLAT/VMFS extent)
//! ```

pub mod descriptor;
pub mod flat;
pub mod sparse;
pub mod stream;

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{ReplicaFormat, ReplicaImage};
use crate::error::{Error, ErrorKind, IoContext, Result};

/// Magic at byte 0 of a sparse extent ("KDMV" on disk: 0x564d444b little-endian).
pub const SPARSE_MAGIC: [u8; 4] = *b"KDMV";
/// Bytes in a sector, the unit of every VMDK offset and size.
pub const SECTOR: u64 = 512;

/// Which VMDK subformat `path` holds, from its first bytes (and, for a
/// descriptor, its createType).
pub fn detect(path: &Path) -> Result<ReplicaFormat> {
    let mut head = [0u8; 512];
    let mut f = File::open(path).ctx("open", path)?;
    let n = read_up_to(&mut f, &mut head).ctx("read", path)?;
    if n >= 4 && head[..4] == SPARSE_MAGIC {
        return Ok(ReplicaFormat::VmdkSparse);
    }
    // A descriptor is text; binary bytes here are a sparse extent whose
    // magic is damaged (or not a VMDK at all).
    let text_end = head[..n].iter().position(|&b| b == 0).unwrap_or(n);
    let binary = (text_end < n && text_end < 16)
        || std::str::from_utf8(&head[..text_end.min(64)]).is_err()
        || head[..text_end.min(64)]
            .iter()
            .any(|&b| b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t'));
    if binary {
        return Err(Error::corrupt(
            path,
            format!(
                "bad magic {:02x?}: neither a VMDK sparse extent (\"KDMV\") nor a text descriptor",
                &head[..n.min(4)]
            ),
        ));
    }
    let d = flat::read_descriptor(path)?;
    match d.create_type.as_str() {
        "monolithicFlat" | "vmfs" => Ok(ReplicaFormat::VmdkFlat),
        other => Err(unsupported_create_type(path, other)),
    }
}

/// Open the VMDK at `path` (a monolithicSparse extent or a monolithicFlat
/// descriptor).
pub fn open(path: &Path, writable: bool) -> Result<Box<dyn ReplicaImage>> {
    match detect(path)? {
        ReplicaFormat::VmdkSparse => Ok(Box::new(sparse::SparseImage::open(path, writable)?)),
        _ => Ok(Box::new(flat::FlatImage::open(path, writable)?)),
    }
}

pub(crate) fn unsupported_create_type(path: &Path, ct: &str) -> Error {
    Error::new(
        ErrorKind::UnsupportedVersion,
        format!(
            "{}: VMDK createType {ct:?} is not supported (monolithicFlat, monolithicSparse; streamOptimized is export-only)",
            path.display()
        ),
    )
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A fresh content id for a new descriptor: any value but the "no parent"
/// marker, different from one image to the next.
pub(crate) fn new_cid(path: &Path) -> u32 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&now.to_le_bytes());
    h.update(path.as_os_str().as_encoded_bytes());
    let b = h.finalize();
    let cid = u32::from_le_bytes([b.as_bytes()[0], b.as_bytes()[1], b.as_bytes()[2], b.as_bytes()[3]]);
    if cid == u32::MAX {
        1
    } else {
        cid
    }
}

/// `size` in sectors, refusing sizes that are not whole sectors.
pub(crate) fn capacity_sectors(path: &Path, size: u64) -> Result<u64> {
    if size == 0 || size & (SECTOR - 1) != 0 {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!(
                "{}: a VMDK disk's size must be a non-zero multiple of 512, not {size}",
                path.display()
            ),
        ));
    }
    Ok(size / SECTOR)
}

/// The file name of `path`, as a descriptor names it.
pub(crate) fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.contains('"'))
        .map(str::to_string)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfBounds,
                format!("{}: a VMDK file needs a UTF-8 name without quotes", path.display()),
            )
        })
}
