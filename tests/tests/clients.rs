//! The agent's NBD shim driven by real clients nobody here wrote: nbdinfo,
//! qemu-io, qemu-img, nbdcopy, fio's nbd engine, and ext4 through nbdfuse
//! and a loop device.
//!
//! Every test protects a disk that already holds data, keeps a copy of it
//! taken before the agent first started, and ends by replaying the agent's
//! journal onto that copy: the result must equal the disk (`docs/design.md`,
//! rule 6), whatever the client did to it.
//!
//! The ext4 test needs root, /dev/fuse and free loop devices; it says so
//! when it cannot run.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;
use tidemark_tests::{assert_identical, assert_replay_matches, bin, need_tool, run, run_ok, sparse_file, Agent};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Time limit of one client command.
const T: Duration = Duration::from_secs(120);
/// blake3 of the empty payload: the hash of every zero and trim record.
const BLAKE3_EMPTY: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

// --- Fixture ------------------------------------------------------------------

/// A disk holding data before protection, its pre-protection copy, and the
/// paths of the agent that protects it.
struct Fixture {
    dir: TempDir,
    disk: PathBuf,
    pre: PathBuf,
    state: PathBuf,
    sock: PathBuf,
    size: u64,
}

impl Fixture {
    /// A sparse disk of `size` bytes with a 256 KiB random chunk in every
    /// 8 MiB (at a different 4 KiB-aligned shift each time), copied to
    /// `pre.img` before any agent sees it.
    fn new(size: u64, seed: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        let pre = dir.path().join("pre.img");
        sparse_file(&disk, size);
        let f = OpenOptions::new().write(true).open(&disk).expect("open disk");
        for (i, off) in seeded_chunks(size).into_iter().enumerate() {
            let len = (256 * KIB).min(size - off);
            f.write_all_at(&random_bytes(seed + i as u64, len), off)
                .expect("seed disk");
        }
        f.sync_all().expect("sync disk");
        drop(f);
        run_ok(Command::new("cp").arg("--sparse=always").arg(&disk).arg(&pre), T);
        Fixture {
            state: dir.path().join("state"),
            sock: dir.path().join("nbd.sock"),
            dir,
            disk,
            pre,
            size,
        }
    }

    fn start(&self) -> Agent {
        Agent::start(&self.disk, &self.state, &self.sock, &[])
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The journal replayed onto the pre-protection copy equals the disk.
    fn replay_check(&self) {
        assert_replay_matches(&self.state, &self.pre, &self.disk);
    }
}

/// Offsets of the pre-protection random chunks of a disk of `size` bytes.
fn seeded_chunks(size: u64) -> Vec<u64> {
    (0..size.div_ceil(8 * MIB))
        .map(|k| k * 8 * MIB + (k * 12 * KIB) % (8 * MIB))
        .filter(|off| *off < size)
        .collect()
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("fits in usize")
}

fn random_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; usize_of(len)];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A raw image of `size` bytes whose MiBs are, in turn, holes (every 5th),
/// explicit zeros (every 3rd of the rest) or random data.
fn mixed_image(path: &Path, size: u64, seed: u64) {
    sparse_file(path, size);
    let f = OpenOptions::new().write(true).open(path).expect("open image");
    for m in 0..size / MIB {
        let data = if m % 5 == 0 {
            continue;
        } else if m % 3 == 0 {
            vec![0u8; usize_of(MIB)]
        } else {
            random_bytes(seed ^ (m << 32), MIB)
        };
        f.write_all_at(&data, m * MIB).expect("write image");
    }
}

// --- Client helpers -----------------------------------------------------------

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run qemu-io with `cmds` on a raw export; every command must succeed and
/// every pattern check must pass.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = text(&run_ok(&mut c, T));
    assert_no_qemu_io_failure(&out);
    out
}

fn assert_no_qemu_io_failure(out: &str) {
    for bad in ["verification failed", "failed", "error", "Error"] {
        assert!(!out.contains(bad), "qemu-io reported {bad:?}:\n{out}");
    }
}

/// A qemu-io reading commands from a pipe, so that it stays connected
/// between commands; its output goes to a file.
struct QemuIoSession {
    child: Child,
    stdin: Option<ChildStdin>,
    out: PathBuf,
}

impl QemuIoSession {
    fn open(uri: &str, out: PathBuf) -> Self {
        let f = File::create(&out).expect("qemu-io output file");
        let child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn qemu-io");
        let mut s = QemuIoSession {
            child,
            stdin: None,
            out,
        };
        s.stdin = s.child.stdin.take();
        s
    }

