//! Test harness: an in-process server on a tempdir unix socket, a raw NBD
//! client written from the spec (independent of the server's own constants),
//! and helpers to run external tools with a time limit.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tidemark_nbd::{bind, serve, Backend, FileBackend, ListenAddr};
use tokio_util::sync::CancellationToken;

// Values from the NBD protocol specification.
pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const REPLY_MAGIC: u64 = 0x3e889045565a9;
pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const SIMPLE_MAGIC: u32 = 0x67446698;
pub const STRUCTURED_MAGIC: u32 = 0x668e33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const TYPE_NONE: u16 = 0;
pub const TYPE_OFFSET_DATA: u16 = 1;
pub const TYPE_BLOCK_STATUS: u16 = 5;
pub const TYPE_ERROR: u16 = 0x8001;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub const T_READ_ONLY: u16 = 1 << 1;
pub const T_SEND_FLUSH: u16 = 1 << 2;
pub const T_SEND_FUA: u16 = 1 << 3;
pub const T_SEND_TRIM: u16 = 1 << 5;
pub const T_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// How long any single step of a test may take.
pub const STEP: Duration = Duration::from_secs(20);

/// An NBD server running on its own tokio runtime, listening on a unix
/// socket in a temporary directory. Dropping it shuts it down.
pub struct Server {
    pub dir: TempDir,
    /// The unix socket (empty for a TCP server).
    pub sock: PathBuf,
    /// What the listener is bound to (the real port for tcp:…:0).
    pub bound: ListenAddr,
    rt: Option<tokio::runtime::Runtime>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl Server {
    pub fn start<B: Backend>(backend: Arc<B>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, backend)
    }

    pub fn start_in<B: Backend>(dir: TempDir, backend: Arc<B>) -> Server {
        let sock = dir.path().join("nbd.sock");
        Self::start_on(dir, backend, ListenAddr::Unix(sock))
    }

    /// A server listening on `addr` (unix or TCP).
    pub fn start_on<B: Backend>(dir: TempDir, backend: Arc<B>, addr: ListenAddr) -> Server {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("tidemark_nbd=debug")
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(bind(&addr)).unwrap();
        let bound = listener.local_addr().unwrap();
        let sock = match &bound {
            ListenAddr::Unix(p) => p.clone(),
            ListenAddr::Tcp { .. } => PathBuf::new(),
        };
        let shutdown = CancellationToken::new();
        let task = rt.spawn(serve(listener, backend, shutdown.clone()));
        Server {
            dir,
            sock,
            bound,
            rt: Some(rt),
            shutdown,
            task: Some(task),
        }
    }

    /// A server over a sparse file of `size` bytes; returns the file's path too.
    pub fn with_file(size: u64) -> (Server, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let backend = Arc::new(FileBackend::open(&path, false).unwrap());
        (Self::start_in(dir, backend), path)
    }

    pub fn uri(&self) -> String {
        match &self.bound {
            ListenAddr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            ListenAddr::Tcp { host, port } => format!("nbd://{host}:{port}/"),
        }
    }

    pub fn connect(&self) -> Raw {
        Raw::connect(&self.sock)
    }

