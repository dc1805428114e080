//! HTTP handlers: one function per route, turning a request into a call of the pull layer
//! ([`Mirror`](crate::mirror::Mirror)) and its answer into a registry response: headers,
//! ranges, bodies, status. No cache decision is made here. Errors become responses in
//! [`error`], the one place that decides each failure's status and OCI code.

pub mod blobs;
pub mod body;
pub mod catalog;
pub mod client_auth;
pub mod error;
pub mod manifests;
pub mod ops;
pub mod pins;
pub mod purge;
mod query;
pub mod referrers;
pub mod tags;

pub use query::Query;

use http::header::{self, HeaderName, HeaderValue};
use http::Response;

use crate::oci::Digest;
use crate::outcome::CacheStatus;
use body::Body;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// For content named by its digest, which never changes: a year, and `immutable`.
const IMMUTABLE: &str = "max-age=31536000, immutable";

/// `ETag` (the quoted digest, [`crate::oci::etag`]) and, for content addressed by digest,
/// `Cache-Control`.
fn content_headers(h: &mut http::HeaderMap, etag: Option<HeaderValue>, by_digest: bool) {
    if let Some(v) = etag {
        h.insert(header::ETAG, v);
    }
    if by_digest {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    }
}

/// Whether `If-None-Match` names `digest` (quoted or not, weak or strong, or `*`).
fn none_match(headers: &http::HeaderMap, digest: &Digest) -> bool {
    let want = digest.as_str();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| t == "*" || t == want)
}

/// `304 Not Modified`: no body, the validators kept.
fn not_modified(digest: &Digest, by_digest: bool) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = http::StatusCode::NOT_MODIFIED;
    content_headers(resp.headers_mut(), crate::oci::etag(digest), by_digest);
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        resp.headers_mut().insert(DOCKER_CONTENT_DIGEST, v);
    }
    resp
}

/// Marks how a response was served: `X-Cache` for clients, and the typed status as a response
/// extension for the server's log line and metrics.
fn with_cache_status(mut resp: Response<Body>, status: CacheStatus) -> Response<Body> {
    resp.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(status.x_cache()));
    resp.extensions_mut().insert(status);
    resp
}

fn content_type(h: &mut http::HeaderMap, value: &'static str) {
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
}

/// A JSON response with its length; the body is left out for a HEAD.
fn json(bytes: Vec<u8>, head: bool) -> Response<Body> {
    let len = bytes.len();
    let mut resp = Response::new(if head {
        body::empty()
    } else {
        body::full(bytes::Bytes::from(bytes))
    });
    let h = resp.headers_mut();
    content_type(h, "application/json");
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}
