//! The target as a service: a fake collector speaks real frames to it over
//! loopback TCP.

mod common;

use common::*;
use tidemark_target::catalog::disk_states;
use tidemark_wire::frame::{
    ErrorCode, Frame, ReplicaState, Request, Role, HELLO_FORCE_RESYNC, PACKED_GAP, WELCOME_NEED_FULL_SYNC,
};
use tidemark_wire::record::RecordKind;

const MIB: u64 = 1 << 20;

/// Initial sync of a 1 MiB disk: data in the first half, zeros after.
fn initial_sync(src: &mut Source) -> Vec<tidemark_wire::record::Record> {
    let start = src.next_seq;
    let mut v = Vec::new();
    for i in 0..8u64 {
        v.push(src.sync(i * 65536, pattern(i, 65536), true));
    }
    v.push(src.sync_zero(MIB / 2, MIB / 2, true));
    v.push(src.sync_done(start));
    v
}

#[tokio::test]
async fn packed_batches_are_applied_acked_and_resends_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start_with(dir.path(), |c| c.metrics_listen = Some("127.0.0.1:0".into())).await;
    let (mut c, acked, flags) = Conn::open(t.addr, hello("vm1", uuid(1), 0)).await;
    assert_eq!(acked, 0);
    assert_eq!(flags, WELCOME_NEED_FULL_SYNC);
    let st = c.state_where(|_| true).await;
    assert_eq!(st.state, ReplicaState::Syncing);

    let mut src = Source::new(1);
    let sync = initial_sync(&mut src);
    c.ship(&sync).await;
    let st = c.state_where(|s| s.applied_seq == 10).await;
    assert_eq!(st.state, ReplicaState::Consistent);
    assert!(c.requests().is_empty(), "a stream from seq 1 needs no full resync");

    // Client writes: repeated blocks (dedup references), zero blocks, a
    // trim, a tag, a flush, unaligned writes.
    let block = pattern(99, 4096);
    let mut batch = Vec::new();
    for i in 0..16u64 {
        batch.push(src.write(i * 8192, block.clone()));
    }
    batch.push(src.write(MIB - 4096, vec![0u8; 4096]));
    batch.push(src.trim(65536, 3 * 4096));
    batch.push(src.write(1000, pattern(7, 3000)));
    batch.push(src.bare(RecordKind::Flush, 0, 0));
    c.ship(&batch).await;
    let mut tag = src.bare(RecordKind::Tag, 0, 0);
    tag.payload = b"nightly".to_vec();
    tag.header = tidemark_wire::record::RecordHeader::new(RecordKind::Tag, tag.header.seq, 0, 0, 0, b"nightly");
    c.ship(&[tag.clone()]).await;
    assert_replica(dir.path(), "vm1", &src.disk);

    // The same batch again (a resend after a lost ack): acked, not reapplied.
    c.send_packed(&[tag.clone()], 0).await;
    c.ack(tag.header.seq).await;
    assert_replica(dir.path(), "vm1", &src.disk);

    let states = disk_states(dir.path()).unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].disk_id, "vm1");
    assert_eq!(states[0].applied_seq, tag.header.seq);
    assert_eq!(states[0].state, "consistent");
    assert_eq!(states[0].first_seq, Some(1));

    // The metrics endpoint exports every declared metric, with this disk's numbers.
    let (code, body) = scrape(t.metrics.unwrap()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(tidemark_util::metrics::unsampled(&body), Vec::<String>::new(), "{body}");
    assert!(body.matches("# TYPE ").count() >= 16, "{body}");
    let applied = format!("tidemark_target_disk_applied_seq{{disk=\"vm1\"}} {}\n", tag.header.seq);
    assert!(body.contains(&applied), "{body}");
    assert!(
        body.contains("tidemark_target_disk_connected{disk=\"vm1\"} 1\n"),
        "{body}"
    );
    assert!(
        body.contains("tidemark_target_disk_consistent{disk=\"vm1\"} 1\n"),
        "{body}"
    );
    // Four batches applied (sync, writes, tag, the resend's empty apply).
    assert!(
        !body.contains("tidemark_target_disk_batches_applied_total{disk=\"vm1\"} 0\n"),
        "{body}"
    );

    // A reconnect resumes from the applied seq, with an empty window.
    drop(c);
    let (mut c, acked, flags) = Conn::open(t.addr, hello("vm1", uuid(1), 0)).await;
    assert_eq!((acked, flags), (tag.header.seq, 0));
    let w = src.write(0, block.clone());
    c.ship(&[w]).await;
    assert_replica(dir.path(), "vm1", &src.disk);
    t.stop().await;
}

