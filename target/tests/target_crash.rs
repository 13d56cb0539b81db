//! Crashes at each durability step, injected with failpoints: the batch in
//! flight is re-applied idempotently after a restart and the replica
//! converges. One test in this binary, because failpoints are global to
//! the process.

mod common;

use common::*;
use tidemark_wire::frame::ReplicaState;

#[tokio::test]
async fn a_batch_interrupted_at_any_durability_step_is_reapplied_after_a_restart() {
    let _scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let mut src = Source::new(1);
    let sync: Vec<_> = {
        let start = src.next_seq;
        let mut v: Vec<_> = (0..4u64)
            .map(|i| src.sync(i * 65536, pattern(i, 65536), true))
            .collect();
        v.push(src.sync_done(start));
        v
    };
    let t = Running::start(dir.path()).await;
    let (mut c, _, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
    c.ship(&sync).await;
    drop(c);
    t.stop().await;

    for (step, committed) in [
        ("target-apply-before-fsync", false),
        ("target-apply-after-fsync", false),
        ("target-before-commit", false),
        ("target-after-commit", true),
        ("target-before-ack", true),
        ("target-after-ack", true),
    ] {
        let before = src.next_seq - 1;
        // Overlapping writes, so that a wrong order or a lost one shows.
        let batch = vec![
            src.write(0, pattern(src.next_seq, 8192)),
            src.trim(4096, 4096),
            src.write(2048, pattern(src.next_seq + 7, 4096)),
        ];
        let last = batch.last().unwrap().header.seq;

        let t = Running::start(dir.path()).await;
        let (mut c, acked, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
        assert_eq!(acked, before, "{step}");
        fail::cfg(step, "1*return").unwrap();
        c.send_packed(&batch, 0).await;
        // The connection ends without an ack (or right after it, for
        // after-ack), like a process killed at that step.
        loop {
            match c.next().await {
                None => break,
                Some(tidemark_wire::frame::Frame::Ack { seq }) => assert_eq!((seq, step), (last, "target-after-ack")),
                Some(_) => {}
            }
        }
        fail::remove(step);
        drop(c);
        t.stop().await;

        let t = Running::start(dir.path()).await;
        let (mut c, acked, _) = Conn::open(t.addr, hello("vm", uuid(1), 0)).await;
        assert_eq!(acked, if committed { last } else { before }, "{step}");
        // The collector resends from its acked seq; both cases end equal.
        c.send_packed(&batch, 0).await;
        c.ack(last).await;
        let st = c.state_where(|_| true).await;
        assert_eq!(st.state, ReplicaState::Consistent, "{step}");
        assert_replica(dir.path(), "vm", &src.disk);
        drop(c);
        t.stop().await;
    }
}
