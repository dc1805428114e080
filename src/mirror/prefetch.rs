//! Prefetch: serving one platform's image manifest with a `GET` starts the downloads of that
//! image's config and layers the mirror does not hold, in the background, so that a client
//! asking for them (dockerd: 3 at a time, each only when it asks) finds them downloaded or
//! downloading and joins them. An index triggers nothing: other platforms are never fetched.
//!
//! Each blob is a task queued for one of `cache.prefetch_concurrency` slots (first come, first
//! served, so an image's blobs start in its manifest's order: config, then layers bottom up).
//! With a slot it looks again (held? downloading? room on disk? a request slot of the upstream
//! to spare?) and joins the download as a client's miss does (`Downloads::join`): a client
//! asking meanwhile joins it, and a blob is never fetched twice. It keeps its slot until that
//! download ends, so the slots bound the prefetch downloads. Clients never wait for a slot:
//! they start their own downloads, which a prefetch coming later finds in flight.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;

use super::{Mirror, Target};
use crate::download::Start;
use crate::image::{Blob, Listing};
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::outcome::{Prefetched, Tier};
use crate::store::handle::{BlobHandle, Progress};
use crate::store::index::Key;
use crate::upstream::{health, Upstream};

/// The most blobs queued or running at once; more are skipped. Far more than one image has:
/// room for the images of a fleet's first pulls at once.
const QUEUE: usize = 1024;

/// The most a prefetch waits for a slot, and then for the end of the download it started
/// (which goes on without it). Long: a download ends on its own (its stalls are bounded by
/// `idle_timeout`); this only bounds what a queued or running prefetch holds.
const DEADLINE: Duration = Duration::from_secs(10 * 60);

/// The prefetch service of a [`Mirror`]: its slots, and what is queued.
pub(super) struct Prefetch {
    /// `cache.prefetch_concurrency`; `None` when it is 0 (prefetch off everywhere).
    slots: Option<Arc<Semaphore>>,
    /// The digests queued or running, so a second trigger does not queue them twice.
    pending: Arc<Mutex<crate::hashing::Set<Digest>>>,
    /// Per upstream, the prefetch downloads started that have not had their first answer yet:
    /// they may not hold their request slot yet, but will.
    starting: Arc<Mutex<HashMap<String, usize>>>,
    /// The manifests whose blobs were looked at lately, and when: served again within
    /// [`LOOKED_AT`], a manifest is not parsed again (a warm manifest hit stays as cheap as it
    /// was; its blobs were queued, found held or found downloading a moment ago).
    looked_at: Mutex<crate::hashing::Map<Digest, SystemTime>>,
}

/// How long a manifest's blobs are not looked at again after a look.
const LOOKED_AT: Duration = Duration::from_secs(60);

/// The most manifests remembered as looked at; past it the memory is cleared (a few more
/// looks, nothing worse).
const LOOKED_AT_MOST: usize = 4096;

impl Prefetch {
    pub(super) fn new(concurrency: u32) -> Prefetch {
        let slots = usize::try_from(concurrency)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| Arc::new(Semaphore::new(n)));
        Prefetch {
            slots,
            pending: Arc::default(),
            starting: Arc::default(),
            looked_at: Mutex::default(),
        }
    }

    /// Whether the manifest `digest`'s blobs are to be looked at now (not within
    /// [`LOOKED_AT`] of the last look); notes the look.
    fn look(&self, digest: &Digest, now: SystemTime) -> bool {
        let mut looked = crate::sync::lock(&self.looked_at);
        if let Some(at) = looked.get(digest) {
            if now.duration_since(*at).unwrap_or_default() < LOOKED_AT {
                return false;
            }
        }
        if looked.len() >= LOOKED_AT_MOST {
            looked.clear();
        }
        looked.insert(digest.clone(), now);
        true
    }

    /// Takes a place in the queue for `digest`, or says why not.
    fn enqueue(&self, digest: &Digest, metrics: &Arc<Metrics>) -> Result<Queued, Prefetched> {
        let mut pending = crate::sync::lock(&self.pending);
        if pending.contains(digest) {
            return Err(Prefetched::InFlight);
        }
        if pending.len() >= QUEUE {
            return Err(Prefetched::Skipped);
        }
        pending.insert(digest.clone());
        metrics.prefetch_queued(true);
        Ok(Queued {
            pending: self.pending.clone(),
            digest: digest.clone(),
            metrics: metrics.clone(),
            waiting: true,
        })
    }

    /// Whether a prefetch download may start on `upstream` now: not while it backs off, and
    /// with `max_concurrent_requests`, only while a slot stays free for clients once every
    /// prefetch starting there holds one. Counted as starting until the guard goes.
    fn admit(&self, upstream: &Upstream) -> Option<Starting> {
        if upstream.state() != health::State::Up {
            return None;
        }
        let mut starting = crate::sync::lock(&self.starting);
        let mine = starting.entry(upstream.name.clone()).or_default();
        if upstream
            .free_request_slots()
            .is_some_and(|free| free <= *mine + 1)
        {
            return None;
        }
        *mine += 1;
        Some(Starting {
            starting: self.starting.clone(),
            upstream: upstream.name.clone(),
        })
    }
}

/// A blob's place in the queue and then its slot: leaves `pending` (and the gauges) when
/// dropped, however its task ends.
struct Queued {
    pending: Arc<Mutex<crate::hashing::Set<Digest>>>,
    digest: Digest,
    metrics: Arc<Metrics>,
    /// Waiting for a slot (counted in `prefetch_queued`), else holding one.
    waiting: bool,
}

