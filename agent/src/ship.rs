//! The shipper: streams the journal to the collector (`docs/pipeline.md`,
//! "Agent → collector").
//!
//! One TCP connection per disk: Hello → Welcome{acked_seq, flags}, then
//! Batch frames from `acked_seq + 1` up to the shim's applied watermark (at
//! most 1024 records or 4 MiB of payload each, at most 32 MiB
//! unacknowledged), Progress every 500 ms and on request. Journal segments
//! are recycled only up to an acknowledged seq (consumed marker first, then
//! the rename), so a restart or reconnect resumes from the collector's
//! acked seq and loses nothing. Disconnects are retried with backoff
//! (100 ms doubling to 2 s; refusals every 10 s); each change of the link's
//! state is logged once, not every retry.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tidemark_formats::journal::{Journal, JournalReader, RecordIter, Skipped};
use tidemark_net::{FrameReader, PeerRole, ReadError, Reader, Writer};
use tidemark_wire::frame::{
    ErrorCode, Frame, Hello, ReplicaState, Request, Role, HELLO_FORCE_RESYNC, MAX_BODY, PROTOCOL_VERSION,
    WELCOME_NEED_FULL_SYNC,
};
use tidemark_wire::record::{RecordHeader, RecordKind, FLAG_FULL};
use tidemark_wire::Record;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::shim::Shim;
use crate::sync::{begin_full_from, begin_whole, resync_lost};
use crate::sync_state::SyncKind;

/// Where to ship and how to introduce ourselves.
#[derive(Clone, Debug)]
pub struct ShipConfig {
    /// `HOST:PORT` of the collector.
    pub addr: String,
    /// The shared secret.
    pub token: Vec<u8>,
    /// Rebind the disk id to this disk's UUID (`HELLO_FORCE_RESYNC`) and
    /// resync the whole disk; sent until the first Welcome of this run.
    pub force_resync: bool,
    /// Mutual TLS (the collector must hold a collector certificate of the
    /// agent's CA), or plaintext by explicit choice.
    pub security: tidemark_net::Security,
    /// An identity folder still holding only an enrollment token (then
    /// `security` is a placeholder): the first contact trades the token
    /// for the certificate (`docs/security.md`).
    pub enroll: Option<std::path::PathBuf>,
}

/// Most records in one batch.
pub const BATCH_RECORDS: usize = 1024;
/// Most payload bytes in one batch (a single larger record goes alone).
pub const BATCH_BYTES: usize = 4 << 20;
/// Most payload bytes sent and not yet acknowledged.
pub const WINDOW_BYTES: u64 = 32 << 20;
/// At most this many batches unacknowledged. Each costs the collector an
/// fsync round, so under a steady stream of small writes a cap by bytes
/// alone lets hundreds of tiny batches queue behind one another; capped by
/// count, batches grow with the backlog instead and latency stays at a few
/// fsync rounds.
pub const WINDOW_BATCHES: usize = 4;
/// Progress period.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How far a collector's Welcome may be ahead of this journal's next seq:
/// a journal's tail lost in a machine crash (records shipped and
/// acknowledged whose journal pages never reached the disk) is at most a
/// journal's worth of records; a state directory restored from an older
/// copy, some hours of writes. Beyond this the claim is not believed.
const MAX_WELCOME_AHEAD: u64 = 1 << 32;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Retry period after the collector refused us (bad token, disk mismatch…).
const REFUSED_RETRY: Duration = Duration::from_secs(10);
/// A fenced generation stays fenced until an operator acts (the agent is
/// restarted then): retry rarely, not to fill both logs.
const FENCED_RETRY: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A consumed marker is written at least this often while acks advance,
/// even when no segment can be recycled yet.
const CONSUME_EVERY: Duration = Duration::from_secs(1);
/// A write to the collector that makes no progress for this long ends the
/// session (the collector stopped reading, or vanished); also the socket's
/// `TCP_USER_TIMEOUT`.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Polls that find the record at a seq under the applied watermark
/// unreadable before it is taken for damaged.
const UNREADABLE_POLLS: u32 = 3;
/// Retry period while a damaged record cannot be stepped over.
const UNREADABLE_RETRY: Duration = Duration::from_secs(1);

/// How a session ended.
#[derive(Debug)]
enum End {
    Stopped,
    /// Connection failed or was lost; retry with backoff.
    Lost {
        connected: bool,
        why: String,
    },
    /// The collector refused us; retry slowly.
    Refused {
        code: ErrorCode,
        reason: String,
    },
    /// The journal could not be read; retry with backoff.
    Journal {
        why: String,
    },
}

