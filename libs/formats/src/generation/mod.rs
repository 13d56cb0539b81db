//! Generation histories: which data generation a side of a disk holds and
//! where it came from, so that two sides can decide from these alone who is
//! ahead, from which common point, and whether both wrote since
//! (`docs/failback.md`, section 1). A failover ends the current generation
//! at the point's seq and starts a new one forked from it there.
//!
//! The file (`generations`, written whole and crash-safe by the caller
//! with `tidemark_util::crashsafe::write_atomic`):
//!
//! ```text
//!  0        8         10      12        16
//!  +--------+---------+-------+---------+
//!  | magic  | version | count | zero    |   header, 16 bytes
//!  +--------+---------+-------+---------+
//!  | entry 0 (the current generation)   |   count × 48 bytes, newest first
//!  | entry 1 (its parent) …             |
//!  +------------------------------------+
//!  | crc32c of everything before (u32)  |
//!  +------------------------------------+
//!
//!  entry: id [16] | parent [16] (all zero: a root) | fork_seq u64 | started_ns u64
//! ```
//!
//! All integers little-endian. `magic` = `TMGENS\0\0`, `version` = 1,
//! 1 ≤ `count` ≤ [`MAX_ENTRIES`]. Each entry's parent is the next entry's
//! id (the history is one chain, cut at the oldest entry kept); `fork_seq`
//! is the parent's seq at which this generation began (0 for a root).
//! A generation id is never all zero.

use std::fmt;
use std::path::Path;

use tidemark_util::bytes::{u32_at, u64_at};
use tidemark_util::crashsafe;
use tidemark_wire::frame::Lineage;

use crate::error::{Error, ErrorKind, Located, Result};

/// The file's magic.
pub const MAGIC: [u8; 8] = *b"TMGENS\0\0";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Entries kept: older ones are cut (a history that short still names a
/// common generation for any failover cycle an operator runs).
pub const MAX_ENTRIES: usize = 32;
const HEADER: usize = 16;
const ENTRY: usize = 48;

/// A data generation's id: 128 random bits, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId(pub [u8; 16]);

impl fmt::Display for GenerationId {
    /// The first 8 bytes in hex: enough to tell generations apart in a message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl GenerationId {
    /// All 32 hex digits (for catalogs and JSON; `Display` shows 16).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse [`GenerationId::hex`]'s form; None for anything else or an
    /// all-zero id.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut v = [0u8; 16];
        for (i, b) in v.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        (v != [0; 16]).then_some(Self(v))
    }
}

impl fmt::Debug for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GenerationId({self})")
    }
}

/// One generation of the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: GenerationId,
    /// The generation it forked from (None: a root, a disk's first).
    pub parent: Option<GenerationId>,
    /// The parent's seq at which this generation began (0 for a root).
    pub fork_seq: u64,
    /// When it began, ns since the Unix epoch.
    pub started_ns: u64,
}

/// A side's generations, newest (the current one) first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    entries: Vec<Entry>,
}

/// Where a side stands: its history and the highest seq it holds in its
/// current generation (written, for a source; applied, for a replica).
#[derive(Clone, Copy, Debug)]
pub struct Position<'a> {
    pub history: &'a History,
    pub seq: u64,
}

/// How our position relates to theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// Same generation, same seq: nothing to do.
    Equal,
    /// They hold everything we hold and more: we take what they wrote
    /// after `from` (a seq in *their* current generation's line), and
    /// nothing of ours is lost.
    Behind { from: u64 },
    /// We hold everything they hold and more (the mirror of `Behind`).
    Ahead { from: u64 },
    /// Both wrote after the last point they share: `common` generation, up
    /// to seq `at`; our writes after that point would be lost by taking
    /// theirs.
    Diverged { common: GenerationId, at: u64 },
    /// No generation in common (different disks, or histories cut too
    /// short): only a hash compare can tell what differs.
    Unrelated,
}

impl History {
    /// A disk's first generation.
    pub fn root(id: GenerationId, now_ns: u64) -> Result<Self> {
        check_id(id)?;
        Ok(Self {
            entries: vec![Entry {
                id,
                parent: None,
                fork_seq: 0,
                started_ns: now_ns,
            }],
        })
    }

