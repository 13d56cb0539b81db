//! The catalog: one SQLite database, `DIR/catalog.db`, holding per
//! disk the UUID binding, the applied seq, the sync state and the halts
//! (records that failed their end-to-end check, with the byte ranges still
//! waiting for a resync).
//!
//! It owns the schema and every statement that touches it. It never holds a
//! seq that is not durable in the replica: the session commits here only
//! after the replica's fdatasync.
//!
//! ```text
//!  disks                                   halts
//!  +----------------+--------------------+  +---------------+------------------------+
//!  | disk_id     PK | 1-64 [A-Za-z0-9._-]|  | disk_id, seq  | PK; seq of the bad rec |
//!  | disk_uuid      | 8-4-4-4-12 hex     |  | kind          | record kind name       |
//!  | applied_seq    | durable in replica |  | offset,length | the record's range     |
//!  | sync_state     | awaiting-full-sync |  | pending       | JSON [[start,end),...] |
//!  |                | | consistent       |  | pending_bytes | still to be covered    |
//!  | first_seq      | held contiguously  |  | covered       | 0 | 1                  |
//!  |                | from (NULL: none)  |  | covered_seq   | record that finished it|
//!  | full_sync_seen | 0 | 1              |  | reason        | what the check said    |
//!  | halted_seq     | lowest uncovered   |  | detected_at,  | unix seconds           |
//!  | replaced_uuid  | forced rebind, old |  | covered_at    |                        |
//!  |                | replica not yet    |  +---------------+------------------------+
//!  |                | moved aside        |
//!  | created_at,    | unix seconds       |
//!  | updated_at     |                    |
//!  +----------------+--------------------+
//! ```
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] holds
//! one script per version, applied in order inside a transaction, so a
//! later feature (recovery points, the undo index) adds a script and never
//! edits an old one. The database runs in WAL mode with `synchronous=FULL`
//! (a commit is durable when it returns) and a 5 s busy timeout, because
//! tools read it while the target writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use tidemark_util::now_ns;
use tidemark_wire::frame::ReplicaState;

use tidemark_formats::generation::History;
use tidemark_formats::replica::ReplicaFormat;
use tidemark_formats::undo::BlockSet;

use crate::error::{Error, ErrorKind, Located, Result};
use crate::point::{Point, PointKind};
use crate::policy::{DiskPolicy, OnFull};
use crate::ranges::RangeSet;

/// The catalog's file name inside the data directory.
pub const CATALOG_FILE: &str = "catalog.db";

/// How long a statement waits for another connection's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema scripts; entry `i` brings `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: disks and halts.
    "CREATE TABLE disks (
        disk_id        TEXT PRIMARY KEY NOT NULL,
        disk_uuid      TEXT NOT NULL,
        applied_seq    INTEGER NOT NULL DEFAULT 0 CHECK (applied_seq >= 0),
        sync_state     TEXT NOT NULL DEFAULT 'awaiting-full-sync'
                       CHECK (sync_state IN ('awaiting-full-sync', 'consistent')),
        first_seq      INTEGER,
        full_sync_seen INTEGER NOT NULL DEFAULT 0,
        halted_seq     INTEGER,
        replaced_uuid  TEXT,
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE halts (
        disk_id       TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        kind          TEXT NOT NULL,
        offset        INTEGER NOT NULL,
        length        INTEGER NOT NULL,
        pending       TEXT NOT NULL,
        pending_bytes INTEGER NOT NULL,
        covered       INTEGER NOT NULL DEFAULT 0,
        covered_seq   INTEGER,
        reason        TEXT NOT NULL,
        detected_at   INTEGER NOT NULL,
        covered_at    INTEGER,
        PRIMARY KEY (disk_id, seq)
    ) STRICT;",
    // 2: a sync (resync or full) in progress since a SyncBegin record.
    "ALTER TABLE disks ADD COLUMN sync_from INTEGER;",
    // 3: retention: recovery points, the undo index and its segments, the
    // per-disk policy, failovers.
    "ALTER TABLE disks ADD COLUMN undo_captured_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE disks ADD COLUMN retention_window_s INTEGER NOT NULL DEFAULT 86400;
    ALTER TABLE disks ADD COLUMN retention_max_bytes INTEGER;
    ALTER TABLE disks ADD COLUMN on_full TEXT NOT NULL DEFAULT 'prune';
    ALTER TABLE disks ADD COLUMN point_interval_ms INTEGER NOT NULL DEFAULT 1000;
    ALTER TABLE disks ADD COLUMN failed_over INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE points (
        disk_id TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        time_ns INTEGER NOT NULL,
        kind    TEXT NOT NULL CHECK (kind IN ('crash', 'app', 'tag')),
        tag     TEXT,
        PRIMARY KEY (disk_id, seq)
    ) STRICT;
    CREATE UNIQUE INDEX points_tag ON points (disk_id, tag) WHERE tag IS NOT NULL;
    CREATE TABLE undo_segments (
        disk_id   TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        segment   INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq  INTEGER NOT NULL,
        bytes     INTEGER NOT NULL,
        PRIMARY KEY (disk_id, segment)
    ) STRICT;
    CREATE TABLE undo (
        disk_id     TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        capture_seq INTEGER NOT NULL,
        start_block INTEGER NOT NULL,
        end_block   INTEGER NOT NULL,
        segment     INTEGER NOT NULL,
        seg_offset  INTEGER NOT NULL,
        zero        INTEGER NOT NULL,
        PRIMARY KEY (disk_id, capture_seq, start_block)
    ) STRICT;
    CREATE INDEX undo_by_end ON undo (disk_id, end_block);
    CREATE INDEX undo_by_segment ON undo (disk_id, segment);
    CREATE TABLE failovers (
        disk_id    TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        at_ns      INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        point_time_ns INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        tag        TEXT,
        output     TEXT NOT NULL
    ) STRICT;",
    // 4: the replica's format (raw | vmdk-flat | vmdk-sparse), fixed when
    // the disk is first seen (or rebound); older disks are raw.
    "ALTER TABLE disks ADD COLUMN format TEXT NOT NULL DEFAULT 'raw'
        CHECK (format IN ('raw', 'vmdk-flat', 'vmdk-sparse'));",
    // 5: the source time of the record at applied_seq, so that the applied
    // state can be offered as the `latest` crash-consistent point.
    "ALTER TABLE disks ADD COLUMN applied_time_ns INTEGER NOT NULL DEFAULT 0;",
    // 6: the data generations the replica holds (a generations file,
    // tidemark_formats::generation; NULL: not known yet, adopted from the
    // next Hello), and the generation each failover ended.
    "ALTER TABLE disks ADD COLUMN generations BLOB;
    ALTER TABLE failovers ADD COLUMN generation TEXT;",
    // 7: a replica adopted by `tidemark reprotect`, waiting for the
    // failed-over copy's agent (docs/failback.md, section 3): the seq the
    // old source reached, and the regions it wrote, each with the seq that
    // wrote it (an upper bound), to be resynced from the copy if written
    // after the fork.
    "ALTER TABLE disks ADD COLUMN reprotect_source_seq INTEGER;
    ALTER TABLE disks ADD COLUMN reprotect_tracked_after INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE disks ADD COLUMN reprotect_discard_divergent INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE reprotect_owed (
        disk_id TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        offset  INTEGER NOT NULL,
        length  INTEGER NOT NULL
    ) STRICT;",
    // 8: drills (crate::drill): a filesystem check of a view at a point,
    // its result and the checker's output.
    "CREATE TABLE drills (
        id            INTEGER PRIMARY KEY,
        disk_id       TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        point_time_ns INTEGER NOT NULL,
        started_ns    INTEGER NOT NULL,
        duration_ms   INTEGER NOT NULL,
        result        TEXT NOT NULL CHECK (result IN ('passed', 'failed', 'skipped', 'error')),
        summary       TEXT NOT NULL,
        output        TEXT NOT NULL,
        trigger       TEXT NOT NULL,
        found         TEXT NOT NULL DEFAULT '[]'
    ) STRICT;
    CREATE INDEX drills_by_disk ON drills (disk_id, id);",
];