    fn send(&mut self, cmds: &[String]) {
        let w = self.stdin.as_mut().expect("stdin open");
        for c in cmds {
            writeln!(w, "{c}").expect("write to qemu-io");
        }
        w.flush().expect("flush qemu-io stdin");
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Close stdin and wait for qemu-io to exit; returns (success, output).
    fn finish(mut self) -> (bool, String) {
        drop(self.stdin.take());
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return (st.success(), self.output());
            }
            assert!(
                start.elapsed() < T,
                "qemu-io did not exit after stdin closed:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuIoSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number from the agent's status.
fn status_u64(agent: &Agent, key: &str) -> u64 {
    let s = agent.status();
    s[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no number {key:?}: {s}"))
}

/// Poll until `f` holds, or panic with `what`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tidemark journal dump --json`, one object per line.
fn journal_dump(state: &Path) -> Vec<Value> {
    let out = run_ok(
        Command::new(bin("tidemark"))
            .args(["journal", "dump", "--json", "--state"])
            .arg(state),
        T,
    );
    String::from_utf8(out.stdout)
        .expect("dump is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("dump line {l:?} is not JSON: {e}")))
        .collect()
}

fn count_kind(records: &[Value], kind: &str) -> u64 {
    records.iter().filter(|r| r["kind"] == kind).count() as u64
}

/// Check the shape of a JSON dump: the five keys, seqs 1, 2, 3, …
fn check_dump_shape(records: &[Value]) {
    let mut prev = 0u64;
    for r in records {
        for key in ["seq", "kind", "offset", "length", "hash"] {
            assert!(r.get(key).is_some(), "record without {key:?}: {r}");
        }
        let seq = r["seq"].as_u64().expect("seq is a number");
        assert!(seq > prev, "seq {seq} after {prev}: not strictly increasing");
        assert_eq!(seq, prev + 1, "seq {seq} after {prev}: a gap");
        prev = seq;
        let hash = r["hash"].as_str().expect("hash is a string");
        assert!(
            hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "hash is not 32 bytes of hex: {r}"
        );
        r["offset"].as_u64().expect("offset is a number");
        r["length"].as_u64().expect("length is a number");
    }
    if let Some(first) = records.first() {
        assert_eq!(first["seq"], 1, "the journal does not start at seq 1");
    }
}

/// `nbdinfo --map --json`: extents tile the export, and none claims zeros
/// where `content` holds data.
fn check_map(uri: &str, content: &[u8]) -> Vec<Value> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", uri]), T);
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).expect("map JSON");
    let mut pos = 0u64;
    for e in &map {
        let off = e["offset"].as_u64().expect("offset");
        let len = e["length"].as_u64().expect("length");
        let typ = e["type"].as_u64().expect("type");
        assert_eq!(off, pos, "extents do not tile the export: {map:?}");
        assert!(len > 0, "empty extent {e}");
        if typ & 2 != 0 {
            let s = &content[usize_of(off)..usize_of(off + len)];
            if let Some(i) = s.iter().position(|b| *b != 0) {
                panic!(
                    "base:allocation says {off}+{len} reads as zeros, but byte {} is {:#x}",
                    off + i as u64,
                    s[i]
                );
            }
        }
        pos += len;
    }
    assert_eq!(pos, content.len() as u64, "extents do not cover the export");
    map
}

/// fio with JSON output (to `dir/label.json`); every job must finish
/// without error. `args` name the jobs (`--name=…`); options before the
/// first name apply to all of them.
fn fio(dir: &Path, label: &str, args: &[String]) -> Vec<Value> {
    let out_file = dir.join(format!("{label}.json"));
    let out = run(
        Command::new("fio")
            .current_dir(dir)
            .args(args)
            .arg("--output-format=json")
            .arg(format!("--output={}", out_file.display())),
        Duration::from_secs(300),
    );
    let json = fs::read_to_string(&out_file).unwrap_or_default();
    assert!(
        out.status.success(),
        "fio {label} failed ({}):\n{}\n{json}",
        out.status,
        text(&out)
    );
    // fio may print notices before the JSON document.
    let start = json.find('{').unwrap_or(0);
    let v: Value = serde_json::from_str(&json[start..]).expect("fio JSON");
    let jobs = v["jobs"].as_array().expect("fio jobs").clone();
    for j in &jobs {
        assert_eq!(j["error"], 0, "fio job failed: {j}");
    }
    jobs
}

fn fio_ios(jobs: &[Value], dir: &str) -> u64 {
    jobs.iter()
        .map(|j| j[dir]["total_ios"].as_u64().expect("total_ios"))
        .sum()
}

fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path), T);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

fn need_fuse() {
    need_tool("nbdfuse");
    need_tool("fusermount3");
    assert!(
        Path::new("/dev/fuse").exists(),
        "this test needs FUSE (/dev/fuse) for nbdfuse"
    );
}

fn need_root() {
    let out = run_ok(Command::new("id").arg("-u"), T);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "this test mounts ext4 through nbdfuse and a loop device: it must run as root"
    );
    need_fuse();
    assert!(
        Path::new("/dev/loop-control").exists(),
        "this test needs loop devices (/dev/loop-control)"
    );
}

// --- nbdfuse + loop + mount, undone even when a test fails ----------------------

/// nbdfuse exposing the export as `fusedir/nbd`, optionally a loop device
/// over it and a filesystem mounted from that. Drop undoes whatever is
/// still set up, in reverse order, so a failing test leaks nothing.
struct FuseLoop {
    fusedir: PathBuf,
    mnt: PathBuf,
    nbdfuse: Option<Child>,
    loopdev: Option<String>,
    mounted: bool,
}

impl FuseLoop {
    /// Start nbdfuse on `fusedir` and wait until it serves.
    fn start(sock: &Path, fusedir: &Path, mnt: &Path) -> Self {
        fs::create_dir_all(fusedir).expect("fuse dir");
        fs::create_dir_all(mnt).expect("mount dir");
        let pidfile = fusedir.with_extension("pid");
        let _ = fs::remove_file(&pidfile);
        let log = File::create(fusedir.with_extension("log")).expect("nbdfuse log");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(format!("{}/", fusedir.display()))
            .arg("--unix")
            .arg(sock)
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn nbdfuse");
        let mut fl = FuseLoop {
            fusedir: fusedir.into(),
            mnt: mnt.into(),
            nbdfuse: Some(child),
            loopdev: None,
            mounted: false,
        };
        let start = Instant::now();
        while !(fs::read_to_string(&pidfile).is_ok_and(|s| !s.trim().is_empty()) && fl.file().exists()) {
            if let Some(st) = fl.nbdfuse.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("nbdfuse exited with {st}: {}", fl.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nbdfuse did not come up: {}",
                fl.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fl
    }

    fn file(&self) -> PathBuf {
        self.fusedir.join("nbd")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.fusedir.with_extension("log")).unwrap_or_default()
    }

    /// Attach a loop device to the FUSE file.
    fn attach(&mut self) -> String {
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(self.file()), T);
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loopdev = Some(dev.clone());
        dev
    }

    fn mount(&mut self) {
        let dev = self.loopdev.clone().expect("loop device attached");
        run_ok(Command::new("mount").arg(&dev).arg(&self.mnt), T);
        self.mounted = true;
    }

    fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mnt), T);
        self.mounted = false;
    }

    fn detach(&mut self) {
        if let Some(dev) = self.loopdev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&dev), T);
        }
    }

    /// Unmount the FUSE file system (retrying while the released loop
    /// device still holds it) and wait for nbdfuse to exit.
    fn stop(&mut self) {
        let start = Instant::now();
        loop {
            let out = run(Command::new("fusermount3").arg("-u").arg(&self.fusedir), T);
            if out.status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "fusermount3 -u {} keeps failing: {}",
                self.fusedir.display(),
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let start = Instant::now();
            loop {
                if let Some(st) = c.try_wait().expect("try_wait") {
                    assert!(st.success(), "nbdfuse exited with {st}: {}", self.log());
                    break;
                }
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("nbdfuse did not exit after fusermount3 -u");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Everything in order: umount, detach, stop nbdfuse.
    fn teardown(&mut self) {
        if self.mounted {
            self.umount();
        }
        self.detach();
        self.stop();
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if self.mounted {
            quiet(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        if let Some(dev) = self.loopdev.take() {
            quiet(Command::new("losetup").arg("-d").arg(&dev));
        }
        if let Some(mut c) = self.nbdfuse.take() {
            quiet(Command::new("fusermount3").arg("-uz").arg(&self.fusedir));
            std::thread::sleep(Duration::from_millis(100));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// --- 1. nbdinfo -----------------------------------------------------------------

#[test]
fn nbdinfo_reports_the_export() {
    need_tool("nbdinfo");
    let fx = Fixture::new(64 * MIB, 1);
    let agent = fx.start();
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(fx.uri()), T);
    let v: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    assert_eq!(v["protocol"], "newstyle-fixed", "{v}");
    assert_eq!(v["structured"], true, "{v}");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk.img", "{e}");
    assert_eq!(e["export-size"], fx.size, "{e}");
    assert_eq!(e["block_size_minimum"], 512, "{e}");
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{e}");
    assert_eq!(e["is_read_only"], false, "{e}");
    for flag in ["can_fua", "can_trim", "can_zero", "can_flush", "can_multi_conn"] {
        assert_eq!(e[flag], true, "{flag} is not true: {e}");
    }
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{contexts:?}");

    // The export is listed, reachable by name, and a wrong name is refused.
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &fx.uri()]), T);
    let list: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --list JSON");
    let names: Vec<&str> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["disk.img"]);
    let named = format!("nbd+unix:///disk.img?socket={}", fx.sock.display());
    let out = run_ok(Command::new("nbdinfo").args(["--size", &named]), T);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), fx.size.to_string());
    let wrong = format!("nbd+unix:///nope?socket={}", fx.sock.display());
    let out = run(Command::new("nbdinfo").args(["--size", &wrong]), T);
    assert!(!out.status.success(), "export \"nope\" was served: {}", text(&out));

    // base:allocation: extents tile the disk, never claim zeros over data,
    // and every pre-protection chunk shows as data.
    let content = fs::read(&fx.pre).expect("read pre");
    let map = check_map(&fx.uri(), &content);
    for chunk in seeded_chunks(fx.size) {
        let e = map
            .iter()
            .find(|e| {
                let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                o <= chunk && chunk < o + l
            })
            .expect("extent of chunk");
        assert_eq!(e["type"], 0, "chunk at {chunk} is data but the map says {e}");
    }
    assert!(
        map.iter().any(|e| e["type"].as_u64() == Some(3)),
        "a sparse disk shows no hole,zero extent: {map:?}"
    );

    assert_eq!(status_u64(&agent, "writes"), 0);
    agent.stop();
    assert!(journal_dump(&fx.state).is_empty(), "nbdinfo changed the disk");
    fx.replay_check();
}

// --- 2. qemu-io ------------------------------------------------------------------

/// One qemu-io change, applied both to the export and to an in-memory model.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        pat: u8,
        fua: bool,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
        fua: bool,
        fast: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
}

impl Op {
    fn command(self) -> String {
        match self {
            Op::Write { off, len, pat, fua } => {
                let f = if fua { "-f " } else { "" };
                format!("write {f}-P {pat:#x} {off} {len}")
            }
            Op::Zero {
                off,
                len,
                unmap,
                fua,
                fast,
            } => {
                let mut flags = String::from("-z");
                if unmap {
                    flags.push_str(" -u");
                }
                if fua {
                    flags.push_str(" -f");
                }
                if fast {
                    flags.push_str(" -n");
                }
                format!("write {flags} {off} {len}")
            }
            Op::Discard { off, len } => format!("discard {off} {len}"),
        }
    }

    fn apply(self, model: &mut [u8]) {
        let (off, len, byte) = match self {
            Op::Write { off, len, pat, .. } => (off, len, pat),
            Op::Zero { off, len, .. } | Op::Discard { off, len } => (off, len, 0),
        };
        model[usize_of(off)..usize_of(off + len)].fill(byte);
    }
}

