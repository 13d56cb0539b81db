//! Fault tests of the agent: kill -9 under load, the journal cap and bitmap
//! mode, malformed NBD input, CLI and state-directory errors, torn journal
//! tails, and how the agent tells a process crash from a machine crash.
//!
//! Needs the built binaries (`cargo build --bins`) and qemu-img, qemu-io
//! and fio. Every test is bounded in time; temporary files go under /tmp.
//!
//! Tests named `bug_*` are `#[ignore]`d: each one pins a bug found in the
//! agent or in libs/nbd and fails until it is fixed
//! (`cargo test -p tidemark-tests --test faults -- --ignored`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_tests::{
    assert_identical, assert_replay_matches, bin, need_tool, run, run_ok, sparse_file, write_secret, Agent,
};

// ---------------------------------------------------------------------------
// A minimal NBD client over a Unix socket: fixed newstyle, NBD_OPT_GO,
// simple replies. Small enough to send malformed bytes on purpose.
// ---------------------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).expect("fits in u32")
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("fits in usize")
}

/// One connection to the agent's NBD socket.
struct Conn {
    s: UnixStream,
}

impl Conn {
    fn open(sock: &Path) -> Conn {
        let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        Conn { s }
    }

    /// A connection through the handshake (default export), ready for
    /// requests, and the export size.
    fn nbd(sock: &Path) -> (Conn, u64) {
        let mut c = Conn::open(sock);
        c.greeting();
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .expect("send client flags");
        let size = c.go(b"").unwrap_or_else(|t| panic!("NBD_OPT_GO failed: reply {t:#x}"));
        (c, size)
    }

    fn read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)
    }

    /// Read and check the server's greeting.
    fn greeting(&mut self) {
        let b = self.read_n(18).expect("read the greeting");
        assert_eq!(be_u64(&b[0..8]), NBDMAGIC, "greeting magic");
        assert_eq!(be_u64(&b[8..16]), IHAVEOPT, "greeting IHAVEOPT");
        let flags = u16::from_be_bytes([b[16], b[17]]);
        assert!(flags & 1 != 0, "server is not fixed newstyle: {flags:#x}");
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&u32_of(data.len()).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// One option reply: (option, reply type, data).
    fn opt_reply(&mut self) -> io::Result<(u32, u32, Vec<u8>)> {
        let h = self.read_n(20)?;
        assert_eq!(be_u64(&h[0..8]), OPT_REPLY_MAGIC, "option reply magic");
        let opt = be_u32(&h[8..12]);
        let typ = be_u32(&h[12..16]);
        let len = be_u32(&h[16..20]);
        assert!(len < 1 << 20, "option reply of {len} bytes");
        let data = self.read_n(len as usize)?;
        Ok((opt, typ, data))
    }

    /// NBD_OPT_GO for `name`: the export size, or the error reply type.
    fn go(&mut self, name: &[u8]) -> Result<u64, u32> {
        let mut d = u32_of(name.len()).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_opt(OPT_GO, &d).expect("send NBD_OPT_GO");
        let mut size = None;
        loop {
            let (opt, typ, data) = self.opt_reply().expect("reply to NBD_OPT_GO");
            assert_eq!(opt, OPT_GO, "reply names another option");
            match typ {
                REP_INFO => {
                    if data.len() >= 12 && data[0..2] == [0, 0] {
                        size = Some(be_u64(&data[2..10]));
                    }
                }
                REP_ACK => return Ok(size.expect("NBD_INFO_EXPORT before the ACK")),
                t if t & 0x8000_0000 != 0 => return Err(t),
                t => panic!("unexpected reply type {t:#x} to NBD_OPT_GO"),
            }
        }
    }

    /// Send one request header (and its payload) in one write.
    fn request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b)
    }

    /// One simple reply: (cookie, errno).
    fn reply(&mut self) -> io::Result<(u64, u32)> {
        let h = self.read_n(16)?;
        assert_eq!(be_u32(&h[0..4]), SIMPLE_REPLY_MAGIC, "simple reply magic");
        Ok((be_u64(&h[8..16]), be_u32(&h[4..8])))
    }

    /// WRITE and wait for its reply; the errno (0 = acknowledged).
    fn write_at(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(CMD_WRITE, 0, cookie, offset, u32_of(data.len()), data)
            .expect("send WRITE");
        let (c, errno) = self.reply().expect("reply to WRITE");
        assert_eq!(c, cookie, "reply cookie");
        errno
    }

    /// READ and wait for its reply: the data, or the errno.
    fn read_at(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, cookie, offset, len, &[]).expect("send READ");
        let (c, errno) = self.reply().expect("reply to READ");
        assert_eq!(c, cookie, "reply cookie");
        if errno != 0 {
            return Err(errno);
        }
        Ok(self.read_n(len as usize).expect("READ data"))
    }

    fn flush(&mut self, cookie: u64) -> u32 {
        self.request(CMD_FLUSH, 0, cookie, 0, 0, &[]).expect("send FLUSH");
        let (c, errno) = self.reply().expect("reply to FLUSH");
        assert_eq!(c, cookie, "reply cookie");
        errno
    }

    fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, 0, &[]);
    }

    /// True if the server closes the connection within `t` (anything it
    /// sends meanwhile is read and dropped).
    fn closed_within(&mut self, t: Duration) -> bool {
        let end = Instant::now() + t;
        let mut buf = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.s.set_read_timeout(Some(left)).expect("timeout");
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return false,
                Err(_) => return true,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// A temp dir holding a sparse disk of `size` bytes and its pre-protection
/// copy (all zeros), plus the paths for the agent's state and socket.
fn fresh_disk(tag: &str, size: u64) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = tmpdir(tag);
    let disk = dir.path().join("disk.img");
    let pre = dir.path().join("pre.img");
    let state = dir.path().join("state");
    let sock = dir.path().join("nbd.sock");
    sparse_file(&disk, size);
    sparse_file(&pre, size);
    (dir, disk, pre, state, sock)
}

fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tm-faults-{tag}-"))
        .tempdir_in("/tmp")
        .expect("tempdir under /tmp")
}

/// Seed from TIDEMARK_FAULT_SEED, else random; printed so a failure can be replayed.
fn seed(test: &str) -> u64 {
    let s = std::env::var("TIDEMARK_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{test}: TIDEMARK_FAULT_SEED={s}");
    s
}

/// One record of `tidemark journal dump --json`.
#[derive(Debug, Clone)]
struct Rec {
    seq: u64,
    kind: String,
    offset: u64,
    length: u64,
}

fn dump(state: &Path) -> Vec<Rec> {
    let out = run_ok(
        Command::new(bin("tidemark"))
            .args(["journal", "dump", "--json", "--state"])
            .arg(state),
        Duration::from_secs(60),
    );
    let text = String::from_utf8(out.stdout).expect("dump is UTF-8");
    let recs: Vec<Rec> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("dump line {l:?}: {e}"));
            Rec {
                seq: v["seq"].as_u64().expect("seq"),
                kind: v["kind"].as_str().expect("kind").to_string(),
                offset: v["offset"].as_u64().expect("offset"),
                length: v["length"].as_u64().expect("length"),
            }
        })
        .collect();
    for w in recs.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "journal dump: seq gap or disorder: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    if let Some(r) = recs.first() {
        assert_eq!(r.seq, 1, "journal dump starts at seq {}", r.seq);
    }
    recs
}

/// The agent's log from byte `from` on.
fn log_since(agent: &Agent, from: usize) -> String {
    let t = agent.log_text();
    t.get(from..).unwrap_or("").to_string()
}

fn log_len(state: &Path) -> usize {
    fs::metadata(state.with_extension("log")).map_or(0, |m| usize_of(m.len()))
}

fn assert_alive(agent: &mut Agent, what: &str) {
    let st = agent.child.try_wait().expect("try_wait");
    assert!(
        st.is_none(),
        "agent died ({st:?}) after {what}; log:\n{}",
        agent.log_text()
    );
}

