//! Hash-compare resync (issue 13, part 4; docs/failback.md, section 4), the
//! way an operator meets it: tracking is lost or in doubt, and the disk and
//! its replica differ in a few chunks nobody recorded. The resync reads
//! both, sends only the chunks that differ (≤ 1.1x), and converges.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tidemark_tests::pipe::*;
use tidemark_tests::*;

const SIZE: u64 = 256 * MIB;
const CHUNK: u64 = 64 << 10;
const T: Duration = Duration::from_secs(180);

/// Write `n` distinct random 64 KiB chunks of `disk` with random bytes,
/// behind every agent's back; returns the bytes that now differ.
fn scribble(disk: &Path, n: usize, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < n {
        picked.insert(rng.gen_range(0..SIZE / CHUNK));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    for c in &picked {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, c * CHUNK).unwrap();
    }
    f.sync_all().unwrap();
    picked.len() as u64 * CHUNK
}

fn payload(site: &Site, id: &str) -> u64 {
    site.disk_status(id)["payload_bytes"].as_u64().unwrap()
}

/// A replicated disk with 96 MiB of data on it.
fn replicated(site: &Site, d: &Path, id: &str) -> Agent {
    let a = agent(site, d, id, SIZE, &[]);
    for i in 0..3 {
        write_pattern(&a.sock, i * 80 * MIB, 32 * MIB, 0x31 + i as u8);
    }
    wait_and_compare(site, id, &a.disk, T);
    a
}

/// The primary's state directory is lost: a new one, bound with
/// `--force-resync`, compares with the replica the target kept and sends
/// only the chunks written behind the agent's back.
#[test]
fn a_lost_state_directory_resyncs_only_what_differs() {
    need_tool("qemu-io");
    let dir = tmpdir("lost-state");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let a = replicated(&site, d, "ls");
    let (state, disk) = (a.state.clone(), a.disk.clone());
    a.stop();
    std::fs::remove_dir_all(&state).unwrap();
    let differ = scribble(&disk, 48, seed());
    let before = payload(&site, "ls");
    let a = agent(&site, d, "ls", SIZE, &["--force-resync"]);
    wait_and_compare(&site, "ls", &disk, T);
    let sent = payload(&site, "ls") - before;
    assert!(
        sent * 10 <= differ * 11,
        "the resync sent {sent} bytes for {differ} that differ"
    );
    let st = a.status();
    assert_eq!(st["compare_bytes"].as_u64(), Some(SIZE), "{st}");
    assert_eq!(st["compare_equal_bytes"].as_u64(), Some(SIZE - differ), "{st}");
    // The replica the old disk had is kept aside as it was.
    let kept: Vec<_> = std::fs::read_dir(site.replica("ls").parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("replica.raw.old-"))
        .collect();
    assert_eq!(kept.len(), 1, "one copy of the old replica kept");
    a.stop();
}
