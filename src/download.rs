//! Blob downloads: one upstream fetch per digest, streamed to every client that asks while it
//! runs, resumed when the upstream cuts it, verified before it is committed.
//!
//! The leader's work runs in its own task, so clients may come and go (the first included)
//! without cancelling it. The bytes go to a temp file; clients read that file behind the
//! writer, woken by a watch channel on each write. Every way a download can end is an
//! [`Outcome`], logged by name.
//!
//! With replicas, the bytes come from the first tier that has them ([`Feed`]): the shared
//! object store, else the replica holding the cluster-wide lease on the digest (streamed from
//! its peer endpoint while it downloads), else the upstream, once this replica holds the lease.
//! A feed that breaks is replaced by the next one from the same offset: a lease holder that
//! dies is taken over when its lease expires. The lease holder tees the bytes into a multipart
//! upload to the shared tier, completed only once the blob is verified and the lease is
//! still held.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, StreamExt};
use futures_util::FutureExt;
use tokio::sync::watch;

use crate::cluster::eviction::{self, Eviction};
use crate::cluster::peer::{Patience, PeerError};
use crate::cluster::{Claimed, Cluster, LeaseGuard};
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::outcome::Tier;
use crate::shared::{self, SharedTier, Upload};
use crate::singleflight::{Flights, Joined};
use crate::store::handle::BlobHandle;
use crate::store::writer::{BlobWriter, Finished};
use crate::store::Store;
use crate::upstream::{self, Upstream};

/// Ready chunks are gathered up to this size before one write, so a fast upstream does not
/// cost a write per network packet, while a slow one is written as soon as anything arrives.
const WRITE_BATCH: usize = 1024 * 1024;

/// What a client waiting for a download learns once the upstream has answered.
#[derive(Clone)]
pub enum Start {
    /// Waiting for the upstream's response headers.
    Pending,
    /// The body is arriving (first from `tier`): read it through this handle, which follows
    /// the writer.
    Streaming(BlobHandle, Tier),
    /// The blob was committed by someone else before this download began: read the store.
    AlreadyCached,
    /// The disk cannot take the blob: each client streams from the upstream, uncached.
    NoSpace,
    /// The download failed before any byte could be served.
    Failed(Failure),
}

/// Why a download failed, as its waiters are told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Upstream(upstream::Error),
    #[error("upstream blob does not match {expected} (got {actual})")]
    DigestMismatch { expected: Digest, actual: String },
    #[error("cannot write the blob to the cache: {0}")]
    Storage(Arc<io::Error>),
    #[error("the download task panicked")]
    Panicked,
    /// Another tier (a peer, the shared store) broke off, too often.
    #[error("the download was cut: {0}")]
    Cut(#[source] Cut),
    /// A tier answered a resume with another size than the blob's.
    #[error("the {} answered size {actual} for a blob of {expected} bytes", tier.label())]
    SizeChanged {
        tier: Tier,
        expected: u64,
        actual: u64,
    },
    /// This client waited for the download's first byte as long as its upstream's
    /// `first_byte_timeout` allows; the download goes on for the others.
    #[error("timed out waiting for the download of the blob from {upstream}")]
    WaitTimeout { upstream: String },
    /// The download's task vanished without an outcome (aborted): a new one may start.
    #[error("the download ended without an outcome")]
    Dangling,
}

/// How a download ended. Each is logged; none is left implicit.
#[derive(Debug)]
enum Outcome {
    /// Verified and published in the store.
    Committed { size: u64, resumes: u32 },
    /// Verified and streamed, but larger than the cache bound, so not kept.
    TooLargeToKeep { size: u64 },
    /// Not enough disk space: clients were sent to stream from the upstream directly.
    NoSpace { size: u64 },
    /// Another download committed it first.
    AlreadyCached,
    /// The upstream answered with an error before the body.
    Refused(upstream::Error),
    /// The body was cut more often than `resume_attempts` allows.
    ResumesExhausted { written: u64, last: Cut },
    /// The bytes did not hash to the digest, or had the wrong length.
    DigestMismatch { actual: String },
    /// The upstream's answer cannot be used (no length, wrong range).
    Protocol(upstream::Error),
    /// A resume from `tier` answered another size than the blob's.
    SizeChanged {
        tier: Tier,
        expected: u64,
        actual: u64,
    },
    /// Writing the temp file or committing it failed.
    Storage(io::Error),
    /// The download task panicked.
    Panicked,
}

