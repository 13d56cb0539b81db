//! Packed batches: the collector → target encoding of a run of records,
//! deduplicated against a window of recently sent 4 KiB blocks, zero
//! blocks elided, and the whole compressed with zstd.
//!
//! ```text
//!  raw stream (before zstd), for each record in seq order:
//!  +-----------------------------+--------------------------------------+
//!  | record header (80 bytes,    | payload as chunk items: the payload  |
//!  | unchanged: its blake3 is    | is cut into 4 KiB chunks (the last   |
//!  | the agent's, checked at     | may be shorter); each chunk is one   |
//!  | the target)                 | item:                                |
//!  |                             |   0x00 literal: the chunk's bytes    |
//!  |                             |   0x01 zero:    nothing (all zeros)  |
//!  |                             |   0x02 ref:     slot u32 (a full     |
//!  |                             |                 chunk in the window) |
//!  +-----------------------------+--------------------------------------+
//! ```
//!
//! The window: both ends number the full-size literal chunks they send or
//! receive, 0, 1, 2, …, and keep chunk `n` in slot `n % window_blocks`
//! (the sender keeps a hash of it, the receiver the bytes, through a
//! [`BlockStore`]). A later chunk equal to one still in the window is sent
//! as a reference to its slot. Both windows start empty on a new
//! connection, so nothing about them is ever persisted.
//!
//! Bounds: `raw_len` ≤ [`MAX_RAW`] and the decoded payloads of one batch
//! together ≤ [`MAX_RAW`], checked before allocating; zstd decompresses
//! into a buffer of exactly `raw_len` bytes.

use std::collections::HashMap;
use std::io;

use crate::record::{Record, RecordHeader, HEADER_LEN};
use crate::{WireError, WireErrorKind};

/// Dedup and zero-detection granularity.
pub const BLOCK: usize = 4096;
/// Largest raw (decompressed) stream, and largest sum of payloads, of one batch.
pub const MAX_RAW: u32 = 64 << 20;
/// Default window: 8192 blocks (32 MiB of recent data).
pub const DEFAULT_WINDOW_BLOCKS: u32 = 8192;

const ITEM_LITERAL: u8 = 0;
const ITEM_ZERO: u8 = 1;
const ITEM_REF: u8 = 2;

fn err(kind: WireErrorKind, msg: impl Into<String>) -> WireError {
    WireError { kind, msg: msg.into() }
}

/// A packed batch as it travels in a `Packed` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedBatch {
    pub first_seq: u64,
    pub count: u32,
    /// `PACKED_*` bits of [`crate::frame`].
    pub flags: u32,
    /// Length of the raw stream once decompressed.
    pub raw_len: u32,
    /// The zstd-compressed raw stream.
    pub data: Vec<u8>,
}

/// What packing one batch saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Sum of the records' payload bytes.
    pub payload_bytes: u64,
    /// Raw stream bytes (headers, items, literals) before zstd.
    pub raw_bytes: u64,
    /// Bytes on the wire: the compressed stream plus the frame's headers.
    pub wire_bytes: u64,
    /// Chunks sent as window references.
    pub dedup_hits: u64,
    /// Chunks sent as zero items.
    pub zero_blocks: u64,
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn key(chunk: &[u8]) -> [u8; 16] {
    let mut k = [0u8; 16];
    k.copy_from_slice(&blake3::hash(chunk).as_bytes()[..16]);
    k
}

