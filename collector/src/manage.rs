//! The configuration server's endpoints (`docs/pipeline.md`, "Status
//! API"): a disk's recovery points (from the target), tags (through the
//! agent), drills, and policy. Reads are open like the rest of the API;
//! every change needs an operator's bearer token and is recorded in the
//! audit and event logs. Nothing is half applied: a policy whose retention
//! the target refuses is not stored, a tag the agent refuses is not
//! journaled.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tidemark_net::apitokens::ApiRole;
use tidemark_wire::call::{Call, Retention};

use crate::api::{error, known_params, not_found, require, ErrorBody};
use crate::calls::{self, utc, CallError, Policy};
use crate::state::Shared;

/// A recovery point, as the target holds it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct PointView {
    pub seq: u64,
    /// Source time (UTC, readable) and in Unix nanoseconds.
    #[serde(default)]
    pub time: String,
    pub time_ns: u64,
    /// crash, app, tag.
    pub kind: String,
    pub tag: Option<String>,
    /// The replica's applied state (not a recorded point).
    #[serde(default)]
    pub latest: bool,
    /// The newest drill of this point: passed, failed, skipped, error.
    pub verified: Option<String>,
}

/// A drill, as the target recorded it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct DrillView {
    pub id: u64,
    pub disk_id: String,
    /// The point checked (0: none could be opened).
    pub seq: u64,
    #[serde(default)]
    pub point_time: String,
    pub point_time_ns: u64,
    #[serde(default)]
    pub started: String,
    pub started_ns: u64,
    pub duration_ms: u64,
    /// passed, failed, skipped, error.
    pub result: String,
    pub summary: String,
    /// The checkers' output (at most 64 KiB, the end kept).
    pub output: String,
    /// schedule, api, console, cli.
    pub trigger: String,
}

impl DrillView {
    fn from_target(v: &Value) -> Option<DrillView> {
        let mut d: DrillView = serde_json::from_value(v.clone()).ok()?;
        d.point_time = utc(d.point_time_ns);
        d.started = utc(d.started_ns);
        Some(d)
    }
}

/// `GET /api/v1/disks/{id}/points`.
#[derive(Serialize, utoipa::ToSchema)]
struct PointList {
    disk_id: String,
    /// Oldest first (the newest `limit`).
    points: Vec<PointView>,
    last_verified: Option<calls::VerifiedView>,
}

/// `GET /api/v1/disks/{id}/drills`.
#[derive(Serialize, utoipa::ToSchema)]
struct DrillList {
    disk_id: String,
    /// Newest first.
    drills: Vec<DrillView>,
    last_verified: Option<calls::VerifiedView>,
}

/// `POST /api/v1/disks/{id}/tags`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TagRequest {
    /// 1 to 255 bytes of UTF-8, no control or invisible characters, unique
    /// on the disk.
    name: String,
    /// The point is application-consistent (only if the application was
    /// quiesced: the agent cannot check).
    #[serde(default)]
    app_consistent: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
struct TagTaken {
    disk_id: String,
    name: String,
    /// The tag's seq: its point appears once the target has applied it.
    seq: u64,
}

/// A drill still running when the call stopped waiting.
#[derive(Serialize, utoipa::ToSchema)]
struct DrillRunning {
    disk_id: String,
    /// running.
    status: String,
    message: String,
}

/// A disk's policy (`GET`, and `PUT`'s answer).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct PolicyView {
    disk_id: String,
    /// The RPO alert's threshold (critical at twice).
    rpo_s: u64,
    /// Drill the newest point this often; 0: no schedule.
    drill_interval_s: u64,
    /// Warn when the last verified point is older (null: no such alert).
    verified_max_age_s: Option<u64>,
    /// Points older than this expire (null: not known while the target
    /// is away and none was set here).
    retention_window_s: Option<u64>,
    /// Cap on the disk's undo data (null: none, or not known).
    retention_max_bytes: Option<u64>,
    /// prune, stop (null: not known).
    on_full: Option<String>,
    /// At most one crash-consistent point per this much source time.
    point_interval_ms: Option<u64>,
    /// Where the retention figures come from: target (asked now), stored
    /// (set here; the target is away), unknown.
    retention_source: String,
}

