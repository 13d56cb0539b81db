use super::*;
use crate::ErrorKind;
use proptest::prelude::*;
use std::os::unix::fs::FileExt;
use tidemark_wire::record::{RecordKind, HEADER_LEN};

const UUID: [u8; 16] = *b"0123456789abcdef";

fn cfg(dir: &std::path::Path, seg: u64, cap: u64) -> JournalConfig {
    JournalConfig {
        dir: dir.join("journal"),
        disk_uuid: UUID,
        segment_size: seg,
        cap_bytes: cap,
    }
}

fn put(j: &mut Journal, off: u64, data: &[u8]) -> u64 {
    j.append(
        RecordKind::Write,
        0,
        off,
        data.len() as u64,
        data,
        *blake3::hash(data).as_bytes(),
        1,
    )
    .unwrap()
}

fn read_all(dir: &std::path::Path) -> Vec<(u64, u64, Vec<u8>)> {
    let r = JournalReader::open(&dir.join("journal")).unwrap();
    r.records_from(0)
        .map(|x| x.unwrap())
        .map(|r| (r.header.seq, r.header.offset, r.payload))
        .collect()
}

#[test]
fn append_reopen_read() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, rep) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(rep.next_seq, 1);
    assert_eq!(put(&mut j, 0, b"hello"), 1);
    assert_eq!(put(&mut j, 512, b"world"), 2);
    j.sync_targets().run().unwrap();
    drop(j);
    let (mut j, rep) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(rep.next_seq, 3);
    assert_eq!(rep.records, 2);
    assert!(rep.torn_tail.is_none());
    assert_eq!(put(&mut j, 0, b"again"), 3);
    let all = read_all(d.path());
    assert_eq!(all.len(), 3);
    assert_eq!(all[1], (2, 512, b"world".to_vec()));
}

#[test]
fn torn_tail_is_cut_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    put(&mut j, 0, &[1u8; 4096]);
    put(&mut j, 4096, &[2u8; 4096]);
    drop(j);
    // Damage the second record's payload, as a crash mid-append would.
    let seg = segment_path(&d.path().join("journal"), 0);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    let second = SEGMENT_HEADER_LEN + (HEADER_LEN as u64 + 4096) + HEADER_LEN as u64 + 100;
    f.write_all_at(&[9u8; 10], second).unwrap();
    let (mut j, rep) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    let why = rep.torn_tail.expect("torn tail reported");
    assert!(why.contains("seq 2"), "{why}");
    assert_eq!(rep.next_seq, 2);
    assert_eq!(put(&mut j, 8192, b"new"), 2);
    let all = read_all(d.path());
    assert_eq!(all.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(all[1].2, b"new".to_vec());
}

#[test]
fn rotation_consumption_and_recycling() {
    let d = tempfile::tempdir().unwrap();
    let seg = 64 << 10;
    let (mut j, _) = Journal::open(cfg(d.path(), seg, 1 << 30)).unwrap();
    for i in 0..100u64 {
        put(&mut j, i * 4096, &[u8::try_from(i).unwrap(); 4000]);
    }
    assert!(j.segments() > 5);
    let before = j.segments();
    j.consume(60).unwrap();
    assert!(j.segments() < before);
    let spares = std::fs::read_dir(d.path().join("journal"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("spare-"))
        .count();
    assert!(spares > 0);
    // New appends reuse spares; everything from the oldest live seq on stays readable.
    for i in 100..200u64 {
        put(&mut j, i * 4096, &[u8::try_from(i % 256).unwrap(); 4000]);
    }
    let all = read_all(d.path());
    let first = all[0].0;
    assert!(first <= 61 && first > 1);
    assert_eq!(all.last().unwrap().0, 200);
    for w in all.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1);
    }
    drop(j);
    let (_, rep) = Journal::open(cfg(d.path(), seg, 1 << 30)).unwrap();
    assert_eq!(rep.next_seq, 201);
    assert_eq!(rep.consumed_seq, 60);
    assert!(rep.torn_tail.is_none(), "{:?}", rep.torn_tail);
}

