//! The sync driver: initial sync, resync of dirty regions, full resync.
//!
//! It owns *which* regions still have to be sent and *when*; the shim
//! ([`Shim::sync_chunk`]) owns how one chunk is read and journaled in exact
//! seq order against client writes (fence + range ticket), and
//! [`crate::sync_state`] the recorded state (`STATE/sync.json`).
//!
//! A sync is recorded in `sync.json` (crash-safe write) before it starts;
//! a whole-disk sync (initial, full) then marks every region in the dirty
//! bitmap and makes the marks durable before `marked` is recorded. Every
//! sync begins with a `SyncBegin` record (`FLAG_FULL` for whole-disk
//! syncs) journaled before any of its data: its seq is the sync's start seq.
//! The driver turns dirty regions into records chunk by chunk (clearing each
//! chunk's regions as its records are appended, persisting the bitmap every
//! second) and appends `SyncDone` (offset = the sync's start seq,
//! `FLAG_FULL` for whole-disk syncs) once no region is dirty and the shim is
//! in journal mode. A restart mid-sync continues from the bitmap.
//!
//! Starting a sync and a driver step exclude each other (the *step lock*):
//! a whole-disk sync is recorded (and the journal advanced, when the
//! collector is ahead of it) while no chunk is being read or appended, so
//! no chunk of the old sync can get seqs that the advance then discards.
//!
//! The driver never pushes the journal into bitmap mode: it pauses while the
//! journal is above half its cap (and while in bitmap mode). It never
//! blocks client I/O beyond one chunk's read.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tidemark_util::human::format_size;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use tidemark_wire::chunk::HASH_CHUNK;

use crate::compare::{Answer, Compared, Link, AHEAD, WINDOW};
use crate::shim::{ChunkOutcome, Mode, Shim};
use crate::sync_state::{SyncFile, SyncKind};

/// Largest chunk read at once (and largest `Sync` record).
pub const CHUNK: u64 = 1 << 20;
/// Largest chunk a whole-disk (hash-compare) sync reads at once; the
/// chunks that differ are journaled in records of at most [`CHUNK`]'s
/// pieces.
const COMPARE_CHUNK: u64 = 8 << 20;
/// How often the cleared bits are made durable.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// A compare window unanswered this long on a live connection is sent as data.
const GIVE_UP_CONNECTED: Duration = Duration::from_secs(60);
/// An initial sync sends data once no collector was reachable this long.
const GIVE_UP_INITIAL: Duration = Duration::from_secs(3);
/// How often progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// What one step of the driver did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Idle,
    Paused,
    Worked,
}

/// The driver's working state.
struct Driver<W> {
    shim: Shim,
    wait: W,
    cursor: u64,
    last_persist: Instant,
    last_log: Instant,
    window_bytes: u64,
    paused_logged: bool,
}

/// Run the sync driver on a thread of its own until `stop` is cancelled.
/// `wait` drives a range ticket's async wait from that thread.
pub fn spawn(
    shim: Shim,
    stop: CancellationToken,
    rt: tokio::runtime::Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("tidemark-sync".into()).spawn(move || {
        let wait = move |t: &crate::ranges::Ticket| rt.block_on(t.wait());
        run(shim, &stop, wait);
    })
}

/// The driver loop (public for tests, which drive it with their own `wait`).
pub fn run<W: Fn(&crate::ranges::Ticket)>(shim: Shim, stop: &CancellationToken, wait: W) {
    let mut d = Driver {
        shim,
        wait,
        cursor: 0,
        last_persist: Instant::now(),
        last_log: Instant::now(),
        window_bytes: 0,
        paused_logged: false,
    };
    if d.shim.resync_required() {
        if let Err(e) = d.begin_owed_full_resync() {
            error!(disk = %d.disk(), "cannot record the full resync owed after a machine crash: {e:#}");
        }
    }
    let mut last_err: Option<Instant> = None;
    while !stop.is_cancelled() {
        match d.step() {
            Ok(Step::Worked) => {}
            Ok(Step::Paused) => d.shim.inner().sync.wait(Duration::from_millis(100)),
            Ok(Step::Idle) => d.shim.inner().sync.wait(Duration::from_millis(500)),
            Err(e) => {
                if last_err.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    error!(disk = %d.disk(), "sync failed, retrying: {e:#}");
                    last_err = Some(Instant::now());
                }
                d.shim.inner().sync.wait(Duration::from_secs(1));
            }
        }
    }
    if let Err(e) = d.shim.persist_bitmap() {
        warn!(disk = %d.disk(), "persist the dirty bitmap at stop: {e}");
    }
}

