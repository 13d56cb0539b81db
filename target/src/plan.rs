//! Planning one batch: every decision of the apply, with no I/O, so that it
//! can be tested against a model (`tests` below). [`plan`] takes the
//! disk's committed state, its policy and what the catalog said (read by
//! the applier beforehand) and returns a [`Plan`]: which records to write,
//! the new catalog row, halts, recovery points and thinned points. The
//! applier (`apply`) then executes it in the durability order of
//! `docs/design.md`. The rules are in `apply`'s module doc.

use std::collections::HashSet;

use tidemark_wire::record::{Record, RecordHeader, RecordKind, FLAG_FULL, FLAG_SYNC};
use tracing::{error, info, warn};

use crate::catalog::{DiskRow, Halt, SyncState};
use crate::error::{Error, ErrorKind, Located, Result};
use crate::ranges::RangeSet;
use crate::recovery::{Point, PointKind};
use crate::retention::OnFull;

/// Highest seq, and highest end of a record's range, the target accepts:
/// both are stored as SQLite integers (and offsets as `off_t`).
pub const MAX_POSITION: u64 = u64::MAX >> 1;

/// What planning a batch needs besides its records, read before planning.
pub(crate) struct PlanInput<'a> {
    /// The disk's committed catalog row (its policy included).
    pub row: &'a DiskRow,
    /// Its open halts, by seq.
    pub halts: &'a [Halt],
    /// The batch came with `PACKED_GAP`: records before it were lost.
    pub gap_flag: bool,
    /// Bytes in the disk's undo segments (for `--on-full stop`).
    pub undo_bytes: u64,
    /// The newest crash points, newest first (`Catalog::point_tail`).
    pub crash_tail: Vec<(u64, u64)>,
    /// Points that open views have pinned.
    pub pinned: Vec<u64>,
    /// Tag names of this batch that are already points.
    pub existing_tags: HashSet<String>,
    /// Whether a record fits the replica (a VMDK replica has a fixed size).
    pub fits: &'a dyn Fn(&RecordHeader) -> Result<()>,
    /// Now, in Unix seconds (halt times).
    pub now: i64,
}

/// What applying a batch will do.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The records above the applied seq, in seq order.
    pub fresh: Vec<Record>,
    /// The last seq of the batch (acknowledged once committed).
    pub last: u64,
    /// The catalog row after the batch (`undo_captured_seq` is set by the
    /// capture).
    pub row: DiskRow,
    /// Indexes into `fresh` of the records to write (not halted ones).
    pub ops: Vec<usize>,
    /// New points, with the index in `fresh` of the record that made each.
    pub points: Vec<(usize, Point)>,
    /// Committed crash points to delete (thinning).
    pub thinned: Vec<u64>,
    /// The halts that were open, some now (partly) covered...
    pub halts: Vec<Halt>,
    /// ...and which of them changed.
    pub changed: Vec<bool>,
    /// Records of this batch that failed their check (some may be covered
    /// later in the batch).
    pub new_halts: Vec<Halt>,
    /// Ask the agent for a full resync (a gap, or a full sync that cannot
    /// make the disk consistent).
    pub request_full_resync: bool,
}

impl Plan {
    /// The halts to write to the catalog: changed old ones and all new ones.
    pub fn halts_to_commit(&self) -> Vec<&Halt> {
        let mut commit: Vec<&Halt> = self
            .halts
            .iter()
            .zip(&self.changed)
            .filter(|(_, c)| **c)
            .map(|(h, _)| h)
            .collect();
        commit.extend(self.new_halts.iter());
        commit
    }

    /// The halts still open after the batch, by seq.
    pub fn open_halts(&self) -> Vec<Halt> {
        self.halts
            .iter()
            .chain(self.new_halts.iter())
            .filter(|h| !h.covered)
            .cloned()
            .collect()
    }
}