/// Write `b` to the collector unless `stop` comes first; a write that makes
/// no progress for [`WRITE_TIMEOUT`] loses the connection.
async fn send_bytes<W: AsyncWrite + Unpin>(
    w: &mut W,
    b: &[u8],
    stop: &CancellationToken,
) -> std::result::Result<(), SessionError> {
    tokio::select! {
        _ = stop.cancelled() => Err(SessionError::Stopped),
        // Flushed: over TLS, the end of a batch could otherwise wait in the
        // session for the next write.
        r = tokio::time::timeout(WRITE_TIMEOUT, async {
            w.write_all(b).await?;
            w.flush().await
        }) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionError::Lost(format!("send to the collector: {e}"))),
            Err(_) => Err(SessionError::Lost(format!(
                "the collector took nothing for {} s (not reading, or gone)",
                WRITE_TIMEOUT.as_secs()
            ))),
        },
    }
}

/// [`send_bytes`] for one frame.
async fn send_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    f: &Frame,
    stop: &CancellationToken,
) -> std::result::Result<(), SessionError> {
    let b = f.encode().map_err(|e| anyhow!("encode frame: {e}"))?;
    send_bytes(w, &b, stop).await
}

/// Ship until `stop` is cancelled.
pub async fn run(shim: Shim, mut cfg: ShipConfig, stop: CancellationToken) {
    *shim.inner().link.collector.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg.addr.clone());
    if let Some(dir) = cfg.enroll.take() {
        *shim.inner().link.security.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(format!("enrolling ({})", dir.display()));
        match tidemark_net::enroll::enroll_until_done(&dir, &cfg.addr, PeerRole::Agent, &stop).await {
            Some(Ok(s)) => cfg.security = s,
            Some(Err(e)) => {
                tracing::error!(
                    "enrolled, but the identity does not load: {e}; not shipping (the journal keeps every write)"
                );
                *shim.inner().link.security.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("identity unusable: {e}"));
                return;
            }
            None => return,
        }
    }
    if let tidemark_net::Security::Tls(t) = &cfg.security {
        tokio::spawn(tidemark_net::enroll::renew_loop(
            t.clone(),
            tidemark_net::enroll::RenewAt::Collector(cfg.addr.clone()),
            stop.clone(),
        ));
        tokio::spawn(tidemark_net::enroll::crl_fetch_loop(
            t.clone(),
            cfg.addr.clone(),
            tidemark_net::enroll::CRL_FETCH_AGENT,
            stop.clone(),
        ));
    }
    *shim.inner().link.security.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg.security.describe());
    if !cfg.security.is_tls() {
        warn!(
            collector = %cfg.addr,
            "--insecure-plaintext: the collector is not authenticated and every write crosses in clear text"
        );
    }
    let mut force = cfg.force_resync;
    let mut backoff = BACKOFF_MIN;
    // What was last logged about the link, so each state is logged once.
    let mut logged = String::new();
    let mut damaged = Damaged::default();
    loop {
        let end = session(&shim, &cfg, &stop, &mut force, &mut damaged).await;
        shim.inner()
            .link
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let wait = match end {
            End::Stopped => return,
            End::Lost { connected, why } => {
                if connected {
                    backoff = BACKOFF_MIN;
                    shim.inner()
                        .link
                        .reconnects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(collector = %cfg.addr, "collector connection lost: {why}; reconnecting");
                    logged = "lost".into();
                } else if logged != "unreachable" {
                    warn!(collector = %cfg.addr, "collector unreachable: {why}; retrying");
                    logged = "unreachable".into();
                } else {
                    debug!("collector still unreachable: {why}");
                }
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
            End::Refused { code, reason } => {
                let key = format!("refused {code} {reason}");
                let fenced = code == ErrorCode::StaleGeneration;
                if fenced {
                    *shim.inner().link.fenced.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                }
                let every = if fenced { FENCED_RETRY } else { REFUSED_RETRY };
                if logged != key {
                    let hint = match code {
                        ErrorCode::DiskMismatch => {
                            " (if this disk replaced the one the collector knows, restart the agent with --force-resync)"
                        }
                        ErrorCode::StaleGeneration => {
                            " (this disk is fenced: nothing is shipped; its writes stay tracked, in the journal and \
                             then the dirty bitmap)"
                        }
                        _ => "",
                    };
                    error!(
                        collector = %cfg.addr,
                        "collector refused this agent ({code}): {reason}{hint}; retrying every {}s",
                        every.as_secs()
                    );
                    logged = key;
                }
                every
            }
            End::Journal { why } => {
                let key = format!("journal {why}");
                if logged != key {
                    error!("cannot read the journal for shipping: {why}; retrying");
                    logged = key;
                } else {
                    debug!("journal still unreadable: {why}");
                }
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the shipper asks the journal for after Welcome: where to ship from.
fn on_welcome(shim: &Shim, acked: u64, flags: u32, force: bool) -> Result<u64> {
    let next = shim.core().journal.next_seq();
    if acked.saturating_sub(next) >= MAX_WELCOME_AHEAD {
        // Not the tail of a journal lost in a machine crash, nor a state
        // directory restored from a copy a little older: a collector that
        // is not to be believed. Nothing is freed, no seq skipped.
        anyhow::bail!(
            "the collector claims seq {acked}, {} seqs beyond this journal's next ({next}): not believing it (nothing \
             freed); if this state directory was restored from an old copy, start the agent with --force-resync",
            acked - next
        );
    }
    let after = acked
        .checked_add(1)
        .ok_or_else(|| anyhow::anyhow!("the collector claims seq {acked}: no seq follows it"))?;
    if acked >= next {
        // The collector holds seqs this journal never wrote (a state
        // directory restored from an older copy): never reuse a seq, and
        // the replica may hold writes the disk does not: resync it all.
        warn!(
            "the collector holds seqs up to {acked} but this journal ends before {next}: \
             skipping to seq {} and resyncing the whole disk",
            after
        );
        // The resync is recorded and the journal advanced before the sync
        // driver may run: its SyncBegin and records get seqs past `acked`.
        begin_full_from(shim, after)?;
    }
    let first = shim.core().journal.first_seq();
    let mut ship_from = after;
    let lost = ship_from < first;
    if lost {
        warn!(
            "the collector holds seqs up to {acked} but the journal starts at {first}: \
             shipping from {first} with a whole-disk sync"
        );
        ship_from = first;
    }
    let sync = &shim.inner().sync;
    if force {
        info!("--force-resync: the collector rebound this disk id; resyncing the whole disk");
        begin_whole(shim, SyncKind::Full)?;
    } else if flags & WELCOME_NEED_FULL_SYNC != 0 || lost {
        if sync.whole_sync_covers(ship_from) {
            info!("the collector needs a whole-disk sync: the one in the journal from seq {ship_from} covers it");
        } else {
            let kind = if lost { SyncKind::Full } else { SyncKind::Initial };
            info!(kind = ?kind, "the collector needs a whole-disk sync");
            begin_whole(shim, kind)?;
        }
    }
    Ok(ship_from)
}

/// Consume (persist the marker, recycle) up to `acked`, within the applied
/// watermark; leave bitmap mode if the journal is small enough now.
async fn consume(shim: &Shim, acked: u64) -> Result<()> {
    let upto = acked.min(shim.applied_watermark());
    if upto <= shim.core().journal.consumed_seq() {
        return Ok(());
    }
    fail::fail_point!("agent-ack-before-consume");
    let (dir, consumed) = {
        let core = shim.core();
        (core.journal.config().dir.clone(), core.journal.consumed_seq())
    };
    let applied = shim.inner().link.applied_seq.load(std::sync::atomic::Ordering::Relaxed);
    let s = shim.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        // What the target has not applied stays tracked once it leaves
        // the journal (crate::unapplied), durably before the marker moves.
        if upto > applied {
            let from = (consumed + 1).max(applied + 1);
            let ranges = JournalReader::open(&dir)
                .and_then(|r| r.changed_ranges(from, upto))
                .context("read the ranges of the records to consume")?;
            s.inner()
                .unapplied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keep(ranges.as_deref(), from, upto, applied)
                .context("track the regions the target has not applied")?;
        }
        Journal::persist_consumed(&dir, upto).context("persist the consumed seq")
    })
    .await
    .map_err(|e| anyhow!("consume task: {e}"))??;
    shim.core().journal.recycle(upto).context("recycle journal segments")?;
    fail::fail_point!("agent-ack-after-consume");
    shim.maybe_exit_bitmap_mode();
    Ok(())
}

/// Records from `queue` (read for an earlier batch that they did not fit,
/// or placeholders for damaged records), then from `iter` up to seq `upto`:
/// at most one batch.
fn read_batch(iter: &mut RecordIter, queue: &mut VecDeque<Record>, upto: u64) -> Result<Vec<Record>> {
    let mut out: Vec<Record> = Vec::new();
    let mut bytes = 0usize;
    loop {
        let r = match queue.pop_front() {
            Some(r) => r,
            None => {
                let want = iter.next_seq();
                if want > upto || out.len() >= BATCH_RECORDS {
                    break;
                }
                match iter.next() {
                    None => break,
                    Some(r) => {
                        let r = r.context("read the journal")?;
                        if r.header.seq != want {
                            bail!("the journal no longer holds seq {want} (next held: {})", r.header.seq);
                        }
                        r
                    }
                }
            }
        };
        if !out.is_empty() && (out.len() >= BATCH_RECORDS || bytes + r.payload.len() > BATCH_BYTES) {
            queue.push_front(r);
            break;
        }
        bytes += r.payload.len();
        out.push(r);
    }
    Ok(out)
}

/// Damaged journal records already reported (across sessions), so each is
/// logged once.
#[derive(Debug, Default)]
struct Damaged {
    logged: Option<u64>,
}

/// What stands in the stream for records that cannot be read: the stream
/// stays gap-free (the collector refuses gaps), and the target learns that
/// the replica lacks something until a sync that begins later is done.
fn placeholders(sk: &Skipped, full: bool) -> Vec<Record> {
    let now = crate::now_ns();
    (sk.from..sk.to)
        .map(|seq| {
            // A lost tag name changes no data: a Flush keeps its place.
            let kind = match &sk.header {
                Some(h) if h.kind == RecordKind::Tag => RecordKind::Flush,
                _ => RecordKind::SyncBegin,
            };
            let mut header = RecordHeader::new(kind, seq, now, 0, 0, &[]);
            if kind == RecordKind::SyncBegin && full {
                header.flags = FLAG_FULL;
            }
            Record {
                header,
                payload: Vec::new(),
            }
        })
        .collect()
}

/// The record at `iter`'s next seq is complete (under the applied
/// watermark) but cannot be read: step over it, have what it changed
/// resynced (durably), and return the placeholders to ship in its place.
/// `None`: no later record found yet; try again later.
fn recover_unreadable(shim: &Shim, iter: &mut RecordIter, damaged: &mut Damaged) -> Result<Option<Vec<Record>>> {
    let seq = iter.next_seq();
    let Some(sk) = iter.skip_unreadable().context("step over a damaged journal record")? else {
        if damaged.logged != Some(seq) {
            damaged.logged = Some(seq);
            error!(
                seq,
                "journal record {seq} cannot be read and no later record was found; shipping is stuck, retrying"
            );
        }
        return Ok(None);
    };
    // What the lost records changed: a ranged record's range; nothing for a
    // tag; unknown (the whole disk) otherwise.
    let range = match &sk.header {
        Some(h) if h.kind == RecordKind::Tag => Some(None),
        Some(h) if h.length > 0 && h.offset.checked_add(h.length).is_some_and(|e| e <= shim.inner().size) => {
            Some(Some((h.offset, h.length)))
        }
        _ => None,
    };
    let full = match range {
        Some(None) => false,
        Some(Some(r)) => resync_lost(shim, sk.to, Some(r))?,
        None => resync_lost(shim, sk.to, None)?,
    };
    if damaged.logged != Some(sk.from) {
        damaged.logged = Some(sk.from);
        let what = match (&sk.header, range) {
            (Some(h), Some(None)) => format!("a {} record; nothing to resync", h.kind),
            (Some(h), Some(Some((o, l)))) => format!("a {} record of {o}+{l}; resyncing that range", h.kind),
            _ => "unknown records; resyncing the whole disk".to_string(),
        };
        error!(
            seq = sk.from,
            segment = %sk.segment.display(),
            offset = sk.pos,
            "journal record {} in {} at offset {} is damaged ({}): seqs {}..{} are lost ({what}); \
             shipping placeholders in their place",
            sk.from,
            sk.segment.display(),
            sk.pos,
            sk.reason,
            sk.from,
            sk.to - 1,
        );
    }
    Ok(Some(placeholders(&sk, full)))
}

async fn session(
    shim: &Shim,
    cfg: &ShipConfig,
    stop: &CancellationToken,
    force: &mut bool,
    damaged: &mut Damaged,
) -> End {
    let lost = |connected: bool, why: String| End::Lost { connected, why };
    let stream = tokio::select! {
        _ = stop.cancelled() => return End::Stopped,
        r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&cfg.addr)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return lost(false, format!("connect to {}: {e}", cfg.addr)),
            Err(_) => return lost(false, format!("connect to {}: timed out", cfg.addr)),
        },
    };
    let _ = stream.set_nodelay(true);
    // A collector that vanished (no FIN, no RST) is noticed.
    if let Err(e) = tidemark_net::set_user_timeout(&stream, WRITE_TIMEOUT) {
        debug!("TCP_USER_TIMEOUT not set: {e}");
    }
    let conn = tokio::select! {
        _ = stop.cancelled() => return End::Stopped,
        r = cfg.security.connect(stream, PeerRole::Collector, None) => match r {
            Ok(c) => c,
            Err(e) => return lost(false, format!("{}: {e}", cfg.addr)),
        },
    };
    let (rd, mut wr) = (conn.reader, conn.writer);
    // Bounded by the protocol's maximum, the agent's limit so far (the
    // collector sends only small frames: Welcome, Ack, Request, Error).
    let mut rd = FrameReader::new(rd, MAX_BODY);
    let uuid = match uuid::Uuid::parse_str(&shim.inner().disk_uuid) {
        Ok(u) => *u.as_bytes(),
        Err(e) => return lost(false, format!("disk uuid: {e}")),
    };
    let hello = Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Agent,
        flags: if *force { HELLO_FORCE_RESYNC } else { 0 },
        disk_uuid: uuid,
        disk_size: shim.inner().size,
        disk_id: shim.inner().disk_id.clone(),
        token: cfg.token.clone(),
        lineage: shim.inner().lineage,
    });
    match send_frame(&mut wr, &hello, stop).await {
        Ok(()) => {}
        Err(SessionError::Stopped) => return End::Stopped,
        Err(SessionError::Lost(why) | SessionError::Journal(why)) => return lost(false, why),
        Err(SessionError::Refused(code, reason)) => return End::Refused { code, reason },
    }
    let welcome = tokio::select! {
        _ = stop.cancelled() => return End::Stopped,
        r = tokio::time::timeout(WELCOME_TIMEOUT, rd.next()) => r,
    };
    let (acked, flags) = match welcome {
        Ok(Ok(Some(Frame::Welcome { acked_seq, flags, .. }))) => (acked_seq, flags),
        Ok(Ok(Some(Frame::Error {
            code: ErrorCode::Busy,
            reason,
        }))) => return lost(false, format!("collector busy: {reason}")),
        Ok(Ok(Some(Frame::Error { code, reason }))) => return End::Refused { code, reason },
        Ok(Ok(Some(other))) => return lost(false, format!("expected Welcome, got {other:?}")),
        Ok(Ok(None)) => return lost(false, "the collector closed the connection before its Welcome".into()),
        Ok(Err(e)) => return lost(false, format!("read from the collector: {e}")),
        Err(_) => return lost(false, "no Welcome within 10 s".into()),
    };
    let force_now = std::mem::take(force);
    let link = &shim.inner().link;
    if link.fenced.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
        info!("the collector takes this disk's writes again: no longer fenced");
    }
    link.connected.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ship_from, welcome_next) = {
        let shim = shim.clone();
        match tokio::task::spawn_blocking(move || {
            on_welcome(&shim, acked, flags, force_now).map(|s| (s, shim.core().journal.next_seq()))
        })
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return lost(true, format!("{e:#}")),
            Err(e) => return lost(true, format!("welcome task: {e}")),
        }
    };
    // Only a Welcome that was believed says what the collector holds.
    link.acked_seq.store(acked, std::sync::atomic::Ordering::Relaxed);
    info!(
        disk = %shim.inner().disk_id,
        collector = %cfg.addr,
        acked_seq = acked,
        ship_from,
        need_full_sync = flags & WELCOME_NEED_FULL_SYNC != 0,
        "connected to the collector"
    );
    let r = stream_records(shim, stop, rd, &mut wr, acked, ship_from, welcome_next, damaged).await;
    match r {
        Ok(()) | Err(SessionError::Stopped) => End::Stopped,
        Err(SessionError::Refused(code, reason)) => End::Refused { code, reason },
        Err(SessionError::Lost(why)) => lost(true, why),
        Err(SessionError::Journal(why)) => End::Journal { why },
    }
}

