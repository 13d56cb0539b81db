//! Replication under faults: kill -9 of every service at random moments,
//! failpoints at each durability step, outages, a full spool, a corrupted
//! spool file. After each, the replica converges to the source and nothing
//! acknowledged is lost.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tidemark_tests::pipe::*;
use tidemark_tests::*;

/// At least 20 kill -9s spread over collector, target and agent at random
/// moments under a sustained write load; each is restarted; the replica
/// converges and no full resync was needed.
#[test]
fn crash_matrix_kill9_every_service_under_load() {
    let dir = tmpdir("crash");
    let d = dir.path();
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut site = Site::start(d, &[]);
    let size = 64 * MIB;
    let mut a = agent(&site, d, "c1", size, &[]);
    site.wait("c1", Duration::from_secs(120));
    let load = Load::start(&a.sock, size, seed ^ 1);
    let mut kills = [0u32; 3];
    for round in 0..21 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        let who = round % 3;
        kills[who] += 1;
        match who {
            0 => site.collector.restart(),
            1 => site.target.restart(),
            _ => {
                a.kill9();
                a = agent(&site, d, "c1", size, &[]);
            }
        }
    }
    let bursts = load.finish();
    assert!(bursts > 5, "the load made too little progress ({bursts} bursts)");
    eprintln!("kills (collector, target, agent): {kills:?}; {bursts} write bursts");
    wait_and_compare(&site, "c1", &a.disk.clone(), Duration::from_secs(300));
    let st = site.disk_status("c1");
    assert_eq!(st["full_resyncs"], 0, "{st}");
    for (name, log) in [
        ("collector", site.collector.log_text()),
        ("target", site.target.log_text()),
        ("agent", a.log_text()),
    ] {
        assert!(!log.contains("panicked"), "{name} panicked:\n{}", tail(&log, 80));
    }
    a.stop();
}

/// A failpoint at each durability step of each hop kills the process
/// exactly there (`N*off->panic`: the N+1th time it is reached); after a
/// restart without failpoints the replica converges.
#[test]
fn failpoints_at_every_durability_step() {
    let dir = tmpdir("failpoints");
    let d = dir.path();
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut site = Site::start(d, &[]);
    let size = 32 * MIB;
    let mut a = agent(&site, d, "f1", size, &[]);
    site.wait("f1", Duration::from_secs(120));
    let points: &[(&str, u8)] = &[
        ("collector-spool-before-fsync", 0),
        ("collector-spool-after-fsync", 0),
        ("collector-before-ack", 0),
        ("collector-after-ack", 0),
        ("collector-forward-after-send", 0),
        ("collector-trim-before-delete", 0),
        ("target-apply-before-fsync", 1),
        ("target-apply-after-fsync", 1),
        ("target-before-commit", 1),
        ("target-after-commit", 1),
        ("target-before-ack", 1),
        ("target-after-ack", 1),
        ("agent-after-send", 2),
        ("agent-ack-before-consume", 2),
        ("agent-ack-after-consume", 2),
    ];
    for &(point, who) in points {
        let n = rng.gen_range(0..3);
        let spec = format!("{point}={n}*off->panic");
        let env = [("FAILPOINTS", spec.as_str())];
        match who {
            0 => site.collector.restart_env(&env),
            1 => site.target.restart_env(&env),
            _ => {
                a.kill9();
                a = Agent::start_env(
                    &a_disk(d, "f1"),
                    &d.join("f1.state"),
                    &d.join("f1.sock"),
                    &agent_flags(&site, "f1"),
                    &env,
                );
            }
        }
        // Write until the failpoint has fired (the process died), bounded.
        let start = Instant::now();
        let mut fired = false;
        while start.elapsed() < Duration::from_secs(30) {
            let _ = write_burst(&a.sock, size, &mut rng, 16);
            fired = match who {
                0 => !site.collector.alive(),
                1 => !site.target.alive(),
                _ => a.child.try_wait().ok().flatten().is_some(),
            };
            if fired {
                break;
            }
        }
        assert!(fired, "failpoint {point} never fired");
        match who {
            0 => site.collector.restart(),
            1 => site.target.restart(),
            _ => {
                a.kill9();
                a = agent(&site, d, "f1", size, &[]);
            }
        }
        assert!(write_burst(&a.sock, size, &mut rng, 16));
        wait_and_compare(&site, "f1", &a_disk(d, "f1"), Duration::from_secs(120));
    }
    let st = site.disk_status("f1");
    assert_eq!(st["full_resyncs"], 0, "{st}");
    a.stop();
}

fn a_disk(d: &Path, id: &str) -> PathBuf {
    d.join(format!("{id}.img"))
}

fn agent_flags(site: &Site, id: &str) -> Vec<String> {
    let mut f = vec!["--disk-id".to_string(), id.to_string()];
    f.extend(site.agent_flags());
    f
}

