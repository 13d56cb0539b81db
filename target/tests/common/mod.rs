//! A fake collector speaking real frames over loopback TCP to a target run
//! in-process, and a reference disk to compare the replica with.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tidemark_target::{Config, Target};
use tidemark_wire::frame::{ErrorCode, Frame, Hello, Lineage, Request, Role, TargetState, PROTOCOL_VERSION};
use tidemark_wire::pack::{Packer, DEFAULT_WINDOW_BLOCKS};
use tidemark_wire::record::{Record, RecordHeader, RecordKind, FLAG_FULL, FLAG_SYNC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &[u8] = b"s3cret";
pub const WAIT: Duration = Duration::from_secs(10);

/// A target serving `dir` on an ephemeral loopback port.
pub struct Running {
    pub addr: SocketAddr,
    /// The metrics endpoint (None unless the test asked for one).
    pub metrics: Option<SocketAddr>,
    pub stop: CancellationToken,
    pub task: JoinHandle<tidemark_target::Result<()>>,
}

impl Running {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, |_| {}).await
    }

    /// Start with the test defaults changed by `f`.
    pub async fn start_with(dir: &Path, f: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = Config::new("127.0.0.1:0", dir, TOKEN);
        cfg.state_interval = Duration::from_millis(300);
        cfg.hello_timeout = Duration::from_secs(2);
        f(&mut cfg);
        let t = Target::bind(cfg).await.expect("bind the target");
        let addr = t.local_addr().unwrap();
        let metrics = t.metrics_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(t.serve(stop.clone()));
        Self {
            addr,
            metrics,
            stop,
            task,
        }
    }

    /// Stop as SIGTERM would, and wait until the data directory is free.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the target stops")
            .unwrap()
            .unwrap();
    }
}

/// `GET /metrics` from the target's metrics endpoint: (status, body).
pub async fn scrape(addr: SocketAddr) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (code, body)
}

pub fn replica_path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(disk).join("replica.raw")
}

pub fn uuid(n: u8) -> [u8; 16] {
    [n; 16]
}

/// One collector → target connection.
pub struct Conn {
    pub stream: TcpStream,
    packer: Packer,
    /// Frames read while waiting for something else (Requests, states).
    pub seen: Vec<Frame>,
}

pub async fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    match tokio::time::timeout(WAIT, tidemark_net::read_frame(s, tidemark_wire::frame::MAX_BODY)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) if e.code().is_some() => panic!("a bad frame from the target: {e}"),
        Ok(Err(_)) => None,
        Err(_) => panic!("no frame within {WAIT:?}"),
    }
}

pub fn hello(disk: &str, uuid: [u8; 16], flags: u32) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Collector,
        flags,
        disk_uuid: uuid,
        disk_size: 0,
        disk_id: disk.parse().unwrap(),
        token: TOKEN.to_vec(),
        // One generation per UUID (a rebound disk is a new line of writes).
        lineage: Lineage {
            generation: uuid,
            ..Lineage::default()
        },
    }
}

/// Send raw bytes and return the first frame the target answers with.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Frame> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_frame(&mut s).await
}

