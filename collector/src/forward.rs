//! One disk's session with the target: Hello, resume from the target's
//! applied seq, then Packed batches read from the spool one file at a time,
//! in seq order, several in flight (bounded by bytes). Acks trim the spool;
//! TargetState is kept for status; Requests are relayed to the agent.
//! Reconnects with backoff (100 ms doubling to 2 s; 100 ms while the
//! target's host refuses connections) until the collector stops.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tidemark_formats::generation::GenerationId;
use tidemark_formats::spool as fmt;
use tidemark_net::{write_frame, FrameReader, PeerRole, Reader, Writer};
use tidemark_wire::frame::{
    ErrorCode, Frame, Hello, Request, Role, HELLO_FORCE_RESYNC, PACKED_GAP, PROTOCOL_VERSION, WELCOME_NEED_FULL_SYNC,
};
use tidemark_wire::pack::{PackStats, Packer};
use tidemark_wire::Record;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn, Instrument};

use crate::catalog::Severity;
use crate::state::{kib_permits, Disk, Out, Shared, SpoolEntry};
use crate::{failpoint, spool};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// The target sends TargetState at least every 2 s.
const TARGET_IDLE: Duration = Duration::from_secs(30);
/// Largest frame the target sends (acks, states, requests, errors, and
/// replies to calls: up to 4 MiB).
const TARGET_MAX_BODY: u32 = (4 << 20) + (64 << 10);
/// A target that takes nothing of a batch for this long is wedged: reconnect.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Data the target's kernel has not acknowledged for this long ends the
/// connection (TCP_USER_TIMEOUT), instead of the kernel's ~15 minutes: a
/// target host that vanished is noticed and reconnected to.
const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Spool files merged into one packed batch while they add up to less than
/// this (and at most MERGE_FILES of them): each batch costs the target an
/// fsync round, so a run of small files goes as one.
const MERGE_BYTES: u64 = 4 << 20;
const MERGE_FILES: usize = 64;
/// Packed batches unacknowledged at once (besides the byte cap): capped by
/// count, batches grow with the backlog rather than queueing.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// How long the answer to a target's `StatusNow` waits for the agent's.
const ASK_AGENT_WAIT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The backoff's cap while connections are refused: the target's host is
/// up and its port closed (a target restarting, or started by the operator
/// after a reprotect). A refused connect costs one round trip (and is
/// logged once), and a failback starts when the target does instead of up
/// to 2 s later.
const BACKOFF_REFUSED: Duration = BACKOFF_MIN;

/// Start the forwarder of `disk`; it runs until the collector stops.
pub(crate) fn spawn(shared: &Arc<Shared>, disk: &Arc<Disk>) {
    let (s, d) = (shared.clone(), disk.clone());
    // Its own root: it outlives the agent connection that may start it.
    let span = tracing::info_span!(parent: None, "forward", disk = %disk.id);
    shared.tracker.spawn(async move { run(s, d).await }.instrument(span));
}

