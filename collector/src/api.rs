//! The status API (HTTPS with the collector's identity when it runs with
//! TLS) and Prometheus metrics (`docs/pipeline.md`, "Status
//! API"). Read-only except `refresh`, which asks an agent for a Progress,
//! `quiesce` (a planned failback: the agent stops taking writes) and
//! `rebind` (an operator's leave for a disk's next Hello to rebind it),
//! which need `Authorization: Bearer <token>` with a token of the operator
//! (quiesce) or admin (rebind) role (`--api-tokens`; the collector's own
//! token is an admin's) and are recorded in the audit log. Disk UUIDs are
//! shown to authenticated callers only (`docs/security.md`, "The API").

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::warn;

use tidemark_net::apitokens::{constant_time_eq, ApiRole};

use crate::state::{NoAnswer, Shared};

/// How long `refresh` waits for the agent's answer before a 504.
const REFRESH_WAIT: Duration = Duration::from_secs(5);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/disks", get(disks))
        .route("/api/v1/agents", get(crate::manage::agents))
        .route("/api/v1/disks/:id", get(disk))
        .route("/api/v1/events", get(events))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/disks/:id/history", get(history))
        .route("/api/v1/disks/:id/refresh", post(refresh))
        .route("/api/v1/disks/:id/quiesce", post(quiesce))
        .route("/api/v1/disks/:id/rebind", post(rebind))
        .route("/api/v1/disks/:id/points", get(crate::manage::points))
        .route("/api/v1/disks/:id/tags", post(crate::manage::tag))
        .route("/api/v1/disks/:id/failover", post(crate::manage::failover))
        .route(
            "/api/v1/disks/:id/drills",
            get(crate::manage::drills).post(crate::manage::drill),
        )
        .route(
            "/api/v1/disks/:id/policy",
            get(crate::manage::get_policy).put(crate::manage::put_policy),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .route("/", get(console_page))
        .route("/console.js", get(console_js))
        .route("/console.css", get(console_css))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// The OpenAPI 3.1 document of this API, generated from the handlers and
/// the types they answer with (`GET /api/v1/openapi.json`).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Tidemark collector API",
        description = "Status, events and operator actions of a Tidemark deployment (docs/pipeline.md, \"Status API\"). Every error is {\"error\":{\"code\",\"message\"}}."
    ),
    paths(
        status, disks, disk, history, events, alerts, refresh, quiesce, rebind, openapi, metrics,
        crate::manage::points, crate::manage::tag, crate::manage::drill, crate::manage::drills,
        crate::manage::get_policy, crate::manage::put_policy, crate::manage::failover, crate::manage::agents
    ),
    modifiers(&BearerAuth)
)]
pub(crate) struct ApiDoc;

/// The bearer scheme of the actions (`Authorization: Bearer <token>`).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// `GET /api/v1/status`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct StatusBody {
    collector: crate::state::CollectorView,
    disks: Vec<crate::state::DiskView>,
}

/// `GET /api/v1/disks`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct DiskList {
    disks: Vec<crate::state::DiskView>,
}

/// One event of the log.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct EventView {
    /// Only grows: give the last one seen as `after` to follow the log.
    id: i64,
    /// UTC, readable.
    time: String,
    /// Unix nanoseconds.
    time_ns: i64,
    disk_id: Option<String>,
    /// agent, target, sync, resync, operator.
    kind: String,
    severity: crate::catalog::Severity,
    message: String,
    /// Who acted (operator events).
    who: Option<String>,
}

/// `GET /api/v1/events`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct EventList {
    events: Vec<EventView>,
}

/// Every error.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct ErrorDetail {
    /// bad_request, unauthorized, forbidden, not_found, conflict,
    /// unavailable, timeout, bad_gateway, internal.
    code: String,
    /// What was wrong, for people.
    message: String,
}

/// `POST /api/v1/disks/{id}/quiesce`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct QuiesceBody {
    disk_id: String,
    /// The final tag's seq: drain the replica to it, then fail over at it.
    seq: u64,
}

/// `POST /api/v1/disks/{id}/rebind`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct RebindBody {
    disk_id: String,
    valid_for_s: u64,
    owner: Option<String>,
}

/// `GET /api/v1/alerts`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct AlertList {
    alerts: Vec<crate::alerts::Alert>,
}

