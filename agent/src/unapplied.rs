//! Regions written that the target has not applied yet, kept after the
//! journal recycles their records (`docs/failback.md`, section 2).
//!
//! The journal is recycled when the collector acknowledges, but until the
//! target has applied a record, only the collector's spool holds it. After
//! a disaster that took the collector's site (or its spool) the primary's
//! state directory must still name every region written beyond what the
//! secondary holds, so that the way back resyncs only those. Before records
//! leave the journal, the regions they changed are marked into an **epoch
//! bitmap** (the dirty-bitmap format), durably; an epoch is dropped once the
//! target's applied seq (relayed by the collector in `TargetState`) passes
//! its last seq.
//!
//! ```text
//!  STATE/unapplied/
//!    epochs.json      {"format":1,"epochs":[{"id":…,"first_seq":…,"last_seq":…}]}
//!    epoch-<id>.bitmap one per epoch
//! ```
//!
//! An epoch takes records for [`EPOCH_SPAN`], then a new one opens; at most
//! [`MAX_EPOCHS`] are kept, the two oldest merged beyond that (a superset,
//! always safe). Ordering: a bitmap is synced before `epochs.json` names
//! its new last seq, and `epochs.json` drops an epoch before its file is
//! deleted; a file that `epochs.json` does not name is deleted at open. A
//! bitmap that cannot be read is replaced by one marking the whole disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tidemark_formats::bitmap::{DirtyBitmap, DEFAULT_GRANULARITY};
use tidemark_util::crashsafe;
use tracing::warn;

/// How long one epoch takes records before the next opens.
pub const EPOCH_SPAN: Duration = Duration::from_secs(5);
/// Epochs kept; beyond this the two oldest are merged.
pub const MAX_EPOCHS: usize = 4;
const DIR: &str = "unapplied";
const LIST: &str = "epochs.json";

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct EpochMeta {
    id: u64,
    first_seq: u64,
    last_seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct List {
    format: u32,
    epochs: Vec<EpochMeta>,
    /// The highest applied seq the target reported that let regions go
    /// untracked (not kept, or an epoch dropped). A failover at an earlier
    /// point than this may miss regions in between: the way back then
    /// needs a hash compare.
    #[serde(default)]
    applied_upto: u64,
}

#[derive(Debug)]
struct Epoch {
    meta: EpochMeta,
    bitmap: DirtyBitmap,
}

/// The epochs of one disk.
#[derive(Debug)]
pub struct Unapplied {
    dir: PathBuf,
    disk_size: u64,
    epochs: Vec<Epoch>,
    next_id: u64,
    /// When the newest epoch opened (None: none opened by this process).
    opened: Option<Instant>,
    applied_upto: u64,
    /// Kept up to date by every change, so status reads no bitmap.
    stats: UnappliedStats,
}

/// What status shows.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct UnappliedStats {
    pub epochs: usize,
    pub regions: u64,
    pub bytes: u64,
    /// The lowest seq tracked (None: nothing).
    pub first_seq: Option<u64>,
    /// See `List::applied_upto`.
    pub applied_upto: u64,
}

fn read_list(dir: &Path) -> Result<List> {
    let list_path = dir.join(LIST);
    match std::fs::read_to_string(&list_path) {
        Ok(s) => {
            let l: List = serde_json::from_str(&s).with_context(|| {
                format!(
                    "{} is not an epoch list (remove the unapplied folder and start the agent with \
                     --force-resync: what it tracked is lost)",
                    list_path.display()
                )
            })?;
            if l.format != 1 {
                anyhow::bail!("{}: unsupported format {}", list_path.display(), l.format);
            }
            Ok(l)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(List {
            format: 1,
            epochs: Vec::new(),
            applied_upto: 0,
        }),
        Err(e) => Err(e).with_context(|| format!("read {}", list_path.display())),
    }
}

fn epoch_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("epoch-{id}.bitmap"))
}