impl Queued {
    fn running(&mut self) {
        self.waiting = false;
        self.metrics.prefetch_queued(false);
        self.metrics.prefetch_running(true);
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        crate::sync::lock(&self.pending).remove(&self.digest);
        if self.waiting {
            self.metrics.prefetch_queued(false);
        } else {
            self.metrics.prefetch_running(false);
        }
    }
}

/// A prefetch download counted as starting on its upstream until its first answer.
struct Starting {
    starting: Arc<Mutex<HashMap<String, usize>>>,
    upstream: String,
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(n) = crate::sync::lock(&self.starting).get_mut(&self.upstream) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Mirror {
    /// After a `GET` of the manifest `body` (of `media_type`) was answered for `target`:
    /// queues the prefetch of its config and layers when it is one platform's image manifest
    /// and prefetch is on for the repository. Decides without waiting; the downloads run in
    /// their own tasks.
    pub(super) fn prefetch(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        media_type: &str,
        body: &[u8],
    ) {
        let Some(slots) = &self.prefetch.slots else {
            return;
        };
        if !target.upstream.config().prefetches(&target.repo) {
            return;
        }
        if !self.prefetch.look(digest, self.clock.now()) {
            return;
        }
        // An index (or anything else) names no blob of this client's platform.
        let Ok(Listing::Image(blobs)) = Listing::parse(media_type, body) else {
            return;
        };
        let mut seen = HashSet::new();
        for blob in blobs {
            if !seen.insert(blob.digest.clone()) {
                continue;
            }
            if let Some(settled) = self.settled(&blob.digest) {
                self.metrics.prefetched(settled);
                continue;
            }
            match self.prefetch.enqueue(&blob.digest, &self.metrics) {
                Ok(queued) => {
                    let task = queued_prefetch(
                        Arc::downgrade(self),
                        slots.clone(),
                        queued,
                        target.clone(),
                        blob,
                    );
                    tokio::spawn(task);
                }
                Err(outcome) => self.metrics.prefetched(outcome),
            }
        }
    }

    /// Whether there is nothing to prefetch: the blob is on disk, or downloading.
    fn settled(&self, digest: &Digest) -> Option<Prefetched> {
        if self.tiers.local.index.contains(&Key::blob(digest)) {
            Some(Prefetched::Held)
        } else if self.downloads.get(digest).is_some() {
            Some(Prefetched::InFlight)
        } else {
            None
        }
    }

    /// One blob's prefetch, holding a slot: counted as soon as its outcome is known, then
    /// waits for the end of a download it started.
    async fn prefetch_blob(&self, target: &Target, blob: &Blob) {
        match self.start_prefetch(target, blob).await {
            Ok(handle) => {
                self.metrics.prefetched(Prefetched::Started);
                until_done(handle).await;
            }
            Err(outcome) => self.metrics.prefetched(outcome),
        }
    }

    /// Starts the download of `blob` unless there is no need, no room or no request slot to
    /// spare; the handle of its body once it got going.
    async fn start_prefetch(&self, target: &Target, blob: &Blob) -> Result<BlobHandle, Prefetched> {
        let digest = &blob.digest;
        if let Some(settled) = self.settled(digest) {
            return Err(settled);
        }
        // Decided on the manifest's size before any upstream request: a download the disk
        // cannot take would be relayed from memory with nobody reading it.
        let store = &self.tiers.local;
        if !store.index.fits(blob.size) || !store.make_room(blob.size).await {
            return Err(Prefetched::NoSpace);
        }
        let Some(starting) = self.prefetch.admit(&target.upstream) else {
            return Err(Prefetched::Skipped);
        };
        let (download, joined) = self.downloads.join(
            target.upstream.clone(),
            &target.repo,
            &target.caller,
            digest,
        );
        if joined {
            return Err(Prefetched::InFlight);
        }
        let started = Box::pin(download.started()).await;
        drop(starting);
        match started {
            Start::Streaming(handle, tier) => {
                // As for a client of this download: the upstream served the digest for this
                // repository, so the client's own request is a plain hit.
                if tier == Tier::Upstream && download.is_for(target.registry(), &target.repo) {
                    self.link(target, digest).await;
                }
                Ok(handle)
            }
            // The disk filled meanwhile: the relay stops by itself with nobody following it.
            Start::Relaying(..) => Err(Prefetched::NoSpace),
            Start::AlreadyCached => Err(Prefetched::Held),
            Start::Failed(_) | Start::Pending(_) => Err(Prefetched::Failed),
        }
    }
}

/// A blob's prefetch task: waits for a slot, then prefetches unless the mirror is gone.
async fn queued_prefetch(
    mirror: Weak<Mirror>,
    slots: Arc<Semaphore>,
    mut queued: Queued,
    target: Target,
    blob: Blob,
) {
    let slot = tokio::time::timeout(DEADLINE, slots.acquire_owned()).await;
    // The queue holds no reference to the mirror: a mirror shut down is not kept alive by it.
    let Some(mirror) = mirror.upgrade() else {
        return;
    };
    let Ok(Ok(_slot)) = slot else {
        mirror.metrics.prefetched(Prefetched::Skipped);
        return;
    };
    queued.running();
    mirror.prefetch_blob(&target, &blob).await;
}

/// Waits until the download behind `handle` has its verdict (or its writer is gone), at most
/// [`DEADLINE`].
async fn until_done(handle: BlobHandle) {
    let Some(mut progress) = handle.into_parts().1 else {
        return;
    };
    let done = progress.wait_for(|p| !matches!(p, Progress::Writing { .. }));
    let _ = tokio::time::timeout(DEADLINE, done).await;
}
