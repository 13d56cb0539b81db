//! The agent's state directory: who the disk is, whether the last stop was
//! clean, and the lock that keeps a second agent out.
//!
//! ```text
//!  STATE/
//!    TIDEMARK-DIR    "kind agent-state" (tidemark_util::owned)
//!    lock            flock'd by the running agent ("pid N")
//!    disk.json       {"format":1,"disk_id":…,"disk_uuid":…,"disk_size":…,"disk_path":…}
//!    generations     the data generations this disk holds (tidemark_formats::generation)
//!    boot_id         kernel boot id the agent last ran under
//!    clean-shutdown  present only after a clean exit: {"format":1,"next_seq":…}
//!    resync-required present after a machine crash until a full resync is done
//!    journal/        the change journal (tidemark_formats::journal)
//!    dirty.bitmap    regions written in bitmap mode (tidemark_formats::bitmap)
//!    unapplied/      regions the target has not applied, past the journal (crate::unapplied)
//!    control.sock    status and tag requests
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tidemark_formats::bitmap::{DirtyBitmap, DEFAULT_GRANULARITY};
use tidemark_formats::generation::{GenerationId, History};
use tidemark_util::crashsafe;
use tidemark_util::owned::{self, DirKind, DirSpec, OwnedDir};

/// What the agent keeps in its state directory, so that a directory made
/// before markers existed is recognised (and anything else refused).
pub const SPEC: DirSpec = DirSpec {
    kind: DirKind::AgentState,
    own_names: &[
        "disk.json",
        "generations",
        "unapplied",
        "boot_id",
        "clean-shutdown",
        "resync-required",
        "journal",
        "dirty.bitmap",
        "sync.json",
        "control.sock",
        "ublk.json",
        crate::control::TAGS_FILE,
    ],
    any_subdir: false,
    adopt_if_any: &["disk.json", "lock"],
    busy_hint: "",
};

/// Refuse a state directory that is another daemon's, holds foreign
/// files, or is in use — changing nothing.
pub fn probe(dir: &Path) -> Result<()> {
    owned::probe(dir, &SPEC)?;
    Ok(())
}

/// Identity of the protected disk, recorded on first use.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskMeta {
    pub format: u32,
    pub disk_id: String,
    pub disk_uuid: String,
    pub disk_size: u64,
    pub disk_path: String,
}

impl DiskMeta {
    /// The UUID as 16 bytes.
    pub fn uuid_bytes(&self) -> Result<[u8; 16]> {
        Ok(*uuid::Uuid::parse_str(&self.disk_uuid)
            .context("disk.json: disk_uuid is not a UUID")?
            .as_bytes())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CleanMarker {
    format: u32,
    next_seq: u64,
}

/// How the previous run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastStop {
    /// First use of this state directory.
    FirstRun,
    /// Clean shutdown: everything was applied and synced.
    Clean,
    /// The process died but the machine did not (same boot id): the page
    /// cache kept every write, re-applying the journal tail is enough.
    ProcessCrash,
    /// The machine went down (new boot id, no clean marker): the journal
    /// may miss writes that reached the disk.
    MachineCrash,
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    pub dir: PathBuf,
    owned: OwnedDir,
}

/// The kernel's boot id.
pub fn current_boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl StateDir {
    /// Create (if needed), mark and lock `dir` (`tidemark_util::owned`). A
    /// second agent, or a directory that is not an agent's, gets a clear
    /// error and nothing changes.
    pub fn open(dir: &Path) -> Result<Self> {
        let owned = owned::claim(dir, &SPEC)?;
        if owned.adopted() {
            tracing::info!(state = %dir.display(), "adopted a state directory of an earlier version (marker written)");
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            owned,
        })
    }

    /// A start that failed: remove what opening this directory created.
    pub fn abandon(self) {
        self.owned.abandon();
    }

    /// `control.sock`, free to be bound: a stale socket of an earlier run
    /// is removed (only here, in the agent's own locked directory).
    pub fn free_control_path(&self) -> Result<PathBuf> {
        Ok(self.owned.free_socket_path("control.sock")?)
    }

    /// Read `disk.json`, or `None` on first use.
    pub fn read_meta(&self) -> Result<Option<DiskMeta>> {
        read_meta(&self.dir)
    }

    /// Record the disk's identity (first use).
    pub fn write_meta(&self, m: &DiskMeta) -> Result<()> {
        let p = self.dir.join("disk.json");
        let mut s = serde_json::to_string_pretty(m)?;
        s.push('\n');
        crashsafe::write_atomic(&p, s.as_bytes()).with_context(|| format!("write {}", p.display()))
    }

