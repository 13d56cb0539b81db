//! The journal writer: opens (and repairs) a journal directory, appends
//! records in seq order, rotates and recycles segments, and hands out what a
//! FLUSH must fdatasync.
//!
//! The writer is not internally locked: the agent serialises appends (seq
//! order is the order of `append` calls), and runs the fdatasyncs of
//! [`SyncTargets`] outside its lock so appends go on meanwhile.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tidemark_util::{crashsafe, fileops, now_ns};
use tidemark_wire::record::{RecordHeader, RecordKind, HEADER_LEN};

use super::segment::{scan, SegmentHeader, SEGMENT_HEADER_LEN};
use super::{list, segment_path, spare_path};
use crate::error::{Error, ErrorKind, IoContext, Result};

/// Where and how big the journal is.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The journal directory (created if missing).
    pub dir: PathBuf,
    /// The disk this journal belongs to; every segment carries it.
    pub disk_uuid: [u8; 16],
    /// Preallocated size of each segment file.
    pub segment_size: u64,
    /// Most bytes of unconsumed records kept; past it `append` fails with
    /// [`ErrorKind::Full`] and the agent switches to bitmap mode.
    pub cap_bytes: u64,
}

/// What [`Journal::open`] found.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    /// Live segments after opening.
    pub segments: usize,
    /// Oldest seq still held.
    pub first_seq: u64,
    /// The seq the next append gets.
    pub next_seq: u64,
    /// Highest seq the next hop acknowledged.
    pub consumed_seq: u64,
    /// Records found (and verified) in live segments.
    pub records: u64,
    /// A torn tail that was cut off, described.
    pub torn_tail: Option<String>,
    /// Leftovers of an interrupted rotation that were removed.
    pub removed: Vec<String>,
}

/// Files a FLUSH must fdatasync (and a directory to fsync) so that every
/// record appended before [`Journal::sync_targets`] was called is durable.
#[derive(Debug, Default)]
pub struct SyncTargets {
    files: Vec<Arc<File>>,
    dir: Option<PathBuf>,
}

impl SyncTargets {
    /// Do the fdatasyncs. On error, give the targets back with
    /// [`Journal::requeue`] so a later FLUSH retries them.
    pub fn run(&self) -> std::io::Result<()> {
        for f in &self.files {
            fileops::fdatasync(f)?;
        }
        if let Some(d) = &self.dir {
            crashsafe::fsync_dir(d)?;
        }
        Ok(())
    }

    /// Whether there is nothing to sync.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none()
    }
}

#[derive(Debug)]
struct LiveSegment {
    index: u64,
    first_seq: u64,
    path: PathBuf,
    /// Bytes used (header + records); for the current segment, the append position.
    used: u64,
}

/// An open journal, ready to append.
#[derive(Debug)]
pub struct Journal {
    cfg: JournalConfig,
    segs: VecDeque<LiveSegment>,
    cur: Arc<File>,
    next_seq: u64,
    consumed_seq: u64,
    live_bytes: u64,
    spares: Vec<PathBuf>,
    unsynced: Vec<Arc<File>>,
    cur_dirty: bool,
    dir_dirty: bool,
}

const CONSUMED_FILE: &str = "consumed";

fn read_consumed(dir: &Path) -> Result<u64> {
    let p = dir.join(CONSUMED_FILE);
    let s = match fs::read_to_string(&p) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("read", &p, e)),
    };
    let parts: Vec<&str> = s.split_whitespace().collect();
    match parts.as_slice() {
        ["TMJCONSUMED", "1", seq, crc] => {
            let body = format!("TMJCONSUMED 1 {seq}");
            let ok = u32::from_str_radix(crc, 16).ok() == Some(crc32c::crc32c(body.as_bytes()));
            match seq.parse::<u64>() {
                Ok(v) if ok => Ok(v),
                _ => Err(Error::corrupt(&p, "consumed marker checksum or number invalid")),
            }
        }
        _ => Err(Error::corrupt(&p, "not a consumed marker")),
    }
}

