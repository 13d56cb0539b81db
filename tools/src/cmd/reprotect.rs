//! `tidemark reprotect`: after a failover, make the old source's disk the
//! replica of the failed-over copy, in place (the file stays where it is),
//! so that the way back resyncs only what differs (`docs/failback.md`,
//! section 3).
//!
//! It reads the old source's stopped agent state directory: the data
//! generation it holds, the seq it reached, and every region it wrote that
//! may not have reached the other site (journal, kept past the journal,
//! dirty bitmap), each with the seq that wrote it. It adopts the disk in a
//! target data directory as that disk id's replica, at that generation and
//! seq. When the failed-over copy's agent connects, the target compares
//! generations: the copy's writes since the failover point stream as usual,
//! and the regions this side wrote after that point are asked for from the
//! copy; nothing else crosses the wire.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use tidemark_catalog::policy::DiskPolicy;
use tidemark_catalog::{Catalog, Owed};
use tidemark_util::human::format_size;
use tidemark_util::owned;

#[derive(Args)]
pub struct ReprotectArgs {
    /// The target data directory that will hold the replica (created if
    /// missing; its target must be stopped).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The disk id.
    disk: tidemark_wire::DiskId,
    /// The old source's disk: a raw file or a block device, adopted in
    /// place.
    #[arg(long, value_name = "FILE")]
    replica: PathBuf,
    /// The old source's agent state directory (the agent stopped): what it
    /// wrote, so that only what differs is resynced. Without it (lost),
    /// the whole disk is hash-compared with the copy: both are read, only
    /// the chunks that differ are sent (needs --discard-divergent).
    #[arg(long, value_name = "DIR")]
    agent_state: Option<PathBuf>,
    /// Proceed when the old source wrote after the failover point: those
    /// regions are overwritten from the copy, after the divergent state is
    /// kept as a file in the disk's folder.
    #[arg(long)]
    discard_divergent: bool,
}

pub fn reprotect(a: ReprotectArgs) -> Result<()> {
    let disk = a.disk.as_str();
    let meta = std::fs::metadata(&a.replica).with_context(|| format!("--replica {}", a.replica.display()))?;
    if !meta.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        bail!(
            "--replica {}: not a raw file or a block device (a VMDK failover image is protected through its flat \
             extent)",
            a.replica.display()
        );
    }
    let replica = std::fs::canonicalize(&a.replica).with_context(|| format!("resolve {}", a.replica.display()))?;
    // The target will write it: nothing else may have it open (a VM still
    // running on the old disk, an agent, a mount of a loop device on it).
    let holders = tidemark_util::fileops::open_elsewhere(&replica).with_context(|| {
        format!(
            "--replica {}: looking for processes that hold it open",
            replica.display()
        )
    })?;
    if !holders.is_empty() {
        let who: Vec<String> = holders
            .iter()
            .map(|(pid, name)| format!("{name} (pid {pid})"))
            .collect();
        bail!(
            "--replica {} is in use: {} {} it open; stop {} first (the target overwrites it)",
            replica.display(),
            who.join(", "),
            if holders.len() == 1 { "holds" } else { "hold" },
            if holders.len() == 1 { "it" } else { "them" }
        );
    }
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        // Mounted, or claimed by the kernel (a RAID member, a device-mapper
        // table): exclusive opens of it fail with EBUSY.
        use std::os::unix::fs::OpenOptionsExt;
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&replica)
        {
            if e.raw_os_error() == Some(libc::EBUSY) {
                bail!(
                    "--replica {} is in use: mounted or claimed by the kernel (an exclusive open failed: {e}); unmount \
                     it first (the target overwrites it)",
                    replica.display()
                );
            }
        }
    }
    let Some(agent_state) = &a.agent_state else {
        if !a.discard_divergent {
            bail!(
                "without --agent-state nothing says what {} holds that the failed-over copy does not (what the old \
                 source wrote after the failover point): the whole disk will be hash-compared with the copy and every \
                 chunk that differs overwritten from it. Name the old source's agent state directory, or pass \
                 --discard-divergent to accept that (a sparse copy of the disk is kept first)",
                replica.display()
            );
        }
        let claim = owned::claim(&a.data, &tidemark_catalog::layout::DIR_SPEC)
            .map_err(|e| anyhow::anyhow!("--data {}: {}", a.data.display(), e.message))?;
        let r = adopt_untracked(&a, &replica);
        if r.is_err() {
            claim.abandon();
        }
        return r;
    };
    let pos = tidemark_agent::state::source_position(agent_state, &replica)
        .with_context(|| format!("--agent-state {}", agent_state.display()))?;
    if pos.meta.disk_id != disk {
        bail!(
            "--agent-state {} is disk {:?}'s, not {disk:?}",
            agent_state.display(),
            pos.meta.disk_id
        );
    }
    if pos.reapplied > 0 {
        eprintln!(
            "the agent had stopped uncleanly: re-applied {} journal records onto {}",
            pos.reapplied,
            replica.display()
        );
    }
    let claim = owned::claim(&a.data, &tidemark_catalog::layout::DIR_SPEC)
        .map_err(|e| anyhow::anyhow!("--data {}: {}", a.data.display(), e.message))?;
    let r = adopt(&a, &pos, &replica);
    if r.is_err() {
        // Removes only what the claim created (a new directory's marker).
        claim.abandon();
    }
    r
}

