//! How a tool reaches a data directory: through the daemon's control
//! socket while a target holds it, or directly under a shared lock.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rusqlite::Connection;
use tidemark_catalog::layout::{CONTROL_SOCKET, LOCK_FILE};
use tidemark_catalog::{self as catalog, Point};

use crate::at::{describe, select, AtSpec};

/// How this process reaches a data directory.
pub(crate) enum Access {
    /// A daemon holds it: talk to its control socket.
    Daemon(Control),
    /// Nobody does: read it directly, holding a shared lock.
    Direct(nix::fcntl::Flock<File>),
}

pub(crate) fn access(data_dir: &Path) -> anyhow::Result<Access> {
    let lock_path = data_dir.join(LOCK_FILE);
    let f = OpenOptions::new().read(true).open(&lock_path).with_context(|| {
        format!(
            "open {} (is {} a target data directory?)",
            lock_path.display(),
            data_dir.display()
        )
    })?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(l) => Ok(Access::Direct(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(Access::Daemon(Control::connect(data_dir)?)),
        Err((_, e)) => Err(anyhow!("lock {}: {e}", lock_path.display())),
    }
}

/// A JSON-lines connection to a daemon's control socket.
pub(crate) struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    pub(crate) fn connect(data_dir: &Path) -> anyhow::Result<Self> {
        let p = data_dir.join(CONTROL_SOCKET);
        let stream = UnixStream::connect(&p).with_context(|| {
            format!(
                "a target holds {} but its control socket {} does not answer",
                data_dir.display(),
                p.display()
            )
        })?;
        let reader = BufReader::new(stream.try_clone().context("clone the control socket")?);
        Ok(Self { stream, reader })
    }

    /// Send one request, read one reply; an `{"ok": false}` reply is an error.
    pub(crate) fn call(&mut self, req: serde_json::Value, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .context("write to the target's control socket")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply).context("read the target's reply")?;
        if reply.is_empty() {
            bail!("the target closed its control socket");
        }
        let v: serde_json::Value = serde_json::from_str(&reply).context("the target's reply is not JSON")?;
        if v["ok"].as_bool() != Some(true) {
            bail!("{}", v["error"].as_str().unwrap_or("the target refused the request"));
        }
        Ok(v)
    }
}

pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Points of `disk_id`, read straight from the catalog.
pub fn points_direct(data_dir: &Path, disk_id: &str) -> anyhow::Result<Vec<Point>> {
    let conn = catalog::open_read_only(data_dir)?;
    check_disk(&conn, data_dir, disk_id)?;
    Ok(catalog::read_points_with_latest(&conn, disk_id)?)
}

fn check_disk(conn: &Connection, data_dir: &Path, disk_id: &str) -> anyhow::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 4 {
        bail!(
            "{}: the catalog predates replica formats (start the target once to migrate it)",
            data_dir.display()
        );
    }
    if catalog::Catalog::row(conn, disk_id)?.is_none() {
        bail!("no disk {disk_id} in {}", data_dir.display());
    }
    Ok(())
}

/// The recovery points of a disk, oldest first.
pub fn points(data_dir: &Path, disk_id: &str) -> anyhow::Result<Vec<Point>> {
    match access(data_dir)? {
        Access::Direct(_lock) => points_direct(data_dir, disk_id),
        Access::Daemon(mut c) => {
            let v = c.call(serde_json::json!({"op": "points", "disk": disk_id}), CALL_TIMEOUT)?;
            Ok(serde_json::from_value(v["points"].clone()).context("points in the target's reply")?)
        }
    }
}

/// The point `at` names (see [`select`]).
pub fn resolve(data_dir: &Path, disk_id: &str, at: &AtSpec) -> anyhow::Result<Point> {
    let pts = points(data_dir, disk_id)?;
    select(&pts, at)
        .cloned()
        .ok_or_else(|| anyhow!("disk {disk_id}: {}", describe(at)))
}

/// The disk's state as `tidemark status --data` shows it (through the
/// daemon when one runs).
pub fn disk_state(data_dir: &Path, disk_id: &str) -> anyhow::Result<catalog::DiskState> {
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
                bail!("no disk {disk_id} in {}", data_dir.display());
            }
            // The daemon's reply is for display; read the typed state here.
            catalog::disk_states(data_dir)?
        }
    };
    disks
        .into_iter()
        .find(|d| d.disk_id == disk_id)
        .ok_or_else(|| anyhow!("no disk {disk_id} in {}", data_dir.display()))
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
pub fn drain(data_dir: &Path, disk_id: &str, timeout: Duration) -> anyhow::Result<Drained> {
    match access(data_dir)? {
        Access::Direct(_) => bail!(
            "no target is running on {}: nothing can confirm that the replica holds every acknowledged write; start the target (and the collector), or fail over with --no-drain to accept the replica as it is",
            data_dir.display()
        ),
        Access::Daemon(mut c) => {
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            let v = c.call(
                serde_json::json!({"op": "drain", "disk": disk_id, "timeout_ms": ms}),
                timeout + Duration::from_secs(20),
            )?;
            Ok(Drained {
                applied_seq: v["applied_seq"].as_u64().context("applied_seq in the target's reply")?,
                held_seq: v["held_seq"].as_u64().context("held_seq in the target's reply")?,
                agent_answered: v["agent_answered"].as_bool().unwrap_or(false),
            })
        }
    }
}