pub struct Download {
    /// The leader's task holds the sender: a closed channel means that task is gone.
    start: watch::Receiver<Start>,
    /// The most a client waits for the download's first byte.
    wait_limit: Duration,
    /// The upstream and repository it was started for: an upstream answer to it confirms the
    /// digest for that repository only.
    upstream: String,
    repo: RepoName,
}

impl Download {
    fn new(upstream: &Upstream, repo: &RepoName) -> (Download, watch::Sender<Start>) {
        let (tx, rx) = watch::channel(Start::Pending);
        let download = Download {
            start: rx,
            wait_limit: upstream.config().first_byte_timeout,
            upstream: upstream.name.clone(),
            repo: repo.clone(),
        };
        (download, tx)
    }

    /// Whether it was started for `repo` of the upstream named `upstream`.
    pub fn is_for(&self, upstream: &str, repo: &RepoName) -> bool {
        self.upstream == upstream && self.repo == *repo
    }

    /// The upstream and repository it was started for.
    pub fn origin(&self) -> (&str, &RepoName) {
        (&self.upstream, &self.repo)
    }

    /// Waits for the download's first answer, at most the upstream's `first_byte_timeout`
    /// (as Pingora's cache lock, every way the wait ends is named: an answer,
    /// [`Failure::WaitTimeout`], or [`Failure::Dangling`] when the leader's task is gone).
    pub async fn started(&self) -> Start {
        let mut rx = self.start.clone();
        let waited = tokio::time::timeout(
            self.wait_limit,
            rx.wait_for(|s| !matches!(s, Start::Pending)),
        )
        .await;
        match waited {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) => Start::Failed(Failure::Dangling),
            Err(_) => Start::Failed(Failure::WaitTimeout {
                upstream: self.upstream.clone(),
            }),
        }
    }
}

/// A download in progress, as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InFlight {
    pub digest: String,
    /// Bytes written to the cache so far.
    pub written: u64,
    /// The blob's size, once the upstream has answered.
    pub size: Option<u64>,
}

impl Download {
    fn in_flight(&self, digest: &Digest) -> InFlight {
        let (written, size) = match &*self.start.borrow() {
            Start::Streaming(handle, _) => {
                let size = handle.size();
                let written = match handle.clone().into_parts().1 {
                    Some(rx) => match &*rx.borrow() {
                        crate::store::handle::Progress::Writing { written } => *written,
                        crate::store::handle::Progress::Complete => size,
                        crate::store::handle::Progress::Failed(_) => 0,
                    },
                    None => size,
                };
                (written, Some(size))
            }
            _ => (0, None),
        };
        InFlight {
            digest: digest.to_string(),
            written,
            size,
        }
    }
}

/// The in-flight download table and what a download needs.
pub struct Downloads {
    flights: Flights<Digest, Download>,
    store: Arc<Store>,
    shared: Option<Arc<SharedTier>>,
    cluster: Option<Arc<Cluster>>,
    eviction: Option<Arc<Eviction>>,
    metrics: Arc<Metrics>,
}

impl Downloads {
    pub fn new(
        store: Arc<Store>,
        shared: Option<Arc<SharedTier>>,
        cluster: Option<Arc<Cluster>>,
        eviction: Option<Arc<Eviction>>,
        metrics: Arc<Metrics>,
    ) -> Downloads {
        Downloads {
            flights: Flights::default(),
            store,
            shared,
            cluster,
            eviction,
            metrics,
        }
    }