#[test]
fn qemu_io_patterns_fua_zero_discard() {
    need_tool("qemu-io");
    need_tool("qemu-img");
    let fx = Fixture::new(64 * MIB, 2);
    let agent = fx.start();
    let w = |off, len, pat| Op::Write {
        off,
        len,
        pat,
        fua: false,
    };
    let z = |off, len, unmap, fua, fast| Op::Zero {
        off,
        len,
        unmap,
        fua,
        fast,
    };
    let ops = [
        w(0, 64 * KIB, 0x11),     // over pre-protection data
        w(MIB, 4 * KIB, 0x22),    //
        w(MIB + 512, 1536, 0x33), // overlaps the previous one
        w(777, 1000, 0x44),       // unaligned: qemu reads, modifies, writes
        Op::Write {
            off: 2 * MIB,
            len: 128 * KIB,
            pat: 0x55,
            fua: true,
        },
        Op::Write {
            off: 2 * MIB + 128 * KIB,
            len: 512,
            pat: 0x56,
            fua: true,
        },
        z(3 * MIB, 256 * KIB, false, false, false), // NBD_CMD_FLAG_NO_HOLE
        z(8 * MIB + 12 * KIB, 64 * KIB, true, false, false), // over pre-protection data
        z(8 * MIB + 140 * KIB, 64 * KIB, false, false, true), // NBD_CMD_FLAG_FAST_ZERO
        z(4 * MIB, 64 * KIB, false, true, false),   // FUA zero
        Op::Discard {
            off: 16 * MIB + 24 * KIB,
            len: 128 * KIB,
        }, // over pre-protection data
        w(20 * MIB, 40 * MIB, 0x66),                // above the 32 MiB payload limit: split
        w(64 * MIB - 4 * KIB, 4 * KIB, 0x77),       // the last block
        w(6 * MIB, 64 * KIB, 0xb1),
        w(6 * MIB + 4 * KIB, 4 * KIB, 0xb2),
    ];
    let mut model = fs::read(&fx.pre).expect("read pre");
    let mut cmds: Vec<String> = ops.iter().map(|o| o.command()).collect();
    for o in ops {
        o.apply(&mut model);
    }
    // Sixteen writes in flight at once on one connection.
    for i in 0..16u64 {
        let op = w(5 * MIB + i * 4 * KIB, 4 * KIB, 0x80 + u8::try_from(i).unwrap());
        cmds.push(format!("aio_write -P {:#x} {} 4096", 0x80 + i, 5 * MIB + i * 4 * KIB));
        op.apply(&mut model);
    }
    cmds.push("aio_flush".into());
    cmds.push("flush".into());
    qemu_io(&fx.uri(), &cmds);

    // Read back on a new connection.
    let r = |pat: u8, off: u64, len: u64| format!("read -P {pat:#x} {off} {len}");
    let mut reads = vec![
        r(0x11, 0, 777),
        r(0x44, 777, 1000),
        r(0x11, 1777, 64 * KIB - 1777),
        r(0x22, MIB, 512),
        r(0x33, MIB + 512, 1536),
        r(0x22, MIB + 2 * KIB, 2 * KIB),
        r(0x55, 2 * MIB, 128 * KIB),
        r(0x56, 2 * MIB + 128 * KIB, 512),
        r(0, 3 * MIB, 256 * KIB),
        r(0, 8 * MIB + 12 * KIB, 64 * KIB),
        r(0, 8 * MIB + 140 * KIB, 64 * KIB),
        r(0, 4 * MIB, 64 * KIB),
        r(0, 16 * MIB + 24 * KIB, 128 * KIB),
        r(0x66, 20 * MIB, 40 * MIB),
        r(0x77, 64 * MIB - 4 * KIB, 4 * KIB),
        r(0xb1, 6 * MIB, 4 * KIB),
        r(0xb2, 6 * MIB + 4 * KIB, 4 * KIB),
        r(0xb1, 6 * MIB + 8 * KIB, 56 * KIB),
    ];
    for i in 0..16u64 {
        reads.push(r(0x80 + u8::try_from(i).unwrap(), 5 * MIB + i * 4 * KIB, 4 * KIB));
    }
    let out = qemu_io(&fx.uri(), &reads);
    assert_eq!(out.matches("read ").count(), reads.len(), "not every read ran:\n{out}");

    // The whole export, read over NBD, equals the model.
    let model_img = fx.path("model.img");
    fs::write(&model_img, &model).expect("write model");
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&model_img)
            .arg(fx.uri()),
        T,
    );
    check_map(&fx.uri(), &model);

    assert!(status_u64(&agent, "zeroes") >= 4, "{}", agent.status());
    assert!(status_u64(&agent, "trims") >= 1, "{}", agent.status());
    assert!(status_u64(&agent, "flushes") >= 1, "{}", agent.status());
    let served = agent.status()["served_as"].clone();
    assert_eq!(
        served,
        serde_json::json!(format!("nbd unix:{}", agent.sock.display())),
        "served_as"
    );
    let recs = journal_dump(&fx.state);
    check_dump_shape(&recs);
    assert!(count_kind(&recs, "zero") >= 4, "{recs:?}");
    assert!(count_kind(&recs, "trim") >= 1, "{recs:?}");
    // 10 writes (the 40 MiB one in two requests) and 16 aio writes.
    assert!(count_kind(&recs, "write") >= 27, "{recs:?}");

    agent.stop();
    assert_identical(&model_img, &fx.disk);
    fx.replay_check();
}

// --- 3. qemu-img ---------------------------------------------------------------

#[test]
fn qemu_img_convert_into_and_out_of_the_export() {
    need_tool("qemu-img");
    let fx = Fixture::new(64 * MIB, 3);
    let src = fx.path("src.img");
    mixed_image(&src, fx.size, 3);
    let agent = fx.start();

    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &fx.uri()]), T);
    let info: Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], fx.size, "{info}");

    // Into the export; -n keeps the export, so the zero parts of the source
    // must overwrite the disk's pre-protection data.
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(fx.uri()),
        T,
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(fx.uri()),
        T,
    );
    // Out of it.
    let out = fx.path("out.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &fx.uri()])
            .arg(&out),
        T,
    );
    assert_identical(&src, &out);
    check_map(&fx.uri(), &fs::read(&src).expect("read src"));
    let recs = journal_dump(&fx.state);
    check_dump_shape(&recs);
    assert!(count_kind(&recs, "write") > 0, "{recs:?}");

    agent.stop();
    assert_identical(&src, &fx.disk);
    fx.replay_check();
}

#[test]
fn qemu_img_qcow2_on_the_export_and_replay_upto() {
    need_tool("qemu-img");
    need_tool("qemu-io");
    let fx = Fixture::new(64 * MIB, 4);
    let src = fx.path("src.img");
    mixed_image(&src, 48 * MIB, 4);
    let agent = fx.start();
    let uri = fx.uri();

    run_ok(Command::new("qemu-img").args(["create", "-f", "qcow2", &uri, "48M"]), T);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "qcow2"])
            .arg(&src)
            .arg(&uri),
        T,
    );
    run_ok(Command::new("qemu-img").args(["check", "-f", "qcow2", &uri]), T);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&uri),
        T,
    );
    // A point to come back to with `journal replay --upto`.
    let point_seq = status_u64(&agent, "last_seq");
    assert!(point_seq > 0);
    let point = fx.path("point.img");
    run_ok(Command::new("cp").arg("--sparse=always").arg(&fx.disk).arg(&point), T);

    // Guest writes and discards inside the qcow2 image.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in [
        "write -P 0x3c 1M 3M",
        "write -z 8M 2M",
        "discard 12M 4M",
        "write -P 0x3d 47M 1M",
        "flush",
        "read -P 0x3c 1M 3M",
        "read -P 0 8M 2M",
        "read -P 0 12M 4M",
        "read -P 0x3d 47M 1M",
    ] {
        c.arg("-c").arg(cmd);
    }
    c.arg(&uri);
    assert_no_qemu_io_failure(&text(&run_ok(&mut c, T)));
    run_ok(Command::new("qemu-img").args(["check", "-f", "qcow2", &uri]), T);

    agent.stop();
    run_ok(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&fx.disk), T);
    fx.replay_check();

    // Replaying up to the point gives the disk as it was then.
    let upto = fx.path("upto.img");
    run_ok(Command::new("cp").arg("--sparse=always").arg(&fx.pre).arg(&upto), T);
    run_ok(
        Command::new(bin("tidemark"))
            .args(["journal", "replay", "--state"])
            .arg(&fx.state)
            .arg("--onto")
            .arg(&upto)
            .arg("--upto")
            .arg(point_seq.to_string()),
        T,
    );
    assert_identical(&point, &upto);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&upto),
        T,
    );
}

