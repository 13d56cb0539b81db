//! The collector's catalog (SQLite, `<spool>/catalog.db`): which UUID each
//! disk id is bound to, how far the spool was trimmed (so the acked seq
//! survives an empty spool), and what is owed to agents that were away
//! (a full resync, range resyncs) or to the target (a forced rebind).
//!
//! Ordering with the data: the trim mark is committed before spool files
//! are deleted; a rebind is committed before the old spool is deleted (the
//! next start deletes files of another UUID); a fence is committed before
//! the fenced spool is moved aside (the next start moves it if a crash
//! came in between).
//!
//! The schema is versioned by `meta.schema`; [`MIGRATIONS`] holds one
//! script per version, applied in order in one transaction each. A catalog
//! of a newer version than this build knows is refused, not changed.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use tidemark_formats::generation::{GenerationId, History};
use tidemark_wire::frame::Lineage;
use tidemark_wire::DiskId;

/// Schema scripts; `meta.schema` = how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: bindings, trim marks and owed resyncs.
    "CREATE TABLE IF NOT EXISTS disks(
    disk_id TEXT PRIMARY KEY,
    disk_uuid TEXT NOT NULL,
    bound_at INTEGER NOT NULL,
    trimmed_seq INTEGER NOT NULL DEFAULT 0,
    pending_full_sync INTEGER NOT NULL DEFAULT 0,
    full_sync_since INTEGER NOT NULL DEFAULT 0,
    force_target INTEGER NOT NULL DEFAULT 0,
    disk_size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS resync_requests(
    disk_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY(disk_id, seq, offset, length)
);",
    // 2: the data generation the disk's agent holds (a generations file,
    // tidemark_formats::generation, of its current entry), and the fence a
    // failover put on a generation (docs/failback.md, section 5).
    "ALTER TABLE disks ADD COLUMN generations BLOB;
    ALTER TABLE disks ADD COLUMN fenced_generation TEXT;
    ALTER TABLE disks ADD COLUMN fenced_reason TEXT;
    ALTER TABLE disks ADD COLUMN fenced_at INTEGER;
    ALTER TABLE disks ADD COLUMN fenced_spool TEXT;",
    // 3: the agent identity (its certificate's, `agent NAME`) that
    // registered the disk: no other identity may act for it.
    "ALTER TABLE disks ADD COLUMN owner TEXT;",
    // 4: the event log (docs/operations.md, "Events"): what happened to
    // the deployment and its disks, and every operator action.
    "CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns INTEGER NOT NULL,
    disk_id TEXT,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL,
    who TEXT
);
CREATE INDEX IF NOT EXISTS events_by_disk ON events(disk_id, id);",
    // 5: each disk's history a minute at a time (crate::history).
    "CREATE TABLE IF NOT EXISTS history(
    disk_id TEXT NOT NULL,
    t_s INTEGER NOT NULL,
    lag_s REAL NOT NULL,
    lag_bytes INTEGER NOT NULL,
    write_bps REAL NOT NULL,
    PRIMARY KEY(disk_id, t_s)
);",
    // 6: each disk's policy as the configuration server set it
    // (crate::calls::Policy, JSON; no row: the defaults).
    "CREATE TABLE IF NOT EXISTS policies(
    disk_id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);",
];

/// How many events the log keeps (the oldest go first).
pub(crate) const EVENTS_KEPT: i64 = 100_000;

/// How bad an event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "warning" => Self::Warning,
            "critical" => Self::Critical,
            _ => Self::Info,
        }
    }
}

/// One row of the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    pub id: i64,
    /// Unix nanoseconds.
    pub time_ns: i64,
    pub disk_id: Option<String>,
    /// What kind of thing happened: `agent` (connected, left), `target`
    /// (link up, down), `sync` (a full sync owed or started), `resync`,
    /// `operator` (an action through the API, allowed or refused).
    pub kind: String,
    pub severity: Severity,
    pub message: String,
    /// Who acted (operator events): the token's name and role, or the
    /// client certificate's identity.
    pub who: Option<String>,
}

/// A failover ended this generation of the disk: its agent is refused and
/// its spool was moved aside (kept, not deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fence {
    /// None: the agent had not said which generation it held (an agent of
    /// an older build); every generation but a fork of it is refused.
    pub generation: Option<GenerationId>,
    /// The target's words (which failover, what to run instead).
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
    /// Where the spool went (None until it has been moved).
    pub spool: Option<String>,
}