    /// Joins the download of `digest`, starting it if none runs. Returns whether this caller
    /// joined an existing one.
    pub fn join(
        &self,
        upstream: Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> (Arc<Download>, bool) {
        let mut sender = None;
        let joined = self.flights.join_or_start(digest, || {
            let (download, tx) = Download::new(&upstream, repo);
            sender = Some(tx);
            download
        });
        match (joined, sender) {
            (Joined::Follower(d), _) => (d, true),
            // `start` ran: the sender is there.
            (Joined::Leader(d, guard), sender) => {
                let start = Arc::new(sender.unwrap_or_else(|| watch::channel(Start::Pending).0));
                let job = Job {
                    start: start.clone(),
                    upstream,
                    repo: repo.clone(),
                    digest: digest.clone(),
                    store: self.store.clone(),
                    shared: self.shared.clone(),
                    cluster: self.cluster.clone(),
                    eviction: self.eviction.clone(),
                    metrics: self.metrics.clone(),
                };
                let metrics = self.metrics.clone();
                metrics.inflight_downloads.inc();
                tokio::spawn(async move {
                    let (digest, repo, up) = (
                        job.digest.clone(),
                        job.repo.clone(),
                        job.upstream.name.clone(),
                    );
                    let started = Instant::now();
                    let outcome = std::panic::AssertUnwindSafe(job.run())
                        .catch_unwind()
                        .await
                        .unwrap_or(Outcome::Panicked);
                    // Make sure no waiter is left waiting, whatever happened.
                    let outcome = finish_waiters(&start, outcome, &digest);
                    drop(guard);
                    metrics.inflight_downloads.dec();
                    log_outcome(&outcome, &up, &repo, &digest, started);
                });
                (d, false)
            }
        }
    }

    /// The download of `digest` in progress, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Download>> {
        self.flights.get(digest)
    }

    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// The downloads in progress, with how far each has got.
    pub fn progress(&self) -> Vec<InFlight> {
        let mut all: Vec<InFlight> = self
            .flights
            .snapshot()
            .iter()
            .map(|(digest, d)| d.in_flight(digest))
            .collect();
        all.sort_by(|a, b| a.digest.cmp(&b.digest));
        all
    }
}

fn finish_waiters(start: &watch::Sender<Start>, outcome: Outcome, digest: &Digest) -> Outcome {
    let failure = match &outcome {
        Outcome::Committed { .. }
        | Outcome::AlreadyCached
        | Outcome::TooLargeToKeep { .. }
        | Outcome::NoSpace { .. } => return outcome,
        Outcome::Refused(e) | Outcome::Protocol(e) => Failure::Upstream(e.clone()),
        Outcome::ResumesExhausted { last, .. } => match last {
            Cut::Upstream(e) => Failure::Upstream(e.clone()),
            other => Failure::Cut(other.clone()),
        },
        Outcome::SizeChanged {
            tier,
            expected,
            actual,
        } => Failure::SizeChanged {
            tier: *tier,
            expected: *expected,
            actual: *actual,
        },
        Outcome::DigestMismatch { actual } => Failure::DigestMismatch {
            expected: digest.clone(),
            actual: actual.clone(),
        },
        Outcome::Storage(e) => Failure::Storage(Arc::new(io::Error::new(e.kind(), e.to_string()))),
        Outcome::Panicked => Failure::Panicked,
    };
    // Readers of the body learn it from the writer (dropped with the job); waiters for the
    // start learn it here.
    start.send_if_modified(|s| {
        if matches!(s, Start::Pending) {
            *s = Start::Failed(failure);
            true
        } else {
            false
        }
    });
    outcome
}

fn log_outcome(
    outcome: &Outcome,
    upstream: &str,
    repo: &RepoName,
    digest: &Digest,
    started: Instant,
) {
    let ms = started.elapsed().as_millis() as u64;
    match outcome {
        Outcome::Committed { size, resumes } => {
            tracing::info!(upstream, %repo, %digest, size, resumes, ms, "blob download committed")
        }
        Outcome::AlreadyCached => tracing::debug!(%digest, "blob was already cached"),
        Outcome::TooLargeToKeep { size } => {
            tracing::warn!(upstream, %repo, %digest, size, "blob is larger than storage.max_size; served but not kept")
        }
        Outcome::NoSpace { size } => {
            tracing::debug!(upstream, %repo, %digest, size, "no disk space; clients stream uncached")
        }
        Outcome::Refused(e) => {
            tracing::info!(upstream, %repo, %digest, error = %e, "blob download refused")
        }
        Outcome::ResumesExhausted { written, last } => {
            tracing::warn!(upstream, %repo, %digest, written, error = %last, "blob download cut too often; not cached")
        }
        Outcome::DigestMismatch { actual } => {
            tracing::error!(upstream, %repo, %digest, %actual, "upstream blob does not match its digest; discarded")
        }
        Outcome::Protocol(e) => {
            tracing::warn!(upstream, %repo, %digest, error = %e, "unusable upstream blob response")
        }
        Outcome::SizeChanged {
            tier,
            expected,
            actual,
        } => {
            tracing::warn!(upstream, %repo, %digest, tier = tier.label(), expected, actual, "a resume answered another size; not cached")
        }
        Outcome::Storage(e) => {
            tracing::error!(upstream, %repo, %digest, error = %e, "cannot write blob to the cache")
        }
        Outcome::Panicked => tracing::error!(%digest, "blob download task panicked"),
    }
}

