//! The collector's shared state: the disks it knows, their spool indexes,
//! links to connected agents, what the target last reported, and the
//! counters behind the status API and metrics.
//!
//! Locks: every `Mutex` here is a std mutex held for a few field updates,
//! never across an `.await` or any I/O.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;
use tidemark_formats::generation::GenerationId;
use tidemark_util::now_ns;
use tidemark_wire::frame::{AgentMode, Frame, Lineage, Progress, ReplicaState, Request, TargetState};
use tidemark_wire::DiskId;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use tidemark_wire::record::FLAG_SYNC;
use tidemark_wire::RecordKind;

use crate::catalog::{uuid_text, Catalog, DiskRow, Fence, Resync, Severity};
use crate::config::Config;

/// Bytes of frames and spool files being decoded, packed or written at
/// once, across all connections (a frame body is at most 40 MiB, and
/// decoding holds it about twice).
pub(crate) const MEMORY_BUDGET: u64 = 160 << 20;

/// Lag beyond which a connected disk is reported as backlogged.
const BACKLOG_LAG_S: f64 = 10.0;

/// A frame for an agent connection's writer; `done` fires once it is written.
#[derive(Debug)]
pub(crate) struct Out {
    pub frame: Frame,
    pub done: Option<oneshot::Sender<()>>,
}

/// The connected agent of a disk.
#[derive(Debug)]
pub(crate) struct AgentLink {
    pub conn: u64,
    pub tx: mpsc::Sender<Out>,
}

/// One spool file in a disk's index.
#[derive(Clone, Debug)]
pub(crate) struct SpoolEntry {
    pub last: u64,
    pub len: u64,
    /// Time of the first record (0 when the file's header is unreadable).
    pub first_time_ns: u64,
    pub payload_bytes: u64,
    pub path: PathBuf,
}

#[derive(Debug)]
pub(crate) struct DiskState {
    pub uuid: [u8; 16],
    /// Bumped on every rebind; a target session of an older binding ends.
    pub binding: u64,
    pub session: CancellationToken,
    /// Highest seq durable here (spool or already trimmed).
    pub acked_seq: u64,
    /// Highest seq the target acknowledged.
    pub applied_seq: u64,
    pub trimmed_seq: u64,
    /// Spool files by first seq.
    pub files: BTreeMap<u64, SpoolEntry>,
    pub spool_bytes: u64,
    pub agent: Option<AgentLink>,
    pub target_connected: bool,
    /// The agent identity the disk is bound to (None: not over TLS).
    pub owner: Option<String>,
    /// Why the target refused this disk's last Hello (a divergence, another
    /// generation, a disk mismatch), with what waits here for it; cleared
    /// by its next Welcome.
    pub target_refusal: Option<String>,
    /// Frames for the target on its current session (an agent's
    /// `HashQuery`); `None` while no session is up.
    pub to_target: Option<tokio::sync::mpsc::UnboundedSender<Frame>>,
    /// `HashQuery` frames that came while no target session was up: sent
    /// when one starts (at most [`MAX_PENDING_QUERIES`], the newest).
    pub pending_queries: Vec<Frame>,
    /// Hash queries relayed to the target and not answered yet (at most
    /// [`MAX_PENDING_QUERIES`]: each makes the target read 32 MiB).
    pub queries_in_flight: usize,
    pub target_state: Option<TargetState>,
    pub progress: Option<(Progress, Instant)>,
    /// (when, written_bytes, sync_done) of recent Progress reports.
    pub samples: VecDeque<(Instant, u64, u64)>,
    pub pending_full_sync: bool,
    pub full_sync_since: u64,
    pub force_target: bool,
    /// The disk's size (from the agent's hello; 0 until known).
    pub disk_size: u64,
    /// The data generation its agent holds (default: not known yet).
    pub lineage: Lineage,
    /// A failover ended that generation: its agent is refused, nothing
    /// more is spooled or forwarded.
    pub fence: Option<Fence>,
    /// Range resyncs owed to the agent (mirrored in the catalog), each with
    /// the parts not yet covered by sync records spooled after its seq.
    pub owed_resyncs: Vec<OwedResync>,
    /// `refresh` calls waiting for the Progress that echoes their nonce.
    pub nonce_waiters: Vec<(u64, oneshot::Sender<Progress>)>,
    /// Calls (crate::calls) waiting for the Reply that echoes their nonce.
    pub call_waiters: crate::calls::Waiters,
}

impl DiskState {
    /// End the agent's and the forwarder's sessions of the current state
    /// (a batch in flight is not indexed: its binding is gone).
    pub(crate) fn end_sessions(&mut self) {
        self.binding += 1;
        self.session.cancel();
        self.session = CancellationToken::new();
    }

