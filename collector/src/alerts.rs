//! Alerts (`docs/operations.md`, "Alerts"): conditions an operator must
//! hear about, evaluated every [`EVERY`] over the collector's own view of
//! the deployment, raised and cleared as events, listed by `GET
//! /api/v1/alerts`, counted in the metrics and delivered to an optional
//! webhook (`--alert-webhook http(s)://...`: a JSON POST per change, retried with
//! backoff by a task of its own, so replication never waits on it).
//!
//! The conditions, per disk:
//! - `rpo`: the oldest record not yet applied at the target is older than
//!   the RPO threshold (the disk's policy `rpo_s`, else `--alert-rpo`,
//!   15 min by default): warning; twice the threshold: critical.
//! - `backlog_age`: the same age past 30 min (warning) / 45 min
//!   (critical), the seed's process-server thresholds.
//! - `halted`: the target halted the disk (critical).
//! - `resync_owed`: a full or range resync is owed to the agent (warning).
//! - `drill_failed`: the disk's newest drill failed (critical) or could not
//!   run (warning); cleared by a drill that passes.
//! - `verified_age`: the last verified point is older than the policy's
//!   `verified_max_age_s` (default: twice `drill_interval_s`; none without
//!   a schedule), or no point passed a drill yet (warning).
//!
//! and for the collector's host:
//! - `spool_free`: less than 30 % (warning) / 25 % (critical) of the spool
//!   left, of its cap or of its file system, whichever is less;
//! - `host_cpu`, `host_memory`: the host's CPU busy (over the last
//!   minute) or memory in use at 80 % (warning) / 95 % (critical).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::{info, warn};

use crate::catalog::Severity;
use crate::state::Shared;

/// How often the conditions are evaluated.
pub(crate) const EVERY: Duration = Duration::from_secs(1);
/// Default RPO threshold.
pub const DEFAULT_RPO: Duration = Duration::from_secs(15 * 60);
const BACKLOG_WARN_S: f64 = 30.0 * 60.0;
const BACKLOG_CRIT_S: f64 = 45.0 * 60.0;
const SPOOL_FREE_WARN: f64 = 30.0;
const SPOOL_FREE_CRIT: f64 = 25.0;
const HOST_WARN: f64 = 80.0;
const HOST_CRIT: f64 = 95.0;
/// The CPU figure is the average over this many evaluations.
const CPU_WINDOW: usize = 60;
/// Webhook deliveries waiting at most; beyond, the oldest is dropped
/// (and said so in the log).
const WEBHOOK_QUEUE: usize = 1000;

/// An active alert.
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Alert {
    /// rpo, backlog_age, halted, resync_owed, drill_failed, verified_age,
    /// spool_free, host_cpu, host_memory.
    pub alert: String,
    /// The disk, for a disk's alert.
    pub disk_id: Option<String>,
    pub severity: Severity,
    pub message: String,
    /// When it was raised (UTC, readable) and in Unix nanoseconds.
    pub since: String,
    pub since_ns: i64,
}

/// The active alerts and what the evaluator keeps between rounds.
#[derive(Default)]
pub(crate) struct Alerts {
    active: Mutex<BTreeMap<(String, Option<String>), Alert>>,
    cpu: Mutex<CpuSamples>,
}

#[derive(Default)]
struct CpuSamples {
    last: Option<(u64, u64)>,
    busy: VecDeque<f64>,
}