/// Link `replica` in as `disk`'s replica in the data directory `a.data`
/// (a disk failed over there before is retired first). Returns the disk's
/// folder and the catalog.
fn link_in(a: &ReprotectArgs, replica: &Path) -> Result<(PathBuf, Catalog)> {
    let disk = a.disk.as_str();
    let mut catalog = Catalog::open(&a.data)?;
    if let Some(rp) = catalog.reprotect(disk)? {
        eprintln!(
            "note: {disk} was reprotected already (up to seq {}) and its copy's agent has not come yet: adopting again",
            rp.source_seq
        );
    }
    if catalog.disk_row(disk)?.is_some_and(|r| r.failed_over) {
        retire(&mut catalog, &a.data, disk)?;
    }
    let dir = tidemark_catalog::layout::disk_dir(&a.data, disk);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let link = dir.join("replica.raw");
    match std::fs::read_link(&link) {
        Ok(t) if t == replica => {}
        Ok(t) => bail!(
            "{} already points to {}; reprotect {disk} into another data directory",
            link.display(),
            t.display()
        ),
        Err(_) if link.exists() || dir.join("replica.vmdk").exists() => {
            bail!("{} already holds a replica of {disk}", dir.display())
        }
        Err(_) => std::os::unix::fs::symlink(replica, &link)
            .with_context(|| format!("link {} to {}", link.display(), replica.display()))?,
    }
    Ok((dir, catalog))
}

/// Keep the disk's state before the resync overwrites it, as a disk of
/// its own in the data directory, `<disk>.divergent-<tag>`: a sparse copy
/// as its replica, recorded consistent at `seq`, so that `tidemark mount
/// --data DIR <disk>.divergent-<tag> --at latest` serves it and `tidemark
/// points` lists it. Done once (a second run finds it).
fn keep_divergent(
    catalog: &mut Catalog,
    data: &Path,
    disk: &str,
    replica: &Path,
    tag: &str,
    keep: &Keep<'_>,
) -> Result<String> {
    let id = format!("{disk}.divergent-{tag}");
    tidemark_wire::DiskId::parse(&id).map_err(|e| {
        anyhow::anyhow!("cannot keep the divergent state as disk {id:?}: {e} (a shorter disk id is needed)")
    })?;
    if catalog.disk_row(&id)?.is_some() {
        return Ok(id);
    }
    let dir = tidemark_catalog::layout::disk_dir(data, &id);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let to = dir.join("replica.raw");
    eprintln!(
        "keeping the divergent state: copying {} to {} (disk {id})…",
        replica.display(),
        to.display()
    );
    tidemark_util::fileops::copy_sparse(replica, &to)
        .with_context(|| format!("copy {} to {}", replica.display(), to.display()))?;
    catalog.keep_aside(&id, keep.uuid, &DiskPolicy::default(), keep.history, keep.seq)?;
    eprintln!(
        "the divergent state is disk {id}: tidemark mount --data {} {id} --at latest serves it",
        data.display()
    );
    Ok(id)
}

/// What a kept divergent state is recorded with.
struct Keep<'a> {
    uuid: &'a [u8; 16],
    history: Option<&'a tidemark_formats::generation::History>,
    seq: u64,
}

