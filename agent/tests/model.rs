//! Model test: random sequences of write / zero / trim / flush / crash /
//! journaled-but-not-applied writes, against an in-memory reference disk.
//! After every crash and restart the disk equals the model, and at the end
//! the journal replayed onto the pre-protection (all-zero) disk equals it
//! too: the journal holds every write, in order.

use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use tidemark_agent::config::{ListenAddr, ProtectConfig};
use tidemark_agent::run::{open, Opened};
use tidemark_agent::shim::Zeroing;
use tidemark_agent::state::LastStop;
use tidemark_formats::apply::{apply_record, whole};
use tidemark_formats::journal::JournalReader;
use tidemark_util::fileops::BackingKind;
use tidemark_wire::record::RecordKind;

const SIZE: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Zero {
        off: u64,
        len: u64,
        no_hole: bool,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Flush,
    Crash,
    /// The process died after journaling a write but before the disk write.
    JournaledThenCrash {
        off: u64,
        len: u64,
        seed: u8,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0u64..SIZE / 512, 1u64..256).prop_map(|(b, n)| {
        let off = b * 512;
        (off, (n * 512).min(SIZE - off))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>(), any::<bool>()).prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), no_hole)| Op::Zero { off, len, no_hole }),
        1 => range().prop_map(|(off, len)| Op::Trim { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Crash),
        1 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::JournaledThenCrash { off, len, seed }),
    ]
}

fn span(off: u64, len: u64) -> std::ops::Range<usize> {
    usize::try_from(off).unwrap()..usize::try_from(off + len).unwrap()
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap()))
        .collect()
}

fn cfg(dir: &std::path::Path) -> ProtectConfig {
    ProtectConfig {
        disk: dir.join("disk.img"),
        state: dir.join("state"),
        listen: Some(ListenAddr::Unix(dir.join("unused.sock"))),
        ublk: None,
        disk_id: "model".parse().unwrap(),
        create_size: Some(SIZE),
        journal_cap: Some(256 << 20),
        bench_consume: false,
        ship: None,
    }
}

fn disk_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("disk.img")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn journal_and_disk_follow_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut model = vec![0u8; usize::try_from(SIZE).unwrap()];
        let mut opened: Option<Opened> = Some(open(&c).unwrap());
        for op in ops {
            let shim = opened.as_ref().unwrap().shim.clone();
            match op.clone() {
                Op::Write { off, len, seed, fua } => {
                    let data = pattern(seed, len);
                    rt.block_on(shim.write(off, data.clone(), fua)).unwrap();
                    model[span(off, len)].copy_from_slice(&data);
                }
                Op::Zero { off, len, no_hole } => {
                    rt.block_on(shim.write_zeroes(off, len, Zeroing { keep_allocated: no_hole, ..Default::default() })).unwrap();
                    model[span(off, len)].fill(0);
                }
                Op::Trim { off, len } => {
                    rt.block_on(shim.trim(off, len, false)).unwrap();
                    model[span(off, len)].fill(0);
                }
                Op::Flush => rt.block_on(shim.flush()).unwrap(),
                Op::Crash | Op::JournaledThenCrash { .. } => {
                    if let Op::JournaledThenCrash { off, len, seed } = op {
                        let data = pattern(seed, len);
                        let hash = *blake3::hash(&data).as_bytes();
                        shim.core().journal.append(RecordKind::Write, 0, off, len, &data, hash, 0).unwrap();
                        model[span(off, len)].copy_from_slice(&data);
                    }
                    drop(shim);
                    drop(opened.take());
                    let o = open(&c).unwrap();
                    prop_assert_eq!(o.last_stop, LastStop::ProcessCrash);
                    prop_assert!(disk_bytes(d.path()) == model, "disk differs from the model after restart");
                    opened = Some(o);
                }
            }
        }
        let shim = opened.as_ref().unwrap().shim.clone();
        rt.block_on(shim.flush()).unwrap();
        prop_assert!(disk_bytes(d.path()) == model, "disk differs from the model");
        // Replay the whole journal onto a zero disk: it must equal the model.
        let replay = d.path().join("replay.img");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&replay).unwrap();
        f.set_len(SIZE).unwrap();
        let reader = JournalReader::open(&d.path().join("state/journal")).unwrap();
        let mut last = 0;
        for r in reader.records_from(0) {
            let r = r.unwrap();
            prop_assert_eq!(r.header.seq, last + 1);
            last = r.header.seq;
            apply_record(&f, &replay, BackingKind::File, SIZE, &r.header, &r.payload, whole).unwrap();
        }
        let mut got = vec![0u8; usize::try_from(SIZE).unwrap()];
        f.read_exact_at(&mut got, 0).unwrap();
        prop_assert!(got == model, "journal replay differs from the model");
    }
}
