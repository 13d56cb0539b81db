//! One agent connection: Hello checks, Welcome, then batches in (spooled
//! durably, then acknowledged), Progress in, requests out. A refusal is an
//! Error frame with a reason, one log line, and the connection closed; the
//! other connections never notice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tidemark_net::{write_frame, FrameReader, PeerRole, ReadError, Reader, Refusal, Writer};
use tidemark_wire::frame::{ErrorCode, Frame, Hello, Role, HELLO_FORCE_RESYNC, MAX_BODY, WELCOME_NEED_FULL_SYNC};
use tidemark_wire::record::FLAG_FULL;
use tidemark_wire::Record;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};
use tracing::{debug, error, info, warn, Instrument};

use crate::catalog::{DiskRow, Fence, Severity};
use crate::net::error_frame;
use crate::state::{note_progress, synced_range, AgentLink, Disk, Out, Shared};
use crate::{failpoint, forward, spool};
use tidemark_formats::generation::GenerationId;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Acks the agent's kernel has not acknowledged for this long end the
/// connection (TCP_USER_TIMEOUT), so a vanished agent host frees its disk
/// for a reconnect well before the kernel's ~15 minutes.
const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// An agent reports Progress every 500 ms; silence this long is a dead peer.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to receive the rest of a frame once its header arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes before the first record in a Batch frame: frame header, first_seq, count.
const BATCH_RECORDS_AT: usize = 16 + 8 + 4;

/// Serializes the binding of new disk ids (two first Hellos for one id).
static BINDING: AsyncMutex<()> = AsyncMutex::const_new(());