/// `GET /api/v1/alerts`: the active alerts (`docs/operations.md`,
/// "Alerts"); each raised and cleared is also in the event log.
#[utoipa::path(get, path = "/api/v1/alerts",
    responses((status = 200, description = "The active alerts", body = AlertList)))]
async fn alerts(State(s): State<Arc<Shared>>) -> Json<AlertList> {
    Json(AlertList {
        alerts: s.alerts.list(),
    })
}

/// `GET /api/v1/disks/{id}/history`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct HistoryBody {
    disk_id: String,
    /// 1s (the last hour) or 1m (the last 7 days).
    resolution: String,
    /// Oldest first.
    samples: Vec<crate::history::Sample>,
}

/// `GET /api/v1/disks/{id}/history[?resolution=1s|1m]`: the disk's lag
/// and write rate over time, for charts (`crate::history`).
#[utoipa::path(get, path = "/api/v1/disks/{id}/history",
    params(
        ("id" = String, Path, description = "The disk id"),
        ("resolution" = Option<String>, Query, description = "1s: a sample a second, the last hour (default); 1m: a sample a minute, the last 7 days"),
    ),
    responses(
        (status = 200, description = "The samples, oldest first", body = HistoryBody),
        (status = 400, description = "An unknown parameter or resolution", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
    ))]
async fn history(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = known_params(&q, &["resolution"]) {
        return *r;
    }
    let minutes = match q.get("resolution").map(String::as_str) {
        None | Some("1s") => false,
        Some("1m") => true,
        Some(r) => return error(StatusCode::BAD_REQUEST, format!("resolution={r:?}: give 1s or 1m")),
    };
    if s.disk(&id).is_none() {
        return not_found(&id);
    }
    let samples = s
        .history
        .with(&s, &id, |h| if minutes { h.minutes() } else { h.seconds() });
    Json(HistoryBody {
        disk_id: id,
        resolution: if minutes { "1m" } else { "1s" }.to_string(),
        samples,
    })
    .into_response()
}

/// `GET /api/v1/openapi.json`: this API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// The web console (`docs/operations.md`, "The web console"): static
/// files in the binary, no external resource, the data from this API.
const CONSOLE_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// A console asset with the headers that keep it to itself: scripts and
/// styles from this origin only, no framing, no type sniffing.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn console_page() -> Response {
    asset("text/html; charset=utf-8", CONSOLE_HTML)
}

async fn console_js() -> Response {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

async fn console_css() -> Response {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

/// Most API connections at once; more are closed at accept.
const MAX_API_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an API connection stays open (the slowest call, quiesce, waits
/// 30 s for the agent).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// Serve the API until the collector stops: HTTP/1.1, the headers of each
/// request within [`HEADER_TIMEOUT`], each connection closed after
/// [`CONNECTION_TIMEOUT`], at most [`MAX_API_CONNECTIONS`] at once.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.stop.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_API_CONNECTIONS));
    let app = router(shared.clone());
    let tls = match &shared.cfg.security {
        tidemark_net::Security::Tls(t) if !shared.cfg.api_plaintext => Some(t.clone()),
        _ => None,
    };
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("status API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.refused_log.warn(format_args!(
                "status API: closed a connection from {peer}: {MAX_API_CONNECTIONS} are open"
            ));
            continue;
        };
        let (app, stop, tls, log) = (app.clone(), stop.clone(), tls.clone(), shared.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                async move { tower_service::Service::call(&mut app, req).await }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let served = async {
                match tls {
                    None => {
                        let _ = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await;
                    }
                    Some(tls) => {
                        let Some(s) = https_handshake(&tls, tcp, peer, &log).await else {
                            return;
                        };
                        let _ = http.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, served) => {}
            }
            drop(slot);
        });
    }
}

/// The server side of an API connection's TLS handshake (within
/// [`HEADER_TIMEOUT`]); a failure is logged within the refusal log's rate
/// (a port probe, at debug).
async fn https_handshake(
    tls: &tidemark_net::tls::Tls,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    s: &Shared,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let config = match tls.https_server_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("status API: {e}");
            return None;
        }
    };
    match tokio::time::timeout(HEADER_TIMEOUT, tokio_rustls::TlsAcceptor::from(config).accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!("status API: {peer} closed before the TLS handshake");
            None
        }
        Ok(Err(e)) => {
            s.refused_log.warn(format_args!(
                "status API: TLS handshake with {peer}: {e} (the API serves HTTPS; plain HTTP needs \
                 --api-insecure-plaintext)"
            ));
            None
        }
        Err(_) => {
            s.refused_log.warn(format_args!(
                "status API: no TLS handshake from {peer} within {} s",
                HEADER_TIMEOUT.as_secs()
            ));
            None
        }
    }
}

