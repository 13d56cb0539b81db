//! Change-record decoding (`tidemark_wire::record`): never panics, and a
//! record that decodes re-encodes to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_fuzz::repair_record;
use tidemark_wire::record::{Record, RecordHeader, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut fixed = data.to_vec();
    if repair_record(&mut fixed).is_some() && fixed != data {
        check(&fixed);
    }
});

fn check(b: &[u8]) {
    if let Ok(h) = RecordHeader::decode(b) {
        assert_eq!(
            h.encode()[..],
            b[..HEADER_LEN],
            "header does not re-encode to its bytes"
        );
        let _ = h.app_consistent();
    }
    // Decode back to back, as from a batch of records.
    let mut rest = b;
    while let Ok((rec, used)) = Record::decode(rest) {
        assert!(used >= HEADER_LEN && used <= rest.len());
        assert_eq!(used as u64, rec.header.encoded_len());
        assert_eq!(rec.encode(), &rest[..used], "record does not re-encode to its bytes");
        assert!(rec.header.verify_payload(&rec.payload).is_ok());
        let _ = rec.tag_name();
        rest = &rest[used..];
    }
}