    /// This history with a new generation `id` forked from the current one
    /// at seq `at` (a failover's point); the oldest entries beyond
    /// [`MAX_ENTRIES`] are cut.
    pub fn fork(&self, id: GenerationId, at: u64, now_ns: u64) -> Result<Self> {
        check_id(id)?;
        if self.entries.iter().any(|e| e.id == id) {
            return Err(Error::new(
                ErrorKind::Mismatch,
                format!("generation {id} is already in this history"),
            ));
        }
        let mut entries = Vec::with_capacity(MAX_ENTRIES);
        entries.push(Entry {
            id,
            parent: Some(self.current().id),
            fork_seq: at,
            started_ns: now_ns,
        });
        entries.extend(self.entries.iter().copied().take(MAX_ENTRIES - 1));
        Ok(Self { entries })
    }

    /// The current generation.
    pub fn current(&self) -> &Entry {
        // A History is never empty (root, fork and decode ensure it).
        &self.entries[0]
    }

    /// Every generation kept, newest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The current generation as a Hello carries it.
    pub fn lineage(&self) -> Lineage {
        let e = self.current();
        Lineage {
            generation: e.id.0,
            parent: e.parent.map_or([0; 16], |p| p.0),
            fork_seq: e.fork_seq,
        }
    }

    /// What a peer's Hello tells of its history: its current generation
    /// (and the one it forked from), a history cut after one entry. None
    /// when the peer did not say (`Lineage::is_known`).
    pub fn from_lineage(l: &Lineage, now_ns: u64) -> Option<Self> {
        l.is_known().then(|| Self {
            entries: vec![Entry {
                id: GenerationId(l.generation),
                parent: (l.parent != [0; 16]).then_some(GenerationId(l.parent)),
                fork_seq: l.fork_seq,
                started_ns: now_ns,
            }],
        })
    }

    /// Read the file at `path`; None when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(b) => Self::decode(&b, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// Write the file at `path`, whole and crash-safe.
    pub fn store(&self, path: &Path) -> Result<()> {
        crashsafe::write_atomic(path, &self.encode()).map_err(|e| Error::io("write", path, e))
    }

    /// The seq at which this line left generation `g`: the fork seq of the
    /// entry whose parent is `g` (None: `g` is current, or not here).
    fn left_at(&self, g: GenerationId) -> Option<u64> {
        self.entries.iter().find(|e| e.parent == Some(g)).map(|e| e.fork_seq)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + ENTRY * self.entries.len() + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&u16::try_from(self.entries.len()).unwrap_or(u16::MAX).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        for e in &self.entries {
            b.extend_from_slice(&e.id.0);
            b.extend_from_slice(&e.parent.map_or([0; 16], |p| p.0));
            b.extend_from_slice(&e.fork_seq.to_le_bytes());
            b.extend_from_slice(&e.started_ns.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Read a file's bytes; `path` names it in errors.
    pub fn decode(b: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |msg: String| Error::corrupt(path, msg);
        if b.len() < HEADER + 4 {
            return Err(corrupt(format!("{} bytes: too short for a generations file", b.len())));
        }
        if b[..8] != MAGIC {
            return Err(corrupt("not a generations file (bad magic)".into()));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!("generations file version {version} (this build reads {VERSION})"),
            )
            .path(path));
        }
        let count = usize::from(u16::from_le_bytes([b[10], b[11]]));
        if count == 0 || count > MAX_ENTRIES {
            return Err(corrupt(format!("{count} entries (1 to {MAX_ENTRIES} allowed)")));
        }
        if u32_at(b, 12) != 0 {
            return Err(corrupt("reserved header bytes are not zero".into()));
        }
        let body = HEADER + count * ENTRY;
        if b.len() != body + 4 {
            return Err(corrupt(format!("{} bytes; {count} entries make {}", b.len(), body + 4)));
        }
        if u32_at(b, body) != crc32c::crc32c(&b[..body]) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let id = |at: usize| {
            let mut v = [0u8; 16];
            v.copy_from_slice(&b[at..at + 16]);
            v
        };
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = HEADER + i * ENTRY;
            let gid = GenerationId(id(at));
            let parent = id(at + 16);
            let e = Entry {
                id: gid,
                parent: (parent != [0; 16]).then_some(GenerationId(parent)),
                fork_seq: u64_at(b, at + 32),
                started_ns: u64_at(b, at + 40),
            };
            if gid.0 == [0; 16] {
                return Err(corrupt(format!("entry {i} has an all-zero generation id")));
            }
            if e.parent.is_none() && e.fork_seq != 0 {
                return Err(corrupt(format!("entry {i} is a root with fork seq {}", e.fork_seq)));
            }
            if let Some(prev) = entries.last().map(|p: &Entry| p.parent) {
                if prev != Some(gid) {
                    return Err(corrupt(format!("entry {i} is not the parent of entry {}", i - 1)));
                }
            }
            if entries.iter().any(|p: &Entry| p.id == gid) {
                return Err(corrupt(format!("entry {i} repeats generation {gid}")));
            }
            entries.push(e);
        }
        Ok(Self { entries })
    }
}

