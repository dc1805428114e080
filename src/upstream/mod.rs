//! The upstream registry client: authenticated requests with timeouts, redirects followed
//! without credentials, and upstream answers classified into [`Error`] so that a 404 stays a
//! 404 and a 429 stays a 429.
//!
//! An upstream has one or more URLs (`urls`), tried in order per request: one that refuses
//! (429) or is down passes the request to the next, a 404 is an answer. Each URL keeps its own
//! auth (realm, tokens), health and pull budget. All of an upstream's requests share its caps:
//! `max_concurrent_requests` (a permit held until the response body ends) and
//! `max_requests_per_second` (waited for, never failed). With `[cluster]`, back-offs, budget
//! readings and `max_pulls` are the fleet's (see `fleet`).

pub mod auth;
pub mod credentials;
mod fleet;
pub mod health;
pub mod ratelimit;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::oci::{Digest, Reference, RepoName};

/// Manifests larger than this are refused: the distribution registry's own limit.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// How an upstream request failed. Cloneable so one failure can be handed to every client
/// waiting on the same fetch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("not found upstream: {message}")]
    NotFound { message: String },
    #[error("upstream refused authentication: {message}")]
    Unauthorized { message: String },
    #[error("upstream denied access: {message}")]
    Denied { message: String },
    #[error("upstream rate limit: {message}")]
    TooManyRequests {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("upstream {upstream} answered {status}")]
    Failing { upstream: String, status: u16 },
    #[error("upstream {upstream} unreachable ({why}): {detail}")]
    Unreachable {
        upstream: String,
        why: Failure,
        detail: String,
    },
    #[error("upstream {upstream} timed out waiting for {what}")]
    Timeout {
        upstream: String,
        what: &'static str,
    },
    #[error("upstream {upstream} is backing off after repeated failures")]
    BackingOff { upstream: String },
    #[error("upstream {upstream} protocol error: {detail}")]
    Protocol { upstream: String, detail: String },
    #[error("upstream {upstream} answered unexpected status {status}")]
    Unexpected { upstream: String, status: u16 },
    /// The credential helper failed: the mirror's own configuration or environment, not the
    /// client's. The detail names the helper and how it failed, never its output.
    #[error("credential helper for upstream {upstream} failed: {detail}")]
    Credentials { upstream: String, detail: String },
}

/// Why an upstream could not be reached: what an operator needs first, and a short, safe
/// thing to tell a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The host name did not resolve.
    Resolve,
    /// Nothing listens there (connection refused).
    Refused,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// Another connection failure (reset, unreachable network).
    Connect,
    /// The connection broke during the response.
    Cut,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Failure::Resolve => "name not resolved",
            Failure::Refused => "connection refused",
            Failure::Tls => "TLS failed",
            Failure::Connect => "cannot connect",
            Failure::Cut => "connection cut",
        })
    }
}

impl Error {
    pub(crate) fn from_reqwest(upstream: &str, e: &reqwest::Error) -> Error {
        // reqwest's Display includes the URL, which never carries credentials (config refuses
        // them in URLs), but the source chain is what says why.
        let mut detail = e.to_string();
        let mut why = if e.is_connect() {
            Failure::Connect
        } else {
            Failure::Cut
        };
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    why = Failure::Refused;
                }
            }
            if s.downcast_ref::<rustls::Error>().is_some() {
                why = Failure::Tls;
            }
            source = s.source();
        }
        // hyper-util's resolver error has no type of its own to look for.
        if e.is_connect() && detail.contains("dns error") {
            why = Failure::Resolve;
        }
        if e.is_timeout() {
            Error::Timeout {
                upstream: upstream.to_owned(),
                what: "a response",
            }
        } else {
            Error::Unreachable {
                upstream: upstream.to_owned(),
                why,
                detail,
            }
        }
    }

    /// What a client may be told about the failure, beyond its status: never a URL, a header
    /// or an upstream's body.
    pub fn client_reason(&self) -> String {
        match self {
            Error::Failing { status, .. } | Error::Unexpected { status, .. } => {
                format!("answered {status}")
            }
            Error::Unreachable { why, .. } => why.to_string(),
            Error::Timeout { what, .. } => format!("timed out waiting for {what}"),
            Error::BackingOff { .. } => "backing off after repeated failures".into(),
            Error::Credentials { .. } => "the mirror could not get its credentials".into(),
            other => other.to_string(),
        }
    }

    /// Whether the upstream itself is failing (as opposed to answering "no").
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Error::Failing { .. }
                | Error::Unreachable { .. }
                | Error::Timeout { .. }
                | Error::BackingOff { .. }
        )
    }
}

pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// `Content-Length` as sent. Not `reqwest::Response::content_length`, which is the size of the
/// body received: 0 for any HEAD.
pub(crate) fn header_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The message of the first error in an OCI error body, if the body is one.
fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let msg = v.get("errors")?.get(0)?.get("message")?.as_str()?;
    Some(msg.chars().take(512).collect())
}

/// A blob body from the upstream, starting at the offset asked for whatever the upstream did
/// with the `Range` (a 200 that ignored it has its leading bytes skipped here).
pub struct BlobBody {
    /// The whole blob's length.
    pub size: u64,
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    /// Leading bytes still to drop (a 200 answer to a Range request).
    skip: u64,
    idle_timeout: Duration,
    upstream: String,
    /// The `max_concurrent_requests` permit, held while the body streams (a registry that
    /// throttles counts the connection, not the request headers) and given back when the
    /// body ends or fails, so that a resume does not wait on the request it replaces.
    permit: Option<OwnedSemaphorePermit>,
}

impl BlobBody {
    /// The next chunk; `None` at the end. Fails if the upstream goes quiet for the idle
    /// timeout or the connection breaks.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            let Some(mut chunk) = self.poll_next().await? else {
                return Ok(None);
            };
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() as u64);
                self.skip -= n;
                chunk = chunk.slice(n as usize..);
            }
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
    }

    async fn poll_next(&mut self) -> Result<Option<Bytes>, Error> {
        let next = tokio::time::timeout(self.idle_timeout, self.stream.next()).await;
        let result = match next {
            Err(_) => Err(Error::Timeout {
                upstream: self.upstream.clone(),
                what: "the next body chunk",
            }),
            Ok(None) => Ok(None),
            Ok(Some(Ok(b))) => return Ok(Some(b)),
            Ok(Some(Err(e))) => Err(Error::from_reqwest(&self.upstream, &e)),
        };
        self.permit = None;
        result
    }
}

/// One page of a repository's tags, as the upstream sent it.
pub struct TagsPage {
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    /// The `Link` header (next page), as sent.
    pub link: Option<String>,
}

/// The descriptors of an upstream's referrers answer (`GET /v2/<name>/referrers/<digest>`):
/// the `manifests` of the image index it sent, unfiltered.
#[derive(Debug, Clone, Default)]
pub struct ReferrersIndex {
    pub manifests: Vec<serde_json::Value>,
}

/// A manifest as the upstream answered it.
#[derive(Debug, Clone)]
pub struct ManifestResponse {
    pub media_type: String,
    /// `Docker-Content-Digest`, when the upstream sent a valid one.
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    /// `None` for HEAD.
    pub body: Option<Bytes>,
}

/// One base URL of an upstream, with what is particular to it: its token realm and tokens,
/// its health and back-off, and its pull budget (mirror.gcr.io does not share Docker Hub's).
struct Endpoint {
    /// As configured: shown on the status page and used as the fallback metric's label.
    url: String,
    base: url::Url,
    auth: auth::Auth,
    health: health::Health,
    budget: ratelimit::BudgetState,
}

impl Endpoint {
    fn url(&self, repo: &RepoName, tail: &str) -> url::Url {
        let mut url = self.base.clone();
        let path = format!(
            "{}/v2/{repo}/{tail}",
            self.base.path().trim_end_matches('/')
        );
        url.set_path(&path);
        url
    }
}

/// One configured URL of an upstream as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UrlStatus {
    pub url: String,
    pub state: health::State,
    /// The pull budget this URL last reported.
    pub budget: Option<ratelimit::Budget>,
    /// Whether this URL gave the latest successful answer.
    pub served_last: bool,
}

/// What one upstream request asks, whichever of the upstream's URLs it goes to.
struct Call<'a> {
    /// The request kind, as the metrics label it.
    kind: &'static str,
    method: Method,
    repo: &'a RepoName,
    /// The path after `/v2/<repo>/`.
    tail: &'a str,
    query: Option<&'a str>,
    headers: HeaderMap,
}