fn write_consumed(dir: &Path, seq: u64) -> Result<()> {
    let body = format!("TMJCONSUMED 1 {seq}");
    let line = format!("{body} {:08x}\n", crc32c::crc32c(body.as_bytes()));
    let p = dir.join(CONSUMED_FILE);
    crashsafe::write_atomic(&p, line.as_bytes()).ctx("write", &p)
}

/// `pwritev` until everything is written.
fn write_all_vectored_at(f: &File, bufs: &[&[u8]], mut pos: u64) -> std::io::Result<()> {
    let mut idx = 0;
    let mut skip = 0usize;
    while idx < bufs.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&bufs[idx][skip..]))
            .chain(bufs[idx + 1..].iter().map(|b| IoSlice::new(b)))
            .collect();
        let off = i64::try_from(pos).map_err(|_| std::io::Error::from_raw_os_error(27))?;
        let mut n = match nix::sys::uio::pwritev(f.as_fd(), &slices, off) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ))
            }
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        pos += n as u64;
        while idx < bufs.len() && n >= bufs[idx].len() - skip {
            n -= bufs[idx].len() - skip;
            idx += 1;
            skip = 0;
        }
        skip += n;
    }
    Ok(())
}

impl Journal {
    /// Open the journal in `cfg.dir`, creating it if needed. Verifies every
    /// record, checks seq continuity across segments, cuts off (and reports)
    /// a torn tail, and removes leftovers of an interrupted rotation.
    pub fn open(cfg: JournalConfig) -> Result<(Self, OpenReport)> {
        let dir = cfg.dir.clone();
        if !dir.exists() {
            fs::create_dir_all(&dir).ctx("create journal directory", &dir)?;
            if let Some(parent) = dir.parent() {
                crashsafe::fsync_dir(parent).ctx("sync parent of", &dir)?;
            }
        }
        let mut report = OpenReport {
            consumed_seq: read_consumed(&dir)?,
            ..Default::default()
        };
        let spares: Vec<PathBuf> = list(&dir, "spare-")
            .ctx("list", &dir)?
            .into_iter()
            .map(|x| x.1)
            .collect();
        let mut found = list(&dir, "seg-").ctx("list", &dir)?;

        // A last segment whose header never made it to disk is a rotation
        // that was interrupted before any record went into it.
        if let Some((_, p)) = found.last() {
            let f = File::open(p).ctx("open", p)?;
            if SegmentHeader::read(&f, p).is_err() && found.len() > 1 {
                report.removed.push(format!("{} (incomplete rotation)", p.display()));
                crashsafe::remove_durable(p).ctx("remove", p)?;
                found.pop();
            }
        }

        let mut segs = VecDeque::new();
        let mut next_seq: Option<u64> = None;
        let mut cur: Option<(Arc<File>, u64)> = None;
        let mut live_bytes = 0;
        let n = found.len();
        for (i, (index, path)) in found.into_iter().enumerate() {
            let last = i + 1 == n;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .ctx("open", &path)?;
            let h = SegmentHeader::read(&file, &path)?;
            if h.index != index {
                return Err(Error::corrupt(
                    &path,
                    format!("header says segment {}, file name says {index}", h.index),
                ));
            }
            if h.disk_uuid != cfg.disk_uuid {
                return Err(Error::new(
                    ErrorKind::Mismatch,
                    format!("{}: segment belongs to another disk", path.display()),
                ));
            }
            if let Some(expect) = next_seq {
                if h.first_seq != expect {
                    return Err(Error::corrupt(
                        &path,
                        format!(
                            "sequence gap: segment starts at seq {}, previous ended before {expect}",
                            h.first_seq
                        ),
                    ));
                }
            }
            let mut records = 0u64;
            let end = scan(&file, &path, &h, |_, _| {
                records += 1;
                Ok(())
            })?;
            report.records += records;
            if report.first_seq == 0 {
                report.first_seq = h.first_seq;
            }
            if last {
                // Whatever lies past the end may include records that reached
                // the disk while an earlier one did not (write-back order is
                // arbitrary after a power loss). A later append of the same
                // length would make such a stale record look like the next
                // one, so clear everything from the end to the end of file.
                let len = file.metadata().ctx("stat", &path)?.len();
                if len > end.pos {
                    fileops::zero_range(&file, end.pos, len - end.pos).ctx("clear the tail of", &path)?;
                    fileops::fdatasync(&file).ctx("sync", &path)?;
                }
                if let Some((why, _)) = &end.torn {
                    report.torn_tail = Some(format!("{}: {why}; cut off", path.display()));
                }
                cur = Some((Arc::new(file), end.pos));
            }
            live_bytes += end.pos;
            next_seq = Some(end.next_seq);
            segs.push_back(LiveSegment {
                index,
                first_seq: h.first_seq,
                path,
                used: end.pos,
            });
        }

        let mut j = Self {
            cur: Arc::new(File::open("/dev/null").ctx("open", Path::new("/dev/null"))?),
            cfg,
            segs,
            next_seq: next_seq.unwrap_or(report.consumed_seq + 1).max(1),
            consumed_seq: report.consumed_seq,
            live_bytes,
            spares,
            unsynced: Vec::new(),
            cur_dirty: false,
            dir_dirty: false,
        };
        match cur {
            Some((f, _)) => j.cur = f,
            None => {
                j.start_segment(0)?;
                report.first_seq = j.next_seq;
            }
        }
        report.segments = j.segs.len();
        report.next_seq = j.next_seq;
        Ok((j, report))
    }