/// One row of `disks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiskRow {
    pub disk_id: DiskId,
    pub disk_uuid: [u8; 16],
    /// Highest seq the target acknowledged when the spool was last trimmed.
    pub trimmed_seq: u64,
    /// The agent owes a full sync (new binding, or the target asked).
    pub pending_full_sync: bool,
    /// A full sync counts only if its records come after this seq.
    pub full_sync_since: u64,
    /// The target must be told to start this disk afresh.
    pub force_target: bool,
    /// The disk's size as its agent last said (0: not yet known).
    pub disk_size: u64,
    /// The data generation its agent holds (default: not known yet).
    pub lineage: Lineage,
    pub fence: Option<Fence>,
    /// The agent identity bound to the disk (None: registered over
    /// plaintext, or before identities existed).
    pub owner: Option<String>,
}

/// A resync owed to an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resync {
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
}

pub(crate) struct Catalog {
    conn: Mutex<Connection>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn uuid_text(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    uuid::Uuid::parse_str(s).ok().map(|u| *u.as_bytes())
}

pub(crate) fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| to_i64(d.as_secs()))
        .unwrap_or(0)
}

/// The `generations` column for a lineage (NULL: not known).
fn lineage_blob(l: &Lineage) -> Option<Vec<u8>> {
    History::from_lineage(l, tidemark_util::now_ns()).map(|h| h.encode())
}

fn schema_version(c: &Connection) -> Result<usize> {
    let v: Option<String> = c
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0))
        .optional()?;
    match v {
        None => Ok(0),
        Some(v) => v
            .parse()
            .with_context(|| format!("meta.schema is {v:?}, not a version number")),
    }
}

/// Bring the schema to this build's version, one migration per transaction.
fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);")?;
    let have = schema_version(conn)?;
    if have > MIGRATIONS.len() {
        anyhow::bail!(
            "schema version {have} was written by a newer collector (this build knows {}); not changed",
            MIGRATIONS.len()
        );
    }
    for (i, script) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.transaction()?;
        tx.execute_batch(script)
            .with_context(|| format!("schema migration {}", i + 1))?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES('schema', ?1) ON CONFLICT(key) DO UPDATE SET value = ?1",
            params![(i + 1).to_string()],
        )?;
        tx.commit()?;
    }
    Ok(())
}

