//! The agent's half of a hash-compare resync (`docs/failback.md`, section
//! 4). A whole-disk sync (initial or full) does not send every chunk: the
//! sync driver asks the target, window by window, for the blake3 of each
//! [`HASH_CHUNK`] chunk of its replica (`Frame::HashQuery`, through the
//! collector), reads its own chunk under the usual fence, and journals
//! `Sync` records only for the chunks whose hash differs. Both disks are
//! read once; only the difference crosses the wire.
//!
//! [`HashBook`] is the meeting point of the sync driver (which asks and
//! waits, on its own thread) and the shipper (which sends the queries on
//! each connection and files the answers). Answers live in memory only: a
//! restart asks again, and the dirty bitmap says what is left.
//!
//! Ranges the target asked for by name (`Request::Resync`: a halt, a
//! reprotect's owed regions) are always sent as data: the target waits for
//! their records, equal or not.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tidemark_wire::chunk::{chunks, zero_hash, HASH_CHUNK, MAX_HASH_SPAN};

/// The span one query asks about.
pub const WINDOW: u64 = MAX_HASH_SPAN;
/// Windows asked for ahead of the one being synced.
pub const AHEAD: u64 = 3;
/// A query unanswered this long on a live connection is sent again (the
/// collector keeps queries while its target is away, so this is for
/// answers lost with a target connection).
const RESEND: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Want {
    length: u64,
    /// The connection it was last sent on, and when.
    sent: Option<(u64, Instant)>,
    /// When the driver first asked.
    since: Instant,
}

#[derive(Debug, Default)]
struct Book {
    wanted: BTreeMap<u64, Want>,
    answers: BTreeMap<u64, Vec<[u8; 32]>>,
    /// Ranges the target asked for by name: sent as data.
    forced: Vec<(u64, u64)>,
    /// The shipper's current connection (0: none).
    connection: u64,
    connections: u64,
    /// A shipper runs (a collector is configured).
    shipping: bool,
    /// Since when there is no connection (None: never noted).
    down_since: Option<Instant>,
}

/// Whether the link can answer queries, for the driver's patience.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// No collector configured: nothing will answer.
    None,
    Up,
    /// Configured, not connected, for this long.
    Down(Duration),
}

/// Queries and answers of the hash-compare resync.
#[derive(Debug, Default)]
pub struct HashBook {
    book: Mutex<Book>,
}

/// A range to sync now, as a hash-compare sync picks it: its offset and
/// length (whole chunks), the window it lies in, and the replica's hash of
/// each of its chunks (`None`: send it).
pub type Compared = (u64, u64, u64, Vec<Option<[u8; 32]>>);

/// What the driver learns about a window.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The replica's hashes of the window's chunks, in order (possibly
    /// fewer than asked: the rest differ; none: send everything).
    Hashes(Vec<[u8; 32]>),
    /// Asked; no answer yet, for this long.
    Waiting(Duration),
}

impl HashBook {
    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for the window at `window` (asking for it if nobody has).
    pub fn get(&self, window: u64, length: u64) -> Answer {
        let mut b = self.lock();
        // Only the windows around the driver's are kept (bounded memory;
        // a window it comes back to is asked again).
        let keep = window..=window.saturating_add((AHEAD + 1) * WINDOW);
        b.answers.retain(|k, _| keep.contains(k));
        b.wanted.retain(|k, _| keep.contains(k));
        if let Some(h) = b.answers.get(&window) {
            return Answer::Hashes(h.clone());
        }
        let w = b.wanted.entry(window).or_insert_with(|| Want {
            length,
            sent: None,
            since: Instant::now(),
        });
        Answer::Waiting(w.since.elapsed())
    }

    /// Ask for a window ahead (no-op if asked or answered).
    pub fn prefetch(&self, window: u64, length: u64) {
        let mut b = self.lock();
        if !b.answers.contains_key(&window) {
            b.wanted.entry(window).or_insert_with(|| Want {
                length,
                sent: None,
                since: Instant::now(),
            });
        }
    }

    /// Give up on the window: its chunks are sent as data.
    pub fn give_up(&self, window: u64) {
        let mut b = self.lock();
        b.wanted.remove(&window);
        b.answers.insert(window, Vec::new());
    }

