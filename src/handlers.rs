//! HTTP handlers: one function per route, turning requests into [`Mirror`] calls and results
//! into registry responses. The request path reads top to bottom: [`handle`] routes,
//! [`dispatch`] matches the route, each handler answers.

use std::fs::File;
use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};

use crate::body::{self, Body};
use crate::download::Start;
use crate::error::{ApiError, Object};
use crate::mirror::{self, CacheStatus, Mirror};
use crate::oci::{media, Accept, Digest, Reference, RepoName};
use crate::routes::Route;
use crate::sendfile::Sendfile;
use crate::upstream::Upstream;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

pub async fn dispatch<B>(
    mirror: &Arc<Mirror>,
    route: &Route,
    req: &Request<B>,
) -> Result<Response<Body>, ApiError> {
    let head = req.method() == http::Method::HEAD;
    match route {
        Route::Base => Ok(base()),
        Route::Manifest {
            name,
            reference,
            head,
        } => {
            let (up, repo) = select_upstream(mirror, req, name)?;
            manifest(mirror, &up, &repo, reference, *head, req.headers()).await
        }
        Route::Blob { name, digest, head } => {
            let (up, repo) = select_upstream(mirror, req, name)?;
            let sendfile = req.extensions().get::<Sendfile>().cloned();
            blob(mirror, &up, &repo, digest, *head, req.headers(), sendfile).await
        }
        Route::TagsList { name } => {
            let (up, repo) = select_upstream(mirror, req, name)?;
            tags_list(&up, &repo, req.uri().query(), head).await
        }
        Route::Healthz => Ok(text(StatusCode::OK, "ok\n")),
        Route::Readyz => readyz(mirror).await,
        Route::Metrics => Ok(metrics(mirror)),
        Route::Status => Ok(status(mirror)),
        Route::Unsupported => Err(ApiError::unsupported()),
        Route::Invalid(e) => Err(e.clone().into()),
        Route::NotFound => Err(ApiError::not_found()),
    }
}

fn select_upstream<B>(
    mirror: &Mirror,
    req: &Request<B>,
    name: &RepoName,
) -> Result<(Arc<Upstream>, RepoName), ApiError> {
    let ns = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    mirror.upstream_for(ns.as_deref(), name).ok_or_else(|| {
        ApiError::registry_not_mirrored(
            ns.as_deref()
                .unwrap_or(&mirror.config.server.default_registry),
        )
    })
}

fn base() -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from_static(b"{}")));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(2));
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from_static(s.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn readyz(mirror: &Mirror) -> Result<Response<Body>, ApiError> {
    match mirror.store.blobs.create_temp().await {
        Ok(_) => Ok(text(StatusCode::OK, "ready\n")),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check: storage is not writable");
            Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage not writable\n",
            ))
        }
    }
}

