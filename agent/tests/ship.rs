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
use tidemark_agent::ship::{read_frame, write_frame};
use tidemark_agent::sync;
use tidemark_formats::apply::{apply_record, whole};
use tidemark_nbd::Backend;
use tidemark_util::fileops::BackingKind;
use tidemark_wire::frame::{AgentMode, Frame, Request, Role, WELCOME_NEED_FULL_SYNC};
use tidemark_wire::record::{Record, RecordKind};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 8 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);

fn cfg(dir: &Path, addr: String) -> ProtectConfig {
    ProtectConfig {
        disk: dir.join("disk.img"),
        state: dir.join("state"),
        listen: ListenAddr::Unix(dir.join("unused.sock")),
        disk_id: "ship-me".into(),
        create_size: Some(SIZE),
        // 1 MiB segments: the writes below fill several.
        journal_cap: Some(8 << 20),
        bench_consume: false,
        ship: Some(ShipConfig {
            addr,
            token: b"secret".to_vec(),
            force_resync: false,
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
        })
        .await;
        write_mib(&shim, 3, 1).await;
        let mut acked = loop {
            let b = p.batch().await;
            assert_eq!(b[0].header.seq, held.contiguous(1) + 1, "batches arrive in seq order");
            held.add(b);
            let a = held.contiguous(1);
            p.send(Frame::Ack { seq: a }).await;
            let st = shim.status();
            if st.sync.is_none() && a >= st.last_seq {
                break a;
            }
        };
        assert_eq!(held.0[&1].header.seq, 1, "shipping starts at seq 1");
        assert!(held.0.values().any(|r| r.header.kind == RecordKind::SyncDone));
        assert_eq!(shim.status().full_resyncs, 0, "covered by the initial sync, no new one");

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
            shim.status()
        );

        // 2. StatusNow → a Progress at once.
        p.send(Frame::Request(Request::StatusNow { nonce: 0 })).await;
        let prog = loop {
            if let Frame::Progress(pr) = p.recv().await {
                break pr;
            }
        };
        assert_eq!(prog.mode, AgentMode::Streaming);
        assert_eq!(prog.source_seq, shim.status().last_seq);
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
            if a >= shim.status().last_seq {
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
        let ahead = shim.status().next_seq + 500;
        let mut p = Peer::accept(&l, &shim).await;
        p.send(Frame::Welcome {
            acked_seq: ahead,
            flags: 0,
        })
        .await;
        let b = p.batch().await;
        assert_eq!(b[0].header.seq, ahead + 1);
        let st = shim.status();
        assert_eq!(st.full_resyncs, 1);
        assert_eq!(shim.inner().sync.snapshot().start_seq, ahead + 1);
        assert!(st.next_seq > ahead);

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
        assert!(!shim.status().collector_connected);
        stop.cancel();
        shipper.await.unwrap();
    });
}