impl Alerts {
    /// The active alerts, disks' first, by name.
    pub(crate) fn list(&self) -> Vec<Alert> {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// How many are active at `severity`.
    pub(crate) fn count(&self, severity: Severity) -> usize {
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        active.values().filter(|a| a.severity == severity).count()
    }

    /// The worst severity among a disk's alerts: 0 none, 1 warning, 2
    /// critical.
    pub(crate) fn disk_level(&self, disk: &str) -> u8 {
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        active
            .values()
            .filter(|a| a.disk_id.as_deref() == Some(disk))
            .map(|a| match a.severity {
                Severity::Critical => 2,
                Severity::Warning => 1,
                Severity::Info => 0,
            })
            .max()
            .unwrap_or(0)
    }
}

/// A condition that holds now: (alert, disk, severity, message).
type Condition = (String, Option<String>, Severity, String);

/// Every disk with its status as of this second (taken once per second
/// for the alerts and the history both).
pub(crate) type Statuses = Vec<(Arc<crate::state::Disk>, crate::state::DiskStatus)>;

/// A failed drill; a last verified point older than the policy allows.
fn drill_conditions(s: &Shared, id: &str, policy: &crate::calls::Policy, out: &mut Vec<Condition>) {
    let drills = s.book.known(id);
    if let Some(last) = &drills.last {
        match last["result"].as_str() {
            Some("failed") => out.push((
                "drill_failed".into(),
                Some(id.to_string()),
                Severity::Critical,
                format!(
                    "drill {} of point seq {} failed: {} (tidemark drill --history --verbose shows the checker's output)",
                    last["id"],
                    last["seq"],
                    last["summary"].as_str().unwrap_or("")
                ),
            )),
            Some("error") => out.push((
                "drill_failed".into(),
                Some(id.to_string()),
                Severity::Warning,
                format!("drill {} could not run: {}", last["id"], last["summary"].as_str().unwrap_or("")),
            )),
            _ => {}
        }
    }
    let Some(max) = policy.verified_max_age() else { return };
    if !drills.known || drills.last.is_none() {
        // Not drilled yet: the first (scheduled) drill decides.
        return;
    }
    let fmt = |d: Duration| tidemark_util::human::format_duration(d);
    let age = drills
        .last_verified
        .as_ref()
        .and_then(|v| v["point_time_ns"].as_u64())
        .map(|t| Duration::from_nanos(tidemark_util::now_ns().saturating_sub(t)));
    match age {
        Some(a) if a <= max => {}
        Some(a) => out.push((
            "verified_age".into(),
            Some(id.to_string()),
            Severity::Warning,
            format!(
                "the last verified point is {} old (policy: at most {})",
                fmt(a),
                fmt(max)
            ),
        )),
        None => out.push((
            "verified_age".into(),
            Some(id.to_string()),
            Severity::Warning,
            format!(
                "no point of this disk has passed a drill (policy: one at most {} old)",
                fmt(max)
            ),
        )),
    }
}

/// The conditions that hold now.
fn conditions(s: &Shared, statuses: &Statuses) -> Vec<Condition> {
    let mut out = Vec::new();
    for (d, st) in statuses {
        let id = d.id.to_string();
        let policy = s.book.policy(&id);
        let rpo = policy.rpo_s.map_or(s.cfg.alert_rpo.as_secs_f64(), |r| r as f64);
        drill_conditions(s, &id, &policy, &mut out);
        let age = st.lag_seconds;
        let fmt = |secs: f64| tidemark_util::human::format_duration(Duration::from_secs_f64(secs.max(0.0)));
        if age > rpo {
            let sev = if age > 2.0 * rpo {
                Severity::Critical
            } else {
                Severity::Warning
            };
            out.push((
                "rpo".into(),
                Some(id.clone()),
                sev,
                format!(
                    "the oldest write not yet at the target is {} old (RPO threshold {})",
                    fmt(age),
                    fmt(rpo)
                ),
            ));
        }
        if let Some(sev) = grade(age, BACKLOG_WARN_S, BACKLOG_CRIT_S) {
            out.push((
                "backlog_age".into(),
                Some(id.clone()),
                sev,
                format!("backlog {} old (warning at 30 min, critical at 45 min)", fmt(age)),
            ));
        }
        if st.json["target_state"] == "halted" {
            out.push((
                "halted".into(),
                Some(id.clone()),
                Severity::Critical,
                format!(
                    "the target halted the disk at seq {}: no new recovery points until it is resynced",
                    st.json["halted_seq"]
                ),
            ));
        }
        let pending_full = d.lock().pending_full_sync;
        let regions = st.json["resync_regions"].as_u64().unwrap_or(0);
        if pending_full || regions > 0 {
            out.push((
                "resync_owed".into(),
                Some(id.clone()),
                Severity::Warning,
                if pending_full {
                    "a full resync is owed to the agent".to_string()
                } else {
                    format!("{regions} range(s) are owed a resync by the agent")
                },
            ));
        }
    }
    // The spool: of its cap, and of its file system.
    let used = s.spool_bytes.load(Ordering::Relaxed);
    let cap = s.cfg.spool_cap.max(1);
    let mut free = 100.0 * cap.saturating_sub(used) as f64 / cap as f64;
    if let Ok(fs) = nix::sys::statvfs::statvfs(&s.cfg.spool) {
        // As df counts: what is available of what is used or available
        // (blocks reserved for root are neither).
        let avail = fs.blocks_available() as f64;
        let used = fs.blocks().saturating_sub(fs.blocks_free()) as f64;
        if avail + used > 0.0 {
            free = free.min(100.0 * avail / (avail + used));
        }
    }
    // Less free is worse: graded on what is used.
    if let Some(sev) = grade(100.0 - free, 100.0 - SPOOL_FREE_WARN, 100.0 - SPOOL_FREE_CRIT) {
        out.push((
            "spool_free".into(),
            None,
            sev,
            format!("{free:.0} % of the spool is free (warning under 30 %, critical under 25 %)"),
        ));
    }
    if let Some((cpu, sev)) = cpu_busy(s).and_then(|v| grade(v, HOST_WARN, HOST_CRIT).map(|g| (v, g))) {
        out.push((
            "host_cpu".into(),
            None,
            sev,
            format!("the collector's host CPU is {cpu:.0} % busy over the last minute"),
        ));
    }
    if let Some((mem, sev)) = memory_used().and_then(|v| grade(v, HOST_WARN, HOST_CRIT).map(|g| (v, g))) {
        out.push((
            "host_memory".into(),
            None,
            sev,
            format!("the collector's host has {mem:.0} % of its memory in use"),
        ));
    }
    out
}

/// Warning at `warn` or more, critical at `crit` or more, else none.
fn grade(v: f64, warn: f64, crit: f64) -> Option<Severity> {
    if v >= crit {
        Some(Severity::Critical)
    } else if v >= warn {
        Some(Severity::Warning)
    } else {
        None
    }
}

/// The host's CPU busy share (percent) over the last [`CPU_WINDOW`]
/// evaluations, once there are that many (None before, or without
/// /proc/stat).
fn cpu_busy(s: &Shared) -> Option<f64> {
    let line = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = line
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 5 {
        return None;
    }
    let total: u64 = f.iter().sum();
    let idle = f[3] + f[4];
    let mut c = s.alerts.cpu.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((t0, i0)) = c.last {
        let dt = total.saturating_sub(t0);
        if dt > 0 {
            let busy = 100.0 * dt.saturating_sub(idle.saturating_sub(i0)) as f64 / dt as f64;
            c.busy.push_back(busy);
            if c.busy.len() > CPU_WINDOW {
                c.busy.pop_front();
            }
        }
    }
    c.last = Some((total, idle));
    (c.busy.len() >= CPU_WINDOW).then(|| c.busy.iter().sum::<f64>() / c.busy.len() as f64)
}

/// The host's memory in use (percent of MemTotal not MemAvailable).
fn memory_used() -> Option<f64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let get = |k: &str| {
        m.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let (total, avail) = (get("MemTotal:")?, get("MemAvailable:")?);
    (total > 0.0).then(|| 100.0 * (total - avail) / total)
}

/// Evaluate once: raise what newly holds (or got worse or better), clear
/// what no longer does; each change is an event and a webhook delivery.
pub(crate) fn evaluate(
    s: &Shared,
    statuses: &Statuses,
    hook: Option<&tokio::sync::mpsc::UnboundedSender<serde_json::Value>>,
) {
    let now = conditions(s, statuses);
    let mut changes: Vec<(&'static str, Alert)> = Vec::new();
    {
        let mut active = s.alerts.active.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen = std::collections::BTreeSet::new();
        for (alert, disk, severity, message) in now {
            let key = (alert.clone(), disk.clone());
            seen.insert(key.clone());
            match active.get_mut(&key) {
                Some(a) if a.severity == severity => a.message = message,
                Some(a) => {
                    a.severity = severity;
                    a.message = message;
                    changes.push(("raised", a.clone()));
                }
                None => {
                    let ns = i64::try_from(tidemark_util::now_ns()).unwrap_or(i64::MAX);
                    let a = Alert {
                        alert,
                        disk_id: disk,
                        severity,
                        message,
                        since: tidemark_util::human::format_unix_time(ns / 1_000_000_000),
                        since_ns: ns,
                    };
                    active.insert(key, a.clone());
                    changes.push(("raised", a));
                }
            }
        }
        let gone: Vec<_> = active.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for k in gone {
            if let Some(a) = active.remove(&k) {
                changes.push(("cleared", a));
            }
        }
    }
    for (what, a) in changes {
        let text = format!("alert {} {what}: {}", a.alert, a.message);
        let severity = if what == "cleared" { Severity::Info } else { a.severity };
        if severity == Severity::Info {
            info!(disk = ?a.disk_id, "{text}");
        } else {
            warn!(disk = ?a.disk_id, "{text}");
        }
        s.event(a.disk_id.as_deref(), "alert", severity, &text, None);
        if let Some(tx) = hook {
            let _ = tx.send(serde_json::json!({
                "status": what,
                "alert": a.alert,
                "disk_id": a.disk_id,
                "severity": a.severity,
                "message": a.message,
                "since": a.since,
                "collector": s.cfg.api,
                "site": s.cfg.site,
            }));
        }
    }
}

/// Evaluate every [`EVERY`] until the collector stops (and take each
/// disk's history sample, `crate::history`); deliver changes to the
/// webhook, if one is set, from a task of its own.
pub(crate) async fn run(s: Arc<Shared>) {
    let hook = s.cfg.alert_webhook.clone().map(|url| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let agent = match &s.cfg.alert_webhook_tls {
            Some(tls) => ureq::AgentBuilder::new()
                .tls_connector(Arc::new(tidemark_net::https::UreqWebTls(tls.clone())))
                .build(),
            None => ureq::agent(),
        };
        s.tracker.spawn(deliver(url, agent, rx, s.stop.clone()));
        tx
    });
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = s.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let statuses: Statuses = s
            .all_disks()
            .into_iter()
            .map(|d| {
                let st = s.disk_status(&d);
                (d, st)
            })
            .collect();
        evaluate(&s, &statuses, hook.as_ref());
        // The same second's samples for the charts.
        crate::history::sample(&s, &statuses);
        crate::calls::schedule(&s);
    }
}

