//! Retention policy and the pins that keep expiry away from open views.
//!
//! The policy of a disk is fixed when the target first sees it, from the
//! target's defaults (`--retention-window`, `--retention-max`, `--on-full`,
//! `--point-interval`), and stored in its catalog row. Pins are in memory
//! only: a view pins its point for as long as its control-socket
//! connection lives (or its process holds the data directory, when no
//! daemon runs), and expiry runs under the same lock as pinning, so a view
//! resolved and pinned is never expired under it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// What a disk does when its undo data reaches `--retention-max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    /// Expire the oldest points (never a pinned one, never the newest)
    /// until the undo data fits again.
    Prune,
    /// Stop applying to the disk (an ERROR each time a batch is refused)
    /// until an operator raises the cap or a view is closed.
    Stop,
}

impl OnFull {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prune => "prune",
            Self::Stop => "stop",
        }
    }
}

impl fmt::Display for OnFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OnFull {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "prune" => Ok(Self::Prune),
            "stop" => Ok(Self::Stop),
            other => Err(Error::new(
                ErrorKind::Config,
                format!("--on-full {other:?}: expected prune or stop"),
            )),
        }
    }
}

/// One disk's retention policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiskPolicy {
    /// Points older than this expire (the newest point always stays).
    /// Zero turns retention off: no undo is captured and no point recorded.
    pub window: Duration,
    /// Cap on the disk's undo segments, in bytes (None: no cap).
    pub max_bytes: Option<u64>,
    pub on_full: OnFull,
    /// At most one crash-consistent point per this much source time.
    pub point_interval: Duration,
}

impl Default for DiskPolicy {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(24 * 3600),
            max_bytes: None,
            on_full: OnFull::Prune,
            point_interval: Duration::from_secs(1),
        }
    }
}

impl DiskPolicy {
    /// Whether undo is captured and points are recorded.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }
}

/// Default size at which a disk's undo segment is closed and a new one
/// started (the unit of expiry).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Points pinned by open views, per disk: seq → number of views.
#[derive(Debug, Default)]
pub struct Pins(pub(crate) Mutex<HashMap<String, BTreeMap<u64, usize>>>);

impl Pins {
    /// Lock the pins (expiry holds this while it deletes).
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<u64, usize>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Add a pin under a held lock.
pub(crate) fn pin(map: &mut HashMap<String, BTreeMap<u64, usize>>, disk: &str, seq: u64) {
    *map.entry(disk.to_string()).or_default().entry(seq).or_insert(0) += 1;
}

/// Remove a pin.
pub(crate) fn unpin(pins: &Pins, disk: &str, seq: u64) {
    let mut map = pins.lock();
    if let Some(m) = map.get_mut(disk) {
        if let Some(n) = m.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                m.remove(&seq);
            }
        }
        if m.is_empty() {
            map.remove(disk);
        }
    }
}