struct Job {
    start: Arc<watch::Sender<Start>>,
    upstream: Arc<Upstream>,
    repo: RepoName,
    digest: Digest,
    store: Arc<Store>,
    shared: Option<Arc<SharedTier>>,
    cluster: Option<Arc<Cluster>>,
    eviction: Option<Arc<Eviction>>,
    metrics: Arc<Metrics>,
}

/// A blob's bytes from one tier, from some offset on.
struct Feed {
    tier: Tier,
    /// The whole blob's length, as this tier knows it.
    size: u64,
    chunks: BoxStream<'static, Result<Bytes, Cut>>,
}

impl Feed {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, Cut> {
        self.chunks.next().await.transpose()
    }

    /// A chunk that has already arrived, without waiting: `Ok(None)` for none yet, and
    /// `Ok(Some(None))` at the end.
    fn ready_chunk(&mut self) -> Result<Option<Option<Bytes>>, Cut> {
        match self.chunks.next().now_or_never() {
            None => Ok(None),
            Some(None) => Ok(Some(None)),
            Some(Some(r)) => r.map(|c| Some(Some(c))),
        }
    }
}

/// Why a feed stopped before the blob's end, naming the tier that stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Cut {
    #[error(transparent)]
    Upstream(upstream::Error),
    #[error(transparent)]
    Shared(shared::Error),
    #[error("peer {peer}: {source}")]
    Peer {
        peer: String,
        #[source]
        source: PeerError,
    },
    /// The tier's body ended early, without an error.
    #[error("the {} body ended at {written} of {size} bytes", tier.label())]
    Short { tier: Tier, written: u64, size: u64 },
}

impl Cut {
    /// Whether the upstream broke off: only that counts against `resume_attempts` (a peer or
    /// the shared tier is replaced by the next tier instead).
    fn is_upstream(&self) -> bool {
        matches!(
            self,
            Cut::Upstream(_)
                | Cut::Short {
                    tier: Tier::Upstream,
                    ..
                }
        )
    }
}

/// What a download keeps across feeds.
#[derive(Default)]
struct Sources {
    lease: Option<LeaseGuard>,
    /// A peer served some of the bytes: a lease taken after that is a takeover.
    followed_peer: bool,
    /// Whether this replica held the lease (or had no coordinator) from the first byte: only
    /// then did it see every byte go by for the shared tier.
    teeing: bool,
    peer_failures: u32,
    /// The shared store broke off once: not asked again during this download.
    skip_shared: bool,
    /// Coordination gave no usable peer: fetch from the upstream without a lease.
    alone: bool,
}

/// Attempts at a peer before fetching without it: with a pause of a fifth of the lease TTL
/// between them, twice the TTL, by which a dead holder's lease has expired.
const PEER_ATTEMPTS: u32 = 10;

/// The answer to opening the next feed.
enum Opened {
    Feed(Feed),
    /// Worth trying again shortly.
    Retry(Cut),
    Fatal(Outcome),
}

