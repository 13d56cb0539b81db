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
use tidemark_formats::journal::{Journal, JournalReader, RecordIter};
use tidemark_wire::frame::{
    ErrorCode, Frame, FrameHeader, Hello, Request, Role, FRAME_HEADER_LEN, HELLO_FORCE_RESYNC, PROTOCOL_VERSION,
    WELCOME_NEED_FULL_SYNC,
};
use tidemark_wire::Record;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::shim::Shim;
use crate::sync::{begin_whole, SyncKind};

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
}

/// Most records in one batch.
pub const BATCH_RECORDS: usize = 1024;
/// Most payload bytes in one batch (a single larger record goes alone).
pub const BATCH_BYTES: usize = 4 << 20;
/// Most payload bytes sent and not yet acknowledged.
pub const WINDOW_BYTES: u64 = 32 << 20;
/// Progress period.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Retry period after the collector refused us (bad token, disk mismatch…).
const REFUSED_RETRY: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A consumed marker is written at least this often while acks advance,
/// even when no segment can be recycled yet.
const CONSUME_EVERY: Duration = Duration::from_secs(1);

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
}

/// Read one frame: the header is bounded before the body is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut h).await.context("read frame header")?;
    let fh = FrameHeader::parse(&h).map_err(|e| anyhow!("bad frame header: {e}"))?;
    let mut buf = vec![0u8; fh.frame_len()];
    buf[..FRAME_HEADER_LEN].copy_from_slice(&h);
    r.read_exact(&mut buf[FRAME_HEADER_LEN..])
        .await
        .context("read frame body")?;
    let (f, _) = Frame::decode(&buf).map_err(|e| anyhow!("bad frame: {e}"))?;
    Ok(f)
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<()> {
    let b = f.encode().map_err(|e| anyhow!("encode frame: {e}"))?;
    w.write_all(&b).await.context("send frame")?;
    Ok(())
}