async fn run(shared: Arc<Shared>, disk: Arc<Disk>) {
    let mut backoff = BACKOFF_MIN;
    let mut unreachable_logged = false;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        let (binding, rebound, fenced) = {
            let st = disk.lock();
            (st.binding, st.session.clone(), st.fence.is_some())
        };
        if fenced {
            // Nothing is forwarded for a fenced generation; a new binding
            // or generation wakes this up.
            let woken = disk.spooled.notified();
            if disk.lock().fence.is_some() {
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = woken => {}
                }
            }
            continue;
        }
        let mut welcomed = false;
        let r = tokio::select! {
            r = session(&shared, &disk, binding, &rebound, &mut welcomed) => r,
            _ = shared.stop.cancelled() => Ok(()),
            _ = rebound.cancelled() => Ok(()),
        };
        {
            let mut st = disk.lock();
            if st.binding == binding {
                st.target_connected = false;
                st.to_target = None;
            }
        }
        crate::calls::connection_ended(&disk, "target");
        if shared.stop.is_cancelled() {
            return;
        }
        if rebound.is_cancelled() {
            continue;
        }
        if welcomed {
            backoff = BACKOFF_MIN;
            unreachable_logged = false;
        }
        if let Some(Fenced(reason)) = r.as_ref().err().and_then(|e| e.downcast_ref::<Fenced>()) {
            if let Err(e) = spool::fence(&shared, &disk, reason.clone()).await {
                error!("fencing the disk: {e:#}");
            }
            continue;
        }
        match &r {
            Ok(()) => {}
            Err(e) if welcomed => {
                warn!("target session ended: {e:#}; reconnecting");
                shared.event(
                    Some(&disk.id),
                    "target",
                    Severity::Warning,
                    &format!("the target session ended: {e:#}; reconnecting"),
                    None,
                );
            }
            Err(e) if !unreachable_logged => {
                unreachable_logged = true;
                warn!(target = %shared.cfg.target, "cannot reach the target: {e:#}; spooling and retrying");
                shared.event(
                    Some(&disk.id),
                    "target",
                    Severity::Warning,
                    &format!(
                        "cannot reach the target {}: {e:#}; spooling and retrying",
                        shared.cfg.target
                    ),
                    None,
                );
            }
            Err(e) => debug!("target still unreachable: {e:#}"),
        }
        let pause = match &r {
            Err(e) if refused(e) => backoff.min(BACKOFF_REFUSED),
            _ => backoff,
        };
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A target's refusal, with this side of it: the writes of the disk that
/// wait here and at the agent, not applied. After a failover these are
/// what the copy wrote since the fork, which a divergence refusal (the
/// old source's side) cannot count.
fn refusal(shared: &Shared, disk: &Disk, reason: &str) -> String {
    let status = shared.disk_status(disk);
    let (source, lineage) = {
        let st = disk.lock();
        (st.progress.as_ref().map_or(0, |(p, _)| p.source_seq), st.lineage)
    };
    let generation = if lineage.is_known() {
        GenerationId(lineage.generation).to_string()
    } else {
        "not known".into()
    };
    let upto = source.max(status.json["acked_seq"].as_u64().unwrap_or(0));
    format!(
        "{reason} — this side (generation {generation}) holds {} written up to seq {upto} that the target has not applied",
        tidemark_util::human::format_size(status.lag_bytes),
    )
}

/// Whether the session failed because the target's host refused the
/// connection (nothing listens on its port).
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// The target refused the disk's generation: a failover ended it.
#[derive(Debug)]
struct Fenced(String);

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the target fenced this generation: {}", self.0)
    }
}

impl std::error::Error for Fenced {}

/// Packed batches sent and not yet acknowledged: (last seq, wire bytes),
/// their total, and the highest seq sent on this session (at first, the
/// target's applied seq).
struct InFlight {
    q: Mutex<Sent>,
    changed: Notify,
}

/// (last seq, wire bytes) per batch not yet acknowledged; their total bytes;
/// the highest seq sent.
type Sent = (VecDeque<(u64, u64)>, u64, u64);