/// Plan a batch of consecutive records (see `apply`'s module doc for the
/// rules). `Ok(None)`: nothing above the applied seq. An error refuses the
/// whole batch; nothing of it may be applied.
pub(crate) fn plan(input: &PlanInput<'_>, records: Vec<Record>) -> Result<Option<Plan>> {
    let id = input.row.disk_id.as_str();
    let applied = input.row.applied_seq;
    // Check everything before touching anything: bad input is never
    // partly applied.
    check_batch(input, &records)?;
    let fresh: Vec<Record> = records.into_iter().filter(|r| r.header.seq > applied).collect();
    let (Some(start), Some(last)) = (fresh.first().map(|r| r.header.seq), fresh.last().map(|r| r.header.seq)) else {
        return Ok(None);
    };
    if input.row.failed_over {
        return Err(Error::new(
            ErrorKind::FailedOver,
            format!("disk {id} was failed over: the target no longer applies to it"),
        ));
    }
    check_retention(input)?;

    let mut row = input.row.clone();
    let mut request_full_resync = start_at(input, start, &mut row)?;

    // Pass 1: checks, state, halts and points; what to write.
    let now = input.now;
    let mut halts = input.halts.to_vec();
    let mut changed = vec![false; halts.len()];
    let mut new_halts: Vec<Halt> = Vec::new();
    let mut ops: Vec<usize> = Vec::with_capacity(fresh.len());
    let mut points = Points::new(input);
    for (i, r) in fresh.iter().enumerate() {
        let h = &r.header;
        if let Err(e) = h.verify_payload(&r.payload) {
            error!(
                disk = %id, seq = h.seq, kind = %h.kind, offset = h.offset, length = h.length,
                "record failed its end-to-end check ({}): not applied; the disk is halted until a resync covers its range",
                e.msg
            );
            new_halts.push(halt_for(h, e.msg, now));
            continue;
        }
        ops.push(i);
        let covers = h.kind == RecordKind::Sync || (h.kind == RecordKind::Zero && h.flags & FLAG_SYNC != 0);
        if covers {
            if h.flags & FLAG_FULL != 0 {
                row.full_sync_seen = true;
            }
            for (halt, c) in halts.iter_mut().zip(changed.iter_mut()) {
                if !halt.covered && halt.seq < h.seq && cover(id, halt, h.seq, h.offset, h.length, now) {
                    *c = true;
                }
            }
            for halt in new_halts.iter_mut().filter(|x| !x.covered && x.seq < h.seq) {
                cover(id, halt, h.seq, h.offset, h.length, now);
            }
        }
        if sync_marks(id, h, &mut row) {
            request_full_resync = true;
        }
        if input.row.policy.enabled() && matches!(h.kind, RecordKind::Flush | RecordKind::Tag) {
            let consistent = row.sync_state == SyncState::Consistent
                && row.sync_from.is_none()
                && !halts.iter().chain(new_halts.iter()).any(|x| !x.covered);
            points.consider(i, r, consistent);
        }
    }

    Ok(Some(Plan {
        last,
        row,
        ops,
        points: points.new,
        thinned: points.thinned,
        halts,
        changed,
        new_halts,
        request_full_resync,
        fresh,
    }))
}

/// Every record's seq follows the one before it and is in range, and so is
/// its disk range; a new record must fit the replica.
fn check_batch(input: &PlanInput<'_>, records: &[Record]) -> Result<()> {
    let id = input.row.disk_id.as_str();
    let Some(first) = records.first().map(|r| r.header.seq) else {
        return Ok(());
    };
    for (i, r) in records.iter().enumerate() {
        let h = &r.header;
        if Some(h.seq) != first.checked_add(i as u64) {
            return Err(Error::malformed(format!(
                "batch record {i} has seq {}, expected {}",
                h.seq,
                first.saturating_add(i as u64)
            ))
            .disk(id));
        }
        if h.seq == 0 || h.seq > MAX_POSITION {
            return Err(Error::malformed("out of range").disk(id).seq(h.seq));
        }
        if h.offset.saturating_add(h.length) > MAX_POSITION {
            return Err(Error::malformed(format!(
                "range {}+{} ends beyond the largest replica ({MAX_POSITION} bytes)",
                h.offset, h.length
            ))
            .disk(id)
            .seq(h.seq));
        }
        if h.seq > input.row.applied_seq {
            // A VMDK replica has a fixed size: refuse before anything
            // of the batch is captured or written.
            (input.fits)(h).map_err(|e| e.disk(id))?;
        }
    }
    Ok(())
}

