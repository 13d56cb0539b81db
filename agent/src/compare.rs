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

use tidemark_wire::chunk::{chunks, HASH_CHUNK, MAX_HASH_SPAN};

/// The span one query asks about.
pub const WINDOW: u64 = MAX_HASH_SPAN;
/// Windows asked for ahead of the one being synced.
pub const AHEAD: u64 = 3;
/// Named ranges kept apart before they are merged.
const MAX_FORCED: usize = 4096;
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
    /// those unanswered for `RESEND`.
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
    /// data whatever the hashes say, until a sync sends it ([`Self::synced`]).
    /// Past `MAX_FORCED` ranges they are merged into their bounds (more
    /// is sent, never less).
    pub fn force(&self, offset: u64, length: u64) {
        let mut b = self.lock();
        b.forced.push((offset, offset.saturating_add(length)));
        if b.forced.len() > MAX_FORCED {
            let lo = b.forced.iter().map(|r| r.0).min().unwrap_or(0);
            let hi = b.forced.iter().map(|r| r.1).max().unwrap_or(0);
            b.forced = vec![(lo, hi)];
        }
    }

    /// A sync journaled `offset..offset+length` as data (or as equal to
    /// the replica's where it compared): named ranges inside it are done.
    pub fn synced(&self, offset: u64, length: u64) {
        let end = offset.saturating_add(length);
        self.lock().forced.retain(|&(s, e)| !(offset <= s && e <= end));
    }

    /// Whether `offset..offset+length` overlaps a range asked for by name.
    fn is_forced(b: &Book, offset: u64, length: u64) -> bool {
        let end = offset + length;
        b.forced.iter().any(|&(s, e)| s < end && offset < e)
    }

    /// The expected hash of each chunk of `offset..offset+length` (a disk
    /// of `size` bytes) from the window answer `hashes` that starts at
    /// `window`: `None` where the chunk must be sent (no hash, or named by
    /// the target).
    pub fn expect(
        &self,
        window: u64,
        hashes: &[[u8; 32]],
        offset: u64,
        length: u64,
        size: u64,
    ) -> Vec<Option<[u8; 32]>> {
        let b = self.lock();
        let out = chunks(offset, length, size)
            .map(|(o, l)| {
                if Self::is_forced(&b, o, l) {
                    return None;
                }
                let i = usize::try_from((o - window) / HASH_CHUNK).ok()?;
                hashes.get(i).copied()
            })
            .collect();
        drop(b);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_ranges_are_sent_and_then_dropped() {
        let b = HashBook::default();
        b.force(HASH_CHUNK + 1, 10);
        let hashes = vec![[1; 32], [2; 32], [3; 32]];
        let e = b.expect(0, &hashes, 0, 3 * HASH_CHUNK, 3 * HASH_CHUNK);
        assert_eq!(e, vec![Some([1; 32]), None, Some([3; 32])]);
        b.synced(0, 3 * HASH_CHUNK);
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
