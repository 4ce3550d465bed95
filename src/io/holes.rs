//! Holes of an in-memory store: the ranges punched and not written since,
//! so that [`super::MemStore`] and [`super::FaultStore`] answer
//! [`super::Store::find_hole`] like a host file system.

use std::collections::BTreeMap;

/// Punched ranges, start -> end, disjoint and not touching.
#[derive(Debug, Default, Clone)]
pub(super) struct Holes(BTreeMap<u64, u64>);

impl Holes {
    /// `[start, end)` was punched.
    pub fn punch(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.0.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    /// `[start, end)` was written: no longer a hole.
    pub fn fill(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let first = self
            .0
            .range(..start)
            .next_back()
            .filter(|(_, &e)| e > start)
            .map(|(&s, _)| s);
        let touched: Vec<(u64, u64)> = first
            .into_iter()
            .chain(self.0.range(start..end).map(|(&s, _)| s))
            .map(|s| (s, self.0[&s]))
            .collect();
        for (s, e) in touched {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    /// The store was cut (or grown) to `len`.
    pub fn truncate(&mut self, len: u64) {
        self.fill(len, u64::MAX);
    }

    /// Bytes of `[0, len)` in holes.
    pub fn bytes_below(&self, len: u64) -> u64 {
        self.0
            .iter()
            .map(|(&s, &e)| e.min(len).saturating_sub(s))
            .sum()
    }

    /// The first hole of at least `min_len` bytes in `[from, to)`, clipped
    /// to it.
    pub fn find(&self, from: u64, to: u64, min_len: u64) -> Option<(u64, u64)> {
        let first = self
            .0
            .range(..from)
            .next_back()
            .filter(|(_, &e)| e > from)
            .map(|(&s, &e)| (s, e));
        first
            .into_iter()
            .chain(self.0.range(from..to).map(|(&s, &e)| (s, e)))
            .map(|(s, e)| (s.max(from), e.min(to)))
            .find(|&(s, e)| e > s && e - s >= min_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punches_merge_writes_split_and_finds_clip() {
        let mut h = Holes::default();
        h.punch(100, 200);
        h.punch(200, 300);
        h.punch(500, 900);
        assert_eq!(h.find(0, 1000, 150), Some((100, 300)));
        h.fill(150, 160);
        assert_eq!(h.find(0, 1000, 150), Some((500, 900)));
        assert_eq!(h.find(0, 1000, 100), Some((160, 300)));
        assert_eq!(h.find(600, 1000, 300), Some((600, 900)));
        assert_eq!(h.find(600, 800, 300), None);
        h.truncate(700);
        assert_eq!(h.find(0, 1000, 150), Some((500, 700)));
        h.fill(0, 1000);
        assert_eq!(h.find(0, 1000, 1), None);
    }
}