/// `--on-full stop` with the undo cap reached: applying waits.
fn check_retention(input: &PlanInput<'_>) -> Result<()> {
    let id = input.row.disk_id.as_str();
    let policy = &input.row.policy;
    if policy.enabled() && policy.on_full == OnFull::Stop {
        if let Some(max) = policy.max_bytes.filter(|m| input.undo_bytes >= *m) {
            error!(
                disk = %id,
                undo_bytes = input.undo_bytes,
                "undo retention is full ({max} bytes, --on-full stop): not applying; raise --retention-max or shorten the window"
            );
            return Err(Error::new(
                ErrorKind::RetentionFull,
                format!("undo retention is full ({max} bytes) and its policy is to stop"),
            )
            .disk(id));
        }
    }
    Ok(())
}

/// Where the fresh records start: after a gap (records lost upstream) the
/// disk awaits a full sync; returns whether to ask for one. A gap without
/// `PACKED_GAP` on a disk that has records is refused.
fn start_at(input: &PlanInput<'_>, start: u64, row: &mut DiskRow) -> Result<bool> {
    let id = input.row.disk_id.as_str();
    let applied = input.row.applied_seq;
    if start > applied + 1 {
        if !input.gap_flag && applied != 0 {
            return Err(Error::malformed(format!(
                "gap: expected seq {}, the batch starts at {start} without PACKED_GAP",
                applied + 1
            ))
            .disk(id));
        }
        if applied != 0 {
            warn!(disk = %id, seq = start, "records {}..{start} were lost upstream; the disk awaits a full sync", applied + 1);
        }
        row.first_seq = Some(start);
        row.sync_state = SyncState::AwaitingFullSync;
        row.full_sync_seen = false;
        return Ok(true);
    }
    if row.first_seq.is_none() {
        row.first_seq = Some(start);
    }
    Ok(false)
}

/// The halt of a record that failed its check: its range waits for a
/// resync (one without a range is over at once, kept for the record).
fn halt_for(h: &RecordHeader, reason: String, now: i64) -> Halt {
    let mut halt = Halt {
        seq: h.seq,
        kind: h.kind.name().to_string(),
        offset: h.offset,
        length: h.length,
        pending: RangeSet::single(h.offset, h.length),
        covered: false,
        covered_seq: None,
        reason,
        detected_at: now,
        covered_at: None,
    };
    if halt.pending.is_empty() {
        halt.covered = true;
        halt.covered_seq = Some(h.seq);
        halt.covered_at = Some(now);
    }
    halt
}

/// What a SyncBegin or SyncDone does to the sync state; returns whether a
/// full resync must be asked for (a full sync that began before records
/// were lost cannot make the disk consistent).
fn sync_marks(id: &str, h: &RecordHeader, row: &mut DiskRow) -> bool {
    if h.kind == RecordKind::SyncBegin {
        // Syncs may overlap (a resync starts before a full one ends):
        // the replica is consistent again only once the latest
        // one that began has ended.
        let from = row.sync_from.map_or(h.seq, |f| f.max(h.seq));
        row.sync_from = Some(from);
    }
    if h.kind == RecordKind::SyncDone && row.sync_from.is_some_and(|f| h.offset >= f) {
        info!(disk = %id, seq = h.seq, "sync from seq {} complete", h.offset);
        row.sync_from = None;
    }
    if h.kind == RecordKind::SyncDone && h.flags & FLAG_FULL != 0 && row.sync_state == SyncState::AwaitingFullSync {
        let held_from = row.first_seq.unwrap_or(1);
        if h.offset >= held_from || held_from == 1 {
            info!(disk = %id, seq = h.seq, "full sync (from seq {}) complete: the replica is consistent", h.offset);
            row.sync_state = SyncState::Consistent;
        } else {
            info!(
                disk = %id, seq = h.seq,
                "a full sync from seq {} completed, but records before seq {held_from} were lost after it started; asking for another",
                h.offset
            );
            row.full_sync_seen = false;
            return true;
        }
    }
    false
}

