//! Prometheus metrics. Labels are bounded: route kinds, outcomes, status classes, a fixed set
//! of status codes and configured upstream names; never repository names or digests.
//!
//! Exposed as OpenMetrics to scrapers that ask for it, else in the Prometheus text format
//! (`text/plain; version=0.0.4`), which `promtool check metrics` reads: see [`Format`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::outcome::{CacheStatus, ObjectKind, Source, Tier};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    method: &'static str,
    status: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    kind: &'static str,
    /// `hit`, `miss`, … or `none` for answers without a cache status.
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: ObjectKind,
    outcome: CacheStatus,
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamKindLabels {
    kind: &'static str,
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    source: Tier,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamRequestLabels {
    kind: &'static str,
    status: &'static str,
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

/// An upstream and one of its configured URLs: bounded by the configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamUrlLabels {
    upstream: String,
    url: String,
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

/// The status codes an operator tells apart; the rest are `other`.
fn status_code(status: u16) -> &'static str {
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
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Address => "address",
            Refusal::Credentials => "credentials",
            Refusal::RateLimit => "rate_limit",
        }
    }
}

/// How `/metrics` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text,
}

impl Format {
    /// OpenMetrics when the scraper's `Accept` asks for it (with a non-zero q), else text.
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Format {
        let wants_openmetrics = accept.into_iter().flat_map(|v| v.split(',')).any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
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

/// Counters since start, sampled for the status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Cache answers, and those that cost the upstream no download.
    pub lookups: u64,
    pub hits: u64,
    /// Body bytes sent to clients from the cache and from upstreams.
    pub bytes_cache: u64,
    pub bytes_upstream: u64,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<DurationLabels, Histogram>,
    cache: Family<CacheLabels, Counter>,
    served_bytes: Family<SourceLabels, Counter>,
    upstream_bytes: Family<UpstreamLabels, Counter>,
    upstream_requests: Family<UpstreamRequestLabels, Counter>,
    upstream_duration: Family<UpstreamKindLabels, Histogram>,
    client_refusals: Family<ReasonLabels, Counter>,
    policy_refusals: Family<UpstreamLabels, Counter>,
    build_info: Family<VersionLabels, Gauge>,
    process_open_fds: Gauge,
    process_max_fds: Gauge,
    process_resident_memory: Gauge,
    process_start_time: Gauge,
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
    upstream_fallbacks: Family<UpstreamUrlLabels, Counter>,
    pub inflight_downloads: Gauge,
    pub inflight_waiters: Gauge,
    miss_ttfb: Histogram,
    blob_source: Family<TierLabels, Counter>,
    /// The four series of `blob_source`, resolved once: a local hit is counted without
    /// hashing labels on the hot path.
    blob_source_by_tier: [Counter; 4],
    pub leases_held: Gauge,
    leases_taken_over: Counter,
    coordinator_up: Gauge,
    coordinator_errors: Counter,
    pub cluster_members: Gauge,
    shared_evictions: Counter,
    shared_errors: Counter,
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
        let mut m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            }),
            cache: Family::default(),
            served_bytes: Family::default(),
            upstream_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 12))
            }),
            client_refusals: Family::default(),
            policy_refusals: Family::default(),
            build_info: Family::default(),
            process_open_fds: Gauge::default(),
            process_max_fds: Gauge::default(),
            process_resident_memory: Gauge::default(),
            process_start_time: Gauge::default(),
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
            upstream_fallbacks: Family::default(),
            inflight_downloads: Gauge::default(),
            inflight_waiters: Gauge::default(),
            miss_ttfb: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            blob_source: Family::default(),
            blob_source_by_tier: Default::default(),
            leases_held: Gauge::default(),
            leases_taken_over: Counter::default(),
            coordinator_up: Gauge::default(),
            coordinator_errors: Counter::default(),
            cluster_members: Gauge::default(),
            shared_evictions: Counter::default(),
            shared_errors: Counter::default(),
            served_without_upstream: AtomicU64::new(0),
            cache_answers: AtomicU64::new(0),
        };
        m.blob_source_by_tier = [Tier::Local, Tier::Shared, Tier::Peer, Tier::Upstream]
            .map(|source| m.blob_source.get_or_create(&TierLabels { source }).clone());
        m.build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        m.process_start_time
            .set(i64::try_from(crate::clock::unix_secs(process_start())).unwrap_or(0));
        {
            let mut root = crate::sync::lock(&m.registry);
            root.register(
                "process_open_fds",
                "Open file descriptors",
                m.process_open_fds.clone(),
            );
            root.register(
                "process_max_fds",
                "The soft limit on open file descriptors",
                m.process_max_fds.clone(),
            );
            root.register(
                "process_resident_memory_bytes",
                "Resident memory",
                m.process_resident_memory.clone(),
            );
            root.register(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch",
                m.process_start_time.clone(),
            );
            let r = root.sub_registry_with_prefix("pullthrough");
            r.register(
                "build_info",
                "Always 1, labelled with the version",
                m.build_info.clone(),
            );
            r.register(
                "requests",
                "Requests by route kind, method, status class and code (200, 206, 304, 307, 400, \
                 401, 403, 404, 416, 429, 500, 502, 503, other)",
                m.requests.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Time from request to the end of the response body, by route kind and cache status",
                m.request_duration.clone(),
            );
            r.register(
                "cache",
                "Cache outcomes by object kind (hit, miss, revalidated, stale, coalesced, passthrough) and upstream",
                m.cache.clone(),
            );
            r.register(
                "client_refusals",
                "Requests refused before a handler: address (server.allow), credentials, rate_limit (server.client_requests)",
                m.client_refusals.clone(),
            );
            r.register(
                "policy_refusals",
                "Requests refused 403 DENIED by an upstream's allow_repositories / deny_repositories, by upstream",
                m.policy_refusals.clone(),
            );
            r.register(
                "upstream_request_duration_seconds",
                "Time to an upstream's response headers, by upstream and request kind (manifest, token, …)",
                m.upstream_duration.clone(),
            );
            r.register(
                "served_bytes",
                "Body bytes sent to clients by source",
                m.served_bytes.clone(),
            );
            r.register(
                "upstream_bytes",
                "Blob bytes fetched from upstreams, by upstream",
                m.upstream_bytes.clone(),
            );
            r.register(
                "upstream_requests",
                "Upstream requests by kind, status class and upstream",
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
                "upstream_fallbacks",
                "Upstream requests answered by a fallback URL, by upstream and URL",
                m.upstream_fallbacks.clone(),
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
            r.register(
                "blob_source",
                "Blob answers by the tier the bytes came from: local disk, the shared object store, another replica (peer) or the upstream",
                m.blob_source.clone(),
            );
            r.register(
                "cluster_leases_held",
                "Downloads this replica holds the cluster-wide lease for",
                m.leases_held.clone(),
            );
            r.register(
                "cluster_leases_taken_over",
                "Downloads this replica took over after their lease holder stopped renewing",
                m.leases_taken_over.clone(),
            );
            r.register(
                "cluster_coordinator_up",
                "1 while Redis answers, 0 while each replica coordinates alone",
                m.coordinator_up.clone(),
            );
            r.register(
                "cluster_coordinator_errors",
                "Redis requests that failed or timed out",
                m.coordinator_errors.clone(),
            );
            r.register(
                "cluster_members",
                "Replicas with a recent heartbeat in Redis, this one included",
                m.cluster_members.clone(),
            );
            r.register(
                "shared_evictions",
                "Objects deleted from the shared tier to stay within storage.shared.max_size",
                m.shared_evictions.clone(),
            );
            r.register(
                "shared_errors",
                "Shared-tier (object store) requests that failed",
                m.shared_errors.clone(),
            );
        }
        m
    }

    pub fn request(
        &self,
        kind: &'static str,
        method: &str,
        status: u16,
        cache: Option<CacheStatus>,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                kind,
                method: method_label(method),
                status: status_class(status),
                code: status_code(status),
            })
            .inc();
        self.request_duration
            .get_or_create(&DurationLabels {
                kind,
                cache: cache.map_or("none", CacheStatus::label),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn client_refused(&self, why: Refusal) {
        self.client_refusals
            .get_or_create(&ReasonLabels {
                reason: why.label(),
            })
            .inc();
    }

    /// A request for a repository the upstream's policy does not mirror.
    pub fn policy_refusal(&self, upstream: &str) {
        self.policy_refusals
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    pub fn cache(&self, upstream: &str, kind: ObjectKind, outcome: CacheStatus) {
        self.cache
            .get_or_create(&CacheLabels {
                kind,
                outcome,
                upstream: upstream.to_owned(),
            })
            .inc();
        self.cache_answers.fetch_add(1, Ordering::Relaxed);
        if !outcome.downloaded() {
            self.served_without_upstream.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Running totals for the status page's history.
    pub fn totals(&self) -> Totals {
        let served = |source| {
            self.served_bytes
                .get_or_create(&SourceLabels { source })
                .get()
        };
        Totals {
            lookups: self.cache_answers.load(Ordering::Relaxed),
            hits: self.served_without_upstream.load(Ordering::Relaxed),
            bytes_cache: served(Source::Cache),
            bytes_upstream: served(Source::Upstream),
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

    pub fn upstream_bytes(&self, upstream: &str, bytes: u64) {
        self.upstream_bytes
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
        self.upstream_requests
            .get_or_create(&UpstreamRequestLabels {
                kind,
                status: status_class(status),
                upstream: upstream.to_owned(),
            })
            .inc();
        self.upstream_duration
            .get_or_create(&UpstreamKindLabels {
                kind,
                upstream: upstream.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
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

    /// A request answered by a fallback `url` after the upstream's URLs before it refused,
    /// failed or were backing off.
    pub fn upstream_fallback(&self, upstream: &str, url: &str) {
        self.upstream_fallbacks
            .get_or_create(&UpstreamUrlLabels {
                upstream: upstream.to_owned(),
                url: url.to_owned(),
            })
            .inc();
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

    pub fn blob_source(&self, tier: Tier) {
        self.blob_source_by_tier[tier_index(tier)].inc();
    }

    pub fn lease_taken_over(&self) {
        self.leases_taken_over.inc();
    }

    /// Downloads taken over since start, for the status page.
    pub fn leases_taken_over(&self) -> u64 {
        self.leases_taken_over.get()
    }

    pub fn coordinator(&self, up: bool) {
        self.coordinator_up.set(i64::from(up));
        if !up {
            self.coordinator_errors.inc();
        }
    }

    pub fn shared_eviction(&self, objects: u64) {
        self.shared_evictions.inc_by(objects);
    }

    pub fn shared_error(&self) {
        self.shared_errors.inc();
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

    /// Reads the process gauges from /proc (Linux; elsewhere they stay 0).
    fn update_process(&self) {
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.process_open_fds.set(fds.count() as i64);
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(kb) = proc_field(&status, "VmRSS:") {
                self.process_resident_memory.set(kb.saturating_mul(1024));
            }
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            if let Some(soft) = proc_field(&limits, "Max open files") {
                self.process_max_fds.set(soft);
            }
        }
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Format) -> String {
        self.update_process();
        let mut out = String::new();
        let r = crate::sync::lock(&self.registry);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        match format {
            Format::OpenMetrics => out,
            Format::Text => openmetrics_to_text(&out),
        }
    }
}

/// The first number after `key` on the line that starts with it.
fn proc_field(text: &str, key: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// When this process started, near enough: when its metrics were first made.
fn process_start() -> std::time::SystemTime {
    static START: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::SystemTime::now)
}

/// OpenMetrics as prometheus-client writes it, in the Prometheus text format 0.0.4: a counter
/// family is named with its `_total` there, and `# UNIT` and `# EOF` do not exist.
fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Written once the TYPE line says whether the name changes.
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = match kind {
                "counter" if !name.ends_with("_total") => format!("{name}_total"),
                _ => name.to_owned(),
            };
            if let Some(h) = help.take() {
                let text = h["# HELP ".len()..].split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The position of `tier` in `Metrics::blob_source_by_tier`.
fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Local => 0,
        Tier::Shared => 1,
        Tier::Peer => 2,
        Tier::Upstream => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counter_families_with_total_and_has_no_eof() {
        let m = Metrics::new();
        m.request("blob", "GET", 404, None, Duration::from_millis(3));
        let text = m.encode(Format::Text);
        assert!(
            text.contains("# TYPE pullthrough_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP pullthrough_requests_total Requests"),
            "{text}"
        );
        assert!(text.contains(
            "pullthrough_requests_total{kind=\"blob\",method=\"GET\",status=\"4xx\",code=\"404\"} 1\n"
        ));
        assert!(text.contains("# TYPE pullthrough_request_duration_seconds histogram\n"));
        assert!(text.contains("pullthrough_build_info{version=\""), "{text}");
        assert!(text.contains("\nprocess_start_time_seconds "), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        let om = m.encode(Format::OpenMetrics);
        assert!(om.contains("# TYPE pullthrough_requests counter\n"));
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn openmetrics_only_for_scrapers_that_ask_for_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate([prometheus]), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(["text/plain;version=0.0.4"]),
            Format::Text
        );
        assert_eq!(Format::negotiate([]), Format::Text);
        assert_eq!(
            Format::negotiate(["application/openmetrics-text;q=0, text/plain"]),
            Format::Text
        );
    }

    #[test]
    fn status_codes_are_a_bounded_set() {
        assert_eq!(status_code(429), "429");
        assert_eq!(status_code(418), "other");
        assert_eq!(status_code(0), "other");
    }
}
