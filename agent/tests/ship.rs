//! The shipper against a fake collector over loopback TCP: Hello, batches
//! from the acked seq, acks → journal recycling, a disconnect → resume from
//! the acked seq, StatusNow → Progress, a collector ahead of the journal →
//! the journal's next seq skips past it with a full resync. What the fake
//! collector received, applied in seq order onto a blank disk, equals the
//! disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tidemark_agent::config::{ListenAddr, ProtectConfig, ShipConfig};
use tidemark_agent::run::open;
use tidemark_agent::shim::Shim;
use tidemark_agent::status::Status;
use tidemark_agent::sync;
use tidemark_formats::apply::{apply_record, whole};
use tidemark_net::write_frame;
use tidemark_util::fileops::BackingKind;
use tidemark_wire::frame::{AgentMode, Frame, Request, Role, WELCOME_NEED_FULL_SYNC};
use tidemark_wire::record::{Record, RecordKind, FLAG_FULL};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 8 << 20;

/// One frame from the agent; here the end of the stream is an error too.
async fn read_frame(s: &mut TcpStream) -> std::io::Result<Frame> {
    match tidemark_net::read_frame(s, tidemark_wire::frame::MAX_BODY).await {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

const TIMEOUT: Duration = Duration::from_secs(20);

fn cfg(dir: &Path, addr: String) -> ProtectConfig {
    ProtectConfig {
        disk: dir.join("disk.img"),
        state: dir.join("state"),
        listen: Some(ListenAddr::Unix(dir.join("unused.sock"))),
        ublk: None,
        disk_id: "ship-me".parse().unwrap(),
        create_size: Some(SIZE),
        // 1 MiB segments: the writes below fill several.
        journal_cap: Some(8 << 20),
        bench_consume: false,
        ship: Some(ShipConfig {
            addr,
            token: b"secret".to_vec(),
            force_resync: false,
            security: tidemark_net::Security::Plaintext,
            enroll: None,
        }),
    }
}

/// The fake collector's side of one connection.
struct Peer {
    s: TcpStream,
}

impl Peer {
    async fn accept(l: &TcpListener, shim: &Shim) -> Self {
        let (mut s, _) = tokio::time::timeout(TIMEOUT, l.accept()).await.unwrap().unwrap();
        match read_frame(&mut s).await.unwrap() {
            Frame::Hello(h) => {
                assert_eq!(h.role, Role::Agent);
                assert_eq!(h.token, b"secret");
                assert_eq!(h.disk_id, "ship-me");
                assert_eq!(uuid::Uuid::from_bytes(h.disk_uuid).to_string(), shim.inner().disk_uuid);
                assert_eq!(h.flags, 0);
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        Self { s }
    }

    async fn send(&mut self, f: Frame) {
        write_frame(&mut self.s, &f).await.unwrap();
    }

    async fn recv(&mut self) -> Frame {
        tokio::time::timeout(TIMEOUT, read_frame(&mut self.s))
            .await
            .expect("no frame from the agent")
            .unwrap()
    }

    /// Receive until a batch arrives; returns its records.
    async fn batch(&mut self) -> Vec<Record> {
        loop {
            if let Frame::Batch(b) = self.recv().await {
                return b;
            }
        }
    }
}

/// Records held by the fake collector, by seq.
#[derive(Default)]
struct Held(BTreeMap<u64, Record>);

impl Held {
    fn add(&mut self, b: Vec<Record>) -> u64 {
        let mut last = 0;
        for r in b {
            last = r.header.seq;
            self.0.entry(r.header.seq).or_insert(r);
        }
        last
    }

    /// Highest seq held with no gap from `from`.
    fn contiguous(&self, from: u64) -> u64 {
        let mut s = from - 1;
        while self.0.contains_key(&(s + 1)) {
            s += 1;
        }
        s
    }
}

async fn write_mib(shim: &Shim, n: u64, seed: u8) {
    for i in 0..n * 8 {
        let off = (i * 131_072 + u64::from(seed) * 4096) % (SIZE - 131_072);
        let b = seed.wrapping_add(u8::try_from(i % 200).unwrap()) | 1;
        shim.write(off, vec![b; 128 << 10], false).await.unwrap();
    }
}

#[test]
fn ships_resumes_recycles_and_reports() {
    tidemark_util::init_logging();
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = cfg(d.path(), l.local_addr().unwrap().to_string());
        let o = open(&c).unwrap();
        let shim = o.shim.clone();
        let stop = CancellationToken::new();
        let driver = sync::spawn(shim.clone(), stop.clone(), tokio::runtime::Handle::current()).unwrap();
        let shipper = tokio::spawn(tidemark_agent::ship::run(
            shim.clone(),
            c.ship.clone().unwrap(),
            stop.clone(),
        ));
        let mut held = Held::default();

        // 1. A new collector: nothing held, needs a full sync, which the
        //    initial sync (from seq 1) covers.
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: 0,
            flags: WELCOME_NEED_FULL_SYNC,
            generation: [0; 16],
        })
        .await;
        write_mib(&shim, 3, 1).await;
        let mut acked = loop {
            let b = p.batch().await;
            assert_eq!(b[0].header.seq, held.contiguous(1) + 1, "batches arrive in seq order");
            held.add(b);
            let a = held.contiguous(1);
            p.send(Frame::Ack { seq: a }).await;
            let st = Status::of(&shim);
            if st.sync.is_none() && a >= st.last_seq {
                break a;
            }
        };
        assert_eq!(held.0[&1].header.seq, 1, "shipping starts at seq 1");
        assert_eq!(
            (held.0[&1].header.kind, held.0[&1].header.flags),
            (RecordKind::SyncBegin, FLAG_FULL),
            "a new journal begins with the initial sync's SyncBegin"
        );
        let done = held.0.values().find(|r| r.header.kind == RecordKind::SyncDone).unwrap();
        assert_eq!((done.header.offset, done.header.flags), (1, FLAG_FULL));
        assert!(held.0.values().any(|r| r.header.kind == RecordKind::SyncDone));
        assert_eq!(
            Status::of(&shim).full_resyncs,
            0,
            "covered by the initial sync, no new one"
        );

        // Acks let the journal recycle.
        let t = tokio::time::Instant::now();
        loop {
            let want = acked.min(shim.applied_watermark());
            if shim.core().journal.consumed_seq() >= want {
                break;
            }
            assert!(t.elapsed() < TIMEOUT, "acked records were never consumed");
            tokio::time::sleep(Duration::from_millis(20)).await;
            p.send(Frame::Ack { seq: acked }).await;
        }
        assert!(
            shim.core().journal.first_seq() > 1,
            "no segment recycled after acks: {:?}",
            Status::of(&shim)
        );

        // 2. StatusNow → a Progress at once.
        p.send(Frame::Request(Request::StatusNow { nonce: 0 })).await;
        let prog = loop {
            if let Frame::Progress(pr) = p.recv().await {
                break pr;
            }
        };
        assert_eq!(prog.mode, AgentMode::Streaming);
        assert_eq!(prog.source_seq, Status::of(&shim).last_seq);
        assert!(prog.written_bytes >= 3 << 20);

        // 3. Records sent but not acked, then the connection drops: the
        //    agent comes back and resends from the acked seq.
        write_mib(&shim, 1, 2).await;
        let b = p.batch().await;
        let unacked_first = b[0].header.seq;
        assert_eq!(unacked_first, acked + 1);
        drop(p);
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: acked,
            flags: 0,
            generation: [0; 16],
        })
        .await;
        let b = p.batch().await;
        assert_eq!(
            b[0].header.seq,
            acked + 1,
            "after a reconnect the agent resumes from the acked seq"
        );
        held.add(b);
        loop {
            let a = held.contiguous(1);
            p.send(Frame::Ack { seq: a }).await;
            if a >= Status::of(&shim).last_seq {
                acked = a;
                break;
            }
            held.add(p.batch().await);
        }

        // What the collector holds, replayed on a blank disk, is the disk.
        shim.flush().await.unwrap();
        let img = d.path().join("replica.img");
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        f.set_len(SIZE).unwrap();
        for (s, r) in &held.0 {
            assert!(*s <= acked);
            apply_record(&f, &img, BackingKind::File, SIZE, &r.header, &r.payload, whole).unwrap();
        }
        drop(f);
        assert!(std::fs::read(&img).unwrap() == std::fs::read(&c.disk).unwrap());

        // 4. A collector ahead of the journal (a state directory restored
        //    from an old copy): the next seq skips past its acked seq and
        //    the whole disk is resynced.
        drop(p);
        let ahead = Status::of(&shim).next_seq + 500;
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: ahead,
            flags: 0,
            generation: [0; 16],
        })
        .await;
        let b = p.batch().await;
        assert_eq!(b[0].header.seq, ahead + 1);
        assert_eq!(
            (b[0].header.kind, b[0].header.flags),
            (RecordKind::SyncBegin, FLAG_FULL),
            "the full resync begins right after the skipped seqs"
        );
        let st = Status::of(&shim);
        assert_eq!(st.full_resyncs, 1);
        let t = tokio::time::Instant::now();
        while shim.inner().sync.snapshot().start_seq == 0 {
            assert!(t.elapsed() < TIMEOUT, "the full resync never began");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(shim.inner().sync.snapshot().start_seq, ahead + 1);
        assert!(st.next_seq > ahead);

        // The target repeats its request while the sync runs: no new one.
        p.send(Frame::Request(Request::FullResync)).await;
        p.send(Frame::Request(Request::FullResync)).await;
        p.send(Frame::Request(Request::StatusNow { nonce: 7 })).await;
        loop {
            if let Frame::Progress(pr) = p.recv().await {
                if pr.nonce == 7 {
                    assert_eq!(pr.full_resyncs, 1, "a repeated FullResync counted again");
                    break;
                }
            }
        }
        // Whether it is still running or already done, it began once.
        assert_eq!(
            shim.inner().sync.snapshot().start_seq,
            ahead + 1,
            "the full resync began again"
        );

        stop.cancel();
        shipper.await.unwrap();
        tokio::task::spawn_blocking(move || driver.join().unwrap())
            .await
            .unwrap();
    });
}

