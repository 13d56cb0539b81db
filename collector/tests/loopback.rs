//! The collector's library entry point with a fake agent and a fake target
//! speaking frames over loopback TCP.

#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_collector::{Config, Running};
use tidemark_wire::frame::{
    AgentMode, ErrorCode, Frame, FrameHeader, Hello, Lineage, Progress, Request, Role, FRAME_HEADER_LEN,
    HELLO_FORCE_RESYNC, MAX_BODY, PACKED_GAP, PROTOCOL_VERSION, WELCOME_NEED_FULL_SYNC,
};
use tidemark_wire::pack::{MemStore, Unpacker, DEFAULT_WINDOW_BLOCKS};
use tidemark_wire::{Record, RecordHeader, RecordKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const TOKEN: &[u8] = b"sekrit";
const T: Duration = Duration::from_secs(10);

async fn send(s: &mut TcpStream, f: &Frame) {
    s.write_all(&f.encode().unwrap()).await.unwrap();
}

/// The next frame, skipping the `TargetState` frames the collector relays
/// to agents (informational: the agent stops tracking what was applied);
/// `recv_raw` sees them.
async fn recv(s: &mut TcpStream) -> Frame {
    loop {
        match recv_raw(s).await {
            // State reports, and the calls a collector makes of a target
            // it connects to (its drills): not what these tests look at.
            Frame::TargetState(_) | Frame::Call { .. } => continue,
            f => return f,
        }
    }
}

async fn recv_raw(s: &mut TcpStream) -> Frame {
    tokio::time::timeout(T, async {
        let mut hb = [0u8; FRAME_HEADER_LEN];
        s.read_exact(&mut hb).await.unwrap();
        let h = FrameHeader::parse(&hb).unwrap();
        let mut buf = vec![0u8; h.frame_len()];
        buf[..FRAME_HEADER_LEN].copy_from_slice(&hb);
        s.read_exact(&mut buf[FRAME_HEADER_LEN..]).await.unwrap();
        Frame::decode(&buf).unwrap().0
    })
    .await
    .expect("a frame within 10 s")
}

/// The next frame but a relayed `TargetState`, or None if none arrives
/// within `d` (or the peer closed).
async fn recv_within(s: &mut TcpStream, d: Duration) -> Option<Frame> {
    let until = tokio::time::Instant::now() + d;
    loop {
        match recv_within_raw(s, until.saturating_duration_since(tokio::time::Instant::now())).await {
            Some(Frame::TargetState(_) | Frame::Call { .. }) => continue,
            f => return f,
        }
    }
}

async fn recv_within_raw(s: &mut TcpStream, d: Duration) -> Option<Frame> {
    let mut hb = [0u8; FRAME_HEADER_LEN];
    match tokio::time::timeout(d, s.read_exact(&mut hb)).await {
        Ok(Ok(_)) => {}
        _ => return None,
    }
    let h = FrameHeader::parse(&hb).unwrap();
    let mut buf = vec![0u8; h.frame_len()];
    buf[..FRAME_HEADER_LEN].copy_from_slice(&hb);
    s.read_exact(&mut buf[FRAME_HEADER_LEN..]).await.unwrap();
    Some(Frame::decode(&buf).unwrap().0)
}

fn rec(seq: u64) -> Record {
    // Two 4 KiB blocks: one repeated in every record (dedup), one zero block,
    // then a block unique to the seq.
    let mut data = vec![0x42u8; 4096];
    data.extend_from_slice(&[0u8; 4096]);
    data.extend((0..4096u32).map(|i| (i as u8) ^ (seq as u8)));
    Record {
        header: RecordHeader::new(
            RecordKind::Write,
            seq,
            1_000_000 * seq,
            4096 * seq,
            data.len() as u64,
            &data,
        ),
        payload: data,
    }
}

fn progress(source_seq: u64, mode: AgentMode, nonce: u64) -> Progress {
    Progress {
        source_seq,
        mode,
        sync_done: 0,
        sync_total: 0,
        full_resyncs: 0,
        backlog_bytes: 0,
        written_bytes: 0,
        time_ns: 0,
        nonce,
    }
}

fn batch(first: u64, last: u64) -> Frame {
    Frame::Batch((first..=last).map(rec).collect())
}

fn hello(id: &str, uuid: [u8; 16]) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Agent,
        flags: 0,
        disk_uuid: uuid,
        disk_size: 0,
        disk_id: id.parse().unwrap(),
        token: TOKEN.to_vec(),
        // One generation per UUID (a rebound disk is a new line of writes).
        lineage: Lineage {
            generation: uuid,
            ..Lineage::default()
        },
    }
}

