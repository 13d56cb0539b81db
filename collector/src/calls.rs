//! The configuration server's side of the line: calls down a disk's
//! connections (`tidemark_wire::call`: the target's points, drills and
//! retention, the agent's tags), each disk's policy, and drills, on demand
//! and on the policy's schedule (`docs/pipeline.md`, "Calls";
//! `docs/operations.md`, "Policies and drills").
//!
//! ```text
//!  API ──call_target──▶ DiskState.to_target ──Call──▶ target session ──Reply──▶ forward::read_loop ──▶ waiter
//!      ──call_agent───▶ AgentLink.tx        ──Call──▶ agent shipper  ──Reply──▶ agent::session      ──▶ waiter
//! ```
//!
//! A call waits for its reply (matched by nonce) up to its own limit; a
//! reply that comes later finds no waiter and is dropped. The policy is
//! kept in the catalog (`policies`); its retention part lives at the
//! target, which is told on every change and on every new connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tidemark_wire::call::{Call, Retention};
use tidemark_wire::frame::Frame;
use tokio::sync::oneshot;
use tracing::{info, warn, Instrument};

use crate::catalog::Severity;
use crate::state::{Disk, Out, Shared};

/// How long a scheduled drill is waited for.
pub(crate) const SCHEDULED_DRILL_WAIT: Duration = Duration::from_secs(40 * 60);
/// How long the quick calls (points, drills, retention, tags) wait.
pub(crate) const CALL_WAIT: Duration = Duration::from_secs(30);

/// Why a call has no answer.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Nobody to ask: the target's (or agent's) connection is down.
    NotConnected(&'static str),
    /// The connection ended before the reply.
    Left(&'static str),
    TimedOut(&'static str),
    /// The peer refused, saying why.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotConnected(who) => write!(f, "the {who} is not connected"),
            Self::Left(who) => write!(f, "the {who}'s connection ended before it answered"),
            Self::TimedOut(who) => write!(f, "the {who} did not answer in time"),
            Self::Refused(why) => f.write_str(why),
        }
    }
}

/// Replies waited for: nonce, whom it was asked of, the caller.
pub(crate) type Waiters = Vec<(u64, &'static str, oneshot::Sender<(bool, String)>)>;

/// A Reply from `who` (`target`, `agent`): wake its caller. Only a call
/// made of that peer matches: an agent cannot answer the target's calls
/// (and claim a drill passed).
pub(crate) fn note_reply(disk: &Disk, who: &str, nonce: u64, ok: bool, body: String) {
    let w = {
        let mut st = disk.lock();
        st.call_waiters
            .iter()
            .position(|(n, w, _)| *n == nonce && *w == who)
            .map(|i| st.call_waiters.swap_remove(i).2)
    };
    match w {
        Some(w) => {
            let _ = w.send((ok, body));
        }
        None => tracing::debug!(nonce, "a reply nobody waits for (its caller gave up)"),
    }
}

/// Ask the disk's target; its answer.
pub(crate) async fn call_target(s: &Shared, disk: &Disk, call: &Call, wait: Duration) -> Result<Value, CallError> {
    let nonce = s.next_nonce();
    let (tx, rx) = oneshot::channel();
    {
        let mut st = disk.lock();
        let to = st.to_target.clone().ok_or(CallError::NotConnected("target"))?;
        st.call_waiters.push((nonce, "target", tx));
        if to
            .send(Frame::Call {
                nonce,
                body: call.to_json(),
            })
            .is_err()
        {
            st.call_waiters.retain(|(n, _, _)| *n != nonce);
            return Err(CallError::Left("target"));
        }
    }
    wait_reply(disk, nonce, rx, wait, "target").await
}

/// Ask the disk's agent; its answer.
pub(crate) async fn call_agent(s: &Shared, disk: &Disk, call: &Call, wait: Duration) -> Result<Value, CallError> {
    let nonce = s.next_nonce();
    let (tx, rx) = oneshot::channel();
    let agent = {
        let mut st = disk.lock();
        let agent = st
            .agent
            .as_ref()
            .map(|a| a.tx.clone())
            .ok_or(CallError::NotConnected("agent"))?;
        st.call_waiters.push((nonce, "agent", tx));
        agent
    };
    let frame = Frame::Call {
        nonce,
        body: call.to_json(),
    };
    if tokio::time::timeout(wait, agent.send(Out { frame, done: None }))
        .await
        .map_or(true, |r| r.is_err())
    {
        disk.lock().call_waiters.retain(|(n, _, _)| *n != nonce);
        return Err(CallError::Left("agent"));
    }
    wait_reply(disk, nonce, rx, wait, "agent").await
}

async fn wait_reply(
    disk: &Disk,
    nonce: u64,
    rx: oneshot::Receiver<(bool, String)>,
    wait: Duration,
    who: &'static str,
) -> Result<Value, CallError> {
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok((ok, body))) => {
            let v: Value = serde_json::from_str(&body)
                .map_err(|e| CallError::Refused(format!("the {who}'s reply is not JSON: {e}")))?;
            if ok {
                Ok(v)
            } else {
                Err(CallError::Refused(
                    v.as_str().map_or_else(|| v.to_string(), str::to_string),
                ))
            }
        }
        Ok(Err(_)) => Err(CallError::Left(who)),
        Err(_) => {
            disk.lock().call_waiters.retain(|(n, _, _)| *n != nonce);
            Err(CallError::TimedOut(who))
        }
    }
}