/// A refusal (disk mismatch) is not fatal: the agent keeps serving and
/// retries later.
#[test]
fn refusal_is_retried() {
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = cfg(d.path(), l.local_addr().unwrap().to_string());
        let o = open(&c).unwrap();
        let shim = o.shim.clone();
        let stop = CancellationToken::new();
        let shipper = tokio::spawn(tidemark_agent::ship::run(
            shim.clone(),
            c.ship.clone().unwrap(),
            stop.clone(),
        ));
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Error {
            code: tidemark_wire::frame::ErrorCode::DiskMismatch,
            reason: "disk id ship-me is bound to another disk".into(),
        })
        .await;
        drop(p);
        // The shim still serves writes meanwhile.
        shim.write(0, vec![5; 4096], false).await.unwrap();
        assert!(!Status::of(&shim).collector_connected);
        stop.cancel();
        shipper.await.unwrap();
    });
}

/// Collector side for the tests below: receive and acknowledge until the
/// agent has no sync left and everything journaled is held; returns the
/// highest seq held.
async fn drain_until_synced(p: &mut Peer, shim: &Shim, held: &mut Held, from: u64) -> u64 {
    let t = tokio::time::Instant::now();
    loop {
        assert!(
            t.elapsed() < TIMEOUT * 3,
            "the agent never caught up: {:?}",
            Status::of(shim)
        );
        let f = tokio::time::timeout(Duration::from_millis(200), read_frame(&mut p.s)).await;
        if let Ok(f) = f {
            if let Frame::Batch(b) = f.unwrap() {
                assert_eq!(b[0].header.seq, held.contiguous(from) + 1, "a gap in the stream");
                held.add(b);
                p.send(Frame::Ack {
                    seq: held.contiguous(from),
                })
                .await;
            }
        }
        let st = Status::of(shim);
        let a = held.contiguous(from);
        if st.sync.is_none() && st.bitmap_dirty_regions == 0 && a >= st.last_seq {
            return a;
        }
    }
}

