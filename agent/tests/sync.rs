//! The sync driver and the fence: a disk synced while clients write to it
//! yields a journal whose replay onto a blank disk equals the disk; a write
//! overlapping a chunk being synced is journaled after the chunk's records;
//! bitmap mode ends below half the cap and its dirty regions are resynced.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_agent::config::{ListenAddr, ProtectConfig};
use tidemark_agent::run::open;
use tidemark_agent::shim::{ChunkOutcome, Mode, Shim, Zeroing};
use tidemark_agent::status::Status;
use tidemark_agent::sync;
use tidemark_agent::sync_state::{self, SyncKind};
use tidemark_formats::apply::{apply_record, whole};
use tidemark_formats::journal::{Journal, JournalReader};
use tidemark_util::fileops::BackingKind;
use tidemark_wire::frame::AgentMode;
use tidemark_wire::record::{Record, RecordKind, FLAG_FULL, FLAG_SYNC};
use tokio_util::sync::CancellationToken;

fn cfg(dir: &Path, size: u64, cap: u64) -> ProtectConfig {
    ProtectConfig {
        disk: dir.join("disk.img"),
        state: dir.join("state"),
        listen: Some(ListenAddr::Unix(dir.join("unused.sock"))),
        ublk: None,
        disk_id: "sync".parse().unwrap(),
        create_size: Some(size),
        journal_cap: Some(cap),
        bench_consume: false,
        // As with --collector (the tests run the driver themselves and
        // never connect): the first run journals the initial SyncBegin.
        ship: Some(tidemark_agent::ship::ShipConfig {
            addr: "127.0.0.1:9".into(),
            token: b"unused".to_vec(),
            force_resync: false,
            security: tidemark_net::Security::Plaintext,
            enroll: None,
        }),
    }
}

/// xorshift64*: deterministic, dependency-free randomness for the tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn usz(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

/// A disk with history: data, written zeros (allocated) and holes.
fn pre_fill(path: &Path, size: u64, rng: &mut Rng) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    for _ in 0..40 {
        let off = rng.below(size / 4096) * 4096;
        let len = (1 + rng.below(64)) * 4096;
        let len = len.min(size - off);
        let byte = u8::try_from(rng.below(3)).unwrap();
        let data: Vec<u8> = (0..len)
            .map(|i| {
                if byte == 0 {
                    0
                } else {
                    u8::try_from(i % 256).unwrap().wrapping_mul(byte) | 1
                }
            })
            .collect();
        f.write_all_at(&data, off).unwrap();
    }
    f.sync_all().unwrap();
}

fn all_records(state: &Path, from: u64) -> Vec<Record> {
    let r = JournalReader::open(&state.join("journal")).unwrap();
    r.records_from(from).map(|r| r.unwrap()).collect()
}

/// Apply records to `img` (created blank if missing), checking seqs are
/// consecutive from `from`.
fn apply_to(img: &Path, size: u64, recs: &[Record], from: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(img)
        .unwrap();
    f.set_len(size).unwrap();
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.header.seq, from + i as u64, "seqs are not consecutive");
        apply_record(&f, img, BackingKind::File, size, &r.header, &r.payload, whole).unwrap();
    }
}

fn run_driver(shim: &Shim, rt: &tokio::runtime::Runtime, stop: &CancellationToken) -> std::thread::JoinHandle<()> {
    let (shim, stop, h) = (shim.clone(), stop.clone(), rt.handle().clone());
    std::thread::spawn(move || sync::run(shim, &stop, move |t| h.block_on(t.wait())))
}

