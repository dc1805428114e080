//! A tag's answer from the upstream: fetched (one counted pull), or revalidated with a
//! `HEAD` (none) and backed by its manifest before it is trusted, or the cached record served
//! stale when the upstream fails; and the record saved for this replica and the fleet.

use super::manifests::{verified_record, Fetched, Resolved, TagResult};
use super::{Error, Mirror};
use crate::identity::Caller;
use crate::oci::{media, Digest, Reference};
use crate::outcome::CacheStatus;
use crate::store::tags::{TagKey, TagRecord};
use crate::upstream::{self, Upstream};

impl Mirror {
    /// Asks the upstream with a HEAD (not a counted pull) whether the tag still points where it
    /// did. A digest learned from a HEAD is trusted only once the mirror holds its manifest,
    /// verified: a changed one is fetched by digest at once (the client would GET it next
    /// anyway), and an upstream that cannot back it (a GET of it fails or does not match: a
    /// lie, a broken push) leaves the tag record as it was, served stale. Only a cold tag
    /// asked with a HEAD, with nothing to fall back on, is answered from the HEAD alone (no
    /// pull spent): that answer is kept in memory (`unverified_tags`), not in the record.
    pub(super) async fn revalidate_tag(
        &self,
        up: &Upstream,
        caller: &Caller,
        key: &TagKey,
        cached: Option<TagRecord>,
        want_body: bool,
    ) -> TagResult {
        let reference = Reference::Tag(key.tag.clone());
        let head = up
            .manifest(&key.repo, caller, &reference, true, media::ACCEPT_ALL)
            .await;
        let m = match head {
            Ok(m) => m,
            Err(e) => return self.stale_or(e, key, cached),
        };
        let (Some(digest), Some(size)) = (m.digest, m.size) else {
            // The HEAD did not say enough; a GET would, but not at the cost of the reserve.
            if let (true, Some(record)) = (up.budget_is_low(), &cached) {
                return Ok(self.stale(key, record.clone(), &"the pull budget is at its reserve"));
            }
            return match self.fetch_tag(up, caller, key).await {
                Err(Error::Upstream(e)) => self.stale_or(e, key, cached),
                other => other,
            };
        };
        if let Some(c) = cached.as_ref().filter(|c| c.digest == digest) {
            let fresh = TagRecord {
                fetched_at: self.clock.now(),
                ..c.clone()
            };
            self.save_tag(key, &fresh).await;
            return Ok(Resolved::Record(fresh, CacheStatus::Revalidated));
        }
        let fetched = match self.held_manifest(&digest).await? {
            Some(m) => Fetched::Stored(m),
            None if cached.is_none() && !want_body => {
                let said = TagRecord {
                    digest,
                    media_type: m.media_type,
                    size,
                    fetched_at: self.clock.now(),
                };
                self.unverified_tags.insert(key.clone(), said.clone());
                return Ok(Resolved::Unverified(said, CacheStatus::Miss));
            }
            None => {
                // A lying upstream costs one pull per `negative_ttl`, not one per request.
                if let (true, Some(record)) = (self.unbacked_lately(key, &digest), &cached) {
                    let why = format!(
                        "the upstream's HEAD names {digest}, which it did not back moments ago"
                    );
                    return Ok(self.stale(key, record.clone(), &why));
                }
                match self.back_head_digest(up, caller, key, &digest).await {
                    Ok(fetched) => fetched,
                    Err(e) => return self.unbacked(key, &digest, e, cached),
                }
            }
        };
        let (Fetched::Stored(manifest) | Fetched::Uncacheable(manifest)) = &fetched;
        let fresh = verified_record(manifest, self.clock.now());
        self.save_tag(key, &fresh).await;
        match fetched {
            // Relayed as it is (not stored): fetching it again for the body would spend
            // another pull.
            Fetched::Uncacheable(m) if want_body => Ok(Resolved::Uncacheable(m)),
            _ => Ok(Resolved::Record(fresh, CacheStatus::Miss)),
        }
    }

