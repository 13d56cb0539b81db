//! VMDK monolithicSparse: one hosted sparse extent ("KDMV") holding its own
//! descriptor, a two-level map (grain directory → grain tables → grains)
//! and the grains, allocated at the end of the file as they are first
//! written. This module owns the header, the map, grain allocation and the
//! crash-safe order of writes; it never compresses (see `stream`).
//!
//! ```text
//!  sector 0     header (512 bytes, little-endian)
//!               byte  0 magic "KDMV"           4 version u32 = 1
//!                     8 flags u32 (bit 0 newline test, bit 1 redundant GD,
//!                       bit 2 zeroed-grain GTE, bit 16 compressed, bit 17 markers)
//!                    12 capacity u64 (sectors)  20 grainSize u64 (sectors, 128 = 64 KiB)
//!                    28 descriptorOffset u64    36 descriptorSize u64 (sectors)
//!                    44 numGTEsPerGT u32 = 512  48 rgdOffset u64   56 gdOffset u64
//!                    64 overHead u64 (sectors before the first grain)
//!                    72 uncleanShutdown u8      73 "\n" " " "\r" "\n" (newline test)
//!                    77 compressAlgorithm u16 = 0   79..512 zero
//!  sector 1     descriptor, 20 sectors, NUL-padded:
//!                 createType="monolithicSparse", RW <capacity> SPARSE "<file name>"
//!  sector 21    redundant grain directory (RGD): one u32 per grain table = its sector
//!               redundant grain tables: 512 u32 per table (4 sectors each)
//!  gdOffset     grain directory (GD), same entries pointing at the primary tables
//!               grain tables (GT): entry i = sector of grain i, 0 = never written
//!  overHead     (rounded up to a grain) grains, 64 KiB each, in first-write order
//!               ... file end = where the next grain goes
//! ```
//!
//! Disk byte `o` lives in grain `g = o / grain`, found through GD[g / 512]
//! then that table's entry `g % 512`. All tables are preallocated at create
//! (as holes: they are zeros), so a write never allocates map space.
//!
//! Crash-safe order: a write to a new grain writes the whole grain (zeros
//! around the data) at the end of the file and updates the table in memory
//! only; `flush` makes the grain data durable (fdatasync) before it writes
//! the table entries that point at it (both copies), then syncs again. A
//! crash in between leaves grains no table names (leaked space at the end
//! of the file, which the next allocation skips), never a table entry
//! naming garbage. Zeroing a written grain punches a hole in it and keeps
//! its entry, so the file's logical size never grows from trims.
//!
//! Reading accepts what QEMU and VMware write: any grain size that is a
//! power of two up to 1 MiB, up to 512 entries per table, a missing
//! redundant directory, zeroed-grain entries (1), tables not yet allocated
//! (directory entry 0; a write then allocates the table at the end of the
//! file, synced before the directory entry naming it).

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use tidemark_util::bytes::{u32_at, u64_at};
use tidemark_util::fileops::{self, read_zero_fill, BackingKind};

use super::descriptor::{Descriptor, ExtentKind};
use super::{capacity_sectors, file_name, new_cid, unsupported_create_type, SECTOR, SPARSE_MAGIC};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::replica::{
    check_range, commit_part, is_zero, part_path, push_extent, read_only, round_up_sector, ExportReader, ReplicaFormat,
    ReplicaImage,
};

/// Bytes in the header.
pub const HEADER_LEN: usize = 512;
/// Newline-detection test bytes: bit 0 of the flags says they are valid.
pub const FLAG_NEWLINE_TEST: u32 = 1 << 0;
/// A redundant grain directory and tables are kept.
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// A grain table entry of 1 means "reads zeros".
pub const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
/// Grains are deflate-compressed (streamOptimized).
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Grains and metadata are preceded by markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// gdOffset of a stream whose directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// Grain size Tidemark writes, in sectors (64 KiB).
pub const GRAIN_SECTORS: u64 = 128;
/// Grain table entries Tidemark writes (and the most it reads).
pub const GTES_PER_GT: u32 = 512;
/// Descriptor space Tidemark reserves, in sectors.
pub const DESCRIPTOR_SECTORS: u64 = 20;
/// Largest grain read, in sectors (1 MiB).
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest capacity, in sectors: grain offsets are 32-bit sector numbers, so
/// a hosted sparse extent holds at most 2 TiB.
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 32;
/// Most grain directory entries read (4 MiB of directory).
pub const MAX_GD_ENTRIES: u64 = 1 << 20;
/// Largest embedded descriptor read, in sectors (1 MiB).
pub const MAX_DESCRIPTOR_SECTORS: u64 = 2048;
/// Grain tables kept in memory before clean ones are dropped.
const GT_CACHE: usize = 4096;
/// Data written by an export between flushes (bounds the dirty tables held).
const EXPORT_FLUSH_EVERY: u64 = 256 << 20;

