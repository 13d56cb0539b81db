//! `tidemark-agent protect`: open the disk and its state, recover from an
//! unclean stop, serve the shim until SIGTERM/SIGINT, then stop cleanly.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tidemark_formats::apply::{apply_record, whole};
use tidemark_formats::bitmap::{DirtyBitmap, DEFAULT_GRANULARITY};
use tidemark_formats::journal::{Journal, JournalConfig, JournalReader};
use tidemark_util::fileops;
use tidemark_util::human::format_size;
use tidemark_wire::record::{RecordKind, FLAG_FULL};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{default_journal_cap, segment_size_for, ListenAddr, ProtectConfig};
use crate::shim::{Shim, ShimParts};
use crate::state::{DiskMeta, LastStop, StateDir};

/// Open (or create) the backing disk; `created` says whether this call
/// made the file (so a failed start removes it, and only it).
fn open_disk(cfg: &ProtectConfig, created: &mut bool) -> Result<File> {
    let p = &cfg.disk;
    if !p.exists() {
        let Some(size) = cfg.create_size else {
            bail!(
                "disk {} does not exist (give --create-size to create a sparse file)",
                p.display()
            );
        };
        if size == 0 {
            bail!("--create-size must be more than 0 bytes");
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .with_context(|| format!("create disk {}", p.display()))?;
        *created = true;
        f.set_len(size).with_context(|| format!("size disk {}", p.display()))?;
        info!(disk = %p.display(), size = %format_size(size), "created sparse disk file");
        return Ok(f);
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .with_context(|| format!("open disk {}", p.display()))
}

/// A state directory belongs to one disk id.
fn check_meta(m: &DiskMeta, cfg: &ProtectConfig) -> Result<()> {
    if m.disk_id != cfg.disk_id {
        bail!(
            "state directory {} belongs to disk {:?}, not {:?}",
            cfg.state.display(),
            m.disk_id,
            cfg.disk_id
        );
    }
    Ok(())
}

/// Lock the disk itself, so two agents (with different state directories)
/// cannot protect it at once: each journal would miss the other's writes.
fn lock_disk(cfg: &ProtectConfig) -> Result<nix::fcntl::Flock<File>> {
    let f = File::open(&cfg.disk).with_context(|| format!("open disk {}", cfg.disk.display()))?;
    fileops::lock_exclusive(f).map_err(|_| {
        anyhow::anyhow!(
            "disk {} is in use: another agent already protects it",
            cfg.disk.display()
        )
    })
}

/// Everything opened and recovered, ready to serve.
pub struct Opened {
    pub shim: Shim,
    pub state: StateDir,
    pub last_stop: LastStop,
    /// Held for as long as the disk is served.
    pub disk_lock: nix::fcntl::Flock<File>,
    /// The disk file, if this start created it (`--create-size`).
    pub created_disk: Option<std::path::PathBuf>,
}

impl Opened {
    /// A start that failed after opening: remove what this start created
    /// (the disk file, the state directory or what it added to one).
    pub fn abandon(self) {
        let Opened {
            shim,
            state,
            disk_lock,
            created_disk,
            ..
        } = self;
        drop(shim);
        drop(disk_lock);
        if let Some(p) = created_disk {
            let _ = std::fs::remove_file(p);
        }
        state.abandon();
    }
}

/// Everything that can be refused without creating anything: the disk id,
/// the state directory (another daemon's, foreign files, in use), its disk
/// identity, a missing disk without `--create-size`.
pub fn precheck(cfg: &ProtectConfig) -> Result<()> {
    crate::state::probe(&cfg.state)?;
    if let Some(m) = crate::state::read_meta(&cfg.state)? {
        check_meta(&m, cfg)?;
    }
    if !cfg.disk.exists() {
        match cfg.create_size {
            None => bail!(
                "disk {} does not exist (give --create-size to create a sparse file)",
                cfg.disk.display()
            ),
            Some(0) => bail!("--create-size must be more than 0 bytes"),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Open state, disk, journal and bitmap; re-apply the journal after an
/// unclean stop. A refusal or failure removes what this call created.
pub fn open(cfg: &ProtectConfig) -> Result<Opened> {
    // Refuse what can be refused before anything is created.
    precheck(cfg)?;
    // Lock an existing disk before the state directory is claimed, so a
    // disk another agent protects is refused with nothing created.
    let early_lock = cfg.disk.exists().then(|| lock_disk(cfg)).transpose()?;
    let state = StateDir::open(&cfg.state)?;
    let mut created_disk = false;
    match open_claimed(cfg, &state, early_lock, &mut created_disk) {
        Ok((shim, last_stop, disk_lock)) => Ok(Opened {
            shim,
            state,
            last_stop,
            disk_lock,
            created_disk: created_disk.then(|| cfg.disk.clone()),
        }),
        Err(e) => {
            if created_disk {
                let _ = std::fs::remove_file(&cfg.disk);
            }
            state.abandon();
            Err(e)
        }
    }
}

fn open_claimed(
    cfg: &ProtectConfig,
    state: &StateDir,
    early_lock: Option<nix::fcntl::Flock<File>>,
    created_disk: &mut bool,
) -> Result<(Shim, LastStop, nix::fcntl::Flock<File>)> {
    let disk = open_disk(cfg, created_disk)?;
    let disk_lock = match early_lock {
        Some(l) => l,
        None => lock_disk(cfg)?,
    };
    let kind = fileops::backing_kind(&disk).with_context(|| format!("disk {}", cfg.disk.display()))?;
    let size = fileops::backing_size(&disk).with_context(|| format!("size of disk {}", cfg.disk.display()))?;
    if size == 0 {
        bail!("disk {} is empty (0 bytes)", cfg.disk.display());
    }
    let meta = match state.read_meta()? {
        Some(m) => {
            check_meta(&m, cfg)?;
            if m.disk_size != size {
                bail!(
                    "disk {} is {} bytes but state directory {} was made for {} bytes",
                    cfg.disk.display(),
                    size,
                    cfg.state.display(),
                    m.disk_size
                );
            }
            m
        }
        None => {
            let m = DiskMeta {
                format: 1,
                disk_id: cfg.disk_id.to_string(),
                disk_uuid: uuid::Uuid::new_v4().to_string(),
                disk_size: size,
                disk_path: cfg.disk.display().to_string(),
            };
            state.write_meta(&m)?;
            info!(disk = %m.disk_id, uuid = %m.disk_uuid, "protecting a new disk");
            m
        }
    };
    let history = state.generations()?;
    let first_run = !state.journal_dir().exists();
    let last_stop = state.begin_run(first_run)?;
    let cap = cfg.journal_cap.unwrap_or_else(|| default_journal_cap(size));
    let jcfg = JournalConfig {
        dir: state.journal_dir(),
        disk_uuid: meta.uuid_bytes()?,
        segment_size: segment_size_for(cap),
        cap_bytes: cap,
    };
    let (mut journal, report) = Journal::open(jcfg).context("open journal")?;
    // The first run owes the initial sync: a new journal begins with its
    // SyncBegin, seq 1. A state directory without a sync state (made by an
    // older agent, or a crash right after the journal was created) owes it
    // too; if its journal already holds records, the driver journals the
    // SyncBegin when it starts the sync (start seq 0 until then). Without a
    // collector nothing syncs yet, and the journal holds client writes only:
    // the SyncBegin waits until a collector is configured.
    let sync = match crate::sync_state::load(&state.dir)? {
        Some(s) => s,
        None => {
            let start = if journal.next_seq() == 1 && cfg.ship.is_some() {
                let hash = *blake3::hash(&[]).as_bytes();
                journal
                    .append(RecordKind::SyncBegin, FLAG_FULL, 0, 0, &[], hash, crate::now_ns())
                    .context("journal the initial sync's SyncBegin")?
            } else {
                0
            };
            let s = crate::sync_state::SyncFile::initial(start, size);
            crate::sync_state::store(&crate::sync_state::state_path(&state.dir), &s)?;
            s
        }
    };
    if let Some(t) = &report.torn_tail {
        warn!(disk = %meta.disk_id, "journal had a torn tail: {t}");
    }
    for r in &report.removed {
        warn!(disk = %meta.disk_id, "removed {r}");
    }
    let bitmap_path = state.bitmap_path();
    let bitmap = if bitmap_path.exists() {
        Some(DirtyBitmap::open_or_create(&bitmap_path, size, DEFAULT_GRANULARITY).context("open dirty bitmap")?)
    } else {
        None
    };
    info!(
        disk = %meta.disk_id,
        last_stop = ?last_stop,
        records = report.records,
        next_seq = report.next_seq,
        journal = %format_size(journal.live_bytes()),
        cap = %format_size(cap),
        "journal opened"
    );
    match last_stop {
        LastStop::ProcessCrash | LastStop::MachineCrash => {
            let n = reapply(state, &disk, kind, size, bitmap.as_ref())?;
            info!(disk = %meta.disk_id, records = n, "unclean stop: re-applied the journal onto the disk");
            if last_stop == LastStop::MachineCrash {
                state.mark_resync_required()?;
                warn!(
                    disk = %meta.disk_id,
                    "the machine stopped uncleanly (new boot id, no clean-shutdown marker): the journal may miss \
                     writes that reached the disk; the replica needs a full resync"
                );
            }
        }
        LastStop::Clean | LastStop::FirstRun => {}
    }
    let shim = Shim::new(ShimParts {
        disk_id: cfg.disk_id.clone(),
        disk_uuid: meta.disk_uuid.clone(),
        lineage: history.lineage(),
        unapplied: crate::unapplied::Unapplied::open(&state.dir, size)?,
        disk_path: cfg.disk.clone(),
        disk,
        kind,
        size,
        journal,
        bitmap,
        bitmap_path,
        state_dir: state.dir.clone(),
        resync_required: state.resync_required(),
        sync,
    });
    if shim.mode() == crate::shim::Mode::Bitmap {
        warn!(disk = %meta.disk_id, "starting in bitmap mode: regions written past the journal cap await resync");
    }
    Ok((shim, last_stop, disk_lock))
}

/// Re-apply every live journal record onto the disk (idempotent, in seq
/// order), skipping regions the dirty bitmap covers: those may hold newer
/// untracked data and will be resynced from the disk itself.
pub(crate) fn reapply(
    state: &StateDir,
    disk: &File,
    kind: fileops::BackingKind,
    size: u64,
    bitmap: Option<&DirtyBitmap>,
) -> Result<u64> {
    let reader = JournalReader::open(&state.journal_dir())?;
    let path = state.journal_dir();
    let mut n = 0;
    for r in reader.records_from(0) {
        let r = r.context("read journal for re-apply")?;
        match bitmap {
            Some(b) => apply_record(disk, &path, kind, size, &r.header, &r.payload, |o, l| {
                b.clean_parts(o, l)
            })?,
            None => apply_record(disk, &path, kind, size, &r.header, &r.payload, whole)?,
        }
        n += 1;
    }
    fileops::fdatasync(disk).context("sync disk after re-apply")?;
    Ok(n)
}

/// Undo a start that failed: the sockets it bound, then what opening
/// created (disk file, state directory or what it added to one).
fn abandon_start(opened: Option<Opened>, control: Option<&std::path::Path>, nbd: Option<&std::path::Path>) {
    for p in [control, nbd].into_iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
    if let Some(o) = opened {
        o.abandon();
    }
}

/// Run `protect` until SIGTERM/SIGINT.
pub async fn protect(cfg: ProtectConfig) -> Result<()> {
    check_startable(&cfg)?;
    // Refuse what can be refused and bind the listeners before anything is
    // created: a port in use leaves no disk file and no state directory.
    precheck(&cfg)?;
    let (listener, nbd_socket) = bind_nbd(&cfg).await?;
    let starting = open_and_bind_control(&cfg, nbd_socket)?;
    // Signals are caught from here on: one during a slow ublk start is
    // honoured once the device is up (a clean stop follows at once).
    let stop = CancellationToken::new();
    stop_on_signal(&stop);
    let running = start(&cfg, starting, &stop).await?;
    running.announce(&cfg);
    let (nbd_r, ublk_r) = running.serve(listener, &stop).await;
    stop.cancel();
    running.stop(&cfg, nbd_r, ublk_r).await
}

/// Refusals that need nothing opened: options that do not go together, a
/// state directory whose control socket path would be too long, a kernel
/// without ublk for `--ublk`.
fn check_startable(cfg: &ProtectConfig) -> Result<()> {
    if cfg.bench_consume && cfg.ship.is_some() {
        bail!(
            "--bench-consume cannot be combined with --collector: it recycles journal segments \
             the collector has not acknowledged, so records would never reach the replica"
        );
    }
    // A unix socket path holds at most 107 bytes (sun_path, NUL-terminated).
    const MAX_SOCKET_PATH: usize = 107;
    let control_path = crate::state::control_path(&cfg.state);
    if control_path.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "--state {}: its control socket {} would be longer than a unix socket path can be \
             ({MAX_SOCKET_PATH} bytes); give a shorter state directory path",
            cfg.state.display(),
            control_path.display()
        );
    }
    if cfg.ublk.is_some() {
        // Before anything is opened: a kernel without ublk fails at once.
        crate::ublk::check_available()?;
    }
    Ok(())
}

/// Bind the NBD listener (`--listen`); also the socket file it made, which
/// a failed start removes again.
async fn bind_nbd(cfg: &ProtectConfig) -> Result<(Option<tidemark_nbd::Listener>, Option<PathBuf>)> {
    let listener = match &cfg.listen {
        Some(l) => Some(tidemark_nbd::bind(l).await.context("cannot serve the disk")?),
        None => None,
    };
    let socket = match &cfg.listen {
        Some(ListenAddr::Unix(p)) => Some(p.clone()),
        _ => None,
    };
    Ok((listener, socket))
}

/// A start under way: what it has opened and bound so far, all of it
/// removed again by [`Starting::abandon`] if a later step fails.
struct Starting {
    opened: Opened,
    control: UnixListener,
    /// The NBD socket file this start made.
    nbd_socket: Option<PathBuf>,
}

impl Starting {
    fn abandon(self) {
        let control_path = self.opened.state.control_path();
        drop(self.control);
        abandon_start(Some(self.opened), Some(&control_path), self.nbd_socket.as_deref());
    }
}

/// Open the disk and its state, then bind the control socket. A failure
/// removes what this start made, the NBD socket file included.
fn open_and_bind_control(cfg: &ProtectConfig, nbd_socket: Option<PathBuf>) -> Result<Starting> {
    let opened = match open(cfg) {
        Ok(o) => o,
        Err(e) => {
            abandon_start(None, None, nbd_socket.as_deref());
            return Err(e);
        }
    };
    match opened.state.free_control_path().and_then(|p| crate::control::bind(&p)) {
        Ok(control) => Ok(Starting {
            opened,
            control,
            nbd_socket,
        }),
        Err(e) => {
            abandon_start(Some(opened), None, nbd_socket.as_deref());
            Err(e)
        }
    }
}

/// Cancel `stop` at the first SIGTERM or SIGINT.
fn stop_on_signal(stop: &CancellationToken) {
    if let Err(e) = tidemark_util::service::cancel_on_signals(stop) {
        warn!("SIGINT/SIGTERM not caught: {e}");
    }
}

/// Everything that runs while the disk is served.
struct Running {
    shim: Shim,
    state: StateDir,
    /// Held for as long as the disk is served.
    disk_lock: nix::fcntl::Flock<File>,
    device: Option<crate::ublk::Device>,
    control: tokio::task::JoinHandle<std::io::Result<()>>,
    drain: Option<std::thread::JoinHandle<()>>,
    shipper: Option<tokio::task::JoinHandle<()>>,
    sync_driver: Option<std::thread::JoinHandle<()>>,
}

/// Bring up what runs beside the NBD server: the ublk device, the sync
/// driver, the control server, the drain and the shipper. A failure before
/// anything is served undoes the start.
async fn start(cfg: &ProtectConfig, starting: Starting, stop: &CancellationToken) -> Result<Running> {
    let device = match start_ublk(cfg, &starting.opened.shim).await {
        Ok(d) => d,
        Err(e) => {
            starting.abandon();
            return Err(e);
        }
    };
    let sync_driver = match start_sync_driver(cfg, &starting.opened.shim, stop) {
        Ok(d) => d,
        Err(e) => {
            // Nothing has been served yet: take the device down again.
            stop.cancel();
            if let Some(d) = device {
                let _ = d.shutdown().await;
            }
            starting.abandon();
            return Err(e);
        }
    };
    // Started: from here on what was created stays.
    let Starting {
        opened: Opened {
            shim, state, disk_lock, ..
        },
        control,
        ..
    } = starting;
    let control = tokio::spawn(crate::control::serve(
        control,
        state.control_path(),
        shim.clone(),
        stop.clone(),
    ));
    let drain = cfg
        .bench_consume
        .then(|| crate::drain::spawn(shim.clone(), stop.clone()));
    let shipper = cfg.ship.clone().map(|sc| {
        let span = tracing::info_span!("ship", disk = %shim.inner().disk_id);
        tokio::spawn(tracing::Instrument::instrument(
            crate::ship::run(shim.clone(), sc, stop.clone()),
            span,
        ))
    });
    Ok(Running {
        shim,
        state,
        disk_lock,
        device,
        control,
        drain,
        shipper,
        sync_driver,
    })
}

/// Bring up the ublk device `--ublk` asks for; without it, warn about a
/// device of this disk's still waiting for its agent.
async fn start_ublk(cfg: &ProtectConfig, shim: &Shim) -> Result<Option<crate::ublk::Device>> {
    let Some(opts) = &cfg.ublk else {
        crate::ublk::warn_if_left_behind(&cfg.state);
        return Ok(None);
    };
    let (shim, opts, dir, rt) = (
        shim.clone(),
        opts.clone(),
        cfg.state.clone(),
        tokio::runtime::Handle::current(),
    );
    // Off the runtime thread: bringing the device up blocks until the
    // kernel has read the partition table through it.
    tokio::task::spawn_blocking(move || crate::ublk::start(shim, &opts, &dir, rt))
        .await
        .context("ublk start task")
        .and_then(|r| r)
        .map(Some)
}

/// Shipping and syncing need a collector; without one the agent only
/// journals (the sync state stays recorded for when one is configured).
fn start_sync_driver(
    cfg: &ProtectConfig,
    shim: &Shim,
    stop: &CancellationToken,
) -> Result<Option<std::thread::JoinHandle<()>>> {
    if cfg.ship.is_none() {
        return Ok(None);
    }
    // Whole-disk syncs compare with the replica through the shipper.
    shim.inner().hashes.shipping();
    crate::sync::spawn(shim.clone(), stop.clone(), tokio::runtime::Handle::current())
        .map(Some)
        .context("start the sync driver")
}

impl Running {
    /// Log that the disk is served, and record how for the status.
    fn announce(&self, cfg: &ProtectConfig) {
        info!(
            disk = %cfg.disk_id,
            listen = %cfg.listen.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
            ublk = self.device.as_ref().map(|d| d.block_device()).unwrap_or_default(),
            "serving"
        );
        let mut served_as = Vec::new();
        if let Some(l) = &cfg.listen {
            served_as.push(format!("nbd {l}"));
        }
        if let Some(d) = &self.device {
            served_as.push(format!("ublk {}", d.block_device()));
        }
        self.shim.set_front_ends(served_as);
    }

    /// Serve NBD on `listener` (if any) until `stop`, and watch the ublk
    /// device: one that goes away under the agent (deleted from outside, a
    /// failed queue) stops the agent, with an error. Both outcomes.
    async fn serve(
        &self,
        listener: Option<tidemark_nbd::Listener>,
        stop: &CancellationToken,
    ) -> (Result<()>, Result<()>) {
        let backend = Arc::new(crate::nbd::Export::new(self.shim.clone()));
        let nbd = async {
            match listener {
                Some(l) => tidemark_nbd::serve(l, backend, stop.clone())
                    .await
                    .context("NBD server"),
                None => {
                    stop.cancelled().await;
                    Ok(())
                }
            }
        };
        let watch_ublk = async {
            let Some(d) = &self.device else {
                return Ok(());
            };
            tokio::select! {
                () = d.ended() => {
                    stop.cancel();
                    Err(anyhow::anyhow!("{} stopped while the agent was serving it (deleted from outside?)", d.block_device()))
                }
                () = stop.cancelled() => Ok(()),
            }
        };
        tokio::join!(nbd, watch_ublk)
    }

    /// The clean stop: the ublk device goes, the background work ends, a
    /// final flush, the clean-shutdown marker. An NBD server error is
    /// returned before the marker is written, a lost ublk device after it.
    async fn stop(self, cfg: &ProtectConfig, nbd_r: Result<()>, ublk_r: Result<()>) -> Result<()> {
        let Running {
            shim,
            state,
            disk_lock: _disk_lock,
            device,
            control,
            drain,
            shipper,
            sync_driver,
        } = self;
        if let Some(d) = device {
            if let Err(e) = d.shutdown().await {
                warn!("ublk device: {e:#}");
            }
        }
        nbd_r?;
        if let Some(d) = drain {
            let _ = d.join();
        }
        if let Some(s) = shipper {
            let _ = s.await;
        }
        if let Some(d) = sync_driver {
            // Off the runtime thread: the driver may be waiting for a write
            // that this thread has to finish.
            let _ = tokio::task::spawn_blocking(move || d.join()).await;
        }
        shim.sync_all().await.context("final flush")?;
        let next = shim.core().journal.next_seq();
        state.mark_clean(next)?;
        let _ = control.await;
        if let Some(ListenAddr::Unix(p)) = &cfg.listen {
            let _ = std::fs::remove_file(p);
        }
        // Everything is flushed and marked clean; then report a lost device.
        ublk_r?;
        info!(disk = %cfg.disk_id, next_seq = next, "stopped cleanly");
        Ok(())
    }
}
