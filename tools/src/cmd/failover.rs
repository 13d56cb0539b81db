//! `tidemark failover`: materialize a recovery point as a disk image,
//! then record the failover at the target (which stops applying to the
//! disk). Run it again with another `--at` to pick another point.
//!
//! Nothing here destroys by accident: the output is checked before a byte
//! is read (not a directory, its folder writable, not an existing file
//! unless `--force`); the image is written under a temporary name and
//! renamed into place once complete and durable, so `FILE` is never half a
//! disk; a failure or a signal removes the partial file, and the target
//! goes on applying (the failover is recorded only after the export).
//!
//! For `--at latest` the target first drains: a barrier that ends when the
//! replica has applied everything the collector holds for the disk and, if
//! the agent is connected, everything it has journaled (`--no-drain` when
//! the primary site is gone). A running target then stops applying, so the
//! point is the replica's final state.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tidemark_formats::replica::{self, ExportFormat};
use tidemark_recovery::{self as r, AtSpec};
use tidemark_util::human::{format_duration, format_size};

use tidemark_recovery::overlay::{FileImage, Image};

use super::points::format_time;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutFormat {
    /// A sparse raw image.
    Raw,
    /// VMDK monolithicFlat: FILE (descriptor) + FILE's -flat extent.
    VmdkFlat,
    /// VMDK monolithicSparse (hosted sparse extent).
    VmdkSparse,
    /// VMDK streamOptimized (compressed grains), export only.
    VmdkStream,
}

impl OutFormat {
    fn name(self) -> &'static str {
        match self {
            OutFormat::Raw => "raw",
            OutFormat::VmdkFlat => "vmdk-flat",
            OutFormat::VmdkSparse => "vmdk-sparse",
            OutFormat::VmdkStream => "vmdk-stream",
        }
    }
}

#[derive(Args)]
pub struct FailoverArgs {
    /// The target's data directory.
    #[arg(long, value_name = "DIR", required_unless_present = "image")]
    data: Option<PathBuf>,
    /// The disk id.
    #[arg(required_unless_present = "image")]
    disk: Option<tidemark_wire::DiskId>,
    /// Which point: latest, latest-flush, latest-app, seq:N, tag:NAME (or
    /// a bare tag name), a time (RFC 3339, or local: 2026-11-28 10:00), or
    /// a relative time (10m ago).
    #[arg(long, value_name = "SPEC", required_unless_present = "image")]
    at: Option<String>,
    /// Export a raw image file instead of a recovery point (tests); no
    /// failover is recorded.
    #[arg(long, hide = true, value_name = "FILE", conflicts_with_all = ["data", "disk", "at"])]
    image: Option<PathBuf>,
    /// The disk image to write.
    #[arg(long, value_name = "FILE", required_unless_present = "in_place")]
    output: Option<PathBuf>,
    /// Fail over onto the replica's own file, without a copy: for a disk
    /// `tidemark reprotect` adopted (the old source's disk, which becomes
    /// the disk again). Only `--at latest`.
    #[arg(long, conflicts_with_all = ["output", "image", "force"])]
    in_place: bool,
    /// Its format.
    #[arg(long, value_enum, default_value_t = OutFormat::Raw)]
    format: OutFormat,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// Do not wait for what the collector and the agent still hold before
    /// `--at latest` (the primary site is gone).
    #[arg(long)]
    no_drain: bool,
    /// A planned failover (the failback): first quiesce the source through
    /// its collector's API (`--api`): its agent refuses every write from
    /// then on and journals a final tag; drain to that tag and fail over
    /// at exactly it. Only `--at latest`.
    #[arg(long, requires = "api", conflicts_with_all = ["no_drain", "image"])]
    planned: bool,
    /// The status API of the collector the source's agent ships to
    /// (`--planned`).
    #[arg(long, value_name = "URL", requires = "planned")]
    api: Option<String>,
    /// The collector's token file, for its API (`--planned`).
    #[arg(long, value_name = "FILE", requires = "planned")]
    token_file: Option<PathBuf>,
    /// The longest the drain may take.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Also make DIR a ready agent state directory for FILE (raw only):
    /// the same disk id, a new data generation forked from the replica's
    /// at the point, tracking from the first write. Protect FILE in
    /// reverse with `tidemark-agent protect --disk FILE --state DIR …`.
    #[arg(long, value_name = "DIR")]
    protect_state: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tidemark_util::human::parse_duration(s).map_err(|e| e.to_string())
}

