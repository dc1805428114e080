//! HTTP handlers: one function per route, turning a request into a call of the pull layer
//! ([`Mirror`](crate::mirror::Mirror)) and its answer into a registry response: headers,
//! ranges, bodies, status. No cache decision is made here. Errors become responses in
//! [`error`], the one place that decides each failure's status and OCI code.

pub mod blobs;
pub mod body;
pub mod error;
pub mod manifests;
pub mod ops;
pub mod tags;

use http::header::{self, HeaderName, HeaderValue};
use http::Response;

use crate::outcome::CacheStatus;
use body::Body;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// Marks how a response was served: `X-Cache` for clients, and the typed status as a response
/// extension for the server's log line and metrics.
fn with_cache_status(mut resp: Response<Body>, status: CacheStatus) -> Response<Body> {
    resp.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(status.x_cache()));
    resp.extensions_mut().insert(status);
    resp
}

/// `ns=<registry>` from the query: containerd's way of naming the upstream registry.
pub fn namespace(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
}

fn content_type(h: &mut http::HeaderMap, value: &'static str) {
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
}
