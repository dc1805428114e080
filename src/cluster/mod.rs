//! Coordination of replicas that share one cache: which replica downloads a blob (a lease in
//! Redis, renewed while the download runs, fenced by a token), how the others reach it (the
//! peer endpoint, [`peer`]), and the values the fleet shares (tag records, budgets, members).
//!
//! Every request to the coordinator has a short deadline. When Redis cannot be reached, each
//! replica carries on alone ([`Claimed::Alone`]: its own single-flight), warns once, counts the
//! failures, and picks coordination up again by itself when Redis answers.

pub mod coordinator;
pub mod held;
pub mod members;
pub mod memory;
pub mod peer;
pub mod redis;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coordinator::{Claim, CoordResult, Coordinator, Lease};
use futures_util::future::BoxFuture;
use held::{Held, Renewed};

use crate::clock::Clock;
use crate::config::{ClusterConfig, Secret};
use crate::metrics::Metrics;
use crate::oci::Digest;

/// Coordinator requests that take longer are given up: a replica must not stall on Redis.
const DEADLINE: Duration = Duration::from_secs(1);

/// How often a replica announces itself; members silent for three periods are gone.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
const PREFIX: &str = "pullthrough:";

/// The outcome of asking for the download of a digest.
pub enum Claimed {
    /// This replica downloads it; the guard renews the lease until dropped.
    Acquired(LeaseGuard),
    /// Another replica is downloading it: stream from its peer endpoint, `peer`.
    Held { peer: String },
    /// The coordinator cannot be reached: download it alone.
    Alone,
}

pub struct Cluster {
    coordinator: Arc<dyn Coordinator>,
    advertise: String,
    secret: Secret,
    lease_ttl: Duration,
    /// Whether the last coordinator request succeeded (a failure is warned once per outage).
    reachable: AtomicBool,
    /// When the last request failed, while the coordinator is unreachable.
    failed_at: std::sync::Mutex<Option<std::time::SystemTime>>,
    clock: Clock,
    metrics: Arc<Metrics>,
    peers: peer::Peers,
}

