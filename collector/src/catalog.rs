//! The collector's catalog (SQLite, `<spool>/catalog.db`): which UUID each
//! disk id is bound to, how far the spool was trimmed (so the acked seq
//! survives an empty spool), and what is owed to agents that were away
//! (a full resync, range resyncs) or to the target (a forced rebind).
//!
//! Ordering with the data: the trim mark is committed before spool files
//! are deleted; a rebind is committed before the old spool is deleted (the
//! next start deletes files of another UUID).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use tidemark_wire::DiskId;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS disks(
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
);
INSERT OR IGNORE INTO meta(key, value) VALUES('schema', '1');
";

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

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| to_i64(d.as_secs()))
        .unwrap_or(0)
}

impl Catalog {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("open catalog {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("create the schema of {}", path.display()))?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn disks(&self) -> Result<Vec<DiskRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT disk_id, disk_uuid, trimmed_seq, pending_full_sync, full_sync_since, force_target, disk_size FROM disks ORDER BY disk_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (disk_id, uuid, trimmed, pending, since, force, size) = row?;
            let disk_id = DiskId::parse(&disk_id).context("catalog")?;
            let disk_uuid =
                parse_uuid(&uuid).with_context(|| format!("catalog: disk {disk_id} has a bad uuid {uuid:?}"))?;
            out.push(DiskRow {
                disk_id,
                disk_uuid,
                trimmed_seq: to_u64(trimmed),
                pending_full_sync: pending != 0,
                full_sync_since: to_u64(since),
                force_target: force != 0,
                disk_size: to_u64(size),
            });
        }
        Ok(out)
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

    #[cfg(test)]
    pub(crate) fn disk(&self, disk_id: &str) -> Result<Option<DiskRow>> {
        Ok(self.disks()?.into_iter().find(|d| d.disk_id == disk_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
