//! The collector's spool: one file per batch received from an agent, durable
//! before the batch is acknowledged, deleted once the target acknowledged
//! every record in it. This module owns the file layout, its checksums, its
//! writer (temp file → fsync → rename → fsync dir, in steps the caller can
//! interleave with failpoints) and its reader (which salvages what it can
//! from a damaged body). It never decides what to forward or when to trim.
//!
//! ```text
//!  <spool>/<disk-id>/
//!    b-<first_seq:016x>-<last_seq:016x>.tms       one batch, seqs first..=last
//!    b-<first_seq:016x>-<last_seq:016x>.tms.tmp   being written (deleted at open: torn)
//!
//!  batch file:
//!  byte 0          8         12          16            32          40         48      52      56
//!       +----------+---------+-----------+-------------+-----------+----------+-------+-------+
//!       | magic    | version | header_len| disk_uuid   | first_seq | last_seq | count | flags |
//!       |"TMSPOOLB"| u32=1   | u32=96    | [16]        | u64       | u64      | u32   | u32=0 |
//!       +----------+---------+-----------+-------------+-----------+----------+-------+-------+
//!    56 | body_len u64 | first_time_ns u64 | payload_bytes u64 | body_crc u32 | zero u32 |
//!    88 | header crc32c of bytes 0..88 (u32) | zero u32 |
//!    96 +------------------------------------+----------+
//!       | body (body_len bytes): the records first_seq..=last_seq back to back, each      |
//!       | exactly as tidemark_wire::Record::encode wrote it (80-byte header + payload)     |
//!       +----------------------------------------------------------------------------------+
//! ```
//!
//! `count = last_seq - first_seq + 1`; `first_time_ns` is the first record's
//! time (for lag without reading the body); `payload_bytes` the sum of the
//! records' payload lengths; `body_crc` the crc32c of the body. Reading
//! checks the header checksum, version and bounds before allocating, then
//! the body checksum. A body that fails its checksum is parsed record by
//! record: records whose header parses are kept (a bad payload is reported
//! by seq and kept unchanged, so the target's end-to-end blake3 check halts
//! exactly that seq), and seqs whose header cannot be parsed are reported as
//! lost.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use tidemark_util::bytes::{u32_at, u64_at};
use tidemark_util::crashsafe;
use tidemark_wire::record::{Record, RecordHeader, HEADER_LEN as RECORD_HEADER_LEN, MAGIC as RECORD_MAGIC};

use crate::error::{Error, ErrorKind, IoContext, Result};

/// Bytes in a batch file header.
pub const HEADER_LEN: usize = 96;
const HEADER_LEN_U32: u32 = 96;
/// Magic at the start of every batch file.
pub const MAGIC: [u8; 8] = *b"TMSPOOLB";
/// The batch file version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest body a batch file may hold (a wire frame body is at most 40 MiB).
pub const MAX_BODY: u64 = 64 << 20;
/// Most records one batch file may hold.
pub const MAX_COUNT: u32 = 1 << 20;
/// Largest seq a valid header may carry (as in the journal).
pub const MAX_SEQ: u64 = 1 << 62;
/// Suffix of a file being written.
pub const TEMP_SUFFIX: &str = ".tmp";

/// The header of a batch file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolHeader {
    pub disk_uuid: [u8; 16],
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u32,
    pub body_len: u64,
    /// `time_ns` of the first record.
    pub first_time_ns: u64,
    /// Sum of the records' payload lengths.
    pub payload_bytes: u64,
    /// crc32c of the body.
    pub body_crc: u32,
}