    /// Work out how the last run ended, then clear the clean marker and
    /// record the current boot id, so a crash from here on is seen as one.
    pub fn begin_run(&self, first_run: bool) -> Result<LastStop> {
        let marker = self.dir.join("clean-shutdown");
        let boot_path = self.dir.join("boot_id");
        let now = current_boot_id();
        let stop = if first_run {
            LastStop::FirstRun
        } else if marker.exists() {
            let s = fs::read_to_string(&marker).with_context(|| format!("read {}", marker.display()))?;
            serde_json::from_str::<CleanMarker>(&s)
                .with_context(|| format!("{} is not a clean-shutdown marker", marker.display()))?;
            LastStop::Clean
        } else {
            let before = fs::read_to_string(&boot_path)
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            if !before.is_empty() && before == now {
                LastStop::ProcessCrash
            } else {
                LastStop::MachineCrash
            }
        };
        crashsafe::remove_durable(&marker).with_context(|| format!("remove {}", marker.display()))?;
        crashsafe::write_atomic(&boot_path, format!("{now}\n").as_bytes())
            .with_context(|| format!("write {}", boot_path.display()))?;
        Ok(stop)
    }

    /// Write the clean-shutdown marker (after everything was synced).
    pub fn mark_clean(&self, next_seq: u64) -> Result<()> {
        let p = self.dir.join("clean-shutdown");
        let s = serde_json::to_string(&CleanMarker { format: 1, next_seq })? + "\n";
        crashsafe::write_atomic(&p, s.as_bytes()).with_context(|| format!("write {}", p.display()))
    }

    /// Record that the disk must be resynced in full (a machine crash may
    /// have let writes reach the disk without reaching the journal). The
    /// replication pipeline clears it once the resync completes.
    pub fn mark_resync_required(&self) -> Result<()> {
        let p = self.dir.join("resync-required");
        crashsafe::write_atomic(&p, b"machine crash\n").with_context(|| format!("write {}", p.display()))
    }

    /// Whether a full resync is owed.
    pub fn resync_required(&self) -> bool {
        self.dir.join("resync-required").exists()
    }

    /// The disk's data generations; a state directory without them (new,
    /// or made by an older agent) starts a root generation.
    pub fn generations(&self) -> Result<History> {
        let p = self.dir.join("generations");
        if let Some(h) = History::load(&p)? {
            return Ok(h);
        }
        let h = History::root(GenerationId(*uuid::Uuid::new_v4().as_bytes()), tidemark_util::now_ns())?;
        h.store(&p)?;
        tracing::info!(generation = %h.current().id, "started a data generation");
        Ok(h)
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }

    pub fn bitmap_path(&self) -> PathBuf {
        self.dir.join("dirty.bitmap")
    }

    pub fn control_path(&self) -> PathBuf {
        control_path(&self.dir)
    }
}

/// A state directory for a failed-over copy of a disk, as `tidemark
/// failover --protect-state` prepares it (`docs/failback.md`): the same
/// disk id and UUID, a new data generation forked from the replica's at
/// the point's seq, a journal whose next seq follows the point, no sync
/// owed, and a clean stop recorded, so `tidemark-agent protect` tracks the
/// copy from its first write.
#[derive(Clone, Debug)]
pub struct Forked {
    pub disk_id: String,
    pub disk_uuid: [u8; 16],
    pub disk_size: u64,
    pub disk_path: PathBuf,
    /// The new generation's history (its current entry forked at the point).
    pub history: History,
    /// The journal's next seq: the point's seq + 1.
    pub next_seq: u64,
}

/// Create `dir` as [`Forked`] says. It must not hold an agent's state
/// already; a failure removes what was created.
pub fn prepare_forked(dir: &Path, f: &Forked) -> Result<()> {
    if dir.join("disk.json").exists() {
        bail!(
            "{} already holds an agent state directory; name a new directory for the failed-over copy",
            dir.display()
        );
    }
    let state = StateDir::open(dir)?;
    let r = (|| -> Result<()> {
        state.write_meta(&DiskMeta {
            format: 1,
            disk_id: f.disk_id.clone(),
            disk_uuid: uuid::Uuid::from_bytes(f.disk_uuid).hyphenated().to_string(),
            disk_size: f.disk_size,
            disk_path: f.disk_path.display().to_string(),
        })?;
        f.history.store(&dir.join("generations"))?;
        crate::sync_state::store(
            &crate::sync_state::state_path(dir),
            &crate::sync_state::SyncFile::idle(),
        )?;
        let cap = crate::config::default_journal_cap(f.disk_size);
        let (mut journal, _) = tidemark_formats::journal::Journal::open(tidemark_formats::journal::JournalConfig {
            dir: state.journal_dir(),
            disk_uuid: f.disk_uuid,
            segment_size: crate::config::segment_size_for(cap),
            cap_bytes: cap,
        })
        .context("create the journal")?;
        journal
            .advance_to(f.next_seq)
            .context("start the journal after the point")?;
        drop(journal);
        state.begin_run(true)?;
        state.mark_clean(f.next_seq)
    })();
    if r.is_err() {
        state.abandon();
    }
    r
}

