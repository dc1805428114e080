//! The pull layer: for a manifest or a blob, *what* to answer (a hit, a revalidated or stale
//! tag, a coalesced or fresh download, a passthrough), below HTTP. Handlers call the few pull
//! methods of [`Mirror`] (`target`, `manifest`, `blob`, `tags`, `referrers`, `catalog`); this layer calls the services (store, downloads, verifications, the
//! upstream clients), never the other way round. Every answer is a named value
//! ([`ManifestAnswer`], [`BlobAnswer`]), and every failure an [`Error`] with its cause.

mod blobs;
mod budget;
mod error;
mod fleet;
mod links;
mod manifests;
mod referrers;
mod routing;
pub mod stats;

use std::collections::HashMap;
use std::sync::Arc;

pub use blobs::BlobAnswer;
pub use error::Error;
pub use manifests::ManifestAnswer;

use crate::clock::Clock;
use crate::cluster::coordinator::Coordinator;
use crate::cluster::members::Members;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::download::Downloads;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::policy::Policy;
use crate::singleflight::Coalesce;
use crate::store::shared::{Pass, SharedTier};
use crate::store::{Limits, Mode, Store};
use crate::upstream::{self, Upstream};
use crate::verify::Verifications;

/// Which upstream a request goes to, with its policy, and the repository name as that
/// upstream knows it.
#[derive(Clone)]
pub struct Target {
    upstream: Arc<Upstream>,
    policy: Arc<Policy>,
    repo: RepoName,
}

impl Target {
    /// The configured registry name (`docker.io`).
    pub fn registry(&self) -> &str {
        &self.upstream.name
    }

    pub fn repo(&self) -> &RepoName {
        &self.repo
    }
}

/// Services a test or an embedder provides instead of the ones the config names: an
/// in-process coordinator in place of Redis, an in-memory object store in place of S3.
#[derive(Default, Clone)]
pub struct Services {
    pub coordinator: Option<Arc<dyn Coordinator>>,
    pub shared_store: Option<crate::store::shared::Injected>,
}

pub struct Mirror {
    config: Config,
    clock: Clock,
    store: Arc<Store>,
    /// The object store replicas share (`[storage.shared]`).
    shared: Option<Arc<SharedTier>>,
    /// Coordination with the other replicas (`[cluster]`).
    cluster: Option<Arc<Cluster>>,
    /// The cluster's live members, by heartbeat (`[cluster]`).
    members: Option<Members>,
    metrics: Arc<Metrics>,
    downloads: Downloads,
    verifications: Verifications,
    upstreams: HashMap<String, Arc<Upstream>>,
    /// Each upstream's policy, by the same names as `upstreams`.
    policies: HashMap<String, Arc<Policy>>,
    routing: routing::Routing,
    tag_flights: Coalesce<manifests::TagKey, manifests::TagResult>,
    /// Tags the upstream recently answered 404 for, with when it did.
    missing_tags: moka::sync::Cache<manifests::TagKey, (upstream::Error, std::time::SystemTime)>,
    manifest_flights: Coalesce<(String, RepoName, Digest), manifests::FetchResult>,
    history: stats::History,
    repositories: stats::Repositories,
    referrer_flights: Coalesce<referrers::ReferrersKey, referrers::ReferrersResult>,
    /// Referrers lists by (registry, repository, subject), with when they were fetched.
    referrers: referrers::ReferrersCache,
}