pub(crate) fn not_found(id: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no disk {id:?} at this collector"))
}

/// An authenticated caller: who (for the audit log) and what it may do.
pub(crate) struct Caller {
    pub(crate) who: String,
    pub(crate) role: ApiRole,
}

/// The caller, if it sent a bearer token the collector knows: the
/// collector's own token (`--token-file`: admin) or one of `--api-tokens`.
fn caller(s: &Shared, headers: &HeaderMap, peer: SocketAddr) -> Option<Caller> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    if constant_time_eq(bearer.as_bytes(), s.cfg.token.as_slice()) {
        return Some(Caller {
            who: format!("collector token holder from {peer}"),
            role: ApiRole::Admin,
        });
    }
    let (name, role) = s.cfg.api_tokens.as_ref()?.check(bearer.as_bytes())?;
    Some(Caller {
        who: format!("{name} ({role}) from {peer}"),
        role,
    })
}

/// The caller of `what`, which needs `role`: 401 without a known bearer
/// token, 403 with a token of a lesser role (recorded in the audit log
/// under `action`).
pub(crate) fn require(
    s: &Shared,
    headers: &HeaderMap,
    peer: SocketAddr,
    role: ApiRole,
    action: &str,
    subject: &str,
) -> Result<Caller, Box<Response>> {
    let Some(c) = caller(s, headers, peer) else {
        // Not audited (anyone can send these; they change nothing), logged
        // within the refusal log's rate.
        s.refused_log.warn(format_args!(
            "API: refused {action} {subject} from {peer}: no valid bearer token"
        ));
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            format!("{action} needs Authorization: Bearer <a token of the {role} role or above>"),
        )));
    };
    if c.role < role {
        crate::audit::record(s, &c.who, action, subject, "refused: 403");
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            format!("{action} needs the {role} role; this token is a {}'s", c.role),
        )));
    }
    Ok(c)
}

/// A disk's status for `who`: without its UUID for an unauthenticated caller.
fn shown(mut v: Value, who: Option<&Caller>) -> Value {
    if who.is_none() {
        if let Some(o) = v.as_object_mut() {
            o.remove("disk_uuid");
        }
    }
    v
}

/// Every disk as this caller may see it.
fn disk_views(s: &Shared, headers: &HeaderMap, peer: SocketAddr) -> Vec<Value> {
    let who = caller(s, headers, peer);
    s.all_disks()
        .iter()
        .map(|d| shown(s.disk_status(d).json, who.as_ref()))
        .collect()
}

#[utoipa::path(get, path = "/api/v1/status",
    responses((status = 200, description = "The collector and every disk", body = StatusBody)))]
async fn status(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Json<Value> {
    let disks = disk_views(&s, &headers, peer);
    Json(json!({ "collector": s.collector_json(), "disks": disks }))
}

/// `GET /api/v1/disks`: `{"disks":[...]}`, each as `GET /api/v1/disks/{id}`.
#[utoipa::path(get, path = "/api/v1/disks",
    responses((status = 200, description = "Every disk", body = DiskList)))]
async fn disks(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Json<Value> {
    Json(json!({ "disks": disk_views(&s, &headers, peer) }))
}

/// Most events one `GET /api/v1/events` returns.
const MAX_EVENTS: u32 = 1000;

/// `GET /api/v1/events[?disk=ID][&after=ID][&limit=N]`: the event log,
/// oldest first: `{"events":[{"id","time","time_ns","disk_id","kind",
/// "severity","message","who"}]}`. Without `after`, the newest `limit`
/// (100 by default, at most 1000); with it, those after that id (to
/// follow the log).
#[utoipa::path(get, path = "/api/v1/events",
    params(
        ("disk" = Option<String>, Query, description = "Only this disk's events"),
        ("after" = Option<u64>, Query, description = "Only events after this id, oldest first (to follow the log)"),
        ("limit" = Option<u32>, Query, description = "At most this many (default 100, at most 1000)"),
    ),
    responses(
        (status = 200, description = "Events, oldest first", body = EventList),
        (status = 400, description = "A parameter out of range or unknown", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
    ))]