fn wait_sync_done(shim: &Shim, mut between: impl FnMut()) {
    let t = Instant::now();
    loop {
        between();
        let f = shim.inner().sync.snapshot();
        if f.kind.is_none() && shim.dirty().0 == 0 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "sync did not finish: {f:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// At least `ops` random requests, and on until `until` is set.
async fn random_io(shim: Shim, size: u64, seed: u64, ops: usize, until: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    for i in 0.. {
        if i >= ops && until.load(Ordering::Relaxed) {
            break;
        }
        let off = rng.below(size / 512) * 512;
        let len = ((1 + rng.below(256)) * 512).min(size - off);
        match rng.below(10) {
            0 => shim.trim(off, len, false).await.unwrap(),
            1 => shim.write_zeroes(off, len, Zeroing::default()).await.unwrap(),
            2 => shim.flush().await.unwrap(),
            _ => {
                let b = u8::try_from(i % 251).unwrap() | 1;
                shim.write(off, vec![b; usz(len)], false).await.unwrap()
            }
        }
        if i % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

/// The initial sync of a disk with history, under concurrent client I/O
/// from several tasks, with a crash and restart in the middle for some
/// seeds: the journal, replayed onto a blank disk, equals the disk.
#[test]
fn initial_sync_under_concurrent_writes_replays_to_the_disk() {
    const SIZE: u64 = 24 << 20;
    // Widen the window between a chunk's read and its append, so a write
    // slipping in between (no fence) would be caught.
    fail::cfg("agent-sync-before-append", "sleep(3)").unwrap();
    let mut fence_waits = 0;
    for seed in 1..=6u64 {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path(), SIZE, 512 << 20);
        let mut rng = Rng(seed * 7919);
        pre_fill(&c.disk, SIZE, &mut rng);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .enable_all()
            .build()
            .unwrap();
        let o = open(&c).unwrap();
        let shim = o.shim.clone();
        assert_eq!(shim.inner().sync.snapshot().kind, Some(SyncKind::Initial));
        let stop = CancellationToken::new();
        let driver = run_driver(&shim, &rt, &stop);
        let crash = seed % 2 == 0;
        let until = Arc::new(AtomicBool::new(crash));
        let tasks: Vec<_> = (0..4)
            .map(|t| rt.spawn(random_io(shim.clone(), SIZE, seed * 100 + t, 300, until.clone())))
            .collect();
        if !crash {
            wait_sync_done(&shim, || {});
            until.store(true, Ordering::Relaxed);
        }
        rt.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
        let (shim, _o) = if crash {
            // Stop the driver wherever it is and "crash": no clean marker.
            stop.cancel();
            driver.join().unwrap();
            fence_waits += shim.inner().stats.fence_waits.load(Ordering::Relaxed);
            drop(shim);
            drop(o);
            let o = open(&c).unwrap();
            let shim = o.shim.clone();
            let stop = CancellationToken::new();
            let driver = run_driver(&shim, &rt, &stop);
            rt.block_on(random_io(
                shim.clone(),
                SIZE,
                seed * 1000,
                100,
                Arc::new(AtomicBool::new(true)),
            ));
            wait_sync_done(&shim, || {});
            stop.cancel();
            driver.join().unwrap();
            (shim, o)
        } else {
            wait_sync_done(&shim, || {});
            stop.cancel();
            driver.join().unwrap();
            fence_waits += shim.inner().stats.fence_waits.load(Ordering::Relaxed);
            (shim, o)
        };
        rt.block_on(shim.flush()).unwrap();

        let recs = all_records(&c.state, 1);
        let done: Vec<&Record> = recs.iter().filter(|r| r.header.kind == RecordKind::SyncDone).collect();
        assert!(!done.is_empty(), "seed {seed}: no SyncDone");
        assert_eq!(done[0].header.flags, FLAG_FULL);
        assert_eq!(done[0].header.offset, 1, "an initial sync starts at seq 1");
        assert_eq!(
            (recs[0].header.seq, recs[0].header.kind, recs[0].header.flags),
            (1, RecordKind::SyncBegin, FLAG_FULL),
            "a new journal begins with the initial sync's SyncBegin"
        );
        for r in &recs {
            match r.header.kind {
                RecordKind::Sync => {
                    assert!(r.payload.len() <= 1 << 20);
                    assert_eq!(r.header.flags, FLAG_FULL);
                    assert!(r.payload.chunks(4096).any(|b| b.iter().any(|&x| x != 0)));
                }
                RecordKind::Zero if r.header.flags != 0 => assert_eq!(r.header.flags, FLAG_SYNC | FLAG_FULL),
                _ => {}
            }
        }
        let replay = d.path().join("replay.img");
        apply_to(&replay, SIZE, &recs, 1);
        let disk = std::fs::read(&c.disk).unwrap();
        assert!(
            std::fs::read(&replay).unwrap() == disk,
            "seed {seed}: the journal replayed onto a blank disk differs from the disk"
        );
        let st = Status::of(&shim);
        assert!(st.sync.is_none());
        assert_eq!(st.full_resyncs, 0, "the initial sync is not a full resync");
    }
    eprintln!("client writes that waited for a fence: {fence_waits}");
}

/// A write overlapping a fenced chunk waits and is journaled after the
/// chunk's records (so the chunk holds the data from before it); a write
/// elsewhere goes on meanwhile.
#[test]
fn fence_orders_overlapping_writes_after_the_chunk() {
    const SIZE: u64 = 4 << 20;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), SIZE, 64 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let o = open(&c).unwrap();
    let shim = o.shim.clone();
    rt.block_on(shim.write(0, vec![1u8; 1 << 20], false)).unwrap();
    shim.mark_for_resync(0, 1 << 20).unwrap();
    let before = shim.core().journal.next_seq();
    let mut pending = None;
    let outcome = shim
        .sync_chunk(0, 1 << 20, false, None, |ticket| {
            rt.block_on(async {
                ticket.wait().await;
                // Overlapping: must wait for the fence.
                let s = shim.clone();
                let a = tokio::spawn(async move { s.write(4096, vec![2u8; 8192], false).await });
                // Elsewhere: goes through at once.
                tokio::time::timeout(Duration::from_secs(5), shim.write(2 << 20, vec![3u8; 4096], false))
                    .await
                    .expect("a write outside the fence was held up")
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(!a.is_finished(), "a write overlapping the fence went through");
                pending = Some(a);
            })
        })
        .unwrap();
    let ChunkOutcome::Appended { first, last, records } = outcome else {
        panic!("chunk not appended: {outcome:?}");
    };
    assert_eq!(records, 1);
    assert_eq!(
        first,
        before + 1,
        "the write outside the fence took the seq before the chunk"
    );
    rt.block_on(pending.unwrap()).unwrap().unwrap();
    assert!(shim.inner().stats.fence_waits.load(Ordering::Relaxed) >= 1);
    let recs = all_records(&c.state, 1);
    let sync = recs.iter().find(|r| r.header.kind == RecordKind::Sync).unwrap();
    assert_eq!(sync.header.seq, last);
    assert!(
        sync.payload.iter().all(|&b| b == 1),
        "the chunk holds data written after its read"
    );
    let late = recs.last().unwrap();
    assert_eq!(
        (late.header.kind, late.header.offset, late.header.seq),
        (RecordKind::Write, 4096, last + 1)
    );
    assert_eq!(shim.dirty().0, 0, "the chunk's regions are clean");
    let replay = d.path().join("replay.img");
    apply_to(&replay, SIZE, &recs, 1);
    assert!(std::fs::read(&replay).unwrap() == std::fs::read(&c.disk).unwrap());
}

/// Bitmap mode ends once the journal is below half its cap; the regions
/// written meanwhile are resynced and a replica fed everything shipped
/// equals the disk.
#[test]
fn bitmap_mode_exit_resyncs_dirty_regions() {
    const SIZE: u64 = 16 << 20;
    const CAP: u64 = 4 << 20;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), SIZE, CAP);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let o = open(&c).unwrap();
    let shim = o.shim.clone();
    let replica = d.path().join("replica.img");
    let jdir = c.state.join("journal");
    // Stand-in for the collector and target: apply what the journal holds
    // past `shipped`, then consume it.
    let mut shipped = 0u64;
    // SyncBegin seq → flags, and every SyncDone, of what was shipped.
    let mut begins = std::collections::BTreeMap::new();
    let mut done: Vec<Record> = Vec::new();
    let mut ship = |consume: bool| {
        let upto = shim.applied_watermark();
        let recs: Vec<Record> = all_records(&c.state, shipped + 1)
            .into_iter()
            .take_while(|r| r.header.seq <= upto)
            .collect();
        for r in &recs {
            match r.header.kind {
                RecordKind::SyncBegin => {
                    begins.insert(r.header.seq, r.header.flags);
                }
                RecordKind::SyncDone => done.push(r.clone()),
                _ => {}
            }
        }
        apply_to(&replica, SIZE, &recs, shipped + 1);
        shipped += recs.len() as u64;
        if consume && shipped > shim.core().journal.consumed_seq() {
            Journal::persist_consumed(&jdir, shipped).unwrap();
            shim.core().journal.recycle(shipped).unwrap();
            shim.maybe_exit_bitmap_mode();
        }
    };
    let stop = CancellationToken::new();
    let driver = run_driver(&shim, &rt, &stop);
    wait_sync_done(&shim, || ship(true));

    // Past the cap: bitmap mode.
    let mut rng = Rng(42);
    let mut writes = 0;
    while shim.mode() == Mode::Journal {
        let off = rng.below(SIZE / 4096 - 32) * 4096;
        rt.block_on(shim.write(off, vec![u8::try_from(writes % 200).unwrap() + 1; 128 << 10], false))
            .unwrap();
        writes += 1;
        assert!(writes < 1000, "bitmap mode never entered");
    }
    for _ in 0..10 {
        let off = rng.below(SIZE / 4096 - 32) * 4096;
        rt.block_on(shim.write(off, vec![0xee; 96 << 10], false)).unwrap();
    }
    let st = Status::of(&shim);
    assert_eq!(st.mode, Mode::Bitmap);
    assert!(st.bitmap_dirty_regions > 0);
    assert_eq!(st.replication_mode, "bitmap");
    assert_eq!(st.mode_changes, 1);
    // The driver does not sync in bitmap mode.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(shim.mode(), Mode::Bitmap);

    // Acks resume: the journal drains below half its cap, the mode returns
    // to journal and the dirty regions are resynced (more acks as it goes).
    wait_sync_done(&shim, || ship(true));
    stop.cancel();
    driver.join().unwrap();
    ship(false);
    let st = Status::of(&shim);
    assert_eq!(st.mode, Mode::Journal);
    assert_eq!(st.mode_changes, 2, "entering and leaving bitmap mode are both counted");
    assert_eq!(st.bitmap_dirty_regions, 0);
    assert_eq!(st.replication_mode, "streaming");
    let last = done.last().expect("a SyncDone after the resync");
    assert_eq!(last.header.flags, 0, "a resync is not a whole-disk sync");
    assert!(last.header.offset > 1);
    assert_eq!(
        begins.get(&last.header.offset),
        Some(&0),
        "the resync's start seq is its SyncBegin: {begins:?}"
    );
    assert_eq!(begins.get(&1), Some(&FLAG_FULL), "the initial sync's SyncBegin");
    rt.block_on(shim.flush()).unwrap();
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(&c.disk).unwrap(),
        "the replica fed everything shipped differs from the disk"
    );
}