impl SpoolHeader {
    /// Describe `body` (records back to back, as `Record::encode` wrote
    /// them): checks each record header and that seqs are consecutive, but
    /// not payload hashes (the sender's frame decoder did that).
    pub fn for_body(disk_uuid: [u8; 16], body: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::new(ErrorKind::Corrupt, format!("spool batch: {m}"));
        if body.len() as u64 > MAX_BODY {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!(
                    "spool batch of {} bytes exceeds the {MAX_BODY}-byte maximum",
                    body.len()
                ),
            ));
        }
        let mut pos = 0usize;
        let mut first: Option<(u64, u64)> = None;
        let mut last = 0u64;
        let mut count = 0u32;
        let mut payload_bytes = 0u64;
        while pos < body.len() {
            let h = RecordHeader::decode(&body[pos..]).map_err(|e| bad(format!("record at byte {pos}: {e}")))?;
            let end = pos + RECORD_HEADER_LEN + h.payload_len as usize;
            if end > body.len() {
                return Err(bad(format!("seq {}: record runs past the end of the body", h.seq)));
            }
            match first {
                None => first = Some((h.seq, h.time_ns)),
                Some(_) if h.seq != last.wrapping_add(1) => {
                    return Err(bad(format!("seq {} follows seq {last}", h.seq)));
                }
                Some(_) => {}
            }
            last = h.seq;
            count = count
                .checked_add(1)
                .filter(|c| *c <= MAX_COUNT)
                .ok_or_else(|| bad("too many records".into()))?;
            payload_bytes += u64::from(h.payload_len);
            pos = end;
        }
        let (first_seq, first_time_ns) = first.ok_or_else(|| bad("no records".into()))?;
        if first_seq == 0 || last > MAX_SEQ {
            return Err(bad(format!("seqs {first_seq}..={last} out of range")));
        }
        Ok(Self {
            disk_uuid,
            first_seq,
            last_seq: last,
            count,
            body_len: body.len() as u64,
            first_time_ns,
            payload_bytes,
            body_crc: crc32c::crc32c(body),
        })
    }

    /// Encode into the fixed 96-byte layout.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&HEADER_LEN_U32.to_le_bytes());
        b[16..32].copy_from_slice(&self.disk_uuid);
        b[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.last_seq.to_le_bytes());
        b[48..52].copy_from_slice(&self.count.to_le_bytes());
        // 52..56 flags: 0
        b[56..64].copy_from_slice(&self.body_len.to_le_bytes());
        b[64..72].copy_from_slice(&self.first_time_ns.to_le_bytes());
        b[72..80].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b[80..84].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..88]);
        b[88..92].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate a header read from `path`.
    pub fn decode(b: &[u8], path: &Path) -> Result<Self> {
        if b.len() < HEADER_LEN {
            return Err(Error::corrupt(path, "spool file shorter than its header"));
        }
        if b[0..8] != MAGIC {
            return Err(Error::corrupt(path, "not a spool batch file (bad magic)"));
        }
        let want = u32_at(b, 88);
        let got = crc32c::crc32c(&b[0..88]);
        if want != got {
            return Err(Error::corrupt(
                path,
                format!("spool header checksum mismatch (stored {want:#010x}, computed {got:#010x})"),
            ));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "{}: spool file version {version}, this build reads {VERSION}",
                    path.display()
                ),
            ));
        }
        if u32_at(b, 12) as usize != HEADER_LEN || u32_at(b, 52) != 0 || u32_at(b, 84) != 0 || u32_at(b, 92) != 0 {
            return Err(Error::corrupt(path, "spool header has unknown fields set"));
        }
        let mut disk_uuid = [0u8; 16];
        disk_uuid.copy_from_slice(&b[16..32]);
        let h = Self {
            disk_uuid,
            first_seq: u64_at(b, 32),
            last_seq: u64_at(b, 40),
            count: u32_at(b, 48),
            body_len: u64_at(b, 56),
            first_time_ns: u64_at(b, 64),
            payload_bytes: u64_at(b, 72),
            body_crc: u32_at(b, 80),
        };
        if h.first_seq == 0
            || h.last_seq > MAX_SEQ
            || h.last_seq < h.first_seq
            || h.count == 0
            || h.count > MAX_COUNT
            || h.last_seq - h.first_seq + 1 != u64::from(h.count)
        {
            return Err(Error::corrupt(
                path,
                format!(
                    "spool header seqs {}..={} with count {} are inconsistent",
                    h.first_seq, h.last_seq, h.count
                ),
            ));
        }
        if h.body_len > MAX_BODY || h.body_len < u64::from(h.count) * RECORD_HEADER_LEN as u64 {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!(
                    "{}: spool body of {} bytes out of bounds for {} records",
                    path.display(),
                    h.body_len,
                    h.count
                ),
            ));
        }
        Ok(h)
    }

    /// Bytes of the whole file.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + self.body_len
    }
}

/// File name of the batch holding `first..=last`.
pub fn file_name(first: u64, last: u64) -> String {
    format!("b-{first:016x}-{last:016x}.tms")
}

/// Parse a batch file name into `(first, last)`.
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("b-")?.strip_suffix(".tms")?;
    let (a, b) = rest.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    let first = u64::from_str_radix(a, 16).ok()?;
    let last = u64::from_str_radix(b, 16).ok()?;
    (first >= 1 && first <= last).then_some((first, last))
}

/// Concatenate encoded records into a batch body.
pub fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut v = Vec::with_capacity(records.iter().map(|r| RECORD_HEADER_LEN + r.payload.len()).sum());
    for r in records {
        v.extend_from_slice(&r.header.encode());
        v.extend_from_slice(&r.payload);
    }
    v
}

