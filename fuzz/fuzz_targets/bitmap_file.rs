//! The dirty bitmap file (`tidemark_formats::bitmap`): `data` is the file's
//! contents, opened with `DirtyBitmap::open_or_create`. Nothing may panic;
//! errors are fine. On a bitmap that opens, marked regions read back dirty,
//! also after reopening.
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::bitmap::{DirtyBitmap, DEFAULT_GRANULARITY};
use tidemark_fuzz::{le_u32, le_u64, repair_bitmap_header, scratch_dir};

/// Largest bit array the target asks for, in regions. The disk geometry is
/// the caller's choice, not the file's, so a fuzzed geometry is only used
/// when it is of a size a caller could have.
const MAX_REGIONS: u64 = 1 << 23;

fuzz_target!(|data: &[u8]| {
    exercise(data);
    let mut fixed = data.to_vec();
    repair_bitmap_header(&mut fixed);
    if fixed != data {
        exercise(&fixed);
    }
});

fn exercise(file: &[u8]) {
    let tmp = scratch_dir();
    let path = tmp.path().join("dirty.bitmap");
    fs::write(&path, file).expect("write bitmap file");

    // The geometry an agent for some other disk would ask for...
    let _ = DirtyBitmap::open_or_create(&path, (1 << 20) + 100, DEFAULT_GRANULARITY);
    // ...and the one the header claims, which gets past the geometry check.
    let (Some(granularity), Some(disk_size)) = (le_u32(file, 12), le_u64(file, 16)) else {
        return;
    };
    if disk_size / u64::from(granularity.max(1)) > MAX_REGIONS {
        return;
    }
    let Ok(mut bm) = DirtyBitmap::open_or_create(&path, disk_size, granularity) else {
        return;
    };
    let g = bm.granularity();
    // Callers pass offsets of requests checked against the disk size, so
    // probe at, around and a little past the disk, not near u64::MAX.
    let near = |at: usize| le_u64(file, at).unwrap_or(0) % disk_size.saturating_add(2 * g);
    let probes = [
        (0, 1),
        (disk_size / 2, g),
        (disk_size.saturating_sub(1), 1),
        (disk_size, 1),
        (near(36), le_u64(file, 44).unwrap_or(0)),
        (near(52), 1),
    ];
    let mut marked = Vec::new();
    for (offset, len) in probes {
        let _ = bm.is_dirty(offset);
        // clean_parts walks region by region; keep the walk short.
        let _ = bm.clean_parts(offset, len.min(64 * g));
        // A zero-length mark marks nothing.
        if bm.mark(offset, len).is_ok() && len > 0 {
            assert!(bm.is_dirty(offset), "marked offset {offset} is not dirty");
            marked.push(offset);
        }
    }
    let ranges = bm.dirty_ranges();
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(total, bm.dirty_bytes());
    assert!(total <= disk_size, "{total} dirty bytes on a {disk_size}-byte disk");
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "dirty ranges overlap or touch: {ranges:?}");
    }
    let _ = bm.count();
    let _ = bm.sync();
    drop(bm);

    reopen(&path, disk_size, granularity, &marked);
}

fn reopen(path: &Path, disk_size: u64, granularity: u32, marked: &[u64]) {
    let mut bm = DirtyBitmap::open_or_create(path, disk_size, granularity)
        .expect("a bitmap that opened and was marked opens again");
    for &offset in marked {
        assert!(bm.is_dirty(offset), "mark at {offset} lost on reopen");
    }
    if bm.clear().is_ok() {
        assert_eq!(bm.count(), 0);
        assert!(bm.dirty_ranges().is_empty());
    }
}
