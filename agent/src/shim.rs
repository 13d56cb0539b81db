//! The journaling core, independent of how blocks arrive.
//!
//! Write path, in this order: hash the payload (outside any lock), append
//! the record to the journal and take a range ticket (under the journal
//! lock, so ticket order is seq order), wait for older overlapping writes,
//! write the backing disk, release the ticket, acknowledge. FLUSH and FUA
//! fdatasync the journal segments, the backing disk and the bitmap in one
//! shared round ([`crate::syncer`]).
//!
//! Past the journal cap the shim is in bitmap mode: the region goes into the
//! persistent dirty bitmap instead of the journal, before the disk write. A
//! journal or bitmap I/O error fails the request: a write is never
//! acknowledged untracked.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;
use tidemark_formats::bitmap::{DirtyBitmap, DEFAULT_GRANULARITY};
use tidemark_formats::journal::Journal;
use tidemark_formats::ErrorKind;
use tidemark_nbd::{Backend, ExportInfo, Extent, ZeroFlags};
use tidemark_util::fileops::{self, BackingKind};
use tidemark_wire::record::RecordKind;
use tracing::{error, warn};

use crate::ranges::{RangeLocks, Ticket};
use crate::syncer::Syncer;

/// How writes are tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every write is a journal record.
    Journal,
    /// The journal is full: written regions go into the dirty bitmap.
    Bitmap,
}

/// Counters exported by status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub journal_records: AtomicU64,
    pub bitmap_writes: AtomicU64,
    pub io_errors: AtomicU64,
    pub tracking_errors: AtomicU64,
    pub mode_changes: AtomicU64,
}

/// What the journal lock protects.
#[derive(Debug)]
pub struct Core {
    pub journal: Journal,
    pub bitmap: Option<DirtyBitmap>,
    pub mode: Mode,
}

/// Shared state of one protected disk.
#[derive(Debug)]
pub struct Inner {
    pub disk_id: String,
    pub disk_uuid: String,
    pub disk_path: PathBuf,
    pub disk: Arc<File>,
    pub kind: BackingKind,
    pub size: u64,
    pub bitmap_path: PathBuf,
    resync_required: bool,
    core: Mutex<Core>,
    ranges: Arc<RangeLocks>,
    syncer: Syncer,
    pub stats: Stats,
    started: Instant,
    /// Rate limit for per-I/O error logs.
    last_err_log: Mutex<Option<Instant>>,
}

/// The protected disk as an NBD backend (cheap to clone).
#[derive(Clone, Debug)]
pub struct Shim {
    inner: Arc<Inner>,
}

/// Everything needed to build a [`Shim`].
pub struct ShimParts {
    pub disk_id: String,
    pub disk_uuid: String,
    pub disk_path: PathBuf,
    pub disk: File,
    pub kind: BackingKind,
    pub size: u64,
    pub journal: Journal,
    pub bitmap: Option<DirtyBitmap>,
    pub bitmap_path: PathBuf,
    /// A full resync is owed (machine crash).
    pub resync_required: bool,
}

/// A snapshot of the agent's state, for the control socket.
#[derive(Debug, Serialize)]
pub struct Status {
    pub disk_id: String,
    pub disk_uuid: String,
    pub disk_path: String,
    pub disk_size: u64,
    pub mode: Mode,
    /// A machine crash left writes that may be missing from the journal:
    /// the whole disk must be resynced.
    pub resync_required: bool,
    pub next_seq: u64,
    pub last_seq: u64,
    pub consumed_seq: u64,
    pub journal_bytes: u64,
    pub journal_cap: u64,
    pub journal_segments: usize,
    pub bitmap_dirty_regions: u64,
    pub bitmap_dirty_bytes: u64,
    pub bitmap_granularity: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub bitmap_writes: u64,
    pub io_errors: u64,
    pub tracking_errors: u64,
    pub uptime_secs: u64,
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl Shim {
    /// Assemble a shim from an opened journal, bitmap and backing disk.
    pub fn new(p: ShimParts) -> Self {
        let mode = if p.bitmap.as_ref().is_some_and(|b| b.count() > 0) {
            Mode::Bitmap
        } else {
            Mode::Journal
        };
        Self {
            inner: Arc::new(Inner {
                disk_id: p.disk_id,
                disk_uuid: p.disk_uuid,
                disk_path: p.disk_path,
                disk: Arc::new(p.disk),
                kind: p.kind,
                size: p.size,
                bitmap_path: p.bitmap_path,
                resync_required: p.resync_required,
                core: Mutex::new(Core {
                    journal: p.journal,
                    bitmap: p.bitmap,
                    mode,
                }),
                ranges: Arc::new(RangeLocks::default()),
                syncer: Syncer::default(),
                stats: Stats::default(),
                started: Instant::now(),
                last_err_log: Mutex::new(None),
            }),
        }
    }

    /// The shared state.
    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Lock the journal, bitmap and mode.
    pub fn core(&self) -> MutexGuard<'_, Core> {
        self.inner.core()
    }