/// The sparse extent header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Disk size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub num_gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    /// Sectors before the first grain.
    pub overhead: u64,
    pub unclean_shutdown: u8,
    pub compress_algorithm: u16,
}

/// Sizes derived from a validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grain_bytes: u64,
    pub gt_entries: u32,
    /// Bytes of one grain table.
    pub gt_bytes: u64,
    /// Entries in the grain directory.
    pub gd_entries: u64,
}

/// A length or offset within a buffer already allocated (so it fits).
fn us(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn oob(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::OutOfBounds,
        format!("{}: VMDK sparse header: {msg}", path.display()),
    )
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::corrupt(path, format!("VMDK sparse extent: {msg}"))
}

impl SparseHeader {
    /// The 512 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&SPARSE_MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = self.unclean_shutdown;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Decode a header from the first bytes of `path`: magic, version (1–3)
    /// and the newline test bytes. Field bounds are checked by [`Self::geometry`].
    pub fn decode(b: &[u8], path: &Path) -> Result<Self> {
        if b.len() < HEADER_LEN {
            return Err(bad(
                path,
                format!("{} bytes is shorter than the 512-byte header", b.len()),
            ));
        }
        if b[0..4] != SPARSE_MAGIC {
            return Err(bad(path, format!("bad magic {:02x?} (expected \"KDMV\")", &b[0..4])));
        }
        let h = Self {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            num_gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            unclean_shutdown: b[72],
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "{}: VMDK sparse extent version {} (this build reads 1 to 3)",
                    path.display(),
                    h.version
                ),
            ));
        }
        if h.flags & FLAG_NEWLINE_TEST != 0 && b[73..77] != *b"\n \r\n" {
            return Err(bad(
                path,
                format!(
                    "newline test bytes are {:02x?}, not 0a 20 0d 0a (was the file copied as text?)",
                    &b[73..77]
                ),
            ));
        }
        Ok(h)
    }

    /// Check every size and offset against the format's limits and the
    /// file's length, before anything is allocated from them.
    pub fn geometry(&self, path: &Path, file_len: u64) -> Result<Geometry> {
        let g = self.grain_size;
        if g == 0 || !g.is_power_of_two() || g > MAX_GRAIN_SECTORS {
            return Err(bad(
                path,
                format!("absurd grain size of {g} sectors (expected a power of two up to {MAX_GRAIN_SECTORS})"),
            ));
        }
        if self.num_gtes_per_gt == 0 || self.num_gtes_per_gt > GTES_PER_GT {
            return Err(bad(
                path,
                format!("{} entries per grain table (expected 1 to 512)", self.num_gtes_per_gt),
            ));
        }
        if self.capacity == 0 {
            return Err(bad(path, "capacity is 0 sectors"));
        }
        if self.capacity > MAX_CAPACITY_SECTORS {
            return Err(oob(
                path,
                format!(
                    "capacity of {} sectors is over the 2 TiB a sparse extent holds",
                    self.capacity
                ),
            ));
        }
        let per_gt = g * u64::from(self.num_gtes_per_gt);
        let gd_entries = self.capacity.div_ceil(per_gt);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(oob(
                path,
                format!("grain directory of {gd_entries} entries is larger than {MAX_GD_ENTRIES}"),
            ));
        }
        let fits = |what: &str, sector: u64, bytes: u64| -> Result<()> {
            let end = sector.checked_mul(SECTOR).and_then(|s| s.checked_add(bytes));
            match end {
                Some(e) if e <= file_len && sector > 0 => Ok(()),
                _ => Err(oob(
                    path,
                    format!("{what} at sector {sector} ({bytes} bytes) lies outside the {file_len}-byte file"),
                )),
            }
        };
        if self.gd_offset != GD_AT_END {
            fits("grain directory", self.gd_offset, gd_entries * 4)?;
            if self.flags & FLAG_REDUNDANT_GD != 0 && self.rgd_offset != 0 {
                fits("redundant grain directory", self.rgd_offset, gd_entries * 4)?;
            }
        }
        if self.descriptor_size > MAX_DESCRIPTOR_SECTORS {
            return Err(oob(
                path,
                format!(
                    "descriptor of {} sectors is over {MAX_DESCRIPTOR_SECTORS}",
                    self.descriptor_size
                ),
            ));
        }
        if self.descriptor_size > 0 {
            fits("descriptor", self.descriptor_offset, self.descriptor_size * SECTOR)?;
        }
        if self.overhead.checked_mul(SECTOR).is_none_or(|o| o > file_len) {
            return Err(oob(
                path,
                format!(
                    "overhead of {} sectors is past the end of the {file_len}-byte file",
                    self.overhead
                ),
            ));
        }
        Ok(Geometry {
            grain_bytes: g * SECTOR,
            gt_entries: self.num_gtes_per_gt,
            gt_bytes: u64::from(self.num_gtes_per_gt) * 4,
            gd_entries,
        })
    }
}