impl Cluster {
    pub fn new(
        coordinator: Arc<dyn Coordinator>,
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Cluster {
        metrics.coordinator(true);
        let secret = config.secret.clone().unwrap_or_else(|| Secret::new(""));
        Cluster {
            coordinator,
            advertise: config.advertise.trim_end_matches('/').to_owned(),
            peers: peer::Peers::new(secret.clone()),
            secret,
            lease_ttl: config.lease_ttl,
            reachable: AtomicBool::new(true),
            failed_at: std::sync::Mutex::new(None),
            clock,
            metrics,
        }
    }

    /// The cluster of `config`, coordinated by its Redis server. Connects lazily: a replica
    /// starts, and serves alone, while Redis is down.
    pub fn connect(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> anyhow::Result<Cluster> {
        let redis = redis::RedisCoordinator::new(config.redis.expose())?;
        Ok(Cluster::new(Arc::new(redis), config, metrics, clock))
    }

    /// This replica's URL, as the others reach it.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// Whether `presented` is the cluster secret (compared in constant time); without a
    /// secret, nothing is.
    pub fn authenticates(&self, presented: &[u8]) -> bool {
        !self.secret.expose().is_empty() && self.secret.matches(presented)
    }

    pub fn peers(&self) -> &peer::Peers {
        &self.peers
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// After a failed request, the coordinator is not asked again for this long (requests in
    /// between act alone at once), so an outage costs a request nothing after the first:
    /// half a lease, since a lease cannot be taken over sooner anyway.
    fn retry_after(&self) -> Duration {
        self.lease_ttl / 2
    }

    /// Whether the coordinator answered the last request.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// A coordinator request under the deadline; `None` when it failed (warned once per
    /// outage, counted each time).
    async fn ask<T>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = CoordResult<T>>,
    ) -> Option<T> {
        let recently_failed = crate::sync::lock(&self.failed_at).is_some_and(|at| {
            self.clock
                .now()
                .duration_since(at)
                .is_ok_and(|d| d < self.retry_after())
        });
        if recently_failed {
            return None;
        }
        let result = match tokio::time::timeout(DEADLINE, request).await {
            Ok(r) => r,
            Err(_) => Err(coordinator::CoordError::Timeout(DEADLINE)),
        };
        match result {
            Ok(v) => {
                *crate::sync::lock(&self.failed_at) = None;
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!("the cluster coordinator answers again; coordination resumes");
                    self.metrics.coordinator(true);
                }
                Some(v)
            }
            Err(e) => {
                *crate::sync::lock(&self.failed_at) = Some(self.clock.now());
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, request = what, "the cluster coordinator is unreachable; each replica serves alone until it is back");
                }
                self.metrics.coordinator(false);
                None
            }
        }
    }

    /// Claims the download of `digest` for this replica.
    pub async fn claim_download(self: &Arc<Self>, digest: &Digest) -> Claimed {
        let key = format!("{PREFIX}lease:blob:{digest}");
        let claim = self
            .ask(
                "claim",
                self.coordinator
                    .claim(&key, &self.advertise, self.lease_ttl),
            )
            .await;
        match claim {
            Some(Claim::Acquired(lease)) => {
                Claimed::Acquired(LeaseGuard::start(self.clone(), lease))
            }
            // Our own lease, left by a download of this process that ended without releasing
            // it (a release that failed): nobody else will serve it, so take it over.
            Some(Claim::Held { holder }) if holder == self.advertise => Claimed::Alone,
            Some(Claim::Held { holder }) => Claimed::Held { peer: holder },
            None => Claimed::Alone,
        }
    }

    /// A shared JSON value, `None` when absent, unreadable or the coordinator is down.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        let key = format!("{PREFIX}{key}");
        let bytes = self.ask("get", self.coordinator.get(&key)).await??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Shares a JSON value, expiring after `ttl` when given.
    pub async fn set_json<T: serde::Serialize>(&self, key: &str, value: &T, ttl: Option<Duration>) {
        let key = format!("{PREFIX}{key}");
        let Ok(bytes) = serde_json::to_vec(value) else {
            return;
        };
        self.ask("set", self.coordinator.set(&key, bytes, ttl))
            .await;
    }

    /// A shared value as stored: `Some(None)` when absent, `None` when the coordinator is down.
    pub async fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        let key = format!("{PREFIX}{key}");
        self.ask("get", self.coordinator.get(&key)).await
    }

    /// Stores a value, expiring after `ttl` when given; `None` when the coordinator is down.
    pub async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> Option<()> {
        let key = format!("{PREFIX}{key}");
        self.ask("set", self.coordinator.set(&key, value, ttl))
            .await
    }

    /// Claims the lease `key` for this replica for `ttl`; `None` when the coordinator is down.
    pub async fn claim(&self, key: &str, ttl: Duration) -> Option<Claim> {
        let key = format!("{PREFIX}{key}");
        self.ask("claim", self.coordinator.claim(&key, &self.advertise, ttl))
            .await
    }

    /// Renews a lease this replica holds: `false` when it was lost or cannot be renewed.
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> bool {
        self.ask("renew", self.coordinator.renew(lease, ttl)).await == Some(true)
    }

    pub async fn release(&self, lease: &Lease) {
        self.ask("release", self.coordinator.release(lease)).await;
    }

    /// Whether a replica holds the download lease of `digest`; `None` when that cannot be told.
    pub async fn is_downloading(&self, digest: &Digest) -> Option<bool> {
        let key = format!("{PREFIX}lease:blob:{digest}");
        Some(self.ask("get", self.coordinator.get(&key)).await?.is_some())
    }

    pub async fn delete(&self, key: &str) {
        let key = format!("{PREFIX}{key}");
        self.ask("delete", self.coordinator.delete(&key)).await;
    }

    /// Adds `by` to a shared counter (created with a `window` expiry); `None` when the
    /// coordinator is down.
    pub async fn add(&self, key: &str, by: i64, window: Option<Duration>) -> Option<i64> {
        let key = format!("{PREFIX}{key}");
        self.ask("add", self.coordinator.add(&key, by, window))
            .await
    }

    pub async fn zadd(&self, set: &str, members: Vec<(String, f64)>) -> Option<()> {
        let set = format!("{PREFIX}{set}");
        self.ask("zadd", self.coordinator.zadd(&set, members)).await
    }

    pub async fn zrange(
        &self,
        set: &str,
        min: f64,
        max: f64,
        limit: usize,
    ) -> Option<Vec<(String, f64)>> {
        let set = format!("{PREFIX}{set}");
        self.ask("zrange", self.coordinator.zrange(&set, min, max, limit))
            .await
    }

    pub async fn zrem(&self, set: &str, members: Vec<String>) -> Option<()> {
        let set = format!("{PREFIX}{set}");
        self.ask("zrem", self.coordinator.zrem(&set, members)).await
    }

    /// Announces this replica at `now` (its score is when the announcement expires) and
    /// returns the members whose announcement has not.
    pub async fn heartbeat(&self, now: std::time::SystemTime) -> Option<Vec<String>> {
        let now = crate::clock::unix_millis(now) as f64;
        let expires = now + (3 * HEARTBEAT).as_millis() as f64;
        self.zadd("members", vec![(self.advertise.clone(), expires)])
            .await?;
        let members = self.zrange("members", now, f64::INFINITY, 1000).await?;
        let gone = self.zrange("members", f64::NEG_INFINITY, now, 1000).await?;
        if !gone.is_empty() {
            self.zrem("members", gone.into_iter().map(|(m, _)| m).collect())
                .await;
        }
        let mut members: Vec<String> = members.into_iter().map(|(m, _)| m).collect();
        members.sort();
        self.metrics.cluster_members.set(members.len() as i64);
        Some(members)
    }
}