/// The points a batch makes: crash points at flushes (thinned), tagged
/// points at tags with a free name, only while the disk is consistent.
struct Points<'a> {
    input: &'a PlanInput<'a>,
    thin: Thinning,
    /// Records up to this seq were captured by an attempt that crashed
    /// before its commit, against the points that attempt chose. With
    /// thinning (a point interval), those may differ if the batch is cut
    /// differently now (the newest flush of a shorter batch survives where
    /// the crashed attempt thinned it), so a flush among them is not made a
    /// point again, or a view there could miss a capture. Without thinning
    /// every consistent flush was a point in that attempt too, whatever
    /// its cut, so they are made points again (`remake`). Tags are points
    /// whatever the batch boundaries.
    recaptured: u64,
    remake: bool,
    new: Vec<(usize, Point)>,
    thinned: Vec<u64>,
}

impl<'a> Points<'a> {
    fn new(input: &'a PlanInput<'a>) -> Self {
        let policy = &input.row.policy;
        Self {
            input,
            thin: Thinning::new(&input.crash_tail, policy.point_interval, input.pinned.clone()),
            recaptured: input.row.undo_captured_seq,
            remake: policy.point_interval.is_zero(),
            new: Vec::new(),
            thinned: Vec::new(),
        }
    }

    /// The flush or tag `r` (the batch's `i`th fresh record).
    fn consider(&mut self, i: usize, r: &Record, consistent: bool) {
        let id = self.input.row.disk_id.as_str();
        let h = &r.header;
        if h.kind == RecordKind::Flush {
            // The newest flush is always a point; the one it replaces as
            // newest goes if it is closer than the interval to the point
            // before it.
            if consistent && (h.seq > self.recaptured || self.remake) {
                if let Some(drop) = self.thin.add(h.seq, h.time_ns) {
                    match self.new.iter().position(|(_, p)| p.seq == drop) {
                        Some(k) => {
                            self.new.remove(k);
                        }
                        None => self.thinned.push(drop),
                    }
                }
                self.new.push((i, point(h, PointKind::Crash, None)));
            }
            return;
        }
        let name = String::from_utf8_lossy(&r.payload).into_owned();
        let taken = self.new.iter().any(|(_, p)| p.tag.as_deref() == Some(name.as_str()))
            || self.input.existing_tags.contains(&name);
        if !consistent {
            info!(disk = %id, seq = h.seq, tag = %name, "tag while the disk is not consistent (syncing or halted): not a recovery point");
        } else if taken {
            warn!(disk = %id, seq = h.seq, tag = %name, "a point with this tag name exists already: this tag is not a recovery point");
        } else {
            let kind = if h.app_consistent() {
                PointKind::App
            } else {
                PointKind::Tag
            };
            self.new.push((i, point(h, kind, Some(name))));
        }
    }
}

fn point(h: &RecordHeader, kind: PointKind, tag: Option<String>) -> Point {
    Point {
        seq: h.seq,
        time_ns: h.time_ns,
        kind,
        tag,
        latest: false,
    }
}

/// Where crash points go: every flush of a consistent disk becomes the
/// newest point; the point it replaces as newest is dropped again when it
/// lies less than `interval` (source time) after the point before it. So
/// the newest flush is always recoverable and older crash points are at
/// least `interval` apart. A point a view has pinned is kept (it stays
/// listed while the view is open). Pins only decide which *older* point is
/// deleted, which never changes what a view reads (its undo is kept while
/// it is pinned); the points a batch *creates* depend on the records and
/// the committed catalog only, and a re-applied batch creates no crash
/// points (see `recaptured` in `apply`).
struct Thinning {
    /// The newest crash point and the one before it: (seq, source time).
    newest: Option<(u64, u64)>,
    before: Option<(u64, u64)>,
    interval_ns: u64,
    pinned: Vec<u64>,
}

impl Thinning {
    /// `tail`: the newest crash points, newest first (as
    /// `Catalog::point_tail` reads them).
    fn new(tail: &[(u64, u64)], interval: std::time::Duration, pinned: Vec<u64>) -> Self {
        Self {
            newest: tail.first().copied(),
            before: tail.get(1).copied(),
            interval_ns: u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
            pinned,
        }
    }