/// `PUT /api/v1/disks/{id}/policy`: the fields to change (the others
/// keep their value).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyUpdate {
    /// 10 s to 7 days.
    rpo_s: Option<u64>,
    /// 0 (no schedule), or 60 s to 90 days.
    drill_interval_s: Option<u64>,
    /// 60 s to 365 days.
    verified_max_age_s: Option<u64>,
    /// 60 s to 3650 days (retention cannot be turned off or on here).
    retention_window_s: Option<u64>,
    /// 0: no cap; else at least 64 MiB.
    retention_max_bytes: Option<u64>,
    /// prune or stop.
    on_full: Option<String>,
    /// 100 ms to 1 day.
    point_interval_ms: Option<u64>,
}

/// An action of a caller holding `role` or above: its answer, recorded
/// in the audit and event logs with what came of it (`act` gives both).
async fn audited<F>(
    s: &Arc<Shared>,
    headers: &HeaderMap,
    peer: SocketAddr,
    (role, action, id): (ApiRole, &str, &str),
    act: F,
) -> Response
where
    F: std::future::Future<Output = (String, Response)>,
{
    let who = match require(s, headers, peer, role, action, id) {
        Ok(c) => c.who,
        Err(r) => return *r,
    };
    let (audit, r) = act.await;
    crate::audit::record(s, &who, action, id, &audit);
    r
}

/// A 4xx/5xx for a call that got no answer.
fn call_failed(id: &str, what: &str, e: &CallError) -> Response {
    let status = match e {
        CallError::NotConnected(_) | CallError::Left(_) => StatusCode::SERVICE_UNAVAILABLE,
        CallError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
        CallError::Refused(_) => StatusCode::CONFLICT,
    };
    error(status, format!("{what} of disk {id}: {e}"))
}

/// A number query parameter within `lo..=hi` (default `def`).
fn num_param(q: &BTreeMap<String, String>, key: &str, def: u64, lo: u64, hi: u64) -> Result<u64, Box<Response>> {
    match q.get(key) {
        None => Ok(def),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(n),
            _ => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("{key}={v:?}: expected a whole number from {lo} to {hi}"),
            ))),
        },
    }
}

/// A JSON body, or a 400 that says what is wrong with it (naming the
/// field, where one is to blame).
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes, what: &str) -> Result<T, Box<Response>> {
    let bad = |m: String| Box::new(error(StatusCode::BAD_REQUEST, format!("the {what} is not valid: {m}")));
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    serde_json::from_value(v.clone()).map_err(|e| {
        // serde names unknown and missing fields, not a field of the
        // wrong type: find it by trying each field alone.
        let culprit = v.as_object().and_then(|o| {
            o.iter().find_map(|(k, x)| {
                let mut one = serde_json::Map::new();
                one.insert(k.clone(), x.clone());
                let e = serde_json::from_value::<T>(Value::Object(one)).err()?;
                (!e.to_string().starts_with("missing field")).then(|| format!("field {k}: {e}"))
            })
        });
        bad(culprit.unwrap_or_else(|| e.to_string()))
    })
}

#[utoipa::path(get, path = "/api/v1/disks/{id}/points",
    params(
        ("id" = String, Path, description = "The disk id"),
        ("limit" = Option<u64>, Query, description = "The newest this many (1 to 5000, default 1000)"),
    ),
    responses(
        (status = 200, description = "The disk's recovery points at the target, with their drill results", body = PointList),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "The target refused", body = ErrorBody),
        (status = 503, description = "The target is not connected", body = ErrorBody),
        (status = 504, description = "The target did not answer in time", body = ErrorBody),
    ))]