// --- 4. nbdcopy -------------------------------------------------------------------

#[test]
fn nbdcopy_into_and_out_of_the_export() {
    need_tool("nbdcopy");
    need_tool("nbdinfo");
    let fx = Fixture::new(64 * MIB, 5);
    let src = fx.path("src.img");
    mixed_image(&src, fx.size, 5);
    let agent = fx.start();

    // Holes, zeros and data, over four connections.
    run_ok(
        Command::new("nbdcopy")
            .args(["--flush", "--connections=4", "--requests=16"])
            .arg(&src)
            .arg(fx.uri()),
        T,
    );
    assert!(status_u64(&agent, "flushes") >= 1, "nbdcopy --flush sent no flush");
    let content = fs::read(&src).expect("read src");
    check_map(&fx.uri(), &content);
    let out = fx.path("out.img");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4"])
            .arg(fx.uri())
            .arg(&out),
        T,
    );
    assert_identical(&src, &out);
    assert_eq!(fs::read(&out).expect("read out"), content);

    // All data, in requests of the 32 MiB maximum payload.
    let src2 = fx.path("src2.img");
    fs::write(&src2, random_bytes(55, fx.size)).expect("write src2");
    run_ok(
        Command::new("nbdcopy")
            .args(["--request-size=33554432", "--connections=2"])
            .arg(&src2)
            .arg(fx.uri()),
        T,
    );
    let out2 = fx.path("out2.img");
    run_ok(
        Command::new("nbdcopy")
            .args(["--request-size=33554432"])
            .arg(fx.uri())
            .arg(&out2),
        T,
    );
    assert_identical(&src2, &out2);
    let recs = journal_dump(&fx.state);
    check_dump_shape(&recs);
    assert!(
        recs.iter().any(|r| r["kind"] == "write" && r["length"] == 32 * MIB),
        "no 32 MiB write reached the journal"
    );

    agent.stop();
    assert_identical(&src2, &fx.disk);
    fx.replay_check();
}

// --- 5. fio ------------------------------------------------------------------------

#[test]
fn fio_verify_random_writes_mixed_sizes_and_trims() {
    need_tool("fio");
    need_tool("qemu-io");
    let fx = Fixture::new(192 * MIB, 6);
    let agent = fx.start();
    let uri = format!("--uri={}", fx.uri());
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--ioengine=nbd".to_string(),
            uri.clone(),
            "--runtime=90".into(),
            "--verify_fatal=1".into(),
            "--verify_state_save=0".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // Random 4 KiB writes, 16 in flight, each block verified afterwards.
    let a = fio(
        fx.dir.path(),
        "rand4k",
        &common(&[
            "--name=rand4k",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--offset=64M",
            "--size=64M",
            "--verify=crc32c",
            "--do_verify=1",
        ]),
    );
    assert_eq!(fio_ios(&a, "write"), 16384, "{a:?}");
    assert_eq!(fio_ios(&a, "read"), 16384, "verify did not read everything: {a:?}");

    // Two jobs (two connections at once), 512 B to 128 KiB blocks, verified.
    let b = fio(
        fx.dir.path(),
        "mixed",
        &common(&[
            "--name=mixed",
            "--rw=randwrite",
            "--bsrange=512-128k",
            "--iodepth=16",
            "--numjobs=2",
            "--offset=128M",
            "--size=32M",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--do_verify=1",
        ]),
    );
    assert_eq!(b.len(), 2);
    assert!(fio_ios(&b, "read") > 0, "verify read nothing: {b:?}");

    // Each block trimmed, then written, then verified. (fio 3.33 issues
    // only trims for randtrimwrite with a nonzero --offset, so this job
    // starts at 0.)
    let c = fio(
        fx.dir.path(),
        "trimwrite",
        &common(&[
            "--name=trimwrite",
            "--rw=randtrimwrite",
            "--bsrange=512-128k",
            "--iodepth=16",
            "--offset=0",
            "--size=64M",
            "--verify=crc32c",
            "--do_verify=1",
        ]),
    );
    assert!(fio_ios(&c, "trim") > 0, "no trims: {c:?}");
    assert_eq!(fio_ios(&c, "trim"), fio_ios(&c, "write"), "{c:?}");
    assert!(fio_ios(&c, "read") > 0, "verify read nothing: {c:?}");

    // Fill a region, trim all of it with fio: it reads as zeros.
    qemu_io(&fx.uri(), &[format!("write -P 0xab 0 {}", 32 * MIB)]);
    let d = fio(
        fx.dir.path(),
        "trim",
        &common(&[
            "--name=trim",
            "--rw=trim",
            "--bs=64k",
            "--iodepth=8",
            "--offset=0",
            "--size=32M",
        ]),
    );
    assert_eq!(fio_ios(&d, "trim"), 512, "{d:?}");
    qemu_io(&fx.uri(), &[format!("read -P 0 0 {}", 32 * MIB)]);

    let recs = journal_dump(&fx.state);
    check_dump_shape(&recs);
    let writes = fio_ios(&a, "write") + fio_ios(&b, "write") + fio_ios(&c, "write") + 1;
    assert!(
        count_kind(&recs, "write") >= writes,
        "{} write records for {writes} writes",
        count_kind(&recs, "write")
    );
    let trims = fio_ios(&c, "trim") + fio_ios(&d, "trim");
    assert!(
        count_kind(&recs, "trim") >= trims,
        "{} trim records for {trims} trims",
        count_kind(&recs, "trim")
    );

    agent.stop();
    fx.replay_check();
}

