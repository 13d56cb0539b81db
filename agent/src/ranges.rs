//! Range locks: overlapping in-flight writes reach the backing disk in
//! journal order; writes that do not overlap run in parallel.
//!
//! A ticket is taken while the journal lock is held, so ticket order is seq
//! order. A write may touch the disk once no older ticket overlaps it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// ticket → (start, end, seq if journaled)
    active: BTreeMap<u64, (u64, u64, Option<u64>)>,
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
        g.active.insert(id, (start, end, seq));
        Ticket {
            locks: self.clone(),
            id,
            start,
            end,
        }
    }

    /// Lowest journaled seq still in flight.
    pub fn oldest_inflight_seq(&self) -> Option<u64> {
        self.lock().active.values().find_map(|v| v.2)
    }

    fn conflicts(&self, t: &Ticket) -> bool {
        self.lock()
            .active
            .range(..t.id)
            .any(|(_, &(s, e, _))| s < t.end && t.start < e)
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
            g.active.remove(&self.id);
            !g.active.is_empty()
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
}