/// A region the old source wrote, as `tidemark reprotect` found it in its
/// state directory: written at a seq ≤ `seq` (`u64::MAX`: not known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owed {
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
}

/// A replica adopted by `tidemark reprotect` that waits for the agent of
/// the failed-over copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reprotect {
    /// The highest seq the old source journaled (what the replica holds).
    pub source_seq: u64,
    /// The old source stopped tracking regions of seqs up to this once the
    /// target reported them applied: a fork before it may miss some.
    pub tracked_after: u64,
    /// `--discard-divergent`: what the old source wrote after the fork is
    /// overwritten from the copy.
    pub discard_divergent: bool,
}

/// Whether a disk's replica is known to equal its source at some seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncState {
    /// No full sync has completed since the target started receiving this
    /// disk (or since records were lost): parts of the replica may be stale.
    AwaitingFullSync,
    /// A full sync completed; the replica is a prefix of the write stream
    /// (unless a halt says otherwise).
    Consistent,
}

impl SyncState {
    /// The value stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingFullSync => "awaiting-full-sync",
            Self::Consistent => "consistent",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "awaiting-full-sync" => Some(Self::AwaitingFullSync),
            "consistent" => Some(Self::Consistent),
            _ => None,
        }
    }
}

/// A record that failed its end-to-end check and was not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Halt {
    /// Seq of the record.
    pub seq: u64,
    /// Its kind (`write`, `sync`, …).
    pub kind: String,
    /// The range it would have written.
    pub offset: u64,
    pub length: u64,
    /// The parts of that range no `Sync` / `Zero+SYNC` record with a later
    /// seq has covered yet.
    pub pending: RangeSet,
    /// Whether the whole range has been covered (the halt is over).
    pub covered: bool,
    /// The seq of the record that finished covering it.
    pub covered_seq: Option<u64>,
    /// What the check found.
    pub reason: String,
    /// Unix seconds.
    pub detected_at: i64,
    pub covered_at: Option<i64>,
}

/// One disk as tools see it (`tidemark status`, `tidemark points`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskState {
    pub disk_id: String,
    /// 8-4-4-4-12 lower-case hex.
    pub disk_uuid: String,
    /// Every seq ≤ this is durable in the replica.
    pub applied_seq: u64,
    pub sync_state: SyncState,
    /// `consistent`, `syncing` or `halted` (as in the `TargetState` frame).
    pub state: String,
    /// The seq from which the target holds every record (None: nothing yet).
    pub first_seq: Option<u64>,
    /// Lowest seq of a halt not yet covered.
    pub halted_seq: Option<u64>,
    /// The seq of the SyncBegin of a sync still running (no recovery point
    /// until its SyncDone).
    pub sync_from: Option<u64>,
    /// Bytes the uncovered halts still wait for.
    pub pending_bytes: u64,
    /// Every halt, covered or not, by seq.
    pub halts: Vec<Halt>,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// Recovery points offered (`latest` included when it is one).
    pub point_count: u64,
    /// The oldest and newest recovery points (None: no point).
    pub oldest_point: Option<Point>,
    pub newest_point: Option<Point>,
    /// Seconds since the source time of the newest application-consistent
    /// point (None: there is none).
    pub last_app_point_age_s: Option<u64>,
    /// Bytes of undo segments, and the cap (`--retention-max`).
    pub undo_bytes: u64,
    pub undo_cap_bytes: Option<u64>,
    /// The disk's retention policy.
    pub policy: DiskPolicy,
    /// The format its replica is kept in (`raw`, `vmdk-flat`, `vmdk-sparse`).
    #[serde(serialize_with = "ser_format")]
    pub format: ReplicaFormat,
    /// The failovers recorded, oldest first; non-empty means the target
    /// no longer applies to this disk.
    pub failovers: Vec<Failover>,
    /// The data generation the replica holds, 32 hex digits (None: not
    /// known yet).
    pub generation: Option<String>,
}

/// A failover recorded for a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failover {
    /// When it was recorded (ns since the epoch).
    pub at_ns: u64,
    /// The point the disk was recovered at.
    pub point: Point,
    /// Where it was written.
    pub output: String,
    /// The data generation it ended, 32 hex digits (None: not known, or a
    /// failover recorded by an older build).
    pub generation: Option<String>,
}

/// One entry of the undo index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoRow {
    pub capture_seq: u64,
    pub start_block: u64,
    pub end_block: u64,
    pub segment: u64,
    pub seg_offset: u64,
    pub zero: bool,
}

/// One undo segment as the catalog records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentRow {
    pub segment: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Marked length: bytes past it were never marked.
    pub bytes: u64,
}

fn ser_format<S: serde::Serializer>(f: &ReplicaFormat, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(f.as_str())
}

impl DiskState {
    /// The state as the wire names it.
    pub fn replica_state(&self) -> ReplicaState {
        replica_state(self.sync_state, self.sync_from.is_some(), self.halted_seq.is_some())
    }
}

/// The replica state a disk reports: halted wins over syncing; a disk
/// syncs while it awaits a full sync or a sync that began (SyncBegin) has
/// not yet ended.
pub fn replica_state(sync: SyncState, syncing: bool, halted: bool) -> ReplicaState {
    if halted {
        ReplicaState::Halted
    } else if sync == SyncState::AwaitingFullSync || syncing {
        ReplicaState::Syncing
    } else {
        ReplicaState::Consistent
    }
}

/// Read every disk's state from `data_dir/catalog.db`, read-only (safe
/// while the target runs).
pub fn disk_states(data_dir: &Path) -> Result<Vec<DiskState>> {
    let path = data_dir.join(CATALOG_FILE);
    if !path.exists() {
        return Err(Error::new(
            ErrorKind::Catalog,
            format!("no catalog at {} (is the data directory right?)", path.display()),
        ));
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::with_source(ErrorKind::Catalog, format!("open {}", path.display()), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        return Ok(Vec::new());
    }
    if usize::try_from(version).unwrap_or(0) < MIGRATIONS.len() {
        return Err(corrupt(format!(
            "{}: schema version {version} was written by an older target; start the target once to migrate it",
            path.display()
        )));
    }
    let mut out = Vec::new();
    let mut st = conn.prepare(
        "SELECT disk_id, disk_uuid, applied_seq, sync_state, first_seq, halted_seq, created_at, updated_at,
                sync_from
         FROM disks ORDER BY disk_id",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, Option<i64>>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, i64>(7)?,
            r.get::<_, Option<i64>>(8)?,
        ))
    })?;
    for row in rows {
        let (disk_id, disk_uuid, applied, sync, first, halted, created_at, updated_at, sync_from) = row?;
        let row = Catalog::row(&conn, &disk_id)?.ok_or_else(|| corrupt(format!("disk {disk_id} vanished")))?;
        let points = read_points_with_latest(&conn, &disk_id)?;
        let now = now_ns();
        let last_app = points.iter().rev().find(|p| p.kind == PointKind::App);
        let failovers = read_failovers(&conn, &disk_id)?;
        let generation = read_history(&conn, &disk_id)?.map(|h| h.current().id.hex());
        let undo_bytes: i64 = conn.query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM undo_segments WHERE disk_id = ?1",
            [&disk_id],
            |r| r.get(0),
        )?;
        let sync_state =
            SyncState::parse(&sync).ok_or_else(|| corrupt(format!("unknown sync_state {sync:?}")).disk(&disk_id))?;
        let halts = read_halts(&conn, &disk_id, false)?;
        let pending_bytes = halts.iter().filter(|h| !h.covered).map(|h| h.pending.bytes()).sum();
        let halted_seq = halted.map(|v| to_u64(v, "halted_seq")).transpose()?;
        let sync_from = sync_from.map(|v| to_u64(v, "sync_from")).transpose()?;
        out.push(DiskState {
            state: replica_state(sync_state, sync_from.is_some(), halted_seq.is_some())
                .name()
                .to_string(),
            sync_from,
            disk_id,
            disk_uuid,
            applied_seq: to_u64(applied, "applied_seq")?,
            sync_state,
            first_seq: first.map(|v| to_u64(v, "first_seq")).transpose()?,
            halted_seq,
            pending_bytes,
            halts,
            created_at,
            updated_at,
            point_count: points.len() as u64,
            oldest_point: points.first().cloned(),
            newest_point: points.last().cloned(),
            last_app_point_age_s: last_app.map(|p| now.saturating_sub(p.time_ns) / 1_000_000_000),
            undo_bytes: to_u64(undo_bytes, "undo bytes")?,
            undo_cap_bytes: row.policy.max_bytes,
            policy: row.policy,
            format: row.format,
            failovers,
            generation,
        });
    }
    Ok(out)
}