// --- 6. ext4 through nbdfuse + loop -----------------------------------------------

#[test]
fn ext4_through_nbdfuse_and_loop() {
    need_root();
    for t in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "fstrim",
        "sha256sum",
    ] {
        need_tool(t);
    }
    let fx = Fixture::new(256 * MIB, 7);
    let agent = fx.start();
    let fusedir = fx.path("fuse");
    let mnt = fx.path("mnt");
    let expected_dir = fx.path("expected");
    fs::create_dir_all(&expected_dir).expect("expected dir");

    let mut fl = FuseLoop::start(&fx.sock, &fusedir, &mnt);
    let dev = fl.attach();
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev),
        T,
    );
    fl.mount();

    // Big random files (kept), a file and small files that get deleted.
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |name: &str, data: &[u8]| {
        let local = expected_dir.join(name.replace('/', "_"));
        fs::write(&local, data).expect("write expected");
        if let Some(parent) = Path::new(name).parent() {
            fs::create_dir_all(mnt.join(parent)).expect("mkdir in ext4");
        }
        fs::write(mnt.join(name), data).expect("write into ext4");
        expected.insert(name.to_string(), sha256(&local));
    };
    put("big1", &random_bytes(71, 4 * MIB));
    put("big2", &random_bytes(72, 3 * MIB + 123));
    put("gone", &random_bytes(73, 2 * MIB));
    for i in 0..40u64 {
        put(&format!("dir/small{i}"), &random_bytes(100 + i, 1000 + i * 517));
    }
    run_ok(Command::new("sync").arg("-f").arg(mnt.join("big1")), T);
    fs::remove_file(mnt.join("gone")).expect("rm gone");
    expected.remove("gone");
    for i in (0..40u64).step_by(2) {
        let name = format!("dir/small{i}");
        fs::remove_file(mnt.join(&name)).expect("rm small");
        expected.remove(&name);
    }
    run_ok(&mut Command::new("sync"), T);
    // Free blocks go back as TRIM: loop → FUSE punch hole → NBD_CMD_TRIM.
    run_ok(Command::new("fstrim").arg(&mnt), T);
    for (name, hash) in &expected {
        assert_eq!(&sha256(&mnt.join(name)), hash, "{name} before unmount");
    }
    fl.teardown();

    let trims_seen = status_u64(&agent, "trims");
    assert!(trims_seen > 0, "mkfs and fstrim sent no TRIM");
    agent.stop();
    let fsck = run(Command::new("fsck.ext4").arg("-fn").arg(&fx.disk), T);
    assert!(fsck.status.success(), "fsck.ext4 -fn found problems:\n{}", text(&fsck));
    fx.replay_check();

    // Again, after a restart: the files are there with the same contents.
    let agent = fx.start();
    let mut fl = FuseLoop::start(&fx.sock, &fusedir, &mnt);
    fl.attach();
    fl.mount();
    for (name, hash) in &expected {
        assert_eq!(&sha256(&mnt.join(name)), hash, "{name} after restart");
    }
    assert!(!mnt.join("gone").exists(), "a deleted file is back");
    let smalls = fs::read_dir(mnt.join("dir")).expect("read dir").count();
    assert_eq!(smalls, 20, "small files after restart");
    fl.teardown();
    agent.stop();
    let fsck = run(Command::new("fsck.ext4").arg("-fn").arg(&fx.disk), T);
    assert!(fsck.status.success(), "fsck after restart:\n{}", text(&fsck));
    fx.replay_check();
}

// --- 7. two connections -------------------------------------------------------------

#[test]
fn two_connections_write_disjoint_ranges_then_one_flushes() {
    need_tool("qemu-io");
    let fx = Fixture::new(64 * MIB, 8);
    let agent = fx.start();
    const CHUNK: u64 = 64 * KIB;
    const N: u64 = 128; // chunks per writer, interleaved over 16 MiB
    let pat_a = |i: u64| 0xa0 + u8::try_from(i % 16).unwrap();
    let pat_b = |i: u64| 0x50 + u8::try_from(i % 16).unwrap();
    let off_a = |i: u64| 2 * i * CHUNK;
    let off_b = |i: u64| (2 * i + 1) * CHUNK;
    let reads = |pat: &dyn Fn(u64) -> u8, off: &dyn Fn(u64) -> u64| -> Vec<String> {
        (0..N)
            .map(|i| format!("read -P {:#x} {} {CHUNK}", pat(i), off(i)))
            .collect()
    };
    // Each writer: its chunks, all in flight at once; then it stays
    // connected a while (so the two sessions overlap); A then flushes.
    // Each reads back its own range; nothing here depends on timing.
    let session = |pat: &dyn Fn(u64) -> u8, off: &dyn Fn(u64) -> u64, flush: bool| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for i in 0..N {
            c.arg("-c")
                .arg(format!("aio_write -P {:#x} {} {CHUNK}", pat(i), off(i)));
        }
        c.args(["-c", "aio_flush", "-c", "sleep 1500"]);
        if flush {
            c.args(["-c", "flush"]);
        }
        for r in reads(pat, off) {
            c.arg("-c").arg(r);
        }
        c.arg(fx.uri());
        c
    };
    let mut a = session(&pat_a, &off_a, true);
    let mut b = session(&pat_b, &off_b, false);
    let ta = std::thread::spawn(move || text(&run_ok(&mut a, T)));
    let tb = std::thread::spawn(move || text(&run_ok(&mut b, T)));
    for (name, t) in [("A", ta), ("B", tb)] {
        let out = t.join().unwrap_or_else(|_| panic!("qemu-io {name} failed"));
        assert_no_qemu_io_failure(&out);
        assert_eq!(
            out.matches("wrote 65536/65536").count(),
            usize_of(N),
            "qemu-io {name} did not write everything:\n{out}"
        );
        assert_eq!(
            out.matches("read 65536/65536").count(),
            usize_of(N),
            "qemu-io {name} did not read everything:\n{out}"
        );
    }
    assert!(status_u64(&agent, "flushes") >= 1);
    // A third connection sees both ranges.
    let mut all = reads(&pat_a, &off_a);
    all.extend(reads(&pat_b, &off_b));
    qemu_io(&fx.uri(), &all);

    let recs = journal_dump(&fx.state);
    check_dump_shape(&recs);
    assert!(count_kind(&recs, "write") >= 2 * N);
    agent.stop();
    fx.replay_check();
}