impl InFlight {
    fn new(applied: u64) -> Self {
        Self {
            q: Mutex::new((VecDeque::new(), 0, applied)),
            changed: Notify::new(),
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Called before the batch is written, so that an ack that races the
    /// end of the write is not taken for one beyond what was sent.
    fn add(&self, last: u64, bytes: u64) {
        let mut g = self.lock();
        g.0.push_back((last, bytes));
        g.1 += bytes;
        g.2 = g.2.max(last);
    }
    /// Batches sent and not yet acknowledged.
    fn count(&self) -> usize {
        self.lock().0.len()
    }
    /// The highest seq sent (or applied at the start of the session).
    fn sent_upto(&self) -> u64 {
        self.lock().2
    }
    fn acked(&self, seq: u64) {
        let mut g = self.lock();
        while g.0.front().is_some_and(|(l, _)| *l <= seq) {
            if let Some((_, b)) = g.0.pop_front() {
                g.1 = g.1.saturating_sub(b);
            }
        }
        drop(g);
        self.changed.notify_waiters();
    }
    fn bytes(&self) -> u64 {
        self.lock().1
    }
}

async fn session(
    shared: &Arc<Shared>,
    disk: &Arc<Disk>,
    binding: u64,
    rebound: &CancellationToken,
    welcomed: &mut bool,
) -> Result<()> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&shared.cfg.target))
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", shared.cfg.target))?
        .with_context(|| format!("connect to {}", shared.cfg.target))?;
    let _ = stream.set_nodelay(true);
    if let Err(e) = tidemark_net::set_user_timeout(&stream, USER_TIMEOUT) {
        warn!("cannot set TCP_USER_TIMEOUT on the target connection: {e}");
    }
    let conn = shared
        .cfg
        .security
        .connect(stream, PeerRole::Target, None)
        .await
        .map_err(|e| anyhow!("{}: {e}", shared.cfg.target))?;
    let (rd, mut wr) = (conn.reader, conn.writer);
    let mut rd = FrameReader::new(rd, TARGET_MAX_BODY);
    let (uuid, force, disk_size, lineage) = {
        let st = disk.lock();
        (st.uuid, st.force_target, st.disk_size, st.lineage)
    };
    let hello = Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Collector,
        flags: if force { HELLO_FORCE_RESYNC } else { 0 },
        disk_uuid: uuid,
        disk_size,
        disk_id: disk.id.clone(),
        token: shared.cfg.token.clone(),
        lineage,
    });
    write_frame(&mut wr, &hello).await.context("send hello")?;
    let welcome = tokio::time::timeout(WELCOME_TIMEOUT, rd.next())
        .await
        .map_err(|_| anyhow!("no welcome from the target within 10 s"))?
        .context("read welcome")?;
    let (applied, flags) = match welcome {
        Some(Frame::Welcome {
            acked_seq,
            flags,
            generation,
        }) => {
            if generation != [0; 16] && lineage.is_known() && generation != lineage.generation {
                warn!(
                    target_generation = %GenerationId(generation),
                    ours = %GenerationId(lineage.generation),
                    "the target holds another data generation of this disk"
                );
            }
            (acked_seq, flags)
        }
        Some(Frame::Error {
            code: ErrorCode::StaleGeneration,
            reason,
        }) => return Err(Fenced(reason).into()),
        Some(Frame::Error { code, reason }) => {
            let why = refusal(shared, disk, &format!("{code}: {reason}"));
            disk.lock().target_refusal = Some(why.clone());
            bail!("the target refused: {why}")
        }
        Some(other) => bail!("expected a welcome from the target, got {other:?}"),
        None => bail!("the target closed the connection before its welcome"),
    };
    // A target never applied what this collector never held (everything it
    // sent, it held): a Welcome beyond that is a peer not to be believed,
    // and trims nothing (issue 14: a fake target must not make the spool
    // drop acknowledged writes).
    let held = disk.lock().acked_seq;
    if applied > held {
        bail!(
            "the target claims seq {applied} applied, beyond anything this collector holds or sent (seq {held}): \
             not trimming the spool on its word; is {} the disk's target?",
            shared.cfg.target
        );
    }
    *welcomed = true;
    {
        let mut st = disk.lock();
        if st.binding != binding {
            return Ok(());
        }
        st.target_connected = true;
        st.target_refusal = None;
        st.applied_seq = applied;
        if force {
            st.force_target = false;
        }
    }
    if force {
        if let Err(e) = shared.catalog.clear_force(&disk.id) {
            warn!("cannot clear the forced-rebind mark: {e:#}");
        }
    }
    info!(
        applied_seq = applied,
        holds_replica = flags & WELCOME_NEED_FULL_SYNC == 0,
        "connected to the target"
    );
    shared.event(
        Some(&disk.id),
        "target",
        Severity::Info,
        &format!("connected to the target (applied seq {applied})"),
        None,
    );
    spool::trim(shared, disk, binding, applied).await;

    let inflight = Arc::new(InFlight::new(applied));
    let ended = CancellationToken::new();
    // Frames the reader wants sent (answers to the target's questions).
    let (answers, mut to_send) = tokio::sync::mpsc::unbounded_channel::<Frame>();
    {
        let mut st = disk.lock();
        if st.binding == binding {
            st.to_target = Some(answers.clone());
            let queries = std::mem::take(&mut st.pending_queries);
            st.queries_in_flight = queries.len();
            for q in queries {
                let _ = answers.send(q);
            }
        }
    }
    crate::calls::target_connected(shared, disk);
    // Aborted if this session is dropped (collector stopping, disk rebound).
    let mut reader = {
        let (s, d, inf, end) = (shared.clone(), disk.clone(), inflight.clone(), ended.clone());
        AbortOnDropHandle::new(tokio::spawn(
            async move {
                let r = read_loop(&s, &d, binding, &inf, &mut rd, &answers).await;
                end.cancel();
                r
            }
            .in_current_span(),
        ))
    };
    let sent = send_loop(
        shared,
        disk,
        binding,
        rebound,
        &ended,
        &inflight,
        &mut wr,
        applied,
        &mut to_send,
    )
    .await;
    ended.cancel();
    let _ = wr.shutdown().await;
    reader.abort();
    let read = (&mut reader).await.unwrap_or(Ok(()));
    sent.and(read)
}

