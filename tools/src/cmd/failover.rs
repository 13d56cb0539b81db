//! `tidemark failover`: materialize a recovery point as a disk image,
//! then record the failover at the target (which stops applying to the
//! disk). Run it again with another `--at` to pick another point.
//!
//! For `--at latest` the target first drains what the collector still
//! holds for the disk, unless `--no-drain` (the primary site is gone and
//! the collector with it). `tidemark_formats::replica::export` writes the
//! image under a temporary name and renames it into place once complete
//! and durable, so `FILE` is never half a disk.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use tidemark_formats::replica::{self, ExportFormat};
use tidemark_util::human::{format_duration, format_size};

use super::mount::opened_line;
use super::points::{drain, open_source, record_failover};

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

#[derive(Args)]
pub struct FailoverArgs {
    /// The target's data directory.
    #[arg(long, value_name = "DIR", required_unless_present = "image")]
    data: Option<PathBuf>,
    /// The disk id.
    #[arg(required_unless_present = "image")]
    disk: Option<String>,
    /// Which point: latest, latest-app, seq:N, an RFC 3339 time, a tag
    /// name, or tag:NAME.
    #[arg(long, value_name = "SPEC", required_unless_present = "image")]
    at: Option<String>,
    /// Export a raw image file instead of a recovery point (tests); no
    /// failover is recorded.
    #[arg(long, hide = true, value_name = "FILE", conflicts_with_all = ["data", "disk", "at"])]
    image: Option<PathBuf>,
    /// The disk image to write.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Its format.
    #[arg(long, value_enum, default_value_t = OutFormat::Raw)]
    format: OutFormat,
    /// Do not wait for the collector's backlog before `--at latest` (the
    /// primary site is gone).
    #[arg(long)]
    no_drain: bool,
    /// The longest the drain may take.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    drain_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tidemark_util::human::parse_duration(s).map_err(|e| e.to_string())
}

pub fn failover(a: FailoverArgs) -> Result<()> {
    if let (Some(data), Some(disk), Some("latest"), false) = (&a.data, &a.disk, a.at.as_deref(), a.no_drain) {
        eprintln!("draining what the collector still holds for {disk} (--no-drain skips this)…");
        let seq = drain(data, disk, a.drain_timeout)
            .with_context(|| format!("drain {disk} (if the primary site is gone, use --no-drain)"))?;
        eprintln!("drained: the replica has applied seq {seq}");
    }
    let (image, point) = open_source(
        a.data.as_deref(),
        a.disk.as_deref(),
        a.at.as_deref(),
        a.image.as_deref(),
    )?;
    eprintln!("{}", opened_line(point.as_ref(), a.image.as_deref()));
    let size = image.size();
    let read = |off: u64, buf: &mut [u8]| image.read_at(buf, off);
    let mut bar = Progress::new(size);
    let started = Instant::now();
    export(&read, size, &a.output, a.format, &mut |d, t| bar.update(d, t))
        .with_context(|| format!("write {}", a.output.display()))?;
    bar.finish();
    if let (Some(data), Some(disk), Some(p)) = (&a.data, &a.disk, &point) {
        record_failover(data, disk, p, &a.output)
            .with_context(|| format!("{} is written, but the failover was not recorded", a.output.display()))?;
    }
    outln!(
        "failed over {} to {} ({}, {}) in {}",
        match &point {
            Some(p) => format!("{} at {}", a.disk.as_deref().unwrap_or("?"), p.describe()),
            None => a.image.as_ref().map(|i| i.display().to_string()).unwrap_or_default(),
        },
        a.output.display(),
        a.format
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        format_size(size),
        format_duration(started.elapsed())
    );
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