/// The sending side: remembers which blocks the receiver's window holds.
pub struct Packer {
    cap: u32,
    next: u64,
    slots: Vec<Option<[u8; 16]>>,
    index: HashMap<[u8; 16], u32>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("cap", &self.cap)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Packer {
    /// A packer with an empty window of `window_blocks` (at least 1) and the
    /// zstd `level`.
    pub fn new(window_blocks: u32, level: i32) -> io::Result<Self> {
        let cap = window_blocks.max(1);
        Ok(Self {
            cap,
            next: 0,
            slots: Vec::new(),
            index: HashMap::new(),
            compressor: zstd::bulk::Compressor::new(level)?,
        })
    }

    fn slot_of(&self, n: u64) -> u32 {
        u32::try_from(n % u64::from(self.cap)).unwrap_or(0)
    }

    /// Pack `records` (consecutive seqs, non-empty) into one batch.
    pub fn pack(&mut self, records: &[Record], flags: u32) -> Result<(PackedBatch, PackStats), WireError> {
        let first = records
            .first()
            .map(|r| r.header.seq)
            .ok_or_else(|| err(WireErrorKind::OutOfBounds, "an empty batch"))?;
        let count =
            u32::try_from(records.len()).map_err(|_| err(WireErrorKind::OutOfBounds, "batch has too many records"))?;
        let payload: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
        if payload > u64::from(MAX_RAW) {
            return Err(err(
                WireErrorKind::OutOfBounds,
                format!("batch payloads of {payload} bytes exceed the {MAX_RAW}-byte maximum"),
            ));
        }
        let mut st = PackStats {
            payload_bytes: payload,
            ..PackStats::default()
        };
        let mut raw = Vec::with_capacity(records.len() * HEADER_LEN + usize::try_from(payload).unwrap_or(0) / 2);
        for (i, r) in records.iter().enumerate() {
            if Some(r.header.seq) != first.checked_add(i as u64) {
                return Err(err(WireErrorKind::Corrupt, "batch seqs are not consecutive"));
            }
            if r.payload.len() != r.header.payload_len as usize {
                return Err(err(
                    WireErrorKind::Corrupt,
                    format!("seq {}: payload length disagrees with its header", r.header.seq),
                ));
            }
            raw.extend_from_slice(&r.header.encode());
            for chunk in r.payload.chunks(BLOCK) {
                if is_zero(chunk) {
                    raw.push(ITEM_ZERO);
                    st.zero_blocks += 1;
                    continue;
                }
                if chunk.len() == BLOCK {
                    let k = key(chunk);
                    if let Some(&slot) = self.index.get(&k) {
                        raw.push(ITEM_REF);
                        raw.extend_from_slice(&slot.to_le_bytes());
                        st.dedup_hits += 1;
                        continue;
                    }
                    let slot = self.slot_of(self.next);
                    let si = slot as usize;
                    if self.slots.len() <= si {
                        self.slots.resize(si + 1, None);
                    }
                    if let Some(old) = self.slots[si].replace(k) {
                        if self.index.get(&old) == Some(&slot) {
                            self.index.remove(&old);
                        }
                    }
                    self.index.insert(k, slot);
                    self.next += 1;
                }
                raw.push(ITEM_LITERAL);
                raw.extend_from_slice(chunk);
            }
        }
        let raw_len = u32::try_from(raw.len())
            .ok()
            .filter(|l| *l <= MAX_RAW)
            .ok_or_else(|| err(WireErrorKind::OutOfBounds, "packed batch too large"))?;
        let data = self
            .compressor
            .compress(&raw)
            .map_err(|e| err(WireErrorKind::Corrupt, format!("zstd compression failed: {e}")))?;
        st.raw_bytes = raw.len() as u64;
        // Frame header (16) plus the packed header (20).
        st.wire_bytes = data.len() as u64 + 36;
        Ok((
            PackedBatch {
                first_seq: first,
                count,
                flags,
                raw_len,
                data,
            },
            st,
        ))
    }
}

/// Where the receiving side keeps its window's blocks.
pub trait BlockStore {
    /// Store `block` (exactly [`BLOCK`] bytes) in `slot`.
    fn put(&mut self, slot: u32, block: &[u8]) -> io::Result<()>;
    /// Read `slot` into `out` (exactly [`BLOCK`] bytes).
    fn get(&mut self, slot: u32, out: &mut [u8]) -> io::Result<()>;
}

/// A window held in memory (tests, small windows).
#[derive(Debug, Default)]
pub struct MemStore(HashMap<u32, Box<[u8]>>);

impl BlockStore for MemStore {
    fn put(&mut self, slot: u32, block: &[u8]) -> io::Result<()> {
        self.0.insert(slot, block.into());
        Ok(())
    }
    fn get(&mut self, slot: u32, out: &mut [u8]) -> io::Result<()> {
        let b = self
            .0
            .get(&slot)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("window slot {slot} is empty")))?;
        out.copy_from_slice(b);
        Ok(())
    }
}