    /// Start the disk's line over (a rebind, or a line forked after a
    /// fence): the sessions end, this collector holds every seq up to
    /// `held`, knows nothing of the target yet and owes no resync.
    pub(crate) fn start_over(&mut self, held: u64, pending_full_sync: bool, force_target: bool) {
        self.end_sessions();
        self.acked_seq = held;
        self.trimmed_seq = held;
        self.applied_seq = 0;
        self.target_state = None;
        self.pending_full_sync = pending_full_sync;
        self.full_sync_since = 0;
        self.force_target = force_target;
        self.owed_resyncs.clear();
    }
}

/// Hash queries kept per disk while its target is away (an agent asks a
/// few windows ahead; more are old repeats).
pub(crate) const MAX_PENDING_QUERIES: usize = 16;

/// A range resync owed to the agent until `Sync`/`Zero+SYNC` records with a
/// seq above the request's have covered the whole range (what the target
/// waits for before it lifts the halt). Delivering the request is not
/// enough: a connection can drop with the frame still queued or unread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OwedResync {
    pub req: Resync,
    /// Parts of the range not covered yet, `[start, end)`, ascending.
    pub left: Vec<(u64, u64)>,
}

impl OwedResync {
    pub(crate) fn new(req: Resync) -> Self {
        let end = req.offset.saturating_add(req.length);
        Self {
            req,
            left: if end > req.offset {
                vec![(req.offset, end)]
            } else {
                Vec::new()
            },
        }
    }

    /// Take `[start, end)`, synced at `seq`, off what is left; true once
    /// nothing is left.
    pub(crate) fn cover(&mut self, seq: u64, start: u64, end: u64) -> bool {
        if seq > self.req.seq && end > start {
            let mut next = Vec::with_capacity(self.left.len() + 1);
            for &(a, b) in &self.left {
                if end <= a || start >= b {
                    next.push((a, b));
                    continue;
                }
                if a < start {
                    next.push((a, start));
                }
                if end < b {
                    next.push((end, b));
                }
            }
            self.left = next;
        }
        self.left.is_empty()
    }
}

/// One disk the collector serves.
#[derive(Debug)]
pub(crate) struct Disk {
    pub id: DiskId,
    pub dir: PathBuf,
    pub st: Mutex<DiskState>,
    /// A batch was spooled, or the binding changed: the forwarder looks again.
    pub spooled: Notify,
    pub wire_bytes: AtomicU64,
    pub payload_bytes: AtomicU64,
    pub dedup_hits: AtomicU64,
    pub zero_blocks: AtomicU64,
    pub corrupt_records: AtomicU64,
}

impl Disk {
    pub(crate) fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Collector-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub refused: AtomicU64,
    pub batches_spooled: AtomicU64,
    pub records_spooled: AtomicU64,
    pub bytes_spooled: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub batches_forwarded: AtomicU64,
    pub spool_full_episodes: AtomicU64,
}

pub(crate) struct Shared {
    pub cfg: Config,
    pub catalog: Catalog,
    disks: Mutex<BTreeMap<DiskId, Arc<Disk>>>,
    pub spool_bytes: AtomicU64,
    /// Notified whenever the spool shrinks.
    pub space: Notify,
    pub spool_full: AtomicBool,
    pub agents_connected: AtomicU64,
    pub started: Instant,
    pub stop: CancellationToken,
    pub tracker: TaskTracker,
    /// Permits are KiB of [`MEMORY_BUDGET`].
    pub memory: Arc<Semaphore>,
    pub counters: Counters,
    /// Refused connections and failed handshakes: logged at a bounded rate.
    pub refused_log: tidemark_util::ratelog::RateLimitedLog,
    next_conn: AtomicU64,
    /// Nonces for `Request::StatusNow` (never 0: that marks a periodic report).
    next_nonce: AtomicU64,
    /// The agent listener's connection slots.
    pub admission: tidemark_net::Admission,
    /// Rebinds an operator allowed (`POST /api/v1/disks/{id}/rebind`), by disk.
    rebind_grants: Mutex<BTreeMap<String, RebindGrant>>,
    /// The active alerts (`crate::alerts`).
    pub alerts: crate::alerts::Alerts,
    /// Each disk's policy and what is known of its drills (`crate::calls`).
    pub book: crate::calls::Book,
    /// Each disk's history (`crate::history`).
    pub history: crate::history::Histories,
}

