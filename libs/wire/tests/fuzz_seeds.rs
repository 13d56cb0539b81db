//! The frame_decode fuzzer's seeds (`fuzz/seeds/frame_decode`) are frames
//! of the version this build speaks: each decodes and re-encodes to its
//! bytes. After a format change, write them again with
//! `TIDEMARK_BLESS=1 cargo test -p tidemark-wire --test fuzz_seeds`.

use std::path::PathBuf;

use tidemark_wire::frame::{Frame, Hello, Lineage, Role, HASH_CHUNK, PROTOCOL_VERSION, WELCOME_NEED_FULL_SYNC};

fn seeds() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                role: Role::Agent,
                flags: 0,
                disk_uuid: [7; 16],
                disk_size: 1 << 30,
                disk_id: "db".parse().unwrap(),
                token: b"secret".to_vec(),
                lineage: Lineage {
                    generation: [0x22; 16],
                    parent: [0x33; 16],
                    fork_seq: 5,
                },
            }),
        ),
        (
            "welcome",
            Frame::Welcome {
                acked_seq: 9,
                flags: WELCOME_NEED_FULL_SYNC,
                generation: [0x44; 16],
            },
        ),
        (
            "hash_query",
            Frame::HashQuery {
                offset: 4 * HASH_CHUNK,
                length: 16 * HASH_CHUNK,
            },
        ),
        (
            "chunk_hashes",
            Frame::ChunkHashes {
                offset: 4 * HASH_CHUNK,
                hashes: vec![[1; 32], [2; 32], [3; 32]],
            },
        ),
        (
            "call",
            Frame::Call {
                nonce: 7,
                body: r#"{"op":"points","limit":10}"#.into(),
            },
        ),
        (
            "reply",
            Frame::Reply {
                nonce: 7,
                ok: false,
                body: r#""no such disk""#.into(),
            },
        ),
    ]
}

#[test]
fn seeds_are_current_frames() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/frame_decode");
    let bless = std::env::var_os("TIDEMARK_BLESS").is_some();
    for (name, f) in seeds() {
        let want = f.encode().unwrap();
        let path = dir.join(name);
        if bless {
            std::fs::write(&path, &want).unwrap();
        }
        let got = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; write the seeds with TIDEMARK_BLESS=1", path.display()));
        assert_eq!(
            got,
            want,
            "{} is stale: write it again with TIDEMARK_BLESS=1",
            path.display()
        );
        let (back, used) = Frame::decode(&got).unwrap();
        assert_eq!((back, used), (f, got.len()));
    }
}

#[test]
fn hash_spans_out_of_bounds_are_refused() {
    for (offset, length) in [
        (1, HASH_CHUNK),
        (0, 0),
        (0, HASH_CHUNK + 1),
        (0, 1024 * HASH_CHUNK),
        (u64::MAX - HASH_CHUNK + 1, HASH_CHUNK),
    ] {
        assert!(
            Frame::HashQuery { offset, length }.encode().is_err(),
            "{offset}+{length}"
        );
    }
    let too_many = Frame::ChunkHashes {
        offset: 0,
        hashes: vec![[0; 32]; 513],
    };
    assert!(too_many.encode().is_err());
    // A count that claims more hashes than the body holds.
    let mut f = Frame::ChunkHashes {
        offset: 0,
        hashes: vec![[9; 32]; 2],
    }
    .encode()
    .unwrap();
    f[24..28].copy_from_slice(&3u32.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[0..12]), &f[16..]);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    assert!(Frame::decode(&f).unwrap_err().msg.contains("chunk hashes"));
}