/// Durably record a whole-disk sync of `kind` (a full resync is counted);
/// the driver marks every region, journals its `SyncBegin` (whose seq is
/// the sync's start seq) and runs it. A sync already running is replaced.
pub fn begin_whole(shim: &Shim, kind: SyncKind) -> Result<SyncFile> {
    let g = shim.inner().sync.hold();
    let f = record_whole(shim, kind)?;
    drop(g);
    shim.inner().sync.wake();
    Ok(f)
}

/// The collector holds seqs this journal never wrote: durably record a full
/// resync, then make `seq` the journal's next seq (`Journal::advance_to`),
/// both before the driver may run a step, so that the sync's `SyncBegin`
/// and every record it appends get seqs at or after `seq`.
pub fn begin_full_from(shim: &Shim, seq: u64) -> Result<SyncFile> {
    let g = shim.inner().sync.hold();
    // Recorded first: a crash after the advance must not lose it.
    let f = record_whole(shim, SyncKind::Full)?;
    shim.core()
        .journal
        .advance_to(seq)
        .context("advance the journal past the collector's acked seq")?;
    drop(g);
    shim.inner().sync.wake();
    Ok(f)
}

/// Journal records `..to` were lost (unreadable) and stand in the stream as
/// placeholders: make sure that a sync which begins after them covers what
/// they changed, durably, before the placeholders are shipped. `range`: the
/// one lost record's range; `None`: unknown, so the whole disk (a full
/// resync, unless a whole-disk sync beginning after them is recorded).
/// Returns whether the whole disk is resynced.
pub fn resync_lost(shim: &Shim, to: u64, range: Option<(u64, u64)>) -> Result<bool> {
    let g = shim.inner().sync.hold();
    let f = shim.inner().sync.snapshot();
    // A sync that began before the loss ends with a SyncDone whose start is
    // before it: that does not cover the placeholders.
    let begins_after = f.kind.is_some() && (f.start_seq == 0 || f.start_seq >= to);
    let full = match range {
        Some((offset, length)) => {
            shim.mark_for_resync(offset, length)
                .with_context(|| format!("mark {offset}+{length} for resync"))?;
            shim.persist_bitmap().context("persist the dirty bitmap")?;
            if f.kind.is_some() && !begins_after {
                shim.inner().sync.update(|f| {
                    if f.kind.is_some_and(SyncKind::whole_disk) {
                        // The same whole-disk sync, begun again.
                        f.start_seq = 0;
                        f.marked = false;
                    } else {
                        // A new resync of every dirty region.
                        f.kind = None;
                        f.marked = false;
                        f.total_bytes = 0;
                    }
                })?;
            }
            false
        }
        None => {
            if !(f.kind.is_some_and(SyncKind::whole_disk) && begins_after) {
                record_whole(shim, SyncKind::Full)?;
            }
            true
        }
    };
    drop(g);
    shim.inner().sync.wake();
    Ok(full)
}

/// Record a whole-disk sync that has not begun (start seq 0). The caller
/// holds the step lock.
fn record_whole(shim: &Shim, kind: SyncKind) -> Result<SyncFile> {
    let size = shim.inner().size;
    let f = shim.inner().sync.update(|f| {
        f.kind = Some(kind);
        f.start_seq = 0;
        f.total_bytes = size;
        f.marked = false;
        if kind == SyncKind::Full {
            f.full_resyncs += 1;
        }
    })?;
    info!(
        disk = %shim.inner().disk_id,
        full_resyncs = f.full_resyncs,
        "{} of the whole disk ({}) recorded",
        if kind == SyncKind::Full { "full resync" } else { "initial sync" },
        format_size(size)
    );
    Ok(f)
}

impl<W: Fn(&crate::ranges::Ticket)> Driver<W> {
    fn disk(&self) -> String {
        self.shim.inner().disk_id.to_string()
    }

    /// A machine crash may have let writes reach the disk without reaching
    /// the journal: record a full resync, durably, then drop the marker.
    fn begin_owed_full_resync(&mut self) -> Result<()> {
        begin_whole(&self.shim, SyncKind::Full)?;
        self.shim
            .clear_resync_required()
            .context("remove the resync-required marker")?;
        Ok(())
    }