/// Accept agent connections until the collector stops.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let slots = match shared.admission.admit(peer.ip()) {
                        Ok(a) => a,
                        Err(why) => {
                            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                            shared.refused_log.warn(format_args!("closed an agent connection from {peer}: {why}"));
                            continue;
                        }
                    };
                    let s = shared.clone();
                    // The disk is recorded once the Hello names it.
                    let span = tracing::info_span!("agent", %peer, disk = tracing::field::Empty);
                    shared.tracker.spawn(async move { serve(s, stream, slots).await }.instrument(span));
                }
                Err(e) => {
                    warn!("accepting an agent connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The collector failed to bind a disk (its catalog or spool folder).
fn bind_failed(id: &str, e: &anyhow::Error) -> Refusal {
    error!("binding the disk: {e:#}");
    Refusal::new(
        ErrorCode::Internal,
        format!("collector could not bind disk {id}: {e:#}"),
    )
}

/// Tell the peer why, log one line, close.
async fn refuse(shared: &Shared, wr: &mut Writer, disk: Option<&str>, r: Refusal) {
    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
    match disk {
        Some(d) => warn!(disk = d, code = %r.code, "refused an agent connection: {}", r.reason),
        // Before a Hello names a disk: anyone can provoke these.
        None => shared
            .refused_log
            .warn(format_args!("refused an agent connection ({}): {}", r.code, r.reason)),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), write_frame(wr, &error_frame(r.code, r.reason))).await;
    let _ = wr.shutdown().await;
}

async fn serve(shared: Arc<Shared>, stream: TcpStream, mut slots: tidemark_net::Admitted) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = tidemark_net::set_user_timeout(&stream, USER_TIMEOUT) {
        warn!("cannot set TCP_USER_TIMEOUT on an agent connection: {e}");
    }
    let conn = match shared
        .cfg
        .security
        .accept_logged(stream, &shared.refused_log, "refused an agent connection")
        .await
    {
        Ok(c) => c,
        Err(refused) => {
            if refused {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    let (rd, mut wr) = (conn.reader, conn.writer);
    let (peer, revoked, anonymous) = (conn.peer, conn.revoked, conn.anonymous);
    // Every body is admitted against the memory budget before it is read
    // (an agent trickling a body holds its share until BODY_TIMEOUT).
    let mut reader = FrameReader::new(rd, tidemark_net::HELLO_MAX_BODY)
        .with_budget_for_bytes(shared.memory.clone(), crate::state::MEMORY_BUDGET);
    let first = tokio::select! {
        _ = shared.stop.cancelled() => return,
        r = tokio::time::timeout(HELLO_TIMEOUT, reader.next()) => r,
    };
    let first = match first {
        Ok(Ok(Some(Frame::Enroll { token, public_key }))) => {
            let r = enroll(&shared, peer.as_ref(), token, public_key).await;
            let f = match r {
                Ok(f) => f,
                Err(r) => {
                    shared
                        .refused_log
                        .warn(format_args!("refused an enrollment: {}", r.reason));
                    error_frame(r.code, r.reason)
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), write_frame(&mut wr, &f)).await;
            let _ = wr.shutdown().await;
            return;
        }
        Ok(Ok(Some(Frame::Crl { .. }))) => {
            let f = match crl_for(&shared, peer.as_ref()).await {
                Ok(pem) => Frame::Crl { pem },
                Err(r) => error_frame(r.code, r.reason),
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), write_frame(&mut wr, &f)).await;
            let _ = wr.shutdown().await;
            return;
        }
        Ok(Ok(Some(Frame::Hello(_)))) if anonymous => {
            let r = Refusal::new(
                ErrorCode::Forbidden,
                "no client certificate: without one this port takes only an enrollment (tidemark enroll)",
            );
            return refuse(&shared, &mut wr, None, r).await;
        }
        other => other,
    };
    // Any identity of the CA may renew here (an Enroll, above); only
    // agents may go on.
    if let Some(p) = peer.as_ref().filter(|p| p.role != PeerRole::Agent) {
        let r = Refusal::new(
            ErrorCode::Forbidden,
            format!("{p} cannot act as an agent: this collector takes only agent identities"),
        );
        return refuse(&shared, &mut wr, None, r).await;
    }
    let hello = match first {
        Err(_) => {
            let r = Refusal::new(ErrorCode::Malformed, "no hello within 10 s");
            return refuse(&shared, &mut wr, None, r).await;
        }
        Ok(Ok(Some(Frame::Hello(h)))) => h,
        Ok(Ok(Some(other))) => {
            let r = Refusal::new(ErrorCode::Malformed, format!("expected a hello, got {}", other.name()));
            return refuse(&shared, &mut wr, None, r).await;
        }
        Ok(Ok(None)) => {
            debug!("connection closed before a hello");
            return;
        }
        Ok(Err(e)) => match e.code() {
            Some(code) => {
                let r = Refusal::new(code, format!("bad hello: {e}"));
                return refuse(&shared, &mut wr, None, r).await;
            }
            None => {
                debug!("connection failed before a hello: {e}");
                return;
            }
        },
    };
    tracing::Span::current().record("disk", tracing::field::display(&hello.disk_id));
    let conn = shared.next_conn_id();
    let (tx, rx) = mpsc::channel::<Out>(64);
    let (disk, welcome) = match admit(&shared, &hello, peer.as_ref(), conn, tx.clone()).await {
        Ok(x) => x,
        Err(r) => return refuse(&shared, &mut wr, Some(&hello.disk_id), r).await,
    };
    slots.authenticated();
    shared.agents_connected.fetch_add(1, Ordering::Relaxed);
    let writer = tokio::spawn(write_loop(wr, rx));
    info!(
        acked_seq = welcome.0,
        need_full_sync = welcome.1 & WELCOME_NEED_FULL_SYNC != 0,
        "agent connected"
    );
    shared.event(
        Some(&disk.id),
        "agent",
        Severity::Info,
        &format!(
            "{} connected (acked seq {}{})",
            peer.as_ref()
                .map_or_else(|| "the agent".to_string(), ToString::to_string),
            welcome.0,
            if welcome.1 & WELCOME_NEED_FULL_SYNC != 0 {
                ", a full sync owed"
            } else {
                ""
            }
        ),
        None,
    );
    reader.set_max_body(MAX_BODY);
    let end = tokio::select! {
        end = session(&shared, &disk, &tx, &mut reader, welcome) => end,
        () = revoked.cancelled() => Err(SessionEnd::Refused(Refusal::new(
            ErrorCode::Forbidden,
            format!(
                "the certificate of {} was revoked",
                peer.as_ref().map_or_else(|| "the agent".to_string(), ToString::to_string)
            ),
        ))),
    };
    match &end {
        Ok(()) => {
            info!("agent disconnected");
            shared.event(Some(&disk.id), "agent", Severity::Info, "the agent disconnected", None);
        }
        Err(SessionEnd::Refused(r)) => {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(code = %r.code, "closing the agent connection: {}", r.reason);
            shared.event(
                Some(&disk.id),
                "agent",
                Severity::Warning,
                &format!("the agent's connection was closed: {}", r.reason),
                None,
            );
            let _ = tx
                .send(Out {
                    frame: error_frame(r.code, r.reason.clone()),
                    done: None,
                })
                .await;
        }
        Err(SessionEnd::Gone(why)) => {
            info!("agent connection ended: {why}");
            shared.event(
                Some(&disk.id),
                "agent",
                Severity::Info,
                &format!("the agent's connection ended: {why}"),
                None,
            );
        }
    }
    {
        let mut st = disk.lock();
        if st.agent.as_ref().is_some_and(|a| a.conn == conn) {
            st.agent = None;
            // Pending `refresh` calls and tags: this agent will not answer them.
            st.nonce_waiters.clear();
            st.call_waiters.retain(|(_, who, _)| *who != "agent");
        }
    }
    shared.agents_connected.fetch_sub(1, Ordering::Relaxed);
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Bind `d` to agent identity `m`: the catalog, then memory.
async fn set_owner(shared: &Arc<Shared>, d: &Arc<Disk>, m: &str) -> anyhow::Result<()> {
    let (s, id, m2) = (shared.clone(), d.id.to_string(), m.to_string());
    tokio::task::spawn_blocking(move || s.catalog.set_owner(&id, &m2))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)?;
    d.lock().owner = Some(m.to_string());
    Ok(())
}

/// A `Crl` request (`docs/security.md`, "Revoking"): the CA's revocation
/// list (`CADIR/crl.pem`; empty if the CA has revoked nothing), for any
/// identity of the CA, so targets and agents hold the list without a copy
/// by hand.
async fn crl_for(shared: &Arc<Shared>, peer: Option<&tidemark_net::Identity>) -> Result<String, Refusal> {
    let forbidden = |m: &str| Refusal::new(ErrorCode::Forbidden, m.to_string());
    if peer.is_none() {
        return Err(forbidden("the revocation list is served to identities of the CA only"));
    }
    let Some(ca) = shared.cfg.ca.clone() else {
        return Err(forbidden(
            "this collector does not hold the CA (it was started without --ca): no revocation list here",
        ));
    };
    let path = ca.join(tidemark_net::tls::CRL_FILE);
    match tokio::fs::read_to_string(&path).await {
        Ok(pem) if pem.len() <= tidemark_wire::frame::MAX_CRL_PEM => Ok(pem),
        Ok(_) => Err(Refusal::new(
            ErrorCode::Internal,
            format!("{} is longer than a Crl frame carries", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Refusal::new(
            ErrorCode::Internal,
            format!("read {}: {e}", path.display()),
        )),
    }
}

/// An `Enroll` (`docs/security.md`): a one-time token traded for a
/// certificate of the identity it was made for, or (no token, over an
/// authenticated connection) the peer's own identity renewed with the
/// new key. Answered with `Enrolled`; recorded in the audit log.
async fn enroll(
    shared: &Arc<Shared>,
    peer: Option<&tidemark_net::Identity>,
    token: String,
    public_key: Vec<u8>,
) -> Result<Frame, Refusal> {
    let forbidden = |m: String| Refusal::new(ErrorCode::Forbidden, m);
    let Some(ca_dir) = shared.cfg.ca.clone() else {
        return Err(forbidden(
            "this collector does not serve enrollment (it was started without --ca)".into(),
        ));
    };
    let key = tidemark_net::ca::PeerKey::parse(&public_key).map_err(|e| Refusal::new(ErrorCode::Malformed, e))?;
    let who = peer.map_or_else(|| "an unauthenticated client".to_string(), ToString::to_string);
    let action = if token.is_empty() { "renew" } else { "enroll" };
    let peer = peer.cloned();
    let r = tokio::task::spawn_blocking(
        move || -> Result<(tidemark_net::Identity, String, String, String), String> {
            let (id, secs) = if token.is_empty() {
                let Some(id) = peer else {
                    return Err("a renewal needs the current certificate".into());
                };
                (id, tidemark_net::enroll::RENEWED_LIFETIME.as_secs())
            } else {
                let now = tidemark_util::now_ns() / 1_000_000_000;
                let e = tidemark_net::ca::redeem(&ca_dir, &token, now)?;
                (e.id, e.cert_secs)
            };
            let ca = tidemark_net::ca::Ca::load(&ca_dir)?;
            let (cert, serial) = ca.issue(&id, &key, secs)?;
            Ok((id, cert, ca.pem, serial))
        },
    )
    .await
    .map_err(|e| Refusal::new(ErrorCode::Internal, format!("enrollment: {e}")))?;
    match r {
        Ok((id, cert_pem, ca_pem, serial)) => {
            info!(identity = %id, serial = %serial, "{action}: certificate issued");
            crate::audit::record(
                shared,
                &who,
                action,
                &id.to_string(),
                &format!("issued serial {serial}"),
            );
            Ok(Frame::Enrolled { cert_pem, ca_pem })
        }
        Err(e) => {
            crate::audit::record(shared, &who, action, "-", &format!("refused: {e}"));
            Err(forbidden(e))
        }
    }
}

/// Check a Hello and attach the connection to its disk; returns the disk
/// and the Welcome's (acked_seq, flags).
async fn admit(
    shared: &Arc<Shared>,
    hello: &Hello,
    peer: Option<&tidemark_net::Identity>,
    conn: u64,
    tx: mpsc::Sender<Out>,
) -> Result<(Arc<Disk>, (u64, u32)), Refusal> {
    tidemark_net::check_hello(hello, "collector", Role::Agent, &shared.cfg.token)?;
    let id = &hello.disk_id;
    if id.starts_with("catalog.db") || id.as_str() == spool::KEPT_DIR {
        return Err(Refusal::new(
            ErrorCode::Malformed,
            format!("disk id {id:?} is reserved"),
        ));
    }
    let internal = |e: anyhow::Error| bind_failed(id, &e);
    let bind = BINDING.lock().await;
    // Over TLS, the agent identity acting for the disk; the first one
    // registers it, and no other may act for it after.
    let me = peer.map(ToString::to_string);
    if let Some(d) = shared.disk(id) {
        let owner = d.lock().owner.clone();
        match (&owner, &me) {
            (Some(o), Some(m)) if o != m => {
                if shared.rebind_grant(id, Some(m), true).is_none() {
                    return Err(Refusal::new(
                        ErrorCode::Forbidden,
                        format!(
                            "disk {id} belongs to {o}, which registered it; this connection is {m}: a disk id is bound \
                             to its agent's identity (an operator moves it: tidemark rebind {id} --owner {m})"
                        ),
                    ));
                }
                set_owner(shared, &d, m).await.map_err(internal)?;
                warn!(from = %o, to = %m, "disk moved to another agent identity (an operator's rebind)");
                crate::audit::record(shared, m, "rebind-owner", id, &format!("from {o}"));
            }
            (Some(o), None) => {
                return Err(Refusal::new(
                    ErrorCode::Forbidden,
                    format!("disk {id} belongs to {o}; a plaintext connection cannot act for it"),
                ))
            }
            (None, Some(m)) => {
                set_owner(shared, &d, m).await.map_err(internal)?;
                info!(owner = %m, "disk bound to its agent's identity");
            }
            _ => {}
        }
    }
    let (disk, old_spool) = bind_disk(shared, hello, me.as_deref()).await?;
    let (new_size, flags, acked) = {
        let mut st = disk.lock();
        if st.agent.is_some() {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!("disk {id} already has a live agent connection"),
            ));
        }
        let new_size = (hello.disk_size != 0 && hello.disk_size != st.disk_size).then_some(hello.disk_size);
        // A disk's size is its registration's: an agent's state directory
        // is made for one size, so another size is another disk (a forced
        // rebind registers it), never a later Hello's say-so.
        if let Some(size) = new_size.filter(|_| st.disk_size != 0 && old_spool.is_none()) {
            return Err(Refusal::new(
                ErrorCode::DiskMismatch,
                format!(
                    "disk {id} is registered as {} bytes; this Hello says {size}: a disk of another size is protected \
                     as a new disk (a new state directory, --force-resync)",
                    st.disk_size
                ),
            ));
        }
        st.agent = Some(AgentLink { conn, tx });
        if let Some(size) = new_size {
            st.disk_size = size;
        }
        let flags = if st.pending_full_sync {
            WELCOME_NEED_FULL_SYNC
        } else {
            0
        };
        let acked = st.acked_seq;
        (new_size, flags, acked)
    };
    // The agent link is set: no other connection can take the disk. Deleting
    // the old spool can take a while; other hellos need not wait for it, but
    // this agent must (its first files may have the old files' names).
    drop(bind);
    if let Some(old) = old_spool {
        if let Err(e) = spool::keep_old_spool(shared, &disk, old.0, old.1).await {
            let mut st = disk.lock();
            if st.agent.as_ref().is_some_and(|a| a.conn == conn) {
                st.agent = None;
            }
            return Err(internal(e));
        }
        warn!(
            uuid = %crate::catalog::uuid_text(&hello.disk_uuid),
            "disk id rebound to a new uuid (an operator's leave, forced): the old spool is kept aside, the target \
             keeps the old history as a disk of its own and starts afresh"
        );
    }
    if let Some(size) = new_size {
        let s = shared.clone();
        let id = id.clone();
        let r = tokio::task::spawn_blocking(move || s.catalog.set_disk_size(&id, size)).await;
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
            warn!(disk = %hello.disk_id, "recording the disk size: {e:#}");
        }
    }
    Ok((disk, (acked, flags)))
}

/// The disk `hello` names: bound now if it is new (catalog row, spool
/// folder, forwarder), or the bound one; a forced rebind to a new UUID
/// also returns the old spool, to be dropped once the agent link is set.
/// Called with BINDING held.
async fn bind_disk(
    shared: &Arc<Shared>,
    hello: &Hello,
    owner: Option<&str>,
) -> Result<(Arc<Disk>, Option<(spool::OldSpool, [u8; 16])>), Refusal> {
    let id = &hello.disk_id;
    let internal = |e: anyhow::Error| bind_failed(id, &e);
    let disk = match shared.disk(id) {
        None if shared.disk_count() >= shared.cfg.max_disks => {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!(
                    "this collector protects {} disks already, its limit (--max-disks); disk {id} is not registered",
                    shared.disk_count()
                ),
            ));
        }
        None => {
            // A generation forked at seq F (a failed-over copy protected in
            // reverse, docs/failback.md) continues the seqs after F: this
            // collector holds nothing, but nothing before F is owed either.
            // Whether the target holds the line up to F is the target's to
            // say (a gap makes it ask for a full resync).
            let fork = (hello.lineage.parent != [0; 16]).then_some(hello.lineage.fork_seq);
            let row = DiskRow {
                disk_id: id.clone(),
                disk_uuid: hello.disk_uuid,
                trimmed_seq: fork.unwrap_or(0),
                pending_full_sync: fork.is_none(),
                full_sync_since: 0,
                force_target: false,
                disk_size: hello.disk_size,
                lineage: hello.lineage,
                fence: None,
                owner: owner.map(str::to_string),
            };
            let s = shared.clone();
            let r = row.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                s.catalog.bind(&r.disk_id, &r.disk_uuid, false)?;
                if let Some(o) = &r.owner {
                    s.catalog.set_owner(&r.disk_id, o)?;
                }
                s.catalog.set_disk_size(&r.disk_id, r.disk_size)?;
                s.catalog.set_lineage(&r.disk_id, &r.lineage)?;
                if !r.pending_full_sync {
                    s.catalog.set_trimmed(&r.disk_id, r.trimmed_seq)?;
                    s.catalog.set_pending_full_sync(&r.disk_id, false, 0)?;
                }
                spool::ensure_dir(&s.cfg.spool.join(&r.disk_id))
            })
            .await
            .context("bind")
            .and_then(|r| r)
            .map_err(internal)?;
            let disk = Arc::new(shared.new_disk(&row));
            shared.insert_disk(disk.clone());
            forward::spawn(shared, &disk);
            info!(uuid = %crate::catalog::uuid_text(&hello.disk_uuid), "bound a new disk");
            disk
        }
        Some(disk) => {
            let (bound, busy, lift) = {
                let st = disk.lock();
                // A fence holds back its own generation (and a new root):
                // a line forked since (the disk came back the other way)
                // takes the disk over.
                let lift = match &st.fence {
                    Some(f) => {
                        let l = &hello.lineage;
                        let fork = l.parent != [0; 16] && f.generation.is_none_or(|g| g.0 != l.generation);
                        if !fork || hello.disk_uuid != st.uuid || st.agent.is_some() {
                            return Err(fenced(id, f));
                        }
                        true
                    }
                    None => false,
                };
                (st.uuid, st.agent.is_some(), lift)
            };
            if lift {
                spool::lift_fence(shared, &disk, hello.lineage)
                    .await
                    .map_err(internal)?;
                return Ok((disk, None));
            }
            if bound != hello.disk_uuid {
                if hello.flags & HELLO_FORCE_RESYNC == 0 {
                    return Err(Refusal::new(
                        ErrorCode::DiskMismatch,
                        format!(
                            "disk id {id} is bound to uuid {}, this hello names {} (an operator's tidemark rebind {id} \
                             and the agent's --force-resync rebind it)",
                            crate::catalog::uuid_text(&bound),
                            crate::catalog::uuid_text(&hello.disk_uuid)
                        ),
                    ));
                }
                // An agent's Hello alone never replaces a disk's history.
                if shared.rebind_grant(id, owner, false).is_none() {
                    return Err(Refusal::new(
                        ErrorCode::Forbidden,
                        format!(
                            "disk id {id} is bound to uuid {}; a rebind to {} (--force-resync) needs an operator's \
                             leave first: tidemark rebind {id} (its history is kept, not deleted)",
                            crate::catalog::uuid_text(&bound),
                            crate::catalog::uuid_text(&hello.disk_uuid)
                        ),
                    ));
                }
                if busy {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!("disk {id} has a live agent connection; cannot rebind it now"),
                    ));
                }
                let old = (
                    spool::rebind(shared, &disk, hello.disk_uuid).await.map_err(internal)?,
                    bound,
                );
                shared.rebind_grant(id, owner, true);
                crate::audit::record(
                    shared,
                    owner.unwrap_or("a plaintext agent"),
                    "rebind-uuid",
                    id,
                    &format!(
                        "from {} to {}",
                        crate::catalog::uuid_text(&bound),
                        crate::catalog::uuid_text(&hello.disk_uuid)
                    ),
                );
                adopt_lineage(shared, &disk, hello).await.map_err(internal)?;
                return Ok((disk, Some(old)));
            }
            let held = disk.lock().lineage;
            if held.is_known() && hello.lineage.is_known() && held.generation != hello.lineage.generation {
                return Err(Refusal::new(
                    ErrorCode::DiskMismatch,
                    format!(
                        "disk {id} holds data generation {} here; this agent holds generation {}, \
                         which is not the same line of writes (a state directory copied from another \
                         site, or restored from an old copy); to start this disk afresh, protect it with a \
                         new, empty state directory and --force-resync (a whole-disk sync follows)",
                        GenerationId(held.generation),
                        GenerationId(hello.lineage.generation)
                    ),
                ));
            }
            if !held.is_known() && hello.lineage.is_known() {
                adopt_lineage(shared, &disk, hello).await.map_err(internal)?;
            }
            disk
        }
    };
    Ok((disk, None))
}

