//! Crashes at each step of a batch's apply with retention on (failpoints):
//! after a restart and the collector's resend, every listed point still
//! reads as its reference — the undo of a batch whose replica writes had
//! begun is never captured again. One test in this binary, because
//! failpoints are global to the process.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tidemark_target::recovery::{self, AtSpec, View};
use tidemark_wire::frame::Frame;
use tidemark_wire::record::RecordKind;

const DISK: u64 = 256 << 10;

fn read_view(dir: &std::path::Path, seq: u64) -> Vec<u8> {
    let v = View::open(dir, "vm", &AtSpec::Seq(seq)).unwrap();
    assert_eq!(v.point().seq, seq);
    let mut out = vec![0u8; usize::try_from(v.size()).unwrap()];
    v.read_at(&mut out, 0).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_apply_step_keeps_every_point_true() {
    let _scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |c: &mut tidemark_target::Config| {
        c.retention.point_interval = Duration::ZERO;
        c.segment_bytes = 32 << 10;
    };
    let mut src = Source::new(1);
    // Points within the window (records of time 0 would expire at once).
    src.time_ns = now_ns();
    let mut refs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut first = Vec::new();
    let start = src.next_seq;
    for i in 0..DISK / 65536 {
        first.push(src.sync(i * 65536, pattern(i, 65536), true));
    }
    first.push(src.sync_done(start));
    let f = src.bare(RecordKind::Flush, 0, 0);
    refs.insert(f.header.seq, src.disk.clone());
    first.push(f);
    let t = Running::start_with(dir.path(), cfg).await;
    let (mut c, _, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
    c.ship(&first).await;
    drop(c);
    t.stop().await;

    for (round, (step, committed)) in [
        ("target-undo-before-fsync", false),
        ("target-undo-after-capture", false),
        ("target-apply-before-fsync", false),
        ("target-apply-after-fsync", false),
        ("target-before-commit", false),
        ("target-after-commit", true),
        ("target-before-ack", true),
    ]
    .into_iter()
    .enumerate()
    {
        let r = round as u64;
        let before = src.next_seq - 1;
        // The same blocks before and after a point inside the batch, a
        // trim over data, and a write over a hole.
        let mut batch = vec![
            src.write(0, pattern(100 + r, 12288)),
            src.write(70_000, pattern(200 + r, 5000)),
        ];
        let f = src.bare(RecordKind::Flush, 0, 0);
        refs.insert(f.header.seq, src.disk.clone());
        batch.push(f);
        batch.push(src.write(4096, pattern(300 + r, 8192)));
        batch.push(src.trim(65536, 65536));
        batch.push(src.write(70_000 + 4096 * r, pattern(400 + r, 3000)));
        let f = src.bare(RecordKind::Flush, 0, 0);
        refs.insert(f.header.seq, src.disk.clone());
        batch.push(f);
        batch.push(src.write(0, pattern(500 + r, 1000)));
        let last = batch.last().unwrap().header.seq;
        // With a point interval of 0 the crashed attempt made every
        // flush a point and captured for it, so the re-applied batch makes
        // the same points again: every Flush stays a point whatever the
        // step (a thinning interval is what stops re-made points; see
        // docs/retention.md).

        let t = Running::start_with(dir.path(), cfg).await;
        let (mut c, acked, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
        assert_eq!(acked, before, "{step}");
        fail::cfg(step, "1*return").unwrap();
        c.send_packed(&batch, 0).await;
        while let Some(f) = c.next().await {
            if let Frame::Ack { seq } = f {
                panic!("{step}: acked {seq}");
            }
        }
        fail::remove(step);
        drop(c);
        t.stop().await;
        if !committed && step != "target-undo-before-fsync" {
            // The replica may hold part of the batch: the applied seq is
            // not offered as `latest` until the batch is applied again.
            let d = dir.path().to_path_buf();
            let pts = tokio::task::spawn_blocking(move || recovery::points(&d, "vm").unwrap())
                .await
                .unwrap();
            assert!(
                pts.iter().all(|p| !p.latest),
                "{step}: latest offered over a torn replica"
            );
        }

        let t = Running::start_with(dir.path(), cfg).await;
        let (mut c, acked, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
        assert_eq!(acked, if committed { last } else { before }, "{step}");
        c.send_packed(&batch, 0).await;
        c.ack(last).await;
        assert_replica(dir.path(), "vm", &src.disk);
        let d = dir.path().to_path_buf();
        let refs2 = refs.clone();
        let now = src.disk.clone();
        let n = tokio::task::spawn_blocking(move || {
            let pts = recovery::points(&d, "vm").unwrap();
            // The writes after the last flush: the applied state is `latest`.
            let newest = pts.last().unwrap();
            assert!(
                newest.latest && newest.seq == last,
                "{step}: latest is the applied seq {last}"
            );
            for p in &pts {
                let got = read_view(&d, p.seq);
                let want = if p.latest { &now } else { &refs2[&p.seq] };
                if let Some(i) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
                    panic!("{step}: point {} differs from its reference at byte {i}", p.seq);
                }
            }
            pts.iter().filter(|p| !p.latest).count()
        })
        .await
        .unwrap();
        assert_eq!(n, refs.len(), "{step}: every Flush is a point");
        // The view opened at the applied state recorded it as a point.
        refs.insert(last, src.disk.clone());
        drop(c);
        t.stop().await;
    }
}