/// A machine crash leaves a resync-required marker; the driver records a
/// full resync (counted), then drops the marker, and completes it.
#[test]
fn machine_crash_means_a_counted_full_resync() {
    const SIZE: u64 = 4 << 20;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), SIZE, 64 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    {
        let o = open(&c).unwrap();
        let stop = CancellationToken::new();
        let driver = run_driver(&o.shim, &rt, &stop);
        wait_sync_done(&o.shim, || {});
        stop.cancel();
        driver.join().unwrap();
        rt.block_on(o.shim.write(8192, vec![9; 4096], false)).unwrap();
    }
    std::fs::write(c.state.join("boot_id"), "another-boot\n").unwrap();
    let o = open(&c).unwrap();
    assert!(o.shim.resync_required());
    let next = o.shim.core().journal.next_seq();
    let stop = CancellationToken::new();
    let driver = run_driver(&o.shim, &rt, &stop);
    let t = Instant::now();
    while o.shim.resync_required() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the full resync was never recorded"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_sync_done(&o.shim, || {});
    stop.cancel();
    driver.join().unwrap();
    assert!(!c.state.join("resync-required").exists());
    let f = sync_state::load(&c.state).unwrap().unwrap();
    assert_eq!((f.full_resyncs, f.kind, f.last_full_start), (1, None, next));
    let recs = all_records(&c.state, 1);
    let last = recs.last().unwrap();
    assert_eq!(
        (last.header.kind, last.header.flags, last.header.offset),
        (RecordKind::SyncDone, FLAG_FULL, next)
    );
    let begin = recs.iter().find(|r| r.header.seq == next).unwrap();
    assert_eq!(
        (begin.header.kind, begin.header.flags),
        (RecordKind::SyncBegin, FLAG_FULL)
    );
}