impl Job {
    async fn run(self) -> Outcome {
        match self.store.blobs.open(&self.digest).await {
            Ok(Some(_)) => {
                self.start.send_replace(Start::AlreadyCached);
                return Outcome::AlreadyCached;
            }
            Ok(None) => {}
            Err(e) => return Outcome::Storage(e),
        }
        let mut sources = Sources::default();
        let asked = Instant::now();
        let mut attempts = 0u32;
        let mut feed = loop {
            match self.open(0, &mut sources).await {
                Opened::Feed(f) => break f,
                Opened::Fatal(outcome) => return outcome,
                Opened::Retry(cut) => {
                    if cut.is_upstream() {
                        if attempts >= self.upstream.config().resume_attempts {
                            return Outcome::ResumesExhausted {
                                written: 0,
                                last: cut,
                            };
                        }
                        attempts += 1;
                    }
                    tracing::info!(upstream = %self.upstream.name, digest = %self.digest, attempt = attempts, error = %cut, "retrying blob download");
                    self.pause(&cut, attempts).await;
                }
            }
        };
        if feed.tier == Tier::Upstream {
            self.metrics.miss_first_byte(asked.elapsed());
        }
        sources.teeing = sources.lease.is_some() || sources.alone || self.cluster.is_none();
        let size = feed.size;
        if !self.make_room(size).await {
            self.metrics.no_space();
            self.start.send_replace(Start::NoSpace);
            return Outcome::NoSpace { size };
        }
        let mut writer = match self.store.blob_writer().await {
            Ok(w) => w,
            Err(e) => return self.storage_failed(e),
        };
        self.start
            .send_replace(Start::Streaming(writer.reader(size), feed.tier));
        let mut upload = match (&self.shared, feed.tier) {
            (Some(tier), t) if t != Tier::Shared && sources.teeing => {
                Some(tier.upload(&self.digest))
            }
            _ => None,
        };

        let mut resumes = 0u32;
        loop {
            let mut cut = match self
                .copy_body(&mut feed, &mut writer, upload.as_mut(), size)
                .await
            {
                Ok(()) if writer.written() == size => break,
                Ok(()) => Cut::Short {
                    tier: feed.tier,
                    written: writer.written(),
                    size,
                },
                Err(CopyError::Cut(e)) => e,
                Err(CopyError::TooLong) => return self.mismatch(format!("more than {size} bytes")),
                Err(CopyError::Storage(e)) => return self.storage_failed(e),
            };
            if feed.tier == Tier::Shared {
                sources.skip_shared = true;
            }
            feed = loop {
                if cut.is_upstream() {
                    if resumes >= self.upstream.config().resume_attempts {
                        return Outcome::ResumesExhausted {
                            written: writer.written(),
                            last: cut,
                        };
                    }
                    resumes += 1;
                    self.metrics.resume();
                }
                tracing::info!(upstream = %self.upstream.name, digest = %self.digest, offset = writer.written(), attempt = resumes, error = %cut, "resuming cut blob download");
                match self.open(writer.written(), &mut sources).await {
                    Opened::Feed(f) if f.size == size => break f,
                    Opened::Feed(f) => {
                        return Outcome::SizeChanged {
                            tier: f.tier,
                            expected: size,
                            actual: f.size,
                        }
                    }
                    Opened::Fatal(outcome) => return outcome,
                    Opened::Retry(e) => {
                        self.pause(&e, resumes).await;
                        cut = e;
                    }
                }
            };
        }
        let finished = writer.finish(&self.digest, size).await;
        let kept = matches!(
            finished,
            Ok(Finished::Published) | Ok(Finished::TooLargeToKeep)
        );
        if kept {
            self.publish(upload, sources, size).await;
        } else if feed.tier == Tier::Shared || sources.skip_shared {
            self.forget_shared().await;
        }
        match finished {
            Ok(Finished::Published) => Outcome::Committed { size, resumes },
            Ok(Finished::TooLargeToKeep) => Outcome::TooLargeToKeep { size },
            Ok(Finished::Mismatch { actual }) => self.mismatch(actual.to_string()),
            Err(e) => self.storage_failed(e),
        }
    }

    /// The blob from `offset` from the shared tier, when it holds it. A failure marks the tier
    /// skipped for the rest of this download.
    async fn shared_feed(&self, offset: u64, sources: &mut Sources) -> Option<Feed> {
        let (Some(tier), false) = (&self.shared, sources.skip_shared) else {
            return None;
        };
        let read = eviction::read_blob(self.eviction.as_deref(), tier, &self.digest, offset);
        let b = match read.await {
            Ok(b) => b?,
            Err(e) => {
                self.metrics.shared_error();
                tracing::warn!(digest = %self.digest, error = %e, "shared tier unavailable; fetching elsewhere");
                sources.skip_shared = true;
                return None;
            }
        };
        let chunks = b.chunks.map(|c| c.map_err(Cut::Shared)).boxed();
        Some(Feed {
            tier: Tier::Shared,
            size: b.size,
            chunks,
        })
    }

