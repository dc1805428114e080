//! One request: admission (access control, the per-client limit), dispatch with panics caught,
//! and the metrics and access line once the response body ends.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use tracing::Instrument;

use super::activity::{Activity, InFlight};
use super::budget::ResponseBudget;
use super::request_id;
use super::{App, Role};
use crate::handlers::body::{self, Body};
use crate::handlers::error::ApiError;
use crate::handlers::Query;
use crate::logging::{self, AccessLine};
use crate::mirror::Housekeeping;
use crate::oci::RepoName;
use crate::outcome::CacheStatus;
use crate::routes::{self, Route};
use crate::sendfile::Sendfile;

/// Access control, then the per-client limit. Health checks are always answered, so that
/// orchestrators need no credentials; replica-to-replica requests are authenticated by the
/// cluster secret instead (in the pull layer), since replicas are not clients. The operator's
/// routes (metrics, status, the admin API) are admitted as clients are, without the limit.
/// Whose credentials the request carried, when the mirror asks for some.
async fn admit(
    app: &App,
    route: &Route,
    role: Role,
    req: &Request<Incoming>,
    client: IpAddr,
) -> Result<Option<Arc<str>>, ApiError> {
    if matches!(
        route,
        Route::Healthz | Route::Readyz | Route::PeerBlob { .. }
    ) || role == Role::Metrics
    {
        return Ok(None);
    }
    use crate::metrics::Refusal;
    let refused = |why| {
        let metrics = app.metrics.clone();
        move |e| {
            metrics.client_refused(why);
            e
        }
    };
    app.access
        .check_address(client)
        .map_err(refused(Refusal::Address))?;
    // With clients' own upstream credentials the Authorization header is theirs, so the
    // mirror has no credentials of its own to ask of an operator: its admin API answers only
    // this host (an operator's shell, `kubectl exec`).
    if matches!(route, Route::Purge | Route::Refresh | Route::Pins)
        && app.mirror.clients().is_some()
        && !client.is_loopback()
        && !client_is_mapped_loopback(client)
    {
        return Err(refused(Refusal::Address)(ApiError::new(
            http::StatusCode::FORBIDDEN,
            crate::handlers::error::Code::Denied,
            "the admin API answers only this host while an upstream takes clients' credentials",
        )));
    }
    // Boxed: a password check's state would otherwise sit in every request's future.
    let whose = Box::pin(app.access.check_credentials(req.headers()))
        .await
        .map_err(refused(Refusal::Credentials))?;
    if matches!(
        route,
        Route::Metrics | Route::Status | Route::Ui | Route::Purge | Route::Refresh
    ) {
        return Ok(whose);
    }
    let Some(limit) = &app.client_limit else {
        return Ok(whose);
    };
    limit.check(client).map(|()| whose).map_err(|wait| {
        let mut e = ApiError::new(
            http::StatusCode::TOO_MANY_REQUESTS,
            crate::handlers::error::Code::Toomanyrequests,
            "too many requests from this address; slow down",
        );
        e.retry_after = Some(wait.max(std::time::Duration::from_secs(1)));
        app.metrics.client_refused(Refusal::RateLimit);
        e
    })
}

