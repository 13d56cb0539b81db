//! Drills: proof that a recovery point really recovers. The target opens a
//! view at a point over a throwaway copy-on-write layer, runs each
//! filesystem's checker read-only, and records the result here, with the
//! checker's output (`docs/recovery.md`, "Drills").

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::store::{to_i64, Catalog};

/// Drills kept per disk (the oldest are deleted beyond).
pub const KEEP_DRILLS: i64 = 200;
/// Checker output kept per drill, in bytes (the end is kept).
pub const MAX_OUTPUT: usize = 64 * 1024;

/// How a drill ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillResult {
    /// Every filesystem found was checked and is clean.
    Passed,
    /// A checker found errors (or none of the content could be read as the
    /// filesystem its signature claims).
    Failed,
    /// Nothing checkable: unknown content, or no checker installed.
    Skipped,
    /// The drill could not run (no point to open, FUSE unavailable …).
    Error,
}

impl DrillResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "passed" => Self::Passed,
            "failed" => Self::Failed,
            "skipped" => Self::Skipped,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// One drill of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drill {
    /// Assigned by the catalog (0 before it is recorded).
    pub id: u64,
    pub disk_id: String,
    /// The point checked (0: none could be opened).
    pub seq: u64,
    /// Its source time (ns since the Unix epoch).
    pub point_time_ns: u64,
    pub started_ns: u64,
    pub duration_ms: u64,
    pub result: DrillResult,
    /// One line: what was checked and what was found.
    pub summary: String,
    /// The checkers' output (at most [`MAX_OUTPUT`] bytes, the end kept).
    pub output: String,
    /// What started it: `schedule`, `api`, `cli`.
    pub trigger: String,
    /// The filesystems found, as JSON (`[{"name","offset","len","kind"}]`):
    /// the next drill notices one that is gone.
    pub found: String,
}

/// Keep the last `max` bytes of `s`, on a character boundary.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut from = s.len() - max;
    while !s.is_char_boundary(from) {
        from += 1;
    }
    format!("[… {from} bytes cut …]\n{}", &s[from..])
}

impl Catalog {
    /// Record a finished drill; its id. Keeps the newest [`KEEP_DRILLS`]
    /// of the disk.
    pub fn record_drill(&mut self, d: &Drill) -> Result<u64> {
        let tx = self.conn_mut().transaction()?;
        if Self::row(&tx, &d.disk_id)?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("disk {} is not in the catalog", d.disk_id),
            ));
        }
        tx.execute(
            "INSERT INTO drills (disk_id, seq, point_time_ns, started_ns, duration_ms, result, summary, output, trigger, found)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                d.disk_id,
                to_i64(d.seq, "drill seq")?,
                to_i64(d.point_time_ns, "drill point time")?,
                to_i64(d.started_ns, "drill start")?,
                to_i64(d.duration_ms, "drill duration")?,
                d.result.as_str(),
                d.summary,
                tail(&d.output, MAX_OUTPUT),
                d.trigger,
                d.found,
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "DELETE FROM drills WHERE disk_id = ?1 AND id <= ?2 - ?3",
            params![d.disk_id, id, KEEP_DRILLS],
        )?;
        tx.commit()?;
        Ok(u64::try_from(id).unwrap_or(0))
    }
}

/// The newest `limit` drills of `disk_id`, newest first.
pub fn read_drills(conn: &Connection, disk_id: &str, limit: u32) -> Result<Vec<Drill>> {
    query(conn, disk_id, false, limit)
}

/// Each drilled point's newest result, `(seq, result)` oldest first (the
/// `verified` of a points listing, without reading the outputs).
pub fn results(conn: &Connection, disk_id: &str) -> Result<Vec<(u64, DrillResult)>> {
    let mut st = conn.prepare_cached("SELECT seq, result FROM drills WHERE disk_id = ?1 ORDER BY id")?;
    let rows = st.query_map([disk_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, result) = row?;
        if let Some(r) = DrillResult::parse(&result) {
            out.push((u64::try_from(seq).unwrap_or(0), r));
        }
    }
    Ok(out)
}

/// The newest passed drill of `disk_id` (its last verified point).
pub fn last_verified(conn: &Connection, disk_id: &str) -> Result<Option<Drill>> {
    Ok(query(conn, disk_id, true, 1)?.pop())
}

fn query(conn: &Connection, disk_id: &str, passed_only: bool, limit: u32) -> Result<Vec<Drill>> {
    let mut st = conn.prepare_cached(
        "SELECT id, seq, point_time_ns, started_ns, duration_ms, result, summary, output, trigger, found
         FROM drills WHERE disk_id = ?1 AND (?3 = 0 OR result = 'passed') ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = st.query_map(params![disk_id, limit, passed_only], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, String>(8)?,
            r.get::<_, String>(9)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, seq, pt, started, dur, result, summary, output, trigger, found) = row?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        out.push(Drill {
            id: n(id),
            disk_id: disk_id.to_string(),
            seq: n(seq),
            point_time_ns: n(pt),
            started_ns: n(started),
            duration_ms: n(dur),
            result: DrillResult::parse(&result)
                .ok_or_else(|| Error::new(ErrorKind::Catalog, format!("drill {id} has result {result:?}")))?,
            summary,
            output,
            trigger,
            found,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DiskPolicy;
    use tidemark_formats::replica::ReplicaFormat;

    fn drill(result: DrillResult, seq: u64) -> Drill {
        Drill {
            id: 0,
            disk_id: "d".into(),
            seq,
            point_time_ns: seq * 10,
            started_ns: 1,
            duration_ms: 2,
            result,
            summary: "s".into(),
            output: "é".repeat(MAX_OUTPUT),
            trigger: "api".into(),
            found: "[]".into(),
        }
    }

    #[test]
    fn drills_are_recorded_newest_first_trimmed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(dir.path()).unwrap();
        assert!(c.record_drill(&drill(DrillResult::Passed, 1)).is_err(), "unknown disk");
        c.bind("d", &[1; 16], false, &DiskPolicy::default(), ReplicaFormat::Raw)
            .unwrap();
        for i in 0..(KEEP_DRILLS as u64 + 5) {
            let r = if i % 2 == 0 {
                DrillResult::Passed
            } else {
                DrillResult::Failed
            };
            c.record_drill(&drill(r, i + 1)).unwrap();
        }
        let conn = crate::open_read_only(dir.path()).unwrap();
        let all = read_drills(&conn, "d", u32::MAX).unwrap();
        assert_eq!(all.len() as u64, KEEP_DRILLS as u64);
        assert_eq!(all[0].seq, KEEP_DRILLS as u64 + 5);
        assert_eq!(all[0].result, DrillResult::Passed);
        assert!(all[0].output.len() <= MAX_OUTPUT + 64 && all[0].output.starts_with("[…"));
        let v = last_verified(&conn, "d").unwrap().unwrap();
        assert_eq!((v.seq, v.result), (KEEP_DRILLS as u64 + 5, DrillResult::Passed));
        assert!(last_verified(&conn, "other").unwrap().is_none());
    }
}
