//! Group commit for FLUSH and FUA: one round of fdatasyncs is shared by
//! every request waiting on it.
//!
//! A caller needs a round that *starts* after its call, because a round
//! already running may have begun before the caller's writes completed.
//! Whoever finds no round running starts one; the others wait for it.

use std::future::Future;
use std::io;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    started: u64,
    finished: u64,
    running: bool,
    /// Last round that failed, with its error.
    failed: Option<(u64, io::ErrorKind, String)>,
}

/// Shares sync rounds among concurrent callers.
#[derive(Debug, Default)]
pub struct Syncer {
    state: Mutex<State>,
    notify: Notify,
}

impl Syncer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run (or join) a sync round that starts after this call. `round`
    /// performs the fdatasyncs.
    pub async fn sync<F, Fut>(&self, round: F) -> io::Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        let need = {
            let g = self.lock();
            g.started + 1
        };
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let id = {
                let mut g = self.lock();
                if g.finished >= need {
                    return match &g.failed {
                        Some((f, kind, msg)) if *f >= need => Err(io::Error::new(*kind, msg.clone())),
                        _ => Ok(()),
                    };
                }
                if g.running {
                    None
                } else {
                    g.running = true;
                    g.started += 1;
                    Some(g.started)
                }
            };
            let Some(id) = id else {
                notified.await;
                continue;
            };
            // Whatever happens (even if this future is dropped), the round
            // must be marked finished so waiters do not hang.
            let guard = RoundGuard {
                syncer: self,
                id,
                result: None,
            };
            let r = round().await;
            let mut guard = guard;
            guard.result = Some(r.as_ref().map(|_| ()).map_err(|e| (e.kind(), e.to_string())));
            drop(guard);
            return r;
        }
    }
}

struct RoundGuard<'a> {
    syncer: &'a Syncer,
    id: u64,
    result: Option<Result<(), (io::ErrorKind, String)>>,
}

impl Drop for RoundGuard<'_> {
    fn drop(&mut self) {
        {
            let mut g = self.syncer.lock();
            g.running = false;
            match self.result.take() {
                Some(Ok(())) => g.finished = g.finished.max(self.id),
                Some(Err((k, m))) => {
                    g.finished = g.finished.max(self.id);
                    g.failed = Some((self.id, k, m));
                }
                // Cancelled: the round did not complete; do not count it.
                None => {}
            }
        }
        self.syncer.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_rounds() {
        let s = Arc::new(Syncer::default());
        let rounds = Arc::new(AtomicU32::new(0));
        let mut hs = Vec::new();
        for _ in 0..32 {
            let (s, rounds) = (s.clone(), rounds.clone());
            hs.push(tokio::spawn(async move {
                s.sync(|| {
                    let rounds = rounds.clone();
                    async move {
                        rounds.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(())
                    }
                })
                .await
            }));
        }
        for h in hs {
            h.await.unwrap().unwrap();
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!((1..=3).contains(&n), "32 flushes took {n} rounds");
    }

    #[tokio::test]
    async fn failure_is_reported_to_its_waiters() {
        let s = Syncer::default();
        let e = s
            .sync(|| async { Err(io::Error::other("disk on fire")) })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disk on fire"));
        s.sync(|| async { Ok(()) }).await.unwrap();
    }
}
