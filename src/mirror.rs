//! The mirror's pull logic, below HTTP: which upstream a request goes to, when a tag is
//! answered from the cache, revalidated with a HEAD or fetched, and how manifests are fetched,
//! verified and stored. Handlers call this; this calls the store and the upstream client,
//! never the other way round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{Config, DOCKER_HUB};
use crate::download::Downloads;
use crate::metrics::Metrics;
use crate::oci::{media, Digest, RepoName, Tag};
use crate::singleflight::Coalesce;
use crate::store::manifests::Manifest;
use crate::store::tags::{TagKey, TagRecord};
use crate::store::{Mode, Store};
use crate::upstream::{self, Upstream};

/// How a response was served, sent as `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Revalidated,
    Stale,
    Coalesced,
}

impl CacheStatus {
    const ALL: [CacheStatus; 5] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Revalidated,
        CacheStatus::Stale,
        CacheStatus::Coalesced,
    ];

    /// The status an `X-Cache` value names.
    pub fn from_header(value: &[u8]) -> Option<CacheStatus> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str().as_bytes() == value)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Stale => "STALE",
            CacheStatus::Coalesced => "COALESCED",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Stale => "stale",
            CacheStatus::Coalesced => "coalesced",
        }
    }

    /// A joined flight is reported as coalesced whatever the leader's outcome was.
    fn joined(self, coalesced: bool) -> CacheStatus {
        if coalesced && self != CacheStatus::Hit {
            CacheStatus::Coalesced
        } else {
            self
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error("cache storage failed: {0}")]
    Storage(String),
    /// The upstream's manifest is of a type the mirror does not cache (e.g. schema 1).
    #[error("manifest media type {0:?} is not cached")]
    NotCacheable(String),
    #[error(transparent)]
    Abandoned(#[from] crate::singleflight::Abandoned),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

type TagResult = Result<(TagRecord, CacheStatus), Error>;
type ManifestResult = Result<(Arc<Manifest>, CacheStatus), Error>;

pub struct Mirror {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub downloads: Downloads,
    pub verifications: crate::verify::Verifications,
    pub client_limit: Option<crate::access::ClientLimit>,
    pub access: Arc<crate::access::Access>,
    upstreams: HashMap<String, Arc<Upstream>>,
    tag_flights: Coalesce<TagKey, TagResult>,
    /// Tags the upstream recently answered 404 for.
    missing_tags: moka::sync::Cache<TagKey, upstream::Error>,
    manifest_flights: Coalesce<(String, RepoName, Digest), ManifestResult>,
}

impl Mirror {
    /// Builds the mirror: opens the store (blocking) and the upstream clients.
    pub fn new(config: Config, metrics: Arc<Metrics>) -> anyhow::Result<Mirror> {
        let store = Arc::new(
            Store::open(&config.storage.dir, config.storage.limits(), Mode::Serve).map_err(
                |e| {
                    anyhow::anyhow!(
                        "cannot open storage dir {}: {e}",
                        config.storage.dir.display()
                    )
                },
            )?,
        );
        let mut upstreams = HashMap::new();
        for (name, cfg) in &config.upstreams {
            upstreams.insert(
                name.clone(),
                Arc::new(Upstream::new(name, cfg, metrics.clone())?),
            );
        }
        Ok(Mirror {
            downloads: Downloads::new(store.clone(), metrics.clone()),
            verifications: crate::verify::Verifications::new(store.clone(), metrics.clone()),
            client_limit: crate::access::ClientLimit::from_config(&config.server),
            access: Arc::new(crate::access::Access::from_config(&config.server)?),
            store,
            metrics,
            upstreams,
            tag_flights: Coalesce::default(),
            missing_tags: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.cache.negative_ttl)
                .build(),
            manifest_flights: Coalesce::default(),
            config,
        })
    }

    /// The upstream for containerd's `ns` (or the default registry), and the repository name
    /// as that upstream knows it (`alpine` is `library/alpine` on Docker Hub).
    pub fn upstream_for(
        &self,
        ns: Option<&str>,
        name: &RepoName,
    ) -> Option<(Arc<Upstream>, RepoName)> {
        let registry = match ns {
            None | Some("") => self.config.server.default_registry.as_str(),
            Some("registry-1.docker.io" | "index.docker.io") => DOCKER_HUB,
            Some(ns) => ns,
        };
        let upstream = self.upstreams.get(registry)?.clone();
        let name = if Config::is_docker_hub(registry) {
            name.with_library_prefix()
        } else {
            name.clone()
        };
        Some((upstream, name))
    }

    pub fn upstreams(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.upstreams.values()
    }

    /// What `tag` points to: from the cache within the TTL, else revalidated with an upstream
    /// HEAD (one per tag however many clients ask), else the cached value when the upstream
    /// is failing. A tag never seen is fetched with one GET when the caller wants the manifest
    /// anyway (`want_body`), and with a HEAD otherwise.
    pub async fn resolve_tag(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repo: &RepoName,
        tag: &Tag,
        want_body: bool,
    ) -> TagResult {
        let key = TagKey {
            registry: up.name.clone(),
            repo: repo.clone(),
            tag: tag.clone(),
        };
        let cached = self.store.tags.get(&key).await?;
        if let Some(record) = &cached {
            if record.age() < self.config.cache.tag_ttl {
                return Ok((record.clone(), CacheStatus::Hit));
            }
        }
        if let Some(e) = self.missing_tags.get(&key) {
            return Err(e.into());
        }
        let this = self.clone();
        let up = up.clone();
        let flight_key = key.clone();
        let (result, coalesced) = self
            .tag_flights
            .run(&key, || async move {
                let result = match cached {
                    None if want_body => this.fetch_tag(&up, &flight_key).await,
                    cached => {
                        this.revalidate_tag(&up, &flight_key, cached, want_body)
                            .await
                    }
                };
                if let Err(Error::Upstream(e @ upstream::Error::NotFound { .. })) = &result {
                    this.missing_tags.insert(flight_key, e.clone());
                }
                result
            })
            .await?;
        result.map(|(r, s)| (r, s.joined(coalesced)))
    }

    /// Asks the upstream with a HEAD (not a counted pull) whether the tag still points where it
    /// did; fetches a changed manifest right away when the caller wants the body, so that a
    /// failing GET can still fall back to the old one.
    async fn revalidate_tag(
        &self,
        up: &Upstream,
        key: &TagKey,
        cached: Option<TagRecord>,
        want_body: bool,
    ) -> TagResult {
        let head = up
            .manifest(&key.repo, key.tag.as_str(), true, media::ACCEPT_ALL)
            .await;
        let m = match head {
            Ok(m) => m,
            Err(e) => return self.stale_or(e, key, cached),
        };
        let (Some(digest), Some(size)) = (m.digest, m.size) else {
            // The HEAD did not say enough; a GET would, but not at the cost of the reserve.
            if up.budget_is_low() && cached.is_some() {
                let e = upstream::Error::TooManyRequests {
                    message: "pull budget at its reserve".into(),
                    retry_after: None,
                };
                return self.stale_or(e, key, cached);
            }
            return match self.fetch_tag(up, key).await {
                Err(Error::Upstream(e)) => self.stale_or(e, key, cached),
                other => other,
            };
        };
        let unchanged = cached.as_ref().is_some_and(|c| c.digest == digest);
        if !unchanged && want_body && media::is_cacheable(&m.media_type) {
            if let Err(Error::Upstream(e)) = self.manifest_bytes(up, &key.repo, &digest).await {
                return self.stale_or(e, key, cached);
            }
        }
        let fresh = TagRecord {
            digest,
            media_type: m.media_type,
            size,
            fetched_at: SystemTime::now(),
        };
        self.save_tag(key, &fresh).await;
        let status = if unchanged {
            CacheStatus::Revalidated
        } else {
            CacheStatus::Miss
        };
        Ok((fresh, status))
    }

    /// Makes sure the manifest bytes for `digest` are stored, fetching them if needed.
    async fn manifest_bytes(
        &self,
        up: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Arc<Manifest>, Error> {
        if let Some(m) = self.store.manifests.get(digest).await? {
            return Ok(m);
        }
        let m = up
            .manifest(repo, &digest.to_string(), false, media::ACCEPT_ALL)
            .await?;
        self.verify_and_store(m, Some(digest)).await
    }

    async fn save_tag(&self, key: &TagKey, record: &TagRecord) {
        if let Err(e) = self.store.tags.put(key, record.clone()).await {
            tracing::warn!(error = %e, "cannot persist tag record");
        }
    }

    fn stale_or(&self, e: upstream::Error, key: &TagKey, cached: Option<TagRecord>) -> TagResult {
        let usable = e.is_outage() || matches!(e, upstream::Error::TooManyRequests { .. });
        match cached {
            Some(record) if usable => {
                tracing::warn!(
                    upstream = %key.registry, repo = %key.repo, tag = %key.tag, error = %e,
                    age_secs = record.age().as_secs(),
                    "upstream failed; serving the cached tag stale"
                );
                Ok((record, CacheStatus::Stale))
            }
            _ => Err(e.into()),
        }
    }

    /// GETs a tag (one counted pull), storing the manifest and the tag.
    async fn fetch_tag(&self, up: &Upstream, key: &TagKey) -> TagResult {
        let m = up
            .manifest(&key.repo, key.tag.as_str(), false, media::ACCEPT_ALL)
            .await?;
        let manifest = self.verify_and_store(m, None).await?;
        let record = TagRecord {
            digest: manifest.digest.clone(),
            media_type: manifest.media_type.clone(),
            size: manifest.bytes.len() as u64,
            fetched_at: SystemTime::now(),
        };
        self.save_tag(key, &record).await;
        Ok((record, CacheStatus::Miss))
    }

    /// The manifest with `digest`: from the store, else fetched once (for all concurrent
    /// askers), verified and stored.
    pub async fn manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> ManifestResult {
        if let Some(m) = self.store.manifests.get(digest).await? {
            return Ok((m, CacheStatus::Hit));
        }
        let key = (up.name.clone(), repo.clone(), digest.clone());
        let this = self.clone();
        let up = up.clone();
        let (repo, digest) = (repo.clone(), digest.clone());
        let (result, coalesced) = self
            .manifest_flights
            .run(&key, || async move {
                let stored = this.manifest_bytes(&up, &repo, &digest).await?;
                Ok((stored, CacheStatus::Miss))
            })
            .await?;
        result.map(|(m, s)| (m, s.joined(coalesced)))
    }

    /// Checks the bytes against the digest asked for and the upstream's header, then stores.
    async fn verify_and_store(
        &self,
        m: upstream::ManifestResponse,
        expected: Option<&Digest>,
    ) -> Result<Arc<Manifest>, Error> {
        let bytes = m.body.unwrap_or_default();
        let actual = Digest::sha256_of(&bytes);
        for claimed in [expected, m.digest.as_ref()].into_iter().flatten() {
            if claimed.is_sha256() && *claimed != actual {
                self.metrics.digest_mismatch();
                tracing::error!(expected = %claimed, %actual, "upstream manifest does not match its digest");
                return Err(upstream::Error::DigestMismatch {
                    expected: claimed.to_string(),
                    actual: actual.to_string(),
                }
                .into());
            }
        }
        if !media::is_cacheable(&m.media_type) {
            return Err(Error::NotCacheable(m.media_type));
        }
        let manifest = Arc::new(Manifest {
            digest: actual,
            media_type: m.media_type,
            bytes,
        });
        self.store.put_manifest(manifest.clone()).await?;
        Ok(manifest)
    }
}