/// Regions waiting for a resync make the agent report `resync`, even
/// before the driver has started it; the resync begins with a SyncBegin.
#[test]
fn dirty_regions_report_resync_before_the_driver_starts() {
    const SIZE: u64 = 4 << 20;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), SIZE, 64 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let o = open(&c).unwrap();
    let shim = o.shim.clone();
    let stop = CancellationToken::new();
    let driver = run_driver(&shim, &rt, &stop);
    wait_sync_done(&shim, || {});
    stop.cancel();
    driver.join().unwrap();
    assert_eq!(shim.progress().mode, AgentMode::Streaming);
    shim.mark_for_resync(1 << 20, 8192).unwrap();
    let p = shim.progress();
    assert_eq!(p.mode, AgentMode::Resync, "dirty regions waiting, but not reported");
    assert!(p.sync_total > 0 && p.sync_done == 0);
    assert_eq!(Status::of(&shim).replication_mode, "resync");
    let next = shim.core().journal.next_seq();
    let stop = CancellationToken::new();
    let driver = run_driver(&shim, &rt, &stop);
    wait_sync_done(&shim, || {});
    stop.cancel();
    driver.join().unwrap();
    let recs = all_records(&c.state, next);
    assert_eq!((recs[0].header.kind, recs[0].header.flags), (RecordKind::SyncBegin, 0));
    let last = recs.last().unwrap();
    assert_eq!((last.header.kind, last.header.offset), (RecordKind::SyncDone, next));
    assert_eq!(shim.progress().mode, AgentMode::Streaming);
}