pub(crate) async fn points(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let limit = match known_params(&q, &["limit"]).and_then(|()| num_param(&q, "limit", 1000, 1, 5000)) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let Some(d) = s.disk(&id) else {
        return not_found(&id);
    };
    let call = Call::Points {
        limit: u32::try_from(limit).unwrap_or(5000),
    };
    match calls::call_target(&s, &d, &call, calls::CALL_WAIT).await {
        Ok(v) => {
            let mut points: Vec<PointView> = Vec::new();
            for p in v["points"].as_array().into_iter().flatten() {
                match serde_json::from_value::<PointView>(p.clone()) {
                    Ok(mut p) => {
                        p.time = utc(p.time_ns);
                        points.push(p);
                    }
                    Err(e) => {
                        return error(
                            StatusCode::BAD_GATEWAY,
                            format!("the target's points of disk {id} are not as expected: {e}"),
                        )
                    }
                }
            }
            Json(PointList {
                disk_id: id.clone(),
                points,
                last_verified: s.book.views(&id).0,
            })
            .into_response()
        }
        Err(e) => call_failed(&id, "the points", &e),
    }
}

#[utoipa::path(post, path = "/api/v1/disks/{id}/tags",
    params(("id" = String, Path, description = "The disk id")),
    request_body = TagRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Journaled and durable at the agent", body = TagTaken),
        (status = 400, description = "A bad body or tag name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "The agent refused (a name already used)", body = ErrorBody),
        (status = 503, description = "The agent is not connected", body = ErrorBody),
        (status = 504, description = "The agent did not answer in time", body = ErrorBody),
    ))]
pub(crate) async fn tag(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    audited(
        &s,
        &headers,
        peer,
        (ApiRole::Operator, "tag", &id),
        tag_as(&s, &id, &bytes),
    )
    .await
}

async fn tag_as(s: &Arc<Shared>, id: &str, bytes: &Bytes) -> (String, Response) {
    let req: TagRequest = match body(bytes, "tag request") {
        Ok(r) => r,
        Err(r) => return ("refused: 400".into(), *r),
    };
    // The tools' rule (a name --at can reach); the agent checks again.
    if let Some(why) = tidemark_recovery::tag_name_problem(&req.name) {
        return ("refused: 400".into(), error(StatusCode::BAD_REQUEST, why));
    }
    let Some(d) = s.disk(id) else {
        return ("refused: no such disk".into(), not_found(id));
    };
    let call = Call::Tag {
        name: req.name.clone(),
        app_consistent: req.app_consistent,
    };
    match calls::call_agent(s, &d, &call, calls::CALL_WAIT).await {
        Ok(v) => {
            let seq = v["seq"].as_u64().unwrap_or(0);
            (
                format!("tag {:?} at seq {seq}", req.name),
                (
                    StatusCode::CREATED,
                    Json(TagTaken {
                        disk_id: id.to_string(),
                        name: req.name,
                        seq,
                    }),
                )
                    .into_response(),
            )
        }
        Err(e) => (format!("refused: {e}"), call_failed(id, "a tag", &e)),
    }
}

#[utoipa::path(post, path = "/api/v1/disks/{id}/drills",
    params(
        ("id" = String, Path, description = "The disk id"),
        ("wait" = Option<u64>, Query, description = "Seconds to wait for the result (0 to 600, default 120); past it, 202 and the drill goes on"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The drill, finished (whatever its result)", body = DrillView),
        (status = 202, description = "Still running; GET .../drills shows it when done", body = DrillRunning),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "A drill is already running, or the target refused", body = ErrorBody),
        (status = 503, description = "The target is not connected", body = ErrorBody),
    ))]
pub(crate) async fn drill(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    audited(
        &s,
        &headers,
        peer,
        (ApiRole::Operator, "drill", &id),
        drill_as(&s, &id, &q),
    )
    .await
}

async fn drill_as(s: &Arc<Shared>, id: &str, q: &BTreeMap<String, String>) -> (String, Response) {
    let wait = match known_params(q, &["wait"]).and_then(|()| num_param(q, "wait", 120, 0, 600)) {
        Ok(w) => Duration::from_secs(w),
        Err(r) => return ("refused: 400".into(), *r),
    };
    let Some(d) = s.disk(id) else {
        return ("refused: no such disk".into(), not_found(id));
    };
    let r = match calls::drill(s, &d, "api", wait).await {
        Ok(v) => match DrillView::from_target(&v) {
            Some(dv) => return (format!("drill {} {}", dv.id, dv.result), Json(dv).into_response()),
            None => error(
                StatusCode::BAD_GATEWAY,
                format!("the target's drill of disk {id} is not as expected: {v}"),
            ),
        },
        Err(CallError::TimedOut(_)) => {
            return (
                "started, still running".into(),
                (
                    StatusCode::ACCEPTED,
                    Json(DrillRunning {
                        disk_id: id.to_string(),
                        status: "running".into(),
                        message: format!(
                            "the drill is still running after {} s; GET /api/v1/disks/{id}/drills shows it when done",
                            wait.as_secs()
                        ),
                    }),
                )
                    .into_response(),
            )
        }
        Err(e) => call_failed(id, "a drill", &e),
    };
    (format!("refused: {}", r.status()), r)
}

