//! Drills: proof that a disk's newest point really recovers
//! (`docs/recovery.md`, "Drills").
//!
//! ```text
//!  pin latest (control socket) ─▶ View ─▶ Layered (throwaway overlay) ─▶ FUSE files, one per filesystem
//!        │                                                                 │ e2fsck -E journal_only -y (into the overlay)
//!        │                                                                 │ e2fsck -fn            (read-only check)
//!        └─ unpinned when the drill ends                                   └ xfs_repair -n (when installed)
//!  result + checker output ─▶ catalog `drills` (with the point's seq)
//! ```
//!
//! The view is pinned through the daemon's own control socket, exactly as
//! `tidemark mount` pins one, so expiry keeps its data while the drill
//! reads it. The replica is only ever read: a crash-consistent ext4's
//! journal is replayed into the throwaway overlay (what a mount would do),
//! then the checker runs with `-n`. Applying never waits for a drill
//! (pinning `latest` holds the disk's apply lock only while the point is
//! recorded). One drill runs at a time on a target; a second request for
//! the same disk while one runs is refused, other disks wait their turn.
//!
//! What is checked: a filesystem at the start of the disk, or the
//! partitions of an MBR or GPT partition table. ext2/3/4 (e2fsck) and XFS
//! (xfs_repair, when installed) are checked; other content is skipped,
//! with the reason. A disk whose earlier drill found a filesystem where
//! none is recognisable now fails (a zeroed superblock is a lost
//! filesystem, not "unknown content"), and the checker still runs there so
//! its output says what it sees.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_catalog::drill::{read_drills, Drill, DrillResult};
use tidemark_recovery::fuse::{self, FileSpec};
use tidemark_recovery::overlay::Layered;
use tidemark_recovery::view::View;
use tidemark_recovery::AtSpec;
use tracing::{info, warn};

use crate::session::Shared;

/// Longest a checker may run before it is killed (the drill then fails).
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Drills running or queued, by disk; one runs at a time.
#[derive(Debug, Default)]
pub(crate) struct Drills {
    busy: std::sync::Mutex<HashSet<String>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// A filesystem found on the disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Found {
    /// `disk` (the whole disk) or `part1`, `part2` … (partition numbers).
    pub name: String,
    pub offset: u64,
    pub len: u64,
    /// `ext`, `xfs`, or what else was recognised.
    pub kind: String,
}

/// Run a drill of `disk` now (queued behind a drill of another disk).
/// `Err` when it cannot even start (unknown disk, one already running for
/// it); otherwise the recorded drill, whatever its result.
pub(crate) async fn run(shared: Arc<Shared>, disk: String, trigger: &str) -> anyhow::Result<Drill> {
    {
        let (d, dir) = (disk.clone(), shared.cfg.data_dir.clone());
        tokio::task::spawn_blocking(move || tidemark_recovery::points_direct(&dir, &d).map(drop)).await??;
    }
    if !shared
        .drills
        .busy
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(disk.clone())
    {
        anyhow::bail!("disk {disk}: a drill is already running or queued");
    }
    struct Release<'a>(&'a Drills, String);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
        }
    }
    let _release = Release(&shared.drills, disk.clone());
    let _turn = shared.drills.one_at_a_time.lock().await;
    let (dir, trigger) = (shared.cfg.data_dir.clone(), trigger.to_string());
    let d = tokio::task::spawn_blocking(move || drill_blocking(&dir, &disk, &trigger)).await??;
    Ok(d)
}

fn drill_blocking(dir: &Path, disk: &str, trigger: &str) -> anyhow::Result<Drill> {
    let started_ns = tidemark_util::now_ns();
    let t0 = Instant::now();
    let mut d = Drill {
        id: 0,
        disk_id: disk.to_string(),
        seq: 0,
        point_time_ns: 0,
        started_ns,
        duration_ms: 0,
        result: DrillResult::Error,
        summary: String::new(),
        output: String::new(),
        trigger: trigger.to_string(),
        found: "[]".into(),
    };
    let previous = {
        let conn = tidemark_catalog::open_read_only(dir)?;
        read_drills(&conn, disk, 50)?
            .into_iter()
            .find(|p| p.result == DrillResult::Passed)
    };
    match check(dir, disk, previous.as_ref(), &mut d) {
        Ok(()) => {}
        Err(e) => {
            d.result = DrillResult::Error;
            d.summary = format!("the drill could not run: {e:#}");
        }
    }
    d.duration_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut c = tidemark_catalog::Catalog::open(dir)?;
    d.id = c.record_drill(&d)?;
    match d.result {
        DrillResult::Passed | DrillResult::Skipped => {
            info!(disk, seq = d.seq, result = d.result.as_str(), "drill: {}", d.summary)
        }
        _ => warn!(disk, seq = d.seq, result = d.result.as_str(), "drill: {}", d.summary),
    }
    Ok(d)
}

