//! Manifests: when a tag is answered from the cache, revalidated with a HEAD (which Docker Hub
//! does not count) or fetched with a GET (which it does), when cached content is served stale,
//! and how manifests are fetched once for all concurrent askers, verified and stored.

use std::sync::Arc;

use bytes::Bytes;

use super::fleet::FleetTag;
use super::{Error, Mirror, Target};
use crate::identity::Caller;
use crate::oci::{media, Accept, Digest, ManifestHeaders, Reference, RepoName, Tag};
use crate::outcome::{CacheStatus, ObjectKind};
use crate::store::manifests::Manifest;
pub(super) use crate::store::tags::TagKey;
use crate::store::tags::TagRecord;
use crate::upstream::{self, Upstream};

/// Whether a client whose `Accept` is `accept` may have a manifest of `media_type`.
fn negotiate(accept: &Accept, media_type: &str) -> Result<(), Error> {
    if accept.allows(media_type) {
        Ok(())
    } else {
        Err(Error::NotAcceptable {
            available: media_type.to_owned(),
        })
    }
}

/// Whether `accept` takes every manifest type an upstream may answer a tag with: the four the
/// mirror asks for, and schema 1, which an upstream may still hold.
fn takes_every_type(accept: &Accept) -> bool {
    [
        media::DOCKER_MANIFEST,
        media::DOCKER_LIST,
        media::OCI_MANIFEST,
        media::OCI_INDEX,
        media::DOCKER_SCHEMA1_SIGNED,
    ]
    .iter()
    .all(|t| accept.allows(t))
}

/// What a manifest request is answered with.
#[derive(Debug, Clone)]
pub struct ManifestAnswer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// `None` for HEAD.
    pub body: Option<Bytes>,
    pub status: CacheStatus,
    /// A cached manifest's response headers, made when it was cached.
    pub headers: Option<ManifestHeaders>,
}

impl ManifestAnswer {
    fn of(m: &Manifest, head: bool, status: CacheStatus) -> ManifestAnswer {
        ManifestAnswer {
            media_type: m.media_type.clone(),
            digest: m.digest.clone(),
            size: m.bytes.len() as u64,
            body: (!head).then(|| m.bytes.clone()),
            status,
            headers: Some(m.headers.clone()),
        }
    }
}

/// A manifest fetched from the upstream: stored, or of a type the mirror does not cache
/// (schema 1, say), in which case it is relayed as it is.
#[derive(Debug, Clone)]
pub(super) enum Fetched {
    Stored(Arc<Manifest>),
    Uncacheable(Arc<Manifest>),
}

/// What a tag points to, or the manifest itself when the GET that resolved it returned a type
/// the mirror does not cache.
#[derive(Debug, Clone)]
pub(super) enum Resolved {
    Record(TagRecord, CacheStatus),
    /// What the upstream's HEAD said of a tag the mirror has no record of, not stored until
    /// the manifest it names is verified.
    Unverified(TagRecord, CacheStatus),
    Uncacheable(Arc<Manifest>),
}

pub(super) type TagResult = Result<Resolved, Error>;

/// A tag record pointing to `m`, a manifest the mirror fetched and verified.
pub(super) fn verified_record(m: &Manifest, fetched_at: std::time::SystemTime) -> TagRecord {
    TagRecord {
        digest: m.digest.clone(),
        media_type: m.media_type.clone(),
        size: m.bytes.len() as u64,
        fetched_at,
    }
}
pub(super) type FetchResult = Result<(Fetched, CacheStatus), Error>;