#[utoipa::path(get, path = "/api/v1/disks/{id}/drills",
    params(
        ("id" = String, Path, description = "The disk id"),
        ("limit" = Option<u64>, Query, description = "The newest this many (1 to 50, default 20)"),
    ),
    responses(
        (status = 200, description = "The disk's drills, newest first", body = DrillList),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 503, description = "The target is not connected", body = ErrorBody),
        (status = 504, description = "The target did not answer in time", body = ErrorBody),
    ))]
pub(crate) async fn drills(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let limit = match known_params(&q, &["limit"]).and_then(|()| num_param(&q, "limit", 20, 1, 50)) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let Some(d) = s.disk(&id) else {
        return not_found(&id);
    };
    let call = Call::Drills {
        limit: u32::try_from(limit).unwrap_or(50),
    };
    match calls::call_target(&s, &d, &call, calls::CALL_WAIT).await {
        Ok(v) => {
            let drills = v["drills"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(DrillView::from_target)
                .collect();
            Json(DrillList {
                disk_id: id.clone(),
                drills,
                last_verified: s.book.views(&id).0,
            })
            .into_response()
        }
        Err(e) => call_failed(&id, "the drills", &e),
    }
}

/// The policy as the API shows it: the retention asked of the target if
/// it is connected, else the one stored here.
async fn policy_view(s: &Shared, d: &crate::state::Disk) -> PolicyView {
    let id = d.id.to_string();
    let p = s.book.policy(&id);
    let (retention, source) = match current_retention(s, d).await {
        Some(r) => (Some(r), "target"),
        None => match &p.retention {
            Some(r) => (Some(r.clone()), "stored"),
            None => (None, "unknown"),
        },
    };
    PolicyView {
        disk_id: id,
        rpo_s: p.rpo_s.unwrap_or(s.cfg.alert_rpo.as_secs()),
        drill_interval_s: p.drill_interval_s,
        verified_max_age_s: p.verified_max_age().map(|d| d.as_secs()),
        retention_window_s: retention.as_ref().map(|r| r.window_s),
        retention_max_bytes: retention.as_ref().and_then(|r| r.max_bytes),
        on_full: retention.as_ref().map(|r| r.on_full.clone()),
        point_interval_ms: retention.as_ref().map(|r| r.point_interval_ms),
        retention_source: source.into(),
    }
}

/// The retention the target applies now (None: it is not connected).
async fn current_retention(s: &Shared, d: &crate::state::Disk) -> Option<Retention> {
    let v = calls::call_target(s, d, &Call::GetRetention, calls::CALL_WAIT)
        .await
        .ok()?;
    serde_json::from_value(v["retention"].clone()).ok()
}

#[utoipa::path(get, path = "/api/v1/disks/{id}/policy",
    params(("id" = String, Path, description = "The disk id")),
    responses(
        (status = 200, description = "The disk's policy", body = PolicyView),
        (status = 404, description = "No such disk", body = ErrorBody),
    ))]
pub(crate) async fn get_policy(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Some(d) = s.disk(&id) else {
        return not_found(&id);
    };
    Json(policy_view(&s, &d).await).into_response()
}

