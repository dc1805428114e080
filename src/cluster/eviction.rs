//! Least-recently-used eviction of the shared tier across the cluster, down to
//! `storage.shared.max_size`.
//!
//! What the fleet shares, in the coordinator:
//! - `shared:access`, a sorted set of `<object name> <size>` scored by the last access (Unix
//!   milliseconds). Accesses are batched in memory and flushed with one `zadd` every
//!   [`FLUSH_EVERY`]: a hot blob read a thousand times costs one write per flush.
//! - `shared:bytes`, the total size of the objects published, and `shared:evictions`.
//! - `readers:<object name>`, a sorted set of the readers of an object scored by when their
//!   registration expires, renewed while they read ([`ReadGuard`]).
//! - `evicting:<object name>`, set by the evictor before it looks for readers: a reader that
//!   registers afterwards sees it and reads elsewhere. Either the reader registered first
//!   (and the evictor sees it) or it sees the mark; nobody is left reading a deleted object.
//!
//! One replica evicts at a time, holding the `lease:evictor` lease. An object with a live
//! reader or a download lease (`lease:blob:<digest>`) is skipped.
//!
//! The counter can drift from the bucket (a publication counted twice, a counter lost with
//! Redis's data), and the access set can miss objects (published by a replica that died
//! before its flush, or all of them after Redis lost its data): a pass that has looked at
//! every member sets the counter right, and once an hour one replica recounts it from a
//! listing of the bucket, putting the objects the access set lacks into it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use super::coordinator::Claim;
use super::{Cluster, PREFIX};
use crate::clock::{self, Clock};
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::shared::{self, object_name, Kind, SharedBlob, SharedTier};
use crate::sync::lock;

/// How often the batch of accesses and publications goes to the coordinator.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How often each replica looks at the shared tier's size (and evicts if it holds the lease).
pub const EVICT_EVERY: Duration = Duration::from_secs(30);
/// How long the evictor's lease lasts without a renewal (renewed between pages).
const EVICTOR_LEASE: Duration = Duration::from_secs(60);
/// How long a reader's registration lasts without a renewal: a replica that dies mid-read
/// protects the object this long. Renewed every third of it.
const READ_TTL: Duration = Duration::from_secs(15);
/// How long the evictor's mark on an object lasts if the evictor dies before removing it.
const MARK_TTL: Duration = Duration::from_secs(60);
/// Candidates read from the access set per request.
const PAGE: usize = 100;
/// How often the fleet recounts the shared tier's total from a listing of its bucket.
const RECONCILE_EVERY: Duration = Duration::from_secs(3600);
/// Members read per request by a recount.
const RECOUNT_PAGE: usize = 1000;
/// Distinct objects the batch holds while the coordinator cannot take it; more are dropped
/// (their next access records them again).
const MAX_PENDING: usize = 100_000;

const ACCESS: &str = "shared:access";
const BYTES: &str = "shared:bytes";
const EVICTIONS: &str = "shared:evictions";

/// An object of the shared tier as the access set names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Object {
    kind: Kind,
    digest: Digest,
}

impl Object {
    fn name(&self) -> String {
        object_name(self.kind, &self.digest)
    }

    fn member(&self, size: u64) -> String {
        format!("{} {size}", self.name())
    }

    /// The object and size of an access-set member (`blobs/sha256/<hex> <size>`).
    fn parse(member: &str) -> Option<(Object, u64)> {
        let (name, size) = member.rsplit_once(' ')?;
        let (dir, rest) = name.split_once('/')?;
        let kind = match dir {
            "blobs" => Kind::Blob,
            "manifests" => Kind::Manifest,
            _ => return None,
        };
        let (algorithm, hex) = rest.split_once('/')?;
        let digest: Digest = format!("{algorithm}:{hex}").parse().ok()?;
        Some((Object { kind, digest }, size.parse().ok()?))
    }
}

/// An access or publication waiting for the next flush.
#[derive(Debug, Clone, Copy)]
struct Pending {
    size: u64,
    at_ms: u64,
    /// Newly published: its size goes to the total.
    published: bool,
}