/// The header and layout Tidemark writes for a disk of `capacity` sectors.
pub(crate) fn new_layout(capacity: u64, flags: u32) -> SparseHeader {
    let grains = capacity.div_ceil(GRAIN_SECTORS);
    let n_gt = grains.div_ceil(u64::from(GTES_PER_GT));
    let gd_sectors = (n_gt * 4).div_ceil(SECTOR);
    let gt_sectors = (u64::from(GTES_PER_GT) * 4).div_ceil(SECTOR);
    let rgd = 1 + DESCRIPTOR_SECTORS;
    let gd = rgd + gd_sectors + n_gt * gt_sectors;
    let end = gd + gd_sectors + n_gt * gt_sectors;
    SparseHeader {
        version: 1,
        flags,
        capacity,
        grain_size: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: DESCRIPTOR_SECTORS,
        num_gtes_per_gt: GTES_PER_GT,
        rgd_offset: rgd,
        gd_offset: gd,
        overhead: end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS,
        unclean_shutdown: 0,
        compress_algorithm: 0,
    }
}

/// Write a fresh, empty monolithicSparse extent into `f` (at `at`), naming
/// itself `name` in its descriptor.
fn build(f: &File, at: &Path, name: &str, size: u64) -> Result<()> {
    let capacity = capacity_sectors(at, size)?;
    if capacity > MAX_CAPACITY_SECTORS {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!(
                "{}: {size} bytes is over the 2 TiB a VMDK sparse extent holds",
                at.display()
            ),
        ));
    }
    let h = new_layout(capacity, FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD);
    let desc = Descriptor::render(
        "monolithicSparse",
        new_cid(at),
        &format!("RW {capacity} SPARSE \"{name}\""),
        capacity,
    );
    let desc_room = usize::try_from(DESCRIPTOR_SECTORS * SECTOR).unwrap_or(usize::MAX);
    if desc.len() > desc_room {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!("{}: descriptor does not fit", at.display()),
        ));
    }
    let mut head = vec![0u8; HEADER_LEN + desc_room];
    head[..HEADER_LEN].copy_from_slice(&h.encode());
    head[HEADER_LEN..HEADER_LEN + desc.len()].copy_from_slice(desc.as_bytes());
    f.write_all_at(&head, 0).ctx("write header to", at)?;
    let n_gt = capacity.div_ceil(GRAIN_SECTORS * u64::from(GTES_PER_GT));
    let gd_sectors = (n_gt * 4).div_ceil(SECTOR);
    let gt_sectors = (u64::from(GTES_PER_GT) * 4).div_ceil(SECTOR);
    for dir in [h.rgd_offset, h.gd_offset] {
        let first_gt = dir + gd_sectors;
        let mut gd = Vec::with_capacity(usize::try_from(n_gt * 4).unwrap_or(0));
        for i in 0..n_gt {
            let s = u32::try_from(first_gt + i * gt_sectors).map_err(|_| {
                Error::new(
                    ErrorKind::OutOfBounds,
                    format!("{}: grain tables past 2 TiB", at.display()),
                )
            })?;
            gd.extend_from_slice(&s.to_le_bytes());
        }
        f.write_all_at(&gd, dir * SECTOR).ctx("write grain directory to", at)?;
    }
    // The grain tables are all zeros: leave them as holes.
    f.set_len(h.overhead * SECTOR).ctx("size", at)?;
    Ok(())
}