/// What [`Catalog::point_tail`] reads: the newest point's seq, and the
/// newest two crash points (seq, source time), newest first.
pub type PointTail = (Option<u64>, Vec<(u64, u64)>);

/// A disk's row, as the session keeps it in memory between commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRow {
    pub disk_id: String,
    pub disk_uuid: [u8; 16],
    pub applied_seq: u64,
    /// Source time of the record at `applied_seq` (0: not known, e.g. a
    /// disk applied by an older build).
    pub applied_time_ns: u64,
    pub sync_state: SyncState,
    pub first_seq: Option<u64>,
    pub full_sync_seen: bool,
    /// The seq of the SyncBegin of a sync that has not ended yet.
    pub sync_from: Option<u64>,
    /// Every record up to this seq has had its undo captured and marked
    /// (a re-apply after a crash must not capture it again).
    pub undo_captured_seq: u64,
    /// The disk's retention policy.
    pub policy: DiskPolicy,
    /// The format of its replica.
    pub format: ReplicaFormat,
    /// A failover was recorded: nothing more is applied.
    pub failed_over: bool,
    /// Set by a forced rebind until the old replica has been moved aside:
    /// the disk id its old history is kept under.
    pub replaced_uuid: Option<String>,
}

/// What [`Catalog::bind`] found for a Hello.
#[derive(Debug)]
pub enum Bind {
    /// First time this disk id is seen; a row was created.
    New(DiskRow),
    /// The id is bound to this UUID already.
    Existing(DiskRow),
    /// The id was bound to `old_uuid`; FORCE_RESYNC rebound it (halts
    /// dropped, applied_seq 0); the old replica is still to be moved aside.
    Rebound { row: DiskRow, old_uuid: String },
    /// The id is bound to another UUID and no FORCE_RESYNC was given.
    Mismatch { bound_uuid: String },
}

/// A read-write connection to the catalog.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn corrupt(msg: String) -> Error {
    Error::new(ErrorKind::Catalog, msg)
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("catalog holds a negative {what} ({v})")))
}

/// Seqs, offsets and lengths are bounded to `i64::MAX` before they reach
/// the catalog (see `apply`), so this only fails on a bug.
pub fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::new(ErrorKind::Catalog, format!("{what} {v} does not fit the catalog")))
}

/// A disk's recovery points, by seq.
pub fn read_points(conn: &Connection, disk_id: &str) -> Result<Vec<Point>> {
    read_newest_points(conn, disk_id, None)
}

/// A disk's newest `limit` points (None: all), by seq.
fn read_newest_points(conn: &Connection, disk_id: &str, limit: Option<u32>) -> Result<Vec<Point>> {
    let mut st = conn
        .prepare_cached("SELECT seq, time_ns, kind, tag FROM points WHERE disk_id = ?1 ORDER BY seq DESC LIMIT ?2")?;
    let limit = limit.map_or(-1, i64::from);
    let rows = st.query_map(params![disk_id, limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (seq, time, kind, tag) = r?;
        out.push(Point {
            seq: to_u64(seq, "point seq")?,
            time_ns: to_u64(time, "point time")?,
            kind: PointKind::parse(&kind).ok_or_else(|| corrupt(format!("point kind {kind:?}")).disk(disk_id))?,
            tag,
            latest: false,
        });
    }
    out.reverse();
    Ok(out)
}

/// A disk's recovery points as the tools offer them: the recorded points,
/// and the applied state as the newest crash-consistent point (`latest`:
/// any prefix of the ordered stream is a crash state of the source) while
/// the disk is consistent and keeps retention. That point, when the
/// applied seq is not a recorded point already, is marked `latest`.
pub fn read_points_with_latest(conn: &Connection, disk_id: &str) -> Result<Vec<Point>> {
    read_newest_points_with_latest(conn, disk_id, None)
}

/// [`read_points_with_latest`], the newest `limit` of them (None: all):
/// what a listing of the newest points reads, without the older ones.
pub fn read_newest_points_with_latest(conn: &Connection, disk_id: &str, limit: Option<u32>) -> Result<Vec<Point>> {
    let mut pts = read_newest_points(conn, disk_id, limit)?;
    let trim = |mut pts: Vec<Point>| {
        let over = pts.len().saturating_sub(limit.map_or(usize::MAX, |l| l as usize));
        pts.drain(..over);
        pts
    };
    let Some(row) = Catalog::row(conn, disk_id)? else {
        return Ok(trim(pts));
    };
    let halted: Option<i64> = conn.query_row("SELECT halted_seq FROM disks WHERE disk_id = ?1", [disk_id], |r| {
        r.get(0)
    })?;
    let consistent = row.sync_state == SyncState::Consistent && row.sync_from.is_none() && halted.is_none();
    // A batch that was being applied when the target stopped may have
    // written part of itself to the replica: until it is applied again,
    // the replica is not the applied state.
    let settled = row.undo_captured_seq <= row.applied_seq;
    if !consistent || !settled || !row.policy.enabled() || row.applied_seq == 0 {
        return Ok(trim(pts));
    }
    match pts.last() {
        Some(p) if p.seq >= row.applied_seq => {}
        _ => {
            let updated: i64 = conn.query_row("SELECT updated_at FROM disks WHERE disk_id = ?1", [disk_id], |r| {
                r.get(0)
            })?;
            // A disk last applied by an older build has no applied time:
            // the commit's wall clock is the best there is.
            let time_ns = if row.applied_time_ns != 0 {
                row.applied_time_ns
            } else {
                u64::try_from(updated).unwrap_or(0).saturating_mul(1_000_000_000)
            };
            pts.push(Point {
                seq: row.applied_seq,
                time_ns,
                kind: PointKind::Crash,
                tag: None,
                latest: true,
            });
        }
    }
    Ok(trim(pts))
}

fn read_failovers(conn: &Connection, disk_id: &str) -> Result<Vec<Failover>> {
    let mut st = conn.prepare_cached(
        "SELECT at_ns, seq, point_time_ns, kind, tag, output, generation FROM failovers WHERE disk_id = ?1 ORDER BY rowid",
    )?;
    let rows = st.query_map([disk_id], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (at, seq, t, kind, tag, output, generation) = r?;
        out.push(Failover {
            at_ns: to_u64(at, "failover time")?,
            point: Point {
                seq: to_u64(seq, "seq")?,
                time_ns: to_u64(t, "time")?,
                kind: PointKind::parse(&kind).unwrap_or(PointKind::Crash),
                tag,
                latest: false,
            },
            output,
            generation,
        });
    }
    Ok(out)
}

/// The generations the replica of `disk_id` holds (None: not known yet).
pub fn read_history(conn: &Connection, disk_id: &str) -> Result<Option<History>> {
    let blob: Option<Vec<u8>> = conn
        .query_row("SELECT generations FROM disks WHERE disk_id = ?1", [disk_id], |r| {
            r.get(0)
        })
        .optional()?
        .flatten();
    blob.map(|b| History::decode(&b, Path::new(CATALOG_FILE)).map_err(|e| corrupt(e.to_string()).disk(disk_id)))
        .transpose()
}

/// Undo entries captured after `after` that cover a block of `[b0, b1)`,
/// lowest capture seq first.
pub fn undo_lookup(conn: &Connection, disk_id: &str, after: u64, b0: u64, b1: u64) -> Result<Vec<UndoRow>> {
    let mut st = conn.prepare_cached(
        "SELECT capture_seq, start_block, end_block, segment, seg_offset, zero FROM undo
         WHERE disk_id = ?1 AND end_block > ?3 AND start_block < ?4 AND capture_seq > ?2
         ORDER BY capture_seq",
    )?;
    let rows = st.query_map(
        params![
            disk_id,
            to_i64(after, "seq")?,
            to_i64(b0, "block")?,
            to_i64(b1, "block")?
        ],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for r in rows {
        let (c, s, e, g, o, z) = r?;
        out.push(UndoRow {
            capture_seq: to_u64(c, "capture seq")?,
            start_block: to_u64(s, "block")?,
            end_block: to_u64(e, "block")?,
            segment: to_u64(g, "segment")?,
            seg_offset: to_u64(o, "offset")?,
            zero: z != 0,
        });
    }
    Ok(out)
}

/// Open the catalog read-only (tools, views); safe while the target runs.
pub fn open_read_only(data_dir: &Path) -> Result<Connection> {
    let path = data_dir.join(CATALOG_FILE);
    if !path.exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no catalog at {} (is the data directory right?)", path.display()),
        ));
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::with_source(ErrorKind::Catalog, format!("open {}", path.display()), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// 8-4-4-4-12 lower-case hex.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn read_halts(conn: &Connection, disk_id: &str, uncovered_only: bool) -> Result<Vec<Halt>> {
    let sql = if uncovered_only {
        "SELECT seq, kind, offset, length, pending, covered, covered_seq, reason, detected_at, covered_at
         FROM halts WHERE disk_id = ?1 AND covered = 0 ORDER BY seq"
    } else {
        "SELECT seq, kind, offset, length, pending, covered, covered_seq, reason, detected_at, covered_at
         FROM halts WHERE disk_id = ?1 ORDER BY seq"
    };
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map([disk_id], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, i64>(8)?,
            r.get::<_, Option<i64>>(9)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, kind, offset, length, pending, covered, covered_seq, reason, detected_at, covered_at) = row?;
        let pending: RangeSet = serde_json::from_str(&pending)
            .ok()
            .filter(RangeSet::is_well_formed)
            .ok_or_else(|| {
                corrupt(format!(
                    "disk {disk_id}: halt {seq} has unreadable pending ranges {pending:?}"
                ))
            })?;
        out.push(Halt {
            seq: to_u64(seq, "halt seq")?,
            kind,
            offset: to_u64(offset, "halt offset")?,
            length: to_u64(length, "halt length")?,
            pending,
            covered: covered != 0,
            covered_seq: covered_seq.map(|v| to_u64(v, "covered_seq")).transpose()?,
            reason,
            detected_at,
            covered_at,
        });
    }
    Ok(out)
}