async fn events(State(s): State<Arc<Shared>>, Query(q): Query<std::collections::BTreeMap<String, String>>) -> Response {
    if let Err(r) = known_params(&q, &["disk", "after", "limit"]) {
        return *r;
    }
    let number = |k: &str, max: u64| -> Result<Option<u64>, String> {
        match q.get(k) {
            None => Ok(None),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= max => Ok(Some(n)),
                _ => Err(format!("{k}={v:?}: give a whole number from 0 to {max}")),
            },
        }
    };
    let (after, limit) = match (
        number("after", i64::MAX.unsigned_abs()),
        number("limit", u64::from(MAX_EVENTS)),
    ) {
        (Ok(a), Ok(l)) => (a, l),
        (Err(m), _) | (_, Err(m)) => return error(StatusCode::BAD_REQUEST, m),
    };
    let disk = q.get("disk").map(String::as_str);
    if let Some(d) = disk {
        if s.disk(d).is_none() {
            return not_found(d);
        }
    }
    let limit = limit.map_or(100, |l| u32::try_from(l).unwrap_or(MAX_EVENTS));
    let rows = match s.catalog.events(
        disk,
        after.map_or(0, |a| i64::try_from(a).unwrap_or(i64::MAX)),
        limit,
        after.is_none(),
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("reading the event log: {e:#}");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the event log: {e:#}"),
            );
        }
    };
    let events = rows
        .into_iter()
        .map(|e| EventView {
            id: e.id,
            time: tidemark_util::human::format_unix_time(e.time_ns / 1_000_000_000),
            time_ns: e.time_ns,
            disk_id: e.disk_id,
            kind: e.kind,
            severity: e.severity,
            message: e.message,
            who: e.who,
        })
        .collect();
    Json(EventList { events }).into_response()
}

#[utoipa::path(get, path = "/api/v1/disks/{id}",
    params(("id" = String, Path, description = "The disk id")),
    responses(
        (status = 200, description = "The disk", body = crate::state::DiskView),
        (status = 404, description = "No such disk", body = ErrorBody),
    ))]
async fn disk(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let who = caller(&s, &headers, peer);
    match s.disk(&id) {
        Some(d) => Json(shown(s.disk_status(&d).json, who.as_ref())).into_response(),
        None => not_found(&id),
    }
}

#[utoipa::path(post, path = "/api/v1/disks/{id}/refresh",
    params(("id" = String, Path, description = "The disk id")),
    responses(
        (status = 200, description = "The disk, with the agent's fresh seq", body = crate::state::DiskView),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 503, description = "The agent is not connected", body = ErrorBody),
        (status = 504, description = "The agent did not answer in time", body = ErrorBody),
    ))]
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
            return error(code, msg);
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

/// A 400 naming the first query parameter that is not one of `known`.
pub(crate) fn known_params(
    q: &std::collections::BTreeMap<String, String>,
    known: &[&str],
) -> Result<(), Box<Response>> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {k:?} (known: {})", known.join(", ")),
        ))),
        None => Ok(()),
    }
}

/// An error answer: `{"error":{"code","message"}}`, the code a word for
/// the status (`not_found`, `bad_request`, ...), the message for people.
pub(crate) fn error(status: StatusCode, message: String) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        StatusCode::BAD_GATEWAY => "bad_gateway",
        _ => "internal",
    };
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_string(),
            message,
        },
    };
    (status, Json(body)).into_response()
}

/// `POST /api/v1/disks/{id}/quiesce` (a planned failback, docs/failback.md
/// section 6): the disk's agent refuses every write from now on, journals
/// a final tag and answers its seq: `{"disk_id","seq"}`. The caller then
/// drains the replica to that seq and fails over at it.
#[utoipa::path(post, path = "/api/v1/disks/{id}/quiesce",
    params(("id" = String, Path, description = "The disk id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Quiesced: the final tag's seq", body = QuiesceBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "The agent could not quiesce", body = ErrorBody),
        (status = 503, description = "The agent is not connected", body = ErrorBody),
        (status = 504, description = "The agent did not answer in time", body = ErrorBody),
    ))]
