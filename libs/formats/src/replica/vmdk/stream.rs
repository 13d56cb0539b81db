//! VMDK streamOptimized, export only: a sparse extent written front to back
//! in one pass, each grain compressed (zlib/deflate) behind a marker, the
//! grain tables and directory after the grains, and a footer repeating the
//! header with the directory's real offset. It is what a failover hands to
//! tools that import VMDKs (`vmdk-stream`); it is never opened for writing.
//!
//! ```text
//!  sector 0   header (as in `sparse`): version 3, flags 0x30001 (newline
//!             test, compressed, markers), gdOffset = 0xffff…ff (at end),
//!             compressAlgorithm 1 (deflate), overHead = 1 + descriptor sectors
//!  sector 1   descriptor: createType="streamOptimized", RW <cap> SPARSE "<name>"
//!  then, for each grain holding a non-zero byte, in disk order:
//!             +---------+---------+----------------------------+-------------+
//!             | lba u64 | size u32| zlib stream (size bytes)   | zero pad to |
//!             | sector  |         | of the 64 KiB grain        | a sector    |
//!             +---------+---------+----------------------------+-------------+
//!  then, for each grain table with at least one grain (a table with none is
//!  left out: its directory entry is 0):
//!             metadata marker (one sector): val u64 = 4 (sectors that follow),
//!               size u32 = 0, type u32 = 1 (grain table); then the table
//!  metadata marker type 2 (grain directory), val = directory sectors; the directory
//!  metadata marker type 3 (footer), val = 1; the footer: the header with gdOffset set
//!  end-of-stream marker: one sector of zeros (val 0, size 0, type 0)
//! ```
//!
//! A grain table entry is the sector of its grain's marker. Grains are
//! compressed one at a time, so memory stays at one chunk, one grain and
//! one grain table per 32 MiB of disk (written at the end).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use flate2::write::ZlibEncoder;
use flate2::Compression;

use super::descriptor::Descriptor;
use super::sparse::{
    SparseHeader, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_TEST, GD_AT_END, GRAIN_SECTORS, GTES_PER_GT,
    MAX_CAPACITY_SECTORS,
};
use super::{file_name, new_cid, SECTOR};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::replica::{commit_part, is_zero, part_path, round_up_sector, ExportReader};

/// Metadata marker types.
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;
const SECTOR_BYTES: usize = 512;
/// compressAlgorithm value for deflate.
const COMPRESS_DEFLATE: u16 = 1;

/// A sector-counting writer.
struct Out<'a> {
    w: BufWriter<&'a File>,
    pos: u64,
    path: &'a Path,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).ctx("write", self.path)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let rem = self.pos % SECTOR;
        if rem != 0 {
            let z = [0u8; SECTOR_BYTES];
            self.put(&z[..SECTOR_BYTES - usize::try_from(rem).unwrap_or(0)])?;
        }
        Ok(())
    }

    fn sector(&self) -> u64 {
        self.pos / SECTOR
    }

    fn marker(&mut self, val: u64, kind: u32) -> Result<()> {
        let mut m = [0u8; SECTOR_BYTES];
        m[0..8].copy_from_slice(&val.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        self.put(&m)
    }
}

fn u32_sector(path: &Path, s: u64) -> Result<u32> {
    u32::try_from(s).map_err(|_| {
        Error::new(
            ErrorKind::OutOfBounds,
            format!("{}: stream past 2 TiB of compressed data", path.display()),
        )
    })
}

