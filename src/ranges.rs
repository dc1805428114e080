//! Byte ranges as HTTP carries them (RFC 9110 §14): what a client's `Range` asks for, parsed
//! once, resolved against a blob's size, and the `Content-Range` of an answer.

/// The most ranges one request may ask for; more is answered `400` (RFC 9110 §14.2 lets a
/// server reject a set of many small ranges, the shape of a denial of service).
pub const MAX_RANGES: usize = 100;

/// One range-spec of a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// `first-last`, or `first-` to the end.
    From { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes (`n > 0`).
    Suffix(u64),
}

impl Spec {
    /// The bytes `start..end` it asks of a `size`-byte blob; `None` when it is not
    /// satisfiable there.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            Spec::From { first, last } => {
                let end = last.map_or(size, |l| l.saturating_add(1).min(size));
                (first < size).then_some((first, end))
            }
            Spec::Suffix(n) => (n > 0 && size > 0).then(|| (size - n.min(size), size)),
        }
    }

    /// The `Range` header value asking for it alone.
    pub fn header(self) -> String {
        match self {
            Spec::From { first, last: None } => format!("bytes={first}-"),
            Spec::From {
                first,
                last: Some(last),
            } => format!("bytes={first}-{last}"),
            Spec::Suffix(n) => format!("bytes=-{n}"),
        }
    }

    /// How many bytes it asks for at most, whatever the size (`None`: to the end).
    pub fn most(self) -> Option<u64> {
        match self {
            Spec::From {
                first,
                last: Some(last),
            } => Some(last - first + 1),
            Spec::From { last: None, .. } => None,
            Spec::Suffix(n) => Some(n),
        }
    }
}

/// What a request's `Range` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// No header, or one that is not a valid byte range set: the whole blob (RFC 9110 lets
    /// a server ignore an invalid one).
    Whole,
    /// More than [`MAX_RANGES`] ranges.
    TooMany,
    Ranges(Vec<Spec>),
}

impl Requested {
    pub fn parse(header: Option<&str>) -> Requested {
        let Some(header) = header else {
            return Requested::Whole;
        };
        // The last zero bytes: valid, and satisfiable by no byte (RFC 9110 §14.1.1).
        if header
            .strip_prefix("bytes=")
            .is_some_and(|spec| spec.trim() == "-0")
        {
            return Requested::Ranges(vec![Spec::Suffix(0)]);
        }
        let Ok(parsed) = http_range_header::parse_range_header(header) else {
            return Requested::Whole;
        };
        if parsed.ranges.len() > MAX_RANGES {
            return Requested::TooMany;
        }
        let mut specs = Vec::with_capacity(parsed.ranges.len());
        for r in parsed.ranges {
            use http_range_header::{EndPosition, StartPosition};
            let spec = match (r.start, r.end) {
                (StartPosition::FromLast(n), _) => Spec::Suffix(n),
                (StartPosition::Index(first), EndPosition::LastByte) => {
                    Spec::From { first, last: None }
                }
                (StartPosition::Index(first), EndPosition::Index(last)) if first <= last => {
                    Spec::From {
                        first,
                        last: Some(last),
                    }
                }
                // `5-2` makes the whole set invalid (RFC 9110 §14.1.1): ignored.
                _ => return Requested::Whole,
            };
            specs.push(spec);
        }
        Requested::Ranges(specs)
    }
}

/// What a [`Requested`] set asks of a `size`-byte blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Whole,
    /// No range is satisfiable: `416` with `Content-Range: bytes */size`.
    Unsatisfiable,
    /// The satisfiable ranges (`start..end`), in the order asked, overlapping ones merged.
    Ranges(Vec<(u64, u64)>),
}