impl Mirror {
    /// Builds the mirror: opens the store (blocking) and the upstream clients.
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        clock: Clock,
        services: Services,
    ) -> anyhow::Result<Mirror> {
        let limits = Limits::from_config(&config.storage);
        let store = Arc::new(
            Store::open(&config.storage.dir, limits, Mode::Serve)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open storage dir {}: {e}",
                        config.storage.dir.display()
                    )
                })?
                .with_clock(clock.clone()),
        );
        let cluster = match (&config.cluster, services.coordinator) {
            (Some(cfg), Some(c)) => Some(Arc::new(Cluster::new(
                c,
                cfg,
                metrics.clone(),
                clock.clone(),
            ))),
            (Some(cfg), None) => Some(Arc::new(Cluster::connect(
                cfg,
                metrics.clone(),
                clock.clone(),
            )?)),
            (None, _) => None,
        };
        let members = cluster.clone().map(|c| Members::new(c, clock.clone()));
        let shared = match &config.storage.shared {
            Some(cfg) => Some(Arc::new(SharedTier::from_config(
                cfg,
                services.shared_store,
                cluster.clone(),
                clock.clone(),
                metrics.clone(),
            )?)),
            None => None,
        };
        let mut upstreams = HashMap::new();
        let mut policies = HashMap::new();
        for (name, cfg) in &config.upstreams {
            let up = Upstream::new(name, cfg, metrics.clone(), clock.clone(), cluster.clone())?;
            upstreams.insert(name.clone(), Arc::new(up));
            let policy = Policy::new(
                cfg.tag_ttl.unwrap_or(config.cache.tag_ttl),
                cfg.immutable_tags.clone(),
                cfg.allow_repositories.clone(),
                cfg.deny_repositories.clone(),
            );
            policies.insert(name.clone(), Arc::new(policy));
        }
        Ok(Mirror {
            downloads: Downloads::new(
                store.clone(),
                shared.clone(),
                cluster.clone(),
                metrics.clone(),
            ),
            shared,
            cluster,
            members,
            verifications: Verifications::new(store.clone(), metrics.clone()),
            store,
            metrics,
            upstreams,
            policies,
            routing: routing::Routing::new(&config),
            tag_flights: Coalesce::default(),
            // The clock decides expiry (see `manifests`); moka's own TTL only bounds memory.
            missing_tags: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.cache.negative_ttl)
                .build(),
            manifest_flights: Coalesce::default(),
            history: stats::History::default(),
            repositories: stats::Repositories::default(),
            referrer_flights: Coalesce::default(),
            referrers: referrers::cache(),
            clock,
            config,
        })
    }

    /// The upstream a request for `name` (with containerd's `ns`, if sent) goes to, and the
    /// repository name as that upstream knows it (see `routing.rs`): for the access log, which
    /// names what was asked for even when the policy refuses it.
    pub fn resolve(&self, ns: Option<&str>, name: &RepoName) -> Result<Target, Error> {
        let (registry, repo) = self.routing.resolve(ns, name)?;
        let (Some(upstream), Some(policy)) =
            (self.upstreams.get(registry), self.policies.get(registry))
        else {
            return Err(Error::NotMirrored(registry.to_owned()));
        };
        Ok(Target {
            upstream: upstream.clone(),
            policy: policy.clone(),
            repo,
        })
    }

    /// [`Mirror::resolve`], then [`Mirror::admit`].
    pub fn target(&self, ns: Option<&str>, name: &RepoName) -> Result<Target, Error> {
        self.admit(self.resolve(ns, name)?)
    }

    /// A resolved `target`, refused with [`Error::Refused`] when the upstream's policy does not
    /// mirror the repository: before the cache is looked at or the upstream asked.
    pub fn admit(&self, target: Target) -> Result<Target, Error> {
        if !target.policy.admits(&target.repo) {
            self.metrics.policy_refusal(target.registry());
            return Err(Error::Refused {
                registry: target.registry().to_owned(),
                repo: target.repo,
            });
        }
        Ok(target)
    }

    /// `_catalog`: the repositories this mirror holds (has a tag record for) and its policy
    /// admits, sorted. Never asks an upstream: a pull-through mirror's catalog is what it
    /// has pulled, and Docker Hub has no catalog to ask.
    ///
    /// With `ns`, those of that registry, named as it names them (`library/alpine`), as
    /// containerd asks for them. Without, those of every registry, named by the path a client
    /// without `ns` pulls them by: `library/alpine` for the default registry,
    /// `ghcr.io/org/app` for the others.
    pub async fn catalog(&self, ns: Option<&str>) -> Result<Vec<RepoName>, Error> {
        if ns.is_some_and(|ns| !ns.is_empty()) {
            let registry = self.routing.registry_for(ns)?;
            return self.held(registry).await;
        }
        let mut names = Vec::new();
        for registry in self.upstreams.keys() {
            let held = self.held(registry).await?;
            names.extend(
                held.iter()
                    .filter_map(|repo| self.routing.path_name(registry, repo)),
            );
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The repositories of `registry` with a tag record that its policy admits.
    async fn held(&self, registry: &str) -> Result<Vec<RepoName>, Error> {
        let mut repos = self
            .store
            .tags
            .repositories(registry)
            .await
            .map_err(Error::storage("listing tag records"))?;
        if let Some(policy) = self.policies.get(registry) {
            repos.retain(|r| policy.admits(r));
        }
        Ok(repos)
    }

    /// One page of the repository's tags, passed through from the upstream.
    pub async fn tags(
        &self,
        target: &Target,
        query: Option<&str>,
    ) -> Result<upstream::TagsPage, Error> {
        Ok(target.upstream.tags(&target.repo, query).await?)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the cache can take new content.
    pub async fn readiness(&self) -> Result<(), Error> {
        self.store
            .is_writable()
            .await
            .map_err(Error::storage("creating a file in the storage directory"))
    }

    /// The Prometheus exposition, with the cache and upstream gauges brought up to date.
    pub fn metrics_text(&self, format: crate::metrics::Format) -> String {
        let stats = self.store.index.stats();
        self.metrics.cache_state(
            stats.bytes,
            stats.entries as u64,
            self.store.index.max(),
            self.store.evictions(),
        );
        for up in self.upstreams.values() {
            let is_up = up.state() == upstream::health::State::Up;
            self.metrics.upstream_up(&up.name, is_up);
        }
        self.metrics.encode(format)
    }

    /// Takes the status page's sample of the last interval (see [`stats::SAMPLE_EVERY`]).
    pub fn sample(&self) {
        self.history.sample(self.clock.now(), self.metrics.totals());
    }

    /// Counts a request for `repository` that sent `bytes` of body, for the status page.
    pub fn record_request(&self, repository: &str, bytes: u64) {
        self.repositories.record(repository, bytes);
    }

    /// `/_pullthrough/status`: each upstream's pull budget, health and latest failures; the
    /// downloads in flight; the last hour's samples; the busiest repositories; the cache size.
    pub fn status(&self) -> serde_json::Value {
        let now = self.clock.now();
        let rfc3339 = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let mut errors = Vec::new();
        let mut names: Vec<&String> = self.upstreams.keys().collect();
        names.sort();
        let upstreams: Vec<_> = names
            .into_iter()
            .map(|name| &self.upstreams[name])
            .map(|u| {
                for (at, error) in u.recent_errors() {
                    errors.push((at, u.name.clone(), error));
                }
                let budget = u.budget();
                // The window is counted from the reading: by then the budget is whole again.
                let refills_in = budget.as_ref().map(|b| {
                    let refill = b.updated + std::time::Duration::from_secs(b.window_secs);
                    refill.duration_since(now).map_or(0, |d| d.as_secs())
                });
                serde_json::json!({
                    "refills_in_secs": refills_in,
                    "name": u.name,
                    "state": u.state(),
                    "limit": budget.as_ref().map(|b| b.limit),
                    "remaining": budget.as_ref().map(|b| b.remaining),
                    "window_secs": budget.as_ref().map(|b| b.window_secs),
                    "source": budget.as_ref().and_then(|b| b.source.clone()),
                    "updated": budget.as_ref().map(|b| humantime::format_rfc3339_seconds(b.updated).to_string()),
                    "counted_pulls": u.counted_pulls(),
                    "urls": u.urls(),
                    "budget_reserve": u.config().budget_reserve,
                })
            })
            .collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.0));
        errors.truncate(20);
        let recent_errors: Vec<_> = errors
            .into_iter()
            .map(|(at, upstream, error)| {
                serde_json::json!({"time": rfc3339(at), "upstream": upstream, "error": error})
            })
            .collect();
        let (by_requests, by_bytes) = self.repositories.top(10);
        let cache = self.store.index.stats();
        let totals = self.metrics.totals();
        let mut status = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now": rfc3339(now),
            "upstreams": upstreams,
            "cache_hit_ratio": self.metrics.hit_ratio(),
            "inflight_downloads": self.downloads.in_flight(),
            "downloads": self.downloads.progress(),
            "cache": {
                "bytes": cache.bytes,
                "entries": cache.entries,
                "max_bytes": self.store.index.max(),
            },
            "totals": {
                "lookups": totals.lookups,
                "hits": totals.hits,
                "bytes_cache": totals.bytes_cache,
                "bytes_upstream": totals.bytes_upstream,
            },
            "history": {
                "interval_secs": stats::SAMPLE_EVERY.as_secs(),
                "samples": self.history.samples(),
            },
            "top_repositories": {"by_requests": by_requests, "by_bytes": by_bytes},
            "recent_errors": recent_errors,
        });
        if let Some(cluster) = self.cluster_status() {
            status["cluster"] = cluster;
        }
        status
    }

    /// Whether this replica is part of a cluster (`[cluster]`): its periodic work runs then.
    pub fn is_clustered(&self) -> bool {
        self.cluster.is_some()
    }

    /// Announces this replica to the cluster and refreshes the member list.
    pub async fn heartbeat(&self) {
        if let Some(members) = &self.members {
            members.heartbeat().await;
        }
    }

    /// Sends the shared tier's batched access times to the coordinator.
    pub async fn flush_shared_accesses(&self) {
        if let Some(shared) = &self.shared {
            shared.flush().await;
        }
    }

    /// One eviction pass of the shared tier (see `store::shared::eviction`).
    pub async fn evict_shared(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        if let Some(Pass::Busy { holder }) = shared.evict().await {
            tracing::debug!(%holder, "another replica evicts the shared tier");
        }
    }

    /// The status page's `cluster` object: members, the coordinator, leases, the shared tier.
    fn cluster_status(&self) -> Option<serde_json::Value> {
        let cluster = self.cluster.as_ref()?;
        let shared = self.shared.as_ref().and_then(|s| s.totals()).map(|t| {
            serde_json::json!({
                "max_bytes": t.max,
                "bytes": t.bytes,
                "evictions": t.evictions,
            })
        });
        Some(serde_json::json!({
            "self": cluster.advertise(),
            "members": self.members.as_ref().map(Members::live).unwrap_or_default(),
            "coordinator": if cluster.is_reachable() { "up" } else { "down" },
            "leases_held": self.metrics.leases_held.get(),
            "leases_taken_over": self.metrics.leases_taken_over(),
            "shared": shared,
        }))
    }

    /// Notices a `cache prune` run beside this process: what it deleted leaves the index (and
    /// the size gauges).
    pub async fn notice_prune(&self) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.notice_prune()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(gone)) => {
                tracing::info!(files = gone, "noticed a prune of the storage directory")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot rescan the storage directory"),
            Err(e) => tracing::warn!(error = %e, "cannot rescan the storage directory"),
        }
    }

    /// Saves the cache index (sizes and access order) if it changed, off the async workers.
    pub async fn save_index(&self) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.save_index()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the cache index"),
            Err(e) => tracing::warn!(error = %e, "cannot save the cache index"),
        }
    }
}