fn assert_no_panic(agent: &Agent) {
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "the agent panicked; log:\n{log}");
}

/// A fresh qemu-io on its own connection writes a pattern and reads it back.
fn qemu_io_roundtrip(agent: &Agent, pattern: u8, offset: u64) {
    let out = run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {offset} 64k"),
            "-c",
            &format!("read -P {pattern} {offset} 64k"),
            &agent.uri(),
        ]),
        Duration::from_secs(30),
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        s.contains("wrote 65536/65536") && s.contains("read 65536/65536") && !s.contains("fail"),
        "qemu-io round trip at {offset} failed:\n{s}{e}"
    );
}

/// Copy `pre`, replay the whole journal onto the copy, return the copy's path.
fn replay_copy(state: &Path, pre: &Path, upto: Option<u64>) -> PathBuf {
    let copy = pre.with_extension("replay");
    let _ = fs::remove_file(&copy);
    run_ok(
        Command::new("cp").arg("--sparse=always").arg(pre).arg(&copy),
        Duration::from_secs(60),
    );
    let mut cmd = Command::new(bin("tidemark"));
    cmd.args(["journal", "replay", "--state"])
        .arg(state)
        .arg("--onto")
        .arg(&copy);
    if let Some(u) = upto {
        cmd.arg("--upto").arg(u.to_string());
    }
    run_ok(&mut cmd, Duration::from_secs(120));
    copy
}

fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    b
}