/// What never changes while an image is open (but the directory, which a
/// flush may extend, is only changed through `&mut`).
#[derive(Debug)]
struct Meta {
    path: PathBuf,
    file: File,
    writable: bool,
    header: SparseHeader,
    geo: Geometry,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
}

#[derive(Debug, Default)]
struct State {
    /// Grain tables read (or changed), by directory index.
    gts: HashMap<usize, Vec<u32>>,
    /// Tables changed since the last flush.
    dirty: BTreeSet<usize>,
    /// Where the next grain goes (bytes, grain-aligned).
    next_free: u64,
    /// Data written (or zeroed) since the last flush.
    data_dirty: bool,
}

/// A monolithicSparse VMDK.
#[derive(Debug)]
pub struct SparseImage {
    meta: Meta,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Meta {
    fn is_zeroed(&self, e: u32) -> bool {
        e == 1 && self.header.flags & FLAG_ZEROED_GRAIN != 0
    }

    fn holds_data(&self, e: u32) -> bool {
        e != 0 && !self.is_zeroed(e)
    }

    /// Make sure table `idx` is in the cache, reading and checking it.
    fn load_gt(&self, st: &mut State, idx: usize) -> Result<()> {
        if st.gts.contains_key(&idx) {
            return Ok(());
        }
        if st.gts.len() >= GT_CACHE {
            let dirty = std::mem::take(&mut st.dirty);
            st.gts.retain(|k, _| dirty.contains(k));
            st.dirty = dirty;
        }
        let n = self.geo.gt_entries as usize;
        let sector = self.gd[idx];
        let mut t = vec![0u32; n];
        if sector != 0 {
            let mut raw = vec![0u8; n * 4];
            read_zero_fill(&self.file, &mut raw, u64::from(sector) * SECTOR)
                .ctx(&format!("read grain table {idx} of"), &self.path)?;
            let lo = self.header.overhead.max(1);
            for (j, e) in t.iter_mut().enumerate() {
                let v = u32_at(&raw, j * 4);
                if self.holds_data(v) {
                    let start = u64::from(v);
                    let end = start * SECTOR + self.geo.grain_bytes;
                    if start < lo || end > st.next_free {
                        return Err(bad(
                            &self.path,
                            format!(
                                "grain table {idx} entry {j} points at sector {start}, outside the grain area \
                                 (sectors {lo} to {})",
                                st.next_free / SECTOR
                            ),
                        ));
                    }
                }
                *e = v;
            }
        }
        st.gts.insert(idx, t);
        Ok(())
    }

    fn split(&self, grain: u64) -> (usize, usize) {
        let per = u64::from(self.geo.gt_entries);
        (
            usize::try_from(grain / per).unwrap_or(usize::MAX),
            usize::try_from(grain % per).unwrap_or(0),
        )
    }

    /// The table entry of grain `grain`.
    fn entry(&self, st: &mut State, grain: u64) -> Result<u32> {
        let (t, e) = self.split(grain);
        self.load_gt(st, t)?;
        Ok(st.gts.get(&t).map_or(0, |v| v[e]))
    }

    fn set_entry(&self, st: &mut State, grain: u64, value: u32) {
        let (t, e) = self.split(grain);
        if let Some(v) = st.gts.get_mut(&t) {
            v[e] = value;
            st.dirty.insert(t);
        }
    }

    /// Walk `[offset, offset+len)` grain by grain: `(grain, offset in grain, piece length, offset into the request)`.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        let gb = self.geo.grain_bytes;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let g = at / gb;
            let inside = at % gb;
            let n = (gb - inside).min(end - at);
            let r = (g, inside, n, at - offset);
            at += n;
            Some(r)
        })
    }

    fn table_bytes(&self, t: &[u32]) -> Vec<u8> {
        t.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
}

