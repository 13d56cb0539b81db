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
//! acknowledged untracked. Once the journal is below half its cap again
//! ([`Shim::maybe_exit_bitmap_mode`]) it returns to journal mode and the
//! sync driver resyncs the dirty regions.
//!
//! Syncs ([`crate::sync`]) read the disk here too, chunk by chunk
//! ([`Shim::sync_chunk`]): under the journal lock the chunk is *fenced* and
//! gets a range ticket; older overlapping writes drain; the chunk is read
//! and its records appended; only then is the fence lifted. A write that
//! overlaps a fenced chunk waits (outside the lock) and is journaled after
//! the chunk's records, so no client write gets a seq between the moment a
//! sync reads a range and the moment that range's records get theirs.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tidemark_formats::bitmap::{DirtyBitmap, DEFAULT_GRANULARITY};
use tidemark_formats::journal::Journal;
use tidemark_formats::ErrorKind as FormatErrorKind;
use tidemark_util::fileops::{self, BackingKind};
use tidemark_wire::frame::{AgentMode, Lineage, Progress};
use tidemark_wire::record::{RecordKind, FLAG_FULL, FLAG_SYNC};
use tidemark_wire::DiskId;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::ranges::{RangeLocks, Ticket};
use crate::sync_state::{SyncFile, SyncKind, SyncShared};
use crate::syncer::Syncer;
use crate::unapplied::Unapplied;

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
    pub sync_records: AtomicU64,
    pub sync_bytes: AtomicU64,
    /// Bytes a hash-compare sync read and compared, and of those, the
    /// bytes found equal at the target (not sent).
    pub compare_bytes: AtomicU64,
    pub compare_equal_bytes: AtomicU64,
    pub fence_waits: AtomicU64,
}

/// What the shipper last knew of the collector (status only).
#[derive(Debug, Default)]
pub struct LinkStatus {
    /// `HOST:PORT` of the collector, when one is configured.
    pub collector: Mutex<Option<String>>,
    /// How the collector is reached: `tls (agent NAME)` or plaintext.
    pub security: Mutex<Option<String>>,
    pub connected: AtomicBool,
    /// Highest seq the collector acknowledged.
    pub acked_seq: AtomicU64,
    pub batches: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub reconnects: AtomicU64,
    /// The target's applied seq, as the collector last relayed it (0: not
    /// known yet).
    pub applied_seq: AtomicU64,
    /// Why the collector refused this disk's generation (a failover ended
    /// it): nothing is shipped; writes stay tracked (journal, then bitmap).
    pub fenced: Mutex<Option<String>>,
}

/// What the journal lock protects.
#[derive(Debug)]
pub struct Core {
    pub journal: Journal,
    pub bitmap: Option<DirtyBitmap>,
    pub mode: Mode,
    /// `[start, end)` being read by the sync driver: writes overlapping it
    /// wait until its records are appended.
    fence: Option<(u64, u64)>,
    /// The seq of the final tag of a quiesce (a planned failback): every
    /// write is refused (`EROFS`) and nothing more is journaled.
    pub(crate) quiesced: Option<u64>,
}

impl Core {
    fn fenced(&self, offset: u64, len: u64) -> bool {
        self.fence
            .is_some_and(|(s, e)| offset < e && s < offset.saturating_add(len))
    }
}

/// Shared state of one protected disk.
#[derive(Debug)]
pub struct Inner {
    pub disk_id: DiskId,
    pub disk_uuid: String,
    /// The data generation this disk holds (sent in every Hello).
    pub lineage: Lineage,
    pub disk_path: PathBuf,
    pub disk: Arc<File>,
    pub kind: BackingKind,
    pub size: u64,
    pub bitmap_path: PathBuf,
    pub state_dir: PathBuf,
    resync_required: AtomicBool,
    core: Mutex<Core>,
    ranges: Arc<RangeLocks>,
    syncer: Syncer,
    pub stats: Stats,
    /// Sync state (initial sync, resync, full resync).
    pub sync: SyncShared,
    /// The collector link, for status.
    pub link: LinkStatus,
    /// Regions written that the target has not applied, kept after their
    /// records left the journal.
    pub unapplied: Mutex<Unapplied>,
    /// Hash-compare queries and answers (whole-disk syncs).
    pub hashes: crate::compare::HashBook,
    /// Woken when a sync chunk lifts its fence.
    fence_lifted: Notify,
    /// Woken when records become shippable (the shipper waits on it).
    pub shippable: Notify,
    started: Instant,
    /// Rate limit for per-I/O error logs.
    last_err_log: Mutex<Option<Instant>>,
    /// How the disk is served right now (`nbd unix:…`, `ublk /dev/ublkb0`).
    front_ends: Mutex<Vec<String>>,
}