#[test]
fn cap_gives_full() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(d.path(), 64 << 10, 128 << 10)).unwrap();
    let mut n = 0;
    loop {
        match j.append(
            RecordKind::Write,
            0,
            0,
            4000,
            &[0u8; 4000],
            *blake3::hash(&[0u8; 4000]).as_bytes(),
            0,
        ) {
            Ok(_) => n += 1,
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Full);
                break;
            }
        }
        assert!(n < 1000);
    }
    assert!(n >= 25, "{n}");
    j.consume(n).unwrap();
    assert!(j.has_room(4000));
}

#[test]
fn another_disks_journal_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    put(&mut j, 0, b"x");
    drop(j);
    let mut c = cfg(d.path(), 1 << 20, 1 << 30);
    c.disk_uuid = [7; 16];
    assert_eq!(Journal::open(c).unwrap_err().kind, ErrorKind::Mismatch);
}

#[test]
fn segment_header_golden_v1() {
    let h = SegmentHeader {
        index: 3,
        first_seq: 42,
        disk_uuid: UUID,
        created_ns: 1_700_000_000_000_000_000,
    };
    let hex: String = h.encode().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        concat!(
            "544d4a4f55524e4c",                 // magic
            "01000000",                         // version
            "40000000",                         // header_len
            "0300000000000000",                 // index
            "2a00000000000000",                 // first_seq
            "30313233343536373839616263646566", // disk uuid
            "00002a36fe9c9717",                 // created_ns
            "545e339b",                         // crc32c
            "00000000"
        )
    );
    assert_eq!(
        SegmentHeader::decode(&h.encode(), std::path::Path::new("x")).unwrap(),
        h
    );
}

#[test]
fn garbage_segment_is_named() {
    let d = tempfile::tempdir().unwrap();
    let jd = d.path().join("journal");
    std::fs::create_dir_all(&jd).unwrap();
    std::fs::write(segment_path(&jd, 0), vec![0x55u8; 4096]).unwrap();
    let err = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Corrupt);
    assert!(err.to_string().contains("seg-0000000000000000.tmj"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random appends, consumptions, reopen ("crash") and torn tails: the
    /// reader always returns exactly the records appended since the oldest
    /// live segment, in order, with their payloads.
    #[test]
    fn model(ops in proptest::collection::vec((0u8..10, 1usize..9000), 1..120)) {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path(), 32 << 10, 1 << 30);
        let (mut j, _) = Journal::open(c.clone()).unwrap();
        let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
        for (op, n) in ops {
            match op {
                0 => {
                    drop(j);
                    j = Journal::open(c.clone()).unwrap().0;
                }
                1 => {
                    let upto = model.get(model.len() / 2).map_or(0, |m| m.0);
                    j.consume(upto).unwrap();
                }
                _ => {
                    let data: Vec<u8> = (0..n).map(|i| u8::try_from((i * 7 + n) % 251).unwrap()).collect();
                    let s = put(&mut j, n as u64, &data);
                    model.push((s, data));
                }
            }
        }
        let got = read_all(d.path());
        let first = got.first().map_or(u64::MAX, |g| g.0);
        let expect: Vec<_> = model.iter().filter(|m| m.0 >= first).cloned().collect();
        prop_assert_eq!(got.len(), expect.len());
        for (g, e) in got.iter().zip(expect.iter()) {
            prop_assert_eq!(g.0, e.0);
            prop_assert_eq!(&g.2, &e.1);
        }
        prop_assert!(first <= j.consumed_seq() + 1 || model.is_empty());
    }
}

/// A torn record followed by an intact stale one (power loss writes pages
/// back in any order): after recovery and a same-length append, the stale
/// record must not come back as the next seq. Found by the journal_segment
/// fuzz target.
#[test]
fn stale_record_behind_a_torn_one_never_returns() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    put(&mut j, 0, &[1u8; 4096]);
    put(&mut j, 0, &[2u8; 4096]);
    put(&mut j, 0, &[3u8; 4096]);
    drop(j);
    let seg = segment_path(&d.path().join("journal"), 0);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    // Tear record 2's payload; record 3 behind it stays intact.
    f.write_all_at(
        &[9u8; 8],
        SEGMENT_HEADER_LEN + (HEADER_LEN as u64 + 4096) + HEADER_LEN as u64 + 10,
    )
    .unwrap();
    let (mut j, rep) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    assert!(rep.torn_tail.is_some());
    assert_eq!(put(&mut j, 0, &[7u8; 4096]), 2);
    let all = read_all(d.path());
    assert_eq!(
        all.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2],
        "stale seq 3 came back"
    );
    drop(j);
    let (_, rep) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(rep.next_seq, 3);
}

