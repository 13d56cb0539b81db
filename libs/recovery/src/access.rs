//! How a tool reaches a data directory: through the daemon's control
//! socket while a target holds it, or directly under a shared lock.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use tidemark_catalog::layout::{CONTROL_SOCKET, LOCK_FILE};
use tidemark_catalog::{self as catalog, Point};

use crate::at::{describe, select, AtSpec};
use crate::error::{Error, ErrorKind, IoContext, Located, Result};

/// A reply from the target that is not what the control protocol says.
fn bad_reply(what: &str) -> Error {
    Error::new(ErrorKind::Malformed, format!("{what} in the target's reply"))
}

fn no_disk(data_dir: &Path, disk_id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no disk {disk_id} in {}", data_dir.display()),
    )
}

/// How this process reaches a data directory.
pub(crate) enum Access {
    /// A daemon holds it: talk to its control socket.
    Daemon(Control),
    /// Nobody does: read it directly, holding a shared lock.
    Direct(nix::fcntl::Flock<File>),
}

pub(crate) fn access(data_dir: &Path) -> Result<Access> {
    let lock_path = data_dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .open(&lock_path)
        .io_ctx(|| format!("is {} a target data directory?", data_dir.display()))
        .map_err(|e| e.op("open").path(&lock_path))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(l) => Ok(Access::Direct(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(Access::Daemon(Control::connect(data_dir)?)),
        Err((_, e)) => Err(Error::with_source(ErrorKind::Io, "", e).op("lock").path(&lock_path)),
    }
}

/// A JSON-lines connection to a daemon's control socket.
pub(crate) struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    pub(crate) fn connect(data_dir: &Path) -> Result<Self> {
        let p = data_dir.join(CONTROL_SOCKET);
        let stream = UnixStream::connect(&p).io_ctx(|| {
            format!(
                "a target holds {} but its control socket {} does not answer",
                data_dir.display(),
                p.display()
            )
        })?;
        let reader = BufReader::new(stream.try_clone().io_ctx(|| "clone the control socket".into())?);
        Ok(Self { stream, reader })
    }

    /// Send one request, read one reply; an `{"ok": false}` reply is an error.
    pub(crate) fn call(&mut self, req: serde_json::Value, timeout: Duration) -> Result<serde_json::Value> {
        self.stream
            .set_read_timeout(Some(timeout))
            .io_ctx(|| "set the control socket's timeout".into())?;
        let mut line = req.to_string().into_bytes();
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .io_ctx(|| "write to the target's control socket".into())?;
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .io_ctx(|| "read the target's reply".into())?;
        if reply.is_empty() {
            return Err(Error::new(ErrorKind::Refused, "the target closed its control socket"));
        }
        let v: serde_json::Value = serde_json::from_str(&reply)
            .map_err(|e| Error::with_source(ErrorKind::Malformed, "the target's reply is not JSON", e))?;
        if v["ok"].as_bool() != Some(true) {
            let why = v["error"].as_str().unwrap_or("the target refused the request");
            return Err(Error::new(ErrorKind::Refused, why));
        }
        Ok(v)
    }
}

pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Points of `disk_id`, read straight from the catalog.
pub fn points_direct(data_dir: &Path, disk_id: &str) -> Result<Vec<Point>> {
    newest_points_direct(data_dir, disk_id, None)
}

/// The newest `limit` points of `disk_id` (None: all), read straight from
/// the catalog (a listing of the newest, without reading the older ones).
pub fn newest_points_direct(data_dir: &Path, disk_id: &str, limit: Option<u32>) -> Result<Vec<Point>> {
    let conn = catalog::open_read_only(data_dir)?;
    check_disk(&conn, data_dir, disk_id)?;
    catalog::read_newest_points_with_latest(&conn, disk_id, limit)
}

fn check_disk(conn: &Connection, data_dir: &Path, disk_id: &str) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 4 {
        return Err(Error::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "{}: the catalog predates replica formats (start the target once to migrate it)",
                data_dir.display()
            ),
        ));
    }
    if catalog::Catalog::row(conn, disk_id)?.is_none() {
        return Err(no_disk(data_dir, disk_id));
    }
    Ok(())
}

/// The recovery points of a disk, oldest first.
pub fn points(data_dir: &Path, disk_id: &str) -> Result<Vec<Point>> {
    match access(data_dir)? {
        Access::Direct(_lock) => points_direct(data_dir, disk_id),
        Access::Daemon(mut c) => {
            let v = c.call(serde_json::json!({"op": "points", "disk": disk_id}), CALL_TIMEOUT)?;
            serde_json::from_value(v["points"].clone()).map_err(|_| bad_reply("points"))
        }
    }
}

