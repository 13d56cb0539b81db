//! `tidemark points`, and what `mount` and `failover` share with it:
//! recovery points as the tools print them, and opening the image a point
//! is read through.
//!
//! Everything that touches the target's data goes through the
//! `tidemark_recovery` library (`docs/recovery.md`), which owns the
//! `--at` parser, views and their pinning, over `tidemark_catalog`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use tidemark_recovery as r;
use tidemark_recovery::overlay::{FileImage, Image};

pub use tidemark_recovery::{format_time, AtSpec as At, Point as PointInfo};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  tidemark points --data /var/lib/tidemark/target db1\n  tidemark points --data /var/lib/tidemark/target db1 --json"
)]
pub struct PointsArgs {
    /// The target's data directory.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The disk id.
    disk: tidemark_wire::DiskId,
    /// Print one JSON object: {"points":[{"seq","time","kind","tag","latest","verified"}]}.
    #[arg(long)]
    json: bool,
}

/// A point as `points --json` prints it.
pub fn point_json(p: &PointInfo) -> serde_json::Value {
    serde_json::json!({
        "seq": p.seq,
        "time": format_time(p.time_ns),
        "kind": p.kind.as_str(),
        "tag": p.tag,
        "latest": p.latest,
    })
}

/// Open a pinned view of `disk` at `at`.
pub fn open_view(data: &Path, disk: &str, at: &At) -> Result<(Arc<dyn Image>, PointInfo)> {
    let v = r::View::open(data, disk, at)?;
    let p = v.point().clone();
    Ok((Arc::new(v), p))
}

/// What `mount` and `failover` read: a recovery point (`--data`, `DISK`,
/// `--at`) and which point it is, or a raw image file (`--image`).
pub fn open_source(
    data: Option<&Path>,
    disk: Option<&str>,
    at: Option<&str>,
    image: Option<&Path>,
) -> Result<(Arc<dyn Image>, Option<PointInfo>)> {
    if let Some(i) = image {
        return Ok((Arc::new(FileImage::open(i)?), None));
    }
    let (Some(data), Some(disk), Some(at)) = (data, disk, at) else {
        bail!("name the point: --data DIR DISK --at SPEC");
    };
    let spec = At::parse(at)?;
    let (img, p) = open_view(data, disk, &spec)?;
    Ok((img, Some(p)))
}

/// The disk's recovery points, oldest first.
pub fn list(data: &Path, disk: &str) -> Result<Vec<PointInfo>> {
    Ok(r::points(data, disk)?)
}

pub fn points(a: PointsArgs) -> Result<()> {
    let pts = list(&a.data, &a.disk)?;
    // The newest drill result at each seq drilled ("passed": verified).
    let drills = r::drills(&a.data, &a.disk, 50)?;
    let verified = |seq: u64| drills.iter().find(|d| d.seq == seq).map(|d| d.result.as_str());
    let last = drills
        .iter()
        .find(|d| d.result == tidemark_catalog::drill::DrillResult::Passed);
    if a.json {
        let v: Vec<_> = pts
            .iter()
            .map(|p| {
                let mut j = point_json(p);
                j["verified"] = serde_json::json!(verified(p.seq));
                j
            })
            .collect();
        let lv = last.map(|d| serde_json::json!({"seq": d.seq, "time": format_time(d.point_time_ns), "drill": d.id}));
        outln!("{}", serde_json::json!({ "points": v, "last_verified": lv }));
        return Ok(());
    }
    if pts.is_empty() {
        outln!("no recovery points for {}", a.disk);
        return Ok(());
    }
    let rows: Vec<[String; 5]> = pts
        .iter()
        .map(|p| {
            [
                format_time(p.time_ns),
                p.seq.to_string(),
                p.kind.as_str().to_string(),
                verified(p.seq).unwrap_or("").to_string(),
                match (&p.tag, p.latest) {
                    (Some(t), _) => t.clone(),
                    (None, true) => "(latest: every applied write)".to_string(),
                    (None, false) => String::new(),
                },
            ]
        })
        .collect();
    let w = |i: usize, h: &str| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(h.len());
    let (w0, w1, w2, w3) = (w(0, "TIME"), w(1, "SEQ"), w(2, "KIND"), w(3, "DRILL"));
    outln!(
        "{:<w0$}  {:>w1$}  {:<w2$}  {:<w3$}  TAG",
        "TIME",
        "SEQ",
        "KIND",
        "DRILL"
    );
    for r in rows {
        outln!("{:<w0$}  {:>w1$}  {:<w2$}  {:<w3$}  {}", r[0], r[1], r[2], r[3], r[4]);
    }
    match last {
        Some(d) => outln!(
            "last verified recoverable point: seq {} ({}, {} old; drill {})",
            d.seq,
            format_time(d.point_time_ns),
            tidemark_util::human::format_duration(std::time::Duration::from_nanos(
                tidemark_util::now_ns().saturating_sub(d.point_time_ns)
            )),
            d.id
        ),
        None => outln!(
            "no point of {} has passed a drill yet (tidemark drill --data DIR {})",
            a.disk,
            a.disk
        ),
    }
    Ok(())
}