/// Ask for a fresh Progress and return it.
async fn progress(p: &mut Peer, nonce: u64) -> tidemark_wire::frame::Progress {
    p.send(Frame::Request(Request::StatusNow { nonce })).await;
    loop {
        if let Frame::Progress(pr) = p.recv().await {
            if pr.nonce == nonce {
                return pr;
            }
        }
    }
}

fn replay(held: &Held, img: &Path) {
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(img)
        .unwrap();
    f.set_len(SIZE).unwrap();
    for r in held.0.values() {
        apply_record(&f, img, BackingKind::File, SIZE, &r.header, &r.payload, whole).unwrap();
    }
}

/// A FullResync starts one full resync; the target's repeats (while it
/// runs, or after it completed on the same connection) do not restart it or
/// count again; on a later connection a new request is honoured.
#[test]
fn repeated_full_resync_requests_start_one_sync() {
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = cfg(d.path(), l.local_addr().unwrap().to_string());
        let o = open(&c).unwrap();
        let shim = o.shim.clone();
        let stop = CancellationToken::new();
        let driver = sync::spawn(shim.clone(), stop.clone(), tokio::runtime::Handle::current()).unwrap();
        let shipper = tokio::spawn(tidemark_agent::ship::run(
            shim.clone(),
            c.ship.clone().unwrap(),
            stop.clone(),
        ));
        let mut held = Held::default();
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: 0,
            flags: WELCOME_NEED_FULL_SYNC,
            generation: [0; 16],
        })
        .await;
        write_mib(&shim, 1, 3).await;
        drain_until_synced(&mut p, &shim, &mut held, 1).await;

        p.send(Frame::Request(Request::FullResync)).await;
        p.send(Frame::Request(Request::FullResync)).await;
        p.send(Frame::Request(Request::FullResync)).await;
        assert_eq!(progress(&mut p, 1).await.full_resyncs, 1);
        let start = shim.inner().sync.snapshot();
        drain_until_synced(&mut p, &shim, &mut held, 1).await;
        let f = shim.inner().sync.snapshot();
        assert!(
            start.start_seq == 0 || f.last_full_start == start.start_seq,
            "the full resync was restarted: {start:?} then {f:?}"
        );
        // A late repeat on the same connection: answered by the sync done.
        p.send(Frame::Request(Request::FullResync)).await;
        assert_eq!(progress(&mut p, 2).await.full_resyncs, 1);
        assert!(shim.inner().sync.snapshot().kind.is_none());

        // A new connection: a request now is a new need.
        drop(p);
        let acked = held.contiguous(1);
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: acked,
            flags: 0,
            generation: [0; 16],
        })
        .await;
        p.send(Frame::Request(Request::FullResync)).await;
        assert_eq!(progress(&mut p, 3).await.full_resyncs, 2);
        drain_until_synced(&mut p, &shim, &mut held, 1).await;
        shim.flush().await.unwrap();
        let img = d.path().join("replica.img");
        replay(&held, &img);
        assert!(std::fs::read(&img).unwrap() == std::fs::read(&c.disk).unwrap());

        stop.cancel();
        shipper.await.unwrap();
        tokio::task::spawn_blocking(move || driver.join().unwrap())
            .await
            .unwrap();
    });
}

