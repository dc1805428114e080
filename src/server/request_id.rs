//! Request ids: the client's `X-Request-Id` when it is short and printable, else one made
//! here (unique within the process, unlikely to repeat across restarts). Sent back as
//! `X-Request-Id` and written in the access line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::HeaderMap;

pub const HEADER: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Longer client ids are replaced rather than cut.
const MAX_LEN: usize = 64;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Differs between runs: the start time's nanoseconds mixed with the process id.
fn seed() -> u32 {
    static SEED: OnceLock<u32> = OnceLock::new();
    *SEED.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mixed =
            (nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> 32) as u32
    })
}

/// Visible ASCII without quotes or backslashes: safe in a log line and a header unquoted.
fn acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// The id for a request with `headers`.
pub fn for_request(headers: &HeaderMap) -> String {
    if let Some(id) = headers
        .get(&HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| acceptable(id))
    {
        return id.to_owned();
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    hex16((u64::from(seed()) << 32) | (n & 0xffff_ffff))
}

/// `v` as 16 lowercase hex digits; by hand, as `format!` costs more than the rest of the id.
fn hex16(v: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 16];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = DIGITS[((v >> ((15 - i) * 4)) & 0xf) as usize];
    }
    // Hex digits are ASCII: the conversion cannot fail.
    std::str::from_utf8(&text).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_when_short_and_printable() {
        let mut h = HeaderMap::new();
        h.insert(HEADER, "abc-123_X.y:z".parse().unwrap());
        assert_eq!(for_request(&h), "abc-123_X.y:z");
        for bad in ["has space", "quo\"te", &"x".repeat(65), ""] {
            h.insert(HEADER, bad.parse().unwrap());
            let id = for_request(&h);
            assert_eq!(id.len(), 16, "{bad:?} replaced by {id}");
        }
        assert_ne!(
            for_request(&HeaderMap::new()),
            for_request(&HeaderMap::new())
        );
    }

    #[test]
    fn made_ids_are_sixteen_hex_digits() {
        assert_eq!(hex16(0x0123_4567_89ab_cdef), "0123456789abcdef");
        assert_eq!(hex16(0xf), "000000000000000f");
    }
}
