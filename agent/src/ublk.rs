//! The ublk front end: the protected disk as a kernel block device,
//! `/dev/ublkbN`, served through the kernel's ublk driver (libublk).
//!
//! Every request goes through the same [`Shim`] as NBD requests do, so
//! WRITE, DISCARD and WRITE_ZEROES are journaled before they reach the disk
//! and FLUSH makes journal and disk durable. Requests of a queue are served
//! by one thread (libublk's io_uring loop with a small local executor); the
//! shim's async work (large writes, fdatasync rounds) runs on the agent's
//! tokio runtime, and whatever wakes a request from there also kicks the
//! queue's ring through an eventfd, so the queue thread never sleeps on a
//! request that is ready.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY` and
//! `UBLK_F_USER_RECOVERY_REISSUE`: when the agent dies (kill -9, a crash),
//! the kernel keeps `/dev/ublkbN`, holds new requests, and re-issues the
//! ones the dead agent had not completed to the next agent, which finds the
//! device number in its state directory and re-attaches. A client sees a
//! pause, never an error, and every completed write was journaled first (a
//! re-issued write may be journaled twice, which replays the same bytes).
//! A clean stop deletes the device.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::UblkOptions;
use crate::shim::{Shim, Zeroing};
use crate::state::current_boot_id;

/// The ublk driver's control device.
pub const CONTROL: &str = "/dev/ublk-control";

/// Largest request the device accepts (bytes).
const IO_BUF_BYTES: u32 = 512 << 10;

/// The file in the state directory that names this disk's device.
const STATE_FILE: &str = "ublk.json";

/// Fail at once, with the reason, when the kernel has no ublk driver.
pub fn check_available() -> Result<()> {
    check_available_at(Path::new(CONTROL))
}

fn check_available_at(control: &Path) -> Result<()> {
    if !control.exists() {
        bail!(
            "--ublk: {} does not exist: this kernel lacks the ublk driver (ublk_drv, Linux 6.0 \
             or later; try `modprobe ublk_drv`), so the disk cannot be served as /dev/ublkbN. \
             Serve it over NBD with --listen instead",
            control.display()
        );
    }
    Ok(())
}

/// What the state directory remembers of the device: enough to tell that a
/// device waiting for its server is this disk's, from this boot.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
struct Recorded {
    id: u32,
    size: u64,
    disk_uuid: String,
    boot_id: String,
}

impl Recorded {
    /// Device `id` of this boot was made by an agent of this disk.
    fn is(&self, id: u32, size: u64, disk_uuid: &str) -> bool {
        self.id == id && self.size == size && self.disk_uuid == disk_uuid && self.boot_id == current_boot_id()
    }
}

/// Warn when the state directory names a device that is still there, waiting
/// for this agent, and the agent was started without `--ublk`: its I/O is
/// held until an agent with `--ublk` re-attaches.
pub fn warn_if_left_behind(state: &Path) {
    if let Ok(Some(r)) = read_recorded(state) {
        if r.boot_id == current_boot_id() && exists(r.id) {
            warn!(
                "/dev/ublkb{} (recorded in {}) is still there, waiting for this disk's agent; its \
                 I/O is held until an agent started with --ublk re-attaches to it",
                r.id,
                state_file(state).display()
            );
        }
    }
}

fn state_file(state: &Path) -> PathBuf {
    state.join(STATE_FILE)
}

fn read_recorded(state: &Path) -> Result<Option<Recorded>> {
    let p = state_file(state);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("{} is damaged; remove it to start a new device", p.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
    }
}

fn write_recorded(state: &Path, r: &Recorded) -> Result<()> {
    let p = state_file(state);
    tidemark_util::crashsafe::write_atomic(&p, &serde_json::to_vec(r)?)
        .with_context(|| format!("write {}", p.display()))
}

fn remove_recorded(state: &Path) {
    let p = state_file(state);
    if let Err(e) = std::fs::remove_file(&p) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!("cannot remove {}: {e}", p.display());
        }
    }
}

fn ublk_err(what: &str, e: UblkError) -> anyhow::Error {
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) if n < 0 => {
            anyhow::anyhow!("{what}: {}", io::Error::from_raw_os_error(-n))
        }
        e => anyhow::anyhow!("{what}: {e}"),
    }
}

/// A running ublk device.
pub struct Device {
    id: u32,
    thread: Option<JoinHandle<Result<()>>>,
    state: PathBuf,
    /// Fires when the device's server thread ends, for whatever reason.
    ended: tokio::sync::watch::Receiver<bool>,
}