async fn connect_agent(c: &Running, h: Hello) -> (TcpStream, Frame) {
    let mut s = TcpStream::connect(c.listen_addr).await.unwrap();
    send(&mut s, &Frame::Hello(h)).await;
    let f = recv(&mut s).await;
    (s, f)
}

async fn agent(c: &Running, id: &str, uuid: [u8; 16]) -> (TcpStream, u64, u32) {
    let (s, f) = connect_agent(c, hello(id, uuid)).await;
    match f {
        Frame::Welcome { acked_seq, flags, .. } => (s, acked_seq, flags),
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// A fake target: accepts one collector session, checks its Hello,
/// welcomes it at `applied`.
struct FakeTarget {
    s: TcpStream,
    unpacker: Unpacker<MemStore>,
    hello: Hello,
}

impl FakeTarget {
    async fn accept(l: &TcpListener, applied: u64) -> Self {
        let (mut s, _) = tokio::time::timeout(T, l.accept())
            .await
            .expect("collector connects")
            .unwrap();
        let hello = match recv(&mut s).await {
            Frame::Hello(h) => h,
            other => panic!("expected hello, got {other:?}"),
        };
        assert_eq!(hello.role, Role::Collector);
        assert_eq!(hello.token, TOKEN);
        send(
            &mut s,
            &Frame::Welcome {
                acked_seq: applied,
                flags: 0,
                generation: [0; 16],
            },
        )
        .await;
        Self {
            s,
            unpacker: Unpacker::new(DEFAULT_WINDOW_BLOCKS, MemStore::default()),
            hello,
        }
    }

    /// The next Packed batch, unpacked: (flags, records).
    async fn packed(&mut self) -> (u32, Vec<Record>) {
        match recv(&mut self.s).await {
            Frame::Packed(p) => (p.flags, self.unpacker.unpack(&p).unwrap()),
            other => panic!("expected packed, got {other:?}"),
        }
    }

    async fn ack(&mut self, seq: u64) {
        send(&mut self.s, &Frame::Ack { seq }).await;
    }
}

fn cfg(spool: &Path, target: std::net::SocketAddr) -> Config {
    Config::new("127.0.0.1:0", spool, target.to_string(), "127.0.0.1:0", TOKEN)
}

async fn start(cfg: Config) -> (Running, CancellationToken) {
    tidemark_util::init_logging();
    let stop = CancellationToken::new();
    let r = tidemark_collector::start(cfg, stop.clone()).await.unwrap();
    (r, stop)
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < T, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_as(addr, method, path, None).await
}

/// `http` with `Authorization: Bearer <bearer>`.
async fn http_as(addr: std::net::SocketAddr, method: &str, path: &str, bearer: Option<&[u8]>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {}\r\n", String::from_utf8_lossy(b)))
        .unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (code, body)
}

async fn status(addr: std::net::SocketAddr) -> Value {
    let (code, body) = http(addr, "GET", "/api/v1/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spools_acks_forwards_packed_and_trims() {
    let d = tempfile::tempdir().unwrap();
    let tl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (c, stop) = start(cfg(d.path(), tl.local_addr().unwrap())).await;
    let disk_dir = d.path().join("db1");

    let (mut a, acked, flags) = agent(&c, "db1", [1; 16]).await;
    assert_eq!(acked, 0);
    assert_eq!(
        flags & WELCOME_NEED_FULL_SYNC,
        WELCOME_NEED_FULL_SYNC,
        "a new binding needs a full sync"
    );
    send(&mut a, &batch(1, 3)).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 3 });
    let files = spool_files(&disk_dir);
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("b-0000000000000001-0000000000000003.tms"));
    // A resend of what is held is dropped; the new part is spooled.
    send(&mut a, &batch(2, 5)).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 5 });
    assert_eq!(spool_files(&disk_dir).len(), 2);
    // A gap after held records is refused with the expected seq named.
    let (mut gap_agent, _) = {
        let mut x = TcpStream::connect(c.listen_addr).await.unwrap();
        send(&mut x, &Frame::Hello(hello("gapdisk", [9; 16]))).await;
        let w = recv(&mut x).await;
        (x, w)
    };
    send(&mut gap_agent, &batch(10, 11)).await;
    assert_eq!(
        recv(&mut gap_agent).await,
        Frame::Ack { seq: 11 },
        "a gap is fine when nothing is held"
    );
    send(&mut gap_agent, &batch(13, 13)).await;
    match recv(&mut gap_agent).await {
        Frame::Error { code, reason } => {
            assert_eq!(code, ErrorCode::Malformed);
            assert!(reason.contains("expected seq 12"), "{reason}");
            assert!(reason.contains("no longer holds seq 12"), "{reason}");
            assert!(reason.contains("--force-resync"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    let mut t = FakeTarget::accept(&tl, 0).await;
    assert_eq!(t.hello.disk_id, "db1");
    assert_eq!(t.hello.disk_uuid, [1; 16]);
    // The two spool files may go as one packed batch (small files are
    // merged) or as two; either way seqs 1..=5, in order, no gap flag.
    let (f1, mut got) = t.packed().await;
    assert_eq!(f1, 0);
    while got.last().map(|r| r.header.seq) != Some(5) {
        let (f, more) = t.packed().await;
        assert_eq!(f, 0);
        got.extend(more);
    }
    assert_eq!(got, (1..=5).map(rec).collect::<Vec<_>>());
    for r in &got {
        r.header.verify_payload(&r.payload).unwrap();
    }
    // The gapdisk session: starts at 10 with PACKED_GAP.
    let mut t2 = FakeTarget::accept(&tl, 0).await;
    assert_eq!(t2.hello.disk_id, "gapdisk");
    let (fg, rg) = t2.packed().await;
    assert_eq!(fg, PACKED_GAP);
    assert_eq!(rg[0].header.seq, 10);

    t.ack(3).await;
    eventually("trim of the first file", || spool_files(&disk_dir).len() == 1).await;
    t.ack(5).await;
    eventually("trim of the second file", || spool_files(&disk_dir).is_empty()).await;

    // Status and metrics.
    send(
        &mut t.s,
        &Frame::TargetState(tidemark_wire::frame::TargetState {
            applied_seq: 5,
            state: tidemark_wire::frame::ReplicaState::Consistent,
            halted_seq: 0,
            pending_bytes: 0,
        }),
    )
    .await;
    send(
        &mut a,
        &Frame::Progress(tidemark_wire::frame::Progress {
            source_seq: 5,
            mode: tidemark_wire::frame::AgentMode::Streaming,
            sync_done: 0,
            sync_total: 0,
            full_resyncs: 2,
            backlog_bytes: 0,
            written_bytes: 1000,
            time_ns: 0,
            nonce: 0,
        }),
    )
    .await;
    let mut st = Value::Null;
    let t0 = Instant::now();
    while t0.elapsed() < T {
        st = status(c.api_addr).await;
        let disk = st["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["disk_id"] == "db1")
            .unwrap();
        if disk["target_state"] == "consistent" && disk["full_resyncs"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let disk = st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["disk_id"] == "db1")
        .unwrap()
        .clone();
    assert_eq!(disk["mode"], "streaming", "{disk}");
    assert_eq!(disk["acked_seq"], 5);
    assert_eq!(disk["applied_seq"], 5);
    assert_eq!(disk["source_seq"], 5);
    assert_eq!(disk["agent_connected"], true);
    assert_eq!(disk["target_connected"], true);
    assert_eq!(disk["spool_bytes"], 0);
    assert_eq!(disk["lag_s"], 0.0);
    assert_eq!(disk["disk_uuid"], Value::Null, "no UUID for an unauthenticated caller");
    let (code, body) = http_as(c.api_addr, "GET", "/api/v1/disks/db1", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let authed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(authed["disk_uuid"], "01010101-0101-0101-0101-010101010101");
    assert_eq!(disk["zero_blocks"], 5, "one zero block per record");
    assert_eq!(disk["dedup_hits"], 4, "the repeated block after its first literal");
    assert!(disk["wire_ratio"].as_f64().unwrap() < 0.5, "{disk}");
    assert_eq!(st["collector"]["agents_connected"], 1);
    assert_eq!(st["collector"]["spool_full"], false);
    let (code, body) = http(c.api_addr, "GET", "/api/v1/disks/nope").await;
    assert_eq!(code, 404);
    assert!(body.contains("error"));
    let (code, body) = http(c.api_addr, "GET", "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("tidemark_collector_disk_applied_seq{disk=\"db1\"} 5"),
        "{body}"
    );
    assert!(body.contains("tidemark_collector_batches_spooled_total 3"), "{body}");
    // Every declared metric is exported (a disk is present).
    assert_eq!(tidemark_util::metrics::unsampled(&body), Vec::<String>::new(), "{body}");
    assert!(body.matches("# TYPE ").count() >= 25, "{body}");
    // The target's state reaches the agent (it stops tracking what was
    // applied, agent/src/unapplied.rs).
    loop {
        match recv_raw(&mut a).await {
            Frame::TargetState(ts) if ts.applied_seq == 5 => break,
            Frame::TargetState(_) => {}
            other => panic!("expected the relayed target state, got {other:?}"),
        }
    }
    // Refresh: the agent is asked for a Progress with a fresh nonce; only
    // the one echoing it answers the call.
    let api = c.api_addr;
    let refresh = tokio::spawn(async move { http(api, "POST", "/api/v1/disks/db1/refresh").await });
    let nonce = match recv(&mut a).await {
        Frame::Request(Request::StatusNow { nonce }) => nonce,
        other => panic!("expected a status request, got {other:?}"),
    };
    assert_ne!(nonce, 0);
    send(&mut a, &Frame::Progress(progress(6, AgentMode::Streaming, 0))).await;
    send(&mut a, &Frame::Progress(progress(7, AgentMode::Streaming, nonce + 1))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!refresh.is_finished(), "answered by a progress without its nonce");
    send(&mut a, &Frame::Progress(progress(8, AgentMode::Streaming, nonce))).await;
    let (code, body) = refresh.await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["source_seq"], 8, "{v}");
    assert_eq!(v["agent_mode"], "streaming", "{v}");
    // A second refresh gets another nonce.
    let refresh = tokio::spawn(async move { http(api, "POST", "/api/v1/disks/db1/refresh").await });
    match recv(&mut a).await {
        Frame::Request(Request::StatusNow { nonce: n }) => {
            assert_ne!(n, nonce);
            send(&mut a, &Frame::Progress(progress(9, AgentMode::Streaming, n))).await;
        }
        other => panic!("expected a status request, got {other:?}"),
    }
    assert_eq!(refresh.await.unwrap().0, 200);
    let (code, _) = http(api, "POST", "/api/v1/disks/gapdisk/refresh").await;
    assert_eq!(code, 503, "its agent was disconnected");

    // The target asks for a range resync: relayed to the connected agent.
    let rs = Request::Resync {
        seq: 4,
        offset: 16384,
        length: 4096,
    };
    send(&mut t.s, &Frame::Request(rs)).await;
    assert_eq!(recv(&mut a).await, Frame::Request(rs));
    // A full resync while the agent is away is owed to it at its next hello.
    drop(a);
    eventually("agent gone", || true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&mut t.s, &Frame::Request(Request::FullResync)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.cancel();
    c.wait().await.unwrap();

    // Restart: the acked seq survives an empty spool; a torn temp file is
    // deleted; the owed full resync shows in the Welcome.
    std::fs::write(disk_dir.join("b-0000000000000006-0000000000000007.tms.tmp"), b"torn").unwrap();
    let (c, stop) = start(cfg(d.path(), tl.local_addr().unwrap())).await;
    assert!(spool_files(&disk_dir).is_empty(), "torn temp file deleted");
    let (_a, acked, flags) = agent(&c, "db1", [1; 16]).await;
    assert_eq!(acked, 5);
    assert_eq!(flags, WELCOME_NEED_FULL_SYNC);
    stop.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_while_another_disk_keeps_working() {
    let d = tempfile::tempdir().unwrap();
    let tl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (c, stop) = start(cfg(d.path(), tl.local_addr().unwrap())).await;
    let (mut good, _, _) = agent(&c, "good", [7; 16]).await;
    send(&mut good, &batch(1, 1)).await;
    assert_eq!(recv(&mut good).await, Frame::Ack { seq: 1 });

    let expect_error = |f: Frame, code: ErrorCode, needle: &str| match f {
        Frame::Error { code: c, reason } => {
            assert_eq!(c, code, "{reason}");
            assert!(reason.contains(needle), "{reason:?} should mention {needle:?}");
        }
        other => panic!("expected an error, got {other:?}"),
    };
    let mut h = hello("other", [8; 16]);
    h.token = b"wrong".to_vec();
    expect_error(connect_agent(&c, h).await.1, ErrorCode::BadToken, "token");
    let mut h = hello("other", [8; 16]);
    h.protocol = 99;
    expect_error(connect_agent(&c, h).await.1, ErrorCode::UnsupportedVersion, "99");
    let mut h = hello("other", [8; 16]);
    h.role = Role::Collector;
    expect_error(connect_agent(&c, h).await.1, ErrorCode::Malformed, "role");
    expect_error(
        connect_agent(&c, hello("good", [6; 16])).await.1,
        ErrorCode::DiskMismatch,
        "bound to uuid",
    );
    expect_error(
        connect_agent(&c, hello("good", [7; 16])).await.1,
        ErrorCode::Busy,
        "live agent",
    );

    // Garbage instead of a frame.
    let mut g = TcpStream::connect(c.listen_addr).await.unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    expect_error(recv(&mut g).await, ErrorCode::Malformed, "magic");
    // A header announcing a body larger than a hello may be.
    let mut big = Frame::Ack { seq: 1 }.encode().unwrap();
    big[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let mut g = TcpStream::connect(c.listen_addr).await.unwrap();
    g.write_all(&big).await.unwrap();
    expect_error(recv(&mut g).await, ErrorCode::Malformed, "exceeds");
    // An old frame version.
    let mut v1 = Frame::Hello(hello("other", [8; 16])).encode().unwrap();
    v1[4] = 1;
    let mut g = TcpStream::connect(c.listen_addr).await.unwrap();
    g.write_all(&v1).await.unwrap();
    expect_error(recv(&mut g).await, ErrorCode::UnsupportedVersion, "version");
    // A truncated frame then EOF: no reply needed, nothing breaks.
    let ok = Frame::Hello(hello("other", [8; 16])).encode().unwrap();
    let mut g = TcpStream::connect(c.listen_addr).await.unwrap();
    g.write_all(&ok[..20]).await.unwrap();
    drop(g);
    // A corrupt batch mid-session closes only that session.
    let (mut bad, _, _) = agent(&c, "bad", [5; 16]).await;
    let mut b = batch(1, 1).encode().unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    bad.write_all(&b).await.unwrap();
    expect_error(recv(&mut bad).await, ErrorCode::Malformed, "checksum");
    // A forced rebind needs an operator's leave first...
    let mut h = hello("bad", [4; 16]);
    h.flags = HELLO_FORCE_RESYNC;
    expect_error(
        connect_agent(&c, h.clone()).await.1,
        ErrorCode::Forbidden,
        "needs an operator",
    );
    let (code, body) = http(c.api_addr, "POST", "/api/v1/disks/bad/rebind").await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = http_as(c.api_addr, "POST", "/api/v1/disks/bad/rebind?owner=a%20b", Some(TOKEN)).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = http_as(c.api_addr, "POST", "/api/v1/disks/nope/rebind", Some(TOKEN)).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = http_as(c.api_addr, "POST", "/api/v1/disks/bad/rebind", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    // ...then it is accepted, once; the old spool is kept aside.
    let (_rebound, w) = connect_agent(&c, h).await;
    match w {
        Frame::Welcome { acked_seq, flags, .. } => {
            assert_eq!(acked_seq, 0);
            assert_eq!(flags, WELCOME_NEED_FULL_SYNC);
        }
        other => panic!("{other:?}"),
    }

    // The good disk kept working throughout.
    send(&mut good, &batch(2, 3)).await;
    assert_eq!(recv(&mut good).await, Frame::Ack { seq: 3 });
    let st = status(c.api_addr).await;
    assert_eq!(st["collector"]["agents_connected"], 2);
    stop.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_stops_reading_until_the_target_drains_it() {
    let d = tempfile::tempdir().unwrap();
    // Reserve a port for a target that is down at first.
    let port_holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taddr = port_holder.local_addr().unwrap();
    drop(port_holder);
    let mut config = cfg(d.path(), taddr);
    config.spool_cap = 20_000; // one batch of 2 records (~24 KiB) fills it
    let (c, stop) = start(config).await;
    let (mut a, _, _) = agent(&c, "db", [3; 16]).await;
    send(&mut a, &batch(1, 2)).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 2 });
    send(&mut a, &batch(3, 3)).await;
    assert_eq!(
        recv_within(&mut a, Duration::from_millis(700)).await,
        None,
        "no ack while full"
    );
    let st = status(c.api_addr).await;
    assert_eq!(st["collector"]["spool_full"], true);
    let disk = &st["disks"][0];
    assert_eq!(disk["mode"], "backlogged", "{disk}");
    assert_eq!(disk["acked_seq"], 2);
    assert!(disk["lag_bytes"].as_u64().unwrap() >= 2 * 12288, "{disk}");
    let (_, metrics) = http(c.api_addr, "GET", "/metrics").await;
    assert!(metrics.contains("tidemark_collector_spool_full 1"), "{metrics}");

    // The target comes back: it gets batch 1..2, acks, the spool drains,
    // and batch 3 is read, spooled, acknowledged and forwarded.
    let tl = TcpListener::bind(taddr).await.unwrap();
    let mut t = FakeTarget::accept(&tl, 0).await;
    let (_, r) = t.packed().await;
    assert_eq!(r.len(), 2);
    t.ack(2).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 3 });
    let (_, r) = t.packed().await;
    assert_eq!(r[0].header.seq, 3);
    t.ack(3).await;
    eventually("empty spool", || spool_files(&d.path().join("db")).is_empty()).await;
    let st = status(c.api_addr).await;
    assert_eq!(st["collector"]["spool_full"], false);
    stop.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_spool_file_is_forwarded_with_the_bad_record_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let port_holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taddr = port_holder.local_addr().unwrap();
    drop(port_holder);
    let (c, stop) = start(cfg(d.path(), taddr)).await;
    let (mut a, _, _) = agent(&c, "db", [3; 16]).await;
    send(&mut a, &batch(1, 3)).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 3 });
    let f = spool_files(&d.path().join("db")).remove(0);
    let mut bytes = std::fs::read(&f).unwrap();
    // A payload byte of seq 2: the spool header (96) + record 1 + header of 2.
    let at = 96 + rec(1).encode().len() + 80 + 9000;
    bytes[at] ^= 0xff;
    std::fs::write(&f, &bytes).unwrap();

    let tl = TcpListener::bind(taddr).await.unwrap();
    let mut t = FakeTarget::accept(&tl, 0).await;
    let (flags, r) = t.packed().await;
    assert_eq!(flags, 0);
    assert_eq!(r.len(), 3);
    assert!(r[0].header.verify_payload(&r[0].payload).is_ok());
    assert!(
        r[1].header.verify_payload(&r[1].payload).is_err(),
        "seq 2 reaches the target unchanged"
    );
    assert_eq!(r[1].header, rec(2).header);
    assert!(r[2].header.verify_payload(&r[2].payload).is_ok());
    let (_, metrics) = http(c.api_addr, "GET", "/metrics").await;
    assert!(
        metrics.contains("tidemark_collector_disk_corrupt_records_total{disk=\"db\"} 1"),
        "{metrics}"
    );
    stop.cancel();
    c.wait().await.unwrap();
}

/// A sync record of `len` bytes at `offset`: data (`Sync`) or a zero range
/// (`Zero` with `FLAG_SYNC`).
fn sync_rec(seq: u64, offset: u64, len: u64, zero: bool) -> Record {
    let payload = if zero { Vec::new() } else { vec![0x5a; len as usize] };
    let kind = if zero { RecordKind::Zero } else { RecordKind::Sync };
    let mut header = RecordHeader::new(kind, seq, 1_000_000 * seq, offset, len, &payload);
    if zero {
        header.flags = tidemark_wire::record::FLAG_SYNC;
    }
    Record { header, payload }
}

async fn disk_json(addr: std::net::SocketAddr, id: &str) -> Value {
    let (code, body) = http(addr, "GET", &format!("/api/v1/disks/{id}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owed_resync_is_sent_again_until_sync_records_cover_it() {
    let d = tempfile::tempdir().unwrap();
    let tl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (c, stop) = start(cfg(d.path(), tl.local_addr().unwrap())).await;
    let (mut a, _, _) = agent(&c, "db", [2; 16]).await;
    send(&mut a, &batch(1, 3)).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 3 });
    let mut t = FakeTarget::accept(&tl, 0).await;
    let (_, r) = t.packed().await;
    assert_eq!(r.len(), 3);
    let rs = Request::Resync {
        seq: 2,
        offset: 8192,
        length: 8192,
    };
    send(&mut t.s, &Frame::Request(rs)).await;
    assert_eq!(recv(&mut a).await, Frame::Request(rs), "relayed at once");

    // The agent reports a resync, then goes away before acting on it: the
    // collector shows the mode it last reported, and still owes the request.
    send(&mut a, &Frame::Progress(progress(3, AgentMode::Resync, 0))).await;
    eventually_json(c.api_addr, "db", |v| v["mode"] == "resync").await;
    let (code, body) = {
        let api = c.api_addr;
        let t0 = Instant::now();
        let r = http(api, "POST", "/api/v1/disks/db/refresh").await;
        assert!(t0.elapsed() >= Duration::from_secs(4), "waited for the answer");
        r
    };
    assert_eq!(code, 504, "the agent never answered: {body}");
    assert!(body.contains("did not answer"), "{body}");
    while let Some(f) = recv_within(&mut a, Duration::from_millis(100)).await {
        assert!(matches!(f, Frame::Request(Request::StatusNow { .. })), "{f:?}");
    }
    drop(a);
    let v = eventually_json(c.api_addr, "db", |v| v["agent_connected"] == false).await;
    assert_eq!(v["mode"], "disconnected", "{v}");
    assert_eq!(v["agent_mode"], "resync", "{v}");

    let (mut a, _, _) = agent(&c, "db", [2; 16]).await;
    assert_eq!(
        recv(&mut a).await,
        Frame::Request(rs),
        "owed again on the next connection"
    );
    // Half the range synced (and a write, which does not count).
    send(&mut a, &Frame::Batch(vec![sync_rec(4, 8192, 4096, false), rec(5)])).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 5 });
    drop(a);
    drop(t);
    // The request survives a restart of the collector.
    stop.cancel();
    c.wait().await.unwrap();
    let (c, stop) = start(cfg(d.path(), tl.local_addr().unwrap())).await;
    let (mut a, acked, _) = agent(&c, "db", [2; 16]).await;
    assert_eq!(acked, 5);
    assert_eq!(recv(&mut a).await, Frame::Request(rs), "owed after a restart");
    // The rest of the range, as a zero range: now it is covered.
    send(&mut a, &Frame::Batch(vec![sync_rec(6, 8192, 8192, true)])).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 6 });
    drop(a);
    eventually_json(c.api_addr, "db", |v| v["agent_connected"] == false).await;
    let (mut a, _, _) = agent(&c, "db", [2; 16]).await;
    assert_eq!(
        recv_within(&mut a, Duration::from_millis(500)).await,
        None,
        "nothing owed once synced"
    );
    stop.cancel();
    c.wait().await.unwrap();
}