/// An upstream's answer, with the request-cap permit it holds until dropped.
struct Sent {
    resp: reqwest::Response,
    endpoint: usize,
    permit: Option<OwnedSemaphorePermit>,
}

pub struct Upstream {
    /// The registry name clients use (`docker.io`).
    pub name: String,
    /// In the order they are tried; never empty.
    endpoints: Vec<Endpoint>,
    /// Which endpoint answered last; `usize::MAX` before any did.
    served_last: AtomicUsize,
    http: reqwest::Client,
    config: UpstreamConfig,
    /// The configured cap on counted pulls, if any.
    pull_cap: Option<DefaultDirectRateLimiter>,
    /// `max_concurrent_requests`, over all of the upstream's URLs.
    concurrency: Option<Arc<Semaphore>>,
    /// `max_requests_per_second`, over all of the upstream's URLs.
    request_rate: Option<DefaultDirectRateLimiter>,
    counted_pulls: AtomicU64,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// When an outage was last logged at warn.
    last_outage_log: Mutex<Option<SystemTime>>,
    /// The replicas this one shares back-offs, budget readings and counted pulls with.
    cluster: Option<Arc<Cluster>>,
    /// When the others' state was last learned (see `fleet`).
    synced_at: Mutex<Option<SystemTime>>,
    /// The latest failures (not 404s), newest last, for the status page.
    recent_errors: Mutex<std::collections::VecDeque<(SystemTime, String)>>,
}

/// How many failures an upstream remembers for the status page.
const RECENT_ERRORS: usize = 20;

/// The least time between two warnings about failures of one upstream.
const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a failure of one URL sends the request on to the next: a refusal (429) or an
/// outage. A 404, 401 or 403 is the registry's answer and is not asked elsewhere.
fn falls_back(e: &Error) -> bool {
    e.is_outage() || matches!(e, Error::TooManyRequests { .. })
}