/// Whether ublk device `id` exists.
fn exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// Wait (5 s at most) for device `id` to go away after a delete that does
/// not wait for its openers; whether it went.
fn wait_gone(id: u32) -> bool {
    let t0 = std::time::Instant::now();
    while exists(id) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    !exists(id)
}

/// A control handle for device `id`, usable on the calling thread (libublk
/// keeps one control ring per thread; its constructor sets it up).
fn control(id: u32) -> Result<UblkCtrl> {
    let n = i32::try_from(id).map_err(|_| anyhow::anyhow!("ublk device number {id} is too large"))?;
    UblkCtrl::new_simple(n).map_err(|e| ublk_err(&format!("open ublk device {id}"), e))
}

impl Device {
    /// `/dev/ublkbN`.
    pub fn block_device(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    /// Resolves when the device's server stops (deleted from outside, or a
    /// queue failed); a clean [`Device::shutdown`] also ends it.
    pub async fn ended(&self) {
        let mut rx = self.ended.clone();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Clean stop: stop the device (requests in flight complete first),
    /// wait for its threads, delete it, forget it in the state directory.
    pub async fn shutdown(mut self) -> Result<()> {
        let thread = self.thread.take();
        let id = self.id;
        let r = tokio::task::spawn_blocking(move || -> Result<()> {
            if exists(id) {
                if let Err(e) = control(id).and_then(|c| c.kill_dev().map_err(|e| ublk_err("stop", e))) {
                    warn!(id, "stop ublk device: {e:#}");
                }
            }
            let served = match thread {
                Some(t) => t
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("ublk server thread panicked"))),
                None => Ok(()),
            };
            // Delete without waiting for openers (a filesystem still mounted
            // would make a synchronous delete wait forever): the kernel frees
            // the device when the last one closes it.
            if exists(id) {
                match control(id).and_then(|c| c.del_dev_async().map_err(|e| ublk_err("delete", e))) {
                    Ok(_) => {}
                    Err(e) => {
                        warn!(id, "delete /dev/ublkb{id}: {e:#}");
                        return served.and(Err(e));
                    }
                }
                if !wait_gone(id) {
                    warn!(
                        id,
                        "/dev/ublkb{id} is still open (a mounted filesystem?): it goes away once closed"
                    );
                }
            }
            served
        })
        .await
        .context("ublk stop task")?;
        match &r {
            Ok(()) => {
                remove_recorded(&self.state);
                info!(id, "ublk device deleted");
            }
            // Kept: the next agent finds the stopped device and deletes it.
            Err(e) => warn!(id, "ublk device not deleted cleanly: {e:#}"),
        }
        r
    }
}

/// How the device is brought up.
enum Start {
    /// A new device (`None`: the kernel picks its number).
    Add(Option<u32>),
    /// Re-attach to a device left by an agent that died.
    Recover(u32),
}

/// Decide between adding a device and recovering the one the last agent
/// left behind. `--ublk-id` is a demand; a number from `ublk.json` only a
/// hint: if that device is not this disk's any more, a new one is added.
fn plan(opts: &UblkOptions, recorded: Option<&Recorded>, size: u64, disk_uuid: &str) -> Result<Start> {
    if let (Some(want), Some(r)) = (opts.id, recorded) {
        if r.id != want && r.is(r.id, size, disk_uuid) && exists(r.id) {
            warn!(
                "this disk's last device /dev/ublkb{} still exists and is left as it is (--ublk-id {want} \
                 asks for another); its I/O is held until it is deleted or re-attached",
                r.id
            );
        }
    }
    let (id, explicit) = match (opts.id, recorded) {
        (Some(id), _) => (id, true),
        (None, Some(r)) => (r.id, false),
        (None, None) => return Ok(Start::Add(None)),
    };
    if i32::try_from(id).is_err() {
        bail!("--ublk-id {id} is too large");
    }
    let ours = recorded.is_some_and(|r| r.is(id, size, disk_uuid));
    // Not this disk's: refuse a demanded number, pick another for a hint.
    let not_ours = |why: String| -> Result<Start> {
        if explicit {
            bail!("{why}; give another --ublk-id");
        }
        info!("{why}; adding a new device");
        Ok(Start::Add(None))
    };
    // The kernel notices a dead server from a work item, not at once: a
    // device whose server has just died may still say "live" for a moment.
    let t0 = std::time::Instant::now();
    loop {
        if !exists(id) {
            return Ok(Start::Add(Some(id)));
        }
        let ctrl = control(id)?;
        let info = ctrl.dev_info();
        let server_gone = !Path::new(&format!("/proc/{}", info.ublksrv_pid)).exists();
        match u32::from(info.state) {
            sys::UBLK_S_DEV_LIVE if ours && server_gone && t0.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            sys::UBLK_S_DEV_LIVE => {
                return not_ours(format!(
                    "/dev/ublkb{id} is live, served by another process (pid {})",
                    info.ublksrv_pid
                ))
            }
            sys::UBLK_S_DEV_QUIESCED if ours => return Ok(Start::Recover(id)),
            sys::UBLK_S_DEV_QUIESCED => {
                return not_ours(format!(
                    "/dev/ublkb{id} is waiting for its server, and this state directory does not \
                     say it is this disk's device from this boot"
                ))
            }
            sys::UBLK_S_DEV_DEAD if ours => {
                // Stopped but not deleted (the last agent died while
                // starting or stopping it). Delete it and add it anew.
                ctrl.del_dev_async()
                    .map_err(|e| ublk_err(&format!("delete stale ublk device {id}"), e))?;
                if !wait_gone(id) {
                    bail!("stale /dev/ublkb{id} of this disk is still open; close it (unmount) and start again");
                }
                return Ok(Start::Add(Some(id)));
            }
            st => return not_ours(format!("ublk device {id} exists (state {st}) and is not this disk's")),
        }
    }
}