/// Poll a disk's status until `f` holds; returns it.
async fn eventually_json(addr: std::net::SocketAddr, id: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let v = disk_json(addr, id).await;
        if f(&v) {
            return v;
        }
        assert!(t0.elapsed() < T, "timed out; last status {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_beyond_what_was_sent_is_refused_and_trims_nothing() {
    let d = tempfile::tempdir().unwrap();
    let tl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (c, stop) = start(cfg(d.path(), tl.local_addr().unwrap())).await;
    let (mut a, _, _) = agent(&c, "db", [4; 16]).await;
    send(&mut a, &batch(1, 3)).await;
    assert_eq!(recv(&mut a).await, Frame::Ack { seq: 3 });
    let mut t = FakeTarget::accept(&tl, 0).await;
    let (_, r) = t.packed().await;
    assert_eq!(r.len(), 3);
    t.ack(10).await;
    // The session is dropped: the collector reconnects and sends 1..3 again.
    let mut t2 = FakeTarget::accept(&tl, 0).await;
    assert_eq!(
        recv_within(&mut t.s, Duration::from_secs(2)).await,
        None,
        "old session closed"
    );
    assert_eq!(spool_files(&d.path().join("db")).len(), 1, "nothing trimmed");
    let v = disk_json(c.api_addr, "db").await;
    assert_eq!(v["applied_seq"], 0, "{v}");
    let (_, r) = t2.packed().await;
    assert_eq!(r[0].header.seq, 1);
    t2.ack(3).await;
    eventually("trim", || spool_files(&d.path().join("db")).is_empty()).await;
    stop.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_trickling_frame_bodies_do_not_hold_the_memory_budget() {
    let d = tempfile::tempdir().unwrap();
    let tl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (c, stop) = start(cfg(d.path(), tl.local_addr().unwrap())).await;
    // Three agents announce maximal batches and send a few bytes of each:
    // together more than the whole memory budget, were it taken up front.
    let mut slow = Vec::new();
    for i in 0..3u8 {
        let (mut s, _, _) = agent(&c, &format!("slow{i}"), [20 + i; 16]).await;
        let mut f = batch(1, 1).encode().unwrap();
        f[8..12].copy_from_slice(&MAX_BODY.to_le_bytes());
        s.write_all(&f[..FRAME_HEADER_LEN + 100]).await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut good, _, _) = agent(&c, "good", [30; 16]).await;
    send(&mut good, &batch(1, 2)).await;
    assert_eq!(
        recv_within(&mut good, Duration::from_secs(5)).await,
        Some(Frame::Ack { seq: 2 }),
        "another agent's batch is spooled while the slow ones trickle"
    );
    drop(slow);
    stop.cancel();
    c.wait().await.unwrap();
}