/// Deterministic bytes for a test write (never all zeros).
fn fill(len: usize, tag: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Wait up to `t` for a child to exit, without killing it.
fn wait_exit(child: &mut Child, t: Duration) -> bool {
    let end = Instant::now() + t;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Wait for a child with a deadline; kill it past the deadline.
fn wait_or_kill(child: &mut Child, t: Duration) -> bool {
    let end = Instant::now() + t;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return true;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// 1. kill -9 under load
// ---------------------------------------------------------------------------

const CRASH_DISK: u64 = 64 << 20;
/// fio writes [0, FIO_SIZE); the observing client writes the rest.
const FIO_SIZE: u64 = 32 << 20;
const BLOCK: usize = 4096;
const CLIENT_BASE: u64 = FIO_SIZE;
const CLIENT_BLOCKS: u64 = (CRASH_DISK - FIO_SIZE) / BLOCK as u64;
const CLIENT_QD: usize = 8;
const CRASH_ROUNDS: u64 = 10;

/// The bytes the client writes for write `id` to `block`: every 16 bytes
/// hold the id and the block, so a block read back names its write.
fn block_pattern(block: u64, id: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    for k in 0..(BLOCK / 16) as u64 {
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&((block << 16) | k).to_le_bytes());
    }
    v
}

/// Which write a block holds (0 = never written), or why it is neither.
fn decode_block(block: u64, b: &[u8]) -> Result<u64, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let id = le_u64(&b[0..8]);
    if b == block_pattern(block, id).as_slice() {
        Ok(id)
    } else {
        let bad = (0..BLOCK / 16)
            .find(|k| b[k * 16..k * 16 + 16] != block_pattern(block, id)[k * 16..k * 16 + 16])
            .unwrap_or(0);
        Err(format!(
            "block {block} is torn or foreign: starts as write {id:#x}, differs from byte {}",
            bad * 16
        ))
    }
}

/// What one client run saw before the agent died.
#[derive(Default)]
struct ClientRun {
    /// (block, write id) acknowledged, in acknowledgement order.
    acked: Vec<(u64, u64)>,
    /// Sent (or being sent) but never acknowledged.
    unacked: Vec<(u64, u64)>,
    /// Error replies or protocol surprises (must stay empty).
    errors: Vec<String>,
}

/// Pipelined 4 KiB writes to random blocks (never two in flight to one
/// block, so the order of writes to a block is the order of their acks)
/// until the connection dies.
fn crash_client(sock: &Path, round: u64, seed: u64) -> ClientRun {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut run = ClientRun::default();
    let (mut c, size) = Conn::nbd(sock);
    assert_eq!(size, CRASH_DISK);
    let mut inflight: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let mut counter: u64 = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    'run: loop {
        while inflight.len() < CLIENT_QD && Instant::now() < deadline {
            let block = loop {
                let b = rng.gen_range(0..CLIENT_BLOCKS);
                if !busy.contains(&b) {
                    break b;
                }
            };
            counter += 1;
            let id = (round << 32) | counter;
            inflight.insert(counter, (block, id));
            busy.insert(block);
            let data = block_pattern(block, id);
            let off = CLIENT_BASE + block * BLOCK as u64;
            if c.request(CMD_WRITE, 0, counter, off, u32_of(BLOCK), &data).is_err() {
                break 'run;
            }
        }
        if inflight.is_empty() {
            break;
        }
        match c.reply() {
            Ok((cookie, errno)) => {
                let Some((b, id)) = inflight.remove(&cookie) else {
                    run.errors.push(format!("reply for unknown cookie {cookie}"));
                    break;
                };
                busy.remove(&b);
                if errno == 0 {
                    run.acked.push((b, id));
                    // At most ~16k writes/s: leave fio its share of two cores.
                    if run.acked.len() % 16 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                } else {
                    run.errors.push(format!("write to block {b} failed with errno {errno}"));
                }
            }
            Err(_) => break,
        }
    }
    run.unacked = inflight.into_values().collect();
    run
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves nothing running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_fio(agent: &Agent, round: u64) -> KillOnDrop {
    // --thread: jobs run as threads of this one process, so killing it
    // stops them all (a forked job process would outlive the kill).
    let child = Command::new("fio")
        .arg(format!("--name=crash{round}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", agent.uri()))
        .args([
            "--thread",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--time_based",
            "--runtime=5",
            "--offset=0",
        ])
        .arg(format!("--size={FIO_SIZE}"))
        // Bounded so the journal (replayed after every round) stays small.
        .arg("--rate=64m")
        .arg(format!("--randseed={round}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio");
    KillOnDrop(child)
}

/// kill -9 the agent at random moments while fio and an observing client
/// write; after each restart every acknowledged write must be in the
/// journal, in the replayed image and on the disk.
#[test]
fn crash_kill9_under_fio_loses_no_acknowledged_write() {
    need_tool("fio");
    need_tool("qemu-img");
    let t0 = Instant::now();
    let seed = seed("crash_kill9_under_fio_loses_no_acknowledged_write");
    let mut rng = StdRng::seed_from_u64(seed);
    let (_dir, disk, pre, state, sock) = fresh_disk("crash", CRASH_DISK);
    let nblocks = usize_of(CLIENT_BLOCKS);
    // For each block, the writes it may hold (0 = never written).
    let mut possible: Vec<HashSet<u64>> = vec![HashSet::from([0]); nblocks];
    let mut acked_total = vec![0u64; nblocks];
    let mut sent_total = vec![0u64; nblocks];
    let extra = ["--journal-cap", "4G"];
    let mut agent = Agent::start(&disk, &state, &sock, &extra);
    let mut rounds_with_acks = 0;
    let mut fio_records_before = 0;
    let mut rounds_with_fio = 0;
    for round in 1..=CRASH_ROUNDS {
        let mut fio = spawn_fio(&agent, round);
        // fio takes a few hundred ms to start: wait for its first write, so
        // that the random delay below falls in the middle of its run.
        let writes_before = agent.status()["writes"].as_u64().expect("writes");
        let start = Instant::now();
        while agent.status()["writes"].as_u64().expect("writes") == writes_before {
            assert!(
                fio.0.try_wait().expect("try_wait").is_none(),
                "round {round}: fio exited before writing"
            );
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "round {round}: fio wrote nothing in 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = {
            let sock = sock.clone();
            let s = seed ^ round.wrapping_mul(0x1000_0001);
            std::thread::spawn(move || crash_client(&sock, round, s))
        };
        let delay = rng.gen_range(50..=500);
        std::thread::sleep(Duration::from_millis(delay));
        let log_at = log_len(&state);
        agent.kill9();
        // fio fails once the server is gone (its exit status does not
        // matter). fio 3.33's nbd engine sometimes spins forever on
        // "nbd_poll: nothing to poll for in state DEAD" instead of
        // exiting, so it gets a few seconds and is then killed.
        wait_or_kill(&mut fio.0, Duration::from_secs(3));
        let run = client.join().expect("client thread");
        assert!(run.errors.is_empty(), "round {round}: {:?}", run.errors);

        agent = Agent::start(&disk, &state, &sock, &extra);
        let log = log_since(&agent, log_at);
        assert!(
            log.contains("last_stop=ProcessCrash") && log.contains("re-applied the journal"),
            "round {round}: restart after kill -9 not seen as a process crash:\n{log}"
        );
        assert!(!log.contains(" ERROR "), "round {round}: errors at restart:\n{log}");
        let st = agent.status();
        assert_eq!(st["mode"], "journal", "round {round}: {st}");

        // The journal holds every acknowledged write of the client.
        let recs = dump(&state);
        let mut in_journal = vec![0u64; nblocks];
        let mut fio_records = 0;
        for r in recs.iter().filter(|r| r.kind != "flush") {
            assert_eq!(r.kind, "write", "unexpected record {r:?}");
            if r.offset >= CLIENT_BASE {
                assert_eq!(r.length, BLOCK as u64, "client record {r:?}");
                in_journal[usize_of((r.offset - CLIENT_BASE) / BLOCK as u64)] += 1;
            } else {
                assert!(r.offset + r.length <= FIO_SIZE, "fio record {r:?}");
                fio_records += 1;
            }
        }
        if fio_records > fio_records_before {
            rounds_with_fio += 1;
        }
        fio_records_before = fio_records;
        for &(b, _) in &run.acked {
            acked_total[usize_of(b)] += 1;
            sent_total[usize_of(b)] += 1;
        }
        for &(b, _) in &run.unacked {
            sent_total[usize_of(b)] += 1;
        }
        for b in 0..nblocks {
            assert!(
                in_journal[b] >= acked_total[b] && in_journal[b] <= sent_total[b],
                "round {round}: block {b}: {} journal records, {} acknowledged and {} sent writes",
                in_journal[b],
                acked_total[b],
                sent_total[b]
            );
        }

        // Acknowledged writes are final; an unacknowledged one may or may not have landed.
        for &(b, id) in &run.acked {
            possible[usize_of(b)] = HashSet::from([id]);
        }
        for &(b, id) in &run.unacked {
            possible[usize_of(b)].insert(id);
        }

        // The replayed journal equals the disk, and both hold what was acknowledged.
        let replayed = replay_copy(&state, &pre, None);
        assert_identical(&replayed, &disk);
        let len = usize_of(CRASH_DISK - CLIENT_BASE);
        let img = read_file_at(&replayed, CLIENT_BASE, len);
        let on_disk = read_file_at(&disk, CLIENT_BASE, len);
        assert!(img == on_disk, "round {round}: replayed image and disk differ");
        for (b, poss) in possible.iter_mut().enumerate() {
            let bytes = &img[b * BLOCK..(b + 1) * BLOCK];
            let got = decode_block(b as u64, bytes).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(
                poss.contains(&got),
                "round {round}: block {b} holds write {got:#x}, expected one of {poss:x?} \
                 (the last acknowledged write, or a later unacknowledged one)"
            );
            *poss = HashSet::from([got]);
        }
        let _ = fs::remove_file(&replayed);
        if !run.acked.is_empty() {
            rounds_with_acks += 1;
        }
        eprintln!(
            "round {round}: killed after {delay} ms; client {} acked, {} in flight; journal {} records",
            run.acked.len(),
            run.unacked.len(),
            recs.len()
        );
    }
    assert_replay_matches(&state, &pre, &disk);
    agent.stop();
    assert!(
        rounds_with_acks >= CRASH_ROUNDS / 2,
        "the client got acknowledgements in only {rounds_with_acks} of {CRASH_ROUNDS} rounds"
    );
    assert_eq!(
        rounds_with_fio, CRASH_ROUNDS,
        "rounds in which fio's writes reached the journal"
    );
    eprintln!(
        "crash test: {CRASH_ROUNDS} kills, fio wrote in {rounds_with_fio} rounds, {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. Journal cap → bitmap mode
// ---------------------------------------------------------------------------

/// A parsed STATE/dirty.bitmap.
struct Bitmap {
    granularity: u64,
    bits: Vec<u8>,
}

impl Bitmap {
    fn read(path: &Path, disk_size: u64) -> Bitmap {
        let b = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(b.len() >= 64, "bitmap shorter than its header");
        assert_eq!(&b[0..8], b"TMBITMAP", "bitmap magic");
        assert_eq!(le_u32(&b[8..12]), 1, "bitmap version");
        let granularity = u64::from(le_u32(&b[12..16]));
        assert_eq!(le_u64(&b[16..24]), disk_size, "bitmap disk size");
        let nbits = le_u64(&b[24..32]);
        assert_eq!(nbits, disk_size.div_ceil(granularity), "bitmap nbits");
        let bits = b[64..].to_vec();
        assert!(bits.len() as u64 >= nbits.div_ceil(8), "bitmap bits cut short");
        Bitmap { granularity, bits }
    }

    fn is_set(&self, region: u64) -> bool {
        self.bits[usize_of(region / 8)] & (1 << (region % 8)) != 0
    }

    fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

fn regions_of(offset: u64, len: u64, g: u64) -> std::ops::RangeInclusive<u64> {
    offset / g..=(offset + len - 1) / g
}

#[test]
fn journal_cap_switches_to_bitmap_mode() {
    need_tool("qemu-img");
    const SIZE: u64 = 256 << 20;
    const G: u64 = 64 << 10;
    let (_dir, disk, pre, state, sock) = fresh_disk("cap", SIZE);
    let extra = ["--journal-cap", "8M"];
    let agent = Agent::start(&disk, &state, &sock, &extra);

    // 96 writes of mixed sizes, some crossing 64 KiB boundaries, ~18 MiB in
    // all: well past the 8 MiB cap. One at a time, so "after the cap" is a
    // suffix of this list.
    let lens: [u64; 5] = [4 << 10, 100 << 10, 256 << 10, (64 << 10) + 512, 512 << 10];
    let writes: Vec<(u64, u64)> = (0..96u64)
        .map(|i| (i * (5 << 19) + (i % 7) * (12 << 10), lens[usize_of(i % 5)]))
        .collect();
    let (mut c, size) = Conn::nbd(&sock);
    assert_eq!(size, SIZE);
    for (i, &(off, len)) in writes.iter().enumerate() {
        let errno = c.write_at(i as u64, off, &fill(usize_of(len), i as u64));
        assert_eq!(errno, 0, "write {i} ({off}+{len}) failed");
    }
    // WRITE_ZEROES and TRIM past the cap (each over data written first, in
    // gaps no write above touches) are tracked too.
    let zero_at = (80 * (5 << 19)) + (1 << 20) + 4096;
    let trim_at = (84 * (5 << 19)) + (1 << 20);
    let others: [(u16, u64, u64); 2] = [
        (CMD_WRITE_ZEROES, zero_at, 200 << 10),
        (CMD_TRIM, trim_at, (64 << 10) + 512),
    ];
    for (k, &(typ, off, len)) in others.iter().enumerate() {
        assert_eq!(c.write_at(500, off, &fill(usize_of(len), 500)), 0);
        let cookie = 600 + k as u64;
        c.request(typ, 0, cookie, off, u32::try_from(len).expect("len"), &[])
            .expect("send");
        assert_eq!(
            c.reply().expect("reply"),
            (cookie, 0),
            "command {typ} at {off}+{len} in bitmap mode"
        );
    }
    assert_eq!(c.flush(1000), 0, "flush in bitmap mode");
    c.disconnect();

    let st = agent.status();
    assert_eq!(st["mode"], "bitmap", "status: {st}");
    assert_eq!(st["bitmap_granularity_bytes"], G, "status: {st}");
    let log = agent.log_text();
    assert!(
        log.contains("mode journal -> bitmap"),
        "the log does not say the agent switched to bitmap mode:\n{log}"
    );

    // The journal holds a prefix of the writes; the rest are in the bitmap.
    let all = dump(&state);
    let recs: Vec<&Rec> = all.iter().filter(|r| r.kind == "write").collect();
    assert_eq!(recs.len(), all.len(), "only writes before the cap: {all:?}");
    let journaled = recs.len();
    assert!(
        journaled > 0 && journaled < writes.len(),
        "{journaled} of {} writes journaled: the cap was not reached where expected",
        writes.len()
    );
    for (r, &(off, len)) in recs.iter().zip(&writes) {
        assert_eq!((r.offset, r.length), (off, len), "journal record {r:?}");
    }
    assert_eq!(st["last_seq"], journaled as u64, "status: {st}");
    let bm = Bitmap::read(&state.join("dirty.bitmap"), SIZE);
    assert_eq!(bm.granularity, G);
    let mut want: HashSet<u64> = HashSet::new();
    for &(off, len) in &writes[journaled..] {
        for r in regions_of(off, len, G) {
            assert!(
                bm.is_set(r),
                "write {off}+{len} went past the cap but region {r} is not in the bitmap"
            );
            want.insert(r);
        }
    }
    for &(typ, off, len) in &others {
        for r in regions_of(off, len, G) {
            assert!(
                bm.is_set(r),
                "command {typ} at {off}+{len} in bitmap mode: region {r} not in the bitmap"
            );
            want.insert(r);
        }
        assert!(
            read_file_at(&disk, off, usize_of(len)).iter().all(|&x| x == 0),
            "command {typ} at {off}+{len} did not zero the disk"
        );
    }
    assert_eq!(
        bm.count(),
        want.len() as u64,
        "bitmap marks regions no write past the cap touched"
    );
    assert_eq!(st["bitmap_dirty_regions"], want.len() as u64, "status: {st}");

    // Every write reached the disk; outside the dirty regions the disk
    // equals the replayed journal.
    for (i, &(off, len)) in writes.iter().enumerate() {
        assert!(
            read_file_at(&disk, off, usize_of(len)) == fill(usize_of(len), i as u64),
            "write {i} ({off}+{len}) is not on the disk"
        );
    }
    let check_journal_plus_bitmap = |bm: &Bitmap| {
        let replayed = replay_copy(&state, &pre, None);
        let a = fs::read(&replayed).expect("read replayed image");
        let b = fs::read(&disk).expect("read disk");
        for r in 0..SIZE / G {
            let span = usize_of(r * G)..usize_of((r + 1) * G);
            assert!(
                bm.is_set(r) || a[span.clone()] == b[span],
                "region {r} differs between disk and journal but is not in the bitmap"
            );
        }
        let _ = fs::remove_file(&replayed);
    };
    check_journal_plus_bitmap(&bm);

    // The mode survives a clean restart...
    agent.stop();
    let at = log_len(&state);
    let agent = Agent::start(&disk, &state, &sock, &extra);
    let st2 = agent.status();
    assert_eq!(st2["mode"], "bitmap", "after restart: {st2}");
    assert_eq!(st2["bitmap_dirty_regions"], want.len() as u64, "after restart: {st2}");
    let log = log_since(&agent, at);
    assert!(
        log.contains("starting in bitmap mode"),
        "restart log does not mention bitmap mode:\n{log}"
    );
    // ...and new writes still go to the bitmap, not the journal.
    let (mut c, _) = Conn::nbd(&sock);
    let extra_write = (SIZE - (1 << 20), 8192u64);
    assert_eq!(c.write_at(1, extra_write.0, &fill(8192, 999)), 0);
    c.disconnect();
    let st3 = agent.status();
    assert_eq!(st3["last_seq"], journaled as u64, "a bitmap-mode write was journaled");
    want.insert(extra_write.0 / G);
    assert_eq!(st3["bitmap_dirty_regions"], want.len() as u64, "{st3}");

    // ...and a crash.
    let at = log_len(&state);
    agent.kill9();
    let agent = Agent::start(&disk, &state, &sock, &extra);
    let st4 = agent.status();
    assert_eq!(st4["mode"], "bitmap", "after kill -9: {st4}");
    let log = log_since(&agent, at);
    assert!(log.contains("last_stop=ProcessCrash"), "{log}");
    let bm = Bitmap::read(&state.join("dirty.bitmap"), SIZE);
    assert_eq!(bm.count(), want.len() as u64);
    for r in &want {
        assert!(bm.is_set(*r), "region {r} lost from the bitmap after kill -9");
    }
    check_journal_plus_bitmap(&bm);
    assert!(
        read_file_at(&disk, extra_write.0, 8192) == fill(8192, 999),
        "the bitmap-mode write before kill -9 is not on the disk"
    );
    agent.stop();
}

// ---------------------------------------------------------------------------
// 3. Malformed NBD input
// ---------------------------------------------------------------------------

/// After each piece of bad input: the agent lives and a fresh qemu-io on
/// another connection reads and writes correctly.
struct BadInput {
    agent: Agent,
    sock: PathBuf,
    size: u64,
    step: u8,
}

impl BadInput {
    fn check(&mut self, what: &str) {
        assert_alive(&mut self.agent, what);
        self.step += 1;
        // Patterns 1.. at distinct 64 KiB slots near the start of the disk.
        qemu_io_roundtrip(&self.agent, self.step, u64::from(self.step) * (64 << 10));
        assert_alive(&mut self.agent, what);
    }

    fn conn(&self) -> Conn {
        Conn::open(&self.sock)
    }

    /// A connection past the handshake.
    fn nbd(&self) -> Conn {
        let (c, size) = Conn::nbd(&self.sock);
        assert_eq!(size, self.size);
        c
    }
}

/// The server answers `cookie` with an error, or (when `may_close`) hangs up.
/// Returns true if the connection is still usable.
fn expect_error_or_close(c: &mut Conn, cookie: u64, allowed: &[u32], may_close: bool, what: &str) -> bool {
    match c.reply() {
        Ok((got, errno)) => {
            assert_eq!(got, cookie, "{what}: reply cookie");
            assert!(
                allowed.contains(&errno),
                "{what}: errno {errno}, expected one of {allowed:?}"
            );
            eprintln!("{what}: error reply, errno {errno}");
            true
        }
        Err(e) => {
            assert!(may_close, "{what}: no reply ({e})");
            eprintln!("{what}: connection closed without a reply ({e})");
            false
        }
    }
}

#[test]
fn bad_nbd_input_gets_errors_and_the_agent_survives() {
    need_tool("qemu-io");
    need_tool("qemu-img");
    const SIZE: u64 = 64 << 20;
    let (_dir, disk, pre, state, sock) = fresh_disk("badinput", SIZE);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let mut t = BadInput {
        agent,
        sock: sock.clone(),
        size: SIZE,
        step: 0,
    };
    t.check("start");

    // Connect and leave at once.
    drop(t.conn());
    t.check("an immediate disconnect");

    // Garbage instead of the client flags.
    let mut c = t.conn();
    c.greeting();
    let _ = c.send(&[0xa5; 256]);
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "garbage client flags: connection left open"
    );
    t.check("garbage instead of the handshake");

    // Valid flags, then garbage instead of an option.
    let mut c = t.conn();
    c.greeting();
    c.send(&3u32.to_be_bytes()).expect("flags");
    let _ = c.send(&fill(64, 7));
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "garbage option: connection left open"
    );
    t.check("garbage instead of an option");

    // Half an option header, then gone.
    let mut c = t.conn();
    c.greeting();
    c.send(&3u32.to_be_bytes()).expect("flags");
    c.send(&IHAVEOPT.to_be_bytes()[..6]).expect("half a header");
    drop(c);
    t.check("a disconnect in the middle of an option");

    // Unknown option: NBD_REP_ERR_UNSUP, and haggling goes on.
    let mut c = t.conn();
    c.greeting();
    c.send(&3u32.to_be_bytes()).expect("flags");
    c.send_opt(0x7777, b"hello").expect("unknown option");
    let (opt, typ, _) = c.opt_reply().expect("reply to an unknown option");
    assert_eq!((opt, typ), (0x7777, REP_ERR_UNSUP), "unknown option: reply {typ:#x}");
    // NBD_OPT_GO for an unknown export: NBD_REP_ERR_UNKNOWN, haggling goes on.
    assert_eq!(
        c.go(b"no-such-export"),
        Err(REP_ERR_UNKNOWN),
        "GO for an unknown export"
    );
    let size = c.go(b"").expect("GO for the default export after errors");
    assert_eq!(size, SIZE);
    assert!(c.read_at(1, 0, 4096).is_ok(), "read after option errors");
    c.disconnect();
    t.check("an unknown option and an unknown export");

    // An option too large to be honest: NBD_REP_ERR_TOO_BIG and/or a hang-up.
    let mut c = t.conn();
    c.greeting();
    c.send(&3u32.to_be_bytes()).expect("flags");
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&0x7777u32.to_be_bytes());
    h.extend_from_slice(&(16u32 << 20).to_be_bytes());
    c.send(&h).expect("huge option header");
    if let Ok((_, typ, _)) = c.opt_reply() {
        assert_eq!(typ, REP_ERR_TOO_BIG, "huge option: reply {typ:#x}");
    }
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "huge option: connection left open"
    );
    t.check("a 16 MiB option");

    // Transmission phase: unknown command type → EINVAL, connection goes on.
    let mut c = t.nbd();
    c.request(42, 0, 7, 0, 4096, &[]).expect("unknown command");
    assert!(expect_error_or_close(&mut c, 7, &[EINVAL], false, "unknown command"));
    assert!(c.read_at(8, 0, 4096).is_ok(), "read after an unknown command");
    // Unknown command flag.
    c.request(CMD_READ, 1 << 7, 9, 0, 4096, &[]).expect("bad flag");
    assert!(expect_error_or_close(&mut c, 9, &[EINVAL], false, "unknown flag"));
    // Unaligned (the export's minimum block is 512).
    c.request(CMD_READ, 0, 10, 1, 4096, &[]).expect("unaligned read");
    assert!(expect_error_or_close(&mut c, 10, &[EINVAL], false, "unaligned read"));
    // Beyond the end.
    assert_eq!(c.read_at(11, SIZE, 4096), Err(EINVAL), "read at the end");
    assert_eq!(c.read_at(12, SIZE - 2048, 4096), Err(EINVAL), "read across the end");
    let errno = c.write_at(13, SIZE - 2048, &fill(4096, 13));
    assert!([ENOSPC, EINVAL].contains(&errno), "write across the end: errno {errno}");
    let errno = c.write_at(14, SIZE, &fill(4096, 14));
    assert!([ENOSPC, EINVAL].contains(&errno), "write at the end: errno {errno}");
    let errno = c.write_at(15, u64::MAX - 1023, &fill(4096, 15));
    assert!([ENOSPC, EINVAL].contains(&errno), "write at u64::MAX: errno {errno}");
    assert_eq!(c.read_at(16, u64::MAX - 1023, 4096), Err(EINVAL), "read at u64::MAX");
    let data = c.read_at(17, SIZE - 4096, 4096).expect("read the last block");
    assert_eq!(data, vec![0u8; 4096]);
    c.disconnect();
    t.check("unknown commands and out-of-range requests");

    // READ over 32 MiB: EINVAL (no data), or a hang-up.
    let mut c = t.nbd();
    c.request(CMD_READ, 0, 20, 0, (32 << 20) + 4096, &[])
        .expect("huge read");
    if expect_error_or_close(&mut c, 20, &[EINVAL, ENOSPC], true, "33 MiB read") {
        assert!(c.read_at(21, 0, 4096).is_ok(), "read after a refused huge read");
        c.disconnect();
    }
    t.check("a READ over 32 MiB");

    // WRITE over 32 MiB with its payload: an error (or a hang-up), never applied.
    let mut c = t.nbd();
    let big = fill((32 << 20) + 4096, 22);
    let sent = c.request(CMD_WRITE, 0, 22, 8 << 20, u32_of(big.len()), &big);
    if sent.is_ok() && expect_error_or_close(&mut c, 22, &[EINVAL, ENOSPC], true, "33 MiB write") {
        assert!(c.read_at(23, 0, 4096).is_ok(), "read after a refused huge write");
        c.disconnect();
    }
    t.check("a WRITE over 32 MiB");

    // WRITE claiming ~4 GiB, no payload: an error and a hang-up (the server
    // cannot find the next header), never a wait for 4 GiB.
    let mut c = t.nbd();
    c.request(CMD_WRITE, 0, 24, 0, 0xffff_0000, &[])
        .expect("4 GiB write header");
    let _ = expect_error_or_close(&mut c, 24, &[EINVAL, ENOSPC], true, "4 GiB write");
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "4 GiB write: connection left open"
    );
    t.check("a WRITE header claiming 4 GiB");

    // Bad request magic: hang up.
    let mut c = t.nbd();
    c.send(&fill(28, 25)).expect("garbage request");
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "bad request magic: connection left open"
    );
    t.check("a request with a bad magic");

    // A client that disconnects mid-request: header and half the payload.
    let mid_off: u64 = 16 << 20;
    let mut c = t.nbd();
    let payload = fill(64 << 10, 26);
    let mut b = Vec::new();
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&CMD_WRITE.to_be_bytes());
    b.extend_from_slice(&26u64.to_be_bytes());
    b.extend_from_slice(&mid_off.to_be_bytes());
    b.extend_from_slice(&u32_of(payload.len()).to_be_bytes());
    b.extend_from_slice(&payload[..payload.len() / 2]);
    c.send(&b).expect("half a write");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    t.check("a disconnect in the middle of a WRITE payload");

    // Nothing refused or cut short reached the journal or the disk.
    let recs: Vec<Rec> = dump(&state).into_iter().filter(|r| r.kind != "flush").collect();
    for r in &recs {
        assert!(
            r.kind == "write" && r.length == 64 << 10 && r.offset % (64 << 10) == 0 && r.offset < 1 << 20,
            "a record that only the qemu-io checks should have made: {r:?}"
        );
    }
    assert_eq!(recs.len(), usize::from(t.step), "one write record per qemu-io check");
    assert!(
        read_file_at(&disk, mid_off, 64 << 10).iter().all(|&x| x == 0),
        "the half-sent write reached the disk"
    );
    assert!(
        read_file_at(&disk, 8 << 20, 4096).iter().all(|&x| x == 0),
        "the refused 33 MiB write reached the disk"
    );
    assert_no_panic(&t.agent);
    assert_replay_matches(&state, &pre, &disk);
    t.agent.stop();
}