#[test]
fn out_of_range_segment_headers_are_corrupt() {
    for (index, first_seq) in [(0u64, 0u64), (0, u64::MAX), (u64::MAX, 1)] {
        let h = SegmentHeader {
            index,
            first_seq,
            disk_uuid: UUID,
            created_ns: 0,
        };
        let err = SegmentHeader::decode(&h.encode(), std::path::Path::new("seg")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt, "{index} {first_seq}");
    }
}

#[test]
fn advance_skips_seqs_and_survives_reopen() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    for i in 0..5 {
        put(&mut j, i * 512, &[7u8; 4096]);
    }
    assert_eq!(j.first_seq(), 1);
    // Not backwards.
    j.advance_to(3).unwrap();
    assert_eq!(j.next_seq(), 6);
    j.advance_to(100).unwrap();
    assert_eq!((j.next_seq(), j.first_seq(), j.consumed_seq()), (100, 100, 99));
    assert_eq!(j.bytes_after(99), 0);
    assert_eq!(put(&mut j, 0, b"after"), 100);
    drop(j);
    let (mut j, rep) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!((rep.next_seq, rep.first_seq, rep.consumed_seq), (101, 100, 99));
    assert_eq!(read_all(d.path()), vec![(100, 0, b"after".to_vec())]);
    assert!(j.advance_to(1 << 63).is_err());
}

#[test]
fn advance_on_an_empty_journal_and_crash_before_new_segment() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    j.advance_to(42).unwrap();
    drop(j);
    // A crash after the segments were retired, before the new one existed.
    for e in std::fs::read_dir(d.path().join("journal")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_str().unwrap().starts_with("seg-") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let (mut j, rep) = Journal::open(cfg(d.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(rep.next_seq, 42);
    assert_eq!(put(&mut j, 0, b"x"), 42);
}

#[test]
fn bytes_after_counts_unconsumed_records() {
    let d = tempfile::tempdir().unwrap();
    let rec = HEADER_LEN as u64 + 1000;
    // Segments of 10 records each.
    let (mut j, _) = Journal::open(cfg(d.path(), 64 + 10 * rec, 1 << 30)).unwrap();
    for _ in 0..25 {
        put(&mut j, 0, &[1u8; 1000]);
    }
    assert_eq!(j.segments(), 3);
    assert_eq!(j.bytes_after(0), 25 * rec);
    assert_eq!(j.bytes_after(10), 15 * rec);
    assert_eq!(j.bytes_after(15), 10 * rec);
    assert_eq!(j.bytes_after(25), 0);
    assert_eq!(j.bytes_after(1000), 0);
    assert!(j.has_room_for(2, 2000));
}

#[test]
fn changed_ranges_read_headers_across_segments() {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(d.path(), 64 << 10, 1 << 30)).unwrap();
    for i in 0..40u64 {
        put(&mut j, i * 8192, &[1; 4000]);
    }
    let flush = j
        .append(RecordKind::Flush, 0, 0, 0, &[], *blake3::hash(&[]).as_bytes(), 1)
        .unwrap();
    j.sync_targets().run().unwrap();
    assert!(j.segments() > 2);
    let r = JournalReader::open(&d.path().join("journal")).unwrap();
    let got = r.changed_ranges(5, 30).unwrap().unwrap();
    let want: Vec<(u64, u64)> = (5..=30u64).map(|s| ((s - 1) * 8192, 4000)).collect();
    assert_eq!(got, want);
    // A flush changes nothing; a span beyond the journal is not known.
    assert_eq!(r.changed_ranges(flush, flush).unwrap(), Some(vec![]));
    assert_eq!(r.changed_ranges(40, flush + 1).unwrap(), None);
    // Recycled records are not held: not known either.
    j.consume(30).unwrap();
    let r = JournalReader::open(&d.path().join("journal")).unwrap();
    assert_eq!(r.changed_ranges(1, 10).unwrap(), None);
    assert_eq!(r.changed_ranges(35, 36).unwrap().unwrap().len(), 2);
}