/// A batch file written under its temporary name, not yet durable.
/// Dropping it without [`PendingBatch::publish`] leaves the temp file,
/// which the next [`scan_dir`] deletes.
#[derive(Debug)]
pub struct PendingBatch {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    header: SpoolHeader,
}

/// A published (durable) batch file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolFile {
    pub path: PathBuf,
    pub header: SpoolHeader,
}

/// Step 1 of writing a batch: write header and body to a temp file in `dir`.
pub fn create(dir: &Path, header: &SpoolHeader, body: &[u8]) -> Result<PendingBatch> {
    if body.len() as u64 != header.body_len {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!("spool body of {} bytes, header says {}", body.len(), header.body_len),
        ));
    }
    let name = file_name(header.first_seq, header.last_seq);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx("create spool temp file", &tmp)?;
    file.write_all(&header.encode()).ctx("write spool header to", &tmp)?;
    file.write_all(body).ctx("write spool body to", &tmp)?;
    Ok(PendingBatch {
        file,
        tmp,
        path,
        header: header.clone(),
    })
}

impl PendingBatch {
    /// Step 2: make the temp file's content durable.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().ctx("fsync spool temp file", &self.tmp)
    }

    /// Step 3: rename to the final name and fsync the directory. After this
    /// returns, the batch survives a crash.
    pub fn publish(self) -> Result<SpoolFile> {
        fs::rename(&self.tmp, &self.path).ctx("rename spool temp file", &self.tmp)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        crashsafe::fsync_dir(dir).ctx("fsync spool directory", dir)?;
        Ok(SpoolFile {
            path: self.path,
            header: self.header,
        })
    }

    /// The header being written.
    pub fn header(&self) -> &SpoolHeader {
        &self.header
    }
}

/// Write one batch durably (create, sync, publish).
pub fn write_batch(dir: &Path, header: &SpoolHeader, body: &[u8]) -> Result<SpoolFile> {
    let p = create(dir, header, body)?;
    p.sync()?;
    p.publish()
}

/// One batch file found by [`scan_dir`].
#[derive(Debug)]
pub struct ScannedFile {
    pub path: PathBuf,
    /// Seqs from the file name.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Size on disk.
    pub len: u64,
    /// The decoded header, or why it could not be read (the reader reports
    /// the whole range as lost).
    pub header: Result<SpoolHeader>,
}

/// What [`scan_dir`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Batch files sorted by first seq.
    pub files: Vec<ScannedFile>,
    /// Temp files of interrupted writes, now deleted.
    pub removed_temps: Vec<PathBuf>,
    /// Files that are neither batches nor temps (left alone).
    pub unknown: Vec<PathBuf>,
}

/// List a disk's spool directory: delete torn temp files (durably), read
/// every batch header. A missing directory is an empty spool.
pub fn scan_dir(dir: &Path) -> Result<Scan> {
    let mut scan = Scan::default();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(Error::io("list spool directory", dir, e)),
    };
    for e in rd {
        let e = e.ctx("list spool directory", dir)?;
        let path = e.path();
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            scan.unknown.push(path);
            continue;
        };
        if name.ends_with(TEMP_SUFFIX) && name.starts_with("b-") {
            fs::remove_file(&path).ctx("remove torn spool temp file", &path)?;
            scan.removed_temps.push(path);
            continue;
        }
        let Some((first_seq, last_seq)) = parse_file_name(&name) else {
            scan.unknown.push(path);
            continue;
        };
        let len = e.metadata().ctx("stat spool file", &path)?.len();
        let header = read_header(&path).and_then(|h| {
            if (h.first_seq, h.last_seq) != (first_seq, last_seq) {
                Err(Error::corrupt(
                    &path,
                    format!(
                        "header holds seqs {}..={}, the name says otherwise",
                        h.first_seq, h.last_seq
                    ),
                ))
            } else {
                Ok(h)
            }
        });
        scan.files.push(ScannedFile {
            path,
            first_seq,
            last_seq,
            len,
            header,
        });
    }
    if !scan.removed_temps.is_empty() {
        crashsafe::fsync_dir(dir).ctx("fsync spool directory", dir)?;
    }
    scan.files.sort_by_key(|f| f.first_seq);
    Ok(scan)
}

/// Read and check a batch file's header.
pub fn read_header(path: &Path) -> Result<SpoolHeader> {
    let mut f = File::open(path).ctx("open spool file", path)?;
    let mut b = [0u8; HEADER_LEN];
    f.read_exact(&mut b).ctx("read spool header of", path)?;
    SpoolHeader::decode(&b, path)
}

