//! The API version check and the operator endpoints: health, readiness, metrics, status.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, Body};
use super::{content_type, API_VERSION};
use crate::metrics::Format;
use crate::mirror::Housekeeping;
use crate::outcome::CacheStatus;

/// `GET /v2/`.
pub fn base() -> Response<Body> {
    let mut resp = super::json(b"{}".to_vec(), false);
    let h = resp.headers_mut();
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    // Answered by the mirror alone, as the README promises every `/v2/` response says.
    h.insert(
        super::X_CACHE,
        HeaderValue::from_static(CacheStatus::Hit.x_cache()),
    );
    resp
}

fn text(status: StatusCode, s: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(body::full(s.into()));
    *resp.status_mut() = status;
    content_type(resp.headers_mut(), "text/plain; charset=utf-8");
    resp
}

pub fn healthz() -> Response<Body> {
    text(StatusCode::OK, "ok\n")
}

pub async fn readyz(mirror: &Housekeeping) -> Response<Body> {
    match mirror.readiness().await {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(why) => {
            tracing::warn!(reason = %why, "readiness check: storage is not writable");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    }
}

/// `GET /metrics`: OpenMetrics if the scraper's `Accept` asks for it, else the Prometheus text
/// format (what `promtool check metrics` reads).
pub fn metrics(mirror: &Housekeeping, headers: &http::HeaderMap) -> Response<Body> {
    let format = Format::negotiate(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let mut resp = Response::new(body::full(Bytes::from(mirror.metrics_text(format))));
    content_type(resp.headers_mut(), format.content_type());
    resp
}

/// `GET /` and `/_pullthrough/ui`: the status page, one self-contained file that polls
/// `/_pullthrough/status`.
pub fn ui() -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from_static(
        include_str!("status.html").as_bytes(),
    )));
    let h = resp.headers_mut();
    content_type(h, "text/html; charset=utf-8");
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /_pullthrough/status`: the pull budget and health of each upstream.
pub async fn status(mirror: &Housekeeping) -> Response<Body> {
    mirror.refresh_space().await;
    super::json(mirror.status().to_string().into_bytes(), false)
}
