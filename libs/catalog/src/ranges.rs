//! A set of byte ranges still to be covered (a halt's pending ranges).
//!
//! Ranges are kept sorted and disjoint as half-open `[start, end)` pairs;
//! subtracting a covered range splits at most one range in two, so the set
//! grows by at most one entry per subtraction.

use serde::{Deserialize, Serialize};

/// Sorted, disjoint, non-empty half-open ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    /// The set holding `[offset, offset + length)` (empty if `length` is 0).
    pub fn single(offset: u64, length: u64) -> Self {
        let end = offset.saturating_add(length);
        if end > offset {
            Self(vec![(offset, end)])
        } else {
            Self(Vec::new())
        }
    }

    /// The set of `(offset, length)` ranges, merged (empty ones dropped).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let v = ranges.into_iter().filter(|r| r.1 > 0).collect();
        Self(
            tidemark_formats::journal::merge_ranges(v)
                .into_iter()
                .map(|(o, l)| (o, o.saturating_add(l)))
                .collect(),
        )
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes left.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// The ranges as `(offset, length)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|&(s, e)| (s, e - s))
    }

    /// The smallest single range holding everything left, as `(offset, length)`.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let s = self.0.first()?.0;
        let e = self.0.last()?.1;
        Some((s, e - s))
    }

    /// Remove `[offset, offset + length)`; returns whether anything changed.
    pub fn subtract(&mut self, offset: u64, length: u64) -> bool {
        let (cs, ce) = (offset, offset.saturating_add(length));
        if ce <= cs {
            return false;
        }
        let mut changed = false;
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(s, e) in &self.0 {
            if e <= cs || s >= ce {
                out.push((s, e));
                continue;
            }
            changed = true;
            if s < cs {
                out.push((s, cs));
            }
            if e > ce {
                out.push((ce, e));
            }
        }
        self.0 = out;
        changed
    }

    /// Check the invariants of a set read back from the catalog.
    pub fn is_well_formed(&self) -> bool {
        self.0.iter().all(|(s, e)| s < e) && self.0.windows(2).all(|w| w[0].1 <= w[1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_splits_trims_and_empties() {
        let mut r = RangeSet::single(100, 100);
        assert_eq!(r.bytes(), 100);
        assert!(!r.subtract(0, 100));
        assert!(!r.subtract(200, 10));
        assert!(r.subtract(120, 10));
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(100, 20), (130, 70)]);
        assert_eq!(r.bounds(), Some((100, 100)));
        assert!(r.subtract(90, 35));
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(130, 70)]);
        assert!(r.is_well_formed());
        assert!(r.subtract(0, 1000));
        assert!(r.is_empty());
        assert_eq!(r.bounds(), None);
        assert!(RangeSet::single(5, 0).is_empty());
        assert!(RangeSet::single(u64::MAX - 1, 10).bytes() == 1);
    }

    #[test]
    fn serializes_as_pairs() {
        let mut r = RangeSet::single(0, 10);
        r.subtract(4, 2);
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, "[[0,4],[6,10]]");
        let back: RangeSet = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
        let bad: RangeSet = serde_json::from_str("[[5,5]]").unwrap();
        assert!(!bad.is_well_formed());
    }
}