/// A batch read back from its file.
#[derive(Debug)]
pub struct SpoolBatch {
    pub header: SpoolHeader,
    /// The records that could be parsed, in seq order (there may be gaps
    /// where `lost` says).
    pub records: Vec<Record>,
    /// Whether the body checksum matched (if not, see the two lists below).
    pub body_ok: bool,
    /// Seqs whose header parsed but whose payload fails its blake3; the
    /// record is in `records`, unchanged.
    pub corrupt_payload: Vec<u64>,
    /// Seqs whose record header could not be parsed; not in `records`.
    pub lost: Vec<RangeInclusive<u64>>,
}

/// Read a batch file of `disk_uuid`. Errors only when nothing can be
/// trusted (unreadable file, bad header, another disk); a damaged body is
/// salvaged as described in [`SpoolBatch`].
pub fn read_batch(path: &Path, disk_uuid: &[u8; 16]) -> Result<SpoolBatch> {
    let mut f = File::open(path).ctx("open spool file", path)?;
    let mut hb = [0u8; HEADER_LEN];
    f.read_exact(&mut hb).ctx("read spool header of", path)?;
    let header = SpoolHeader::decode(&hb, path)?;
    if &header.disk_uuid != disk_uuid {
        return Err(Error::new(
            ErrorKind::Mismatch,
            format!("{}: spool file belongs to another disk uuid", path.display()),
        ));
    }
    // Bounded by MAX_BODY in decode.
    let body_len = usize::try_from(header.body_len).map_err(|_| Error::corrupt(path, "body too large"))?;
    let mut body = Vec::new();
    (&mut f)
        .take(header.body_len)
        .read_to_end(&mut body)
        .ctx("read spool body of", path)?;
    let complete = body.len() == body_len;
    if complete && crc32c::crc32c(&body) == header.body_crc {
        if let Some(records) = parse_clean(&body, &header) {
            return Ok(SpoolBatch {
                header,
                records,
                body_ok: true,
                corrupt_payload: Vec::new(),
                lost: Vec::new(),
            });
        }
    }
    Ok(salvage(&body, header))
}

/// Parse a body whose checksum matched; `None` if it still does not hold
/// exactly the records the header names.
fn parse_clean(body: &[u8], h: &SpoolHeader) -> Option<Vec<Record>> {
    let mut records = Vec::with_capacity(h.count as usize);
    let mut pos = 0;
    for seq in h.first_seq..=h.last_seq {
        let rh = RecordHeader::decode(body.get(pos..)?).ok()?;
        let end = pos.checked_add(RECORD_HEADER_LEN + rh.payload_len as usize)?;
        if rh.seq != seq || end > body.len() {
            return None;
        }
        records.push(Record {
            payload: body[pos + RECORD_HEADER_LEN..end].to_vec(),
            header: rh,
        });
        pos = end;
    }
    (pos == body.len()).then_some(records)
}

/// The record header at `pos` if it parses, carries a seq in `range` and
/// its payload fits in `body`.
fn header_at(body: &[u8], pos: usize, range: &RangeInclusive<u64>) -> Option<RecordHeader> {
    let rh = RecordHeader::decode(body.get(pos..)?).ok()?;
    let fits = pos + RECORD_HEADER_LEN + rh.payload_len as usize <= body.len();
    (range.contains(&rh.seq) && fits).then_some(rh)
}

fn salvage(body: &[u8], header: SpoolHeader) -> SpoolBatch {
    let mut records = Vec::new();
    let mut corrupt_payload = Vec::new();
    let mut lost = Vec::new();
    let mut pos = 0usize;
    let mut expect = header.first_seq;
    while expect <= header.last_seq {
        if let Some(rh) = header_at(body, pos, &(expect..=expect)) {
            let start = pos + RECORD_HEADER_LEN;
            let end = start + rh.payload_len as usize;
            let payload = body[start..end].to_vec();
            if rh.verify_payload(&payload).is_err() {
                corrupt_payload.push(rh.seq);
            }
            records.push(Record { header: rh, payload });
            pos = end;
            expect += 1;
            continue;
        }
        // The header at `pos` is damaged: its length is unknown, so look for
        // the next intact header of a later seq of this batch.
        let later = expect + 1..=header.last_seq;
        let next = (pos + 1..body.len())
            .filter(|&p| body[p..].starts_with(&RECORD_MAGIC))
            .find_map(|p| header_at(body, p, &later).map(|rh| (p, rh.seq)));
        match next {
            Some((p, seq)) => {
                lost.push(expect..=seq - 1);
                pos = p;
                expect = seq;
            }
            None => {
                lost.push(expect..=header.last_seq);
                break;
            }
        }
    }
    SpoolBatch {
        header,
        records,
        body_ok: false,
        corrupt_payload,
        lost,
    }
}

#[cfg(test)]
mod tests;