impl SparseImage {
    /// Create `path` (which must not exist) as an empty monolithicSparse
    /// disk of `size` bytes (a non-zero multiple of 512, at most 2 TiB).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        if path.exists() {
            return Err(Error::io(
                "create",
                path,
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        let name = file_name(path)?;
        let tmp = part_path(path)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .ctx("create", &tmp)?;
        build(&f, &tmp, &name, size)?;
        commit_part(&f, &tmp, path)?;
        drop(f);
        Self::open(path, true)
    }

    /// Open the monolithicSparse extent at `path`, checking its header,
    /// descriptor and grain directory.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .ctx("open", path)?;
        let file_len = file.metadata().ctx("stat", path)?.len();
        let mut hb = vec![0u8; HEADER_LEN];
        read_zero_fill(&file, &mut hb, 0).ctx("read header of", path)?;
        if file_len < HEADER_LEN as u64 {
            return Err(bad(
                path,
                format!("{file_len} bytes is shorter than the 512-byte header"),
            ));
        }
        let header = SparseHeader::decode(&hb, path)?;
        if header.flags & (FLAG_COMPRESSED | FLAG_MARKERS) != 0
            || header.compress_algorithm != 0
            || header.gd_offset == GD_AT_END
        {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "{}: a streamOptimized (compressed) VMDK is export-only; convert it to open it",
                    path.display()
                ),
            ));
        }
        if header.version == 3 && writable {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "{}: VMDK sparse extent version 3 can only be opened read-only",
                    path.display()
                ),
            ));
        }
        let geo = header.geometry(path, file_len)?;
        if header.descriptor_size == 0 {
            return Err(bad(path, "no embedded descriptor (an extent of a split disk?)"));
        }
        let mut db = vec![0u8; usize::try_from(header.descriptor_size * SECTOR).unwrap_or(0)];
        read_zero_fill(&file, &mut db, header.descriptor_offset * SECTOR).ctx("read descriptor of", path)?;
        let d = Descriptor::parse(&db, path)?;
        if d.create_type != "monolithicSparse" {
            return Err(unsupported_create_type(path, &d.create_type));
        }
        match d.extents.as_slice() {
            [e] if e.kind == ExtentKind::Sparse && e.sectors == header.capacity => {}
            [e] => {
                return Err(bad(
                    path,
                    format!(
                        "descriptor's extent is {} of {} sectors; the header says SPARSE of {}",
                        e.kind_name, e.sectors, header.capacity
                    ),
                ))
            }
            more => {
                return Err(bad(
                    path,
                    format!("monolithicSparse descriptor lists {} extents", more.len()),
                ))
            }
        }
        let gd_bytes = usize::try_from(geo.gd_entries * 4).unwrap_or(0);
        let read_dir = |sector: u64, what: &str| -> Result<Vec<u32>> {
            let mut raw = vec![0u8; gd_bytes];
            read_zero_fill(&file, &mut raw, sector * SECTOR).ctx(&format!("read {what} of"), path)?;
            let dir: Vec<u32> = raw.chunks_exact(4).map(|c| u32_at(c, 0)).collect();
            for (i, &s) in dir.iter().enumerate() {
                let end = u64::from(s) * SECTOR + geo.gt_bytes;
                if s != 0 && end > file_len {
                    return Err(bad(
                        path,
                        format!("{what} entry {i} points at sector {s}, past the end of the {file_len}-byte file"),
                    ));
                }
            }
            Ok(dir)
        };
        let gd = read_dir(header.gd_offset, "grain directory")?;
        let rgd = if header.flags & FLAG_REDUNDANT_GD != 0 && header.rgd_offset != 0 {
            Some(read_dir(header.rgd_offset, "redundant grain directory")?)
        } else {
            None
        };
        let next_free = file_len.div_ceil(geo.grain_bytes).max(1) * geo.grain_bytes;
        let next_free = next_free.max(header.overhead * SECTOR);
        Ok(Self {
            meta: Meta {
                path: path.to_path_buf(),
                file,
                writable,
                header,
                geo,
                gd,
                rgd,
            },
            state: Mutex::new(State {
                next_free,
                ..State::default()
            }),
        })
    }

    /// The header as read.
    pub fn header(&self) -> &SparseHeader {
        &self.meta.header
    }
}