/// Callers still waiting on `who`'s connection (`target`, `agent`) when
/// it ends learn it at once (dropping their senders wakes them: `Left`).
pub(crate) fn connection_ended(disk: &Disk, who: &str) {
    disk.lock().call_waiters.retain(|(_, w, _)| *w != who);
}

/// A disk's policy (`GET/PUT /api/v1/disks/{id}/policy`). The retention
/// part is the target's; the rest is the collector's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Policy {
    /// The RPO alert's threshold in seconds (critical at twice); None:
    /// the collector's `--alert-rpo`.
    pub rpo_s: Option<u64>,
    /// Drill the newest point this often, in seconds; 0: no schedule.
    #[serde(default)]
    pub drill_interval_s: u64,
    /// Warn when the last verified point is older than this (seconds);
    /// None: twice the drill interval (no alert without a schedule).
    pub verified_max_age_s: Option<u64>,
    /// The retention last set through the API (None: the target's own).
    pub retention: Option<Retention>,
}

impl Policy {
    /// The age past which the last verified point raises an alert.
    pub(crate) fn verified_max_age(&self) -> Option<Duration> {
        match (self.verified_max_age_s, self.drill_interval_s) {
            (Some(s), _) => Some(Duration::from_secs(s)),
            (None, 0) => None,
            (None, i) => Some(Duration::from_secs(i.saturating_mul(2))),
        }
    }
}

/// What the collector knows of a disk from its target's replies: its
/// drills and its newest point.
#[derive(Clone, Debug, Default)]
pub(crate) struct FromTarget {
    /// The newest drill (the target's record, without its output).
    pub last: Option<Value>,
    /// The newest passed drill.
    pub last_verified: Option<Value>,
    /// A drill asked by this collector is running.
    pub running: bool,
    /// When this collector last started one (Unix ns), or learnt of one.
    pub last_started_ns: u64,
    /// The target has told what it holds (a schedule waits for this).
    pub known: bool,
    /// The disk's newest recovery point, as last asked (`DiskView.last_point`).
    pub last_point: Option<Value>,
    /// When it was last asked for (Unix ns; 0: never), and whether a
    /// question is out.
    pub point_asked_ns: u64,
    pub point_asking: bool,
}

/// Policies, and what each disk's target said, by disk.
#[derive(Default)]
pub(crate) struct Book {
    policies: Mutex<BTreeMap<String, Policy>>,
    known: Mutex<BTreeMap<String, FromTarget>>,
}

