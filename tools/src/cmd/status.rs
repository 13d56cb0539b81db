//! `tidemark status` and `tidemark wait`: read the collector's HTTP API
//! (`docs/pipeline.md`, "Status API").

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;
use tidemark_util::human::{format_duration, format_size, parse_duration};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(true).args(["api", "data"])))]
pub struct StatusArgs {
    /// The collector's API address (`http://HOST:PORT` or `HOST:PORT`).
    #[arg(long)]
    api: Option<String>,
    /// The target's data directory: adds each disk's recovery state (points,
    /// undo use, failover); works without a collector (e.g. after failover).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Print one JSON object with a `disks` array.
    #[arg(long)]
    json: bool,
    /// Health check for monitoring: print one line per problem and exit 0
    /// (ok), 1 (warning) or 2 (critical); see the README for the rules.
    #[arg(long)]
    check: bool,
    /// With --check: lag (age of the oldest unapplied record) above this is
    /// critical, above half of it a warning.
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = parse_timeout, requires = "check")]
    max_lag: Duration,
}

#[derive(Args)]
pub struct WaitArgs {
    /// The collector's API address (`http://HOST:PORT` or `HOST:PORT`).
    #[arg(long)]
    api: String,
    /// The disk id to wait for.
    disk: tidemark_wire::DiskId,
    /// Give up after this long (e.g. `90s`, `10m`).
    #[arg(long, default_value = "30m", value_parser = parse_timeout)]
    timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// The CA of `--api-ca` (or `TIDEMARK_API_CA`), set once by `main`.
static API_CA: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Remember `--api-ca` for every API call of this run.
pub fn set_api_ca(ca: Option<std::path::PathBuf>) {
    let _ = API_CA.set(ca);
}

fn api_ca() -> Option<&'static std::path::Path> {
    API_CA.get().and_then(|c| c.as_deref())
}

/// The API's base URL: `HOST:PORT` is `https://` with a CA given (the
/// collector's API over TLS), else `http://`.
fn base(api: &str) -> String {
    let a = api.trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_string()
    } else if api_ca().is_some() {
        format!("https://{a}")
    } else {
        format!("http://{a}")
    }
}

fn agent() -> Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(ca) = api_ca() {
        let c = tidemark_net::https::api_client_config(ca).map_err(|e| anyhow::anyhow!("--api-ca: {e}"))?;
        b = b.tls_connector(std::sync::Arc::new(tidemark_net::https::UreqTls(c)));
    }
    Ok(b.build())
}

/// A failed API call, in the operator's words: the URL, the HTTP status
/// if the API answered, and what went wrong.
#[derive(Debug)]
pub struct ApiError {
    pub url: String,
    /// The HTTP status, if the API answered with an error.
    pub status: Option<u16>,
    pub msg: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(code) => write!(f, "{}: HTTP {code}: {}", self.url, self.msg),
            None => write!(f, "{}: {}", self.url, self.msg),
        }
    }
}

impl std::error::Error for ApiError {}

/// The HTTP status of a failed API call, if the API answered.
fn http_status(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<ApiError>().and_then(|a| a.status)
}

/// A reply that is not HTTP.
const NOT_HTTP: &str = "the service there does not answer in HTTP: not the collector's --api address (perhaps its \
                        --listen port), or an API that serves HTTPS (give --api-ca FILE)";

