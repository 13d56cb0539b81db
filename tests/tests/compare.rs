//! Hash-compare resync (issue 13, part 4; docs/failback.md, section 4), the
//! way an operator meets it: tracking is lost or in doubt, and the disk and
//! its replica differ in a few chunks nobody recorded. The resync reads
//! both, sends only the chunks that differ (≤ 1.1x), and converges.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
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
    let mut buf = vec![0u8; 64 << 10];
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
    for (i, pat) in [0x31u8, 0x32, 0x33].into_iter().enumerate() {
        write_pattern(&a.sock, i as u64 * 80 * MIB, 32 * MIB, pat);
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
    site.allow_rebind("ls", None);
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
    // The replica the old disk had is kept as it was, the history of a
    // disk of its own.
    let kept: Vec<_> = std::fs::read_dir(site.replica("ls").parent().unwrap().parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ls.replaced-"))
        .collect();
    assert_eq!(kept.len(), 1, "one copy of the old replica kept");
    assert!(kept[0].path().join("replica.raw").exists());
    a.stop();
}

/// `tidemark resync --compare`: the operator doubts the replica (here the
/// disk was written behind the running agent's back, as a restore under
/// it would): the whole disk is compared, only what differs is sent.
#[test]
fn an_operator_asked_compare_resync_sends_only_what_differs() {
    need_tool("qemu-io");
    let dir = tmpdir("resync-compare");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let a = replicated(&site, d, "rc");
    let differ = scribble(&a.disk, 24, seed() ^ 1);
    let before = payload(&site, "rc");
    // The initial sync compared the disk once already (with a sparse
    // replica: holes hash as zeros).
    let compared = a.status()["compare_bytes"].as_u64().unwrap();
    // Bad requests first: the wrong disk, no mode.
    let o = run(
        tidemark().args(["resync", "--agent", s(&a.state), "other", "--compare"]),
        T,
    );
    assert!(
        !o.status.success() && stderr(&o).contains("not \"other\""),
        "{}",
        stderr(&o)
    );
    let o = run(tidemark().args(["resync", "--agent", s(&a.state), "rc"]), T);
    assert!(
        !o.status.success() && stderr(&o).contains("--compare"),
        "{}",
        stderr(&o)
    );
    let o = run_ok(
        tidemark().args(["resync", "--agent", s(&a.state), "rc", "--compare"]),
        T,
    );
    assert!(
        stdout(&o).contains("hash-compare resync of rc recorded"),
        "{}",
        stdout(&o)
    );
    let mut last = serde_json::Value::Null;
    let start = std::time::Instant::now();
    while !(last["compare_bytes"].as_u64() == Some(compared + SIZE) && last["sync"].is_null()) {
        assert!(start.elapsed() < T, "the compare did not finish: {last}");
        std::thread::sleep(Duration::from_millis(200));
        last = a.status();
    }
    wait_and_compare(&site, "rc", &a.disk, T);
    let sent = payload(&site, "rc") - before;
    assert!(
        sent * 10 <= differ * 11,
        "the resync sent {sent} bytes for {differ} that differ"
    );
    let text = stdout(&run_ok(tidemark().args(["agent-status", "--agent", s(&a.state)]), T));
    assert!(text.contains("hash-compared"), "{text}");
    assert_eq!(site.disk_status("rc")["full_resyncs"], 1);
    a.stop();
}
