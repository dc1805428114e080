//! The cache: outcomes by object kind, bytes served by source, the tier a blob came from, the
//! cache's size and evictions, and the totals the status page samples.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::labels::{CacheLabels, SourceLabels, TierLabels};
use super::memo::{self, Memo};
use super::Metrics;
use crate::outcome::{CacheStatus, ObjectKind, Source, Tier};

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

thread_local! {
    static OUTCOMES: RefCell<Memo<CacheLabels, Counter>> = const { RefCell::new(Memo::new()) };
}

pub(super) struct CacheMetrics {
    outcomes: Family<CacheLabels, Counter>,
    served_bytes: Family<SourceLabels, Counter>,
    evictions: Counter,
    blob_source: Family<TierLabels, Counter>,
    /// The four series of `blob_source`, resolved once: a local hit is counted without
    /// hashing labels on the hot path.
    blob_source_by_tier: [Counter; 4],
    /// Answers that cost the upstream no download (all but miss and passthrough) and all
    /// cache answers, for the status page's hit ratio.
    served_without_upstream: AtomicU64,
    cache_answers: AtomicU64,
}

impl CacheMetrics {
    pub(super) fn new() -> CacheMetrics {
        let blob_source: Family<TierLabels, Counter> = Family::default();
        let blob_source_by_tier = [Tier::Local, Tier::Shared, Tier::Peer, Tier::Upstream]
            .map(|source| blob_source.get_or_create(&TierLabels { source }).clone());
        CacheMetrics {
            outcomes: Family::default(),
            served_bytes: Family::default(),
            evictions: Counter::default(),
            blob_source,
            blob_source_by_tier,
            served_without_upstream: AtomicU64::new(0),
            cache_answers: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub(super) fn register_cache(&self, r: &mut Registry) {
        r.register(
            "cache",
            "Cache outcomes by object kind (hit, miss, revalidated, stale, coalesced, passthrough) and upstream",
            self.cache.outcomes.clone(),
        );
        r.register(
            "served_bytes",
            "Body bytes sent to clients by source",
            self.cache.served_bytes.clone(),
        );
        r.register(
            "cache_evictions",
            "Files evicted to stay within storage.max_size",
            self.cache.evictions.clone(),
        );
        r.register(
            "cache_size_bytes",
            "Bytes of cached blobs and manifests",
            self.cache_size_bytes.clone(),
        );
        r.register(
            "cache_entries",
            "Cached blobs and manifests",
            self.cache_entries.clone(),
        );
        r.register(
            "cache_max_bytes",
            "storage.max_size (0 when unbounded)",
            self.cache_max_bytes.clone(),
        );
        r.register(
            "blob_source",
            "Blob answers by the tier the bytes came from: local disk, the shared object store, another replica (peer) or the upstream",
            self.cache.blob_source.clone(),
        );
    }

    pub fn cache(&self, upstream: &str, kind: ObjectKind, outcome: CacheStatus) {
        let family = &self.cache.outcomes;
        memo::with(
            &OUTCOMES,
            self.owner,
            |l| l.kind == kind && l.outcome == outcome && l.upstream == upstream,
            || {
                let labels = CacheLabels {
                    kind,
                    outcome,
                    upstream: upstream.to_owned(),
                };
                let series = family.get_or_create(&labels).clone();
                (labels, series)
            },
            |c| {
                c.inc();
            },
        );
        self.cache.cache_answers.fetch_add(1, Ordering::Relaxed);
        if !outcome.downloaded() {
            self.cache
                .served_without_upstream
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Running totals for the status page's history.
    pub fn totals(&self) -> Totals {
        let served = |source| {
            self.cache
                .served_bytes
                .get_or_create(&SourceLabels { source })
                .get()
        };
        Totals {
            lookups: self.cache.cache_answers.load(Ordering::Relaxed),
            hits: self.cache.served_without_upstream.load(Ordering::Relaxed),
            bytes_cache: served(Source::Cache),
            bytes_upstream: served(Source::Upstream),
        }
    }

    /// Share of cache answers that needed no upstream download; `None` before any.
    pub fn hit_ratio(&self) -> Option<f64> {
        let total = self.cache.cache_answers.load(Ordering::Relaxed);
        let hits = self.cache.served_without_upstream.load(Ordering::Relaxed);
        (total > 0).then(|| hits as f64 / total as f64)
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.cache
            .served_bytes
            .get_or_create(&SourceLabels { source })
            .inc_by(bytes);
    }

    /// Brings the cache gauges and the eviction counter up to date (at scrape time).
    pub fn cache_state(&self, bytes: u64, entries: u64, max: Option<u64>, evictions: u64) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.cache_size_bytes.set(clamp(bytes));
        self.cache_entries.set(clamp(entries));
        self.cache_max_bytes.set(clamp(max.unwrap_or(0)));
        let seen = self.cache.evictions.get();
        if evictions > seen {
            self.cache.evictions.inc_by(evictions - seen);
        }
    }

    pub fn blob_source(&self, tier: Tier) {
        self.cache.blob_source_by_tier[tier_index(tier)].inc();
    }
}

/// The position of `tier` in `CacheMetrics::blob_source_by_tier`.
fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Local => 0,
        Tier::Shared => 1,
        Tier::Peer => 2,
        Tier::Upstream => 3,
    }
}
