//! The agent's counters and gauges (`tidemark_agent_<what>_<unit>{disk="…"}`),
//! for the control socket's `metrics` command, declared once in [`REGISTRY`]
//! and rendered by the shared renderer. The numbers come from [`Status`] and
//! the shim's counters.

use std::sync::atomic::Ordering;

use tidemark_util::metrics::Metric;

use crate::shim::{Mode, Shim};
use crate::status::Status;

tidemark_util::declare_metrics! {
    pub REGISTRY = "tidemark_agent" {
        WRITES: counter("writes_total", "Write requests completed.");
        WRITTEN_BYTES: counter("written_bytes_total", "Bytes written by clients.");
        READS: counter("reads_total", "Read requests completed.");
        READ_BYTES: counter("read_bytes_total", "Bytes read by clients.");
        FLUSHES: counter("flushes_total", "FLUSH requests.");
        TRIMS: counter("trims_total", "TRIM requests completed.");
        ZEROES: counter("zeroes_total", "WRITE_ZEROES requests completed.");
        BITMAP_WRITES: counter("bitmap_writes_total", "Changes tracked in the dirty bitmap instead of the journal.");
        IO_ERRORS: counter("io_errors_total", "Backing disk or sync errors returned to clients.");
        TRACKING_ERRORS: counter("tracking_errors_total", "Journal or bitmap errors that failed a request.");
        LAST_SEQ: gauge("last_seq", "Highest journaled seq.");
        JOURNAL_BYTES: gauge("journal_bytes", "Bytes of unconsumed journal.");
        JOURNAL_CAP: gauge("journal_cap_bytes", "Journal size cap.");
        BITMAP_DIRTY: gauge("bitmap_dirty_bytes", "Bytes in dirty bitmap regions.");
        BITMAP_MODE: gauge("bitmap_mode", "1 while in bitmap mode.");
        MODE_CHANGES: counter("mode_changes_total", "Changes between journal and bitmap mode.");
        SYNC_BYTES: counter("sync_bytes_total", "Disk bytes read and journaled by syncs.");
        FENCE_WAITS: counter("sync_fence_waits_total", "Client writes that waited for a sync chunk's fence.");
        FULL_RESYNCS: counter("full_resyncs_total", "Full resyncs of the disk.");
        BACKLOG: gauge("journal_backlog_bytes", "Journal bytes not acknowledged by the collector.");
        ACKED_SEQ: gauge("acked_seq", "Highest seq acknowledged by the collector.");
    }
}

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
