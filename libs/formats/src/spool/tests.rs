#![allow(clippy::cast_possible_truncation)]

use super::*;
use tidemark_wire::record::RecordKind;

const UUID: [u8; 16] = [0x5a; 16];

fn rec(seq: u64, data: &[u8]) -> Record {
    Record {
        header: RecordHeader::new(RecordKind::Write, seq, 1_000 + seq, 4096 * seq, data.len() as u64, data),
        payload: data.to_vec(),
    }
}

fn batch(first: u64, n: u64) -> Vec<Record> {
    (first..first + n)
        .map(|s| {
            rec(
                s,
                &vec![u8::try_from(s % 251).unwrap(); 100 + usize::try_from(s).unwrap()],
            )
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn round_trip() {
    let d = tempfile::tempdir().unwrap();
    let records = batch(5, 4);
    let body = encode_records(&records);
    let h = SpoolHeader::for_body(UUID, &body).unwrap();
    assert_eq!((h.first_seq, h.last_seq, h.count), (5, 8, 4));
    assert_eq!(h.first_time_ns, 1_005);
    assert_eq!(
        h.payload_bytes,
        records.iter().map(|r| r.payload.len() as u64).sum::<u64>()
    );
    let f = write_batch(d.path(), &h, &body).unwrap();
    assert_eq!(
        f.path.file_name().unwrap().to_str().unwrap(),
        "b-0000000000000005-0000000000000008.tms"
    );
    assert_eq!(std::fs::metadata(&f.path).unwrap().len(), h.file_len());
    let b = read_batch(&f.path, &UUID).unwrap();
    assert!(b.body_ok);
    assert_eq!(b.records, records);
    assert!(b.lost.is_empty() && b.corrupt_payload.is_empty());
    assert_eq!(b.header, h);
    assert_eq!(read_batch(&f.path, &[0; 16]).unwrap_err().kind, ErrorKind::Mismatch);

    let scan = scan_dir(d.path()).unwrap();
    assert_eq!(scan.files.len(), 1);
    assert_eq!(scan.files[0].header.as_ref().unwrap(), &h);
    assert_eq!((scan.files[0].first_seq, scan.files[0].last_seq), (5, 8));
    assert!(scan_dir(&d.path().join("missing")).unwrap().files.is_empty());
}

#[test]
fn names() {
    assert_eq!(parse_file_name(&file_name(1, 0x10)), Some((1, 0x10)));
    assert_eq!(parse_file_name("b-0000000000000002-0000000000000001.tms"), None);
    assert_eq!(parse_file_name("b-0000000000000001-0000000000000001.tms.tmp"), None);
    assert_eq!(parse_file_name("seg-0000000000000001.tmj"), None);
}

#[test]
fn bodies_that_are_not_batches_are_refused() {
    assert!(SpoolHeader::for_body(UUID, &[]).is_err());
    let mut gap = encode_records(&batch(1, 1));
    gap.extend_from_slice(&encode_records(&batch(3, 1)));
    assert!(SpoolHeader::for_body(UUID, &gap)
        .unwrap_err()
        .to_string()
        .contains("follows"));
    let body = encode_records(&batch(1, 2));
    assert!(SpoolHeader::for_body(UUID, &body[..body.len() - 1]).is_err());
}

#[test]
fn torn_temp_file_is_deleted_at_scan() {
    let d = tempfile::tempdir().unwrap();
    let body = encode_records(&batch(1, 2));
    let h = SpoolHeader::for_body(UUID, &body).unwrap();
    write_batch(d.path(), &h, &body).unwrap();
    let body2 = encode_records(&batch(3, 2));
    let h2 = SpoolHeader::for_body(UUID, &body2).unwrap();
    let pending = create(d.path(), &h2, &body2[..10]);
    assert!(pending.is_err(), "a body shorter than the header says is refused");
    // A crash between create and publish leaves the temp file (here torn).
    let pending = create(d.path(), &h2, &body2).unwrap();
    drop(pending);
    let tmp = d.path().join(format!("{}{TEMP_SUFFIX}", file_name(3, 4)));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_len(50)
        .unwrap();
    let scan = scan_dir(d.path()).unwrap();
    assert_eq!(scan.removed_temps, vec![tmp.clone()]);
    assert!(!tmp.exists());
    assert_eq!(scan.files.len(), 1);
    assert_eq!(scan.files[0].last_seq, 2);
}

#[test]
fn flipped_payload_byte_names_the_seq_and_keeps_the_record() {
    let d = tempfile::tempdir().unwrap();
    let records = batch(10, 3);
    let body = encode_records(&records);
    let h = SpoolHeader::for_body(UUID, &body).unwrap();
    let f = write_batch(d.path(), &h, &body).unwrap();
    let mut bytes = std::fs::read(&f.path).unwrap();
    // A payload byte of the second record (seq 11).
    let at = HEADER_LEN + records[0].header.encoded_len() as usize + RECORD_HEADER_LEN + 7;
    bytes[at] ^= 0x40;
    std::fs::write(&f.path, &bytes).unwrap();
    let b = read_batch(&f.path, &UUID).unwrap();
    assert!(!b.body_ok);
    assert_eq!(b.corrupt_payload, vec![11]);
    assert!(b.lost.is_empty());
    assert_eq!(b.records.len(), 3);
    assert_eq!(b.records[0], records[0]);
    assert_eq!(b.records[2], records[2]);
    assert_eq!(b.records[1].header, records[1].header, "forwarded unchanged");
    assert_ne!(b.records[1].payload, records[1].payload);
}

#[test]
fn flipped_record_header_byte_loses_only_that_seq() {
    let d = tempfile::tempdir().unwrap();
    let records = batch(20, 4);
    let body = encode_records(&records);
    let h = SpoolHeader::for_body(UUID, &body).unwrap();
    let f = write_batch(d.path(), &h, &body).unwrap();
    let mut bytes = std::fs::read(&f.path).unwrap();
    // The payload_len field of seq 21's header.
    let at = HEADER_LEN + records[0].header.encoded_len() as usize + 41;
    bytes[at] ^= 0x01;
    std::fs::write(&f.path, &bytes).unwrap();
    let b = read_batch(&f.path, &UUID).unwrap();
    assert!(!b.body_ok);
    assert_eq!(b.lost, vec![21..=21]);
    let seqs: Vec<u64> = b.records.iter().map(|r| r.header.seq).collect();
    assert_eq!(seqs, vec![20, 22, 23]);

    // The last record's header: everything after is lost.
    let mut bytes = std::fs::read(&f.path).unwrap();
    let at = HEADER_LEN
        + records[..3]
            .iter()
            .map(|r| r.header.encoded_len() as usize)
            .sum::<usize>()
        + 3;
    bytes[at] ^= 0x01;
    std::fs::write(&f.path, &bytes).unwrap();
    let b = read_batch(&f.path, &UUID).unwrap();
    assert_eq!(b.lost, vec![21..=21, 23..=23]);
}

#[test]
fn damaged_file_header_is_an_error_and_a_truncated_body_is_salvaged() {
    let d = tempfile::tempdir().unwrap();
    let records = batch(1, 3);
    let body = encode_records(&records);
    let h = SpoolHeader::for_body(UUID, &body).unwrap();
    let f = write_batch(d.path(), &h, &body).unwrap();
    let good = std::fs::read(&f.path).unwrap();

    let mut bytes = good.clone();
    bytes[33] ^= 1;
    std::fs::write(&f.path, &bytes).unwrap();
    assert_eq!(read_batch(&f.path, &UUID).unwrap_err().kind, ErrorKind::Corrupt);
    let scan = scan_dir(d.path()).unwrap();
    assert!(scan.files[0].header.is_err());
    assert_eq!((scan.files[0].first_seq, scan.files[0].last_seq), (1, 3));

    std::fs::write(&f.path, &good[..good.len() - 5]).unwrap();
    let b = read_batch(&f.path, &UUID).unwrap();
    assert_eq!(b.lost, vec![3..=3]);
    assert_eq!(b.records.len(), 2);

    let mut v2 = good.clone();
    v2[8] = 2;
    let crc = crc32c::crc32c(&v2[0..88]);
    v2[88..92].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&f.path, &v2).unwrap();
    assert_eq!(
        read_batch(&f.path, &UUID).unwrap_err().kind,
        ErrorKind::UnsupportedVersion
    );

    let mut huge = good;
    huge[56..64].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
    let crc = crc32c::crc32c(&huge[0..88]);
    huge[88..92].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&f.path, &huge).unwrap();
    assert_eq!(read_batch(&f.path, &UUID).unwrap_err().kind, ErrorKind::OutOfBounds);
}

/// Pins spool format version 1: if these bytes change, the version must change.
#[test]
fn golden_header_v1() {
    let h = SpoolHeader {
        disk_uuid: [0x11; 16],
        first_seq: 7,
        last_seq: 9,
        count: 3,
        body_len: 300,
        first_time_ns: 1_700_000_000_000_000_000,
        payload_bytes: 60,
        body_crc: 0xdead_beef,
    };
    let enc = h.encode();
    assert_eq!(
        hex(&enc),
        concat!(
            "544d53504f4f4c42", // magic "TMSPOOLB"
            "01000000",         // version
            "60000000",         // header_len 96
            "11111111111111111111111111111111",
            "0700000000000000", // first_seq
            "0900000000000000", // last_seq
            "03000000",         // count
            "00000000",         // flags
            "2c01000000000000", // body_len
            "00002a36fe9c9717", // first_time_ns
            "3c00000000000000", // payload_bytes
            "efbeadde",         // body crc
            "00000000",
            "cc9c0453", // header crc32c of 0..88
            "00000000",
        )
    );
    assert_eq!(SpoolHeader::decode(&enc, Path::new("x")).unwrap(), h);
}