/// Many connections writing, trimming and zeroing the same 4 MiB at once:
/// whatever order the overlapping requests land in, the disk must end up
/// as the replay of the journal (overlapping writes reach the disk in
/// journal order).
#[test]
fn overlapping_writes_from_many_connections_replay_exactly() {
    need_tool("fio");
    need_tool("qemu-io");
    let fx = Fixture::new(16 * MIB, 13);
    let agent = fx.start();
    let uri = fx.uri();
    for round in 0..3u64 {
        // qemu-io: zeroes (some may unmap) and patterns, 32 in flight.
        let mut cmds = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(round);
        for i in 0..256u64 {
            let off = (rng.next_u64() % (4 * MIB / 512)) * 512;
            let len = ((rng.next_u64() % 128) + 1) * 512;
            let len = len.min(4 * MIB - off);
            cmds.push(match i % 3 {
                0 => format!("aio_write -z {off} {len}"),
                1 => format!("aio_write -z -u {off} {len}"),
                _ => format!("aio_write -P {:#x} {off} {len}", i % 251),
            });
            if i % 32 == 31 {
                cmds.push("aio_flush".into());
            }
        }
        let q_uri = uri.clone();
        let q = std::thread::spawn(move || qemu_io(&q_uri, &cmds));
        let jobs = fio(
            fx.dir.path(),
            &format!("overlap{round}"),
            &[
                "--ioengine=nbd".to_string(),
                format!("--uri={uri}"),
                "--offset=0".into(),
                "--size=4M".into(),
                "--norandommap".into(),
                "--randrepeat=0".into(),
                "--runtime=60".into(),
                "--name=w".into(),
                "--rw=randwrite".into(),
                "--bsrange=512-64k".into(),
                "--numjobs=4".into(),
                "--iodepth=32".into(),
                "--io_size=32M".into(),
                "--name=t".into(),
                "--rw=randtrim".into(),
                "--bsrange=4k-64k".into(),
                "--numjobs=2".into(),
                "--iodepth=8".into(),
                "--io_size=8M".into(),
            ],
        );
        q.join().expect("qemu-io thread");
        assert_eq!(jobs.len(), 6);
        assert!(fio_ios(&jobs, "write") > 0 && fio_ios(&jobs, "trim") > 0);
        // With the agent still running: nothing is in flight now.
        fx.replay_check();
    }
    let recs = journal_dump(&fx.state);
    check_dump_shape(&recs);
    for kind in ["write", "zero", "trim"] {
        assert!(count_kind(&recs, kind) > 0, "no {kind} records");
    }
    agent.stop();
    fx.replay_check();
}

// --- 8. SIGTERM with clients connected ------------------------------------------------

/// The clean-shutdown marker's next_seq.
fn clean_marker_next_seq(state: &Path) -> u64 {
    let p = state.join("clean-shutdown");
    let s = fs::read_to_string(&p).unwrap_or_else(|e| panic!("no clean-shutdown marker {}: {e}", p.display()));
    let v: Value = serde_json::from_str(&s).expect("marker JSON");
    v["next_seq"].as_u64().expect("next_seq")
}

