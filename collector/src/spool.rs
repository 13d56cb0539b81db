//! The collector's side of the spool (`tidemark_formats::spool` owns the
//! bytes): indexing a disk's files at start, writing a batch durably with a
//! failpoint at each step, trimming what the target acknowledged,
//! dropping a disk's spool when its id is rebound, and moving it aside
//! when a failover fenced the disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tidemark_formats::spool::{self as fmt, SpoolHeader};
use tidemark_util::crashsafe;
use tracing::{error, info, warn};

use crate::catalog::{now_s, DiskRow, Fence};
use crate::failpoint;
use crate::net::error_frame;
use crate::state::{Disk, Out, OwedResync, Shared, SpoolEntry};

/// Where the spools of fenced disks are kept: `<spool>/.kept/<id>.<unix s>`
/// (a disk id `.kept` is refused).
pub(crate) const KEPT_DIR: &str = ".kept";

/// Create a disk's spool folder durably if it is missing.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create spool folder {}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        crashsafe::fsync_dir(parent).with_context(|| format!("fsync {}", parent.display()))?;
    }
    Ok(())
}

/// Index every disk of the catalog (blocking: it reads every spool file
/// header), with the resyncs it still owes the target.
pub(crate) fn load_all(shared: &Shared) -> Result<()> {
    for row in shared.catalog.disks()? {
        let disk = load_disk(shared, &row)?;
        let owed = shared.catalog.resyncs(&row.disk_id)?;
        disk.lock().owed_resyncs = owed.into_iter().map(OwedResync::new).collect();
        shared.insert_disk(disk);
    }
    Ok(())
}

/// Build a disk from its catalog row and its spool folder: torn temp files,
/// files of an older binding and files the target already acknowledged are
/// deleted; the rest are indexed.
pub(crate) fn load_disk(shared: &Shared, row: &DiskRow) -> Result<Arc<Disk>> {
    let disk = shared.new_disk(row);
    ensure_dir(&disk.dir)?;
    if let Some(f) = &row.fence {
        // Files left by a crash before the move, or by a batch that raced it.
        if let Some(kept) = move_aside(&shared.cfg.spool, &disk.dir, &row.disk_id, f.at)? {
            warn!(disk = %row.disk_id, kept = %kept.display(), "the disk is fenced: its spool files were moved aside");
            if f.spool.is_none() {
                let f = Fence {
                    spool: Some(kept.display().to_string()),
                    ..f.clone()
                };
                shared.catalog.set_fence(&row.disk_id, &f)?;
                disk.lock().fence = Some(f);
            }
        }
    }
    let scan = fmt::scan_dir(&disk.dir).with_context(|| format!("scan spool of disk {}", row.disk_id))?;
    for t in &scan.removed_temps {
        info!(disk = %row.disk_id, file = %t.display(), "deleted a spool file whose write was interrupted");
    }
    for u in &scan.unknown {
        warn!(disk = %row.disk_id, file = %u.display(), "unknown file in the spool folder; left alone");
    }
    let mut total = 0u64;
    let mut removed = false;
    {
        let mut st = disk.lock();
        for f in scan.files {
            if let Some(h) = f.header.as_ref().ok().filter(|h| h.disk_uuid != row.disk_uuid) {
                // A rebind committed before its old spool was kept aside.
                let to = keep_files(
                    &shared.cfg.spool,
                    &row.disk_id,
                    &uuid_tag(&h.disk_uuid),
                    std::slice::from_ref(&f.path),
                )?;
                info!(disk = %row.disk_id, file = %f.path.display(), kept = %to.display(),
                      "spool file of an earlier binding of the disk id kept aside");
                removed = true;
                continue;
            }
            let stale = (f.last_seq <= row.trimmed_seq).then_some("the target already acknowledged it");
            if let Some(why) = stale {
                info!(disk = %row.disk_id, file = %f.path.display(), "deleting spool file: {why}");
                std::fs::remove_file(&f.path).with_context(|| format!("delete {}", f.path.display()))?;
                removed = true;
                continue;
            }
            let (first_time_ns, payload_bytes) = match &f.header {
                Ok(h) => (h.first_time_ns, h.payload_bytes),
                Err(e) => {
                    error!(
                        disk = %row.disk_id,
                        first_seq = f.first_seq,
                        last_seq = f.last_seq,
                        "spool file header unreadable ({e}); these seqs will be reported lost when forwarded"
                    );
                    (0, 0)
                }
            };
            st.acked_seq = st.acked_seq.max(f.last_seq);
            total += f.len;
            st.files.insert(
                f.first_seq,
                SpoolEntry {
                    last: f.last_seq,
                    len: f.len,
                    first_time_ns,
                    payload_bytes,
                    path: f.path,
                },
            );
        }
        st.spool_bytes = total;
        info!(
            disk = %row.disk_id,
            files = st.files.len(),
            bytes = total,
            acked_seq = st.acked_seq,
            "spool indexed"
        );
    }
    if removed {
        crashsafe::fsync_dir(&disk.dir).with_context(|| format!("fsync {}", disk.dir.display()))?;
    }
    shared.spool_grew(total);
    Ok(Arc::new(disk))
}