/// Resolves `requested` against a blob of `size` bytes.
pub fn resolve(requested: &Requested, size: u64) -> Resolved {
    let specs = match requested {
        Requested::Whole | Requested::TooMany => return Resolved::Whole,
        Requested::Ranges(specs) => specs,
    };
    let mut ranges: Vec<(u64, u64)> = specs.iter().filter_map(|s| s.resolve(size)).collect();
    if ranges.is_empty() {
        return Resolved::Unsatisfiable;
    }
    let overlap = ranges
        .iter()
        .enumerate()
        .any(|(i, a)| ranges[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
    if overlap {
        // RFC 9110 §14.6 lets a server coalesce overlapping ranges; merged, they are sent in
        // ascending order.
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s < last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        ranges = merged;
    }
    Resolved::Ranges(ranges)
}

/// `Content-Range: bytes <first>-<last>/<total>`, as `(first, last, total)`.
pub fn content_range(value: &str) -> Option<(u64, u64, u64)> {
    let (span, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let total: u64 = total.trim().parse().ok()?;
    let (first, last) = span.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last && last < total).then_some((first, last, total))
}

/// The blob's total length from a `Content-Range` answering a request for `bytes=<offset>-`:
/// only when it starts at `offset` and runs to the end, since anything else is not the rest
/// of the blob that was asked for.
pub fn content_range_total(value: &str, offset: u64) -> Option<u64> {
    let (first, last, total) = content_range(value)?;
    (first == offset && last.checked_add(1) == Some(total)).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_must_answer_from_the_offset_to_the_end() {
        assert_eq!(content_range_total("bytes 10-99/100", 10), Some(100));
        assert_eq!(content_range_total("bytes 0-99/100", 10), None);
        assert_eq!(content_range_total("bytes 10-50/100", 10), None);
        assert_eq!(content_range_total("bytes 10-99/*", 10), None);
        assert_eq!(
            content_range_total("bytes 18446744073709551615-18446744073709551615/0", 0),
            None
        );
        assert_eq!(content_range_total("garbage", 10), None);
    }

    fn ranges(header: &str, size: u64) -> Resolved {
        resolve(&Requested::parse(Some(header)), size)
    }

    #[test]
    fn single_ranges_resolve_as_the_rfc_says() {
        assert_eq!(resolve(&Requested::parse(None), 10), Resolved::Whole);
        assert_eq!(ranges("bytes=2-4", 10), Resolved::Ranges(vec![(2, 5)]));
        assert_eq!(ranges("bytes=5-", 10), Resolved::Ranges(vec![(5, 10)]));
        assert_eq!(ranges("bytes=-3", 10), Resolved::Ranges(vec![(7, 10)]));
        assert_eq!(ranges("bytes=-30", 10), Resolved::Ranges(vec![(0, 10)]));
        assert_eq!(ranges("bytes=8-30", 10), Resolved::Ranges(vec![(8, 10)]));
        assert_eq!(ranges("bytes=10-", 10), Resolved::Unsatisfiable);
        assert_eq!(ranges("bytes=-0", 10), Resolved::Unsatisfiable);
        assert_eq!(ranges("garbage", 10), Resolved::Whole);
        assert_eq!(ranges("bytes=5-2", 10), Resolved::Whole);
    }

    #[test]
    fn several_ranges_keep_their_order_and_drop_the_unsatisfiable() {
        assert_eq!(
            ranges("bytes=8-9,0-1", 10),
            Resolved::Ranges(vec![(8, 10), (0, 2)])
        );
        assert_eq!(
            ranges("bytes=0-1,20-30", 10),
            Resolved::Ranges(vec![(0, 2)])
        );
        assert_eq!(ranges("bytes=20-30,40-", 10), Resolved::Unsatisfiable);
        assert_eq!(
            ranges("bytes=5-8,0-6", 10),
            Resolved::Ranges(vec![(0, 9)]),
            "overlapping ranges are merged"
        );
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(Requested::parse(Some(&many)), Requested::TooMany);
    }

    proptest::proptest! {
        /// Whatever the header, an answer is whole, unsatisfiable, or ranges inside the blob.
        #[test]
        fn any_range_header_stays_inside_the_blob(range in "\\PC{0,60}", size in 0u64..1 << 40) {
            if let Resolved::Ranges(rs) = ranges(&range, size) {
                for (s, e) in rs {
                    proptest::prop_assert!(s < e && e <= size, "{range:?} {s}..{e}");
                }
            }
        }

        #[test]
        fn byte_ranges_are_honoured(start in 0u64..1000, len in 1u64..1000, size in 1u64..3000) {
            let range = format!("bytes={start}-{}", start + len - 1);
            match ranges(&range, size) {
                Resolved::Ranges(rs) => {
                    proptest::prop_assert_eq!(rs, vec![(start, (start + len).min(size))]);
                }
                Resolved::Unsatisfiable => proptest::prop_assert!(start >= size),
                Resolved::Whole => proptest::prop_assert!(false, "ignored {range}"),
            }
        }
    }
}