/// An operator's leave for the next Hello of a disk to rebind it: to a new
/// disk UUID (with the agent's `--force-resync`) and, over TLS, to another
/// agent identity (`owner`, or any if None). Used once; it lapses after
/// [`REBIND_GRANT_TTL`].
#[derive(Clone, Debug)]
pub(crate) struct RebindGrant {
    pub owner: Option<String>,
    pub until: Instant,
}

/// How long an operator's rebind leave waits for the agent.
pub(crate) const REBIND_GRANT_TTL: Duration = Duration::from_secs(3600);

/// KiB permits for `bytes` of the memory budget (at least 1, at most all).
pub(crate) fn kib_permits(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).clamp(1, MEMORY_BUDGET / 1024)).unwrap_or(u32::MAX)
}

impl Shared {
    /// Open the catalog in the (claimed) spool directory (blocking). The
    /// disks' spools are indexed by `spool::load_all`.
    pub(crate) fn open(cfg: Config, stop: CancellationToken) -> Result<Arc<Self>> {
        let catalog = Catalog::open(&cfg.spool.join("catalog.db"))?;
        let shared = Arc::new(Self {
            catalog,
            disks: Mutex::new(BTreeMap::new()),
            spool_bytes: AtomicU64::new(0),
            space: Notify::new(),
            spool_full: AtomicBool::new(false),
            agents_connected: AtomicU64::new(0),
            started: Instant::now(),
            stop,
            tracker: TaskTracker::new(),
            memory: Arc::new(Semaphore::new(
                usize::try_from(MEMORY_BUDGET / 1024).unwrap_or(usize::MAX),
            )),
            counters: Counters::default(),
            refused_log: Default::default(),
            next_conn: AtomicU64::new(1),
            // Unlikely to repeat a nonce of an earlier run that an agent
            // could still be answering.
            next_nonce: AtomicU64::new((now_ns() & 0xffff_ffff_ffff) << 8 | 1),
            rebind_grants: Mutex::new(BTreeMap::new()),
            admission: tidemark_net::Admission::default(),
            alerts: crate::alerts::Alerts::default(),
            book: crate::calls::Book::default(),
            history: crate::history::Histories::default(),
            cfg,
        });
        Ok(shared)
    }

    /// Allow the next Hello of `disk` to rebind it (an operator's action).
    /// Record an event in the catalog's log (`GET /api/v1/events`); a
    /// failure to record is logged, never an error of the caller's.
    pub(crate) fn event(&self, disk: Option<&str>, kind: &str, severity: Severity, message: &str, who: Option<&str>) {
        if let Err(e) = self.catalog.add_event(disk, kind, severity, message, who) {
            error!(disk = ?disk, kind, "cannot record an event ({message}): {e:#}");
        }
    }

    pub(crate) fn grant_rebind(&self, disk: &str, owner: Option<String>) {
        let g = RebindGrant {
            owner,
            until: Instant::now() + REBIND_GRANT_TTL,
        };
        self.rebind_grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(disk.to_string(), g);
    }

    /// The live rebind leave for `disk` that covers identity `who` (None:
    /// a plaintext connection), if any; `take` uses it up.
    pub(crate) fn rebind_grant(&self, disk: &str, who: Option<&str>, take: bool) -> Option<RebindGrant> {
        let mut m = self
            .rebind_grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.retain(|_, g| g.until > Instant::now());
        let g = m.get(disk)?;
        if g.owner.as_deref().is_some_and(|o| Some(o) != who) {
            return None;
        }
        if take {
            m.remove(disk)
        } else {
            Some(g.clone())
        }
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh nonce for a `StatusNow` request (never 0).
    pub(crate) fn next_nonce(&self) -> u64 {
        loop {
            let n = self.next_nonce.fetch_add(1, Ordering::Relaxed);
            if n != 0 {
                return n;
            }
        }
    }

    fn disks(&self) -> MutexGuard<'_, BTreeMap<DiskId, Arc<Disk>>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn disk(&self, id: &str) -> Option<Arc<Disk>> {
        self.disks().get(id).cloned()
    }

    pub(crate) fn all_disks(&self) -> Vec<Arc<Disk>> {
        self.disks().values().cloned().collect()
    }

    pub(crate) fn disk_count(&self) -> usize {
        self.disks().len()
    }

    pub(crate) fn insert_disk(&self, disk: Arc<Disk>) {
        self.disks().insert(disk.id.clone(), disk);
    }