enum SessionError {
    Stopped,
    Lost(String),
    Refused(ErrorCode, String),
    /// Reading the journal failed (not the connection's fault).
    Journal(String),
}

fn journal_err(e: impl std::fmt::Display) -> SessionError {
    SessionError::Journal(e.to_string())
}

impl From<anyhow::Error> for SessionError {
    fn from(e: anyhow::Error) -> Self {
        Self::Lost(format!("{e:#}"))
    }
}

/// Per-connection shipping state.
struct Conn<'a> {
    shim: &'a Shim,
    stop: &'a CancellationToken,
    /// The journal's next seq right after this connection's Welcome: a
    /// whole-disk sync that began at or after it answers any full-resync
    /// request relayed on this connection.
    welcome_next: u64,
    sent_upto: u64,
    acked: u64,
    inflight: VecDeque<(u64, u64)>,
    unacked_bytes: u64,
    last_consume: Instant,
}

impl Conn<'_> {
    /// Handle one frame from the collector.
    async fn on_frame(&mut self, f: Frame, wr: &mut Writer) -> std::result::Result<(), SessionError> {
        use std::sync::atomic::Ordering::Relaxed;
        let shim = self.shim;
        match f {
            Frame::Ack { seq } => {
                if seq > self.sent_upto {
                    return Err(SessionError::Lost(format!(
                        "collector acknowledged seq {seq}, beyond the {} sent",
                        self.sent_upto
                    )));
                }
                while self.inflight.front().is_some_and(|(last, _)| *last <= seq) {
                    if let Some((_, b)) = self.inflight.pop_front() {
                        self.unacked_bytes -= b;
                    }
                }
                if seq > self.acked {
                    self.acked = seq;
                    shim.inner().link.acked_seq.store(seq, Relaxed);
                    let recyclable = {
                        let upto = seq.min(shim.applied_watermark());
                        shim.core().journal.recyclable(upto)
                    };
                    if recyclable || self.last_consume.elapsed() >= CONSUME_EVERY {
                        consume(shim, seq).await.map_err(|e| journal_err(format!("{e:#}")))?;
                        self.last_consume = Instant::now();
                    }
                }
            }
            Frame::TargetState(ts) => {
                // Relayed by the collector: what the target has applied.
                // Only a consistent replica without a halt holds every seq
                // up to it (a skipped record still moves applied_seq on).
                let link = &shim.inner().link;
                let holds = ts.state == ReplicaState::Consistent && ts.halted_seq == 0;
                if holds && ts.applied_seq > link.applied_seq.load(Relaxed) {
                    let s = shim.clone();
                    tokio::task::spawn_blocking(move || {
                        s.inner()
                            .unapplied
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .applied(ts.applied_seq)
                    })
                    .await
                    .map_err(|e| anyhow!("unapplied task: {e}"))?
                    .map_err(|e| journal_err(format!("{e:#}")))?;
                    // Stored once the epochs it covers are dropped, so a
                    // failure is retried with the next report.
                    link.applied_seq.fetch_max(ts.applied_seq, Relaxed);
                }
            }
            Frame::Call { nonce, body } => {
                // The configuration server's call (tidemark_wire::call):
                // a tag through the API. Answered in line: journaling a
                // tag and syncing it takes milliseconds.
                let answer = match tidemark_wire::call::Call::parse(&body) {
                    Ok(tidemark_wire::call::Call::Tag { name, app_consistent }) => {
                        match crate::control::tag(shim, &name, app_consistent, None).await {
                            Ok(seq) => Ok(serde_json::json!({ "seq": seq })),
                            Err(r) => Err(r.error),
                        }
                    }
                    Ok(other) => Err(format!("an agent does not answer {other:?}")),
                    Err(why) => Err(why),
                };
                let (ok, v) = match answer {
                    Ok(v) => (true, v),
                    Err(why) => (false, serde_json::Value::String(why)),
                };
                let reply = Frame::Reply {
                    nonce,
                    ok,
                    body: v.to_string(),
                };
                send_frame(wr, &reply, self.stop).await?;
            }
            Frame::Request(Request::StatusNow { nonce }) => {
                let mut p = shim.progress();
                p.nonce = nonce;
                send_frame(wr, &Frame::Progress(p), self.stop).await?;
            }
            Frame::Request(Request::Quiesce { nonce }) => {
                // A planned failback (docs/failback.md, section 6).
                let name = format!("failback-{}", tidemark_util::now_ns() / 1_000_000_000);
                let seq = match shim.quiesce(&name).await {
                    Ok(seq) => seq,
                    Err(e) => {
                        warn!("cannot quiesce for a failback: {e}");
                        0
                    }
                };
                let mut p = shim.progress();
                p.nonce = nonce;
                p.source_seq = seq;
                send_frame(wr, &Frame::Progress(p), self.stop).await?;
            }
            Frame::Request(Request::Resync { seq, offset, length }) => {
                info!(seq, offset, length, "the target asked to resync a range");
                // Sent as data even inside a hash-compare sync: the target
                // waits for these records.
                shim.inner().hashes.force(offset, length);
                if let Err(e) = shim.mark_for_resync(offset, length) {
                    warn!("resync request for {offset}+{length} (seq {seq}) ignored: {e}");
                }
            }
            Frame::Request(Request::FullResync) => {
                // The target repeats the request on every connection until
                // it sees the new sync's records: a whole-disk sync running
                // (or about to begin), or one begun since this connection's
                // Welcome, answers it.
                if shim.inner().sync.whole_sync_since(self.welcome_next) {
                    info!(
                        "the target asked for a full resync: the whole-disk sync under way (or just done) answers it"
                    );
                } else {
                    info!("the target asked for a full resync");
                    let s = shim.clone();
                    tokio::task::spawn_blocking(move || begin_whole(&s, SyncKind::Full))
                        .await
                        .map_err(|e| anyhow!("full resync task: {e}"))??;
                }
            }
            Frame::ChunkHashes { offset, hashes } => {
                shim.inner().hashes.answer(offset, hashes);
                shim.inner().sync.wake();
            }
            Frame::Error {
                code: ErrorCode::Busy,
                reason,
            } => return Err(SessionError::Lost(format!("collector busy: {reason}"))),
            Frame::Error { code, reason } => return Err(SessionError::Refused(code, reason)),
            other => {
                return Err(SessionError::Lost(format!(
                    "unexpected frame from the collector: {}",
                    other.name()
                )))
            }
        }
        Ok(())
    }
}

