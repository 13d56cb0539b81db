//! `tidemark agent-status`: ask a running agent through its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use tidemark_util::human::{format_duration, format_size};

#[derive(Args)]
pub struct AgentStatusArgs {
    /// The agent's state directory.
    #[arg(long)]
    agent: PathBuf,
    /// Print the raw JSON object.
    #[arg(long)]
    json: bool,
    /// Print the agent's metrics in Prometheus text format instead.
    #[arg(long, conflicts_with = "json")]
    metrics: bool,
}

/// Send one request to the agent's control socket and return the reply.
pub fn request(state: &std::path::Path, req: &Value) -> Result<Value> {
    let path = state.join("control.sock");
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to {} (is the agent running?)", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("no answer from the agent")?;
    let v: Value = serde_json::from_str(&line).context("the agent's answer is not JSON")?;
    if v["ok"] != Value::Bool(true) {
        bail!("agent refused: {}", v["error"].as_str().unwrap_or("(no reason given)"));
    }
    Ok(v)
}

/// The collector link: where, connected or not, what it acknowledged.
fn replication(s: &Value) -> String {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    match s["collector"].as_str() {
        None => "journal only (no collector)".into(),
        Some(c) => format!(
            "{} to {c} over {}, acked seq {}, backlog {}",
            if s["collector_connected"] == Value::Bool(true) {
                s["replication_mode"].as_str().unwrap_or("?")
            } else if s["fenced"].is_string() {
                "fenced (a failover ended this generation; writes stay tracked)"
            } else {
                "disconnected"
            },
            s["collector_security"].as_str().unwrap_or("?"),
            n("acked_seq"),
            format_size(n("journal_backlog_bytes"))
        ),
    }
}

/// The running sync: kind, bytes, rate, ETA.
fn sync_line(y: &Value) -> String {
    if y.is_null() {
        return "none running".into();
    }
    let n = |k: &str| y[k].as_u64().unwrap_or(0);
    let eta = y["eta_s"]
        .as_u64()
        .map_or_else(|| "unknown".to_string(), |e| format_duration(Duration::from_secs(e)));
    format!(
        "{} from seq {}: {} of {} ({:.1}%), {}/s, eta {eta}{}",
        y["kind"].as_str().unwrap_or("?"),
        n("start_seq"),
        format_size(n("done_bytes")),
        format_size(n("total_bytes")),
        y["percent"].as_f64().unwrap_or(0.0),
        format_size(n("rate_bps")),
        if y["paused"] == Value::Bool(true) {
            " (paused)"
        } else {
            ""
        }
    )
}

pub fn status(a: AgentStatusArgs) -> Result<()> {
    if a.metrics {
        let v = request(&a.agent, &serde_json::json!({"cmd": "metrics"}))?;
        crate::out::text(v["metrics"].as_str().unwrap_or_default());
        return Ok(());
    }
    let v = request(&a.agent, &serde_json::json!({"cmd": "status"}))?;
    let s = &v["status"];
    if a.json {
        outln!("{s}");
        return Ok(());
    }
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let rows = [
        (
            "disk",
            format!(
                "{} ({})",
                s["disk_id"].as_str().unwrap_or("?"),
                s["disk_uuid"].as_str().unwrap_or("?")
            ),
        ),
        (
            "backing",
            format!(
                "{} ({})",
                s["disk_path"].as_str().unwrap_or("?"),
                format_size(n("disk_size_bytes"))
            ),
        ),
        (
            "mode",
            format!(
                "{}{}",
                s["mode"].as_str().unwrap_or("?"),
                if s["resync_required"] == Value::Bool(true) {
                    " (full resync required: machine crash)".to_string()
                } else if let Some(q) = s["quiesced_at_seq"].as_u64() {
                    format!(" (quiesced for a failback at seq {q}: writes refused; tidemark resume lifts it)")
                } else {
                    String::new()
                }
            ),
        ),
        ("served as", s["served_as"].as_str().unwrap_or("-").to_string()),
        ("generation", s["generation"].as_str().unwrap_or("-").to_string()),
        ("replication", replication(s)),
        ("fenced", s["fenced"].as_str().unwrap_or("no").to_string()),
        ("target applied seq", {
            let a = n("target_applied_seq");
            if a == 0 {
                "not known yet".to_string()
            } else {
                a.to_string()
            }
        }),
        ("not applied, past journal", {
            let u = &s["unapplied"];
            let m = |k: &str| u[k].as_u64().unwrap_or(0);
            format!(
                "{} in {} regions ({} epochs)",
                format_size(m("bytes")),
                m("regions"),
                m("epochs")
            )
        }),
        ("sync", sync_line(&s["sync"])),
        ("full resyncs", n("full_resyncs").to_string()),
        ("mode changes", n("mode_changes").to_string()),
        ("last seq", n("last_seq").to_string()),
        ("consumed seq", n("consumed_seq").to_string()),
        (
            "journal",
            format!(
                "{} of {} cap, {} segments",
                format_size(n("journal_bytes")),
                format_size(n("journal_cap_bytes")),
                n("journal_segments")
            ),
        ),
        (
            "dirty bitmap",
            format!(
                "{} regions, {}",
                n("bitmap_dirty_regions"),
                format_size(n("bitmap_dirty_bytes"))
            ),
        ),
        ("writes", format!("{} ({})", n("writes"), format_size(n("write_bytes")))),
        (
            "hash-compared",
            format!(
                "{}, {} equal (not sent)",
                format_size(n("compare_bytes")),
                format_size(n("compare_equal_bytes"))
            ),
        ),
        ("reads", format!("{} ({})", n("reads"), format_size(n("read_bytes")))),
        (
            "flushes / trims / zeroes",
            format!("{} / {} / {}", n("flushes"), n("trims"), n("zeroes")),
        ),
        (
            "errors (I/O / tracking)",
            format!("{} / {}", n("io_errors"), n("tracking_errors")),
        ),
        ("uptime", format_duration(Duration::from_secs(n("uptime_s")))),
    ];
    for (k, v) in rows {
        outln!("{k:<26} {v}");
    }
    Ok(())
}
