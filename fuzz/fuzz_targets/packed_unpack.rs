//! Packed batch decoding (`tidemark_wire::pack`): hostile compressed
//! streams, raw lengths and window references never panic or allocate past
//! the bounds. A second pass compresses the input itself so the fuzzer
//! reaches the chunk-item parser behind zstd.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_wire::pack::{MemStore, PackedBatch, Unpacker};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let count = u32::from(data[0] % 8) + 1;
    let raw_len = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) % (1 << 20);
    let body = &data[5..];
    let mut u = Unpacker::new(4, MemStore::default());
    let _ = u.unpack(&PackedBatch {
        first_seq: 1,
        count,
        flags: 0,
        raw_len,
        data: body.to_vec(),
    });
    if let Ok(z) = zstd::bulk::compress(body, 1) {
        let raw_len = u32::try_from(body.len()).unwrap_or(0);
        let _ = u.unpack(&PackedBatch {
            first_seq: 1,
            count,
            flags: 0,
            raw_len,
            data: z,
        });
    }
});
