//! `tidemark tag`: insert a consistency tag through the agent's control
//! socket, optionally with the filesystem frozen around it.
//!
//! With `--freeze`, the order is FIFREEZE → tag → FITHAW, and nothing may
//! stay frozen: a guard thaws on every way out of this function, a
//! watchdog thread thaws at the deadline even if the agent never answers,
//! and SIGINT/SIGTERM/SIGHUP are taken by the watchdog (through a
//! signalfd) so that they thaw before the process exits. Only SIGKILL can
//! leave a filesystem frozen (`fsfreeze -u MOUNTPOINT` thaws it by hand).
//! The agent gets the deadline too and refuses to journal the tag once it
//! has passed, so a tag that claims application consistency was journaled
//! while the filesystem was frozen.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tidemark_util::human::format_duration;

#[derive(Args)]
pub struct TagArgs {
    /// The agent's state directory (its control socket is there).
    #[arg(long, value_name = "STATE_DIR")]
    agent: PathBuf,
    /// The tag name: 1–255 bytes of UTF-8, unique on the disk.
    name: String,
    /// Freeze the filesystem mounted here around the tag (FIFREEZE/FITHAW),
    /// making the point application-consistent.
    #[arg(long, value_name = "MOUNTPOINT")]
    freeze: Option<PathBuf>,
    /// How long the agent may take; with --freeze, the longest the
    /// filesystem stays frozen (`10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tidemark_util::human::parse_duration(s).map_err(|e| e.to_string())
}

/// Time left for the agent to journal the tag once frozen: the watchdog
/// thaws at the deadline, the agent refuses this much earlier.
const AGENT_MARGIN: Duration = Duration::from_millis(500);

/// How long to wait, after no answer in time, for the agent to say what
/// became of the request (it serialises tag requests, so this waits for
/// the first one to finish).
const SETTLE_WAIT: Duration = Duration::from_secs(5);

pub fn tag(a: TagArgs) -> Result<()> {
    // Every tag must be reachable by `--at NAME` (and `tag:NAME`).
    if let Some(why) = tidemark_recovery::tag_name_problem(&a.name) {
        bail!("{why}");
    }
    let Some(mnt) = &a.freeze else {
        let deadline_ns = unix_ns(SystemTime::now() + a.timeout);
        let t = ask(&a.agent, &a.name, false, deadline_ns, a.timeout)?;
        t.note(&a.name);
        outln!("{}", t.seq);
        return Ok(());
    };
    if a.timeout <= AGENT_MARGIN * 2 {
        bail!(
            "--timeout must be more than {} with --freeze",
            format_duration(AGENT_MARGIN * 2)
        );
    }
    let mnt = check_mountpoint(mnt)?;
    let dir = File::open(&mnt).with_context(|| format!("open {}", mnt.display()))?;

    // Signals go to the watchdog from here on (the mask is inherited by the
    // thread it spawns), so an interrupt cannot skip the thaw.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block().context("block signals for the freeze")?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("signalfd for the freeze")?;

    let frozen = Arc::new(Frozen::freeze(dir, &mnt)?);
    let started = Instant::now();
    let deadline = started + a.timeout;
    let deadline_ns = unix_ns(SystemTime::now() + a.timeout - AGENT_MARGIN);
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (frozen, done) = (frozen.clone(), done.clone());
        std::thread::spawn(move || watchdog(&frozen, &done, deadline, &sigfd))
    };
    let r = ask(&a.agent, &a.name, true, deadline_ns, a.timeout - AGENT_MARGIN);
    let thawed = frozen.thaw();
    done.store(true, Ordering::Relaxed);
    let fired = watchdog.join().unwrap_or(None);
    let _ = mask.thread_unblock();
    let held = started.elapsed();
    thawed?;
    // The agent journals a tag only before its deadline, which is before
    // the watchdog thaws: a seq it gives is a point taken while frozen,
    // even if the answer came after the thaw.
    let t = r.map_err(|e| {
        anyhow::anyhow!(
            "{e:#} ({} was frozen for {}{} and is thawed)",
            mnt.display(),
            secs(held),
            if fired.is_some() { ", up to --timeout," } else { "" }
        )
    })?;
    if t.existing {
        t.note(&a.name);
    } else {
        eprintln!(
            "froze {}, tagged {} at seq {} (application-consistent), thawed after {}",
            mnt.display(),
            a.name,
            t.seq,
            secs(held)
        );
    }
    outln!("{}", t.seq);
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A tag the agent holds.
struct Tagged {
    seq: u64,
    /// It was there already (a retry, or the answer to a request that
    /// timed out came through the settle request).
    existing: bool,
}

