//! The agent's counters and gauges in Prometheus text format
//! (`tidemark_agent_<what>_<unit>{disk="…"}`), for the control socket's
//! `metrics` command. Rendering only: the numbers come from [`Status`] and
//! the shim's counters.

use std::sync::atomic::Ordering;

use crate::shim::{Mode, Shim};
use crate::status::Status;

/// Every metric of `shim`'s disk, in Prometheus text format.
pub fn render(shim: &Shim) -> String {
    let st = Status::of(shim);
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
    put("journal_cap_bytes", "gauge", "Journal size cap.", st.journal_cap_bytes);
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
    put(
        "mode_changes_total",
        "counter",
        "Changes between journal and bitmap mode.",
        st.mode_changes,
    );
    put(
        "sync_bytes_total",
        "counter",
        "Disk bytes read and journaled by syncs.",
        shim.inner().stats.sync_bytes.load(Ordering::Relaxed),
    );
    put(
        "sync_fence_waits_total",
        "counter",
        "Client writes that waited for a sync chunk's fence.",
        shim.inner().stats.fence_waits.load(Ordering::Relaxed),
    );
    put(
        "full_resyncs_total",
        "counter",
        "Full resyncs of the disk.",
        st.full_resyncs,
    );
    put(
        "journal_backlog_bytes",
        "gauge",
        "Journal bytes not acknowledged by the collector.",
        st.journal_backlog_bytes,
    );
    put(
        "acked_seq",
        "gauge",
        "Highest seq acknowledged by the collector.",
        st.acked_seq,
    );
    out
}