/// Ship until `stop` is cancelled.
pub async fn run(shim: Shim, cfg: ShipConfig, stop: CancellationToken) {
    let disk = shim.inner().disk_id.clone();
    *shim.inner().link.collector.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg.addr.clone());
    let mut force = cfg.force_resync;
    let mut backoff = BACKOFF_MIN;
    // What was last logged about the link, so each state is logged once.
    let mut logged = String::new();
    loop {
        let end = session(&shim, &cfg, &stop, &mut force).await;
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
                    warn!(disk = %disk, collector = %cfg.addr, "collector connection lost: {why}; reconnecting");
                    logged = "lost".into();
                } else if logged != "unreachable" {
                    warn!(disk = %disk, collector = %cfg.addr, "collector unreachable: {why}; retrying");
                    logged = "unreachable".into();
                } else {
                    debug!(disk = %disk, "collector still unreachable: {why}");
                }
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
            End::Refused { code, reason } => {
                let key = format!("refused {code:?} {reason}");
                if logged != key {
                    let hint = if code == ErrorCode::DiskMismatch {
                        " (if this disk replaced the one the collector knows, restart the agent with --force-resync)"
                    } else {
                        ""
                    };
                    error!(
                        disk = %disk,
                        collector = %cfg.addr,
                        "collector refused this agent ({code:?}): {reason}{hint}; retrying every {}s",
                        REFUSED_RETRY.as_secs()
                    );
                    logged = key;
                }
                REFUSED_RETRY
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
    let disk = &shim.inner().disk_id;
    let next = shim.core().journal.next_seq();
    if acked >= next {
        // The collector holds seqs this journal never wrote (a state
        // directory restored from an older copy): never reuse a seq, and
        // the replica may hold writes the disk does not: resync it all.
        warn!(
            disk = %disk,
            "the collector holds seqs up to {acked} but this journal ends before {next}: \
             skipping to seq {} and resyncing the whole disk",
            acked + 1
        );
        // The resync is recorded first (a crash after the advance must not
        // lose it), then re-pointed at the new first seq.
        begin_whole(shim, SyncKind::Full)?;
        shim.core()
            .journal
            .advance_to(acked + 1)
            .context("advance the journal past the collector's acked seq")?;
        shim.inner().sync.set_start_seq(acked + 1)?;
    }
    let first = shim.core().journal.first_seq();
    let mut ship_from = acked + 1;
    let lost = ship_from < first;
    if lost {
        warn!(
            disk = %disk,
            "the collector holds seqs up to {acked} but the journal starts at {first}: \
             shipping from {first} with a whole-disk sync"
        );
        ship_from = first;
    }
    let sync = &shim.inner().sync;
    if force {
        info!(disk = %disk, "--force-resync: the collector rebound this disk id; resyncing the whole disk");
        begin_whole(shim, SyncKind::Full)?;
    } else if flags & WELCOME_NEED_FULL_SYNC != 0 || lost {
        if sync.whole_sync_covers(ship_from) {
            info!(disk = %disk, "the collector needs a whole-disk sync: the one in the journal from seq {ship_from} covers it");
        } else {
            let kind = if lost { SyncKind::Full } else { SyncKind::Initial };
            info!(disk = %disk, kind = ?kind, "the collector needs a whole-disk sync");
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
    let dir = shim.core().journal.config().dir.clone();
    tokio::task::spawn_blocking(move || Journal::persist_consumed(&dir, upto))
        .await
        .map_err(|e| anyhow!("consume task: {e}"))?
        .context("persist the consumed seq")?;
    shim.core().journal.recycle(upto).context("recycle journal segments")?;
    fail::fail_point!("agent-ack-after-consume");
    shim.maybe_exit_bitmap_mode();
    Ok(())
}

/// Records from `iter` up to seq `upto`, at most one batch; `carry` is a
/// record read for the previous batch that did not fit.
fn read_batch(iter: &mut RecordIter, carry: &mut Option<Record>, upto: u64) -> Result<Vec<Record>> {
    let mut out: Vec<Record> = Vec::new();
    let mut bytes = 0usize;
    loop {
        let r = match carry.take() {
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
            *carry = Some(r);
            break;
        }
        bytes += r.payload.len();
        out.push(r);
    }
    Ok(out)
}

async fn session(shim: &Shim, cfg: &ShipConfig, stop: &CancellationToken, force: &mut bool) -> End {
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
    let (mut rd, mut wr) = stream.into_split();
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
    });
    if let Err(e) = write_frame(&mut wr, &hello).await {
        return lost(false, format!("{e:#}"));
    }
    let welcome = tokio::select! {
        _ = stop.cancelled() => return End::Stopped,
        r = tokio::time::timeout(WELCOME_TIMEOUT, read_frame(&mut rd)) => r,
    };
    let (acked, flags) = match welcome {
        Ok(Ok(Frame::Welcome { acked_seq, flags })) => (acked_seq, flags),
        Ok(Ok(Frame::Error {
            code: ErrorCode::Busy,
            reason,
        })) => return lost(false, format!("collector busy: {reason}")),
        Ok(Ok(Frame::Error { code, reason })) => return End::Refused { code, reason },
        Ok(Ok(other)) => return lost(false, format!("expected Welcome, got {other:?}")),
        Ok(Err(e)) => return lost(false, format!("{e:#}")),
        Err(_) => return lost(false, "no Welcome within 10 s".into()),
    };
    let force_now = std::mem::take(force);
    let link = &shim.inner().link;
    link.connected.store(true, std::sync::atomic::Ordering::Relaxed);
    link.acked_seq.store(acked, std::sync::atomic::Ordering::Relaxed);
    let ship_from = {
        let shim = shim.clone();
        match tokio::task::spawn_blocking(move || on_welcome(&shim, acked, flags, force_now)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return lost(true, format!("{e:#}")),
            Err(e) => return lost(true, format!("welcome task: {e}")),
        }
    };
    info!(
        disk = %shim.inner().disk_id,
        collector = %cfg.addr,
        acked_seq = acked,
        ship_from,
        need_full_sync = flags & WELCOME_NEED_FULL_SYNC != 0,
        "connected to the collector"
    );
    let r = stream_records(shim, stop, rd, &mut wr, acked, ship_from).await;
    match r {
        Ok(()) => End::Stopped,
        Err(SessionError::Refused(code, reason)) => End::Refused { code, reason },
        Err(SessionError::Lost(why)) => lost(true, why),
    }
}

enum SessionError {
    Lost(String),
    Refused(ErrorCode, String),
}

impl From<anyhow::Error> for SessionError {
    fn from(e: anyhow::Error) -> Self {
        Self::Lost(format!("{e:#}"))
    }
}

/// Per-connection shipping state.
struct Conn<'a> {
    shim: &'a Shim,
    sent_upto: u64,
    acked: u64,
    inflight: VecDeque<(u64, u64)>,
    unacked_bytes: u64,
    last_consume: Instant,
}

