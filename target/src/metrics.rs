//! The target's metrics (`tidemark_target_<what>_<unit>{disk="…"}`), declared
//! once in [`REGISTRY`] and rendered by the shared renderer, for the control
//! socket's `metrics` op and the optional `--metrics HOST:PORT` HTTP
//! endpoint (`GET /metrics`, `http.rs`).
//!
//! Levels come from the catalog (applied seq, points, undo bytes, halts,
//! failovers), read at scrape time; rates come from counters the sessions
//! keep per disk since the target started ([`DiskStats`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::catalog::DiskState;

tidemark_util::declare_metrics! {
    pub REGISTRY = "tidemark_target" {
        UPTIME: gauge("uptime_seconds", "Seconds since the target started.");
        CONNECTED_DISKS: gauge("connected_disks", "Disks with a live collector connection.");
        APPLIED_SEQ: gauge("disk_applied_seq", "Every seq up to this is durable in the replica.");
        POINTS: gauge("disk_points", "Recovery points offered (latest included).");
        UNDO_BYTES: gauge("disk_undo_bytes", "Bytes of undo segments kept for recovery points.");
        HALTS: gauge("disk_halts", "Halts recorded (gaps in the stream), covered or not.");
        HALTS_PENDING: gauge("disk_halts_pending", "Halts still waiting for their resync.");
        CONSISTENT: gauge("disk_consistent", "1 while the replica is crash-consistent.");
        FAILED_OVER: gauge("disk_failed_over", "1 once the disk was failed over.");
        CONNECTED: gauge("disk_connected", "1 while the disk's collector connection is up.");
        BATCHES: counter("disk_batches_applied_total", "Packed batches applied (since start).");
        RECORDS: counter("disk_records_applied_total", "Records in the batches applied (since start).");
        APPLY_SECONDS: counter("disk_apply_seconds_total", "Time spent applying batches; divided by batches, the mean apply latency.");
        APPLY_LAST: gauge("disk_apply_last_seconds", "How long the last batch took to apply.");
        APPLY_MAX: gauge("disk_apply_max_seconds", "The longest batch apply since start.");
        APPLY_ERRORS: counter("disk_apply_errors_total", "Batches whose apply failed (since start).");
    }
}

/// What the sessions count for one disk.
#[derive(Debug, Default)]
pub(crate) struct DiskStats {
    batches: AtomicU64,
    records: AtomicU64,
    apply_ns: AtomicU64,
    last_ns: AtomicU64,
    max_ns: AtomicU64,
    errors: AtomicU64,
}

impl DiskStats {
    /// One batch of `records` applied in `took` (or failed).
    pub fn applied(&self, records: u32, took: Duration, ok: bool) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        if ok {
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.records.fetch_add(u64::from(records), Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.apply_ns.fetch_add(ns, Ordering::Relaxed);
        self.last_ns.store(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

/// Per disk id, created on first use.
#[derive(Debug, Default)]
pub(crate) struct Stats(Mutex<HashMap<String, Arc<DiskStats>>>);

impl Stats {
    pub fn disk(&self, id: &str) -> Arc<DiskStats> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn get(&self, id: &str) -> Option<Arc<DiskStats>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }
}

/// What a scrape needs besides the catalog's disk states.
pub(crate) struct Live<'a> {
    pub uptime: Duration,
    /// Disks with a live collector connection.
    pub connected: HashSet<String>,
    /// Disks being failed over while the target runs (not yet in the catalog).
    pub failed_over: HashSet<String>,
    pub stats: &'a Stats,
}

/// One scrape, in Prometheus text format.
pub(crate) fn render(disks: &[DiskState], live: &Live<'_>) -> String {
    let secs = |ns: u64| ns as f64 / 1e9;
    REGISTRY.render(|s| {
        s.put(&UPTIME, live.uptime.as_secs_f64());
        s.put(
            &CONNECTED_DISKS,
            disks.iter().filter(|d| live.connected.contains(&d.disk_id)).count() as u64,
        );
        for d in disks {
            let id = d.disk_id.as_str();
            s.put_disk(&APPLIED_SEQ, id, d.applied_seq);
            s.put_disk(&POINTS, id, d.point_count);
            s.put_disk(&UNDO_BYTES, id, d.undo_bytes);
            s.put_disk(&HALTS, id, d.halts.len() as u64);
            s.put_disk(&HALTS_PENDING, id, d.halts.iter().filter(|h| !h.covered).count() as u64);
            s.put_disk(&CONSISTENT, id, d.state == "consistent");
            s.put_disk(
                &FAILED_OVER,
                id,
                !d.failovers.is_empty() || live.failed_over.contains(id),
            );
            s.put_disk(&CONNECTED, id, live.connected.contains(id));
            let st = live.stats.get(id).unwrap_or_default();
            let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.put_disk(&BATCHES, id, ld(&st.batches));
            s.put_disk(&RECORDS, id, ld(&st.records));
            s.put_disk(&APPLY_SECONDS, id, secs(ld(&st.apply_ns)));
            s.put_disk(&APPLY_LAST, id, secs(ld(&st.last_ns)));
            s.put_disk(&APPLY_MAX, id, secs(ld(&st.max_ns)));
            s.put_disk(&APPLY_ERRORS, id, ld(&st.errors));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_metric_is_exported_for_a_disk() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut cat = crate::catalog::Catalog::open(d.path()).unwrap();
            cat.bind(
                "m1",
                &[7; 16],
                false,
                &crate::retention::DiskPolicy::default(),
                crate::replica::ReplicaFormat::Raw,
            )
            .unwrap();
        }
        let disks = crate::catalog::disk_states(d.path()).unwrap();
        assert_eq!(disks.len(), 1);
        let stats = Stats::default();
        stats.disk("m1").applied(3, Duration::from_millis(20), true);
        let text = render(
            &disks,
            &Live {
                uptime: Duration::from_secs(1),
                connected: HashSet::from(["m1".to_string()]),
                failed_over: HashSet::new(),
                stats: &stats,
            },
        );
        assert_eq!(REGISTRY.missing(&text), Vec::<String>::new(), "{text}");
        assert!(
            text.contains("tidemark_target_disk_records_applied_total{disk=\"m1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_target_disk_apply_last_seconds{disk=\"m1\"} 0.02\n"),
            "{text}"
        );
        assert!(text.contains("tidemark_target_connected_disks 1\n"), "{text}");
    }
}
