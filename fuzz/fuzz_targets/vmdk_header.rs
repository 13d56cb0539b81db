//! VMDK descriptor and sparse-extent header parsing
//! (`tidemark_formats::replica::vmdk`): `data` is parsed as a text
//! descriptor, then written as `replica.vmdk` and opened as a replica
//! (read-only, then writable). Nothing may panic or allocate without bound;
//! errors are fine. An image that opens reads within its size, reports
//! extents that tile it, and still reads what was written after a flush.
//! Each input also runs with the sparse magic "KDMV" forced onto its first
//! bytes, so the fuzzer reaches the header's field checks.
#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::replica::vmdk::descriptor::Descriptor;
use tidemark_formats::replica::vmdk::sparse::SparseHeader;
use tidemark_formats::replica::{self, ReplicaImage};
use tidemark_fuzz::scratch_dir;

fuzz_target!(|data: &[u8]| {
    let _ = Descriptor::parse(data, "fuzz.vmdk".as_ref());
    exercise(data);
    if data.len() >= 4 && data[..4] != *b"KDMV" {
        let mut fixed = data.to_vec();
        fixed[..4].copy_from_slice(b"KDMV");
        exercise(&fixed);
    }
});

fn exercise(file: &[u8]) {
    if let Ok(h) = SparseHeader::decode(file, "fuzz.vmdk".as_ref()) {
        let _ = h.geometry("fuzz.vmdk".as_ref(), file.len() as u64);
    }
    let tmp = scratch_dir();
    let path = tmp.path().join(replica::VMDK_FILE);
    fs::write(&path, file).expect("write vmdk file");
    // A flat descriptor may name an extent: give it one to find.
    fs::write(tmp.path().join(replica::FLAT_EXTENT_FILE), vec![0u8; 64 << 10]).expect("write extent");
    if let Ok(img) = replica::open_read_only(tmp.path()) {
        probe(img.as_ref());
    }
    let Ok(mut img) = replica::open(tmp.path()) else {
        return;
    };
    let size = img.size();
    let at = size / 2;
    let data = [0x5au8; 1000];
    let n = (size - at).min(data.len() as u64) as usize;
    if img.write_at(&data[..n], at).is_ok() && img.flush().is_ok() {
        let mut back = vec![0u8; n];
        if img.read_at(&mut back, at).is_ok() {
            assert_eq!(back, &data[..n], "read after write differs");
        }
        drop(img);
        if let Ok(img) = replica::open_read_only(tmp.path()) {
            let mut back = vec![0u8; n];
            if img.read_at(&mut back, at).is_ok() {
                assert_eq!(back, &data[..n], "read after reopen differs");
            }
        }
    }
}

fn probe(img: &dyn ReplicaImage) {
    let size = img.size();
    let mut buf = vec![0u8; 4096];
    for at in [0, size / 3, size.saturating_sub(4096), size] {
        let n = (size - at.min(size)).min(4096) as usize;
        let _ = img.read_at(&mut buf[..n], at.min(size));
    }
    // Walk at most a few hundred grains' worth of map.
    if let Ok(ext) = img.allocated(0, size.min(64 << 20)) {
        let mut pos = 0;
        for (o, l, _) in ext {
            assert_eq!(o, pos, "extents do not tile the image");
            pos += l;
        }
        assert_eq!(pos, size.min(64 << 20));
    }
}