impl Catalog {
    /// Open (creating if needed) `data_dir/catalog.db` and bring its schema
    /// up to date. Refuses a catalog written by a newer build.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(CATALOG_FILE);
        let conn = Connection::open(&path)
            .map_err(|e| Error::with_source(ErrorKind::Catalog, format!("open {}", path.display()), e))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(corrupt(format!(
                "{}: cannot switch to WAL mode (got {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut c = Self { conn, path };
        c.migrate()?;
        Ok(c)
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn migrate(&mut self) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len();
        let have = usize::try_from(version).unwrap_or(usize::MAX);
        if have > known {
            return Err(corrupt(format!(
                "{}: schema version {version} is newer than this build knows ({known})",
                self.path.display()
            )));
        }
        for (i, script) in MIGRATIONS.iter().enumerate().skip(have) {
            tx.execute_batch(script)?;
            tx.pragma_update(None, "user_version", i + 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn row(tx: &Connection, disk_id: &str) -> Result<Option<DiskRow>> {
        let r = tx
            .query_row(
                "SELECT disk_uuid, applied_seq, sync_state, first_seq, full_sync_seen, replaced_uuid, sync_from,
                        undo_captured_seq, retention_window_s, retention_max_bytes, on_full, point_interval_ms,
                        failed_over, format, applied_time_ns
                 FROM disks WHERE disk_id = ?1",
                [disk_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                        (
                            r.get::<_, i64>(7)?,
                            r.get::<_, i64>(8)?,
                            r.get::<_, Option<i64>>(9)?,
                            r.get::<_, String>(10)?,
                            r.get::<_, i64>(11)?,
                            r.get::<_, i64>(12)?,
                        ),
                        r.get::<_, String>(13)?,
                        r.get::<_, i64>(14)?,
                    ))
                },
            )
            .optional()?;
        let Some((
            uuid,
            applied,
            sync,
            first,
            seen,
            replaced,
            sync_from,
            (captured, window, max, on_full, interval, fo),
            format,
            applied_time,
        )) = r
        else {
            return Ok(None);
        };
        Ok(Some(DiskRow {
            disk_id: disk_id.to_string(),
            disk_uuid: parse_uuid(&uuid).ok_or_else(|| corrupt(format!("bad uuid {uuid:?}")).disk(disk_id))?,
            applied_seq: to_u64(applied, "applied_seq")?,
            applied_time_ns: to_u64(applied_time, "applied_time_ns")?,
            sync_state: SyncState::parse(&sync)
                .ok_or_else(|| corrupt(format!("unknown sync_state {sync:?}")).disk(disk_id))?,
            first_seq: first.map(|v| to_u64(v, "first_seq")).transpose()?,
            full_sync_seen: seen != 0,
            sync_from: sync_from.map(|v| to_u64(v, "sync_from")).transpose()?,
            undo_captured_seq: to_u64(captured, "undo_captured_seq")?,
            policy: DiskPolicy {
                window: Duration::from_secs(to_u64(window, "retention_window_s")?),
                max_bytes: max.map(|v| to_u64(v, "retention_max_bytes")).transpose()?,
                on_full: on_full
                    .parse::<OnFull>()
                    .map_err(|_| corrupt(format!("unknown on_full {on_full:?}")).disk(disk_id))?,
                point_interval: Duration::from_millis(to_u64(interval, "point_interval_ms")?),
            },
            format: format
                .parse::<ReplicaFormat>()
                .map_err(|_| corrupt(format!("unknown replica format {format:?}")).disk(disk_id))?,
            failed_over: fo != 0,
            replaced_uuid: replaced,
        }))
    }

    /// Check (and create or, with `force`, replace) the binding of
    /// `disk_id` to `uuid`, in one transaction. A new (or rebound) disk
    /// gets `policy` and `format`; an existing one keeps its own.
    pub fn bind(
        &mut self,
        disk_id: &str,
        uuid: &[u8; 16],
        force: bool,
        policy: &DiskPolicy,
        format: ReplicaFormat,
    ) -> Result<Bind> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_unix();
        let fresh = |replaced_uuid: Option<String>| DiskRow {
            disk_id: disk_id.to_string(),
            disk_uuid: *uuid,
            applied_seq: 0,
            applied_time_ns: 0,
            sync_state: SyncState::AwaitingFullSync,
            first_seq: None,
            full_sync_seen: false,
            sync_from: None,
            undo_captured_seq: 0,
            policy: policy.clone(),
            format,
            failed_over: false,
            replaced_uuid,
        };
        let out = match Self::row(&tx, disk_id)? {
            None => {
                tx.execute(
                    "INSERT INTO disks (disk_id, disk_uuid, created_at, updated_at, format) VALUES (?1, ?2, ?3, ?3, ?4)",
                    params![disk_id, format_uuid(uuid), now, format.as_str()],
                )?;
                Self::put_policy(&tx, disk_id, policy)?;
                Bind::New(fresh(None))
            }
            // A failover's record and points are never erased by a rebind:
            // the caller refuses the failed-over disk.
            Some(row) if row.disk_uuid == *uuid || row.failed_over => Bind::Existing(row),
            Some(row) if !force => Bind::Mismatch {
                bound_uuid: format_uuid(&row.disk_uuid),
            },
            Some(row) => {
                let old_uuid = format_uuid(&row.disk_uuid);
                // The old binding's history is kept, never deleted: its rows
                // move to a disk id of their own (its folder follows when
                // the target opens the disk, `replaced_uuid` names it until
                // then) and stay until an operator removes them.
                let kept = match &row.replaced_uuid {
                    // A rebind that was not finished: its history is kept
                    // under that id already; the rows left are the newer
                    // binding's, none of which was applied.
                    Some(k) if k.starts_with(&format!("{disk_id}.")) || Self::row(&tx, k)?.is_some() => k.clone(),
                    _ => {
                        let kept = Self::free_kept_id(&tx, disk_id, &old_uuid)?;
                        Self::rename_rows(&tx, disk_id, &kept)?;
                        tx.execute(
                            "UPDATE disks SET replaced_uuid = NULL, updated_at = ?2 WHERE disk_id = ?1",
                            params![kept, now],
                        )?;
                        tx.execute(
                            "INSERT INTO disks (disk_id, disk_uuid, created_at, updated_at, format) VALUES (?1, ?2, ?3, ?3, ?4)",
                            params![disk_id, format_uuid(uuid), now, format.as_str()],
                        )?;
                        kept
                    }
                };
                for t in ["halts", "points", "undo", "undo_segments"] {
                    tx.execute(&format!("DELETE FROM {t} WHERE disk_id = ?1"), [disk_id])?;
                }
                Self::put_policy(&tx, disk_id, policy)?;
                tx.execute(
                    "UPDATE disks SET disk_uuid = ?2, applied_seq = 0, applied_time_ns = 0, sync_state = 'awaiting-full-sync',
                         first_seq = NULL, full_sync_seen = 0, halted_seq = NULL, sync_from = NULL,
                         undo_captured_seq = 0, failed_over = 0, generations = NULL,
                         replaced_uuid = ?3,
                         created_at = ?4, updated_at = ?4, format = ?5
                     WHERE disk_id = ?1",
                    params![disk_id, format_uuid(uuid), kept, now, format.as_str()],
                )?;
                Bind::Rebound {
                    row: fresh(Some(kept)),
                    old_uuid,
                }
            }
        };
        tx.commit()?;
        Ok(out)
    }

    /// The generations the replica holds (None: not known yet).
    pub fn history(&self, disk_id: &str) -> Result<Option<History>> {
        read_history(&self.conn, disk_id)
    }

    /// Record the generations the replica holds.
    pub fn set_history(&mut self, disk_id: &str, h: &History) -> Result<()> {
        self.conn.execute(
            "UPDATE disks SET generations = ?2 WHERE disk_id = ?1",
            params![disk_id, h.encode()],
        )?;
        Ok(())
    }

    /// Adopt a replica for `tidemark reprotect`: a new disk row that holds
    /// the old source's line (`history`) up to `source_seq`, consistent, and
    /// the regions it wrote (`owed`), waiting for the failed-over copy's
    /// agent. Refused if the disk id is in the catalog already.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt_reprotected(
        &mut self,
        disk_id: &str,
        uuid: &[u8; 16],
        policy: &DiskPolicy,
        history: &History,
        source_seq: u64,
        tracked_after: u64,
        discard_divergent: bool,
        owed: &[Owed],
    ) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let pending: Option<Option<i64>> = tx
            .query_row(
                "SELECT reprotect_source_seq FROM disks WHERE disk_id = ?1",
                [disk_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(Some(_)) = pending {
            // Adopted before, its copy's agent not come yet: nothing was
            // applied, so it is adopted again (e.g. with --discard-divergent).
            tx.execute("DELETE FROM disks WHERE disk_id = ?1", [disk_id])?;
        } else if pending.is_some() {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("disk {disk_id} is in this data directory already; reprotect adopts a replica for a disk id it does not hold"),
            ));
        }
        let now = now_unix();
        let seq = to_i64(source_seq, "seq")?;
        tx.execute(
            "INSERT INTO disks (disk_id, disk_uuid, applied_seq, sync_state, first_seq, full_sync_seen,
                                undo_captured_seq, created_at, updated_at, format, generations,
                                reprotect_source_seq, reprotect_discard_divergent, reprotect_tracked_after)
             VALUES (?1, ?2, ?3, 'consistent', ?4, 1, ?3, ?5, ?5, 'raw', ?6, ?3, ?7, ?8)",
            params![
                disk_id,
                format_uuid(uuid),
                seq,
                seq.saturating_add(1),
                now,
                history.encode(),
                i64::from(discard_divergent),
                to_i64(tracked_after, "seq")?
            ],
        )?;
        Self::put_policy(&tx, disk_id, policy)?;
        {
            let mut st =
                tx.prepare("INSERT INTO reprotect_owed (disk_id, seq, offset, length) VALUES (?1, ?2, ?3, ?4)")?;
            for o in owed {
                st.execute(params![
                    disk_id,
                    i64::try_from(o.seq).unwrap_or(i64::MAX),
                    to_i64(o.offset, "offset")?,
                    to_i64(o.length, "length")?
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Record `disk_id` as a kept state of another disk (the divergent
    /// state `tidemark reprotect --discard-divergent` keeps before the
    /// resync overwrites it): a consistent raw replica, already in its
    /// folder, at `seq`, whose newest point is that state. No agent feeds
    /// it; `tidemark mount` and `tidemark points` read it like any disk.
    pub fn keep_aside(
        &mut self,
        disk_id: &str,
        uuid: &[u8; 16],
        policy: &DiskPolicy,
        history: Option<&History>,
        seq: u64,
    ) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_unix();
        let seq = to_i64(seq.max(1), "seq")?;
        tx.execute(
            "INSERT INTO disks (disk_id, disk_uuid, applied_seq, sync_state, first_seq, full_sync_seen,
                                undo_captured_seq, created_at, updated_at, format, generations)
             VALUES (?1, ?2, ?3, 'consistent', 1, 1, ?3, ?4, ?4, 'raw', ?5)",
            params![disk_id, format_uuid(uuid), seq, now, history.map(History::encode)],
        )?;
        Self::put_policy(&tx, disk_id, policy)?;
        tx.commit()?;
        Ok(())
    }

    /// The disk's row, if the catalog holds it.
    pub fn disk_row(&self, disk_id: &str) -> Result<Option<DiskRow>> {
        Self::row(&self.conn, disk_id)
    }

    /// Rename a failed-over disk to `new_id` in every table, in one
    /// transaction (its points, undo and failover record stay, under the
    /// new id): its history is kept aside when the disk comes back from
    /// the other direction. The caller moves its folder.
    pub fn retire(&mut self, disk_id: &str, new_id: &str) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = Self::row(&tx, disk_id)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no disk {disk_id} in the catalog")))?;
        if !row.failed_over {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("disk {disk_id} is replicating (not failed over): its replica is not set aside"),
            ));
        }
        if Self::row(&tx, new_id)?.is_some() {
            return Err(Error::new(ErrorKind::Refused, format!("disk id {new_id} is taken")));
        }
        Self::rename_rows(&tx, disk_id, new_id)?;
        tx.commit()?;
        Ok(())
    }