// ---------------------------------------------------------------------------
// 4. CLI and state-directory errors
// ---------------------------------------------------------------------------

fn agent_protect(args: &[&str]) -> Output {
    run(
        Command::new(bin("tidemark-agent")).arg("protect").args(args),
        Duration::from_secs(30),
    )
}

/// Nonzero exit and every needle in stderr.
fn expect_fail(out: &Output, needles: &[&str], what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: exited {}; stderr:\n{err}", out.status);
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks {n:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{what}: panic:\n{err}");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn cli_and_state_errors_are_clear() {
    need_tool("qemu-io");
    let dir = tmpdir("cli");
    let d = dir.path();
    let new_disk = d.join("new.img");
    let new_state = d.join("new-state");
    let new_sock = d.join("new.sock");
    let listen = format!("unix:{}", new_sock.display());
    let nothing_created = |what: &str| {
        for p in [&new_disk, &new_state, &new_sock] {
            assert!(!p.exists(), "{what}: {} was created", p.display());
        }
    };

    // Bad disk ids: refused before anything is created.
    let long = "a".repeat(65);
    for (id, needle) in [
        ("a/b", "'/'"),
        (long.as_str(), "1 to 64 characters"),
        ("", "1 to 64 characters"),
        ("..", "not allowed"),
        ("sp ace", "' '"),
    ] {
        let out = agent_protect(&[
            "--disk",
            s(&new_disk),
            "--create-size",
            "1M",
            "--state",
            s(&new_state),
            "--listen",
            &listen,
            "--disk-id",
            id,
        ]);
        expect_fail(&out, &["disk id", needle], &format!("--disk-id {id:?}"));
        nothing_created(&format!("--disk-id {id:?}"));
    }

    // Bad sizes and listen addresses: refused before anything is created.
    let out = agent_protect(&[
        "--disk",
        s(&new_disk),
        "--create-size",
        "1M",
        "--state",
        s(&new_state),
        "--listen",
        &listen,
        "--journal-cap",
        "10X",
    ]);
    expect_fail(&out, &["--journal-cap", "10X", "unknown unit"], "--journal-cap 10X");
    nothing_created("--journal-cap 10X");
    let out = agent_protect(&[
        "--disk",
        s(&new_disk),
        "--create-size",
        "lots",
        "--state",
        s(&new_state),
        "--listen",
        &listen,
    ]);
    expect_fail(&out, &["--create-size", "lots"], "--create-size lots");
    nothing_created("--create-size lots");
    for bad in [s(&new_sock), "udp:1.2.3.4:5", "unix:", "tcp:localhost"] {
        let out = agent_protect(&[
            "--disk",
            s(&new_disk),
            "--create-size",
            "1M",
            "--state",
            s(&new_state),
            "--listen",
            bad,
        ]);
        expect_fail(&out, &["listen address"], &format!("--listen {bad}"));
        nothing_created(&format!("--listen {bad}"));
    }
    let out = agent_protect(&["--disk", s(&new_disk), "--state", s(&new_state)]);
    expect_fail(&out, &["give --listen (NBD), --ublk, or both"], "no --listen");
    nothing_created("no --listen");

    // A state directory whose control socket path would be too long.
    let deep_state = d.join("s".repeat(120));
    let out = agent_protect(&[
        "--disk",
        s(&new_disk),
        "--create-size",
        "1M",
        "--state",
        s(&deep_state),
        "--listen",
        &listen,
    ]);
    expect_fail(
        &out,
        &["control socket", "shorter state directory path"],
        "long --state",
    );
    nothing_created("long --state");
    assert!(!deep_state.exists(), "long --state: the state directory was created");

    // --bench-consume recycles unacknowledged journal segments: refused
    // with a collector, before anything is created.
    let token = d.join("token");
    write_secret(&token, "secret\n");
    let out = agent_protect(&[
        "--disk",
        s(&new_disk),
        "--create-size",
        "1M",
        "--state",
        s(&new_state),
        "--listen",
        &listen,
        "--collector",
        "127.0.0.1:9",
        "--token-file",
        s(&token),
        "--insecure-plaintext",
        "--bench-consume",
    ]);
    expect_fail(
        &out,
        &["--bench-consume cannot be combined with --collector"],
        "--bench-consume with --collector",
    );
    nothing_created("--bench-consume with --collector");

    // ublk settings without --ublk, or out of range.
    for (args, needle) in [
        (&["--queues", "2"][..], "need --ublk"),
        (&["--ublk-id", "3"][..], "need --ublk"),
        (&["--ublk", "--queues", "0"][..], "--queues 0 is out of range"),
        (&["--ublk", "--depth", "5000"][..], "--depth 5000 is out of range"),
    ] {
        let mut a = vec!["--disk", s(&new_disk), "--create-size", "1M", "--state", s(&new_state)];
        a.extend_from_slice(args);
        let out = agent_protect(&a);
        expect_fail(&out, &[needle], &format!("{args:?}"));
        nothing_created(&format!("{args:?}"));
    }
    // This kernel has no ublk driver (the VM tests cover the driver): --ublk
    // fails at once, saying so, and creates nothing.
    if !Path::new("/dev/ublk-control").exists() {
        let out = agent_protect(&[
            "--disk",
            s(&new_disk),
            "--create-size",
            "1M",
            "--state",
            s(&new_state),
            "--ublk",
        ]);
        expect_fail(
            &out,
            &["/dev/ublk-control", "lacks the ublk driver"],
            "--ublk without ublk_drv",
        );
        nothing_created("--ublk without ublk_drv");
    }

    // A config file with an unknown key: the message names the key.
    let cfg = d.join("agent.toml");
    fs::write(
        &cfg,
        format!(
            "disk = \"{}\"\nstate = \"{}\"\nlisten = \"{listen}\"\ncreate_size = \"1M\"\njurnal_cap = \"1G\"\n",
            new_disk.display(),
            new_state.display()
        ),
    )
    .expect("write config");
    let out = agent_protect(&["--config", s(&cfg)]);
    expect_fail(&out, &["jurnal_cap", "agent.toml"], "config with an unknown key");
    nothing_created("config with an unknown key");
    fs::write(&cfg, "disk = [1, 2\n").expect("write config");
    let out = agent_protect(&["--config", s(&cfg)]);
    expect_fail(&out, &["agent.toml"], "malformed config");
    nothing_created("malformed config");

    // A missing disk without --create-size.
    let out = agent_protect(&["--disk", s(&new_disk), "--state", s(&new_state), "--listen", &listen]);
    expect_fail(&out, &["does not exist", "--create-size"], "missing disk");
    assert!(!new_disk.exists(), "missing disk: the disk was created");
    assert!(!new_sock.exists(), "missing disk: the socket was created");
    let _ = fs::remove_dir_all(&new_state);

    // A second agent on a running agent's state dir (same socket, too): refused,
    // and the first agent keeps serving.
    let disk = d.join("disk.img");
    let state = d.join("state");
    let sock = d.join("nbd.sock");
    sparse_file(&disk, 32 << 20);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let out = agent_protect(&[
        "--disk",
        s(&disk),
        "--state",
        s(&state),
        "--listen",
        &format!("unix:{}", sock.display()),
    ]);
    expect_fail(&out, &["in use by another tidemark-agent", s(&state)], "second agent");
    assert!(sock.exists(), "the second agent removed the first one's socket");
    assert!(
        state.join("control.sock").exists(),
        "the second agent removed the control socket"
    );
    qemu_io_roundtrip(&agent, 0x5a, 0);
    assert_eq!(agent.status()["disk_id"], "disk.img");
    agent.stop();

    // A state dir that belongs to another disk id: refused, state untouched.
    let meta_before = fs::read(state.join("disk.json")).expect("disk.json");
    let out = agent_protect(&[
        "--disk",
        s(&disk),
        "--state",
        s(&state),
        "--listen",
        &listen,
        "--disk-id",
        "other-disk",
    ]);
    expect_fail(
        &out,
        &["belongs to disk", "\"disk.img\"", "\"other-disk\""],
        "foreign state dir",
    );
    assert_eq!(fs::read(state.join("disk.json")).expect("disk.json"), meta_before);
    assert!(
        state.join("clean-shutdown").exists(),
        "foreign state dir: the clean marker was removed"
    );
    assert!(!new_sock.exists(), "foreign state dir: a socket was bound");

    // The same id on a disk of another size: refused.
    let small = d.join("small").join("disk.img");
    fs::create_dir(small.parent().expect("parent")).expect("mkdir");
    sparse_file(&small, 16 << 20);
    let out = agent_protect(&["--disk", s(&small), "--state", s(&state), "--listen", &listen]);
    expect_fail(&out, &["16777216 bytes", "33554432 bytes"], "disk of another size");
    assert!(
        state.join("clean-shutdown").exists(),
        "size mismatch: the clean marker was removed"
    );

    // And the rightful disk still starts cleanly afterwards.
    let at = log_len(&state);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let log = log_since(&agent, at);
    assert!(log.contains("last_stop=Clean"), "{log}");
    agent.stop();
}

/// Was a bug (agent, run.rs `open`): the disk was created (--create-size) before
/// the state directory's disk id is checked, so a refused start leaves a
/// new sparse disk file behind.
#[test]

fn foreign_state_dir_creates_no_disk() {
    let dir = tmpdir("bug-create");
    let d = dir.path();
    let disk = d.join("disk.img");
    let state = d.join("state");
    let sock = d.join("nbd.sock");
    sparse_file(&disk, 1 << 20);
    Agent::start(&disk, &state, &sock, &[]).stop();
    let other = d.join("other.img");
    let out = agent_protect(&[
        "--disk",
        s(&other),
        "--create-size",
        "1M",
        "--state",
        s(&state),
        "--listen",
        &format!("unix:{}", d.join("o.sock").display()),
    ]);
    expect_fail(&out, &["belongs to disk"], "foreign state dir");
    assert!(!other.exists(), "the refused start created {}", other.display());
}

/// Was a bug (agent, run.rs `open`): the state directory (with a `lock` file) was
/// created before the disk is opened, so a start refused for a missing disk
/// leaves an empty state directory behind.
#[test]

fn missing_disk_creates_no_state_dir() {
    let dir = tmpdir("bug-state");
    let d = dir.path();
    let state = d.join("state");
    let out = agent_protect(&[
        "--disk",
        s(&d.join("missing.img")),
        "--state",
        s(&state),
        "--listen",
        &format!("unix:{}", d.join("n.sock").display()),
    ]);
    expect_fail(&out, &["does not exist"], "missing disk");
    assert!(!state.exists(), "the refused start created {}", state.display());
}

// ---------------------------------------------------------------------------
// 5. Torn journal tails
// ---------------------------------------------------------------------------

/// The current (last) journal segment.
fn last_segment(state: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = fs::read_dir(state.join("journal"))
        .expect("journal dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".tmj"))
        })
        .collect();
    segs.sort();
    segs.pop().expect("a journal segment")
}