impl Conn<'_> {
    /// Handle one frame from the collector.
    async fn on_frame(
        &mut self,
        f: Frame,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> std::result::Result<(), SessionError> {
        use std::sync::atomic::Ordering::Relaxed;
        let shim = self.shim;
        let disk = &shim.inner().disk_id;
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
                        consume(shim, seq).await?;
                        self.last_consume = Instant::now();
                    }
                }
            }
            Frame::Request(Request::StatusNow { nonce }) => {
                let mut p = shim.progress();
                p.nonce = nonce;
                write_frame(wr, &Frame::Progress(p)).await?;
            }
            Frame::Request(Request::Resync { seq, offset, length }) => {
                info!(disk = %disk, seq, offset, length, "the target asked to resync a range");
                if let Err(e) = shim.mark_for_resync(offset, length) {
                    warn!(disk = %disk, "resync request for {offset}+{length} (seq {seq}) ignored: {e}");
                }
            }
            Frame::Request(Request::FullResync) => {
                info!(disk = %disk, "the target asked for a full resync");
                let s = shim.clone();
                tokio::task::spawn_blocking(move || begin_whole(&s, SyncKind::Full))
                    .await
                    .map_err(|e| anyhow!("full resync task: {e}"))??;
            }
            Frame::Error {
                code: ErrorCode::Busy,
                reason,
            } => return Err(SessionError::Lost(format!("collector busy: {reason}"))),
            Frame::Error { code, reason } => return Err(SessionError::Refused(code, reason)),
            other => {
                return Err(SessionError::Lost(format!(
                    "unexpected frame from the collector: {}",
                    frame_name(&other)
                )))
            }
        }
        Ok(())
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Batch(_) => "Batch",
        Frame::Ack { .. } => "Ack",
        Frame::Error { .. } => "Error",
        Frame::Progress(_) => "Progress",
        Frame::Request(_) => "Request",
        Frame::Packed(_) => "Packed",
        Frame::TargetState(_) => "TargetState",
    }
}

/// The connected part of a session: batches out, acks and requests in.
async fn stream_records(
    shim: &Shim,
    stop: &CancellationToken,
    rd: tokio::net::tcp::OwnedReadHalf,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    acked: u64,
    ship_from: u64,
) -> std::result::Result<(), SessionError> {
    use std::sync::atomic::Ordering::Relaxed;
    let link = &shim.inner().link;
    // Frames from the collector, read by a task of their own so that a
    // frame is never cut in half by a select.
    let (tx, mut rx) = mpsc::channel::<Result<Frame>>(16);
    let reader = tokio::spawn(async move {
        let mut rd = rd;
        loop {
            let f = read_frame(&mut rd).await;
            let end = f.is_err();
            if tx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _reader = AbortOnDrop(reader);
    let recv = |f: Option<Result<Frame>>| -> std::result::Result<Frame, SessionError> {
        match f {
            Some(Ok(f)) => Ok(f),
            Some(Err(e)) => Err(SessionError::Lost(format!("{e:#}"))),
            None => Err(SessionError::Lost("collector closed the connection".into())),
        }
    };

    let dir = shim.core().journal.config().dir.clone();
    let mut iter = JournalReader::open(&dir)
        .context("open the journal for shipping")?
        .records_from(ship_from);
    let mut carry: Option<Record> = None;
    let mut c = Conn {
        shim,
        sent_upto: ship_from - 1,
        acked,
        inflight: VecDeque::new(),
        unacked_bytes: 0,
        last_consume: Instant::now(),
    };
    consume(shim, acked).await?;
    let mut next_progress = tokio::time::Instant::now();
    loop {
        if stop.is_cancelled() {
            return Ok(());
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
            consume(shim, c.acked).await?;
            c.last_consume = Instant::now();
        }
        if tokio::time::Instant::now() >= next_progress {
            write_frame(wr, &Frame::Progress(shim.progress())).await?;
            next_progress = tokio::time::Instant::now() + PROGRESS_EVERY;
        }
        let can_send = c.unacked_bytes < WINDOW_BYTES && (carry.is_some() || shim.applied_watermark() > c.sent_upto);
        if can_send {
            let upto = shim.applied_watermark();
            let (it, cr, r) = tokio::task::spawn_blocking(move || {
                let mut it = iter;
                let mut cr = carry;
                let r = read_batch(&mut it, &mut cr, upto);
                (it, cr, r)
            })
            .await
            .map_err(|e| anyhow!("journal read task: {e}"))?;
            iter = it;
            carry = cr;
            let batch = r?;
            let Some(last) = batch.last().map(|r| r.header.seq) else {
                // Applied but not readable yet: look again shortly.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let bytes: u64 = batch.iter().map(|r| r.payload.len() as u64).sum();
            let enc = Frame::Batch(batch).encode().map_err(|e| anyhow!("encode batch: {e}"))?;
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = wr.write_all(&enc) => r.context("send batch")?,
            }
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