/// A crash (`agent-sync-after-append` panics the driver; the process state
/// is then dropped without a clean stop) in the middle of the initial sync,
/// under client writes: after the restart the sync completes, and the
/// journal replayed onto a blank disk equals the disk.
#[test]
fn crash_after_a_sync_append_mid_initial_sync() {
    const SIZE: u64 = 16 << 20;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), SIZE, 512 << 20);
    let mut rng = Rng(77);
    pre_fill(&c.disk, SIZE, &mut rng);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    // The 6th chunk's append is the last thing the first life does.
    fail::cfg("agent-sync-after-append", "5*off->panic").unwrap();
    let o = open(&c).unwrap();
    let shim = o.shim.clone();
    let stop = CancellationToken::new();
    let driver = run_driver(&shim, &rt, &stop);
    let until = Arc::new(AtomicBool::new(false));
    let io = rt.spawn(random_io(shim.clone(), SIZE, 5, 100, until.clone()));
    assert!(driver.join().is_err(), "the failpoint did not fire");
    fail::remove("agent-sync-after-append");
    until.store(true, Ordering::Relaxed);
    rt.block_on(io).unwrap();
    let dirty = shim.dirty().0;
    assert!(dirty > 0, "the sync was not interrupted mid-way");
    assert!(shim.inner().sync.snapshot().kind == Some(SyncKind::Initial));
    drop(shim);
    drop(o);

    let o = open(&c).unwrap();
    let shim = o.shim.clone();
    assert_eq!(shim.inner().sync.snapshot().kind, Some(SyncKind::Initial));
    let stop = CancellationToken::new();
    let driver = run_driver(&shim, &rt, &stop);
    rt.block_on(random_io(shim.clone(), SIZE, 6, 100, Arc::new(AtomicBool::new(true))));
    wait_sync_done(&shim, || {});
    stop.cancel();
    driver.join().unwrap();
    rt.block_on(shim.flush()).unwrap();
    let recs = all_records(&c.state, 1);
    let done: Vec<&Record> = recs.iter().filter(|r| r.header.kind == RecordKind::SyncDone).collect();
    assert_eq!(done.len(), 1);
    // The sync's start seq is its SyncBegin's (seq 1 when a collector is
    // configured at the first run; here, without one, the driver journals it
    // when it starts).
    let begin = recs
        .iter()
        .find(|r| r.header.kind == RecordKind::SyncBegin && r.header.flags == FLAG_FULL)
        .map(|r| r.header.seq)
        .expect("a SyncBegin");
    assert_eq!((done[0].header.flags, done[0].header.offset), (FLAG_FULL, begin));
    let replay = d.path().join("replay.img");
    apply_to(&replay, SIZE, &recs, 1);
    assert!(
        std::fs::read(&replay).unwrap() == std::fs::read(&c.disk).unwrap(),
        "the journal replayed onto a blank disk differs from the disk"
    );
}

