//! Applying one disk's records to its replica, in seq order, with the
//! durability order of `docs/design.md` for one batch: capture undo → fdatasync
//! the undo segment → mark it captured in the catalog → write the replica
//! → fdatasync → commit applied seq, sync state, halts and new recovery
//! points. The session acks only after [`DiskApplier::apply`] returned.
//!
//! Every decision is made first, without I/O, by `plan::plan` (tested
//! against a model there); [`DiskApplier::apply`] reads what the plan needs
//! from the catalog, plans, and executes the plan in the order above.
//! Nothing here touches the network, so the rules are unit-tested:
//!
//! - Records at or below the applied seq are dropped (idempotent resend);
//!   re-applying records above it after a crash leaves the same bytes,
//!   because every record sets its range to fixed contents.
//! - A gap (the first new seq is above applied + 1) is accepted only with
//!   `PACKED_GAP` or on a disk that has applied nothing yet; the disk then
//!   awaits a full sync, and the target asks for one unless the stream
//!   starts at seq 1.
//! - A record whose payload fails its blake3 is never applied: it becomes a
//!   halt (ERROR naming disk and seq, a catalog row) that `Sync` and
//!   `Zero|FLAG_SYNC` records with a later seq cover range by range. Later
//!   records are still applied, so that the resync can arrive.
//! - A `SyncDone|FLAG_FULL` whose sync started at or after the first seq
//!   held (or any, when that is seq 1) makes the disk consistent.
//! - A `SyncBegin` at seq S makes the disk syncing (no recovery point)
//!   until a `SyncDone` whose offset is ≥ S (full or not); of overlapping
//!   syncs the latest begin counts.
//! - Recovery points: a `Flush` while the disk is consistent (not awaiting
//!   a full sync, not inside a sync, not halted) is a crash-consistent
//!   point if the last one is at least `point_interval` older (source
//!   time); a `Tag` is a point (`app` with FLAG_APP_CONSISTENT, else `tag`)
//!   unless its name is taken (logged, no point) or the disk is not
//!   consistent.
//! - Undo: while the disk has a recovery point, the old contents of every
//!   4 KiB block a record overwrites for the first time since the last
//!   point are captured (a block written earlier in the same batch is
//!   captured as that earlier record left it). Records at or below
//!   `undo_captured_seq` were captured by an attempt that crashed after
//!   its mark: they are never captured again (the replica may hold their
//!   new data already).
//!
//! This module must never commit a seq before the replica is synced, never
//! write the replica before its undo is durable and marked, and never
//! apply a record that failed its check.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tidemark_util::crashsafe::fsync_dir;
use tidemark_util::now_ns;
use tidemark_wire::frame::TargetState;
use tidemark_wire::record::{Record, RecordHeader, RecordKind};
use tracing::{info, warn};

use crate::catalog::{now_unix, replica_state, Catalog, DiskRow, Halt, SegmentRow, SyncState, UndoRow};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::plan::{plan, Plan, PlanInput};
use crate::recovery::Point;
use crate::replica::Replica;
use crate::retention::{DiskPolicy, OnFull, Pins};
use crate::undo::{self, blocks_of, BlockSet, SegmentWriter, BLOCK, MAX_ENTRY_BLOCKS, UNDO_DIR};

pub use crate::plan::MAX_POSITION;

/// Expiry runs at most this often (and after a batch that went over the cap).
const EXPIRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What applying one batch did.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Every seq ≤ this is durable (the value to ack).
    pub ack: u64,
    /// Halts created by this batch that still wait for a resync.
    pub new_halts: Vec<Halt>,
    /// The disk needs a full sync that nobody has asked for yet.
    pub request_full_resync: bool,
    /// The state after the batch.
    pub state: TargetState,
}

/// How a disk's applier keeps undo data.
#[derive(Clone, Debug)]
pub(crate) struct UndoOptions {
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
    /// Points pinned by open views (expiry never removes what they need).
    pub pins: Arc<Pins>,
}

impl Default for UndoOptions {
    fn default() -> Self {
        Self {
            segment_bytes: crate::retention::DEFAULT_SEGMENT_BYTES,
            pins: Arc::default(),
        }
    }
}

/// A disk's undo segments: the folder, the one being appended to, the
/// catalog's view of them all.
#[derive(Debug)]
struct UndoState {
    dir: PathBuf,
    writer: Option<SegmentWriter>,
    segments: Vec<SegmentRow>,
    opts: UndoOptions,
}

impl UndoState {
    /// Open the disk's undo folder: remove segment files the catalog does
    /// not know (created or expired around a crash), reopen the newest
    /// segment for appending after its marked length.
    fn open(disk_dir: &Path, uuid: &[u8; 16], segments: Vec<SegmentRow>, opts: UndoOptions) -> Result<Self> {
        let dir = disk_dir.join(UNDO_DIR);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).io_at("create", &dir)?;
            fsync_dir(disk_dir).io_at("sync", disk_dir)?;
        }
        let known: HashSet<u64> = segments.iter().map(|s| s.segment).collect();
        let mut removed = false;
        for e in std::fs::read_dir(&dir).io_at("list", &dir)? {
            let e = e.io_at("list", &dir)?;
            let name = e.file_name();
            if let Some(n) = name.to_str().and_then(undo::parse_segment_name) {
                if !known.contains(&n) {
                    std::fs::remove_file(e.path()).io_at("remove", &e.path())?;
                    removed = true;
                }
            }
        }
        if removed {
            fsync_dir(&dir).io_at("sync", &dir)?;
        }
        let writer = match segments.last() {
            Some(s) if s.bytes < opts.segment_bytes => {
                Some(SegmentWriter::open_append(&dir, s.segment, uuid, s.bytes)?)
            }
            _ => None,
        };
        Ok(Self {
            dir,
            writer,
            segments,
            opts,
        })
    }

    fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The segment to append to, starting a new one when there is none or
    /// (with `may_roll`: only at the start of a batch, so that a batch's
    /// captures land in one segment) the current one is full.
    fn writer(&mut self, uuid: &[u8; 16], may_roll: bool) -> Result<&mut SegmentWriter> {
        let full = |w: &SegmentWriter| may_roll && w.len >= self.opts.segment_bytes;
        if self.writer.as_ref().is_none_or(full) {
            let next = self.segments.last().map_or(0, |s| s.segment + 1);
            let next = self.writer.as_ref().map_or(next, |w| next.max(w.number + 1));
            self.writer = Some(SegmentWriter::create(&self.dir, next, uuid, now_ns())?);
        }
        Ok(self.writer.as_mut().expect("just set"))
    }
}

/// One disk's apply state: its catalog row and open halts as committed,
/// the replica, its undo segments, and the catalog connection it commits
/// through.
#[derive(Debug)]
pub(crate) struct DiskApplier {
    row: DiskRow,
    halts: Vec<Halt>,
    replica: Replica,
    catalog: Catalog,
    undo: UndoState,
    /// The newest recovery point's seq (the start of the capture epoch).
    last_point: Option<u64>,
    /// Blocks captured since `last_point`, valid for the epoch it names.
    captured: BlockSet,
    captured_for: Option<Option<u64>>,
    last_expiry: Option<Instant>,
}