    fn step(&mut self) -> Result<Step> {
        let shim = self.shim.clone();
        let _steps = shim.inner().sync.hold();
        if self.shim.quiesced().is_some() {
            // A planned failback: the final tag is the last record.
            return Ok(Step::Idle);
        }
        self.shim.maybe_exit_bitmap_mode();
        if self.shim.mode() == Mode::Bitmap {
            return Ok(self.pause("bitmap mode"));
        }
        let f = self.shim.inner().sync.snapshot();
        let Some(kind) = f.kind else {
            let (regions, bytes) = self.shim.dirty();
            if regions == 0 {
                return Ok(Step::Idle);
            }
            // The SyncBegin first (a crash after it and before the record
            // leaves a SyncBegin without a sync: the next one follows it).
            let Some(start) = self.shim.append_sync_begin(false).context("journal SyncBegin")? else {
                return Ok(self.pause("no room in the journal"));
            };
            self.shim.inner().sync.update(|f| {
                f.kind = Some(SyncKind::Resync);
                f.start_seq = start;
                f.total_bytes = bytes;
                f.marked = true;
            })?;
            self.cursor = 0;
            self.window_bytes = 0;
            self.last_log = Instant::now();
            info!(disk = %self.disk(), start_seq = start, "resync of {regions} dirty regions ({}) started", format_size(bytes));
            return Ok(Step::Worked);
        };
        if kind.whole_disk() && !f.marked {
            // Marks first, durably; then the SyncBegin (unless the journal
            // began with it: the initial sync of a new journal, seq 1);
            // then the record that both are there.
            self.shim
                .mark_all_for_sync()
                .context("mark every region for the sync")?;
            let start = match f.start_seq {
                0 => match self.shim.append_sync_begin(true).context("journal SyncBegin")? {
                    Some(s) => s,
                    None => return Ok(self.pause("no room in the journal")),
                },
                s => s,
            };
            self.shim.inner().sync.update(|f| {
                f.marked = true;
                f.start_seq = start;
            })?;
            self.shim.inner().hashes.reset();
            self.cursor = 0;
            self.window_bytes = 0;
            self.last_log = Instant::now();
            info!(disk = %self.disk(), kind = ?kind, start_seq = start, "whole-disk sync running");
            return Ok(Step::Worked);
        }
        let (held, cap) = self.shim.journal_fill();
        if held > cap / 2 {
            return Ok(self.pause("the journal is above half its cap"));
        }
        if self.paused_logged {
            self.paused_logged = false;
            info!(disk = %self.disk(), "sync resumed");
        }
        // A compared chunk is read and hashed, mostly not journaled: larger
        // steps cost less per byte.
        let compares = kind.whole_disk() && self.shim.inner().hashes.link() != Link::None;
        let max = if compares { COMPARE_CHUNK } else { CHUNK };
        let chunk = self
            .shim
            .next_dirty(self.cursor, max)
            .or_else(|| self.shim.next_dirty(0, max));
        let Some((mut off, mut len)) = chunk else {
            return self.finish(kind, f.start_seq);
        };
        // A whole-disk sync compares with the replica first (hash-compare).
        let mut expect = None;
        let mut window = None;
        if kind.whole_disk() {
            match self.compared(kind, off, len) {
                Some((a, l, w, e)) => {
                    (off, len, window, expect) = (a, l, Some(w), Some(e));
                }
                None => return Ok(self.pause("waiting for the replica's hashes")),
            }
        }
        let outcome = self
            .shim
            .sync_chunk(off, len, kind.whole_disk(), expect.as_deref(), &self.wait)
            .with_context(|| format!("sync {off}+{len}"))?;
        if let ChunkOutcome::Appended { .. } = &outcome {
            self.shim.inner().hashes.synced(off, len);
            if let Some(w) = window {
                if off + len >= (w + WINDOW).min(self.shim.inner().size) {
                    self.shim.inner().hashes.forget(w);
                }
            }
        }
        match outcome {
            ChunkOutcome::Appended { .. } => {
                fail::fail_point!("agent-sync-after-append");
                self.cursor = off + len;
                self.window_bytes += len;
            }
            ChunkOutcome::NoRoom => return Ok(self.pause("no room in the journal")),
            ChunkOutcome::Bitmap => return Ok(self.pause("bitmap mode")),
        }
        if self.last_persist.elapsed() >= PERSIST_EVERY {
            self.shim.persist_bitmap().context("persist the dirty bitmap")?;
            self.last_persist = Instant::now();
        }
        self.log_progress(kind, false);
        Ok(Step::Worked)
    }

