//! Recovery points and point-in-time views of a target's disks: the API the
//! recovery tools (`tidemark points`, `mount`, `failover`) are built on
//! (`docs/recovery.md`).
//!
//! Works with or without a running target: while a daemon holds the data
//! directory (`target.lock` is locked), every call goes through its control
//! socket `DIR/control.sock`, so that the daemon pins what a view needs
//! before its expiry could remove it; otherwise the library opens the
//! directory itself and holds a shared lock on `target.lock` for as long
//! as a view is open, so that no daemon starts (and expires undo data)
//! under it.
//!
//! A [`View`] at point P reads, for each 4 KiB block, the undo entry with
//! the lowest capture seq above P, or the replica where there is none. It
//! never changes: undo captured while it is open is consulted too (an
//! overwrite after P is always captured, and marked in the catalog before
//! the replica is written), and each read checks the index, reads, and
//! checks the index again, so a concurrent apply cannot slip new replica
//! bytes into it.
//!
//! This module never writes the replica or undo data.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tidemark_formats::replica::ReplicaImage;
use tidemark_util::now_ns;

use crate::catalog::{self, UndoRow};
use crate::undo::{self, blocks_of, BLOCK, UNDO_DIR};
use crate::LOCK_FILE;

/// The control socket's file name inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// What makes a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// A Flush while the disk was consistent: crash-consistent.
    Crash,
    /// A Tag with FLAG_APP_CONSISTENT (taken under fsfreeze / VSS).
    App,
    /// A Tag without it: a named crash-consistent point.
    Tag,
}

impl PointKind {
    /// The name in the catalog and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::App => "app",
            Self::Tag => "tag",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "crash" => Some(Self::Crash),
            "app" => Some(Self::App),
            "tag" => Some(Self::Tag),
            _ => None,
        }
    }
}

/// A recovery point: the replica as it was after applying `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Point {
    pub seq: u64,
    /// Source time of the record that made it (ns since the Unix epoch).
    pub time_ns: u64,
    pub kind: PointKind,
    /// The tag's name (App and Tag points).
    pub tag: Option<String>,
    /// This point is the replica's applied state, newer than every
    /// recorded point (`--at latest`), and not recorded in the catalog.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest: bool,
}

impl Point {
    /// `seq 42, 2026-…+01:00, app, tag "nightly"` (`latest` for the
    /// applied state).
    pub fn describe(&self) -> String {
        let tag = self.tag.as_ref().map(|t| format!(", tag \"{t}\"")).unwrap_or_default();
        let latest = if self.latest {
            " (latest: every applied write)"
        } else {
            ""
        };
        format!(
            "seq {}, {}, {}{tag}{latest}",
            self.seq,
            format_time(self.time_ns),
            self.kind.as_str()
        )
    }
}

/// Which point a user asks for (`--at`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AtSpec {
    /// The replica's applied state: every record applied (a crash state of
    /// the source, offered while the disk is consistent).
    Latest,
    /// The newest point made by a flush (or a tag).
    LatestFlush,
    /// The newest application-consistent point.
    LatestApp,
    /// The point at this seq, or the last one before it.
    Seq(u64),
    /// The last point at or before this time (ns since the Unix epoch).
    Time(u64),
    /// The point carrying this tag name.
    Tag(String),
}

/// What `--at` accepts, for error messages.
pub const AT_FORMS: &str = "latest, latest-flush, latest-app, seq:N, tag:NAME, a time \
(2026-11-28T10:00:00Z, 2026-11-28 10:00 local time, 10:00 today) or a relative time (10m ago)";