    /// Highest seq whose backing write has completed along with every
    /// earlier one (what a consumer may let the journal recycle).
    pub fn applied_watermark(&self) -> u64 {
        let core = self.core();
        let next = core.journal.next_seq();
        self.inner
            .ranges
            .oldest_inflight_seq()
            .unwrap_or(next)
            .saturating_sub(1)
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.core().mode
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        let s = &self.inner.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let core = self.core();
        let (regions, bytes, gran) = core
            .bitmap
            .as_ref()
            .map_or((0, 0, u64::from(DEFAULT_GRANULARITY)), |b| {
                (b.count(), b.dirty_bytes(), b.granularity())
            });
        Status {
            disk_id: self.inner.disk_id.clone(),
            disk_uuid: self.inner.disk_uuid.clone(),
            disk_path: self.inner.disk_path.display().to_string(),
            disk_size: self.inner.size,
            mode: core.mode,
            resync_required: self.inner.resync_required,
            next_seq: core.journal.next_seq(),
            last_seq: core.journal.next_seq().saturating_sub(1),
            consumed_seq: core.journal.consumed_seq(),
            journal_bytes: core.journal.live_bytes(),
            journal_cap: core.journal.config().cap_bytes,
            journal_segments: core.journal.segments(),
            bitmap_dirty_regions: regions,
            bitmap_dirty_bytes: bytes,
            bitmap_granularity: gran,
            writes: l(&s.writes),
            write_bytes: l(&s.write_bytes),
            reads: l(&s.reads),
            read_bytes: l(&s.read_bytes),
            flushes: l(&s.flushes),
            trims: l(&s.trims),
            zeroes: l(&s.zeroes),
            bitmap_writes: l(&s.bitmap_writes),
            io_errors: l(&s.io_errors),
            tracking_errors: l(&s.tracking_errors),
            uptime_secs: self.inner.started.elapsed().as_secs(),
        }
    }

    /// Counters and gauges in Prometheus text format.
    pub fn metrics(&self) -> String {
        let st = self.status();
        let disk = &st.disk_id;
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP tidemark_agent_{name} {help}\n# TYPE tidemark_agent_{name} {kind}\ntidemark_agent_{name}{{disk=\"{disk}\"}} {v}\n"
            ));
        };
        put("writes_total", "counter", "Write requests completed.", st.writes);
        put(
            "written_bytes_total",
            "counter",
            "Bytes written by clients.",
            st.write_bytes,
        );
        put("reads_total", "counter", "Read requests completed.", st.reads);
        put("read_bytes_total", "counter", "Bytes read by clients.", st.read_bytes);
        put("flushes_total", "counter", "FLUSH requests.", st.flushes);
        put("trims_total", "counter", "TRIM requests completed.", st.trims);
        put("zeroes_total", "counter", "WRITE_ZEROES requests completed.", st.zeroes);
        put(
            "bitmap_writes_total",
            "counter",
            "Changes tracked in the dirty bitmap instead of the journal.",
            st.bitmap_writes,
        );
        put(
            "io_errors_total",
            "counter",
            "Backing disk or sync errors returned to clients.",
            st.io_errors,
        );
        put(
            "tracking_errors_total",
            "counter",
            "Journal or bitmap errors that failed a request.",
            st.tracking_errors,
        );
        put("last_seq", "gauge", "Highest journaled seq.", st.last_seq);
        put(
            "journal_bytes",
            "gauge",
            "Bytes of unconsumed journal.",
            st.journal_bytes,
        );
        put("journal_cap_bytes", "gauge", "Journal size cap.", st.journal_cap);
        put(
            "bitmap_dirty_bytes",
            "gauge",
            "Bytes in dirty bitmap regions.",
            st.bitmap_dirty_bytes,
        );
        put(
            "bitmap_mode",
            "gauge",
            "1 while in bitmap mode.",
            u64::from(st.mode == Mode::Bitmap),
        );
        out
    }

    /// Make everything completed so far durable (shared round).
    pub async fn sync_all(&self) -> io::Result<()> {
        let inner = self.inner.clone();
        self.inner
            .syncer
            .sync(|| {
                let inner = inner.clone();
                async move { inner.sync_round().await }
            })
            .await
    }

    /// Track a change (journal or bitmap), then apply it to the disk in
    /// range order. `data` is the payload for writes, empty otherwise.
    async fn change(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: Vec<u8>,
        keep_allocated: bool,
    ) -> io::Result<()> {
        let step = if data.len() >= OFFLOAD_MIN {
            // Hash, journal and write a large payload on a blocking-pool
            // thread, so the connection goes on reading the next request
            // meanwhile. Ordering is unaffected: the range ticket, taken
            // with the journal append, is what orders overlapping writes.
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || inner.track_and_apply(kind, offset, len, data, keep_allocated))
                .await
                .map_err(|e| eio(format!("write task failed: {e}")))??
        } else {
            self.inner.track_and_apply(kind, offset, len, data, keep_allocated)?
        };
        let result = match step {
            Step::Done(r) => r,
            Step::Wait(ticket, data) => {
                // Finish in a task of its own: once journaled, the disk write
                // must happen even if the client goes away meanwhile.
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    ticket.wait().await;
                    let r = inner.apply(kind, offset, len, &data, keep_allocated);
                    drop(ticket);
                    r
                })
                .await
                .map_err(|e| eio(format!("write task failed: {e}")))?
            }
        };
        if let Err(e) = &result {
            self.inner.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            self.inner.log_error(&format!(
                "{kind} at {offset}+{len} on {}: {e}",
                self.inner.disk_path.display()
            ));
        }
        result
    }
}

