//! The pull layer: for a manifest or a blob, *what* to answer (a hit, a revalidated or stale
//! tag, a coalesced or fresh download, a passthrough), below HTTP. Handlers call the few pull
//! methods of [`Mirror`] (`target`, `manifest`, `blob`, `tags`, `referrers`, `catalog`); this layer calls the services (store, downloads, verifications, the
//! upstream clients), never the other way round. Every answer is a named value
//! ([`ManifestAnswer`], [`BlobAnswer`]), and every failure an [`Error`] with its cause.

mod blobs;
mod error;
mod manifests;
mod referrers;

use std::collections::HashMap;
use std::sync::Arc;

pub use blobs::BlobAnswer;
pub use error::Error;
pub use manifests::ManifestAnswer;

use crate::clock::Clock;
use crate::config::{Config, DOCKER_HUB};
use crate::download::Downloads;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::singleflight::Coalesce;
use crate::store::{Limits, Mode, Store};
use crate::upstream::{self, Upstream};
use crate::verify::Verifications;

/// Which upstream a request goes to, and the repository name as that upstream knows it.
#[derive(Clone)]
pub struct Target {
    upstream: Arc<Upstream>,
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

pub struct Mirror {
    config: Config,
    clock: Clock,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    downloads: Downloads,
    verifications: Verifications,
    upstreams: HashMap<String, Arc<Upstream>>,
    tag_flights: Coalesce<manifests::TagKey, manifests::TagResult>,
    /// Tags the upstream recently answered 404 for, with when it did.
    missing_tags: moka::sync::Cache<manifests::TagKey, (upstream::Error, std::time::SystemTime)>,
    manifest_flights: Coalesce<(String, RepoName, Digest), manifests::FetchResult>,
    referrer_flights: Coalesce<referrers::ReferrersKey, referrers::ReferrersResult>,
    /// Referrers lists by (registry, repository, subject), with when they were fetched.
    referrers: referrers::ReferrersCache,
}

impl Mirror {
    /// Builds the mirror: opens the store (blocking) and the upstream clients.
    pub fn new(config: Config, metrics: Arc<Metrics>, clock: Clock) -> anyhow::Result<Mirror> {
        let limits = Limits::from_config(&config.storage);
        let store = Arc::new(
            Store::open(&config.storage.dir, limits, Mode::Serve).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open storage dir {}: {e}",
                    config.storage.dir.display()
                )
            })?,
        );
        let mut upstreams = HashMap::new();
        for (name, cfg) in &config.upstreams {
            let up = Upstream::new(name, cfg, metrics.clone(), clock.clone())?;
            upstreams.insert(name.clone(), Arc::new(up));
        }
        Ok(Mirror {
            downloads: Downloads::new(store.clone(), metrics.clone()),
            verifications: Verifications::new(store.clone(), metrics.clone()),
            store,
            metrics,
            upstreams,
            tag_flights: Coalesce::default(),
            // The clock decides expiry (see `manifests`); moka's own TTL only bounds memory.
            missing_tags: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.cache.negative_ttl)
                .build(),
            manifest_flights: Coalesce::default(),
            referrer_flights: Coalesce::default(),
            referrers: referrers::cache(),
            clock,
            config,
        })
    }

    /// The upstream for containerd's `ns` (or the default registry), and the repository name
    /// as that upstream knows it (`alpine` is `library/alpine` on Docker Hub).
    pub fn target(&self, ns: Option<&str>, name: &RepoName) -> Result<Target, Error> {
        let upstream = self.upstream(ns)?;
        let registry = upstream.name.as_str();
        let repo = if Config::is_docker_hub(registry) {
            name.with_library_prefix()
        } else {
            name.clone()
        };
        Ok(Target { upstream, repo })
    }

    /// The upstream for containerd's `ns`, or the default registry.
    fn upstream(&self, ns: Option<&str>) -> Result<Arc<Upstream>, Error> {
        let registry = match ns {
            None | Some("") => self.config.server.default_registry.as_str(),
            Some("registry-1.docker.io" | "index.docker.io") => DOCKER_HUB,
            Some(ns) => ns,
        };
        Ok(self
            .upstreams
            .get(registry)
            .ok_or_else(|| Error::NotMirrored(registry.to_owned()))?
            .clone())
    }

    /// `_catalog`: the repositories of one upstream (`ns`, or the default registry) that this
    /// mirror holds, i.e. has a tag record for, sorted, named as that upstream names them
    /// (`library/alpine`). Never asks the upstream: a pull-through mirror's catalog is what it
    /// has pulled, and Docker Hub has no catalog to ask.
    pub async fn catalog(&self, ns: Option<&str>) -> Result<Vec<RepoName>, Error> {
        let upstream = self.upstream(ns)?;
        self.store
            .tags
            .repositories(&upstream.name)
            .await
            .map_err(Error::storage("listing tag records"))
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
    pub fn metrics_text(&self) -> String {
        let stats = self.store.index.stats();
        self.metrics.cache_state(
            stats.bytes,
            stats.entries as u64,
            self.store.index.max(),
            self.store.evictions(),
        );
        for up in self.upstreams.values() {
            let is_up = up.health.state() == upstream::health::State::Up;
            self.metrics.upstream_up(&up.name, is_up);
        }
        self.metrics.encode()
    }

    /// `/_pullthrough/status`: the pull budget and health of each upstream.
    pub fn status(&self) -> serde_json::Value {
        let upstreams: Vec<_> = self
            .upstreams
            .values()
            .map(|u| {
                let budget = u.budget.latest();
                serde_json::json!({
                    "name": u.name,
                    "state": u.health.state(),
                    "limit": budget.as_ref().map(|b| b.limit),
                    "remaining": budget.as_ref().map(|b| b.remaining),
                    "window_secs": budget.as_ref().map(|b| b.window_secs),
                    "source": budget.as_ref().and_then(|b| b.source.clone()),
                    "updated": budget.as_ref().map(|b| humantime::format_rfc3339_seconds(b.updated).to_string()),
                    "counted_pulls": u.counted_pulls(),
                })
            })
            .collect();
        serde_json::json!({
            "upstreams": upstreams,
            "cache_hit_ratio": self.metrics.hit_ratio(),
            "inflight_downloads": self.downloads.in_flight(),
        })
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