    /// Cancels the shutdown token and waits (bounded) for `serve` to return.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        if let (Some(rt), Some(task)) = (self.rt.as_ref(), self.task.take()) {
            let res = rt.block_on(async { tokio::time::timeout(STEP, task).await });
            let joined = res.expect("serve did not return within the time limit after shutdown");
            joined.expect("serve task panicked").expect("serve failed");
        }
        started.elapsed()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Proves the server still serves a fresh client: handshake, write, read back.
    pub fn assert_healthy(&self) {
        let mut c = self.connect();
        c.go(true, false, "");
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        c.request(0, CMD_WRITE, 101, 8192, 4096, &data);
        let (err, cookie) = c.simple_reply();
        assert_eq!((err, cookie), (0, 101));
        c.request(0, CMD_READ, 102, 8192, 4096, &[]);
        let ch = c.chunk();
        assert_eq!((ch.typ, ch.cookie), (TYPE_OFFSET_DATA, 102));
        assert_eq!(&ch.payload[8..], &data[..]);
        c.disconnect();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.rt.take() {
            if let Some(task) = self.task.take() {
                let _ = rt.block_on(async { tokio::time::timeout(STEP, task).await });
            }
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// One structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// The error value of an NBD_REPLY_TYPE_ERROR chunk.
    pub fn error(&self) -> u32 {
        assert_eq!(self.typ, TYPE_ERROR, "{self:?}");
        u32::from_be_bytes(self.payload[0..4].try_into().unwrap())
    }

    pub fn error_message(&self) -> String {
        let n = u16::from_be_bytes(self.payload[4..6].try_into().unwrap()) as usize;
        String::from_utf8_lossy(&self.payload[6..6 + n]).into_owned()
    }
}

/// A hand-written NBD client over a blocking unix socket (every read has a timeout).
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        s.set_write_timeout(Some(STEP)).unwrap();
        Raw { s }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).try_into().unwrap())
    }

    /// Reads the server greeting and returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        self.u16()
    }

    /// Greeting + client flags FIXED_NEWSTYLE | NO_ZEROES.
    pub fn start(&mut self) {
        let f = self.greeting();
        assert_eq!(f & 3, 3, "server must offer FIXED_NEWSTYLE and NO_ZEROES");
        self.send(&3u32.to_be_bytes());
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// (option, reply type, data)
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32() as usize;
        (opt, typ, self.read_n(len))
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn option_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let (_, typ, data) = self.option_reply();
            let last = typ == REP_ACK || typ & 0x8000_0000 != 0;
            v.push((typ, data));
            if last {
                return v;
            }
        }
    }

    pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// A full handshake ending in NBD_OPT_GO; returns (size, transmission flags).
    pub fn go(&mut self, structured: bool, meta: bool, name: &str) -> (u64, u16) {
        self.start();
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_replies(), vec![(REP_ACK, vec![])]);
        }
        if meta {
            self.option(OPT_SET_META_CONTEXT, &Self::meta_data(name, &["base:allocation"]));
            let r = self.option_replies();
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].0, REP_META_CONTEXT);
            assert_eq!(&r[0].1[4..], b"base:allocation");
        }
        self.option(OPT_GO, &Self::info_data(name, &[INFO_BLOCK_SIZE]));
        let mut size_flags = None;
        for (typ, data) in self.option_replies() {
            match typ {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    assert_eq!(data.len(), 12);
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    size_flags = Some((size, flags));
                }
                REP_INFO => {}
                REP_ACK => {}
                other => panic!("unexpected reply {other:#x} to NBD_OPT_GO"),
            }
        }
        size_flags.expect("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
    }

    pub fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// A simple reply without data: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_MAGIC);
        let err = self.u32();
        (err, self.u64())
    }

    pub fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32(), STRUCTURED_MAGIC);
        let flags = self.u16();
        let typ = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        Chunk {
            flags,
            typ,
            cookie,
            payload: self.read_n(len),
        }
    }

    /// The next reply, simple or structured, as (error, cookie); reads any data
    /// chunk payload but not simple-reply READ data.
    pub fn any_reply(&mut self) -> (u32, u64) {
        let magic = self.u32();
        if magic == SIMPLE_MAGIC {
            let err = self.u32();
            return (err, self.u64());
        }
        assert_eq!(magic, STRUCTURED_MAGIC);
        let _flags = self.u16();
        let typ = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        let payload = self.read_n(len);
        let err = if typ & 0x8000 != 0 {
            u32::from_be_bytes(payload[0..4].try_into().unwrap())
        } else {
            0
        };
        (err, cookie)
    }

    pub fn disconnect(&mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
        self.expect_closed();
    }

    /// The server closes the connection: EOF (or a reset) within the time limit.
    pub fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + STEP;
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {
                    assert!(Instant::now() < deadline, "server kept sending instead of closing");
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close the connection, got {e}"),
            }
        }
    }
}

/// Fails the test with a clear message if `tool` is not installed.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}` (Debian package {package}), which is not in PATH; install it"
    );
}

/// Runs a command with a time limit; kills it and fails the test on timeout.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let deadline = Instant::now() + limit;
    // Drain pipes on threads so a chatty tool cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Like [`run`], and fails the test with the tool's output unless it succeeded.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let o = run(cmd, limit);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{desc} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