    /// A new in-memory disk for a catalog row, with an empty spool index.
    pub(crate) fn new_disk(&self, row: &DiskRow) -> Disk {
        Disk {
            id: row.disk_id.clone(),
            dir: self.cfg.spool.join(&row.disk_id),
            st: Mutex::new(DiskState {
                uuid: row.disk_uuid,
                binding: 0,
                session: CancellationToken::new(),
                acked_seq: row.trimmed_seq,
                applied_seq: 0,
                trimmed_seq: row.trimmed_seq,
                files: BTreeMap::new(),
                spool_bytes: 0,
                agent: None,
                target_connected: false,
                target_refusal: None,
                to_target: None,
                pending_queries: Vec::new(),
                queries_in_flight: 0,
                target_state: None,
                progress: None,
                samples: VecDeque::new(),
                pending_full_sync: row.pending_full_sync,
                full_sync_since: row.full_sync_since,
                force_target: row.force_target,
                disk_size: row.disk_size,
                lineage: row.lineage,
                fence: row.fence.clone(),
                owner: row.owner.clone(),
                owed_resyncs: Vec::new(),
                nonce_waiters: Vec::new(),
                call_waiters: Vec::new(),
            }),
            spooled: Notify::new(),
            wire_bytes: AtomicU64::new(0),
            payload_bytes: AtomicU64::new(0),
            dedup_hits: AtomicU64::new(0),
            zero_blocks: AtomicU64::new(0),
            corrupt_records: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_spool_full(&self) -> bool {
        self.spool_bytes.load(Ordering::Acquire) >= self.cfg.spool_cap
    }

    pub(crate) fn spool_grew(&self, bytes: u64) {
        self.spool_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(crate) fn spool_shrank(&self, bytes: u64) {
        let _ = self
            .spool_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(bytes)));
        if self.spool_full.load(Ordering::Acquire) && !self.is_spool_full() {
            self.spool_full.store(false, Ordering::Release);
            info!(
                spool_bytes = self.spool_bytes.load(Ordering::Relaxed),
                "spool below its cap again: reading from agents"
            );
        }
        self.space.notify_waiters();
    }

    /// Wait until the spool is below its cap (or the collector stops). The
    /// first wait of an episode logs one WARN.
    pub(crate) async fn wait_for_space(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_spool_full() || self.stop.is_cancelled() {
                return;
            }
            if !self.spool_full.swap(true, Ordering::AcqRel) {
                self.counters.spool_full_episodes.fetch_add(1, Ordering::Relaxed);
                warn!(
                    spool_bytes = self.spool_bytes.load(Ordering::Relaxed),
                    spool_cap = self.cfg.spool_cap,
                    "spool full: not reading from agents until the target catches up"
                );
            }
            tokio::select! {
                _ = notified => {}
                _ = self.stop.cancelled() => return,
                // A trim on another path may have raced the check above.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// A request from the target (or from the spool reader) for `disk`'s
    /// agent: kept (in the catalog for a restart) until the agent's records
    /// show it was acted on, and sent now if the agent is connected. Owed
    /// requests are sent again on every new agent connection.
    pub(crate) fn relay_to_agent(&self, disk: &Disk, req: Request) {
        match req {
            Request::FullResync => {
                let since = {
                    let mut st = disk.lock();
                    st.pending_full_sync = true;
                    st.full_sync_since = st.acked_seq;
                    st.acked_seq
                };
                if let Err(e) = self.catalog.set_pending_full_sync(&disk.id, true, since) {
                    error!(disk = %disk.id, "cannot record an owed full resync in the catalog: {e:#}");
                }
                info!(disk = %disk.id, "full resync requested; owed to the agent until its sync starts");
                self.event(
                    Some(&disk.id),
                    "resync",
                    Severity::Warning,
                    "the target asked for a full resync: owed to the agent until its sync starts",
                    None,
                );
            }
            Request::Resync { seq, offset, length } => {
                let r = Resync { seq, offset, length };
                if let Err(e) = self.catalog.add_resync(&disk.id, r) {
                    error!(disk = %disk.id, seq, "cannot record an owed resync in the catalog: {e:#}");
                }
                {
                    let mut st = disk.lock();
                    if !st.owed_resyncs.iter().any(|o| o.req == r) {
                        st.owed_resyncs.push(OwedResync::new(r));
                    }
                }
                info!(disk = %disk.id, seq, offset, length, "resync requested for a range; owed to the agent until synced");
                self.event(
                    Some(&disk.id),
                    "resync",
                    Severity::Info,
                    &format!(
                        "the target asked for a resync of {} at offset {offset} (seq {seq})",
                        tidemark_util::human::format_size(length)
                    ),
                    None,
                );
            }
            Request::StatusNow { .. } | Request::Quiesce { .. } => {}
        }
        let tx = disk.lock().agent.as_ref().map(|a| a.tx.clone());
        let Some(tx) = tx else {
            return;
        };
        // Not try_send: a full queue must not lose the request. If the
        // connection ends first, the request is still owed and goes out
        // again on the next one.
        self.tracker.spawn(async move {
            let _ = tx
                .send(Out {
                    frame: Frame::Request(req),
                    done: None,
                })
                .await;
        });
    }

    /// Owed range resyncs to send to a newly connected agent.
    pub(crate) fn owed_resyncs(&self, disk: &Disk) -> Vec<Resync> {
        disk.lock().owed_resyncs.iter().map(|o| o.req).collect()
    }

    /// Sync data that was just spooled (`Sync` and `Zero+SYNC` records:
    /// seq, offset, length) takes its ranges off the owed resyncs; those
    /// fully covered are no longer owed.
    pub(crate) fn cover_resyncs(&self, disk: &Disk, synced: &[(u64, u64, u64)]) {
        if synced.is_empty() {
            return;
        }
        let done: Vec<Resync> = {
            let mut st = disk.lock();
            if st.owed_resyncs.is_empty() {
                return;
            }
            let mut done = Vec::new();
            st.owed_resyncs.retain_mut(|o| {
                for &(seq, off, len) in synced {
                    o.cover(seq, off, off.saturating_add(len));
                }
                let covered = o.left.is_empty();
                if covered {
                    done.push(o.req);
                }
                !covered
            });
            done
        };
        for r in done {
            info!(disk = %disk.id, seq = r.seq, offset = r.offset, length = r.length, "owed resync done: the range was synced");
            if let Err(e) = self.catalog.remove_resync(&disk.id, r) {
                warn!(disk = %disk.id, seq = r.seq, "cannot drop a done resync from the catalog: {e:#}");
            }
        }
    }

    /// `GET /api/v1/status`'s collector object.
    pub(crate) fn collector_json(&self) -> Value {
        serde_json::to_value(CollectorView {
            site: self.cfg.site.clone(),
            spool_bytes: self.spool_bytes.load(Ordering::Relaxed),
            spool_cap_bytes: self.cfg.spool_cap,
            spool_full: self.is_spool_full(),
            agents_connected: self.agents_connected.load(Ordering::Relaxed),
            uptime_s: self.started.elapsed().as_secs(),
            security: self.cfg.security.describe(),
            tls: self.cfg.security.is_tls(),
        })
        .unwrap_or(Value::Null)
    }

    /// The status of one disk.
    pub(crate) fn disk_status(&self, disk: &Disk) -> DiskStatus {
        let st = disk.lock();
        let now = Instant::now();
        let now_ns = now_ns();
        let unapplied = st.files.values().filter(|e| e.last > st.applied_seq);
        let mut lag_bytes = 0u64;
        let mut oldest_ns = None;
        for e in unapplied {
            lag_bytes += e.payload_bytes;
            if oldest_ns.is_none() && e.first_time_ns != 0 {
                oldest_ns = Some(e.first_time_ns);
            }
        }
        let lag_seconds = oldest_ns.map_or(0.0, |t| now_ns.saturating_sub(t) as f64 / 1e9);
        let agent_connected = st.agent.is_some();
        let (progress, progress_at) = match &st.progress {
            Some((p, at)) => (Some(p.clone()), Some(*at)),
            None => (None, None),
        };
        if let Some(p) = &progress {
            if agent_connected {
                lag_bytes += p.backlog_bytes;
            }
        }
        let (write_rate, sync_rate) = rates(&st.samples, now);
        let target_state = st.target_state;
        let halted = target_state.is_some_and(|t| t.state == ReplicaState::Halted);
        let last_mode = progress.as_ref().map(|p| p.mode);
        let agent_mode = last_mode.filter(|_| agent_connected);
        let mode = if st.fence.is_some() {
            "fenced"
        } else {
            mode_name(
                halted,
                agent_mode,
                agent_connected,
                st.target_connected && lag_seconds <= BACKLOG_LAG_S,
            )
        };
        let syncing =
            agent_mode.is_some_and(|m| matches!(m, AgentMode::InitialSync | AgentMode::Resync | AgentMode::FullResync));
        let (sync_done, sync_total) = progress.as_ref().map_or((0, 0), |p| (p.sync_done, p.sync_total));
        let sync_percent =
            (syncing && sync_total > 0).then(|| (sync_done as f64 * 100.0 / sync_total as f64).min(100.0));
        let sync_eta = (syncing && sync_rate > 0.0).then(|| sync_total.saturating_sub(sync_done) as f64 / sync_rate);
        let wire = disk.wire_bytes.load(Ordering::Relaxed);
        let payload = disk.payload_bytes.load(Ordering::Relaxed);
        let (last_verified, last_drill) = self.book.views(disk.id.as_str());
        let view = DiskView {
            disk_id: disk.id.to_string(),
            disk_uuid: Some(uuid_text(&st.uuid)),
            mode: mode.to_string(),
            agent_mode: last_mode.map(|m| AgentMode::name(m).to_string()),
            sync_percent,
            sync_done_bytes: syncing.then_some(sync_done),
            sync_total_bytes: syncing.then_some(sync_total),
            sync_eta_s: sync_eta,
            source_seq: progress.as_ref().map_or(0, |p| p.source_seq),
            // Never reported: at least as old as this collector.
            source_age_s: progress_at.map_or(self.started.elapsed(), |at| now - at).as_secs_f64(),
            acked_seq: st.acked_seq,
            applied_seq: st.applied_seq,
            target_state: target_state.map_or("unknown", |t| t.state.name()).to_string(),
            halted_seq: target_state
                .filter(|t| t.state == ReplicaState::Halted)
                .map(|t| t.halted_seq),
            // A resync of named ranges (a halt, a reprotect's owed
            // regions): ranges still owed, bytes the target waits for.
            resync_regions: st.owed_resyncs.len() as u64,
            target_pending_bytes: target_state.map_or(0, |t| t.pending_bytes),
            lag_s: lag_seconds,
            lag_bytes,
            write_rate_bps: write_rate,
            wire_bytes: wire,
            payload_bytes: payload,
            wire_ratio: (payload > 0).then(|| wire as f64 / payload as f64),
            dedup_hits: disk.dedup_hits.load(Ordering::Relaxed),
            zero_blocks: disk.zero_blocks.load(Ordering::Relaxed),
            full_resyncs: progress.as_ref().map_or(0, |p| p.full_resyncs),
            agent_connected,
            target_connected: st.target_connected,
            target_refusal: st.target_refusal.clone(),
            owner: st.owner.clone(),
            spool_bytes: st.spool_bytes,
            generation: st.lineage.is_known().then(|| GenerationId(st.lineage.generation).hex()),
            fenced: st.fence.as_ref().map(|f| FenceView {
                generation: f.generation.map(|g| g.hex()),
                reason: f.reason.clone(),
                at_s: f.at,
                spool_kept: f.spool.clone(),
            }),
            last_point: self.book.last_point(disk.id.as_str()),
            last_verified,
            last_drill,
        };
        DiskStatus {
            json: serde_json::to_value(&view).unwrap_or(Value::Null),
            lag_seconds,
            lag_bytes,
        }
    }
}

/// A disk's mode, by the precedence in `docs/pipeline.md`, first match
/// wins: halted (target); the connected agent's mode if not streaming (a
/// sync, including a resync of dirty regions, or bitmap); disconnected;
/// backlogged (target away or lagging); streaming.
pub(crate) fn mode_name(
    halted: bool,
    agent_mode: Option<AgentMode>,
    agent_connected: bool,
    target_keeping_up: bool,
) -> &'static str {
    if halted {
        "halted"
    } else if let Some(m) = agent_mode.filter(|m| agent_connected && *m != AgentMode::Streaming) {
        m.name()
    } else if !agent_connected {
        "disconnected"
    } else if !target_keeping_up {
        "backlogged"
    } else {
        "streaming"
    }
}

/// The range of a record that syncs data (`Sync`, or `Zero` with
/// `FLAG_SYNC`): (seq, offset, length).
pub(crate) fn synced_range(h: &tidemark_wire::RecordHeader) -> Option<(u64, u64, u64)> {
    let sync = h.kind == RecordKind::Sync || (h.kind == RecordKind::Zero && h.flags & FLAG_SYNC != 0);
    sync.then_some((h.seq, h.offset, h.length))
}

/// The collector object of `GET /api/v1/status` (docs/pipeline.md).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct CollectorView {
    /// The site this collector serves (`--site`, default the host's name).
    pub site: String,
    pub spool_bytes: u64,
    pub spool_cap_bytes: u64,
    /// True while the spool is at its cap (agents are not read).
    pub spool_full: bool,
    pub agents_connected: u64,
    pub uptime_s: u64,
    /// How the hops are secured, in words.
    pub security: String,
    pub tls: bool,
}

/// A disk as the API shows it (docs/pipeline.md, "Status API").
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct DiskView {
    pub disk_id: String,
    /// Shown to authenticated callers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_uuid: Option<String>,
    /// initial-sync, resync, full-resync, bitmap, halted, backlogged,
    /// streaming, disconnected, fenced.
    pub mode: String,
    /// The agent's mode as it last reported it.
    pub agent_mode: Option<String>,
    pub sync_percent: Option<f64>,
    pub sync_done_bytes: Option<u64>,
    pub sync_total_bytes: Option<u64>,
    pub sync_eta_s: Option<f64>,
    /// Highest seq journaled at the agent, as last reported.
    pub source_seq: u64,
    pub source_age_s: f64,
    /// Durable at the collector.
    pub acked_seq: u64,
    /// Durable at the target.
    pub applied_seq: u64,
    /// consistent, syncing, halted, unknown.
    pub target_state: String,
    pub halted_seq: Option<u64>,
    pub resync_regions: u64,
    pub target_pending_bytes: u64,
    /// Age of the oldest record not yet applied.
    pub lag_s: f64,
    pub lag_bytes: u64,
    pub write_rate_bps: f64,
    pub wire_bytes: u64,
    pub payload_bytes: u64,
    pub wire_ratio: Option<f64>,
    pub dedup_hits: u64,
    pub zero_blocks: u64,
    pub full_resyncs: u64,
    pub agent_connected: bool,
    pub target_connected: bool,
    /// Why the target last refused the disk, if it did.
    pub target_refusal: Option<String>,
    /// The agent identity bound to the disk.
    pub owner: Option<String>,
    pub spool_bytes: u64,
    /// The data generation the agent holds (hex).
    pub generation: Option<String>,
    pub fenced: Option<FenceView>,
    /// The newest recovery point at the target (asked every ~10 s).
    pub last_point: Option<crate::calls::PointBrief>,
    /// The newest point that passed a drill (its filesystems checked).
    pub last_verified: Option<crate::calls::VerifiedView>,
    /// The newest drill, whatever its result.
    pub last_drill: Option<crate::calls::DrillBrief>,
}

/// A failover's fence on a disk's generation.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct FenceView {
    pub generation: Option<String>,
    pub reason: String,
    /// Unix seconds.
    pub at_s: i64,
    /// Where the fenced spool was kept.
    pub spool_kept: Option<String>,
}

