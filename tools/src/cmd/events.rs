//! `tidemark events`: the collector's event log (`GET /api/v1/events`) as
//! a table, newest last: what happened to the disks and the links, and
//! every operator action.

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct EventsArgs {
    /// Only this disk's events.
    disk: Option<String>,
    /// The collector's API (`HOST:PORT` or a URL).
    #[arg(long)]
    api: String,
    /// How many of the newest events (at most 1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// The events as JSON (the API's answer).
    #[arg(long)]
    json: bool,
}

pub fn events(a: EventsArgs) -> Result<()> {
    if let Some(d) = &a.disk {
        tidemark_wire::DiskId::parse(d).map_err(anyhow::Error::msg)?;
    }
    let mut path = format!("/api/v1/events?limit={}", a.limit);
    if let Some(d) = &a.disk {
        path.push_str(&format!("&disk={d}"));
    }
    let v = super::status::call_with(&a.api, "GET", &path, None).context("read the event log")?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<[String; 5]> = v["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or("-").to_string();
            let mut message = text("message");
            if let Some(w) = e["who"].as_str() {
                message = format!("{message} (by {w})");
            }
            [text("time"), text("disk_id"), text("kind"), text("severity"), message]
        })
        .collect();
    if rows.is_empty() {
        outln!(
            "no events{}",
            a.disk.as_deref().map(|d| format!(" for {d}")).unwrap_or_default()
        );
        return Ok(());
    }
    let w = |i: usize, head: &str| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .max()
            .unwrap_or(0)
            .max(head.len())
    };
    let (w0, w1, w2, w3) = (w(0, "TIME"), w(1, "DISK"), w(2, "KIND"), w(3, "SEVERITY"));
    outln!(
        "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  MESSAGE",
        "TIME",
        "DISK",
        "KIND",
        "SEVERITY"
    );
    for r in &rows {
        outln!("{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}", r[0], r[1], r[2], r[3], r[4]);
    }
    Ok(())
}