/// Walk a segment's records (64-byte segment header with first_seq at 24;
/// 80-byte record headers: "TMRC", seq at 8, payload_len at 40): (position, seq, payload_len) of each, and the end of the last.
fn scan_segment(path: &Path) -> (Vec<(u64, u64, u64)>, u64) {
    let b = fs::read(path).expect("read segment");
    assert_eq!(&b[0..8], b"TMJOURNL", "segment magic");
    let mut seq = le_u64(&b[24..32]);
    let mut pos = 64usize;
    let mut recs = Vec::new();
    while pos + 80 <= b.len() && &b[pos..pos + 4] == b"TMRC" && le_u64(&b[pos + 8..pos + 16]) == seq {
        let plen = u64::from(le_u32(&b[pos + 40..pos + 44]));
        recs.push((pos as u64, seq, plen));
        pos += 80 + usize_of(plen);
        seq += 1;
    }
    (recs, pos as u64)
}

fn write_at_file(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).expect("open segment");
    f.write_all_at(bytes, offset).expect("damage segment");
    f.sync_all().expect("sync segment");
}

#[test]
fn torn_journal_tail_is_cut_and_writes_go_on() {
    need_tool("qemu-img");
    const SIZE: u64 = 32 << 20;
    let (_dir, disk, pre, state, sock) = fresh_disk("torn", SIZE);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let (mut c, _) = Conn::nbd(&sock);
    for i in 0..5u64 {
        assert_eq!(c.write_at(i, i << 20, &fill(64 << 10, i)), 0);
    }
    c.disconnect();
    agent.stop();
    let recs = dump(&state);
    assert_eq!(recs.len(), 5);

    // (a) The last record's payload is damaged: cut off on open, reported,
    // and the next write takes its seq.
    let seg = last_segment(&state);
    let (found, end) = scan_segment(&seg);
    let &(pos, seq, plen) = found.last().expect("records in the last segment");
    assert_eq!(seq, 5, "the segment's last record is the journal's last");
    assert_eq!(end, pos + 80 + plen);
    write_at_file(&seg, pos + 80 + plen / 2, b"\xde\xad\xbe\xef");
    let at = log_len(&state);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let log = log_since(&agent, at);
    assert!(
        log.contains("torn tail") && log.contains("seq 5"),
        "damaged last payload not reported as a torn tail:\n{log}"
    );
    let after = dump(&state);
    assert_eq!(after.len(), 4, "the damaged record is still in the journal: {after:?}");
    assert_eq!(agent.status()["next_seq"], 5);
    // Rewrite the region the cut record covered, so disk and journal agree again.
    let (mut c, _) = Conn::nbd(&sock);
    assert_eq!(c.write_at(1, 4 << 20, &fill(64 << 10, 50)), 0);
    c.disconnect();
    let after = dump(&state);
    assert_eq!(after.last().map(|r| (r.seq, r.offset)), Some((5, 4 << 20)));
    assert_replay_matches(&state, &pre, &disk);
    agent.stop();

    // (b) A partial record: the first 40 bytes of a header for the next seq.
    let seg = last_segment(&state);
    let (found, end) = scan_segment(&seg);
    let next = found.last().expect("records").1 + 1;
    let mut partial = Vec::new();
    partial.extend_from_slice(b"TMRC");
    partial.extend_from_slice(&[1, 1, 0, 0]);
    partial.extend_from_slice(&next.to_le_bytes());
    partial.extend_from_slice(&fill(24, 51));
    write_at_file(&seg, end, &partial);
    let at = log_len(&state);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let log = log_since(&agent, at);
    assert!(
        log.contains("torn tail") && log.contains(&format!("seq {next}")),
        "partial record header not reported as a torn tail:\n{log}"
    );
    assert_eq!(dump(&state).len() as u64, next - 1);
    let (mut c, _) = Conn::nbd(&sock);
    assert_eq!(c.write_at(1, 6 << 20, &fill(4096, 52)), 0);
    c.disconnect();
    assert_eq!(dump(&state).last().map(|r| r.seq), Some(next));
    assert_replay_matches(&state, &pre, &disk);
    agent.stop();

    // (c) Garbage after the last record (not a record with the next seq:
    // indistinguishable from stale bytes of a recycled segment): the agent
    // starts, keeps every record, and appends over the garbage.
    let seg = last_segment(&state);
    let (found, end) = scan_segment(&seg);
    let next = found.last().expect("records").1 + 1;
    write_at_file(&seg, end, &fill(3000, 53));
    let agent = Agent::start(&disk, &state, &sock, &[]);
    assert_eq!(dump(&state).len() as u64, next - 1);
    let (mut c, _) = Conn::nbd(&sock);
    for i in 0..3u64 {
        assert_eq!(c.write_at(i, (7 << 20) + (i << 16), &fill(512, 60 + i)), 0);
    }
    c.disconnect();
    let recs = dump(&state);
    assert_eq!(recs.last().map(|r| r.seq), Some(next + 2));
    assert_replay_matches(&state, &pre, &disk);
    // The records written over the garbage survive a restart.
    agent.kill9();
    let agent = Agent::start(&disk, &state, &sock, &[]);
    assert_eq!(dump(&state).last().map(|r| r.seq), Some(next + 2));
    assert_replay_matches(&state, &pre, &disk);
    assert_no_panic(&agent);
    agent.stop();
}