impl Unapplied {
    /// Open (creating if needed) `state/unapplied/` for a disk of `disk_size`.
    pub fn open(state: &Path, disk_size: u64) -> Result<Self> {
        let dir = state.join(DIR);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            crashsafe::fsync_dir(state).with_context(|| format!("fsync {}", state.display()))?;
        }
        let l = read_list(&dir)?;
        let mut epochs = Vec::new();
        for m in l.epochs {
            let p = epoch_path(&dir, m.id);
            // A listed file that is missing or empty lost its regions.
            let present = std::fs::metadata(&p).is_ok_and(|md| md.len() > 0);
            let r = if present {
                DirtyBitmap::open_or_create(&p, disk_size, DEFAULT_GRANULARITY).map_err(|e| e.to_string())
            } else {
                Err("missing or empty".to_string())
            };
            let bitmap = match r {
                Ok(b) => b,
                r => {
                    warn!(
                        file = %p.display(),
                        "an epoch bitmap cannot be read ({}): assuming the whole disk may have changed",
                        r.err().unwrap_or_default()
                    );
                    let _ = std::fs::remove_file(&p);
                    let mut b = DirtyBitmap::open_or_create(&p, disk_size, DEFAULT_GRANULARITY)
                        .with_context(|| format!("recreate {}", p.display()))?;
                    b.mark_all()?;
                    b.sync()?;
                    b
                }
            };
            epochs.push(Epoch { meta: m, bitmap });
        }
        let next_id = epochs.iter().map(|e| e.meta.id.saturating_add(1)).max().unwrap_or(1);
        // Files no list names: an epoch whose listing did not happen.
        for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            let listed = epochs
                .iter()
                .any(|x| epoch_path(&dir, x.meta.id).file_name().is_some_and(|n| *n == *name));
            if name != LIST && !listed {
                let p = dir.join(&name);
                std::fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
            }
        }
        let mut u = Self {
            dir,
            disk_size,
            epochs,
            next_id,
            opened: None,
            applied_upto: l.applied_upto,
            stats: UnappliedStats::default(),
        };
        u.refresh();
        Ok(u)
    }

    fn refresh(&mut self) {
        let regions = self.regions();
        self.stats = UnappliedStats {
            epochs: self.epochs.len(),
            regions: regions.len() as u64,
            bytes: regions.iter().map(|r| r.1).sum(),
            first_seq: self.epochs.iter().map(|e| e.meta.first_seq).min(),
            applied_upto: self.applied_upto,
        };
    }

    fn store(&mut self) -> Result<()> {
        self.refresh();
        let l = List {
            format: 1,
            epochs: self.epochs.iter().map(|e| e.meta).collect(),
            applied_upto: self.applied_upto,
        };
        let p = self.dir.join(LIST);
        let mut s = serde_json::to_string(&l)?;
        s.push('\n');
        crashsafe::write_atomic(&p, s.as_bytes()).with_context(|| format!("write {}", p.display()))
    }

    /// Records `from..=to` are about to leave the journal while the target
    /// has applied up to `applied`: keep the regions they changed
    /// (`ranges`; None: not known, so the whole disk), durably.
    pub fn keep(&mut self, ranges: Option<&[(u64, u64)]>, from: u64, to: u64, applied: u64) -> Result<()> {
        if from > to {
            return Ok(());
        }
        if applied > self.applied_upto && from <= applied {
            // Records up to `applied` leave untracked.
            self.applied_upto = applied;
            if to <= applied {
                return self.store();
            }
        }
        if to <= applied {
            return Ok(());
        }
        let young = self.opened.is_some_and(|t| t.elapsed() < EPOCH_SPAN);
        if !young || self.epochs.is_empty() {
            if self.epochs.len() >= MAX_EPOCHS {
                self.merge_oldest()?;
            }
            let id = self.next_id;
            self.next_id += 1;
            let p = epoch_path(&self.dir, id);
            let _ = std::fs::remove_file(&p);
            let bitmap = DirtyBitmap::open_or_create(&p, self.disk_size, DEFAULT_GRANULARITY)
                .with_context(|| format!("create {}", p.display()))?;
            self.epochs.push(Epoch {
                meta: EpochMeta {
                    id,
                    first_seq: from,
                    last_seq: from.saturating_sub(1),
                },
                bitmap,
            });
            self.opened = Some(Instant::now());
        }
        let Some(e) = self.epochs.last_mut() else {
            return Ok(());
        };
        match ranges {
            Some(rs) => {
                for &(off, len) in rs {
                    let len = len.min(self.disk_size.saturating_sub(off));
                    if len > 0 {
                        e.bitmap.mark(off, len)?;
                    }
                }
            }
            None => e.bitmap.mark_all()?,
        }
        e.bitmap.sync()?;
        e.meta.first_seq = e.meta.first_seq.min(from);
        e.meta.last_seq = e.meta.last_seq.max(to);
        self.store()
    }

    /// Merge the two oldest epochs into the older one.
    fn merge_oldest(&mut self) -> Result<()> {
        if self.epochs.len() < 2 {
            return Ok(());
        }
        let newer = self.epochs.remove(1);
        let older = &mut self.epochs[0];
        for (off, len) in newer.bitmap.dirty_ranges() {
            older.bitmap.mark(off, len)?;
        }
        older.bitmap.sync()?;
        older.meta.first_seq = older.meta.first_seq.min(newer.meta.first_seq);
        older.meta.last_seq = older.meta.last_seq.max(newer.meta.last_seq);
        self.store()?;
        let p = epoch_path(&self.dir, newer.meta.id);
        drop(newer);
        std::fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))
    }

    /// The target has applied every seq ≤ `applied`: drop the epochs it
    /// covers. Returns whether any was dropped.
    pub fn applied(&mut self, applied: u64) -> Result<bool> {
        let before = self.epochs.len();
        let (gone, kept): (Vec<Epoch>, Vec<Epoch>) = std::mem::take(&mut self.epochs)
            .into_iter()
            .partition(|e| e.meta.last_seq <= applied);
        self.epochs = kept;
        if self.epochs.len() == before {
            return Ok(false);
        }
        self.applied_upto = self.applied_upto.max(applied);
        self.store()?;
        for e in gone {
            let p = epoch_path(&self.dir, e.meta.id);
            drop(e);
            std::fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
        if self.epochs.is_empty() {
            self.opened = None;
        }
        Ok(true)
    }

    /// Every region tracked, merged, ascending.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        tidemark_formats::journal::merge_ranges(self.epochs.iter().flat_map(|e| e.bitmap.dirty_ranges()).collect())
    }

    pub fn stats(&self) -> UnappliedStats {
        self.stats
    }
}

