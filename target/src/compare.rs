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

/// The hashes of the chunks of `offset..offset+length` inside the replica.
pub fn hash_span(replica: &Replica, offset: u64, length: u64) -> Result<Vec<[u8; 32]>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for (o, l) in chunks(offset, length, replica.size()) {
        if replica.next_data(o, o + l)?.is_none() {
            out.push(zero_hash(l));
            continue;
        }
        buf.resize(usize::try_from(l).unwrap_or(0), 0);
        replica.read_at(&mut buf, o)?;
        out.push(chunk_hash(&buf));
    }
    Ok(out)
}