impl Book {
    pub(crate) fn policy(&self, disk: &str) -> Policy {
        self.policies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(disk)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn known(&self, disk: &str) -> FromTarget {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(disk)
            .cloned()
            .unwrap_or_default()
    }

    fn with_known<T>(&self, disk: &str, f: impl FnOnce(&mut FromTarget) -> T) -> T {
        f(self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(disk.to_string())
            .or_default())
    }
}

/// Load the stored policies (at start).
pub(crate) fn load(s: &Shared) -> anyhow::Result<()> {
    let mut map = BTreeMap::new();
    for (disk, json) in s.catalog.policies()? {
        match serde_json::from_str::<Policy>(&json) {
            Ok(p) => {
                map.insert(disk, p);
            }
            Err(e) => warn!(disk, "the stored policy is unreadable, the defaults apply: {e}"),
        }
    }
    *s.book.policies.lock().unwrap_or_else(PoisonError::into_inner) = map;
    Ok(())
}

/// Store a disk's policy (catalog first, then memory).
pub(crate) fn store(s: &Shared, disk: &str, p: &Policy) -> anyhow::Result<()> {
    s.catalog.set_policy(disk, &serde_json::to_string(p)?)?;
    s.book
        .policies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(disk.to_string(), p.clone());
    Ok(())
}

/// Remember what a drills answer says (newest drill, last verified).
fn note_drills(s: &Shared, disk: &str, v: &Value) {
    let strip = |d: &Value| {
        let mut d = d.clone();
        if let Some(o) = d.as_object_mut() {
            o.remove("output");
        }
        d
    };
    s.book.with_known(disk, |st| {
        st.known = true;
        if let Some(d) = v["drills"].as_array().and_then(|a| a.first()) {
            st.last = Some(strip(d));
            st.last_started_ns = st.last_started_ns.max(d["started_ns"].as_u64().unwrap_or(0));
        }
        st.last_verified = v["last_verified"].as_object().map(|_| strip(&v["last_verified"]));
    });
}

/// A target session is up: tell it the disk's retention (if the API set
/// one) and learn its drills. Best effort, off the session's path.
pub(crate) fn target_connected(s: &Arc<Shared>, disk: &Arc<Disk>) {
    let (s, d) = (s.clone(), disk.clone());
    tokio::spawn(
        async move {
            if let Some(r) = s.book.policy(d.id.as_str()).retention {
                match call_target(&s, &d, &Call::SetRetention(r), CALL_WAIT).await {
                    Ok(_) => info!("the disk's retention was given to the target"),
                    Err(e) => warn!("the target did not take the disk's retention: {e}"),
                }
            }
            match call_target(&s, &d, &Call::Drills { limit: 1 }, CALL_WAIT).await {
                Ok(v) => note_drills(&s, d.id.as_str(), &v),
                Err(e) => tracing::debug!("the target's drills: {e}"),
            }
        }
        .in_current_span(),
    );
}

/// Run a drill now and wait up to `wait` for it: the recorded drill. Its
/// result is an event (and, failed, an alert, from `crate::alerts`).
pub(crate) async fn drill(
    s: &Arc<Shared>,
    disk: &Arc<Disk>,
    trigger: &str,
    wait: Duration,
) -> Result<Value, CallError> {
    let id = disk.id.to_string();
    let started = s.book.with_known(&id, |st| {
        if st.running {
            false
        } else {
            st.running = true;
            st.last_started_ns = tidemark_util::now_ns();
            true
        }
    });
    if !started {
        return Err(CallError::Refused(format!("a drill of disk {id} is already running")));
    }
    // The drill goes on past `wait`: its result is noted when it comes.
    let (s2, d2, trig) = (s.clone(), disk.clone(), trigger.to_string());
    let job = tokio::spawn(
        async move {
            let r = call_target(&s2, &d2, &Call::Drill { trigger: trig }, SCHEDULED_DRILL_WAIT).await;
            let id = d2.id.to_string();
            s2.book.with_known(&id, |st| st.running = false);
            match &r {
                Ok(v) => {
                    let result = v["result"].as_str().unwrap_or("?");
                    let sev = match result {
                        "passed" | "skipped" => Severity::Info,
                        "failed" => Severity::Critical,
                        _ => Severity::Warning,
                    };
                    s2.event(
                        Some(&id),
                        "drill",
                        sev,
                        &format!("drill {} {result}: {}", v["id"], v["summary"].as_str().unwrap_or("")),
                        None,
                    );
                    // The newest drill and, if this one passed, the last verified.
                    let passed = (result == "passed").then(|| v.clone());
                    let last_verified = passed.or_else(|| s2.book.known(&id).last_verified);
                    note_drills(
                        &s2,
                        &id,
                        &serde_json::json!({"drills": [v], "last_verified": last_verified}),
                    );
                }
                Err(e) => s2.event(
                    Some(&id),
                    "drill",
                    Severity::Warning,
                    &format!("drill not run: {e}"),
                    None,
                ),
            }
            r
        }
        .in_current_span(),
    );
    match tokio::time::timeout(wait, job).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(CallError::Refused(format!("the drill's task failed: {e}"))),
        Err(_) => Err(CallError::TimedOut("target")),
    }
}

/// How often a connected disk's newest point is asked for.
const POINT_EVERY_NS: u64 = 10_000_000_000;