/// A collector ahead of the journal while a sync runs: the full resync is
/// recorded and the journal advanced before the driver appends anything
/// more, so the records from the new next seq on, applied onto any old
/// image, give the disk (no chunk's records are lost to the advance).
#[test]
fn advance_past_the_collector_loses_no_sync_chunk() {
    const SIZE: u64 = 16 << 20;
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), SIZE, 512 << 20);
    let mut rng = Rng(99);
    pre_fill(&c.disk, SIZE, &mut rng);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Chunks take a while between read and append.
    fail::cfg("agent-sync-before-append", "sleep(20)").unwrap();
    let o = open(&c).unwrap();
    let shim = o.shim.clone();
    let stop = CancellationToken::new();
    let driver = run_driver(&shim, &rt, &stop);
    std::thread::sleep(Duration::from_millis(50));
    let ahead = shim.core().journal.next_seq() + 1000;
    sync::begin_full_from(&shim, ahead + 1).unwrap();
    fail::remove("agent-sync-before-append");
    wait_sync_done(&shim, || {});
    stop.cancel();
    driver.join().unwrap();
    rt.block_on(shim.flush()).unwrap();
    let recs = all_records(&c.state, 0);
    assert_eq!(recs[0].header.seq, ahead + 1);
    assert_eq!(
        (recs[0].header.kind, recs[0].header.flags),
        (RecordKind::SyncBegin, FLAG_FULL)
    );
    assert_eq!(shim.inner().sync.snapshot().last_full_start, ahead + 1);
    // An old image: garbage everywhere.
    let img = d.path().join("old.img");
    std::fs::write(&img, vec![0xa5u8; usz(SIZE)]).unwrap();
    apply_to(&img, SIZE, &recs, ahead + 1);
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&c.disk).unwrap());
}