/// `::ffff:127.0.0.1`: a loopback client on a dual-stack socket.
fn client_is_mapped_loopback(client: IpAddr) -> bool {
    matches!(client, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

/// What a request knows of its connection.
pub(super) struct ConnInfo {
    pub(super) peer: SocketAddr,
    pub(super) role: Role,
    /// How file bodies go out on this connection (see `sendfile`).
    pub(super) files: Option<Sendfile>,
    /// Held until the response body is dropped, for the connection's watchdog.
    pub(super) in_flight: InFlight,
    /// HTTP/2: the process's response buffer budget, and the connection charged with it.
    pub(super) budget: Option<(Arc<ResponseBudget>, Arc<Activity>)>,
    /// HTTP/1.x: the connection whose watchdog enforces `server.write_timeout`.
    pub(super) writes: Option<Arc<Activity>>,
}

/// One request: route, dispatch (panics become 500s), then metrics and a log line when the
/// response body ends, with the bytes actually sent. An HTTP/2 stream that comes while the
/// response buffer budget is spent is refused: the error resets it with its reason.
pub(super) async fn handle(
    app: Arc<App>,
    mut req: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, h2::Error> {
    let ConnInfo {
        peer,
        role,
        files,
        in_flight,
        budget,
        writes,
    } = conn;
    let started = Instant::now();
    let route = match (role, routes::parse(req.method(), req.uri().path())) {
        (Role::Metrics, r @ (Route::Metrics | Route::Healthz)) => r,
        (Role::Metrics, _) => Route::NotFound,
        // /metrics lives on its own listener when one is configured.
        (Role::Main, Route::Metrics) if app.metrics_elsewhere => Route::NotFound,
        (Role::Main, r) => r,
    };
    let route = if routes::host_is_valid(req.version(), req.headers()) {
        route
    } else {
        Route::BadHost
    };
    let method = req.method().clone();
    let head = method == http::Method::HEAD;
    let client = app.trusted_proxies.client(peer.ip(), req.headers());
    let request_id = request_id::for_request(req.headers());
    // Kept as sent (a shared slice of the request's buffer), made text for the log line.
    let user_agent = req.headers().get(http::header::USER_AGENT).cloned();
    // The query and the target are worked out once, here, and handed down with the request.
    let query = Query::parse(req.uri().query());
    let target = routes::target(&app.mirror, &route, &query);
    // The log names the registry a request went to and the repository as that registry
    // knows it (`/v2/ghcr/org/app` is ghcr.io's `org/app`); with no registry resolved, `-`
    // and the name as asked for.
    let resolved = target.as_ref().and_then(|t| t.as_ref().ok());
    let registry = resolved.map(|t| t.registry().to_owned());
    let repository = resolved
        .map(|t| t.repo().clone())
        .or_else(|| route.repository().cloned());
    let span = crate::trace::request(
        req.headers(),
        &method,
        route.kind(),
        registry.as_deref().unwrap_or("-"),
        repository.as_ref().map_or("-", RepoName::as_str),
        route.reference().unwrap_or(""),
    );
    let mut waited = Duration::ZERO;
    // A new HTTP/2 stream once the response buffer budget is spent: refused at once, rather
    // than left to wait holding its request (health checks and metrics are always answered).
    let budget = match budget {
        Some((b, conn)) if !matches!(route, Route::Healthz | Route::Readyz | Route::Metrics) => {
            let Some(stream) = b.admit_stream(&conn) else {
                // Reset with REFUSED_STREAM, which clients retry (on another connection):
                // unlike a 503, it leaves no response queued toward a client that may not
                // read it.
                app.metrics
                    .client_refused(crate::metrics::Refusal::ResponseBuffer);
                return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
            };
            Some((b, conn, stream))
        }
        _ => None,
    };
    let dispatched = match admit(&app, &route, role, &req, client).await {
        Err(e) => Ok(Err(e)),
        Ok(whose) => {
            if matches!(route, Route::Purge | Route::Refresh) {
                // Who asked, for the purge's log line.
                req.extensions_mut()
                    .insert(crate::handlers::purge::Requester {
                        client,
                        credential: whose.map(|w| w.to_string()),
                    });
            }
            let asked = Instant::now();
            let answer = std::panic::AssertUnwindSafe(
                routes::dispatch(&app.mirror, &route, &req, &query, target, files)
                    .instrument(span.clone()),
            )
            .catch_unwind()
            .await;
            // What the pull layer took to answer is time spent on the upstream, unless the
            // answer came from the cache alone.
            if route.repository().is_some() {
                waited = asked.elapsed();
            }
            answer
        }
    };
    let mut resp = match dispatched {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => e.into_response(head),
        Err(_) => {
            tracing::error!(%method, path = req.uri().path(), "handler panicked");
            ApiError::internal().into_response(head)
        }
    };
    let status = resp.status().as_u16();
    let cache_status = resp.extensions().get::<CacheStatus>().copied();
    if cache_status == Some(CacheStatus::Hit) {
        waited = Duration::ZERO;
    }
    let cache = cache_status.map_or("-", |s| s.as_str());
    if let Ok(mut v) = http::HeaderValue::from_str(&request_id) {
        // Never indexed by HTTP/2's HPACK: a value unique to each response would only push the
        // connection's repeated headers (digest, ETag, type) out of its compression table.
        v.set_sensitive(true);
        resp.headers_mut().insert(request_id::HEADER, v);
    }
    // hyper stops polling a body once Content-Length bytes are out, so "complete" is judged
    // against the declared length rather than by seeing the end of the stream.
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let metrics = app.metrics.clone();
    let chores = Housekeeping::of(&app.mirror);
    let writes = writes.map(|a| a as Arc<dyn body::WriteWatch>);
    let resp = resp.map(move |b| {
        body::observe_writes(b, writes, move |bytes, ended| {
            let complete = ended || head || declared.is_some_and(|len| bytes >= len);
            let elapsed = started.elapsed();
            let kind = route.kind();
            span.record("cache", cache);
            span.record("bytes", bytes);
            span.record("http.response.status_code", status);
            metrics.request(kind, method.as_str(), status, cache_status, elapsed);
            logging::access(&AccessLine {
                peer,
                client,
                request_id: &request_id,
                method: method.as_str(),
                registry: registry.as_deref().unwrap_or("-"),
                repository: repository.as_ref().map_or("-", RepoName::as_str),
                reference: route.reference().unwrap_or("-"),
                kind,
                status,
                bytes,
                complete,
                cache,
                elapsed,
                upstream: waited,
                user_agent: &logging::user_agent(user_agent.as_ref()),
            });
            if let Some(repo) = &repository {
                chores.record_request(registry.as_deref().unwrap_or("-"), repo.as_str(), bytes);
            }
            drop(in_flight);
        })
    });
    Ok(match budget {
        Some((budget, conn, stream)) => {
            resp.map(|b| http_body_util::BodyExt::boxed_unsync(budget.wrap(b, conn, stream)))
        }
        None => resp,
    })
}