/// The journaling core of one protected disk (cheap to clone). Front ends
/// ([`crate::nbd`], [`crate::ublk`]) call its client I/O methods: [`Shim::read`],
/// [`Shim::write`], [`Shim::flush`], [`Shim::trim`], [`Shim::write_zeroes`].
#[derive(Clone, Debug)]
pub struct Shim {
    inner: Arc<Inner>,
}

/// Everything needed to build a [`Shim`].
pub struct ShimParts {
    pub disk_id: DiskId,
    pub disk_uuid: String,
    pub lineage: Lineage,
    pub unapplied: Unapplied,
    pub disk_path: PathBuf,
    pub disk: File,
    pub kind: BackingKind,
    pub size: u64,
    pub journal: Journal,
    pub bitmap: Option<DirtyBitmap>,
    pub bitmap_path: PathBuf,
    /// The state directory (sync state, resync-required marker).
    pub state_dir: PathBuf,
    /// A full resync is owed (machine crash).
    pub resync_required: bool,
    /// The persisted sync state.
    pub sync: SyncFile,
}

/// What [`Shim::sync_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// The chunk's records were appended (`first..=last`) and its regions cleared.
    Appended { first: u64, last: u64, records: u64 },
    /// The journal has no room for the chunk now; nothing was appended.
    NoRoom,
    /// The shim is in bitmap mode; nothing was appended.
    Bitmap,
}

/// Why a client request failed. A front end answers with
/// [`Error::errno`], or with the `io::Error` it converts into (the one the
/// failing step returned).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    source: io::Error,
}

/// What kind of failure an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The range is not inside the disk (`EINVAL`); nothing was done.
    OutOfRange,
    /// The disk cannot do it the way asked (fast zeroing of a block
    /// device, `EOPNOTSUPP`); nothing was done.
    Unsupported,
    /// The change could not be tracked (a journal or dirty bitmap error):
    /// the disk was not written.
    Tracking,
    /// Reading or writing the backing disk, or making journal, disk and
    /// bitmap durable, failed.
    Io,
}

impl Error {
    fn new(kind: ErrorKind, source: io::Error) -> Self {
        Self { kind, source }
    }

    /// What failed.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno a block front end answers with (`EIO` when the failure
    /// carries none).
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(libc::EIO)
    }
}

/// The message is that of the failing step, unchanged.
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        e.source
    }
}

/// How [`Shim::write_zeroes`] zeroes a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Zeroing {
    /// Durable before the call returns.
    pub fua: bool,
    /// The range stays allocated (no hole is punched).
    pub keep_allocated: bool,
    /// Fail with [`ErrorKind::Unsupported`] rather than zero slowly.
    pub fast_only: bool,
}

/// One piece of a chunk read for a sync.
enum Piece {
    Zero { offset: u64, len: u64 },
    Data { offset: u64, data: Vec<u8> },
}

/// Lifts a chunk's fence if the chunk ends early (error, no room).
struct FenceGuard<'a> {
    inner: &'a Inner,
    armed: bool,
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.core().fence = None;
            self.inner.fence_lifted.notify_waiters();
        }
    }
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// `STATE/quiesced`: the seq of a quiesce's final tag; while it exists the
/// agent takes no writes (also after a restart).
const QUIESCED_FILE: &str = "quiesced";

fn read_quiesced(state_dir: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(state_dir.join(QUIESCED_FILE)).ok()?;
    // A damaged marker still quiesces: refusing writes is the safe side.
    Some(s.trim().parse().unwrap_or(0))
}

