//! `tidemark status` and `tidemark wait`: read the collector's HTTP API
//! (`docs/pipeline.md`, "Status API").

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;
use tidemark_util::human::{format_duration, format_size, parse_duration};

#[derive(Args)]
pub struct StatusArgs {
    /// The collector's API address (`http://HOST:PORT` or `HOST:PORT`).
    #[arg(long)]
    api: String,
    /// Print one JSON object with a `disks` array.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct WaitArgs {
    /// The collector's API address (`http://HOST:PORT` or `HOST:PORT`).
    #[arg(long)]
    api: String,
    /// The disk id to wait for.
    disk: String,
    /// Give up after this long (e.g. `90s`, `10m`).
    #[arg(long, default_value = "30m", value_parser = parse_timeout)]
    timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn base(api: &str) -> String {
    let a = api.trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_string()
    } else {
        format!("http://{a}")
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build()
}

/// GET or POST `path` and parse the JSON reply; an HTTP error carries the
/// API's own message.
fn call(api: &str, method: &str, path: &str) -> Result<Value> {
    let url = format!("{}{path}", base(api));
    match agent().request(method, &url).call() {
        Ok(r) => r.into_json().with_context(|| format!("{url}: reply is not JSON")),
        Err(ureq::Error::Status(code, r)) => {
            let body: Value = r.into_json().unwrap_or(Value::Null);
            let msg = body["error"].as_str().map(str::to_string).unwrap_or_default();
            Err(anyhow!(
                "{url}: HTTP {code}{}{msg}",
                if msg.is_empty() { "" } else { ": " }
            ))
        }
        Err(e) => Err(anyhow!("{url}: {e} (is the collector running with --api?)")),
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn mode_text(d: &Value) -> String {
    let mode = d["mode"].as_str().unwrap_or("?");
    match d["sync_percent"].as_f64() {
        Some(p) if matches!(mode, "initial-sync" | "resync" | "full-resync") => format!("{mode} {p:.0}%"),
        _ => mode.to_string(),
    }
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

pub fn status(a: StatusArgs) -> Result<()> {
    let v = call(&a.api, "GET", "/api/v1/status")?;
    if a.json {
        println!("{v}");
        return Ok(());
    }
    let c = &v["collector"];
    println!(
        "collector: {} agents connected, spool {} of {}{}",
        u(c, "agents_connected"),
        format_size(u(c, "spool_bytes")),
        format_size(u(c, "spool_cap_bytes")),
        if c["spool_full"] == Value::Bool(true) {
            " (FULL: agents are held back)"
        } else {
            ""
        }
    );
    let disks = v["disks"].as_array().cloned().unwrap_or_default();
    if disks.is_empty() {
        println!("no disks");
        return Ok(());
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
    ];
    let mut rows = vec![head.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for d in &disks {
        rows.push(vec![
            d["disk_id"].as_str().unwrap_or("?").to_string(),
            mode_text(d),
            u(d, "source_seq").to_string(),
            u(d, "acked_seq").to_string(),
            u(d, "applied_seq").to_string(),
            secs(&d["lag_seconds"]),
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
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    for d in &disks {
        if d["mode"] == "halted" {
            println!(
                "{}: HALTED at seq {} (a record failed its check; the range is being resynced)",
                d["disk_id"].as_str().unwrap_or("?"),
                u(d, "halted_seq")
            );
        }
    }
    Ok(())
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

/// Waits between polls of the API.
const POLL: Duration = Duration::from_millis(200);

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
                std::thread::sleep(POLL);
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
        let err = match got {
            Ok(d) => {
                let applied = u(&d, "applied_seq");
                if applied >= target && !syncing(&d) {
                    println!(
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
                "applied seq {} of {target}, mode {}{}, target {}, lag {}",
                u(d, "applied_seq"),
                mode_text(d),
                match (d["mode"].as_str(), d["agent_mode"].as_str()) {
                    (Some("disconnected"), Some(m)) => format!(" (agent last reported {m})"),
                    _ => String::new(),
                },
                d["target_state"].as_str().unwrap_or("unknown"),
                secs(&d["lag_seconds"])
            ),
            None => format!("target seq {target}"),
        };
        let err_text = err.as_ref().map(|e| format!("; last error: {e:#}")).unwrap_or_default();
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
        std::thread::sleep(POLL);
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
}