    /// Begin a new current segment with `index` whose first record will be
    /// `next_seq`, reusing a spare file when one exists.
    fn start_segment(&mut self, index: u64) -> Result<()> {
        let path = segment_path(&self.cfg.dir, index);
        let header = SegmentHeader {
            index,
            first_seq: self.next_seq,
            disk_uuid: self.cfg.disk_uuid,
            created_ns: now_ns(),
        };
        let file = if let Some(spare) = self.spares.pop() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&spare)
                .ctx("open spare", &spare)?;
            f.write_all_at(&header.encode(), 0)
                .ctx("write segment header", &spare)?;
            // The first record slot must not hold a stale record with the
            // expected seq; stale seqs are all lower, but clear the slot so a
            // reader never even has to reason about it.
            f.write_all_at(&[0u8; HEADER_LEN], SEGMENT_HEADER_LEN)
                .ctx("clear first slot of", &spare)?;
            fs::rename(&spare, &path).ctx("rename spare to", &path)?;
            f
        } else {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .ctx("create", &path)?;
            let init = fileops::preallocate(&f, self.cfg.segment_size)
                .ctx("preallocate", &path)
                .and_then(|()| f.write_all_at(&header.encode(), 0).ctx("write segment header", &path));
            if let Err(e) = init {
                // Leave no half-made segment behind, so a later rotation
                // (once there is room again) can create it afresh.
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            f
        };
        if self.cur_dirty {
            self.unsynced.push(self.cur.clone());
        }
        self.cur = Arc::new(file);
        self.cur_dirty = true;
        self.dir_dirty = true;
        self.live_bytes += SEGMENT_HEADER_LEN;
        self.segs.push_back(LiveSegment {
            index,
            first_seq: self.next_seq,
            path,
            used: SEGMENT_HEADER_LEN,
        });
        Ok(())
    }

    /// Whether a record with `payload_len` bytes would fit under the cap.
    pub fn has_room(&self, payload_len: usize) -> bool {
        self.live_bytes + HEADER_LEN as u64 + payload_len as u64 <= self.cfg.cap_bytes
    }

    /// Append one record and return its seq. `hash` is the blake3 of
    /// `payload`, computed by the caller outside its lock. The record is in
    /// the page cache when this returns (a process crash keeps it); it is
    /// durable once a later [`SyncTargets::run`] completes.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        kind: RecordKind,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
        hash: [u8; 32],
        time_ns: u64,
    ) -> Result<u64> {
        let need = HEADER_LEN as u64 + payload.len() as u64;
        if !self.has_room(payload.len()) {
            return Err(Error::new(
                ErrorKind::Full,
                format!(
                    "journal cap of {} bytes reached ({} held)",
                    self.cfg.cap_bytes, self.live_bytes
                ),
            ));
        }
        let cur_used = self.segs.back().map_or(0, |s| s.used);
        if cur_used > SEGMENT_HEADER_LEN && cur_used + need > self.cfg.segment_size {
            let index = self.segs.back().map_or(0, |s| s.index + 1);
            self.start_segment(index)?;
        }
        let seq = self.next_seq;
        let mut h = RecordHeader::with_hash(kind, seq, time_ns, offset, length, payload.len(), hash);
        h.flags = flags;
        let hb = h.encode();
        let seg = self
            .segs
            .back_mut()
            .ok_or_else(|| Error::new(ErrorKind::Corrupt, "journal has no current segment"))?;
        write_all_vectored_at(&self.cur, &[&hb, payload], seg.used).ctx("append to", &seg.path)?;
        seg.used += need;
        self.live_bytes += need;
        self.next_seq = seq
            .checked_add(1)
            .ok_or_else(|| Error::new(ErrorKind::OutOfBounds, "journal sequence numbers exhausted"))?;
        self.cur_dirty = true;
        Ok(seq)
    }

    /// What a FLUSH must sync now; run it outside the caller's lock.
    pub fn sync_targets(&mut self) -> SyncTargets {
        let mut files = std::mem::take(&mut self.unsynced);
        if self.cur_dirty {
            files.push(self.cur.clone());
            self.cur_dirty = false;
        }
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.cfg.dir.clone());
        SyncTargets { files, dir }
    }

    /// Give back targets whose sync failed, so the next FLUSH retries them.
    pub fn requeue(&mut self, t: SyncTargets) {
        self.unsynced.extend(t.files);
        self.dir_dirty |= t.dir.is_some();
    }

    /// Record that the next hop holds every record up to `seq` durably, and
    /// recycle segments that hold nothing newer. Never recycles the current
    /// segment. (This fsyncs the marker; callers holding a lock around the
    /// journal use [`Journal::persist_consumed`] outside it, then
    /// [`Journal::recycle`] inside.)
    pub fn consume(&mut self, seq: u64) -> Result<()> {
        let seq = seq.min(self.next_seq.saturating_sub(1));
        if seq <= self.consumed_seq {
            return Ok(());
        }
        Self::persist_consumed(&self.cfg.dir, seq)?;
        self.recycle(seq)
    }

    /// Durably record the consumed seq of the journal in `dir`.
    pub fn persist_consumed(dir: &Path, seq: u64) -> Result<()> {
        write_consumed(dir, seq)
    }

    /// Whether consuming up to `seq` would free at least one segment.
    pub fn recyclable(&self, seq: u64) -> bool {
        self.segs.len() > 1 && self.segs[1].first_seq.saturating_sub(1) <= seq
    }

    /// Recycle segments whose records are all ≤ `seq`; the consumed marker
    /// for `seq` must already be durable ([`Journal::persist_consumed`]).
    pub fn recycle(&mut self, seq: u64) -> Result<()> {
        let seq = seq.min(self.next_seq.saturating_sub(1));
        if seq <= self.consumed_seq {
            return Ok(());
        }
        self.consumed_seq = seq;
        let max_spares = usize::try_from(self.cfg.cap_bytes / self.cfg.segment_size.max(1))
            .unwrap_or(usize::MAX)
            .clamp(1, 64);
        let mut changed = false;
        while self.recyclable(seq) {
            let Some(s) = self.segs.pop_front() else {
                break;
            };
            self.live_bytes -= s.used;
            if self.spares.len() < max_spares {
                let sp = spare_path(&self.cfg.dir, s.index);
                fs::rename(&s.path, &sp).ctx("recycle", &s.path)?;
                self.spares.push(sp);
            } else {
                fs::remove_file(&s.path).ctx("remove", &s.path)?;
            }
            changed = true;
        }
        // The renames become durable with the next sync round, not under
        // the caller's lock: if they are lost in a crash, the segments come
        // back as live ones whose records are all consumed, which is harmless.
        self.dir_dirty |= changed;
        Ok(())
    }

    /// Make `seq` the next seq to be appended, skipping every seq in
    /// between (a seq is never reused): the next hop already holds seqs up
    /// to `seq - 1`, from a previous life of this journal (a state
    /// directory restored from a backup or a VM snapshot). Every live
    /// record counts as consumed; all segments, the current one too, are
    /// retired and a new current segment starting at `seq` is made durable.
    ///
    /// Crash-safe: the consumed marker is written first, then segments are
    /// retired oldest first (the live ones stay consecutive), then the new
    /// segment is created; an open at any point finds a consistent journal
    /// whose next seq is `seq`.
    pub fn advance_to(&mut self, seq: u64) -> Result<()> {
        if seq <= self.next_seq {
            return Ok(());
        }
        if seq > 1 << 62 {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!("cannot advance the journal to seq {seq} (beyond 2^62)"),
            ));
        }
        write_consumed(&self.cfg.dir, seq - 1)?;
        let next_index = self.segs.back().map_or(0, |s| s.index + 1);
        while let Some(s) = self.segs.pop_front() {
            self.live_bytes -= s.used;
            let sp = spare_path(&self.cfg.dir, s.index);
            fs::rename(&s.path, &sp).ctx("retire", &s.path)?;
            self.spares.push(sp);
        }
        crashsafe::fsync_dir(&self.cfg.dir).ctx("sync", &self.cfg.dir)?;
        self.consumed_seq = seq - 1;
        self.next_seq = seq;
        self.cur_dirty = false;
        self.start_segment(next_index)?;
        let t = self.sync_targets();
        if let Err(e) = t.run() {
            self.requeue(t);
            return Err(Error::io("sync new segment in", &self.cfg.dir, e));
        }
        Ok(())
    }

    /// The oldest seq the journal still holds (consumed or not); equal to
    /// [`Journal::next_seq`] when it holds no record.
    pub fn first_seq(&self) -> u64 {
        self.segs.front().map_or(self.next_seq, |s| s.first_seq)
    }

    /// Bytes of the records after `seq` (what the next hop still lacks when
    /// it holds everything up to `seq`). Exact at segment boundaries;
    /// inside the segment holding `seq + 1` it is interpolated by record
    /// count, since the journal keeps no per-record index.
    pub fn bytes_after(&self, seq: u64) -> u64 {
        let mut total = 0u64;
        for (i, s) in self.segs.iter().enumerate() {
            let end_seq = self.segs.get(i + 1).map_or(self.next_seq, |n| n.first_seq);
            if end_seq <= seq.saturating_add(1) {
                continue;
            }
            let data = s.used.saturating_sub(SEGMENT_HEADER_LEN);
            if s.first_seq > seq {
                total += data;
            } else {
                let recs = u128::from(end_seq - s.first_seq);
                let after = u128::from(end_seq - (seq + 1));
                total += u64::try_from(u128::from(data) * after / recs.max(1)).unwrap_or(u64::MAX);
            }
        }
        total
    }

    /// Whether `records` records carrying `payload_bytes` bytes in all
    /// would fit under the cap.
    pub fn has_room_for(&self, records: u64, payload_bytes: u64) -> bool {
        self.live_bytes + records * HEADER_LEN as u64 + payload_bytes <= self.cfg.cap_bytes
    }

    /// The seq the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest seq consumed by the next hop.
    pub fn consumed_seq(&self) -> u64 {
        self.consumed_seq
    }

    /// Bytes held by live segments (what counts against the cap).
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Number of live segments.
    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    /// The configuration this journal was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.cfg
    }
}
