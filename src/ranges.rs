//! Byte ranges as HTTP carries them between the mirror and the tiers it reads from.

/// The blob's total length from a `Content-Range: bytes <first>-<last>/<total>` answering a
/// request for `bytes=<offset>-`: only when it starts at `offset` and runs to the end, since
/// anything else is not the rest of the blob that was asked for.
pub fn content_range_total(value: &str, offset: u64) -> Option<u64> {
    let (span, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let total: u64 = total.trim().parse().ok()?;
    let (first, last) = span.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
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
}
