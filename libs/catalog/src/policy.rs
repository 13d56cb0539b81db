//! A disk's retention policy, as its catalog row stores it.
//!
//! The policy of a disk is fixed when the target first sees it, from the
//! target's defaults (`--retention-window`, `--retention-max`, `--on-full`,
//! `--point-interval`), and stored in its catalog row.

use std::fmt;
use std::str::FromStr;
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
