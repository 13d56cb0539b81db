//! A daemon's own directory: a marker that says which kind of directory it
//! is, and an exclusive lock held while the daemon runs.
//!
//! ```text
//!  DIR/
//!    TIDEMARK-DIR    "tidemark-dir 1\nkind agent-state\n"   (or collector-spool, target-data)
//!    <lock file>     flock'd while the daemon runs; holds "pid N\n" of the holder
//!    …               the daemon's own files
//! ```
//!
//! What it owns: deciding whether a directory may be used at all. A daemon
//! claims a directory that is new, empty, already marked with its own kind,
//! or unmarked but holding only its own files (made by an earlier version:
//! adopted, the marker is written). Anything else is refused with a message
//! naming the path and what is there. What it must never do: write, lock or
//! delete anything in a directory it then refuses, or remove on a failed
//! start anything this start did not create.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::crashsafe;

/// File name of the marker in every daemon directory.
pub const MARKER_FILE: &str = "TIDEMARK-DIR";

/// A filesystem's own folder, found at the root of a fresh one: never ours.
const LOST_FOUND: &str = "lost+found";

/// The marker format version this build writes and reads.
pub const MARKER_VERSION: u32 = 1;

/// The kinds of directory a Tidemark daemon owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirKind {
    /// `tidemark-agent --state`.
    AgentState,
    /// `tidemark-collector --spool`.
    CollectorSpool,
    /// `tidemark-target --data`.
    TargetData,
}

impl DirKind {
    const ALL: [DirKind; 3] = [DirKind::AgentState, DirKind::CollectorSpool, DirKind::TargetData];

    /// The word in the marker file.
    pub fn tag(self) -> &'static str {
        match self {
            DirKind::AgentState => "agent-state",
            DirKind::CollectorSpool => "collector-spool",
            DirKind::TargetData => "target-data",
        }
    }

    /// The program that owns this kind of directory.
    pub fn daemon(self) -> &'static str {
        match self {
            DirKind::AgentState => "tidemark-agent",
            DirKind::CollectorSpool => "tidemark-collector",
            DirKind::TargetData => "tidemark-target",
        }
    }

    /// What the operator calls it: "state directory", …
    pub fn noun(self) -> &'static str {
        match self {
            DirKind::AgentState => "state directory",
            DirKind::CollectorSpool => "spool directory",
            DirKind::TargetData => "data directory",
        }
    }

    /// "a tidemark-agent state directory".
    pub fn describe(self) -> String {
        format!("a {} {}", self.daemon(), self.noun())
    }

    /// The lock file's name (kept from earlier versions).
    pub fn lock_file(self) -> &'static str {
        match self {
            DirKind::AgentState => "lock",
            DirKind::CollectorSpool => "collector.lock",
            DirKind::TargetData => "target.lock",
        }
    }

    fn from_tag(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.tag() == s)
    }
}

/// What a daemon keeps in its directory, for recognising a directory that
/// an earlier version made before markers existed.
#[derive(Clone, Copy, Debug)]
pub struct DirSpec {
    pub kind: DirKind,
    /// Top-level names the daemon writes (files, sockets, named folders),
    /// besides the marker and the lock file. `NAME.tmp` (an interrupted
    /// atomic write) counts as its own too.
    pub own_names: &'static [&'static str],
    /// Whether any other folder is its own (one folder per disk id).
    pub any_subdir: bool,
    /// An unmarked, non-empty directory is adopted only if it holds at
    /// least one of these.
    pub adopt_if_any: &'static [&'static str],
    /// Extra words for "in use" (e.g. which tools also take the lock).
    pub busy_hint: &'static str,
}

/// Why a directory was refused.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DirError {
    /// Which refusal it is.
    pub kind: DirErrorKind,
    /// The whole message, path included; it names the cause once.
    pub message: String,
}

/// The kinds of [`DirError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirErrorKind {
    /// The directory belongs to another kind of daemon.
    OtherKind,
    /// It holds files that are not this daemon's, or is not a directory.
    Foreign,
    /// Another process holds its lock.
    Busy,
    /// A marker this version cannot read.
    Unsupported,
    /// Reading or writing the directory failed.
    Io,
}

fn err(kind: DirErrorKind, message: String) -> DirError {
    DirError { kind, message }
}

fn io_err(what: &str, path: &Path, e: &io::Error) -> DirError {
    err(DirErrorKind::Io, format!("{what} {}: {e}", path.display()))
}