/// What a transport error means to an operator (ureq's own text may hold
/// raw bytes, e.g. the status line of something that is not HTTP).
fn transport_text(t: &ureq::Transport) -> String {
    use ureq::ErrorKind as K;
    let io = || {
        std::error::Error::source(t)
            .map(|s| s.to_string())
            .or_else(|| t.message().map(str::to_string))
            .unwrap_or_else(|| "I/O error".into())
    };
    match t.kind() {
        K::InvalidUrl | K::UnknownScheme => "not a valid API address (use HOST:PORT or http://HOST:PORT)".into(),
        K::Dns => "cannot resolve the host name".into(),
        K::ConnectionFailed => format!("cannot connect: {} (is the collector running with --api here?)", io()),
        K::BadStatus | K::BadHeader => NOT_HTTP.into(),
        K::Io => {
            let e = std::error::Error::source(t).and_then(|s| s.downcast_ref::<std::io::Error>());
            match e {
                Some(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                    "no answer in time (is this the collector's --api address?)".into()
                }
                // A real I/O error (reset, refused) carries an OS error;
                // ureq's own parse errors (with the bytes it read) do not.
                Some(e) if e.raw_os_error().is_some() => {
                    format!("{e} (is this the collector's --api address?)")
                }
                Some(e) if e.to_string().contains("TLS handshake") => e.to_string(),
                _ => NOT_HTTP.into(),
            }
        }
        _ => t.message().map_or_else(|| t.kind().to_string(), str::to_string),
    }
}

/// GET or POST `path` and parse the JSON reply; an HTTP error carries the
/// API's own message.
fn call(api: &str, method: &str, path: &str) -> Result<Value> {
    call_with(api, method, path, None)
}