/// The target is down while 1 GiB is written: the collector spools it with
/// bounded memory, and the replica converges when the target returns. Then
/// the collector is down: the agent journals locally, and converges too.
#[test]
fn outages_of_target_and_collector() {
    need_tool("fio");
    let dir = tmpdir("outage");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    let size = 1280 * MIB;
    let a = agent(&site, d, "o1", size, &["--journal-cap", "2G"]);
    site.wait("o1", Duration::from_secs(300));
    site.target.kill9();
    let rss_before = site.collector.rss();
    // 1 GiB of incompressible data through the shim.
    run_ok(
        std::process::Command::new("fio")
            .args([
                "--name=outage",
                "--ioengine=nbd",
                "--thread",
                "--rw=write",
                "--bs=1m",
                "--iodepth=4",
                "--size=1g",
                "--refill_buffers",
            ])
            .arg(format!("--uri={}", a.uri())),
        Duration::from_secs(600),
    );
    // Wait until the collector holds (acks) all of it.
    let start = Instant::now();
    loop {
        let st = site.disk_status("o1");
        if st["acked_seq"].as_u64() >= st["source_seq"].as_u64() && st["source_seq"].as_u64() > Some(0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "collector did not take the backlog: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = site.status();
    let spool = st["collector"]["spool_bytes"].as_u64().unwrap_or(0);
    assert!(
        spool >= 900 * MIB,
        "spool holds only {spool} bytes of a 1 GiB backlog: {st}"
    );
    let peak = site.collector.peak_rss();
    eprintln!("collector RSS before {rss_before}, peak {peak} with a {spool}-byte spool");
    assert!(peak < 256 * MIB, "collector peak RSS {peak} bytes with a 1 GiB backlog");
    assert_eq!(site.disk_status("o1")["mode"], "backlogged");
    site.target.restart();
    wait_and_compare(&site, "o1", &a.disk.clone(), Duration::from_secs(600));

    // Collector down: the agent journals locally.
    site.collector.kill9();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    for _ in 0..4 {
        assert!(write_burst(&a.sock, size, &mut rng, 32));
    }
    let journaled = a.status()["journal_bytes"].as_u64().unwrap_or(0);
    assert!(
        journaled > 0,
        "the agent journaled nothing while the collector was down"
    );
    site.collector.restart();
    wait_and_compare(&site, "o1", &a.disk.clone(), Duration::from_secs(300));
    let peak = site.collector.peak_rss();
    assert!(peak < 256 * MIB, "collector peak RSS {peak}");
    a.stop();
}

/// A small spool cap: with the target down the spool fills, the collector
/// holds agents back, the agent's journal fills and it goes to bitmap
/// mode; when the target returns everything drains, the agent resyncs its
/// dirty regions, and the replica converges with nothing lost.
#[test]
fn spool_cap_backpressure_bitmap_mode_and_resync() {
    let dir = tmpdir("cap");
    let d = dir.path();
    let mut site = Site::start(d, &["--spool-cap", "24M"]);
    let size = 128 * MIB;
    let a = agent(&site, d, "p1", size, &["--journal-cap", "16M"]);
    site.wait("p1", Duration::from_secs(120));
    site.target.kill9();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let start = Instant::now();
    let mut saw_bitmap = false;
    let mut saw_full = false;
    while start.elapsed() < Duration::from_secs(120) {
        assert!(
            write_burst(&a.sock, size, &mut rng, 32),
            "a write failed under backpressure"
        );
        saw_bitmap |= a.status()["mode"] == "bitmap";
        saw_full |= site.status()["collector"]["spool_full"] == true;
        if saw_bitmap && saw_full {
            break;
        }
    }
    assert!(saw_full, "the collector never reported spool-full: {}", site.status());
    assert!(saw_bitmap, "the agent never went to bitmap mode: {}", a.status());
    // More writes in bitmap mode.
    for _ in 0..3 {
        assert!(write_burst(&a.sock, size, &mut rng, 32));
    }
    site.target.restart();
    wait_and_compare(&site, "p1", &a.disk.clone(), Duration::from_secs(300));
    assert_eq!(a.status()["mode"], "journal", "{}", a.status());
    let st = site.disk_status("p1");
    assert_eq!(st["full_resyncs"], 0, "{st}");
    assert!(
        site.collector.log_text().to_lowercase().contains("spool"),
        "no spool-full report in the log"
    );
    a.stop();
}

/// A flipped byte in a spooled batch is detected, reported with disk and
/// seq, never applied, and the disk recovers by resyncing the range.
#[test]
fn corrupt_spool_is_detected_and_the_range_resynced() {
    let dir = tmpdir("corrupt");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    let size = 32 * MIB;
    let a = agent(&site, d, "k1", size, &[]);
    site.wait("k1", Duration::from_secs(120));
    site.target.kill9();
    // One distinctive 64 KiB write, spooled while the target is down.
    let out = run_ok(
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x77 4m 64k", "-c", "flush"])
            .arg(a.uri()),
        Duration::from_secs(60),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));
    // Wait for it to be spooled, then flip a byte inside its payload.
    let spool = d.join("spool").join("k1");
    let start = Instant::now();
    let file = loop {
        let hit = fs::read_dir(&spool).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "tms"))
                .find(|p| {
                    fs::read(p)
                        .map(|b| b.windows(4096).any(|w| w.iter().all(|&x| x == 0x77)))
                        .unwrap_or(false)
                })
        });
        if let Some(f) = hit {
            break f;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the write never reached the spool"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut b = fs::read(&file).unwrap();
    let at = b
        .windows(4096)
        .position(|w| w.iter().all(|&x| x == 0x77))
        .expect("payload in the spool file")
        + 1000;
    b[at] ^= 0x01;
    fs::write(&file, &b).unwrap();
    site.target.restart();
    // The target halts the disk, names disk and seq; the agent resyncs the
    // range, and the replica converges.
    let start = Instant::now();
    while !site.target.log_text().contains("k1") || !site.target.log_text().to_lowercase().contains("mismatch") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the target did not report the corrupt record; log:\n{}",
            tail(&site.target.log_text(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_and_compare(&site, "k1", &a.disk.clone(), Duration::from_secs(120));
    let log = site.target.log_text();
    assert!(
        log.contains("ERROR"),
        "no ERROR line for the corrupt record:\n{}",
        tail(&log, 40)
    );
    assert!(
        site.collector.log_text().contains("k1"),
        "the collector did not name the disk"
    );
    assert_eq!(site.disk_status("k1")["mode"], "streaming");
    a.stop();
}
