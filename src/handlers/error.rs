//! The API error: what a client sees. Every lower layer's error is turned into one here, in
//! one place, so the HTTP status and OCI error code of each failure are decided once.
//! Causes (I/O errors, upstream error chains, panics) are logged for the operator, never sent.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::handlers::body::Body;
use crate::oci::ParseError;
use crate::outcome::CacheStatus;
use crate::upstream;

/// OCI distribution error codes, plus the distribution registry's `UNAVAILABLE`/`UNKNOWN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    Toomanyrequests,
    RangeInvalid,
    Unavailable,
    NotFound,
    Unknown,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// A `WWW-Authenticate` challenge to send with a 401.
    pub challenge: Option<String>,
    /// The OCI error's optional `detail`: structured facts a client can act on (the media
    /// type a manifest is available as, the reference that was asked for). Never a cause
    /// from below the pull layer (paths, upstream bodies, I/O errors).
    pub detail: Option<serde_json::Value>,
    /// The `X-Cache` it goes out with: `MISS` when it is the upstream's answer, `HIT` when the
    /// mirror answered alone (a bad request, its own policy, its storage).
    pub cache: CacheStatus,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorItem<'a>; 1],
}

#[derive(Serialize)]
struct ErrorItem<'a> {
    code: Code,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            challenge: None,
            detail: None,
            cache: CacheStatus::Hit,
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(detail);
        self
    }

    /// A manifest reference that fails the tag grammar names a manifest that cannot exist:
    /// `404 MANIFEST_UNKNOWN`, as the distribution-spec conformance suite expects (not
    /// `400 TAG_INVALID`, which the spec reserves for pushes), answered without asking the
    /// upstream.
    pub fn manifest_unknown(reference: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::ManifestUnknown,
            "manifest unknown: the reference is not a valid tag",
        )
        .with_detail(
            serde_json::json!({ "reference": reference.chars().take(256).collect::<String>() }),
        )
    }

    /// A well-formed digest of another algorithm than sha256: content the mirror never holds.
    pub fn unsupported_digest(object: Object) -> ApiError {
        let (code, what) = match object {
            Object::Manifest => (Code::ManifestUnknown, "manifests"),
            _ => (Code::BlobUnknown, "blobs"),
        };
        ApiError::new(
            StatusCode::NOT_FOUND,
            code,
            format!("only sha256 {what} are mirrored"),
        )
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, "unknown path")
    }

    pub fn unsupported() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "this is a pull-through mirror: only pulls are supported",
        )
    }

    /// An HTTP/1.1 request without exactly one `Host` (RFC 9112 §3.2): it cannot be told which
    /// host it is for, and two are a request-smuggling vector.
    pub fn bad_host() -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::Unsupported,
            "an HTTP/1.1 request must carry exactly one Host header",
        )
    }

    pub fn range_not_satisfiable(size: u64) -> ApiError {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            Code::RangeInvalid,
            format!("the range is not satisfiable for a blob of {size} bytes"),
        )
    }

    pub fn too_many_ranges() -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::RangeInvalid,
            format!(
                "more than {} ranges in one request",
                crate::ranges::MAX_RANGES
            ),
        )
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unknown,
            "internal error (see the mirror's log)",
        )
    }

    pub fn into_response(self, head: bool) -> Response<Body> {
        let json = serde_json::to_vec(&ErrorBody {
            errors: [ErrorItem {
                code: self.code,
                message: &self.message,
                detail: self.detail.as_ref(),
            }],
        })
        .unwrap_or_default();
        let mut resp = super::json(json, head);
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        // Errors too: clients check it on a 401 from `/v2/` (and the spec's suite on all).
        h.insert(super::API_VERSION, HeaderValue::from_static("registry/2.0"));
        h.insert(
            super::X_CACHE,
            HeaderValue::from_static(self.cache.x_cache()),
        );
        if let Some(v) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        if let Some(after) = self.retry_after {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        resp
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        let code = match e {
            ParseError::Name(_) => Code::NameInvalid,
            ParseError::Tag(_) => Code::TagInvalid,
            ParseError::Digest(_) => Code::DigestInvalid,
            // Routes answer these 404 before they get here (`unsupported_digest`); the peer
            // endpoint, which never serves one, says what is wrong.
            ParseError::UnsupportedDigest(_) => Code::DigestInvalid,
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string())
    }
}

/// What kind of object a request was for: a 404 from the upstream means `MANIFEST_UNKNOWN`
/// for one and `BLOB_UNKNOWN` for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Manifest,
    Blob,
    Tags,
}

