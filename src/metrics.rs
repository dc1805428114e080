//! Prometheus metrics. Labels are bounded: route kinds, outcomes, status classes and
//! configured upstream names; never repository names or digests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::outcome::{CacheStatus, ObjectKind, Source};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    method: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: ObjectKind,
    outcome: CacheStatus,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamRequestLabels {
    kind: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// `0` stands for "no response" (refused, timed out, cut).
fn status_class(status: u16) -> &'static str {
    match status {
        0 => "error",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A bounded label: a client choosing methods must not grow the series without end.
fn method_label(method: &str) -> &'static str {
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

/// A pull budget reading, as the budget gauges show it.
#[derive(Debug, Clone, Copy)]
pub struct BudgetSample {
    pub limit: u64,
    pub remaining: u64,
    pub window_secs: u64,
    pub updated: std::time::SystemTime,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<KindLabels, Histogram>,
    cache: Family<CacheLabels, Counter>,
    served_bytes: Family<SourceLabels, Counter>,
    upstream_bytes: Counter,
    upstream_requests: Family<UpstreamRequestLabels, Counter>,
    counted_pulls: Family<UpstreamLabels, Counter>,
    resumes: Counter,
    digest_mismatches: Counter,
    no_space: Counter,
    evictions: Counter,
    connections_refused: Counter,
    pub cache_size_bytes: Gauge,
    pub cache_entries: Gauge,
    pub cache_max_bytes: Gauge,
    budget_limit: Family<UpstreamLabels, Gauge>,
    budget_remaining: Family<UpstreamLabels, Gauge>,
    budget_window: Family<UpstreamLabels, Gauge>,
    budget_updated: Family<UpstreamLabels, Gauge>,
    upstream_up: Family<UpstreamLabels, Gauge>,
    pub inflight_downloads: Gauge,
    pub inflight_waiters: Gauge,
    miss_ttfb: Histogram,
    /// Answers that cost the upstream no download (all but miss and passthrough) and all
    /// cache answers, for the status page's hit ratio.
    served_without_upstream: AtomicU64,
    cache_answers: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let duration_family = || {
            Family::<KindLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            })
        };
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("pullthrough")),
            requests: Family::default(),
            request_duration: duration_family(),
            cache: Family::default(),
            served_bytes: Family::default(),
            upstream_bytes: Counter::default(),
            upstream_requests: Family::default(),
            counted_pulls: Family::default(),
            resumes: Counter::default(),
            digest_mismatches: Counter::default(),
            no_space: Counter::default(),
            evictions: Counter::default(),
            connections_refused: Counter::default(),
            cache_size_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            budget_limit: Family::default(),
            budget_remaining: Family::default(),
            budget_window: Family::default(),
            budget_updated: Family::default(),
            upstream_up: Family::default(),
            inflight_downloads: Gauge::default(),
            inflight_waiters: Gauge::default(),
            miss_ttfb: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            served_without_upstream: AtomicU64::new(0),
            cache_answers: AtomicU64::new(0),
        };
        {
            let mut r = crate::sync::lock(&m.registry);
            r.register(
                "requests",
                "Requests by route kind, method and status class",
                m.requests.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Time from request to the end of the response body",
                m.request_duration.clone(),
            );
            r.register(
                "cache",
                "Cache outcomes by object kind (hit, miss, revalidated, stale, coalesced, passthrough)",
                m.cache.clone(),
            );
            r.register(
                "served_bytes",
                "Body bytes sent to clients by source",
                m.served_bytes.clone(),
            );
            r.register(
                "upstream_bytes",
                "Blob bytes fetched from upstreams",
                m.upstream_bytes.clone(),
            );
            r.register(
                "upstream_requests",
                "Upstream requests by kind and status class",
                m.upstream_requests.clone(),
            );
            r.register(
                "upstream_pulls",
                "Upstream manifest GETs: the requests that count against Docker Hub's pull limit",
                m.counted_pulls.clone(),
            );
            r.register(
                "upstream_resumes",
                "Blob downloads resumed with a Range request",
                m.resumes.clone(),
            );
            r.register(
                "digest_mismatches",
                "Upstream content rejected because it did not match its digest",
                m.digest_mismatches.clone(),
            );
            r.register(
                "storage_full",
                "Blob downloads not cached for lack of disk space (ENOSPC or too little free)",
                m.no_space.clone(),
            );
            r.register(
                "cache_evictions",
                "Files evicted to stay within storage.max_size",
                m.evictions.clone(),
            );
            r.register(
                "connections_refused",
                "Connections closed at accept: the client address had server.max_connections_per_client open",
                m.connections_refused.clone(),
            );
            r.register(
                "cache_size_bytes",
                "Bytes of cached blobs and manifests",
                m.cache_size_bytes.clone(),
            );
            r.register(
                "cache_entries",
                "Cached blobs and manifests",
                m.cache_entries.clone(),
            );
            r.register(
                "cache_max_bytes",
                "storage.max_size (0 when unbounded)",
                m.cache_max_bytes.clone(),
            );
            r.register(
                "pull_budget_limit",
                "Upstream pull limit (ratelimit-limit)",
                m.budget_limit.clone(),
            );
            r.register(
                "pull_budget_remaining",
                "Upstream pulls remaining (ratelimit-remaining)",
                m.budget_remaining.clone(),
            );
            r.register(
                "pull_budget_window_seconds",
                "Upstream pull limit window",
                m.budget_window.clone(),
            );
            r.register(
                "pull_budget_updated_timestamp_seconds",
                "When the pull budget was last read",
                m.budget_updated.clone(),
            );
            r.register(
                "upstream_up",
                "1 while the upstream is used, 0 while it is backed off after failures",
                m.upstream_up.clone(),
            );
            r.register(
                "inflight_downloads",
                "Blob downloads in progress",
                m.inflight_downloads.clone(),
            );
            r.register(
                "inflight_waiters",
                "Clients receiving a blob that is still downloading",
                m.inflight_waiters.clone(),
            );
            r.register(
                "miss_first_byte_seconds",
                "Time to the upstream's response headers on blob misses",
                m.miss_ttfb.clone(),
            );
        }
        m
    }

    pub fn request(&self, kind: &'static str, method: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                kind,
                method: method_label(method),
                status: status_class(status),
            })
            .inc();
        self.request_duration
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
    }

    pub fn cache(&self, kind: ObjectKind, outcome: CacheStatus) {
        self.cache
            .get_or_create(&CacheLabels { kind, outcome })
            .inc();
        self.cache_answers.fetch_add(1, Ordering::Relaxed);
        if !outcome.downloaded() {
            self.served_without_upstream.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Share of cache answers that needed no upstream download; `None` before any.
    pub fn hit_ratio(&self) -> Option<f64> {
        let total = self.cache_answers.load(Ordering::Relaxed);
        let hits = self.served_without_upstream.load(Ordering::Relaxed);
        (total > 0).then(|| hits as f64 / total as f64)
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.served_bytes
            .get_or_create(&SourceLabels { source })
            .inc_by(bytes);
    }

    pub fn upstream_bytes(&self, bytes: u64) {
        self.upstream_bytes.inc_by(bytes);
    }

    pub fn upstream_request(&self, kind: &'static str, status: u16) {
        self.upstream_requests
            .get_or_create(&UpstreamRequestLabels {
                kind,
                status: status_class(status),
            })
            .inc();
    }

    pub fn counted_pull(&self, upstream: &str) {
        self.counted_pulls
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    pub fn resume(&self) {
        self.resumes.inc();
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub fn no_space(&self) {
        self.no_space.inc();
    }

    pub fn upstream_up(&self, upstream: &str, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Brings the cache gauges and the eviction counter up to date (at scrape time).
    pub fn cache_state(&self, bytes: u64, entries: u64, max: Option<u64>, evictions: u64) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.cache_size_bytes.set(clamp(bytes));
        self.cache_entries.set(clamp(entries));
        self.cache_max_bytes.set(clamp(max.unwrap_or(0)));
        let seen = self.evictions.get();
        if evictions > seen {
            self.evictions.inc_by(evictions - seen);
        }
    }

    pub fn digest_mismatch(&self) {
        self.digest_mismatches.inc();
    }

    pub fn miss_first_byte(&self, elapsed: Duration) {
        self.miss_ttfb.observe(elapsed.as_secs_f64());
    }

    /// The pull budget an upstream last reported.
    pub fn budget(&self, upstream: &str, b: BudgetSample) {
        let l = UpstreamLabels {
            upstream: upstream.to_owned(),
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.budget_limit.get_or_create(&l).set(clamp(b.limit));
        self.budget_remaining
            .get_or_create(&l)
            .set(clamp(b.remaining));
        self.budget_window
            .get_or_create(&l)
            .set(clamp(b.window_secs));
        self.budget_updated
            .get_or_create(&l)
            .set(clamp(crate::clock::unix_secs(b.updated)));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = crate::sync::lock(&self.registry);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}
