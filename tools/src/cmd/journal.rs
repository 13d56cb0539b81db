//! `tidemark journal dump|replay`: read an agent's journal without changing
//! it (safe on a live agent's state), and apply it to a copy of the disk.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tidemark_formats::apply::{apply_record, whole};
use tidemark_formats::journal::{merge_ranges, JournalReader};
use tidemark_util::fileops;
use tidemark_util::human::format_size;

#[derive(Subcommand)]
pub enum JournalCmd {
    /// List the records in the journal (one JSON object per line with --json).
    #[command(
        override_usage = "tidemark journal dump --state DIR [--json]",
        after_help = "Examples:\n  tidemark journal dump --state /var/lib/tidemark/db | less\n  tidemark journal dump --state /var/lib/tidemark/db --json | grep '\"kind\":\"tag\"'"
    )]
    Dump(DumpArgs),
    /// Apply the journal to a copy of the disk taken before protection began.
    #[command(
        override_usage = "tidemark journal replay --state DIR --onto FILE [--upto SEQ]",
        after_help = "Example:\n  cp --sparse=always db-before.img check.img\n  tidemark journal replay --state /var/lib/tidemark/db --onto check.img && qemu-img compare check.img db.img"
    )]
    Replay(ReplayArgs),
    /// The regions this state directory holds as not (known to be) applied
    /// at the target: live journal records, regions kept past the journal
    /// until applied, and the dirty bitmap. After a disaster, these are
    /// what the way back must resync from this side (docs/failback.md).
    #[command(
        override_usage = "tidemark journal unapplied --state DIR [--json]",
        after_help = "Example:\n  tidemark journal unapplied --state /var/lib/tidemark/db"
    )]
    Unapplied(UnappliedArgs),
}

#[derive(Args)]
pub struct UnappliedArgs {
    /// The agent's state directory.
    #[arg(long)]
    state: PathBuf,
    /// One JSON object: totals by source and the merged regions.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DumpArgs {
    /// The agent's state directory.
    #[arg(long)]
    state: PathBuf,
    /// One JSON object per record: seq, kind, offset, length, hash.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ReplayArgs {
    /// The agent's state directory.
    #[arg(long)]
    state: PathBuf,
    /// The file to apply the records to (a pre-protection copy of the disk).
    #[arg(long)]
    onto: PathBuf,
    /// Stop after this seq.
    #[arg(long)]
    upto: Option<u64>,
}

pub fn run(c: JournalCmd) -> Result<()> {
    match c {
        JournalCmd::Dump(a) => dump(a),
        JournalCmd::Replay(a) => replay(a),
        JournalCmd::Unapplied(a) => unapplied(a),
    }
}

fn open(state: &std::path::Path) -> Result<JournalReader> {
    if !state.join("disk.json").exists() {
        bail!("{} is not an agent state directory (no disk.json)", state.display());
    }
    Ok(JournalReader::open(&state.join("journal"))?)
}

fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn dump(a: DumpArgs) -> Result<()> {
    let reader = open(&a.state)?;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    // A closed stdout (`| head`) ends the dump quietly; see `crate::out`.
    macro_rules! w {
        ($($arg:tt)*) => {
            if let Err(e) = writeln!(out, $($arg)*) {
                crate::out::note(&e);
                return Ok(());
            }
        };
    }
    let mut counts: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let (mut first, mut last) = (None, 0);
    for r in reader.records_from(0) {
        let r = r?;
        let h = &r.header;
        first.get_or_insert(h.seq);
        last = h.seq;
        let c = counts.entry(h.kind.name()).or_default();
        c.0 += 1;
        c.1 += h.length;
        if a.json {
            let mut o = serde_json::json!({
                "seq": h.seq,
                "kind": h.kind.name(),
                "offset": h.offset,
                "length": h.length,
                "hash": hex(&h.hash),
                "time_ns": h.time_ns,
            });
            if let Some(t) = r.tag_name() {
                o["tag"] = serde_json::Value::from(t);
            }
            w!("{o}");
        } else {
            let extra = r.tag_name().map(|t| format!(" tag={t}")).unwrap_or_default();
            w!(
                "{:>10}  {:<9} {:>14} {:>10}  {}{extra}",
                h.seq,
                h.kind.name(),
                h.offset,
                h.length,
                &hex(&h.hash)[..16]
            );
        }
    }
    if !a.json {
        match first {
            None => w!("journal is empty"),
            Some(f) => {
                w!("seq {f}..={last}");
                for (k, (n, bytes)) in &counts {
                    w!("  {k:<9} {n:>10} records {:>12}", format_size(*bytes));
                }
            }
        }
    }
    if let Err(e) = out.flush() {
        crate::out::note(&e);
    }
    Ok(())
}

fn replay(a: ReplayArgs) -> Result<()> {
    let reader = open(&a.state)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a.onto)
        .with_context(|| format!("open {}", a.onto.display()))?;
    let kind = fileops::backing_kind(&f).with_context(|| a.onto.display().to_string())?;
    let size = fileops::backing_size(&f)?;
    let mut n = 0u64;
    let mut expect_first = true;
    for r in reader.records_from(0) {
        let r = r?;
        if expect_first {
            expect_first = false;
            if r.header.seq != 1 {
                bail!(
                    "the journal starts at seq {}: earlier records were recycled after the collector acknowledged them, \
                     so a pre-protection copy cannot be brought forward",
                    r.header.seq
                );
            }
        }
        if a.upto.is_some_and(|u| r.header.seq > u) {
            break;
        }
        apply_record(&f, &a.onto, kind, size, &r.header, &r.payload, whole)?;
        n += 1;
    }
    fileops::fdatasync(&f)?;
    eprintln!("applied {n} records to {}", a.onto.display());
    Ok(())
}

fn unapplied(a: UnappliedArgs) -> Result<()> {
    let meta = tidemark_agent::state::read_meta(&a.state)?
        .with_context(|| format!("{} is not an agent state directory (no disk.json)", a.state.display()))?;
    let w = tidemark_agent::state::written_regions(&a.state, meta.disk_size)?;
    let all = merge_ranges(w.regions.iter().map(|r| (r.1, r.2)).collect());
    let total: u64 = all.iter().map(|r| r.1).sum();
    if a.json {
        let regions: Vec<_> = all.iter().map(|(o, l)| serde_json::json!([o, l])).collect();
        outln!(
            "{}",
            serde_json::json!({
                "bytes": total,
                "journal_bytes": w.journal_bytes,
                "past_journal_bytes": w.kept_bytes,
                "dirty_bitmap_bytes": w.dirty_bytes,
                "whole_disk": w.whole_disk,
                "applied_upto": w.applied_upto,
                "regions": regions,
            })
        );
        return Ok(());
    }
    outln!(
        "{} in {} regions (journal {}, kept past the journal {}, dirty bitmap {})",
        format_size(total),
        all.len(),
        format_size(w.journal_bytes),
        format_size(w.kept_bytes),
        format_size(w.dirty_bytes)
    );
    if let Some(why) = &w.whole_disk {
        outln!("the whole disk counts: {why}");
    }
    outln!("{:>16} {:>12}", "OFFSET", "LENGTH");
    for (o, l) in all {
        outln!("{o:>16} {l:>12}");
    }
    Ok(())
}