/// SIGTERM the agent; it must exit 0 within `limit`. Returns how long it
/// took. Unlike `Agent::stop` (60 s), this fails fast; on failure the
/// agent is killed when dropped.
fn sigterm_within(mut agent: Agent, limit: Duration) -> Duration {
    run_ok(Command::new("kill").arg("-TERM").arg(agent.child.id().to_string()), T);
    let start = Instant::now();
    loop {
        if let Some(st) = agent.child.try_wait().expect("try_wait") {
            assert!(
                st.success(),
                "agent exited with {st} on SIGTERM; log:\n{}",
                agent.log_text()
            );
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "agent did not exit within {limit:?} of SIGTERM; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_with_idle_clients_connected() {
    need_fuse();
    need_tool("qemu-io");
    need_tool("nbdinfo");
    let fx = Fixture::new(64 * MIB, 9);
    let agent = fx.start();

    // A qemu-io that wrote and stays connected (its stdin stays open), and
    // nbdfuse with its connections open.
    let mut q = QemuIoSession::open(&fx.uri(), fx.path("q.out"));
    q.send(&["write -P 0x5a 0 4k".into()]);
    wait_until("the qemu-io write", T, || status_u64(&agent, "writes") >= 1);
    let mut fl = FuseLoop::start(&fx.sock, &fx.path("fuse"), &fx.path("mnt"));
    // nbdfuse serves: the write shows through it.
    let mut head = vec![0u8; 4096];
    File::open(fl.file())
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .expect("read through nbdfuse");
    assert!(head.iter().all(|b| *b == 0x5a), "nbdfuse reads other data");

    let last_seq = status_u64(&agent, "last_seq");
    assert_eq!(last_seq, 1);
    sigterm_within(agent, Duration::from_secs(10));
    assert_eq!(clean_marker_next_seq(&fx.state), last_seq + 1);
    assert!(!fx.sock.exists(), "the agent left its socket behind");

    // The clients see the server gone, and exit.
    q.send(&["read -P 0x5a 0 4k".into()]);
    let (_, out) = q.finish();
    assert!(
        !out.contains("read 4096/4096"),
        "qemu-io read from a stopped agent:\n{out}"
    );
    fl.stop();
    fx.replay_check();

    // A restart opens cleanly and serves the data.
    let agent = fx.start();
    assert!(
        agent.log_text().contains("last_stop=Clean"),
        "restart did not see a clean stop:\n{}",
        agent.log_text()
    );
    assert!(
        !fx.state.join("clean-shutdown").exists(),
        "the marker survives the restart"
    );
    run_ok(Command::new("nbdinfo").arg(fx.uri()), T);
    qemu_io(&fx.uri(), &["read -P 0x5a 0 4k".into()]);
    agent.stop();
    fx.replay_check();
}

/// A client that connects and then says nothing must not keep a SIGTERMed
/// agent from exiting. (At commit b33ee41 it did: the handshake read the
/// client flags without watching for shutdown, and the agent waited until
/// the client went away.)
#[test]
fn sigterm_with_a_client_silent_after_the_greeting() {
    let fx = Fixture::new(16 * MIB, 12);
    let agent = fx.start();
    let mut silent = UnixStream::connect(&fx.sock).expect("connect");
    silent.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut silent, &mut greeting).expect("greeting");
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    sigterm_within(agent, Duration::from_secs(10));
    assert_eq!(clean_marker_next_seq(&fx.state), 1);
    drop(silent);
    fx.replay_check();
}

#[test]
fn sigterm_under_fio_load() {
    need_tool("fio");
    need_tool("qemu-io");
    let fx = Fixture::new(128 * MIB, 10);
    let agent = fx.start();
    let log = File::create(fx.path("fio.log")).expect("fio log");
    let mut fio = Command::new("fio")
        .current_dir(fx.dir.path())
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", fx.uri()),
            "--rw=randrw",
            "--rwmixwrite=80",
            "--bsrange=4k-64k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=64M",
            "--offset_increment=64M",
            "--time_based",
            "--runtime=60",
        ])
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawn fio");
    wait_until("fio writing", T, || status_u64(&agent, "writes") >= 2000);
    sigterm_within(agent, Duration::from_secs(10));
    let start = Instant::now();
    while fio.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = fio.kill();
            let _ = fio.wait();
            panic!("fio did not notice the agent stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let recs = journal_dump(&fx.state);
    check_dump_shape(&recs);
    assert!(recs.len() >= 2000);
    let last = recs.last().map_or(0, |r| r["seq"].as_u64().unwrap());
    assert_eq!(clean_marker_next_seq(&fx.state), last + 1);
    // Every journaled write reached the disk before the clean exit.
    fx.replay_check();

    let agent = fx.start();
    assert!(agent.log_text().contains("last_stop=Clean"));
    qemu_io(&fx.uri(), &["write -P 0x42 0 4k".into(), "read -P 0x42 0 4k".into()]);
    agent.stop();
    fx.replay_check();
}

// --- 9. journal dump -------------------------------------------------------------------

/// Name, size and mtime of every file in the journal directory.
fn journal_files(state: &Path) -> BTreeMap<String, (u64, i64, i64)> {
    fs::read_dir(state.join("journal"))
        .expect("read journal dir")
        .map(|e| {
            let e = e.expect("dir entry");
            let m = e.metadata().expect("metadata");
            (
                e.file_name().to_string_lossy().into_owned(),
                (m.len(), m.mtime(), m.mtime_nsec()),
            )
        })
        .collect()
}

#[test]
fn journal_dump_json_on_a_live_agent() {
    need_tool("qemu-io");
    let fx = Fixture::new(64 * MIB, 11);
    let agent = fx.start();
    let mut cmds: Vec<String> = (0..20u64)
        .map(|i| format!("write -P {:#x} {} {}", 0x10 + i, i * MIB, 8 * KIB + i * 512))
        .collect();
    // Two writes with the same bytes: the same hash.
    cmds.push(format!("write -P 0x99 {} 4096", 30 * MIB));
    cmds.push(format!("write -P 0x99 {} 4096", 31 * MIB));
    cmds.push(format!("write -z {} 64k", 40 * MIB));
    cmds.push(format!("write -z -u {} 64k", 41 * MIB));
    cmds.push(format!("discard {} 1M", 48 * MIB));
    cmds.push("flush".into());
    qemu_io(&fx.uri(), &cmds);

    let before = journal_files(&fx.state);
    assert!(!before.is_empty(), "no journal files");
    let recs = journal_dump(&fx.state);
    let text_dump = run_ok(
        Command::new(bin("tidemark"))
            .args(["journal", "dump", "--state"])
            .arg(&fx.state),
        T,
    );
    assert_eq!(journal_files(&fx.state), before, "journal dump changed the journal");
    let text_dump = String::from_utf8_lossy(&text_dump.stdout).into_owned();
    assert!(text_dump.contains(&format!("seq 1..={}", recs.len())), "{text_dump}");

    check_dump_shape(&recs);
    assert_eq!(recs.len() as u64, status_u64(&agent, "last_seq"));
    assert!(count_kind(&recs, "write") >= 22, "{recs:?}");
    assert_eq!(count_kind(&recs, "zero"), 2, "{recs:?}");
    assert_eq!(count_kind(&recs, "trim"), 1, "{recs:?}");
    for i in 0..20u64 {
        let (off, len) = (i * MIB, 8 * KIB + i * 512);
        assert!(
            recs.iter()
                .any(|r| r["kind"] == "write" && r["offset"] == off && r["length"] == len),
            "no write record for {off}+{len}"
        );
    }
    let find = |kind: &str, off: u64| {
        recs.iter()
            .find(|r| r["kind"] == kind && r["offset"] == off)
            .unwrap_or_else(|| panic!("no {kind} record at {off}"))
    };
    assert_eq!(find("write", 30 * MIB)["hash"], find("write", 31 * MIB)["hash"]);
    assert_ne!(find("write", 0)["hash"], find("write", MIB)["hash"]);
    assert_eq!(find("zero", 40 * MIB)["length"], 64 * KIB);
    assert_eq!(find("trim", 48 * MIB)["length"], MIB);
    for r in recs.iter().filter(|r| r["kind"] != "write") {
        assert_eq!(r["hash"], BLAKE3_EMPTY, "{r}");
    }

    // The dump on the stopped agent says the same.
    agent.stop();
    assert_eq!(journal_dump(&fx.state), recs);
    fx.replay_check();
}