/// Write `body` (records back to back) as one spool file, durably:
/// temp file, fsync, rename, fsync the folder. Blocking.
pub(crate) fn write_batch(dir: &Path, uuid: [u8; 16], body: &[u8]) -> Result<(SpoolHeader, SpoolEntry)> {
    let h = SpoolHeader::for_body(uuid, body)?;
    let pending = fmt::create(dir, &h, body)?;
    failpoint::hit("collector-spool-before-fsync");
    pending.sync()?;
    failpoint::hit("collector-spool-after-fsync");
    let f = pending.publish()?;
    let entry = SpoolEntry {
        last: h.last_seq,
        len: h.file_len(),
        first_time_ns: h.first_time_ns,
        payload_bytes: h.payload_bytes,
        path: f.path,
    };
    Ok((h, entry))
}

/// Delete the spool files whose records the target acknowledged (all seqs
/// ≤ `seq`), after recording the trim mark in the catalog. `binding`
/// guards against an ack from a session of an earlier binding.
pub(crate) async fn trim(shared: &Arc<Shared>, disk: &Arc<Disk>, binding: u64, seq: u64) {
    let (victims, mark) = {
        let mut st = disk.lock();
        if st.binding != binding {
            return;
        }
        let keys: Vec<u64> = st
            .files
            .iter()
            .filter(|(_, e)| e.last <= seq)
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return;
        }
        let victims: Vec<SpoolEntry> = keys.iter().filter_map(|k| st.files.remove(k)).collect();
        let bytes: u64 = victims.iter().map(|e| e.len).sum();
        st.spool_bytes = st.spool_bytes.saturating_sub(bytes);
        let mark = seq.min(st.acked_seq);
        st.trimmed_seq = st.trimmed_seq.max(mark);
        (victims, mark)
    };
    let bytes: u64 = victims.iter().map(|e| e.len).sum();
    let shared2 = shared.clone();
    let id = disk.id.clone();
    let dir = disk.dir.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<()> {
        shared2.catalog.set_trimmed(&id, mark).context("record the trim mark")?;
        for v in &victims {
            failpoint::hit("collector-trim-before-delete");
            match std::fs::remove_file(&v.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("delete {}", v.path.display())),
            }
        }
        crashsafe::fsync_dir(&dir).with_context(|| format!("fsync {}", dir.display()))
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(disk = %disk.id, "trimming the spool: {e:#} (retried at the next start)"),
        Err(e) => warn!(disk = %disk.id, "trimming the spool: {e}"),
    }
    shared.spool_shrank(bytes);
}

/// The spool files of a binding that was replaced, still on disk.
#[must_use = "the old spool must be kept aside (keep_old_spool)"]
pub(crate) struct OldSpool(std::collections::BTreeMap<u64, SpoolEntry>);