impl ReplicaImage for SparseImage {
    fn size(&self) -> u64 {
        self.meta.header.capacity * SECTOR
    }

    fn format(&self) -> ReplicaFormat {
        ReplicaFormat::VmdkSparse
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let m = &self.meta;
        check_range(&m.path, self.size(), offset, buf.len() as u64)?;
        for (g, inside, n, at) in m.pieces(offset, buf.len() as u64) {
            let e = m.entry(&mut lock(&self.state), g)?;
            let piece = &mut buf[us(at)..us(at + n)];
            if m.holds_data(e) {
                read_zero_fill(&m.file, piece, u64::from(e) * SECTOR + inside)
                    .ctx(&format!("read grain {g} of"), &m.path)?;
            } else {
                piece.fill(0);
            }
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let size = self.size();
        let Self { meta: m, state } = self;
        if !m.writable {
            return Err(read_only(&m.path));
        }
        check_range(&m.path, size, offset, data.len() as u64)?;
        let st = state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        let gb = m.geo.grain_bytes;
        let mut scratch = Vec::new();
        for (g, inside, n, at) in m.pieces(offset, data.len() as u64) {
            let piece = &data[us(at)..us(at + n)];
            let e = m.entry(st, g)?;
            st.data_dirty = true;
            if m.holds_data(e) {
                m.file
                    .write_all_at(piece, u64::from(e) * SECTOR + inside)
                    .ctx(&format!("write grain {g} of"), &m.path)?;
                continue;
            }
            let sector = u32::try_from(st.next_free / SECTOR).map_err(|_| {
                Error::new(
                    ErrorKind::OutOfBounds,
                    format!("{}: sparse extent is full (2 TiB of grains)", m.path.display()),
                )
            })?;
            let whole: &[u8] = if n == gb {
                piece
            } else {
                scratch.clear();
                scratch.resize(usize::try_from(gb).unwrap_or(0), 0);
                scratch[us(inside)..us(inside + n)].copy_from_slice(piece);
                &scratch
            };
            m.file
                .write_all_at(whole, st.next_free)
                .ctx(&format!("write new grain {g} to"), &m.path)?;
            st.next_free += gb;
            // Only in memory until flush, after the grain is durable.
            m.set_entry(st, g, sector);
        }
        Ok(())
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        let Self { meta: m, state } = self;
        if !m.writable {
            return Err(read_only(&m.path));
        }
        check_range(&m.path, size, offset, len)?;
        let st = state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (g, inside, n, _) in m.pieces(offset, len) {
            let e = m.entry(st, g)?;
            if m.holds_data(e) {
                st.data_dirty = true;
                fileops::discard_zeroing(&m.file, BackingKind::File, u64::from(e) * SECTOR + inside, n)
                    .ctx(&format!("zero grain {g} of"), &m.path)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let Self { meta: m, state } = self;
        if !m.writable {
            return Ok(());
        }
        let st = state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !st.data_dirty && st.dirty.is_empty() {
            return Ok(());
        }
        let sync = |m: &Meta| fileops::fdatasync(&m.file).ctx("fdatasync", &m.path);
        // 1. The grains, before any table entry that names them.
        sync(m)?;
        let dirty: Vec<usize> = std::mem::take(&mut st.dirty).into_iter().collect();
        // 2. Tables that do not exist yet (a directory entry of 0, only in
        //    images written by others): written and synced before the
        //    directory entries that name them.
        let new: Vec<usize> = dirty.iter().copied().filter(|&t| m.gd[t] == 0).collect();
        if !new.is_empty() {
            for &t in &new {
                let bytes = m.table_bytes(&st.gts[&t]);
                let s = alloc_table(&m.path, m.geo.gt_bytes, st)?;
                m.file
                    .write_all_at(&bytes, u64::from(s) * SECTOR)
                    .ctx("write grain table to", &m.path)?;
                m.gd[t] = s;
                if m.rgd.is_some() {
                    let r = alloc_table(&m.path, m.geo.gt_bytes, st)?;
                    m.file
                        .write_all_at(&bytes, u64::from(r) * SECTOR)
                        .ctx("write grain table to", &m.path)?;
                    if let Some(rgd) = m.rgd.as_mut() {
                        rgd[t] = r;
                    }
                }
            }
            st.next_free = st.next_free.div_ceil(m.geo.grain_bytes) * m.geo.grain_bytes;
            sync(m)?;
            for &t in &new {
                let at = m.header.gd_offset * SECTOR + t as u64 * 4;
                m.file
                    .write_all_at(&m.gd[t].to_le_bytes(), at)
                    .ctx("write grain directory of", &m.path)?;
                if let Some(rgd) = &m.rgd {
                    let at = m.header.rgd_offset * SECTOR + t as u64 * 4;
                    m.file
                        .write_all_at(&rgd[t].to_le_bytes(), at)
                        .ctx("write grain directory of", &m.path)?;
                }
            }
        }
        // 3. Existing tables, both copies.
        for &t in dirty.iter().filter(|t| !new.contains(t)) {
            let bytes = m.table_bytes(&st.gts[&t]);
            m.file
                .write_all_at(&bytes, u64::from(m.gd[t]) * SECTOR)
                .ctx(&format!("write grain table {t} of"), &m.path)?;
            if let Some(r) = m.rgd.as_ref().map(|r| r[t]).filter(|&r| r != 0) {
                m.file
                    .write_all_at(&bytes, u64::from(r) * SECTOR)
                    .ctx(&format!("write redundant grain table {t} of"), &m.path)?;
            }
        }
        sync(m)?;
        st.data_dirty = false;
        Ok(())
    }

    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let m = &self.meta;
        let size = self.size();
        let offset = offset.min(size);
        let len = len.min(size - offset);
        let mut out = Vec::new();
        let mut st = lock(&self.state);
        for (g, _, n, at) in m.pieces(offset, len) {
            let e = m.entry(&mut st, g)?;
            push_extent(&mut out, offset + at, n, m.holds_data(e));
        }
        Ok(out)
    }
}

/// Allocate room for one grain table at the end of the file; returns its sector.
fn alloc_table(path: &Path, gt_bytes: u64, st: &mut State) -> Result<u32> {
    let s = u32::try_from(st.next_free / SECTOR).map_err(|_| {
        Error::new(
            ErrorKind::OutOfBounds,
            format!("{}: sparse extent is full (2 TiB)", path.display()),
        )
    })?;
    st.next_free += gt_bytes.div_ceil(SECTOR) * SECTOR;
    Ok(s)
}

/// Export through a sparse image written at a temporary name.
pub(crate) fn export(reader: &mut ExportReader<'_>, out: &Path) -> Result<()> {
    let name = file_name(out)?;
    let tmp = part_path(out)?;
    let cap = round_up_sector(reader.size)?;
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .ctx("create", &tmp)?;
        build(&f, &tmp, &name, cap)?;
    }
    let mut img = SparseImage::open(&tmp, true)?;
    let gb = usize::try_from(img.meta.geo.grain_bytes).unwrap_or(1 << 16);
    let mut buf = Vec::new();
    let mut since_flush = 0u64;
    while let Some(at) = reader.next_chunk(&mut buf)? {
        // Chunks are grain-aligned (1 MiB), so each piece is one grain.
        for (i, piece) in buf.chunks(gb).enumerate() {
            if !is_zero(piece) {
                img.write_at(piece, at + (i * gb) as u64)?;
                since_flush += piece.len() as u64;
            }
        }
        if since_flush >= EXPORT_FLUSH_EVERY {
            img.flush()?;
            since_flush = 0;
        }
    }
    img.flush()?;
    commit_part(&img.meta.file, &tmp, out)
}
