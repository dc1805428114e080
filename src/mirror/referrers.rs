//! Referrers (OCI 1.1): the manifests whose `subject` is a given digest.
//!
//! Decisions:
//! - One list per (registry, repository, subject digest), fetched from the upstream
//!   *unfiltered* and kept in memory for the upstream's tag TTL (a referrers list grows as
//!   artifacts are attached, like a tag moves). The mirror filters by `artifactType` itself, so one
//!   upstream request serves every filter, and every filtered answer says
//!   `OCI-Filters-Applied: artifactType`.
//! - Concurrent askers share one upstream fetch (single-flight); when the upstream fails (an
//!   outage or a 429) an expired list is served stale.
//! - An upstream without the API (`404`) falls back to the referrers tag schema: the
//!   `sha256-<hex>` tag is asked for with a `HEAD` (not a counted pull) and its index fetched
//!   only when it exists (then cached by digest like any manifest); without it the answer is
//!   an empty image index.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::{Error, Mirror, Target};
use crate::oci::{media, Accept, Digest, Reference, RepoName, Tag};
use crate::outcome::CacheStatus;
use crate::upstream;

/// A referrers request's answer: an image index, and whether a filter was applied to it.
#[derive(Debug, Clone)]
pub struct ReferrersAnswer {
    pub body: Bytes,
    /// `artifactType` was applied (the answer says so in `OCI-Filters-Applied`).
    pub filtered: bool,
    pub status: CacheStatus,
}

pub(super) type Descriptors = Arc<Vec<serde_json::Value>>;

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub(super) struct ReferrersKey {
    registry: String,
    repo: RepoName,
    subject: Digest,
}

pub(super) type ReferrersResult = Result<(Descriptors, CacheStatus), Error>;
pub(super) type ReferrersCache = moka::sync::Cache<ReferrersKey, (Descriptors, SystemTime)>;

pub(super) fn cache() -> ReferrersCache {
    // The clock decides expiry; moka bounds memory.
    moka::sync::Cache::builder().max_capacity(10_000).build()
}

impl Mirror {
    /// The referrers of `subject` in the target repository, filtered to `artifact_type`.
    pub async fn referrers(
        self: &Arc<Self>,
        target: &Target,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrersAnswer, Error> {
        let key = ReferrersKey {
            registry: target.upstream.name.clone(),
            repo: target.repo.clone(),
            subject: subject.clone(),
        };
        let cached = self.referrers.get(&key);
        let (list, status) = match &cached {
            Some((list, at)) if self.clock.since(*at) < target.policy.referrers_ttl() => {
                (list.clone(), CacheStatus::Hit)
            }
            _ => {
                let this = self.clone();
                let target = target.clone();
                let flight_key = key.clone();
                let (result, coalesced) = self
                    .referrer_flights
                    .run(&key, || async move {
                        let list = this.fetch_referrers(&target, &flight_key.subject).await?;
                        this.referrers
                            .insert(flight_key, (list.clone(), this.clock.now()));
                        Ok((list, CacheStatus::Miss))
                    })
                    .await?;
                match (result, cached) {
                    (Ok((list, s)), _) => (list, s.joined(coalesced)),
                    (Err(Error::Upstream(e)), Some((list, at))) if e.allows_stale() => {
                        tracing::warn!(
                            upstream = %key.registry, repo = %key.repo, subject = %key.subject,
                            error = %e, age_secs = self.clock.since(at).as_secs(),
                            "upstream failed; serving cached referrers stale"
                        );
                        (list, CacheStatus::Stale)
                    }
                    (Err(e), _) => return Err(e),
                }
            }
        };
        let manifests: Vec<&serde_json::Value> = list
            .iter()
            .filter(|d| {
                artifact_type.is_none_or(|t| {
                    d.get("artifactType").and_then(serde_json::Value::as_str) == Some(t)
                })
            })
            .collect();
        Ok(ReferrersAnswer {
            body: Bytes::from(index(&manifests)),
            filtered: artifact_type.is_some(),
            status,
        })
    }

    async fn fetch_referrers(
        self: &Arc<Self>,
        target: &Target,
        subject: &Digest,
    ) -> Result<Descriptors, Error> {
        match target
            .upstream
            .referrers(&target.repo, &target.caller, subject)
            .await
        {
            Ok(index) => Ok(Arc::new(index.manifests)),
            Err(upstream::Error::NotFound { .. }) => self.referrers_tag(target, subject).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The referrers tag schema: the index tagged `<alg>-<hex>`, or nothing.
    async fn referrers_tag(
        self: &Arc<Self>,
        target: &Target,
        subject: &Digest,
    ) -> Result<Descriptors, Error> {
        let Ok(tag) = format!("{}-{}", crate::oci::ALGORITHM, subject.hex()).parse::<Tag>() else {
            return Ok(Descriptors::default());
        };
        let any = Accept::parse(std::iter::empty());
        let head = self
            .manifest(target, &Reference::Tag(tag), true, &any)
            .await;
        let digest = match head {
            Ok(m) => m.digest,
            Err(Error::Upstream(upstream::Error::NotFound { .. })) => {
                return Ok(Descriptors::default())
            }
            Err(e) => return Err(e),
        };
        let m = self
            .manifest(target, &Reference::Digest(digest), false, &any)
            .await?;
        let manifests = m
            .body
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("manifests").and_then(|a| a.as_array().cloned()))
            .unwrap_or_default();
        Ok(Arc::new(manifests))
    }
}

/// An OCI image index of `manifests`.
fn index(manifests: &[&serde_json::Value]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": manifests,
    }))
    .unwrap_or_default()
}