fn metrics(mirror: &Mirror) -> Response<Body> {
    let store = &mirror.store;
    mirror
        .metrics
        .cache_state(&store.index.stats(), store.index.max(), store.evictions());
    for up in mirror.upstreams() {
        let is_up = up.health.state() == crate::upstream::health::State::Up;
        mirror.metrics.upstream_up(&up.name, is_up);
    }
    let mut resp = Response::new(body::full(Bytes::from(mirror.metrics.encode())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// `GET /_pullthrough/status`: the pull budget and health of each upstream.
fn status(mirror: &Mirror) -> Response<Body> {
    let upstreams: Vec<_> = mirror
        .upstreams()
        .map(|u| {
            let budget = u.budget.latest();
            serde_json::json!({
                "name": u.name,
                "state": u.health.state(),
                "limit": budget.as_ref().map(|b| b.limit),
                "remaining": budget.as_ref().map(|b| b.remaining),
                "window_secs": budget.as_ref().map(|b| b.window_secs),
                "source": budget.as_ref().and_then(|b| b.source.clone()),
                "updated": budget.as_ref().map(|b| humantime::format_rfc3339_seconds(b.updated).to_string()),
                "counted_pulls": u.counted_pulls(),
            })
        })
        .collect();
    let json = serde_json::json!({
        "upstreams": upstreams,
        "cache_hit_ratio": mirror.metrics.hit_ratio(),
        "inflight_downloads": mirror.downloads.in_flight(),
    });
    let mut resp = Response::new(body::full(Bytes::from(json.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn with_cache_status(mut resp: Response<Body>, status: CacheStatus) -> Response<Body> {
    resp.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(status.as_str()));
    resp
}

fn manifest_response(
    media_type: &str,
    digest: &Digest,
    bytes: Option<Bytes>,
    size: u64,
) -> Response<Body> {
    let mut resp = Response::new(match bytes {
        Some(b) => body::full(b),
        None => body::empty(),
    });
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    resp
}

async fn manifest(
    mirror: &Arc<Mirror>,
    up: &Arc<Upstream>,
    repo: &RepoName,
    reference: &Reference,
    head: bool,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let accept = Accept::parse(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let err = |e| ApiError::from_mirror(e, Object::Manifest);
    let (digest, tag_status) = match reference {
        Reference::Digest(d) if !d.is_sha256() => {
            return passthrough_manifest(mirror, up, repo, reference, head, &accept).await;
        }
        Reference::Digest(d) => (d.clone(), None),
        Reference::Tag(tag) => {
            let (record, status) = match mirror.resolve_tag(up, repo, tag, !head).await {
                Err(mirror::Error::NotCacheable(_)) => {
                    return passthrough_manifest(mirror, up, repo, reference, head, &accept).await
                }
                r => r.map_err(err)?,
            };
            if !accept.allows(&record.media_type) {
                return passthrough_manifest(mirror, up, repo, reference, head, &accept).await;
            }
            if head {
                mirror.metrics.cache("manifest", status.label());
                let resp = manifest_response(&record.media_type, &record.digest, None, record.size);
                return Ok(with_cache_status(resp, status));
            }
            (record.digest, Some(status))
        }
    };
    if head && tag_status.is_none() {
        // HEAD by digest: answer from the store, or from an upstream HEAD without spending a pull.
        if let Some(m) = mirror
            .store
            .manifests
            .get(&digest)
            .await
            .map_err(|e| err(e.into()))?
        {
            if accept.allows(&m.media_type) {
                mirror.metrics.cache("manifest", "hit");
                let resp = manifest_response(&m.media_type, &m.digest, None, m.bytes.len() as u64);
                return Ok(with_cache_status(resp, CacheStatus::Hit));
            }
        }
        return passthrough_manifest(mirror, up, repo, reference, head, &accept).await;
    }
    let (m, fetch_status) = match mirror.manifest(up, repo, &digest).await {
        Err(mirror::Error::NotCacheable(_)) => {
            return passthrough_manifest(mirror, up, repo, reference, head, &accept).await
        }
        r => r.map_err(err)?,
    };
    if !accept.allows(&m.media_type) {
        return passthrough_manifest(mirror, up, repo, reference, head, &accept).await;
    }
    // A tag's status says whether the tag was known; a fetch of its bytes makes it a miss.
    let status = match (tag_status, fetch_status) {
        (Some(s), CacheStatus::Hit) => s,
        (Some(CacheStatus::Stale), _) => CacheStatus::Stale,
        (_, s) => s,
    };
    mirror.metrics.cache("manifest", status.label());
    let size = m.bytes.len() as u64;
    let resp = manifest_response(
        &m.media_type,
        &m.digest,
        (!head).then(|| m.bytes.clone()),
        size,
    );
    Ok(with_cache_status(resp, status))
}

/// Asks the upstream with the client's own `Accept` and relays the answer uncached: for clients
/// that do not accept the stored type, and for manifests the mirror does not cache.
async fn passthrough_manifest(
    mirror: &Mirror,
    up: &Upstream,
    repo: &RepoName,
    reference: &Reference,
    head: bool,
    accept: &Accept,
) -> Result<Response<Body>, ApiError> {
    let accept_value = accept
        .header_value()
        .unwrap_or_else(|| media::ACCEPT_ALL.to_owned());
    let m = up
        .manifest(repo, &reference.to_string(), head, &accept_value)
        .await
        .map_err(|e| ApiError::from_upstream(&e, Object::Manifest))?;
    mirror.metrics.cache("manifest", "miss");
    let (digest, size) = match &m.body {
        Some(b) => (Digest::sha256_of(b), b.len() as u64),
        None => match (m.digest.clone(), m.size) {
            (Some(d), Some(s)) => (d, s),
            _ => {
                return Err(ApiError::from_upstream(
                    &crate::upstream::Error::Protocol {
                        upstream: up.name.clone(),
                        detail: "manifest HEAD without digest or length".into(),
                    },
                    Object::Manifest,
                ))
            }
        },
    };
    if let (Some(claimed), true) = (&m.digest, m.body.is_some()) {
        if claimed.is_sha256() && *claimed != digest {
            mirror.metrics.digest_mismatch();
            return Err(ApiError::from_upstream(
                &crate::upstream::Error::DigestMismatch {
                    expected: claimed.to_string(),
                    actual: digest.to_string(),
                },
                Object::Manifest,
            ));
        }
    }
    let resp = manifest_response(&m.media_type, &digest, m.body, size);
    Ok(with_cache_status(resp, CacheStatus::Miss))
}

async fn blob(
    mirror: &Arc<Mirror>,
    up: &Arc<Upstream>,
    repo: &RepoName,
    digest: &Digest,
    head: bool,
    headers: &HeaderMap,
    sendfile: Option<Sendfile>,
) -> Result<Response<Body>, ApiError> {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let err = |e: std::io::Error| {
        tracing::error!(error = %e, %digest, "cannot read blob store");
        ApiError::internal()
    };
    if !digest.is_sha256() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            crate::error::Code::BlobUnknown,
            "only sha256 blobs are mirrored",
        ));
    }
    // One retry: a download that finds the blob already committed sends us back to the store.
    for _ in 0..2 {
        if let Some(hit) = mirror.store.blobs.open(digest).await.map_err(err)? {
            mirror.metrics.cache("blob", "hit");
            let source = BlobSource {
                file: hit.file,
                size: hit.size,
                progress: None,
                verified: hit.verified,
                label: "cache",
            };
            let resp = blob_response(mirror, digest, source, range, head, sendfile);
            return Ok(with_cache_status(resp, CacheStatus::Hit));
        }
        if head {
            return blob_head_miss(mirror, up, repo, digest).await;
        }
        let (download, joined) = mirror.downloads.join(up.clone(), repo, digest);
        match download.started().await {
            Start::Streaming { size } => {
                let Some((file, progress)) = download.reader() else {
                    return Err(ApiError::internal());
                };
                let status = if joined {
                    CacheStatus::Coalesced
                } else {
                    CacheStatus::Miss
                };
                mirror.metrics.cache("blob", status.label());
                mirror.metrics.inflight_waiters.inc();
                let waiter = WaiterGuard(mirror.clone());
                let source = BlobSource {
                    file,
                    size,
                    progress: Some(progress),
                    // The download verifies the whole file before it ends.
                    verified: true,
                    label: "upstream",
                };
                let resp = blob_response(mirror, digest, source, range, head, sendfile)
                    .map(|b| body::with_guard(b, waiter));
                return Ok(with_cache_status(resp, status));
            }
            Start::AlreadyCached => continue,
            Start::NoSpace => return blob_uncached(mirror, up, repo, digest).await,
            Start::Failed(e) => return Err(ApiError::from_upstream(&e, Object::Blob)),
            Start::Pending => return Err(ApiError::internal()),
        }
    }
    Err(ApiError::internal())
}

/// Streams a blob straight from the upstream without caching it (the disk is full), still
/// verifying it so a wrong byte is never passed on as complete.
async fn blob_uncached(
    mirror: &Arc<Mirror>,
    up: &Upstream,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Response<Body>, ApiError> {
    let resp = up
        .blob(repo, digest, 0)
        .await
        .map_err(|e| ApiError::from_upstream(&e, Object::Blob))?;
    let Some(size) = crate::upstream::header_length(resp.headers()) else {
        return Err(ApiError::from_upstream(
            &crate::upstream::Error::Protocol {
                upstream: up.name.clone(),
                detail: "blob response without Content-Length".into(),
            },
            Object::Blob,
        ));
    };
    mirror.metrics.cache("blob", "miss");
    let metrics = mirror.metrics.clone();
    let stream = futures_util::TryStreamExt::map_err(resp.bytes_stream(), std::io::Error::other);
    let bytes = futures_util::TryStreamExt::inspect_ok(stream, move |b| {
        metrics.upstream_bytes(b.len() as u64)
    });
    let checked = body::verify(body::from_stream(bytes), digest.clone(), size);
    let mut out = Response::new(body::count_served(
        checked,
        mirror.metrics.clone(),
        "upstream",
    ));
    blob_headers(out.headers_mut(), digest, size);
    Ok(with_cache_status(out, CacheStatus::Miss))
}

struct WaiterGuard(Arc<Mirror>);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0.metrics.inflight_waiters.dec();
    }
}

/// HEAD of an uncached blob: the size from a download in progress, else from an upstream HEAD.
async fn blob_head_miss(
    mirror: &Mirror,
    up: &Upstream,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Response<Body>, ApiError> {
    let in_flight = match mirror.downloads.get(digest) {
        Some(d) => match d.started().await {
            Start::Streaming { size } => Some(size),
            _ => None,
        },
        None => None,
    };
    let size = match in_flight {
        Some(size) => size,
        None => up
            .blob_size(repo, digest)
            .await
            .map_err(|e| ApiError::from_upstream(&e, Object::Blob))?,
    };
    mirror.metrics.cache("blob", "miss");
    let mut resp = Response::new(body::empty());
    blob_headers(resp.headers_mut(), digest, size);
    Ok(with_cache_status(resp, CacheStatus::Miss))
}

fn blob_headers(h: &mut HeaderMap, digest: &Digest, len: u64) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
}

/// The one byte range a `Range` header asks for. Malformed or multi-range headers are ignored
/// (the whole blob is sent, as RFC 9110 allows); `Err` means unsatisfiable.
fn requested_range(range: Option<&str>, size: u64) -> Result<Option<RangeInclusive<u64>>, ()> {
    let Some(range) = range else { return Ok(None) };
    let Ok(parsed) = http_range_header::parse_range_header(range) else {
        return Ok(None);
    };
    match parsed.validate(size) {
        Ok(ranges) if ranges.len() == 1 => Ok(ranges.into_iter().next()),
        Ok(_) => Ok(None),
        Err(_) => Err(()),
    }
}

/// Where a blob response's bytes come from.
struct BlobSource {
    file: Arc<File>,
    size: u64,
    /// The writer's progress, for a blob still downloading.
    progress: Option<tokio::sync::watch::Receiver<body::Progress>>,
    /// False for a file found on disk at start-up and not yet hashed by this process.
    verified: bool,
    /// Metrics label: `cache` or `upstream`.
    label: &'static str,
}

fn blob_response(
    mirror: &Arc<Mirror>,
    digest: &Digest,
    src: BlobSource,
    range: Option<&str>,
    head: bool,
    sendfile: Option<Sendfile>,
) -> Response<Body> {
    let size = src.size;
    let mut resp = Response::new(body::empty());
    let (start, end) = match requested_range(range, size) {
        Err(()) => {
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
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
    if head {
        return resp;
    }
    let progress = if src.verified {
        src.progress
    } else {
        // Found on disk at start-up: hashed once in the background; the response's last
        // chunk waits for the verdict.
        Some(mirror.verifications.join(digest, src.file.clone(), size))
    };
    let b = body::file_range(src.file, start, end, progress, sendfile);
    *resp.body_mut() = body::count_served(b, mirror.metrics.clone(), src.label);
    resp
}

async fn tags_list(
    up: &Upstream,
    repo: &RepoName,
    query: Option<&str>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    // Only the paging parameters go upstream; `ns` is ours.
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .filter(|(k, _)| k == "n" || k == "last"),
        )
        .finish();
    let resp = up
        .tags(repo, (!query.is_empty()).then_some(query.as_str()))
        .await
        .map_err(|e| ApiError::from_upstream(&e, Object::Tags))?;
    let link = resp
        .headers()
        .get(header::LINK)
        .and_then(|v| v.to_str().ok())
        .map(relative_link);
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = resp.bytes().await.map_err(|e| {
        ApiError::from_upstream(
            &crate::upstream::Error::from_reqwest(&up.name, &e),
            Object::Tags,
        )
    })?;
    let len = bytes.len();
    let mut out = Response::new(if head {
        body::empty()
    } else {
        body::full(bytes)
    });
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/json")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(Ok(v)) = link.map(|l| HeaderValue::from_str(&l)) {
        h.insert(header::LINK, v);
    }
    Ok(out)
}

/// `<https://upstream/v2/x/tags/list?n=1&last=a>; rel="next"` → `</v2/x/tags/list?…>; rel="next"`,
/// so the client's next page comes through the mirror too.
fn relative_link(link: &str) -> String {
    let Some((target, rest)) = link
        .trim()
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
    else {
        return link.to_owned();
    };
    let target = match url::Url::parse(target) {
        Ok(u) => match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        },
        Err(_) => target.to_owned(),
    };
    format!("<{target}>{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(requested_range(None, 10), Ok(None));
        assert_eq!(requested_range(Some("bytes=2-4"), 10), Ok(Some(2..=4)));
        assert_eq!(requested_range(Some("bytes=5-"), 10), Ok(Some(5..=9)));
        assert_eq!(requested_range(Some("bytes=-3"), 10), Ok(Some(7..=9)));
        assert_eq!(requested_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(requested_range(Some("garbage"), 10), Ok(None));
    }

    #[test]
    fn links_become_relative() {
        assert_eq!(
            relative_link("<https://r.example/v2/a/tags/list?n=2&last=b>; rel=\"next\""),
            "</v2/a/tags/list?n=2&last=b>; rel=\"next\""
        );
        assert_eq!(
            relative_link("</v2/a/tags/list?n=2>; rel=\"next\""),
            "</v2/a/tags/list?n=2>; rel=\"next\""
        );
    }
}
