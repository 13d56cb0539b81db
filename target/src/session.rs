//! One collector connection, carrying one disk: Hello checks, Welcome,
//! then packed batches applied and acked, `TargetState` every few seconds,
//! `Request`s upstream for halts and owed full syncs.
//!
//! Every refusal is an `Error` frame with a reason, one log line, and the
//! end of this connection only. Nothing read from the socket is trusted:
//! frame headers are bounded before a body is allocated, and every decode
//! error ends the connection instead of panicking.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark_formats::generation::{GenerationId, History};
use tidemark_net::{kib_permits, write_frame, FrameReader, PeerRole, ReadError, WriteError, Writer};
use tidemark_wire::call::Call;
use tidemark_wire::frame::{
    ErrorCode, Frame, Lineage, ReplicaState, Request, Role, TargetState, HELLO_FORCE_RESYNC, MAX_BODY, PACKED_GAP,
    WELCOME_NEED_FULL_SYNC,
};
use tidemark_wire::pack::{PackedBatch, Unpacker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::apply::{DiskApplier, Outcome, UndoOptions};
use crate::catalog::{Bind, Catalog, Failover, Reprotect};
use crate::error::{Error, ErrorKind, IoContext, Located, Result};
use crate::replica::{self, Replica, WINDOW_FILE};
use crate::retention::Pins;
use crate::window::WindowFile;
use crate::Config;

/// How long a refused peer gets to read our Error frame before the close.
const LINGER: Duration = Duration::from_secs(1);
/// Longest wait for one frame write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Unacknowledged data older than this aborts the connection, so that a
/// collector that vanished does not keep its disk busy for the kernel's
/// default of about 15 minutes (TargetState is sent every 2 s, so there is
/// always data in flight).
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of frames held at once across all connections: the read buffer
/// and the decoded frame, twice a body of at most `MAX_BODY` (40 MiB).
pub(crate) const FRAME_BUDGET: u64 = 80 << 20;
/// Bytes of decompressed streams and unpacked records held at once across
/// all connections (one batch holds at most `2 * MAX_RAW`, 128 MiB).
pub(crate) const DECODED_BUDGET: u64 = 2 * tidemark_wire::pack::MAX_RAW as u64;

/// The target's memory budget: without it, every connected disk could hold
/// a 40 MiB frame and 128 MiB of decoded records at once. Permits are KiB.
/// A connection takes frame permits before it allocates a body, then
/// decoded permits before it unpacks; nobody holding decoded permits waits
/// for frame permits, so the two cannot deadlock.
#[derive(Debug)]
pub(crate) struct Memory {
    pub frames: Arc<Semaphore>,
    pub decoded: Arc<Semaphore>,
}

impl Default for Memory {
    fn default() -> Self {
        Self {
            frames: Arc::new(Semaphore::new(kib_permits(FRAME_BUDGET, FRAME_BUDGET) as usize)),
            decoded: Arc::new(Semaphore::new(kib_permits(DECODED_BUDGET, DECODED_BUDGET) as usize)),
        }
    }
}

/// What a disk's live connection is doing (for drain and failover).
#[derive(Debug)]
pub(crate) struct Activity {
    /// When the last Packed batch arrived (or the connection started).
    pub last_batch: Instant,
    /// A batch is being applied.
    pub applying: bool,
    /// Every seq ≤ this is applied.
    pub applied_seq: u64,
    /// Asks the collector (through this connection) what it holds for the
    /// disk: the answer is the highest seq the collector or, where it could
    /// ask it, the agent holds, and whether the agent answered.
    pub probe: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Held>>,
}

/// What a collector said it holds for a disk (the drain barrier).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    /// Every seq the collector spooled or the agent journaled is ≤ this.
    pub seq: u64,
    /// The agent answered (its journal is included); otherwise only the
    /// collector's spool is.
    pub agent_answered: bool,
    /// The agent's mode (its answer, or the last it reported): anything
    /// but streaming means writes it holds outside its journal (bitmap
    /// mode) or a sync under way.
    pub agent_mode: tidemark_wire::frame::AgentMode,
}

/// State shared by every connection of one target.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: Config,
    /// Disk ids with a live connection.
    pub live: Mutex<HashSet<String>>,
    pub memory: Memory,
    /// Points pinned by views open through the control socket.
    pub pins: Arc<Pins>,
    /// Live connections' activity, by disk id.
    pub activity: Mutex<HashMap<String, Activity>>,
    /// Disks failed over while the target runs (the catalog says so too).
    pub failed_over: Mutex<HashSet<String>>,
    /// Per disk: held while a batch is applied (from the point tail it
    /// reads to its commit) and while a view records the applied state as
    /// a point, so that the next batch captures what it overwrites.
    apply_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Per disk: batches, records and apply time since start (metrics).
    pub stats: crate::metrics::Stats,
    pub started: Instant,
    /// Refused connections and failed handshakes: logged at a bounded rate.
    pub refused_log: tidemark_util::ratelog::RateLimitedLog,
    /// Drills running or waiting their turn.
    pub drills: crate::drill::Drills,
}

