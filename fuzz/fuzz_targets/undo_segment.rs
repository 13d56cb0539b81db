//! Undo segment files (`tidemark_formats::undo`): `data` is a segment's
//! contents. Walking it entry by entry and reading every block must not
//! panic (errors are fine). A segment whose header checks can be appended
//! to, and what is appended reads back.
#![no_main]

use std::fs::{self, File};

use libfuzzer_sys::fuzz_target;
use tidemark_formats::undo::{
    decode_entry_header, decode_segment_header, read_block, segment_name, sum32, SegmentWriter, BLOCK_BYTES,
    SEGMENT_HEADER_LEN,
};
use tidemark_fuzz::scratch_dir;

/// Entries walked per input, and blocks read per entry.
const MAX_ENTRIES: usize = 64;
const MAX_BLOCKS: u64 = 8;

fuzz_target!(|data: &[u8]| {
    exercise(data);
    // Repair the header's checksum so that the entries get fuzzed too.
    if data.len() >= 64 {
        let mut fixed = data.to_vec();
        let crc = sum32(&fixed[..60]);
        fixed[60..64].copy_from_slice(&crc.to_le_bytes());
        if fixed != data {
            exercise(&fixed);
        }
    }
});

fn exercise(file: &[u8]) {
    let tmp = scratch_dir();
    let path = tmp.path().join(segment_name(0));
    fs::write(&path, file).expect("write segment");
    let Ok((uuid, _number)) = decode_segment_header(&path, file) else {
        return;
    };
    let f = File::open(&path).expect("open segment");
    let mut at = SEGMENT_HEADER_LEN;
    let mut out = vec![0u8; BLOCK_BYTES];
    for _ in 0..MAX_ENTRIES {
        let Ok(start) = usize::try_from(at) else { break };
        let Some(h) = file.get(start..) else { break };
        let Ok(e) = decode_entry_header(&path, at, h) else {
            break;
        };
        for i in 0..u64::from(e.nblocks).min(MAX_BLOCKS) {
            let _ = read_block(&f, &path, at, e.start_block.wrapping_add(i), &mut out);
        }
        // A block outside the entry is an error, never another entry's data.
        let _ = read_block(&f, &path, at, e.start_block.wrapping_sub(1), &mut out);
        match at.checked_add(e.entry_len()) {
            Some(next) if next > at => at = next,
            _ => break,
        }
    }

    // Appending after the bytes a catalog would have marked (all of them,
    // or just the header): what is appended reads back.
    for marked in [file.len() as u64, SEGMENT_HEADER_LEN] {
        let Ok(mut w) = SegmentWriter::open_append(tmp.path(), 0, &uuid, marked) else {
            continue;
        };
        let block: Vec<u8> = (0..BLOCK_BYTES).map(|i| (i % 251) as u8 ^ file.len() as u8).collect();
        let Ok((entry, zero)) = w.append(7, 42, &block) else {
            continue;
        };
        assert!(!zero, "a non-zero block was stored as a ZERO entry");
        if w.sync().is_err() {
            continue;
        }
        drop(w);
        let f = File::open(&path).expect("reopen segment");
        read_block(&f, &path, entry, 42, &mut out).expect("an appended block reads back");
        assert_eq!(out, block, "appended block read back differently");
    }
}
