//! A set of half-open integer intervals, kept sorted and merged.
//!
//! Written for this repository as a held-out sample: it is in neither the pretraining corpus
//! nor any crate of the cargo registry.

use std::fmt;

/// A half-open interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start: i64,
    pub end: i64,
}

impl Interval {
    pub fn new(start: i64, end: i64) -> Option<Self> {
        if start < end {
            Some(Self { start, end })
        } else {
            None
        }
    }

    pub fn len(&self) -> u64 {
        (self.end - self.start) as u64
    }

    pub fn contains(&self, value: i64) -> bool {
        self.start <= value && value < self.end
    }

    fn touches(&self, other: &Interval) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// Disjoint, non-adjacent intervals in increasing order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IntervalSet {
    intervals: Vec<Interval>,
}

impl IntervalSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `interval`, merging it with every interval it overlaps or touches.
    pub fn insert(&mut self, interval: Interval) {
        let mut merged = interval;
        let mut kept = Vec::with_capacity(self.intervals.len() + 1);
        let mut placed = false;
        for current in self.intervals.drain(..) {
            if current.touches(&merged) {
                merged.start = merged.start.min(current.start);
                merged.end = merged.end.max(current.end);
            } else if current.end < merged.start {
                kept.push(current);
            } else {
                if !placed {
                    kept.push(merged);
                    placed = true;
                }
                kept.push(current);
            }
        }
        if !placed {
            kept.push(merged);
        }
        self.intervals = kept;
    }

    /// Removes every value of `interval` from the set.
    pub fn remove(&mut self, interval: Interval) {
        let mut kept = Vec::with_capacity(self.intervals.len() + 1);
        for current in self.intervals.drain(..) {
            if current.end <= interval.start || interval.end <= current.start {
                kept.push(current);
                continue;
            }
            if let Some(left) = Interval::new(current.start, interval.start) {
                kept.push(left);
            }
            if let Some(right) = Interval::new(interval.end, current.end) {
                kept.push(right);
            }
        }
        self.intervals = kept;
    }

    pub fn contains(&self, value: i64) -> bool {
        let index = self.intervals.partition_point(|i| i.end <= value);
        self.intervals
            .get(index)
            .is_some_and(|interval| interval.contains(value))
    }

    /// Number of integers in the set.
    pub fn count(&self) -> u64 {
        self.intervals.iter().map(Interval::len).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Interval> {
        self.intervals.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(start: i64, end: i64) -> Interval {
        Interval::new(start, end).unwrap()
    }

    #[test]
    fn inserting_merges_overlapping_and_touching_intervals() {
        let mut set = IntervalSet::new();
        set.insert(iv(10, 20));
        set.insert(iv(30, 40));
        set.insert(iv(20, 25));
        set.insert(iv(0, 5));
        let all: Vec<String> = set.iter().map(|i| i.to_string()).collect();
        assert_eq!(all, vec!["[0, 5)", "[10, 25)", "[30, 40)"]);
        assert_eq!(set.count(), 30);
    }

    #[test]
    fn removing_splits_an_interval() {
        let mut set = IntervalSet::new();
        set.insert(iv(0, 100));
        set.remove(iv(40, 60));
        assert!(set.contains(39));
        assert!(!set.contains(40));
        assert!(!set.contains(59));
        assert!(set.contains(60));
        assert_eq!(set.count(), 80);
    }
}