impl AtSpec {
    /// Parse `latest`, `latest-flush`, `latest-app`, `seq:N`, `tag:NAME`,
    /// an RFC 3339 time (`2026-11-28T10:00:00Z`, `…+02:00`, fractions
    /// allowed), a local time (`2026-11-28 10:00[:00]`, `2026-11-28T10:00`,
    /// `10:00[:00]` today), a relative time (`10m ago`, `1h30m ago`), or a
    /// bare tag name (anything else that [`tag_name_problem`] accepts).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Self::parse_at(s, now_ns())
    }

    /// [`AtSpec::parse`] with "now" given (relative times count back from it).
    pub fn parse_at(s: &str, now_ns: u64) -> anyhow::Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            bail!("--at is empty: give one of {AT_FORMS}");
        }
        match s {
            "latest" => return Ok(Self::Latest),
            "latest-flush" => return Ok(Self::LatestFlush),
            "latest-app" => return Ok(Self::LatestApp),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n
                .trim()
                .parse()
                .map(Self::Seq)
                .map_err(|_| anyhow!("--at {s}: \"{n}\" is not a seq number (seq:N wants a whole number)"));
        }
        if let Some(name) = s.strip_prefix("tag:") {
            if name.is_empty() {
                bail!("--at {s}: tag:NAME wants a name");
            }
            return Ok(Self::Tag(name.to_string()));
        }
        if let Some(ago) = s.strip_suffix(" ago").or_else(|| s.strip_suffix("ago")) {
            let d = tidemark_util::human::parse_duration(ago.trim()).map_err(|_| {
                anyhow!(
                    "--at {s}: \"{}\" is not a duration (e.g. 10m ago, 1h30m ago)",
                    ago.trim()
                )
            })?;
            let back = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            return Ok(Self::Time(now_ns.saturating_sub(back)));
        }
        if let Some(t) = parse_rfc3339(s) {
            return Ok(Self::Time(t));
        }
        if let Some(t) = parse_local_time(s, now_ns) {
            return Ok(Self::Time(t));
        }
        if looks_like_time(s) {
            bail!(
                "--at {s} looks like a time but is not one this tool reads (2026-11-28T10:00:00Z, 2026-11-28 10:00, 10:00); \
                 use tag:{s} for a tag of that name"
            );
        }
        Ok(Self::Tag(s.to_string()))
    }
}

/// Why `name` cannot be a tag name, if it cannot: `--at` must be able to
/// name every tag by itself, so a name that `--at` reads as something else
/// (`latest`, `seq:5`, a time, `10m ago`) or that has a `tag:` prefix is
/// refused, as are empty names, names over 255 bytes and control
/// characters.
pub fn tag_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a tag name cannot be empty".into());
    }
    if name.len() > 255 {
        return Some(format!("tag name of {} bytes: at most 255 bytes", name.len()));
    }
    if name.trim() != name {
        return Some(format!("tag name \"{name}\" starts or ends with white space"));
    }
    if name.chars().any(char::is_control) {
        return Some("a tag name cannot hold control characters".into());
    }
    if name.starts_with("tag:") {
        return Some(format!("tag name \"{name}\" starts with tag:, which --at strips"));
    }
    match AtSpec::parse_at(name, now_ns()) {
        Ok(AtSpec::Tag(t)) if t == name => None,
        _ => Some(format!(
            "tag name \"{name}\" reads as a point spec to --at ({AT_FORMS}); choose another name"
        )),
    }
}

/// Whether `s` starts like a date or a clock time (so that a typo in one
/// is an error, not a tag name).
fn looks_like_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    (digits == 4 && b.get(4) == Some(&b'-')) || ((1..=2).contains(&digits) && b.get(digits) == Some(&b':'))
}

