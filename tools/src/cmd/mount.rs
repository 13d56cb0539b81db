//! `tidemark mount`: a recovery point, pinned when opened, served over NBD
//! (`libs/nbd`, with `base:allocation`) and optionally mounted.
//!
//! ```text
//!  View (replica + undo, pinned) ──▶ Layered ──▶ NBD export (--listen)
//!                                    │ read-only, or with --writable a
//!                                    │ copy-on-write overlay: sparse temp
//!                                    │ file + bitmap of written 4 KiB blocks
//!                                    └─▶ (--mountpoint) FUSE file "disk" ─▶ loop ─▶ mount DIR
//! ```
//!
//! The view is never written: writes land in an overlay that is an
//! unlinked temp file, gone when the process ends. `--mountpoint` always
//! mounts over a copy-on-write layer, because a crash-consistent ext4
//! replays its journal even on a read-only mount: without `--writable` it
//! is a second, throwaway overlay (the NBD export stays read-only) and the
//! filesystem is mounted `ro`; with `--writable` the FUSE file and the NBD
//! export share the user's overlay. Everything — the mount, the loop
//! device, the FUSE mount, the socket — is undone on SIGTERM, SIGINT or
//! SIGHUP, and on any error after it was set up.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tidemark_nbd::{Backend, ExportInfo, Extent, ZeroFlags};
use tokio_util::sync::CancellationToken;

use tidemark_recovery::overlay::{Image, Layered};

use super::points::{open_source, PointInfo};

#[derive(Args)]
pub struct MountArgs {
    /// The target's data directory.
    #[arg(long, value_name = "DIR", required_unless_present = "image")]
    data: Option<PathBuf>,
    /// The disk id.
    #[arg(required_unless_present = "image")]
    disk: Option<tidemark_wire::DiskId>,
    /// Which point: latest, latest-app, seq:N, an RFC 3339 time, a tag
    /// name, or tag:NAME.
    #[arg(long, value_name = "SPEC", required_unless_present = "image")]
    at: Option<String>,
    /// Serve a raw image file instead of a recovery point (a failed-over
    /// disk, or tests).
    #[arg(long, hide = true, value_name = "FILE", conflicts_with_all = ["data", "disk", "at"])]
    image: Option<PathBuf>,
    /// Accept writes into a throwaway copy-on-write overlay (a drill); the
    /// replica and its undo data are never touched.
    #[arg(long)]
    writable: bool,
    /// Where to serve NBD: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "unix:SOCK")]
    listen: String,
    /// Also mount the point's filesystem here (FUSE + loop device).
    #[arg(long, value_name = "DIR")]
    mountpoint: Option<PathBuf>,
}

/// The NBD export of a [`Layered`] image.
pub struct ViewBackend {
    layer: Arc<Layered>,
    name: String,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("I/O task failed: {e}")))?
}