/// An epoch's last seq and its regions `(offset, length)`.
pub type EpochRegions = (u64, Vec<(u64, u64)>);

/// Each epoch's last seq and regions, and `applied_upto`, read without
/// changing anything (tools, on a stopped or live agent's state directory).
pub fn read_epochs(state: &Path, disk_size: u64) -> Result<(Vec<EpochRegions>, u64)> {
    let dir = state.join(DIR);
    let l = read_list(&dir)?;
    let mut out = Vec::new();
    for m in l.epochs {
        let p = epoch_path(&dir, m.id);
        let ranges = match DirtyBitmap::open_read_only(&p, disk_size, DEFAULT_GRANULARITY) {
            Ok(b) => b.dirty_ranges(),
            Err(e) => {
                warn!(file = %p.display(), "an epoch bitmap cannot be read ({e}): assuming the whole disk");
                vec![(0, disk_size)]
            }
        };
        out.push((m.last_seq, ranges));
    }
    Ok((out, l.applied_upto))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = DEFAULT_GRANULARITY as u64;

    #[test]
    fn keep_survives_reopen_and_applied_drops_epochs() {
        let d = tempfile::tempdir().unwrap();
        let size = 64 * G;
        let mut u = Unapplied::open(d.path(), size).unwrap();
        u.keep(Some(&[(0, 10), (5 * G, 2 * G)]), 1, 10, 0).unwrap();
        // Nothing to keep: the target has it already.
        u.keep(Some(&[(40 * G, G)]), 11, 12, 12).unwrap();
        assert_eq!(u.regions(), vec![(0, G), (5 * G, 2 * G)]);
        drop(u);
        let mut u = Unapplied::open(d.path(), size).unwrap();
        assert_eq!(u.regions(), vec![(0, G), (5 * G, 2 * G)]);
        u.opened = None; // a new epoch for the next records
        u.keep(Some(&[(9 * G, 1)]), 20, 25, 5).unwrap();
        assert_eq!(u.stats().epochs, 2);
        assert!(!u.applied(9).unwrap(), "the first epoch ends at seq 10");
        assert!(u.applied(10).unwrap());
        assert_eq!(u.regions(), vec![(9 * G, G)]);
        assert!(u.applied(25).unwrap());
        assert_eq!(u.stats().regions, 0);
        let left: Vec<_> = std::fs::read_dir(d.path().join(DIR)).unwrap().collect();
        assert_eq!(left.len(), 1, "only epochs.json is left");
    }

    #[test]
    fn epochs_merge_at_the_limit_and_unknown_ranges_mark_everything() {
        let d = tempfile::tempdir().unwrap();
        let size = 64 * G;
        let mut u = Unapplied::open(d.path(), size).unwrap();
        for i in 0..6u64 {
            u.opened = None;
            u.keep(Some(&[(i * G, 1)]), i * 10 + 1, i * 10 + 10, 0).unwrap();
        }
        assert_eq!(u.stats().epochs, MAX_EPOCHS);
        assert_eq!(u.regions(), vec![(0, 6 * G)]);
        // The merged oldest epoch spans seqs 1..=30.
        u.applied(29).unwrap();
        assert_eq!(u.stats().epochs, MAX_EPOCHS);
        u.applied(30).unwrap();
        assert_eq!(u.regions(), vec![(3 * G, 3 * G)]);
        u.keep(None, 70, 71, 0).unwrap();
        assert_eq!(u.regions(), vec![(0, size)]);
    }

    #[test]
    fn a_damaged_epoch_means_the_whole_disk() {
        let d = tempfile::tempdir().unwrap();
        let size = 16 * G;
        let mut u = Unapplied::open(d.path(), size).unwrap();
        u.keep(Some(&[(0, 1)]), 1, 2, 0).unwrap();
        drop(u);
        std::fs::write(d.path().join(DIR).join("epoch-1.bitmap"), b"garbage").unwrap();
        std::fs::write(d.path().join(DIR).join("epoch-99.bitmap"), b"orphan").unwrap();
        let mut u = Unapplied::open(d.path(), size).unwrap();
        assert_eq!(u.regions(), vec![(0, size)]);
        assert!(!d.path().join(DIR).join("epoch-99.bitmap").exists());
        // A listed epoch whose file is gone lost its regions: the whole disk.
        u.applied(10).unwrap();
        u.opened = None;
        u.keep(Some(&[(0, 1)]), 11, 12, 10).unwrap();
        drop(u);
        std::fs::remove_file(d.path().join(DIR).join("epoch-2.bitmap")).unwrap();
        let u = Unapplied::open(d.path(), size).unwrap();
        assert_eq!(u.regions(), vec![(0, size)]);
        assert_eq!(u.stats().applied_upto, 10);
        let (epochs, upto) = read_epochs(d.path(), size).unwrap();
        assert_eq!((epochs.len(), upto), (1, 10));
    }
}
