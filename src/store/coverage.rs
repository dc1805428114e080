//! Which bytes of a blob being written are there. A download writes its blob from the start
//! (the contiguous, hashed prefix) and, when it fetches parts in parallel, from each part's
//! start too: every part is a span from its start to where it has got (empty before its first
//! byte, which marks where that byte will be written). Readers of a range ask where the bytes
//! they need end, and how far behind a writer's head their first byte is.

use std::sync::Arc;

/// The spans written beyond the prefix, sorted by start, disjoint and never touching (two
/// spans that meet are one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spans(Arc<[(u64, u64)]>);

impl Spans {
    /// The end of the readable run that contains `pos`, given the `prefix` written from 0;
    /// `pos` itself when the byte at `pos` is not there yet.
    pub fn readable_from(&self, prefix: u64, pos: u64) -> u64 {
        let mut end = if pos < prefix {
            prefix
        } else {
            match self.0.iter().find(|(s, e)| *s <= pos && pos < *e) {
                Some((_, e)) => *e,
                None => return pos,
            }
        };
        // A span may start where the prefix ends (it is merged only as it is hashed).
        for (s, e) in self.0.iter() {
            if *s <= end && end < *e {
                end = *e;
            }
        }
        end
    }

    /// How far `pos` lies ahead of the nearest writer's head at or before it (the prefix's
    /// end or a span's end); `None` when no head is at or before it, or when `pos` is already
    /// there.
    pub fn behind_head(&self, prefix: u64, pos: u64) -> Option<u64> {
        if self.readable_from(prefix, pos) > pos {
            return None;
        }
        let heads = std::iter::once(prefix).chain(self.0.iter().map(|(_, e)| *e));
        heads.filter(|h| *h <= pos).map(|h| pos - h).min()
    }
}

/// The writer's side: spans as they grow, merged into the prefix as it is hashed.
#[derive(Debug, Default)]
pub struct Coverage {
    spans: Vec<(u64, u64)>,
}

impl Coverage {
    /// Marks where parts will start writing (empty spans).
    pub fn expect(&mut self, starts: impl IntoIterator<Item = u64>) {
        for s in starts {
            self.insert(s, s);
        }
    }

    /// `start..end` was written.
    pub fn insert(&mut self, start: u64, end: u64) {
        let i = self.spans.partition_point(|(s, _)| *s < start);
        self.spans.insert(i, (start, end));
        // Merge with neighbours that meet or overlap it.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.spans.len());
        for (s, e) in self.spans.drain(..) {
            match merged.last_mut() {
                Some(last) if s <= last.1 => {
                    last.1 = last.1.max(e);
                }
                _ => merged.push((s, e)),
            }
        }
        self.spans = merged;
    }

    /// The bytes from `prefix` on that are written and not yet hashed: up to where the span
    /// starting at (or before) `prefix` ends.
    pub fn ready_after(&self, prefix: u64) -> Option<u64> {
        self.spans
            .iter()
            .find(|(s, e)| *s <= prefix && prefix < *e)
            .map(|(_, e)| *e)
    }

    /// Forgets what the prefix (now `prefix` long) covers, its own head included.
    pub fn hashed_to(&mut self, prefix: u64) {
        self.spans.retain_mut(|(s, e)| {
            *s = (*s).max(prefix);
            *e > prefix
        });
    }

    pub fn snapshot(&self) -> Spans {
        Spans(self.spans.as_slice().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_readable_as_far_as_its_run_goes() {
        let mut c = Coverage::default();
        c.expect([100, 200]);
        c.insert(100, 150);
        let s = c.snapshot();
        assert_eq!(s.readable_from(50, 10), 50);
        assert_eq!(s.readable_from(50, 60), 60, "not written yet");
        assert_eq!(s.readable_from(50, 120), 150);
        assert_eq!(s.readable_from(50, 200), 200, "a part that has not begun");
        c.insert(150, 200);
        c.insert(200, 230);
        assert_eq!(
            c.snapshot().readable_from(50, 120),
            230,
            "parts that meet are one run"
        );
        assert_eq!(
            c.snapshot().readable_from(100, 10),
            230,
            "the prefix runs into a span"
        );
    }

    #[test]
    fn a_byte_just_ahead_of_a_head_is_near_it() {
        let mut c = Coverage::default();
        c.expect([1000]);
        let s = c.snapshot();
        assert_eq!(s.behind_head(10, 15), Some(5));
        assert_eq!(
            s.behind_head(10, 1000),
            Some(0),
            "a part is about to write it"
        );
        assert_eq!(s.behind_head(10, 1500), Some(500));
        assert_eq!(s.behind_head(10, 5), None, "already there");
    }

    #[test]
    fn hashing_the_prefix_consumes_the_spans_it_reaches() {
        let mut c = Coverage::default();
        c.expect([100, 200]);
        c.insert(100, 180);
        assert_eq!(c.ready_after(50), None);
        assert_eq!(c.ready_after(100), Some(180));
        c.hashed_to(140);
        assert_eq!(c.ready_after(140), Some(180));
        c.hashed_to(180);
        assert_eq!(c.snapshot(), Spans(vec![(200, 200)].into()));
        c.insert(180, 200);
        assert_eq!(c.ready_after(180), Some(200));
    }
}