/// Payloads at least this large are handled off the connection's task.
const OFFLOAD_MIN: usize = 64 << 10;

/// Where a tracked change stands.
enum Step {
    /// Applied to the disk (or failed there).
    Done(io::Result<()>),
    /// Journaled; an older overlapping write must reach the disk first.
    Wait(Ticket, Vec<u8>),
}

impl Inner {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rate-limited ERROR log for per-I/O failures (at most one a second).
    fn log_error(&self, msg: &str) {
        let mut last = self.last_err_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed().as_secs() >= 1) {
            *last = Some(Instant::now());
            error!(disk = %self.disk_id, "{msg}");
        }
    }

    /// Track a change and, unless an older overlapping write is still in
    /// flight, apply it at once. A tracking failure is returned as `Err`
    /// (nothing was written); a disk failure as `Step::Done(Err)`.
    fn track_and_apply(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: Vec<u8>,
        keep_allocated: bool,
    ) -> io::Result<Step> {
        let hash = *blake3::hash(&data).as_bytes();
        let ticket = self.track(kind, offset, len, &data, hash)?;
        if ticket.must_wait() {
            return Ok(Step::Wait(ticket, data));
        }
        let r = self.apply(kind, offset, len, &data, keep_allocated);
        drop(ticket);
        Ok(Step::Done(r))
    }

    /// Journal the change (or mark it in the bitmap) and take its range ticket.
    fn track(&self, kind: RecordKind, offset: u64, len: u64, data: &[u8], hash: [u8; 32]) -> io::Result<Ticket> {
        let mut core = self.core();
        if core.mode == Mode::Journal {
            match core.journal.append(kind, 0, offset, len, data, hash, crate::now_ns()) {
                Ok(seq) => {
                    self.stats.journal_records.fetch_add(1, Ordering::Relaxed);
                    return Ok(self.ranges.register(offset, len, Some(seq)));
                }
                Err(e) if e.kind == ErrorKind::Full => self.enter_bitmap_mode(&mut core, &e.to_string())?,
                Err(e) => {
                    self.stats.tracking_errors.fetch_add(1, Ordering::Relaxed);
                    self.log_error(&format!("journal append failed, request refused: {e}"));
                    return Err(io::Error::from(e));
                }
            }
        }
        let bitmap = core
            .bitmap
            .as_mut()
            .ok_or_else(|| eio("bitmap mode without a bitmap".into()))?;
        if let Err(e) = bitmap.mark(offset, len) {
            self.stats.tracking_errors.fetch_add(1, Ordering::Relaxed);
            self.log_error(&format!("dirty bitmap update failed, request refused: {e}"));
            return Err(io::Error::from(e));
        }
        self.stats.bitmap_writes.fetch_add(1, Ordering::Relaxed);
        Ok(self.ranges.register(offset, len, None))
    }

    /// Journal a record without payload or range (Flush); in bitmap mode
    /// there is no stream to mark, so nothing is written.
    fn journal_marker(&self, kind: RecordKind) -> io::Result<()> {
        let mut core = self.core();
        if core.mode != Mode::Journal {
            return Ok(());
        }
        let hash = *blake3::hash(&[]).as_bytes();
        match core.journal.append(kind, 0, 0, 0, &[], hash, crate::now_ns()) {
            Ok(_) => {
                self.stats.journal_records.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::Full => self.enter_bitmap_mode(&mut core, &e.to_string()),
            Err(e) => {
                self.stats.tracking_errors.fetch_add(1, Ordering::Relaxed);
                self.log_error(&format!("journal append failed, request refused: {e}"));
                Err(io::Error::from(e))
            }
        }
    }

    fn enter_bitmap_mode(&self, core: &mut Core, why: &str) -> io::Result<()> {
        if core.bitmap.is_none() {
            core.bitmap = Some(
                DirtyBitmap::open_or_create(&self.bitmap_path, self.size, DEFAULT_GRANULARITY).map_err(|e| {
                    self.stats.tracking_errors.fetch_add(1, Ordering::Relaxed);
                    error!(disk = %self.disk_id, "cannot create the dirty bitmap, request refused: {e}");
                    io::Error::from(e)
                })?,
            );
        }
        core.mode = Mode::Bitmap;
        self.stats.mode_changes.fetch_add(1, Ordering::Relaxed);
        warn!(disk = %self.disk_id, "mode journal -> bitmap: {why}; writes go on, their regions are tracked in {}", self.bitmap_path.display());
        Ok(())
    }

    /// Apply a tracked change to the backing disk.
    fn apply(&self, kind: RecordKind, offset: u64, len: u64, data: &[u8], keep_allocated: bool) -> io::Result<()> {
        match kind {
            RecordKind::Write => self.disk.write_all_at(data, offset),
            RecordKind::Zero if keep_allocated => fileops::zero_range(&self.disk, offset, len),
            RecordKind::Zero | RecordKind::Trim => fileops::discard_zeroing(&self.disk, self.kind, offset, len),
            other => Err(eio(format!("{other} is not a disk change"))),
        }
    }

    /// One round of fdatasyncs: journal segments, backing disk, bitmap.
    async fn sync_round(self: Arc<Self>) -> io::Result<()> {
        let (targets, bitmap) = {
            let mut core = self.core();
            let bm = match core.bitmap.as_ref().map(DirtyBitmap::sync_handle) {
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => return Err(e.into()),
                None => None,
            };
            (core.journal.sync_targets(), bm)
        };
        let disk = self.disk.clone();
        let (targets, r) = tokio::task::spawn_blocking(move || {
            let r = (|| {
                targets.run()?;
                fileops::fdatasync(&disk)?;
                if let Some(b) = &bitmap {
                    fileops::fdatasync(b)?;
                }
                Ok(())
            })();
            (targets, r)
        })
        .await
        .map_err(|e| eio(format!("sync task failed: {e}")))?;
        if let Err(e) = &r {
            self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            error!(disk = %self.disk_id, "flush failed: {e}");
            self.core().journal.requeue(targets);
        }
        r
    }
}

fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

impl Backend for Shim {
    fn info(&self) -> ExportInfo {
        let size = self.inner.size;
        ExportInfo {
            description: format!("tidemark protected disk {}", self.inner.disk_id),
            // A block device may fall back to writing zeros: not fast.
            can_fast_zero: self.inner.kind == BackingKind::File,
            // A FLUSH syncs the whole journal and disk, so it covers every
            // completed write on every connection.
            multi_conn: true,
            min_block: if size.is_multiple_of(512) { 512 } else { 1 },
            ..ExportInfo::new(self.inner.disk_id.clone(), size)
        }
    }

    async fn read(&self, offset: u64, len: u32, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        check_range(self.inner.size, offset, u64::from(len))?;
        buf.clear();
        buf.resize(len as usize, 0);
        if let Err(e) = self.inner.disk.read_exact_at(&mut buf, offset) {
            self.inner.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            self.inner.log_error(&format!("read at {offset}+{len}: {e}"));
            return Err(e);
        }
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.read_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        check_range(self.inner.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.change(RecordKind::Write, offset, len, data, false).await?;
        self.inner.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
        if fua {
            self.sync_all().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.inner.stats.flushes.fetch_add(1, Ordering::Relaxed);
        // A Flush record marks a crash-consistent boundary in the stream:
        // every write acknowledged before it is ordered before it.
        self.inner.journal_marker(RecordKind::Flush)?;
        self.sync_all().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        check_range(self.inner.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.change(RecordKind::Trim, offset, len, Vec::new(), false).await?;
        self.inner.stats.trims.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.sync_all().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        check_range(self.inner.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if flags.fast_zero && self.inner.kind != BackingKind::File {
            // A block device may fall back to writing zeros: not fast.
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.change(RecordKind::Zero, offset, len, Vec::new(), flags.no_hole)
            .await?;
        self.inner.stats.zeroes.fetch_add(1, Ordering::Relaxed);
        if flags.fua {
            self.sync_all().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(u64::from(len)).min(self.inner.size);
        if self.inner.kind != BackingKind::File || offset >= end {
            return Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }]);
        }
        let runs = fileops::allocation(&self.inner.disk, offset, end - offset, 1024)?;
        let out = runs
            .into_iter()
            .map(|(l, hole)| Extent {
                length: u32::try_from(l).unwrap_or(u32::MAX),
                hole,
                zero: hole,
            })
            .collect();
        Ok(out)
    }
}