/// A time without a zone, in the local zone: `YYYY-MM-DD HH:MM[:SS[.f]]`,
/// the same with `T`, or `HH:MM[:SS]` (today).
fn parse_local_time(s: &str, now_ns: u64) -> Option<u64> {
    use chrono::{Local, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
    let naive = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .or_else(|| {
        let t = ["%H:%M:%S%.f", "%H:%M"]
            .iter()
            .find_map(|f| NaiveTime::parse_from_str(s, f).ok())?;
        let secs = i64::try_from(now_ns / 1_000_000_000).ok()?;
        let today: NaiveDate = Local.timestamp_opt(secs, 0).single()?.date_naive();
        Some(today.and_time(t))
    })?;
    let local = Local.from_local_datetime(&naive).earliest()?;
    u64::try_from(local.timestamp_nanos_opt()?).ok()
}

/// Parse an RFC 3339 date-time into ns since the Unix epoch (None if it is
/// not one, or before 1970).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = b.get(r)?;
        if !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(t).ok()?.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: i64 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 9)];
        frac_ns = digits.parse::<i64>().ok()? * 10i64.pow(9 - u32::try_from(digits.len()).ok()?);
    }
    let offset_s: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *c == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    u64::try_from(secs)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(frac_ns).ok()?)
}

/// The point `at` names among `points` (sorted by seq): anything but an
/// exact point seq (or a tag) resolves to the last point at or before it.
pub fn select<'a>(points: &'a [Point], at: &AtSpec) -> Option<&'a Point> {
    match at {
        AtSpec::Latest => points.last(),
        AtSpec::LatestFlush => points.iter().rev().find(|p| !p.latest),
        AtSpec::LatestApp => points.iter().rev().find(|p| p.kind == PointKind::App),
        AtSpec::Seq(n) => points.iter().rev().find(|p| p.seq <= *n),
        AtSpec::Time(t) => points.iter().rev().find(|p| p.time_ns <= *t),
        AtSpec::Tag(name) => points.iter().find(|p| p.tag.as_deref() == Some(name.as_str())),
    }
}

/// Why no point matched `at`, in the operator's words.
pub(crate) fn describe(at: &AtSpec) -> String {
    match at {
        AtSpec::Latest => "no recovery point yet (the disk is not consistent: its initial sync or a resync has not finished, it is halted, or retention is off)".into(),
        AtSpec::LatestFlush => "no point made by a flush or a tag yet".into(),
        AtSpec::LatestApp => "no application-consistent point (take one with tidemark tag --freeze)".into(),
        AtSpec::Seq(n) => format!("no point at or before seq {n}"),
        AtSpec::Time(t) => format!("no point at or before {}", format_time(*t)),
        AtSpec::Tag(n) => format!("no point tagged \"{n}\" (tidemark points lists them)"),
    }
}

/// Local time, RFC 3339, with as many fractional digits as it needs so
/// that `--at TIME` given a printed time resolves to that very point.
pub fn format_time(ns: u64) -> String {
    let secs = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX);
    let sub = u32::try_from(ns % 1_000_000_000).unwrap_or(0);
    match chrono::DateTime::from_timestamp(secs, sub) {
        Some(t) => t
            .with_timezone(&chrono::Local)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
        None => format!("@{ns}ns"),
    }
}

/// How this process reaches a data directory.
enum Access {
    /// A daemon holds it: talk to its control socket.
    Daemon(Control),
    /// Nobody does: read it directly, holding a shared lock.
    Direct(nix::fcntl::Flock<File>),
}

