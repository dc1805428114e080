//! `[cluster]`: the replicas sharing one cache, and the Redis they coordinate through.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// `[cluster]`: replicas that coordinate through Redis, so that the fleet fetches each blob
/// once, revalidates each tag once per TTL and spends one pull budget.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The Redis URL (`redis://` or `rediss://`, e.g. `redis://redis:6379/0`; a password in
    /// it is never printed) that replicas coordinate through: download leases, tag records,
    /// the negative cache, back-offs, the pull budget, members. Required.
    pub redis: Secret,
    /// The URL the other replicas reach this one at, e.g. `http://10.0.0.5:5000`. Required;
    /// env `PULLTHROUGH_CLUSTER_ADVERTISE` replaces it, so replicas can share one file.
    pub advertise: String,
    /// How long a replica's claim on a download (its lease) outlives the replica: the time a
    /// takeover waits after a crash. Renewed every third of it. Default 5 s.
    #[serde(with = "humantime_serde", default = "default_lease_ttl")]
    pub lease_ttl: Duration,
    /// The cluster secret, from env `PULLTHROUGH_CLUSTER_SECRET` only (not a key of the
    /// file), the same on every replica and at least 16 characters: it authenticates
    /// replica-to-replica requests (`/_pullthrough/peer/blobs/…`). Required.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(5)
}
