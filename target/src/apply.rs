//! Applying one disk's records to its replica, in seq order, with the
//! durability order of the pipeline: write the replica → fdatasync →
//! commit applied seq, sync state and halts to the catalog. The session
//! acks only after [`DiskApplier::apply`] returned.
//!
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
//!
//! This module must never commit a seq before the replica is synced, and
//! never apply a record that failed its check.

use tidemark_wire::frame::TargetState;
use tidemark_wire::record::{Record, RecordKind, FLAG_FULL, FLAG_SYNC};
use tracing::{error, info, warn};

use crate::catalog::{now_unix, replica_state, Catalog, DiskRow, Halt, SyncState};
use crate::error::{Error, Result};
use crate::ranges::RangeSet;
use crate::replica::Replica;

/// Highest seq, and highest end of a record's range, the target accepts:
/// both are stored as SQLite integers (and offsets as `off_t`).
pub const MAX_POSITION: u64 = u64::MAX >> 1;

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

/// One disk's apply state: its catalog row and open halts as committed,
/// the replica, and the catalog connection it commits through.
#[derive(Debug)]
pub(crate) struct DiskApplier {
    row: DiskRow,
    halts: Vec<Halt>,
    replica: Replica,
    catalog: Catalog,
}

impl DiskApplier {
    /// Grow the replica to the disk's size as the sender reported it.
    pub fn ensure_size(&mut self, size: u64) -> crate::Result<()> {
        self.replica.ensure_size(size)
    }

    pub fn new(row: DiskRow, halts: Vec<Halt>, replica: Replica, catalog: Catalog) -> Self {
        Self {
            row,
            halts,
            replica,
            catalog,
        }
    }

    pub fn applied_seq(&self) -> u64 {
        self.row.applied_seq
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
        let applied = self.row.applied_seq;
        let Some(first) = records.first().map(|r| r.header.seq) else {
            return Ok(self.unchanged());
        };
        // Check everything before touching anything: bad input is never
        // partly applied.
        for (i, r) in records.iter().enumerate() {
            let h = &r.header;
            if Some(h.seq) != first.checked_add(i as u64) {
                return Err(Error::malformed(format!(
                    "disk {id}: batch record {i} has seq {}, expected {}",
                    h.seq,
                    first.saturating_add(i as u64)
                )));
            }
            if h.seq == 0 || h.seq > MAX_POSITION {
                return Err(Error::malformed(format!("disk {id}: seq {} is out of range", h.seq)));
            }
            if h.offset.saturating_add(h.length) > MAX_POSITION {
                return Err(Error::malformed(format!(
                    "disk {id}: seq {}: range {}+{} ends beyond the largest replica ({MAX_POSITION} bytes)",
                    h.seq, h.offset, h.length
                )));
            }
        }
        let fresh: Vec<Record> = records.into_iter().filter(|r| r.header.seq > applied).collect();
        let (Some(start), Some(last)) = (fresh.first().map(|r| r.header.seq), fresh.last().map(|r| r.header.seq))
        else {
            return Ok(self.unchanged());
        };

        let mut row = self.row.clone();
        let mut request_full_resync = false;
        if start > applied + 1 {
            if !gap_flag && applied != 0 {
                return Err(Error::malformed(format!(
                    "disk {id}: gap: expected seq {}, the batch starts at {start} without PACKED_GAP",
                    applied + 1
                )));
            }
            if applied != 0 {
                warn!(disk = %id, seq = start, "records {}..{start} were lost upstream; the disk awaits a full sync", applied + 1);
            }
            row.first_seq = Some(start);
            row.sync_state = SyncState::AwaitingFullSync;
            row.full_sync_seen = false;
            request_full_resync = true;
        } else if row.first_seq.is_none() {
            row.first_seq = Some(start);
        }

        let now = now_unix();
        let mut halts = self.halts.clone();
        let mut changed = vec![false; halts.len()];
        let mut new_halts: Vec<Halt> = Vec::new();
        for r in &fresh {
            let h = &r.header;
            if let Err(e) = h.verify_payload(&r.payload) {
                error!(
                    disk = %id, seq = h.seq, kind = %h.kind, offset = h.offset, length = h.length,
                    "record failed its end-to-end check ({}): not applied; the disk is halted until a resync covers its range",
                    e.msg
                );
                let mut halt = Halt {
                    seq: h.seq,
                    kind: h.kind.name().to_string(),
                    offset: h.offset,
                    length: h.length,
                    pending: RangeSet::single(h.offset, h.length),
                    covered: false,
                    covered_seq: None,
                    reason: e.msg,
                    detected_at: now,
                    covered_at: None,
                };
                if halt.pending.is_empty() {
                    // No disk range: nothing to resync; kept for the record.
                    halt.covered = true;
                    halt.covered_seq = Some(h.seq);
                    halt.covered_at = Some(now);
                }
                new_halts.push(halt);
                continue;
            }
            self.replica.apply(h, &r.payload)?;
            let covers = h.kind == RecordKind::Sync || (h.kind == RecordKind::Zero && h.flags & FLAG_SYNC != 0);
            if covers {
                if h.flags & FLAG_FULL != 0 {
                    row.full_sync_seen = true;
                }
                for (halt, c) in halts.iter_mut().zip(changed.iter_mut()) {
                    if !halt.covered && halt.seq < h.seq && cover(&id, halt, h.seq, h.offset, h.length, now) {
                        *c = true;
                    }
                }
                for halt in new_halts.iter_mut().filter(|x| !x.covered && x.seq < h.seq) {
                    cover(&id, halt, h.seq, h.offset, h.length, now);
                }
            }
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
            if h.kind == RecordKind::SyncDone
                && h.flags & FLAG_FULL != 0
                && row.sync_state == SyncState::AwaitingFullSync
            {
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
                    request_full_resync = true;
                }
            }
        }