/// Check `u` against its ranges; the first problem, naming the field.
fn check_update(u: &PolicyUpdate) -> Result<(), String> {
    const DAY: u64 = 86_400;
    let range = |name: &str, v: Option<u64>, lo: u64, hi: u64, zero_ok: bool| -> Result<(), String> {
        match v {
            Some(v) if !((lo..=hi).contains(&v) || zero_ok && v == 0) => Err(format!(
                "{name} {v} is out of range: {}{lo} to {hi}",
                if zero_ok { "0, or " } else { "" }
            )),
            _ => Ok(()),
        }
    };
    range("rpo_s", u.rpo_s, 10, 7 * DAY, false)?;
    range("drill_interval_s", u.drill_interval_s, 60, 90 * DAY, true)?;
    range("verified_max_age_s", u.verified_max_age_s, 60, 365 * DAY, false)?;
    range("retention_window_s", u.retention_window_s, 60, 3650 * DAY, false)?;
    range(
        "retention_max_bytes",
        u.retention_max_bytes,
        64 << 20,
        u64::MAX / 2,
        true,
    )?;
    range("point_interval_ms", u.point_interval_ms, 100, DAY * 1000, false)?;
    match u.on_full.as_deref() {
        None | Some("prune" | "stop") => Ok(()),
        Some(o) => Err(format!("on_full {o:?}: expected prune or stop")),
    }
}

#[utoipa::path(put, path = "/api/v1/disks/{id}/policy",
    params(("id" = String, Path, description = "The disk id")),
    request_body = PolicyUpdate,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed: the policy now in force", body = PolicyView),
        (status = 400, description = "A bad body, an unknown field or a value out of range", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "The target refused the retention (nothing changed)", body = ErrorBody),
        (status = 503, description = "A retention change needs the target connected (nothing changed)", body = ErrorBody),
    ))]
pub(crate) async fn put_policy(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    audited(
        &s,
        &headers,
        peer,
        (ApiRole::Operator, "policy", &id),
        put_policy_as(&s, &id, &bytes),
    )
    .await
}

async fn put_policy_as(s: &Arc<Shared>, id: &str, bytes: &Bytes) -> (String, Response) {
    let u: PolicyUpdate = match body(bytes, "policy") {
        Ok(u) => u,
        Err(r) => return ("refused: 400".into(), *r),
    };
    if let Err(why) = check_update(&u) {
        return ("refused: 400".into(), error(StatusCode::BAD_REQUEST, why));
    }
    let Some(d) = s.disk(id) else {
        return ("refused: no such disk".into(), not_found(id));
    };
    let mut p: Policy = s.book.policy(id);
    let mut changed = Vec::new();
    if let Some(v) = u.rpo_s {
        p.rpo_s = Some(v);
        changed.push(format!("rpo_s={v}"));
    }
    if let Some(v) = u.drill_interval_s {
        p.drill_interval_s = v;
        changed.push(format!("drill_interval_s={v}"));
    }
    if let Some(v) = u.verified_max_age_s {
        p.verified_max_age_s = Some(v);
        changed.push(format!("verified_max_age_s={v}"));
    }
    let touches_retention = u.retention_window_s.is_some()
        || u.retention_max_bytes.is_some()
        || u.on_full.is_some()
        || u.point_interval_ms.is_some();
    if touches_retention {
        // The target's retention now, changed where asked: the target
        // takes it or refuses it, before anything is stored.
        let Some(mut r) = current_retention(s, &d).await else {
            return (
                "refused: the target is not connected".into(),
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("a retention change of disk {id} needs its target connected; nothing was changed"),
                ),
            );
        };
        if let Some(v) = u.retention_window_s {
            r.window_s = v;
            changed.push(format!("retention_window_s={v}"));
        }
        if let Some(v) = u.retention_max_bytes {
            r.max_bytes = (v != 0).then_some(v);
            changed.push(format!("retention_max_bytes={v}"));
        }
        if let Some(v) = &u.on_full {
            r.on_full = v.clone();
            changed.push(format!("on_full={v}"));
        }
        if let Some(v) = u.point_interval_ms {
            r.point_interval_ms = v;
            changed.push(format!("point_interval_ms={v}"));
        }
        match calls::call_target(s, &d, &Call::SetRetention(r), calls::CALL_WAIT).await {
            Ok(v) => p.retention = serde_json::from_value(v["retention"].clone()).ok(),
            Err(e) => {
                return (
                    format!("refused: {e}"),
                    call_failed(id, "the retention (nothing was changed)", &e),
                )
            }
        }
    }
    if let Err(e) = calls::store(s, id, &p) {
        return (
            format!("failed: {e:#}"),
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot store the policy of disk {id}: {e:#}"),
            ),
        );
    }
    let audit = if changed.is_empty() {
        "unchanged".to_string()
    } else {
        format!("changed {}", changed.join(", "))
    };
    (audit, Json(policy_view(s, &d).await).into_response())
}

