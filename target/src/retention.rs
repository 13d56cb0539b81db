//! The pins that keep expiry away from open views (the policy itself is
//! `tidemark_catalog::policy`, re-exported here).
//!
//! The policy of a disk is fixed when the target first sees it, from the
//! target's defaults (`--retention-window`, `--retention-max`, `--on-full`,
//! `--point-interval`), and stored in its catalog row. Pins are in memory
//! only: a view pins its point for as long as its control-socket
//! connection lives (or its process holds the data directory, when no
//! daemon runs), and expiry runs under the same lock as pinning, so a view
//! resolved and pinned is never expired under it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

pub use tidemark_catalog::policy::{DiskPolicy, OnFull, DEFAULT_SEGMENT_BYTES};

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