/// Record the data generation `hello` names as the disk's.
async fn adopt_lineage(shared: &Arc<Shared>, disk: &Arc<Disk>, hello: &Hello) -> anyhow::Result<()> {
    let (s, id, l) = (shared.clone(), hello.disk_id.clone(), hello.lineage);
    tokio::task::spawn_blocking(move || s.catalog.set_lineage(&id, &l))
        .await
        .context("record the generation")??;
    disk.lock().lineage = hello.lineage;
    Ok(())
}

/// The refusal of an agent whose generation a failover ended.
pub(crate) fn fenced(id: &str, f: &Fence) -> Refusal {
    let g = f
        .generation
        .map_or_else(|| "(not known)".to_string(), |g| g.to_string());
    let kept = f
        .spool
        .as_deref()
        .map_or_else(String::new, |p| format!("; what it spooled after that is kept in {p}"));
    Refusal::new(
        ErrorCode::StaleGeneration,
        format!(
            "disk {id}: generation {g} is fenced since {}: {}{kept}",
            tidemark_util::human::format_unix_time(f.at),
            f.reason
        ),
    )
}

enum SessionEnd {
    /// The agent broke the protocol (or the collector failed): tell it why.
    Refused(Refusal),
    /// The connection went away or the collector is stopping.
    Gone(String),
}