    /// The tables that hold a disk's rows, the disks table last.
    const DISK_TABLES: [&'static str; 7] = [
        "halts",
        "points",
        "undo_segments",
        "undo",
        "failovers",
        "reprotect_owed",
        "disks",
    ];

    /// Move every row of `from` to `to` (free), in the caller's transaction.
    fn rename_rows(tx: &Transaction<'_>, from: &str, to: &str) -> Result<()> {
        tx.pragma_update(None, "defer_foreign_keys", "ON")?;
        for t in Self::DISK_TABLES {
            tx.execute(
                &format!("UPDATE {t} SET disk_id = ?2 WHERE disk_id = ?1"),
                params![from, to],
            )?;
        }
        Ok(())
    }

    /// A free disk id to keep the history of `disk_id`'s binding to
    /// `old_uuid` under: `<disk>.replaced-<uuid's first 8 hex>` (the disk
    /// part shortened to fit 64 bytes; `-2`, `-3`… if taken).
    fn free_kept_id(tx: &Transaction<'_>, disk_id: &str, old_uuid: &str) -> Result<String> {
        let tail = format!(".replaced-{}", &old_uuid[..8.min(old_uuid.len())]);
        let room = 64usize.saturating_sub(tail.len() + 3);
        let head = &disk_id[..room.min(disk_id.len())];
        for n in 1..100 {
            let id = if n == 1 {
                format!("{head}{tail}")
            } else {
                format!("{head}{tail}-{n}")
            };
            if Self::row(tx, &id)?.is_none() {
                return Ok(id);
            }
        }
        Err(Error::new(
            ErrorKind::Refused,
            format!("disk {disk_id}: 99 kept histories of uuid {old_uuid} exist; remove some first"),
        ))
    }