/// A disk's status object and the numbers the metrics reuse.
pub(crate) struct DiskStatus {
    pub json: Value,
    pub lag_seconds: f64,
    pub lag_bytes: u64,
}

/// Client write rate and sync rate (bytes/s) over the samples (~5 s).
fn rates(samples: &VecDeque<(Instant, u64, u64)>, now: Instant) -> (f64, f64) {
    let (Some(first), Some(last)) = (samples.front(), samples.back()) else {
        return (0.0, 0.0);
    };
    let dt = last.0.duration_since(first.0).as_secs_f64();
    // A stream that stopped reporting has no current rate.
    if dt <= 0.0 || now.duration_since(last.0) > Duration::from_secs(10) {
        return (0.0, 0.0);
    }
    (
        last.1.saturating_sub(first.1) as f64 / dt,
        last.2.saturating_sub(first.2) as f64 / dt,
    )
}

/// Why [`ask_agent`] got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoAnswer {
    /// No agent is connected for the disk.
    NotConnected,
    /// It disconnected before it answered.
    Left,
    /// It did not answer in time.
    TimedOut,
}

/// Ask the disk's agent for a fresh Progress (`Request::StatusNow`) and wait
/// up to `wait` for the answer. The agent builds its answer after it read
/// the request, so the answer's `source_seq` covers every write it
/// acknowledged before.
pub(crate) async fn ask_agent(shared: &Shared, disk: &Disk, wait: Duration) -> Result<Progress, NoAnswer> {
    ask_agent_to(shared, disk, wait, |nonce| Request::StatusNow { nonce }).await
}