/// The device's parameters: 512-byte logical blocks, 4 KiB physical, a
/// volatile cache (so the kernel sends FLUSH) with FUA, discard and
/// write-zeroes.
fn params(dev: &mut UblkDev, size: u64) {
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    dev.tgt.dev_size = size;
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Bring the device up (add or recover) and serve it from threads of its
/// own until [`Device::shutdown`]. Returns once `/dev/ublkbN` is live.
pub fn start(shim: Shim, opts: &UblkOptions, state: &Path, rt: tokio::runtime::Handle) -> Result<Device> {
    check_available()?;
    let size = shim.size();
    if size == 0 || !size.is_multiple_of(512) {
        bail!("--ublk: the disk's size ({size} bytes) must be a non-zero multiple of 512");
    }
    let recorded = read_recorded(state)?;
    let disk_uuid = shim.disk_uuid();
    let start = plan(opts, recorded.as_ref(), size, &disk_uuid)?;
    let opts = opts.clone();
    let state_dir = state.to_path_buf();
    // The device is created, served and dropped on a thread of its own:
    // libublk's control ring belongs to the thread that made it.
    let (tx, rx) = mpsc::channel::<Started>();
    let (ended_tx, ended_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("ublk".into())
        .spawn(move || {
            let r = serve_device(shim, &opts, start, size, &disk_uuid, &state_dir, rt, &tx);
            if let Err(e) = &r {
                let _ = tx.send(Started::Failed(anyhow::anyhow!("{e:#}")));
            }
            let _ = ended_tx.send(true);
            r
        })
        .context("start the ublk server thread")?;
    // Wait until the device is live, or its thread ended (a failed start).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut created = None;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Started::Created(id)) => created = Some(id),
            Ok(Started::Live(id)) => {
                let device = Device {
                    id,
                    thread: Some(thread),
                    state: state.to_path_buf(),
                    ended: ended_rx,
                };
                info!(id, device = %device.block_device(), "ublk device live");
                return Ok(device);
            }
            Ok(Started::Failed(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                bail!("--ublk: the ublk server thread ended while starting the device (see the log above)");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Take the half-made device down, so nothing is left waiting
                // for a server that gave up.
                if let Some(id) = created.filter(|&id| exists(id)) {
                    let _ = control(id).map(|c| {
                        let _ = c.kill_dev();
                        let _ = c.del_dev_async();
                    });
                }
                bail!("--ublk: the device did not come up within 60 s");
            }
        }
    }
}

/// What the server thread reports while the device comes up.
enum Started {
    /// The device exists (number known), not yet live.
    Created(u32),
    /// `/dev/ublkbN` is live.
    Live(u32),
    Failed(anyhow::Error),
}

/// Create (or re-attach to) the device and serve it until it stops.
#[allow(clippy::too_many_arguments)]
fn serve_device(
    shim: Shim,
    opts: &UblkOptions,
    start: Start,
    size: u64,
    disk_uuid: &str,
    state: &Path,
    rt: tokio::runtime::Handle,
    report: &mpsc::Sender<Started>,
) -> Result<()> {
    let flags = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    let (id, dev_flags) = match start {
        Start::Add(id) => (id.map_or(-1, |i| i as i32), UblkFlags::UBLK_DEV_F_ADD_DEV),
        Start::Recover(id) => {
            let r = control(id)?
                .start_user_recover()
                .map_err(|e| ublk_err(&format!("start recovery of /dev/ublkb{id}"), e))?;
            if r < 0 {
                bail!("start recovery of /dev/ublkb{id}: {}", io::Error::from_raw_os_error(-r));
            }
            info!(
                id,
                "re-attaching to /dev/ublkb{id}, left by an agent that stopped without deleting it"
            );
            (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        }
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("tidemark")
        .id(id)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(IO_BUF_BYTES)
        .ctrl_flags(flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| ublk_err("create the ublk device", e))?;
    let id = ctrl.dev_info().dev_id;
    // Remember the device before it goes live, so an agent that dies from
    // here on is followed by one that re-attaches.
    write_recorded(
        state,
        &Recorded {
            id,
            size,
            disk_uuid: disk_uuid.to_string(),
            boot_id: current_boot_id(),
        },
    )?;
    let _ = report.send(Started::Created(id));
    let ready = report.clone();
    let served = ctrl.run_target(
        |dev: &mut UblkDev| {
            params(dev, size);
            Ok(())
        },
        move |qid, dev: &UblkDev| serve_queue(qid, dev, &shim, &rt),
        move |_ctrl: &UblkCtrl| {
            let _ = ready.send(Started::Live(id));
        },
    );
    // Deleting is the stopping side's job (without waiting for openers);
    // libublk's own delete, on drop, would wait for them.
    ctrl.disown();
    served.map_err(|e| ublk_err(&format!("serve /dev/ublkb{id}"), e))?;
    Ok(())
}

/// One queue's server: a task per tag, plus one that drains the kick
/// eventfd, on libublk's io_uring loop.
fn serve_queue(qid: u16, dev: &UblkDev, shim: &Shim, rt: &tokio::runtime::Handle) {
    // Tokio's spawn and spawn_blocking, used by the shim, need a context.
    let _rt = rt.enter();
    let kick = match EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC) {
        Ok(fd) => Kick {
            efd: Arc::new(fd),
            thread: std::thread::current().id(),
        },
        Err(e) => {
            error!(qid, "ublk queue: eventfd: {e}");
            return;
        }
    };
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            error!(qid, "ublk queue: {}", ublk_err("set up", e));
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = q.clone();
        let shim = shim.clone();
        let kick = kick.clone();
        tasks.push(exe.spawn(async move {
            match io_task(&q, tag, &shim, &kick).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => queue_failed(qid, &format!("tag {tag}: {}", ublk_err("request loop", e))),
            }
        }));
    }
    // Not in `tasks`: it never ends by itself, and is dropped with the
    // executor once every request loop has.
    let drain = {
        let q = q.clone();
        let kick = kick.clone();
        exe.spawn(async move { kick.drain(&q).await })
    };
    let exe2 = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while exe2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            error!(qid, "ublk queue loop: {}", ublk_err("events", e));
        }
    }));
    drop(drain);
}

