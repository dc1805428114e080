//! The cluster and the shared tier: download leases, the coordinator (Redis), members, and the
//! shared object store's evictions and errors.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Metrics;

pub(super) struct ClusterMetrics {
    leases_taken_over: Counter,
    coordinator_up: Gauge,
    coordinator_errors: Counter,
    shared_evictions: Counter,
    shared_errors: Counter,
}

impl ClusterMetrics {
    pub(super) fn new() -> ClusterMetrics {
        ClusterMetrics {
            leases_taken_over: Counter::default(),
            coordinator_up: Gauge::default(),
            coordinator_errors: Counter::default(),
            shared_evictions: Counter::default(),
            shared_errors: Counter::default(),
        }
    }
}

impl Metrics {
    pub(super) fn register_cluster(&self, r: &mut Registry) {
        r.register(
            "cluster_leases_held",
            "Downloads this replica holds the cluster-wide lease for",
            self.leases_held.clone(),
        );
        r.register(
            "cluster_leases_taken_over",
            "Downloads this replica took over after their lease holder stopped renewing",
            self.cluster.leases_taken_over.clone(),
        );
        r.register(
            "cluster_coordinator_up",
            "1 while Redis answers, 0 while each replica coordinates alone",
            self.cluster.coordinator_up.clone(),
        );
        r.register(
            "cluster_coordinator_errors",
            "Redis requests that failed or timed out",
            self.cluster.coordinator_errors.clone(),
        );
        r.register(
            "cluster_members",
            "Replicas with a recent heartbeat in Redis, this one included",
            self.cluster_members.clone(),
        );
        r.register(
            "shared_evictions",
            "Objects deleted from the shared tier to stay within storage.shared.max_size",
            self.cluster.shared_evictions.clone(),
        );
        r.register(
            "shared_errors",
            "Shared-tier (object store) requests that failed",
            self.cluster.shared_errors.clone(),
        );
    }

    pub fn lease_taken_over(&self) {
        self.cluster.leases_taken_over.inc();
    }

    /// Downloads taken over since start, for the status page.
    pub fn leases_taken_over(&self) -> u64 {
        self.cluster.leases_taken_over.get()
    }

    pub fn coordinator(&self, up: bool) {
        self.cluster.coordinator_up.set(i64::from(up));
        if !up {
            self.cluster.coordinator_errors.inc();
        }
    }

    pub fn shared_eviction(&self, objects: u64) {
        self.cluster.shared_evictions.inc_by(objects);
    }

    pub fn shared_error(&self) {
        self.cluster.shared_errors.inc();
    }
}
