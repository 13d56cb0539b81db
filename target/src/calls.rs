//! Answers to the configuration server's calls on a disk's connection
//! (`tidemark_wire::call`): its points with their drill results, its
//! drills, a drill now, and (in `session`, which owns the applier) its
//! retention.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tidemark_catalog::drill::{last_verified, read_drills, results, DrillResult};
use tidemark_wire::call::{Call, Retention};

use crate::retention::{DiskPolicy, OnFull};
use crate::session::Shared;

/// Most points one answer lists (the newest).
pub(crate) const MAX_POINTS: u32 = 5000;
/// Most drills one answer lists (each carries up to 64 KiB of output).
pub(crate) const MAX_DRILLS: u32 = 50;

/// Answer a call that does not need the applier; `Err` is the refusal.
pub(crate) async fn answer(shared: Arc<Shared>, disk: String, call: Call) -> Result<Value, String> {
    let dir = shared.cfg.data_dir.clone();
    match call {
        Call::Points { limit } => {
            let limit = limit.clamp(1, MAX_POINTS);
            blocking(move || {
                let pts = tidemark_recovery::newest_points_direct(&dir, &disk, Some(limit))?;
                let conn = tidemark_catalog::open_read_only(&dir)?;
                // The newest result at each seq drilled.
                let verified: HashMap<u64, DrillResult> = results(&conn, &disk)?.into_iter().collect();
                let points: Vec<Value> = pts
                    .into_iter()
                    .map(|p| {
                        let mut v = serde_json::to_value(&p).unwrap_or_default();
                        v["latest"] = json!(p.latest);
                        v["verified"] = json!(verified.get(&p.seq).map(|r| r.as_str()));
                        v
                    })
                    .collect();
                Ok(json!({"points": points, "last_verified": last_verified(&conn, &disk)?}))
            })
            .await
        }
        Call::Drills { limit } => {
            let limit = limit.clamp(1, MAX_DRILLS);
            blocking(move || {
                tidemark_recovery::points_direct(&dir, &disk)?;
                let conn = tidemark_catalog::open_read_only(&dir)?;
                Ok(json!({
                    "drills": read_drills(&conn, &disk, limit)?,
                    "last_verified": last_verified(&conn, &disk)?,
                }))
            })
            .await
        }
        Call::Drill { trigger } => {
            let trigger = match trigger.as_str() {
                "api" | "schedule" | "console" | "cli" => trigger,
                _ => "api".to_string(),
            };
            crate::drill::run(shared, disk, &trigger)
                .await
                .map(|d| json!(d))
                .map_err(|e| format!("{e:#}"))
        }
        Call::SetRetention(_) | Call::GetRetention => Err("retention is the disk's session's".into()),
        Call::Failover { at, name, format } => failover(shared, disk, at, name, format).await,
        Call::Tag { .. } => Err("tags are taken by the agent, not the target".into()),
    }
}

/// The control socket's blocking runner, its error as a call's refusal.
async fn blocking(f: impl FnOnce() -> anyhow::Result<Value> + Send + 'static) -> Result<Value, String> {
    crate::control::blocking(f).await.map_err(|e| format!("{e:#}"))
}

/// A retention from a call, checked.
pub(crate) fn policy_of(r: &Retention) -> Result<DiskPolicy, String> {
    let on_full = match r.on_full.as_str() {
        "prune" => OnFull::Prune,
        "stop" => OnFull::Stop,
        other => return Err(format!("on_full {other:?}: expected prune or stop")),
    };
    if r.max_bytes == Some(0) {
        return Err("max_bytes 0: give a cap above zero, or none".into());
    }
    Ok(DiskPolicy {
        window: std::time::Duration::from_secs(r.window_s),
        max_bytes: r.max_bytes,
        on_full,
        point_interval: std::time::Duration::from_millis(r.point_interval_ms),
    })
}

/// A policy as a call carries it.
pub(crate) fn retention_of(p: &DiskPolicy) -> Retention {
    Retention {
        window_s: p.window.as_secs(),
        max_bytes: p.max_bytes,
        on_full: p.on_full.as_str().to_string(),
        point_interval_ms: u64::try_from(p.point_interval.as_millis()).unwrap_or(u64::MAX),
    }
}

/// A failover asked through the API: `tidemark failover` (beside this
/// binary) writes the image to `DATA/DISK/failovers/NAME`, with its drain,
/// progress and failover record, its output in `NAME.log`. Answered as
/// soon as the tool runs (`{"output","log"}`): once the failover is
/// recorded this disk's connection ends, as after any failover, so its
/// end is not waited for here; the tool's last line goes to the log.
pub(crate) async fn failover(
    shared: Arc<Shared>,
    disk: String,
    at: String,
    name: String,
    format: String,
) -> Result<Value, String> {
    let name_ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && !name.ends_with(".log")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !name_ok {
        return Err(format!(
            "image name {name:?}: 1 to 100 of A-Z a-z 0-9 . _ -, not starting with a dot nor ending in .log (it is a file in the disk's failovers folder)"
        ));
    }
    if !["raw", "vmdk-flat", "vmdk-sparse", "vmdk-stream"].contains(&format.as_str()) {
        return Err(format!(
            "format {format:?}: expected raw, vmdk-flat, vmdk-sparse or vmdk-stream"
        ));
    }
    if at.is_empty() || at.len() > 300 || at.chars().any(char::is_control) {
        return Err("the point (at) is empty, too long or holds control characters".into());
    }
    if shared.is_failed_over(&disk) {
        return Err(format!("disk {disk} is already failed over"));
    }
    let tool = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.join("tidemark")))
        .filter(|t| t.is_file())
        .ok_or("the tidemark tool is not installed beside tidemark-target: a failover needs it")?;
    let dir = shared.cfg.data_dir.clone();
    blocking(move || {
        tidemark_recovery::points_direct(&dir, &disk)?;
        let out_dir = tidemark_catalog::layout::disk_dir(&dir, &disk).join("failovers");
        std::fs::create_dir_all(&out_dir)?;
        let output = out_dir.join(&name);
        if output.exists() {
            anyhow::bail!("{} exists already: name another image", output.display());
        }
        let log_path = out_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut child = std::process::Command::new(&tool)
            .args(["failover", "--data"])
            .arg(&dir)
            .arg(&disk)
            .args(["--at", &at, "--format", &format, "--drain-timeout", "2m", "--output"])
            .arg(&output)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        tracing::warn!(disk, at, output = %output.display(), "failover asked through the API: tidemark failover runs");
        let (d, o) = (disk.clone(), output.clone());
        std::thread::spawn(move || match child.wait() {
            Ok(s) if s.success() => tracing::warn!(disk = d, output = %o.display(), "failover done"),
            Ok(s) => tracing::error!(disk = d, output = %o.display(), "tidemark failover failed ({s}): see its log"),
            Err(e) => tracing::error!(disk = d, "tidemark failover: {e}"),
        });
        Ok(json!({
            "output": output.display().to_string(),
            "log": log_path.display().to_string(),
        }))
    })
    .await
}