#[tokio::test]
async fn a_bad_hash_halts_the_disk_until_a_later_sync_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start(dir.path()).await;
    let (mut c, _, _) = Conn::open(t.addr, hello("db", uuid(2), 0)).await;
    let mut src = Source::new(1);
    c.ship(&initial_sync(&mut src)).await;

    let good_before = src.write(0, pattern(1, 4096));
    let bad = src.corrupt_write(131072, pattern(2, 8192));
    let bad_seq = bad.header.seq;
    let good_after = src.write(262144, pattern(3, 4096));
    c.ship(&[good_before, bad, good_after]).await;
    // Not applied (the reference disk never took it), later records applied.
    assert_replica(dir.path(), "db", &src.disk);
    let st = c.state_where(|s| s.state == ReplicaState::Halted).await;
    assert_eq!(st.halted_seq, bad_seq);
    assert_eq!(st.pending_bytes, 8192);
    assert_eq!(
        c.requests(),
        vec![Request::Resync {
            seq: bad_seq,
            offset: 131072,
            length: 8192
        }]
    );
    assert_eq!(disk_states(dir.path()).unwrap()[0].halted_seq, Some(bad_seq));

    // The halt survives a restart, and the request is repeated.
    drop(c);
    t.stop().await;
    let t = Running::start(dir.path()).await;
    let (mut c, acked, _) = Conn::open(t.addr, hello("db", uuid(2), 0)).await;
    assert_eq!(acked, bad_seq + 1);
    let st = c.state_where(|_| true).await;
    assert_eq!(st.state, ReplicaState::Halted);
    assert!(c.requests().contains(&Request::Resync {
        seq: bad_seq,
        offset: 131072,
        length: 8192
    }));

    // A client write over the range does not end the halt; the resync does.
    let w = src.write(131072, pattern(4, 4096));
    c.ship(&[w]).await;
    let s1 = src.sync(131072, src.disk[131072..135168].to_vec(), false);
    c.ship(&[s1]).await;
    let st = c.state_where(|s| s.applied_seq == src.next_seq - 1).await;
    assert_eq!(st.state, ReplicaState::Halted);
    assert_eq!(st.pending_bytes, 4096);
    let z = src.sync_zero(135168, 4096, false);
    c.ship(&[z]).await;
    let st = c.state_where(|s| s.state != ReplicaState::Halted).await;
    assert_eq!(st.state, ReplicaState::Consistent);
    assert_replica(dir.path(), "db", &src.disk);
    let s = &disk_states(dir.path()).unwrap()[0];
    assert_eq!(s.halted_seq, None);
    assert!(s.halts[0].covered);
    t.stop().await;
}