impl ApiError {
    pub fn from_mirror(e: crate::mirror::Error, object: Object) -> ApiError {
        use crate::mirror::Error as M;
        match e {
            M::Upstream(u) => ApiError::from_upstream(&u, object),
            M::DigestMismatch { .. } => {
                tracing::warn!(error = %e, "refused upstream content");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    Code::Unavailable,
                    "upstream content did not match its digest",
                )
            }
            // UNKNOWN, not BLOB_UNKNOWN: the blob exists upstream, and clients read
            // BLOB_UNKNOWN as "no such blob" (a failed pull, not a retry later). No log: the
            // mismatch was logged once, and each retry would repeat it.
            M::MismatchBackoff { digest, retry_in } => {
                let secs = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
                let mut answer = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    Code::Unknown,
                    format!("the upstream's content for {digest} does not match its digest; not fetched again for {secs} s"),
                );
                answer.retry_after = Some(Duration::from_secs(secs));
                answer
            }
            M::Storage { what, ref source } => {
                tracing::error!(what, error = %source, "cache storage error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Unknown,
                    "the mirror's cache storage failed (see the mirror's log)",
                )
            }
            M::NotMirrored(registry) => ApiError::new(
                StatusCode::NOT_FOUND,
                Code::NameUnknown,
                format!("registry {registry} is not mirrored"),
            )
            .with_detail(serde_json::json!({
                "registry": registry.chars().take(256).collect::<String>(),
            })),
            M::Refused { registry, repo } => ApiError::new(
                StatusCode::FORBIDDEN,
                Code::Denied,
                format!("repository {repo} of {registry} is not mirrored here (refused by the mirror's policy)"),
            ),
            M::NotAcceptable { available } => ApiError::new(
                StatusCode::NOT_FOUND,
                Code::ManifestUnknown,
                format!("manifest unknown: available only as {available}, which the request's Accept does not allow"),
            )
            .with_detail(serde_json::json!({ "mediaType": available })),
            M::NotInRepository { kind } => {
                let (code, what) = match kind {
                    crate::outcome::ObjectKind::Manifest => (Code::ManifestUnknown, "manifest"),
                    crate::outcome::ObjectKind::Blob => (Code::BlobUnknown, "blob"),
                };
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    code,
                    format!("{what} unknown to this repository"),
                )
            }
            M::NotPermitted { refusal } => match refusal {
                crate::mirror::Refusal::Unauthorized => ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    Code::Unauthorized,
                    "authentication required: the upstream does not let these credentials read this repository",
                ),
                crate::mirror::Refusal::Denied => ApiError::new(
                    StatusCode::FORBIDDEN,
                    Code::Denied,
                    "the upstream denies these credentials this repository",
                ),
            },
            M::PeerUnauthorized => ApiError::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthorized,
                "replica-to-replica requests need the cluster secret",
            ),
            M::PeerMissing => ApiError::new(
                StatusCode::NOT_FOUND,
                Code::BlobUnknown,
                "this replica neither holds nor downloads the blob",
            ),
            M::Abandoned(why) => {
                tracing::error!(why, "a shared upstream request was abandoned");
                ApiError::internal()
            }
        }
    }

    pub fn from_upstream(e: &upstream::Error, object: Object) -> ApiError {
        let mut answer = Self::upstream_answer(e, object);
        answer.cache = CacheStatus::Miss;
        answer
    }

    fn upstream_answer(e: &upstream::Error, object: Object) -> ApiError {
        use upstream::Error as U;
        match e {
            U::NotFound { message } => {
                let code = match object {
                    Object::Manifest => Code::ManifestUnknown,
                    Object::Blob => Code::BlobUnknown,
                    Object::Tags => Code::NameUnknown,
                };
                ApiError::new(StatusCode::NOT_FOUND, code, message.clone())
            }
            U::Unauthorized { message } => ApiError::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthorized,
                message.clone(),
            ),
            U::Denied { message } => {
                ApiError::new(StatusCode::FORBIDDEN, Code::Denied, message.clone())
            }
            U::TooManyRequests {
                message,
                retry_after,
            } => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: Code::Toomanyrequests,
                message: message.clone(),
                retry_after: *retry_after,
                challenge: None,
                detail: None,
                cache: CacheStatus::Miss,
            },
            // Failing like an unreachable upstream, and answered alike, so the status does not
            // change once the back-off starts.
            U::Failing { upstream, status } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                format!("upstream {upstream} is unavailable: answered {status}"),
            ),
            U::Unreachable { upstream, .. }
            | U::Timeout { upstream, .. }
            | U::BackingOff { upstream } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                format!("upstream {upstream} is unavailable: {}", e.client_reason()),
            ),
            U::Protocol { upstream, .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                format!("upstream {upstream} sent an invalid response"),
            ),
            // The mirror's own credentials failed: not the client's to fix, so no 401 (which
            // makes clients retry with their own credentials).
            U::Credentials { upstream, .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unauthorized,
                format!("upstream {upstream}: {}", e.client_reason()),
            ),
            U::Unexpected { upstream, status } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unknown,
                format!("upstream {upstream} answered {status}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_body_is_oci_json() {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::Toomanyrequests,
            "slow down",
        );
        e.retry_after = Some(Duration::from_secs(60));
        let resp = e.into_response(false);
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "60");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
        assert_eq!(v["errors"][0]["message"], "slow down");
    }
}