/// A held download lease: renewed every third of its TTL until dropped, then released. If a
/// renewal finds it lost (expired or taken), [`LeaseGuard::confirm`] says so and the holder
/// must not publish.
pub struct LeaseGuard {
    cluster: Arc<Cluster>,
    lease: Lease,
    held: Held,
}

impl LeaseGuard {
    fn start(cluster: Arc<Cluster>, lease: Lease) -> LeaseGuard {
        cluster.metrics.leases_held.inc();
        let renew = {
            let (cluster, lease) = (cluster.clone(), lease.clone());
            move || -> BoxFuture<'static, Renewed> {
                let (cluster, lease) = (cluster.clone(), lease.clone());
                Box::pin(async move {
                    let renewed = cluster
                        .ask(
                            "renew",
                            cluster.coordinator.renew(&lease, cluster.lease_ttl),
                        )
                        .await;
                    // An unreachable coordinator is not a lost lease: nobody can take it
                    // while Redis is down, and the fence is checked again before publishing.
                    match renewed {
                        Some(true) => Renewed::Kept,
                        Some(false) => {
                            tracing::warn!(lease = %lease.key, "download lease lost to another replica");
                            Renewed::Lost
                        }
                        None => Renewed::Unknown,
                    }
                })
            }
        };
        let release: held::Release = {
            let (cluster, lease) = (cluster.clone(), lease.clone());
            Box::new(move || {
                Box::pin(async move {
                    cluster
                        .ask("release", cluster.coordinator.release(&lease))
                        .await;
                })
            })
        };
        let held = Held::start(cluster.lease_ttl / 3, renew, release);
        LeaseGuard {
            cluster,
            lease,
            held,
        }
    }

    /// Whether the lease is still ours, checked with the coordinator (the fence before a
    /// publication). A coordinator that cannot be asked counts as ours: the content is
    /// verified either way, and no other replica can have taken the lease without it.
    pub async fn confirm(&self) -> bool {
        if self.held.is_lost() {
            return false;
        }
        let c = &self.cluster;
        c.ask("renew", c.coordinator.renew(&self.lease, c.lease_ttl))
            .await
            .unwrap_or(true)
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.cluster.metrics.leases_held.dec();
    }
}