// ---------------------------------------------------------------------------
// 6. Process crash, clean stop, machine crash
// ---------------------------------------------------------------------------

#[test]
fn last_stop_is_reported_per_crash_kind() {
    need_tool("qemu-io");
    need_tool("qemu-img");
    const SIZE: u64 = 32 << 20;
    let (_dir, disk, pre, state, sock) = fresh_disk("laststop", SIZE);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    assert!(agent.log_text().contains("last_stop=FirstRun"), "{}", agent.log_text());
    for i in 0..4u8 {
        qemu_io_roundtrip(&agent, i + 1, u64::from(i) << 20);
    }

    // kill -9: a process crash, the journal is re-applied.
    let at = log_len(&state);
    agent.kill9();
    assert!(!state.join("clean-shutdown").exists());
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let log = log_since(&agent, at);
    assert!(log.contains("last_stop=ProcessCrash"), "after kill -9:\n{log}");
    let n = dump(&state).len();
    assert!(
        log.contains("re-applied the journal") && log.contains(&format!("records={n}")),
        "after kill -9, all {n} journal records should be re-applied:\n{log}"
    );
    assert!(!log.contains("machine stopped uncleanly"), "{log}");
    assert_replay_matches(&state, &pre, &disk);
    qemu_io_roundtrip(&agent, 9, 4 << 20);

    // SIGTERM: clean, nothing re-applied.
    let at = log_len(&state);
    agent.stop();
    let marker = fs::read_to_string(state.join("clean-shutdown")).expect("clean-shutdown marker");
    let next = dump(&state).last().map_or(1, |r| r.seq + 1);
    assert!(marker.contains(&format!("\"next_seq\":{next}")), "marker: {marker}");
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let log = log_since(&agent, at);
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(log.contains("last_stop=Clean"), "after SIGTERM:\n{log}");
    assert!(
        !log.contains("re-applied"),
        "journal re-applied after a clean stop:\n{log}"
    );
    assert!(!state.join("clean-shutdown").exists(), "marker left while running");
    assert_replay_matches(&state, &pre, &disk);

    // A machine crash: another boot id and no clean marker.
    agent.stop();
    fs::remove_file(state.join("clean-shutdown")).expect("remove marker");
    fs::write(state.join("boot_id"), "00000000-1111-2222-3333-444444444444\n").expect("boot_id");
    let at = log_len(&state);
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let log = log_since(&agent, at);
    assert!(log.contains("last_stop=MachineCrash"), "after a machine crash:\n{log}");
    assert!(
        log.contains("machine stopped uncleanly") && log.contains("full resync"),
        "no machine-crash warning:\n{log}"
    );
    assert!(log.contains("re-applied the journal"), "{log}");
    let boot = fs::read_to_string(state.join("boot_id")).expect("boot_id");
    let now = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(boot.trim(), now.trim(), "boot_id not updated to the current boot");
    assert_replay_matches(&state, &pre, &disk);

    // The next kill -9 is a process crash again.
    let at = log_len(&state);
    agent.kill9();
    let agent = Agent::start(&disk, &state, &sock, &[]);
    let log = log_since(&agent, at);
    assert!(log.contains("last_stop=ProcessCrash"), "{log}");
    agent.stop();
}