impl Shim {
    /// Assemble a shim from an opened journal, bitmap and backing disk.
    pub fn new(p: ShimParts) -> Self {
        // Dirty regions alone do not mean bitmap mode (a sync may be under
        // way); a journal still above half its cap does: it would leave
        // bitmap mode only below half.
        let mode = if p.bitmap.as_ref().is_some_and(|b| b.count() > 0)
            && p.journal.live_bytes() >= p.journal.config().cap_bytes / 2
        {
            Mode::Bitmap
        } else {
            Mode::Journal
        };
        let sync = SyncShared::new(crate::sync_state::state_path(&p.state_dir), p.sync);
        let quiesced = read_quiesced(&p.state_dir);
        Self {
            inner: Arc::new(Inner {
                disk_id: p.disk_id,
                disk_uuid: p.disk_uuid,
                lineage: p.lineage,
                disk_path: p.disk_path,
                disk: Arc::new(p.disk),
                kind: p.kind,
                size: p.size,
                bitmap_path: p.bitmap_path,
                state_dir: p.state_dir,
                resync_required: AtomicBool::new(p.resync_required),
                core: Mutex::new(Core {
                    journal: p.journal,
                    bitmap: p.bitmap,
                    mode,
                    fence: None,
                    quiesced,
                }),
                ranges: Arc::new(RangeLocks::default()),
                syncer: Syncer::default(),
                stats: Stats::default(),
                sync,
                link: LinkStatus::default(),
                hashes: crate::compare::HashBook::default(),
                unapplied: Mutex::new(p.unapplied),
                fence_lifted: Notify::new(),
                shippable: Notify::new(),
                started: Instant::now(),
                last_err_log: Mutex::new(None),
                front_ends: Mutex::new(Vec::new()),
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

    /// The final tag's seq while the disk is quiesced (no writes taken).
    pub fn quiesced(&self) -> Option<u64> {
        self.core().quiesced
    }

    /// Stop taking writes for a planned failback: from now on every write
    /// is refused with `EROFS`; a tag named `name` is journaled as the last
    /// record and made durable, and `STATE/quiesced` keeps the state over a
    /// restart. Returns the tag's seq. Quiescing again answers the same
    /// seq. Refused in bitmap mode and while a sync runs: the stream would
    /// not be complete at the tag.
    pub async fn quiesce(&self, name: &str) -> io::Result<u64> {
        let seq = {
            let mut core = self.core();
            if let Some(seq) = core.quiesced.filter(|s| *s > 0) {
                seq
            } else {
                if core.mode != Mode::Journal {
                    return Err(io::Error::other(
                        "the agent is in bitmap mode (journal full): the replica cannot hold every write at a final tag",
                    ));
                }
                if let Some(kind) = self.inner.sync.snapshot().kind {
                    return Err(io::Error::other(format!(
                        "a {kind:?} sync is running: the replica is not a copy of the disk until it ends"
                    )));
                }
                let seq = self.append_tag(&mut core, name, 0)?;
                core.quiesced = Some(seq);
                seq
            }
        };
        self.inner.shippable.notify_one();
        self.sync_all().await.map_err(io::Error::from)?;
        tidemark_util::crashsafe::write_atomic(
            &self.inner.state_dir.join(QUIESCED_FILE),
            format!("{seq}\n").as_bytes(),
        )?;
        tracing::warn!(disk = %self.inner.disk_id, seq, "quiesced for a planned failback: writes are refused from now on (final tag {name:?})");
        Ok(seq)
    }

    /// Take writes again after a quiesce (a failback that did not happen).
    pub fn resume(&self) -> io::Result<()> {
        tidemark_util::crashsafe::remove_durable(&self.inner.state_dir.join(QUIESCED_FILE))?;
        self.core().quiesced = None;
        tracing::warn!(disk = %self.inner.disk_id, "writes are taken again (quiesce lifted)");
        Ok(())
    }

    /// Whether a full resync is owed after a machine crash.
    pub fn resync_required(&self) -> bool {
        self.inner.resync_required.load(Ordering::Relaxed)
    }

    /// The full resync owed after a machine crash is now durably recorded
    /// as the running sync: drop the marker.
    pub fn clear_resync_required(&self) -> io::Result<()> {
        tidemark_util::crashsafe::remove_durable(&self.inner.state_dir.join("resync-required"))?;
        self.inner.resync_required.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Leave bitmap mode once the journal is below half its cap; the sync
    /// driver then resyncs the dirty regions. Returns whether it left.
    pub fn maybe_exit_bitmap_mode(&self) -> bool {
        let mut core = self.core();
        if core.mode != Mode::Bitmap {
            return false;
        }
        let cap = core.journal.config().cap_bytes;
        let held = core.journal.live_bytes();
        if held >= cap / 2 {
            return false;
        }
        core.mode = Mode::Journal;
        let (regions, bytes) = core.bitmap.as_ref().map_or((0, 0), |b| (b.count(), b.dirty_bytes()));
        drop(core);
        self.inner.stats.mode_changes.fetch_add(1, Ordering::Relaxed);
        info!(
            disk = %self.inner.disk_id,
            "mode bitmap -> journal: the journal is below half its cap ({held} of {cap} bytes); \
             resyncing {regions} dirty regions ({bytes} bytes)"
        );
        self.inner.sync.wake();
        true
    }

    /// Mark `[offset, offset+len)` (clipped to the disk) for resync, e.g.
    /// at the target's request; the sync driver picks it up.
    pub fn mark_for_resync(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.inner.size;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Err(eio(format!(
                "resync range {offset}+{len} is outside the {size}-byte disk"
            )));
        }
        {
            let mut core = self.core();
            let bitmap = self.inner.bitmap_mut(&mut core)?;
            bitmap.mark(offset, end - offset).map_err(io::Error::from)?;
        }
        self.inner.sync.wake();
        Ok(())
    }

    /// Mark every region for a whole-disk sync and make the marks durable.
    pub fn mark_all_for_sync(&self) -> io::Result<()> {
        let handle = {
            let mut core = self.core();
            let bitmap = self.inner.bitmap_mut(&mut core)?;
            bitmap.mark_all().map_err(io::Error::from)?;
            bitmap.sync_handle().map_err(io::Error::from)?
        };
        fileops::fdatasync(&handle)
    }

    /// Make the bitmap's bits durable (outside the journal lock).
    pub fn persist_bitmap(&self) -> io::Result<()> {
        let handle = match self.core().bitmap.as_ref().map(DirtyBitmap::sync_handle) {
            Some(h) => h.map_err(io::Error::from)?,
            None => return Ok(()),
        };
        fileops::fdatasync(&handle)
    }

    /// Dirty regions as (count, bytes).
    pub fn dirty(&self) -> (u64, u64) {
        self.core()
            .bitmap
            .as_ref()
            .map_or((0, 0), |b| (b.count(), b.dirty_bytes()))
    }

    /// The first dirty run at or after `from`, at most `max` bytes long.
    pub fn next_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let core = self.core();
        let b = core.bitmap.as_ref()?;
        b.next_dirty(from).map(|(o, l)| (o, l.min(max)))
    }

    /// Sync one chunk `[offset, offset+len)` (region-aligned, at most a
    /// few MiB): fence it, wait for older overlapping writes, read it
    /// through the backing disk, append its `Sync` / `Zero|FLAG_SYNC`
    /// records, clear its regions in the bitmap, lift the fence. `full`
    /// adds `FLAG_FULL`. `wait` drives the async ticket wait from the
    /// caller's thread (e.g. `tokio::runtime::Handle::block_on`).
    /// `compare`: the replica's hash of each chunk of the range
    /// ([`crate::compare`]); chunks that hash the same are not journaled.
    pub fn sync_chunk(
        &self,
        offset: u64,
        len: u64,
        full: bool,
        compare: Option<&[Option<[u8; 32]>]>,
        wait: impl FnOnce(&Ticket),
    ) -> io::Result<ChunkOutcome> {
        let inner = &*self.inner;
        check_range(inner.size, offset, len)?;
        let ticket = {
            let mut core = inner.core();
            if core.mode != Mode::Journal {
                return Ok(ChunkOutcome::Bitmap);
            }
            core.fence = Some((offset, offset + len));
            inner.ranges.register(offset, len, None)
        };
        let mut guard = FenceGuard { inner, armed: true };
        wait(&ticket);
        let pieces = match compare {
            None => inner.read_for_sync(offset, len)?,
            Some(expect) => {
                // Read and hash once; only the chunks that differ are read
                // again as pieces (from the page cache).
                let differ = inner.differing_chunks(offset, len, expect)?;
                let mut equal = 0;
                let mut spans: Vec<(u64, u64)> = Vec::new();
                for ((o, l), d) in tidemark_wire::chunk::chunks(offset, len, inner.size).zip(&differ) {
                    if !*d {
                        equal += l;
                        continue;
                    }
                    match spans.last_mut() {
                        Some((_, e)) if *e == o => *e = o + l,
                        _ => spans.push((o, o + l)),
                    }
                }
                // Records as a plain sync makes them: at most 1 MiB each.
                let mut pieces = Vec::new();
                for (s, e) in spans {
                    let mut at = s;
                    while at < e {
                        let n = (e - at).min(crate::sync::CHUNK);
                        pieces.extend(inner.read_for_sync(at, n)?);
                        at += n;
                    }
                }
                inner.stats.compare_bytes.fetch_add(len, Ordering::Relaxed);
                inner.stats.compare_equal_bytes.fetch_add(equal, Ordering::Relaxed);
                pieces
            }
        };
        let full_flag = if full { FLAG_FULL } else { 0 };
        let hashed: Vec<(Piece, [u8; 32])> = pieces
            .into_iter()
            .map(|p| {
                let h = match &p {
                    Piece::Data { data, .. } => blake3::hash(data),
                    Piece::Zero { .. } => blake3::hash(&[]),
                };
                (p, *h.as_bytes())
            })
            .collect();
        let payload: u64 = hashed
            .iter()
            .map(|(p, _)| match p {
                Piece::Data { data, .. } => data.len() as u64,
                Piece::Zero { .. } => 0,
            })
            .sum();
        // Tests widen the window between the read and the append here.
        fail::fail_point!("agent-sync-before-append");
        let now = crate::now_ns();
        let mut core = inner.core();
        if core.mode != Mode::Journal {
            return Ok(ChunkOutcome::Bitmap);
        }
        if !core.journal.has_room_for(hashed.len() as u64, payload) {
            return Ok(ChunkOutcome::NoRoom);
        }
        let (mut first, mut last) = (0, 0);
        for (p, hash) in &hashed {
            let seq = match p {
                Piece::Data { offset, data } => core.journal.append(
                    RecordKind::Sync,
                    full_flag,
                    *offset,
                    data.len() as u64,
                    data,
                    *hash,
                    now,
                ),
                Piece::Zero { offset, len } => {
                    core.journal
                        .append(RecordKind::Zero, FLAG_SYNC | full_flag, *offset, *len, &[], *hash, now)
                }
            }
            .map_err(|e| {
                inner.stats.tracking_errors.fetch_add(1, Ordering::Relaxed);
                io::Error::from(e)
            })?;
            if first == 0 {
                first = seq;
            }
            last = seq;
        }
        if let Some(b) = core.bitmap.as_mut() {
            b.unmark(offset, len).map_err(io::Error::from)?;
        }
        core.fence = None;
        drop(core);
        guard.armed = false;
        inner.fence_lifted.notify_waiters();
        inner.shippable.notify_one();
        drop(ticket);
        let n = hashed.len() as u64;
        inner.stats.journal_records.fetch_add(n, Ordering::Relaxed);
        inner.stats.sync_records.fetch_add(n, Ordering::Relaxed);
        inner.stats.sync_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(ChunkOutcome::Appended {
            first,
            last,
            records: n,
        })
    }

    /// Append the `SyncBegin` that starts a sync (`full`: a whole-disk
    /// sync, `FLAG_FULL`) and return its seq, the sync's start seq; `None`
    /// in bitmap mode or when the journal is full (no ordered stream to
    /// begin it in; a sync never pushes the journal into bitmap mode).
    pub fn append_sync_begin(&self, full: bool) -> io::Result<Option<u64>> {
        let mut core = self.core();
        if core.mode != Mode::Journal {
            return Ok(None);
        }
        let hash = *blake3::hash(&[]).as_bytes();
        let flags = if full { FLAG_FULL } else { 0 };
        let seq = match core
            .journal
            .append(RecordKind::SyncBegin, flags, 0, 0, &[], hash, crate::now_ns())
        {
            Ok(seq) => seq,
            Err(e) if e.kind == FormatErrorKind::Full => return Ok(None),
            Err(e) => return Err(io::Error::from(e)),
        };
        drop(core);
        self.inner.stats.journal_records.fetch_add(1, Ordering::Relaxed);
        self.inner.shippable.notify_one();
        Ok(Some(seq))
    }

    /// Append `SyncDone` for a sync that started at `start_seq`, if no
    /// region is dirty and the shim is in journal mode; returns its seq.
    pub fn append_sync_done(&self, start_seq: u64, full: bool) -> io::Result<Option<u64>> {
        let mut core = self.core();
        if core.mode != Mode::Journal || core.bitmap.as_ref().is_some_and(|b| b.count() > 0) {
            return Ok(None);
        }
        let hash = *blake3::hash(&[]).as_bytes();
        let flags = if full { FLAG_FULL } else { 0 };
        let seq = core
            .journal
            .append(RecordKind::SyncDone, flags, start_seq, 0, &[], hash, crate::now_ns())
            .map_err(io::Error::from)?;
        drop(core);
        self.inner.stats.journal_records.fetch_add(1, Ordering::Relaxed);
        self.inner.shippable.notify_one();
        Ok(Some(seq))
    }

    /// Journal a Tag record named `name` (a consistency marker: every write
    /// acknowledged before it is ordered before it); returns its seq.
    /// `app_consistent` sets `FLAG_APP_CONSISTENT` (the filesystem was
    /// frozen around it). In bitmap mode there is no ordered stream to
    /// mark, and a full journal is not a reason to leave it: both refuse.
    pub fn tag(&self, name: &str, app_consistent: bool) -> io::Result<u64> {
        let mut core = self.core();
        if let Some(seq) = core.quiesced {
            return Err(io::Error::other(format!(
                "the disk is quiesced for a failback (final tag at seq {seq}): nothing more is journaled"
            )));
        }
        if core.mode != Mode::Journal {
            return Err(io::Error::other(
                "the agent is in bitmap mode (journal full): no ordered stream to tag until it resyncs",
            ));
        }
        let flags = if app_consistent {
            tidemark_wire::record::FLAG_APP_CONSISTENT
        } else {
            0
        };
        let seq = self.append_tag(&mut core, name, flags)?;
        drop(core);
        self.inner.shippable.notify_one();
        Ok(seq)
    }

    /// Journal a Tag record named `name` with `flags` (the caller holds the
    /// journal lock and has checked the mode); returns its seq.
    fn append_tag(&self, core: &mut Core, name: &str, flags: u16) -> io::Result<u64> {
        let hash = *blake3::hash(name.as_bytes()).as_bytes();
        let seq = core
            .journal
            .append(RecordKind::Tag, flags, 0, 0, name.as_bytes(), hash, crate::now_ns())
            .map_err(io::Error::from)?;
        self.inner.stats.journal_records.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// The journal's fill as (live bytes, cap).
    pub fn journal_fill(&self) -> (u64, u64) {
        let core = self.core();
        (core.journal.live_bytes(), core.journal.config().cap_bytes)
    }

    /// The mode reported to the collector.
    pub fn agent_mode(&self) -> AgentMode {
        if self.mode() == Mode::Bitmap {
            return AgentMode::Bitmap;
        }
        match self.inner.sync.snapshot().kind {
            Some(SyncKind::Initial) => AgentMode::InitialSync,
            Some(SyncKind::Resync) => AgentMode::Resync,
            Some(SyncKind::Full) => AgentMode::FullResync,
            // Regions waiting for a resync the driver has not started yet
            // (just out of bitmap mode, a target's request): the replica
            // lacks them, so this is not streaming.
            None if self.dirty().0 > 0 => AgentMode::Resync,
            None => AgentMode::Streaming,
        }
    }

    /// The agent's report to the collector.
    pub fn progress(&self) -> Progress {
        let (source_seq, backlog) = {
            let core = self.core();
            let acked = self.inner.link.acked_seq.load(Ordering::Relaxed);
            (
                core.journal.next_seq().saturating_sub(1),
                core.journal.bytes_after(acked.max(core.journal.consumed_seq())),
            )
        };
        let (done, total) = self.sync_done_total();
        Progress {
            source_seq,
            mode: self.agent_mode(),
            sync_done: done,
            sync_total: total,
            full_resyncs: self.inner.sync.snapshot().full_resyncs,
            backlog_bytes: backlog,
            written_bytes: self.inner.stats.write_bytes.load(Ordering::Relaxed),
            time_ns: crate::now_ns(),
            nonce: 0,
        }
    }

    /// Bytes done and total of the running sync (0, 0 when none; 0 and the
    /// dirty bytes when regions wait for a resync not started yet).
    pub fn sync_done_total(&self) -> (u64, u64) {
        let f = self.inner.sync.snapshot();
        let Some(kind) = f.kind else {
            return (0, self.dirty().1);
        };
        if kind.whole_disk() && !f.marked {
            return (0, f.total_bytes);
        }
        let (_, dirty) = self.dirty();
        let total = f.total_bytes.max(dirty);
        (total - dirty, total)
    }

    /// How long this shim has been running.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// How the disk is served (front ends, comma-separated); `None` before
    /// it is.
    pub fn served_as(&self) -> Option<String> {
        self.inner
            .front_ends
            .lock()
            .ok()
            .filter(|f| !f.is_empty())
            .map(|f| f.join(", "))
    }

    /// Read `buf.len()` bytes at `offset` from the disk (reads are not
    /// journaled). Every front end reads through here.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf.len() as u64;
        check_range(self.inner.size, offset, len)?;
        if let Err(e) = self.inner.disk.read_exact_at(buf, offset) {
            self.inner.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            self.inner.log_error(&format!("read at {offset}+{len}: {e}"));
            return Err(Error::new(ErrorKind::Io, e));
        }
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.read_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Write `data` at `offset`: journaled (or marked in the bitmap), then
    /// written to the disk; with `fua`, durable before it returns.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), Error> {
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

    /// Make every write completed before this call durable, and mark the
    /// point in the journal.
    pub async fn flush(&self) -> Result<(), Error> {
        self.inner.stats.flushes.fetch_add(1, Ordering::Relaxed);
        // A Flush record marks a crash-consistent boundary in the stream:
        // every write acknowledged before it is ordered before it.
        self.inner
            .journal_marker(RecordKind::Flush)
            .map_err(|e| Error::new(ErrorKind::Tracking, e))?;
        self.sync_all().await
    }

    /// Discard `[offset, offset+len)`; it reads as zeros afterwards, as it
    /// will on the replica.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
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

    /// Zero `[offset, offset+len)`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, how: Zeroing) -> Result<(), Error> {
        check_range(self.inner.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if how.fast_only && !self.zeroes_fast() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            ));
        }
        self.change(RecordKind::Zero, offset, len, Vec::new(), how.keep_allocated)
            .await?;
        self.inner.stats.zeroes.fetch_add(1, Ordering::Relaxed);
        if how.fua {
            self.sync_all().await?;
        }
        Ok(())
    }

    /// Whether zeroing is always fast (a block device may fall back to
    /// writing zeros).
    pub fn zeroes_fast(&self) -> bool {
        self.inner.kind == BackingKind::File
    }

    /// Allocation of `[offset, offset+len)` as runs of (length, hole), at
    /// most `max` runs; `None` when the disk cannot tell (a block device).
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Option<Vec<(u64, bool)>>> {
        if self.inner.kind != BackingKind::File {
            return Ok(None);
        }
        fileops::allocation(&self.inner.disk, offset, len, max).map(Some)
    }

    /// Record how the disk is served, for the status (replaces the list).
    pub fn set_front_ends(&self, f: Vec<String>) {
        *self.inner.front_ends.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// The disk's identity (its random UUID, from the state directory).
    pub fn disk_uuid(&self) -> String {
        self.inner.disk_uuid.clone()
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Make everything completed so far durable (shared round).
    pub async fn sync_all(&self) -> Result<(), Error> {
        let inner = self.inner.clone();
        self.inner
            .syncer
            .sync(|| {
                let inner = inner.clone();
                async move { inner.sync_round().await }
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Io, e))
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
    ) -> Result<(), Error> {
        let tracking = |e| Error::new(ErrorKind::Tracking, e);
        let task_failed = |e: tokio::task::JoinError| Error::new(ErrorKind::Io, eio(format!("write task failed: {e}")));
        let mut data = data;
        // Hashed once, also when a fenced write is retried.
        let mut hash = None;
        let step = loop {
            let step = if data.len() >= OFFLOAD_MIN {
                // Hash, journal and write a large payload on a blocking-pool
                // thread, so the connection goes on reading the next request
                // meanwhile. Ordering is unaffected: the range ticket, taken
                // with the journal append, is what orders overlapping writes.
                let inner = self.inner.clone();
                tokio::task::spawn_blocking(move || {
                    inner.track_and_apply(kind, offset, len, data, hash, keep_allocated)
                })
                .await
                .map_err(task_failed)?
                .map_err(tracking)?
            } else {
                self.inner
                    .track_and_apply(kind, offset, len, data, hash, keep_allocated)
                    .map_err(tracking)?
            };
            match step {
                Step::Fenced(d, h) => {
                    // A sync is reading this range: journal after its records.
                    self.inner.stats.fence_waits.fetch_add(1, Ordering::Relaxed);
                    self.inner.wait_unfenced(offset, len).await;
                    data = d;
                    hash = Some(h);
                }
                other => break other,
            }
        };
        let result = match step {
            Step::Fenced(..) => unreachable!("fenced steps are retried above"),
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
                .map_err(task_failed)?
            }
        };
        self.inner.shippable.notify_one();
        if let Err(e) = &result {
            self.inner.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            self.inner.log_error(&format!(
                "{kind} at {offset}+{len} on {}: {e}",
                self.inner.disk_path.display()
            ));
        }
        result.map_err(|e| Error::new(ErrorKind::Io, e))
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
    /// Not tracked: a sync chunk overlapping it is being read. Retry once
    /// its fence is lifted (payload and its hash, kept for the retry).
    Fenced(Vec<u8>, [u8; 32]),
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
        hash: Option<[u8; 32]>,
        keep_allocated: bool,
    ) -> io::Result<Step> {
        let hash = hash.unwrap_or_else(|| *blake3::hash(&data).as_bytes());
        let Some(ticket) = self.track(kind, offset, len, &data, hash)? else {
            return Ok(Step::Fenced(data, hash));
        };
        if ticket.must_wait() {
            return Ok(Step::Wait(ticket, data));
        }
        let r = self.apply(kind, offset, len, &data, keep_allocated);
        drop(ticket);
        Ok(Step::Done(r))
    }

    /// Journal the change (or mark it in the bitmap) and take its range
    /// ticket; `None` if a sync chunk overlapping it is fenced.
    fn track(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        hash: [u8; 32],
    ) -> io::Result<Option<Ticket>> {
        let mut core = self.core();
        if core.quiesced.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if core.fenced(offset, len) {
            return Ok(None);
        }
        if core.mode == Mode::Journal {
            match core.journal.append(kind, 0, offset, len, data, hash, crate::now_ns()) {
                Ok(seq) => {
                    self.stats.journal_records.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(self.ranges.register(offset, len, Some(seq))));
                }
                Err(e) if e.kind == FormatErrorKind::Full => self.enter_bitmap_mode(&mut core, &e.to_string())?,
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
        Ok(Some(self.ranges.register(offset, len, None)))
    }

    /// Wait until no fence overlaps `[offset, offset+len)`.
    async fn wait_unfenced(&self, offset: u64, len: u64) {
        loop {
            let notified = self.fence_lifted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.core().fenced(offset, len) {
                return;
            }
            notified.await;
        }
    }

    /// The bitmap, created if this is its first use.
    fn bitmap_mut<'a>(&self, core: &'a mut Core) -> io::Result<&'a mut DirtyBitmap> {
        if core.bitmap.is_none() {
            core.bitmap = Some(
                DirtyBitmap::open_or_create(&self.bitmap_path, self.size, DEFAULT_GRANULARITY)
                    .map_err(io::Error::from)?,
            );
        }
        core.bitmap.as_mut().ok_or_else(|| eio("no dirty bitmap".into()))
    }

    /// Which chunks of `[offset, offset+len)` (a hash-compare sync's
    /// range) differ from `expect`, the replica's hash of each (`None`:
    /// send it): one read of the range (holes are not read), blake3 per
    /// chunk.
    fn differing_chunks(&self, offset: u64, len: u64, expect: &[Option<[u8; 32]>]) -> io::Result<Vec<bool>> {
        use tidemark_wire::chunk::{chunk_hash, chunks, zero_hash};
        let runs = if self.kind == BackingKind::File {
            fileops::allocation(&self.disk, offset, len, 4096)?
        } else {
            Vec::new()
        };
        let covered: u64 = runs.iter().map(|r| r.0).sum();
        let mut holes = Vec::new();
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| eio("sync chunk too large".into()))?];
        let mut pos = offset;
        for (l, hole) in runs
            .iter()
            .copied()
            .chain((covered < len).then_some((len - covered, false)))
        {
            let l = l.min(offset + len - pos);
            if hole {
                holes.push((pos, pos + l));
            } else if l > 0 {
                let at = usize::try_from(pos - offset).unwrap_or(0);
                let n = usize::try_from(l).unwrap_or(0);
                self.disk.read_exact_at(&mut buf[at..at + n], pos)?;
            }
            pos += l;
        }
        Ok(chunks(offset, len, self.size)
            .zip(expect.iter().chain(std::iter::repeat(&None)))
            .map(|((o, l), want)| {
                let Some(want) = want else {
                    return true;
                };
                let in_hole = holes.iter().any(|&(s, e)| s <= o && o + l <= e);
                let got = if in_hole {
                    zero_hash(l)
                } else {
                    let at = usize::try_from(o - offset).unwrap_or(0);
                    chunk_hash(&buf[at..at + usize::try_from(l).unwrap_or(0)])
                };
                got != *want
            })
            .collect())
    }

    /// Read `[offset, offset+len)` for a sync: holes (SEEK_DATA/SEEK_HOLE)
    /// and all-zero 4 KiB blocks become zero pieces, the rest data pieces;
    /// neighbours of one kind are merged.
    fn read_for_sync(&self, offset: u64, len: u64) -> io::Result<Vec<Piece>> {
        const BLOCK: u64 = 4096;
        let end = offset + len;
        let mut runs = if self.kind == BackingKind::File {
            fileops::allocation(&self.disk, offset, len, 4096)?
        } else {
            Vec::new()
        };
        let covered: u64 = runs.iter().map(|r| r.0).sum();
        if covered < len {
            runs.push((len - covered, false));
        }
        let mut out: Vec<Piece> = Vec::new();
        let push_zero = |out: &mut Vec<Piece>, o: u64, l: u64| match out.last_mut() {
            Some(Piece::Zero { offset, len }) if *offset + *len == o => *len += l,
            _ => out.push(Piece::Zero { offset: o, len: l }),
        };
        let mut pos = offset;
        for (l, hole) in runs {
            let l = l.min(end - pos);
            if l == 0 {
                continue;
            }
            if hole {
                push_zero(&mut out, pos, l);
                pos += l;
                continue;
            }
            let mut buf = vec![0u8; usize::try_from(l).map_err(|_| eio("sync chunk too large".into()))?];
            self.disk.read_exact_at(&mut buf, pos)?;
            let mut i = 0u64;
            while i < l {
                // Blocks are aligned on the disk, not on the run.
                let b_end = ((pos + i) / BLOCK + 1) * BLOCK;
                let n = (b_end - (pos + i)).min(l - i);
                let (s, e) = (usize::try_from(i).unwrap_or(0), usize::try_from(i + n).unwrap_or(0));
                let block = &buf[s..e];
                if block.iter().all(|&b| b == 0) {
                    push_zero(&mut out, pos + i, n);
                } else {
                    match out.last_mut() {
                        Some(Piece::Data { offset, data }) if *offset + data.len() as u64 == pos + i => {
                            data.extend_from_slice(block)
                        }
                        _ => out.push(Piece::Data {
                            offset: pos + i,
                            data: block.to_vec(),
                        }),
                    }
                }
                i += n;
            }
            pos += l;
        }
        Ok(out)
    }

    /// Journal a record without payload or range (Flush); in bitmap mode
    /// there is no stream to mark, so nothing is written.
    fn journal_marker(&self, kind: RecordKind) -> io::Result<()> {
        let mut core = self.core();
        // Quiesced: the final tag is the last record (a flush still syncs).
        if core.mode != Mode::Journal || core.quiesced.is_some() {
            return Ok(());
        }
        let hash = *blake3::hash(&[]).as_bytes();
        match core.journal.append(kind, 0, 0, 0, &[], hash, crate::now_ns()) {
            Ok(_) => {
                self.stats.journal_records.fetch_add(1, Ordering::Relaxed);
                drop(core);
                self.shippable.notify_one();
                Ok(())
            }
            Err(e) if e.kind == FormatErrorKind::Full => self.enter_bitmap_mode(&mut core, &e.to_string()),
            Err(e) => {
                self.stats.tracking_errors.fetch_add(1, Ordering::Relaxed);
                self.log_error(&format!("journal append failed, request refused: {e}"));
                Err(io::Error::from(e))
            }
        }
    }

    fn enter_bitmap_mode(&self, core: &mut Core, why: &str) -> io::Result<()> {
        if let Err(e) = self.bitmap_mut(core) {
            self.stats.tracking_errors.fetch_add(1, Ordering::Relaxed);
            error!(disk = %self.disk_id, "cannot create the dirty bitmap, request refused: {e}");
            return Err(e);
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

/// `[offset, offset+len)` lies inside a disk of `size` bytes.
fn check_range(size: u64, offset: u64, len: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            io::Error::from_raw_os_error(libc::EINVAL),
        )),
    }
}