async fn read_loop(
    shared: &Arc<Shared>,
    disk: &Arc<Disk>,
    binding: u64,
    inflight: &InFlight,
    rd: &mut FrameReader<Reader>,
    answers: &tokio::sync::mpsc::UnboundedSender<Frame>,
) -> Result<()> {
    loop {
        let f = tokio::time::timeout(TARGET_IDLE, rd.next())
            .await
            .map_err(|_| anyhow!("nothing from the target for {} s", TARGET_IDLE.as_secs()))?
            .context("read from the target")?;
        match f {
            None => bail!("the target closed the connection"),
            Some(Frame::Ack { seq }) => {
                let sent = inflight.sent_upto();
                if seq > sent {
                    error!(
                        ack = seq,
                        sent_upto = sent,
                        "the target acknowledged a seq beyond the highest sent; not trimming, reconnecting"
                    );
                    bail!("the target acknowledged seq {seq}, beyond the highest seq sent ({sent})");
                }
                {
                    let mut st = disk.lock();
                    if st.binding != binding {
                        return Ok(());
                    }
                    st.applied_seq = st.applied_seq.max(seq);
                }
                inflight.acked(seq);
                spool::trim(shared, disk, binding, seq).await;
            }
            Some(Frame::TargetState(ts)) => {
                let agent = {
                    let mut st = disk.lock();
                    if st.binding != binding {
                        continue;
                    }
                    st.target_state = Some(ts);
                    st.agent.as_ref().map(|a| a.tx.clone())
                };
                // The agent keeps what the target has not applied tracked
                // (agent/src/unapplied.rs): tell it what has been. Best
                // effort: the next state (2 s) repeats it.
                if let Some(tx) = agent {
                    let _ = tx.try_send(Out {
                        frame: Frame::TargetState(ts),
                        done: None,
                    });
                }
            }
            Some(Frame::Request(req)) => match req {
                Request::StatusNow { nonce } => {
                    // A drain before a failover: say what is held here and
                    // at the agent, without holding up acks meanwhile.
                    debug!(nonce, "the target asks what is held for the disk");
                    let (s, d, out) = (shared.clone(), disk.clone(), answers.clone());
                    tokio::spawn(
                        async move {
                            let p = crate::state::held_for_target(&s, &d, nonce, ASK_AGENT_WAIT).await;
                            let _ = out.send(Frame::Progress(p));
                        }
                        .in_current_span(),
                    );
                }
                _ => shared.relay_to_agent(disk, req),
            },
            Some(f @ Frame::ChunkHashes { .. }) => {
                // An agent's hash-compare resync waits for these; if the
                // agent has gone, it asks again on its next connection.
                let agent = {
                    let mut st = disk.lock();
                    if st.binding != binding {
                        continue;
                    }
                    st.queries_in_flight = st.queries_in_flight.saturating_sub(1);
                    st.agent.as_ref().map(|a| a.tx.clone())
                };
                if let Some(tx) = agent {
                    let _ = tx.send(Out { frame: f, done: None }).await;
                }
            }
            Some(Frame::Reply { nonce, ok, body }) => crate::calls::note_reply(disk, "target", nonce, ok, body),
            Some(Frame::Error {
                code: ErrorCode::StaleGeneration,
                reason,
            }) => return Err(Fenced(reason).into()),
            Some(Frame::Error { code, reason }) => bail!("the target reported {code}: {reason}"),
            Some(other) => bail!("unexpected frame from the target: {other:?}"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    shared: &Arc<Shared>,
    disk: &Arc<Disk>,
    binding: u64,
    rebound: &CancellationToken,
    ended: &CancellationToken,
    inflight: &InFlight,
    wr: &mut Writer,
    applied: u64,
    to_send: &mut tokio::sync::mpsc::UnboundedReceiver<Frame>,
) -> Result<()> {
    let mut packer = Packer::new(shared.cfg.window_blocks, shared.cfg.zstd_level).context("zstd compressor")?;
    // `next`: where to look in the spool; `expect`: the seq the target
    // expects next (a batch starting later carries PACKED_GAP).
    let mut next = applied + 1;
    let mut expect = applied + 1;
    let uuid = disk.lock().uuid;
    // Any of these ends the loop (quietly: the session says why).
    let over = || async {
        tokio::select! {
            _ = ended.cancelled() => {}
            _ = rebound.cancelled() => {}
            _ = shared.stop.cancelled() => {}
        }
    };
    loop {
        while let Ok(f) = to_send.try_recv() {
            write_frame(wr, &f).await.context("send to the target")?;
        }
        let spooled = disk.spooled.notified();
        tokio::pin!(spooled);
        spooled.as_mut().enable();
        let Some(found) = next_files(disk, binding, &mut next) else {
            return Ok(()); // rebound
        };
        let Some((first, entry, more)) = found else {
            tokio::select! {
                _ = &mut spooled => continue,
                Some(f) = to_send.recv() => {
                    write_frame(wr, &f).await.context("send to the target")?;
                    continue;
                }
                _ = over() => return Ok(()),
            }
        };
        // Bound what is in flight.
        loop {
            let changed = inflight.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if inflight.bytes() < shared.cfg.max_in_flight && inflight.count() < MAX_BATCHES_IN_FLIGHT {
                break;
            }
            tokio::select! {
                _ = &mut changed => {}
                Some(f) = to_send.recv() => write_frame(wr, &f).await.context("send to the target")?,
                _ = over() => return Ok(()),
            }
        }
        // The file, its records and the packed copy are held at once while
        // packing; the budget is given back before anything is written to
        // the target, so a target that does not read stalls only this disk.
        let merged_len: u64 = entry.len + more.iter().map(|(_, e)| e.len).sum::<u64>();
        let mem = shared
            .memory
            .acquire_many(kib_permits(3 * merged_len))
            .await
            .context("memory budget closed")?;
        let Some((records, merged_last)) = read_merged(shared, disk, uuid, first, &entry, more, &mut next).await?
        else {
            continue;
        };
        let frames = pack_runs(&mut packer, &records, &mut expect)?;
        drop(records);
        drop(mem);
        for (run_last, bytes, stats) in frames {
            inflight.add(run_last, bytes.len() as u64);
            tokio::select! {
                // Flushed: over TLS, the end of a batch could otherwise wait
                // in the session for the next write.
                r = tokio::time::timeout(WRITE_TIMEOUT, async {
                    wr.write_all(&bytes).await?;
                    wr.flush().await
                }) => match r {
                    Ok(r) => r.context("send to the target")?,
                    Err(_) => bail!(
                        "the target read nothing for {} s while a batch was being sent to it",
                        WRITE_TIMEOUT.as_secs()
                    ),
                },
                _ = ended.cancelled() => return Ok(()),
            }
            disk.wire_bytes.fetch_add(stats.wire_bytes, Ordering::Relaxed);
            disk.payload_bytes.fetch_add(stats.payload_bytes, Ordering::Relaxed);
            disk.dedup_hits.fetch_add(stats.dedup_hits, Ordering::Relaxed);
            disk.zero_blocks.fetch_add(stats.zero_blocks, Ordering::Relaxed);
            shared.counters.batches_forwarded.fetch_add(1, Ordering::Relaxed);
            failpoint::hit("collector-forward-after-send");
        }
        next = next.max(merged_last + 1);
    }
}

/// The first spool file to send (its first seq and entry) and the ones
/// merged after it.
type NextFiles = (u64, SpoolEntry, Vec<(u64, SpoolEntry)>);

/// The spool files to send next: the first one past what was sent, and the
/// files right after it while they add up to less than MERGE_BYTES (one
/// packed batch, one fsync round at the target, for a run of small files).
/// `None`: the disk was rebound (another binding).
fn next_files(disk: &Disk, binding: u64, next: &mut u64) -> Option<Option<NextFiles>> {
    let st = disk.lock();
    if st.binding != binding {
        return None;
    }
    *next = (*next).max(st.applied_seq + 1);
    let mut it = st.files.iter().skip_while(|(_, e)| e.last < *next);
    let Some((first, entry)) = it.next() else {
        return Some(None);
    };
    let mut more = Vec::new();
    let (mut total, mut last) = (entry.len, entry.last);
    for (f, e) in it {
        if *f != last + 1 || total + e.len > MERGE_BYTES || more.len() >= MERGE_FILES {
            break;
        }
        total += e.len;
        last = e.last;
        more.push((*f, e.clone()));
    }
    Some(Some((*first, entry.clone(), more)))
}

/// Read the first spool file and the ones merged after it: the records
/// from `next` on and the last seq they reach. `None`: nothing to send
/// this round (the file was trimmed meanwhile, or it is unreadable: its
/// seqs are lost here, the agent is asked for a full resync and `next`
/// moves past them).
async fn read_merged(
    shared: &Arc<Shared>,
    disk: &Arc<Disk>,
    uuid: [u8; 16],
    first: u64,
    entry: &SpoolEntry,
    more: Vec<(u64, SpoolEntry)>,
    next: &mut u64,
) -> Result<Option<(Vec<Record>, u64)>> {
    let path = entry.path.clone();
    let read = tokio::task::spawn_blocking(move || fmt::read_batch(&path, &uuid))
        .await
        .context("spool reader")?;
    let batch = match read {
        Ok(b) => b,
        Err(e) => {
            let gone = !disk.lock().files.contains_key(&first);
            if gone {
                return Ok(None); // trimmed meanwhile: the target has it
            }
            error!(
                first_seq = first,
                last_seq = entry.last,
                "spool file unreadable ({e}); these seqs are lost here: asking the agent for a full resync"
            );
            disk.corrupt_records
                .fetch_add(entry.last - first + 1, Ordering::Relaxed);
            shared.relay_to_agent(disk, Request::FullResync);
            *next = entry.last + 1;
            return Ok(None);
        }
    };
    if !batch.body_ok {
        report_damage(shared, disk, &entry.path, &batch);
    }
    let from = *next;
    let mut records: Vec<Record> = batch.records.into_iter().filter(|r| r.header.seq >= from).collect();
    // The files after it: one that cannot be read now ends the merge
    // (the next round takes it first, with the error handling above).
    let mut merged_last = entry.last;
    for (_, e) in more {
        let path = e.path.clone();
        let Ok(Ok(b)) = tokio::task::spawn_blocking(move || fmt::read_batch(&path, &uuid)).await else {
            break;
        };
        if !b.body_ok {
            report_damage(shared, disk, &e.path, &b);
        }
        records.extend(b.records);
        merged_last = e.last;
    }
    Ok(Some((records, merged_last)))
}

/// Pack each run of consecutive seqs as one frame (a run that starts past
/// `expect` carries PACKED_GAP): (its last seq, the encoded frame, what
/// packing saved).
fn pack_runs(packer: &mut Packer, records: &[Record], expect: &mut u64) -> Result<Vec<(u64, Vec<u8>, PackStats)>> {
    let mut frames = Vec::new();
    for run in runs(records) {
        let run_first = run[0].header.seq;
        let run_last = run_first + (run.len() as u64 - 1);
        let flags = if run_first > *expect { PACKED_GAP } else { 0 };
        if flags != 0 {
            info!(
                expected = *expect,
                first_seq = run_first,
                "forwarding after a gap (PACKED_GAP)"
            );
        }
        let (packed, stats) = packer
            .pack(run, flags)
            .with_context(|| format!("pack seqs {run_first}..={run_last}"))?;
        let bytes = Frame::Packed(packed).encode().context("encode a packed frame")?;
        frames.push((run_last, bytes, stats));
        *expect = run_last + 1;
    }
    Ok(frames)
}

/// Split records (ascending seqs) into runs of consecutive seqs.
fn runs(records: &[Record]) -> impl Iterator<Item = &[Record]> {
    records.chunk_by(|a, b| b.header.seq == a.header.seq + 1)
}

/// Log a damaged spool body: which seqs, and what happens to them.
fn report_damage(shared: &Shared, disk: &Disk, path: &std::path::Path, b: &fmt::SpoolBatch) {
    let n = b.corrupt_payload.len() as u64 + b.lost.iter().map(|r| r.end() - r.start() + 1).sum::<u64>();
    disk.corrupt_records.fetch_add(n, Ordering::Relaxed);
    if !b.corrupt_payload.is_empty() {
        error!(
            seqs = ?b.corrupt_payload,
            file = %path.display(),
            "spool checksum mismatch: these records fail their payload hash; forwarded unchanged (the target halts them and asks for a resync)"
        );
    }
    if !b.lost.is_empty() {
        error!(
            seqs = ?b.lost,
            file = %path.display(),
            "spool checksum mismatch: these records' headers are unreadable; asking the agent for a full resync, forwarding the rest with PACKED_GAP"
        );
        shared.relay_to_agent(disk, Request::FullResync);
    }
    if b.corrupt_payload.is_empty() && b.lost.is_empty() {
        warn!(file = %path.display(), "spool checksum mismatch, but every record checks out; forwarding");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_is_told_apart_through_its_context() {
        let io = |kind| anyhow::Error::from(std::io::Error::from(kind)).context("connect to 127.0.0.1:9");
        assert!(refused(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(!refused(&io(std::io::ErrorKind::TimedOut)));
        assert!(!refused(&anyhow!("no welcome from the target within 10 s")));
    }
}