/// Open the newest point, find its filesystems, check each.
fn check(dir: &Path, disk: &str, previous: Option<&Drill>, d: &mut Drill) -> anyhow::Result<()> {
    let view = View::open(dir, disk, &AtSpec::Latest).map_err(|e| anyhow::anyhow!("open the newest point: {e}"))?;
    let point = view.point().clone();
    d.seq = point.seq;
    d.point_time_ns = point.time_ns;
    let layer = Arc::new(Layered::new(Arc::new(view), true)?);
    let (mut found, mut notes) = find_filesystems(layer.as_ref())?;
    if let Some(prev) = previous {
        let before: Vec<Found> = serde_json::from_str(&prev.found).unwrap_or_default();
        for f in before {
            if !found.iter().any(|n| n.offset == f.offset) {
                notes.push(format!(
                    "{} ({} at offset {}), found by drill {} at seq {}, is no longer recognisable",
                    f.name, f.kind, f.offset, prev.id, prev.seq
                ));
                found.push(Found {
                    kind: format!("lost-{}", f.kind),
                    ..f
                });
            }
        }
    }
    let checkable: Vec<&Found> = found.iter().filter(|f| checker(&f.kind).is_some()).collect();
    for f in found.iter().filter(|f| checker(&f.kind).is_none()) {
        notes.push(format!(
            "{} ({}, offset {}): no checker for it, skipped",
            f.name, f.kind, f.offset
        ));
    }
    let mut failed = Vec::new();
    let mut passed = Vec::new();
    if !checkable.is_empty() {
        let files = checkable
            .iter()
            .map(|f| FileSpec {
                name: f.name.clone(),
                layer: layer.clone(),
                offset: f.offset,
                len: f.len,
            })
            .collect();
        let mounted = fuse::mount(files, None)?;
        for f in &checkable {
            let path = mounted.path(&f.name);
            let lost = f.kind.starts_with("lost-");
            let ok = match checker(&f.kind) {
                Some(Checker::Ext) => check_ext(&path, &mut d.output)?,
                Some(Checker::Xfs) => check_xfs(&path, &mut d.output)?,
                None => continue,
            };
            if ok && !lost {
                passed.push(format!("{} ({})", f.name, f.kind));
            } else {
                failed.push(format!("{} ({})", f.name, f.kind));
            }
        }
    }
    let kinds = |v: &[String]| v.join(", ");
    d.output.insert_str(0, &found_header(&found));
    let found_json = serde_json::to_string(
        &found
            .iter()
            .filter(|f| !f.kind.starts_with("lost-"))
            .collect::<Vec<_>>(),
    )?;
    (d.result, d.summary) = if !failed.is_empty() {
        (
            DrillResult::Failed,
            format!(
                "point seq {}: {} failed the check{}",
                point.seq,
                kinds(&failed),
                if notes.is_empty() {
                    String::new()
                } else {
                    format!("; {}", notes.join("; "))
                }
            ),
        )
    } else if !passed.is_empty() {
        (
            DrillResult::Passed,
            format!(
                "point seq {}: {} clean{}",
                point.seq,
                kinds(&passed),
                if notes.is_empty() {
                    String::new()
                } else {
                    format!("; {}", notes.join("; "))
                }
            ),
        )
    } else {
        let why = if notes.is_empty() {
            "no filesystem or partition table recognised".to_string()
        } else {
            notes.join("; ")
        };
        (
            DrillResult::Skipped,
            format!("point seq {}: nothing checked: {why}", point.seq),
        )
    };
    d.found = found_json;
    Ok(())
}

fn found_header(found: &[Found]) -> String {
    let mut s = String::from("filesystems found:\n");
    if found.is_empty() {
        s.push_str("  (none)\n");
    }
    for f in found {
        let _ = writeln!(
            s,
            "  {:<6} {:<10} offset {:>14} length {:>14}",
            f.name, f.kind, f.offset, f.len
        );
    }
    s.push('\n');
    s
}

enum Checker {
    Ext,
    Xfs,
}

fn checker(kind: &str) -> Option<Checker> {
    match kind.trim_start_matches("lost-") {
        "ext" => Some(Checker::Ext),
        "xfs" if which("xfs_repair") => Some(Checker::Xfs),
        _ => None,
    }
}

fn which(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(prog).is_file()
        || Path::new("/sbin").join(prog).is_file()
}