/// Write the stream of the disk `reader` yields to `out` (via a temporary name).
pub(crate) fn export(reader: &mut ExportReader<'_>, out: &Path) -> Result<()> {
    let name = file_name(out)?;
    let tmp = part_path(out)?;
    let capacity = round_up_sector(reader.size)? / SECTOR;
    if capacity == 0 || capacity > MAX_CAPACITY_SECTORS {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!(
                "{}: a {}-byte disk does not fit a VMDK stream (1 byte to 2 TiB)",
                out.display(),
                reader.size
            ),
        ));
    }
    let desc = Descriptor::render(
        "streamOptimized",
        new_cid(out),
        &format!("RW {capacity} SPARSE \"{name}\""),
        capacity,
    );
    let desc_sectors = (desc.len() as u64).div_ceil(SECTOR);
    let gtes = u64::from(GTES_PER_GT);
    let n_gt = capacity.div_ceil(GRAIN_SECTORS * gtes);
    let mut header = SparseHeader {
        version: 3,
        flags: FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity,
        grain_size: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: desc_sectors,
        num_gtes_per_gt: GTES_PER_GT,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        overhead: 1 + desc_sectors,
        unclean_shutdown: 0,
        compress_algorithm: COMPRESS_DEFLATE,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx("create", &tmp)?;
    let mut o = Out {
        w: BufWriter::with_capacity(1 << 20, &file),
        pos: 0,
        path: &tmp,
    };
    o.put(&header.encode())?;
    o.put(desc.as_bytes())?;
    o.pad()?;

    // Grain table entries, one table per directory entry, created on first use.
    let mut tables: Vec<Option<Vec<u32>>> = vec![None; usize::try_from(n_gt).unwrap_or(0)];
    let grain_bytes = usize::try_from(GRAIN_SECTORS * SECTOR).unwrap_or(1 << 16);
    let mut buf = Vec::new();
    let mut grain = vec![0u8; grain_bytes];
    let mut z = Vec::with_capacity(grain_bytes + 1024);
    while let Some(at) = reader.next_chunk(&mut buf)? {
        for (i, piece) in buf.chunks(grain_bytes).enumerate() {
            if is_zero(piece) {
                continue;
            }
            // The last grain of a disk that is not a whole number of grains
            // is padded with zeros (readers decompress whole grains).
            let data: &[u8] = if piece.len() == grain_bytes {
                piece
            } else {
                grain[..piece.len()].copy_from_slice(piece);
                grain[piece.len()..].fill(0);
                &grain
            };
            let g = (at + (i * grain_bytes) as u64) / (GRAIN_SECTORS * SECTOR);
            z.clear();
            let mut enc = ZlibEncoder::new(&mut z, Compression::default());
            enc.write_all(data).ctx("compress a grain for", &tmp)?;
            enc.finish().ctx("compress a grain for", &tmp)?;
            let size = u32::try_from(z.len()).unwrap_or(u32::MAX);
            let sector = u32_sector(&tmp, o.sector())?;
            o.put(&(g * GRAIN_SECTORS).to_le_bytes())?;
            o.put(&size.to_le_bytes())?;
            o.put(&z)?;
            o.pad()?;
            let t = usize::try_from(g / gtes).unwrap_or(usize::MAX);
            let e = usize::try_from(g % gtes).unwrap_or(0);
            if let Some(slot) = tables.get_mut(t) {
                slot.get_or_insert_with(|| vec![0u32; GTES_PER_GT as usize])[e] = sector;
            }
        }
    }

    let gt_sectors = (gtes * 4).div_ceil(SECTOR);
    let mut gd = Vec::with_capacity(tables.len());
    for t in &tables {
        match t {
            None => gd.push(0u32),
            Some(entries) => {
                o.marker(gt_sectors, MARKER_GT)?;
                gd.push(u32_sector(&tmp, o.sector())?);
                let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
                o.put(&bytes)?;
                o.pad()?;
            }
        }
    }
    let gd_sectors = (gd.len() as u64 * 4).div_ceil(SECTOR);
    o.marker(gd_sectors, MARKER_GD)?;
    header.gd_offset = o.sector();
    let bytes: Vec<u8> = gd.iter().flat_map(|e| e.to_le_bytes()).collect();
    o.put(&bytes)?;
    o.pad()?;
    o.marker(1, MARKER_FOOTER)?;
    o.put(&header.encode())?;
    o.marker(0, MARKER_EOS)?;
    o.w.flush().ctx("write", &tmp)?;
    drop(o);
    commit_part(&file, &tmp, out)
}
