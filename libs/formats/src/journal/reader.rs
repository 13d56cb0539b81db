//! Read-only access to a journal: for `journal dump`, `journal replay`, the
//! shipper and benchmarks. Never modifies anything, so it is safe on the
//! state of a live agent: a record still being appended simply ends the
//! iteration, and calling `next` again later picks up from there.
//!
//! A damaged record also ends the iteration (the reader cannot tell it from
//! a record being appended). A caller that knows the record is complete
//! (the shipper: its seq is below the writer's next seq) can step over it
//! with [`RecordIter::skip_unreadable`].

use std::fs::File;
use std::path::{Path, PathBuf};

use tidemark_wire::record::{Record, RecordHeader, HEADER_LEN, MAGIC};

use super::segment::{read_record_at, read_up_to, SegmentHeader, Step, SEGMENT_HEADER_LEN};
use super::{list, segment_path};
use crate::error::{Error, IoContext, Result};

/// A journal directory opened for reading.
#[derive(Debug, Clone)]
pub struct JournalReader {
    dir: PathBuf,
}

impl JournalReader {
    /// Open `dir` for reading; fails if it is not a journal directory.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                "open journal",
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such journal directory"),
            ));
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Live segments as (header, path), in order.
    pub fn segments(&self) -> Result<Vec<(SegmentHeader, PathBuf)>> {
        let mut out = Vec::new();
        for (index, p) in list(&self.dir, "seg-").ctx("list", &self.dir)? {
            let f = match File::open(&p) {
                Ok(f) => f,
                // Recycled under us by a live agent.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("open", &p, e)),
            };
            match SegmentHeader::read(&f, &p) {
                Ok(h) if h.index == index => out.push((h, p)),
                Ok(h) => {
                    return Err(Error::corrupt(
                        &p,
                        format!("header says segment {}, file name says {index}", h.index),
                    ))
                }
                // A segment being created by a live agent.
                Err(_) if out.last().is_some() => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The disk ranges `(offset, length)` that the records with seqs in
    /// `from..=to` change (Write, Zero, Trim, Sync), read from their headers
    /// alone (payloads are neither read nor verified). None when a record
    /// of the span is not held or its header cannot be read: the caller
    /// must then assume any region may have changed.
    pub fn changed_ranges(&self, from: u64, to: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let mut out = Vec::new();
        if from > to {
            return Ok(Some(out));
        }
        let segs = self.segments()?;
        let Some(start) = segs.iter().rposition(|(h, _)| h.first_seq <= from) else {
            return Ok(None);
        };
        let mut seq = segs[start].0.first_seq;
        let mut hb = [0u8; HEADER_LEN];
        for (h, p) in &segs[start..] {
            if h.first_seq != seq && seq <= to {
                // A gap between segments inside the span.
                return Ok(None);
            }
            let f = File::open(p).ctx("open", p)?;
            let mut pos = SEGMENT_HEADER_LEN;
            while seq <= to {
                if read_up_to(&f, &mut hb, pos).ctx("read", p)? < HEADER_LEN {
                    break;
                }
                let Ok(rh) = RecordHeader::decode(&hb) else { break };
                if rh.seq != seq {
                    break;
                }
                if seq >= from && rh.kind.changes_disk() && rh.length > 0 {
                    out.push((rh.offset, rh.length));
                }
                pos += rh.encoded_len();
                seq += 1;
            }
            if seq > to {
                return Ok(Some(out));
            }
        }
        Ok(None)
    }

    /// Iterate records with seq ≥ `from_seq` (or from the oldest held, if
    /// that is later). Each payload is verified against its hash.
    pub fn records_from(&self, from_seq: u64) -> RecordIter {
        RecordIter {
            dir: self.dir.clone(),
            want: from_seq,
            cur: None,
            payload: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Cursor {
    file: File,
    path: PathBuf,
    pos: u64,
    index: u64,
}

/// Records an iteration stepped over: `from..to` could not be read.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The first seq that could not be read.
    pub from: u64,
    /// The seq the iteration resumes at (`from + 1` when the damaged
    /// record's header is intact).
    pub to: u64,
    /// The segment holding `from`.
    pub segment: PathBuf,
    /// Where `from` starts in it.
    pub pos: u64,
    /// `from`'s header, when it is intact (its payload is damaged): what
    /// the record changed. `None`: nothing is known about `from..to`.
    pub header: Option<RecordHeader>,
    /// What is wrong with it.
    pub reason: String,
}

/// An iterator over verified records. It ends at the journal's current end;
/// calling `next` again later continues if more was appended.
#[derive(Debug)]
pub struct RecordIter {
    dir: PathBuf,
    want: u64,
    cur: Option<Cursor>,
    payload: Vec<u8>,
}

impl RecordIter {
    /// The seq the next record returned will have.
    pub fn next_seq(&self) -> u64 {
        self.want
    }

    /// Position on the segment holding `self.want`, skipping earlier
    /// records by their headers alone.
    fn seek(&mut self) -> Result<bool> {
        let segs = JournalReader { dir: self.dir.clone() }.segments()?;
        let Some(first) = segs.first() else {
            return Ok(false);
        };
        if self.want < first.0.first_seq {
            self.want = first.0.first_seq;
        }
        let Some((h, p)) = segs.iter().rev().find(|(h, _)| h.first_seq <= self.want) else {
            return Ok(false);
        };
        let f = File::open(p).ctx("open", p)?;
        let mut pos = SEGMENT_HEADER_LEN;
        let mut seq = h.first_seq;
        let mut hb = [0u8; HEADER_LEN];
        while seq < self.want {
            if read_up_to(&f, &mut hb, pos).ctx("read", p)? < HEADER_LEN {
                return Ok(false);
            }
            match RecordHeader::decode(&hb) {
                Ok(rh) if rh.seq == seq => {
                    pos += rh.encoded_len();
                    seq += 1;
                }
                _ => return Ok(false),
            }
        }
        self.cur = Some(Cursor {
            file: f,
            path: p.clone(),
            pos,
            index: h.index,
        });
        Ok(true)
    }

    fn step(&mut self) -> Result<Option<Record>> {
        if self.cur.is_none() && !self.seek()? {
            return Ok(None);
        }
        for _ in 0..2 {
            let Some(cur) = self.cur.as_mut() else {
                return Ok(None);
            };
            if let Step::Record(h) = read_record_at(&cur.file, &cur.path, cur.pos, self.want, &mut self.payload)? {
                cur.pos += h.encoded_len();
                self.want += 1;
                return Ok(Some(Record {
                    header: h,
                    payload: std::mem::take(&mut self.payload),
                }));
            }
            // The journal ends here for now, unless the writer moved on to
            // the next segment.
            let Some(next_index) = cur.index.checked_add(1) else {
                return Ok(None);
            };
            let next = segment_path(&self.dir, next_index);
            let Ok(f) = File::open(&next) else {
                return Ok(None);
            };
            match SegmentHeader::read(&f, &next) {
                Ok(h) if h.first_seq == self.want && h.index == next_index => {
                    self.cur = Some(Cursor {
                        file: f,
                        path: next,
                        pos: SEGMENT_HEADER_LEN,
                        index: h.index,
                    });
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }
}

impl RecordIter {
    /// Step over the record at [`RecordIter::next_seq`], which the caller
    /// knows to be complete (the writer's next seq is past it) but which
    /// cannot be read: the iteration resumes at the next record that can be
    /// found. With an intact header (a damaged payload) that is the next
    /// seq; otherwise the rest of the segment is searched for the first
    /// valid record with a higher seq (stale records of an earlier use of
    /// the file all have lower seqs), then the next segment's first record.
    /// `None`: the record at `next_seq` can be read after all, or no later
    /// record can be found (yet); nothing changed.
    pub fn skip_unreadable(&mut self) -> Result<Option<Skipped>> {
        if self.cur.is_none() && !self.seek()? {
            return Ok(None);
        }
        let Some(cur) = self.cur.as_ref() else {
            return Ok(None);
        };
        let want = self.want;
        let (reason, header) = match read_record_at(&cur.file, &cur.path, cur.pos, want, &mut self.payload)? {
            Step::Record(_) => return Ok(None),
            Step::End(torn) => {
                let mut hb = [0u8; HEADER_LEN];
                let n = read_up_to(&cur.file, &mut hb, cur.pos).ctx("read", &cur.path)?;
                let header = (n == HEADER_LEN)
                    .then(|| RecordHeader::decode(&hb).ok())
                    .flatten()
                    .filter(|h| h.seq == want);
                let reason = match (&torn, &header) {
                    (Some((msg, _)), _) => msg.clone(),
                    (None, _) if n < HEADER_LEN => format!("the segment ends inside the header of seq {want}"),
                    (None, _) => format!("no valid header for seq {want}"),
                };
                (reason, header)
            }
        };
        let skipped = |to: u64, header: Option<RecordHeader>| Skipped {
            from: want,
            to,
            segment: cur.path.clone(),
            pos: cur.pos,
            header,
            reason: reason.clone(),
        };
        if let Some(h) = header {
            let len = h.encoded_len();
            let out = skipped(want + 1, Some(h));
            if let Some(c) = self.cur.as_mut() {
                c.pos += len;
            }
            self.want = want + 1;
            return Ok(Some(out));
        }
        // Search the rest of this segment for the first valid later record.
        let len = cur.file.metadata().ctx("stat", &cur.path)?.len();
        const WINDOW: usize = 1 << 20;
        let mut buf = vec![0u8; WINDOW + HEADER_LEN];
        let mut base = cur.pos + 1;
        while base < len {
            let n = read_up_to(&cur.file, &mut buf, base).ctx("read", &cur.path)?;
            if n < HEADER_LEN {
                break;
            }
            for i in 0..=(n - HEADER_LEN) {
                if buf[i..i + 4] != MAGIC {
                    continue;
                }
                let mut sb = [0u8; 8];
                sb.copy_from_slice(&buf[i + 8..i + 16]);
                let seq = u64::from_le_bytes(sb);
                if seq <= want || seq > super::segment::MAX_SEQ {
                    continue;
                }
                let pos = base + i as u64;
                if let Step::Record(_) = read_record_at(&cur.file, &cur.path, pos, seq, &mut self.payload)? {
                    let out = skipped(seq, None);
                    if let Some(c) = self.cur.as_mut() {
                        c.pos = pos;
                    }
                    self.want = seq;
                    return Ok(Some(out));
                }
            }
            if n < buf.len() {
                break;
            }
            base += (n - HEADER_LEN + 1) as u64;
        }
        // Nothing later in this segment: the next one, if the writer has
        // moved on to it.
        let Some(next_index) = cur.index.checked_add(1) else {
            return Ok(None);
        };
        let next = segment_path(&self.dir, next_index);
        let Ok(f) = File::open(&next) else {
            return Ok(None);
        };
        match SegmentHeader::read(&f, &next) {
            Ok(h) if h.first_seq > want && h.index == next_index => {
                let out = skipped(h.first_seq, None);
                self.cur = Some(Cursor {
                    file: f,
                    path: next,
                    pos: SEGMENT_HEADER_LEN,
                    index: h.index,
                });
                self.want = h.first_seq;
                Ok(Some(out))
            }
            _ => Ok(None),
        }
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step().transpose()
    }
}