/// What is at a directory path before a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing: the claim creates it.
    Missing,
    /// An empty directory.
    Empty,
    /// Marked as this daemon's.
    Marked,
    /// Unmarked, holding only this daemon's files: adopted on claim.
    Adoptable,
}

fn read_marker(path: &Path) -> Result<Option<DirKind>, DirError> {
    let p = path.join(MARKER_FILE);
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &p, &e)),
    };
    let mut lines = text.lines();
    let version = lines
        .next()
        .and_then(|l| l.strip_prefix("tidemark-dir "))
        .and_then(|v| v.trim().parse::<u32>().ok());
    let Some(version) = version else {
        return Err(err(
            DirErrorKind::Unsupported,
            format!("{} is not a Tidemark directory marker", p.display()),
        ));
    };
    if version != MARKER_VERSION {
        return Err(err(
            DirErrorKind::Unsupported,
            format!(
                "{} has marker version {version}; this build reads version {MARKER_VERSION}",
                p.display()
            ),
        ));
    }
    let tag = lines.find_map(|l| l.strip_prefix("kind ")).map(str::trim).unwrap_or("");
    match DirKind::from_tag(tag) {
        Some(k) => Ok(Some(k)),
        None => Err(err(
            DirErrorKind::Unsupported,
            format!("{} names an unknown kind of directory {tag:?}", p.display()),
        )),
    }
}

fn marker_text(kind: DirKind) -> String {
    format!("tidemark-dir {MARKER_VERSION}\nkind {}\n", kind.tag())
}

/// Whether a top-level entry is one of `spec`'s own.
fn is_own(spec: &DirSpec, name: &str, is_dir: bool) -> bool {
    let base = name.strip_suffix(".tmp").unwrap_or(name);
    base == MARKER_FILE
        || base == spec.kind.lock_file()
        || spec.own_names.contains(&base)
        || (is_dir && spec.any_subdir)
}

/// Look at `path` without changing anything: refuse a directory of another
/// kind, a non-empty one with files that are not this daemon's, or one
/// whose lock someone holds.
pub fn inspect(path: &Path, spec: &DirSpec) -> Result<Found, DirError> {
    inspect_with(path, spec, false)
}