impl Upstream {
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        clock: Clock,
        cluster: Option<Arc<Cluster>>,
    ) -> anyhow::Result<Upstream> {
        // Redirects are followed by reqwest, which drops Authorization when the host changes:
        // the registry's token must never reach the CDN.
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("pullthrough/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut endpoints = Vec::new();
        for (i, url) in config.base_urls().into_iter().enumerate() {
            let base = url::Url::parse(url.trim_end_matches('/'))?;
            // A fallback URL is often another operator's registry (mirror.gcr.io for Docker
            // Hub): the credentials are the first URL's, and never sent to the others.
            let credentials = if i > 0 {
                credentials::Credentials::Anonymous
            } else if let Some(helper) = &config.credential_helper {
                let host = match base.port() {
                    Some(port) => format!("{}:{port}", base.host_str().unwrap_or_default()),
                    None => base.host_str().unwrap_or_default().to_owned(),
                };
                credentials::Credentials::Helper(credentials::Helper::new(
                    name,
                    helper,
                    host,
                    config.credential_lifetime,
                    clock.clone(),
                ))
            } else {
                match (&config.username, &config.password) {
                    (Some(u), Some(p)) => {
                        credentials::Credentials::Static(credentials::Credential::Password {
                            username: u.clone(),
                            password: p.clone(),
                        })
                    }
                    _ => credentials::Credentials::Anonymous,
                }
            };
            endpoints.push(Endpoint {
                url: url.to_owned(),
                base,
                auth: auth::Auth::new(
                    name.to_owned(),
                    http.clone(),
                    credentials,
                    metrics.clone(),
                    config.first_byte_timeout,
                ),
                health: health::Health::new(
                    url,
                    config.failure_threshold,
                    config.backoff,
                    clock.clone(),
                ),
                budget: ratelimit::BudgetState::default(),
            });
        }
        anyhow::ensure!(!endpoints.is_empty(), "upstream {name} has no URL");
        let pull_cap = NonZeroU32::new(config.max_pulls).and_then(|n| {
            let quota = Quota::with_period(config.max_pulls_window / n.get())?.allow_burst(n);
            Some(governor::RateLimiter::direct(quota))
        });
        let concurrency = usize::try_from(config.max_concurrent_requests)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| Arc::new(Semaphore::new(n)));
        let request_rate = NonZeroU32::new(config.max_requests_per_second)
            .map(|n| governor::RateLimiter::direct(Quota::per_second(n)));
        Ok(Upstream {
            name: name.to_owned(),
            endpoints,
            served_last: AtomicUsize::new(usize::MAX),
            clock,
            last_outage_log: Mutex::new(None),
            cluster,
            synced_at: Mutex::new(None),
            recent_errors: Mutex::new(std::collections::VecDeque::new()),
            pull_cap,
            concurrency,
            request_rate,
            counted_pulls: AtomicU64::new(0),
            http,
            config: config.clone(),
            metrics,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// The latest failures with their causes, oldest first.
    pub fn recent_errors(&self) -> Vec<(SystemTime, String)> {
        crate::sync::lock(&self.recent_errors)
            .iter()
            .cloned()
            .collect()
    }

    /// Up while any of its URLs is; backing off when all are.
    pub fn state(&self) -> health::State {
        if self
            .endpoints
            .iter()
            .any(|e| e.health.state() == health::State::Up)
        {
            health::State::Up
        } else {
            health::State::BackingOff
        }
    }

    /// The URL the next request goes to first: the first one not backing off.
    fn next_endpoint(&self) -> &Endpoint {
        self.endpoints
            .iter()
            .find(|e| e.health.state() == health::State::Up)
            .unwrap_or(&self.endpoints[0])
    }

    /// The pull budget of the URL the next request goes to.
    pub fn budget(&self) -> Option<ratelimit::Budget> {
        self.next_endpoint().budget.latest()
    }

    /// Each configured URL in order, with its health and budget, and which one served last.
    pub fn urls(&self) -> Vec<UrlStatus> {
        let last = self.served_last.load(Ordering::Relaxed);
        self.endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| UrlStatus {
                url: e.url.clone(),
                state: e.health.state(),
                budget: e.budget.latest(),
                served_last: i == last,
            })
            .collect()
    }

    /// A `max_concurrent_requests` permit; `None` without a cap. (The semaphore is never
    /// closed, so acquiring cannot fail.)
    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        match &self.concurrency {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// [`Upstream::send_with`] under a permit of its own.
    async fn send(&self, call: Call<'_>) -> Result<Sent, Error> {
        let permit = self.permit().await;
        self.send_with(permit, call).await
    }

    /// Sends a request to the first URL that answers it, in the configured order: a URL
    /// backing off is skipped, and one that refuses (429) or fails passes the request on.
    /// Error statuses become [`Error`]s. The answer keeps `permit`.
    async fn send_with(
        &self,
        permit: Option<OwnedSemaphorePermit>,
        call: Call<'_>,
    ) -> Result<Sent, Error> {
        self.sync().await;
        let count = self.endpoints.len();
        let mut skipped = None;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let admission = endpoint.health.admit();
            if admission == health::Admission::Refuse {
                skipped.get_or_insert(Error::BackingOff {
                    upstream: self.name.clone(),
                });
                continue;
            }
            let mut url = endpoint.url(call.repo, call.tail);
            url.set_query(call.query);
            let result = self.send_admitted(endpoint, &call, url).await;
            let outage = matches!(&result, Err(e) if e.is_outage());
            if let Err(e) = &result {
                if outage {
                    self.warn_outage(&endpoint.url, e);
                }
                if !matches!(e, Error::NotFound { .. }) {
                    let mut recent = crate::sync::lock(&self.recent_errors);
                    if recent.len() == RECENT_ERRORS {
                        recent.pop_front();
                    }
                    let error = if count > 1 {
                        format!("{}: {e}", endpoint.url)
                    } else {
                        e.to_string()
                    };
                    recent.push_back((self.clock.now(), error));
                }
            }
            if let Some(change) = endpoint.health.record(admission, outage) {
                self.share_health(i, change).await;
            }
            match result {
                Ok(resp) => {
                    if i > 0 {
                        self.metrics.upstream_fallback(&self.name, &endpoint.url);
                    }
                    self.served_last.store(i, Ordering::Relaxed);
                    return Ok(Sent {
                        resp,
                        endpoint: i,
                        permit,
                    });
                }
                Err(e) if falls_back(&e) && i + 1 < count => {
                    tracing::debug!(upstream = %self.name, url = %endpoint.url, error = %e, "trying the next upstream URL");
                    skipped = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(skipped.unwrap_or(Error::BackingOff {
            upstream: self.name.clone(),
        }))
    }

    /// Logs why the upstream failed, at most once per [`OUTAGE_LOG_INTERVAL`]: an outage must
    /// not flood the log, but its cause must be in it.
    fn warn_outage(&self, url: &str, e: &Error) {
        let now = self.clock.now();
        let mut last = crate::sync::lock(&self.last_outage_log);
        if last.is_some_and(|t| now.duration_since(t).is_ok_and(|d| d < OUTAGE_LOG_INTERVAL)) {
            tracing::debug!(upstream = %self.name, %url, error = %e, "upstream request failed");
            return;
        }
        *last = Some(now);
        tracing::warn!(upstream = %self.name, %url, error = %e, "upstream request failed");
    }

    async fn send_admitted(
        &self,
        endpoint: &Endpoint,
        call: &Call<'_>,
        url: url::Url,
    ) -> Result<reqwest::Response, Error> {
        let (kind, method, repo) = (call.kind, &call.method, call.repo);
        let mut answered_challenge = false;
        // One deadline for the token and the response headers: a client waits for both.
        let deadline = tokio::time::Instant::now()
            + if method == Method::HEAD {
                self.config.head_timeout.min(self.config.first_byte_timeout)
            } else {
                self.config.first_byte_timeout
            };
        loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .headers(call.headers.clone());
            let authorization =
                tokio::time::timeout_at(deadline, endpoint.auth.authorization(Some(repo)))
                    .await
                    .map_err(|_| Error::Timeout {
                        upstream: self.name.clone(),
                        what: "a token from its realm",
                    })??;
            if let Some(authorization) = authorization {
                let mut value =
                    HeaderValue::from_str(authorization.expose()).map_err(|_| Error::Protocol {
                        upstream: self.name.clone(),
                        detail: "token is not a valid header value".into(),
                    })?;
                value.set_sensitive(true);
                req = req.header(header::AUTHORIZATION, value);
            }
            let mut deadline = deadline;
            if let Some(rate) = &self.request_rate {
                // The rate cap is waited for, never failed: its wait is not the upstream's.
                let waiting = tokio::time::Instant::now();
                rate.until_ready().await;
                deadline += waiting.elapsed();
            }
            let asked = std::time::Instant::now();
            let sent = tokio::time::timeout_at(deadline, req.send())
                .await
                .map_err(|_| Error::Timeout {
                    upstream: self.name.clone(),
                    what: "response headers",
                })
                .and_then(|r| r.map_err(|e| Error::from_reqwest(&self.name, &e)));
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) => {
                    self.metrics
                        .upstream_request(&self.name, kind, 0, asked.elapsed());
                    return Err(e);
                }
            };
            let status = resp.status();
            self.metrics
                .upstream_request(&self.name, kind, status.as_u16(), asked.elapsed());
            if status == StatusCode::UNAUTHORIZED && !answered_challenge {
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                if endpoint
                    .auth
                    .on_unauthorized(challenge.as_deref(), Some(repo))
                    .await
                {
                    answered_challenge = true;
                    continue;
                }
            }
            return self.classify(resp).await;
        }
    }

    async fn classify(&self, resp: reqwest::Response) -> Result<reqwest::Response, Error> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry = retry_after(resp.headers());
        let body = tokio::time::timeout(Duration::from_secs(5), resp.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let message = error_message(&body);
        let msg = |default: &str| message.clone().unwrap_or_else(|| default.to_owned());
        Err(match status.as_u16() {
            404 => Error::NotFound {
                message: msg("not found upstream"),
            },
            401 => Error::Unauthorized {
                message: msg("upstream requires authentication"),
            },
            403 => Error::Denied {
                message: msg("upstream denied access"),
            },
            429 => Error::TooManyRequests {
                message: msg("upstream rate limit reached"),
                retry_after: retry,
            },
            s if s >= 500 => Error::Failing {
                upstream: self.name.clone(),
                status: s,
            },
            s => Error::Unexpected {
                upstream: self.name.clone(),
                status: s,
            },
        })
    }

    /// `HEAD` or `GET` of a manifest with the given `Accept`.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        head: bool,
        accept: &str,
    ) -> Result<ManifestResponse, Error> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(header::ACCEPT, v);
        }
        let (kind, method) = if head {
            ("manifest_head", Method::HEAD)
        } else {
            self.spend_pull().await?;
            ("manifest_get", Method::GET)
        };
        let result = self
            .send(Call {
                kind,
                method,
                repo,
                tail: &format!("manifests/{reference}"),
                query: None,
                headers,
            })
            .await;
        let sent = match result {
            Ok(sent) => sent,
            Err(e) => {
                if let Error::TooManyRequests {
                    message,
                    retry_after,
                } = e
                {
                    tracing::error!(upstream = %self.name, %repo, %message, "upstream pull rate limit reached (429)");
                    return Err(Error::TooManyRequests {
                        message,
                        retry_after: retry_after.or_else(|| {
                            self.endpoints
                                .iter()
                                .find_map(|e| e.budget.time_for_one_pull())
                        }),
                    });
                }
                return Err(e);
            }
        };
        let resp = sent.resp;
        if let Some(budget) = self.observe_budget(sent.endpoint, resp.headers()) {
            self.share_budget(sent.endpoint, &budget).await;
        }
        if !head {
            self.counted_pulls.fetch_add(1, Ordering::Relaxed);
            self.metrics.counted_pull(&self.name);
        }
        let h = resp.headers();
        let media_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let size = header_length(h);
        let body = if head {
            None
        } else {
            Some(self.read_limited(resp, MAX_MANIFEST_BYTES).await?)
        };
        Ok(ManifestResponse {
            media_type,
            digest,
            size: body.as_ref().map(|b| b.len() as u64).or(size),
            body,
        })
    }

    /// Takes one pull from this replica's own cap, if one is configured.
    fn spend_local_pull(&self) -> Result<(), Error> {
        let Some(cap) = &self.pull_cap else {
            return Ok(());
        };
        cap.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            tracing::warn!(upstream = %self.name, "the mirror's own pull cap (max_pulls) is reached");
            Error::TooManyRequests {
                message: format!("the mirror's pull cap for {} is reached", self.name),
                retry_after: Some(wait.max(Duration::from_secs(1))),
            }
        })
    }

    /// Records the budget a URL reported, and returns it. The upstream's budget gauges follow
    /// its first URL, the one whose budget is normally spent; the status page shows each URL's.
    fn observe_budget(&self, endpoint: usize, headers: &HeaderMap) -> Option<ratelimit::Budget> {
        let url = self.endpoints.get(endpoint)?;
        let (budget, previous) = url.budget.observe(headers, self.clock.now())?;
        if endpoint == 0 {
            self.gauge_budget(&budget);
        }
        let threshold = (budget.limit as f64 * self.config.budget_warn_ratio) as u64;
        let was_above = previous.is_none_or(|p| p.remaining > threshold);
        if budget.remaining <= threshold && was_above {
            tracing::warn!(
                upstream = %self.name,
                url = %url.url,
                remaining = budget.remaining,
                limit = budget.limit,
                window_secs = budget.window_secs,
                source = budget.source.as_deref().unwrap_or(""),
                "upstream pull budget is running low"
            );
        }
        Some(budget)
    }

    /// At or below the reserve: spend no GET that a stale answer can replace.
    pub fn budget_is_low(&self) -> bool {
        self.budget()
            .is_some_and(|b| b.remaining <= self.config.budget_reserve)
    }

    /// Manifest GETs sent since start: the requests that count as pulls.
    pub fn counted_pulls(&self) -> u64 {
        self.counted_pulls.load(Ordering::Relaxed)
    }

    async fn read_limited(&self, resp: reqwest::Response, limit: usize) -> Result<Bytes, Error> {
        let mut stream = resp.bytes_stream();
        let mut buf = BytesMut::new();
        loop {
            let next = tokio::time::timeout(self.config.idle_timeout, stream.next())
                .await
                .map_err(|_| Error::Timeout {
                    upstream: self.name.clone(),
                    what: "the response body",
                })?;
            match next {
                None => return Ok(buf.freeze()),
                Some(Ok(chunk)) => {
                    if buf.len() + chunk.len() > limit {
                        return Err(Error::Protocol {
                            upstream: self.name.clone(),
                            detail: format!("manifest larger than {limit} bytes"),
                        });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Err(Error::from_reqwest(&self.name, &e)),
            }
        }
    }

    /// `GET` of a blob from `offset` on (a `Range` request when `offset > 0`). A fresh
    /// request, so a fresh token and a fresh CDN redirect: also how a cut download resumes.
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobBody, Error> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(header::RANGE, v);
            }
        }
        let path = format!("blobs/{digest}");
        let sent = self
            .send(Call {
                kind: "blob_get",
                method: Method::GET,
                repo,
                tail: &path,
                query: None,
                headers,
            })
            .await?;
        let resp = sent.resp;
        let protocol = |detail: String| Error::Protocol {
            upstream: self.name.clone(),
            detail,
        };
        let (size, skip) = match resp.status().as_u16() {
            206 => {
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let size = crate::ranges::content_range_total(range, offset).ok_or_else(|| {
                    protocol(format!(
                        "Range bytes={offset}- answered with Content-Range {range:?}"
                    ))
                })?;
                (Some(size), 0)
            }
            // No Range sent, or the upstream ignored it: the body starts at 0.
            200 => (header_length(resp.headers()), offset),
            s => return Err(protocol(format!("blob GET answered status {s}"))),
        };
        let (size, permit) = match size {
            Some(size) => (size, sent.permit),
            // A chunked answer (some registries send one): the size from a HEAD, which costs
            // no pull, under the same permit so that a cap of one never waits on itself.
            None => {
                let head = self
                    .send_with(
                        sent.permit,
                        Call {
                            kind: "blob_head",
                            method: Method::HEAD,
                            repo,
                            tail: &path,
                            query: None,
                            headers: HeaderMap::new(),
                        },
                    )
                    .await?;
                let size = header_length(head.resp.headers())
                    .ok_or_else(|| protocol("blob HEAD without Content-Length".into()))?;
                (size, head.permit)
            }
        };
        Ok(BlobBody {
            size,
            stream: resp.bytes_stream().boxed(),
            skip,
            idle_timeout: self.config.idle_timeout,
            upstream: self.name.clone(),
            permit,
        })
    }

    /// `HEAD` of a blob: its size, without downloading it.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, Error> {
        let resp = self
            .send(Call {
                kind: "blob_head",
                method: Method::HEAD,
                repo,
                tail: &format!("blobs/{digest}"),
                query: None,
                headers: HeaderMap::new(),
            })
            .await?
            .resp;
        header_length(resp.headers()).ok_or_else(|| Error::Protocol {
            upstream: self.name.clone(),
            detail: "blob HEAD without Content-Length".into(),
        })
    }

    /// `GET referrers/<subject>` (OCI 1.1), unfiltered: the mirror caches one list per subject
    /// and filters it itself. Not a manifest GET, so not a counted pull. A `404` means the
    /// upstream has no referrers API (one that has it answers `200` for any subject).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<ReferrersIndex, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(crate::oci::media::OCI_INDEX),
        );
        let sent = self
            .send(Call {
                kind: "referrers",
                method: Method::GET,
                repo,
                tail: &format!("referrers/{subject}"),
                query: None,
                headers,
            })
            .await?;
        let body = self.read_limited(sent.resp, MAX_MANIFEST_BYTES).await?;
        let protocol = |detail: &str| Error::Protocol {
            upstream: self.name.clone(),
            detail: detail.to_owned(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| protocol("referrers answer is not JSON"))?;
        let manifests = match v.get("manifests") {
            Some(serde_json::Value::Array(a)) => a.clone(),
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(_) => return Err(protocol("referrers answer has no manifests list")),
        };
        Ok(ReferrersIndex { manifests })
    }

    /// `GET tags/list`, passed through with the client's query (`n`, `last`).
    pub async fn tags(&self, repo: &RepoName, query: Option<&str>) -> Result<TagsPage, Error> {
        let sent = self
            .send(Call {
                kind: "tags",
                method: Method::GET,
                repo,
                tail: "tags/list",
                query,
                headers: HeaderMap::new(),
            })
            .await?;
        let resp = sent.resp;
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let body = self.read_limited(resp, MAX_MANIFEST_BYTES).await?;
        Ok(TagsPage {
            body,
            content_type,
            link,
        })
    }
}