/// The point `at` names (see [`select`]).
pub fn resolve(data_dir: &Path, disk_id: &str, at: &AtSpec) -> Result<Point> {
    let pts = points(data_dir, disk_id)?;
    select(&pts, at)
        .cloned()
        .ok_or_else(|| Error::new(ErrorKind::NotFound, describe(at)).disk(disk_id))
}

/// Drill the disk's newest point now (`tidemark drill`): the running
/// target does it (`docs/recovery.md`, "Drills"); the recorded drill,
/// whatever its result.
pub fn drill(data_dir: &Path, disk_id: &str, timeout: Duration) -> Result<catalog::drill::Drill> {
    match access(data_dir)? {
        Access::Direct(_lock) => Err(Error::new(
            ErrorKind::Refused,
            format!(
                "no target is running on {}: drills are run by the target (start it, then drill)",
                data_dir.display()
            ),
        )),
        Access::Daemon(mut c) => {
            let v = c.call(serde_json::json!({"op": "drill", "disk": disk_id}), timeout)?;
            serde_json::from_value(v["drill"].clone()).map_err(|_| bad_reply("drill"))
        }
    }
}

/// The disk's newest `limit` drills, newest first.
pub fn drills(data_dir: &Path, disk_id: &str, limit: u32) -> Result<Vec<catalog::drill::Drill>> {
    match access(data_dir)? {
        Access::Direct(_lock) => {
            let conn = catalog::open_read_only(data_dir)?;
            check_disk(&conn, data_dir, disk_id)?;
            catalog::drill::read_drills(&conn, disk_id, limit)
        }
        Access::Daemon(mut c) => {
            let v = c.call(
                serde_json::json!({"op": "drills", "disk": disk_id, "limit": limit}),
                CALL_TIMEOUT,
            )?;
            serde_json::from_value(v["drills"].clone()).map_err(|_| bad_reply("drills"))
        }
    }
}

/// The disk's state as `tidemark status --data` shows it (through the
/// daemon when one runs).
pub fn disk_state(data_dir: &Path, disk_id: &str) -> Result<catalog::DiskState> {
    let disks = match access(data_dir)? {
        Access::Direct(_lock) => catalog::disk_states(data_dir)?,
        Access::Daemon(mut c) => {
            let v = c.call(serde_json::json!({"op": "status"}), CALL_TIMEOUT)?;
            let ids: Vec<String> = v["disks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d["disk_id"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if !ids.iter().any(|i| i == disk_id) {
                return Err(no_disk(data_dir, disk_id));
            }
            // The daemon's reply is for display; read the typed state here.
            catalog::disk_states(data_dir)?
        }
    };
    disks
        .into_iter()
        .find(|d| d.disk_id == disk_id)
        .ok_or_else(|| no_disk(data_dir, disk_id))
}

/// What a drain found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// The replica has applied every seq up to this.
    pub applied_seq: u64,
    /// The highest seq the collector (and, if it answered, the agent) held
    /// when asked.
    pub held_seq: u64,
    /// The agent answered, so its journal is included in `held_seq`.
    pub agent_answered: bool,
}

/// A barrier: ask the collector, over the disk's connection to the target,
/// what it (and, when connected, the agent) holds for the disk, and wait
/// until the replica has applied all of it. Needs a running target with
/// the collector connected; fails naming what is missing otherwise.
pub fn drain(data_dir: &Path, disk_id: &str, timeout: Duration) -> Result<Drained> {
    match access(data_dir)? {
        Access::Direct(_) => Err(Error::new(
            ErrorKind::Refused,
            format!(
                "no target is running on {}: nothing can confirm that the replica holds every acknowledged write; start the target (and the collector), or fail over with --no-drain to accept the replica as it is",
                data_dir.display()
            ),
        )),
        Access::Daemon(mut c) => {
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            let v = c.call(
                serde_json::json!({"op": "drain", "disk": disk_id, "timeout_ms": ms}),
                timeout + Duration::from_secs(20),
            )?;
            Ok(Drained {
                applied_seq: v["applied_seq"].as_u64().ok_or_else(|| bad_reply("applied_seq"))?,
                held_seq: v["held_seq"].as_u64().ok_or_else(|| bad_reply("held_seq"))?,
                agent_answered: v["agent_answered"].as_bool().unwrap_or(false),
            })
        }
    }
}