impl Shared {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            live: Default::default(),
            memory: Default::default(),
            pins: Default::default(),
            activity: Default::default(),
            failed_over: Default::default(),
            apply_locks: Default::default(),
            stats: Default::default(),
            refused_log: Default::default(),
            drills: Default::default(),
            started: Instant::now(),
        }
    }

    /// The disk's apply lock (see `apply_locks`).
    pub fn apply_lock(&self, disk: &str) -> Arc<Mutex<()>> {
        self.apply_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(disk.to_string())
            .or_default()
            .clone()
    }

    /// Apply to the disk again (a failover that stopped it was abandoned).
    pub fn resume_applying(&self, disk: &str) {
        self.failed_over.lock().unwrap_or_else(|e| e.into_inner()).remove(disk);
    }

    /// The probe of the disk's live connection, if it has one.
    pub fn probe(&self, disk: &str) -> Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Held>>> {
        self.with_activity(disk, |a| a.map(|a| a.probe.clone()))
    }

    /// The applied seq of the disk's live connection, if no batch is being applied.
    pub fn settled_seq(&self, disk: &str) -> Option<u64> {
        self.with_activity(disk, |a| a.filter(|a| !a.applying).map(|a| a.applied_seq))
    }

    fn with_activity<T>(&self, disk: &str, f: impl FnOnce(Option<&mut Activity>) -> T) -> T {
        let mut m = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        f(m.get_mut(disk))
    }

    /// No batch for `disk` starts applying after this returns.
    pub fn stop_applying(&self, disk: &str) {
        self.failed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(disk.to_string());
    }

    pub fn is_failed_over(&self, disk: &str) -> bool {
        self.failed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(disk)
    }

    /// Whether a batch of `disk` is being applied.
    pub fn applying(&self, disk: &str) -> bool {
        self.with_activity(disk, |a| a.is_some_and(|a| a.applying))
    }
}

/// A disk id claimed for one connection; released (with its activity) on drop.
struct LiveGuard {
    shared: Arc<Shared>,
    id: String,
}

impl LiveGuard {
    fn claim(shared: &Arc<Shared>, id: &str) -> Option<Self> {
        let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
        live.insert(id.to_string()).then(|| Self {
            shared: shared.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&self.id);
        drop(live);
        let mut a = self.shared.activity.lock().unwrap_or_else(|e| e.into_inner());
        a.remove(&self.id);
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The peer is told why (an Error frame), then the connection closes.
    Refuse { code: ErrorCode, reason: String },
    /// Closed without a frame: the peer left, the target stops, a failpoint.
    Close(String),
}

fn refuse(code: ErrorCode, reason: impl Into<String>) -> End {
    End::Refuse {
        code,
        reason: reason.into(),
    }
}

impl From<Error> for End {
    fn from(e: Error) -> Self {
        match e.kind {
            ErrorKind::Malformed => refuse(ErrorCode::Malformed, e.to_string()),
            ErrorKind::Injected => End::Close(e.to_string()),
            // The next Hello is told which failover (`failed_over_refusal`).
            ErrorKind::FailedOver => refuse(ErrorCode::Busy, e.to_string()),
            _ => refuse(ErrorCode::Internal, e.to_string()),
        }
    }
}

impl From<ReadError> for End {
    fn from(e: ReadError) -> Self {
        let code = e.code().unwrap_or(ErrorCode::Malformed);
        match e {
            ReadError::Io(e) => End::Close(format!("read failed: {e}")),
            ReadError::Wire(w) => refuse(code, w.msg),
            // Cut short inside a frame: told so, in case it still listens.
            e => refuse(code, e.to_string()),
        }
    }
}

async fn send(w: &mut Writer, f: &Frame) -> Result<(), End> {
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame(w, f)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(WriteError::Encode(e))) => Err(refuse(ErrorCode::Internal, format!("cannot encode a reply: {}", e.msg))),
        Ok(Err(e)) => Err(End::Close(format!("write failed: {e}"))),
        Err(_) => Err(End::Close(format!(
            "the collector read nothing for {} s",
            WRITE_TIMEOUT.as_secs()
        ))),
    }
}

/// The parts of a state a change of which is worth a `TargetState` at once
/// (applied_seq travels in every ack anyway).
fn state_key(s: &TargetState) -> (ReplicaState, u64, u64) {
    (s.state, s.halted_seq, s.pending_bytes)
}

