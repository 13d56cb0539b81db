//! Point-in-time truth at the library level: a stream with Flushes and
//! Tags is applied through a running target, a reference copy of the disk
//! is kept at each point, and every point's `recovery::View` must equal its
//! reference — including regions overwritten many times since, views
//! opened before further applies, and after expiry.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemark_target::recovery::{self, AtSpec, Point, PointKind, View};
use tidemark_wire::record::{Record, RecordKind};

const DISK: u64 = 1 << 20;

/// A tiny deterministic generator (no dependency for a test).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A consistent disk: a full sync of `DISK` bytes and its SyncDone.
fn initial_sync(src: &mut Source) -> Vec<Record> {
    let start = src.next_seq;
    let mut v: Vec<Record> = (0..DISK / 65536)
        .map(|i| {
            if i % 3 == 0 {
                src.sync_zero(i * 65536, 65536, true)
            } else {
                src.sync(i * 65536, pattern(i + 1000, 65536), true)
            }
        })
        .collect();
    v.push(src.sync_done(start));
    v
}

/// Random writes, trims and zeroes, with a hot region (the first 16 KiB)
/// overwritten in every round.
fn churn(src: &mut Source, rng: &mut Rng, n: usize) -> Vec<Record> {
    let mut v = vec![src.write(rng.below(4096), pattern(rng.next(), 12288))];
    for _ in 0..n {
        let off = rng.below(DISK - 70_000);
        let len = 1 + rng.below(65536);
        v.push(match rng.below(8) {
            0 => src.trim(off & !4095, (len + 4095) & !4095),
            1 => src.sync_zero(off, len, false),
            _ => src.write(off, pattern(rng.next(), usize::try_from(len).unwrap())),
        });
    }
    v
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn open_view(dir: &Path, at: AtSpec) -> Arc<View> {
    let dir = dir.to_path_buf();
    Arc::new(blocking(move || View::open(&dir, "vm", &at).expect("open a view")).await)
}

async fn read_all(v: &Arc<View>) -> Vec<u8> {
    let v = v.clone();
    blocking(move || {
        let mut out = vec![0u8; usize::try_from(v.size()).unwrap()];
        // Odd-sized reads, so that unaligned edges are exercised too.
        let mut at = 0;
        while at < out.len() {
            let n = (out.len() - at).min(100_003);
            v.read_at(&mut out[at..at + n], at as u64).unwrap();
            at += n;
        }
        out
    })
    .await
}

async fn points(dir: &Path) -> Vec<Point> {
    let dir = dir.to_path_buf();
    blocking(move || recovery::points(&dir, "vm").unwrap()).await
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs from its reference at byte {i}");
    }
}