/// Serve one tag: fetch a request, do it, commit the result and fetch the
/// next, until the queue goes down.
async fn io_task(q: &UblkQueue<'_>, tag: u16, shim: &Shim, kick: &Kick) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    // A negative result is the kernel refusing the command: the descriptor
    // then holds no new request, and serving it again would replay a stale
    // one.
    let r = q
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    if r < 0 {
        return Err(UblkError::OtherError(r));
    }
    loop {
        let iod = *q.get_iod(tag);
        let res = kick.run(serve(shim, iod, buf.as_mut_slice())).await;
        let r = q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res).await?;
        if r < 0 {
            return Err(UblkError::OtherError(r));
        }
    }
}

/// A queue that cannot go on serving: requests on it would hang while the
/// agent looked healthy. End the process as a crash does; the kernel holds
/// the device (user recovery) and the restarted agent re-attaches, and the
/// requests in flight are re-issued to it.
fn queue_failed(qid: u16, what: &str) -> ! {
    error!(
        qid,
        "ublk queue failed: {what}; exiting so that a restarted agent re-attaches to the device"
    );
    eprintln!("tidemark-agent: ublk queue {qid} failed: {what}; exiting (restart the agent to re-attach)");
    std::process::abort()
}

/// A decoded request, in the shim's terms.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Read { offset: u64, len: usize },
    Write { offset: u64, len: usize, fua: bool },
    Flush,
    Discard { offset: u64, len: u64, fua: bool },
    Zeroes { offset: u64, len: u64, how: Zeroing },
}

