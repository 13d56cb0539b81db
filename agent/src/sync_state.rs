//! What sync the disk owes and how far it got: `STATE/sync.json` and the
//! handle on it shared by the shim, the sync driver ([`crate::sync`]) and
//! the shipper.
//!
//! ```text
//!  STATE/sync.json   {"format":1,"kind":"initial"|"resync"|"full"|null,"start_seq":…,
//!                     "total_bytes":…,"marked":…,"full_resyncs":…,"last_full_start":…}
//!  STATE/dirty.bitmap  the regions still to sync (tidemark_formats::bitmap)
//! ```
//!
//! It owns the state only, never a step of a sync, and depends on no other
//! agent module, so the shim and the driver can both use it.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tidemark_util::crashsafe;

/// What kind of sync is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncKind {
    /// The disk's first sync (new state directory, or the collector holds
    /// no history for it).
    Initial,
    /// Only the dirty regions (bitmap mode, a target's resync request).
    Resync,
    /// The whole disk again (machine crash, a target's request,
    /// `--force-resync`, a journal that lost what the collector needs).
    Full,
}

impl SyncKind {
    /// Whether every region is synced.
    pub fn whole_disk(self) -> bool {
        matches!(self, Self::Initial | Self::Full)
    }
}

/// `STATE/sync.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SyncFile {
    pub format: u32,
    /// The running sync, if any.
    pub kind: Option<SyncKind>,
    /// Its first seq, that of its `SyncBegin`: every record it appends has
    /// a seq at least this. 0: recorded, `SyncBegin` not journaled yet (it
    /// will be, at the journal's next seq, before any of its records).
    pub start_seq: u64,
    /// Bytes it has to send, as known when it started (grows if regions
    /// are added meanwhile).
    pub total_bytes: u64,
    /// For a whole-disk sync: every region has been marked (durably).
    pub marked: bool,
    /// Full resyncs since the disk was first protected (not the initial sync).
    pub full_resyncs: u64,
    /// Start seq of the last completed whole-disk sync (0: none).
    pub last_full_start: u64,
}

impl SyncFile {
    /// No sync running, none ever done.
    pub fn idle() -> Self {
        Self {
            format: 1,
            kind: None,
            start_seq: 0,
            total_bytes: 0,
            marked: false,
            full_resyncs: 0,
            last_full_start: 0,
        }
    }

    /// The initial sync of a newly protected disk, starting at `start_seq`
    /// (its `SyncBegin`; 0 if not journaled yet).
    pub fn initial(start_seq: u64, disk_size: u64) -> Self {
        Self {
            kind: Some(SyncKind::Initial),
            start_seq,
            total_bytes: disk_size,
            ..Self::idle()
        }
    }
}

/// `STATE/sync.json`.
pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("sync.json")
}

/// Read the sync state, `None` if there is none yet.
pub fn load(state_dir: &Path) -> Result<Option<SyncFile>> {
    let p = state_path(state_dir);
    let s = match std::fs::read_to_string(&p) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", p.display())),
    };
    let f: SyncFile = serde_json::from_str(&s).with_context(|| format!("{} is not a sync state", p.display()))?;
    if f.format != 1 {
        anyhow::bail!("{}: unsupported format {}", p.display(), f.format);
    }
    Ok(Some(f))
}

/// Write the sync state (crash-safe).
pub fn store(path: &Path, f: &SyncFile) -> Result<()> {
    let s = serde_json::to_string(f)? + "\n";
    crashsafe::write_atomic(path, s.as_bytes()).with_context(|| format!("write {}", path.display()))
}

/// Sync state shared by the shim, the driver and the shipper.
#[derive(Debug)]
pub struct SyncShared {
    path: PathBuf,
    file: Mutex<SyncFile>,
    wake_flag: Mutex<bool>,
    wake_cv: Condvar,
    /// Bytes/s over the last progress window.
    rate: Mutex<u64>,
    /// Held by each driver step and while a sync is started.
    steps: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SyncShared {
    pub fn new(path: PathBuf, f: SyncFile) -> Self {
        Self {
            path,
            file: Mutex::new(f),
            wake_flag: Mutex::new(false),
            wake_cv: Condvar::new(),
            rate: Mutex::new(0),
            steps: Mutex::new(()),
        }
    }

    /// The step lock: no driver step runs while it is held.
    pub(crate) fn hold(&self) -> MutexGuard<'_, ()> {
        lock(&self.steps)
    }

    /// A copy of the state.
    pub fn snapshot(&self) -> SyncFile {
        lock(&self.file).clone()
    }

    /// Change the state and write it durably (the in-memory copy changes
    /// only if the write succeeded).
    pub(crate) fn update(&self, change: impl FnOnce(&mut SyncFile)) -> Result<SyncFile> {
        let mut g = lock(&self.file);
        let mut next = g.clone();
        change(&mut next);
        store(&self.path, &next)?;
        *g = next.clone();
        Ok(next)
    }

    /// Wake the driver (new dirty regions, a request, bitmap mode left).
    pub fn wake(&self) {
        *lock(&self.wake_flag) = true;
        self.wake_cv.notify_all();
    }

    /// Sleep until woken ([`SyncShared::wake`]) or `d` has passed.
    pub(crate) fn wait(&self, d: Duration) {
        let g = lock(&self.wake_flag);
        let (mut g, _) = self
            .wake_cv
            .wait_timeout_while(g, d, |woken| !*woken)
            .unwrap_or_else(|p| p.into_inner());
        *g = false;
    }

    /// Whether a whole-disk sync is under way, or completed, that the
    /// collector will receive in full because it started at or after
    /// `ship_from`, the first seq about to be shipped.
    pub fn whole_sync_covers(&self, ship_from: u64) -> bool {
        let f = self.snapshot();
        // Not begun yet (start 0): its SyncBegin will get the journal's
        // next seq, which is at least the first seq shipped.
        let running = f.kind.is_some_and(SyncKind::whole_disk) && (f.start_seq == 0 || f.start_seq >= ship_from);
        let done = f.last_full_start > 0 && f.last_full_start >= ship_from;
        running || done
    }

    /// Whether a whole-disk sync is recorded (running, or about to begin),
    /// or one that began at or after seq `since` has completed: a request
    /// for a full resync issued before it began is answered by it.
    pub fn whole_sync_since(&self, since: u64) -> bool {
        let f = self.snapshot();
        f.kind.is_some_and(SyncKind::whole_disk) || (f.last_full_start > 0 && f.last_full_start >= since)
    }

    /// Bytes/s of the running sync, last window.
    pub fn rate_bps(&self) -> u64 {
        *lock(&self.rate)
    }

    /// Record the rate of the last progress window (0: no sync running).
    pub(crate) fn set_rate(&self, bps: u64) {
        *lock(&self.rate) = bps;
    }
}