impl Mirror {
    /// The manifest `reference` names, for a client whose `Accept` is `accept`.
    ///
    /// Negotiation is decided here, not upstream: the mirror always asks the upstream with
    /// its own full list ([`media::ACCEPT_ALL`]) and stores what the upstream has; a client
    /// whose `Accept` allows none of that gets [`Error::NotAcceptable`] (`404
    /// MANIFEST_UNKNOWN` naming the available type) from what the mirror knows, without an
    /// upstream request. HEAD and GET decide alike, from the same tag record or stored
    /// manifest, so they always agree. (There is no passthrough with the client's `Accept`:
    /// an upstream that converts to schema 1 for it spends a counted pull on bytes the digest
    /// check then refuses.)
    ///
    /// A digest is sha256 by type: one of another algorithm is answered `404` at the router
    /// without an upstream request, as for blobs (the mirror cannot verify such content, and
    /// relaying it would spend an uncached, counted pull per request).
    pub async fn manifest(
        self: &Arc<Self>,
        target: &Target,
        reference: &Reference,
        head: bool,
        accept: &Accept,
    ) -> Result<ManifestAnswer, Error> {
        let answer = self
            .lookup_manifest(target, reference, head, accept)
            .await?;
        self.metrics
            .cache(target.registry(), ObjectKind::Manifest, answer.status);
        self.prefetch_for(target, &answer);
        Ok(answer)
    }

    /// [`Mirror::manifest`] for a request with `If-None-Match`, which `matches` tests on a
    /// digest. It is decided on what a HEAD knows (a tag record, revalidated if its TTL is
    /// over), so a `304` never spends a counted pull; a GET that did not match then asks for
    /// the body. Counted once, as one request. Returns whether it matched.
    pub async fn conditional_manifest(
        self: &Arc<Self>,
        target: &Target,
        reference: &Reference,
        head: bool,
        accept: &Accept,
        matches: impl Fn(&Digest) -> bool,
    ) -> Result<(ManifestAnswer, bool), Error> {
        let known = self
            .lookup_manifest(target, reference, true, accept)
            .await?;
        let matched = matches(&known.digest);
        let answer = if matched || head {
            known
        } else {
            self.lookup_manifest(target, reference, false, accept)
                .await?
        };
        self.metrics
            .cache(target.registry(), ObjectKind::Manifest, answer.status);
        self.prefetch_for(target, &answer);
        Ok((answer, matched))
    }

    /// A manifest answered with its body (a `GET`, not a `HEAD` nor a `304`) is being pulled:
    /// its image's blobs are prefetched (see `prefetch.rs`).
    fn prefetch_for(self: &Arc<Self>, target: &Target, answer: &ManifestAnswer) {
        if let Some(body) = &answer.body {
            self.prefetch(target, &answer.digest, &answer.media_type, body);
        }
    }