fn access(data_dir: &Path) -> anyhow::Result<Access> {
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
    fn connect(data_dir: &Path) -> anyhow::Result<Self> {
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
    fn call(&mut self, req: serde_json::Value, timeout: Duration) -> anyhow::Result<serde_json::Value> {
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

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Points of `disk_id`, read straight from the catalog.
pub(crate) fn points_direct(data_dir: &Path, disk_id: &str) -> anyhow::Result<Vec<Point>> {
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

/// What keeps a view's data in place.
#[allow(clippy::large_enum_variant)]
enum Hold {
    /// The daemon pinned the point until this connection closes.
    Pinned(#[allow(dead_code)] Control),
    /// No daemon can start while this shared lock is held.
    Locked(#[allow(dead_code)] nix::fcntl::Flock<File>),
}

/// A pinned, read-only view of a disk at a recovery point; it never changes.
pub struct View {
    point: Point,
    disk_id: String,
    size: u64,
    undo_dir: PathBuf,
    replica: Box<dyn ReplicaImage>,
    conn: Mutex<Connection>,
    segments: Mutex<HashMap<u64, File>>,
    hold: Mutex<Hold>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("disk_id", &self.disk_id)
            .field("point", &self.point)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl View {
    /// Open (and pin) a view of `disk_id` at the point `at` names.
    pub fn open(data_dir: &Path, disk_id: &str, at: &AtSpec) -> anyhow::Result<View> {
        Self::open_with(data_dir, disk_id, at, false)
    }

    /// Open a view for a failover: a running target first stops applying
    /// to the disk (so `latest` is its final state), and starts again if
    /// this view is closed before [`View::record_failover`].
    pub fn open_for_failover(data_dir: &Path, disk_id: &str, at: &AtSpec) -> anyhow::Result<View> {
        Self::open_with(data_dir, disk_id, at, true)
    }

    fn open_with(data_dir: &Path, disk_id: &str, at: &AtSpec, stop: bool) -> anyhow::Result<View> {
        let (point, hold) = match access(data_dir)? {
            Access::Direct(lock) => {
                let pts = points_direct(data_dir, disk_id)?;
                let p = select(&pts, at)
                    .cloned()
                    .ok_or_else(|| anyhow!("disk {disk_id}: {}", describe(at)))?;
                (p, Hold::Locked(lock))
            }
            Access::Daemon(mut c) => {
                let v = c.call(
                    serde_json::json!({"op": "pin", "disk": disk_id, "at": at, "stop": stop}),
                    Duration::from_secs(90),
                )?;
                let p: Point = serde_json::from_value(v["point"].clone()).context("point in the target's reply")?;
                (p, Hold::Pinned(c))
            }
        };
        let disk_dir = crate::replica::disk_dir(data_dir, disk_id);
        let replica = tidemark_formats::replica::open_read_only(&disk_dir)
            .with_context(|| format!("open the replica of disk {disk_id}"))?;
        let conn = catalog::open_read_only(data_dir)?;
        Ok(View {
            size: replica.size(),
            point,
            disk_id: disk_id.to_string(),
            undo_dir: disk_dir.join(UNDO_DIR),
            replica,
            conn: Mutex::new(conn),
            segments: Mutex::new(HashMap::new()),
            hold: Mutex::new(hold),
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Record the failover of this view's disk at its point to `output`:
    /// the target stops applying to the disk for good.
    pub fn record_failover(&self, output: &Path) -> anyhow::Result<()> {
        let out = output.display().to_string();
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *hold {
            Hold::Locked(_) => {
                let mut c = catalog::Catalog::open(&self.data_dir)?;
                c.record_failover(&self.disk_id, &self.point, &out)?;
            }
            Hold::Pinned(c) => {
                c.call(
                    serde_json::json!({"op": "failover", "disk": self.disk_id, "point": self.point, "output": out}),
                    Duration::from_secs(90),
                )?;
            }
        }
        Ok(())
    }

    /// The point this view shows.
    pub fn point(&self) -> &Point {
        &self.point
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} is beyond the {}-byte disk", self.size),
            ));
        }
        Ok(())
    }

    /// For each block of `[b0, b1)`, the undo entry with the lowest capture
    /// seq above the point, if any.
    fn lookup(&self, b0: u64, b1: u64) -> io::Result<Vec<Option<UndoRow>>> {
        let rows = {
            let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            catalog::undo_lookup(&conn, &self.disk_id, self.point.seq, b0, b1).map_err(io_err)?
        };
        let n = usize::try_from(b1 - b0).map_err(io_err)?;
        let mut out: Vec<Option<UndoRow>> = vec![None; n];
        for r in rows {
            let (s, e) = (r.start_block.max(b0), r.end_block.min(b1));
            for b in s..e {
                let slot = &mut out[usize::try_from(b - b0).map_err(io_err)?];
                if slot.is_none() {
                    *slot = Some(r);
                }
            }
        }
        Ok(out)
    }

    fn undo_block(&self, r: &UndoRow, block: u64, out: &mut [u8]) -> io::Result<()> {
        if r.zero {
            out.fill(0);
            return Ok(());
        }
        let path = self.undo_dir.join(undo::segment_name(r.segment));
        let mut segs = self.segments.lock().unwrap_or_else(|e| e.into_inner());
        let f = match segs.entry(r.segment) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(
                File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?,
            ),
        };
        undo::read_block(f, &path, r.seg_offset, block, out).map_err(io_err)
    }

    /// Fill `buf` with the disk's bytes at `offset`, as they were at the point.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (b0, b1) = blocks_of(offset, len);
        // Check the index, read the replica where it has nothing, check
        // again: an entry that appeared meanwhile was marked before the
        // replica bytes it protects were written, so it wins.
        let first = self.lookup(b0, b1)?;
        let mut run: Option<u64> = None;
        let read_run = |s: u64, e: u64, buf: &mut [u8]| -> io::Result<()> {
            let (lo, hi) = ((s * BLOCK).max(offset), (e * BLOCK).min(offset + len));
            let a = usize::try_from(lo - offset).map_err(io_err)?;
            let z = usize::try_from(hi - offset).map_err(io_err)?;
            self.replica.read_at(&mut buf[a..z], lo).map_err(io_err)
        };
        for (i, slot) in first.iter().enumerate() {
            let b = b0 + i as u64;
            match (slot, run) {
                (None, None) => run = Some(b),
                (Some(_), Some(s)) => {
                    read_run(s, b, buf)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            read_run(s, b1, buf)?;
        }
        let second = self.lookup(b0, b1)?;
        let mut block = vec![0u8; undo::BLOCK_BYTES];
        for (i, slot) in second.iter().enumerate() {
            let Some(r) = slot else { continue };
            let b = b0 + i as u64;
            self.undo_block(r, b, &mut block)?;
            let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(offset + len));
            let src = &block
                [usize::try_from(lo - b * BLOCK).map_err(io_err)?..usize::try_from(hi - b * BLOCK).map_err(io_err)?];
            buf[usize::try_from(lo - offset).map_err(io_err)?..usize::try_from(hi - offset).map_err(io_err)?]
                .copy_from_slice(src);
        }
        Ok(())
    }

    /// Extents `(offset, len, data?)` covering `[offset, offset+len)`;
    /// `data == false` means the extent reads zeros at the point.
    pub fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        let base = self.replica.allocated(offset, len).map_err(io_err)?;
        let (b0, b1) = blocks_of(offset, len);
        let undo = self.lookup(b0, b1)?;
        if undo.iter().all(Option::is_none) {
            return Ok(base);
        }
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (i, slot) in undo.iter().enumerate() {
            let b = b0 + i as u64;
            let (lo, hi) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(offset + len));
            let data = match slot {
                Some(r) => !r.zero,
                None => base.iter().any(|&(o, l, d)| d && o < hi && o + l > lo),
            };
            match out.last_mut() {
                Some(last) if last.2 == data && last.0 + last.1 == lo => last.1 += hi - lo,
                _ => out.push((lo, hi - lo, data)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u64, time_ns: u64, kind: PointKind, tag: Option<&str>) -> Point {
        Point {
            seq,
            time_ns,
            kind,
            tag: tag.map(str::to_string),
            latest: false,
        }
    }

    #[test]
    fn local_relative_and_reserved_forms() {
        let now = 1_800_000_000_000_000_000;
        assert_eq!(
            AtSpec::parse_at("10m ago", now).unwrap(),
            AtSpec::Time(now - 600_000_000_000)
        );
        assert_eq!(
            AtSpec::parse_at("1h30m ago", now).unwrap(),
            AtSpec::Time(now - 5_400_000_000_000)
        );
        assert!(AtSpec::parse_at("ten minutes ago", now).is_err());
        assert_eq!(AtSpec::parse("latest-flush").unwrap(), AtSpec::LatestFlush);
        // Local times are the local zone's: whatever it is, they round-trip
        // through the printed form.
        let AtSpec::Time(t) = AtSpec::parse("2026-11-28 10:00").unwrap() else {
            panic!("a local time")
        };
        assert_eq!(AtSpec::parse(&format_time(t)).unwrap(), AtSpec::Time(t));
        assert_eq!(
            AtSpec::parse("2026-11-28T10:00:30").unwrap(),
            AtSpec::Time(t + 30_000_000_000)
        );
        assert!(matches!(AtSpec::parse("10:00").unwrap(), AtSpec::Time(_)));
        assert!(AtSpec::parse("25:00").is_err(), "looks like a clock time, is not one");
        for bad in [
            "latest",
            "latest-app",
            "latest-flush",
            "seq:5",
            "tag:x",
            "10m ago",
            "2026-11-28 10:00",
            "10:00",
            "",
            " x",
        ] {
            assert!(tag_name_problem(bad).is_some(), "{bad:?} must be refused as a tag name");
        }
        for good in ["nightly", "before-upgrade", "v1.2", "pre_patch_2026"] {
            assert_eq!(tag_name_problem(good), None, "{good}");
        }
        let e = AtSpec::parse("seq:x").unwrap_err().to_string();
        assert!(!e.contains("Tag(") && e.contains("seq:N"), "{e}");
    }

    #[test]
    fn specs_parse_and_resolve_to_the_last_point_at_or_before() {
        assert_eq!(AtSpec::parse("latest").unwrap(), AtSpec::Latest);
        assert_eq!(AtSpec::parse("latest-app").unwrap(), AtSpec::LatestApp);
        assert_eq!(AtSpec::parse("seq:42").unwrap(), AtSpec::Seq(42));
        assert!(AtSpec::parse("seq:x").is_err());
        assert_eq!(AtSpec::parse("tag:latest").unwrap(), AtSpec::Tag("latest".into()));
        assert_eq!(
            AtSpec::parse("before-upgrade").unwrap(),
            AtSpec::Tag("before-upgrade".into())
        );
        assert_eq!(
            AtSpec::parse("1970-01-01T00:00:01.5Z").unwrap(),
            AtSpec::Time(1_500_000_000)
        );
        assert_eq!(
            AtSpec::parse("2026-11-28T12:00:00+02:00").unwrap(),
            AtSpec::parse("2026-11-28T10:00:00Z").unwrap()
        );
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800_000_000_000));
        assert!(
            AtSpec::parse("2026-13-01T00:00:00Z").is_err(),
            "looks like a time, is not one"
        );
        assert!(AtSpec::parse("").is_err());

        let pts = vec![
            p(10, 100, PointKind::Crash, None),
            p(20, 200, PointKind::App, Some("a")),
            p(30, 300, PointKind::Tag, Some("b")),
            p(40, 400, PointKind::Crash, None),
        ];
        assert_eq!(select(&pts, &AtSpec::Latest).unwrap().seq, 40);
        assert_eq!(select(&pts, &AtSpec::LatestApp).unwrap().seq, 20);
        assert_eq!(select(&pts, &AtSpec::Seq(30)).unwrap().seq, 30);
        assert_eq!(select(&pts, &AtSpec::Seq(39)).unwrap().seq, 30);
        assert!(select(&pts, &AtSpec::Seq(9)).is_none());
        assert_eq!(select(&pts, &AtSpec::Time(250)).unwrap().seq, 20);
        assert_eq!(select(&pts, &AtSpec::Tag("b".into())).unwrap().seq, 30);
        assert!(select(&pts, &AtSpec::Tag("c".into())).is_none());
        let j = serde_json::to_string(&pts[1]).unwrap();
        assert_eq!(j, r#"{"seq":20,"time_ns":200,"kind":"app","tag":"a"}"#);
    }
}