async fn send_and_wait(tx: &mpsc::Sender<Out>, frame: Frame) -> Result<(), SessionEnd> {
    let (done, written) = oneshot::channel();
    tx.send(Out {
        frame,
        done: Some(done),
    })
    .await
    .map_err(|_| SessionEnd::Gone("connection writer stopped".into()))?;
    written
        .await
        .map_err(|_| SessionEnd::Gone("could not write to the agent".into()))
}

async fn session(
    shared: &Arc<Shared>,
    disk: &Arc<Disk>,
    tx: &mpsc::Sender<Out>,
    reader: &mut FrameReader<Reader>,
    (acked, flags): (u64, u32),
) -> Result<(), SessionEnd> {
    let generation = disk.lock().lineage.generation;
    send_and_wait(
        tx,
        Frame::Welcome {
            acked_seq: acked,
            flags,
            generation,
        },
    )
    .await?;
    // What the target has applied, so the agent can stop tracking it.
    let ts = disk.lock().target_state;
    if let Some(ts) = ts {
        send_and_wait(tx, Frame::TargetState(ts)).await?;
    }
    // Range resyncs still owed: sent on every connection until sync records
    // covering them are spooled (`Shared::cover_resyncs`), so a request lost
    // with an earlier connection is not lost for good.
    for r in shared.owed_resyncs(disk) {
        let req = tidemark_wire::frame::Request::Resync {
            seq: r.seq,
            offset: r.offset,
            length: r.length,
        };
        send_and_wait(tx, Frame::Request(req)).await?;
        info!(
            seq = r.seq,
            offset = r.offset,
            length = r.length,
            "sent an owed resync request"
        );
    }
    loop {
        if shared.is_spool_full() {
            shared.wait_for_space().await;
        }
        let header = tokio::select! {
            _ = shared.stop.cancelled() => return Err(SessionEnd::Gone("collector stopping".into())),
            r = tokio::time::timeout(IDLE_TIMEOUT, reader.header()) => r,
        };
        match header {
            Err(_) => {
                return Err(SessionEnd::Gone(format!(
                    "nothing received for {} s",
                    IDLE_TIMEOUT.as_secs()
                )))
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(_))) => {}
            Ok(Err(e)) => return Err(read_failure(e)),
        }
        // The body is bounded by the header (MAX_BODY), and its bytes are
        // admitted against the shared memory budget before they are read
        // (an agent trickling a body holds that share for BODY_TIMEOUT at
        // most); the records decoded from them, once they have arrived.
        // Both are held until the batch is spooled.
        let frame = match tokio::time::timeout(BODY_TIMEOUT, reader.next()).await {
            Err(_) => return Err(SessionEnd::Gone("frame body not received in time".into())),
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(read_failure(e)),
        };
        let _bytes = reader.take_permit();
        let buf = reader.take_frame_bytes();
        let _decoded = shared
            .memory
            .acquire_many(crate::state::kib_permits(buf.len() as u64 + 16))
            .await
            .map_err(|_| SessionEnd::Gone("collector stopping".into()))?;
        match frame {
            Frame::Batch(records) => {
                let held = spool_batch(shared, disk, records, buf).await?;
                drop((_bytes, _decoded));
                failpoint::hit("collector-before-ack");
                send_and_wait(tx, Frame::Ack { seq: held }).await?;
                failpoint::hit("collector-after-ack");
            }
            Frame::Progress(p) => note_progress(disk, p),
            Frame::Reply { nonce, ok, body } => crate::calls::note_reply(disk, "agent", nonce, ok, body),
            Frame::HashQuery { .. } => {
                // Relayed to the target's session; kept for the next one
                // while none is up (bounded: the agent asks again anyway).
                let mut st = disk.lock();
                match st.to_target.clone() {
                    // Beyond the cap an agent is asking faster than the
                    // target answers: dropped (it asks again).
                    Some(_) if st.queries_in_flight >= crate::state::MAX_PENDING_QUERIES => {}
                    Some(to) => {
                        st.queries_in_flight += 1;
                        let _ = to.send(frame);
                    }
                    None => {
                        if !st.pending_queries.contains(&frame) {
                            st.pending_queries.push(frame);
                        }
                        let over = st
                            .pending_queries
                            .len()
                            .saturating_sub(crate::state::MAX_PENDING_QUERIES);
                        st.pending_queries.drain(..over);
                    }
                }
            }
            Frame::Error { code, reason } => {
                return Err(SessionEnd::Gone(format!("the agent reported {code}: {reason}")));
            }
            other => {
                return Err(SessionEnd::Refused(Refusal::new(
                    ErrorCode::Malformed,
                    format!("unexpected {} frame from an agent", other.name()),
                )))
            }
        }
    }
}