/// [`inspect`]; `own_new_lock`: the lock file there was just created by
/// this claim, so it does not make the directory non-empty.
fn inspect_with(path: &Path, spec: &DirSpec, own_new_lock: bool) -> Result<Found, DirError> {
    let kind = spec.kind;
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(io_err("look at", path, &e)),
    };
    if !meta.is_dir() {
        return Err(err(
            DirErrorKind::Foreign,
            format!(
                "{} is not a directory; give a new or empty directory as the {}",
                path.display(),
                kind.noun()
            ),
        ));
    }
    if let Some(found) = read_marker(path)? {
        if found != kind {
            return Err(err(
                DirErrorKind::OtherKind,
                format!("{} is {}, not {}", path.display(), found.describe(), kind.describe()),
            ));
        }
        return Ok(Found::Marked);
    }
    let mut names = Vec::new();
    let mut foreign = Vec::new();
    let rd = fs::read_dir(path).map_err(|e| io_err("list", path, &e))?;
    for e in rd {
        let e = e.map_err(|e| io_err("list", path, &e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        // A fresh filesystem's root counts as empty.
        if (own_new_lock && name == kind.lock_file()) || (is_dir && name == LOST_FOUND) {
            continue;
        }
        if !is_own(spec, &name, is_dir) {
            foreign.push(name.clone());
        }
        names.push(name);
    }
    if names.is_empty() {
        return Ok(Found::Empty);
    }
    foreign.sort();
    if !foreign.is_empty() {
        // Name the owner when the files say who it is.
        for other in DirKind::ALL.into_iter().filter(|k| *k != kind) {
            let signature: &[&str] = match other {
                DirKind::AgentState => &["disk.json", "journal"],
                DirKind::TargetData => &["target.lock"],
                DirKind::CollectorSpool => &["collector.lock"],
            };
            if signature.iter().any(|s| foreign.iter().any(|f| f == s)) {
                return Err(err(
                    DirErrorKind::OtherKind,
                    format!(
                        "{} looks like {} (it holds {}), not {}",
                        path.display(),
                        other.describe(),
                        list(&foreign),
                        kind.describe()
                    ),
                ));
            }
        }
        return Err(err(
            DirErrorKind::Foreign,
            format!(
                "{} is not empty and is not {}: it holds {}; give a new or empty directory",
                path.display(),
                kind.describe(),
                list(&foreign)
            ),
        ));
    }
    if !spec.adopt_if_any.iter().any(|n| names.iter().any(|m| m == n)) {
        let mut names = names;
        names.sort();
        return Err(err(
            DirErrorKind::Foreign,
            format!(
                "{} is not empty and has no {} marker, nor the files of one ({} missing); it holds {}; \
                 give a new or empty directory",
                path.display(),
                kind.daemon(),
                spec.adopt_if_any.join(" / "),
                list(&names)
            ),
        ));
    }
    Ok(Found::Adoptable)
}

fn list(names: &[String]) -> String {
    const MAX: usize = 5;
    let mut s = names.iter().take(MAX).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > MAX {
        s.push_str(&format!(" and {} more", names.len() - MAX));
    }
    s
}

/// The pid recorded in a lock file, if that process is still alive.
fn holder(lock_path: &Path) -> Option<u32> {
    let text = fs::read_to_string(lock_path).ok()?;
    let pid: u32 = text.trim().strip_prefix("pid ")?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn busy(path: &Path, spec: &DirSpec, lock_path: &Path) -> DirError {
    let who = match holder(lock_path) {
        Some(pid) => format!(" (process {pid} holds its lock)"),
        None => String::new(),
    };
    err(
        DirErrorKind::Busy,
        format!(
            "{} {} is in use by another {}{who}{}",
            spec.kind.noun(),
            path.display(),
            spec.kind.daemon(),
            spec.busy_hint
        ),
    )
}

fn try_lock(f: File) -> Result<nix::fcntl::Flock<File>, (File, nix::errno::Errno)> {
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
}

/// [`inspect`], and also refuse a directory whose lock is held, still
/// without creating or changing anything (the lock is tried and let go).
/// For checking before binding listeners; [`claim`] decides for good.
pub fn probe(path: &Path, spec: &DirSpec) -> Result<Found, DirError> {
    let found = inspect(path, spec)?;
    let lock_path = path.join(spec.kind.lock_file());
    if let Ok(f) = OpenOptions::new().read(true).open(&lock_path) {
        match try_lock(f) {
            Ok(l) => drop(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(busy(path, spec, &lock_path)),
            Err((_, e)) => return Err(io_err("lock", &lock_path, &io::Error::from(e))),
        }
    }
    Ok(found)
}

/// What a claim created, so that a failed start can remove exactly that.
#[derive(Clone, Debug, Default)]
struct Created {
    /// The topmost folder this claim created (the directory or an ancestor).
    top_dir: Option<PathBuf>,
    /// The directory existed but was empty: everything in it is this start's.
    was_empty: bool,
    lock: bool,
    marker: bool,
}

/// A claimed directory: marked, locked while this lives.
#[derive(Debug)]
pub struct OwnedDir {
    path: PathBuf,
    kind: DirKind,
    created: Created,
    adopted: bool,
    _lock: nix::fcntl::Flock<File>,
}

/// Claim `path` for `spec.kind`: create it if missing (0700), take its lock,
/// check what is in it (under the lock), and write the marker if it has
/// none. A refusal leaves everything as it was.
pub fn claim(path: &Path, spec: &DirSpec) -> Result<OwnedDir, DirError> {
    // Refuse before touching anything.
    let before = probe(path, spec)?;
    let mut created = Created::default();
    if before == Found::Missing {
        let mut top = path.to_path_buf();
        while let Some(parent) = top.parent() {
            if parent.as_os_str().is_empty() || parent.exists() {
                break;
            }
            top = parent.to_path_buf();
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| io_err("create", path, &e))?;
        created.top_dir = Some(top);
    }
    created.was_empty = before == Found::Empty;
    let undo = |created: &Created| rollback(path, spec.kind, created);
    let lock_path = path.join(spec.kind.lock_file());
    let (file, new_lock) = match OpenOptions::new().read(true).write(true).open(&lock_path) {
        Ok(f) => (f, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&lock_path)
            {
                Ok(f) => (f, true),
                Err(e) => {
                    undo(&created);
                    return Err(io_err("create", &lock_path, &e));
                }
            }
        }
        Err(e) => {
            undo(&created);
            return Err(io_err("open", &lock_path, &e));
        }
    };
    created.lock = new_lock;
    let mut lock = match try_lock(file) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            undo(&created);
            return Err(busy(path, spec, &lock_path));
        }
        Err((_, e)) => {
            undo(&created);
            return Err(io_err("lock", &lock_path, &io::Error::from(e)));
        }
    };
    // Under the lock: the look before may have raced another start.
    let found = match inspect_with(path, spec, created.lock) {
        Ok(f) => f,
        Err(e) => {
            undo(&created);
            return Err(e);
        }
    };
    let pid = format!("pid {}\n", std::process::id());
    let recorded = lock
        .set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| lock.write_all(pid.as_bytes()));
    if let Err(e) = recorded {
        undo(&created);
        return Err(io_err("write", &lock_path, &e));
    }
    let mut adopted = false;
    if found != Found::Marked {
        adopted = found == Found::Adoptable;
        let marker = path.join(MARKER_FILE);
        if let Err(e) = crashsafe::write_atomic(&marker, marker_text(spec.kind).as_bytes()) {
            undo(&created);
            return Err(io_err("write", &marker, &e));
        }
        created.marker = true;
    }
    Ok(OwnedDir {
        path: path.to_path_buf(),
        kind: spec.kind,
        created,
        adopted,
        _lock: lock,
    })
}