    /// The reprotect the disk waits for, if any.
    pub fn reprotect(&self, disk_id: &str) -> Result<Option<Reprotect>> {
        let r: Option<(Option<i64>, i64, i64)> = self
            .conn
            .query_row(
                "SELECT reprotect_source_seq, reprotect_discard_divergent, reprotect_tracked_after
                 FROM disks WHERE disk_id = ?1",
                [disk_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(match r {
            Some((Some(seq), discard, tracked)) => Some(Reprotect {
                source_seq: to_u64(seq, "reprotect seq")?,
                tracked_after: to_u64(tracked, "reprotect tracked seq")?,
                discard_divergent: discard != 0,
            }),
            _ => None,
        })
    }

    /// The regions the old source wrote after seq `fork`, merged.
    pub fn owed_after(&self, disk_id: &str, fork: u64) -> Result<RangeSet> {
        let mut st = self
            .conn
            .prepare("SELECT offset, length FROM reprotect_owed WHERE disk_id = ?1 AND seq > ?2")?;
        let rows = st.query_map(params![disk_id, i64::try_from(fork).unwrap_or(i64::MAX)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut v = Vec::new();
        for r in rows {
            let (o, l) = r?;
            v.push((to_u64(o, "offset")?, to_u64(l, "length")?));
        }
        Ok(RangeSet::from_ranges(v))
    }

    /// The failed-over copy's agent arrived with generation `history`
    /// (forked at `fork`): the replica holds the line up to `fork`; the old
    /// source's regions written after it (`owed`) wait as one halt at
    /// `fork`, resynced from the copy. One transaction.
    ///
    /// `compare`: the old source's tracking is in doubt: the disk awaits a
    /// full sync from seq `fork + 1` on (which hash-compares), and the
    /// replica is not consistent until it is done.
    pub fn accept_reprotect(
        &mut self,
        disk_id: &str,
        fork: u64,
        history: &History,
        owed: &RangeSet,
        compare: bool,
    ) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let f = to_i64(fork, "seq")?;
        tx.execute(
            "UPDATE disks SET applied_seq = ?2, undo_captured_seq = MIN(undo_captured_seq, ?2), first_seq = ?3,
                 generations = ?4, reprotect_source_seq = NULL, reprotect_discard_divergent = 0, updated_at = ?5
             WHERE disk_id = ?1",
            params![disk_id, f, f.saturating_add(1), history.encode(), now_unix()],
        )?;
        if compare {
            tx.execute(
                "UPDATE disks SET sync_state = 'awaiting-full-sync', full_sync_seen = 0 WHERE disk_id = ?1",
                [disk_id],
            )?;
        }
        if let Some((offset, length)) = owed.bounds() {
            let mut h = Halt {
                seq: fork,
                kind: "reprotect".into(),
                offset,
                length,
                pending: owed.clone(),
                covered: false,
                covered_seq: None,
                reason: format!(
                    "reprotect: {} bytes the old source wrote after seq {fork} are resynced from the failed-over copy",
                    owed.bytes()
                ),
                detected_at: now_unix(),
                covered_at: None,
            };
            h.pending = owed.clone();
            Self::put_halt(&tx, disk_id, &h)?;
            tx.execute(
                "UPDATE disks SET halted_seq = ?2 WHERE disk_id = ?1",
                params![disk_id, f],
            )?;
        }
        tx.execute("DELETE FROM reprotect_owed WHERE disk_id = ?1", [disk_id])?;
        tx.commit()?;
        Ok(())
    }

    /// The failovers recorded for the disk, oldest first.
    pub fn failovers(&self, disk_id: &str) -> Result<Vec<Failover>> {
        read_failovers(&self.conn, disk_id)
    }

    /// The old replica of a forced rebind has been moved aside.
    pub fn clear_replaced(&mut self, disk_id: &str) -> Result<()> {
        self.conn
            .execute("UPDATE disks SET replaced_uuid = NULL WHERE disk_id = ?1", [disk_id])?;
        Ok(())
    }

    /// The halts of a disk that are not covered yet, by seq.
    pub fn open_halts(&self, disk_id: &str) -> Result<Vec<Halt>> {
        read_halts(&self.conn, disk_id, true)
    }

    /// Commit a batch: the disk's row and every halt created or changed by
    /// it, in one transaction. Called only after the replica's fdatasync.
    ///
    /// `thinned` are older crash points that `--point-interval` drops now
    /// that a newer flush is a point (their undo data stays: a view at any
    /// seq reads the first capture after it, whichever point it was
    /// captured for).
    pub fn commit(
        &mut self,
        row: &DiskRow,
        halted_seq: Option<u64>,
        halts: &[&Halt],
        points: &[Point],
        thinned: &[u64],
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE disks SET applied_seq = ?2, sync_state = ?3, first_seq = ?4, full_sync_seen = ?5,
                 halted_seq = ?6, updated_at = ?7, sync_from = ?9, applied_time_ns = ?10
             WHERE disk_id = ?1 AND disk_uuid = ?8 AND failed_over = 0",
            params![
                row.disk_id,
                to_i64(row.applied_seq, "applied_seq")?,
                row.sync_state.as_str(),
                row.first_seq.map(|v| to_i64(v, "first_seq")).transpose()?,
                i64::from(row.full_sync_seen),
                halted_seq.map(|v| to_i64(v, "halted_seq")).transpose()?,
                now_unix(),
                format_uuid(&row.disk_uuid),
                row.sync_from.map(|v| to_i64(v, "sync_from")).transpose()?,
                to_i64(row.applied_time_ns, "applied time")?,
            ],
        )?;
        if n != 1 {
            return Err(corrupt(format!(
                "no row bound to {} to commit to (or it was failed over)",
                format_uuid(&row.disk_uuid)
            ))
            .disk(&row.disk_id));
        }
        for h in halts {
            Self::put_halt(&tx, &row.disk_id, h)?;
        }
        for seq in thinned {
            tx.execute(
                "DELETE FROM points WHERE disk_id = ?1 AND seq = ?2 AND kind = 'crash'",
                params![row.disk_id, to_i64(*seq, "point seq")?],
            )?;
        }
        for p in points {
            tx.execute(
                "INSERT INTO points (disk_id, seq, time_ns, kind, tag) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    row.disk_id,
                    to_i64(p.seq, "point seq")?,
                    to_i64(p.time_ns, "point time")?,
                    p.kind.as_str(),
                    p.tag
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Change a disk's retention policy (the configuration server's
    /// `PUT /api/v1/disks/{id}/policy`); the applier takes it at its next
    /// batch.
    pub fn set_policy(&mut self, disk_id: &str, p: &DiskPolicy) -> Result<()> {
        let tx = self.conn.transaction()?;
        if Self::row(&tx, disk_id)?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("disk {disk_id} is not in the catalog"),
            ));
        }
        Self::put_policy(&tx, disk_id, p)?;
        tx.commit()?;
        Ok(())
    }

    fn put_policy(tx: &Transaction<'_>, disk_id: &str, p: &DiskPolicy) -> Result<()> {
        tx.execute(
            "UPDATE disks SET retention_window_s = ?2, retention_max_bytes = ?3, on_full = ?4,
                 point_interval_ms = ?5 WHERE disk_id = ?1",
            params![
                disk_id,
                to_i64(p.window.as_secs(), "retention window")?,
                p.max_bytes.map(|v| to_i64(v, "retention max")).transpose()?,
                p.on_full.as_str(),
                to_i64(
                    u64::try_from(p.point_interval.as_millis()).unwrap_or(u64::MAX),
                    "point interval"
                )?,
            ],
        )?;
        Ok(())
    }

    /// The disk's recovery points, by seq.
    pub fn points(&self, disk_id: &str) -> Result<Vec<Point>> {
        read_points(&self.conn, disk_id)
    }

    /// The newest point's seq, and the newest two crash points (seq, source
    /// time), newest first: what the applier needs to place and thin the
    /// next points. Read at every batch, because a view opened at `latest`
    /// may have added a point since (see [`Catalog::insert_point`]).
    pub fn point_tail(&self, disk_id: &str) -> Result<PointTail> {
        let newest: Option<i64> =
            self.conn
                .query_row("SELECT MAX(seq) FROM points WHERE disk_id = ?1", [disk_id], |r| {
                    r.get(0)
                })?;
        let mut st = self.conn.prepare_cached(
            "SELECT seq, time_ns FROM points WHERE disk_id = ?1 AND kind = 'crash' ORDER BY seq DESC LIMIT 2",
        )?;
        let rows = st.query_map([disk_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        let mut crash = Vec::new();
        for r in rows {
            let (seq, t) = r?;
            crash.push((to_u64(seq, "point seq")?, to_u64(t, "point time")?));
        }
        Ok((newest.map(|v| to_u64(v, "point seq")).transpose()?, crash))
    }

    /// Make the applied state a recorded crash point (a view opened at
    /// `latest` pins it; from the next batch on, overwrites are captured
    /// for it). The caller holds the disk's apply lock, so no batch is
    /// between its capture and its commit. A point already there is kept.
    pub fn insert_point(&mut self, disk_id: &str, p: &Point) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO points (disk_id, seq, time_ns, kind, tag) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                disk_id,
                to_i64(p.seq, "point seq")?,
                to_i64(p.time_ns, "point time")?,
                p.kind.as_str(),
                p.tag
            ],
        )?;
        Ok(())
    }

    /// Record that every record up to `seq` has had its undo captured (none
    /// was needed): the replica may hold them before the commit says so.
    pub fn mark_captured(&mut self, row: &DiskRow, seq: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE disks SET undo_captured_seq = ?2 WHERE disk_id = ?1 AND disk_uuid = ?3",
            params![row.disk_id, to_i64(seq, "seq")?, format_uuid(&row.disk_uuid)],
        )?;
        if n != 1 {
            return Err(corrupt("no row to mark undo in".into()).disk(&row.disk_id));
        }
        Ok(())
    }

