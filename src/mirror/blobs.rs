//! Blobs: a hit from the store, else the download of the digest (started, or joined while it
//! runs), relayed from memory when the disk cannot take it. A HEAD never
//! downloads: its size comes from a download in flight or an upstream HEAD.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sha2::Digest as _;
use tracing::Instrument;

use super::ranges::OwnRanges;
use super::{Error, Mirror, Target};
use crate::download::{self, Download, Relay, Start, Subscriber};
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::outcome::{CacheStatus, ObjectKind, Tier};
use crate::ranges::{self, Requested, Resolved};
use crate::store::handle::BlobHandle;
use crate::store::tiers::Tiers;
use crate::upstream::Upstream;

/// What a blob request is answered with.
pub enum BlobAnswer {
    /// From the cache.
    Hit(BlobHandle),
    /// A download this request started (`Miss`) or joined (`Coalesced`), read as it arrives.
    Fetching {
        handle: BlobHandle,
        status: CacheStatus,
        waiter: Waiter,
        /// The ranges asked for that are fetched on their own, the download being far from
        /// them; the others are read from the download.
        own: OwnRanges,
    },
    /// A download this request started (`Passthrough`) or joined (`Coalesced`) that the disk
    /// cannot take, relayed from memory as it arrives.
    Relayed {
        relayed: Relayed,
        status: CacheStatus,
        waiter: Waiter,
    },
    /// A HEAD of a blob that is not cached: its size only.
    Size { size: u64 },
    /// In the shared tier, answered with a redirect to the object store
    /// (`storage.shared.redirect`): a presigned URL of the object, nothing else.
    Redirect { location: url::Url },
}

impl BlobAnswer {
    pub fn status(&self) -> CacheStatus {
        match self {
            BlobAnswer::Hit(_) => CacheStatus::Hit,
            BlobAnswer::Fetching { status, .. } => *status,
            BlobAnswer::Relayed { status, .. } => *status,
            BlobAnswer::Size { .. } => CacheStatus::Miss,
            BlobAnswer::Redirect { .. } => CacheStatus::Hit,
        }
    }
}

/// Counts a client reading a blob that is still downloading, for as long as it is held.
pub struct Waiter(Arc<Metrics>);

impl Waiter {
    fn new(metrics: Arc<Metrics>) -> Waiter {
        metrics.inflight_waiters.inc();
        Waiter(metrics)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.inflight_waiters.dec();
    }
}

