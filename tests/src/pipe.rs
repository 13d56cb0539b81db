//! Helpers shared by the pipeline tests: agents that ship to a [`Site`],
//! bursts of writes through the shim, a background load.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::{assert_identical, run, sparse_file, Agent, Site};

pub const MIB: u64 = 1 << 20;

/// A temp dir under /tmp named for the test.
pub fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tm-pipe-{tag}-"))
        .tempdir_in("/tmp")
        .expect("tempdir under /tmp")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Start an agent on `dir/<id>.img` (created sparse if missing) shipping to `site`.
pub fn agent(site: &Site, dir: &Path, id: &str, size: u64, extra: &[&str]) -> Agent {
    let disk = dir.join(format!("{id}.img"));
    if !disk.exists() {
        sparse_file(&disk, size);
    }
    let mut flags: Vec<String> = vec!["--disk-id".into(), id.into()];
    flags.extend(site.agent_flags());
    flags.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Agent::start(
        &disk,
        &dir.join(format!("{id}.state")),
        &dir.join(format!("{id}.sock")),
        &refs,
    )
}

/// A burst of qemu-io writes (random offsets, 4–64 KiB, a pattern per
/// burst); returns whether qemu-io succeeded.
pub fn write_burst(sock: &Path, size: u64, rng: &mut rand::rngs::StdRng, writes: usize) -> bool {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "none"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()));
    for _ in 0..writes {
        let len = rng.gen_range(1..=16u64) * 4096;
        let off = rng.gen_range(0..(size - len) / 4096) * 4096;
        let pat: u8 = rng.gen();
        if rng.gen_bool(0.1) {
            cmd.arg("-c").arg(format!("write -z {off} {len}"));
        } else {
            cmd.arg("-c").arg(format!("write -P {pat} {off} {len}"));
        }
    }
    cmd.arg("-c").arg("flush");
    let out = run(&mut cmd, Duration::from_secs(60));
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed")
}

/// A background writer: bursts through the shim until stopped (bounded in
/// count and time); failed bursts (the agent is down) are retried later.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(sock: &Path, size: u64, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (st, okc, sock) = (stop.clone(), ok.clone(), sock.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let start = Instant::now();
            for _ in 0..100_000 {
                if st.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(600) {
                    break;
                }
                if write_burst(&sock, size, &mut rng, 32) {
                    okc.fetch_add(1, Ordering::Relaxed);
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Load {
            stop,
            ok,
            thread: Some(thread),
        }
    }

    /// Stop and return the number of bursts that succeeded.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        self.ok.load(Ordering::Relaxed)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One qemu-io write of `len` bytes of `pat` at `at` through the NBD
/// socket `sock`, flushed; panics if qemu-io says it failed.
pub fn write_pattern(sock: &Path, at: u64, len: u64, pat: u8) {
    let out = crate::run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-t",
            "none",
            &format!("nbd+unix:///?socket={}", sock.display()),
            "-c",
            &format!("write -P {pat} {at} {len}"),
            "-c",
            "flush",
        ]),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io: {text}");
}

/// Poll `ok` every 200 ms until it holds; panics naming `what` after `timeout`.
pub fn poll_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn wait_and_compare(site: &Site, id: &str, disk: &Path, timeout: Duration) {
    site.wait(id, timeout);
    assert_identical(disk, &site.replica(id));
}

pub fn seed() -> u64 {
    let s = std::env::var("TIDEMARK_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("TIDEMARK_FAULT_SEED={s}");
    s
}

/// A real ext4 of `size` bytes holding `/etc/hostname` ("db1") and a
/// 3 MiB `data.bin`, written over `agent`'s disk through the shim by
/// nbdcopy (a real client); returns the folder its files came from.
pub fn write_ext4(dir: &Path, agent: &Agent, size: u64) -> std::path::PathBuf {
    let content = dir.join("content");
    std::fs::create_dir_all(content.join("etc")).unwrap();
    std::fs::write(content.join("etc/hostname"), "db1\n").unwrap();
    std::fs::write(content.join("data.bin"), vec![0x5a; 3 << 20]).unwrap();
    let img = dir.join("fs.img");
    let t = Duration::from_secs(120);
    crate::run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(&content)
            .arg(&img)
            .arg(format!("{}M", size >> 20)),
        t,
    );
    crate::run_ok(Command::new("nbdcopy").arg(&img).arg(agent.uri()), t);
    content
}
