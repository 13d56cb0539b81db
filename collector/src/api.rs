//! The HTTP status API and Prometheus metrics (`docs/pipeline.md`, "Status
//! API"). Read-only except `refresh`, which asks an agent for a Progress.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::warn;

use crate::state::{NoAnswer, Shared};

/// How long `refresh` waits for the agent's answer before a 504.
const REFRESH_WAIT: Duration = Duration::from_secs(5);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/disks/:id", get(disk))
        .route("/api/v1/disks/:id/refresh", post(refresh))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.stop.clone();
    let app = router(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!("status API stopped: {e}");
    }
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": format!("no disk {id:?} at this collector") })),
    )
        .into_response()
}

async fn status(State(s): State<Arc<Shared>>) -> Json<Value> {
    let disks: Vec<Value> = s.all_disks().iter().map(|d| s.disk_status(d).json).collect();
    Json(json!({ "collector": s.collector_json(), "disks": disks }))
}

async fn disk(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.disk(&id) {
        Some(d) => Json(s.disk_status(&d).json).into_response(),
        None => not_found(&id),
    }
}

async fn refresh(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Some(d) = s.disk(&id) else {
        return not_found(&id);
    };
    let fresh = match crate::state::ask_agent(&s, &d, REFRESH_WAIT).await {
        Ok(p) => p,
        Err(why) => {
            let (code, msg) = match why {
                NoAnswer::NotConnected => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the agent of disk {id} is not connected"),
                ),
                NoAnswer::Left => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the agent of disk {id} disconnected before it answered the status request"),
                ),
                NoAnswer::TimedOut => (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the agent of disk {id} did not answer a status request within {} s ({}); its last reported seq may be stale",
                        REFRESH_WAIT.as_secs(),
                        if d.lock().agent.is_some() {
                            "still connected: it may be stalled or the connection congested"
                        } else {
                            "it is no longer connected"
                        }
                    ),
                ),
            };
            return (code, Json(json!({ "error": msg }))).into_response();
        }
    };
    let mut v = s.disk_status(&d).json;
    // A periodic report built before the request may have landed after the
    // answer; never report less than the answer.
    let seq = v["source_seq"].as_u64().unwrap_or(0).max(fresh.source_seq);
    v["source_seq"] = json!(seq);
    Json(v).into_response()
}

fn esc(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Prometheus text format.
pub(crate) fn metrics_text(s: &Shared) -> String {
    let mut o = String::new();
    let c = &s.counters;
    let mut one = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(o, "# HELP tidemark_collector_{name} {help}");
        let _ = writeln!(o, "# TYPE tidemark_collector_{name} {kind}");
        let _ = writeln!(o, "tidemark_collector_{name} {v}");
    };
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    one(
        "spool_bytes",
        "gauge",
        "Bytes in the spool.",
        s.spool_bytes.load(Ordering::Relaxed) as f64,
    );
    one(
        "spool_cap_bytes",
        "gauge",
        "Spool size at which agents are no longer read.",
        s.cfg.spool_cap as f64,
    );
    one(
        "spool_full",
        "gauge",
        "1 while the spool is at its cap.",
        f64::from(u8::from(s.is_spool_full())),
    );
    one(
        "spool_full_episodes_total",
        "counter",
        "Times the spool reached its cap.",
        ld(&c.spool_full_episodes),
    );
    one(
        "agents_connected",
        "gauge",
        "Agent connections.",
        ld(&s.agents_connected),
    );
    one(
        "uptime_seconds",
        "gauge",
        "Seconds since the collector started.",
        s.started.elapsed().as_secs_f64(),
    );
    one(
        "connections_refused_total",
        "counter",
        "Agent connections refused or closed for bad input.",
        ld(&c.refused),
    );
    one(
        "batches_spooled_total",
        "counter",
        "Batches made durable in the spool.",
        ld(&c.batches_spooled),
    );
    one(
        "records_spooled_total",
        "counter",
        "Records made durable in the spool.",
        ld(&c.records_spooled),
    );
    one(
        "spooled_bytes_total",
        "counter",
        "Bytes written to spool files.",
        ld(&c.bytes_spooled),
    );
    one(
        "duplicate_records_total",
        "counter",
        "Records received again and dropped (already held).",
        ld(&c.duplicates_dropped),
    );
    one(
        "batches_forwarded_total",
        "counter",
        "Packed batches sent to the target.",
        ld(&c.batches_forwarded),
    );

    let disks = s.all_disks();
    let per_disk: [(&str, &str, &str); 13] = [
        ("disk_acked_seq", "gauge", "Highest seq durable at the collector."),
        ("disk_applied_seq", "gauge", "Highest seq the target acknowledged."),
        ("disk_lag_seconds", "gauge", "Age of the oldest record not yet applied."),
        (
            "disk_lag_bytes",
            "gauge",
            "Payload bytes journaled or spooled but not yet applied.",
        ),
        ("disk_spool_bytes", "gauge", "Bytes of this disk in the spool."),
        ("disk_wire_bytes_total", "counter", "Bytes sent to the target."),
        (
            "disk_payload_bytes_total",
            "counter",
            "Payload bytes sent to the target.",
        ),
        (
            "disk_dedup_hits_total",
            "counter",
            "4 KiB blocks sent as window references.",
        ),
        ("disk_zero_blocks_total", "counter", "4 KiB blocks sent as zero items."),
        (
            "disk_corrupt_records_total",
            "counter",
            "Records found damaged in the spool.",
        ),
        (
            "disk_agent_connected",
            "gauge",
            "1 while the disk's agent is connected.",
        ),
        (
            "disk_target_connected",
            "gauge",
            "1 while the disk's target session is up.",
        ),
        (
            "disk_pending_full_sync",
            "gauge",
            "1 while a full sync is owed by the agent.",
        ),
    ];
    let rows: Vec<(String, [f64; 13])> = disks
        .iter()
        .map(|d| {
            let status = s.disk_status(d);
            let st = d.lock();
            (
                esc(&d.id),
                [
                    st.acked_seq as f64,
                    st.applied_seq as f64,
                    status.lag_seconds,
                    status.lag_bytes as f64,
                    st.spool_bytes as f64,
                    ld(&d.wire_bytes),
                    ld(&d.payload_bytes),
                    ld(&d.dedup_hits),
                    ld(&d.zero_blocks),
                    ld(&d.corrupt_records),
                    f64::from(u8::from(st.agent.is_some())),
                    f64::from(u8::from(st.target_connected)),
                    f64::from(u8::from(st.pending_full_sync)),
                ],
            )
        })
        .collect();
    for (i, (name, kind, help)) in per_disk.iter().enumerate() {
        let _ = writeln!(o, "# HELP tidemark_collector_{name} {help}");
        let _ = writeln!(o, "# TYPE tidemark_collector_{name} {kind}");
        for (id, vals) in &rows {
            let _ = writeln!(o, "tidemark_collector_{name}{{disk=\"{id}\"}} {}", vals[i]);
        }
    }
    o
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics_text(&s)).into_response()
}
