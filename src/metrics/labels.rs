//! Label sets, all bounded: route kinds, outcomes, status classes, a fixed set of status codes
//! and configured upstream names; never repository names or digests.

use prometheus_client::encoding::EncodeLabelSet;

use crate::outcome::{CacheStatus, ObjectKind, Prefetched, Source, Tier};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub(super) kind: &'static str,
    pub(super) method: &'static str,
    pub(super) status: &'static str,
    pub(super) code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DurationLabels {
    pub(super) kind: &'static str,
    /// `hit`, `miss`, … or `none` for answers without a cache status.
    pub(super) cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CacheLabels {
    pub(super) kind: ObjectKind,
    pub(super) outcome: CacheStatus,
    pub(super) upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UpstreamKindLabels {
    pub(super) kind: &'static str,
    pub(super) upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct VersionLabels {
    pub(super) version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TierLabels {
    pub(super) source: Tier,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PrefetchLabels {
    pub(super) outcome: Prefetched,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SourceLabels {
    pub(super) source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UpstreamRequestLabels {
    pub(super) kind: &'static str,
    pub(super) status: &'static str,
    pub(super) upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UpstreamLabels {
    pub(super) upstream: String,
}

/// An upstream and one of its configured URLs: bounded by the configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UpstreamUrlLabels {
    pub(super) upstream: String,
    pub(super) url: String,
}

/// `0` stands for "no response" (refused, timed out, cut).
pub(super) fn status_class(status: u16) -> &'static str {
    match status {
        0 => "error",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The status codes an operator tells apart; the rest are `other`.
pub(super) fn status_code(status: u16) -> &'static str {
    match status {
        200 => "200",
        206 => "206",
        304 => "304",
        307 => "307",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        416 => "416",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        _ => "other",
    }
}

/// Why a client's request was refused before it reached a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not in `server.allow`.
    Address,
    /// Missing or wrong credentials (`server.htpasswd`, `server.tokens`).
    Credentials,
    /// Over `server.client_requests`.
    RateLimit,
    /// `server.response_buffer_budget` spent: an HTTP/2 stream reset with REFUSED_STREAM.
    ResponseBuffer,
}

impl Refusal {
    pub(super) fn label(self) -> &'static str {
        match self {
            Refusal::Address => "address",
            Refusal::Credentials => "credentials",
            Refusal::RateLimit => "rate_limit",
            Refusal::ResponseBuffer => "response_buffer",
        }
    }
}

/// A bounded label: a client choosing methods must not grow the series without end.
pub(super) fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_a_bounded_set() {
        assert_eq!(status_code(429), "429");
        assert_eq!(status_code(418), "other");
        assert_eq!(status_code(0), "other");
    }
}