    /// The next feed from `offset`: the shared tier, else the lease holder's peer endpoint,
    /// else the upstream (taking the lease first, when there is a coordinator).
    async fn open(&self, offset: u64, sources: &mut Sources) -> Opened {
        if let Some(feed) = self.shared_feed(offset, sources).await {
            return Opened::Feed(feed);
        }
        if let (Some(cluster), None, false) = (&self.cluster, &sources.lease, sources.alone) {
            match cluster.claim_download(&self.digest).await {
                Claimed::Acquired(lease) => {
                    if sources.followed_peer {
                        self.metrics.lease_taken_over();
                        tracing::info!(digest = %self.digest, offset, "took over a download whose lease holder stopped");
                    }
                    sources.lease = Some(lease);
                    // The previous holder may have published it between the look above and
                    // the release of its lease: look again before asking the upstream.
                    if let Some(feed) = self.shared_feed(offset, sources).await {
                        return Opened::Feed(feed);
                    }
                }
                Claimed::Held { peer } => {
                    sources.followed_peer = true;
                    let patience = Patience {
                        first_byte: self.upstream.config().first_byte_timeout,
                        idle: self.upstream.config().idle_timeout,
                    };
                    let asked = cluster.peers().blob(&peer, &self.digest, offset, patience);
                    match asked.await {
                        Ok(b) => {
                            sources.peer_failures = 0;
                            let holder = peer.clone();
                            let chunks = b
                                .chunks
                                .map(move |c| {
                                    c.map_err(|source| Cut::Peer {
                                        peer: holder.clone(),
                                        source,
                                    })
                                })
                                .boxed();
                            return Opened::Feed(Feed {
                                tier: Tier::Peer,
                                size: b.size,
                                chunks,
                            });
                        }
                        Err(e) => {
                            sources.peer_failures += 1;
                            if sources.peer_failures >= PEER_ATTEMPTS {
                                tracing::warn!(digest = %self.digest, %peer, error = %e, "the lease holder cannot be streamed from; fetching from the upstream alone");
                                sources.alone = true;
                            }
                            return Opened::Retry(Cut::Peer { peer, source: e });
                        }
                    }
                }
                Claimed::Alone => sources.alone = true,
            }
        }
        match self.upstream.blob(&self.repo, &self.digest, offset).await {
            Ok(body) => {
                let size = body.size;
                let chunks = stream::try_unfold(body, |mut body| async move {
                    let chunk = body.next_chunk().await.map_err(Cut::Upstream)?;
                    Ok(chunk.map(|c| (c, body)))
                })
                .boxed();
                Opened::Feed(Feed {
                    tier: Tier::Upstream,
                    size,
                    chunks,
                })
            }
            Err(e @ upstream::Error::Protocol { .. }) => Opened::Fatal(Outcome::Protocol(e)),
            // A failure before the headers is retried like a cut body: the connection or the
            // upstream may be back at once.
            Err(e) if e.is_outage() && !matches!(e, upstream::Error::BackingOff { .. }) => {
                Opened::Retry(Cut::Upstream(e))
            }
            Err(e) => Opened::Fatal(Outcome::Refused(e)),
        }
    }

    async fn pause(&self, cut: &Cut, attempt: u32) {
        let wait = match (cut.is_upstream(), &self.cluster) {
            (false, Some(cluster)) => cluster.lease_ttl() / 5,
            _ => Duration::from_millis(100 * u64::from(attempt.max(1))),
        };
        tokio::time::sleep(wait).await;
    }