fn rollback(path: &Path, kind: DirKind, c: &Created) {
    if let Some(top) = &c.top_dir {
        let _ = fs::remove_dir_all(top);
        return;
    }
    if c.was_empty {
        if let Ok(rd) = fs::read_dir(path) {
            for e in rd.flatten().filter(|e| e.file_name() != LOST_FOUND) {
                let p = e.path();
                let _ = match e.file_type() {
                    Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
                    _ => fs::remove_file(&p),
                };
            }
        }
        return;
    }
    if c.marker {
        let _ = crashsafe::remove_durable(&path.join(MARKER_FILE));
    }
    if c.lock {
        let _ = fs::remove_file(path.join(kind.lock_file()));
    }
}

impl OwnedDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this claim adopted an unmarked directory of an earlier version.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether this claim created the directory (or found it empty).
    pub fn is_new(&self) -> bool {
        self.created.top_dir.is_some() || self.created.was_empty
    }

    /// A start that failed after the claim: remove what this claim created
    /// (the directory, if it made it, with everything the start put there
    /// since; the marker and lock file it added to an existing one) and let
    /// the lock go.
    pub fn abandon(self) {
        rollback(&self.path, self.kind, &self.created);
    }

    /// Make `name` in this directory free for a unix socket to be bound: a
    /// socket left there by an earlier run (nothing answers: this daemon
    /// holds the directory's lock) is removed. Anything else at that path,
    /// or a socket something still answers on, is refused and left alone.
    pub fn free_socket_path(&self, name: &str) -> Result<PathBuf, DirError> {
        let p = self.path.join(name);
        match fs::symlink_metadata(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(p),
            Err(e) => Err(io_err("look at", &p, &e)),
            Ok(m) if !m.file_type().is_socket() => Err(err(
                DirErrorKind::Foreign,
                format!("{} exists and is not a socket; left alone", p.display()),
            )),
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(&p).is_ok() {
                    return Err(err(
                        DirErrorKind::Busy,
                        format!("{} is answered by another process; left alone", p.display()),
                    ));
                }
                fs::remove_file(&p).map_err(|e| io_err("remove the stale socket", &p, &e))?;
                Ok(p)
            }
        }
    }
}