/// Decode a request descriptor, or the negative errno to answer with.
/// FLUSH comes first: its start sector is not a sector (u64::MAX).
fn decode(op_flags: u32, start_sector: u64, nr_sectors: u32, buf_len: usize) -> Result<Request, i32> {
    let op = op_flags & 0xff;
    if op == sys::UBLK_IO_OP_FLUSH {
        return Ok(Request::Flush);
    }
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    let offset = start_sector.checked_mul(512).ok_or(-libc::EINVAL)?;
    let len = u64::from(nr_sectors) * 512;
    let data_len = || usize::try_from(len).ok().filter(|&l| l <= buf_len).ok_or(-libc::EINVAL);
    match op {
        sys::UBLK_IO_OP_READ => Ok(Request::Read {
            offset,
            len: data_len()?,
        }),
        sys::UBLK_IO_OP_WRITE => Ok(Request::Write {
            offset,
            len: data_len()?,
            fua,
        }),
        sys::UBLK_IO_OP_DISCARD => Ok(Request::Discard { offset, len, fua }),
        sys::UBLK_IO_OP_WRITE_ZEROES => Ok(Request::Zeroes {
            offset,
            len,
            how: Zeroing {
                fua,
                keep_allocated: op_flags & sys::UBLK_IO_F_NOUNMAP != 0,
                fast_only: false,
            },
        }),
        _ => Err(-libc::EOPNOTSUPP),
    }
}

/// Do one request through the shim; the result for the kernel (bytes
/// moved, or a negative errno).
async fn serve(shim: &Shim, iod: sys::ublksrv_io_desc, buf: &mut [u8]) -> i32 {
    let req = match decode(iod.op_flags, iod.start_sector, iod.nr_sectors, buf.len()) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let moved = |len: usize| i32::try_from(len).unwrap_or(i32::MAX);
    let r = match req {
        Request::Read { offset, len } => shim.read(offset, &mut buf[..len]).map(|()| moved(len)),
        Request::Write { offset, len, fua } => shim.write(offset, buf[..len].to_vec(), fua).await.map(|()| moved(len)),
        Request::Flush => shim.flush().await.map(|()| 0),
        Request::Discard { offset, len, fua } => shim.trim(offset, len, fua).await.map(|()| 0),
        Request::Zeroes { offset, len, how } => shim.write_zeroes(offset, len, how).await.map(|()| 0),
    };
    r.unwrap_or_else(|e| -e.errno())
}

/// Wakes a queue thread that may be asleep in io_uring: a request's future
/// woken from another thread (the tokio runtime, the blocking pool) also
/// writes the queue's eventfd, whose read completes in the ring.
#[derive(Clone)]
struct Kick {
    efd: Arc<EventFd>,
    thread: ThreadId,
}

impl Kick {
    /// Run `fut` with wakers that kick this queue.
    fn run<'a, T>(&self, fut: impl Future<Output = T> + 'a) -> Kicked<'a, T> {
        Kicked {
            fut: Box::pin(fut),
            kick: self.clone(),
            waker: None,
        }
    }

    /// Keep a poll on the eventfd armed in the ring; drain it when it fires.
    async fn drain(&self, q: &UblkQueue<'_>) {
        use std::os::fd::AsRawFd;
        let fd = io_uring::types::Fd(self.efd.as_raw_fd());
        loop {
            let sqe = io_uring::opcode::PollAdd::new(fd, libc::POLLIN as u32).build();
            let res = q.ublk_submit_sqe(sqe).await;
            if res < 0 && res != -libc::EINTR && res != -libc::ECANCELED {
                // Without it the queue would only wake at its idle timeout.
                queue_failed(
                    q.get_qid(),
                    &format!("poll on its eventfd: {}", io::Error::from_raw_os_error(-res)),
                );
            }
            // Non-blocking: EAGAIN when another poll already drained it.
            let _ = self.efd.read();
        }
    }
}

struct Kicked<'a, T> {
    fut: Pin<Box<dyn Future<Output = T> + 'a>>,
    kick: Kick,
    /// The executor's waker and the kicking one made from it, reused while
    /// the executor's stays the same (polls of one request mostly do).
    waker: Option<(Waker, Waker)>,
}