    async fn lookup_manifest(
        self: &Arc<Self>,
        target: &Target,
        reference: &Reference,
        head: bool,
        accept: &Accept,
    ) -> Result<ManifestAnswer, Error> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(target, d, head, accept).await,
            Reference::Tag(tag) => self.manifest_by_tag(target, tag, head, accept).await,
        }
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        target: &Target,
        tag: &Tag,
        head: bool,
        accept: &Accept,
    ) -> Result<ManifestAnswer, Error> {
        // A client that might refuse what the upstream has learns the tag's type from a HEAD
        // (not a counted pull; free when the tag is cached) before any GET: a refusal must
        // not cost a pull, and a schema 1 manifest would not even be stored.
        let want_body = !head && takes_every_type(accept);
        let (record, tag_status, verified) = match self.resolve_tag(target, tag, want_body).await? {
            Resolved::Record(record, status) => (record, status, true),
            Resolved::Unverified(record, status) => (record, status, false),
            Resolved::Uncacheable(m) => {
                negotiate(accept, &m.media_type)?;
                return Ok(ManifestAnswer::of(&m, head, CacheStatus::Passthrough));
            }
        };
        // The tag record came from the upstream for this repository: so did its digest.
        self.link(target, &record.digest).await;
        negotiate(accept, &record.media_type)?;
        if head {
            return Ok(ManifestAnswer {
                media_type: record.media_type,
                digest: record.digest,
                size: record.size,
                body: None,
                status: tag_status,
                headers: None,
            });
        }
        let fetched = self.fetch_manifest(target, &record.digest).await;
        if !verified {
            // The manifest the HEAD named is verified now, and the tag may point to it; or it
            // is not, and the HEAD's answer is not given again.
            let key = TagKey {
                registry: target.upstream.name.clone(),
                repo: target.repo.clone(),
                tag: tag.clone(),
            };
            self.unverified_tags.invalidate(&key);
            if let Ok((Fetched::Stored(m) | Fetched::Uncacheable(m), _)) = &fetched {
                self.save_tag(&key, &verified_record(m, self.clock.now()))
                    .await;
            }
        }
        let (fetched, fetch_status) = fetched?;
        let (Fetched::Stored(m) | Fetched::Uncacheable(m)) = &fetched;
        // A tag's status says whether the tag was known; a fetch of its bytes makes it a miss.
        let status = match (tag_status, fetch_status) {
            (s, CacheStatus::Hit) => s,
            (CacheStatus::Stale, _) => CacheStatus::Stale,
            (_, s) => s,
        };
        Ok(ManifestAnswer::of(m, head, status))
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        head: bool,
        accept: &Accept,
    ) -> Result<ManifestAnswer, Error> {
        if head {
            // From the store, or from an upstream HEAD without spending a pull.
            let stored = match self.stored_manifest(digest).await? {
                Some(m) => Some(m),
                None => Box::pin(self.shared_manifest(digest)).await,
            };
            let answer = match stored {
                Some(m) => {
                    self.confirm_link(target, digest, ObjectKind::Manifest)
                        .await?;
                    ManifestAnswer::of(&m, true, CacheStatus::Hit)
                }
                None => {
                    let answer = Box::pin(self.head_manifest(target, digest)).await?;
                    self.link(target, digest).await;
                    answer
                }
            };
            negotiate(accept, &answer.media_type)?;
            return Ok(answer);
        }
        let (fetched, status) = self.fetch_manifest(target, digest).await?;
        // A hit is bytes another repository may have fetched; anything else came from the
        // upstream for this one (manifest fetches are coalesced per repository).
        if status == CacheStatus::Hit {
            self.confirm_link(target, digest, ObjectKind::Manifest)
                .await?;
        } else {
            self.link(target, digest).await;
        }
        let (m, status) = match fetched {
            Fetched::Stored(m) => (m, status),
            Fetched::Uncacheable(m) => (m, CacheStatus::Passthrough),
        };
        negotiate(accept, &m.media_type)?;
        Ok(ManifestAnswer::of(&m, false, status))
    }

    /// An upstream HEAD of a manifest by digest (not a counted pull), with the mirror's own
    /// `Accept`.
    async fn head_manifest(
        &self,
        target: &Target,
        digest: &Digest,
    ) -> Result<ManifestAnswer, Error> {
        let reference = Reference::Digest(digest.clone());
        let m = target
            .upstream
            .manifest(
                &target.repo,
                &target.caller,
                &reference,
                true,
                media::ACCEPT_ALL,
            )
            .await?;
        let Some(size) = m.size else {
            return Err(upstream::Error::Protocol {
                upstream: target.upstream.name.clone(),
                detail: "manifest HEAD without length".into(),
            }
            .into());
        };
        if m.digest.as_ref().is_some_and(|claimed| claimed != digest) {
            return Err(upstream::Error::Protocol {
                upstream: target.upstream.name.clone(),
                detail: "manifest HEAD answered another digest".into(),
            }
            .into());
        }
        Ok(ManifestAnswer {
            media_type: m.media_type,
            digest: digest.clone(),
            size,
            body: None,
            status: CacheStatus::Miss,
            headers: None,
        })
    }

    pub(super) fn mismatch(&self, expected: Digest, actual: &Digest) -> Error {
        self.metrics.digest_mismatch();
        tracing::error!(%expected, %actual, "upstream manifest does not match its digest");
        Error::DigestMismatch {
            kind: ObjectKind::Manifest,
            expected,
            actual: actual.to_string(),
        }
    }

    /// What `tag` points to: from the cache while its freshness allows (the upstream's tag
    /// rules: a TTL, for ever when immutable, never when `always`), or from the record another
    /// replica shared within it, else revalidated with an upstream HEAD (one per tag however
    /// many clients ask), else the cached value when the upstream is failing. A tag never seen
    /// is fetched with one GET when the caller wants the manifest anyway (`want_body`), and
    /// with a HEAD otherwise.
    async fn resolve_tag(
        self: &Arc<Self>,
        target: &Target,
        tag: &Tag,
        want_body: bool,
    ) -> TagResult {
        let key = TagKey {
            registry: target.upstream.name.clone(),
            repo: target.repo.clone(),
            tag: tag.clone(),
        };
        let cached = self
            .tiers
            .local
            .tags
            .get(&key)
            .await
            .map_err(Error::storage("reading a tag record"))?;
        let freshness = target.policy.freshness(&target.repo, tag);
        let fresh = move |age: std::time::Duration| freshness.is_fresh(age);
        if let Some(record) = &cached {
            if fresh(self.clock.since(record.fetched_at)) {
                return Ok(Resolved::Record(record.clone(), CacheStatus::Hit));
            }
        } else if !want_body {
            if let Some(said) = self.unverified_tags.get(&key) {
                if fresh(self.clock.since(said.fetched_at)) {
                    return Ok(Resolved::Unverified(said, CacheStatus::Hit));
                }
            }
        }
        if let Some((e, at)) = self.missing_tags.get(&key) {
            if self.clock.since(at) < self.config.cache.negative_ttl {
                return Err(e.into());
            }
            self.missing_tags.invalidate(&key);
        }
        let stale = cached.clone();
        let this = self.clone();
        let up = target.upstream.clone();
        let caller = target.caller.clone();
        let flight_key = key.clone();
        let flight = Box::pin(self.tag_flights.run(&key, || async move {
            // A flight that ended between our read and this one may have stored the tag.
            let cached = match this.tiers.local.tags.get(&flight_key).await {
                Ok(Some(r)) if fresh(this.clock.since(r.fetched_at)) => {
                    return Ok(Resolved::Record(r, CacheStatus::Hit))
                }
                Ok(fresher) => fresher.or(cached),
                Err(_) => cached,
            };
            // Another replica may have fetched, revalidated or missed the tag since.
            let cached = match this.fleet_tag(&flight_key).await {
                Some(FleetTag::Missing(e, at))
                    if this.clock.since(at) < this.config.cache.negative_ttl =>
                {
                    this.missing_tags.insert(flight_key, (e.clone(), at));
                    return Err(e.into());
                }
                Some(FleetTag::Record(r)) if fresh(this.clock.since(r.fetched_at)) => {
                    this.keep_tag(&flight_key, &r).await;
                    return Ok(Resolved::Record(r, CacheStatus::Hit));
                }
                Some(FleetTag::Record(r))
                    if cached.as_ref().is_none_or(|c| c.fetched_at < r.fetched_at) =>
                {
                    Some(r)
                }
                _ => cached,
            };
            let result = match cached {
                None if want_body => this.fetch_tag(&up, &caller, &flight_key).await,
                cached => {
                    this.revalidate_tag(&up, &caller, &flight_key, cached, want_body)
                        .await
                }
            };
            if let Err(Error::Upstream(e @ upstream::Error::NotFound { message })) = &result {
                let now = this.clock.now();
                this.share_missing(&flight_key, message, now).await;
                this.missing_tags.insert(flight_key, (e.clone(), now));
            }
            result
        }));
        // With a cached value to fall back on, a slow upstream costs at most `stale_after`: the
        // flight runs in its own task and updates the tag when it ends.
        let (result, coalesced) = match stale {
            None => flight.await?,
            Some(record) => match tokio::time::timeout(self.config.cache.stale_after, flight).await
            {
                Ok(done) => done?,
                Err(_) => {
                    tracing::warn!(
                        upstream = %key.registry, repo = %key.repo, tag = %key.tag,
                        waited_ms = self.config.cache.stale_after.as_millis() as u64,
                        "tag revalidation is slow; serving the cached tag stale"
                    );
                    return Ok(Resolved::Record(record, CacheStatus::Stale));
                }
            },
        };
        result.map(|r| match r {
            Resolved::Record(r, s) => Resolved::Record(r, s.joined(coalesced)),
            other => other,
        })
    }

    async fn stored_manifest(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, Error> {
        self.tiers
            .local
            .manifests
            .get(digest)
            .await
            .map_err(Error::storage("reading a stored manifest"))
    }

    /// The manifest `digest` names when the mirror holds it (verified): from the store or the
    /// shared tier.
    pub(super) async fn held_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>, Error> {
        if let Some(m) = self.stored_manifest(digest).await? {
            return Ok(Some(m));
        }
        Ok(self.shared_manifest(digest).await)
    }

    /// Makes sure the manifest bytes for `digest` are stored, fetching them if needed: a
    /// `Hit` from the store or the shared tier, else a `Miss` fetched from the upstream for
    /// `repo`.
    pub(super) async fn manifest_bytes(
        &self,
        up: &Upstream,
        caller: &Caller,
        repo: &RepoName,
        digest: &Digest,
    ) -> FetchResult {
        if let Some(m) = self.held_manifest(digest).await? {
            return Ok((Fetched::Stored(m), CacheStatus::Hit));
        }
        let reference = Reference::Digest(digest.clone());
        let m = up
            .manifest(repo, caller, &reference, false, media::ACCEPT_ALL)
            .await?;
        Ok((
            self.verify_and_store(m, Some(digest)).await?,
            CacheStatus::Miss,
        ))
    }

    /// The manifest with `digest`: from the store, else fetched once (for all concurrent
    /// askers), verified and stored.
    async fn fetch_manifest(self: &Arc<Self>, target: &Target, digest: &Digest) -> FetchResult {
        if let Some(m) = self.stored_manifest(digest).await? {
            return Ok((Fetched::Stored(m), CacheStatus::Hit));
        }
        let key = (
            target.upstream.name.clone(),
            target.repo.clone(),
            digest.clone(),
        );
        let this = self.clone();
        let up = target.upstream.clone();
        let caller = target.caller.clone();
        let (repo, digest) = (target.repo.clone(), digest.clone());
        // Boxed, as every miss path here: inline, a miss's state would make every hit's
        // future kilobytes larger, and each request's future is moved into its task.
        let (result, coalesced) = Box::pin(self.manifest_flights.run(&key, || async move {
            this.manifest_bytes(&up, &caller, &repo, &digest).await
        }))
        .await?;
        result.map(|(m, s)| (m, s.joined(coalesced)))
    }

    /// Checks the bytes against the digest asked for and the upstream's header, then stores
    /// them if the mirror caches their type.
    pub(super) async fn verify_and_store(
        &self,
        m: upstream::ManifestResponse,
        expected: Option<&Digest>,
    ) -> Result<Fetched, Error> {
        let bytes = m.body.unwrap_or_default();
        let actual = Digest::sha256_of(&bytes);
        for claimed in [expected, m.digest.as_ref()].into_iter().flatten() {
            if *claimed != actual {
                return Err(self.mismatch(claimed.clone(), &actual));
            }
        }
        let manifest = Arc::new(Manifest::new(actual, m.media_type, bytes));
        if !media::is_cacheable(&manifest.media_type) {
            return Ok(Fetched::Uncacheable(manifest));
        }
        // A manifest that cannot be written is still served (the store keeps it in memory):
        // failing here would spend another pull on every retry.
        if let Err(e) = self.tiers.local.put_manifest(manifest.clone()).await {
            tracing::error!(digest = %manifest.digest, error = %e, "cannot store manifest; serving it uncached");
        }
        self.share_manifest(&manifest);
        Ok(Fetched::Stored(manifest))
    }
}