/// [`call`] with `Authorization: Bearer <bearer>`.
pub fn call_with(api: &str, method: &str, path: &str, bearer: Option<&str>) -> Result<Value> {
    let url = format!("{}{path}", base(api));
    let fail = |status, msg: String| {
        anyhow::Error::new(ApiError {
            url: url.clone(),
            status,
            msg,
        })
    };
    if url.starts_with("https://") && api_ca().is_none() {
        return Err(fail(
            None,
            "an https API needs the deployment's CA: --api-ca FILE (an identity folder's ca.pem) or TIDEMARK_API_CA"
                .into(),
        ));
    }
    let mut req = agent()?.request(method, &url);
    if let Some(b) = bearer {
        req = req.set("Authorization", &format!("Bearer {b}"));
    }
    match req.call() {
        Ok(r) => r.into_json().map_err(|_| {
            fail(
                None,
                "the reply is not JSON: this is not the collector's status API".into(),
            )
        }),
        Err(ureq::Error::Status(code, r)) => {
            let body: Value = r.into_json().unwrap_or(Value::Null);
            // {"error":{"code","message"}}; a collector of an older build
            // sent {"error":"message"}.
            let msg = body["error"]["message"]
                .as_str()
                .or(body["error"].as_str())
                .map_or_else(
                    || match code {
                        404 => "not found (is this the collector's --api address?)".to_string(),
                        _ => "no reason given".to_string(),
                    },
                    str::to_string,
                );
            Err(fail(Some(code), msg))
        }
        Err(ureq::Error::Transport(t)) => Err(fail(None, transport_text(&t))),
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn mode_text(d: &Value) -> String {
    let mode = d["mode"].as_str().unwrap_or("?");
    let mut t = match d["sync_percent"].as_f64() {
        Some(p) if matches!(mode, "initial-sync" | "resync" | "full-resync") => format!("{mode} {p:.0}%"),
        _ => mode.to_string(),
    };
    let (regions, pending) = (u(d, "resync_regions"), u(d, "target_pending_bytes"));
    if regions > 0 || pending > 0 {
        t.push_str(&format!(" ({regions} regions, {} to resync", format_size(pending)));
        if let Some(eta) = d["sync_eta_s"].as_f64() {
            t.push_str(&format!(
                ", eta {}",
                format_duration(Duration::from_secs_f64(eta.max(0.0)))
            ));
        }
        t.push(')');
    }
    t
}

/// A non-negative float rate, rounded down to whole bytes.
fn rate(v: &Value) -> u64 {
    let r = v.as_f64().unwrap_or(0.0).max(0.0).floor();
    format!("{r:.0}").parse().unwrap_or(0)
}

fn secs(v: &Value) -> String {
    v.as_f64()
        .map(|s| format_duration(Duration::from_secs_f64(s.max(0.0))))
        .unwrap_or_else(|| "-".into())
}

/// Each disk's recovery state from the target's catalog, as JSON by disk id.
fn recovery_states(data: &std::path::Path) -> Result<std::collections::BTreeMap<String, Value>> {
    let disks = tidemark_catalog::disk_states(data)
        .with_context(|| format!("read the target's catalog in {}", data.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let point = |p: &Option<tidemark_recovery::Point>| match p {
        Some(p) => serde_json::json!({
            "seq": p.seq,
            "time": super::points::format_time(p.time_ns),
            "age_s": u64::try_from(now.saturating_sub(u128::from(p.time_ns)) / 1_000_000_000).unwrap_or(0),
            "kind": p.kind,
            "tag": p.tag,
        }),
        None => Value::Null,
    };
    Ok(disks
        .iter()
        .map(|d| {
            (
                d.disk_id.clone(),
                serde_json::json!({
                    "disk_uuid": d.disk_uuid,
                    "state": d.state,
                    "applied_seq": d.applied_seq,
                    "oldest_point": point(&d.oldest_point),
                    "newest_point": point(&d.newest_point),
                    "last_app_point_age_s": d.last_app_point_age_s,
                    "undo_bytes": d.undo_bytes,
                    "undo_cap_bytes": d.undo_cap_bytes,
                    "failed_over": !d.failovers.is_empty(),
                    "failover_seq": d.failovers.last().map(|f| f.point.seq),
                    "generation": d.generation,
                }),
            )
        })
        .collect())
}

fn recovery_table(rec: &std::collections::BTreeMap<String, Value>) {
    let head = [
        "DISK",
        "REPLICA",
        "APPLIED",
        "OLDEST POINT",
        "NEWEST POINT",
        "LAST APP POINT",
        "UNDO",
        "GENERATION",
        "FAILED OVER",
    ];
    let mut rows = vec![head.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    let pt = |p: &Value| match p["seq"].as_u64() {
        Some(seq) => format!(
            "seq {seq}, {} ago",
            format_duration(Duration::from_secs(p["age_s"].as_u64().unwrap_or(0)))
        ),
        None => "-".into(),
    };
    for (id, r) in rec {
        rows.push(vec![
            id.clone(),
            r["state"].as_str().unwrap_or("?").to_string(),
            u(r, "applied_seq").to_string(),
            pt(&r["oldest_point"]),
            pt(&r["newest_point"]),
            r["last_app_point_age_s"]
                .as_u64()
                .map(|s| format!("{} ago", format_duration(Duration::from_secs(s))))
                .unwrap_or_else(|| "none".into()),
            match r["undo_cap_bytes"].as_u64() {
                Some(cap) => format!("{} of {}", format_size(u(r, "undo_bytes")), format_size(cap)),
                None => format!("{} (no cap)", format_size(u(r, "undo_bytes"))),
            },
            // 16 hex digits tell generations apart (as in messages).
            r["generation"]
                .as_str()
                .map_or_else(|| "-".into(), |g| g.chars().take(16).collect()),
            match r["failover_seq"].as_u64() {
                Some(seq) if r["failed_over"] == Value::Bool(true) => format!("yes, at seq {seq}"),
                _ => "no".into(),
            },
        ]);
    }
    print_table(&rows);
}

fn print_table(rows: &[Vec<String>]) {
    let n = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", line.join("  ").trim_end());
    }
}

pub fn status(a: StatusArgs) -> Result<ExitCode> {
    if a.check {
        return check(&a);
    }
    let rec = a.data.as_deref().map(recovery_states).transpose()?;
    let Some(api) = a.api.as_deref() else {
        let rec = rec.unwrap_or_default();
        if a.json {
            let disks: Vec<Value> = rec
                .iter()
                .map(|(id, r)| serde_json::json!({"disk_id": id, "recovery": r}))
                .collect();
            outln!("{}", serde_json::json!({ "disks": disks }));
        } else if rec.is_empty() {
            outln!("no disks");
        } else {
            recovery_table(&rec);
        }
        return Ok(ExitCode::SUCCESS);
    };
    let mut v = call(api, "GET", "/api/v1/status")?;
    if let (Some(rec), Some(disks)) = (&rec, v["disks"].as_array_mut()) {
        for d in disks {
            let id = d["disk_id"].as_str().unwrap_or_default().to_string();
            d["recovery"] = rec.get(&id).cloned().unwrap_or(Value::Null);
        }
    }
    if a.json {
        outln!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    status_table(&v);
    if let Some(rec) = &rec {
        outln!();
        outln!(
            "recovery (target catalog in {}):",
            a.data.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
        );
        recovery_table(rec);
    }
    Ok(ExitCode::SUCCESS)
}

/// How bad a problem is, for `status --check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Severity {
    Warning,
    Critical,
}

impl Severity {
    fn name(self) -> &'static str {
        match self {
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }
}

/// One problem `status --check` found: how bad, which disk (none: the
/// collector), what.
#[derive(Debug, PartialEq)]
struct Problem {
    severity: Severity,
    disk: Option<String>,
    what: String,
}

/// The rules of `status --check` (README, "tidemark status"), applied to
/// the collector's status object (and, with --data, the target's recovery
/// states by disk id).
fn problems(
    v: Option<&Value>,
    rec: Option<&std::collections::BTreeMap<String, Value>>,
    max_lag: Duration,
) -> Vec<Problem> {
    use Severity::{Critical, Warning};
    let mut out = Vec::new();
    let mut add = |severity, disk: Option<&str>, what: String| {
        out.push(Problem {
            severity,
            disk: disk.map(str::to_string),
            what,
        });
    };
    if let Some(v) = v {
        let c = &v["collector"];
        let (spool, cap) = (u(c, "spool_bytes"), u(c, "spool_cap_bytes"));
        if c["spool_full"] == Value::Bool(true) {
            add(
                Critical,
                None,
                format!(
                    "spool full ({} of {}): agents are held back",
                    format_size(spool),
                    format_size(cap)
                ),
            );
        } else if cap > 0 && spool.saturating_mul(10) >= cap.saturating_mul(9) {
            add(
                Warning,
                None,
                format!("spool {} of {} (90 % or more)", format_size(spool), format_size(cap)),
            );
        }
        let max = max_lag.as_secs_f64();
        for d in v["disks"].as_array().into_iter().flatten() {
            let id = d["disk_id"].as_str();
            let mode = d["mode"].as_str().unwrap_or("unknown");
            match mode {
                "halted" => add(
                    Critical,
                    id,
                    format!(
                        "halted at seq {}: a record failed its check at the target",
                        u(d, "halted_seq")
                    ),
                ),
                "bitmap" => add(
                    Warning,
                    id,
                    "bitmap mode: the agent tracks dirty regions only; a resync follows".into(),
                ),
                "initial-sync" | "resync" | "full-resync" => add(
                    Warning,
                    id,
                    format!("{}: no consistent recovery point until it is done", mode_text(d)),
                ),
                "fenced" => add(
                    Warning,
                    id,
                    format!(
                        "fenced: a failover ended this disk's generation; its agent is refused ({})",
                        d["fenced"]["reason"].as_str().unwrap_or("no reason recorded")
                    ),
                ),
                "backlogged" if d["target_connected"] != Value::Bool(false) => {
                    add(Warning, id, format!("backlogged: lag {}", secs(&d["lag_s"])));
                }
                _ => {}
            }
            if mode == "fenced" {
                // Its agent is refused and nothing is forwarded, by design.
                continue;
            }
            if d["agent_connected"] == Value::Bool(false) {
                add(
                    Critical,
                    id,
                    format!("agent disconnected (last report {} ago)", secs(&d["source_age_s"])),
                );
            }
            if let Some(why) = d["target_refusal"].as_str() {
                add(Critical, id, format!("the target refuses this disk: {why}"));
            } else if d["target_connected"] == Value::Bool(false) {
                add(Critical, id, "target disconnected: nothing is being applied".into());
            }
            let lag = d["lag_s"].as_f64().unwrap_or(0.0);
            if lag > max {
                add(
                    Critical,
                    id,
                    format!("lag {} over --max-lag {}", secs(&d["lag_s"]), format_duration(max_lag)),
                );
            } else if lag > max / 2.0 {
                add(
                    Warning,
                    id,
                    format!(
                        "lag {} over half of --max-lag {}",
                        secs(&d["lag_s"]),
                        format_duration(max_lag)
                    ),
                );
            }
        }
    }
    for (id, r) in rec.into_iter().flatten() {
        if r["state"] == "halted" {
            add(Critical, Some(id), "the replica is halted (target catalog)".into());
        }
        if r["failed_over"] == Value::Bool(true) {
            add(
                Warning,
                Some(id),
                format!(
                    "failed over at seq {}: the replica no longer follows the source",
                    u(r, "failover_seq")
                ),
            );
        }
    }
    out
}

/// `status --check`: a summary line, one line per problem, exit 0/1/2.
fn check(a: &StatusArgs) -> Result<ExitCode> {
    let critical = |what: String| -> Result<ExitCode> {
        if a.json {
            outln!(
                "{}",
                serde_json::json!({"check": "critical", "problems": [{"severity": "critical", "disk_id": null, "problem": what}]})
            );
        } else {
            outln!("CRITICAL: {what}");
        }
        Ok(ExitCode::from(2))
    };
    let rec = match a.data.as_deref().map(recovery_states).transpose() {
        Ok(r) => r,
        Err(e) => return critical(format!("{e:#}")),
    };
    let v = match a
        .api
        .as_deref()
        .map(|api| call(api, "GET", "/api/v1/status"))
        .transpose()
    {
        Ok(v) => v,
        Err(e) => return critical(format!("{e:#}")),
    };
    let found = problems(v.as_ref(), rec.as_ref(), a.max_lag);
    let worst = found.iter().map(|p| p.severity).max();
    let (word, code) = match worst {
        None => ("ok", 0),
        Some(Severity::Warning) => ("warning", 1),
        Some(Severity::Critical) => ("critical", 2),
    };
    if a.json {
        let list: Vec<Value> = found
            .iter()
            .map(|p| serde_json::json!({"severity": p.severity.name().to_lowercase(), "disk_id": p.disk, "problem": p.what}))
            .collect();
        outln!("{}", serde_json::json!({"check": word, "problems": list}));
        return Ok(ExitCode::from(code));
    }
    let disks = v
        .as_ref()
        .and_then(|v| v["disks"].as_array().map(Vec::len))
        .unwrap_or_else(|| rec.as_ref().map_or(0, |r| r.len()));
    let lag = v
        .as_ref()
        .and_then(|v| v["disks"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|d| d["lag_s"].as_f64())
        .fold(None, |m: Option<f64>, l| Some(m.map_or(l, |m| m.max(l))));
    let lag = lag
        .map(|l| format!(", max lag {}", secs(&Value::from(l))))
        .unwrap_or_default();
    match worst {
        None => outln!("OK: {disks} disk{}{lag}", if disks == 1 { "" } else { "s" }),
        Some(_) => {
            let n = |s| found.iter().filter(|p| p.severity == s).count();
            outln!(
                "{}: {} critical, {} warning ({disks} disk{}{lag})",
                word.to_uppercase(),
                n(Severity::Critical),
                n(Severity::Warning),
                if disks == 1 { "" } else { "s" }
            );
        }
    }
    for p in &found {
        match &p.disk {
            Some(d) => outln!("{} {d}: {}", p.severity.name(), p.what),
            None => outln!("{} collector: {}", p.severity.name(), p.what),
        }
    }
    Ok(ExitCode::from(code))
}

/// The last verified recoverable point: `seq N, AGE ago`, `never`, or
/// what the newest drill found instead.
fn verified_text(d: &Value) -> String {
    let v = &d["last_verified"];
    let mut t = match v["seq"].as_u64() {
        Some(seq) => format!("seq {seq}, {} old", secs(&v["age_s"])),
        None => "never".into(),
    };
    if let Some(r) = d["last_drill"]["result"].as_str().filter(|r| *r != "passed") {
        t.push_str(&format!(" (last drill {r})"));
    }
    t
}

fn status_table(v: &Value) {
    let c = &v["collector"];
    outln!(
        "collector: {} agents connected, spool {} of {}{}; links: {}",
        u(c, "agents_connected"),
        format_size(u(c, "spool_bytes")),
        format_size(u(c, "spool_cap_bytes")),
        if c["spool_full"] == Value::Bool(true) {
            " (FULL: agents are held back)"
        } else {
            ""
        },
        c["security"].as_str().unwrap_or("not reported")
    );
    let disks = v["disks"].as_array().cloned().unwrap_or_default();
    if disks.is_empty() {
        outln!("no disks");
        return;
    }
    let head = [
        "DISK",
        "MODE",
        "SOURCE",
        "ACKED",
        "APPLIED",
        "LAG",
        "LAG BYTES",
        "WRITE RATE",
        "WIRE/PAYLOAD",
        "DEDUP",
        "RESYNCS",
        "VERIFIED",
    ];
    let mut rows = vec![head.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for d in &disks {
        rows.push(vec![
            d["disk_id"].as_str().unwrap_or("?").to_string(),
            mode_text(d),
            u(d, "source_seq").to_string(),
            u(d, "acked_seq").to_string(),
            u(d, "applied_seq").to_string(),
            secs(&d["lag_s"]),
            format_size(u(d, "lag_bytes")),
            format!(
                "{}/s",
                format_size(
                    d["write_rate_bps"]
                        .as_u64()
                        .unwrap_or_else(|| rate(&d["write_rate_bps"]))
                )
            ),
            match d["wire_ratio"].as_f64() {
                Some(r) => format!(
                    "{} / {} ({r:.2})",
                    format_size(u(d, "wire_bytes")),
                    format_size(u(d, "payload_bytes"))
                ),
                None => "-".into(),
            },
            u(d, "dedup_hits").to_string(),
            u(d, "full_resyncs").to_string(),
            verified_text(d),
        ]);
    }
    print_table(&rows);
    for d in &disks {
        if d["mode"] == "halted" {
            outln!(
                "{}: HALTED at seq {} (a record failed its check; the range is being resynced)",
                d["disk_id"].as_str().unwrap_or("?"),
                u(d, "halted_seq")
            );
        }
        if let Some(why) = d["target_refusal"].as_str() {
            outln!(
                "{}: the target refuses this disk: {why}",
                d["disk_id"].as_str().unwrap_or("?")
            );
        }
    }
}

/// Whether the replica is not (yet) known to be a consistent copy that is
/// keeping up: a sync, bitmap mode or a halt; an agent that went away while
/// it was not streaming (or whose mode is unknown: nothing says its sync is
/// over); or a target state other than consistent.
fn syncing(d: &Value) -> bool {
    let mode = d["mode"].as_str();
    matches!(
        mode,
        Some("initial-sync" | "resync" | "full-resync" | "bitmap" | "halted")
    ) || (mode == Some("disconnected") && d["agent_mode"].as_str() != Some("streaming"))
        || d["target_state"].as_str() != Some("consistent")
}

/// A collector younger than this may not know a disk yet: its agents are
/// still reconnecting after its restart.
const RECONNECT_GRACE_S: u64 = 30;

/// The error for a disk the collector answered 404 for: no use waiting.
/// None when the 404 is passing: the disk is listed now, or the collector
/// has just started and its agents may still be reconnecting.
fn unknown_disk(api: &str, disk: &str) -> Option<anyhow::Error> {
    let status = call(api, "GET", "/api/v1/status").ok();
    let known = status.as_ref().map(|v| {
        v["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["disk_id"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    });
    let young = status
        .as_ref()
        .and_then(|v| v["collector"]["uptime_s"].as_u64())
        .is_some_and(|u| u < RECONNECT_GRACE_S);
    if young || known.as_ref().is_some_and(|k| k.iter().any(|d| d == disk)) {
        return None;
    }
    Some(match known {
        Some(k) if k.is_empty() => anyhow!(
            "the collector at {} knows no disk {disk}; it knows no disks at all",
            base(api)
        ),
        Some(k) => anyhow!(
            "the collector at {} knows no disk {disk}; known: {}",
            base(api),
            k.join(", ")
        ),
        None => anyhow!("the collector at {} knows no disk {disk}", base(api)),
    })
}

/// Waits between polls of the API: a tenth of the time waited so far,
/// between 20 and 200 ms (a short wait is not rounded up to the poll).
fn poll(start: Instant) -> Duration {
    (start.elapsed() / 10).clamp(Duration::from_millis(20), Duration::from_millis(200))
}

pub fn wait(a: WaitArgs) -> Result<()> {
    let start = Instant::now();
    let timed_out = || start.elapsed() >= a.timeout;
    let path = format!("/api/v1/disks/{}", a.disk);
    let refresh = format!("{path}/refresh");
    // A fresh source seq from the agent (the collector answers only with a
    // Progress that echoes its request, or with an error: 503 while the
    // agent is not connected, 504 if it did not answer in time). Keep asking
    // until the timeout: either side may be restarting.
    let mut noted = false;
    let mut target = loop {
        match call(&a.api, "POST", &refresh) {
            Ok(d) => break u(&d, "source_seq"),
            Err(e) => {
                if http_status(&e) == Some(404) {
                    if let Some(unknown) = unknown_disk(&a.api, &a.disk) {
                        return Err(unknown);
                    }
                }
                if timed_out() {
                    bail!(
                        "timed out after {} waiting for the agent of disk {} to report its seq: {e}",
                        format_duration(a.timeout),
                        a.disk
                    );
                }
                if !noted {
                    eprintln!("waiting for the agent of {} to report its seq ({e})", a.disk);
                    noted = true;
                }
                std::thread::sleep(poll(start));
            }
        }
    };
    let mut last_note = Instant::now();
    let mut was_syncing = false;
    let mut last: Option<Value> = None;
    loop {
        let got = call(&a.api, "GET", &path).and_then(|mut d| {
            // A sync that was running when we asked ends with records (and a
            // SyncDone) newer than the seq we fetched: once it is over, ask
            // again before calling the replica caught up.
            if syncing(&d) {
                was_syncing = true;
            } else if was_syncing {
                let fresh = call(&a.api, "POST", &refresh)?;
                was_syncing = false;
                target = target.max(u(&fresh, "source_seq"));
                d = fresh;
            }
            Ok(d)
        });
        let unknown = match &got {
            Err(e) if http_status(e) == Some(404) => unknown_disk(&a.api, &a.disk),
            _ => None,
        };
        if let Some(unknown) = unknown {
            return Err(unknown);
        }
        let err = match got {
            Ok(d) => {
                let applied = u(&d, "applied_seq");
                if applied >= target && !syncing(&d) {
                    outln!(
                        "{}: replica caught up: applied seq {applied} ≥ {target} in {}",
                        a.disk,
                        format_duration(start.elapsed())
                    );
                    return Ok(());
                }
                last = Some(d);
                None
            }
            // The collector may be restarting, or the agent not answering:
            // keep trying until the timeout.
            Err(e) => Some(e),
        };
        let where_ = match &last {
            Some(d) => format!(
                "{}, mode {}{}, target {}, lag {}",
                match u(d, "applied_seq") {
                    // A sync's own records pass the seq we wait for; the
                    // wait is for the sync to end.
                    a if a >= target => format!("applied seq {a} (past {target}; waiting for the sync to end)"),
                    a => format!("applied seq {a} of {target}"),
                },
                mode_text(d),
                match (d["mode"].as_str(), d["agent_mode"].as_str()) {
                    (Some("disconnected"), Some(m)) => format!(" (agent last reported {m})"),
                    _ => String::new(),
                },
                d["target_state"].as_str().unwrap_or("unknown"),
                secs(&d["lag_s"])
            ),
            None => format!("target seq {target}"),
        };
        let refused = match last.as_ref().and_then(|d| d["target_refusal"].as_str()) {
            Some(why) => format!("; the target refuses the disk: {why}"),
            None => String::new(),
        };
        let err_text = err.as_ref().map(|e| format!("; last error: {e:#}")).unwrap_or_default() + &refused;
        if timed_out() {
            bail!(
                "timed out after {} waiting for disk {}: {where_}{err_text}",
                format_duration(a.timeout),
                a.disk,
            );
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            eprintln!("waiting for {}: {where_}{err_text}", a.disk);
            last_note = Instant::now();
        }
        std::thread::sleep(poll(start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn disconnected_or_unsettled_is_not_caught_up() {
        let d = |mode: &str, agent_mode: Value, target: &str| json!({"mode": mode, "agent_mode": agent_mode, "target_state": target});
        assert!(!syncing(&d("streaming", json!("streaming"), "consistent")));
        assert!(!syncing(&d("backlogged", json!("streaming"), "consistent")));
        assert!(!syncing(&d("disconnected", json!("streaming"), "consistent")));
        assert!(syncing(&d("disconnected", json!("resync"), "consistent")));
        assert!(syncing(&d("disconnected", json!("bitmap"), "consistent")));
        assert!(syncing(&d("disconnected", Value::Null, "consistent")));
        assert!(syncing(&d("streaming", json!("streaming"), "syncing")));
        assert!(syncing(&d("streaming", json!("streaming"), "unknown")));
        assert!(syncing(&d("resync", json!("resync"), "consistent")));
        assert!(syncing(&d("halted", json!("streaming"), "halted")));
    }

    #[test]
    fn check_rules() {
        let disk = |mode: &str, extra: Value| {
            let mut d =
                json!({"disk_id": "d", "mode": mode, "agent_connected": true, "target_connected": true, "lag_s": 0.5});
            for (k, v) in extra.as_object().unwrap() {
                d[k] = v.clone();
            }
            d
        };
        let st = |d: Value| json!({"collector": {"spool_bytes": 0, "spool_cap_bytes": 100, "spool_full": false}, "disks": [d]});
        let worst = |v: Value| {
            problems(Some(&v), None, Duration::from_secs(300))
                .iter()
                .map(|p| p.severity)
                .max()
        };
        assert_eq!(worst(st(disk("streaming", json!({})))), None);
        assert_eq!(worst(st(disk("bitmap", json!({})))), Some(Severity::Warning));
        assert_eq!(worst(st(disk("resync", json!({})))), Some(Severity::Warning));
        assert_eq!(
            worst(st(disk("backlogged", json!({"lag_s": 20.0})))),
            Some(Severity::Warning)
        );
        assert_eq!(
            worst(st(disk("streaming", json!({"lag_s": 200.0})))),
            Some(Severity::Warning)
        );
        assert_eq!(
            worst(st(disk("streaming", json!({"lag_s": 400.0})))),
            Some(Severity::Critical)
        );
        assert_eq!(
            worst(st(disk("halted", json!({"halted_seq": 9})))),
            Some(Severity::Critical)
        );
        assert_eq!(
            worst(st(disk("disconnected", json!({"agent_connected": false})))),
            Some(Severity::Critical)
        );
        let p = problems(
            Some(&st(disk("backlogged", json!({"target_connected": false})))),
            None,
            Duration::from_secs(300),
        );
        assert_eq!(p.len(), 1, "one line for one problem: {p:?}");
        assert!(p[0].what.contains("target disconnected"));
        let mut full = st(disk("streaming", json!({})));
        full["collector"]["spool_full"] = json!(true);
        assert_eq!(worst(full), Some(Severity::Critical));
    }
}