/// Reprotect without the old source's state: the disk becomes a replica
/// the target knows nothing about. The copy's agent, forked at the
/// failover point, reaches a target that holds no seq of its line: the
/// target asks for a full resync, and that whole-disk sync hash-compares.
fn adopt_untracked(a: &ReprotectArgs, replica: &Path) -> Result<()> {
    let disk = a.disk.as_str();
    let (dir, mut catalog) = link_in(a, replica)?;
    if catalog.disk_row(disk)?.is_some() {
        bail!(
            "{} holds a record of {disk} already; reprotect into another data directory (or name --agent-state)",
            a.data.display()
        );
    }
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    keep_divergent(
        &mut catalog,
        &a.data,
        disk,
        replica,
        &format!("untracked-{}", tidemark_catalog::now_unix()),
        &Keep {
            uuid: &uuid,
            history: None,
            seq: 1,
        },
    )?;
    tidemark_util::crashsafe::fsync_dir(&dir).with_context(|| format!("fsync {}", dir.display()))?;
    outln!(
        "reprotected {disk}: {} is its replica in {}, its history unknown (no --agent-state)",
        replica.display(),
        a.data.display()
    );
    outln!(
        "when the failed-over copy's agent connects, the whole disk is hash-compared with the copy: both are read, \
         only the chunks that differ are sent"
    );
    outln!(
        "next: tidemark-target --data {} --listen HOST:PORT --token-file FILE",
        a.data.display()
    );
    Ok(())
}

fn adopt(a: &ReprotectArgs, pos: &tidemark_agent::state::SourcePosition, replica: &Path) -> Result<()> {
    let disk = a.disk.as_str();
    let (dir, mut catalog) = link_in(a, replica)?;
    let generation = pos.history.current().id;
    if a.discard_divergent {
        let tag: String = generation.to_string().chars().take(16).collect();
        keep_divergent(
            &mut catalog,
            &a.data,
            disk,
            replica,
            &format!("{tag}-{}", pos.written.last_seq),
            &Keep {
                uuid: &pos.disk_uuid,
                history: Some(&pos.history),
                seq: pos.written.last_seq,
            },
        )?;
    }
    let owed: Vec<Owed> = pos
        .written
        .regions
        .iter()
        .map(|&(seq, offset, length)| Owed { seq, offset, length })
        .collect();
    catalog.adopt_reprotected(
        disk,
        &pos.disk_uuid,
        &DiskPolicy::default(),
        &pos.history,
        pos.written.last_seq,
        pos.written.applied_upto,
        a.discard_divergent,
        &owed,
    )?;
    tidemark_util::crashsafe::fsync_dir(&dir).with_context(|| format!("fsync {}", dir.display()))?;
    outln!(
        "reprotected {disk}: {} is its replica in {} at generation {generation}, seq {}",
        replica.display(),
        a.data.display(),
        pos.written.last_seq
    );
    outln!(
        "this side wrote {} that may not have reached the other site (journal {}, kept past the journal {}, dirty bitmap {}); \
         when the failed-over copy's agent connects, only its writes since the failover and the regions this side wrote \
         after it are resynced",
        format_size(
            tidemark_formats::journal::merge_ranges(pos.written.regions.iter().map(|w| (w.1, w.2)).collect())
                .iter()
                .map(|r| r.1)
                .sum()
        ),
        format_size(pos.written.journal_bytes),
        format_size(pos.written.kept_bytes),
        format_size(pos.written.dirty_bytes)
    );
    outln!(
        "next: tidemark-target --data {} --listen HOST:PORT --token-file FILE",
        a.data.display()
    );
    Ok(())
}

/// The data directory holds `disk` failed over (the disk went the other
/// way before): its replica, points, undo and failover record are kept
/// under a new id, `<disk>.retired-<generation>` (the generation its last
/// failover ended), folder first, then the catalog; running again after a
/// crash in between finishes the move.
fn retire(catalog: &mut Catalog, data: &Path, disk: &str) -> Result<()> {
    let tag = catalog
        .failovers(disk)?
        .last()
        .and_then(|f| f.generation.clone())
        .map_or_else(
            || tidemark_catalog::now_unix().to_string(),
            |g| g.chars().take(16).collect(),
        );
    let new_id = format!("{disk}.retired-{tag}");
    tidemark_wire::DiskId::parse(&new_id)
        .map_err(|e| anyhow::anyhow!("cannot set {disk} aside as {new_id:?}: {e} (a shorter disk id is needed)"))?;
    let (from, to) = (
        tidemark_catalog::layout::disk_dir(data, disk),
        tidemark_catalog::layout::disk_dir(data, &new_id),
    );
    if from.exists() && !to.exists() {
        std::fs::rename(&from, &to).with_context(|| format!("move {} to {}", from.display(), to.display()))?;
        tidemark_util::crashsafe::fsync_dir(data).with_context(|| format!("fsync {}", data.display()))?;
    }
    catalog.retire(disk, &new_id)?;
    eprintln!("{disk} was failed over here before: its replica, points and failover record are kept as disk {new_id}");
    Ok(())
}
