//! The HTTP status API and Prometheus metrics (`docs/pipeline.md`, "Status
//! API"). Read-only except `refresh`, which asks an agent for a Progress,
//! and `quiesce` (a planned failback: the agent stops taking writes), which
//! needs `Authorization: Bearer <the collector's token>`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
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
        .route("/api/v1/disks/:id/quiesce", post(quiesce))
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

/// How long `quiesce` waits for the agent's final tag.
const QUIESCE_WAIT: Duration = Duration::from_secs(30);

fn error(code: StatusCode, msg: String) -> Response {
    (code, Json(json!({ "error": msg }))).into_response()
}

/// `POST /api/v1/disks/{id}/quiesce` (a planned failback, docs/failback.md
/// section 6): the disk's agent refuses every write from now on, journals
/// a final tag and answers its seq: `{"disk_id","seq"}`. The caller then
/// drains the replica to that seq and fails over at it.
async fn quiesce(State(s): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_none_or(|b| b.as_bytes() != s.cfg.token.as_slice()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "quiesce needs Authorization: Bearer <the collector's token>".into(),
        );
    }
    let Some(d) = s.disk(&id) else {
        return not_found(&id);
    };
    match crate::state::ask_agent_to(&s, &d, QUIESCE_WAIT, |nonce| tidemark_wire::frame::Request::Quiesce {
        nonce,
    })
    .await
    {
        Ok(p) if p.source_seq > 0 => {
            tracing::warn!(disk = %id, seq = p.source_seq, "quiesced through the API: the agent takes no writes");
            Json(json!({ "disk_id": id, "seq": p.source_seq })).into_response()
        }
        Ok(_) => error(
            StatusCode::CONFLICT,
            format!("the agent of disk {id} could not quiesce (bitmap mode, or a sync running): see its log"),
        ),
        Err(NoAnswer::NotConnected | NoAnswer::Left) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent of disk {id} is not connected"),
        ),
        Err(NoAnswer::TimedOut) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the agent of disk {id} did not answer within {} s; it may have quiesced: see tidemark agent-status",
                QUIESCE_WAIT.as_secs()
            ),
        ),
    }
}

tidemark_util::declare_metrics! {
    pub(crate) REGISTRY = "tidemark_collector" {
        SPOOL_BYTES: gauge("spool_bytes", "Bytes in the spool.");
        SPOOL_CAP: gauge("spool_cap_bytes", "Spool size at which agents are no longer read.");
        SPOOL_FULL: gauge("spool_full", "1 while the spool is at its cap.");
        SPOOL_FULL_EPISODES: counter("spool_full_episodes_total", "Times the spool reached its cap.");
        AGENTS_CONNECTED: gauge("agents_connected", "Agent connections.");
        UPTIME: gauge("uptime_seconds", "Seconds since the collector started.");
        REFUSED: counter("connections_refused_total", "Agent connections refused or closed for bad input.");
        BATCHES_SPOOLED: counter("batches_spooled_total", "Batches made durable in the spool.");
        RECORDS_SPOOLED: counter("records_spooled_total", "Records made durable in the spool.");
        SPOOLED_BYTES: counter("spooled_bytes_total", "Bytes written to spool files.");
        DUPLICATES: counter("duplicate_records_total", "Records received again and dropped (already held).");
        BATCHES_FORWARDED: counter("batches_forwarded_total", "Packed batches sent to the target.");
        DISK_ACKED_SEQ: gauge("disk_acked_seq", "Highest seq durable at the collector.");
        DISK_APPLIED_SEQ: gauge("disk_applied_seq", "Highest seq the target acknowledged.");
        DISK_LAG_SECONDS: gauge("disk_lag_seconds", "Age of the oldest record not yet applied.");
        DISK_LAG_BYTES: gauge("disk_lag_bytes", "Payload bytes journaled or spooled but not yet applied.");
        DISK_SPOOL_BYTES: gauge("disk_spool_bytes", "Bytes of this disk in the spool.");
        DISK_WIRE_BYTES: counter("disk_wire_bytes_total", "Bytes sent to the target.");
        DISK_PAYLOAD_BYTES: counter("disk_payload_bytes_total", "Payload bytes sent to the target.");
        DISK_DEDUP_HITS: counter("disk_dedup_hits_total", "4 KiB blocks sent as window references.");
        DISK_ZERO_BLOCKS: counter("disk_zero_blocks_total", "4 KiB blocks sent as zero items.");
        DISK_CORRUPT: counter("disk_corrupt_records_total", "Records found damaged in the spool.");
        DISK_AGENT_CONNECTED: gauge("disk_agent_connected", "1 while the disk's agent is connected.");
        DISK_TARGET_CONNECTED: gauge("disk_target_connected", "1 while the disk's target session is up.");
        DISK_PENDING_FULL_SYNC: gauge("disk_pending_full_sync", "1 while a full sync is owed by the agent.");
    }
}

/// Prometheus text format.
pub(crate) fn metrics_text(s: &Shared) -> String {
    let c = &s.counters;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    REGISTRY.render(|m| {
        m.put(&SPOOL_BYTES, s.spool_bytes.load(Ordering::Relaxed));
        m.put(&SPOOL_CAP, s.cfg.spool_cap);
        m.put(&SPOOL_FULL, s.is_spool_full());
        m.put(&SPOOL_FULL_EPISODES, ld(&c.spool_full_episodes));
        m.put(&AGENTS_CONNECTED, ld(&s.agents_connected));
        m.put(&UPTIME, s.started.elapsed().as_secs_f64());
        m.put(&REFUSED, ld(&c.refused));
        m.put(&BATCHES_SPOOLED, ld(&c.batches_spooled));
        m.put(&RECORDS_SPOOLED, ld(&c.records_spooled));
        m.put(&SPOOLED_BYTES, ld(&c.bytes_spooled));
        m.put(&DUPLICATES, ld(&c.duplicates_dropped));
        m.put(&BATCHES_FORWARDED, ld(&c.batches_forwarded));
        for d in s.all_disks() {
            let status = s.disk_status(&d);
            let st = d.lock();
            let id = d.id.as_str();
            m.put_disk(&DISK_ACKED_SEQ, id, st.acked_seq);
            m.put_disk(&DISK_APPLIED_SEQ, id, st.applied_seq);
            m.put_disk(&DISK_LAG_SECONDS, id, status.lag_seconds);
            m.put_disk(&DISK_LAG_BYTES, id, status.lag_bytes);
            m.put_disk(&DISK_SPOOL_BYTES, id, st.spool_bytes);
            m.put_disk(&DISK_WIRE_BYTES, id, ld(&d.wire_bytes));
            m.put_disk(&DISK_PAYLOAD_BYTES, id, ld(&d.payload_bytes));
            m.put_disk(&DISK_DEDUP_HITS, id, ld(&d.dedup_hits));
            m.put_disk(&DISK_ZERO_BLOCKS, id, ld(&d.zero_blocks));
            m.put_disk(&DISK_CORRUPT, id, ld(&d.corrupt_records));
            m.put_disk(&DISK_AGENT_CONNECTED, id, st.agent.is_some());
            m.put_disk(&DISK_TARGET_CONNECTED, id, st.target_connected);
            m.put_disk(&DISK_PENDING_FULL_SYNC, id, st.pending_full_sync);
        }
    })
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics_text(&s)).into_response()
}