        fail::fail_point!("target-apply-before-fsync", |_| Err(Error::injected(
            "target-apply-before-fsync"
        )));
        self.replica.sync()?;
        fail::fail_point!("target-apply-after-fsync", |_| Err(Error::injected(
            "target-apply-after-fsync"
        )));

        row.applied_seq = last;
        let mut commit: Vec<&Halt> = halts
            .iter()
            .zip(&changed)
            .filter(|(_, c)| **c)
            .map(|(h, _)| h)
            .collect();
        commit.extend(new_halts.iter());
        let open: Vec<Halt> = halts
            .iter()
            .chain(new_halts.iter())
            .filter(|h| !h.covered)
            .cloned()
            .collect();
        let halted_seq = open.iter().map(|h| h.seq).min();
        fail::fail_point!("target-before-commit", |_| Err(Error::injected("target-before-commit")));
        self.catalog.commit(&row, halted_seq, &commit)?;
        fail::fail_point!("target-after-commit", |_| Err(Error::injected("target-after-commit")));

        self.row = row;
        self.halts = open;
        Ok(Outcome {
            ack: last,
            new_halts: new_halts.into_iter().filter(|h| !h.covered).collect(),
            request_full_resync,
            state: self.state(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Bind;
    use std::os::unix::fs::FileExt;
    use tidemark_wire::frame::ReplicaState;
    use tidemark_wire::record::RecordHeader;

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
            let mut cat = Catalog::open(self.dir.path()).unwrap();
            let row = match cat.bind("d", &[9; 16], false).unwrap() {
                Bind::New(r) | Bind::Existing(r) => r,
                b => panic!("{b:?}"),
            };
            let halts = cat.open_halts("d").unwrap();
            let dir = crate::replica::ensure_disk_dir(self.dir.path(), "d").unwrap();
            DiskApplier::new(row, halts, Replica::open(&dir).unwrap(), cat)
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
}
