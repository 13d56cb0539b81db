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