/// One line for an error and its causes, each said once: a cause whose
/// text the message already holds (a library error that prints its
/// source, with that source also in the chain) is not repeated.
pub fn report<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut out = String::new();
    for e in chain {
        let m = e.to_string();
        if m.is_empty() || out.contains(&m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: DirSpec = DirSpec {
        kind: DirKind::AgentState,
        own_names: &["disk.json", "journal", "control.sock"],
        any_subdir: false,
        adopt_if_any: &["disk.json", "lock"],
        busy_hint: "",
    };
    const TARGET: DirSpec = DirSpec {
        kind: DirKind::TargetData,
        own_names: &["catalog.db", "control.sock"],
        any_subdir: true,
        adopt_if_any: &["target.lock"],
        busy_hint: " (or a recovery tool has it open)",
    };

    #[test]
    fn new_dir_is_created_marked_locked_and_abandoned_without_trace() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/state");
        let o = claim(&p, &AGENT).unwrap();
        assert!(o.is_new() && !o.adopted());
        assert_eq!(
            fs::read_to_string(p.join(MARKER_FILE)).unwrap(),
            "tidemark-dir 1\nkind agent-state\n"
        );
        let e = claim(&p, &AGENT).unwrap_err();
        assert_eq!(e.kind, DirErrorKind::Busy);
        assert!(
            e.message.contains("is in use by another tidemark-agent (process "),
            "{e}"
        );
        fs::write(p.join("disk.json"), "{}").unwrap();
        o.abandon();
        assert!(!d.path().join("a").exists(), "the created ancestors go too");
    }

    #[test]
    fn other_kinds_and_foreign_files_are_refused_untouched() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("st");
        drop(claim(&p, &AGENT).unwrap());
        fs::write(p.join("control.sock"), "not really").unwrap();
        let e = claim(&p, &TARGET).unwrap_err();
        assert_eq!(e.kind, DirErrorKind::OtherKind);
        assert_eq!(
            e.message,
            format!(
                "{} is a tidemark-agent state directory, not a tidemark-target data directory",
                p.display()
            )
        );
        assert!(!p.join("target.lock").exists());
        assert!(p.join("control.sock").exists());

        let home = d.path().join("home");
        fs::create_dir(&home).unwrap();
        fs::write(home.join("notes.txt"), "x").unwrap();
        let e = claim(&home, &TARGET).unwrap_err();
        assert_eq!(e.kind, DirErrorKind::Foreign);
        assert!(e.message.contains("it holds notes.txt"), "{e}");
        assert_eq!(fs::read_dir(&home).unwrap().count(), 1);

        // An unmarked agent directory seen by the target: named.
        let old = d.path().join("old");
        fs::create_dir_all(old.join("journal")).unwrap();
        fs::write(old.join("disk.json"), "{}").unwrap();
        let e = claim(&old, &TARGET).unwrap_err();
        assert!(e.message.contains("looks like a tidemark-agent state directory"), "{e}");

        // A marker from the future.
        fs::write(old.join(MARKER_FILE), "tidemark-dir 9\nkind agent-state\n").unwrap();
        let e = claim(&old, &AGENT).unwrap_err();
        assert_eq!(e.kind, DirErrorKind::Unsupported);
    }

    #[test]
    fn old_unmarked_directories_are_adopted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        fs::create_dir_all(p.join("disk1")).unwrap();
        fs::write(p.join("catalog.db"), "").unwrap();
        // Own-looking files but not the target's lock: not adopted.
        let e = claim(&p, &TARGET).unwrap_err();
        assert!(e.message.contains("target.lock missing"), "{e}");
        fs::write(p.join("target.lock"), "").unwrap();
        let o = claim(&p, &TARGET).unwrap();
        assert!(o.adopted() && !o.is_new());
        assert!(p.join(MARKER_FILE).exists());
        // A failed start after adopting takes only the marker back.
        o.abandon();
        assert!(!p.join(MARKER_FILE).exists());
        assert!(p.join("catalog.db").exists() && p.join("target.lock").exists());
    }

    #[test]
    fn stale_sockets_only() {
        let d = tempfile::tempdir().unwrap();
        let o = claim(d.path(), &AGENT).unwrap();
        let live = std::os::unix::net::UnixListener::bind(d.path().join("control.sock")).unwrap();
        assert!(o.free_socket_path("control.sock").is_err());
        drop(live);
        let p = o.free_socket_path("control.sock").unwrap();
        assert!(!p.exists());
        fs::write(&p, "file").unwrap();
        assert!(o.free_socket_path("control.sock").is_err());
        assert!(p.exists());
    }

    #[test]
    fn report_says_each_cause_once() {
        let io = io::Error::from(io::ErrorKind::AddrInUse);
        #[derive(Debug, thiserror::Error)]
        #[error("cannot listen on tcp:1: {source}")]
        struct Bind {
            source: io::Error,
        }
        let b = Bind { source: io };
        let chain: Vec<&(dyn std::error::Error + 'static)> = vec![&b, std::error::Error::source(&b).unwrap()];
        let r = report(chain);
        assert_eq!(r.matches("address in use").count(), 1, "{r}");
    }
}
