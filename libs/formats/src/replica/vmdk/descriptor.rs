//! The VMDK text descriptor (VMware Virtual Disk Format 1.1, "The
//! Descriptor File"): a small `key=value` text naming the disk's create
//! type and its extents. It is a file of its own for monolithicFlat, and
//! sits inside the sparse extent (sectors 1..21) for monolithicSparse and
//! streamOptimized. This module parses hostile bytes without panicking and
//! renders the descriptors Tidemark writes; it never opens extent files.
//!
//! ```text
//!  # Disk DescriptorFile
//!  version=1
//!  CID=<8 hex digits>                  content id, changes when the data does
//!  parentCID=ffffffff                  no parent (not a differencing disk)
//!  createType="monolithicFlat"         | "monolithicSparse" | "streamOptimized"
//!
//!  # Extent description
//!  RW <sectors> FLAT "replica-flat.vmdk" 0        access, size, type, file, [offset]
//!  RW <sectors> SPARSE "replica.vmdk"
//!
//!  # The Disk Data Base
//!  #DDB
//!  ddb.virtualHWVersion = "4"
//!  ddb.geometry.cylinders = "<c>"      CHS geometry, 16 heads × 63 sectors
//!  ddb.geometry.heads = "16"
//!  ddb.geometry.sectors = "63"
//!  ddb.adapterType = "ide"
//! ```

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// Largest descriptor read or parsed (QEMU reads at most 1 MiB too).
pub const MAX_DESCRIPTOR: usize = 1 << 20;
/// Most extent lines one descriptor may list.
pub const MAX_EXTENTS: usize = 1024;
/// Longest extent file name accepted.
pub const MAX_FILE_NAME: usize = 1024;

/// Access mode of an extent line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Rw,
    RdOnly,
    NoAccess,
}

/// Kind of an extent line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Raw bytes in a plain file, from a sector offset.
    Flat,
    /// A hosted sparse extent ("KDMV" header, grain directory and tables).
    Sparse,
    /// Reads zeros, has no file.
    Zero,
    /// ESX flat extent (a flat extent at offset 0).
    Vmfs,
    /// Any other type (VMFSSPARSE, VMFSRDM, SESPARSE, …), kept by name.
    Other,
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub access: Access,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    pub kind: ExtentKind,
    /// The type as written (e.g. "FLAT").
    pub kind_name: String,
    /// The extent's file name, relative to the descriptor's folder (empty for ZERO).
    pub file: String,
    /// Start of the extent inside its file, in sectors (FLAT only).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// The `version=` line (1 if absent).
    pub version: u32,
    pub cid: Option<u32>,
    pub parent_cid: Option<u32>,
    pub create_type: String,
    pub parent_file_name_hint: Option<String>,
    pub extents: Vec<Extent>,
}

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::corrupt(path, format!("VMDK descriptor: {msg}"))
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v)
}

impl Descriptor {
    /// Parse descriptor bytes read from `path` (used only in messages). The
    /// text ends at the first NUL (an embedded descriptor is NUL-padded).
    /// Checks: size, `version` 1–3, a `createType`, well-formed extent lines
    /// (at least one), no parent (differencing disks are not supported).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        if bytes.len() > MAX_DESCRIPTOR {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!(
                    "{}: VMDK descriptor of {} bytes is larger than {MAX_DESCRIPTOR}",
                    path.display(),
                    bytes.len()
                ),
            ));
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end])
            .map_err(|e| corrupt(path, format!("not UTF-8 text (byte {})", e.valid_up_to())))?;
        let mut d = Descriptor {
            version: 1,
            cid: None,
            parent_cid: None,
            create_type: String::new(),
            parent_file_name_hint: None,
            extents: Vec::new(),
        };
        let mut saw_create_type = false;
        for (n, raw_line) in text.split('\n').enumerate() {
            let line = raw_line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let lineno = n + 1;
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(corrupt(path, format!("more than {MAX_EXTENTS} extent lines")));
                }
                d.extents
                    .push(parse_extent(line).map_err(|m| corrupt(path, format!("line {lineno}: {m}: {line:?}")))?);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(corrupt(
                    path,
                    format!("line {lineno} is neither key=value nor an extent: {:?}", clip(line)),
                ));
            };
            let (k, v) = (k.trim(), unquote(v));
            match k {
                "version" => {
                    d.version = v
                        .parse()
                        .map_err(|_| corrupt(path, format!("version {v:?} is not a number")))?;
                    if !(1..=3).contains(&d.version) {
                        return Err(Error::new(
                            ErrorKind::UnsupportedVersion,
                            format!(
                                "{}: VMDK descriptor version {} (this build reads 1 to 3)",
                                path.display(),
                                d.version
                            ),
                        ));
                    }
                }
                "CID" => {
                    d.cid = Some(parse_cid(v).ok_or_else(|| corrupt(path, format!("CID {v:?} is not 8 hex digits")))?)
                }
                "parentCID" => {
                    d.parent_cid = Some(
                        parse_cid(v).ok_or_else(|| corrupt(path, format!("parentCID {v:?} is not 8 hex digits")))?,
                    )
                }
                "createType" => {
                    if v.is_empty() || v.len() > 64 {
                        return Err(corrupt(path, format!("createType {:?} is not a create type", clip(v))));
                    }
                    d.create_type = v.to_string();
                    saw_create_type = true;
                }
                "parentFileNameHint" => d.parent_file_name_hint = Some(clip(v).to_string()),
                // ddb.* and anything else VMware adds: kept out of the way.
                _ => {}
            }
        }
        if !saw_create_type {
            return Err(corrupt(path, "no createType line"));
        }
        if let Some(p) = &d.parent_file_name_hint {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "{}: VMDK has a parent ({p:?}); differencing disks are not supported",
                    path.display()
                ),
            ));
        }
        if d.extents.is_empty() {
            return Err(corrupt(
                path,
                format!("createType {:?} but no extent line", d.create_type),
            ));
        }
        Ok(d)
    }

    /// Render a descriptor with one extent line, as Tidemark writes it.
    pub fn render(create_type: &str, cid: u32, extent_line: &str, capacity_sectors: u64) -> String {
        let cylinders = (capacity_sectors / (16 * 63)).min(16383);
        format!(
            "# Disk DescriptorFile\n\
             version=1\n\
             CID={cid:08x}\n\
             parentCID=ffffffff\n\
             createType=\"{create_type}\"\n\
             \n\
             # Extent description\n\
             {extent_line}\n\
             \n\
             # The Disk Data Base\n\
             #DDB\n\
             \n\
             ddb.virtualHWVersion = \"4\"\n\
             ddb.geometry.cylinders = \"{cylinders}\"\n\
             ddb.geometry.heads = \"16\"\n\
             ddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"ide\"\n"
        )
    }
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn parse_cid(v: &str) -> Option<u32> {
    if v.is_empty() || v.len() > 8 {
        return None;
    }
    u32::from_str_radix(v, 16).ok()
}

/// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`
fn parse_extent(line: &str) -> std::result::Result<Extent, String> {
    let mut rest = line;
    let mut word = || {
        let t = rest.trim_start();
        let end = t.find(|c: char| c.is_ascii_whitespace()).unwrap_or(t.len());
        let (w, r) = t.split_at(end);
        rest = r;
        w
    };
    let access = match word() {
        "RW" => Access::Rw,
        "RDONLY" => Access::RdOnly,
        _ => Access::NoAccess,
    };
    let sectors_s = word();
    let sectors: u64 = sectors_s
        .parse()
        .map_err(|_| format!("extent size {:?} is not a number", clip(sectors_s)))?;
    let kind_name = word().to_string();
    let kind = match kind_name.as_str() {
        "FLAT" => ExtentKind::Flat,
        "SPARSE" => ExtentKind::Sparse,
        "ZERO" => ExtentKind::Zero,
        "VMFS" => ExtentKind::Vmfs,
        "" => return Err("extent line has no type".into()),
        _ => ExtentKind::Other,
    };
    if kind_name.len() > 16 {
        return Err(format!("extent type {:?} is not a type", clip(&kind_name)));
    }
    let t = rest.trim_start();
    let (file, after) = if let Some(q) = t.strip_prefix('"') {
        let close = q.find('"').ok_or("extent file name has no closing quote")?;
        (q[..close].to_string(), &q[close + 1..])
    } else if t.is_empty() && kind == ExtentKind::Zero {
        (String::new(), "")
    } else {
        return Err("extent file name is not quoted".into());
    };
    if file.len() > MAX_FILE_NAME {
        return Err(format!("extent file name longer than {MAX_FILE_NAME} bytes"));
    }
    let after = after.trim();
    let offset = if after.is_empty() {
        0
    } else {
        after
            .parse()
            .map_err(|_| format!("extent offset {:?} is not a number", clip(after)))?
    };
    if kind == ExtentKind::Flat && after.is_empty() {
        return Err("FLAT extent without an offset".into());
    }
    Ok(Extent {
        access,
        sectors,
        kind,
        kind_name,
        file,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let p = Path::new("x.vmdk");
        let text = Descriptor::render("monolithicFlat", 0xabc, "RW 2048 FLAT \"x-flat.vmdk\" 0", 2048);
        let d = Descriptor::parse(text.as_bytes(), p).unwrap();
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.cid, Some(0xabc));
        assert_eq!(d.parent_cid, Some(0xffff_ffff));
        assert_eq!(
            d.extents,
            vec![Extent {
                access: Access::Rw,
                sectors: 2048,
                kind: ExtentKind::Flat,
                kind_name: "FLAT".into(),
                file: "x-flat.vmdk".into(),
                offset: 0
            }]
        );
        // Windows line ends and NUL padding.
        let crlf = text.replace('\n', "\r\n") + "\0\0\0garbage";
        assert_eq!(Descriptor::parse(crlf.as_bytes(), p).unwrap(), d);

        let no_type = text.replace("createType=\"monolithicFlat\"\n", "");
        let e = Descriptor::parse(no_type.as_bytes(), p).unwrap_err();
        assert!(e.to_string().contains("no createType"), "{e}");
        let no_extent = text.replace("RW 2048 FLAT \"x-flat.vmdk\" 0\n", "");
        let e = Descriptor::parse(no_extent.as_bytes(), p).unwrap_err();
        assert!(e.to_string().contains("no extent line"), "{e}");
        let bad = text.replace("RW 2048 FLAT \"x-flat.vmdk\" 0", "RW lots FLAT \"x\" 0");
        let e = Descriptor::parse(bad.as_bytes(), p).unwrap_err();
        assert!(e.to_string().contains("extent size"), "{e}");
        let v9 = text.replace("version=1", "version=9");
        assert_eq!(
            Descriptor::parse(v9.as_bytes(), p).unwrap_err().kind,
            ErrorKind::UnsupportedVersion
        );
        let child = text.replace("version=1\n", "version=1\nparentFileNameHint=\"base.vmdk\"\n");
        assert_eq!(
            Descriptor::parse(child.as_bytes(), p).unwrap_err().kind,
            ErrorKind::UnsupportedVersion
        );
        assert!(Descriptor::parse(&[0xff, 0xfe, b'\n'], p).is_err());
    }
}