/// Serve one connection until it ends; log how it ended, once.
pub(crate) async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    mut slots: tidemark_net::Admitted,
) {
    let span = tracing::info_span!("session", %peer, disk = tracing::field::Empty);
    async move {
        let _ = stream.set_nodelay(true);
        if let Err(e) = tidemark_net::set_user_timeout(&stream, USER_TIMEOUT) {
            debug!("TCP_USER_TIMEOUT not set: {e}");
        }
        let Ok(conn) = shared
            .cfg
            .security
            .accept_logged(stream, &shared.refused_log, "connection refused")
            .await
        else {
            return;
        };
        let (rd, mut wr, revoked) = (conn.reader, conn.writer, conn.revoked);
        if let Some(peer) = conn.peer.as_ref().filter(|p| p.role != PeerRole::Collector) {
            let reason = format!("{peer} cannot act as a collector: this target takes only collector identities");
            shared.refused_log.warn(format_args!("refused: {reason}"));
            let _ = send(
                &mut wr,
                &Frame::Error {
                    code: ErrorCode::Forbidden,
                    reason,
                },
            )
            .await;
            let _ = wr.shutdown().await;
            return;
        }
        // Until the Hello is checked, a frame may hold 16 KiB of the budget,
        // not a batch's 40 MiB (an unauthenticated header must not stall
        // every disk's replication).
        let mut reader =
            FrameReader::new(rd, tidemark_net::HELLO_MAX_BODY).with_budget(shared.memory.frames.clone(), FRAME_BUDGET);
        let who = conn
            .peer
            .as_ref()
            .map_or_else(|| "the collector".to_string(), ToString::to_string);
        let ended = tokio::select! {
            r = session(&mut reader, &mut wr, &shared, &stop, &mut slots) => r,
            () = revoked.cancelled() => Err(End::Refuse {
                code: ErrorCode::Forbidden,
                reason: format!("the certificate of {who} was revoked"),
            }),
        };
        match ended {
            Ok(Some(why)) => info!("connection closed: {why}"),
            // A port probe (readiness checks): not worth a line.
            Ok(None) => debug!("connection closed before Hello"),
            Err(End::Close(why)) => warn!("connection closed: {why}"),
            Err(End::Refuse { code, reason }) => {
                if code == ErrorCode::Internal {
                    error!("connection failed ({code}): {reason}");
                } else {
                    warn!("refused ({code}): {reason}");
                }
                // Best effort: the peer may be gone already.
                let _ = send(&mut wr, &Frame::Error { code, reason }).await;
                let _ = wr.shutdown().await;
                // Read (and drop) what the peer still sends for a moment, so
                // that closing with unread data does not reset the
                // connection before our Error frame is read.
                let mut sink = vec![0u8; 64 << 10];
                let _ = tokio::time::timeout(LINGER, async {
                    while matches!(reader.get_mut().read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
        }
    }
    .instrument(span)
    .await
}

/// The disk's apply state and dedup window, moved to a blocking thread
/// for each batch.
struct Work {
    applier: DiskApplier,
    unpacker: Unpacker<WindowFile>,
    disk_id: String,
    /// The data generation the replica holds (all zero: not known).
    generation: [u8; 16],
}

/// What opening a disk found.
enum Opened {
    Ready(Box<Work>),
    Mismatch {
        bound_uuid: String,
    },
    /// The newest failover recorded (None: none could be read).
    FailedOver(Option<Failover>),
    /// A replica adopted by `tidemark reprotect` that this Hello cannot
    /// continue (the reason).
    Reprotect(String),
    /// The replica holds another data generation than the Hello's.
    OtherGeneration {
        held: GenerationId,
        theirs: GenerationId,
    },
}

impl Work {
    /// Bind the disk in the catalog and open its replica and window.
    fn open(
        cfg: &Config,
        pins: Arc<Pins>,
        disk_id: &str,
        uuid: &[u8; 16],
        force: bool,
        disk_size: u64,
        lineage: &Lineage,
    ) -> Result<Opened> {
        let (data_dir, window_blocks) = (cfg.data_dir.as_path(), cfg.window_blocks);
        let mut catalog = Catalog::open(data_dir)?;
        let (row, fresh) = match catalog.bind(disk_id, uuid, force, &cfg.retention, cfg.format)? {
            Bind::Mismatch { bound_uuid } => return Ok(Opened::Mismatch { bound_uuid }),
            Bind::New(row) => {
                info!(format = %row.format, "new disk");
                (row, true)
            }
            Bind::Existing(row) => (row, false),
            Bind::Rebound { row, old_uuid } => {
                warn!(
                    "FORCE_RESYNC: disk id rebound from UUID {old_uuid} to {}; starting a fresh replica",
                    crate::catalog::format_uuid(uuid)
                );
                (row, true)
            }
        };
        if row.failed_over {
            // Refused by the caller; the replica is not opened (nor grown).
            return Ok(Opened::FailedOver(catalog.failovers(disk_id)?.pop()));
        }
        let row = match catalog.reprotect(disk_id)? {
            None => row,
            Some(rp) => {
                if let Some(why) = accept_reprotect(&mut catalog, disk_id, rp, lineage)? {
                    return Ok(Opened::Reprotect(why));
                }
                match catalog.bind(disk_id, uuid, false, &cfg.retention, cfg.format)? {
                    Bind::Existing(row) => row,
                    _ => {
                        return Err(
                            Error::new(ErrorKind::Catalog, "the reprotected disk changed under the target")
                                .disk(disk_id),
                        )
                    }
                }
            }
        };
        let held = if fresh { None } else { catalog.history(disk_id)? };
        let history = match (held, History::from_lineage(lineage, tidemark_util::now_ns())) {
            (Some(h), Some(theirs)) if h.current().id != theirs.current().id => {
                return Ok(Opened::OtherGeneration {
                    held: h.current().id,
                    theirs: theirs.current().id,
                })
            }
            (None, Some(theirs)) => {
                catalog.set_history(disk_id, &theirs)?;
                info!(generation = %theirs.current().id, "data generation recorded");
                Some(theirs)
            }
            (h, _) => h,
        };
        let dir = replica::ensure_disk_dir(data_dir, disk_id)?;
        if let Some(kept) = &row.replaced_uuid {
            // Move first, then clear the mark: a crash in between finds
            // the moves done and just clears it.
            let to = tidemark_catalog::layout::disk_dir(data_dir, kept);
            replica::keep_history(&dir, &to)?;
            warn!(
                kept = %kept,
                "the old binding's history (replica, undo, points) is kept as disk {kept}: tidemark points and \
                 tidemark mount read it"
            );
            catalog.clear_replaced(disk_id)?;
        }
        let halts = catalog.open_halts(disk_id)?;
        let replica = Replica::open(&dir, row.format, disk_size)?;
        let window_path: PathBuf = dir.join(WINDOW_FILE);
        let window = WindowFile::create(&window_path, window_blocks).io_at("create", &window_path)?;
        let opts = UndoOptions {
            segment_bytes: cfg.segment_bytes,
            pins,
        };
        Ok(Opened::Ready(Box::new(Work {
            applier: DiskApplier::new(row, halts, replica, catalog, &dir, opts)?,
            unpacker: Unpacker::new(window_blocks, window),
            disk_id: disk_id.to_string(),
            generation: history.map_or([0; 16], |h| h.current().id.0),
        })))
    }

    fn process(&mut self, p: &PackedBatch) -> Result<Outcome> {
        let records = match self.unpacker.unpack(p) {
            Ok(r) => r,
            Err(e) => {
                return Err(match self.unpacker.store_mut().take_error() {
                    Some(io) => Error::with_source(ErrorKind::Io, "dedup window", io).disk(&self.disk_id),
                    None => Error::malformed(format!("packed batch: {}", e.msg))
                        .disk(&self.disk_id)
                        .seq(p.first_seq),
                })
            }
        };
        self.applier
            .apply(records, p.flags & PACKED_GAP != 0)
            .map_err(|e| e.disk(&self.disk_id))
    }
}

async fn read_hello<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    timeout: Duration,
    stop: &CancellationToken,
) -> Result<Option<tidemark_wire::frame::Hello>, End> {
    let f = tokio::select! {
        _ = stop.cancelled() => return Err(End::Close("the target is stopping".into())),
        r = tokio::time::timeout(timeout, reader.next()) => r,
    };
    match f {
        Err(_) => Err(refuse(
            ErrorCode::Malformed,
            format!("no Hello within {} s", timeout.as_secs()),
        )),
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(Frame::Hello(h)))) => Ok(Some(h)),
        Ok(Ok(Some(f))) => Err(refuse(
            ErrorCode::Malformed,
            format!("expected Hello, got a {} frame", f.name()),
        )),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Read and check the Hello, claim the disk for this connection and open
/// its applier. `Ok(None)`: the peer went away before saying Hello.
async fn admit<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<Option<(Box<Work>, LiveGuard)>, End> {
    let cfg = &shared.cfg;
    let Some(hello) = read_hello(reader, cfg.hello_timeout, stop).await? else {
        return Ok(None);
    };
    let id = hello.disk_id.clone();
    tracing::Span::current().record("disk", tracing::field::display(&id));
    tidemark_net::check_hello(&hello, "target", Role::Collector, &cfg.token).map_err(|r| refuse(r.code, r.reason))?;
    let Some(live) = LiveGuard::claim(shared, &id) else {
        return Err(refuse(
            ErrorCode::Busy,
            format!("disk {id} already has a live connection"),
        ));
    };
    if shared.is_failed_over(&id) {
        // Before Work::open: a forced rebind must not move the replica or
        // its undo away under a failover's export.
        return Err(failed_over_refusal(shared, &id, &hello.lineage).await);
    }
    let force = hello.flags & HELLO_FORCE_RESYNC != 0;
    let (cfg2, pins, uuid, size) = (cfg.clone(), shared.pins.clone(), hello.disk_uuid, hello.disk_size);
    let id2 = id.clone();
    let lineage = hello.lineage;
    let span = tracing::Span::current();
    let opened = tokio::task::spawn_blocking(move || {
        span.in_scope(|| Work::open(&cfg2, pins, &id2, &uuid, force, size, &lineage))
    })
    .await
    .map_err(|e| refuse(ErrorCode::Internal, format!("disk {id}: open failed: {e}")))??;
    let work = match opened {
        Opened::Ready(w) => w,
        Opened::FailedOver(f) => return Err(failed_over_end(&id, f.as_ref(), &hello.lineage)),
        Opened::Reprotect(why) => return Err(refuse(ErrorCode::DiskMismatch, why)),
        Opened::OtherGeneration { held, theirs } => {
            return Err(refuse(
                ErrorCode::DiskMismatch,
                format!(
                    "disk {id}: this replica holds data generation {held}, the Hello names generation {theirs}, \
                     which is not the same line of writes; to start afresh, protect the disk with a new, empty \
                     state directory and --force-resync (a whole-disk sync follows)"
                ),
            ))
        }
        Opened::Mismatch { bound_uuid } => {
            return Err(refuse(
                ErrorCode::DiskMismatch,
                format!(
                    "disk id {id} is bound to UUID {bound_uuid}, not {}; reconnect with FORCE_RESYNC (agent --force-resync) to replace its replica",
                    crate::catalog::format_uuid(&uuid)
                ),
            ))
        }
    };

    if work.applier.failed_over() || shared.is_failed_over(&id) {
        return Err(failed_over_refusal(shared, &id, &hello.lineage).await);
    }
    Ok(Some((work, live)))
}

/// A Hello for a replica adopted by `tidemark reprotect` (docs/failback.md,
/// section 3): the failed-over copy's agent, whose generation forked from
/// the replica's at seq F, takes it over when the old source wrote nothing
/// after F (or `--discard-divergent` was given); the old source's regions
/// written after F then wait as a halt, resynced from the copy. Returns why
/// the Hello cannot (None: accepted, the catalog updated).
fn accept_reprotect(catalog: &mut Catalog, id: &str, rp: Reprotect, l: &Lineage) -> Result<Option<String>> {
    let Some(held) = catalog.history(id)? else {
        return Ok(Some(format!(
            "disk {id}: the reprotected replica has no generation history"
        )));
    };
    let ours = held.current().id;
    if !l.is_known() {
        return Ok(Some(format!(
            "disk {id} was reprotected and waits for the failed-over copy's agent; this Hello names no data generation"
        )));
    }
    let theirs = GenerationId(l.generation);
    if l.parent != ours.0 {
        return Ok(Some(format!(
            "disk {id} was reprotected with generation {ours} up to seq {}; it waits for the failed-over copy's \
             agent (a generation forked from {ours}), and generation {theirs} is not one",
            rp.source_seq
        )));
    }
    let fork = l.fork_seq;
    // Tracking in doubt: the old source's state ends before the failover
    // point (restored from an older copy?), or it stopped tracking regions
    // the target had applied beyond the point (the failover took an
    // earlier point than the replica had reached). What it wrote in
    // between is not known: the whole disk is hash-compared.
    let doubt = if rp.source_seq < fork {
        Some(format!(
            "the old source's state ends at seq {} of generation {ours}, before the failover point (seq {fork})",
            rp.source_seq
        ))
    } else if fork < rp.tracked_after {
        Some(format!(
            "the failover point (seq {fork}) is before seq {}, up to which the old source stopped tracking what the \
             target had applied",
            rp.tracked_after
        ))
    } else {
        None
    };
    let owed = catalog.owed_after(id, fork)?;
    if rp.source_seq > fork && !rp.discard_divergent {
        let amount = match &doubt {
            None => tidemark_util::human::format_size(owed.bytes()),
            Some(why) => format!("an amount not known ({why})"),
        };
        return Ok(Some(format!(
            "disk {id} diverged: the old source (generation {ours}) wrote seqs {}..={} after the failover point \
             (seq {fork}), {amount} in regions the failed-over copy (generation {theirs}, forked at seq {fork}) never \
             got, and the copy has been written since. Run tidemark reprotect again with --discard-divergent to \
             overwrite them from the copy (the divergent state is kept first)",
            fork + 1,
            rp.source_seq,
        )));
    }
    let history = held
        .fork(theirs, fork, tidemark_util::now_ns())
        .map_err(|e| Error::new(ErrorKind::Malformed, e.to_string()).disk(id))?;
    catalog.accept_reprotect(id, fork, &history, &owed, doubt.is_some())?;
    info!(
        generation = %theirs,
        fork_seq = fork,
        owed_bytes = owed.bytes(),
        "reprotect: the failed-over copy's agent takes the replica over from the failover point"
    );
    if let Some(why) = doubt {
        warn!("reprotect: {why}: the whole disk is hash-compared with the copy (a full resync that sends only what differs)");
    }
    Ok(None)
}

/// The refusal of a disk this target stopped applying: `StaleGeneration`
/// once its failover is recorded (the old source is fenced), `Busy` while
/// one runs (it may still fail, and the disk resume).
async fn failed_over_refusal(shared: &Arc<Shared>, id: &str, lineage: &Lineage) -> End {
    let (data, id2) = (shared.cfg.data_dir.clone(), id.to_string());
    let recorded = tokio::task::spawn_blocking(move || Catalog::open(&data).and_then(|c| c.failovers(&id2))).await;
    match recorded {
        Ok(Ok(mut f)) if !f.is_empty() => failed_over_end(id, f.pop().as_ref(), lineage),
        Ok(Err(e)) => refuse(ErrorCode::Internal, format!("disk {id}: reading its failovers: {e}")),
        _ => refuse(
            ErrorCode::Busy,
            format!("disk {id} is being failed over: this target applies none of its writes meanwhile"),
        ),
    }
}

/// The refusal of a Hello for a failed-over disk: the generation the
/// failover ended (or one not known) is stale, and fenced; a newer line
/// (the disk came back the other way) finds no replica here until
/// `tidemark reprotect` adopts one, which is no reason to fence it.
fn failed_over_end(id: &str, f: Option<&Failover>, l: &Lineage) -> End {
    let ended = f.and_then(|f| f.generation.as_deref()).and_then(GenerationId::from_hex);
    match ended {
        Some(g) if l.is_known() && g.0 != l.generation => refuse(
            ErrorCode::DiskMismatch,
            format!(
                "disk {id} was failed over here (generation {g} ended); generation {} is a newer line, which this \
                 target holds no replica for: adopt one with tidemark reprotect on this site",
                GenerationId(l.generation)
            ),
        ),
        _ => refuse(ErrorCode::StaleGeneration, failed_over_reason(id, f)),
    }
}

/// Why a failed-over disk's source is refused (fenced): which failover
/// ended its generation, and what to do instead.
fn failed_over_reason(id: &str, f: Option<&Failover>) -> String {
    let Some(f) = f else {
        return format!("disk {id} was failed over: this target applies none of its writes any more");
    };
    let generation = f
        .generation
        .as_deref()
        .and_then(GenerationId::from_hex)
        .map_or_else(String::new, |g| format!(" ended generation {g} and"));
    let tag = f.point.tag.as_deref().map_or_else(String::new, |t| format!(" {t:?}"));
    format!(
        "disk {id} was failed over on {} at seq {} ({} point{tag}) to {}: the failover{generation} fenced the old \
         source; this target applies none of its writes any more. Stop its agent, or protect the failed-over copy \
         instead (docs/failback.md)",
        tidemark_util::human::format_unix_time(i64::try_from(f.at_ns / 1_000_000_000).unwrap_or(i64::MAX)),
        f.point.seq,
        f.point.kind.as_str(),
        f.output
    )
}

/// What the Welcome and the first frames say, read from the applier
/// before any await (it is not `Sync`).
struct Greeting {
    applied: u64,
    last: TargetState,
    owed: Vec<Request>,
    generation: [u8; 16],
}

fn greeting(work: &Work) -> Greeting {
    let applied = work.applier.applied_seq();
    let last = work.applier.state();
    // Requests are not durable upstream until acted on: repeat them on
    // every new connection while they are owed.
    // One request per range still pending (not their bounds): a halt of
    // scattered regions (a reprotect's) resyncs only those.
    let mut owed: Vec<Request> = work
        .applier
        .open_halts()
        .iter()
        .flat_map(|h| {
            h.pending.iter().map(|(offset, length)| Request::Resync {
                seq: h.seq,
                offset,
                length,
            })
        })
        .collect();
    if work.applier.full_resync_owed() {
        owed.push(Request::FullResync);
    }
    Greeting {
        applied,
        last,
        owed,
        generation: work.generation,
    }
}

/// Welcome the collector, register the connection's activity (for drain
/// and failover) and repeat every request still owed. Returns the state
/// reported and the drains' probe channel.
async fn greet(
    wr: &mut Writer,
    shared: &Arc<Shared>,
    id: &str,
    g: Greeting,
) -> Result<
    (
        TargetState,
        tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<Held>>,
    ),
    End,
> {
    let Greeting {
        applied,
        last,
        owed,
        generation,
    } = g;
    let flags = if applied == 0 { WELCOME_NEED_FULL_SYNC } else { 0 };
    send(
        wr,
        &Frame::Welcome {
            acked_seq: applied,
            flags,
            generation,
        },
    )
    .await?;
    info!(applied_seq = applied, state = last.state.name(), "collector connected");
    let (probe, probes) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<Held>>();
    shared.activity.lock().unwrap_or_else(|e| e.into_inner()).insert(
        id.to_string(),
        Activity {
            last_batch: Instant::now(),
            applying: false,
            applied_seq: applied,
            probe,
        },
    );
    for r in owed {
        send(wr, &Frame::Request(r)).await?;
    }
    send(wr, &Frame::TargetState(last)).await?;
    Ok((last, probes))
}

async fn session<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    wr: &mut Writer,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    slots: &mut tidemark_net::Admitted,
) -> Result<Option<String>, End> {
    let Some((mut work, _live)) = admit(reader, shared, stop).await? else {
        return Ok(None);
    };
    slots.authenticated();
    reader.set_max_body(MAX_BODY);
    let id = work.disk_id.clone();
    // The line this session applies (for the refusal once it is failed over).
    let line = Lineage {
        generation: work.generation,
        ..Lineage::default()
    };
    let (mut last, mut probes) = greet(wr, shared, &id, greeting(&work)).await?;
    let mut probe_waiters: Vec<(u64, tokio::sync::oneshot::Sender<Held>)> = Vec::new();
    let mut nonce: u64 = 0;
    // Replies to calls answered off this loop (a drill takes minutes).
    let (replies, mut to_reply) = tokio::sync::mpsc::unbounded_channel::<Frame>();
    let mut tick = tokio::time::interval(shared.cfg.state_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return Ok(Some("the target is stopping".into())),
            _ = tick.tick() => {
                if shared.is_failed_over(&id) {
                    // Once the failover is recorded, the source is told at
                    // once, not at its next write (the drain before it
                    // needs this connection, so not earlier).
                    let end = failed_over_refusal(shared, &id, &line).await;
                    if matches!(&end, End::Refuse { code: ErrorCode::StaleGeneration, .. }) {
                        return Err(end);
                    }
                }
                send(wr, &Frame::TargetState(last)).await?;
                continue;
            }
            Some(reply) = to_reply.recv() => {
                send(wr, &reply).await?;
                continue;
            }
            Some(answer) = probes.recv() => {
                nonce += 1;
                probe_waiters.retain(|(_, w)| !w.is_closed());
                probe_waiters.push((nonce, answer));
                send(wr, &Frame::Request(Request::StatusNow { nonce })).await?;
                continue;
            }
            f = reader.next() => f?,
        };
        let frame_permit = reader.take_permit();
        let p = match frame {
            None => return Ok(Some("the collector closed the connection".into())),
            Some(Frame::Packed(p)) => p,
            Some(Frame::Request(Request::StatusNow { .. })) => {
                send(wr, &Frame::TargetState(last)).await?;
                continue;
            }
            Some(Frame::Progress(p)) => {
                // The answer to a drain's StatusNow: what the collector holds.
                if let Some(i) = probe_waiters.iter().position(|(n, _)| *n == p.nonce) {
                    let (_, w) = probe_waiters.swap_remove(i);
                    let _ = w.send(Held {
                        seq: p.source_seq,
                        agent_answered: p.time_ns != 0,
                        agent_mode: p.mode,
                    });
                } else {
                    debug!(nonce = p.nonce, "a progress report nobody waits for");
                }
                continue;
            }
            Some(Frame::HashQuery { offset, length }) => {
                let (w, hashes) = hash_query(work, offset, length).await?;
                work = w;
                send(wr, &Frame::ChunkHashes { offset, hashes }).await?;
                continue;
            }
            Some(Frame::Call { nonce, body }) => {
                match Call::parse(&body) {
                    Err(why) => send(wr, &reply_frame(nonce, Err(why))).await?,
                    Ok(Call::SetRetention(r)) => {
                        let (w, answer) = set_retention(work, &r).await?;
                        work = w;
                        send(wr, &reply_frame(nonce, answer)).await?;
                    }
                    Ok(Call::GetRetention) => {
                        let now = crate::calls::retention_of(work.applier.policy());
                        send(wr, &reply_frame(nonce, Ok(serde_json::json!({ "retention": now })))).await?;
                    }
                    Ok(call) => {
                        let (sh, d, out) = (shared.clone(), id.clone(), replies.clone());
                        tokio::spawn(
                            async move {
                                let answer = crate::calls::answer(sh, d, call).await;
                                let _ = out.send(reply_frame(nonce, answer));
                            }
                            .in_current_span(),
                        );
                    }
                }
                continue;
            }
            Some(Frame::Error { code, reason }) => {
                return Err(End::Close(format!("the collector reported {code}: {reason}")))
            }
            Some(f) => {
                return Err(refuse(
                    ErrorCode::Malformed,
                    format!("disk {id}: unexpected {} frame from a collector", f.name()),
                ))
            }
        };
        if shared.is_failed_over(&id) {
            return Err(failed_over_refusal(shared, &id, &line).await);
        }
        let (w, r) = apply_batch(shared, &id, work, p, wr, &mut tick, last).await?;
        work = w;
        drop(frame_permit);
        let o = r?;
        report(wr, &o, &last).await?;
        last = o.state;
    }
}

/// The replica's hashes of `offset..offset+length` for an agent's
/// hash-compare resync, read on a blocking thread between batches. A
/// replica that cannot be read answers no hashes: the agent then sends
/// the data.
async fn hash_query(work: Box<Work>, offset: u64, length: u64) -> Result<(Box<Work>, Vec<[u8; 32]>), End> {
    let job = tokio::task::spawn_blocking(move || {
        let r = crate::compare::hash_span(work.applier.replica(), offset, length);
        (work, r)
    });
    let (work, r) = job
        .await
        .map_err(|e| refuse(ErrorCode::Internal, format!("hash task failed: {e}")))?;
    let hashes = r.unwrap_or_else(|e| {
        warn!(
            offset,
            length, "cannot hash the replica for a compare; the agent sends the data: {e}"
        );
        Vec::new()
    });
    Ok((work, hashes))
}

/// A call's answer as a Reply frame (a refusal is a JSON string).
fn reply_frame(nonce: u64, answer: std::result::Result<serde_json::Value, String>) -> Frame {
    let (ok, v) = match answer {
        Ok(v) => (true, v),
        Err(why) => (false, serde_json::Value::String(why)),
    };
    let mut body = v.to_string();
    if body.len() > tidemark_wire::frame::MAX_REPLY_BODY {
        body = serde_json::Value::String(format!(
            "the answer is {} bytes, over the {}-byte limit of a reply: ask for fewer",
            body.len(),
            tidemark_wire::frame::MAX_REPLY_BODY
        ))
        .to_string();
        return Frame::Reply { nonce, ok: false, body };
    }
    Frame::Reply { nonce, ok, body }
}

/// Change the disk's retention between batches (the applier is this
/// session's); the answer is the retention now in force.
async fn set_retention(
    mut work: Box<Work>,
    r: &tidemark_wire::call::Retention,
) -> Result<(Box<Work>, std::result::Result<serde_json::Value, String>), End> {
    let policy = match crate::calls::policy_of(r) {
        Ok(p) => p,
        Err(why) => return Ok((work, Err(why))),
    };
    let job = tokio::task::spawn_blocking(move || {
        let r = work.applier.set_policy(policy.clone()).map_err(|e| e.to_string());
        let now = crate::calls::retention_of(work.applier.policy());
        (work, r.map(|()| serde_json::json!({ "retention": now })))
    });
    let (work, answer) = job
        .await
        .map_err(|e| refuse(ErrorCode::Internal, format!("retention task failed: {e}")))?;
    if answer.is_ok() {
        info!(disk = %work.disk_id, ?r, "retention changed by the configuration server");
    }
    Ok((work, answer))
}

/// Apply one packed batch on a blocking thread, reporting state while it
/// runs. The job always runs to its end before this returns, so the disk
/// is never applied by two threads.
async fn apply_batch(
    shared: &Arc<Shared>,
    id: &str,
    mut work: Box<Work>,
    p: PackedBatch,
    wr: &mut Writer,
    tick: &mut tokio::time::Interval,
    last: TargetState,
) -> Result<(Box<Work>, Result<Outcome>), End> {
    shared.with_activity(id, |a| {
        if let Some(a) = a {
            a.last_batch = Instant::now();
            a.applying = true;
        }
    });
    // The decompressed stream and the records unpacked from it.
    let decoded_permit = shared
        .memory
        .decoded
        .clone()
        .acquire_many_owned(kib_permits(2 * u64::from(p.raw_len), DECODED_BUDGET))
        .await
        .map_err(|_| End::Close("the memory budget is closed".into()))?;
    // Apply on a blocking thread; keep reporting state meanwhile. The
    // job always runs to its end before this connection ends, so the
    // disk is never applied by two threads.
    let span = tracing::Span::current();
    let lock = shared.apply_lock(id);
    let (sh, id2) = (shared.clone(), id.to_string());
    let stats = shared.stats.disk(id);
    let mut job = tokio::task::spawn_blocking(move || {
        let _applying = lock.lock().unwrap_or_else(|e| e.into_inner());
        // A failover may have stopped the disk since the check above
        // (it then waits for this lock before it picks its point).
        if sh.is_failed_over(&id2) {
            let e = Error::new(
                ErrorKind::FailedOver,
                format!("disk {id2} was failed over: the target no longer applies to it"),
            );
            return (work, Err(e));
        }
        let started = Instant::now();
        let apply = tracing::info_span!(parent: &span, "apply", first_seq = p.first_seq, count = p.count);
        let r = apply.in_scope(|| work.process(&p));
        stats.applied(p.count, started.elapsed(), r.is_ok());
        (work, r)
    });
    let (w, r) = loop {
        tokio::select! {
            j = &mut job => break j.map_err(|e| refuse(ErrorCode::Internal, format!("disk {id}: apply failed: {e}")))?,
            _ = tick.tick() => {
                let _ = send(wr, &Frame::TargetState(last)).await;
            }
        }
    };
    drop(decoded_permit);
    let applied_now = w.applier.applied_seq();
    shared.with_activity(id, |a| {
        if let Some(a) = a {
            a.applying = false;
            a.applied_seq = applied_now;
            a.last_batch = Instant::now();
        }
    });
    Ok((w, r))
}

/// Acknowledge an applied batch, ask for what it showed to be missing, and
/// report the disk's state if it changed.
async fn report(wr: &mut Writer, o: &Outcome, last: &TargetState) -> Result<(), End> {
    fail::fail_point!("target-before-ack", |_| Err(End::Close(
        "failpoint target-before-ack".into()
    )));
    send(wr, &Frame::Ack { seq: o.ack }).await?;
    fail::fail_point!("target-after-ack", |_| Err(End::Close(
        "failpoint target-after-ack".into()
    )));
    for h in &o.new_halts {
        if let Some((offset, length)) = h.pending.bounds() {
            send(
                wr,
                &Frame::Request(Request::Resync {
                    seq: h.seq,
                    offset,
                    length,
                }),
            )
            .await?;
        }
    }
    if o.request_full_resync {
        info!(seq = o.ack, "asking for a full resync");
        send(wr, &Frame::Request(Request::FullResync)).await?;
    }
    if state_key(&o.state) != state_key(last) {
        info!(
            applied_seq = o.state.applied_seq,
            halted_seq = o.state.halted_seq,
            pending_bytes = o.state.pending_bytes,
            "disk is now {}",
            o.state.state.name()
        );
        send(wr, &Frame::TargetState(o.state)).await?;
    }
    Ok(())
}