    /// A flush at (seq, time) becomes the newest point; returns the seq of
    /// the point to drop, if any.
    fn add(&mut self, seq: u64, time_ns: u64) -> Option<u64> {
        let new = (seq, time_ns);
        let Some(newest) = self.newest else {
            self.newest = Some(new);
            return None;
        };
        let close = self
            .before
            .is_some_and(|b| newest.1.abs_diff(b.1) < self.interval_ns && !self.pinned.contains(&newest.0));
        self.newest = Some(new);
        if close {
            Some(newest.0)
        } else {
            self.before = Some(newest);
            None
        }
    }
}

/// Subtract a sync record's range from a halt; returns whether it changed.
fn cover(disk: &str, halt: &mut Halt, seq: u64, offset: u64, length: u64, now: i64) -> bool {
    if !halt.pending.subtract(offset, length) {
        return false;
    }
    if halt.pending.is_empty() {
        halt.covered = true;
        halt.covered_seq = Some(seq);
        halt.covered_at = Some(now);
        info!(
            disk,
            seq, "the range of the record that failed at seq {} is resynced", halt.seq
        );
    }
    true
}

/// `plan` against a small reference model: a 64 KiB disk in 512-byte
/// units, records of whole units, a batch from any starting state (applied
/// seq, awaiting a full sync or consistent, a sync under way, open halts;
/// resent records, gaps with and without `PACKED_GAP`). The model keeps, per
/// record, whether the disk is consistent (not awaiting a full sync, not
/// inside a sync, no open halt), the open halts and their pending units,
/// and which tag names are taken; the plan must agree on what is refused,
/// written, halted and still pending, the new sync state, whether a full
/// resync is asked for, and which records may be points. Undo is checked
/// end to end against a model of the disk's bytes in `apply`'s
/// `undo_model` (a view at every point reads what the disk held then).
#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use tidemark_formats::replica::ReplicaFormat;

    use super::*;
    use crate::retention::DiskPolicy;

    const UNITS: u64 = 128;
    const UNIT: u64 = 512;

    #[derive(Clone, Debug)]
    enum Op {
        Write { at: u64, n: u64, bad: bool },
        Sync { at: u64, n: u64, zero: bool, full: bool },
        Flush,
        Tag { name: u8, app: bool },
        SyncBegin,
        SyncDone { full: bool },
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..UNITS).prop_flat_map(|at| (Just(at), 1..=(UNITS - at).min(8)));
        prop_oneof![
            3 => (range.clone(), any::<bool>()).prop_map(|((at, n), bad)| Op::Write { at, n, bad: bad && n % 2 == 1 }),
            2 => (range, any::<bool>(), any::<bool>()).prop_map(|((at, n), zero, full)| Op::Sync { at, n, zero, full }),
            3 => Just(Op::Flush),
            1 => (0u8..3, any::<bool>()).prop_map(|(name, app)| Op::Tag { name, app }),
            1 => Just(Op::SyncBegin),
            1 => any::<bool>().prop_map(|full| Op::SyncDone { full }),
        ]
    }

    fn record(op: &Op, seq: u64, last_begin: u64) -> Record {
        let data = |n: u64| vec![u8::try_from(seq % 251).unwrap_or(0); usize::try_from(n * UNIT).unwrap_or(0)];
        let mk = |kind, offset, length, payload: Vec<u8>, flags| {
            let mut header = RecordHeader::new(kind, seq, seq * 1_000, offset, length, &payload);
            header.flags = flags;
            Record { header, payload }
        };
        match *op {
            Op::Write { at, n, bad } => {
                let mut r = mk(RecordKind::Write, at * UNIT, n * UNIT, data(n), 0);
                if bad {
                    r.payload[0] ^= 0xff;
                }
                r
            }
            Op::Sync { at, n, zero, full } => {
                let flags = if full { FLAG_FULL } else { 0 };
                if zero {
                    mk(RecordKind::Zero, at * UNIT, n * UNIT, Vec::new(), flags | FLAG_SYNC)
                } else {
                    mk(RecordKind::Sync, at * UNIT, n * UNIT, data(n), flags)
                }
            }
            Op::Flush => mk(RecordKind::Flush, 0, 0, Vec::new(), 0),
            Op::Tag { name, app } => {
                let flags = if app {
                    tidemark_wire::record::FLAG_APP_CONSISTENT
                } else {
                    0
                };
                mk(RecordKind::Tag, 0, 0, format!("t{name}").into_bytes(), flags)
            }
            Op::SyncBegin => mk(RecordKind::SyncBegin, 0, 0, Vec::new(), 0),
            Op::SyncDone { full } => mk(
                RecordKind::SyncDone,
                last_begin,
                0,
                Vec::new(),
                if full { FLAG_FULL } else { 0 },
            ),
        }
    }

    fn row() -> DiskRow {
        DiskRow {
            disk_id: "d".into(),
            disk_uuid: [1; 16],
            applied_seq: 0,
            applied_time_ns: 0,
            sync_state: SyncState::Consistent,
            first_seq: Some(1),
            full_sync_seen: true,
            sync_from: None,
            undo_captured_seq: 0,
            policy: DiskPolicy::default(),
            format: ReplicaFormat::Raw,
            failed_over: false,
            replaced_uuid: None,
        }
    }

    /// The disk's state before the batch, and where the batch starts.
    #[derive(Clone, Debug)]
    struct Init {
        applied: u64,
        /// Awaiting a full sync (else consistent).
        awaiting: bool,
        /// The first seq held (None only on a fresh disk).
        first_seq: Option<u64>,
        /// A sync that began at this seq has not ended.
        sync_from: Option<u64>,
        /// Open halts (at seqs 1, 2, …): their pending units.
        halts: Vec<(u64, u64)>,
        /// Where the batch starts against `applied + 1`: below it the
        /// records are resent ones, above it records were lost.
        shift: i64,
        gap_flag: bool,
    }

    fn fresh_disk() -> Init {
        Init {
            applied: 0,
            awaiting: false,
            first_seq: None,
            sync_from: None,
            halts: Vec::new(),
            shift: 0,
            gap_flag: false,
        }
    }

    fn init() -> impl Strategy<Value = Init> {
        (0u64..6).prop_flat_map(|applied| {
            let nh = usize::try_from(applied.min(2)).unwrap_or(0);
            let range = (0..UNITS).prop_flat_map(|at| (Just(at), 1..=(UNITS - at).min(8)));
            (
                Just(applied),
                any::<bool>(),
                any::<bool>(),
                prop::option::of(1..=applied.max(1)),
                prop::collection::vec(range, 0..=nh),
                -2i64..=2,
                any::<bool>(),
            )
                .prop_map(
                    |(applied, awaiting, late_first, sync_from, halts, shift, gap_flag)| Init {
                        applied,
                        awaiting,
                        first_seq: (applied > 0).then_some(if late_first { applied } else { 1 }),
                        sync_from: sync_from.filter(|_| applied > 0),
                        halts,
                        shift: shift.max(-i64::try_from(applied).unwrap_or(0)),
                        gap_flag,
                    },
                )
        })
    }

    fn start_row(init: &Init) -> (DiskRow, Vec<Halt>) {
        let mut r = row();
        r.applied_seq = init.applied;
        r.sync_state = if init.awaiting {
            SyncState::AwaitingFullSync
        } else {
            SyncState::Consistent
        };
        r.full_sync_seen = !init.awaiting;
        r.first_seq = init.first_seq;
        r.sync_from = init.sync_from;
        let halts = init
            .halts
            .iter()
            .enumerate()
            .map(|(i, &(at, n))| Halt {
                seq: i as u64 + 1,
                kind: "write".into(),
                offset: at * UNIT,
                length: n * UNIT,
                pending: RangeSet::single(at * UNIT, n * UNIT),
                covered: false,
                covered_seq: None,
                reason: "model".into(),
                detected_at: 0,
                covered_at: None,
            })
            .collect();
        (r, halts)
    }

    /// What the model expects of one batch.
    #[derive(Debug, Default)]
    struct Expect {
        /// The batch is refused (a gap without PACKED_GAP).
        refused: bool,
        /// Nothing above the applied seq.
        nothing: bool,
        written: Vec<u64>,
        halted: Vec<u64>,
        /// Open halts after the batch: seq → pending units.
        open: BTreeMap<u64, BTreeSet<u64>>,
        /// Flushes and tags that may be points (disk consistent at them).
        flush_ok: Vec<u64>,
        tags: Vec<(u64, String, PointKind)>,
        sync_from: Option<u64>,
        awaiting: bool,
        first_seq: Option<u64>,
        request_full_resync: bool,
    }

    fn model(ops: &[Op], taken: &HashSet<String>, init: &Init) -> (Vec<Record>, Expect) {
        let mut e = Expect {
            sync_from: init.sync_from,
            awaiting: init.awaiting,
            first_seq: init.first_seq,
            ..Expect::default()
        };
        for (i, &(at, n)) in init.halts.iter().enumerate() {
            e.open.insert(i as u64 + 1, (at..at + n).collect());
        }
        let start = (init.applied + 1).saturating_add_signed(init.shift).max(1);
        let mut records = Vec::new();
        let mut last_begin = 0;
        for (i, op) in ops.iter().enumerate() {
            let seq = start + i as u64;
            records.push(record(op, seq, last_begin));
            if matches!(op, Op::SyncBegin) {
                last_begin = seq;
            }
        }
        let first_fresh = start.max(init.applied + 1);
        if start + ops.len() as u64 <= first_fresh {
            e.nothing = true;
            return (records, e);
        }
        if first_fresh > init.applied + 1 {
            if !init.gap_flag && init.applied != 0 {
                e.refused = true;
                return (records, e);
            }
            e.first_seq = Some(first_fresh);
            e.awaiting = true;
            e.request_full_resync = true;
        } else if e.first_seq.is_none() {
            e.first_seq = Some(first_fresh);
        }
        let mut names: HashSet<String> = HashSet::new();
        for (i, op) in ops.iter().enumerate() {
            let seq = start + i as u64;
            if seq < first_fresh {
                continue;
            }
            let r = &records[i];
            match *op {
                Op::Write { at, n, bad: true } => {
                    e.halted.push(seq);
                    e.open.insert(seq, (at..at + n).collect());
                }
                Op::Sync { at, n, .. } => {
                    e.written.push(seq);
                    for pending in e.open.values_mut() {
                        for u in at..at + n {
                            pending.remove(&u);
                        }
                    }
                    e.open.retain(|_, p| !p.is_empty());
                }
                Op::SyncBegin => {
                    e.written.push(seq);
                    e.sync_from = Some(e.sync_from.map_or(seq, |f| f.max(seq)));
                }
                Op::SyncDone { full } => {
                    e.written.push(seq);
                    let began = r.header.offset;
                    if e.sync_from.is_some_and(|f| began >= f) {
                        e.sync_from = None;
                    }
                    if full && e.awaiting {
                        let held_from = e.first_seq.unwrap_or(1);
                        if began >= held_from || held_from == 1 {
                            e.awaiting = false;
                        } else {
                            e.request_full_resync = true;
                        }
                    }
                }
                _ => e.written.push(seq),
            }
            let consistent = !e.awaiting && e.sync_from.is_none() && e.open.is_empty();
            match *op {
                Op::Flush if consistent => e.flush_ok.push(seq),
                Op::Tag { name, app } if consistent => {
                    let n = format!("t{name}");
                    if !taken.contains(&n) && names.insert(n.clone()) {
                        e.tags.push((seq, n, if app { PointKind::App } else { PointKind::Tag }));
                    }
                }
                _ => {}
            }
        }
        (records, e)
    }

    /// Plan the batch `ops` from the state `init` and check it against the model.
    fn check(ops: &[Op], taken: &HashSet<String>, init: &Init) -> std::result::Result<(), TestCaseError> {
        let (records, e) = model(ops, taken, init);
        let (row, halts) = start_row(init);
        let fits = |_: &RecordHeader| Ok(());
        let input = PlanInput {
            row: &row,
            halts: &halts,
            gap_flag: init.gap_flag,
            undo_bytes: 0,
            crash_tail: Vec::new(),
            pinned: Vec::new(),
            existing_tags: taken.clone(),
            fits: &fits,
            now: 1,
        };
        let p = match plan(&input, records) {
            Err(err) => {
                prop_assert!(e.refused, "refused unexpectedly: {}", err);
                prop_assert_eq!(err.kind, ErrorKind::Malformed);
                return Ok(());
            }
            Ok(None) => {
                prop_assert!(e.nothing, "nothing planned, the model expected a batch");
                return Ok(());
            }
            Ok(Some(p)) => p,
        };
        prop_assert!(!e.refused && !e.nothing, "planned, the model expected no plan: {:?}", e);
        let seq_of = |i: &usize| p.fresh[*i].header.seq;
        prop_assert_eq!(p.ops.iter().map(seq_of).collect::<Vec<_>>(), e.written);
        prop_assert_eq!(p.new_halts.iter().map(|h| h.seq).collect::<Vec<_>>(), e.halted);
        let open: BTreeMap<u64, u64> = p.open_halts().iter().map(|h| (h.seq, h.pending.bytes())).collect();
        let want: BTreeMap<u64, u64> = e.open.iter().map(|(s, u)| (*s, u.len() as u64 * UNIT)).collect();
        prop_assert_eq!(open, want);
        // Every halt whose pending set changed is committed, and only those.
        for (h, c) in p.halts.iter().zip(&p.changed) {
            let before = halts.iter().find(|x| x.seq == h.seq).map(|x| x.pending.bytes());
            prop_assert_eq!(*c, before != Some(h.pending.bytes()), "halt {}", h.seq);
        }
        prop_assert_eq!(p.row.sync_from, e.sync_from);
        prop_assert_eq!(p.row.sync_state == SyncState::AwaitingFullSync, e.awaiting);
        prop_assert_eq!(p.row.first_seq, e.first_seq);
        prop_assert_eq!(p.request_full_resync, e.request_full_resync);
        // Crash points: only consistent flushes, and the newest of them
        // always (thinning drops older ones inside the interval).
        let crash: Vec<u64> = p
            .points
            .iter()
            .filter(|(_, q)| q.kind == PointKind::Crash)
            .map(|(_, q)| q.seq)
            .collect();
        prop_assert!(
            crash.iter().all(|s| e.flush_ok.contains(s)),
            "{:?} not in {:?}",
            crash,
            e.flush_ok
        );
        prop_assert_eq!(crash.last(), e.flush_ok.last());
        prop_assert!(p.thinned.is_empty(), "nothing committed to thin");
        let tags: Vec<(u64, String, PointKind)> = p
            .points
            .iter()
            .filter(|(_, q)| q.kind != PointKind::Crash)
            .map(|(_, q)| (q.seq, q.tag.clone().unwrap_or_default(), q.kind))
            .collect();
        prop_assert_eq!(tags, e.tags);
        // Every point names the record that made it.
        for (i, q) in &p.points {
            prop_assert_eq!(p.fresh[*i].header.seq, q.seq);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A first batch on a fresh disk.
        #[test]
        fn plan_agrees_with_the_model(ops in prop::collection::vec(op(), 1..40), taken in prop::collection::hash_set("t[0-2]", 0..2)) {
            let mut init = fresh_disk();
            init.awaiting = false;
            init.first_seq = Some(1);
            check(&ops, &taken, &init)?;
        }

        /// Any batch from any state: resent records, gaps with and without
        /// PACKED_GAP, a disk awaiting a full sync (and one that lost records
        /// after its full sync began), a sync under way, halts from earlier
        /// batches that this one's syncs cover.
        #[test]
        fn plan_agrees_with_the_model_from_any_state(
            init in init(),
            ops in prop::collection::vec(op(), 1..30),
            taken in prop::collection::hash_set("t[0-2]", 0..2),
        ) {
            check(&ops, &taken, &init)?;
        }
    }
}
