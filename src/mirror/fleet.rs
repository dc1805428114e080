//! What the pull layer shares with the other replicas, so that the fleet answers as one
//! mirror: tag records and tags found missing (one revalidation per tag and TTL for the
//! fleet), repository links (a digest confirmed for a repository once for the fleet), and
//! manifests in the shared tier.
//!
//! Everything shared is a copy of what an upstream said, never the only one: each value is
//! also kept locally, and without `[cluster]` or `[storage.shared]`, or while they fail, these
//! helpers find nothing and the replica decides alone. Shared values carry the time they were
//! learned and are judged against this replica's clock; their Redis expiry only bounds memory.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Mirror;
use crate::clock::{from_unix_millis, unix_millis};
use crate::oci::{Digest, RepoName};
use crate::store::manifests::Manifest;
use crate::store::tags::TagKey;
use crate::store::tags::TagRecord;
use crate::upstream;

/// How long Redis keeps a shared tag record: long past any tag TTL, so that a replica new to a
/// tag revalidates it with a HEAD instead of a counted GET.
const RECORD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long Redis keeps a shared link; a replica that finds none confirms it with a HEAD.
const LINK_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A tag as the fleet knows it, under `tag:<registry>/<repository>:<tag>`: the record as the
/// local disk keeps it, or a 404.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum SharedTag {
    Record(TagRecord),
    /// The upstream answered 404 at `at_ms`.
    Missing {
        message: String,
        at_ms: u64,
    },
}

/// What another replica learned about a tag.
pub(super) enum FleetTag {
    Record(TagRecord),
    Missing(upstream::Error, SystemTime),
}

fn tag_key(key: &TagKey) -> String {
    format!("tag:{}/{}:{}", key.registry, key.repo, key.tag)
}

fn link_key(registry: &str, repo: &RepoName, digest: &Digest) -> String {
    format!("link:{registry}/{repo}@{digest}")
}

impl Mirror {
    /// The latest record or 404 any replica shared for the tag.
    pub(super) async fn fleet_tag(&self, key: &TagKey) -> Option<FleetTag> {
        let cluster = self.cluster.as_ref()?;
        match cluster.get_json::<SharedTag>(&tag_key(key)).await? {
            SharedTag::Record(record) => Some(FleetTag::Record(record)),
            SharedTag::Missing { message, at_ms } => Some(FleetTag::Missing(
                upstream::Error::NotFound { message },
                from_unix_millis(at_ms),
            )),
        }
    }

    /// Shares what a fetch or revalidation of the tag found.
    pub(super) async fn share_tag(&self, key: &TagKey, record: &TagRecord) {
        let Some(cluster) = &self.cluster else { return };
        let shared = SharedTag::Record(record.clone());
        cluster
            .set_json(&tag_key(key), &shared, Some(RECORD_TTL))
            .await;
    }

    /// Shares that the upstream answered 404 for the tag at `at`, for `negative_ttl`.
    pub(super) async fn share_missing(&self, key: &TagKey, message: &str, at: SystemTime) {
        let Some(cluster) = &self.cluster else { return };
        let shared = SharedTag::Missing {
            message: message.to_owned(),
            at_ms: unix_millis(at),
        };
        let ttl = self.config.cache.negative_ttl.max(Duration::from_secs(1));
        cluster.set_json(&tag_key(key), &shared, Some(ttl)).await;
    }

    /// Deletes the fleet's record of the tag (a purge); with `before`, only one learned before
    /// then.
    pub(super) async fn unshare_tag(&self, key: &TagKey, before: Option<SystemTime>) {
        let Some(cluster) = &self.cluster else { return };
        if let Some(before) = before {
            match self.fleet_tag(key).await {
                Some(FleetTag::Record(r)) if r.fetched_at <= before => {}
                Some(FleetTag::Missing(_, at)) if at <= before => {}
                _ => return,
            }
        }
        cluster.delete(&tag_key(key)).await;
    }

    /// Deletes the fleet's link of `digest` to the repository (a purge).
    pub(super) async fn unshare_link(&self, registry: &str, repo: &RepoName, digest: &Digest) {
        if let Some(cluster) = &self.cluster {
            cluster.delete(&link_key(registry, repo, digest)).await;
        }
    }

    /// Whether another replica's upstream served or confirmed `digest` for the repository.
    pub(super) async fn fleet_link(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> bool {
        let Some(cluster) = &self.cluster else {
            return false;
        };
        cluster
            .get_json::<bool>(&link_key(registry, repo, digest))
            .await
            .unwrap_or(false)
    }

    pub(super) async fn share_link(&self, registry: &str, repo: &RepoName, digest: &Digest) {
        if let Some(cluster) = &self.cluster {
            cluster
                .set_json(&link_key(registry, repo, digest), &true, Some(LINK_TTL))
                .await;
        }
    }

    /// The manifest `digest` from the shared tier, verified and stored locally; `None` when
    /// the tier does not hold it or cannot be read (one that does not match its digest is
    /// deleted, never served).
    pub(super) async fn shared_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        let m = Arc::new(self.tiers.shared_manifest(digest).await?);
        if let Err(e) = self.tiers.local.put_manifest(m.clone()).await {
            tracing::error!(%digest, error = %e, "cannot store a shared-tier manifest; serving it uncached");
        }
        Some(m)
    }

    /// Writes a manifest verified from the upstream to the shared tier, in the background: the
    /// answer does not wait for the object store.
    pub(super) fn share_manifest(&self, m: &Manifest) {
        self.tiers.publish_manifest(m);
    }
}