/// Rebind `disk` to `uuid` (HELLO_FORCE_RESYNC): the catalog first, then the
/// in-memory state. The target session of the old binding ends. The old
/// files are returned for [`keep_old_spool`], which the caller runs outside
/// the binding lock but before the new agent may spool anything (new files
/// can have the same names as old ones).
pub(crate) async fn rebind(shared: &Arc<Shared>, disk: &Arc<Disk>, uuid: [u8; 16]) -> Result<OldSpool> {
    {
        let shared = shared.clone();
        let id = disk.id.clone();
        tokio::task::spawn_blocking(move || shared.catalog.bind(&id, &uuid, true))
            .await
            .context("rebind")??;
    }
    let victims = {
        let mut st = disk.lock();
        st.uuid = uuid;
        // The catalog's bind dropped the owed resyncs too.
        st.start_over(0, true, true);
        st.spool_bytes = 0;
        std::mem::take(&mut st.files)
    };
    disk.spooled.notify_waiters();
    Ok(OldSpool(victims))
}

/// Keep the files of a replaced binding (see [`rebind`]) in
/// `<spool>/.kept/<id>.<old uuid>/`: history is never deleted by a rebind;
/// an operator removes it.
pub(crate) async fn keep_old_spool(shared: &Arc<Shared>, disk: &Arc<Disk>, old: OldSpool, was: [u8; 16]) -> Result<()> {
    let victims = old.0;
    let bytes: u64 = victims.values().map(|e| e.len).sum();
    let (root, id) = (shared.cfg.spool.clone(), disk.id.to_string());
    let paths: Vec<PathBuf> = victims.values().map(|v| v.path.clone()).collect();
    let r = tokio::task::spawn_blocking(move || keep_files(&root, &id, &uuid_tag(&was), &paths))
        .await
        .context("keep the old spool")?;
    shared.spool_shrank(bytes);
    if let Ok(to) = &r {
        if !victims.is_empty() {
            warn!(disk = %disk.id, kept = %to.display(), bytes, "the old binding's spool is kept aside");
        }
    }
    r.map(|_| ())
}

/// The first 8 hex digits of a disk uuid, naming kept history.
fn uuid_tag(u: &[u8; 16]) -> String {
    crate::catalog::uuid_text(u)[..8].to_string()
}

/// Move `files` (in one disk's spool folder) to `<root>/.kept/<id>.<tag>/`,
/// durably; files already gone are skipped. Returns that folder.
fn keep_files(root: &Path, id: &str, tag: &str, files: &[PathBuf]) -> Result<PathBuf> {
    let kept = root.join(KEPT_DIR);
    ensure_dir(&kept)?;
    let to = kept.join(format!("{id}.{tag}"));
    ensure_dir(&to)?;
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let Some(name) = f.file_name() else { continue };
        match std::fs::rename(f, to.join(name)) {
            Ok(()) => {
                if let Some(p) = f.parent() {
                    dirs.insert(p.to_path_buf());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("move {} to {}", f.display(), to.display())),
        }
    }
    for d in dirs.iter().chain([&to, &kept]) {
        crashsafe::fsync_dir(d).with_context(|| format!("fsync {}", d.display()))?;
    }
    Ok(to)
}

/// Move the files of spool folder `dir` to `<root>/.kept/<id>.<at>` (a
/// fresh name if that exists) and leave `dir` empty. None: nothing to move.
fn move_aside(root: &Path, dir: &Path, id: &str, at: i64) -> Result<Option<PathBuf>> {
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(None);
    }
    let kept = root.join(KEPT_DIR);
    ensure_dir(&kept)?;
    let mut to = kept.join(format!("{id}.{at}"));
    let mut n = 1;
    while to.exists() {
        to = kept.join(format!("{id}.{at}.{n}"));
        n += 1;
    }
    std::fs::rename(dir, &to).with_context(|| format!("move {} to {}", dir.display(), to.display()))?;
    crashsafe::fsync_dir(&kept).with_context(|| format!("fsync {}", kept.display()))?;
    ensure_dir(dir)?;
    Ok(Some(to))
}

