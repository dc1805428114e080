//! Blob downloads: in progress and their clients, resumes, digest mismatches (and the requests
//! refused while one is remembered), a full disk, and the time to the upstream's first byte on
//! a miss.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::labels::TierLabels;
use super::Metrics;
use crate::outcome::Tier;

pub(super) struct DownloadMetrics {
    resumes: Counter,
    digest_mismatches: Counter,
    mismatch_refusals: Counter,
    no_space: Counter,
    miss_ttfb: Histogram,
    /// Ranges of a blob being downloaded fetched on their own, before the download got
    /// there, by the tier they came from (shared or upstream).
    early_ranges: Family<TierLabels, Counter>,
    /// Parts of downloads fetched in parallel, beyond each download's first request.
    parallel_parts: Counter,
}

impl DownloadMetrics {
    pub(super) fn new() -> DownloadMetrics {
        DownloadMetrics {
            resumes: Counter::default(),
            digest_mismatches: Counter::default(),
            mismatch_refusals: Counter::default(),
            no_space: Counter::default(),
            miss_ttfb: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            early_ranges: Family::default(),
            parallel_parts: Counter::default(),
        }
    }
}

impl Metrics {
    pub(super) fn register_downloads(&self, r: &mut Registry) {
        r.register(
            "upstream_resumes",
            "Blob downloads resumed with a Range request",
            self.downloads.resumes.clone(),
        );
        r.register(
            "digest_mismatches",
            "Upstream content rejected because it did not match its digest",
            self.downloads.digest_mismatches.clone(),
        );
        r.register(
            "digest_mismatch_refusals",
            "Blob requests answered 502 without an upstream request: the upstream's content for the digest did not match it within the last minute",
            self.downloads.mismatch_refusals.clone(),
        );
        r.register(
            "storage_full",
            "Blob downloads not cached for lack of disk space (ENOSPC or too little free)",
            self.downloads.no_space.clone(),
        );
        r.register(
            "inflight_downloads",
            "Blob downloads in progress",
            self.inflight_downloads.clone(),
        );
        r.register(
            "inflight_waiters",
            "Clients receiving a blob that is still downloading",
            self.inflight_waiters.clone(),
        );
        r.register(
            "miss_first_byte_seconds",
            "Time to the upstream's response headers on blob misses",
            self.downloads.miss_ttfb.clone(),
        );
        r.register(
            "early_ranges",
            "Client ranges of a blob being downloaded, fetched on their own (from the shared tier or the upstream) because the download had not reached them",
            self.downloads.early_ranges.clone(),
        );
        r.register(
            "download_parts",
            "Ranged requests that downloads fetched in parallel with their first one",
            self.downloads.parallel_parts.clone(),
        );
    }

    pub fn resume(&self) {
        self.downloads.resumes.inc();
    }

    pub fn no_space(&self) {
        self.downloads.no_space.inc();
    }

    pub fn digest_mismatch(&self) {
        self.downloads.digest_mismatches.inc();
    }

    pub fn mismatch_refusal(&self) {
        self.downloads.mismatch_refusals.inc();
    }

    pub fn early_range(&self, source: Tier) {
        self.downloads
            .early_ranges
            .get_or_create(&TierLabels { source })
            .inc();
    }

    pub fn download_parts(&self, n: u64) {
        self.downloads.parallel_parts.inc_by(n);
    }

    pub fn miss_first_byte(&self, elapsed: Duration) {
        self.downloads.miss_ttfb.observe(elapsed.as_secs_f64());
    }
}