// ---------------------------------------------------------------------------
// Stalled clients and SIGTERM
// ---------------------------------------------------------------------------

/// A client that stalls before its flags or in the middle of a WRITE
/// payload holds a SIGTERM shutdown up only for the server's grace period
/// (5 s), after which the agent stops cleanly without the partial write.
#[test]
fn stalled_client_does_not_block_sigterm() {
    for stall in ["before the client flags", "in the middle of a WRITE payload"] {
        let dir = tmpdir("stall");
        let disk = dir.path().join("disk.img");
        let state = dir.path().join("state");
        let sock = dir.path().join("nbd.sock");
        sparse_file(&disk, 8 << 20);
        let mut agent = Agent::start(&disk, &state, &sock, &[]);
        let _held = if stall.starts_with("before") {
            let mut c = Conn::open(&sock);
            c.greeting();
            c
        } else {
            let (mut c, _) = Conn::nbd(&sock);
            let mut b = Vec::new();
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&CMD_WRITE.to_be_bytes());
            b.extend_from_slice(&1u64.to_be_bytes());
            b.extend_from_slice(&0u64.to_be_bytes());
            b.extend_from_slice(&65536u32.to_be_bytes());
            b.extend_from_slice(&[1u8; 100]);
            c.send(&b).expect("partial write");
            c
        };
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        run_ok(
            Command::new("kill").arg("-TERM").arg(agent.child.id().to_string()),
            Duration::from_secs(5),
        );
        let stopped = wait_or_kill(&mut agent.child, Duration::from_secs(20));
        assert!(
            stopped,
            "agent still running 20 s after SIGTERM with a client stalled {stall}; log:\n{}",
            agent.log_text()
        );
        let st = agent.child.wait().expect("wait");
        assert!(
            st.success(),
            "stalled {stall}: agent exited with {st}; log:\n{}",
            agent.log_text()
        );
        assert!(agent.log_text().contains("stopped cleanly"), "{}", agent.log_text());
        assert!(dump(&state).is_empty(), "stalled {stall}: something was journaled");
        eprintln!("stalled {stall}: stopped {:?} after SIGTERM", t.elapsed());
    }
}

