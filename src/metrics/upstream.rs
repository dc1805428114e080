//! Upstreams: requests, their durations and bytes, counted pulls and the pull budget, health and
//! fallbacks to other URLs.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::labels::{
    status_class, UpstreamKindLabels, UpstreamLabels, UpstreamRequestLabels, UpstreamUrlLabels,
};
use super::Metrics;

pub(super) struct UpstreamMetrics {
    bytes: Family<UpstreamLabels, Counter>,
    requests: Family<UpstreamRequestLabels, Counter>,
    duration: Family<UpstreamKindLabels, Histogram>,
    counted_pulls: Family<UpstreamLabels, Counter>,
    budget_limit: Family<UpstreamLabels, Gauge>,
    budget_remaining: Family<UpstreamLabels, Gauge>,
    budget_window: Family<UpstreamLabels, Gauge>,
    budget_updated: Family<UpstreamLabels, Gauge>,
    up: Family<UpstreamLabels, Gauge>,
    fallbacks: Family<UpstreamUrlLabels, Counter>,
}

impl UpstreamMetrics {
    pub(super) fn new() -> UpstreamMetrics {
        UpstreamMetrics {
            bytes: Family::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 12))
            }),
            counted_pulls: Family::default(),
            budget_limit: Family::default(),
            budget_remaining: Family::default(),
            budget_window: Family::default(),
            budget_updated: Family::default(),
            up: Family::default(),
            fallbacks: Family::default(),
        }
    }
}

impl Metrics {
    pub(super) fn register_upstream(&self, r: &mut Registry) {
        r.register(
            "upstream_request_duration_seconds",
            "Time to an upstream's response headers, by upstream and request kind (manifest, token, …)",
            self.upstream.duration.clone(),
        );
        r.register(
            "upstream_bytes",
            "Blob bytes fetched from upstreams, by upstream",
            self.upstream.bytes.clone(),
        );
        r.register(
            "upstream_requests",
            "Upstream requests by kind, status class and upstream",
            self.upstream.requests.clone(),
        );
        r.register(
            "upstream_pulls",
            "Upstream manifest GETs: the requests that count against Docker Hub's pull limit",
            self.upstream.counted_pulls.clone(),
        );
        r.register(
            "pull_budget_limit",
            "Upstream pull limit (ratelimit-limit)",
            self.upstream.budget_limit.clone(),
        );
        r.register(
            "pull_budget_remaining",
            "Upstream pulls remaining (ratelimit-remaining)",
            self.upstream.budget_remaining.clone(),
        );
        r.register(
            "pull_budget_window_seconds",
            "Upstream pull limit window",
            self.upstream.budget_window.clone(),
        );
        r.register(
            "pull_budget_updated_timestamp_seconds",
            "When the pull budget was last read",
            self.upstream.budget_updated.clone(),
        );
        r.register(
            "upstream_up",
            "1 while the upstream is used, 0 while it is backed off after failures",
            self.upstream.up.clone(),
        );
        r.register(
            "upstream_fallbacks",
            "Upstream requests answered by a fallback URL, by upstream and URL",
            self.upstream.fallbacks.clone(),
        );
    }

    pub fn upstream_bytes(&self, upstream: &str, bytes: u64) {
        self.upstream
            .bytes
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc_by(bytes);
    }

    /// One upstream request of `kind`, answered `status` (0: no answer) after `elapsed`.
    pub fn upstream_request(
        &self,
        upstream: &str,
        kind: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.upstream
            .requests
            .get_or_create(&UpstreamRequestLabels {
                kind,
                status: status_class(status),
                upstream: upstream.to_owned(),
            })
            .inc();
        self.upstream
            .duration
            .get_or_create(&UpstreamKindLabels {
                kind,
                upstream: upstream.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn counted_pull(&self, upstream: &str) {
        self.upstream
            .counted_pulls
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    /// A request answered by a fallback `url` after the upstream's URLs before it refused,
    /// failed or were backing off.
    pub fn upstream_fallback(&self, upstream: &str, url: &str) {
        self.upstream
            .fallbacks
            .get_or_create(&UpstreamUrlLabels {
                upstream: upstream.to_owned(),
                url: url.to_owned(),
            })
            .inc();
    }

    pub fn upstream_up(&self, upstream: &str, up: bool) {
        self.upstream
            .up
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(up));
    }

    /// The pull budget an upstream last reported: `limit` pulls per `window_secs`, `remaining`
    /// of them when read at `updated`. Plain numbers, so that this layer needs no upstream type
    /// (the reading is `upstream::ratelimit::Budget`).
    pub fn budget(
        &self,
        upstream: &str,
        limit: u64,
        remaining: u64,
        window_secs: u64,
        updated: std::time::SystemTime,
    ) {
        let l = UpstreamLabels {
            upstream: upstream.to_owned(),
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.upstream
            .budget_limit
            .get_or_create(&l)
            .set(clamp(limit));
        self.upstream
            .budget_remaining
            .get_or_create(&l)
            .set(clamp(remaining));
        self.upstream
            .budget_window
            .get_or_create(&l)
            .set(clamp(window_secs));
        self.upstream
            .budget_updated
            .get_or_create(&l)
            .set(clamp(crate::clock::unix_secs(updated)));
    }
}
