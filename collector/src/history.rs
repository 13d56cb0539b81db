//! Each disk's replication history for charts (`GET
//! /api/v1/disks/{id}/history`): a sample a second for the last hour, in
//! memory, and a sample a minute for the last 7 days, also kept in the
//! catalog (`history` table) so that it outlives a restart. A minute's
//! sample holds the worst lag of its seconds and their mean write rate.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use crate::state::Shared;

/// Seconds kept at 1 s.
pub(crate) const SECONDS_KEPT: usize = 3600;
/// Minutes kept at 1 min (7 days).
pub(crate) const MINUTES_KEPT: usize = 7 * 24 * 60;

/// One sample.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Sample {
    /// Unix seconds (the start of its minute, for minute samples).
    pub t: i64,
    /// Age of the oldest write not yet applied at the target (the RPO
    /// that a disaster at `t` would have cost).
    pub lag_s: f64,
    pub lag_bytes: u64,
    /// Client write bytes/s at the agent.
    pub write_bps: f64,
}

/// One disk's samples.
#[derive(Default)]
pub(crate) struct History {
    seconds: VecDeque<Sample>,
    minutes: VecDeque<Sample>,
    /// The seconds of the minute being gathered.
    pending: Vec<Sample>,
}

impl History {
    /// Add a 1 s sample; returns the minute sample it completed, if any.
    pub(crate) fn push(&mut self, s: Sample) -> Option<Sample> {
        self.seconds.push_back(s);
        while self.seconds.len() > SECONDS_KEPT {
            self.seconds.pop_front();
        }
        let minute = s.t.div_euclid(60) * 60;
        let done = match self.pending.first() {
            Some(p) if p.t.div_euclid(60) * 60 != minute => {
                let n = self.pending.len() as f64;
                let m = Sample {
                    t: p.t.div_euclid(60) * 60,
                    lag_s: self.pending.iter().map(|x| x.lag_s).fold(0.0, f64::max),
                    lag_bytes: self.pending.iter().map(|x| x.lag_bytes).max().unwrap_or(0),
                    write_bps: self.pending.iter().map(|x| x.write_bps).sum::<f64>() / n,
                };
                self.pending.clear();
                self.add_minute(m);
                Some(m)
            }
            _ => None,
        };
        self.pending.push(s);
        done
    }

    fn add_minute(&mut self, m: Sample) {
        self.minutes.push_back(m);
        while self.minutes.len() > MINUTES_KEPT {
            self.minutes.pop_front();
        }
    }

    pub(crate) fn seconds(&self) -> Vec<Sample> {
        self.seconds.iter().copied().collect()
    }

    pub(crate) fn minutes(&self) -> Vec<Sample> {
        self.minutes.iter().copied().collect()
    }
}

/// Every disk's history.
#[derive(Default)]
pub(crate) struct Histories {
    by_disk: Mutex<BTreeMap<String, History>>,
    loaded: std::sync::OnceLock<()>,
}

impl Histories {
    /// Run `f` on the disk's history (read from the catalog the first
    /// time).
    pub(crate) fn with<T>(&self, s: &Shared, disk: &str, f: impl FnOnce(&mut History) -> T) -> T {
        self.loaded.get_or_init(|| {
            let since = crate::catalog::now_s() - (MINUTES_KEPT as i64) * 60;
            match s.catalog.history(since) {
                Ok(rows) => {
                    let mut m = self.by_disk.lock().unwrap_or_else(PoisonError::into_inner);
                    for (d, sample) in rows {
                        m.entry(d).or_default().add_minute(sample);
                    }
                }
                Err(e) => tracing::error!("reading the kept history: {e:#}"),
            }
        });
        let mut m = self.by_disk.lock().unwrap_or_else(PoisonError::into_inner);
        f(m.entry(disk.to_string()).or_default())
    }
}

/// Take this second's sample of every disk; keep each completed minute in
/// the catalog (and forget those older than 7 days there).
pub(crate) fn sample(s: &Shared, statuses: &crate::alerts::Statuses) {
    let t = crate::catalog::now_s();
    for (d, st) in statuses {
        let sample = Sample {
            t,
            lag_s: st.lag_seconds,
            lag_bytes: st.lag_bytes,
            write_bps: st.json["write_rate_bps"].as_f64().unwrap_or(0.0),
        };
        if let Some(m) = s.history.with(s, &d.id, |h| h.push(sample)) {
            if let Err(e) = s.catalog.add_history(&d.id, &m, t - (MINUTES_KEPT as i64) * 60) {
                tracing::warn!(disk = %d.id, "keeping a minute of history: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: i64, lag: f64, rate: f64) -> Sample {
        Sample {
            t,
            lag_s: lag,
            lag_bytes: 0,
            write_bps: rate,
        }
    }

    #[test]
    fn minutes_hold_the_worst_lag_and_the_mean_rate_of_their_seconds() {
        let mut h = History::default();
        let mut done = Vec::new();
        // Two whole minutes and the start of a third, one sample a second.
        for i in 0..125 {
            let lag = if i == 30 { 9.0 } else { 1.0 };
            done.extend(h.push(at(600 + i, lag, if i < 60 { 100.0 } else { 300.0 })));
        }
        assert_eq!(done.len(), 2);
        assert_eq!(done[0], at(600, 9.0, 100.0));
        assert_eq!(done[1], at(660, 1.0, 300.0));
        assert_eq!(h.minutes(), done);
        assert_eq!(h.seconds().len(), 125);
        assert_eq!(h.seconds()[0].t, 600);
    }

    #[test]
    fn an_hour_of_seconds_and_a_week_of_minutes_are_kept() {
        let mut h = History::default();
        for i in 0..(SECONDS_KEPT as i64 + 10) {
            h.push(at(i, 0.0, 0.0));
        }
        assert_eq!(h.seconds().len(), SECONDS_KEPT);
        assert_eq!(h.seconds()[0].t, 10);
        for i in 0..(MINUTES_KEPT as i64 + 5) {
            h.add_minute(at(i * 60, 0.0, 0.0));
        }
        assert_eq!(h.minutes().len(), MINUTES_KEPT);
    }
}
