//! Wire frame decoding (`tidemark_wire::frame`): never panics, and a frame
//! that decodes re-encodes to exactly the bytes it came from. A second pass
//! recomputes the frame checksum so bodies get past it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_wire::frame::{Frame, FrameHeader, FRAME_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= FRAME_HEADER_LEN {
        let mut fixed = data.to_vec();
        let body_end = FRAME_HEADER_LEN
            + (u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]) as usize)
                .min(data.len() - FRAME_HEADER_LEN);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed[0..12]), &fixed[FRAME_HEADER_LEN..body_end]);
        fixed[12..16].copy_from_slice(&crc.to_le_bytes());
        check(&fixed);
    }
});

fn check(b: &[u8]) {
    let _ = FrameHeader::parse(b);
    let mut rest = b;
    while let Ok((f, used)) = Frame::decode(rest) {
        assert!(used >= FRAME_HEADER_LEN && used <= rest.len());
        let enc = f.encode().expect("a decoded frame encodes");
        assert_eq!(enc, &rest[..used], "frame does not re-encode to its bytes");
        rest = &rest[used..];
    }
}