    /// Whether the upstream could not back `digest`, named by the tag's HEAD, within
    /// `cache.negative_ttl`.
    pub(super) fn unbacked_lately(&self, key: &TagKey, digest: &Digest) -> bool {
        self.unbacked_tags.get(key).is_some_and(|(bad, at)| {
            bad == *digest && self.clock.since(at) < self.config.cache.negative_ttl
        })
    }

    /// GETs the manifest a tag HEAD named by its digest (one counted pull), verified against
    /// it.
    pub(super) async fn back_head_digest(
        &self,
        up: &Upstream,
        caller: &Caller,
        key: &TagKey,
        digest: &Digest,
    ) -> Result<Fetched, Error> {
        let reference = Reference::Digest(digest.clone());
        let m = up
            .manifest(&key.repo, caller, &reference, false, media::ACCEPT_ALL)
            .await?;
        self.verify_and_store(m, Some(digest)).await
    }

    /// A tag HEAD named `digest`, which the upstream did not back with its manifest (`e`): the
    /// cached tag, stale, when there is one (an outage or a refusal says nothing about the
    /// digest; anything else, a 404 or bytes that do not match, is remembered).
    pub(super) fn unbacked(
        &self,
        key: &TagKey,
        digest: &Digest,
        e: Error,
        cached: Option<TagRecord>,
    ) -> TagResult {
        let outage = match &e {
            Error::Upstream(u) => u.allows_stale(),
            Error::DigestMismatch { .. } => false,
            _ => return Err(e),
        };
        if !outage {
            self.unbacked_tags
                .insert(key.clone(), (digest.clone(), self.clock.now()));
        }
        match cached {
            Some(record) => {
                let why = format!("the upstream's HEAD named {digest}, which it did not back: {e}");
                Ok(self.stale(key, record, &why))
            }
            None => Err(e),
        }
    }

    /// Stores what a fetch or revalidation of the tag found, and shares it with the fleet.
    pub(super) async fn save_tag(&self, key: &TagKey, record: &TagRecord) {
        self.keep_tag(key, record).await;
        self.share_tag(key, record).await;
    }

    pub(super) async fn keep_tag(&self, key: &TagKey, record: &TagRecord) {
        if let Err(e) = self.tiers.local.put_tag(key, record.clone()).await {
            tracing::warn!(error = %e, "cannot persist tag record");
        }
    }

    pub(super) fn stale_or(
        &self,
        e: upstream::Error,
        key: &TagKey,
        cached: Option<TagRecord>,
    ) -> TagResult {
        match cached {
            Some(record) if e.allows_stale() => Ok(self.stale(key, record, &e)),
            _ => Err(e.into()),
        }
    }

    /// The cached tag, served stale because of `why`.
    pub(super) fn stale(
        &self,
        key: &TagKey,
        record: TagRecord,
        why: &dyn std::fmt::Display,
    ) -> Resolved {
        tracing::warn!(
            upstream = %key.registry, repo = %key.repo, tag = %key.tag, reason = %why,
            age_secs = self.clock.since(record.fetched_at).as_secs(),
            "serving the cached tag stale"
        );
        Resolved::Record(record, CacheStatus::Stale)
    }

    /// GETs a tag (one counted pull), storing the manifest and the tag.
    pub(super) async fn fetch_tag(
        &self,
        up: &Upstream,
        caller: &Caller,
        key: &TagKey,
    ) -> TagResult {
        let reference = Reference::Tag(key.tag.clone());
        let m = up
            .manifest(&key.repo, caller, &reference, false, media::ACCEPT_ALL)
            .await?;
        let manifest = match self.verify_and_store(m, None).await? {
            Fetched::Stored(m) => m,
            Fetched::Uncacheable(m) => return Ok(Resolved::Uncacheable(m)),
        };
        let record = verified_record(&manifest, self.clock.now());
        self.save_tag(key, &record).await;
        Ok(Resolved::Record(record, CacheStatus::Miss))
    }
}