// ---------------------------------------------------------------------------
// Bugs found here (ignored until fixed)
// ---------------------------------------------------------------------------

/// Start `tidemark-agent protect` without waiting for it (it may fail or run).
fn spawn_protect(args: &[&str], log: &Path) -> KillOnDrop {
    let logf = File::create(log).expect("create log");
    let child = Command::new(bin("tidemark-agent"))
        .arg("protect")
        .args(args)
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn tidemark-agent");
    KillOnDrop(child)
}

/// Was a bug (agent, run.rs `bind`): a second agent (other disk, other state)
/// given the --listen socket of a live agent removes that socket as
/// "stale" and binds its own: clients that connect to the path now reach
/// the other disk, and the first agent is unreachable. libs/nbd's `bind`
/// checks that a socket is dead before removing it; the agent does not.
#[test]

fn second_agent_cannot_take_over_a_live_socket() {
    let dir = tmpdir("bug-sock");
    let d = dir.path();
    let sock = d.join("nbd.sock");
    let disk_a = d.join("a.img");
    sparse_file(&disk_a, 16 << 20);
    let a = Agent::start(&disk_a, &d.join("state-a"), &sock, &[]);
    let disk_b = d.join("b.img");
    sparse_file(&disk_b, 8 << 20);
    let log_b = d.join("b.log");
    let mut b = spawn_protect(
        &[
            "--disk",
            s(&disk_b),
            "--state",
            s(&d.join("state-b")),
            "--listen",
            &format!("unix:{}", sock.display()),
        ],
        &log_b,
    );
    let exited = wait_exit(&mut b.0, Duration::from_secs(3));
    // Who answers on the path now: disk A is 16 MiB, disk B 8 MiB.
    let answers = match UnixStream::connect(&sock) {
        Err(e) => format!("nobody ({e})"),
        Ok(_) => {
            let (c, size) = Conn::nbd(&sock);
            c.disconnect();
            format!("a {size}-byte disk")
        }
    };
    drop(b);
    let log = fs::read_to_string(&log_b).unwrap_or_default();
    assert!(
        exited && answers == format!("a {}-byte disk", 16 << 20),
        "the second agent {} and {} answers on agent A's socket (A's disk is {} bytes); its log:\n{log}",
        if exited { "exited" } else { "kept running" },
        answers,
        16 << 20
    );
    a.stop();
}

/// Was a bug (agent): nothing stopped two agents (different state directories)
/// from protecting the same disk at once. Each journals only its own
/// clients' writes, so neither journal replays to the disk any more.
#[test]

fn two_agents_cannot_protect_one_disk() {
    let dir = tmpdir("bug-disk");
    let d = dir.path();
    let disk = d.join("disk.img");
    sparse_file(&disk, 8 << 20);
    let a = Agent::start(&disk, &d.join("state-a"), &d.join("a.sock"), &[]);
    let log_b = d.join("b.log");
    let mut b = spawn_protect(
        &[
            "--disk",
            s(&disk),
            "--state",
            s(&d.join("state-b")),
            "--listen",
            &format!("unix:{}", d.join("b.sock").display()),
        ],
        &log_b,
    );
    let exited = wait_exit(&mut b.0, Duration::from_secs(3));
    let log = fs::read_to_string(&log_b).unwrap_or_default();
    assert!(
        exited && !b.0.wait().expect("wait").success(),
        "a second agent protects {} while another agent does; its log:\n{log}",
        disk.display()
    );
    a.stop();
}
