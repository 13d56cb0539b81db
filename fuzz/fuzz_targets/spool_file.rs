//! Spool batch files (`tidemark_formats::spool`): `data` is a file in a
//! collector's spool directory. Scanning the directory and reading the
//! batch must not panic (errors are fine); the records salvaged from a
//! batch, written again as a batch of their own, read back whole.
#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::spool::{self, SpoolHeader};
use tidemark_fuzz::scratch_dir;

fuzz_target!(|data: &[u8]| {
    let tmp = scratch_dir();
    let path = tmp.path().join(spool::file_name(1, 1));
    fs::write(&path, data).expect("write spool file");
    let _ = spool::scan_dir(tmp.path());
    let Ok(header) = spool::read_header(&path) else {
        return;
    };
    // Another disk's uuid is refused, never read.
    let mut other = header.disk_uuid;
    other[0] ^= 1;
    assert!(
        spool::read_batch(&path, &other).is_err(),
        "read a batch of another disk"
    );
    let Ok(batch) = spool::read_batch(&path, &header.disk_uuid) else {
        return;
    };
    if batch.records.is_empty() {
        return;
    }
    let body = spool::encode_records(&batch.records);
    let Ok(h) = SpoolHeader::for_body(header.disk_uuid, &body) else {
        return;
    };
    let dir = tmp.path().join("again");
    fs::create_dir(&dir).expect("mkdir");
    let f = spool::write_batch(&dir, &h, &body).expect("write a batch of parsed records");
    let again = spool::read_batch(&f.path, &header.disk_uuid).expect("read back a batch just written");
    assert!(again.body_ok, "a batch just written fails its body checksum");
    assert!(again.lost.is_empty());
    assert_eq!(again.records, batch.records);
    assert_eq!(again.corrupt_payload, batch.corrupt_payload);
});
