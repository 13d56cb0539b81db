//! The chunks a hash-compare resync compares (`docs/failback.md`, section
//! 4): [`HASH_CHUNK`] bytes aligned from the start of the disk, the last
//! one cut at the disk's end, each named by the blake3 of its bytes. Both
//! ends (the agent reading its disk, the target reading its replica) hash
//! through these helpers, so they agree by construction.

use std::sync::OnceLock;

pub use crate::frame::{HASH_CHUNK, MAX_HASH_SPAN};

/// The chunks of `offset..offset+length` that lie inside a disk of `size`
/// bytes: `(offset, length)` of each, in order.
pub fn chunks(offset: u64, length: u64, size: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(length).min(size);
    let first = offset - offset % HASH_CHUNK;
    let n = end.saturating_sub(first).div_ceil(HASH_CHUNK);
    (0..n).map(move |i| {
        let o = first + i * HASH_CHUNK;
        (o, HASH_CHUNK.min(end - o))
    })
}

/// The blake3 of `len` zero bytes (`len` ≤ [`HASH_CHUNK`]); the full
/// chunk's is computed once.
pub fn zero_hash(len: u64) -> [u8; 32] {
    static FULL: OnceLock<[u8; 32]> = OnceLock::new();
    let hash = |n: u64| {
        let zeros = vec![0u8; usize::try_from(n.min(HASH_CHUNK)).unwrap_or(0)];
        *blake3::hash(&zeros).as_bytes()
    };
    if len == HASH_CHUNK {
        *FULL.get_or_init(|| hash(HASH_CHUNK))
    } else {
        hash(len)
    }
}

/// The blake3 of one chunk's bytes.
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_aligned_and_cut_at_the_end() {
        let c: Vec<_> = chunks(0, 3 * HASH_CHUNK, 2 * HASH_CHUNK + 100).collect();
        assert_eq!(
            c,
            vec![(0, HASH_CHUNK), (HASH_CHUNK, HASH_CHUNK), (2 * HASH_CHUNK, 100)]
        );
        assert_eq!(chunks(HASH_CHUNK, HASH_CHUNK, HASH_CHUNK).count(), 0);
        assert_eq!(zero_hash(HASH_CHUNK), chunk_hash(&[0; 64 << 10]));
        assert_eq!(zero_hash(100), chunk_hash(&[0; 100]));
    }
}