/// Ask the target for the disk's newest point if it was not asked within
/// [`POINT_EVERY_NS`] (one small call per disk every 10 s).
fn refresh_point(s: &Arc<Shared>, d: &Arc<Disk>, now: u64) {
    let id = d.id.to_string();
    let due = s.book.with_known(&id, |st| {
        let due = !st.point_asking && now.saturating_sub(st.point_asked_ns) >= POINT_EVERY_NS;
        if due {
            st.point_asking = true;
            st.point_asked_ns = now;
        }
        due
    });
    if !due {
        return;
    }
    let (s, d) = (s.clone(), d.clone());
    tokio::spawn(async move {
        let r = call_target(&s, &d, &Call::Points { limit: 1 }, CALL_WAIT).await;
        let newest = r
            .ok()
            .and_then(|v| v["points"].as_array().and_then(|a| a.last().cloned()));
        s.book.with_known(d.id.as_str(), |st| {
            st.point_asking = false;
            if newest.is_some() {
                st.last_point = newest;
            }
        });
    });
}

/// Start the drills the policies' schedules owe, and refresh each disk's
/// newest point (called every second).
pub(crate) fn schedule(s: &Arc<Shared>) {
    let now = tidemark_util::now_ns();
    for d in s.all_disks() {
        let id = d.id.to_string();
        if d.lock().target_connected {
            refresh_point(s, &d, now);
        }
        let every = s.book.policy(&id).drill_interval_s;
        let ready = {
            // A replica being synced has no point to drill yet.
            let st = d.lock();
            st.target_connected
                && st
                    .target_state
                    .is_some_and(|t| t.state == tidemark_wire::frame::ReplicaState::Consistent)
        };
        if every == 0 || !ready {
            continue;
        }
        let st = s.book.known(&id);
        if !st.known || st.running || now.saturating_sub(st.last_started_ns) < every.saturating_mul(1_000_000_000) {
            continue;
        }
        let (s, d) = (s.clone(), d.clone());
        tokio::spawn(async move {
            let _ = drill(&s, &d, "schedule", SCHEDULED_DRILL_WAIT).await;
        });
    }
}

/// A disk's last verified recoverable point (`DiskView.last_verified`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct VerifiedView {
    /// The point's seq.
    pub seq: u64,
    /// The point's source time (UTC, readable) and in Unix nanoseconds.
    pub point_time: String,
    pub point_time_ns: u64,
    /// How old the point is now, in seconds.
    pub age_s: f64,
    /// The drill that verified it.
    pub drill_id: u64,
}

/// A disk's newest recovery point (`DiskView.last_point`), as the target
/// said at most ~10 s ago.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PointBrief {
    pub seq: u64,
    /// Its source time (UTC, readable) and in Unix nanoseconds.
    pub time: String,
    pub time_ns: u64,
    /// How old the point is now, in seconds.
    pub age_s: f64,
    /// crash, app, tag.
    pub kind: String,
    pub tag: Option<String>,
}

/// A disk's newest drill, in brief (`DiskView.last_drill`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DrillBrief {
    pub id: u64,
    /// passed, failed, skipped, error.
    pub result: String,
    pub seq: u64,
    /// When it started (UTC, readable).
    pub started: String,
    pub summary: String,
}

/// Unix nanoseconds as UTC, readable.
pub(crate) fn utc(ns: u64) -> String {
    tidemark_util::human::format_unix_time(i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX))
}

impl Book {
    /// The disk's last verified point and newest drill, as the status shows them.
    pub(crate) fn last_point(&self, disk: &str) -> Option<PointBrief> {
        let p = self.known(disk).last_point?;
        let t = p["time_ns"].as_u64().unwrap_or(0);
        Some(PointBrief {
            seq: p["seq"].as_u64().unwrap_or(0),
            time: utc(t),
            time_ns: t,
            age_s: tidemark_util::now_ns().saturating_sub(t) as f64 / 1e9,
            kind: p["kind"].as_str().unwrap_or("").to_string(),
            tag: p["tag"].as_str().map(str::to_string),
        })
    }

    pub(crate) fn views(&self, disk: &str) -> (Option<VerifiedView>, Option<DrillBrief>) {
        let d = self.known(disk);
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        let verified = d.last_verified.as_ref().map(|v| VerifiedView {
            seq: n(v, "seq"),
            point_time: utc(n(v, "point_time_ns")),
            point_time_ns: n(v, "point_time_ns"),
            age_s: tidemark_util::now_ns().saturating_sub(n(v, "point_time_ns")) as f64 / 1e9,
            drill_id: n(v, "id"),
        });
        let brief = d.last.as_ref().map(|v| DrillBrief {
            id: n(v, "id"),
            result: v["result"].as_str().unwrap_or("").to_string(),
            seq: n(v, "seq"),
            started: utc(n(v, "started_ns")),
            summary: v["summary"].as_str().unwrap_or("").to_string(),
        });
        (verified, brief)
    }
}