/// A failover ended the disk's generation (its target refused it with
/// `StaleGeneration`, saying `reason`): record the fence, end the agent's
/// and the forwarder's sessions, and move what is spooled aside, kept and
/// not deleted. From then on the disk takes no share of the spool, so it
/// cannot fill it and push every other disk into bitmap mode.
pub(crate) async fn fence(shared: &Arc<Shared>, disk: &Arc<Disk>, reason: String) -> Result<()> {
    let mut f = {
        let st = disk.lock();
        if st.fence.is_some() {
            return Ok(());
        }
        Fence {
            generation: st
                .lineage
                .is_known()
                .then(|| tidemark_formats::generation::GenerationId(st.lineage.generation)),
            reason,
            at: now_s(),
            spool: None,
        }
    };
    // Durable first: a failure leaves everything as it was, and the next
    // refusal by the target tries again.
    {
        let (s, id, f2) = (shared.clone(), disk.id.clone(), f.clone());
        tokio::task::spawn_blocking(move || s.catalog.set_fence(&id, &f2))
            .await
            .context("fence")?
            .context("record the fence")?;
    }
    let (files, bytes, agent) = {
        let mut st = disk.lock();
        st.fence = Some(f.clone());
        st.end_sessions();
        let files = std::mem::take(&mut st.files);
        let bytes = std::mem::take(&mut st.spool_bytes);
        (files, bytes, st.agent.as_ref().map(|a| a.tx.clone()))
    };
    error!(
        generation = ?f.generation.map(|g| g.to_string()),
        "the target refused this disk's generation ({}): fencing it; its agent is refused from now on",
        f.reason
    );
    let refusal = crate::agent::fenced(&disk.id, &f);
    if let Some(tx) = agent {
        let _ = tx
            .send(Out {
                frame: error_frame(refusal.code, refusal.reason),
                done: None,
            })
            .await;
    }
    let (s, id, dir, f2) = (shared.clone(), disk.id.clone(), disk.dir.clone(), f.clone());
    let moved = tokio::task::spawn_blocking(move || -> Result<Option<PathBuf>> {
        let kept = move_aside(&s.cfg.spool, &dir, &id, f2.at)?;
        if let Some(k) = &kept {
            s.catalog.set_fence(
                &id,
                &Fence {
                    spool: Some(k.display().to_string()),
                    ..f2
                },
            )?;
        }
        Ok(kept)
    })
    .await
    .context("fence")?;
    match moved {
        Ok(kept) => {
            shared.spool_shrank(bytes);
            if let Some(k) = kept {
                info!(kept = %k.display(), bytes, files = files.len(), "spool of the fenced generation moved aside");
                f.spool = Some(k.display().to_string());
                disk.lock().fence = Some(f);
            }
        }
        // The files stay where they are, still counted against the cap;
        // the next start moves them (`load_disk`).
        Err(e) => error!("moving the fenced disk's spool aside: {e:#} (retried at the next start)"),
    }
    disk.spooled.notify_waiters();
    Ok(())
}

/// Lift the fence of `disk` for a newer line forked from its history (the
/// disk came back the other way, `docs/failback.md`): the catalog first,
/// then memory; the forwarder starts over at the fork seq. Called with the
/// binding lock held and no agent connected.
pub(crate) async fn lift_fence(shared: &Arc<Shared>, disk: &Arc<Disk>, l: tidemark_wire::frame::Lineage) -> Result<()> {
    {
        let (s, id) = (shared.clone(), disk.id.clone());
        tokio::task::spawn_blocking(move || s.catalog.lift_fence(&id, &l))
            .await
            .context("lift the fence")??;
    }
    {
        let mut st = disk.lock();
        st.fence = None;
        st.lineage = l;
        st.start_over(l.fork_seq, false, false);
    }
    info!(
        fork_seq = l.fork_seq,
        "a generation forked from this disk's line arrived: the fence is lifted"
    );
    disk.spooled.notify_waiters();
    Ok(())
}
