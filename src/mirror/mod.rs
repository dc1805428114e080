//! The pull layer: for a manifest or a blob, *what* to answer (a hit, a revalidated or stale
//! tag, a coalesced or fresh download, a passthrough), below HTTP. Handlers call the few pull
//! methods of [`Mirror`] (`target`, `manifest`, `blob`, `tags`, `referrers`, `catalog`); this layer calls the services (store, downloads, verifications, the
//! upstream clients), never the other way round. Every answer is a named value
//! ([`ManifestAnswer`], [`BlobAnswer`]), and every failure an [`Error`] with its cause.

mod access;
mod blobs;
mod budget;
mod error;
mod fleet;
mod housekeeping;
mod links;
mod manifests;
mod prefetch;
pub mod purge;
mod ranges;
mod referrers;
mod routing;
pub mod stats;
mod tag_fetch;

use std::sync::Arc;

pub use access::{Probe, Refusal};
pub use blobs::BlobAnswer;
pub use error::Error;
pub use housekeeping::Housekeeping;
pub use manifests::ManifestAnswer;

use crate::clock::Clock;
use crate::cluster::coordinator::Coordinator;
use crate::cluster::members::Members;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::download::Downloads;
use crate::identity::{Caller, Clients};
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::policy::Policy;
use crate::singleflight::Coalesce;
use crate::store::tiers::Tiers;
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
    /// On whose behalf the upstream is asked: the mirror itself, unless the upstream takes
    /// clients' credentials (`credentials = "client"`) and [`Mirror::authorize`] said whose.
    caller: Caller,
}

impl Target {
    /// The configured registry name (`docker.io`).
    pub fn registry(&self) -> &str {
        &self.upstream.name
    }

    pub fn repo(&self) -> &RepoName {
        &self.repo
    }

    /// Whether the upstream takes each client's own credentials: requests for it go through
    /// [`Mirror::authorize`] first.
    pub fn takes_client_credentials(&self) -> bool {
        self.upstream.config().credentials == crate::config::CredentialsMode::Client
    }
}

/// Services a test or an embedder provides instead of the ones the config names: an
/// in-process coordinator in place of Redis, an in-memory object store in place of S3.
#[derive(Default, Clone)]
pub struct Services {
    pub coordinator: Option<Arc<dyn Coordinator>>,
    pub shared_store: Option<crate::store::tiers::Injected>,
}

pub struct Mirror {
    config: Config,
    clock: Clock,
    /// The local disk, and the object store replicas share (`[storage.shared]`).
    tiers: Arc<Tiers>,
    /// Coordination with the other replicas (`[cluster]`).
    cluster: Option<Arc<Cluster>>,
    /// The cluster's live members, by heartbeat (`[cluster]`).
    members: Option<Members>,
    metrics: Arc<Metrics>,
    downloads: Downloads,
    /// Blobs of served image manifests downloaded ahead of their clients.
    prefetch: prefetch::Prefetch,
    verifications: Verifications,
    upstreams: crate::hashing::Map<String, Arc<Upstream>>,
    /// Each upstream's policy, by the same names as `upstreams`.
    policies: crate::hashing::Map<String, Arc<Policy>>,
    routing: routing::Routing,
    tag_flights: Coalesce<manifests::TagKey, manifests::TagResult>,
    /// Tags the upstream recently answered 404 for, with when it did.
    missing_tags: moka::sync::Cache<manifests::TagKey, (upstream::Error, std::time::SystemTime)>,
    /// Tags whose upstream HEAD recently named a digest the upstream could not back (a GET of
    /// it failed or did not match), with that digest and when.
    unbacked_tags: moka::sync::Cache<manifests::TagKey, (Digest, std::time::SystemTime)>,
    /// What an upstream HEAD said of tags the mirror has no record of: answers HEADs and
    /// refusals within the tag's TTL, never the tag record (which waits for the manifest to
    /// be verified), and dropped when the manifest it names fails verification.
    unverified_tags: moka::sync::Cache<manifests::TagKey, crate::store::tags::TagRecord>,
    manifest_flights: Coalesce<(String, RepoName, Digest), manifests::FetchResult>,
    history: stats::History,
    repositories: stats::Repositories,
    referrer_flights: Coalesce<referrers::ReferrersKey, referrers::ReferrersResult>,
    /// Referrers lists by (registry, repository, subject), with when they were fetched.
    referrers: referrers::ReferrersCache,
    /// Which callers may read which repositories (`credentials = "client"`).
    access: access::Confirmations,
    /// Clients' identities and the tokens issued to them; `None` when no upstream takes
    /// clients' credentials.
    clients: Option<Arc<Clients>>,
    /// Recent purges, and where this replica is in the fleet's purge log.
    purges: purge::Purges,
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
            Store::open_pinned(&config.storage.dir, limits, Mode::Serve, config.pins())
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
        let mut upstreams = crate::hashing::Map::default();
        let mut policies = crate::hashing::Map::default();
        for (name, cfg) in &config.upstreams {
            let up = Upstream::new(name, cfg, metrics.clone(), clock.clone(), cluster.clone())?;
            upstreams.insert(name.clone(), Arc::new(up));
            if !cfg.immutable_tags.is_empty() {
                tracing::warn!(
                    upstream = %name,
                    "immutable_tags is deprecated: write tag_rules with immutable = true \
                     (immutable_tags apply after every tag rule)"
                );
            }
            policies.insert(name.clone(), Arc::new(cfg.policy(config.cache.tag_ttl)));
        }
        let verifications = Verifications::new(store.clone(), metrics.clone());
        let tiers = Arc::new(Tiers::from_config(
            store,
            config.storage.shared.as_ref(),
            services.shared_store,
            cluster.clone(),
            clock.clone(),
            metrics.clone(),
        )?);
        Ok(Mirror {
            downloads: Downloads::new(
                tiers.clone(),
                cluster.clone(),
                metrics.clone(),
                clock.clone(),
            ),
            prefetch: prefetch::Prefetch::new(config.cache.prefetch_concurrency),
            tiers,
            cluster,
            members,
            verifications,
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
            unbacked_tags: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.cache.negative_ttl)
                .build(),
            unverified_tags: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.cache.tag_ttl)
                .build(),
            manifest_flights: Coalesce::default(),
            history: stats::History::default(),
            repositories: stats::Repositories::default(),
            referrer_flights: Coalesce::default(),
            referrers: referrers::cache(),
            access: access::Confirmations::default(),
            clients: config
                .upstreams
                .values()
                .any(|u| u.credentials == crate::config::CredentialsMode::Client)
                .then(|| {
                    Arc::new(Clients::new(
                        config.cluster.as_ref().and_then(|c| c.secret.as_ref()),
                        config.server.tls_cert.is_some(),
                    ))
                }),
            purges: purge::Purges::default(),
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
            caller: Caller::Mirror,
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

    /// The repositories of `registry` with a tag record that its policy admits; none of an
    /// upstream that takes clients' credentials, whose repository names may be private.
    async fn held(&self, registry: &str) -> Result<Vec<RepoName>, Error> {
        if self
            .upstreams
            .get(registry)
            .is_some_and(|u| u.config().credentials == crate::config::CredentialsMode::Client)
        {
            return Ok(Vec::new());
        }
        let mut repos = self
            .tiers
            .local
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
        Ok(target
            .upstream
            .tags(&target.repo, &target.caller, query)
            .await?)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Clients' identities and tokens, when an upstream takes clients' credentials.
    pub fn clients(&self) -> Option<&Arc<Clients>> {
        self.clients.as_ref()
    }
}
