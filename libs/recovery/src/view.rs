//! Pinned, read-only views of a disk at a recovery point, and the record
//! of a failover.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;
use tidemark_catalog::{self as catalog, Point, UndoRow};
use tidemark_formats::replica::ReplicaImage;
use tidemark_formats::undo::{self, blocks_of, BLOCK, UNDO_DIR};

use crate::access::{access, points_direct, Access, Control};
use crate::at::{describe, select, AtSpec};
use crate::error::{Error, ErrorKind, Located, Result};

/// What keeps a view's data in place.
#[allow(clippy::large_enum_variant)]
enum Hold {
    /// The daemon pinned the point until this connection closes.
    Pinned(#[allow(dead_code)] Control),
    /// No daemon can start while this shared lock is held.
    Locked(#[allow(dead_code)] nix::fcntl::Flock<File>),
}

/// A pinned, read-only view of a disk at a recovery point; it never changes.
pub struct View {
    point: Point,
    disk_id: String,
    size: u64,
    undo_dir: PathBuf,
    replica: Box<dyn ReplicaImage>,
    conn: Mutex<Connection>,
    segments: Mutex<HashMap<u64, File>>,
    hold: Mutex<Hold>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("disk_id", &self.disk_id)
            .field("point", &self.point)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl View {
    /// Open (and pin) a view of `disk_id` at the point `at` names.
    pub fn open(data_dir: &Path, disk_id: &str, at: &AtSpec) -> Result<View> {
        Self::open_with(data_dir, disk_id, at, false)
    }

    /// Open a view for a failover: a running target first stops applying
    /// to the disk (so `latest` is its final state), and starts again if
    /// this view is closed before [`View::record_failover`].
    pub fn open_for_failover(data_dir: &Path, disk_id: &str, at: &AtSpec) -> Result<View> {
        Self::open_with(data_dir, disk_id, at, true)
    }

    fn open_with(data_dir: &Path, disk_id: &str, at: &AtSpec, stop: bool) -> Result<View> {
        let (point, hold) = match access(data_dir)? {
            Access::Direct(lock) => {
                let pts = points_direct(data_dir, disk_id)?;
                let p = select(&pts, at)
                    .cloned()
                    .ok_or_else(|| Error::new(ErrorKind::NotFound, describe(at)).disk(disk_id))?;
                (p, Hold::Locked(lock))
            }
            Access::Daemon(mut c) => {
                let v = c.call(
                    serde_json::json!({"op": "pin", "disk": disk_id, "at": at, "stop": stop}),
                    Duration::from_secs(90),
                )?;
                let p: Point = serde_json::from_value(v["point"].clone())
                    .map_err(|e| Error::with_source(ErrorKind::Malformed, "point in the target's reply", e))?;
                (p, Hold::Pinned(c))
            }
        };
        let disk_dir = tidemark_catalog::layout::disk_dir(data_dir, disk_id);
        let replica = tidemark_formats::replica::open_read_only(&disk_dir)
            .map_err(|e| Error::from(e).op("open the replica").disk(disk_id))?;
        let conn = catalog::open_read_only(data_dir)?;
        Ok(View {
            size: replica.size(),
            point,
            disk_id: disk_id.to_string(),
            undo_dir: disk_dir.join(UNDO_DIR),
            replica,
            conn: Mutex::new(conn),
            segments: Mutex::new(HashMap::new()),
            hold: Mutex::new(hold),
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Record the failover of this view's disk at its point to `output`:
    /// the target stops applying to the disk for good.
    pub fn record_failover(&self, output: &Path) -> Result<()> {
        let out = output.display().to_string();
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *hold {
            Hold::Locked(_) => {
                let mut c = catalog::Catalog::open(&self.data_dir)?;
                c.record_failover(&self.disk_id, &self.point, &out)?;
            }
            Hold::Pinned(c) => {
                c.call(
                    serde_json::json!({"op": "failover", "disk": self.disk_id, "point": self.point, "output": out}),
                    Duration::from_secs(90),
                )?;
            }
        }
        Ok(())
    }

    /// The point this view shows.
    pub fn point(&self) -> &Point {
        &self.point
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} is beyond the {}-byte disk", self.size),
            ));
        }
        Ok(())
    }

    /// For each block of `[b0, b1)`, the undo entry with the lowest capture
    /// seq above the point, if any.
    fn lookup(&self, b0: u64, b1: u64) -> io::Result<Vec<Option<UndoRow>>> {
        let rows = {
            let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            catalog::undo_lookup(&conn, &self.disk_id, self.point.seq, b0, b1).map_err(io_err)?
        };
        let n = usize::try_from(b1 - b0).map_err(io_err)?;
        let mut out: Vec<Option<UndoRow>> = vec![None; n];
        for r in rows {
            let (s, e) = (r.start_block.max(b0), r.end_block.min(b1));
            for b in s..e {
                let slot = &mut out[usize::try_from(b - b0).map_err(io_err)?];
                if slot.is_none() {
                    *slot = Some(r);
                }
            }
        }
        Ok(out)
    }

    fn undo_block(&self, r: &UndoRow, block: u64, out: &mut [u8]) -> io::Result<()> {
        if r.zero {
            out.fill(0);
            return Ok(());
        }
        let path = self.undo_dir.join(undo::segment_name(r.segment));
        let mut segs = self.segments.lock().unwrap_or_else(|e| e.into_inner());
        let f = match segs.entry(r.segment) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(
                File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?,
            ),
        };
        undo::read_block(f, &path, r.seg_offset, block, out).map_err(io_err)
    }

    /// Fill `buf` with the disk's bytes at `offset`, as they were at the point.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (b0, b1) = blocks_of(offset, len);
        // Check the index, read the replica where it has nothing, check
        // again: an entry that appeared meanwhile was marked before the
        // replica bytes it protects were written, so it wins.
        let first = self.lookup(b0, b1)?;
        let mut run: Option<u64> = None;
        let read_run = |s: u64, e: u64, buf: &mut [u8]| -> io::Result<()> {
            let (lo, hi) = ((s * BLOCK).max(offset), (e * BLOCK).min(offset + len));
            let a = usize::try_from(lo - offset).map_err(io_err)?;
            let z = usize::try_from(hi - offset).map_err(io_err)?;
            self.replica.read_at(&mut buf[a..z], lo).map_err(io_err)
        };
        for (i, slot) in first.iter().enumerate() {
            let b = b0 + i as u64;
            match (slot, run) {
                (None, None) => run = Some(b),
                (Some(_), Some(s)) => {
                    read_run(s, b, buf)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            read_run(s, b1, buf)?;
        }
        let second = self.lookup(b0, b1)?;
        let mut block = vec![0u8; undo::BLOCK_BYTES];
        for (i, slot) in second.iter().enumerate() {
            let Some(r) = slot else { continue };
            let b = b0 + i as u64;
            self.undo_block(r, b, &mut block)?;
            let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(offset + len));
            let src = &block
                [usize::try_from(lo - b * BLOCK).map_err(io_err)?..usize::try_from(hi - b * BLOCK).map_err(io_err)?];
            buf[usize::try_from(lo - offset).map_err(io_err)?..usize::try_from(hi - offset).map_err(io_err)?]
                .copy_from_slice(src);
        }
        Ok(())
    }

    /// Extents `(offset, len, data?)` covering `[offset, offset+len)`;
    /// `data == false` means the extent reads zeros at the point.
    pub fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        let base = self.replica.allocated(offset, len).map_err(io_err)?;
        let (b0, b1) = blocks_of(offset, len);
        let undo = self.lookup(b0, b1)?;
        if undo.iter().all(Option::is_none) {
            return Ok(base);
        }
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (i, slot) in undo.iter().enumerate() {
            let b = b0 + i as u64;
            let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(offset + len));
            let data = match slot {
                Some(r) => !r.zero,
                None => base.iter().any(|&(o, l, d)| d && o < hi && o + l > lo),
            };
            match out.last_mut() {
                Some(last) if last.2 == data && last.0 + last.1 == lo => last.1 += hi - lo,
                _ => out.push((lo, hi - lo, data)),
            }
        }
        Ok(out)
    }
}