#[tokio::test]
async fn a_late_start_or_a_flagged_gap_asks_for_a_full_resync() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start(dir.path()).await;
    let (mut c, _, flags) = Conn::open(t.addr, hello("late", uuid(3), 0)).await;
    assert_eq!(flags, WELCOME_NEED_FULL_SYNC);
    let mut src = Source::new(500);
    let w = src.write(0, pattern(1, 4096));
    c.ship(&[w]).await;
    c.collect_for(std::time::Duration::from_millis(100)).await;
    assert_eq!(c.requests(), vec![Request::FullResync]);
    let st = c.state_where(|_| true).await;
    assert_eq!(st.state, ReplicaState::Syncing);

    // The full sync that follows makes it consistent.
    c.ship(&initial_sync(&mut src)).await;
    let st = c.state_where(|s| s.state == ReplicaState::Consistent).await;
    assert_eq!(st.applied_seq, src.next_seq - 1);
    assert_replica(dir.path(), "late", &src.disk);

    // A gap without PACKED_GAP is refused, naming both seqs.
    src.next_seq += 5;
    let expected = src.next_seq - 5;
    let w = src.write(0, pattern(2, 4096));
    c.send_packed(std::slice::from_ref(&w), 0).await;
    let reason = loop {
        match c.next().await {
            Some(Frame::Error { code, reason }) => {
                assert_eq!(code, ErrorCode::Malformed);
                break reason;
            }
            Some(_) => {}
            None => panic!("closed without an Error"),
        }
    };
    assert!(reason.contains(&format!("expected seq {expected}")), "{reason}");
    assert!(reason.contains(&format!("starts at {}", w.header.seq)), "{reason}");

    // With the flag it is accepted, and the disk awaits a full sync again.
    let (mut c, _, _) = Conn::open(t.addr, hello("late", uuid(3), 0)).await;
    c.send_packed(std::slice::from_ref(&w), PACKED_GAP).await;
    c.ack(w.header.seq).await;
    let st = c.state_where(|s| s.applied_seq == w.header.seq).await;
    assert_eq!(st.state, ReplicaState::Syncing);
    c.collect_for(std::time::Duration::from_millis(100)).await;
    assert!(c.requests().contains(&Request::FullResync));
    t.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_while_another_disk_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start(dir.path()).await;
    let (mut a, _, _) = Conn::open(t.addr, hello("a", uuid(10), 0)).await;
    let mut src = Source::new(1);
    a.ship(&initial_sync(&mut src)).await;

    let mut h = hello("b", uuid(11), 0);
    h.token = b"wrong".to_vec();
    let (code, reason) = refused(t.addr, h).await;
    assert_eq!(code, ErrorCode::BadToken);
    assert!(reason.contains("token"), "{reason}");

    let mut h = hello("b", uuid(11), 0);
    h.protocol = 9;
    let (code, reason) = refused(t.addr, h).await;
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    assert!(reason.contains("protocol version 9"), "{reason}");

    let mut h = hello("b", uuid(11), 0);
    h.role = Role::Agent;
    assert_eq!(refused(t.addr, h).await.0, ErrorCode::Malformed);

    // Another frame version.
    let mut bytes = Frame::Hello(hello("b", uuid(11), 0)).encode().unwrap();
    bytes[4] = 77;
    match send_raw(t.addr, &bytes).await {
        Some(Frame::Error { code, reason }) => {
            assert_eq!(code, ErrorCode::UnsupportedVersion);
            assert!(reason.contains("frame version 77"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Garbage.
    match send_raw(t.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await {
        Some(Frame::Error { code, reason }) => {
            assert_eq!(code, ErrorCode::Malformed);
            assert!(reason.contains("magic"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // An oversized frame: refused from its header, nothing allocated.
    let mut bytes = Frame::Hello(hello("b", uuid(11), 0)).encode().unwrap();
    bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    match send_raw(t.addr, &bytes[..16]).await {
        Some(Frame::Error { code, reason }) => {
            assert_eq!(code, ErrorCode::Malformed);
            assert!(reason.contains("exceeds"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A truncated frame, then the writer closes its side.
    {
        let bytes = Frame::Hello(hello("b", uuid(11), 0)).encode().unwrap();
        let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &bytes[..bytes.len() - 3])
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut s).await.unwrap();
        match read_frame(&mut s).await {
            Some(Frame::Error { code, reason }) => {
                assert_eq!(code, ErrorCode::Malformed);
                assert!(reason.contains("inside a frame"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    // A corrupted packed batch on a connection of its own.
    {
        let (mut b, _, _) = Conn::open(t.addr, hello("b", uuid(11), 0)).await;
        let mut bytes = Frame::Packed(tidemark_wire::pack::PackedBatch {
            first_seq: 1,
            count: 1,
            flags: 0,
            raw_len: 100,
            data: b"not zstd at all".to_vec(),
        })
        .encode()
        .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut b.stream, &bytes)
            .await
            .unwrap();
        let code = loop {
            match b.next().await {
                Some(Frame::Error { code, .. }) => break code,
                Some(_) => {}
                None => panic!("closed without an Error"),
            }
        };
        assert_eq!(code, ErrorCode::Malformed);
        bytes.clear();
    }
    // A second live connection for disk a.
    let (code, reason) = refused(t.addr, hello("a", uuid(10), 0)).await;
    assert_eq!(code, ErrorCode::Busy);
    assert!(reason.contains("disk a"), "{reason}");
    // Disk b is bound to uuid 11: another UUID is a mismatch...
    let (code, reason) = refused(t.addr, hello("b", uuid(12), 0)).await;
    assert_eq!(code, ErrorCode::DiskMismatch);
    assert!(reason.contains("0b0b0b0b-0b0b"), "{reason}");
    // ...unless forced (the collector's say, after an operator's leave):
    // the old history is kept as disk b.replaced-0b0b0b0b (a copy of the
    // replica); the replica keeps its contents for the new disk's initial
    // sync to compare with.
    let (_b, acked, flags) = Conn::open(t.addr, hello("b", uuid(12), HELLO_FORCE_RESYNC)).await;
    assert_eq!((acked, flags), (0, WELCOME_NEED_FULL_SYNC));
    assert!(dir.path().join("b.replaced-0b0b0b0b").join("replica.raw").exists());
    assert!(dir.path().join("b").join("replica.raw").exists());

    // Through all of that, disk a kept working.
    let w = src.write(4096, pattern(5, 8192));
    a.ship(&[w]).await;
    assert_replica(dir.path(), "a", &src.disk);
    // And a silent peer is dropped after the Hello timeout.
    let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    match read_frame(&mut s).await {
        Some(Frame::Error { code, reason }) => {
            assert_eq!(code, ErrorCode::Malformed);
            assert!(reason.contains("no Hello"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    t.stop().await;
}

#[tokio::test]
async fn a_second_target_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = Running::start(dir.path()).await;
    let e = tidemark_target::Target::bind(tidemark_target::Config::new("127.0.0.1:0", dir.path(), TOKEN))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("another tidemark-target"), "{e}");
    let e = tidemark_target::Target::bind(tidemark_target::Config::new("127.0.0.1:0", dir.path(), ""))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("token"), "{e}");
    t.stop().await;
}