/// The connected part of a session: batches out, acks and requests in.
#[allow(clippy::too_many_arguments)]
async fn stream_records(
    shim: &Shim,
    stop: &CancellationToken,
    rd: FrameReader<Reader>,
    wr: &mut Writer,
    acked: u64,
    ship_from: u64,
    welcome_next: u64,
    damaged: &mut Damaged,
) -> std::result::Result<(), SessionError> {
    use std::sync::atomic::Ordering::Relaxed;
    let link = &shim.inner().link;
    let (mut rx, _reader) = spawn_reader(rd);
    let recv = |f: Option<std::result::Result<Frame, ReadError>>| -> std::result::Result<Frame, SessionError> {
        match f {
            Some(Ok(f)) => Ok(f),
            Some(Err(e)) => Err(SessionError::Lost(format!("read from the collector: {e}"))),
            None => Err(SessionError::Lost("collector closed the connection".into())),
        }
    };
    let dir = shim.core().journal.config().dir.clone();
    let mut source = Source {
        iter: Some(
            JournalReader::open(&dir)
                .map_err(|e| journal_err(format!("open the journal for shipping: {e}")))?
                .records_from(ship_from),
        ),
        queue: VecDeque::new(),
        stuck: 0,
    };
    let mut c = Conn {
        shim,
        stop,
        welcome_next,
        sent_upto: ship_from - 1,
        acked,
        inflight: VecDeque::new(),
        unacked_bytes: 0,
        last_consume: Instant::now(),
    };
    consume(shim, acked).await.map_err(|e| journal_err(format!("{e:#}")))?;
    let mut next_progress = tokio::time::Instant::now();
    let hashes = &shim.inner().hashes;
    let conn = Connection {
        book: hashes,
        n: hashes.connected(),
    };
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        // A hash-compare sync's queries (docs/failback.md, section 4).
        for (offset, length) in hashes.to_send(conn.n) {
            send_frame(wr, &Frame::HashQuery { offset, length }, stop).await?;
        }
        // Frames that arrived meanwhile.
        loop {
            match rx.try_recv() {
                Ok(f) => c.on_frame(recv(Some(f))?, wr).await?,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    recv(None)?;
                }
            }
        }
        // Acks that could not recycle anything when they came are
        // consumed a little later, so the marker never lags for long.
        if c.last_consume.elapsed() >= CONSUME_EVERY {
            consume(shim, c.acked)
                .await
                .map_err(|e| journal_err(format!("{e:#}")))?;
            c.last_consume = Instant::now();
        }
        if tokio::time::Instant::now() >= next_progress {
            send_frame(wr, &Frame::Progress(shim.progress()), stop).await?;
            next_progress = tokio::time::Instant::now() + PROGRESS_EVERY;
        }
        let can_send = c.unacked_bytes < WINDOW_BYTES
            && c.inflight.len() < WINDOW_BATCHES
            && (!source.queue.is_empty() || shim.applied_watermark() > c.sent_upto);
        if can_send {
            let Some(batch) = source.next_batch(shim, damaged, stop).await? else {
                continue;
            };
            let Some(last) = batch.last().map(|r| r.header.seq) else {
                continue;
            };
            let bytes: u64 = batch.iter().map(|r| r.payload.len() as u64).sum();
            let enc = Frame::Batch(batch).encode().map_err(|e| anyhow!("encode batch: {e}"))?;
            send_bytes(wr, &enc, stop).await?;
            fail::fail_point!("agent-after-send");
            c.sent_upto = last;
            c.inflight.push_back((last, bytes));
            c.unacked_bytes += bytes;
            link.batches.fetch_add(1, Relaxed);
            link.sent_bytes.fetch_add(enc.len() as u64, Relaxed);
            continue;
        }
        let notified = shim.inner().shippable.notified();
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            f = rx.recv() => c.on_frame(recv(f)?, wr).await?,
            _ = tokio::time::sleep_until(next_progress) => {}
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// A connection as the hash book knows it; noted down when it ends.
struct Connection<'a> {
    book: &'a crate::compare::HashBook,
    n: u64,
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        self.book.disconnected(self.n);
    }
}

