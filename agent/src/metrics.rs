//! The agent's counters and gauges (`tidemark_agent_<what>_<unit>{disk="…"}`),
//! for the control socket's `metrics` command, declared once in [`REGISTRY`]
//! and rendered by the shared renderer. The numbers come from [`Status`] and
//! the shim's counters.

use std::sync::atomic::Ordering;

use tidemark_util::metrics::{Metric, Registry};

use crate::shim::{Mode, Shim};
use crate::status::Status;

const WRITES: Metric = Metric::counter("writes_total", "Write requests completed.");
const WRITTEN_BYTES: Metric = Metric::counter("written_bytes_total", "Bytes written by clients.");
const READS: Metric = Metric::counter("reads_total", "Read requests completed.");
const READ_BYTES: Metric = Metric::counter("read_bytes_total", "Bytes read by clients.");
const FLUSHES: Metric = Metric::counter("flushes_total", "FLUSH requests.");
const TRIMS: Metric = Metric::counter("trims_total", "TRIM requests completed.");
const ZEROES: Metric = Metric::counter("zeroes_total", "WRITE_ZEROES requests completed.");
const BITMAP_WRITES: Metric = Metric::counter(
    "bitmap_writes_total",
    "Changes tracked in the dirty bitmap instead of the journal.",
);
const IO_ERRORS: Metric = Metric::counter("io_errors_total", "Backing disk or sync errors returned to clients.");
const TRACKING_ERRORS: Metric = Metric::counter(
    "tracking_errors_total",
    "Journal or bitmap errors that failed a request.",
);
const LAST_SEQ: Metric = Metric::gauge("last_seq", "Highest journaled seq.");
const JOURNAL_BYTES: Metric = Metric::gauge("journal_bytes", "Bytes of unconsumed journal.");
const JOURNAL_CAP: Metric = Metric::gauge("journal_cap_bytes", "Journal size cap.");
const BITMAP_DIRTY: Metric = Metric::gauge("bitmap_dirty_bytes", "Bytes in dirty bitmap regions.");
const BITMAP_MODE: Metric = Metric::gauge("bitmap_mode", "1 while in bitmap mode.");
const MODE_CHANGES: Metric = Metric::counter("mode_changes_total", "Changes between journal and bitmap mode.");
const SYNC_BYTES: Metric = Metric::counter("sync_bytes_total", "Disk bytes read and journaled by syncs.");
const FENCE_WAITS: Metric = Metric::counter(
    "sync_fence_waits_total",
    "Client writes that waited for a sync chunk's fence.",
);
const FULL_RESYNCS: Metric = Metric::counter("full_resyncs_total", "Full resyncs of the disk.");
const BACKLOG: Metric = Metric::gauge(
    "journal_backlog_bytes",
    "Journal bytes not acknowledged by the collector.",
);
const ACKED_SEQ: Metric = Metric::gauge("acked_seq", "Highest seq acknowledged by the collector.");

/// Every metric the agent exports.
pub const REGISTRY: Registry = Registry::new(
    "tidemark_agent",
    &[
        WRITES,
        WRITTEN_BYTES,
        READS,
        READ_BYTES,
        FLUSHES,
        TRIMS,
        ZEROES,
        BITMAP_WRITES,
        IO_ERRORS,
        TRACKING_ERRORS,
        LAST_SEQ,
        JOURNAL_BYTES,
        JOURNAL_CAP,
        BITMAP_DIRTY,
        BITMAP_MODE,
        MODE_CHANGES,
        SYNC_BYTES,
        FENCE_WAITS,
        FULL_RESYNCS,
        BACKLOG,
        ACKED_SEQ,
    ],
);

/// Every metric of `shim`'s disk, in Prometheus text format.
pub fn render(shim: &Shim) -> String {
    let st = Status::of(shim);
    let stats = &shim.inner().stats;
    REGISTRY.render(|s| {
        let disk = st.disk_id.as_str();
        let mut put = |m: &Metric, v: u64| s.put_disk(m, disk, v);
        put(&WRITES, st.writes);
        put(&WRITTEN_BYTES, st.write_bytes);
        put(&READS, st.reads);
        put(&READ_BYTES, st.read_bytes);
        put(&FLUSHES, st.flushes);
        put(&TRIMS, st.trims);
        put(&ZEROES, st.zeroes);
        put(&BITMAP_WRITES, st.bitmap_writes);
        put(&IO_ERRORS, st.io_errors);
        put(&TRACKING_ERRORS, st.tracking_errors);
        put(&LAST_SEQ, st.last_seq);
        put(&JOURNAL_BYTES, st.journal_bytes);
        put(&JOURNAL_CAP, st.journal_cap_bytes);
        put(&BITMAP_DIRTY, st.bitmap_dirty_bytes);
        put(&BITMAP_MODE, u64::from(st.mode == Mode::Bitmap));
        put(&MODE_CHANGES, st.mode_changes);
        put(&SYNC_BYTES, stats.sync_bytes.load(Ordering::Relaxed));
        put(&FENCE_WAITS, stats.fence_waits.load(Ordering::Relaxed));
        put(&FULL_RESYNCS, st.full_resyncs);
        put(&BACKLOG, st.journal_backlog_bytes);
        put(&ACKED_SEQ, st.acked_seq);
    })
}