/// The receiving side: rebuilds records from packed batches.
#[derive(Debug)]
pub struct Unpacker<S> {
    cap: u32,
    next: u64,
    store: S,
}

impl<S: BlockStore> Unpacker<S> {
    /// An unpacker with an empty window of `window_blocks` (at least 1; must
    /// match the sender's).
    pub fn new(window_blocks: u32, store: S) -> Self {
        Self {
            cap: window_blocks.max(1),
            next: 0,
            store,
        }
    }

    /// The block store.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Decode a packed batch. Headers are checked (checksum, fields, seqs);
    /// payload hashes are NOT: the caller checks each record with
    /// [`RecordHeader::verify_payload`] so that a mismatch stops that record
    /// rather than the stream. A window I/O error is reported as `Corrupt`.
    pub fn unpack(&mut self, p: &PackedBatch) -> Result<Vec<Record>, WireError> {
        if p.raw_len > MAX_RAW || p.count == 0 {
            return Err(err(WireErrorKind::OutOfBounds, "packed batch empty or too large"));
        }
        let raw = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress(&p.data, p.raw_len as usize))
            .map_err(|e| err(WireErrorKind::Corrupt, format!("packed batch does not decompress: {e}")))?;
        if raw.len() != p.raw_len as usize {
            return Err(err(
                WireErrorKind::Truncated,
                format!(
                    "packed batch decompressed to {} bytes, header says {}",
                    raw.len(),
                    p.raw_len
                ),
            ));
        }
        let mut pos = 0usize;
        let mut total: u64 = 0;
        let mut out = Vec::new();
        for i in 0..u64::from(p.count) {
            let h = RecordHeader::decode(&raw[pos..])?;
            let want = p.first_seq.checked_add(i);
            if Some(h.seq) != want {
                return Err(err(
                    WireErrorKind::Corrupt,
                    format!(
                        "packed record {i} has seq {}, expected {}",
                        h.seq,
                        p.first_seq.saturating_add(i)
                    ),
                ));
            }
            pos += HEADER_LEN;
            total += u64::from(h.payload_len);
            if total > u64::from(MAX_RAW) {
                return Err(err(
                    WireErrorKind::OutOfBounds,
                    format!("packed batch payloads exceed the {MAX_RAW}-byte maximum"),
                ));
            }
            let len = h.payload_len as usize;
            let mut payload = Vec::with_capacity(len);
            while payload.len() < len {
                let n = (len - payload.len()).min(BLOCK);
                let tag = *raw
                    .get(pos)
                    .ok_or_else(|| err(WireErrorKind::Truncated, format!("seq {}: payload ends early", h.seq)))?;
                pos += 1;
                match tag {
                    ITEM_LITERAL => {
                        let chunk = raw.get(pos..pos + n).ok_or_else(|| {
                            err(WireErrorKind::Truncated, format!("seq {}: literal ends early", h.seq))
                        })?;
                        pos += n;
                        if n == BLOCK {
                            let slot = u32::try_from(self.next % u64::from(self.cap)).unwrap_or(0);
                            self.store
                                .put(slot, chunk)
                                .map_err(|e| err(WireErrorKind::Corrupt, format!("dedup window write failed: {e}")))?;
                            self.next += 1;
                        }
                        payload.extend_from_slice(chunk);
                    }
                    ITEM_ZERO => payload.resize(payload.len() + n, 0),
                    ITEM_REF => {
                        let b = raw.get(pos..pos + 4).ok_or_else(|| {
                            err(WireErrorKind::Truncated, format!("seq {}: reference ends early", h.seq))
                        })?;
                        pos += 4;
                        let slot = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        let filled = self.next.min(u64::from(self.cap));
                        if n != BLOCK || u64::from(slot) >= filled {
                            return Err(err(
                                WireErrorKind::Corrupt,
                                format!("seq {}: reference to window slot {slot} that holds nothing", h.seq),
                            ));
                        }
                        let at = payload.len();
                        payload.resize(at + BLOCK, 0);
                        self.store
                            .get(slot, &mut payload[at..])
                            .map_err(|e| err(WireErrorKind::Corrupt, format!("dedup window read failed: {e}")))?;
                    }
                    t => {
                        return Err(err(
                            WireErrorKind::Corrupt,
                            format!("seq {}: unknown chunk item {t:#04x}", h.seq),
                        ))
                    }
                }
            }
            out.push(Record { header: h, payload });
        }
        if pos != raw.len() {
            return Err(err(
                WireErrorKind::Corrupt,
                format!("{} bytes after the last packed record", raw.len() - pos),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordKind;
    use proptest::prelude::*;

    fn rec(seq: u64, offset: u64, data: Vec<u8>) -> Record {
        Record {
            header: RecordHeader::new(RecordKind::Write, seq, 0, offset, data.len() as u64, &data),
            payload: data,
        }
    }

    #[test]
    fn dedup_zero_and_literals_round_trip() {
        let a = vec![7u8; BLOCK];
        let mut two = a.clone();
        two.extend_from_slice(&[0u8; BLOCK]);
        two.extend_from_slice(b"tail");
        let recs = vec![rec(5, 0, a.clone()), rec(6, 8192, two), rec(7, 0, a)];
        let mut p = Packer::new(16, 3).unwrap();
        let (b, st) = p.pack(&recs, 0).unwrap();
        assert_eq!(st.dedup_hits, 2);
        assert_eq!(st.zero_blocks, 1);
        let mut u = Unpacker::new(16, MemStore::default());
        let got = u.unpack(&b).unwrap();
        assert_eq!(got, recs);
        // The window carries over to the next batch on the same connection.
        let (b2, st2) = p.pack(&[rec(8, 4096, vec![7u8; BLOCK])], 0).unwrap();
        assert_eq!(st2.dedup_hits, 1);
        assert_eq!(u.unpack(&b2).unwrap()[0].payload, vec![7u8; BLOCK]);
    }

    #[test]
    fn hostile_batches_are_refused() {
        let mut p = Packer::new(4, 3).unwrap();
        let (mut b, _) = p.pack(&[rec(1, 0, vec![1u8; BLOCK])], 0).unwrap();
        b.raw_len += 1;
        let mut u = Unpacker::new(4, MemStore::default());
        assert!(u.unpack(&b).is_err());
        // A reference to a slot that was never filled.
        let mut raw = rec(1, 0, vec![1u8; BLOCK]).header.encode().to_vec();
        raw.push(ITEM_REF);
        raw.extend_from_slice(&3u32.to_le_bytes());
        let data = zstd::bulk::compress(&raw, 3).unwrap();
        let bad = PackedBatch {
            first_seq: 1,
            count: 1,
            flags: 0,
            raw_len: u32::try_from(raw.len()).unwrap(),
            data,
        };
        let e = Unpacker::new(4, MemStore::default()).unpack(&bad).unwrap_err();
        assert!(e.msg.contains("slot 3"), "{e}");
    }

    proptest! {
        #[test]
        fn windows_stay_in_step(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u8..4, 1usize..4, 0usize..100), 1..6), 1..6),
            cap in 1u32..6,
        ) {
            let mut p = Packer::new(cap, 1).unwrap();
            let mut u = Unpacker::new(cap, MemStore::default());
            let mut seq = 1;
            for batch in batches {
                let recs: Vec<Record> = batch.iter().map(|&(fill, blocks, tail)| {
                    let mut d = vec![fill; blocks * BLOCK + tail];
                    if let Some(x) = d.last_mut() { *x = x.wrapping_add(u8::try_from(tail % 256).unwrap()); }
                    seq += 1;
                    rec(seq - 1, 0, d)
                }).collect();
                let (b, _) = p.pack(&recs, 0).unwrap();
                let got = u.unpack(&b).unwrap();
                for r in &got { r.header.verify_payload(&r.payload).unwrap(); }
                prop_assert_eq!(got, recs);
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), raw_len in 0u32..5000, count in 1u32..4) {
            let b = PackedBatch { first_seq: 1, count, flags: 0, raw_len, data };
            let _ = Unpacker::new(8, MemStore::default()).unpack(&b);
        }
    }
}