    /// Publishes the verified blob to the shared tier: the tee'd upload is completed if the
    /// lease is still ours; a download taken over midway uploads the committed file instead,
    /// still under its lease.
    async fn publish(&self, upload: Option<Upload>, sources: Sources, size: u64) {
        let Some(tier) = &self.shared else { return };
        let fenced = match &sources.lease {
            Some(lease) => lease.confirm().await,
            None => true,
        };
        if !fenced {
            tracing::warn!(digest = %self.digest, "lease lost before publication; not published to the shared tier");
            return;
        }
        if let Some(upload) = upload {
            match upload.complete().await {
                Ok(()) => {
                    tracing::debug!(digest = %self.digest, "published to the shared tier");
                    if let Some(eviction) = &self.eviction {
                        eviction.published(shared::Kind::Blob, &self.digest, size);
                    }
                }
                // Down: counted and logged once, when it went down.
                Err(e) if e.is_down() => {}
                Err(e) => {
                    self.metrics.shared_error();
                    tracing::warn!(digest = %self.digest, error = %e, "cannot publish to the shared tier");
                }
            }
            return;
        }
        if sources.lease.is_none() {
            return;
        }
        let handle = match self.store.blobs.open(&self.digest).await {
            Ok(Some(h)) => h,
            _ => return,
        };
        let (tier, digest, metrics) = (tier.clone(), self.digest.clone(), self.metrics.clone());
        let eviction = self.eviction.clone();
        let lease = sources.lease;
        tokio::spawn(async move {
            let mut upload = tier.upload(&digest);
            let (reader, _) = handle.clone().into_parts();
            let mut offset = 0u64;
            while offset < handle.size() {
                let len = (handle.size() - offset).min(WRITE_BATCH as u64) as usize;
                match reader.read_at(offset, len).await {
                    Ok(chunk) => {
                        offset += chunk.len() as u64;
                        upload.write(chunk).await;
                    }
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "cannot read the blob back for the shared tier");
                        return;
                    }
                }
            }
            let still_ours = match &lease {
                Some(l) => l.confirm().await,
                None => true,
            };
            if still_ours {
                match upload.complete().await {
                    Ok(()) => {
                        if let Some(eviction) = eviction {
                            eviction.published(shared::Kind::Blob, &digest, size);
                        }
                    }
                    // Down: counted and logged once, when it went down.
                    Err(e) if e.is_down() => {}
                    Err(e) => {
                        metrics.shared_error();
                        tracing::warn!(%digest, error = %e, "cannot publish to the shared tier");
                    }
                }
            }
            drop(lease);
        });
    }

    /// A blob read from the shared tier did not verify: it must not be served again.
    async fn forget_shared(&self) {
        if let Some(tier) = &self.shared {
            tracing::error!(digest = %self.digest, "shared-tier object does not match its digest; deleted");
            if let Err(e) = tier.delete(shared::Kind::Blob, &self.digest).await {
                tracing::warn!(digest = %self.digest, error = %e, "cannot delete a corrupt shared-tier object");
            }
        }
    }

    async fn make_room(&self, size: u64) -> bool {
        self.store.make_room(size).await
    }

    fn storage_failed(&self, e: io::Error) -> Outcome {
        if self.store.note_write_failure(&e) {
            self.metrics.no_space();
        }
        Outcome::Storage(e)
    }

    fn mismatch(&self, actual: String) -> Outcome {
        self.metrics.digest_mismatch();
        Outcome::DigestMismatch { actual }
    }

    /// Copies the feed into the writer (and the shared-tier upload) until it ends or fails;
    /// ready chunks are batched.
    async fn copy_body(
        &self,
        feed: &mut Feed,
        writer: &mut BlobWriter,
        mut upload: Option<&mut Upload>,
        size: u64,
    ) -> Result<(), CopyError> {
        loop {
            let first = feed.next_chunk().await.map_err(CopyError::Cut)?;
            let Some(first) = first else { return Ok(()) };
            let mut batch = BytesMut::from(&first[..]);
            let mut ended = false;
            let mut failed = None;
            // Take whatever else is already buffered, without waiting.
            while batch.len() < WRITE_BATCH {
                match feed.ready_chunk() {
                    Ok(Some(Some(b))) => batch.extend_from_slice(&b),
                    Ok(Some(None)) => {
                        ended = true;
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // What arrived before a cut is kept: the resume starts after it.
            let batch = batch.freeze();
            self.write(writer, batch.clone(), size, feed.tier).await?;
            if let Some(upload) = upload.as_deref_mut() {
                upload.write(batch).await;
            }
            if let Some(e) = failed {
                return Err(CopyError::Cut(e));
            }
            if ended {
                return Ok(());
            }
        }
    }

    async fn write(
        &self,
        writer: &mut BlobWriter,
        chunk: Bytes,
        size: u64,
        tier: Tier,
    ) -> Result<(), CopyError> {
        let len = chunk.len() as u64;
        if writer.written() + len > size {
            return Err(CopyError::TooLong);
        }
        if tier == Tier::Upstream {
            self.metrics.upstream_bytes(&self.upstream.name, len);
        }
        writer.write(chunk).await.map_err(CopyError::Storage)
    }
}

enum CopyError {
    Cut(Cut),
    TooLong,
    Storage(io::Error),
}