/// A collector that stops reading (spool full) does not keep the agent
/// from stopping: every write to it gives way to stop.
#[test]
fn stop_is_prompt_when_the_collector_stops_reading() {
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A tiny receive buffer, so the agent's writes block soon.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(4).unwrap();
        let mut c = cfg(d.path(), l.local_addr().unwrap().to_string());
        c.journal_cap = Some(64 << 20);
        let o = open(&c).unwrap();
        let shim = o.shim.clone();
        let stop = CancellationToken::new();
        let shipper = tokio::spawn(tidemark_agent::ship::run(
            shim.clone(),
            c.ship.clone().unwrap(),
            stop.clone(),
        ));
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: 0,
            flags: 0,
            generation: [0; 16],
        })
        .await;
        for i in 0..3 {
            write_mib(&shim, 6, i).await;
        }
        // Requests keep coming; nothing is read any more.
        for n in 0..200 {
            p.send(Frame::Request(Request::StatusNow { nonce: n })).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t = std::time::Instant::now();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), shipper)
            .await
            .expect("the shipper did not stop while the collector was not reading")
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(p);
    });
}

/// Damage the journal record `seq` on disk: its payload (`header` false)
/// or its header.
fn damage(state: &Path, seq: u64, header: bool) {
    use std::os::unix::fs::FileExt;
    use tidemark_wire::record::RecordHeader;
    let jdir = state.join("journal");
    let mut segs: Vec<_> = std::fs::read_dir(&jdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    segs.sort();
    for p in segs {
        let f = std::fs::File::options().read(true).write(true).open(&p).unwrap();
        let mut pos = 64u64;
        loop {
            let mut hb = [0u8; 80];
            f.read_exact_at(&mut hb, pos).unwrap();
            let Ok(h) = RecordHeader::decode(&hb) else { break };
            if h.seq == seq {
                let at = if header { pos + 40 } else { pos + 80 + 100 };
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, at).unwrap();
                f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
                return;
            }
            pos += h.encoded_len();
        }
    }
    panic!("seq {seq} not found in the journal");
}

