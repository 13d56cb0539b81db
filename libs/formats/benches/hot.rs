//! Hot functions of the write path: record header encode/decode, payload
//! hashing, and a 4 KiB journal append (page cache, no fsync).
//! Run: cargo bench -p tidemark-formats --bench hot

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tidemark_formats::journal::{Journal, JournalConfig};
use tidemark_wire::record::{RecordHeader, RecordKind};

fn bench(c: &mut Criterion) {
    let data = vec![0x5au8; 4096];
    let h = RecordHeader::new(RecordKind::Write, 42, 1, 8192, 4096, &data);
    let enc = h.encode();
    c.bench_function("record_header_encode", |b| b.iter(|| std::hint::black_box(&h).encode()));
    c.bench_function("record_header_decode", |b| {
        b.iter(|| RecordHeader::decode(std::hint::black_box(&enc)).unwrap())
    });
    let mut g = c.benchmark_group("blake3");
    for size in [4096usize, 1 << 20] {
        let buf = vec![7u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size}"), |b| {
            b.iter(|| blake3::hash(std::hint::black_box(&buf)))
        });
    }
    g.finish();
    let dir = tempfile::tempdir().unwrap();
    let cfg = JournalConfig {
        dir: dir.path().join("journal"),
        disk_uuid: [1; 16],
        segment_size: 64 << 20,
        cap_bytes: 1 << 40,
    };
    let (mut j, _) = Journal::open(cfg).unwrap();
    let hash = *blake3::hash(&data).as_bytes();
    let mut g = c.benchmark_group("journal");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("append_4k", |b| {
        b.iter_batched(
            || (),
            |()| {
                let upto = j.append(RecordKind::Write, 0, 0, 4096, &data, hash, 0).unwrap();
                if upto % 8192 == 0 {
                    j.consume(upto).unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
