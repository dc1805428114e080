//! `GET`/`HEAD /v2/<name>/blobs/<digest>`: the pull layer's answer as a body, with ranges.

use std::ops::RangeInclusive;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use super::body::{self, Body};
use super::{
    content_headers, content_type, none_match, not_modified, with_cache_status,
    DOCKER_CONTENT_DIGEST,
};
use crate::handlers::error::{ApiError, Object};
use crate::mirror::{BlobAnswer, Mirror, Target};
use crate::oci::Digest;
use crate::outcome::Source;
use crate::sendfile::Sendfile;

pub async fn get(
    mirror: &Arc<Mirror>,
    target: &Target,
    digest: &Digest,
    head: bool,
    headers: &HeaderMap,
    sendfile: Option<Sendfile>,
) -> Result<Response<Body>, ApiError> {
    let err = |e| ApiError::from_mirror(e, Object::Blob);
    // A blob is named by its digest: a client that has it needs only to learn that it still
    // exists (a HEAD's worth, from the store or an uncounted upstream HEAD).
    if none_match(headers, digest) {
        let answer = mirror.blob(target, digest, true).await.map_err(err)?;
        let status = answer.status();
        return Ok(with_cache_status(not_modified(digest, true), status));
    }
    let answer = mirror.blob(target, digest, head).await.map_err(err)?;
    let status = answer.status();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_holds(headers, digest));
    let metrics = mirror.metrics().clone();
    let resp = match answer {
        BlobAnswer::Size { size } => {
            let mut resp = Response::new(body::empty());
            blob_headers(resp.headers_mut(), digest, size);
            resp
        }
        BlobAnswer::Relayed {
            relayed, waiter, ..
        } => {
            let size = relayed.size();
            ranged(digest, size, range, head, |start, end| {
                let b = body::from_stream(relayed.stream(start, end));
                body::with_guard(body::count_served(b, metrics, Source::Upstream), waiter)
            })
        }
        BlobAnswer::Redirect { location } => {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            if let Ok(v) = HeaderValue::from_str(location.as_str()) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
                resp.headers_mut().insert(DOCKER_CONTENT_DIGEST, v);
            }
            resp
        }
        BlobAnswer::Hit(handle) => {
            let size = handle.size();
            ranged(digest, size, range, head, |start, end| {
                let b = body::blob_range(handle, start, end, sendfile);
                body::count_served(b, metrics, Source::Cache)
            })
        }
        BlobAnswer::Fetching { handle, waiter, .. } => {
            let size = handle.size();
            ranged(digest, size, range, head, |start, end| {
                let b = body::blob_range(handle, start, end, sendfile);
                body::with_guard(body::count_served(b, metrics, Source::Upstream), waiter)
            })
        }
    };
    Ok(with_cache_status(resp, status))
}

/// `GET /_pullthrough/peer/blobs/<digest>`: a blob for another replica, from this one's disk
/// or its download in progress, with `Range` (a replica taking over resumes where it is).
pub async fn peer(
    mirror: &Arc<Mirror>,
    digest: &Digest,
    headers: &HeaderMap,
    sendfile: Option<Sendfile>,
) -> Result<Response<Body>, ApiError> {
    let secret = headers
        .get(crate::peer_api::SECRET_HEADER)
        .map(HeaderValue::as_bytes);
    let handle = mirror
        .peer_blob(secret, digest)
        .await
        .map_err(|e| ApiError::from_mirror(e, Object::Blob))?;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_holds(headers, digest));
    let metrics = mirror.metrics().clone();
    Ok(ranged(digest, handle.size(), range, false, |start, end| {
        let b = body::blob_range(handle, start, end, sendfile);
        body::count_served(b, metrics, Source::Cache)
    }))
}