fn check_id(id: GenerationId) -> Result<()> {
    if id.0 == [0; 16] {
        return Err(Error::new(ErrorKind::Mismatch, "a generation id cannot be all zero"));
    }
    Ok(())
}

/// How `ours` relates to `theirs` (see [`Relation`]).
pub fn relate(ours: Position<'_>, theirs: Position<'_>) -> Relation {
    let (o, t) = (ours.history.current().id, theirs.history.current().id);
    if o == t {
        return match ours.seq.cmp(&theirs.seq) {
            std::cmp::Ordering::Equal => Relation::Equal,
            std::cmp::Ordering::Less => Relation::Behind { from: ours.seq },
            std::cmp::Ordering::Greater => Relation::Ahead { from: theirs.seq },
        };
    }
    // Their line left our current generation at `f`: we are behind if we
    // wrote nothing after it.
    if let Some(f) = theirs.history.left_at(o) {
        return if ours.seq <= f {
            Relation::Behind { from: ours.seq }
        } else {
            Relation::Diverged { common: o, at: f }
        };
    }
    if let Some(f) = ours.history.left_at(t) {
        return if theirs.seq <= f {
            Relation::Ahead { from: theirs.seq }
        } else {
            Relation::Diverged { common: t, at: f }
        };
    }
    // Both left a common ancestor: the newest generation in both lines.
    for e in ours.history.entries() {
        if let (Some(a), Some(b)) = (ours.history.left_at(e.id), theirs.history.left_at(e.id)) {
            return Relation::Diverged {
                common: e.id,
                at: a.min(b),
            };
        }
    }
    Relation::Unrelated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u8) -> GenerationId {
        GenerationId([n; 16])
    }

    #[test]
    fn golden_bytes() {
        let h = History::root(g(1), 5).unwrap().fork(g(2), 100, 7).unwrap();
        let b = h.encode();
        let mut want = Vec::new();
        want.extend_from_slice(b"TMGENS\0\0");
        want.extend_from_slice(&[1, 0, 2, 0, 0, 0, 0, 0]); // version 1, 2 entries, zero
        want.extend_from_slice(&[2; 16]); // current
        want.extend_from_slice(&[1; 16]); // its parent
        want.extend_from_slice(&100u64.to_le_bytes()); // forked at seq 100
        want.extend_from_slice(&7u64.to_le_bytes());
        want.extend_from_slice(&[1; 16]); // the root
        want.extend_from_slice(&[0; 16]); // no parent
        want.extend_from_slice(&0u64.to_le_bytes());
        want.extend_from_slice(&5u64.to_le_bytes());
        assert_eq!(b[..b.len() - 4], want[..]);
        assert_eq!(
            u32_at(&b, want.len()),
            crc32c::crc32c(&want),
            "the checksum covers all before it"
        );
        assert_eq!(History::decode(&b, Path::new("g")).unwrap(), h);
    }

    #[test]
    fn bad_files_are_refused_naming_why() {
        let p = Path::new("/s/generations");
        let good = History::root(g(1), 0).unwrap().fork(g(2), 9, 0).unwrap().encode();
        let err = |b: &[u8]| History::decode(b, p).unwrap_err().to_string();
        assert!(err(&good[..10]).contains("too short"));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(err(&b).contains("bad magic"));
        let mut b = good.clone();
        b[8] = 2;
        assert!(err(&b).contains("version 2"));
        let mut b = good.clone();
        b[20] ^= 1;
        assert!(err(&b).contains("checksum"));
        let mut b = good.clone();
        b.push(0);
        assert!(err(&b).contains("entries make"));
        assert!(err(&b).contains("/s/generations"), "{}", err(&b));
        assert!(History::root(GenerationId([0; 16]), 0).is_err());
    }

    #[test]
    fn histories_are_cut_at_max_entries() {
        let mut h = History::root(g(1), 0).unwrap();
        for i in 2..=40u8 {
            h = h.fork(g(i), u64::from(i) * 10, 0).unwrap();
        }
        assert_eq!(h.entries().len(), MAX_ENTRIES);
        assert_eq!(h.current().id, g(40));
        let back = History::decode(&h.encode(), Path::new("g")).unwrap();
        assert_eq!(back, h);
        assert!(h.fork(g(40), 1, 0).is_err(), "an id already in the history");
    }

    #[test]
    fn lineage_files_and_hex() {
        let h = History::root(g(1), 0).unwrap().fork(g(2), 9, 0).unwrap();
        let l = h.lineage();
        assert_eq!((l.generation, l.parent, l.fork_seq), ([2; 16], [1; 16], 9));
        let one = History::from_lineage(&l, 3).unwrap();
        assert_eq!(
            (one.current().id, one.current().parent, one.entries().len()),
            (g(2), Some(g(1)), 1)
        );
        assert!(History::from_lineage(&Lineage::default(), 0).is_none());
        let id = GenerationId([0xa5; 16]);
        assert_eq!(GenerationId::from_hex(&id.hex()), Some(id));
        assert_eq!(GenerationId::from_hex(&"0".repeat(32)), None);
        assert_eq!(GenerationId::from_hex("zz"), None);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("generations");
        assert_eq!(History::load(&p).unwrap(), None);
        h.store(&p).unwrap();
        assert_eq!(History::load(&p).unwrap(), Some(h));
    }

    #[test]
    fn relations() {
        let a = History::root(g(1), 0).unwrap();
        // B failed over from A's generation at seq 100.
        let b = a.fork(g(2), 100, 0).unwrap();
        let pos = |history, seq| Position { history, seq };
        assert_eq!(relate(pos(&a, 50), pos(&a, 50)), Relation::Equal);
        assert_eq!(relate(pos(&a, 40), pos(&a, 50)), Relation::Behind { from: 40 });
        assert_eq!(relate(pos(&a, 60), pos(&a, 50)), Relation::Ahead { from: 50 });
        // A stopped at or before the point: behind, nothing of A lost.
        assert_eq!(relate(pos(&a, 100), pos(&b, 5)), Relation::Behind { from: 100 });
        assert_eq!(relate(pos(&b, 5), pos(&a, 90)), Relation::Ahead { from: 90 });
        // A wrote past the point (its last writes never left the site).
        assert_eq!(
            relate(pos(&a, 103), pos(&b, 5)),
            Relation::Diverged { common: g(1), at: 100 }
        );
        // Failback: A's new generation forked from B's at 7; B behind.
        let a2 = b.fork(g(3), 7, 0).unwrap();
        assert_eq!(relate(pos(&b, 7), pos(&a2, 0)), Relation::Behind { from: 7 });
        // Two sides that both forked from the root: diverged at the earlier fork.
        let c = a.fork(g(4), 80, 0).unwrap();
        assert_eq!(
            relate(pos(&b, 1), pos(&c, 1)),
            Relation::Diverged { common: g(1), at: 80 }
        );
        let other = History::root(g(9), 0).unwrap();
        assert_eq!(relate(pos(&a, 1), pos(&other, 1)), Relation::Unrelated);
    }
}