async fn check_all(dir: &Path, refs: &BTreeMap<u64, Vec<u8>>) -> usize {
    let pts = points(dir).await;
    for p in &pts {
        let want = refs
            .get(&p.seq)
            .unwrap_or_else(|| panic!("point {p:?} has no reference"));
        let v = open_view(dir, AtSpec::Seq(p.seq)).await;
        assert_eq!(v.point(), p);
        assert_same(&read_all(&v).await, want, &format!("point {}", p.seq));
    }
    pts.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_point_reads_as_its_reference_and_views_never_change() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start_with(dir.path(), |c| {
        c.retention.point_interval = Duration::ZERO;
        c.segment_bytes = 256 << 10;
    })
    .await;
    let (mut c, _, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
    let mut src = Source::new(1);
    src.time_ns = now_ns();
    let mut rng = Rng(7);
    let mut refs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();

    // Flushes before the disk is consistent are not points.
    let mut b = vec![src.bare(RecordKind::Flush, 0, 0)];
    b.extend(initial_sync(&mut src));
    c.ship(&b).await;
    // Flushes before the disk is consistent are not points; once the sync
    // is done, the applied state is (`latest`), though not recorded.
    let pts = points(dir.path()).await;
    let applied = src.next_seq - 1;
    assert_eq!(
        pts.iter().map(|p| (p.seq, p.latest)).collect::<Vec<_>>(),
        vec![(applied, true)],
        "no recorded point before the first Flush after the sync"
    );
    refs.insert(applied, src.disk.clone());

    let mut early: Option<(Arc<View>, Vec<u8>)> = None;
    for round in 0..30u64 {
        // Several points per batch, some batches: the capture epoch turns
        // inside a batch.
        let mut batch = Vec::new();
        for _ in 0..1 + round % 3 {
            batch.extend(churn(&mut src, &mut rng, 6));
            let f = src.bare(RecordKind::Flush, 0, 0);
            refs.insert(f.header.seq, src.disk.clone());
            batch.push(f);
        }
        if round % 5 == 4 {
            let tg = src.tag(&format!("t{round}"), round % 10 == 9);
            refs.insert(tg.header.seq, src.disk.clone());
            batch.push(tg);
        }
        batch.extend(churn(&mut src, &mut rng, 3));
        c.ship(&batch).await;
        // The applied state is `latest` (a view there records it as a point).
        refs.insert(src.next_seq - 1, src.disk.clone());
        if round == 3 {
            let v = open_view(dir.path(), AtSpec::Latest).await;
            let bytes = read_all(&v).await;
            assert_same(&bytes, &refs[&v.point().seq], "the early view");
            early = Some((v, bytes));
        }
    }
    // A duplicate tag name and tags/flushes inside a sync are not points.
    let dup = src.tag("t4", false);
    let begin = src.bare(RecordKind::SyncBegin, 0, 0);
    let in_sync = vec![src.sync(0, pattern(1, 4096), false), src.tag("during-sync", false)];
    let fl = src.bare(RecordKind::Flush, 0, 0);
    let done = src.bare(RecordKind::SyncDone, 0, begin.header.seq);
    let mut b = vec![dup.clone(), begin];
    b.extend(in_sync);
    b.push(fl.clone());
    b.push(done);
    let last_flush = src.bare(RecordKind::Flush, 0, 0);
    refs.insert(last_flush.header.seq, src.disk.clone());
    b.push(last_flush.clone());
    c.ship(&b).await;

    let pts = points(dir.path()).await;
    assert!(pts.len() >= 60, "{} points", pts.len());
    for seq in [dup.header.seq, fl.header.seq] {
        assert!(pts.iter().all(|p| p.seq != seq), "seq {seq} must not be a point");
    }
    assert!(pts.iter().all(|p| p.tag.as_deref() != Some("during-sync")));
    assert_eq!(pts.last().unwrap().seq, last_flush.header.seq);
    assert_eq!(pts.iter().filter(|p| p.kind == PointKind::App).count(), 3);
    assert_eq!(pts.iter().filter(|p| p.kind == PointKind::Tag).count(), 3);

    // Resolution.
    let d = dir.path().to_path_buf();
    let (tag, app, before) = blocking(move || {
        (
            recovery::resolve(&d, "vm", &AtSpec::parse("t14").unwrap()).unwrap(),
            recovery::resolve(&d, "vm", &AtSpec::LatestApp).unwrap(),
            recovery::resolve(&d, "vm", &AtSpec::Seq(u64::MAX)).unwrap(),
        )
    })
    .await;
    assert_eq!(tag.kind, PointKind::Tag);
    assert_eq!(app.tag.as_deref(), Some("t29"));
    assert_eq!(before.seq, last_flush.header.seq);
    let off = pts[5].seq + 1;
    let d = dir.path().to_path_buf();
    let p = blocking(move || recovery::resolve(&d, "vm", &AtSpec::Seq(off)).unwrap()).await;
    assert!(p.seq <= off && p.seq >= pts[5].seq);

    // Every point, and the view opened at round 3 is unchanged.
    assert_eq!(check_all(dir.path(), &refs).await, pts.len());
    let (v, bytes) = early.take().unwrap();
    assert_same(&read_all(&v).await, &bytes, "the early view after 26 more rounds");
    let ext = {
        let v = v.clone();
        blocking(move || v.allocated(0, v.size()).unwrap()).await
    };
    assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), DISK);
    drop(v);

    // Status.
    let st = &tidemark_target::catalog::disk_states(dir.path()).unwrap()[0];
    assert_eq!(st.oldest_point.as_ref().unwrap().seq, pts[0].seq);
    assert_eq!(st.newest_point.as_ref().unwrap().seq, last_flush.header.seq);
    assert!(st.undo_bytes > 0);
    assert!(st.last_app_point_age_s.is_some());
    assert!(st.failovers.is_empty());
    drop(c);
    t.stop().await;

    // Without a daemon the library reads the directory itself.
    assert_eq!(check_all(dir.path(), &refs).await, pts.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_deletes_old_segments_but_never_what_a_pinned_view_needs() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start_with(dir.path(), |c| {
        c.retention.point_interval = Duration::ZERO;
        c.retention.window = Duration::from_secs(100);
        c.segment_bytes = 64 << 10;
    })
    .await;
    let (mut c, _, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
    let now = now_ns();
    let mut src = Source::new(1);
    src.time_ns = now - 400_000_000_000;
    let mut rng = Rng(11);
    let mut refs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    c.ship(&initial_sync(&mut src)).await;
    // 40 points, 10 s of source time apart: the first ~30 are outside the window.
    let mut pinned_seq = 0;
    let mut pinned: Option<Arc<View>> = None;
    for round in 0..40u64 {
        src.time_ns = now - (400 - round * 10) * 1_000_000_000;
        let mut b = churn(&mut src, &mut rng, 5);
        let f = src.bare(RecordKind::Flush, 0, 0);
        refs.insert(f.header.seq, src.disk.clone());
        b.push(f);
        c.ship(&b).await;
        if round == 3 {
            // Wait out the expiry's rate limit first, so the next batch expires.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            pinned = Some(open_view(dir.path(), AtSpec::Latest).await);
            pinned_seq = pinned.as_ref().unwrap().point().seq;
        }
    }
    let undo_dir = dir.path().join("vm").join("undo");
    let count = || std::fs::read_dir(&undo_dir).unwrap().count();
    let before = count();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut b = churn(&mut src, &mut rng, 5);
    let f = src.bare(RecordKind::Flush, 0, 0);
    refs.insert(f.header.seq, src.disk.clone());
    b.push(f);
    c.ship(&b).await;

    let pts = points(dir.path()).await;
    assert!(pts.iter().any(|p| p.seq == pinned_seq), "a pinned point never expires");
    assert!(pts.len() < 20, "old points expired: {} left", pts.len());
    let v = pinned.take().unwrap();
    assert_same(&read_all(&v).await, &refs[&pinned_seq], "the pinned view");
    let mid = count();
    check_all(dir.path(), &refs).await;
    drop(v);

    // Unpinned: its point and the segments only it needed go.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut b = churn(&mut src, &mut rng, 5);
    let f = src.bare(RecordKind::Flush, 0, 0);
    refs.insert(f.header.seq, src.disk.clone());
    b.push(f);
    c.ship(&b).await;
    let pts = points(dir.path()).await;
    assert!(pts.iter().all(|p| p.seq != pinned_seq));
    let after = count();
    assert!(after < mid && mid <= before + 2, "segments {before} → {mid} → {after}");
    let st = &tidemark_target::catalog::disk_states(dir.path()).unwrap()[0];
    let on_disk: u64 = std::fs::read_dir(&undo_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(st.undo_bytes, on_disk, "the catalog accounts for every segment byte");
    assert!(check_all(dir.path(), &refs).await >= 10);
    drop(c);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_a_barrier_and_failover_stops_applying() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start(dir.path()).await;
    let (mut c, _, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
    let mut src = Source::new(1);
    src.time_ns = now_ns();
    let mut b = initial_sync(&mut src);
    b.push(src.bare(RecordKind::Flush, 0, 0));
    c.ship(&b).await;
    let applied = src.next_seq - 1;

    // The collector says it holds two more records than were applied: the
    // drain waits for them, and ends once they are applied.
    let d = dir.path().to_path_buf();
    let drain = tokio::task::spawn_blocking(move || recovery::drain(&d, "vm", Duration::from_secs(20)));
    let more = vec![src.write(4096, pattern(9, 4096)), src.write(8192, pattern(10, 4096))];
    let last = src.next_seq - 1;
    c.answer_status(last, true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!drain.is_finished(), "the drain ended before seq {last} was applied");
    c.ship(&more).await;
    let got = drain.await.unwrap().unwrap();
    assert_eq!(
        got,
        recovery::Drained {
            applied_seq: last,
            held_seq: last,
            agent_answered: true
        }
    );
    assert!(last > applied);

    // Records the collector holds that never arrive: the drain fails naming them.
    let d = dir.path().to_path_buf();
    let drain = tokio::task::spawn_blocking(move || recovery::drain(&d, "vm", Duration::from_millis(800)));
    c.answer_status(last + 5, false).await;
    let e = drain.await.unwrap().unwrap_err().to_string();
    assert!(
        e.contains(&format!("seq {}", last + 5)) && e.contains(&format!("applied seq {last}")),
        "{e}"
    );
    // An agent in bitmap mode holds writes outside its journal: no barrier.
    let d = dir.path().to_path_buf();
    let drain = tokio::task::spawn_blocking(move || recovery::drain(&d, "vm", Duration::from_secs(5)));
    c.answer_status_in(last, true, tidemark_wire::frame::AgentMode::Bitmap)
        .await;
    let e = drain.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("bitmap mode"), "{e}");
    let d = dir.path().to_path_buf();
    let e = blocking(move || recovery::drain(&d, "other", Duration::from_millis(300)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no disk other"), "{e}");

    // `latest` is the applied state (the writes after the last flush too).
    let pts = points(dir.path()).await;
    let newest = pts.last().unwrap();
    assert_eq!((newest.seq, newest.latest), (last, true));

    // A failover view stops applying; recording it makes that final.
    let d = dir.path().to_path_buf();
    let v = blocking(move || recovery::View::open_for_failover(&d, "vm", &AtSpec::Latest).unwrap()).await;
    assert_eq!(v.point().seq, last);
    blocking(move || v.record_failover(Path::new("/tmp/out.raw")).unwrap()).await;
    // The next batch is refused; so is a new connection.
    c.send_packed(&[src.write(0, pattern(5, 4096))], 0).await;
    loop {
        match c.next().await {
            Some(tidemark_wire::frame::Frame::Error { reason, .. }) => {
                assert!(reason.contains("failed over"), "{reason}");
                break;
            }
            Some(tidemark_wire::frame::Frame::Ack { seq }) => panic!("applied seq {seq} after a failover"),
            Some(_) => {}
            None => panic!("closed without a reason"),
        }
    }
    let (_, reason) = refused(t.addr, hello("vm", uuid(1), 0)).await;
    assert!(reason.contains("failed over"), "{reason}");
    // Failover again at another point is recorded too.
    let d = dir.path().to_path_buf();
    let v = blocking(move || recovery::View::open_for_failover(&d, "vm", &AtSpec::Seq(applied)).unwrap()).await;
    blocking(move || v.record_failover(Path::new("/tmp/out2.raw")).unwrap()).await;
    let st = &tidemark_target::catalog::disk_states(dir.path()).unwrap()[0];
    assert_eq!(st.failovers.len(), 2);
    assert_eq!(st.applied_seq, last);
    t.stop().await;
    // Without a daemon: drain says why it cannot.
    let d = dir.path().to_path_buf();
    let e = blocking(move || recovery::drain(&d, "vm", Duration::from_secs(1)).unwrap_err()).await;
    assert!(e.to_string().contains("no-drain"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_failover_resumes_applying() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start(dir.path()).await;
    let (mut c, _, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
    let mut src = Source::new(1);
    src.time_ns = now_ns();
    let mut b = initial_sync(&mut src);
    b.push(src.bare(RecordKind::Flush, 0, 0));
    c.ship(&b).await;
    let d = dir.path().to_path_buf();
    let v = blocking(move || recovery::View::open_for_failover(&d, "vm", &AtSpec::Latest).unwrap()).await;
    drop(v); // the export failed, or the tool was killed
    tokio::time::sleep(Duration::from_millis(200)).await;
    let w = src.write(0, pattern(7, 4096));
    c.ship(&[w]).await;
    let st = &tidemark_target::catalog::disk_states(dir.path()).unwrap()[0];
    assert!(st.failovers.is_empty());
    assert_eq!(st.applied_seq, src.next_seq - 1);

    // Recorded, then another failover abandoned: the disk stays failed over.
    let d = dir.path().to_path_buf();
    let v = blocking(move || recovery::View::open_for_failover(&d, "vm", &AtSpec::Latest).unwrap()).await;
    blocking(move || v.record_failover(Path::new("/tmp/out.raw")).unwrap()).await;
    let d = dir.path().to_path_buf();
    let v = blocking(move || recovery::View::open_for_failover(&d, "vm", &AtSpec::Latest).unwrap()).await;
    drop(v);
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, reason) = refused(t.addr, hello("vm", uuid(1), 0)).await;
    assert!(reason.contains("failed over"), "{reason}");
    t.stop().await;
}