impl Tagged {
    fn note(&self, name: &str) {
        if self.existing {
            eprintln!(
                "tag {name} is in the journal at seq {} (inserted by an earlier request; not inserted again)",
                self.seq
            );
        }
    }
}

/// Ask the agent for a tag (journaled only before `deadline_ns`, Unix
/// time); its seq. If the agent does not answer within `timeout`, ask what
/// became of the request, so that a tag it did insert is never reported
/// as timed out.
fn ask(agent: &Path, name: &str, app: bool, deadline_ns: u64, timeout: Duration) -> Result<Tagged> {
    let req = serde_json::json!({"cmd": "tag", "name": name, "app_consistent": app, "deadline_ns": deadline_ns});
    match request_with_timeout(agent, &req, timeout)? {
        Answer::Reply(v) => answer(&v, app),
        Answer::NoAnswer => {
            // The deadline has passed: this request journals nothing, and
            // waits (the agent serialises tag requests) for the first.
            let settle = serde_json::json!({"cmd": "tag", "name": name, "app_consistent": app, "deadline_ns": 1});
            match request_with_timeout(agent, &settle, SETTLE_WAIT) {
                Ok(Answer::Reply(v)) if v["existing"]["seq"].is_u64() => {
                    eprintln!("the agent answered late ({} allowed)", format_duration(timeout));
                    answer(&v, app)
                }
                Ok(Answer::Reply(_)) => bail!(
                    "timed out: the agent did not insert the tag within {}; nothing was journaled",
                    format_duration(timeout)
                ),
                Ok(Answer::NoAnswer) | Err(_) => bail!(
                    "timed out: no answer from the agent within {}; the tag is in the journal only if the agent \
                     got to it in that time: run the same command again, it prints the tag's seq if so",
                    format_duration(timeout)
                ),
            }
        }
    }
}

/// The agent's reply to a tag request, as a tag it holds or an error.
fn answer(v: &serde_json::Value, app: bool) -> Result<Tagged> {
    if v["ok"] == serde_json::Value::Bool(true) {
        let seq = v["seq"].as_u64().context("the agent's reply carries no seq")?;
        return Ok(Tagged { seq, existing: false });
    }
    let e = &v["existing"];
    if let Some(seq) = e["seq"].as_u64() {
        if app && e["app_consistent"] != serde_json::Value::Bool(true) {
            bail!("the name is taken by a crash-consistent tag at seq {seq} (not application-consistent): choose another name");
        }
        return Ok(Tagged { seq, existing: true });
    }
    bail!("agent refused: {}", v["error"].as_str().unwrap_or("(no reason given)"))
}

/// What came back on the control socket.
enum Answer {
    Reply(serde_json::Value),
    /// Nothing within the timeout.
    NoAnswer,
}