/// Say `h` and expect an Error frame back.
pub async fn refused(addr: SocketAddr, h: Hello) -> (ErrorCode, String) {
    match send_raw(addr, &Frame::Hello(h).encode().unwrap()).await {
        Some(Frame::Error { code, reason }) => (code, reason),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

impl Conn {
    /// Connect and say Hello; returns the connection and the Welcome.
    pub async fn open(addr: SocketAddr, h: Hello) -> (Self, u64, u32) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&Frame::Hello(h).encode().unwrap()).await.unwrap();
        match read_frame(&mut stream).await {
            Some(Frame::Welcome { acked_seq, flags, .. }) => (
                Self {
                    stream,
                    packer: Packer::new(DEFAULT_WINDOW_BLOCKS, 3).unwrap(),
                    seen: Vec::new(),
                },
                acked_seq,
                flags,
            ),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send_packed(&mut self, records: &[Record], flags: u32) {
        let (p, _) = self.packer.pack(records, flags).unwrap();
        self.stream
            .write_all(&Frame::Packed(p).encode().unwrap())
            .await
            .unwrap();
    }

    /// The next frame (None: the target closed the connection).
    pub async fn next(&mut self) -> Option<Frame> {
        read_frame(&mut self.stream).await
    }

    /// Read until `Ack{seq}`; other frames go to `seen`.
    pub async fn ack(&mut self, seq: u64) {
        loop {
            match self.next().await {
                Some(Frame::Ack { seq: s }) if s == seq => return,
                Some(Frame::Ack { seq: s }) => panic!("ack {s}, expected {seq}"),
                Some(Frame::Error { code, reason }) => panic!("target error {code:?}: {reason}"),
                Some(f) => self.seen.push(f),
                None => panic!("connection closed while waiting for ack {seq}"),
            }
        }
    }

    /// Pack, send, wait for the ack of the last record.
    pub async fn ship(&mut self, records: &[Record]) {
        self.send_packed(records, 0).await;
        self.ack(records.last().unwrap().header.seq).await;
    }

    /// Read until a TargetState matching `f` arrives (states stream every
    /// 300 ms); returns it.
    pub async fn state_where(&mut self, f: impl Fn(&TargetState) -> bool) -> TargetState {
        let hit = self
            .seen
            .iter()
            .position(|x| matches!(x, Frame::TargetState(t) if f(t)));
        let upto = hit.map_or(self.seen.len(), |i| i + 1);
        let mut found = None;
        let mut i = 0;
        self.seen.retain(|x| {
            i += 1;
            match x {
                Frame::TargetState(t) if i <= upto => {
                    if i == upto && hit.is_some() {
                        found = Some(*t);
                    }
                    false
                }
                _ => true,
            }
        });
        if let Some(t) = found {
            return t;
        }
        loop {
            match self.next().await {
                Some(Frame::TargetState(t)) if f(&t) => return t,
                Some(Frame::TargetState(_)) => {}
                Some(Frame::Error { code, reason }) => panic!("target error {code:?}: {reason}"),
                Some(other) => self.seen.push(other),
                None => panic!("connection closed while waiting for a state"),
            }
        }
    }

    /// Every Request frame seen so far (and drop them from `seen`).
    pub fn requests(&mut self) -> Vec<Request> {
        let mut out = Vec::new();
        self.seen.retain(|f| match f {
            Frame::Request(r) => {
                out.push(*r);
                false
            }
            _ => true,
        });
        out
    }

    /// Answer the target's next `StatusNow` as a collector does: it holds
    /// up to `held` (with the agent's answer when `agent`).
    pub async fn answer_status(&mut self, held: u64, agent: bool) {
        self.answer_status_in(held, agent, tidemark_wire::frame::AgentMode::Streaming)
            .await
    }

    /// [`Conn::answer_status`] with the agent in `mode`.
    pub async fn answer_status_in(&mut self, held: u64, agent: bool, mode: tidemark_wire::frame::AgentMode) {
        loop {
            match self.next().await {
                Some(Frame::Request(Request::StatusNow { nonce })) => {
                    let p = tidemark_wire::frame::Progress {
                        source_seq: held,
                        mode,
                        sync_done: 0,
                        sync_total: 0,
                        full_resyncs: 0,
                        backlog_bytes: 0,
                        written_bytes: 0,
                        time_ns: u64::from(agent),
                        nonce,
                    };
                    self.stream
                        .write_all(&Frame::Progress(p).encode().unwrap())
                        .await
                        .unwrap();
                    return;
                }
                Some(Frame::Error { code, reason }) => panic!("target error {code:?}: {reason}"),
                Some(f) => self.seen.push(f),
                None => panic!("connection closed while waiting for StatusNow"),
            }
        }
    }

    /// Read frames for `d`, collecting them into `seen`.
    pub async fn collect_for(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while let Ok(Some(f)) = tokio::time::timeout_at(end, read_frame(&mut self.stream)).await {
            self.seen.push(f);
        }
    }
}

/// A reference disk and a record factory with consecutive seqs.
pub struct Source {
    pub disk: Vec<u8>,
    pub next_seq: u64,
    /// Source time stamped on every record made (ns; 0 unless a test sets it).
    pub time_ns: u64,
}

impl Source {
    pub fn new(first_seq: u64) -> Self {
        Self {
            disk: Vec::new(),
            next_seq: first_seq,
            time_ns: 0,
        }
    }

    /// A Tag record (`app`: FLAG_APP_CONSISTENT).
    pub fn tag(&mut self, name: &str, app: bool) -> Record {
        let seq = self.seq();
        let mut header = RecordHeader::new(RecordKind::Tag, seq, self.time_ns, 0, 0, name.as_bytes());
        header.flags = if app {
            tidemark_wire::record::FLAG_APP_CONSISTENT
        } else {
            0
        };
        Record {
            header,
            payload: name.as_bytes().to_vec(),
        }
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn grow(&mut self, end: u64) {
        let end = usize::try_from(end).unwrap();
        if self.disk.len() < end {
            self.disk.resize(end, 0);
        }
    }

    fn data(&mut self, kind: RecordKind, flags: u16, offset: u64, data: Vec<u8>) -> Record {
        let seq = self.seq();
        self.grow(offset + data.len() as u64);
        let o = usize::try_from(offset).unwrap();
        self.disk[o..o + data.len()].copy_from_slice(&data);
        let mut header = RecordHeader::new(kind, seq, self.time_ns, offset, data.len() as u64, &data);
        header.flags = flags;
        Record { header, payload: data }
    }

    pub fn write(&mut self, offset: u64, data: Vec<u8>) -> Record {
        self.data(RecordKind::Write, 0, offset, data)
    }

    pub fn sync(&mut self, offset: u64, data: Vec<u8>, full: bool) -> Record {
        self.data(RecordKind::Sync, if full { FLAG_FULL } else { 0 }, offset, data)
    }

    fn range(&mut self, kind: RecordKind, flags: u16, offset: u64, length: u64) -> Record {
        let seq = self.seq();
        self.grow(offset + length);
        let o = usize::try_from(offset).unwrap();
        self.disk[o..o + usize::try_from(length).unwrap()].fill(0);
        let mut header = RecordHeader::new(kind, seq, self.time_ns, offset, length, b"");
        header.flags = flags;
        Record {
            header,
            payload: Vec::new(),
        }
    }

    pub fn trim(&mut self, offset: u64, length: u64) -> Record {
        self.range(RecordKind::Trim, 0, offset, length)
    }

    pub fn sync_zero(&mut self, offset: u64, length: u64, full: bool) -> Record {
        self.range(
            RecordKind::Zero,
            FLAG_SYNC | if full { FLAG_FULL } else { 0 },
            offset,
            length,
        )
    }

    pub fn bare(&mut self, kind: RecordKind, flags: u16, offset: u64) -> Record {
        let seq = self.seq();
        let mut header = RecordHeader::new(kind, seq, self.time_ns, offset, 0, b"");
        header.flags = flags;
        Record {
            header,
            payload: Vec::new(),
        }
    }

    pub fn sync_done(&mut self, started_at: u64) -> Record {
        self.bare(RecordKind::SyncDone, FLAG_FULL, started_at)
    }

    /// A Write whose payload is damaged after hashing: the reference disk
    /// keeps the old bytes (the target must not apply it).
    pub fn corrupt_write(&mut self, offset: u64, data: Vec<u8>) -> Record {
        let seq = self.seq();
        let header = RecordHeader::new(RecordKind::Write, seq, 0, offset, data.len() as u64, &data);
        let mut payload = data;
        payload[0] ^= 0xff;
        Record { header, payload }
    }
}

/// Now, in ns since the Unix epoch (record source times).
#[allow(unused_imports)]
pub use tidemark_util::now_ns;

/// Deterministic, non-repeating 4 KiB-block content.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[4]
        })
        .collect()
}

pub fn assert_replica(dir: &Path, disk: &str, want: &[u8]) {
    let got = std::fs::read(replica_path(dir, disk)).unwrap();
    assert_eq!(got.len(), want.len(), "replica size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("replica differs from the source at byte {i}");
    }
}