/// How an eviction pass ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// The tier is within its bound (or unbounded): nothing to evict.
    Within { bytes: u64 },
    /// Another replica holds the evictor lease.
    Busy { holder: String },
    /// The coordinator cannot be asked: nobody evicts meanwhile.
    Unavailable,
    /// `objects` objects (`bytes` bytes) deleted; `remaining` bytes are left, more than the
    /// bound when what is left is being read or downloaded.
    Evicted {
        objects: u64,
        bytes: u64,
        remaining: u64,
    },
}

/// Whether a reader may read an object of the shared tier.
pub enum Reading {
    /// Registered: the object is not evicted while the guard lives.
    Protected(ReadGuard),
    /// The evictor is deleting it: read it from elsewhere (a peer, the upstream).
    Evicting,
}

pub struct Eviction {
    cluster: Arc<Cluster>,
    tier: Arc<SharedTier>,
    /// `storage.shared.max_size`; `None`: unbounded (accesses are still recorded, so a bound
    /// set later has an order to go by).
    max: Option<u64>,
    clock: Clock,
    metrics: Arc<Metrics>,
    pending: Mutex<HashMap<Object, Pending>>,
    readers: AtomicU64,
    /// The fleet's total and evictions as last read, for the status page.
    bytes: AtomicU64,
    evictions: AtomicU64,
}