/// Replay the journal into the overlay, then check read-only; whether
/// the filesystem is clean.
fn check_ext(path: &Path, out: &mut String) -> anyhow::Result<bool> {
    let (code, _) = run_checker(Command::new("e2fsck").args(["-E", "journal_only", "-y"]).arg(path), out)?;
    // 0: nothing to do, 1: the journal was replayed; otherwise the -fn run
    // below says what is wrong.
    let _ = code;
    let (code, _) = run_checker(Command::new("e2fsck").arg("-fn").arg(path), out)?;
    Ok(code == Some(0))
}

fn check_xfs(path: &Path, out: &mut String) -> anyhow::Result<bool> {
    let (code, _) = run_checker(Command::new("xfs_repair").args(["-n", "-f"]).arg(path), out)?;
    Ok(code == Some(0))
}

/// Run a checker with its output (stdout and stderr, in order) appended
/// to `out`; its exit code (None: killed at [`CHECK_TIMEOUT`] or by a
/// signal).
fn run_checker(cmd: &mut Command, out: &mut String) -> anyhow::Result<(Option<i32>, Duration)> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let log = tempfile::tempfile()?;
    let started = Instant::now();
    let mut child = cmd
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .spawn()
        .map_err(|e| anyhow::anyhow!("run {line}: {e}"))?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if started.elapsed() > CHECK_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    {
        use std::io::{Read, Seek};
        let mut f = log;
        f.rewind()?;
        let mut b = Vec::new();
        f.read_to_end(&mut b)?;
        text.push_str(&String::from_utf8_lossy(&b));
    }
    let code = status.and_then(|s| s.code());
    let _ = writeln!(out, "$ {line}");
    out.push_str(&text);
    match status {
        None => {
            let _ = writeln!(out, "[killed after {} s]", CHECK_TIMEOUT.as_secs());
        }
        Some(s) => {
            let _ = writeln!(out, "[{s}]");
        }
    }
    out.push('\n');
    Ok((code, started.elapsed()))
}

/// Filesystems at the start of `img`, or in its partitions; and notes on
/// what was seen and not checked.
pub(crate) fn find_filesystems(img: &dyn ImageRead) -> std::io::Result<(Vec<Found>, Vec<String>)> {
    let size = img.size();
    let mut notes = Vec::new();
    if let Some(kind) = signature(img, 0, size)? {
        return Ok((
            vec![Found {
                name: "disk".into(),
                offset: 0,
                len: size,
                kind,
            }],
            notes,
        ));
    }
    let parts = partitions(img, &mut notes)?;
    let mut found = Vec::new();
    for (n, offset, len) in parts {
        let name = format!("part{n}");
        match signature(img, offset, len)? {
            Some(kind) => found.push(Found {
                name,
                offset,
                len,
                kind,
            }),
            None => notes.push(format!("{name} (offset {offset}): content not recognised, skipped")),
        }
    }
    Ok((found, notes))
}