/// Every region a state directory holds as possibly not applied at the
/// target, read without changing anything (`tidemark journal unapplied`,
/// `tidemark reprotect`).
#[derive(Clone, Debug, Default)]
pub struct Written {
    /// `(seq, offset, length)`: written at a seq ≤ `seq` (`u64::MAX`: not
    /// known: the dirty bitmap's, or the whole disk when in doubt).
    pub regions: Vec<(u64, u64, u64)>,
    /// The highest seq journaled (as far as the journal can be read).
    pub last_seq: u64,
    /// Bytes by source (merged): journal, kept past the journal, dirty bitmap.
    pub journal_bytes: u64,
    pub kept_bytes: u64,
    pub dirty_bytes: u64,
    /// Why the whole disk is counted (a damaged journal, a whole-disk sync
    /// not yet marked, a full resync owed).
    pub whole_disk: Option<String>,
    /// The highest applied seq that let regions go untracked
    /// (`crate::unapplied`).
    pub applied_upto: u64,
}

/// Read [`Written`] from `dir`, for a disk of `size` bytes.
pub fn written_regions(dir: &Path, size: u64) -> Result<Written> {
    let mut w = Written::default();
    let reader = tidemark_formats::journal::JournalReader::open(&dir.join("journal"))?;
    let mut journal = Vec::new();
    let mut iter = reader.records_from(0);
    for r in iter.by_ref() {
        let h = r.context("read the journal")?.header;
        w.last_seq = h.seq;
        if h.kind.changes_disk() && h.length > 0 {
            w.regions.push((h.seq, h.offset, h.length));
            journal.push((h.offset, h.length));
        }
    }
    if let Some(s) = iter.skip_unreadable()? {
        w.whole_disk = Some(format!("journal record {} cannot be read ({})", s.from, s.reason));
    }
    let (epochs, applied_upto) = crate::unapplied::read_epochs(dir, size)?;
    w.applied_upto = applied_upto;
    let mut kept = Vec::new();
    for (last, ranges) in epochs {
        for (o, l) in ranges {
            w.regions.push((last, o, l));
            kept.push((o, l));
        }
    }
    let bitmap_path = dir.join("dirty.bitmap");
    let mut dirty = Vec::new();
    if bitmap_path.exists() {
        let b =
            DirtyBitmap::open_read_only(&bitmap_path, size, DEFAULT_GRANULARITY).context("read the dirty bitmap")?;
        for (o, l) in b.dirty_ranges() {
            w.regions.push((u64::MAX, o, l));
            dirty.push((o, l));
        }
    }
    if dir.join("resync-required").exists() {
        w.whole_disk
            .get_or_insert_with(|| "a full resync is owed (a machine crash)".into());
    }
    if let Some(sf) = crate::sync_state::load(dir)? {
        if sf.kind.is_some_and(crate::sync_state::SyncKind::whole_disk) && !sf.marked {
            w.whole_disk
                .get_or_insert_with(|| "a whole-disk sync has begun and not all its regions are marked yet".into());
        }
    }
    if w.whole_disk.is_some() {
        w.regions.push((u64::MAX, 0, size));
    }
    let bytes = |v: Vec<(u64, u64)>| tidemark_formats::journal::merge_ranges(v).iter().map(|r| r.1).sum();
    w.journal_bytes = bytes(journal);
    w.kept_bytes = bytes(kept);
    w.dirty_bytes = bytes(dirty);
    Ok(w)
}

/// Where a stopped source stands, for `tidemark reprotect`: what its state
/// directory says it wrote, so that the way back resyncs only that.
#[derive(Clone, Debug)]
pub struct SourcePosition {
    pub meta: DiskMeta,
    pub disk_uuid: [u8; 16],
    pub history: History,
    pub written: Written,
    /// The journal records re-applied onto the disk (a process crash).
    pub reapplied: u64,
}

