//! Why an upstream request failed: [`Error`] with its [`Failure`] cause, what a client may be
//! told of it, and an upstream's answer classified into one, so that a 404 stays a 404 and a
//! 429 stays a 429.

use std::time::Duration;

use http::{header, HeaderMap};

use super::Upstream;

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

    /// Whether the same request is worth sending again shortly: an outage may be over at
    /// once, unless the mirror itself is backing off from this upstream.
    pub fn is_retryable(&self) -> bool {
        self.is_outage() && !matches!(self, Error::BackingOff { .. })
    }

    /// Whether cached content is worth serving stale after this failure: an outage or a
    /// refusal (429) says nothing about the content, unlike a 404, 401 or 403.
    pub fn allows_stale(&self) -> bool {
        self.is_outage() || matches!(self, Error::TooManyRequests { .. })
    }
}

pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The message of the first error in an OCI error body, if the body is one.
fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let msg = v.get("errors")?.get(0)?.get("message")?.as_str()?;
    Some(msg.chars().take(512).collect())
}

impl Upstream {
    /// A success as it is; an error status as the [`Error`] it means.
    pub(super) async fn classify(
        &self,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, Error> {
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
}