/// What the drill reads a disk through (a layered view; a buffer in tests).
pub(crate) trait ImageRead {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ImageRead for Layered {
    fn size(&self) -> u64 {
        Layered::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Layered::read_at(self, buf, offset)
    }
}

/// `len` bytes at `offset`, zeros past the image's end.
fn read(img: &dyn ImageRead, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    let size = img.size();
    if offset < size {
        let n = usize::try_from((size - offset).min(len as u64)).unwrap_or(len);
        img.read_at(&mut b[..n], offset)?;
    }
    Ok(b)
}

/// The filesystem whose signature is at `offset` (`len` bytes long).
fn signature(img: &dyn ImageRead, offset: u64, len: u64) -> std::io::Result<Option<String>> {
    if len < 4096 {
        return Ok(None);
    }
    let b = read(img, offset, 4096)?;
    let kind = if b[1080..1082] == [0x53, 0xEF] {
        "ext"
    } else if &b[0..4] == b"XFSB" {
        "xfs"
    } else if &b[3..11] == b"NTFS    " {
        "ntfs"
    } else if &b[82..87] == b"FAT32" || &b[54..59] == b"FAT16" || &b[54..59] == b"FAT12" {
        "vfat"
    } else if &b[4086..4096] == b"SWAPSPACE2" {
        "swap"
    } else if len > 0x10048 && read(img, offset + 0x10040, 8)? == b"_BHRfS_M" {
        "btrfs"
    } else {
        return Ok(None);
    };
    Ok(Some(kind.to_string()))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// `(number, offset, length)` of each partition of an MBR or GPT table
/// (512-byte sectors), within the disk.
fn partitions(img: &dyn ImageRead, notes: &mut Vec<String>) -> std::io::Result<Vec<(u32, u64, u64)>> {
    let size = img.size();
    let mbr = read(img, 0, 512)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(Vec::new());
    }
    let hdr = read(img, 512, 512)?;
    if &hdr[0..8] == b"EFI PART" {
        let entries_lba = le64(&hdr, 72);
        let count = le32(&hdr, 80).min(256);
        let entry_size = le32(&hdr, 84);
        if !(128..=4096).contains(&entry_size) {
            notes.push(format!("GPT with entries of {entry_size} bytes: not followed"));
            return Ok(Vec::new());
        }
        let table = read(
            img,
            entries_lba.saturating_mul(512),
            usize::try_from(count * entry_size).unwrap_or(0),
        )?;
        let mut out = Vec::new();
        for i in 0..count {
            let e = &table[usize::try_from(i * entry_size).unwrap_or(0)..];
            if e[0..16].iter().all(|b| *b == 0) {
                continue;
            }
            let (first, last) = (le64(e, 32), le64(e, 40));
            let (off, end) = (first.saturating_mul(512), last.saturating_add(1).saturating_mul(512));
            if first == 0 || end <= off || end > size {
                notes.push(format!("GPT entry {} lies outside the disk: skipped", i + 1));
                continue;
            }
            out.push((u32::try_from(i + 1).unwrap_or(0), off, end - off));
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for i in 0..4u32 {
        let e = &mbr[446 + 16 * i as usize..446 + 16 * (i as usize + 1)];
        let (status, kind) = (e[0], e[4]);
        if kind == 0 || (status != 0 && status != 0x80) {
            continue;
        }
        let (start, count) = (le32(e, 8), le32(e, 12));
        match kind {
            0xEE => {
                notes.push("a protective MBR without a readable GPT header: not followed".into());
                continue;
            }
            0x05 | 0x0F | 0x85 => {
                notes.push(format!(
                    "part{} is an extended partition: its logical partitions are not followed",
                    i + 1
                ));
                continue;
            }
            _ => {}
        }
        let (off, len) = (start * 512, count * 512);
        if start == 0 || len == 0 || off + len > size {
            notes.push(format!("MBR entry {} lies outside the disk: skipped", i + 1));
            continue;
        }
        out.push((i + 1, off, len));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buf(Vec<u8>);
    impl ImageRead for Buf {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let o = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
    }

    fn ext_at(b: &mut [u8], off: usize) {
        b[off + 1080] = 0x53;
        b[off + 1081] = 0xEF;
    }

    #[test]
    fn a_filesystem_on_the_whole_disk() {
        let mut b = vec![0u8; 1 << 20];
        ext_at(&mut b, 0);
        let (f, notes) = find_filesystems(&Buf(b)).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].name.as_str(), f[0].kind.as_str(), f[0].len),
            ("disk", "ext", 1 << 20)
        );
        assert!(notes.is_empty());
    }

    #[test]
    fn mbr_partitions_are_followed_and_bad_entries_named() {
        let mut b = vec![0u8; 4 << 20];
        b[510] = 0x55;
        b[511] = 0xAA;
        let entry = |b: &mut Vec<u8>, i: usize, kind: u8, start: u32, count: u32| {
            let e = 446 + 16 * i;
            b[e + 4] = kind;
            b[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            b[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
        };
        entry(&mut b, 0, 0x83, 2048, 2048);
        entry(&mut b, 1, 0x83, 4096, 2048);
        entry(&mut b, 2, 0x83, 6144, 100_000);
        ext_at(&mut b, 2048 * 512);
        let (f, notes) = find_filesystems(&Buf(b)).unwrap();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].name.as_str(), f[0].offset, f[0].len), ("part1", 1 << 20, 1 << 20));
        assert!(
            notes
                .iter()
                .any(|n| n.contains("part2") && n.contains("not recognised")),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.contains("entry 3") && n.contains("outside")),
            "{notes:?}"
        );
    }

    #[test]
    fn gpt_partitions_are_followed() {
        let mut b = vec![0u8; 8 << 20];
        b[510] = 0x55;
        b[511] = 0xAA;
        b[450] = 0xEE;
        b[512..520].copy_from_slice(b"EFI PART");
        b[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        b[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        b[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 1024 + 128; // entry 2
        b[e..e + 16].copy_from_slice(&[7; 16]);
        b[e + 32..e + 40].copy_from_slice(&4096u64.to_le_bytes());
        b[e + 40..e + 48].copy_from_slice(&8191u64.to_le_bytes());
        ext_at(&mut b, 4096 * 512);
        let (f, _) = find_filesystems(&Buf(b)).unwrap();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].name.as_str(), f[0].offset, f[0].len), ("part2", 2 << 20, 2 << 20));
    }

    #[test]
    fn unknown_content_is_nothing_found() {
        let (f, notes) = find_filesystems(&Buf(vec![0xab; 1 << 20])).unwrap();
        assert!(f.is_empty() && notes.is_empty());
    }
}
