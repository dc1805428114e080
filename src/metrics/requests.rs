//! Client requests: counts and durations by route kind, and the requests and connections refused
//! before a handler.

use std::cell::RefCell;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::labels::{
    method_label, status_class, status_code, DurationLabels, ReasonLabels, Refusal, RequestLabels,
    UpstreamLabels,
};
use super::memo::{self, Memo};
use super::Metrics;
use crate::outcome::CacheStatus;

thread_local! {
    static COUNTS: RefCell<Memo<RequestLabels, Counter>> = const { RefCell::new(Memo::new()) };
    static DURATIONS: RefCell<Memo<DurationLabels, Histogram>> =
        const { RefCell::new(Memo::new()) };
}

pub(super) struct RequestMetrics {
    count: Family<RequestLabels, Counter>,
    duration: Family<DurationLabels, Histogram>,
    client_refusals: Family<ReasonLabels, Counter>,
    policy_refusals: Family<UpstreamLabels, Counter>,
    connections_refused: Counter,
    connections_shed: Counter,
    write_timeouts: Counter,
}

impl RequestMetrics {
    pub(super) fn new() -> RequestMetrics {
        RequestMetrics {
            count: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            }),
            client_refusals: Family::default(),
            policy_refusals: Family::default(),
            connections_refused: Counter::default(),
            connections_shed: Counter::default(),
            write_timeouts: Counter::default(),
        }
    }
}

impl Metrics {
    pub(super) fn register_requests(&self, r: &mut Registry) {
        r.register(
            "requests",
            "Requests by route kind, method, status class and code (200, 206, 304, 307, 400, \
             401, 403, 404, 416, 429, 500, 502, 503, other)",
            self.requests.count.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request to the end of the response body, by route kind and cache status",
            self.requests.duration.clone(),
        );
        r.register(
            "client_refusals",
            "Requests refused before a handler: address (server.allow), credentials, rate_limit (server.client_requests), response_buffer (server.response_buffer_budget spent)",
            self.requests.client_refusals.clone(),
        );
        r.register(
            "policy_refusals",
            "Requests refused 403 DENIED by an upstream's allow_repositories / deny_repositories, by upstream",
            self.requests.policy_refusals.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at accept: the client address had server.max_connections_per_client open",
            self.requests.connections_refused.clone(),
        );
        r.register(
            "connections_shed",
            "Connections closed because server.response_buffer_budget stayed spent: each the one holding the most of it",
            self.requests.connections_shed.clone(),
        );
        r.register(
            "write_timeouts",
            "HTTP/1.x connections dropped because a response's client read nothing of it for server.write_timeout",
            self.requests.write_timeouts.clone(),
        );
        r.register(
            "response_buffer_bytes",
            "Response data buffered toward HTTP/2 clients, produced but not yet written (at most server.response_buffer_budget)",
            self.response_buffer_bytes.clone(),
        );
    }

    pub fn request(
        &self,
        kind: &'static str,
        method: &str,
        status: u16,
        cache: Option<CacheStatus>,
        elapsed: Duration,
    ) {
        let labels = RequestLabels {
            kind,
            method: method_label(method),
            status: status_class(status),
            code: status_code(status),
        };
        memo::with_labels(&COUNTS, self.owner, &self.requests.count, labels, |c| {
            c.inc();
        });
        let labels = DurationLabels {
            kind,
            cache: cache.map_or("none", CacheStatus::label),
        };
        memo::with_labels(
            &DURATIONS,
            self.owner,
            &self.requests.duration,
            labels,
            |h| h.observe(elapsed.as_secs_f64()),
        );
    }

    pub fn client_refused(&self, why: Refusal) {
        self.requests
            .client_refusals
            .get_or_create(&ReasonLabels {
                reason: why.label(),
            })
            .inc();
    }

    /// A request for a repository the upstream's policy does not mirror.
    pub fn policy_refusal(&self, upstream: &str) {
        self.requests
            .policy_refusals
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    pub fn connection_refused(&self) {
        self.requests.connections_refused.inc();
    }

    pub fn connection_shed(&self) {
        self.requests.connections_shed.inc();
    }

    pub fn write_timeout(&self) {
        self.requests.write_timeouts.inc();
    }
}