impl Backend for ViewBackend {
    fn info(&self) -> ExportInfo {
        let w = self.layer.writable();
        ExportInfo {
            description: if w {
                "tidemark point-in-time view (writes go to a throwaway overlay)".into()
            } else {
                "tidemark point-in-time view (read-only)".into()
            },
            read_only: !w,
            can_trim: w,
            can_zero: w,
            can_fast_zero: false,
            // A flush has nothing to make durable (the overlay is thrown
            // away), and every connection sees every write at once.
            multi_conn: true,
            ..ExportInfo::new(self.name.clone(), self.layer.size())
        }
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
        mut buf: Vec<u8>,
    ) -> impl std::future::Future<Output = io::Result<Vec<u8>>> + Send {
        let layer = self.layer.clone();
        blocking(move || {
            buf.resize(len as usize, 0);
            layer.read_at(&mut buf, offset)?;
            Ok(buf)
        })
    }

    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        _fua: bool,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        let layer = self.layer.clone();
        blocking(move || layer.write_at(Some(&data), offset, data.len() as u64))
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> impl std::future::Future<Output = io::Result<()>> + Send {
        let layer = self.layer.clone();
        blocking(move || layer.write_at(None, offset, len))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        let layer = self.layer.clone();
        async move {
            if flags.fast_zero {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            blocking(move || layer.write_at(None, offset, len)).await
        }
    }

    fn block_status(&self, offset: u64, len: u32) -> impl std::future::Future<Output = io::Result<Vec<Extent>>> + Send {
        let layer = self.layer.clone();
        blocking(move || {
            let len = u64::from(len).min(layer.size().saturating_sub(offset));
            let mut out: Vec<Extent> = Vec::new();
            for (_, l, data) in layer.allocated(offset, len)? {
                let l = u32::try_from(l).unwrap_or(u32::MAX);
                match out.last_mut() {
                    Some(e) if e.hole != data => e.length = e.length.saturating_add(l),
                    _ => out.push(Extent {
                        length: l,
                        hole: !data,
                        zero: !data,
                    }),
                }
                if out.len() >= 1024 {
                    break;
                }
            }
            if out.is_empty() {
                out.push(Extent {
                    length: u32::try_from(len.max(1)).unwrap_or(u32::MAX),
                    hole: false,
                    zero: false,
                });
            }
            Ok(out)
        })
    }
}

/// The FUSE file's name (`tidemark_recovery::fuse`).
const FILE_NAME: &str = "disk";

/// Run a command; its stdout, or an error with its stderr.
fn sh(cmd: &mut Command) -> Result<String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().with_context(|| format!("run {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The filesystem mounted at the user's directory, and what holds it up;
/// torn down in reverse order on drop, whatever was set up.
struct FsMount {
    mountpoint: PathBuf,
    mounted: bool,
    loop_dev: Option<String>,
    fuse: Option<tidemark_recovery::fuse::Mounted>,
}

impl FsMount {
    fn setup(layer: Arc<Layered>, mountpoint: &Path, read_only: bool) -> Result<FsMount> {
        if !mountpoint.is_dir() {
            bail!("--mountpoint {} is not a directory", mountpoint.display());
        }
        let mut m = FsMount {
            mountpoint: mountpoint.to_path_buf(),
            mounted: false,
            loop_dev: None,
            fuse: None,
        };
        let size = layer.size();
        let fuse = tidemark_recovery::fuse::mount(
            vec![tidemark_recovery::fuse::FileSpec {
                name: FILE_NAME.into(),
                layer,
                offset: 0,
                len: size,
            }],
            None,
        )
        .context("serve the view as a file")?;
        let file = fuse.path(FILE_NAME);
        m.fuse = Some(fuse);
        // The loop device is writable even for a read-only mount: ext4
        // replays its journal into the overlay underneath.
        let dev = sh(Command::new("losetup").args(["-f", "--show"]).arg(&file))
            .context("attach a loop device to the view (needs root and /dev/loop-control)")?;
        m.loop_dev = Some(dev.clone());
        // The recovered filesystem is the protected machine's, not this
        // host's: its setuid binaries, device nodes and executables stay
        // inert here.
        let mut cmd = Command::new("mount");
        cmd.args([
            "-o",
            if read_only {
                "ro,nosuid,nodev,noexec"
            } else {
                "nosuid,nodev,noexec"
            },
        ]);
        sh(cmd.arg(&dev).arg(mountpoint))
            .with_context(|| format!("mount the point's filesystem ({dev}) at {}", mountpoint.display()))?;
        m.mounted = true;
        Ok(m)
    }

    fn loop_dev(&self) -> Option<&str> {
        self.loop_dev.as_deref()
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.mounted {
            let mut ok = false;
            for _ in 0..50 {
                if sh(Command::new("umount").arg(&self.mountpoint)).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                eprintln!(
                    "tidemark: {} busy; detaching it lazily (umount -l)",
                    self.mountpoint.display()
                );
                if let Err(e) = sh(Command::new("umount").arg("-l").arg(&self.mountpoint)) {
                    eprintln!("tidemark: {e:#}");
                }
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            if let Err(e) = sh(Command::new("losetup").args(["-d", &dev])) {
                eprintln!("tidemark: detach {dev}: {e:#}");
            }
            // Detaching is deferred until the last user closes the device;
            // the FUSE file stays busy until then.
            let name = dev.trim_start_matches("/dev/");
            let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
            let start = Instant::now();
            while backing.exists() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Unmounts the FUSE filesystem and removes its directory.
        drop(self.fuse.take());
    }
}

fn say(line: &str) {
    outln!("{line}");
}

pub fn mount(a: MountArgs) -> Result<()> {
    let (image, point) = open_source(
        a.data.as_deref(),
        a.disk.as_deref(),
        a.at.as_deref(),
        a.image.as_deref(),
    )?;
    say(&opened_line(point.as_ref(), a.image.as_deref()));
    let name = a.disk.as_deref().unwrap_or_default().to_string();
    let layer = Arc::new(Layered::new(image.clone(), a.writable).context("create the copy-on-write overlay")?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(serve(a, name, image, layer))
}

/// `opened point seq N, TIME, kind, tag "x"`.
pub fn opened_line(point: Option<&PointInfo>, image: Option<&Path>) -> String {
    match (point, image) {
        (Some(p), _) => format!("opened point {}", p.describe()),
        (None, Some(i)) => format!("opened image {}", i.display()),
        (None, None) => "opened".into(),
    }
}

async fn serve(a: MountArgs, name: String, image: Arc<dyn Image>, layer: Arc<Layered>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Before anything is set up, so that a signal during setup still
    // ends in the teardown below.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;

    let addr = tidemark_nbd::parse_listen(&a.listen).with_context(|| format!("--listen {}", a.listen))?;
    let listener = tidemark_nbd::bind(&addr)
        .await
        .with_context(|| format!("listen on {}", a.listen))?;
    let sock = match &addr {
        tidemark_nbd::ListenAddr::Unix(p) => Some(p.clone()),
        _ => None,
    };
    let _unlink = Unlink(sock);
    let stop = CancellationToken::new();
    let backend = Arc::new(ViewBackend {
        layer: layer.clone(),
        name,
    });
    let mut server = tokio::spawn(tidemark_nbd::serve(listener, backend, stop.clone()));
    say(&format!(
        "serving {} over NBD ({})",
        a.listen,
        if a.writable {
            "writable: writes go to a throwaway overlay"
        } else {
            "read-only"
        }
    ));

    let fs = match &a.mountpoint {
        None => None,
        Some(dir) => {
            let fs_layer = if a.writable {
                layer.clone()
            } else {
                Arc::new(Layered::new(image, true).context("create the throwaway overlay")?)
            };
            let (dir, ro) = (dir.clone(), !a.writable);
            let m = tokio::task::spawn_blocking(move || FsMount::setup(fs_layer, &dir, ro))
                .await
                .context("mount task")?;
            match m {
                Ok(m) => {
                    say(&format!(
                        "mounted {} at {} ({})",
                        m.loop_dev().unwrap_or("?"),
                        a.mountpoint
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        if a.writable {
                            "writable; changes vanish on exit"
                        } else {
                            "read-only"
                        }
                    ));
                    Some(m)
                }
                Err(e) => {
                    stop.cancel();
                    let _ = server.await;
                    return Err(e);
                }
            }
        }
    };
    say("ready");

    let why = tokio::select! {
        _ = term.recv() => "SIGTERM".to_string(),
        _ = int.recv() => "SIGINT".to_string(),
        _ = hup.recv() => "SIGHUP".to_string(),
        r = &mut server => match r {
            Ok(Ok(())) => "the NBD server stopped".to_string(),
            Ok(Err(e)) => format!("the NBD server stopped: {e:#}"),
            Err(e) => format!("the NBD server ended: {e}"),
        },
    };
    eprintln!("tidemark: {why}: cleaning up");
    stop.cancel();
    if !server.is_finished() {
        let _ = server.await;
    }
    if let Some(m) = fs {
        tokio::task::spawn_blocking(move || drop(m))
            .await
            .context("unmount task")?;
    }
    Ok(())
}

/// Removes the unix socket on the way out.
struct Unlink(Option<PathBuf>);

impl Drop for Unlink {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