/// Send the disk's agent `request(nonce)` (a request it answers with a
/// Progress echoing the nonce) and wait up to `wait` for the answer.
pub(crate) async fn ask_agent_to(
    shared: &Shared,
    disk: &Disk,
    wait: Duration,
    request: impl FnOnce(u64) -> Request,
) -> Result<Progress, NoAnswer> {
    let nonce = shared.next_nonce();
    let (answer, answered) = oneshot::channel();
    let tx = {
        let mut st = disk.lock();
        let tx = st.agent.as_ref().map(|a| a.tx.clone()).ok_or(NoAnswer::NotConnected)?;
        st.nonce_waiters.push((nonce, answer));
        tx
    };
    let asked = async {
        tx.send(Out {
            frame: Frame::Request(request(nonce)),
            done: None,
        })
        .await
        .ok()?;
        drop(tx);
        answered.await.ok()
    };
    match tokio::time::timeout(wait, asked).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(NoAnswer::Left),
        Err(_) => {
            disk.lock().nonce_waiters.retain(|(n, _)| *n != nonce);
            Err(NoAnswer::TimedOut)
        }
    }
}

/// The answer to a target's `StatusNow` (the drain barrier before a
/// failover): a Progress whose `source_seq` is the highest seq this
/// collector holds for the disk or its agent reported when asked just now,
/// and whose `time_ns` is 0 when the agent could not be asked (then only
/// the spool counts).
pub(crate) async fn held_for_target(shared: &Shared, disk: &Disk, nonce: u64, wait: Duration) -> Progress {
    let fresh = ask_agent(shared, disk, wait).await.ok();
    let st = disk.lock();
    let held = st.acked_seq;
    let last_mode = st.progress.as_ref().map_or(AgentMode::Streaming, |(p, _)| p.mode);
    Progress {
        source_seq: fresh.as_ref().map_or(held, |p| p.source_seq.max(held)),
        mode: fresh.as_ref().map_or(last_mode, |p| p.mode),
        sync_done: 0,
        sync_total: 0,
        full_resyncs: 0,
        backlog_bytes: 0,
        written_bytes: 0,
        time_ns: if fresh.is_some() { now_ns().max(1) } else { 0 },
        nonce,
    }
}