fn read_failure(e: ReadError) -> SessionEnd {
    match e.code() {
        Some(code) => SessionEnd::Refused(Refusal::new(code, format!("bad frame: {e}"))),
        None => SessionEnd::Gone(e.to_string()),
    }
}

/// Spool the records of a batch this disk does not hold yet; returns the
/// highest seq now durable (what to acknowledge).
/// Whether a record's range lies (partly) beyond a disk of `size` bytes
/// (0: the size is not known).
fn beyond(h: &tidemark_wire::RecordHeader, size: u64) -> bool {
    use tidemark_wire::RecordKind::{Sync, Trim, Write, Zero};
    size != 0
        && matches!(h.kind, Write | Zero | Trim | Sync)
        && h.offset.checked_add(h.length).is_none_or(|end| end > size)
}

async fn spool_batch(
    shared: &Arc<Shared>,
    disk: &Arc<Disk>,
    records: Vec<Record>,
    buf: Vec<u8>,
) -> Result<u64, SessionEnd> {
    let Some(first) = records.first().map(|r| r.header.seq) else {
        return Err(SessionEnd::Refused(Refusal::new(
            ErrorCode::Malformed,
            "an empty batch",
        )));
    };
    let n = records.len() as u64;
    let Some(last) = first.checked_add(n - 1) else {
        return Err(SessionEnd::Refused(Refusal::new(
            ErrorCode::Malformed,
            format!("a batch of {n} records from seq {first} runs past the last seq"),
        )));
    };
    let (held, uuid, binding, since, size) = {
        let st = disk.lock();
        if let Some(f) = &st.fence {
            return Err(SessionEnd::Refused(fenced(&disk.id, f)));
        }
        (st.acked_seq, st.uuid, st.binding, st.full_sync_since, st.disk_size)
    };
    // This is the first hop that knows the disk's size: a record beyond it
    // could never be applied (it would wedge the disk at the target).
    if let Some(r) = records.iter().find(|r| beyond(&r.header, size)) {
        let h = &r.header;
        return Err(SessionEnd::Refused(Refusal::new(
            ErrorCode::Malformed,
            format!(
                "seq {}: a {:?} record of {} bytes at offset {} lies beyond the disk's {size} bytes",
                h.seq, h.kind, h.length, h.offset
            ),
        )));
    }
    if last <= held {
        shared.counters.duplicates_dropped.fetch_add(n, Ordering::Relaxed);
        return Ok(held);
    }
    let skip = usize::try_from(held.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
    let first_kept = first.max(held + 1);
    if first_kept > held + 1 && held != 0 {
        let want = held + 1;
        return Err(SessionEnd::Refused(Refusal::new(
            ErrorCode::Malformed,
            format!(
                "batch starts at seq {first_kept}, expected seq {want}: the agent's journal no longer holds seq {want}, \
                 which this collector expects; if the collector or the agent state was restored from an old copy, \
                 run the agent once with --force-resync"
            ),
        )));
    }
    if first_kept > held + 1 {
        info!(
            first_seq = first_kept,
            "stream starts after a gap (the collector held nothing for this disk)"
        );
    }
    if skip > 0 {
        shared
            .counters
            .duplicates_dropped
            .fetch_add(skip as u64, Ordering::Relaxed);
    }
    let offset = BATCH_RECORDS_AT
        + records[..skip]
            .iter()
            .map(|r| usize::try_from(r.header.encoded_len()).unwrap_or(usize::MAX))
            .sum::<usize>();
    let full_sync_started = records[skip..]
        .iter()
        .any(|r| r.header.flags & FLAG_FULL != 0 && r.header.seq > since);
    let synced: Vec<(u64, u64, u64)> = records[skip..].iter().filter_map(|r| synced_range(&r.header)).collect();
    let kept = n - skip as u64;
    drop(records);
    let dir = disk.dir.clone();
    let written = tokio::task::spawn_blocking(move || spool::write_batch(&dir, uuid, &buf[offset..])).await;
    let (_h, entry) = match written {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            error!(first_seq = first_kept, last_seq = last, "cannot spool a batch: {e:#}");
            return Err(SessionEnd::Refused(Refusal::new(
                ErrorCode::Internal,
                format!("collector could not spool seqs {first_kept}..={last}: {e:#}"),
            )));
        }
        Err(e) => {
            return Err(SessionEnd::Refused(Refusal::new(
                ErrorCode::Internal,
                format!("collector could not spool seqs {first_kept}..={last}: {e}"),
            )))
        }
    };
    let len = entry.len;
    let clear_full = {
        let mut st = disk.lock();
        if st.binding != binding {
            // Rebound or fenced while this batch was written: it is not
            // acknowledged (the agent still holds it), so the file goes,
            // rather than lie unindexed and uncounted in the folder.
            drop(st);
            if let Err(e) = std::fs::remove_file(&entry.path) {
                warn!(file = %entry.path.display(), "removing a batch spooled across a rebind or fence: {e}");
            }
            return Err(SessionEnd::Gone(
                "the disk was rebound or fenced while a batch was spooled; it is not acknowledged".into(),
            ));
        }
        st.files.insert(first_kept, entry);
        st.spool_bytes += len;
        st.acked_seq = last;
        let clear = full_sync_started && st.pending_full_sync;
        if clear {
            st.pending_full_sync = false;
        }
        clear
    };
    shared.spool_grew(len);
    if clear_full {
        info!("the agent's full sync has started");
        shared.event(
            Some(&disk.id),
            "sync",
            Severity::Info,
            "the agent's full sync has started",
            None,
        );
        if let Err(e) = shared.catalog.set_pending_full_sync(&disk.id, false, since) {
            warn!("cannot clear the owed full sync in the catalog: {e:#}");
        }
    }
    shared.cover_resyncs(disk, &synced);
    shared.counters.batches_spooled.fetch_add(1, Ordering::Relaxed);
    shared.counters.records_spooled.fetch_add(kept, Ordering::Relaxed);
    shared.counters.bytes_spooled.fetch_add(len, Ordering::Relaxed);
    disk.spooled.notify_waiters();
    Ok(last)
}

/// Write frames for one agent connection, in order; stops after an Error frame.
async fn write_loop(mut wr: Writer, mut rx: mpsc::Receiver<Out>) {
    while let Some(out) = rx.recv().await {
        let last = matches!(out.frame, Frame::Error { .. });
        if let Err(e) = write_frame(&mut wr, &out.frame).await {
            debug!("writing to an agent: {e}");
            break;
        }
        if let Some(d) = out.done {
            let _ = d.send(());
        }
        if last {
            break;
        }
    }
    let _ = wr.shutdown().await;
}
