//! `GET`/`HEAD /v2/<name>/blobs/<digest>`: the pull layer's answer as a body, with ranges.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;

use super::body::{self, Body};
use super::{
    content_headers, content_type, none_match, not_modified, with_cache_status,
    DOCKER_CONTENT_DIGEST,
};
use crate::handlers::error::{ApiError, Object};
use crate::mirror::{BlobAnswer, Mirror, Target};
use crate::oci::Digest;
use crate::outcome::Source;
use crate::ranges::{self, Requested, Resolved};
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
    let requested = requested(headers, digest);
    if requested == Requested::TooMany {
        return Err(ApiError::too_many_ranges());
    }
    let answer = mirror
        .blob_ranges(target, digest, head, &requested)
        .await
        .map_err(err)?;
    let status = answer.status();
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
            // A relay from memory serves one range; several get the whole blob (RFC 9110
            // lets a server ignore a Range).
            let resolved = match ranges::resolve(&requested, size) {
                Resolved::Ranges(r) if r.len() > 1 => Resolved::Whole,
                r => r,
            };
            let mut relayed = Some((relayed, waiter));
            respond(digest, size, resolved, head, |start, end| {
                let Some((relayed, waiter)) = relayed.take() else {
                    return body::empty();
                };
                let b = body::from_stream(relayed.stream(start, end));
                body::with_guard(
                    body::count_served(b, metrics.clone(), Source::Upstream),
                    waiter,
                )
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
            let resolved = ranges::resolve(&requested, size);
            // Zero-copy for one body; the parts of a multipart body are copied.
            let sendfile = sendfile.filter(|_| single(&resolved));
            respond(digest, size, resolved, head, |start, end| {
                let b = body::blob_range(handle.clone(), start, end, sendfile.clone());
                body::count_served(b, metrics.clone(), Source::Cache)
            })
        }
        BlobAnswer::Fetching {
            handle,
            waiter,
            mut own,
            ..
        } => {
            let size = handle.size();
            let resolved = ranges::resolve(&requested, size);
            let sendfile = sendfile.filter(|_| single(&resolved));
            let waiter = Arc::new(waiter);
            respond(digest, size, resolved, head, |start, end| {
                let b = match own.take(start, end) {
                    Some(chunks) => body::from_stream(chunks),
                    None => body::blob_range(handle.clone(), start, end, sendfile.clone()),
                };
                let b = body::count_served(b, metrics.clone(), Source::Upstream);
                body::with_guard(b, waiter.clone())
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
    let requested = requested(headers, digest);
    let metrics = mirror.metrics().clone();
    let size = handle.size();
    let resolved = match ranges::resolve(&requested, size) {
        // A replica asks for the rest of the blob from where it is: one range.
        Resolved::Ranges(r) if r.len() > 1 => Resolved::Whole,
        r => r,
    };
    Ok(respond(digest, size, resolved, false, |start, end| {
        let b = body::blob_range(handle.clone(), start, end, sendfile.clone());
        body::count_served(b, metrics.clone(), Source::Cache)
    }))
}

/// Whether a response has one body (the whole blob or one range).
fn single(resolved: &Resolved) -> bool {
    !matches!(resolved, Resolved::Ranges(r) if r.len() > 1)
}

/// The response to `resolved` ranges of a `size`-byte blob: 200, 206 (one range, or several
/// as `multipart/byteranges`) or 416, with each body from `body(start, end)` unless this is a
/// HEAD.
fn respond(
    digest: &Digest,
    size: u64,
    resolved: Resolved,
    head: bool,
    mut body: impl FnMut(u64, u64) -> Body,
) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    let ranges = match resolved {
        Resolved::Unsatisfiable => {
            let mut resp = ApiError::range_not_satisfiable(size).into_response(head);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
        Resolved::Whole => {
            blob_headers(resp.headers_mut(), digest, size);
            if !head {
                *resp.body_mut() = body(0, size);
            }
            return resp;
        }
        Resolved::Ranges(ranges) => ranges,
    };
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    if let [(start, end)] = ranges[..] {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        blob_headers(resp.headers_mut(), digest, end - start);
        if !head {
            *resp.body_mut() = body(start, end);
        }
        return resp;
    }
    let multipart = Multipart::new(size);
    blob_headers(resp.headers_mut(), digest, multipart.length(&ranges));
    if let Ok(v) = HeaderValue::from_str(&multipart.content_type()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    if !head {
        let parts: Vec<(Bytes, Body)> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(start, end))| (multipart.part_header(i, start, end), body(start, end)))
            .collect();
        *resp.body_mut() = multipart.body(parts);
    }
    resp
}

/// A `multipart/byteranges` body (RFC 9110 §14.6): each range after its own headers, between
/// boundaries.
struct Multipart {
    boundary: String,
    size: u64,
}

impl Multipart {
    fn new(size: u64) -> Multipart {
        // Random, so that it is as unlikely in a blob's bytes as a boundary can be.
        let mut raw = [0u8; 16];
        if getrandom::fill(&mut raw).is_err() {
            raw = *b"pullthrough-byte";
        }
        let boundary = raw.iter().map(|b| format!("{b:02x}")).collect();
        Multipart { boundary, size }
    }

    fn content_type(&self) -> String {
        format!("multipart/byteranges; boundary={}", self.boundary)
    }

    /// What comes before range `i`'s bytes: the boundary (after the previous part's bytes)
    /// and the part's headers.
    fn part_header(&self, i: usize, start: u64, end: u64) -> Bytes {
        let lead = if i == 0 { "" } else { "\r\n" };
        Bytes::from(format!(
            "{lead}--{}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {start}-{}/{}\r\n\r\n",
            self.boundary,
            end - 1,
            self.size
        ))
    }

    fn closing(&self) -> Bytes {
        Bytes::from(format!("\r\n--{}--\r\n", self.boundary))
    }

    fn length(&self, ranges: &[(u64, u64)]) -> u64 {
        let parts: u64 = ranges
            .iter()
            .enumerate()
            .map(|(i, &(s, e))| self.part_header(i, s, e).len() as u64 + (e - s))
            .sum();
        parts + self.closing().len() as u64
    }

    fn body(&self, parts: Vec<(Bytes, Body)>) -> Body {
        let closing = self.closing();
        let parts = parts.into_iter().map(|(header, body)| {
            stream::once(async move { Ok(header) })
                .chain(body.into_data_stream())
                .boxed()
        });
        let all = stream::iter(parts)
            .flatten()
            .chain(stream::once(async move { Ok(closing) }));
        body::from_stream(all)
    }
}

fn blob_headers(h: &mut HeaderMap, digest: &Digest, len: u64) {
    content_type(h, "application/octet-stream");
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    content_headers(h, crate::oci::etag(digest), true);
}

/// What the request's `Range` asks for, under its `If-Range`.
fn requested(headers: &HeaderMap, digest: &Digest) -> Requested {
    if if_range_holds(headers, digest) {
        Requested::parse(headers.get(header::RANGE).and_then(|v| v.to_str().ok()))
    } else {
        Requested::Whole
    }
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
    fn a_multipart_length_is_what_its_body_carries() {
        let m = Multipart::new(100);
        let ranges = [(0u64, 10u64), (50, 51), (90, 100)];
        let mut total = 0;
        for (i, &(s, e)) in ranges.iter().enumerate() {
            let h = m.part_header(i, s, e);
            assert!(std::str::from_utf8(&h)
                .unwrap()
                .contains(&format!("bytes {s}-{}/100", e - 1)));
            total += h.len() as u64 + (e - s);
        }
        total += m.closing().len() as u64;
        assert_eq!(m.length(&ranges), total);
        assert!(m.content_type().ends_with(&m.boundary));
    }
}