/// Read frames from the collector in a task of their own, so that those
/// that arrived while a batch was being sent are taken at once
/// (`try_recv`) before the next batch. The end of the stream closes the
/// channel; dropping the guard stops the task.
fn spawn_reader(
    rd: FrameReader<Reader>,
) -> (
    mpsc::Receiver<std::result::Result<Frame, ReadError>>,
    tokio_util::task::AbortOnDropHandle<()>,
) {
    let (tx, rx) = mpsc::channel::<std::result::Result<Frame, ReadError>>(16);
    let reader = tokio::spawn(async move {
        let mut rd = rd;
        while let Some(f) = rd.next().await.transpose() {
            let end = f.is_err();
            if tx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    (rx, tokio_util::task::AbortOnDropHandle::new(reader))
}

/// The journal as the shipper reads it: from the ship point on, with the
/// records read ahead, and how many polls in a row found nothing readable
/// under the watermark.
struct Source {
    /// Taken by the blocking read while it runs.
    iter: Option<RecordIter>,
    queue: VecDeque<Record>,
    stuck: u32,
}

impl Source {
    /// The next batch up to the applied watermark (off the async threads).
    /// `None`: nothing to send now (after a short wait). A record that
    /// stays unreadable for a few polls is damaged: it is stepped over
    /// and its range resent from the disk (`recover_unreadable`).
    async fn next_batch(
        &mut self,
        shim: &Shim,
        damaged: &mut Damaged,
        stop: &CancellationToken,
    ) -> std::result::Result<Option<Vec<Record>>, SessionError> {
        let upto = shim.applied_watermark();
        let (mut it, mut q) = (self.take_iter()?, std::mem::take(&mut self.queue));
        let (it, q, r) = tokio::task::spawn_blocking(move || {
            let r = read_batch(&mut it, &mut q, upto);
            (it, q, r)
        })
        .await
        .map_err(|e| journal_err(format!("journal read task: {e}")))?;
        let next_seq = it.next_seq();
        self.iter = Some(it);
        self.queue = q;
        let batch = r.map_err(|e| journal_err(format!("{e:#}")))?;
        if !batch.is_empty() {
            self.stuck = 0;
            return Ok(Some(batch));
        }
        // Nothing readable at a seq the watermark covers: its record is
        // complete, so a few polls in a row mean it is damaged (the reader
        // stops there as at the journal's end).
        self.stuck = if next_seq <= upto { self.stuck + 1 } else { 0 };
        let mut wait = Duration::from_millis(5);
        if self.stuck >= UNREADABLE_POLLS {
            self.stuck = 0;
            let (s, mut it, mut dm) = (shim.clone(), self.take_iter()?, std::mem::take(damaged));
            let (it, dm, r) = tokio::task::spawn_blocking(move || {
                let r = recover_unreadable(&s, &mut it, &mut dm);
                (it, dm, r)
            })
            .await
            .map_err(|e| journal_err(format!("journal recovery task: {e}")))?;
            self.iter = Some(it);
            *damaged = dm;
            match r.map_err(|e| journal_err(format!("{e:#}")))? {
                Some(ph) => self.queue.extend(ph),
                None => wait = UNREADABLE_RETRY,
            }
        }
        if self.queue.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Ok(None)
    }

    fn take_iter(&mut self) -> std::result::Result<RecordIter, SessionError> {
        self.iter
            .take()
            .ok_or_else(|| journal_err("the journal reader was lost by a failed read task"))
    }
}
