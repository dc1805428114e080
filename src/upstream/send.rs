//! Sending one request: to the first of an upstream's URLs that answers it (a URL backing off
//! is skipped, one that refuses or fails passes the request on), with the URL's auth, under the
//! upstream's caps (`max_concurrent_requests`, `max_requests_per_second`) and one deadline for
//! the token and the response headers; and reading a bounded answer.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::{health, Endpoint, Error, Upstream};
use crate::identity::Caller;
use crate::oci::RepoName;

/// What one upstream request asks, whichever of the upstream's URLs it goes to.
pub(super) struct Call<'a> {
    /// The request kind, as the metrics label it.
    pub(super) kind: &'static str,
    pub(super) method: Method,
    pub(super) repo: &'a RepoName,
    /// On whose behalf: whose credentials (and tokens) it carries.
    pub(super) caller: &'a Caller,
    /// The path after `/v2/<repo>/`.
    pub(super) tail: &'a str,
    pub(super) query: Option<&'a str>,
    pub(super) headers: HeaderMap,
    /// A deadline for the token and the response headers earlier than the upstream's own
    /// (`first_byte_timeout`): a download's budget for getting its bytes going.
    pub(super) by: Option<tokio::time::Instant>,
}

/// An upstream's answer, with the request-cap permit it holds until dropped.
pub(super) struct Sent {
    pub(super) resp: reqwest::Response,
    pub(super) endpoint: usize,
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

/// The least time between two warnings about failures of one upstream.
const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a failure of one URL sends the request on to the next: a refusal (429) or an
/// outage. A 404, 401 or 403 is the registry's answer and is not asked elsewhere.
fn falls_back(e: &Error) -> bool {
    e.is_outage() || matches!(e, Error::TooManyRequests { .. })
}

/// `Content-Length` as sent. Not `reqwest::Response::content_length`, which is the size of the
/// body received: 0 for any HEAD.
pub(crate) fn header_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Upstream {
    /// The URL the next request goes to first: the first one not backing off.
    pub(super) fn next_endpoint(&self) -> &Endpoint {
        self.endpoints
            .iter()
            .find(|e| e.health.state() == health::State::Up)
            .unwrap_or(&self.endpoints[0])
    }

    /// How many `max_concurrent_requests` slots are free now; `None` without a cap. For work
    /// that must leave room for clients (prefetch), not for taking one.
    pub fn free_request_slots(&self) -> Option<usize> {
        self.concurrency.as_ref().map(|s| s.available_permits())
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
    pub(super) async fn send(&self, call: Call<'_>) -> Result<Sent, Error> {
        let permit = self.permit().await;
        self.send_with(permit, call).await
    }

    /// Sends a request to the first URL that answers it, in the configured order: a URL
    /// backing off is skipped, and one that refuses (429) or fails passes the request on.
    /// Error statuses become [`Error`]s. The answer keeps `permit`.
    pub(super) async fn send_with(
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
            let span = crate::trace::span!(
                "upstream.request",
                otel.kind = "client",
                upstream = %self.name,
                kind = call.kind,
                http.request.method = %call.method,
                url.index = i,
                fallback = i > 0,
                http.response.status_code = tracing::field::Empty,
                challenge_retry = tracing::field::Empty,
                error = tracing::field::Empty,
            );
            let result = self
                .send_admitted(endpoint, &call, url)
                .instrument(span.clone())
                .await;
            match &result {
                Ok(resp) => span.record("http.response.status_code", resp.status().as_u16()),
                Err(e) => span.record("error", tracing::field::display(e)),
            };
            let outage = matches!(&result, Err(e) if e.is_outage());
            if let Err(e) = &result {
                if outage {
                    self.warn_outage(&endpoint.url, e);
                }
                if !matches!(e, Error::NotFound { .. }) {
                    self.record_error(&endpoint.url, e);
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
        let (kind, method, repo, caller) = (call.kind, &call.method, call.repo, call.caller);
        let mut answered_challenge = false;
        // One deadline for the token and the response headers: a client waits for both.
        let own = tokio::time::Instant::now()
            + if method == Method::HEAD {
                self.config.head_timeout.min(self.config.first_byte_timeout)
            } else {
                self.config.first_byte_timeout
            };
        let deadline = call.by.map_or(own, |by| by.min(own));
        loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .headers(call.headers.clone());
            let authorization =
                tokio::time::timeout_at(deadline, endpoint.auth.authorization(Some(repo), caller))
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
                    .on_unauthorized(challenge.as_deref(), Some(repo), caller)
                    .await
                {
                    answered_challenge = true;
                    if crate::trace::on() {
                        tracing::Span::current().record("challenge_retry", true);
                    }
                    continue;
                }
            }
            return self.classify(resp).await;
        }
    }

    pub(super) async fn read_limited(
        &self,
        resp: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, Error> {
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
}