    /// Whether a point already carries tag `name`.
    pub fn tag_exists(&self, disk_id: &str, name: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM points WHERE disk_id = ?1 AND tag = ?2",
                params![disk_id, name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// The blocks captured after seq `after` (the current epoch's set).
    pub fn captured_blocks(&self, disk_id: &str, after: u64) -> Result<BlockSet> {
        let mut st = self
            .conn
            .prepare_cached("SELECT start_block, end_block FROM undo WHERE disk_id = ?1 AND capture_seq > ?2")?;
        let mut set = BlockSet::new();
        let rows = st.query_map(params![disk_id, to_i64(after, "seq")?], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
        for r in rows {
            let (s, e) = r?;
            set.insert(to_u64(s, "start_block")?, to_u64(e, "end_block")?);
        }
        Ok(set)
    }

    /// The disk's undo segments, by number.
    pub fn segments(&self, disk_id: &str) -> Result<Vec<SegmentRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT segment, first_seq, last_seq, bytes FROM undo_segments WHERE disk_id = ?1 ORDER BY segment",
        )?;
        let rows = st.query_map([disk_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (a, b, c, d) = r?;
            out.push(SegmentRow {
                segment: to_u64(a, "segment")?,
                first_seq: to_u64(b, "first_seq")?,
                last_seq: to_u64(c, "last_seq")?,
                bytes: to_u64(d, "bytes")?,
            });
        }
        Ok(out)
    }

    /// Mark a batch's undo as captured: its index rows, its segment's new
    /// length and `undo_captured_seq`, in one transaction. Called only
    /// after the segment's fdatasync, and before the replica is written.
    pub fn mark_undo(
        &mut self,
        row: &DiskRow,
        rows: &[UndoRow],
        segment: &SegmentRow,
        captured_seq: u64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO undo (disk_id, capture_seq, start_block, end_block, segment, seg_offset, zero)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for u in rows {
                ins.execute(params![
                    row.disk_id,
                    to_i64(u.capture_seq, "capture seq")?,
                    to_i64(u.start_block, "block")?,
                    to_i64(u.end_block, "block")?,
                    to_i64(u.segment, "segment")?,
                    to_i64(u.seg_offset, "offset")?,
                    i64::from(u.zero),
                ])?;
            }
        }
        tx.execute(
            "INSERT INTO undo_segments (disk_id, segment, first_seq, last_seq, bytes) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (disk_id, segment) DO UPDATE SET last_seq = excluded.last_seq, bytes = excluded.bytes",
            params![
                row.disk_id,
                to_i64(segment.segment, "segment")?,
                to_i64(segment.first_seq, "seq")?,
                to_i64(segment.last_seq, "seq")?,
                to_i64(segment.bytes, "bytes")?,
            ],
        )?;
        let n = tx.execute(
            "UPDATE disks SET undo_captured_seq = ?2 WHERE disk_id = ?1 AND disk_uuid = ?3",
            params![row.disk_id, to_i64(captured_seq, "seq")?, format_uuid(&row.disk_uuid)],
        )?;
        if n != 1 {
            return Err(corrupt("no row to mark undo in".into()).disk(&row.disk_id));
        }
        tx.commit()?;
        Ok(())
    }

    /// Expire points and whole segments (their index rows with them), in
    /// one transaction; the caller deletes the files afterwards.
    pub fn expire(&mut self, disk_id: &str, points: &[u64], segments: &[u64]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for p in points {
            tx.execute(
                "DELETE FROM points WHERE disk_id = ?1 AND seq = ?2",
                params![disk_id, to_i64(*p, "seq")?],
            )?;
        }
        for s in segments {
            let s = to_i64(*s, "segment")?;
            tx.execute(
                "DELETE FROM undo WHERE disk_id = ?1 AND segment = ?2",
                params![disk_id, s],
            )?;
            tx.execute(
                "DELETE FROM undo_segments WHERE disk_id = ?1 AND segment = ?2",
                params![disk_id, s],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Record a failover and stop applying to the disk.
    pub fn record_failover(&mut self, disk_id: &str, point: &Point, output: &str) -> Result<()> {
        let generation = read_history(&self.conn, disk_id)?.map(|h| h.current().id.hex());
        let tx = self.conn.transaction()?;
        let n = tx.execute("UPDATE disks SET failed_over = 1 WHERE disk_id = ?1", [disk_id])?;
        if n != 1 {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no disk {disk_id} in the catalog"),
            ));
        }
        tx.execute(
            "INSERT INTO failovers (disk_id, at_ns, seq, point_time_ns, kind, tag, output, generation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                disk_id,
                to_i64(now_ns(), "time")?,
                to_i64(point.seq, "seq")?,
                to_i64(point.time_ns, "time")?,
                point.kind.as_str(),
                point.tag,
                output,
                generation
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn put_halt(tx: &Transaction<'_>, disk_id: &str, h: &Halt) -> Result<()> {
        let pending = serde_json::to_string(&h.pending)
            .map_err(|e| Error::with_source(ErrorKind::Catalog, "encode pending ranges", e))?;
        tx.execute(
            "INSERT INTO halts (disk_id, seq, kind, offset, length, pending, pending_bytes, covered,
                                covered_seq, reason, detected_at, covered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (disk_id, seq) DO UPDATE SET
                 pending = excluded.pending, pending_bytes = excluded.pending_bytes,
                 covered = excluded.covered, covered_seq = excluded.covered_seq,
                 covered_at = excluded.covered_at",
            params![
                disk_id,
                to_i64(h.seq, "seq")?,
                h.kind,
                to_i64(h.offset, "offset")?,
                to_i64(h.length, "length")?,
                pending,
                to_i64(h.pending.bytes(), "pending bytes")?,
                i64::from(h.covered),
                h.covered_seq.map(|v| to_i64(v, "covered_seq")).transpose()?,
                h.reason,
                h.detected_at,
                h.covered_at,
            ],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn halt(seq: u64, offset: u64, length: u64) -> Halt {
        Halt {
            seq,
            kind: "write".into(),
            offset,
            length,
            pending: RangeSet::single(offset, length),
            covered: false,
            covered_seq: None,
            reason: "payload blake3 mismatch".into(),
            detected_at: 1,
            covered_at: None,
        }
    }

    #[test]
    fn the_newest_points_are_read_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(d.path()).unwrap();
        c.bind("d", &[1; 16], false, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap();
        for seq in 1..=5u64 {
            let p = Point {
                seq,
                time_ns: seq * 10,
                kind: PointKind::Crash,
                tag: None,
                latest: false,
            };
            c.insert_point("d", &p).unwrap();
        }
        let conn = open_read_only(d.path()).unwrap();
        let seqs = |l| -> Vec<u64> {
            read_newest_points_with_latest(&conn, "d", l)
                .unwrap()
                .iter()
                .map(|p| p.seq)
                .collect()
        };
        assert_eq!(seqs(Some(2)), vec![4, 5]);
        assert_eq!(seqs(None), vec![1, 2, 3, 4, 5]);
        assert_eq!(read_points(&conn, "d").unwrap().len(), 5);
    }

    #[test]
    fn bind_commit_reopen_and_read_only_view() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(d.path()).unwrap();
        let u1 = [1u8; 16];
        let Bind::New(mut row) = c
            .bind("db", &u1, false, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap()
        else {
            panic!("expected a new disk")
        };
        assert_eq!(row.applied_seq, 0);
        assert_eq!(row.sync_state, SyncState::AwaitingFullSync);
        row.applied_seq = 42;
        row.first_seq = Some(1);
        row.sync_state = SyncState::Consistent;
        let h = halt(40, 4096, 8192);
        c.commit(&row, Some(40), &[&h], &[], &[]).unwrap();
        drop(c);

        // Reopening runs no migration twice and finds the same state.
        let mut c = Catalog::open(d.path()).unwrap();
        let Bind::Existing(back) = c
            .bind("db", &u1, false, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap()
        else {
            panic!("expected the existing disk")
        };
        assert_eq!(back, row);
        assert_eq!(c.open_halts("db").unwrap(), vec![h.clone()]);

        let states = disk_states(d.path()).unwrap();
        assert_eq!(states.len(), 1);
        let s = &states[0];
        assert_eq!(s.disk_uuid, "01010101-0101-0101-0101-010101010101");
        assert_eq!(s.applied_seq, 42);
        assert_eq!(s.state, "halted");
        assert_eq!(s.replica_state(), ReplicaState::Halted);
        assert_eq!(s.halted_seq, Some(40));
        assert_eq!(s.pending_bytes, 8192);

        // Covering the halt updates the same row.
        let mut h2 = h.clone();
        h2.pending.subtract(0, 1 << 20);
        h2.covered = true;
        h2.covered_seq = Some(50);
        row.applied_seq = 50;
        c.commit(&row, None, &[&h2], &[], &[]).unwrap();
        assert!(c.open_halts("db").unwrap().is_empty());
        let s = &disk_states(d.path()).unwrap()[0];
        assert_eq!(s.state, "consistent");
        assert_eq!(s.halts, vec![h2]);
        assert_eq!(s.pending_bytes, 0);
    }

    #[test]
    fn mismatch_and_forced_rebind() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(d.path()).unwrap();
        let (u1, u2) = ([1u8; 16], [2u8; 16]);
        let Bind::New(mut row) = c
            .bind("db", &u1, false, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap()
        else {
            panic!()
        };
        row.applied_seq = 7;
        c.commit(&row, Some(3), &[&halt(3, 0, 512)], &[], &[]).unwrap();
        match c
            .bind("db", &u2, false, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap()
        {
            Bind::Mismatch { bound_uuid } => assert_eq!(bound_uuid, format_uuid(&u1)),
            b => panic!("expected a mismatch, got {b:?}"),
        }
        let Bind::Rebound { row, old_uuid } = c
            .bind("db", &u2, true, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap()
        else {
            panic!("expected a rebind")
        };
        assert_eq!(old_uuid, format_uuid(&u1));
        assert_eq!(row.applied_seq, 0);
        let kept = row.replaced_uuid.clone().unwrap();
        assert_eq!(kept, format!("db.replaced-{}", &old_uuid[..8]));
        assert!(c.open_halts("db").unwrap().is_empty());
        // The old binding's history is kept under its own id, not deleted.
        let k = c.disk_row(&kept).unwrap().expect("the kept history");
        assert_eq!(k.disk_uuid, u1);
        assert_eq!(k.replaced_uuid, None);
        // A commit for the old UUID no longer lands.
        let mut stale = row.clone();
        stale.disk_uuid = u1;
        assert!(c.commit(&stale, None, &[], &[], &[]).is_err());
        c.clear_replaced("db").unwrap();
        let Bind::Existing(back) = c
            .bind("db", &u2, true, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap()
        else {
            panic!("the same UUID with FORCE_RESYNC keeps the binding")
        };
        assert_eq!(back.replaced_uuid, None);
    }

    #[test]
    fn refuses_a_newer_schema_and_reads_an_empty_dir() {
        let d = tempfile::tempdir().unwrap();
        assert!(disk_states(d.path()).is_err());
        drop(Catalog::open(d.path()).unwrap());
        assert!(disk_states(d.path()).unwrap().is_empty());
        let conn = Connection::open(d.path().join(CATALOG_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let e = Catalog::open(d.path()).unwrap_err();
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }

    #[test]
    fn uuid_text_round_trips() {
        let u: [u8; 16] = core::array::from_fn(|i| u8::try_from(i * 17).unwrap());
        let s = format_uuid(&u);
        assert_eq!(s.len(), 36);
        assert_eq!(parse_uuid(&s), Some(u));
        assert_eq!(parse_uuid("zz"), None);
    }
}
