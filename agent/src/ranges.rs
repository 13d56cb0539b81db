//! Range locks: overlapping in-flight writes reach the backing disk in
//! journal order; writes that do not overlap run in parallel.
//!
//! A ticket is taken while the journal lock is held, so ticket order is seq
//! order. A write may touch the disk once no older ticket overlaps it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    seq: Option<u64>,
    done: bool,
}

/// Tickets in id order. Released tickets are marked done and popped once
/// they reach the front, so the queue never reallocates in steady state.
#[derive(Debug, Default)]
struct Inner {
    next: u64,
    active: VecDeque<Entry>,
    live: usize,
}

/// The table of in-flight ranges.
#[derive(Debug, Default)]
pub struct RangeLocks {
    inner: Mutex<Inner>,
    notify: Notify,
}

/// A held ticket; dropping it releases the range and wakes waiters.
#[derive(Debug)]
pub struct Ticket {
    locks: Arc<RangeLocks>,
    id: u64,
    start: u64,
    end: u64,
}

impl RangeLocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a ticket for `[start, start+len)`. Call under the journal lock.
    pub fn register(self: &Arc<Self>, start: u64, len: u64, seq: Option<u64>) -> Ticket {
        let end = start.saturating_add(len);
        let mut g = self.lock();
        let id = g.next;
        g.next += 1;
        g.active.push_back(Entry {
            id,
            start,
            end,
            seq,
            done: false,
        });
        g.live += 1;
        Ticket {
            locks: self.clone(),
            id,
            start,
            end,
        }
    }

    /// Lowest journaled seq still in flight.
    pub fn oldest_inflight_seq(&self) -> Option<u64> {
        self.lock().active.iter().filter(|e| !e.done).find_map(|e| e.seq)
    }

    fn conflicts(&self, t: &Ticket) -> bool {
        let g = self.lock();
        g.active
            .iter()
            .take_while(|e| e.id < t.id)
            .any(|e| !e.done && e.start < t.end && t.start < e.end)
    }
}

impl Ticket {
    /// Whether an older overlapping write is still in flight.
    pub fn must_wait(&self) -> bool {
        self.locks.conflicts(self)
    }

    /// Wait until no older overlapping write is in flight.
    pub async fn wait(&self) {
        loop {
            let notified = self.locks.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.locks.conflicts(self) {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let waiters = {
            let mut g = self.locks.lock();
            let front = g.active.front().map_or(self.id, |e| e.id);
            if let Some(e) = usize::try_from(self.id - front).ok().and_then(|i| g.active.get_mut(i)) {
                e.done = true;
            }
            while g.active.front().is_some_and(|e| e.done) {
                g.active.pop_front();
            }
            g.live -= 1;
            g.live > 0
        };
        if waiters {
            self.locks.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let l = Arc::new(RangeLocks::default());
        let a = l.register(0, 100, Some(1));
        let b = l.register(50, 100, Some(2));
        let c = l.register(200, 10, None);
        assert!(!a.must_wait());
        assert!(b.must_wait());
        assert!(!c.must_wait());
        assert_eq!(l.oldest_inflight_seq(), Some(1));
        let waiter = tokio::spawn(async move {
            b.wait().await;
            drop(b);
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.oldest_inflight_seq(), None);
        drop(c);
    }

    #[test]
    fn release_out_of_order_and_oldest_seq() {
        let l = Arc::new(RangeLocks::default());
        let a = l.register(0, 10, None);
        let b = l.register(100, 10, Some(7));
        let c = l.register(0, 10, Some(8));
        assert_eq!(l.oldest_inflight_seq(), Some(7));
        drop(b);
        assert_eq!(l.oldest_inflight_seq(), Some(8));
        assert!(c.must_wait());
        drop(a);
        assert!(!c.must_wait());
        drop(c);
        assert_eq!(l.oldest_inflight_seq(), None);
        let d = l.register(0, 10, None);
        assert!(!d.must_wait());
    }
}