impl<T> Future for Kicked<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let kicking = match &this.waker {
            Some((outer, kicking)) if outer.will_wake(cx.waker()) => kicking.clone(),
            _ => {
                let kicking = Waker::from(Arc::new(KickWaker {
                    inner: cx.waker().clone(),
                    kick: this.kick.clone(),
                }));
                this.waker = Some((cx.waker().clone(), kicking.clone()));
                kicking
            }
        };
        this.fut.as_mut().poll(&mut Context::from_waker(&kicking))
    }
}

struct KickWaker {
    inner: Waker,
    kick: Kick,
}

impl Wake for KickWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.inner.wake_by_ref();
        // On the queue's own thread the executor runs again before the
        // thread sleeps; elsewhere the thread may be asleep in the ring.
        if std::thread::current().id() != self.kick.thread {
            let _ = self.kick.efd.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_driver_is_named() {
        let e = check_available_at(Path::new("/nonexistent/ublk-control")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("lacks the ublk driver") && m.contains("ublk_drv"), "{m}");
    }

    #[test]
    fn flush_is_decoded_before_bounds() {
        assert_eq!(decode(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0, 4096), Ok(Request::Flush));
        // Any other op with that start sector is refused, not wrapped.
        assert_eq!(decode(sys::UBLK_IO_OP_WRITE, u64::MAX, 8, 4096), Err(-libc::EINVAL));
    }

    #[test]
    fn requests_decode() {
        assert_eq!(
            decode(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 8, 8, 4096),
            Ok(Request::Write {
                offset: 4096,
                len: 4096,
                fua: true
            })
        );
        assert_eq!(
            decode(sys::UBLK_IO_OP_READ, 0, 16, 4096),
            Err(-libc::EINVAL),
            "larger than the buffer"
        );
        assert_eq!(
            decode(sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP, 1, 1 << 20, 4096),
            Ok(Request::Zeroes {
                offset: 512,
                len: 512 << 20,
                how: Zeroing {
                    fua: false,
                    keep_allocated: true,
                    fast_only: false
                }
            })
        );
        assert_eq!(
            decode(sys::UBLK_IO_OP_DISCARD, 2, 2, 0),
            Ok(Request::Discard {
                offset: 1024,
                len: 1024,
                fua: false
            })
        );
        assert_eq!(decode(sys::UBLK_IO_OP_WRITE_SAME, 0, 1, 4096), Err(-libc::EOPNOTSUPP));
    }

    #[test]
    fn recorded_device_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_recorded(d.path()).unwrap(), None);
        let r = Recorded {
            id: 3,
            size: 1 << 30,
            disk_uuid: "u-1".into(),
            boot_id: current_boot_id(),
        };
        write_recorded(d.path(), &r).unwrap();
        assert_eq!(read_recorded(d.path()).unwrap(), Some(r.clone()));
        assert!(r.is(3, 1 << 30, "u-1"));
        assert!(!r.is(4, 1 << 30, "u-1"), "another number");
        assert!(!r.is(3, 1 << 20, "u-1"), "another size");
        assert!(!r.is(3, 1 << 30, "u-2"), "another disk");
        let old_boot = Recorded {
            boot_id: "an-earlier-boot".into(),
            ..r.clone()
        };
        assert!(
            !old_boot.is(3, 1 << 30, "u-1"),
            "a device number from an earlier boot is not ours"
        );
        std::fs::write(state_file(d.path()), b"{not json").unwrap();
        let e = read_recorded(d.path()).unwrap_err().to_string();
        assert!(e.contains("ublk.json is damaged"), "{e}");
        remove_recorded(d.path());
        assert_eq!(read_recorded(d.path()).unwrap(), None);
    }

    #[test]
    fn kicked_wake_from_another_thread_writes_the_eventfd() {
        let kick = Kick {
            efd: Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap()),
            thread: std::thread::current().id(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let mut fut = std::pin::pin!(kick.run(rx));
        let noop = Waker::noop();
        assert!(fut.as_mut().poll(&mut Context::from_waker(noop)).is_pending());
        assert!(kick.efd.read().is_err(), "nothing kicked yet");
        std::thread::spawn(move || tx.send(7).unwrap()).join().unwrap();
        assert_eq!(kick.efd.read().unwrap(), 1, "the wake from another thread kicked");
        assert!(matches!(
            fut.as_mut().poll(&mut Context::from_waker(noop)),
            Poll::Ready(Ok(7))
        ));
    }
}
