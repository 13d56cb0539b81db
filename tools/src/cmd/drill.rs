//! `tidemark drill`: prove that a disk's newest point recovers. The
//! running target opens a view at it over a throwaway copy-on-write layer
//! and runs each filesystem's checker read-only (`docs/recovery.md`,
//! "Drills"); the result is recorded with the point. `--history` lists the
//! drills recorded.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use tidemark_catalog::drill::{Drill, DrillResult};
use tidemark_recovery as r;
use tidemark_recovery::format_time;

#[derive(Args)]
pub struct DrillArgs {
    /// The target's data directory (the target must be running).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The disk id.
    disk: tidemark_wire::DiskId,
    /// List the disk's drills instead of running one.
    #[arg(long)]
    history: bool,
    /// With --history: how many (newest first).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    limit: u32,
    /// Print the checker's whole output (a drill), or each drill's.
    #[arg(long)]
    verbose: bool,
    /// Print JSON: the drill, or {"drills":[…]}.
    #[arg(long)]
    json: bool,
    /// Give up waiting for the drill after this long (it still finishes
    /// and is recorded).
    #[arg(long, value_name = "DUR", default_value = "35m", value_parser = parse_dur)]
    timeout: Duration,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    tidemark_util::human::parse_duration(s).map_err(|e| e.to_string())
}

pub fn drill(a: DrillArgs) -> Result<()> {
    if a.history {
        let drills = r::drills(&a.data, &a.disk, a.limit)?;
        if a.json {
            outln!("{}", serde_json::json!({ "drills": drills }));
            return Ok(());
        }
        if drills.is_empty() {
            outln!(
                "no drills recorded for {} (tidemark drill --data DIR {})",
                a.disk,
                a.disk
            );
            return Ok(());
        }
        outln!(
            "{:>5}  {:<25}  {:>10}  {:<7}  {:>8}  {:<8}  SUMMARY",
            "DRILL",
            "STARTED",
            "SEQ",
            "RESULT",
            "TOOK",
            "BY"
        );
        for d in &drills {
            outln!(
                "{:>5}  {:<25}  {:>10}  {:<7}  {:>8}  {:<8}  {}",
                d.id,
                format_time(d.started_ns),
                d.seq,
                d.result.as_str(),
                tidemark_util::human::format_duration(Duration::from_millis(d.duration_ms)),
                d.trigger,
                d.summary
            );
            if a.verbose {
                out_text(&d.output);
            }
        }
        return Ok(());
    }
    let d = r::drill(&a.data, &a.disk, a.timeout)?;
    if a.json {
        outln!("{}", serde_json::json!(d));
    } else {
        print(&d, a.verbose);
    }
    match d.result {
        DrillResult::Passed | DrillResult::Skipped => Ok(()),
        DrillResult::Failed => bail!("drill {} of {} failed: {}", d.id, a.disk, d.summary),
        DrillResult::Error => bail!("drill {} of {} could not run: {}", d.id, a.disk, d.summary),
    }
}

fn print(d: &Drill, verbose: bool) {
    outln!("drill {} of {}: {}", d.id, d.disk_id, d.result.as_str().to_uppercase());
    if d.seq != 0 {
        outln!("  point:   seq {} ({})", d.seq, format_time(d.point_time_ns));
    }
    outln!(
        "  took:    {}",
        tidemark_util::human::format_duration(Duration::from_millis(d.duration_ms))
    );
    outln!("  summary: {}", d.summary);
    if verbose || d.result == DrillResult::Failed {
        outln!("  checker output:");
        out_text(&d.output);
    }
}

fn out_text(s: &str) {
    for l in s.lines() {
        outln!("    {l}");
    }
}