impl Mirror {
    /// The blob `digest` of `target`'s repository.
    pub async fn blob(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobAnswer, Error> {
        self.blob_ranges(target, digest, head, &Requested::Whole)
            .await
    }

    /// The blob `digest` of `target`'s repository, for a request that asks for `requested`
    /// (the ranges of a blob not held yet are fetched as soon as they can be had).
    pub async fn blob_ranges(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        head: bool,
        requested: &Requested,
    ) -> Result<BlobAnswer, Error> {
        let answer = self.find_blob(target, digest, head, requested).await?;
        self.metrics
            .cache(target.registry(), ObjectKind::Blob, answer.status());
        Ok(answer)
    }

    async fn find_blob(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        head: bool,
        requested: &Requested,
    ) -> Result<BlobAnswer, Error> {
        let mut early = None;
        // A download that finds the blob already committed sends us back to the store once.
        for _ in 0..2 {
            if let Some(handle) = self
                .tiers
                .local
                .blobs
                .open(digest)
                .await
                .map_err(Error::storage("opening a cached blob"))?
            {
                self.confirm_link(target, digest, ObjectKind::Blob).await?;
                self.metrics.blob_source(Tier::Local);
                return Ok(BlobAnswer::Hit(self.verified(digest, handle)));
            }
            // Boxed, as every miss path here: inline, a miss's state would make every hit's
            // future kilobytes larger, and each request's future is moved into its task.
            if head {
                return Box::pin(self.blob_size(target, digest)).await;
            }
            if let Some(location) = Box::pin(self.shared_redirect(digest)).await {
                self.confirm_link(target, digest, ObjectKind::Blob).await?;
                self.metrics.blob_source(Tier::Shared);
                return Ok(BlobAnswer::Redirect { location });
            }
            if early.is_none() {
                let asked = self.early_ranges(target, digest, requested);
                early = Some(Box::pin(asked).await);
            }
            let (download, joined) = self.downloads.join(
                target.upstream.clone(),
                &target.repo,
                &target.caller,
                digest,
            );
            // A client that joined another's download waits in a span of its own, linked to
            // the download's.
            let wait = if joined {
                let wait = crate::trace::span!("download.wait", %digest);
                download.span().add_to(&wait);
                wait
            } else {
                tracing::Span::none()
            };
            match Box::pin(download.started().instrument(wait)).await {
                Start::Streaming(handle, tier) => {
                    self.link_download(target, digest, &download, tier).await?;
                    self.metrics.blob_source(tier);
                    let status = if joined {
                        CacheStatus::Coalesced
                    } else {
                        CacheStatus::Miss
                    };
                    let own = match ranges::resolve(requested, handle.size()) {
                        Resolved::Ranges(wanted) => self.own_ranges(
                            target,
                            digest,
                            &handle,
                            &wanted,
                            early.take().unwrap_or_default(),
                        ),
                        _ => OwnRanges::default(),
                    };
                    let waiter = Waiter::new(self.metrics.clone());
                    return Ok(BlobAnswer::Fetching {
                        handle,
                        status,
                        waiter,
                        own,
                    });
                }
                // Committed meanwhile, or the download's task vanished (its flight went with it,
                // so asking again starts a new one).
                Start::AlreadyCached | Start::Failed(download::Failure::Dangling) => continue,
                Start::Relaying(relay, tier) => {
                    self.link_download(target, digest, &download, tier).await?;
                    self.metrics.blob_source(tier);
                    let status = if joined {
                        CacheStatus::Coalesced
                    } else {
                        CacheStatus::Passthrough
                    };
                    return Ok(BlobAnswer::Relayed {
                        relayed: self.relayed(target, digest, relay),
                        status,
                        waiter: Waiter::new(self.metrics.clone()),
                    });
                }
                Start::Failed(f) => return Err(f.into()),
                Start::Pending(_) => return Err(Error::Abandoned("the download never started")),
            }
        }
        Err(Error::Abandoned(
            "the blob vanished right after it was committed",
        ))
    }

    /// Binds `digest` to `target`'s repository for a client of `download`, whose bytes come
    /// from `tier`. The upstream's answer to the download confirms the digest for the
    /// download's own repository, for every client of it: none of them waits for an upstream
    /// round trip of its own. Bytes from a peer or the shared tier, or a download for another
    /// repository, confirm nothing: the link is confirmed as for a cached blob.
    async fn link_download(
        &self,
        target: &Target,
        digest: &Digest,
        download: &Download,
        tier: Tier,
    ) -> Result<(), Error> {
        if tier == Tier::Upstream && download.is_for(target.registry(), &target.repo) {
            self.link(target, digest).await;
            Ok(())
        } else {
            self.confirm_link(target, digest, ObjectKind::Blob).await
        }
    }

    /// A blob found on disk at start-up is hashed once in the background; its readers' last
    /// chunk waits for the verdict.
    fn verified(&self, digest: &Digest, handle: BlobHandle) -> BlobHandle {
        if handle.is_verified() {
            return handle;
        }
        match handle.file().cloned() {
            Some(file) => {
                let progress = self.verifications.join(digest, file, handle.size());
                handle.verified_by(progress)
            }
            None => handle,
        }
    }

    /// HEAD of an uncached blob: the size from a download in progress, else from an upstream
    /// HEAD.
    async fn blob_size(&self, target: &Target, digest: &Digest) -> Result<BlobAnswer, Error> {
        if let Some(d) = self.downloads.get(digest) {
            let (size, tier) = match d.started().await {
                Start::Streaming(handle, tier) => (Some(handle.size()), tier),
                Start::Relaying(relay, tier) => (Some(relay.size()), tier),
                _ => (None, Tier::Upstream),
            };
            if let Some(size) = size {
                self.link_download(target, digest, &d, tier).await?;
                return Ok(BlobAnswer::Size { size });
            }
        }
        if let Some(size) = self.shared_size(digest).await {
            self.confirm_link(target, digest, ObjectKind::Blob).await?;
            return Ok(BlobAnswer::Size { size });
        }
        let size = target
            .upstream
            .blob_size(&target.repo, &target.caller, digest)
            .await?;
        self.link(target, digest).await;
        Ok(BlobAnswer::Size { size })
    }

    /// The size of a blob in the shared tier; `None` when it is not there or the tier cannot
    /// be asked (the upstream can still answer).
    async fn shared_size(&self, digest: &Digest) -> Option<u64> {
        self.tiers.shared_blob_size(digest).await
    }

    /// With `storage.shared.redirect`, a presigned URL for a blob the shared tier holds.
    async fn shared_redirect(&self, digest: &Digest) -> Option<url::Url> {
        let cfg = self.config.storage.shared.as_ref().filter(|c| c.redirect)?;
        self.tiers.redirect(digest, cfg.redirect_ttl).await
    }

    /// A blob for another replica (the peer endpoint): from this replica's disk, or from its
    /// download in progress, read behind the writer. Only for callers with the cluster secret.
    pub async fn peer_blob(
        self: &Arc<Self>,
        presented_secret: Option<&[u8]>,
        digest: &Digest,
    ) -> Result<BlobHandle, Error> {
        let cluster = self.cluster.as_ref().ok_or(Error::PeerUnauthorized)?;
        if !presented_secret.is_some_and(|s| cluster.authenticates(s)) {
            return Err(Error::PeerUnauthorized);
        }
        for _ in 0..2 {
            let stored = self
                .tiers
                .local
                .blobs
                .open(digest)
                .await
                .map_err(Error::storage("opening a cached blob"))?;
            if let Some(handle) = stored {
                return Ok(self.verified(digest, handle));
            }
            let Some(download) = self.downloads.get(digest) else {
                return Err(Error::PeerMissing);
            };
            match download.started().await {
                Start::Streaming(handle, tier) => {
                    if tier == Tier::Upstream {
                        // Before the first byte goes out, so that the follower's clients find
                        // the link and need not confirm it with an upstream HEAD of their own.
                        let (registry, repo) = download.origin();
                        self.share_link(registry, repo, digest).await;
                    }
                    return Ok(handle);
                }
                Start::AlreadyCached => continue,
                _ => return Err(Error::PeerMissing),
            }
        }
        Err(Error::PeerMissing)
    }

    /// One client's view of a relay: its place is held from the start of the blob until its
    /// body says which range it wants, so bytes it may ask for are not dropped meanwhile.
    fn relayed(&self, target: &Target, digest: &Digest, relay: Arc<Relay>) -> Relayed {
        Relayed {
            held: relay.subscribe(0),
            relay,
            upstream: target.upstream.clone(),
            repo: target.repo.clone(),
            caller: target.caller.clone(),
            digest: digest.clone(),
            tiers: self.tiers.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// A blob the disk cannot take, for one client: the bytes come from the download's relay
/// while it has them, else from a stream of the client's own, from where it is (the shared
/// tier when it holds the blob, so a full disk on one replica does not cost the upstream what
/// the fleet already has, else the upstream, with a `Range`).
pub struct Relayed {
    relay: Arc<Relay>,
    held: Option<Subscriber>,
    upstream: Arc<Upstream>,
    repo: RepoName,
    caller: Caller,
    digest: Digest,
    tiers: Arc<Tiers>,
    metrics: Arc<Metrics>,
}

impl Relayed {
    pub fn size(&self) -> u64 {
        self.relay.size()
    }

    /// The bytes `start..end`. A whole blob is verified on the way: a mismatch cuts the
    /// response before its last chunk. A range cannot be checked against the digest (its
    /// client checks the whole it puts together).
    pub fn stream(mut self, start: u64, end: u64) -> BoxStream<'static, io::Result<Bytes>> {
        let size = self.size();
        // Subscribed before the held place goes, so the window cannot pass `start` between.
        let from = match self.held.take() {
            Some(held) if start == 0 => Some(held),
            _ => self.relay.subscribe(start),
        };
        let digest = self.digest.clone();
        let state = (self, start, from.map(Origin::Relay));
        let chunks = stream::try_unfold(state, move |(this, mut pos, mut from)| async move {
            while pos < end {
                let chunk = match &mut from {
                    Some(Origin::Relay(sub)) => sub.next(end).await,
                    Some(Origin::Own(own)) => match own.next().await.transpose()? {
                        Some(c) => Some(c.slice(..c.len().min((end - pos) as usize))),
                        None => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("the body ended at {pos} of {size} bytes"),
                            ))
                        }
                    },
                    None => None,
                };
                match chunk {
                    Some(c) if !c.is_empty() => {
                        pos += c.len() as u64;
                        return Ok(Some((c, (this, pos, from))));
                    }
                    Some(_) => {}
                    // The relay went past this client, or stopped: on its own from here.
                    None => from = Some(Origin::Own(this.own(pos).await?)),
                }
            }
            Ok(None)
        });
        if start == 0 && end == size {
            verified(chunks, digest, size).boxed()
        } else {
            chunks.boxed()
        }
    }