    /// The window has been synced: forget it.
    pub fn forget(&self, window: u64) {
        let mut b = self.lock();
        b.wanted.remove(&window);
        b.answers.remove(&window);
    }

    /// A sync ended or began: nothing asked, nothing kept (the named
    /// ranges stay until sent).
    pub fn reset(&self) {
        let mut b = self.lock();
        b.wanted.clear();
        b.answers.clear();
    }

    /// A new connection to the collector: every open query goes out on it.
    /// Returns its number.
    pub fn connected(&self) -> u64 {
        let mut b = self.lock();
        b.connections += 1;
        b.connection = b.connections;
        b.connection
    }

    /// The connection ended.
    pub fn disconnected(&self, connection: u64) {
        let mut b = self.lock();
        if b.connection == connection {
            b.connection = 0;
            b.down_since = Some(Instant::now());
        }
    }

    /// A shipper runs for this disk (called once when it starts).
    pub fn shipping(&self) {
        let mut b = self.lock();
        b.shipping = true;
        b.down_since.get_or_insert_with(Instant::now);
    }

    /// The link as the driver sees it.
    pub fn link(&self) -> Link {
        let b = self.lock();
        if !b.shipping {
            Link::None
        } else if b.connection != 0 {
            Link::Up
        } else {
            Link::Down(b.down_since.map_or(Duration::ZERO, |t| t.elapsed()))
        }
    }

    /// Queries to send on `connection` now: those never sent on it, and
    /// those unanswered for [`RESEND`].
    pub fn to_send(&self, connection: u64) -> Vec<(u64, u64)> {
        let mut b = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        for (o, w) in b.wanted.iter_mut() {
            let due = match w.sent {
                Some((c, at)) => c != connection || now.duration_since(at) >= RESEND,
                None => true,
            };
            if due {
                w.sent = Some((connection, now));
                out.push((*o, w.length));
            }
        }
        out
    }

    /// File the target's answer for the window at `offset`.
    pub fn answer(&self, offset: u64, hashes: Vec<[u8; 32]>) {
        let mut b = self.lock();
        if b.wanted.remove(&offset).is_some() {
            b.answers.insert(offset, hashes);
        }
    }

    /// The target asked for `offset..offset+length` by name: send it as
    /// data whatever the hashes say.
    pub fn force(&self, offset: u64, length: u64) {
        self.lock().forced.push((offset, offset.saturating_add(length)));
    }

    /// Whether `offset..offset+length` overlaps a range asked for by name.
    fn is_forced(b: &Book, offset: u64, length: u64) -> bool {
        let end = offset + length;
        b.forced.iter().any(|&(s, e)| s < end && offset < e)
    }

    /// The expected hash of each chunk of `offset..offset+length` (a disk
    /// of `size` bytes) from the window answer `hashes` that starts at
    /// `window`: `None` where the chunk must be sent (no hash, or named by
    /// the target). Takes the named ranges inside it off the list.
    pub fn expect(
        &self,
        window: u64,
        hashes: &[[u8; 32]],
        offset: u64,
        length: u64,
        size: u64,
    ) -> Vec<Option<[u8; 32]>> {
        let mut b = self.lock();
        let out = chunks(offset, length, size)
            .map(|(o, l)| {
                if Self::is_forced(&b, o, l) {
                    return None;
                }
                let i = usize::try_from((o - window) / HASH_CHUNK).ok()?;
                hashes.get(i).copied()
            })
            .collect();
        let end = offset + length;
        b.forced.retain(|&(s, e)| !(offset <= s && e <= end));
        out
    }
}

/// A piece of a chunk read for a sync: data, or a run of zeros.
pub trait PieceView {
    fn span(&self) -> (u64, u64);
    fn bytes(&self) -> Option<&[u8]>;
}

