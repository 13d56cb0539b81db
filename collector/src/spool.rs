//! The collector's side of the spool (`tidemark_formats::spool` owns the
//! bytes): indexing a disk's files at start, writing a batch durably with a
//! failpoint at each step, trimming what the target acknowledged, and
//! dropping a disk's spool when its id is rebound.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tidemark_formats::spool::{self as fmt, SpoolHeader};
use tidemark_util::crashsafe;
use tracing::{error, info, warn};

use crate::catalog::DiskRow;
use crate::failpoint;
use crate::state::{Disk, OwedResync, Shared, SpoolEntry};

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
            let stale = match &f.header {
                Ok(h) if h.disk_uuid != row.disk_uuid => Some("it belongs to an earlier binding of the disk id"),
                _ if f.last_seq <= row.trimmed_seq => Some("the target already acknowledged it"),
                _ => None,
            };
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
/// ≤ `seq`), after recording the trim mark in the catalog. `generation`
/// guards against an ack from a session of an earlier binding.
pub(crate) async fn trim(shared: &Arc<Shared>, disk: &Arc<Disk>, generation: u64, seq: u64) {
    let (victims, mark) = {
        let mut st = disk.lock();
        if st.generation != generation {
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
#[must_use = "the old spool must be dropped (drop_old_spool)"]
pub(crate) struct OldSpool(std::collections::BTreeMap<u64, SpoolEntry>);

/// Rebind `disk` to `uuid` (HELLO_FORCE_RESYNC): the catalog first, then the
/// in-memory state. The target session of the old binding ends. The old
/// files are returned for [`drop_old_spool`], which the caller runs outside
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
        st.generation += 1;
        st.session.cancel();
        st.session = tokio_util::sync::CancellationToken::new();
        st.acked_seq = 0;
        st.applied_seq = 0;
        st.trimmed_seq = 0;
        st.target_state = None;
        st.pending_full_sync = true;
        st.full_sync_since = 0;
        st.force_target = true;
        st.spool_bytes = 0;
        // The catalog's bind dropped them too.
        st.owed_resyncs.clear();
        std::mem::take(&mut st.files)
    };
    disk.spooled.notify_waiters();
    Ok(OldSpool(victims))
}

/// Delete the files of a replaced binding (see [`rebind`]).
pub(crate) async fn drop_old_spool(shared: &Arc<Shared>, disk: &Arc<Disk>, old: OldSpool) -> Result<()> {
    let victims = old.0;
    let bytes: u64 = victims.values().map(|e| e.len).sum();
    let dir = disk.dir.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<()> {
        for v in victims.values() {
            match std::fs::remove_file(&v.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("delete {}", v.path.display())),
            }
        }
        crashsafe::fsync_dir(&dir).with_context(|| format!("fsync {}", dir.display()))
    })
    .await
    .context("drop the old spool")?;
    shared.spool_shrank(bytes);
    r
}