/// Read a stopped agent's state directory `dir` for the disk file `disk`
/// (locking both, so neither an agent nor another tool uses them), after
/// re-applying its journal onto the disk if the agent died (the agent does
/// the same at its start). Refused when its tracking is in doubt: a machine
/// crash (writes may have reached the disk and not the journal), a full
/// resync owed, or a journal that cannot be read whole.
pub fn source_position(dir: &Path, disk: &Path) -> Result<SourcePosition> {
    let meta =
        read_meta(dir)?.with_context(|| format!("{} is not an agent state directory (no disk.json)", dir.display()))?;
    let state = StateDir::open(dir)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("open {}", disk.display()))?;
    let f = tidemark_util::fileops::lock_exclusive(f)
        .map_err(|_| anyhow::anyhow!("{} is in use: an agent protects it", disk.display()))?;
    let kind = tidemark_util::fileops::backing_kind(&f).with_context(|| format!("{}", disk.display()))?;
    let size = tidemark_util::fileops::backing_size(&f).with_context(|| format!("size of {}", disk.display()))?;
    if size != meta.disk_size {
        bail!(
            "{} is {size} bytes but state directory {} was made for a {}-byte disk",
            disk.display(),
            dir.display(),
            meta.disk_size
        );
    }
    let clean = dir.join("clean-shutdown").exists();
    if !clean {
        let before = fs::read_to_string(dir.join("boot_id"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if before.is_empty() || before != current_boot_id() {
            bail!(
                "{}: the machine stopped uncleanly since the agent last ran (another boot), so writes may have \
                 reached the disk without reaching the journal; its tracking is in doubt: reprotect without \
                 --agent-state (and with --discard-divergent) to hash-compare the whole disk",
                dir.display()
            );
        }
    }
    let history = match History::load(&dir.join("generations"))? {
        Some(h) => h,
        None => bail!(
            "{} has no generations file (an agent of an older build): reprotect without --agent-state (and with \
             --discard-divergent) to hash-compare the whole disk",
            dir.display()
        ),
    };
    let reapplied = if clean {
        0
    } else {
        let bitmap_path = state.bitmap_path();
        let bitmap = if bitmap_path.exists() {
            Some(
                DirtyBitmap::open_read_only(&bitmap_path, size, DEFAULT_GRANULARITY)
                    .context("read the dirty bitmap")?,
            )
        } else {
            None
        };
        crate::run::reapply(&state, &f, kind, size, bitmap.as_ref())?
    };
    let mut written = written_regions(dir, size)?;
    if let Some(why) = &written.whole_disk {
        bail!(
            "{}: {why}, so its tracking is in doubt: reprotect without --agent-state (and with \
             --discard-divergent) to hash-compare the whole disk",
            dir.display()
        );
    }
    // An empty journal (all consumed) still knows its next seq.
    let (j, _) = tidemark_formats::journal::Journal::open(tidemark_formats::journal::JournalConfig {
        dir: state.journal_dir(),
        disk_uuid: meta.uuid_bytes()?,
        segment_size: crate::config::segment_size_for(crate::config::default_journal_cap(size)),
        cap_bytes: crate::config::default_journal_cap(size),
    })
    .context("open the journal")?;
    written.last_seq = written.last_seq.max(j.next_seq().saturating_sub(1));
    drop(j);
    Ok(SourcePosition {
        disk_uuid: meta.uuid_bytes()?,
        meta,
        history,
        written,
        reapplied,
    })
}

/// `STATE/control.sock`.
pub fn control_path(state: &Path) -> PathBuf {
    state.join("control.sock")
}

/// Read `STATE/disk.json` without locking (tools use this on a live agent).
pub fn read_meta(dir: &Path) -> Result<Option<DiskMeta>> {
    let p = dir.join("disk.json");
    let s = match fs::read_to_string(&p) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", p.display())),
    };
    let m: DiskMeta =
        serde_json::from_str(&s).with_context(|| format!("{} is not valid disk metadata", p.display()))?;
    if m.format != 1 {
        bail!("{}: unsupported format {}", p.display(), m.format);
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_marker_and_boot_id() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let err = StateDir::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("is in use by another tidemark-agent"), "{err}");
        assert_eq!(s.begin_run(true).unwrap(), LastStop::FirstRun);
        assert_eq!(s.begin_run(false).unwrap(), LastStop::ProcessCrash);
        s.mark_clean(5).unwrap();
        assert_eq!(s.begin_run(false).unwrap(), LastStop::Clean);
        fs::write(d.path().join("boot_id"), "another-boot\n").unwrap();
        assert_eq!(s.begin_run(false).unwrap(), LastStop::MachineCrash);
        fs::write(d.path().join("disk.json"), "{\"format\":1,\"bogus\":2}").unwrap();
        let err = format!("{:#}", s.read_meta().unwrap_err());
        assert!(err.contains("not valid disk metadata"), "{err}");
    }
}