    /// For a whole-disk sync: the range to sync now (`off..off+len` made
    /// whole chunks, inside one window), its window and the replica's hash
    /// of each of its chunks; `None` while the answer is awaited. The
    /// driver asks [`AHEAD`] windows ahead. Without an answer for long on
    /// a live connection (a target that cannot answer), or for an initial
    /// sync while no collector is reachable, the window is sent as data.
    fn compared(&mut self, kind: SyncKind, off: u64, len: u64) -> Option<Compared> {
        let inner = self.shim.inner();
        let size = inner.size;
        let book = &inner.hashes;
        let a = off - off % HASH_CHUNK;
        let w = a - a % WINDOW;
        let query = |w: u64| (size - w).min(WINDOW).div_ceil(HASH_CHUNK) * HASH_CHUNK;
        let b = (off + len)
            .div_ceil(HASH_CHUNK)
            .saturating_mul(HASH_CHUNK)
            .min(w + WINDOW)
            .min(size);
        for k in 1..=AHEAD {
            let next = w + k * WINDOW;
            if next < size {
                book.prefetch(next, query(next));
            }
        }
        let hashes = match book.get(w, query(w)) {
            Answer::Hashes(h) => h,
            Answer::Waiting(waited) => {
                inner.shippable.notify_one();
                let link = book.link();
                let give_up = match link {
                    Link::None => true,
                    Link::Up => waited >= GIVE_UP_CONNECTED,
                    Link::Down(down) => kind == SyncKind::Initial && down >= GIVE_UP_INITIAL,
                };
                if !give_up {
                    return None;
                }
                if link != Link::None {
                    warn!(
                        disk = %self.disk(),
                        window = w,
                        "no hashes from the target after {} s ({link:?}): sending this window's data",
                        waited.as_secs(),
                    );
                }
                book.give_up(w);
                Vec::new()
            }
        };
        let expect = book.expect(w, &hashes, a, b - a, size);
        Some((a, b - a, w, expect))
    }

    fn pause(&mut self, why: &str) -> Step {
        if !self.paused_logged {
            self.paused_logged = true;
            info!(disk = %self.disk(), "sync paused: {why}");
        }
        Step::Paused
    }

    fn log_progress(&mut self, kind: SyncKind, force: bool) {
        let el = self.last_log.elapsed();
        if !force && el < LOG_EVERY {
            return;
        }
        let rate = u64::try_from(u128::from(self.window_bytes) * 1000 / el.as_millis().max(1)).unwrap_or(u64::MAX);
        self.shim.inner().sync.set_rate(rate);
        self.window_bytes = 0;
        self.last_log = Instant::now();
        let (done, total) = self.shim.sync_done_total();
        let left = total - done;
        let eta = left
            .checked_div(rate)
            .map_or_else(|| "unknown".to_string(), |s| format!("{s}s"));
        info!(
            disk = %self.disk(),
            kind = ?kind,
            "sync progress: {} of {} ({:.1}%), {}/s, eta {eta}",
            format_size(done),
            format_size(total),
            if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
            format_size(rate),
        );
    }

    /// No region is dirty: append SyncDone and record the sync as done.
    fn finish(&mut self, kind: SyncKind, start: u64) -> Result<Step> {
        self.shim.persist_bitmap().context("persist the dirty bitmap")?;
        let Some(seq) = self
            .shim
            .append_sync_done(start, kind.whole_disk())
            .context("append SyncDone")?
        else {
            // A region was marked meanwhile, or bitmap mode: go on.
            return Ok(Step::Worked);
        };
        self.shim.inner().sync.update(|f| {
            if kind.whole_disk() {
                f.last_full_start = f.last_full_start.max(start);
            }
            // Another sync may have been recorded meanwhile: it goes on.
            if f.kind == Some(kind) && f.start_seq == start {
                f.kind = None;
                f.marked = false;
                f.total_bytes = 0;
            }
        })?;
        self.shim.inner().sync.set_rate(0);
        self.shim.inner().hashes.reset();
        info!(
            disk = %self.disk(),
            kind = ?kind,
            start_seq = start,
            sync_done_seq = seq,
            "sync complete"
        );
        Ok(Step::Worked)
    }
}
