//! A warning that a peer can provoke (a refused connection, a failed
//! handshake) logged at most once per interval, with how many were left
//! out: a flood of bad connections cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of peer-provoked warning.
#[derive(Debug)]
pub struct RateLimitedLog {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new(Duration::from_secs(10))
    }
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now; if so, how many were left out
    /// since the last one.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }

    /// `tracing::warn!` the message, within the rate.
    pub fn warn(&self, msg: std::fmt::Arguments<'_>) {
        match self.admit() {
            Some(0) => tracing::warn!("{msg}"),
            Some(n) => tracing::warn!("{msg} ({n} more like it not logged)"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_once_per_interval_and_counts_the_rest() {
        let l = RateLimitedLog::new(Duration::from_millis(200));
        assert_eq!(l.admit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.admit(), Some(1000));
    }
}