impl Eviction {
    pub fn new(
        cluster: Arc<Cluster>,
        tier: Arc<SharedTier>,
        max: Option<u64>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Eviction {
        Eviction {
            cluster,
            tier,
            max,
            clock,
            metrics,
            pending: Mutex::new(HashMap::new()),
            readers: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// `storage.shared.max_size`.
    pub fn max(&self) -> Option<u64> {
        self.max
    }

    /// The shared tier's size, as of the last pass.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Objects the fleet has evicted, as of the last pass.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// A new object of `size` bytes is in the shared tier (published by this replica).
    pub fn published(&self, kind: Kind, digest: &Digest, size: u64) {
        self.record(kind, digest, size, true);
    }

    /// The object was read from the shared tier (`size`: its whole length).
    pub fn accessed(&self, kind: Kind, digest: &Digest, size: u64) {
        self.record(kind, digest, size, false);
    }

    fn record(&self, kind: Kind, digest: &Digest, size: u64, published: bool) {
        let at_ms = clock::unix_millis(self.clock.now());
        let object = Object {
            kind,
            digest: digest.clone(),
        };
        merge(
            &mut lock(&self.pending),
            object,
            Pending {
                size,
                at_ms,
                published,
            },
        );
    }

    /// Sends the batch to the coordinator: one `zadd` of the access times, one `add` of the
    /// bytes published. A batch the coordinator does not take waits for the next flush.
    pub async fn flush(&self) {
        let batch = std::mem::take(&mut *lock(&self.pending));
        if batch.is_empty() {
            return;
        }
        let members = batch
            .iter()
            .map(|(o, p)| (o.member(p.size), p.at_ms as f64))
            .collect();
        let published: u64 = batch.values().filter(|p| p.published).map(|p| p.size).sum();
        let mut taken = self.cluster.zadd(ACCESS, members).await.is_some();
        if taken && published > 0 {
            taken = self
                .cluster
                .add(BYTES, i64::try_from(published).unwrap_or(i64::MAX), None)
                .await
                .is_some();
        }
        if !taken {
            let mut pending = lock(&self.pending);
            for (object, p) in batch {
                merge(&mut pending, object, p);
            }
        }
    }

    /// Registers a reader of the object before it is read; hold the guard while reading.
    pub async fn read(&self, kind: Kind, digest: &Digest) -> Reading {
        let name = object_name(kind, digest);
        let set = readers_key(&name);
        let id = self.reader_id();
        let expires = self.expiry(READ_TTL);
        // Unregistered while the coordinator is down: no evictor can check readers then.
        self.cluster.zadd(&set, vec![(id.clone(), expires)]).await;
        if self.is_marked(&name).await {
            self.cluster.zrem(&set, vec![id]).await;
            return Reading::Evicting;
        }
        Reading::Protected(ReadGuard::start(
            self.cluster.clone(),
            self.clock.clone(),
            set,
            id,
        ))
    }

    /// Protects the object for `ttl` without a guard, for a reader this replica does not see
    /// (a client sent to a presigned URL valid that long). `false`: the evictor is deleting
    /// it, so do not send the client there.
    pub async fn lend(&self, kind: Kind, digest: &Digest, ttl: Duration) -> bool {
        let name = object_name(kind, digest);
        let set = readers_key(&name);
        self.cluster
            .zadd(&set, vec![(self.reader_id(), self.expiry(ttl))])
            .await;
        !self.is_marked(&name).await
    }

    /// A reader's id, unique in the cluster: this replica's URL and a sequence number.
    fn reader_id(&self) -> String {
        let n = self.readers.fetch_add(1, Ordering::Relaxed);
        format!("{} {n}", self.cluster.advertise())
    }

    fn now_ms(&self) -> f64 {
        clock::unix_millis(self.clock.now()) as f64
    }

    fn expiry(&self, ttl: Duration) -> f64 {
        self.now_ms() + ttl.as_millis() as f64
    }

    async fn is_marked(&self, name: &str) -> bool {
        let key = format!("{PREFIX}evicting:{name}");
        let c = &self.cluster;
        matches!(c.ask("get", c.coordinator.get(&key)).await, Some(Some(_)))
    }

    /// The fleet's counter `key`: `Some(0)` when absent, `None` when the coordinator is down.
    async fn counter(&self, key: &str) -> Option<u64> {
        let c = &self.cluster;
        let value = c
            .ask("get", c.coordinator.get(&format!("{PREFIX}{key}")))
            .await?;
        Some(
            value
                .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<i64>().ok())
                .map_or(0, |n| u64::try_from(n).unwrap_or(0)),
        )
    }

    /// One pass: reads the shared tier's size and, past the bound, takes the evictor lease and
    /// deletes the least recently used objects nobody reads or downloads, down to the bound.
    /// Once per [`RECONCILE_EVERY`] for the fleet, the pass first recounts the total from the
    /// bucket (see [`Eviction::recount`]).
    pub async fn evict(&self) -> Pass {
        let Some(mut bytes) = self.counter(BYTES).await else {
            return Pass::Unavailable;
        };
        self.bytes.store(bytes, Ordering::Relaxed);
        if let Some(n) = self.counter(EVICTIONS).await {
            self.evictions.store(n, Ordering::Relaxed);
        }
        let recount = self.recount_due().await;
        if !recount && self.max.is_none_or(|max| bytes <= max) {
            return Pass::Within { bytes };
        }
        let c = &self.cluster;
        let key = format!("{PREFIX}lease:evictor");
        let lease = match c
            .ask(
                "claim",
                c.coordinator.claim(&key, c.advertise(), EVICTOR_LEASE),
            )
            .await
        {
            Some(Claim::Acquired(lease)) => lease,
            Some(Claim::Held { holder }) => return Pass::Busy { holder },
            None => return Pass::Unavailable,
        };
        if recount {
            if let Some(total) = self.recount(&lease).await {
                bytes = total;
                self.bytes.store(bytes, Ordering::Relaxed);
            }
        }
        let pass = match self.max.filter(|&max| bytes > max) {
            Some(max) => self.evict_down_to(bytes, max, &lease).await,
            None => Pass::Within { bytes },
        };
        c.ask("release", c.coordinator.release(&lease)).await;
        if let Pass::Evicted {
            objects,
            bytes: freed,
            remaining,
        } = &pass
        {
            self.metrics.shared_eviction(*objects);
            self.bytes.store(*remaining, Ordering::Relaxed);
            if let Some(n) = c
                .add(EVICTIONS, i64::try_from(*objects).unwrap_or(i64::MAX), None)
                .await
            {
                self.evictions
                    .store(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
            }
            if *objects > 0 {
                tracing::info!(
                    objects,
                    bytes = freed,
                    remaining,
                    max = self.max,
                    "evicted least recently used objects from the shared tier"
                );
            }
        }
        pass
    }

    /// Renews the evictor lease; `false` (warned) when it was lost and the pass must stop.
    async fn renew(&self, lease: &super::coordinator::Lease) -> bool {
        let c = &self.cluster;
        let renewed = c
            .ask("renew", c.coordinator.renew(lease, EVICTOR_LEASE))
            .await
            == Some(true);
        if !renewed {
            tracing::warn!("the shared-tier evictor lease was lost; the pass stops");
        }
        renewed
    }

    /// Whether the fleet's recount is due, and this replica's to do: a claim that nobody
    /// releases, so it is won once per [`RECONCILE_EVERY`].
    async fn recount_due(&self) -> bool {
        let c = &self.cluster;
        let key = format!("{PREFIX}shared:recounted");
        matches!(
            c.ask(
                "claim",
                c.coordinator.claim(&key, c.advertise(), RECONCILE_EVERY)
            )
            .await,
            Some(Claim::Acquired(_))
        )
    }

    /// Sets the total to what the bucket holds, and returns it; `None` when the store or the
    /// coordinator failed midway. Objects the access set lacks are put into it, scored by
    /// their last modification: one published by a replica that died before its flush, or
    /// every object after Redis lost its data, would otherwise never be evicted. Members whose
    /// object is gone are dropped. The access set is read before the bucket is listed, and a
    /// member is only ever recorded for an object that exists, so a member missing from the
    /// listing is gone for good (only the evictor deletes, and this replica holds its lease).
    async fn recount(&self, lease: &super::coordinator::Lease) -> Option<u64> {
        let mut members: HashMap<String, String> = HashMap::new();
        let mut walk = Walk::default();
        loop {
            let page = walk.next(&self.cluster, RECOUNT_PAGE).await?;
            if page.is_empty() {
                break;
            }
            for (member, _) in page {
                if let Some((object, _)) = Object::parse(&member) {
                    members.insert(object.name(), member);
                }
            }
        }
        if !walk.exhausted {
            return None;
        }
        let mut total = 0u64;
        let mut untracked = Vec::new();
        let mut listing = self.tier.list();
        let mut listed_count = 0usize;
        while let Some(listed) = listing.next().await {
            listed_count += 1;
            // A big bucket takes many list pages: the evictor lease must outlast them.
            if listed_count % RECOUNT_PAGE == 0 && !self.renew(lease).await {
                return None;
            }
            let (name, size, modified_ms) = match listed {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the shared tier; recount skipped");
                    return None;
                }
            };
            let member = format!("{name} {size}");
            if Object::parse(&member).is_none() {
                continue;
            }
            total += size;
            if members.remove(&name).is_none() {
                untracked.push((member, modified_ms as f64));
            }
        }
        for page in untracked.chunks(RECOUNT_PAGE) {
            self.cluster.zadd(ACCESS, page.to_vec()).await;
        }
        let gone: Vec<String> = members.into_values().collect();
        for page in gone.chunks(RECOUNT_PAGE) {
            self.cluster.zrem(ACCESS, page.to_vec()).await;
        }
        if !untracked.is_empty() || !gone.is_empty() {
            tracing::info!(
                untracked = untracked.len(),
                gone = gone.len(),
                bytes = total,
                "shared tier recounted from its bucket"
            );
        }
        self.cluster.set_json(BYTES, &total, None).await;
        Some(total)
    }

    /// Deletes from the least recently used on while the lease holds, until `bytes` minus
    /// what was freed is within `max` or no candidate is left.
    async fn evict_down_to(&self, bytes: u64, max: u64, lease: &super::coordinator::Lease) -> Pass {
        let c = &self.cluster;
        let (mut objects, mut freed) = (0u64, 0u64);
        // Members looked at and kept (read, downloading, or not deletable now), with sizes.
        let mut kept: HashMap<String, u64> = HashMap::new();
        let mut walk = Walk::default();
        'pages: while bytes.saturating_sub(freed) > max {
            let Some(page) = walk.next(c, PAGE).await else {
                break;
            };
            if page.is_empty() {
                break;
            }
            for (member, _) in page {
                let Some((object, size)) = Object::parse(&member) else {
                    c.zrem(ACCESS, vec![member]).await;
                    continue;
                };
                match self.evict_one(&object).await {
                    Some(true) => {
                        c.zrem(ACCESS, vec![member]).await;
                        c.add(BYTES, -i64::try_from(size).unwrap_or(i64::MAX), None)
                            .await;
                        objects += 1;
                        freed += size;
                        if bytes.saturating_sub(freed) <= max {
                            break 'pages;
                        }
                    }
                    Some(false) => {
                        kept.insert(member, size);
                    }
                    // The store failed: the next pass tries again.
                    None => break 'pages,
                }
            }
            if !self.renew(lease).await {
                break;
            }
        }
        let mut remaining = bytes.saturating_sub(freed);
        if walk.exhausted {
            // Every tracked object was looked at: what is kept is the whole tier, so the
            // counter is set right (an object published twice counted twice).
            let total: u64 = kept.values().sum();
            if total != remaining {
                c.set_json(BYTES, &total, None).await;
                remaining = total;
            }
        }
        Pass::Evicted {
            objects,
            bytes: freed,
            remaining,
        }
    }

    /// Deletes one object unless it is read or downloaded: `Some(true)` deleted,
    /// `Some(false)` kept, `None` the store failed.
    async fn evict_one(&self, object: &Object) -> Option<bool> {
        let c = &self.cluster;
        let name = object.name();
        let mark = format!("{PREFIX}evicting:{name}");
        if c.ask(
            "set",
            c.coordinator.set(&mark, b"1".to_vec(), Some(MARK_TTL)),
        )
        .await
        .is_none()
        {
            return Some(false);
        }
        let deleted = if self.is_protected(object, &name).await {
            Some(false)
        } else {
            match self.tier.delete_named(&name).await {
                Ok(()) => Some(true),
                Err(e) => {
                    self.metrics.shared_error();
                    tracing::warn!(object = %name, error = %e, "cannot evict from the shared tier");
                    None
                }
            }
        };
        if deleted == Some(true) {
            let set = readers_key(&name);
            if let Some(stale) = c.zrange(&set, f64::NEG_INFINITY, f64::INFINITY, 1000).await {
                if !stale.is_empty() {
                    c.zrem(&set, stale.into_iter().map(|(m, _)| m).collect())
                        .await;
                }
            }
        }
        c.ask("delete", c.coordinator.delete(&mark)).await;
        deleted
    }

    /// Whether the object has a live reader or a download lease; `true` when that cannot be
    /// told (the coordinator did not answer).
    async fn is_protected(&self, object: &Object, name: &str) -> bool {
        let c = &self.cluster;
        match c
            .zrange(&readers_key(name), self.now_ms(), f64::INFINITY, 1)
            .await
        {
            Some(readers) if readers.is_empty() => {}
            _ => return true,
        }
        if object.kind != Kind::Blob {
            return false;
        }
        let lease = format!("{PREFIX}lease:blob:{}", object.digest);
        !matches!(c.ask("get", c.coordinator.get(&lease)).await, Some(None))
    }
}

/// A walk through the access set from the least recently used on, a page at a time. Members
/// looked at and kept stay in the set, so each page starts at the last score seen and leaves
/// out the members of that score already seen.
#[derive(Default)]
struct Walk {
    from: Option<f64>,
    seen_at_from: HashSet<String>,
    /// Every member was seen (a short page ended the walk).
    exhausted: bool,
}

impl Walk {
    /// The next members, none at the end; `None` when the coordinator failed.
    async fn next(&mut self, c: &Cluster, limit: usize) -> Option<Vec<(String, f64)>> {
        let from = self.from.unwrap_or(f64::NEG_INFINITY);
        let page = c.zrange(ACCESS, from, f64::INFINITY, limit).await?;
        let full = page.len() >= limit;
        let mut fresh = Vec::with_capacity(page.len());
        for (member, score) in page {
            if Some(score) == self.from && self.seen_at_from.contains(&member) {
                continue;
            }
            if Some(score) != self.from {
                self.from = Some(score);
                self.seen_at_from.clear();
            }
            self.seen_at_from.insert(member.clone());
            fresh.push((member, score));
        }
        // A full page of members already seen: more than a page share one score, and the walk
        // cannot get past them (it ends without claiming to have seen everything).
        if fresh.is_empty() {
            self.exhausted = !full;
        }
        Some(fresh)
    }
}

/// The blob `digest` from `offset` from the shared tier, read as a registered reader (so the
/// evictor leaves it alone while the returned stream lives) and recorded as an access.
/// `Ok(None)` when the tier does not hold it or is evicting it. Without eviction (no
/// `[cluster]`) it is a plain read.
pub async fn read_blob(
    eviction: Option<&Eviction>,
    tier: &SharedTier,
    digest: &Digest,
    offset: u64,
) -> Result<Option<SharedBlob>, shared::Error> {
    let guard = match eviction {
        Some(e) => match e.read(Kind::Blob, digest).await {
            Reading::Protected(guard) => Some(guard),
            Reading::Evicting => return Ok(None),
        },
        None => None,
    };
    let Some(blob) = tier.blob(digest, offset).await? else {
        return Ok(None);
    };
    if let Some(e) = eviction {
        e.accessed(Kind::Blob, digest, blob.size);
    }
    let chunks = blob
        .chunks
        .map(move |c| {
            // Held as long as the stream is read.
            let _reading = &guard;
            c
        })
        .boxed();
    Ok(Some(SharedBlob {
        size: blob.size,
        chunks,
    }))
}

fn readers_key(name: &str) -> String {
    format!("readers:{name}")
}

/// Adds `p` to the batch: the latest access wins, a publication stays one.
fn merge(pending: &mut HashMap<Object, Pending>, object: Object, p: Pending) {
    if let Some(old) = pending.get_mut(&object) {
        old.at_ms = old.at_ms.max(p.at_ms);
        old.published |= p.published;
        old.size = p.size;
    } else if pending.len() < MAX_PENDING {
        pending.insert(object, p);
    }
}

/// A registered reader: renews its registration every third of [`READ_TTL`] until dropped,
/// then withdraws it.
pub struct ReadGuard {
    cluster: Arc<Cluster>,
    set: String,
    id: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl ReadGuard {
    fn start(cluster: Arc<Cluster>, clock: Clock, set: String, id: String) -> ReadGuard {
        let renewer = tokio::spawn({
            let (cluster, set, id) = (cluster.clone(), set.clone(), id.clone());
            async move {
                let mut tick = tokio::time::interval(READ_TTL / 3);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let expires =
                        clock::unix_millis(clock.now()) as f64 + READ_TTL.as_millis() as f64;
                    cluster.zadd(&set, vec![(id.clone(), expires)]).await;
                }
            }
        });
        ReadGuard {
            cluster,
            set,
            id,
            renewer,
        }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.renewer.abort();
        let (cluster, set, id) = (
            self.cluster.clone(),
            std::mem::take(&mut self.set),
            std::mem::take(&mut self.id),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                cluster.zrem(&set, vec![id]).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::coordinator::Coordinator;
    use crate::cluster::memory::MemoryCoordinator;
    use crate::cluster::Claimed;
    use crate::config::{ClusterConfig, Secret};
    use bytes::Bytes;
    use object_store::memory::InMemory;

    /// Replicas sharing one coordinator, one object store and one clock.
    struct Fleet {
        coordinator: Arc<MemoryCoordinator>,
        tier: Arc<SharedTier>,
        clock: Clock,
    }

    impl Fleet {
        fn new() -> Fleet {
            Fleet {
                coordinator: Arc::new(MemoryCoordinator::default()),
                tier: Arc::new(SharedTier::over(Arc::new(InMemory::new()))),
                clock: Clock::manual(),
            }
        }

        fn cluster(&self, advertise: &str) -> Arc<Cluster> {
            let config = ClusterConfig {
                redis: Secret::new("redis://127.0.0.1:1/0"),
                advertise: advertise.to_owned(),
                lease_ttl: Duration::from_secs(5),
                secret: Some(Secret::new("a cluster secret, long enough")),
            };
            Arc::new(Cluster::new(
                self.coordinator.clone(),
                &config,
                Arc::new(Metrics::new()),
                self.clock.clone(),
            ))
        }

        fn replica(&self, advertise: &str, max: u64) -> Eviction {
            Eviction::new(
                self.cluster(advertise),
                self.tier.clone(),
                Some(max),
                self.clock.clone(),
                Arc::new(Metrics::new()),
            )
        }

        /// Publishes a blob of `size` bytes through `by`, a second after the previous one.
        async fn publish(&self, by: &Eviction, seed: u8, size: usize) -> Digest {
            let body = vec![seed; size];
            let digest = Digest::sha256_of(&body);
            self.tier
                .write(Kind::Blob, &digest, Bytes::from(body))
                .await
                .unwrap();
            by.published(Kind::Blob, &digest, size as u64);
            self.clock.advance(Duration::from_secs(1));
            digest
        }

        async fn holds(&self, digest: &Digest) -> bool {
            self.tier.blob_size(digest).await.unwrap().is_some()
        }

        async fn bytes(&self) -> Option<Vec<u8>> {
            self.coordinator
                .get("pullthrough:shared:bytes")
                .await
                .unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_shared_tier_is_evicted_least_recently_used_first_down_to_max_size() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 3000),
            fleet.replica("http://b", 3000),
        );
        let first = fleet.publish(&a, 1, 1000).await;
        let second = fleet.publish(&b, 2, 1000).await;
        let third = fleet.publish(&a, 3, 1000).await;
        // The oldest is read again (through the other replica): the second is now the LRU.
        b.accessed(Kind::Blob, &first, 1000);
        fleet.clock.advance(Duration::from_secs(1));
        let fourth = fleet.publish(&b, 4, 1000).await;
        a.flush().await;
        b.flush().await;
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"4000"[..]));

        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 1,
                bytes: 1000,
                remaining: 3000
            }
        );
        assert!(!fleet.holds(&second).await, "the least recently used goes");
        for kept in [&first, &third, &fourth] {
            assert!(fleet.holds(kept).await);
        }
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"3000"[..]));
        assert_eq!(b.evict().await, Pass::Within { bytes: 3000 });
        assert_eq!(b.evictions(), 1, "evictions are counted for the fleet");
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_with_a_reader_is_not_evicted() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 1000),
            fleet.replica("http://b", 1000),
        );
        let read = fleet.publish(&a, 1, 1000).await;
        let unread = fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        let Reading::Protected(guard) = b.read(Kind::Blob, &read).await else {
            panic!("nothing evicts it: the read is protected");
        };
        // Longer than a registration lasts unrenewed: the guard renews it.
        for _ in 0..4 {
            fleet.clock.advance(READ_TTL / 3);
            tokio::time::sleep(READ_TTL / 3).await;
        }
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(fleet.holds(&read).await, "the object being read stays");
        assert!(
            !fleet.holds(&unread).await,
            "the next least recently used goes instead"
        );

        drop(guard);
        tokio::task::yield_now().await;
        let newer = fleet.publish(&a, 3, 1000).await;
        a.flush().await;
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(!fleet.holds(&read).await, "once read, it goes");
        assert!(fleet.holds(&newer).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_of_an_object_being_evicted_reads_elsewhere() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        let digest = fleet.publish(&a, 1, 1000).await;
        let mark = format!("pullthrough:evicting:{}", object_name(Kind::Blob, &digest));
        fleet
            .coordinator
            .set(&mark, b"1".to_vec(), Some(MARK_TTL))
            .await
            .unwrap();
        assert!(matches!(
            a.read(Kind::Blob, &digest).await,
            Reading::Evicting
        ));
        assert!(!a.lend(Kind::Blob, &digest, READ_TTL).await);
        fleet.coordinator.delete(&mark).await.unwrap();
        assert!(matches!(
            a.read(Kind::Blob, &digest).await,
            Reading::Protected(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_being_downloaded_is_not_evicted() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        let downloading = fleet.publish(&a, 1, 1000).await;
        let other = fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        let Claimed::Acquired(lease) = fleet.cluster("http://b").claim_download(&downloading).await
        else {
            panic!("nobody else downloads it");
        };
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(fleet.holds(&downloading).await);
        assert!(!fleet.holds(&other).await);
        drop(lease);
        tokio::task::yield_now().await;
        fleet.publish(&a, 3, 1000).await;
        a.flush().await;
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(!fleet.holds(&downloading).await, "once downloaded, it goes");
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_replica_evicts_at_a_time() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 1000),
            fleet.replica("http://b", 1000),
        );
        let old = fleet.publish(&a, 1, 1000).await;
        fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        // Replica a is in the middle of a pass.
        let Claim::Acquired(_) = fleet
            .coordinator
            .claim("pullthrough:lease:evictor", "http://a", EVICTOR_LEASE)
            .await
            .unwrap()
        else {
            panic!("the lease is free");
        };
        assert_eq!(
            b.evict().await,
            Pass::Busy {
                holder: "http://a".into()
            }
        );
        assert!(fleet.holds(&old).await, "b deleted nothing");
        // a died mid-pass: its lease expires and b takes over.
        tokio::time::advance(EVICTOR_LEASE + Duration::from_secs(1)).await;
        assert!(matches!(b.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(!fleet.holds(&old).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_counter_that_drifted_is_set_right_once_every_object_was_looked_at() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        let digest = fleet.publish(&a, 1, 1000).await;
        a.flush().await;
        assert_eq!(a.evict().await, Pass::Within { bytes: 1000 });
        // Published twice (e.g. while the coordinator was down): counted twice.
        a.published(Kind::Blob, &digest, 1000);
        a.flush().await;
        let _reading = a.read(Kind::Blob, &digest).await;
        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 0,
                bytes: 0,
                remaining: 1000
            }
        );
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
        assert_eq!(a.evict().await, Pass::Within { bytes: 1000 });
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_is_recounted_from_the_bucket_once_an_hour_for_the_fleet() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 1500),
            fleet.replica("http://b", 1500),
        );
        let old = fleet.publish(&a, 1, 1000).await;
        let new = fleet.publish(&b, 2, 1000).await;
        a.flush().await;
        b.flush().await;
        // Redis lost the counter (a restart without persistence), not the access set.
        fleet
            .coordinator
            .delete("pullthrough:shared:bytes")
            .await
            .unwrap();
        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 1,
                bytes: 1000,
                remaining: 1000
            }
        );
        assert!(!fleet.holds(&old).await);
        assert!(fleet.holds(&new).await);

        fleet
            .coordinator
            .delete("pullthrough:shared:bytes")
            .await
            .unwrap();
        assert_eq!(
            b.evict().await,
            Pass::Within { bytes: 0 },
            "not due again yet"
        );
        tokio::time::advance(RECONCILE_EVERY).await;
        assert_eq!(b.evict().await, Pass::Within { bytes: 1000 });
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn objects_missing_from_the_access_set_are_found_in_the_bucket_and_evicted() {
        let fleet = Fleet::new();
        let dead = fleet.replica("http://dead", 1500);
        let kept = fleet.publish(&dead, 1, 1000).await;
        let orphan = fleet.publish(&dead, 2, 1000).await;
        // The replica died before its flush: the fleet never heard of either object. And the
        // access set names one that is gone.
        drop(dead);
        let gone = "blobs/sha256/".to_owned() + &"ab".repeat(32) + " 500";
        let access = format!("{PREFIX}{ACCESS}");
        fleet
            .coordinator
            .zadd(&access, vec![(gone.clone(), 1.0)])
            .await
            .unwrap();

        let b = fleet.replica("http://b", 1500);
        assert_eq!(
            b.evict().await,
            Pass::Evicted {
                objects: 1,
                bytes: 1000,
                remaining: 1000
            },
            "the recount found 2000 bytes in the bucket"
        );
        assert_ne!(
            fleet.holds(&kept).await,
            fleet.holds(&orphan).await,
            "one of the two was evicted"
        );
        let members: Vec<String> = fleet
            .coordinator
            .zrange(&access, f64::NEG_INFINITY, f64::INFINITY, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        assert_eq!(members.len(), 1, "{members:?}");
        assert!(!members.contains(&gone), "the gone member was dropped");
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_pages_past_the_objects_it_keeps() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1150);
        let mut digests = Vec::new();
        for i in 0..120u8 {
            digests.push(fleet.publish(&a, i, 10).await);
        }
        a.flush().await;
        let mut guards = Vec::new();
        for d in &digests[..PAGE + 10] {
            guards.push(a.read(Kind::Blob, d).await);
        }
        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 5,
                bytes: 50,
                remaining: 1150
            }
        );
        for (i, d) in digests.iter().enumerate() {
            let evicted = (PAGE + 10..PAGE + 15).contains(&i);
            assert_eq!(fleet.holds(d).await, !evicted, "object {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accesses_wait_for_a_coordinator_that_is_down() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        fleet.coordinator.set_down(true);
        fleet.publish(&a, 1, 1000).await;
        a.flush().await;
        assert_eq!(a.evict().await, Pass::Unavailable);
        fleet.coordinator.set_down(false);
        // Asked again half a lease after the last failure.
        fleet.clock.advance(Duration::from_secs(3));
        a.flush().await;
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
    }

    #[test]
    fn an_access_set_member_names_its_object_and_size() {
        let object = Object {
            kind: Kind::Manifest,
            digest: Digest::sha256_of(b"m"),
        };
        assert_eq!(Object::parse(&object.member(42)), Some((object, 42)));
        assert_eq!(Object::parse("blobs/sha256/zz 1"), None);
        assert_eq!(Object::parse("elsewhere/sha256/00 1"), None);
    }
}