/// One request on the agent's control socket, answered within `timeout`.
fn request_with_timeout(state: &Path, req: &serde_json::Value, timeout: Duration) -> Result<Answer> {
    use std::io::{BufRead, BufReader, Write};
    let path = state.join("control.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to {} (is the agent running?)", path.display()))?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    s.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    writeln!(s, "{req}").context("send the request to the agent")?;
    let mut line = String::new();
    if let Err(e) = BufReader::new(&s).read_line(&mut line) {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            return Ok(Answer::NoAnswer);
        }
        return Err(anyhow::Error::new(e).context("read the agent's answer"));
    }
    if line.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    let v: serde_json::Value = serde_json::from_str(&line).context("the agent's answer is not JSON")?;
    Ok(Answer::Reply(v))
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Thaw at the deadline or on a signal; returns why it thawed, if it did.
fn watchdog(frozen: &Frozen, done: &AtomicBool, deadline: Instant, sigfd: &SignalFd) -> Option<String> {
    loop {
        if done.load(Ordering::Relaxed) {
            return None;
        }
        if let Ok(Some(sig)) = sigfd.read_signal() {
            let _ = frozen.thaw();
            let name = Signal::try_from(i32::try_from(sig.ssi_signo).unwrap_or(0))
                .map(|s| s.as_str())
                .unwrap_or("a signal");
            eprintln!("tidemark: {name} while frozen: thawed {}", frozen.path.display());
            // Exit as the signal would have, now that nothing is frozen.
            std::process::exit(128 + i32::try_from(sig.ssi_signo).unwrap_or(0));
        }
        if Instant::now() >= deadline {
            let _ = frozen.thaw();
            return Some("timed out waiting for the agent".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A frozen filesystem; thawed once, by whoever comes first (the tag
/// path, the watchdog, or Drop).
struct Frozen {
    dir: File,
    path: PathBuf,
    thawed: Mutex<bool>,
}

impl Frozen {
    fn freeze(dir: File, path: &Path) -> Result<Frozen> {
        if let Err(e) = ioctl::freeze(dir.as_fd()) {
            let why = match e {
                nix::Error::EPERM => "permission denied (needs CAP_SYS_ADMIN)",
                nix::Error::EOPNOTSUPP => "this filesystem cannot be frozen",
                nix::Error::EBUSY => "it is already frozen",
                nix::Error::EINVAL => "not a filesystem that can be frozen here",
                _ => "",
            };
            bail!(
                "cannot freeze {}: {}{}{e}",
                path.display(),
                why,
                if why.is_empty() { "" } else { ": " }
            );
        }
        Ok(Frozen {
            dir,
            path: path.to_path_buf(),
            thawed: Mutex::new(false),
        })
    }

    fn thaw(&self) -> Result<()> {
        let mut t = self.thawed.lock().unwrap_or_else(|p| p.into_inner());
        if *t {
            return Ok(());
        }
        // EINVAL: someone else (fsfreeze -u) thawed it already.
        match ioctl::thaw(self.dir.as_fd()) {
            Ok(()) | Err(nix::Error::EINVAL) => {
                *t = true;
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!(
                "cannot thaw {}: {e} (run `fsfreeze -u {}`)",
                self.path.display(),
                self.path.display()
            )),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            eprintln!("tidemark: {e:#}");
        }
    }
}

/// `path` canonicalized, if a filesystem is mounted exactly there. FIFREEZE
/// on any other directory would freeze the filesystem that holds it —
/// perhaps the root filesystem — so that is refused.
fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    let p = path
        .canonicalize()
        .with_context(|| format!("cannot freeze {}", path.display()))?;
    if !p.is_dir() {
        bail!("cannot freeze {}: not a directory", p.display());
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    // Field 5 is the mount point, with space, tab, newline and backslash
    // escaped as octal.
    let mut holder = PathBuf::from("/");
    for line in info.lines() {
        let Some(m) = line.split(' ').nth(4) else { continue };
        let m = PathBuf::from(unescape(m));
        if m == p {
            return Ok(p);
        }
        if p.starts_with(&m) && m.components().count() > holder.components().count() {
            holder = m;
        }
    }
    bail!(
        "cannot freeze {}: not a mountpoint (it is inside the filesystem mounted at {}, which is not frozen)",
        p.display(),
        holder.display()
    )
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

mod ioctl {
    //! FIFREEZE / FITHAW: the only unsafe code of the tools.
    #![allow(unsafe_code)]

    use std::os::fd::{AsRawFd, BorrowedFd};

    // include/uapi/linux/fs.h: FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int).
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

    pub fn freeze(fd: BorrowedFd<'_>) -> nix::Result<()> {
        let mut arg: libc::c_int = 0;
        // SAFETY: `fd` is an open descriptor for the borrow's lifetime and
        // `arg` is a valid c_int for the call; the kernel ignores it.
        unsafe { fifreeze(fd.as_raw_fd(), &mut arg) }.map(|_| ())
    }

    pub fn thaw(fd: BorrowedFd<'_>) -> nix::Result<()> {
        let mut arg: libc::c_int = 0;
        // SAFETY: as in `freeze`.
        unsafe { fithaw(fd.as_raw_fd(), &mut arg) }.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn refuses_a_directory_that_is_not_a_mountpoint() {
        let d = tempfile::tempdir().unwrap();
        let e = check_mountpoint(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a mountpoint"), "{e}");
        assert!(check_mountpoint(Path::new("/")).is_ok());
        let e = check_mountpoint(&d.path().join("missing")).unwrap_err();
        assert!(format!("{e:#}").contains("No such file"), "{e:#}");
    }
}
