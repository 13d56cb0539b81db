//! Applying an arbitrary stream of records to a small replica, in every
//! replica format (`tidemark_formats::replica`, as the target does), and
//! checking the result against a model: a byte array with the same writes
//! and zeroings (in range: the target checks a record's range before it
//! applies it). Every read, and the replica reopened from its files, must equal the
//! model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_formats::replica::{self, ReplicaFormat};
use tidemark_fuzz::{le_u16, le_u32, scratch_dir};

/// The replica's size: whole sectors (as VMDK needs) but not whole grains,
/// so that the formats' edges are exercised too.
const SIZE: u64 = 3 * 65536 + 1024;
/// Records per input.
const MAX_OPS: usize = 48;

#[derive(Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Flush,
}

/// Eight bytes per op: kind, offset (u32, scaled into and a little past the
/// disk), length (u16 + a shift); data is a pattern from the op's index.
fn ops(data: &[u8]) -> Vec<Op> {
    let mut out = Vec::new();
    for (i, c) in data.chunks_exact(8).take(MAX_OPS).enumerate() {
        let offset = u64::from(le_u32(c, 1).unwrap_or(0)) % (SIZE + 8192);
        let len = u64::from(le_u16(c, 5).unwrap_or(0)) << (c[7] % 3);
        out.push(match c[0] % 4 {
            0 | 1 => Op::Write {
                offset,
                data: (0..len).map(|j| (j as u8).wrapping_mul(31) ^ (i as u8 + 1)).collect(),
            },
            2 => Op::Zero { offset, len },
            _ => Op::Flush,
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let ops = ops(data);
    for format in [ReplicaFormat::Raw, ReplicaFormat::VmdkFlat, ReplicaFormat::VmdkSparse] {
        let tmp = scratch_dir();
        let mut img = replica::create(tmp.path(), format, SIZE).expect("create replica");
        let size = img.size();
        assert!(size >= SIZE, "{format:?}: size {size} < {SIZE}");
        let mut model = vec![0u8; usize::try_from(size).unwrap()];
        for op in &ops {
            let in_range = |o: u64, l: u64| o.checked_add(l).is_some_and(|e| e <= size);
            match op {
                Op::Write { offset, data } => {
                    if !in_range(*offset, data.len() as u64) {
                        continue;
                    }
                    img.write_at(data, *offset).expect("an in-range write succeeds");
                    let o = *offset as usize;
                    model[o..o + data.len()].copy_from_slice(data);
                }
                Op::Zero { offset, len } => {
                    if !in_range(*offset, *len) {
                        continue;
                    }
                    img.zero_range(*offset, *len).expect("an in-range zeroing succeeds");
                    let o = *offset as usize;
                    model[o..o + *len as usize].fill(0);
                }
                Op::Flush => img.flush().expect("flush"),
            }
        }
        img.flush().expect("flush");
        check(&*img, &model, format);
        drop(img);
        let img = replica::open(tmp.path()).expect("reopen replica");
        check(&*img, &model, format);
    }
});

fn check(img: &dyn replica::ReplicaImage, model: &[u8], format: ReplicaFormat) {
    let mut got = vec![0u8; model.len()];
    img.read_at(&mut got, 0).expect("read the whole replica");
    if let Some(at) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{format:?}: byte {at} is {} but the model says {}", got[at], model[at]);
    }
    let ext = img.allocated(0, model.len() as u64).expect("allocation map");
    let mut pos = 0;
    for (o, l, data) in ext {
        assert_eq!(o, pos, "{format:?}: extents leave a gap");
        if !data {
            let (s, e) = (o as usize, (o + l) as usize);
            assert!(
                model[s..e].iter().all(|&b| b == 0),
                "{format:?}: a hole over data at {o}+{l}"
            );
        }
        pos = o + l;
    }
    assert_eq!(pos, model.len() as u64, "{format:?}: extents do not cover the disk");
}