/// POST each change to `url` in order, retrying a failed delivery with
/// backoff (1 s doubling to 1 min) up to 10 times; at most
/// [`WEBHOOK_QUEUE`] wait.
async fn deliver(
    url: String,
    agent: ureq::Agent,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut queue: VecDeque<serde_json::Value> = VecDeque::new();
    loop {
        if queue.is_empty() {
            tokio::select! {
                () = stop.cancelled() => return,
                m = rx.recv() => match m { Some(m) => queue.push_back(m), None => return },
            }
        }
        while let Ok(m) = rx.try_recv() {
            queue.push_back(m);
        }
        while queue.len() > WEBHOOK_QUEUE {
            queue.pop_front();
            warn!(
                url,
                "alert webhook: more than {WEBHOOK_QUEUE} deliveries waiting; the oldest dropped"
            );
        }
        let Some(body) = queue.front().cloned() else {
            continue;
        };
        let mut backoff = Duration::from_secs(1);
        let mut tries = 0;
        loop {
            let (u, b, a) = (url.clone(), body.clone(), agent.clone());
            let r = tokio::task::spawn_blocking(move || {
                a.post(&u)
                    .timeout(Duration::from_secs(10))
                    .send_json(b)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match r {
                Ok(()) => break,
                Err(e) => {
                    tries += 1;
                    if tries >= 10 {
                        warn!(url, "alert webhook: giving up on a delivery after {tries} tries: {e}");
                        break;
                    }
                    warn!(
                        url,
                        "alert webhook: {e}; retrying in {}",
                        tidemark_util::human::format_duration(backoff)
                    );
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        queue.pop_front();
    }
}
