//! Prometheus metrics. Labels are bounded: route kinds, outcomes, status classes, a fixed set
//! of status codes and configured upstream names; never repository names or digests.
//!
//! Exposed as OpenMetrics to scrapers that ask for it, else in the Prometheus text format
//! (`text/plain; version=0.0.4`), which `promtool check metrics` reads: see [`Format`].
//!
//! One file per domain: `requests.rs` (client requests, refusals), `cache.rs`, `upstream.rs`,
//! `downloads.rs`, `prefetch.rs`, `cluster.rs` (leases, coordinator, shared tier), `clients.rs`
//! (clients' own upstream credentials) and
//! `process.rs`. A metric's
//! field, its registration and the method its caller calls live in its domain's file; the
//! few gauges callers set directly are fields of [`Metrics`], declared there and registered by their domain file.
//! `labels.rs` holds the label sets, `format.rs` the exposition formats.

mod cache;
mod clients;
mod cluster;
mod downloads;
mod format;
mod labels;
mod memo;
mod prefetch;
mod process;
mod requests;
mod upstream;

use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use self::cache::CacheMetrics;
pub use self::cache::Totals;
use self::clients::ClientMetrics;
use self::cluster::ClusterMetrics;
use self::downloads::DownloadMetrics;
pub use self::format::Format;
pub use self::labels::Refusal;
use self::prefetch::PrefetchMetrics;
use self::process::ProcessMetrics;
use self::requests::RequestMetrics;
use self::upstream::UpstreamMetrics;

pub struct Metrics {
    registry: Mutex<Registry>,
    /// This instance, for the per-thread memory of series (`memo.rs`).
    owner: u64,
    process: ProcessMetrics,
    requests: RequestMetrics,
    cache: CacheMetrics,
    upstream: UpstreamMetrics,
    downloads: DownloadMetrics,
    prefetch: PrefetchMetrics,
    cluster: ClusterMetrics,
    clients: ClientMetrics,
    // Set by their callers; registered by their domain's file.
    pub cache_size_bytes: Gauge,
    pub cache_entries: Gauge,
    pub cache_max_bytes: Gauge,
    pub inflight_downloads: Gauge,
    pub inflight_waiters: Gauge,
    pub leases_held: Gauge,
    pub cluster_members: Gauge,
    /// Bytes of response data buffered toward HTTP/2 clients (`server`'s budget).
    pub response_buffer_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            owner: memo::next_owner(),
            process: ProcessMetrics::new(),
            requests: RequestMetrics::new(),
            cache: CacheMetrics::new(),
            upstream: UpstreamMetrics::new(),
            downloads: DownloadMetrics::new(),
            prefetch: PrefetchMetrics::new(),
            cluster: ClusterMetrics::new(),
            clients: ClientMetrics::new(),
            cache_size_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            inflight_downloads: Gauge::default(),
            inflight_waiters: Gauge::default(),
            leases_held: Gauge::default(),
            cluster_members: Gauge::default(),
            response_buffer_bytes: Gauge::default(),
        };
        {
            let mut root = crate::sync::lock(&m.registry);
            m.register_process(&mut root);
            let r = root.sub_registry_with_prefix("pullthrough");
            m.register_build_info(r);
            m.register_requests(r);
            m.register_cache(r);
            m.register_upstream(r);
            m.register_downloads(r);
            m.register_prefetch(r);
            m.register_cluster(r);
            m.register_clients(r);
        }
        m
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
            Format::Text => format::openmetrics_to_text(&out),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
}