/// `POST /api/v1/disks/{id}/failover`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct FailoverRequest {
    /// The point, as `tidemark failover --at` takes it: latest (after a
    /// drain of what the collector and the agent hold), latest-app, seq:N,
    /// tag:NAME, a time.
    at: String,
    /// The image's file name in the disk's failovers folder on the
    /// target's host (`DATA/DISK/failovers/NAME`).
    name: String,
    /// raw (default), vmdk-flat, vmdk-sparse, vmdk-stream.
    #[serde(default = "raw")]
    format: String,
}

fn raw() -> String {
    "raw".into()
}

/// A failover under way.
#[derive(Serialize, utoipa::ToSchema)]
struct FailoverStarted {
    disk_id: String,
    /// started.
    status: String,
    /// The image being written, and the tool's log, on the target's host.
    output: String,
    log: String,
}

#[utoipa::path(post, path = "/api/v1/disks/{id}/failover",
    params(("id" = String, Path, description = "The disk id")),
    request_body = FailoverRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Started: the target writes the image and records the failover; replication to the disk then stops", body = FailoverStarted),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "The target refused (a bad name or point, already failed over)", body = ErrorBody),
        (status = 503, description = "The target is not connected", body = ErrorBody),
    ))]
pub(crate) async fn failover(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    audited(
        &s,
        &headers,
        peer,
        (ApiRole::Admin, "failover", &id),
        failover_as(&s, &id, &bytes),
    )
    .await
}

async fn failover_as(s: &Arc<Shared>, id: &str, bytes: &Bytes) -> (String, Response) {
    let req: FailoverRequest = match body(bytes, "failover request") {
        Ok(r) => r,
        Err(r) => return ("refused: 400".into(), *r),
    };
    let Some(d) = s.disk(id) else {
        return ("refused: no such disk".into(), not_found(id));
    };
    let call = Call::Failover {
        at: req.at.clone(),
        name: req.name.clone(),
        format: req.format.clone(),
    };
    match calls::call_target(s, &d, &call, calls::CALL_WAIT).await {
        Ok(v) => {
            let output = v["output"].as_str().unwrap_or("").to_string();
            tracing::warn!(disk = %id, at = %req.at, output, "failover started through the API");
            (
                format!("started at {} to {output}", req.at),
                (
                    StatusCode::ACCEPTED,
                    Json(FailoverStarted {
                        disk_id: id.to_string(),
                        status: "started".into(),
                        output,
                        log: v["log"].as_str().unwrap_or("").to_string(),
                    }),
                )
                    .into_response(),
            )
        }
        Err(e) => (format!("refused: {e}"), call_failed(id, "a failover", &e)),
    }
}

/// One protected server (agent identity) and its disks.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AgentView {
    /// The agent identity its disks are bound to (`agent NAME`, from its
    /// certificate); null: disks registered over plaintext.
    agent: Option<String>,
    /// Its disks, by id.
    disks: Vec<String>,
    /// Of those, the ones whose agent is connected now.
    connected: Vec<String>,
}

/// `GET /api/v1/agents`.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AgentList {
    agents: Vec<AgentView>,
}

#[utoipa::path(get, path = "/api/v1/agents",
    responses((status = 200, description = "Every agent identity with its disks (a server protects one disk per agent process; one identity may hold several)", body = AgentList)))]
pub(crate) async fn agents(State(s): State<Arc<Shared>>) -> Json<AgentList> {
    let mut by: BTreeMap<Option<String>, AgentView> = BTreeMap::new();
    for d in s.all_disks() {
        let (owner, connected) = {
            let st = d.lock();
            (st.owner.clone(), st.agent.is_some())
        };
        let a = by.entry(owner.clone()).or_insert_with(|| AgentView {
            agent: owner,
            disks: Vec::new(),
            connected: Vec::new(),
        });
        a.disks.push(d.id.to_string());
        if connected {
            a.connected.push(d.id.to_string());
        }
    }
    Json(AgentList {
        agents: by.into_values().collect(),
    })
}