/// Record a Progress report; one that echoes a nonce wakes its `refresh`.
pub(crate) fn note_progress(disk: &Disk, p: Progress) {
    let now = Instant::now();
    {
        let mut st = disk.lock();
        if p.nonce != 0 {
            if let Some(i) = st.nonce_waiters.iter().position(|(n, _)| *n == p.nonce) {
                let (_, w) = st.nonce_waiters.swap_remove(i);
                let _ = w.send(p.clone());
            }
        }
        st.nonce_waiters.retain(|(_, w)| !w.is_closed());
        // A restarted agent counts from zero again.
        if st.samples.back().is_some_and(|s| s.1 > p.written_bytes) {
            st.samples.clear();
        }
        st.samples.push_back((now, p.written_bytes, p.sync_done));
        while st
            .samples
            .front()
            .is_some_and(|s| now.duration_since(s.0) > Duration::from_secs(5))
            && st.samples.len() > 2
        {
            st.samples.pop_front();
        }
        st.progress = Some((p, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owed_resync_is_done_only_when_later_sync_covers_the_whole_range() {
        let mut o = OwedResync::new(Resync {
            seq: 10,
            offset: 4096,
            length: 16384,
        });
        assert!(!o.cover(10, 0, 1 << 20), "a record at the request's seq does not count");
        assert!(!o.cover(9, 0, 1 << 20), "nor one before it");
        assert!(!o.cover(11, 8192, 12288));
        assert_eq!(o.left, vec![(4096, 8192), (12288, 20480)]);
        assert!(!o.cover(12, 0, 4096), "outside the range");
        assert!(!o.cover(13, 4096, 8192));
        assert!(!o.cover(14, 12288, 16384));
        assert_eq!(o.left, vec![(16384, 20480)]);
        assert!(o.cover(15, 16000, 30000));
    }

    #[test]
    fn synced_ranges_are_sync_and_zero_sync_records() {
        let data = vec![1u8; 4096];
        let h = tidemark_wire::RecordHeader::new(RecordKind::Sync, 5, 0, 8192, 4096, &data);
        assert_eq!(synced_range(&h), Some((5, 8192, 4096)));
        let mut z = tidemark_wire::RecordHeader::new(RecordKind::Zero, 6, 0, 0, 65536, &[]);
        assert_eq!(synced_range(&z), None, "a client's zero write");
        z.flags = FLAG_SYNC;
        assert_eq!(synced_range(&z), Some((6, 0, 65536)));
        let w = tidemark_wire::RecordHeader::new(RecordKind::Write, 7, 0, 0, 4096, &data);
        assert_eq!(synced_range(&w), None);
    }

    #[test]
    fn mode_precedence_follows_the_pipeline_doc() {
        use AgentMode::*;
        // halted (target) > agent mode if not streaming > disconnected >
        // backlogged > streaming.
        assert_eq!(mode_name(true, Some(Resync), true, true), "halted");
        for m in [InitialSync, Resync, FullResync, Bitmap] {
            assert_eq!(mode_name(false, Some(m), true, false), m.name());
            assert_eq!(mode_name(false, Some(m), true, true), m.name());
            assert_eq!(mode_name(false, Some(m), false, true), "disconnected");
        }
        assert_eq!(mode_name(false, None, false, false), "disconnected");
        assert_eq!(mode_name(false, Some(Streaming), true, false), "backlogged");
        assert_eq!(mode_name(false, None, true, false), "backlogged");
        assert_eq!(mode_name(false, Some(Streaming), true, true), "streaming");
    }
}