/// A response for the range the client asked of a `size`-byte blob: 200, 206 or 416, with the
/// body from `body(start, end)` unless this is a HEAD.
fn ranged(
    digest: &Digest,
    size: u64,
    range: Option<&str>,
    head: bool,
    body: impl FnOnce(u64, u64) -> Body,
) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    let (start, end) = match requested_range(range, size) {
        Err(()) => {
            let mut resp = ApiError::range_not_satisfiable(size).into_response(head);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
        Ok(Some(r)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start(), r.end()))
            {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            (*r.start(), *r.end() + 1)
        }
        Ok(None) => (0, size),
    };
    blob_headers(resp.headers_mut(), digest, end - start);
    if !head {
        *resp.body_mut() = body(start, end);
    }
    resp
}

fn blob_headers(h: &mut HeaderMap, digest: &Digest, len: u64) {
    content_type(h, "application/octet-stream");
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    content_headers(h, digest, true);
}

/// Whether a `Range` applies under the request's `If-Range` (RFC 9110 §13.1.5): with none, or
/// with the blob's own (strong) entity tag. A date never matches (a blob has no
/// `Last-Modified`), nor does any other tag: the client's partial copy is of something else,
/// so it gets the whole blob (`200`), not a range of this one.
fn if_range_holds(headers: &HeaderMap, digest: &Digest) -> bool {
    let Some(v) = headers.get(header::IF_RANGE) else {
        return true;
    };
    let Ok(v) = v.to_str() else { return false };
    v.trim()
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .is_some_and(|tag| tag == digest.as_str())
}

/// The one byte range a `Range` header asks for. Malformed or multi-range headers are ignored
/// (the whole blob is sent, as RFC 9110 allows); `Err` means unsatisfiable.
fn requested_range(range: Option<&str>, size: u64) -> Result<Option<RangeInclusive<u64>>, ()> {
    let Some(range) = range else { return Ok(None) };
    // The last zero bytes: a valid header that no byte satisfies (RFC 9110 §14.1.1).
    if range
        .strip_prefix("bytes=")
        .is_some_and(|spec| spec.trim() == "-0")
    {
        return Err(());
    }
    let Ok(parsed) = http_range_header::parse_range_header(range) else {
        return Ok(None);
    };
    match parsed.validate(size) {
        Ok(ranges) if ranges.len() == 1 => Ok(ranges.into_iter().next()),
        Ok(_) => Ok(None),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_applies_only_under_a_matching_if_range() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_RANGE, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(if_range_holds(&HeaderMap::new(), &d));
        assert!(if_range_holds(&with(&format!("\"{d}\"")), &d));
        for other in [
            format!("W/\"{d}\""),
            "\"sha256:other\"".into(),
            d.to_string(),
            "Wed, 21 Oct 2015 07:28:00 GMT".into(),
        ] {
            assert!(!if_range_holds(&with(&other), &d), "{other}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(requested_range(None, 10), Ok(None));
        assert_eq!(requested_range(Some("bytes=2-4"), 10), Ok(Some(2..=4)));
        assert_eq!(requested_range(Some("bytes=5-"), 10), Ok(Some(5..=9)));
        assert_eq!(requested_range(Some("bytes=-3"), 10), Ok(Some(7..=9)));
        assert_eq!(requested_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(requested_range(Some("garbage"), 10), Ok(None));
        assert_eq!(requested_range(Some("bytes=-0"), 10), Err(()));
    }

    proptest::proptest! {
        /// Whatever the header, an answer is whole, unsatisfiable, or a range inside the blob.
        #[test]
        fn any_range_header_stays_inside_the_blob(range in "\\PC{0,60}", size in 0u64..1 << 40) {
            if let Ok(Some(r)) = requested_range(Some(&range), size) {
                proptest::prop_assert!(r.start() <= r.end() && *r.end() < size, "{range:?} {r:?}");
            }
        }

        #[test]
        fn byte_ranges_are_honoured(start in 0u64..1000, len in 1u64..1000, size in 1u64..3000) {
            let range = format!("bytes={start}-{}", start + len - 1);
            match requested_range(Some(&range), size) {
                Ok(Some(r)) => {
                    proptest::prop_assert_eq!(*r.start(), start);
                    proptest::prop_assert_eq!(*r.end(), (start + len - 1).min(size - 1));
                }
                Err(()) => proptest::prop_assert!(start >= size),
                Ok(None) => proptest::prop_assert!(false, "ignored {range}"),
            }
        }
    }
}