    /// The blob from `offset`, for this client alone.
    async fn own(&self, offset: u64) -> io::Result<BoxStream<'static, io::Result<Bytes>>> {
        if let Some(blob) = self.tiers.shared_blob(&self.digest, offset).await {
            if blob.size == self.size() {
                return Ok(blob.chunks.map(|c| c.map_err(io::Error::other)).boxed());
            }
        }
        let body = self
            .upstream
            .blob(&self.repo, &self.caller, &self.digest, offset, None)
            .await
            .map_err(io::Error::other)?;
        if body.size != self.size() {
            return Err(io::Error::other(format!(
                "the upstream answered size {} for a blob of {} bytes",
                body.size,
                self.size()
            )));
        }
        let metrics = self.metrics.clone();
        let upstream = self.upstream.name.clone();
        let chunks = body
            .into_chunks()
            .map_err(io::Error::other)
            .inspect_ok(move |c| metrics.upstream_bytes(&upstream, c.len() as u64));
        Ok(chunks.boxed())
    }
}

/// Where a relayed client's bytes come from.
enum Origin {
    Relay(Subscriber),
    Own(BoxStream<'static, io::Result<Bytes>>),
}

/// Hashes a stream that carries a whole blob, holding back its last chunk until the hash is
/// known: a mismatch (or a wrong length) becomes an error in place of that chunk.
fn verified(
    inner: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
    digest: Digest,
    len: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    struct State<S> {
        inner: std::pin::Pin<Box<S>>,
        hasher: sha2::Sha256,
        seen: u64,
        digest: Digest,
        len: u64,
    }
    let state = State {
        inner: Box::pin(inner),
        hasher: sha2::Sha256::new(),
        seen: 0,
        digest,
        len,
    };
    stream::try_unfold(state, |mut st| async move {
        let Some(chunk) = st.inner.next().await.transpose()? else {
            if st.seen != st.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the body ended at {} of {} bytes", st.seen, st.len),
                ));
            }
            return Ok(None);
        };
        st.hasher.update(&chunk);
        st.seen += chunk.len() as u64;
        if st.seen >= st.len {
            let actual = Digest::from_sha256(std::mem::take(&mut st.hasher).finalize().into());
            if st.seen != st.len || actual != st.digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("content does not match {}", st.digest),
                ));
            }
        }
        Ok(Some((chunk, st)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    fn chunks(parts: &[&'static [u8]]) -> impl futures_util::Stream<Item = io::Result<Bytes>> {
        stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn a_verified_stream_passes_matching_bytes() {
        let digest = Digest::sha256_of(b"hello world");
        let got: Vec<Bytes> = verified(chunks(&[b"hello ", b"world"]), digest, 11)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got.concat(), b"hello world");
    }

    #[tokio::test]
    async fn a_verified_stream_fails_on_its_last_chunk_when_the_digest_differs() {
        let digest = Digest::sha256_of(b"hello world");
        let mut s = Box::pin(verified(chunks(&[b"hello ", b"wOrld"]), digest, 11));
        assert!(s.next().await.unwrap().is_ok());
        assert!(s.next().await.unwrap().is_err(), "last chunk withheld");
    }

    #[tokio::test]
    async fn a_verified_stream_fails_when_the_body_ends_short() {
        let digest = Digest::sha256_of(b"hello world");
        let result: io::Result<Vec<Bytes>> = verified(chunks(&[b"hello "]), digest, 11)
            .try_collect()
            .await;
        assert!(result.is_err());
    }
}