async fn quiesce(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let who = match require(&s, &headers, peer, ApiRole::Operator, "quiesce", &id) {
        Ok(c) => c.who,
        Err(r) => return *r,
    };
    let r = quiesce_as(&s, &id).await;
    crate::audit::record(&s, &who, "quiesce", &id, &r.0);
    r.1
}

/// `quiesce` for an authenticated caller: (the audit result, the response).
async fn quiesce_as(s: &Arc<Shared>, id: &str) -> (String, Response) {
    let r = quiesce_disk(s, id).await;
    let st = r.status();
    (
        if st.is_success() {
            "ok".to_string()
        } else {
            format!("refused: {st}")
        },
        r,
    )
}

async fn quiesce_disk(s: &Arc<Shared>, id: &str) -> Response {
    let Some(d) = s.disk(id) else {
        return not_found(id);
    };
    match crate::state::ask_agent_to(s, &d, QUIESCE_WAIT, |nonce| tidemark_wire::frame::Request::Quiesce {
        nonce,
    })
    .await
    {
        Ok(p) if p.source_seq > 0 => {
            tracing::warn!(disk = %id, seq = p.source_seq, "quiesced through the API: the agent takes no writes");
            Json(QuiesceBody {
                disk_id: id.to_string(),
                seq: p.source_seq,
            })
            .into_response()
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

/// `POST /api/v1/disks/{id}/rebind[?owner=NAME]` (operator): the disk's
/// next Hello may rebind it, once, within the hour: to a new disk UUID
/// (with the agent's `--force-resync`: a disk replaced, or a lost state
/// directory) and, with `owner`, to agent identity NAME (a server moved to
/// new hardware). The old history is kept at the collector and the
/// target, never deleted: `{"disk_id","valid_for_s","owner"}`.
#[utoipa::path(post, path = "/api/v1/disks/{id}/rebind",
    params(
        ("id" = String, Path, description = "The disk id"),
        ("owner" = Option<String>, Query, description = "Let this agent identity take the disk over"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Allowed, for an hour", body = RebindBody),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
    ))]
async fn rebind(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let who = match require(&s, &headers, peer, ApiRole::Admin, "rebind", &id) {
        Ok(c) => c.who,
        Err(r) => return *r,
    };
    if let Err(r) = known_params(&q, &["owner"]) {
        return *r;
    }
    let owner = match q.get("owner") {
        None => None,
        Some(o) if tidemark_wire::DiskId::parse(o).is_ok() => Some(format!("agent {o}")),
        Some(o) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("owner {o:?} is not an agent name (letters, digits, '.', '_', '-'; up to 64)"),
            )
        }
    };
    if s.disk(&id).is_none() {
        crate::audit::record(&s, &who, "rebind", &id, "refused: no such disk");
        return not_found(&id);
    }
    s.grant_rebind(&id, owner.clone());
    let ttl = crate::state::REBIND_GRANT_TTL.as_secs();
    crate::audit::record(
        &s,
        &who,
        "rebind",
        &id,
        &format!(
            "allowed for {ttl} s{}",
            owner.as_deref().map(|o| format!(", owner {o}")).unwrap_or_default()
        ),
    );
    tracing::warn!(disk = %id, owner = ?owner, "an operator allowed the disk's next Hello to rebind it");
    Json(RebindBody {
        disk_id: id,
        valid_for_s: ttl,
        owner,
    })
    .into_response()
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
        ALERTS_WARNING: gauge("alerts_warning", "Alerts active at warning severity (GET /api/v1/alerts).");
        ALERTS_CRITICAL: gauge("alerts_critical", "Alerts active at critical severity (GET /api/v1/alerts).");
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
        DISK_ALERT_LEVEL: gauge("disk_alert_level", "The disk's worst active alert: 0 none, 1 warning, 2 critical.");
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
        m.put(
            &ALERTS_WARNING,
            s.alerts.count(crate::catalog::Severity::Warning) as u64,
        );
        m.put(
            &ALERTS_CRITICAL,
            s.alerts.count(crate::catalog::Severity::Critical) as u64,
        );
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
            m.put_disk(&DISK_ALERT_LEVEL, id, u64::from(s.alerts.disk_level(id)));
        }
    })
}

#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "Prometheus text exposition (tidemark_collector_*)", content_type = "text/plain", body = String)))]
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics_text(&s)).into_response()
}