impl DiskApplier {
    pub fn new(
        row: DiskRow,
        halts: Vec<Halt>,
        replica: Replica,
        catalog: Catalog,
        disk_dir: &Path,
        opts: UndoOptions,
    ) -> Result<Self> {
        let segments = catalog.segments(&row.disk_id)?;
        let undo = UndoState::open(disk_dir, &row.disk_uuid, segments, opts)?;
        let points = catalog.points(&row.disk_id)?;
        Ok(Self {
            last_point: points.last().map(|p| p.seq),
            row,
            halts,
            replica,
            catalog,
            undo,
            captured: BlockSet::new(),
            captured_for: None,
            last_expiry: None,
        })
    }

    pub fn applied_seq(&self) -> u64 {
        self.row.applied_seq
    }

    /// The replica, to read (a hash-compare resync's hashes).
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The disk's retention policy.
    pub fn policy(&self) -> &DiskPolicy {
        &self.row.policy
    }

    /// Change the disk's retention policy (committed, then used from the
    /// next batch on). Retention cannot be turned on or off here: a disk's
    /// points and undo data are captured for its whole life or not at all.
    pub fn set_policy(&mut self, p: DiskPolicy) -> Result<()> {
        if p.enabled() != self.row.policy.enabled() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "disk {}: retention is {} for this disk and cannot be turned {} while it is protected \
                     (a window of 0 turns it off; set it when the disk is first protected)",
                    self.row.disk_id,
                    if self.row.policy.enabled() { "on" } else { "off" },
                    if p.enabled() { "on" } else { "off" },
                ),
            ));
        }
        self.catalog.set_policy(&self.row.disk_id, &p)?;
        self.row.policy = p;
        Ok(())
    }

    /// Whether a failover stopped applying to this disk.
    pub fn failed_over(&self) -> bool {
        self.row.failed_over
    }

    /// Halts not yet covered, by seq.
    pub fn open_halts(&self) -> &[Halt] {
        &self.halts
    }

    /// The disk waits for a full sync that started after a gap, and none
    /// has been seen: (re)send `Request{FullResync}` on a new connection.
    pub fn full_resync_owed(&self) -> bool {
        self.row.sync_state == SyncState::AwaitingFullSync
            && self.row.first_seq.is_some_and(|f| f > 1)
            && !self.row.full_sync_seen
    }

    /// The state as `TargetState` reports it.
    pub fn state(&self) -> TargetState {
        let halted_seq = self.halts.iter().map(|h| h.seq).min();
        TargetState {
            applied_seq: self.row.applied_seq,
            state: replica_state(self.row.sync_state, self.row.sync_from.is_some(), halted_seq.is_some()),
            halted_seq: halted_seq.unwrap_or(0),
            pending_bytes: self.halts.iter().map(|h| h.pending.bytes()).sum(),
        }
    }

    /// Apply a batch of consecutive records; see the module doc for the
    /// rules. On error nothing is committed and this applier must be
    /// dropped (the next connection starts again from the catalog).
    pub fn apply(&mut self, records: Vec<Record>, gap_flag: bool) -> Result<Outcome> {
        let id = self.row.disk_id.clone();
        // What the plan needs from the catalog, read first: points recorded
        // since this applier last looked (a view opened at `latest` records
        // the applied state as a point; the capture epoch starts at the
        // newest one), and which of the batch's tag names are taken.
        let (newest_point, crash_tail) = if self.row.policy.enabled() {
            self.catalog.point_tail(&id)?
        } else {
            (None, Vec::new())
        };
        let mut existing_tags = HashSet::new();
        if self.row.policy.enabled() {
            let applied = self.row.applied_seq;
            // Resent records (at or below the applied seq) are dropped by
            // the plan: their tags need no lookup.
            for r in records
                .iter()
                .filter(|r| r.header.kind == RecordKind::Tag && r.header.seq > applied)
            {
                let name = String::from_utf8_lossy(&r.payload).into_owned();
                if self.catalog.tag_exists(&id, &name)? {
                    existing_tags.insert(name);
                }
            }
        }
        let replica = &self.replica;
        let fits = |h: &RecordHeader| replica.check_fits(h);
        let input = PlanInput {
            row: &self.row,
            halts: &self.halts,
            gap_flag,
            undo_bytes: self.undo.bytes(),
            crash_tail,
            pinned: self.pinned(&id),
            existing_tags,
            fits: &fits,
            now: now_unix(),
        };
        let Some(plan) = plan(&input, records)? else {
            return Ok(self.unchanged());
        };
        self.last_point = newest_point;
        self.execute(plan)
    }

    /// Carry out a plan: capture undo → fdatasync → mark → write the
    /// replica → fdatasync → commit → acknowledge, with the failpoints of
    /// the crash tests between the steps.
    fn execute(&mut self, plan: Plan) -> Result<Outcome> {
        let id = self.row.disk_id.clone();
        let policy = self.row.policy.clone();
        let halts_to_commit: Vec<Halt> = plan.halts_to_commit().into_iter().cloned().collect();
        let open = plan.open_halts();
        let Plan {
            fresh,
            last,
            mut row,
            ops,
            points,
            thinned,
            new_halts,
            request_full_resync,
            ..
        } = plan;

        // Pass 2: undo, durable and marked before the replica is touched.
        if policy.enabled() {
            self.capture(&fresh, &ops, &points, last)?;
            if self.row.undo_captured_seq < last && self.offers_latest() {
                // Nothing to capture, but the replica is about to move past
                // the applied seq, which is offered as `latest`: say so
                // durably first, so that a crash before the commit does not
                // leave `latest` offered over a replica that holds part of
                // this batch.
                self.catalog.mark_captured(&self.row, last)?;
                self.row.undo_captured_seq = last;
            }
            row.undo_captured_seq = self.row.undo_captured_seq;
        }

        // Pass 3: the replica.
        for &i in &ops {
            self.replica.apply(&fresh[i].header, &fresh[i].payload)?;
        }

        fail::fail_point!("target-apply-before-fsync", |_| Err(crate::error::Error::injected(
            "target-apply-before-fsync"
        )));
        self.replica.sync()?;
        fail::fail_point!("target-apply-after-fsync", |_| Err(crate::error::Error::injected(
            "target-apply-after-fsync"
        )));

        row.applied_seq = last;
        row.applied_time_ns = fresh.last().map_or(row.applied_time_ns, |r| r.header.time_ns);
        let commit: Vec<&Halt> = halts_to_commit.iter().collect();
        let halted_seq = open.iter().map(|h| h.seq).min();
        let new_points: Vec<Point> = points.into_iter().map(|(_, p)| p).collect();
        fail::fail_point!("target-before-commit", |_| Err(crate::error::Error::injected(
            "target-before-commit"
        )));
        self.catalog.commit(&row, halted_seq, &commit, &new_points, &thinned)?;
        fail::fail_point!("target-after-commit", |_| Err(crate::error::Error::injected(
            "target-after-commit"
        )));

        for p in &new_points {
            info!(disk = %id, seq = p.seq, kind = p.kind.as_str(), tag = p.tag.as_deref().unwrap_or(""), "recovery point");
        }
        for seq in &thinned {
            tracing::debug!(disk = %id, seq, "recovery point thinned (--point-interval)");
        }
        if let Some(p) = new_points.last() {
            self.last_point = Some(p.seq);
        }
        self.row = row;
        self.halts = open;
        if policy.enabled() {
            let over = policy.max_bytes.is_some_and(|m| self.undo.bytes() > m);
            if over || self.last_expiry.is_none_or(|t| t.elapsed() >= EXPIRY_EVERY) {
                self.last_expiry = Some(Instant::now());
                // Expiry failing loses nothing: the batch is committed;
                // it is tried again after the next one.
                if let Err(e) = self.expire() {
                    warn!(disk = %id, "expiry failed: {e}");
                }
            }
        }
        Ok(Outcome {
            ack: last,
            new_halts: new_halts.into_iter().filter(|h| !h.covered).collect(),
            request_full_resync,
            state: self.state(),
        })
    }

    /// The seqs of this disk's points that open views have pinned.
    fn pinned(&self, disk: &str) -> Vec<u64> {
        self.undo
            .opts
            .pins
            .lock()
            .get(disk)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Whether the applied seq is offered as the `latest` point now (as
    /// `catalog::read_points_with_latest` decides it).
    fn offers_latest(&self) -> bool {
        self.row.sync_state == SyncState::Consistent
            && self.row.sync_from.is_none()
            && self.halts.is_empty()
            && self.row.applied_seq > 0
    }

    /// The blocks captured after point `epoch` (none when there is no point).
    fn load_captured(&self, epoch: Option<u64>) -> Result<BlockSet> {
        match epoch {
            Some(e) => self.catalog.captured_blocks(&self.row.disk_id, e),
            None => Ok(BlockSet::new()),
        }
    }

    /// Capture the undo of a batch (pass 2 of `apply`): the old contents of
    /// every block first overwritten since the last point, as earlier
    /// records of the batch left it; then fdatasync and mark.
    fn capture(&mut self, fresh: &[Record], ops: &[usize], points: &[(usize, Point)], last: u64) -> Result<()> {
        let through = self.row.undo_captured_seq;
        // An attempt that crashed after its mark captured records ≤
        // `through`; the catalog holds what they captured.
        let skipping = fresh.first().is_some_and(|r| r.header.seq <= through);
        let mut epoch = self.last_point;
        if skipping || self.captured_for != Some(epoch) {
            self.captured = self.load_captured(epoch)?;
        }
        self.captured_for = None; // invalid until the mark succeeds
        let uuid = self.row.disk_uuid;
        let mut rows: Vec<UndoRow> = Vec::new();
        let mut touched = BlockSet::new();
        let mut pi = 0;
        let mut may_roll = true;
        for (k, &i) in ops.iter().enumerate() {
            while pi < points.len() && points[pi].0 < i {
                epoch = Some(points[pi].1.seq);
                self.captured = if skipping {
                    self.load_captured(epoch)?
                } else {
                    BlockSet::new()
                };
                pi += 1;
            }
            let h = &fresh[i].header;
            if h.length == 0
                || !matches!(
                    h.kind,
                    RecordKind::Write | RecordKind::Sync | RecordKind::Zero | RecordKind::Trim
                )
            {
                continue;
            }
            let (b0, b1) = blocks_of(h.offset, h.length);
            if h.seq > through && epoch.is_some() {
                for (s, e) in self.captured.missing(b0, b1) {
                    let w = self.undo.writer(&uuid, may_roll)?;
                    may_roll = false;
                    capture_run(w, &self.replica, h.seq, s, e, fresh, &ops[..k], &touched, &mut rows)?;
                }
                self.captured.insert(b0, b1);
            }
            touched.insert(b0, b1);
        }
        while pi < points.len() {
            epoch = Some(points[pi].1.seq);
            self.captured = if skipping {
                self.load_captured(epoch)?
            } else {
                BlockSet::new()
            };
            pi += 1;
        }
        if rows.is_empty() {
            self.captured_for = Some(epoch);
            return Ok(());
        }
        fail::fail_point!("target-undo-before-fsync", |_| Err(crate::error::Error::injected(
            "target-undo-before-fsync"
        )));
        let w = self.undo.writer.as_ref().expect("rows were appended to a writer");
        w.sync()?;
        let first_seq = rows.first().map_or(last, |r| r.capture_seq);
        let max_seq = rows.iter().map(|r| r.capture_seq).max().unwrap_or(last);
        let seg = match self.undo.segments.last() {
            Some(s) if s.segment == w.number => SegmentRow {
                last_seq: s.last_seq.max(max_seq),
                bytes: w.len,
                ..*s
            },
            _ => SegmentRow {
                segment: w.number,
                first_seq,
                last_seq: max_seq,
                bytes: w.len,
            },
        };
        self.catalog.mark_undo(&self.row, &rows, &seg, last)?;
        match self.undo.segments.last_mut() {
            Some(s) if s.segment == seg.segment => *s = seg,
            _ => self.undo.segments.push(seg),
        }
        self.row.undo_captured_seq = last;
        self.captured_for = Some(epoch);
        fail::fail_point!("target-undo-after-capture", |_| Err(crate::error::Error::injected(
            "target-undo-after-capture"
        )));
        Ok(())
    }

    /// Expire points older than the window (never the newest, never a
    /// pinned one), prune for `--retention-max`, and delete every whole
    /// segment no remaining point or pinned view needs: a view at P reads
    /// entries captured after P, so a segment whose last capture is at or
    /// below the oldest point still needed goes.
    fn expire(&mut self) -> Result<()> {
        let id = self.row.disk_id.clone();
        let policy = self.row.policy.clone();
        let pins = self.undo.opts.pins.clone();
        let guard = pins.lock();
        let pinned: Vec<u64> = guard.get(&id).map(|m| m.keys().copied().collect()).unwrap_or_default();
        let points = self.catalog.points(&id)?;
        let window_ns = u64::try_from(policy.window.as_nanos()).unwrap_or(u64::MAX);
        let cutoff = now_ns().saturating_sub(window_ns);
        let newest = points.last().map(|p| p.seq);
        let mut keep: Vec<u64> = Vec::new();
        let mut drop_points: Vec<u64> = Vec::new();
        for p in &points {
            if p.time_ns < cutoff && Some(p.seq) != newest && !pinned.contains(&p.seq) {
                drop_points.push(p.seq);
            } else {
                keep.push(p.seq);
            }
        }
        let active = self.undo.writer.as_ref().map(|w| w.number);
        let deletable = |keep: &[u64]| -> Vec<SegmentRow> {
            let need_after = keep.first().copied().into_iter().chain(pinned.iter().copied()).min();
            self.undo
                .segments
                .iter()
                .filter(|s| need_after.is_none_or(|p| s.last_seq <= p))
                .copied()
                .collect()
        };
        let mut segs = deletable(&keep);
        if let (Some(max), OnFull::Prune) = (policy.max_bytes, policy.on_full) {
            loop {
                let left = self.undo.bytes() - segs.iter().map(|s| s.bytes).sum::<u64>();
                if left <= max {
                    break;
                }
                // The oldest point that may go: not the newest, not pinned.
                let Some(pos) = keep.iter().position(|s| Some(*s) != newest && !pinned.contains(s)) else {
                    break;
                };
                let seq = keep.remove(pos);
                warn!(disk = %id, seq, undo_bytes = self.undo.bytes(), "undo retention over {max} bytes: pruning the oldest point");
                drop_points.push(seq);
                segs = deletable(&keep);
            }
        }
        if drop_points.is_empty() && segs.is_empty() {
            return Ok(());
        }
        let numbers: Vec<u64> = segs.iter().map(|s| s.segment).collect();
        self.catalog.expire(&id, &drop_points, &numbers)?;
        drop(guard);
        self.undo.segments.retain(|s| !numbers.contains(&s.segment));
        if active.is_some_and(|a| numbers.contains(&a)) {
            self.undo.writer = None;
        }
        for n in &numbers {
            let p = self.undo.dir.join(undo::segment_name(*n));
            if let Err(e) = std::fs::remove_file(&p) {
                // Removed at the next open (the catalog no longer knows it).
                warn!(disk = %id, "remove {}: {e}", p.display());
            }
        }
        if !numbers.is_empty() {
            fsync_dir(&self.undo.dir).io_at("sync", &self.undo.dir)?;
        }
        info!(
            disk = %id,
            points = drop_points.len(),
            segments = numbers.len(),
            undo_bytes = self.undo.bytes(),
            "expired"
        );
        Ok(())
    }

    fn unchanged(&self) -> Outcome {
        Outcome {
            ack: self.row.applied_seq,
            new_halts: Vec::new(),
            request_full_resync: false,
            state: self.state(),
        }
    }
}

/// Capture blocks `[s, e)` before seq `seq` overwrites them: holes of the
/// replica (that no earlier record of the batch touched) as one ZERO
/// entry, the rest in data entries of at most 1 MiB, each block as the
/// replica holds it patched with the earlier records of the batch.
#[allow(clippy::too_many_arguments)]
fn capture_run(
    w: &mut SegmentWriter,
    replica: &Replica,
    seq: u64,
    s: u64,
    e: u64,
    fresh: &[Record],
    earlier: &[usize],
    touched: &BlockSet,
    rows: &mut Vec<UndoRow>,
) -> Result<()> {
    let mut pos = s;
    let mut buf = Vec::new();
    while pos < e {
        if !touched.overlaps(pos, e) {
            let hole_end = match replica.next_data(pos * BLOCK, e * BLOCK)? {
                None => e,
                Some(d) => (d / BLOCK).min(e),
            };
            if hole_end > pos {
                let n = u32::try_from(hole_end - pos).unwrap_or(u32::MAX);
                let at = w.append_zero(seq, pos, n)?;
                rows.push(UndoRow {
                    capture_seq: seq,
                    start_block: pos,
                    end_block: pos + u64::from(n),
                    segment: w.number,
                    seg_offset: at,
                    zero: true,
                });
                pos += u64::from(n);
                continue;
            }
        }
        let end = e.min(pos + u64::from(MAX_ENTRY_BLOCKS));
        let (lo, hi) = (pos * BLOCK, end * BLOCK);
        buf.clear();
        buf.resize(usize::try_from(hi - lo).unwrap_or(0), 0);
        replica.read_at(&mut buf, lo)?;
        if touched.overlaps(pos, end) {
            for &j in earlier {
                let h = &fresh[j].header;
                let (a, b) = (h.offset.max(lo), h.offset.saturating_add(h.length).min(hi));
                if a >= b {
                    continue;
                }
                let dst = &mut buf[usize::try_from(a - lo).unwrap_or(0)..usize::try_from(b - lo).unwrap_or(0)];
                match h.kind {
                    RecordKind::Write | RecordKind::Sync => {
                        let p = &fresh[j].payload;
                        let off = usize::try_from(a - h.offset).unwrap_or(0);
                        dst.copy_from_slice(&p[off..off + dst.len()]);
                    }
                    RecordKind::Zero | RecordKind::Trim => dst.fill(0),
                    _ => {}
                }
            }
        }
        let (at, zero) = w.append(seq, pos, &buf)?;
        rows.push(UndoRow {
            capture_seq: seq,
            start_block: pos,
            end_block: end,
            segment: w.number,
            seg_offset: at,
            zero,
        });
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Bind;
    use crate::error::ErrorKind;
    use crate::recovery::PointKind;
    use crate::replica::ReplicaFormat;
    use crate::retention::{DiskPolicy, OnFull};
    use std::os::unix::fs::FileExt;
    use tidemark_wire::frame::ReplicaState;
    use tidemark_wire::record::{FLAG_FULL, FLAG_SYNC};

    fn write(seq: u64, offset: u64, byte: u8, len: usize) -> Record {
        let payload = vec![byte; len];
        Record {
            header: RecordHeader::new(RecordKind::Write, seq, 0, offset, len as u64, &payload),
            payload,
        }
    }

    fn sync(seq: u64, offset: u64, byte: u8, len: usize, flags: u16) -> Record {
        let mut r = write(seq, offset, byte, len);
        r.header.kind = RecordKind::Sync;
        r.header.flags = flags;
        r
    }

    fn bare(kind: RecordKind, seq: u64, offset: u64, length: u64, flags: u16) -> Record {
        let mut header = RecordHeader::new(kind, seq, 0, offset, length, b"");
        header.flags = flags;
        Record {
            header,
            payload: Vec::new(),
        }
    }

    fn corrupt(mut r: Record) -> Record {
        r.payload[0] ^= 0xff;
        r
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        /// Open the disk as a new connection would: from the catalog.
        fn open(&self) -> DiskApplier {
            self.open_with(&DiskPolicy::default(), UndoOptions::default())
        }

        fn open_with(&self, policy: &DiskPolicy, opts: UndoOptions) -> DiskApplier {
            self.open_format(policy, opts, ReplicaFormat::Raw, 0)
        }

        /// Open with small undo segments (16 KiB), so that tests close and
        /// rotate them.
        fn open_small_segments(&self, policy: &DiskPolicy) -> DiskApplier {
            let opts = UndoOptions {
                segment_bytes: 16 << 10,
                ..UndoOptions::default()
            };
            self.open_with(policy, opts)
        }

        fn open_format(&self, policy: &DiskPolicy, opts: UndoOptions, format: ReplicaFormat, size: u64) -> DiskApplier {
            let mut cat = Catalog::open(self.dir.path()).unwrap();
            let row = match cat.bind("d", &[9; 16], false, policy, format).unwrap() {
                Bind::New(r) | Bind::Existing(r) => r,
                b => panic!("{b:?}"),
            };
            let halts = cat.open_halts("d").unwrap();
            let dir = crate::replica::ensure_disk_dir(self.dir.path(), "d").unwrap();
            let replica = Replica::open(&dir, row.format, size).unwrap();
            DiskApplier::new(row, halts, replica, cat, &dir, opts).unwrap()
        }

        fn replica(&self) -> Vec<u8> {
            std::fs::read(self.dir.path().join("d").join("replica.raw")).unwrap()
        }
    }

    #[test]
    fn applies_in_order_grows_and_drops_resends() {
        let f = Fixture::new();
        let mut a = f.open();
        assert_eq!(a.state().state, ReplicaState::Syncing);
        let o = a
            .apply(
                vec![
                    write(1, 0, 1, 8192),
                    write(2, 4096, 2, 4096),
                    bare(RecordKind::Flush, 3, 0, 0, 0),
                    bare(RecordKind::Trim, 4, 0, 4096, 0),
                    bare(RecordKind::Zero, 5, 8192, 4096, FLAG_SYNC | FLAG_FULL),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.ack, 5);
        assert!(!o.request_full_resync, "a stream from seq 1 holds its initial sync");
        let mut want = vec![0u8; 12288];
        want[4096..8192].fill(2);
        assert_eq!(f.replica(), want);

        // A resend of an applied prefix plus one new record: the old ones
        // are dropped, so seq 2 does not come back over seq 6.
        let o = a.apply(vec![write(2, 4096, 2, 4096), write(6, 4096, 6, 4096)], false);
        assert!(o.is_err(), "seqs must be consecutive");
        let o = a
            .apply(
                vec![
                    write(2, 4096, 2, 4096),
                    bare(RecordKind::Flush, 3, 0, 0, 0),
                    bare(RecordKind::Trim, 4, 0, 4096, 0),
                    bare(RecordKind::Zero, 5, 8192, 4096, FLAG_SYNC | FLAG_FULL),
                    write(6, 4096, 6, 4096),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.ack, 6);
        want[4096..8192].fill(6);
        assert_eq!(f.replica(), want);
        let o = a.apply(vec![write(6, 0, 9, 10)], false).unwrap();
        assert_eq!(o.ack, 6, "a batch wholly at or below the applied seq changes nothing");
        assert_eq!(f.replica(), want);

        // Full sync done (started at seq 5 ≥ first seq 1): consistent.
        let o = a
            .apply(vec![bare(RecordKind::SyncDone, 7, 5, 0, FLAG_FULL)], false)
            .unwrap();
        assert_eq!(o.state.state, ReplicaState::Consistent);
        drop(a);
        let a = f.open();
        assert_eq!(a.applied_seq(), 7);
        assert_eq!(a.state().state, ReplicaState::Consistent);
    }

    #[test]
    fn reapplying_an_uncommitted_batch_is_idempotent() {
        let f = Fixture::new();
        let mut a = f.open();
        a.apply(vec![write(1, 0, 1, 4096), write(2, 4096, 1, 4096)], false)
            .unwrap();
        // The batch reaches the replica, then the process dies before the
        // commit: simulate by applying its records without committing.
        let batch = vec![
            write(3, 0, 3, 4096),
            bare(RecordKind::Trim, 4, 4096, 4096, 0),
            write(5, 4096, 5, 100),
        ];
        for r in &batch {
            a.replica.apply(&r.header, &r.payload).unwrap();
        }
        drop(a);
        let mut a = f.open();
        assert_eq!(a.applied_seq(), 2);
        a.apply(batch, false).unwrap();
        let mut want = vec![3u8; 8192];
        want[4096..].fill(0);
        want[4096..4196].fill(5);
        assert_eq!(f.replica(), want);
    }

    #[test]
    fn gaps_need_the_flag_or_a_new_disk() {
        let f = Fixture::new();
        let mut a = f.open();
        // A brand-new disk accepts a stream that starts late, and asks for
        // a full sync.
        let o = a.apply(vec![write(10, 0, 1, 512)], false).unwrap();
        assert!(o.request_full_resync);
        assert!(a.full_resync_owed());
        let e = a.apply(vec![write(12, 0, 1, 512)], false).unwrap_err();
        assert!(e.to_string().contains("expected seq 11"), "{e}");
        assert_eq!(a.applied_seq(), 10);
        // A FULL sync that started before seq 10 does not make it consistent.
        let o = a
            .apply(
                vec![
                    sync(11, 0, 4, 512, FLAG_FULL),
                    bare(RecordKind::SyncDone, 12, 8, 0, FLAG_FULL),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.state.state, ReplicaState::Syncing);
        assert!(o.request_full_resync);
        // One that started after it does.
        let o = a
            .apply(
                vec![
                    sync(13, 0, 4, 512, FLAG_FULL),
                    bare(RecordKind::SyncDone, 14, 13, 0, FLAG_FULL),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.state.state, ReplicaState::Consistent);
        assert!(!a.full_resync_owed());
        // PACKED_GAP: accepted, back to awaiting a full sync, persisted.
        let o = a.apply(vec![write(20, 0, 1, 512)], true).unwrap();
        assert!(o.request_full_resync);
        assert_eq!(o.state.state, ReplicaState::Syncing);
        drop(a);
        let a = f.open();
        assert!(a.full_resync_owed());
        assert_eq!(a.applied_seq(), 20);
    }

    #[test]
    fn a_bad_hash_halts_until_later_sync_records_cover_the_range() {
        let f = Fixture::new();
        let mut a = f.open();
        let o = a
            .apply(
                vec![
                    write(1, 0, 1, 16384),
                    corrupt(write(2, 4096, 2, 8192)),
                    write(3, 0, 3, 512),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.ack, 3, "the bad record is consumed: the resync brings its range");
        assert_eq!(o.new_halts.len(), 1);
        assert_eq!(o.new_halts[0].seq, 2);
        assert_eq!(o.state.state, ReplicaState::Halted);
        assert_eq!(o.state.halted_seq, 2);
        assert_eq!(o.state.pending_bytes, 8192);
        let mut want = vec![1u8; 16384];
        want[..512].fill(3);
        assert_eq!(f.replica(), want, "never applied, later records applied");

        // A restart keeps the halt and its pending ranges.
        drop(a);
        let mut a = f.open();
        assert_eq!(a.state().state, ReplicaState::Halted);
        assert_eq!(a.open_halts()[0].pending.bytes(), 8192);

        // A client write over the range does not count; half a resync does
        // not either.
        let o = a
            .apply(vec![write(4, 4096, 4, 8192), sync(5, 4096, 5, 4096, 0)], false)
            .unwrap();
        assert_eq!(o.state.state, ReplicaState::Halted);
        assert_eq!(o.state.pending_bytes, 4096);
        drop(a);
        let mut a = f.open();
        assert_eq!(a.open_halts()[0].pending.iter().collect::<Vec<_>>(), vec![(8192, 4096)]);
        let o = a
            .apply(vec![bare(RecordKind::Zero, 6, 8192, 8192, FLAG_SYNC)], false)
            .unwrap();
        assert_eq!(
            o.state.state,
            ReplicaState::Syncing,
            "halt over; the full sync is still owed"
        );
        assert_eq!(o.state.pending_bytes, 0);
        let s = &crate::catalog::disk_states(f.dir.path()).unwrap()[0];
        assert_eq!(s.halts.len(), 1);
        assert!(s.halts[0].covered);
        assert_eq!(s.halts[0].covered_seq, Some(6));
        assert!(s.halts[0].reason.contains("blake3"));
    }

    #[test]
    fn a_halt_covered_inside_its_own_batch_requests_nothing() {
        let f = Fixture::new();
        let mut a = f.open();
        let o = a
            .apply(vec![corrupt(write(1, 0, 1, 4096)), sync(2, 0, 2, 4096, 0)], false)
            .unwrap();
        assert!(o.new_halts.is_empty());
        assert_ne!(o.state.state, ReplicaState::Halted);
        // A tag with a bad hash has no range to resync: recorded, not halting.
        let mut tag = Record {
            header: RecordHeader::new(RecordKind::Tag, 3, 0, 0, 0, b"t1"),
            payload: b"t1".to_vec(),
        };
        tag.payload[0] = b'x';
        let o = a.apply(vec![tag], false).unwrap();
        assert!(o.new_halts.is_empty());
        assert_eq!(crate::catalog::disk_states(f.dir.path()).unwrap()[0].halts.len(), 2);
    }

    #[test]
    fn sync_begin_holds_the_disk_syncing_until_its_sync_done() {
        let f = Fixture::new();
        let mut a = f.open();
        // Consistent first (a stream from seq 1 with its full sync done).
        let o = a
            .apply(
                vec![
                    sync(1, 0, 1, 4096, FLAG_FULL),
                    bare(RecordKind::SyncDone, 2, 1, 0, FLAG_FULL),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.state.state, ReplicaState::Consistent);
        // A resync begins at 3; a SyncDone of an older sync (offset 2) does
        // not end it; nor does a restart.
        let o = a
            .apply(
                vec![
                    bare(RecordKind::SyncBegin, 3, 0, 0, 0),
                    sync(4, 0, 4, 4096, 0),
                    bare(RecordKind::SyncDone, 5, 2, 0, 0),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.state.state, ReplicaState::Syncing);
        drop(a);
        let mut a = f.open();
        assert_eq!(a.state().state, ReplicaState::Syncing);
        assert_eq!(crate::catalog::disk_states(f.dir.path()).unwrap()[0].sync_from, Some(3));
        // Overlapping syncs: begins at 6 and 7; the SyncDone of 6 is not enough.
        let o = a
            .apply(
                vec![
                    bare(RecordKind::SyncBegin, 6, 0, 0, FLAG_FULL),
                    bare(RecordKind::SyncBegin, 7, 0, 0, 0),
                    bare(RecordKind::SyncDone, 8, 6, 0, FLAG_FULL),
                ],
                false,
            )
            .unwrap();
        assert_eq!(o.state.state, ReplicaState::Syncing);
        let o = a.apply(vec![bare(RecordKind::SyncDone, 9, 7, 0, 0)], false).unwrap();
        assert_eq!(o.state.state, ReplicaState::Consistent);
        let s = &crate::catalog::disk_states(f.dir.path()).unwrap()[0];
        assert_eq!((s.sync_from, s.state.as_str()), (None, "consistent"));
    }

    #[test]
    fn at_the_undo_cap_stop_refuses_and_prune_drops_the_oldest_points() {
        for on_full in [OnFull::Stop, OnFull::Prune] {
            let f = Fixture::new();
            let policy = DiskPolicy {
                point_interval: std::time::Duration::ZERO,
                max_bytes: Some(64 << 10),
                on_full,
                ..DiskPolicy::default()
            };
            let mut a = f.open_small_segments(&policy);
            a.apply(
                vec![
                    sync(1, 0, 1, 1 << 20, FLAG_FULL),
                    bare(RecordKind::SyncDone, 2, 1, 0, FLAG_FULL),
                ],
                false,
            )
            .unwrap();
            let mut seq = 3;
            let mut refused = false;
            for round in 0..10u64 {
                let mut fl = bare(RecordKind::Flush, seq, 0, 0, 0);
                fl.header.time_ns = now_ns();
                let w = write(seq + 1, round * 32768, 7, 32768);
                match a.apply(vec![fl, w], false) {
                    Ok(_) => seq += 2,
                    Err(e) => {
                        assert_eq!((e.kind, on_full), (ErrorKind::RetentionFull, OnFull::Stop), "{e}");
                        refused = true;
                        break;
                    }
                }
            }
            let s = &crate::catalog::disk_states(f.dir.path()).unwrap()[0];
            match on_full {
                OnFull::Stop => {
                    assert!(refused, "a full disk stops applying");
                    assert!(s.undo_bytes >= 64 << 10);
                    assert_eq!(s.oldest_point.as_ref().unwrap().seq, 3, "no point was dropped");
                }
                OnFull::Prune => {
                    assert_eq!(s.applied_seq, 22);
                    assert!(s.undo_bytes <= (64 << 10) + (48 << 10), "{} bytes", s.undo_bytes);
                    assert!(
                        s.oldest_point.as_ref().unwrap().seq > 3,
                        "the oldest points were pruned"
                    );
                    // The applied state is the newest point: seq 22 wrote after the last flush.
                    assert_eq!(s.newest_point.as_ref().map(|p| (p.seq, p.latest)), Some((22, true)));
                }
            }
        }
    }

    #[test]
    fn the_newest_flush_is_always_a_point_and_older_ones_are_thinned() {
        let f = Fixture::new();
        let policy = DiskPolicy {
            point_interval: std::time::Duration::from_secs(1),
            ..DiskPolicy::default()
        };
        let mut a = f.open_with(&policy, UndoOptions::default());
        a.apply(
            vec![
                sync(1, 0, 1, 64 << 10, FLAG_FULL),
                bare(RecordKind::SyncDone, 2, 1, 0, FLAG_FULL),
            ],
            false,
        )
        .unwrap();
        let ms = 1_000_000u64;
        let t0 = 1_700_000_000_000 * ms;
        let crash = |a: &DiskApplier| -> Vec<u64> {
            a.catalog
                .points("d")
                .unwrap()
                .iter()
                .filter(|p| p.kind == PointKind::Crash)
                .map(|p| p.seq)
                .collect()
        };
        // One batch per flush: a write, then a flush at these source times.
        let mut seq = 3;
        let mut flush_seq = Vec::new();
        for at in [0, 300, 600, 1200, 1500, 1700] {
            let w = write(seq, 4096, u8::try_from(seq).unwrap(), 4096);
            let mut fl = bare(RecordKind::Flush, seq + 1, 0, 0, 0);
            fl.header.time_ns = t0 + at * ms;
            a.apply(vec![w, fl], false).unwrap();
            flush_seq.push(seq + 1);
            let pts = crash(&a);
            assert_eq!(pts.last(), Some(&(seq + 1)), "the newest flush is a point: {pts:?}");
            seq += 2;
        }
        // 0 ms, 1200 ms (≥ 1 s after 0), then 1700 ms newest; 1500 went
        // (< 1 s after 1200), as did 300 and 600.
        assert_eq!(crash(&a), vec![flush_seq[0], flush_seq[3], flush_seq[5]]);
        // Several flushes in one batch: only the last one stays.
        let mut b = Vec::new();
        for at in [1800, 1900, 2000] {
            b.push(write(seq, 8192, 9, 4096));
            let mut fl = bare(RecordKind::Flush, seq + 1, 0, 0, 0);
            fl.header.time_ns = t0 + at * ms;
            b.push(fl);
            seq += 2;
        }
        a.apply(b, false).unwrap();
        assert_eq!(crash(&a), vec![flush_seq[0], flush_seq[3], seq - 1]);
    }

    /// The cost of undo capture: apply throughput of a random 4 KiB write
    /// stream with retention on vs off (docs/retention.md). Run with
    /// `cargo nextest run -p tidemark-target --run-ignored only bench_undo`.
    #[test]
    #[ignore = "benchmark"]
    fn bench_undo_capture_cost() {
        const DISK: u64 = 256 << 20;
        const BATCHES: u64 = 400;
        const PER_BATCH: u64 = 256;
        let mut results = Vec::new();
        for on in [false, true, false, true] {
            let f = Fixture::new();
            let policy = DiskPolicy {
                window: if on {
                    std::time::Duration::from_secs(3600)
                } else {
                    std::time::Duration::ZERO
                },
                ..DiskPolicy::default()
            };
            let mut a = f.open_with(&policy, UndoOptions::default());
            // A full disk of data first (not timed), and a first point.
            let mut seq = 1;
            let mut recs = Vec::new();
            for i in 0..DISK / (1 << 20) {
                recs.push(sync(seq, i << 20, (i % 251) as u8 + 1, 1 << 20, FLAG_FULL));
                seq += 1;
                if recs.len() == 16 {
                    a.apply(std::mem::take(&mut recs), false).unwrap();
                }
            }
            recs.push(bare(RecordKind::SyncDone, seq, 1, 0, FLAG_FULL));
            seq += 1;
            recs.push(bare(RecordKind::Flush, seq, 0, 0, 0));
            seq += 1;
            a.apply(recs, false).unwrap();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let t0 = std::time::Instant::now();
            for b in 0..BATCHES {
                let mut recs = Vec::new();
                for _ in 0..PER_BATCH {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (DISK / 4096)) * 4096;
                    let mut r = write(seq, off, (x >> 56) as u8, 4096);
                    r.header.time_ns = b * 100_000_000;
                    recs.push(r);
                    seq += 1;
                }
                // A Flush per batch, a point per 10 batches (1 s of source time).
                let mut fl = bare(RecordKind::Flush, seq, 0, 0, 0);
                fl.header.time_ns = b * 100_000_000;
                recs.push(fl);
                seq += 1;
                a.apply(recs, false).unwrap();
            }
            let secs = t0.elapsed().as_secs_f64();
            let mib = (BATCHES * PER_BATCH * 4096) as f64 / f64::from(1 << 20);
            results.push((on, mib / secs));
            eprintln!(
                "retention {}: {:.0} MiB of 4 KiB random writes in {secs:.2} s = {:.1} MiB/s ({:.0} writes/s)",
                if on { "on " } else { "off" },
                mib,
                mib / secs,
                (BATCHES * PER_BATCH) as f64 / secs
            );
        }
        let off: f64 = results.iter().filter(|r| !r.0).map(|r| r.1).sum::<f64>() / 2.0;
        let on: f64 = results.iter().filter(|r| r.0).map(|r| r.1).sum::<f64>() / 2.0;
        eprintln!("retention on / off: {:.2}x", on / off);

        // Hot blocks (a 4 MiB region rewritten over and over, like a
        // database's log): a point per batch (a flush in every batch: the
        // newest flush is always a point) against a point per 10 batches
        // (flushes only every 10th batch: what one point per 1 s interval
        // captured before).
        let mut hot = Vec::new();
        for every in [1u64, 10, 1, 10] {
            let f = Fixture::new();
            let mut a = f.open_with(&DiskPolicy::default(), UndoOptions::default());
            let mut seq = 1;
            a.apply(
                vec![
                    sync(1, 0, 1, 4 << 20, FLAG_FULL),
                    bare(RecordKind::SyncDone, 2, 1, 0, FLAG_FULL),
                    bare(RecordKind::Flush, 3, 0, 0, 0),
                ],
                false,
            )
            .unwrap();
            seq += 3;
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let t0 = std::time::Instant::now();
            for b in 0..BATCHES {
                let mut recs = Vec::new();
                for _ in 0..PER_BATCH {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let mut r = write(seq, (x % 1024) * 4096, (x >> 56) as u8, 4096);
                    r.header.time_ns = b * 100_000_000;
                    recs.push(r);
                    seq += 1;
                }
                if b % every == 0 {
                    let mut fl = bare(RecordKind::Flush, seq, 0, 0, 0);
                    fl.header.time_ns = b * 100_000_000;
                    recs.push(fl);
                    seq += 1;
                }
                a.apply(recs, false).unwrap();
            }
            let secs = t0.elapsed().as_secs_f64();
            let mib = (BATCHES * PER_BATCH * 4096) as f64 / f64::from(1 << 20);
            eprintln!(
                "hot 4 MiB, a point per {every:>2} batch(es): {:.1} MiB/s, undo {:.0} MiB",
                mib / secs,
                a.undo.bytes() as f64 / f64::from(1 << 20)
            );
            hot.push((every, mib / secs));
        }
        let per = |e: u64| hot.iter().filter(|h| h.0 == e).map(|h| h.1).sum::<f64>() / 2.0;
        eprintln!(
            "hot blocks, a point per batch / per 10 batches: {:.2}x",
            per(1) / per(10)
        );
    }

    /// Every format applies the same records to the same bytes (Write,
    /// Zero, Trim, growth of raw only), captures the same undo, and a view
    /// at an old point reads what the disk held then; a record beyond a
    /// VMDK replica's size refuses its whole batch.
    #[test]
    fn every_format_applies_and_captures_through_the_image() {
        const DISK: u64 = 1 << 20;
        const LEN: usize = 1 << 20;
        for format in [ReplicaFormat::Raw, ReplicaFormat::VmdkFlat, ReplicaFormat::VmdkSparse] {
            let f = Fixture::new();
            std::fs::write(f.dir.path().join(crate::LOCK_FILE), b"").unwrap();
            let policy = DiskPolicy {
                point_interval: std::time::Duration::ZERO,
                ..DiskPolicy::default()
            };
            let mut a = f.open_format(&policy, UndoOptions::default(), format, DISK);
            let flush = |seq: u64, t: u64| {
                let mut r = bare(RecordKind::Flush, seq, 0, 0, 0);
                r.header.time_ns = t;
                r
            };
            let mut want = vec![0u8; LEN];
            a.apply(
                vec![
                    sync(1, 0, 1, 256 << 10, FLAG_FULL),
                    sync(2, 512 << 10, 2, 128 << 10, FLAG_FULL),
                    bare(RecordKind::SyncDone, 3, 1, 0, FLAG_FULL),
                    flush(4, 1),
                ],
                false,
            )
            .unwrap();
            want[..256 << 10].fill(1);
            want[512 << 10..640 << 10].fill(2);
            let at_point = want.clone();
            a.apply(
                vec![
                    write(5, 4096, 5, 8192),
                    bare(RecordKind::Zero, 6, 64 << 10, 64 << 10, 0),
                    bare(RecordKind::Trim, 7, 512 << 10, 4096, 0),
                    write(8, 900 << 10, 8, 100),
                    write(9, 4096, 9, 4096),
                    flush(10, 2),
                ],
                false,
            )
            .unwrap();
            want[4096..12288].fill(5);
            want[64 << 10..128 << 10].fill(0);
            want[512 << 10..(512 << 10) + 4096].fill(0);
            want[900 << 10..(900 << 10) + 100].fill(8);
            want[4096..8192].fill(9);
            let img = tidemark_formats::replica::open_read_only(&f.dir.path().join("d")).unwrap();
            assert_eq!((img.format(), img.size()), (format, DISK));
            let mut got = vec![0u8; LEN];
            img.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{format}: the replica holds what was applied");
            // The undo was read through the image: the view at seq 4 is the
            // disk as it was then.
            let v = crate::recovery::View::open(f.dir.path(), "d", &crate::recovery::AtSpec::Seq(4)).unwrap();
            assert_eq!(v.point().seq, 4);
            let mut old = vec![0u8; LEN];
            v.read_at(&mut old, 0).unwrap();
            assert!(old == at_point, "{format}: the view at seq 4");
            drop(v);
            let e = a.apply(vec![write(11, DISK - 512, 3, 4096)], false);
            if format == ReplicaFormat::Raw {
                e.unwrap();
                assert_eq!(f.replica().len() as u64, DISK + 3584, "raw grows");
            } else {
                let e = e.unwrap_err();
                assert!(e.to_string().contains("ends beyond"), "{e}");
                assert_eq!(a.applied_seq(), 10, "nothing of the batch applied");
            }
        }
    }

    #[test]
    fn out_of_range_records_are_refused_before_anything_is_applied() {
        let f = Fixture::new();
        let mut a = f.open();
        let e = a
            .apply(
                vec![write(1, 0, 1, 512), bare(RecordKind::Trim, 2, MAX_POSITION, 1, 0)],
                false,
            )
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Malformed);
        assert_eq!(a.applied_seq(), 0);
        assert!(f.replica().is_empty());
        let file = std::fs::File::open(f.dir.path().join("d/replica.raw")).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(file.read_at(&mut b, 0).unwrap(), 0);
    }

    /// Undo against a model: random writes, zeroings, trims and flushes,
    /// cut into batches at random, applied with retention on (every flush a
    /// point, small undo segments so that segments close and rotate); then
    /// a view at every recovery point must read exactly the disk the model
    /// held at that point's seq, and `latest` the final disk.
    mod undo_model {
        use super::*;
        use proptest::prelude::*;

        const DISK: u64 = 64 << 10;

        fn ux(v: u64) -> usize {
            usize::try_from(v).expect("a test size")
        }

        #[derive(Clone, Debug)]
        enum Op {
            Write { at: u64, len: u64, byte: u8 },
            Zero { at: u64, len: u64 },
            Trim { at: u64, len: u64 },
            Flush,
        }

        fn op() -> impl Strategy<Value = Op> {
            // 512-byte units anywhere on the disk, up to 12 KiB long: runs
            // that straddle 4 KiB undo blocks and cover them partly.
            let range = (0..DISK / 512)
                .prop_flat_map(|u| (Just(u * 512), (1..=(DISK / 512 - u).min(24)).prop_map(|n| n * 512)));
            prop_oneof![
                4 => (range.clone(), any::<u8>()).prop_map(|((at, len), byte)| Op::Write { at, len, byte: byte | 1 }),
                1 => range.clone().prop_map(|(at, len)| Op::Zero { at, len }),
                1 => range.prop_map(|(at, len)| Op::Trim { at, len }),
                2 => Just(Op::Flush),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            #[test]
            fn views_at_every_point_read_the_model(
                ops in prop::collection::vec(op(), 1..60),
                cuts in prop::collection::vec(1usize..12, 1..20),
            ) {
                let f = Fixture::new();
                std::fs::write(f.dir.path().join(crate::LOCK_FILE), b"").unwrap();
                let policy = DiskPolicy {
                    point_interval: std::time::Duration::ZERO,
                    ..DiskPolicy::default()
                };
                let mut a = f.open_small_segments(&policy);
                // Seed: the whole disk synced (zeros), then consistent.
                a.apply(
                    vec![
                        bare(RecordKind::Zero, 1, 0, DISK, FLAG_SYNC | FLAG_FULL),
                        bare(RecordKind::SyncDone, 2, 1, 0, FLAG_FULL),
                    ],
                    false,
                )
                .unwrap();
                let mut disk = vec![0u8; ux(DISK)];
                let mut at_seq: Vec<(u64, Vec<u8>)> = Vec::new();
                let mut records = Vec::new();
                for (i, op) in ops.iter().enumerate() {
                    let seq = i as u64 + 3;
                    let r = match *op {
                        Op::Write { at, len, byte } => {
                            disk[ux(at)..ux(at + len)].fill(byte);
                            write(seq, at, byte, ux(len))
                        }
                        Op::Zero { at, len } => {
                            disk[ux(at)..ux(at + len)].fill(0);
                            bare(RecordKind::Zero, seq, at, len, 0)
                        }
                        Op::Trim { at, len } => {
                            // A trimmed range reads as zeros on the replica.
                            disk[ux(at)..ux(at + len)].fill(0);
                            bare(RecordKind::Trim, seq, at, len, 0)
                        }
                        Op::Flush => {
                            at_seq.push((seq, disk.clone()));
                            let mut r = bare(RecordKind::Flush, seq, 0, 0, 0);
                            r.header.time_ns = seq * 1_000_000;
                            r
                        }
                    };
                    records.push(r);
                }
                let mut cut = cuts.iter().cycle();
                let mut rest = records;
                while !rest.is_empty() {
                    let n = (*cut.next().unwrap()).min(rest.len());
                    let tail = rest.split_off(n);
                    a.apply(rest, false).unwrap();
                    rest = tail;
                }
                drop(a);
                let points = crate::recovery::points_direct(f.dir.path(), "d").unwrap();
                let crash: Vec<u64> = points.iter().filter(|p| p.kind == PointKind::Crash && !p.latest).map(|p| p.seq).collect();
                prop_assert_eq!(crash, at_seq.iter().map(|(s, _)| *s).collect::<Vec<_>>());
                let mut got = vec![0u8; ux(DISK)];
                for (seq, want) in &at_seq {
                    let v = crate::recovery::View::open(f.dir.path(), "d", &crate::recovery::AtSpec::Seq(*seq)).unwrap();
                    prop_assert_eq!(v.point().seq, *seq);
                    v.read_at(&mut got, 0).unwrap();
                    prop_assert!(&got == want, "the view at seq {} differs from the model", seq);
                }
                let v = crate::recovery::View::open(f.dir.path(), "d", &crate::recovery::AtSpec::Latest).unwrap();
                v.read_at(&mut got, 0).unwrap();
                prop_assert!(got == disk, "latest differs from the model");
            }
        }
    }
}
