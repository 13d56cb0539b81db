//! The status of one protected disk, for the control socket's `status`
//! command (JSON) and for the metrics ([`crate::metrics`]): a snapshot read
//! from the shim, its counters and the shipper's link. It only reads; it
//! never changes the shim or waits on its I/O.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tidemark_formats::bitmap::DEFAULT_GRANULARITY;

use crate::shim::{Mode, Shim};
use crate::sync_state::SyncKind;

/// A snapshot of the agent's state, for the control socket.
#[derive(Debug, Serialize)]
pub struct Status {
    pub disk_id: String,
    pub disk_uuid: String,
    /// The data generation the disk holds (32 hex digits).
    pub generation: String,
    pub disk_path: String,
    pub disk_size_bytes: u64,
    pub mode: Mode,
    /// Quiesced for a planned failback: the final tag's seq (no write is
    /// taken).
    pub quiesced_at_seq: Option<u64>,
    /// A machine crash left writes that may be missing from the journal:
    /// the whole disk must be resynced.
    pub resync_required: bool,
    pub next_seq: u64,
    pub last_seq: u64,
    pub consumed_seq: u64,
    pub journal_bytes: u64,
    pub journal_cap_bytes: u64,
    pub journal_segments: usize,
    pub bitmap_dirty_regions: u64,
    pub bitmap_dirty_bytes: u64,
    pub bitmap_granularity_bytes: u64,
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
    pub mode_changes: u64,
    /// What the agent reports to the collector: streaming, initial-sync,
    /// resync, full-resync or bitmap.
    pub replication_mode: &'static str,
    /// The running sync, if any.
    pub sync: Option<SyncStatus>,
    pub full_resyncs: u64,
    /// Bytes whole-disk syncs compared with the replica's hashes, and of
    /// those, the bytes found equal (not sent).
    pub compare_bytes: u64,
    pub compare_equal_bytes: u64,
    /// Journal bytes the collector has not acknowledged.
    pub journal_backlog_bytes: u64,
    pub collector: Option<String>,
    /// How the collector is reached (`tls (agent NAME)` or plaintext).
    pub collector_security: Option<String>,
    pub collector_connected: bool,
    /// Why the collector refuses this disk's generation (a failover ended
    /// it); None while it is not fenced.
    pub fenced: Option<String>,
    pub acked_seq: u64,
    /// The target's applied seq as the collector last relayed it (0: not
    /// known yet).
    pub target_applied_seq: u64,
    /// Regions written that the target has not applied, kept after their
    /// records left the journal (`crate::unapplied`).
    pub unapplied: crate::unapplied::UnappliedStats,
    pub uptime_s: u64,
    /// How the disk is served: `nbd ADDR`, `ublk /dev/ublkbN` (both,
    /// comma-separated, when it is served both ways; None before it is).
    pub served_as: Option<String>,
}

/// Progress of a running sync.
#[derive(Debug, Serialize)]
pub struct SyncStatus {
    pub kind: SyncKind,
    pub start_seq: u64,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    pub rate_bps: u64,
    pub eta_s: Option<u64>,
    /// Waiting: the journal is above half its cap, or in bitmap mode.
    pub paused: bool,
}

impl Status {
    /// A snapshot of `shim`.
    pub fn of(shim: &Shim) -> Status {
        let inner = shim.inner();
        let s = &inner.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (sync_done, sync_total) = shim.sync_done_total();
        let sf = inner.sync.snapshot();
        let replication_mode = shim.agent_mode().name();
        let rate = inner.sync.rate_bps();
        let (jfill, jcap) = shim.journal_fill();
        let acked = inner.link.acked_seq.load(Ordering::Relaxed);
        // Before the journal lock: the bitmaps are scanned for the counts.
        let unapplied = inner.unapplied.lock().unwrap_or_else(|p| p.into_inner()).stats();
        let core = shim.core();
        let (regions, bytes, gran) = core
            .bitmap
            .as_ref()
            .map_or((0, 0, u64::from(DEFAULT_GRANULARITY)), |b| {
                (b.count(), b.dirty_bytes(), b.granularity())
            });
        Status {
            disk_id: inner.disk_id.to_string(),
            disk_uuid: inner.disk_uuid.clone(),
            generation: tidemark_formats::generation::GenerationId(inner.lineage.generation).hex(),
            disk_path: inner.disk_path.display().to_string(),
            disk_size_bytes: inner.size,
            mode: core.mode,
            resync_required: shim.resync_required(),
            quiesced_at_seq: core.quiesced,
            next_seq: core.journal.next_seq(),
            last_seq: core.journal.next_seq().saturating_sub(1),
            consumed_seq: core.journal.consumed_seq(),
            journal_bytes: core.journal.live_bytes(),
            journal_cap_bytes: core.journal.config().cap_bytes,
            journal_segments: core.journal.segments(),
            bitmap_dirty_regions: regions,
            bitmap_dirty_bytes: bytes,
            bitmap_granularity_bytes: gran,
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
            mode_changes: l(&s.mode_changes),
            replication_mode,
            sync: sf.kind.map(|kind| {
                let left = sync_total - sync_done;
                SyncStatus {
                    kind,
                    start_seq: sf.start_seq,
                    done_bytes: sync_done,
                    total_bytes: sync_total,
                    percent: if sync_total == 0 {
                        100.0
                    } else {
                        (sync_done as f64) * 100.0 / (sync_total as f64)
                    },
                    rate_bps: rate,
                    eta_s: left.checked_div(rate),
                    paused: core.mode == Mode::Bitmap || jfill > jcap / 2,
                }
            }),
            full_resyncs: sf.full_resyncs,
            compare_bytes: l(&s.compare_bytes),
            compare_equal_bytes: l(&s.compare_equal_bytes),
            journal_backlog_bytes: core.journal.bytes_after(acked.max(core.journal.consumed_seq())),
            collector: inner.link.collector.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            collector_security: inner.link.security.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            collector_connected: inner.link.connected.load(Ordering::Relaxed),
            fenced: inner.link.fenced.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            target_applied_seq: inner.link.applied_seq.load(Ordering::Relaxed),
            unapplied,
            acked_seq: acked,
            uptime_s: shim.uptime().as_secs(),
            served_as: shim.served_as(),
        }
    }
}