/// Check every file the export will create before anything is read:
/// its folder exists and takes a new file, it is not a directory, and it
/// does not exist unless `force`.
fn check_outputs(files: &[PathBuf], force: bool) -> Result<()> {
    for f in files {
        let dir = f
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            bail!("--output {}: the folder {} does not exist", f.display(), dir.display());
        }
        match std::fs::symlink_metadata(f) {
            Ok(m) if m.is_dir() => bail!("--output {} is a directory; name a file", f.display()),
            Ok(_) if !force => bail!(
                "--output {} exists; use --force to replace it (or name another file)",
                f.display()
            ),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => bail!("--output {}: {e}", f.display()),
        }
        let part = replica::part_path(f)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .with_context(|| format!("--output {}: cannot create a file in {}", f.display(), dir.display()))?;
        let _ = std::fs::remove_file(&part);
    }
    Ok(())
}

/// Removes the partial files of an export unless it completed, also when
/// the process is ended by a signal.
struct PartGuard {
    parts: Arc<Mutex<Vec<PathBuf>>>,
}

impl PartGuard {
    fn new(files: &[PathBuf]) -> Result<Self> {
        let parts: Vec<PathBuf> = files.iter().map(|f| replica::part_path(f)).collect::<Result<_, _>>()?;
        let parts = Arc::new(Mutex::new(parts));
        let on_signal = parts.clone();
        std::thread::Builder::new()
            .name("failover-signals".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                rt.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::hangup()),
                    ) else {
                        return;
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                        _ = hup.recv() => {}
                    }
                    let parts = on_signal.lock().unwrap_or_else(|e| e.into_inner());
                    if parts.is_empty() {
                        // The export is complete and the failover recorded.
                        std::process::exit(130);
                    }
                    for p in parts.iter() {
                        let _ = std::fs::remove_file(p);
                    }
                    eprintln!("\nfailover interrupted: the partial output is removed, nothing was recorded, the target applies to the disk again");
                    std::process::exit(130);
                });
            })
            .context("start the signal watcher")?;
        Ok(Self { parts })
    }

    fn done(&self) {
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        for p in self.parts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn failover(a: FailoverArgs) -> Result<()> {
    if a.in_place {
        return in_place(&a);
    }
    let Some(output) = &a.output else {
        bail!("name the image to write: --output FILE (or --in-place)");
    };
    let files = replica::export_outputs(output, a.format.export_format())?;
    if let Some(img) = &a.image {
        check_outputs(&files, a.force)?;
        let image = FileImage::open(img)?;
        let guard = PartGuard::new(&files)?;
        let started = Instant::now();
        write_image(&image, output, a.format)?;
        guard.done();
        outln!(
            "exported {} to {} ({}, {}) in {}",
            img.display(),
            output.display(),
            a.format.name(),
            format_size(Image::size(&image)),
            format_duration(started.elapsed())
        );
        return Ok(());
    }
    let (Some(data), Some(disk), Some(at)) = (&a.data, &a.disk, &a.at) else {
        bail!("name the point: --data DIR DISK --at SPEC");
    };
    let spec = AtSpec::parse(at)?;
    check_outputs(&files, a.force)?;
    if let Some(dir) = &a.protect_state {
        check_protect_state(dir, a.format)?;
    }
    let state = r::disk_state(data, disk)?;
    let quiesced = quiesce_source(&a, disk, &spec)?;
    if let Some(f) = state.failovers.last() {
        eprintln!(
            "note: {disk} was already failed over on {} at {} to {}; failing over again",
            format_time(f.at_ns),
            f.point.describe(),
            f.output
        );
    }
    if spec == AtSpec::Latest && !a.no_drain && !state.failovers.is_empty() {
        eprintln!("no drain: nothing has been applied to {disk} since its failover");
    } else if spec == AtSpec::Latest && !a.no_drain {
        eprintln!("draining: waiting until the replica holds everything the collector and the agent hold for {disk} (--no-drain skips this)…");
        let d = r::drain(data, disk, a.drain_timeout)
            .with_context(|| format!("drain {disk} (if the primary site is gone, use --no-drain)"))?;
        eprintln!(
            "drained: the {} held up to seq {}; the replica has applied seq {}",
            if d.agent_answered {
                "agent"
            } else {
                "collector (the agent is not connected, so its journal was not asked)"
            },
            d.held_seq,
            d.applied_seq
        );
    }
    let view = r::View::open_for_failover(data, disk, &spec)?;
    let point = view.point().clone();
    check_at_final_tag(point.seq, quiesced)?;
    eprintln!("opened point {}", point.describe());
    let guard = PartGuard::new(&files)?;
    let started = Instant::now();
    let image = ViewImage(&view);
    write_image(&image, output, a.format)?;
    view.record_failover(output).with_context(|| {
        format!(
            "{} is written, but the failover was not recorded (the target goes on applying to {disk})",
            output.display()
        )
    })?;
    guard.done();
    outln!(
        "failed over {disk} at {} to {} ({}, {}) in {}",
        point.describe(),
        output.display(),
        a.format.name(),
        format_size(view.size()),
        format_duration(started.elapsed())
    );
    if let Some(dir) = &a.protect_state {
        protect_state(data, disk, &state, point.seq, view.size(), output, dir).with_context(|| {
            format!(
                "the failover is recorded and {} written, but the state directory {} was not prepared",
                output.display(),
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// `--planned`: quiesce the source through its collector's API; returns
/// the final tag's seq, to drain to and fail over at.
fn quiesce_source(a: &FailoverArgs, disk: &str, spec: &AtSpec) -> Result<Option<u64>> {
    if !a.planned {
        return Ok(None);
    }
    if *spec != AtSpec::Latest {
        bail!("--planned fails over at --at latest: the source's final tag");
    }
    let (Some(api), Some(token_file)) = (&a.api, &a.token_file) else {
        bail!("--planned needs --api URL and --token-file FILE (the collector's token)");
    };
    let token = {
        tidemark_net::tls::private_file(token_file).map_err(anyhow::Error::msg)?;
        std::fs::read_to_string(token_file).with_context(|| format!("--token-file {}", token_file.display()))?
    };
    eprintln!("quiescing {disk} at its source through {api}: its agent refuses writes from now on…");
    let v = super::status::call_with(
        api,
        "POST",
        &format!("/api/v1/disks/{disk}/quiesce"),
        Some(token.trim()),
    )
    .with_context(|| format!("quiesce {disk} (nothing was failed over; the source still takes writes)"))?;
    let seq = v["seq"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("the quiesce answer carries no seq: {v}"))?;
    eprintln!("quiesced: the source's final tag is seq {seq} (if this failback does not go ahead: tidemark resume --agent STATE_DIR {disk} on the source)");
    Ok(Some(seq))
}

/// The point opened is the quiesce's final tag, or nothing is recorded.
fn check_at_final_tag(point_seq: u64, quiesced: Option<u64>) -> Result<()> {
    match quiesced {
        Some(t) if point_seq != t => bail!(
            "the replica's newest point is seq {point_seq}, not the source's final tag (seq {t}): nothing was failed over"
        ),
        _ => Ok(()),
    }
}

/// `--in-place`: the replica is the old source's own disk (`tidemark
/// reprotect` linked it into the data directory); after the drain it is the
/// disk again, at `latest`, without a copy. The failover is recorded with
/// the disk's path as its output, and the link is moved aside: the
/// replica's points read that file with its undo, and the file now changes
/// under a new owner, so no view may open them any more.
fn in_place(a: &FailoverArgs) -> Result<()> {
    let (Some(data), Some(disk), Some(at)) = (&a.data, &a.disk, &a.at) else {
        bail!("name the disk: --data DIR DISK --at latest --in-place");
    };
    if AtSpec::parse(at)? != AtSpec::Latest {
        bail!("--in-place fails over at --at latest only: the replica's file is the disk at its newest state");
    }
    let link = tidemark_catalog::layout::disk_dir(data, disk).join("replica.raw");
    let target = std::fs::read_link(&link).map_err(|_| {
        anyhow::anyhow!(
            "--in-place: {} is not a disk adopted by tidemark reprotect (no link to the old source's disk); use --output",
            link.display()
        )
    })?;
    if let Some(dir) = &a.protect_state {
        check_protect_state(dir, OutFormat::Raw)?;
    }
    let state = r::disk_state(data, disk)?;
    if !state.failovers.is_empty() {
        bail!("{disk} was failed over already: its replica no longer follows a source");
    }
    let quiesced = quiesce_source(a, disk, &AtSpec::Latest)?;
    if !a.no_drain {
        eprintln!("draining: waiting until the replica holds everything the collector and the agent hold for {disk} (--no-drain skips this)…");
        let d = r::drain(data, disk, a.drain_timeout)
            .with_context(|| format!("drain {disk} (if the other site is gone, use --no-drain)"))?;
        eprintln!("drained: the replica has applied seq {}", d.applied_seq);
    }
    let view = r::View::open_for_failover(data, disk, &AtSpec::Latest)?;
    let point = view.point().clone();
    check_at_final_tag(point.seq, quiesced)?;
    view.record_failover(&target)
        .with_context(|| format!("the failover of {disk} was not recorded"))?;
    let size = view.size();
    drop(view);
    let aside = link.with_file_name(format!("replica.raw.handed-back-{}", point.seq));
    std::fs::rename(&link, &aside).with_context(|| format!("move {} aside", link.display()))?;
    outln!(
        "failed over {disk} in place at {}: {} is the disk again ({}); the replica's link is kept as {}",
        point.describe(),
        target.display(),
        format_size(size),
        aside.display()
    );
    if let Some(dir) = &a.protect_state {
        protect_state(data, disk, &state, point.seq, size, &target, dir).with_context(|| {
            format!(
                "the failover is recorded, but the state directory {} was not prepared",
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// Before anything is read: `--protect-state` needs a raw output (an agent
/// serves a raw file or block device; a VMDK's container bytes are not the
/// disk) and a directory that is not an agent's state yet.
fn check_protect_state(dir: &Path, format: OutFormat) -> Result<()> {
    if format != OutFormat::Raw {
        bail!(
            "--protect-state needs --format raw: an agent protects a raw file or block device, and a {} \
             image is a container, not the disk's bytes",
            format.name()
        );
    }
    if dir.join("disk.json").exists() {
        bail!(
            "--protect-state {} already holds an agent state directory; name a new one",
            dir.display()
        );
    }
    tidemark_agent::state::probe(dir).with_context(|| format!("--protect-state {}", dir.display()))
}

/// Write the state directory for the failed-over copy: the replica's
/// generation history forked at `seq`; say how to protect it.
fn protect_state(
    data: &Path,
    disk: &tidemark_wire::DiskId,
    state: &tidemark_catalog::DiskState,
    seq: u64,
    size: u64,
    output: &Path,
    dir: &Path,
) -> Result<()> {
    use tidemark_formats::generation::{GenerationId, History};
    let conn = tidemark_catalog::open_read_only(data)?;
    let now = tidemark_util::now_ns();
    let id = GenerationId(*uuid::Uuid::new_v4().as_bytes());
    let history = match tidemark_catalog::read_history(&conn, disk)? {
        Some(h) => h.fork(id, seq, now)?,
        // A replica that never learnt its generation: the copy starts a
        // line of its own (the way back then compares hashes).
        None => History::root(id, now)?,
    };
    let uuid = *uuid::Uuid::parse_str(&state.disk_uuid)
        .with_context(|| format!("the catalog's uuid {:?} for {disk}", state.disk_uuid))?
        .as_bytes();
    let disk_path = std::fs::canonicalize(output).with_context(|| format!("resolve {}", output.display()))?;
    tidemark_agent::state::prepare_forked(
        dir,
        &tidemark_agent::state::Forked {
            disk_id: disk.to_string(),
            disk_uuid: uuid,
            disk_size: size,
            disk_path,
            history,
            next_seq: seq + 1,
        },
    )?;
    outln!(
        "prepared {} for {}: generation {id}, forked at seq {seq}; protect it with\n  tidemark-agent protect --disk {} --state {} --disk-id {disk} --collector HOST:PORT --token-file FILE",
        dir.display(),
        output.display(),
        output.display(),
        dir.display()
    );
    Ok(())
}

/// A view read as an [`Image`] without taking it over.
struct ViewImage<'a>(&'a r::View);

impl ViewImage<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
}

trait Source {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for ViewImage<'_> {
    fn size(&self) -> u64 {
        ViewImage::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ViewImage::read_at(self, buf, offset)
    }
}

impl Source for FileImage {
    fn size(&self) -> u64 {
        Image::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Image::read_at(self, buf, offset)
    }
}

/// Export `src` to `out` with a progress line.
fn write_image(src: &dyn Source, out: &Path, format: OutFormat) -> Result<()> {
    let size = src.size();
    let read = |off: u64, buf: &mut [u8]| src.read_at(buf, off);
    let mut bar = Progress::new(size);
    export(&read, size, out, format, &mut |d, t| bar.update(d, t))
        .with_context(|| format!("write {}", out.display()))?;
    bar.finish();
    Ok(())
}

impl OutFormat {
    fn export_format(self) -> ExportFormat {
        match self {
            OutFormat::Raw => ExportFormat::Raw,
            OutFormat::VmdkFlat => ExportFormat::VmdkFlat,
            OutFormat::VmdkSparse => ExportFormat::VmdkSparse,
            OutFormat::VmdkStream => ExportFormat::VmdkStream,
        }
    }
}

/// Materialize the image read through `read` as `out` in `format`.
fn export(
    read: &dyn Fn(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    out: &Path,
    format: OutFormat,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    replica::export(read, size, out, format.export_format(), progress)?;
    Ok(())
}

/// Bytes, rate, ETA on stderr: one line redrawn in place on a terminal,
/// a line every few seconds otherwise (logs).
struct Progress {
    total: u64,
    start: Instant,
    last: Option<Instant>,
    tty: bool,
    done: u64,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress {
            total,
            start: Instant::now(),
            last: None,
            tty: io::stderr().is_terminal(),
            done: 0,
        }
    }

    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let (pct, rate) = (
            if self.total == 0 {
                100.0
            } else {
                self.done as f64 * 100.0 / self.total as f64
            },
            if secs > 0.0 {
                (self.done as f64 / secs) as u64
            } else {
                0
            },
        );
        let eta = if self.done >= self.total {
            "done".to_string()
        } else if rate == 0 {
            "ETA ?".to_string()
        } else {
            format!(
                "ETA {}",
                format_duration(Duration::from_secs((self.total - self.done).div_ceil(rate)))
            )
        };
        format!(
            "{pct:5.1}% {} of {}, {}/s, {eta}",
            format_size(self.done),
            format_size(self.total),
            format_size(rate)
        )
    }

    fn update(&mut self, done: u64, total: u64) {
        self.done = done;
        self.total = total;
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        self.print();
    }

    fn print(&self) {
        let mut e = io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[K{}", self.line());
        } else {
            let _ = writeln!(e, "{}", self.line());
        }
        let _ = e.flush();
    }

    fn finish(&mut self) {
        self.print();
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    #[test]
    fn raw_export_is_sparse_exact_and_reports_progress() {
        let d = tempfile::tempdir().unwrap();
        let size = 10 * (1 << 20) + 123;
        let data: Vec<u8> = (0..size)
            .map(|i| {
                if (3 << 20..4 << 20).contains(&i) {
                    (i % 7) as u8 + 1
                } else {
                    0
                }
            })
            .collect();
        let read = |off: u64, buf: &mut [u8]| {
            let o = off as usize;
            buf.copy_from_slice(&data[o..o + buf.len()]);
            Ok(())
        };
        let out = d.path().join("out.raw");
        let mut seen = Vec::new();
        export(&read, size as u64, &out, OutFormat::Raw, &mut |a, b| seen.push((a, b))).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(seen.last(), Some(&(size as u64, size as u64)));
        assert!(!d.path().join("out.raw.part").exists());
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&out).unwrap().blocks() * 512 < 3 << 20,
            "holes stay holes"
        );
        let vmdk = d.path().join("out.vmdk");
        export(&read, size as u64, &vmdk, OutFormat::VmdkStream, &mut |_, _| {}).unwrap();
        assert!(std::fs::metadata(&vmdk).unwrap().len() < 2 << 20);
    }

    #[test]
    fn progress_line_has_bytes_rate_and_eta() {
        let mut p = Progress::new(1 << 30);
        p.done = 1 << 29;
        let l = p.line();
        assert!(l.contains("50.0%"), "{l}");
        assert!(l.contains("of 1") && l.contains("/s") && l.contains("ETA"), "{l}");
        p.done = 1 << 30;
        assert!(p.line().contains("done"));
    }
}
