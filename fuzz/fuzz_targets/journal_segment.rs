//! Journal segment files (`tidemark_formats::journal`): `data` becomes the
//! files `journal/seg-0000000000000000.tmj`, `seg-…01.tmj`, … (split at each
//! later "TMJOURNL" magic, see `split_segments`), which are read with
//! `JournalReader` and opened with `Journal::open`. Nothing may panic;
//! errors are fine. When the writer opens the journal, a record it then
//! appends must read back, and if open cut off a torn tail, no stale record
//! from behind it may read back as the next one.
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::journal::{segment_path, Journal, JournalConfig, JournalReader};
use tidemark_fuzz::{le_u16, le_u64, repair_segment, scratch_dir, split_segments};
use tidemark_wire::record::RecordKind;

/// A disk uuid no fuzzed segment is likely to carry.
const OTHER_DISK: [u8; 16] = [0xa5; 16];

fuzz_target!(|data: &[u8]| {
    let raw: Vec<Vec<u8>> = split_segments(data).into_iter().map(<[u8]>::to_vec).collect();
    exercise(&raw);
    let mut fixed = raw.clone();
    fixed.iter_mut().for_each(|s| repair_segment(s));
    if fixed != raw {
        exercise(&fixed);
    }
});

fn exercise(segs: &[Vec<u8>]) {
    let tmp = scratch_dir();
    let dir = tmp.path().join("journal");
    fs::create_dir(&dir).expect("create journal directory");
    for (i, s) in segs.iter().enumerate() {
        fs::write(segment_path(&dir, i as u64), s).expect("write segment");
    }
    let first = &segs[0];

    // Reading never modifies anything, so it goes before the writer, which
    // cuts off torn tails.
    read_all(&dir, 0);
    if let Some(first_seq) = le_u64(first, 24) {
        read_all(&dir, first_seq.saturating_add(2));
    }

    let _ = Journal::open(config(&dir, OTHER_DISK));
    if let Some(uuid) = first.get(32..48) {
        let uuid: [u8; 16] = uuid.try_into().expect("16 bytes");
        // The header's unused bytes 60..62 pick the appended payload's
        // length, so it can match the span of a torn record.
        let len = le_u16(first, 60).map_or(16, |v| usize::from(v) % 4096 + 1);
        open_and_append(&dir, uuid, len);
    }
}

fn config(dir: &Path, disk_uuid: [u8; 16]) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        disk_uuid,
        // Small, so that an append after open sometimes rotates.
        segment_size: 1024,
        cap_bytes: 1 << 20,
    }
}

fn read_all(dir: &Path, from: u64) {
    let Ok(reader) = JournalReader::open(dir) else {
        return;
    };
    let _ = reader.segments();
    for rec in reader.records_from(from) {
        match rec {
            Ok(rec) => assert!(rec.header.verify_payload(&rec.payload).is_ok()),
            Err(_) => break,
        }
    }
}

fn open_and_append(dir: &Path, disk_uuid: [u8; 16], len: usize) {
    let Ok((mut journal, report)) = Journal::open(config(dir, disk_uuid)) else {
        return;
    };
    assert_eq!(report.next_seq, journal.next_seq());
    let payload = vec![0xa5; len];
    let hash = *blake3::hash(&payload).as_bytes();
    let Ok(seq) = journal.append(RecordKind::Write, 0, 4096, len as u64, &payload, hash, 1) else {
        return;
    };
    let _ = journal.sync_targets().run();
    drop(journal);
    let Ok(reader) = JournalReader::open(dir) else {
        panic!("journal directory vanished");
    };
    match reader.records_from(seq).next() {
        Some(Ok(rec)) => {
            assert_eq!(rec.header.seq, seq);
            assert_eq!(rec.payload, payload);
        }
        other => panic!("record {seq} appended after open does not read back: {other:?}"),
    }
    // Open cut off a torn append; nothing that followed it may come back
    // as the record after the one just appended. (Only checked after a
    // torn tail: a clean end has no such bytes in a journal this code wrote.)
    if let (Some(_), Some(next)) = (&report.torn_tail, seq.checked_add(1)) {
        if let Some(Ok(rec)) = reader.records_from(next).next() {
            panic!(
                "stale record {} (offset {}, {} bytes) reads as the successor of record {seq} \
                 appended after a torn tail was cut off",
                rec.header.seq, rec.header.offset, rec.header.length
            );
        }
    }
}