/// A damaged journal record is not retried forever: it is stepped over, a
/// placeholder SyncBegin takes its seq (the stream stays gap-free), what it
/// changed is resynced, and the replica ends equal to the disk.
fn damaged_record_is_stepped_over(header: bool) {
    tidemark_util::init_logging();
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = cfg(d.path(), l.local_addr().unwrap().to_string());
        let o = open(&c).unwrap();
        let shim = o.shim.clone();
        let stop = CancellationToken::new();
        let shipper = tokio::spawn(tidemark_agent::ship::run(
            shim.clone(),
            c.ship.clone().unwrap(),
            stop.clone(),
        ));
        // Before the collector lets the agent ship: records, one damaged.
        let first = Status::of(&shim).next_seq;
        for i in 0..6u8 {
            shim.write(u64::from(i) * 65536, vec![i + 1; 16384], false)
                .await
                .unwrap();
        }
        let bad = first + 2;
        damage(&c.state, bad, header);
        let driver = sync::spawn(shim.clone(), stop.clone(), tokio::runtime::Handle::current()).unwrap();
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: 0,
            flags: WELCOME_NEED_FULL_SYNC,
            generation: [0; 16],
        })
        .await;
        let mut held = Held::default();
        let last = drain_until_synced(&mut p, &shim, &mut held, 1).await;
        let ph = &held.0[&bad];
        assert_eq!(
            ph.header.kind,
            RecordKind::SyncBegin,
            "no placeholder for the damaged record"
        );
        assert_eq!(ph.header.flags, if header { FLAG_FULL } else { 0 });
        let done = held
            .0
            .values()
            .rev()
            .find(|r| r.header.kind == RecordKind::SyncDone && r.header.offset > bad)
            .expect("no sync that began after the damaged record completed");
        assert_eq!(held.0[&done.header.offset].header.kind, RecordKind::SyncBegin);
        assert_eq!(Status::of(&shim).full_resyncs, u64::from(header));
        assert!(last >= done.header.seq);
        shim.flush().await.unwrap();
        let img = d.path().join("replica.img");
        replay(&held, &img);
        assert!(std::fs::read(&img).unwrap() == std::fs::read(&c.disk).unwrap());
        stop.cancel();
        shipper.await.unwrap();
        tokio::task::spawn_blocking(move || driver.join().unwrap())
            .await
            .unwrap();
    });
}

#[test]
fn damaged_payload_is_stepped_over_and_its_range_resynced() {
    damaged_record_is_stepped_over(false);
}

#[test]
fn damaged_header_is_stepped_over_and_the_disk_resynced() {
    damaged_record_is_stepped_over(true);
}