/// Which of the chunks of `offset..offset+length` differ from `expect`
/// (one entry per chunk, as [`HashBook::expect`] gives them), hashing the
/// pieces the chunk was read as. Returns one flag per chunk.
pub fn differing<P: PieceView>(
    pieces: &[P],
    offset: u64,
    length: u64,
    size: u64,
    expect: &[Option<[u8; 32]>],
) -> Vec<bool> {
    static ZEROS: [u8; 4096] = [0; 4096];
    chunks(offset, length, size)
        .zip(expect.iter().chain(std::iter::repeat(&None)))
        .map(|((o, l), want)| {
            let Some(want) = want else {
                return true;
            };
            let end = o + l;
            let inside: Vec<&P> = pieces
                .iter()
                .filter(|p| {
                    let (s, n) = p.span();
                    s < end && o < s + n
                })
                .collect();
            let got = if inside.iter().all(|p| p.bytes().is_none()) {
                zero_hash(l)
            } else {
                let mut h = blake3::Hasher::new();
                let mut pos = o;
                for p in inside {
                    let (s, n) = p.span();
                    let (from, to) = (s.max(o), (s + n).min(end));
                    debug_assert_eq!(from, pos, "pieces cover the chunk without gaps");
                    match p.bytes() {
                        Some(d) => {
                            let a = usize::try_from(from - s).unwrap_or(0);
                            let z = usize::try_from(to - s).unwrap_or(0);
                            h.update(&d[a..z]);
                        }
                        None => {
                            let mut left = usize::try_from(to - from).unwrap_or(0);
                            while left > 0 {
                                let n = left.min(ZEROS.len());
                                h.update(&ZEROS[..n]);
                                left -= n;
                            }
                        }
                    }
                    pos = to;
                }
                if pos != end {
                    return true;
                }
                *h.finalize().as_bytes()
            };
            got != *want
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_wire::chunk::chunk_hash as hash_of;

    struct P(u64, u64, Option<Vec<u8>>);
    impl PieceView for P {
        fn span(&self) -> (u64, u64) {
            (self.0, self.1)
        }
        fn bytes(&self) -> Option<&[u8]> {
            self.2.as_deref()
        }
    }

    #[test]
    fn equal_chunks_are_found_across_pieces() {
        let c = HASH_CHUNK;
        let cu = 64 << 10;
        let mut data = vec![0u8; 2 * cu];
        data[10] = 1;
        data[cu + 5] = 2;
        // Chunk 0 as a zero run then data; chunk 1 as one data piece.
        let pieces = vec![
            P(0, 8, None),
            P(8, c - 8, Some(data[8..cu].to_vec())),
            P(c, c, Some(data[cu..].to_vec())),
        ];
        let h0 = hash_of(&data[..cu]);
        let h1 = hash_of(&data[cu..]);
        assert_eq!(
            differing(&pieces, 0, 2 * c, 2 * c, &[Some(h0), Some(h1)]),
            vec![false, false]
        );
        assert_eq!(
            differing(&pieces, 0, 2 * c, 2 * c, &[Some(h0), Some([0; 32])]),
            vec![false, true]
        );
        assert_eq!(differing(&pieces, 0, 2 * c, 2 * c, &[None]), vec![true, true]);
        let zeros = vec![P(0, c, None)];
        assert_eq!(differing(&zeros, 0, c, c, &[Some(zero_hash(c))]), vec![false]);
    }

    #[test]
    fn named_ranges_are_sent_and_then_dropped() {
        let b = HashBook::default();
        b.force(HASH_CHUNK + 1, 10);
        let hashes = vec![[1; 32], [2; 32], [3; 32]];
        let e = b.expect(0, &hashes, 0, 3 * HASH_CHUNK, 3 * HASH_CHUNK);
        assert_eq!(e, vec![Some([1; 32]), None, Some([3; 32])]);
        let e = b.expect(0, &hashes, 0, 3 * HASH_CHUNK, 3 * HASH_CHUNK);
        assert_eq!(e, vec![Some([1; 32]), Some([2; 32]), Some([3; 32])]);
    }

    #[test]
    fn queries_go_out_once_per_connection() {
        let b = HashBook::default();
        assert!(matches!(b.get(0, WINDOW), Answer::Waiting(_)));
        b.prefetch(WINDOW, WINDOW);
        let c1 = b.connected();
        assert_eq!(b.to_send(c1), vec![(0, WINDOW), (WINDOW, WINDOW)]);
        assert!(b.to_send(c1).is_empty());
        let c2 = b.connected();
        assert_eq!(b.to_send(c2).len(), 2);
        b.answer(0, vec![[7; 32]]);
        assert_eq!(b.get(0, WINDOW), Answer::Hashes(vec![[7; 32]]));
        b.forget(0);
        assert!(matches!(b.get(0, WINDOW), Answer::Waiting(_)));
    }
}