impl Catalog {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path).with_context(|| format!("open catalog {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn).with_context(|| format!("catalog {}", path.display()))?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append an event (and forget the oldest beyond [`EVENTS_KEPT`]).
    pub(crate) fn add_event(
        &self,
        disk_id: Option<&str>,
        kind: &str,
        severity: Severity,
        message: &str,
        who: Option<&str>,
    ) -> Result<i64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO events(time_ns, disk_id, kind, severity, message, who) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                to_i64(tidemark_util::now_ns()),
                disk_id,
                kind,
                severity.as_str(),
                message,
                who
            ],
        )?;
        let id = c.last_insert_rowid();
        if id % 1000 == 0 {
            c.execute("DELETE FROM events WHERE id <= ?1", params![id - EVENTS_KEPT])?;
        }
        Ok(id)
    }

    /// Events after id `after` (oldest first), of one disk if given, at
    /// most `limit`; with `newest`, the last `limit` of them instead.
    pub(crate) fn events(&self, disk_id: Option<&str>, after: i64, limit: u32, newest: bool) -> Result<Vec<Event>> {
        let c = self.conn();
        let order = if newest { "DESC" } else { "ASC" };
        let mut st = c.prepare(&format!(
            "SELECT id, time_ns, disk_id, kind, severity, message, who FROM events
             WHERE id > ?1 AND (?2 IS NULL OR disk_id = ?2) ORDER BY id {order} LIMIT ?3"
        ))?;
        let mut rows: Vec<Event> = st
            .query_map(params![after, disk_id, limit], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    time_ns: r.get(1)?,
                    disk_id: r.get(2)?,
                    kind: r.get(3)?,
                    severity: Severity::parse(&r.get::<_, String>(4)?),
                    message: r.get(5)?,
                    who: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        if newest {
            rows.reverse();
        }
        Ok(rows)
    }

    /// Every disk's stored policy (JSON), by disk id.
    pub(crate) fn policies(&self) -> Result<Vec<(String, String)>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT disk_id, policy FROM policies ORDER BY disk_id")?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Store a disk's policy (JSON), replacing the one it had.
    pub(crate) fn set_policy(&self, disk_id: &str, policy: &str) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO policies(disk_id, policy, updated_at) VALUES(?1, ?2, ?3)",
            params![disk_id, policy, now_s()],
        )?;
        Ok(())
    }

    /// Keep a minute of a disk's history; forget every disk's minutes
    /// before `forget_before` (Unix seconds).
    pub(crate) fn add_history(&self, disk_id: &str, m: &crate::history::Sample, forget_before: i64) -> Result<()> {
        let c = self.conn();
        c.execute(
            "INSERT OR REPLACE INTO history(disk_id, t_s, lag_s, lag_bytes, write_bps) VALUES(?1, ?2, ?3, ?4, ?5)",
            params![disk_id, m.t, m.lag_s, to_i64(m.lag_bytes), m.write_bps],
        )?;
        c.execute("DELETE FROM history WHERE t_s < ?1", params![forget_before])?;
        Ok(())
    }

    /// Every disk's kept minutes since `since` (Unix seconds), oldest first.
    pub(crate) fn history(&self, since: i64) -> Result<Vec<(String, crate::history::Sample)>> {
        let c = self.conn();
        let mut st =
            c.prepare("SELECT disk_id, t_s, lag_s, lag_bytes, write_bps FROM history WHERE t_s >= ?1 ORDER BY t_s")?;
        let rows = st
            .query_map(params![since], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    crate::history::Sample {
                        t: r.get(1)?,
                        lag_s: r.get(2)?,
                        lag_bytes: to_u64(r.get(3)?),
                        write_bps: r.get(4)?,
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub(crate) fn disks(&self) -> Result<Vec<DiskRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT disk_id, disk_uuid, trimmed_seq, pending_full_sync, full_sync_since, force_target, disk_size,
                    generations, fenced_generation, fenced_reason, fenced_at, fenced_spool, owner
             FROM disks ORDER BY disk_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ),
                r.get::<_, Option<Vec<u8>>>(7)?,
                (
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                    r.get::<_, Option<i64>>(10)?,
                    r.get::<_, Option<String>>(11)?,
                ),
                r.get::<_, Option<String>>(12)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let ((disk_id, uuid, trimmed, pending, since, force, size), gens, (fg, reason, at, spool), owner) = row?;
            let disk_id = DiskId::parse(&disk_id).context("catalog")?;
            let disk_uuid =
                parse_uuid(&uuid).with_context(|| format!("catalog: disk {disk_id} has a bad uuid {uuid:?}"))?;
            let lineage = match gens {
                Some(b) => History::decode(&b, Path::new("catalog.db"))
                    .with_context(|| format!("catalog: disk {disk_id}: generations"))?
                    .lineage(),
                None => Lineage::default(),
            };
            let fence = match at {
                None => None,
                Some(at) => Some(Fence {
                    generation: fg
                        .map(|g| {
                            GenerationId::from_hex(&g)
                                .with_context(|| format!("catalog: disk {disk_id} has a bad fenced generation {g:?}"))
                        })
                        .transpose()?,
                    reason: reason.unwrap_or_default(),
                    at,
                    spool,
                }),
            };
            out.push(DiskRow {
                disk_id,
                disk_uuid,
                trimmed_seq: to_u64(trimmed),
                pending_full_sync: pending != 0,
                full_sync_since: to_u64(since),
                force_target: force != 0,
                disk_size: to_u64(size),
                lineage,
                fence,
                owner,
            });
        }
        Ok(out)
    }

    /// Bind the disk to the agent identity that registered it.
    pub(crate) fn set_owner(&self, disk_id: &str, owner: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE disks SET owner = ?2 WHERE disk_id = ?1",
            params![disk_id, owner],
        )?;
        Ok(())
    }

    /// Record the data generation the disk's agent holds.
    pub(crate) fn set_lineage(&self, disk_id: &str, l: &Lineage) -> Result<()> {
        let blob = lineage_blob(l);
        self.conn().execute(
            "UPDATE disks SET generations = ?2 WHERE disk_id = ?1",
            params![disk_id, blob],
        )?;
        Ok(())
    }

    /// A newer line forked from the disk's history arrived (`lineage`, at
    /// fork seq F): the fence is lifted, the disk holds seqs up to F, owes
    /// no full sync and no resync. One transaction.
    pub(crate) fn lift_fence(&self, disk_id: &str, l: &Lineage) -> Result<()> {
        let blob = lineage_blob(l);
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "UPDATE disks SET generations = ?2, fenced_generation = NULL, fenced_reason = NULL, fenced_at = NULL,
                 fenced_spool = NULL, trimmed_seq = ?3, pending_full_sync = 0, full_sync_since = 0, force_target = 0
             WHERE disk_id = ?1",
            params![disk_id, blob, to_i64(l.fork_seq)],
        )?;
        tx.execute("DELETE FROM resync_requests WHERE disk_id = ?1", params![disk_id])?;
        tx.commit()?;
        Ok(())
    }

    /// Fence the disk's generation (`spool`: None until it is moved aside).
    pub(crate) fn set_fence(&self, disk_id: &str, f: &Fence) -> Result<()> {
        self.conn().execute(
            "UPDATE disks SET fenced_generation = ?2, fenced_reason = ?3, fenced_at = ?4, fenced_spool = ?5
             WHERE disk_id = ?1",
            params![disk_id, f.generation.map(|g| g.hex()), f.reason, f.at, f.spool],
        )?;
        Ok(())
    }

    /// Bind (or rebind) `disk_id` to `uuid`: no history, a full sync owed,
    /// `force` tells the target to start afresh. Owed resyncs are dropped.
    pub(crate) fn bind(&self, disk_id: &str, uuid: &[u8; 16], force: bool) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO disks(disk_id, disk_uuid, bound_at, trimmed_seq, pending_full_sync, full_sync_since, force_target)
             VALUES(?1, ?2, ?3, 0, 1, 0, ?4)
             ON CONFLICT(disk_id) DO UPDATE SET disk_uuid = ?2, bound_at = ?3, trimmed_seq = 0,
                 pending_full_sync = 1, full_sync_since = 0, force_target = ?4",
            params![disk_id, uuid_text(uuid), now_s(), i64::from(force)],
        )?;
        tx.execute("DELETE FROM resync_requests WHERE disk_id = ?1", params![disk_id])?;
        tx.commit()?;
        Ok(())
    }

    /// Record the disk's size (from its agent's hello).
    pub(crate) fn set_disk_size(&self, disk_id: &str, size: u64) -> Result<()> {
        self.conn().execute(
            "UPDATE disks SET disk_size = ?2 WHERE disk_id = ?1",
            params![disk_id, to_i64(size)],
        )?;
        Ok(())
    }

    pub(crate) fn set_trimmed(&self, disk_id: &str, seq: u64) -> Result<()> {
        self.conn().execute(
            "UPDATE disks SET trimmed_seq = MAX(trimmed_seq, ?2) WHERE disk_id = ?1",
            params![disk_id, to_i64(seq)],
        )?;
        Ok(())
    }

    pub(crate) fn set_pending_full_sync(&self, disk_id: &str, pending: bool, since: u64) -> Result<()> {
        self.conn().execute(
            "UPDATE disks SET pending_full_sync = ?2, full_sync_since = ?3 WHERE disk_id = ?1",
            params![disk_id, i64::from(pending), to_i64(since)],
        )?;
        Ok(())
    }

    pub(crate) fn clear_force(&self, disk_id: &str) -> Result<()> {
        self.conn()
            .execute("UPDATE disks SET force_target = 0 WHERE disk_id = ?1", params![disk_id])?;
        Ok(())
    }

    pub(crate) fn add_resync(&self, disk_id: &str, r: Resync) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO resync_requests(disk_id, seq, offset, length) VALUES(?1, ?2, ?3, ?4)",
            params![disk_id, to_i64(r.seq), to_i64(r.offset), to_i64(r.length)],
        )?;
        Ok(())
    }

    pub(crate) fn resyncs(&self, disk_id: &str) -> Result<Vec<Resync>> {
        let c = self.conn();
        let mut st =
            c.prepare("SELECT seq, offset, length FROM resync_requests WHERE disk_id = ?1 ORDER BY seq, offset")?;
        let rows = st.query_map(params![disk_id], |r| {
            Ok(Resync {
                seq: to_u64(r.get(0)?),
                offset: to_u64(r.get(1)?),
                length: to_u64(r.get(2)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub(crate) fn remove_resync(&self, disk_id: &str, r: Resync) -> Result<()> {
        self.conn().execute(
            "DELETE FROM resync_requests WHERE disk_id = ?1 AND seq = ?2 AND offset = ?3 AND length = ?4",
            params![disk_id, to_i64(r.seq), to_i64(r.offset), to_i64(r.length)],
        )?;
        Ok(())
    }

    /// The schema version (`meta.schema`).
    #[cfg(test)]
    fn schema(&self) -> Result<usize> {
        schema_version(&self.conn())
    }

    #[cfg(test)]
    pub(crate) fn disk(&self, disk_id: &str) -> Result<Option<DiskRow>> {
        Ok(self.disks()?.into_iter().find(|d| d.disk_id == disk_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_history_outlive_a_reopen_and_old_minutes_are_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("catalog.db");
        {
            let c = Catalog::open(&path).unwrap();
            for i in 0..5 {
                c.add_event(Some("db"), "agent", Severity::Info, &format!("e{i}"), None)
                    .unwrap();
            }
            c.add_event(None, "alert", Severity::Critical, "host", Some("ops"))
                .unwrap();
            let m = |t| crate::history::Sample {
                t,
                lag_s: 1.5,
                lag_bytes: 7,
                write_bps: 2.0,
            };
            c.add_history("db", &m(60), 0).unwrap();
            c.add_history("db", &m(120), 0).unwrap();
            c.add_history("db", &m(180), 100).unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        let all = c.events(None, 0, 100, false).unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(all[5].severity, Severity::Critical);
        assert_eq!(all[5].who.as_deref(), Some("ops"));
        let newest = c.events(Some("db"), 0, 2, true).unwrap();
        assert_eq!(
            newest.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["e3", "e4"]
        );
        let after = c.events(None, all[3].id, 100, false).unwrap();
        assert_eq!(after.len(), 2);
        let h = c.history(0).unwrap();
        assert_eq!(h.iter().map(|(_, s)| s.t).collect::<Vec<_>>(), [120, 180]);
        assert_eq!(h[0].1.lag_bytes, 7);
    }

    #[test]
    fn bind_trim_requests() {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open(&d.path().join("catalog.db")).unwrap();
        c.bind("db", &[1; 16], false).unwrap();
        let r = c.disk("db").unwrap().unwrap();
        assert!(r.pending_full_sync && !r.force_target);
        c.set_trimmed("db", 9).unwrap();
        c.set_trimmed("db", 5).unwrap();
        c.add_resync(
            "db",
            Resync {
                seq: 3,
                offset: 0,
                length: 4096,
            },
        )
        .unwrap();
        c.add_resync(
            "db",
            Resync {
                seq: 3,
                offset: 0,
                length: 4096,
            },
        )
        .unwrap();
        assert_eq!(c.resyncs("db").unwrap().len(), 1);
        drop(c);
        let c = Catalog::open(&d.path().join("catalog.db")).unwrap();
        assert_eq!(c.disk("db").unwrap().unwrap().trimmed_seq, 9);
        c.bind("db", &[2; 16], true).unwrap();
        let r = c.disk("db").unwrap().unwrap();
        assert_eq!((r.disk_uuid, r.trimmed_seq, r.force_target), ([2; 16], 0, true));
        assert!(c.resyncs("db").unwrap().is_empty());
    }

    #[test]
    fn generations_and_fences_persist() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("catalog.db");
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.schema().unwrap(), MIGRATIONS.len());
        c.bind("db", &[1; 16], false).unwrap();
        let r = c.disk("db").unwrap().unwrap();
        assert!(!r.lineage.is_known() && r.fence.is_none());
        let l = Lineage {
            generation: [7; 16],
            parent: [6; 16],
            fork_seq: 40,
        };
        c.set_lineage("db", &l).unwrap();
        let f = Fence {
            generation: Some(GenerationId([7; 16])),
            reason: "failed over at seq 40".into(),
            at: 5,
            spool: Some("/s/.kept/db.5".into()),
        };
        c.set_fence("db", &f).unwrap();
        drop(c);
        let c = Catalog::open(&path).unwrap();
        let r = c.disk("db").unwrap().unwrap();
        assert_eq!((r.lineage, r.fence), (l, Some(f)));
    }

    #[test]
    fn schema_1_is_migrated_and_a_newer_one_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("catalog.db");
        {
            // A catalog as the build before migrations wrote it.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta VALUES('schema', '1');",
            )
            .unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO disks(disk_id, disk_uuid, bound_at, trimmed_seq) VALUES('db', ?1, 0, 12)",
                [uuid_text(&[3; 16])],
            )
            .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.schema().unwrap(), MIGRATIONS.len());
        let r = c.disk("db").unwrap().unwrap();
        assert_eq!((r.trimmed_seq, r.lineage.is_known()), (12, false));
        drop(c);
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE meta SET value = '99' WHERE key = 'schema'", [])
            .unwrap();
        let e = format!("{:#}", Catalog::open(&path).err().unwrap());
        assert!(e.contains("schema version 99 was written by a newer collector"), "{e}");
    }
}
