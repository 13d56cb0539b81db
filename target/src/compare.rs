//! The target's half of a hash-compare resync (`docs/failback.md`, section
//! 4): the blake3 of each chunk of the replica that an agent asks about
//! (`Frame::HashQuery`, relayed by the collector). A chunk the image holds
//! no data for hashes as zeros without being read, so a new sparse replica
//! answers at once and the agent sends only the chunks that hold data.
//!
//! The hashes may be taken while records are applied: every write reaches
//! the source disk before it reaches the replica, and is applied to the
//! replica after any read of it, so a chunk whose hash matches the source's
//! converges to the source's bytes, and one that differs is sent again.

use tidemark_wire::chunk::{chunk_hash, chunks, zero_hash};

use crate::error::Result;
use crate::replica::Replica;

/// Bytes read at once.
const READ: u64 = 1 << 20;

/// The hashes of the chunks of `offset..offset+length` inside the replica
/// (`offset` is chunk-aligned: the wire checks it), read 1 MiB at a time;
/// a piece the image holds no data for is not read.
pub fn hash_span(replica: &Replica, offset: u64, length: u64) -> Result<Vec<[u8; 32]>> {
    let size = replica.size();
    let end = offset.saturating_add(length).min(size);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut pos = offset;
    while pos < end {
        let n = READ.min(end - pos);
        if replica.next_data(pos, pos + n)?.is_none() {
            out.extend(chunks(pos, n, size).map(|(_, l)| zero_hash(l)));
        } else {
            buf.resize(usize::try_from(n).unwrap_or(0), 0);
            replica.read_at(&mut buf, pos)?;
            for (o, l) in chunks(pos, n, size) {
                let at = usize::try_from(o - pos).unwrap_or(0);
                out.push(chunk_hash(&buf[at..at + usize::try_from(l).unwrap_or(0)]));
            }
        }
        pos += n;
    }
    Ok(out)
}
