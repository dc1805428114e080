//! The shared tier as the rest of the mirror sees it: a [`Backend`] (the S3 store) plus
//! what every backend shares, in one place: a damaged object is deleted (and logged) here, an
//! upload is completed and its publication recorded here, and every read is recorded in the
//! fleet's access order and protected from eviction while it streams.
//!
//! With `[cluster]`, the fleet keeps in the coordinator ([`Ledger`]):
//! - `shared:access`, a sorted set of `<object name> <size>` scored by the last access (Unix
//!   milliseconds), batched ([`access`]);
//! - `shared:bytes`, the total size of the objects published, and `shared:evictions`;
//! - `readers:<object name>` and `evicting:<object name>`, the reader protection
//!   ([`readers`]);
//! - the eviction pass ([`eviction`]) and the hourly recount ([`recount`]).
//!
//! The counter can drift from the bucket (a publication counted twice, a counter lost with
//! Redis's data), and the access set can miss objects: a pass that has looked at every member
//! sets the counter right, and the recount puts the objects the access set lacks into it.

pub mod access;
pub mod eviction;
pub mod readers;
mod recount;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::manifests::{self, Manifest};
use super::s3::S3;
use super::tier::{object_name, Backend, BlobStream, Error, Kind, PartUpload};
use crate::clock::{self, Clock};
use crate::cluster::Cluster;
use crate::config::SharedStorageConfig;
use crate::metrics::Metrics;
use crate::oci::Digest;
pub use eviction::Pass;
use readers::Reading;

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

/// The fleet's record of the shared tier, in the coordinator: access order, readers, total,
/// evictions.
pub struct Ledger {
    cluster: Arc<Cluster>,
    tier: Arc<dyn Backend>,
    /// `storage.shared.max_size`; `None`: unbounded (accesses are still recorded, so a bound
    /// set later has an order to go by).
    max: Option<u64>,
    clock: Clock,
    metrics: Arc<Metrics>,
    pending: Mutex<HashMap<Object, access::Pending>>,
    readers: AtomicU64,
    /// The fleet's total and evictions as last read, for the status page.
    bytes: AtomicU64,
    evictions: AtomicU64,
}

impl Ledger {
    pub fn new(
        cluster: Arc<Cluster>,
        tier: Arc<dyn Backend>,
        max: Option<u64>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Ledger {
        Ledger {
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

    pub(super) fn now_ms(&self) -> f64 {
        clock::unix_millis(self.clock.now()) as f64
    }

    pub(super) fn expiry(&self, ttl: Duration) -> f64 {
        self.now_ms() + ttl.as_millis() as f64
    }

    /// The fleet's counter `key`: `Some(0)` when absent, `None` when the coordinator is down.
    pub(super) async fn counter(&self, key: &str) -> Option<u64> {
        let value = self.cluster.get(key).await?;
        Some(
            value
                .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<i64>().ok())
                .map_or(0, |n| u64::try_from(n).unwrap_or(0)),
        )
    }
}

/// An object store that stands in for the S3 one (in-memory in tests, or an embedder's).
pub type Injected = Arc<dyn object_store::ObjectStore>;

/// The shared tier: its backend, and the fleet's record of it when there is a `[cluster]`.
pub struct SharedTier {
    backend: Arc<dyn Backend>,
    ledger: Option<Arc<Ledger>>,
    metrics: Arc<Metrics>,
}

/// The shared tier's size and evictions as the fleet last counted them, for the status page.
pub struct Totals {
    pub bytes: u64,
    pub evictions: u64,
    pub max: Option<u64>,
}

impl SharedTier {
    /// The tier over `backend`; with `cluster`, accesses are recorded for the fleet and the
    /// tier is evicted down to `max`.
    pub fn new(
        backend: Arc<dyn Backend>,
        cluster: Option<Arc<Cluster>>,
        max: Option<u64>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> SharedTier {
        let ledger =
            cluster.map(|c| Arc::new(Ledger::new(c, backend.clone(), max, clock, metrics.clone())));
        SharedTier {
            backend,
            ledger,
            metrics,
        }
    }

    /// `[storage.shared]`'s tier: the S3 store `cfg` names, or `injected` (an in-memory store
    /// in tests) in its place; with `cluster`, recorded for the fleet and bounded by
    /// `max_size`.
    pub fn from_config(
        cfg: &SharedStorageConfig,
        injected: Option<Injected>,
        cluster: Option<Arc<Cluster>>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<SharedTier> {
        let backend: Arc<dyn Backend> = match injected {
            Some(store) => Arc::new(S3::over(store)),
            None => Arc::new(S3::connect(cfg).map_err(|e| {
                anyhow::anyhow!("cannot set up storage.shared ({}): {e}", cfg.endpoint)
            })?),
        };
        let max = cfg.max_size.map(|m| m.as_u64());
        Ok(SharedTier::new(backend, cluster, max, clock, metrics))
    }

    /// Counts and logs a failed request, once per outage (the store is then marked down and
    /// its requests skipped).
    fn failed(&self, what: &str, digest: &Digest, e: &Error) {
        if !e.is_down() {
            self.metrics.shared_error();
            tracing::warn!(%digest, error = %e, "shared tier: cannot {what}; served from elsewhere");
        }
    }

    /// The blob `digest` from `offset` on, read as a registered reader (so the evictor leaves
    /// it alone while the stream lives) and recorded as an access. `None` when the tier does
    /// not hold it, is evicting it, or cannot be read (counted and logged).
    pub async fn blob(&self, digest: &Digest, offset: u64) -> Option<BlobStream> {
        let guard = match &self.ledger {
            Some(l) => match l.read(Kind::Blob, digest).await {
                Reading::Protected(guard) => Some(guard),
                Reading::Evicting => return None,
            },
            None => None,
        };
        let blob = match self.backend.blob(digest, offset).await {
            Ok(blob) => blob?,
            Err(e) => {
                self.failed("read a blob", digest, &e);
                return None;
            }
        };
        if let Some(l) = &self.ledger {
            l.accessed(Kind::Blob, digest, blob.size);
        }
        let chunks = blob
            .chunks
            .map(move |c| {
                // Held as long as the stream is read.
                let _reading = &guard;
                c
            })
            .boxed();
        Some(BlobStream {
            size: blob.size,
            chunks,
        })
    }

    /// The size of the blob `digest`; `None` when the tier does not hold it or cannot be asked.
    pub async fn blob_size(&self, digest: &Digest) -> Option<u64> {
        match self.backend.blob_size(digest).await {
            Ok(size) => size,
            Err(e) => {
                self.failed("ask a blob's size", digest, &e);
                None
            }
        }
    }

    /// The manifest `digest`, verified and recorded as an access; `None` when the tier does
    /// not hold it or cannot be read. One that does not match its digest is deleted.
    pub async fn manifest(self: &Arc<Self>, digest: &Digest) -> Option<Manifest> {
        let raw = match self.backend.read(Kind::Manifest, digest).await {
            Ok(raw) => raw?,
            Err(e) => {
                self.failed("read a manifest", digest, &e);
                return None;
            }
        };
        // The object's own length, as its publication recorded it: one object, one member of
        // the fleet's access order.
        let size = raw.len() as u64;
        let Some(m) = manifests::decode(digest, raw) else {
            self.metrics.digest_mismatch();
            self.forget_damaged(Kind::Manifest, digest);
            return None;
        };
        if let Some(l) = &self.ledger {
            l.accessed(Kind::Manifest, digest, size);
        }
        Some(m)
    }

    /// Writes a manifest verified from the upstream, and records its publication, in the
    /// background: the answer does not wait for the object store.
    pub fn publish_manifest(self: &Arc<Self>, m: &Manifest) {
        let (digest, raw): (Digest, Bytes) = (m.digest.clone(), manifests::encode(m).into());
        let tier = self.clone();
        tokio::spawn(async move {
            let size = raw.len() as u64;
            match tier.backend.write(Kind::Manifest, &digest, raw).await {
                Ok(()) => tier.published(Kind::Manifest, &digest, size),
                Err(e) => tier.failed("write a manifest", &digest, &e),
            }
        });
    }

    fn published(&self, kind: Kind, digest: &Digest, size: u64) {
        tracing::debug!(%digest, "published to the shared tier");
        if let Some(l) = &self.ledger {
            l.published(kind, digest, size);
        }
    }

    /// Starts an upload of the blob `digest`, completed by [`Upload::complete`] once verified.
    pub fn upload(self: &Arc<Self>, digest: &Digest) -> Upload {
        Upload {
            part: self.backend.upload(digest),
            digest: digest.clone(),
            tier: self.clone(),
        }
    }

    /// Deletes an object that did not match its digest, in the background: it must not be
    /// served again.
    pub fn forget_damaged(self: &Arc<Self>, kind: Kind, digest: &Digest) {
        tracing::error!(%digest, "shared-tier object does not match its digest; deleting it");
        let (tier, digest) = (self.clone(), digest.clone());
        tokio::spawn(async move {
            let name = object_name(kind, &digest);
            if let Err(e) = tier.backend.delete_named(&name).await {
                tier.failed("delete a damaged object", &digest, &e);
            }
        });
    }

    /// A presigned URL of the blob valid for `ttl`, when the tier holds it and can sign; the
    /// object is protected from eviction that long and recorded as an access.
    pub async fn redirect(&self, digest: &Digest, ttl: Duration) -> Option<url::Url> {
        let size = self.blob_size(digest).await?;
        if let Some(l) = &self.ledger {
            // The client reads the store directly: the object must outlive the URL.
            if !l.lend(Kind::Blob, digest, ttl).await {
                return None;
            }
            l.accessed(Kind::Blob, digest, size);
        }
        match self.backend.presigned(digest, ttl).await {
            Ok(url) => url,
            Err(e) => {
                self.failed("presign a URL", digest, &e);
                None
            }
        }
    }

    /// Sends the batched access times to the coordinator.
    pub async fn flush(&self) {
        if let Some(l) = &self.ledger {
            l.flush().await;
        }
    }

    /// One eviction pass; `None` without a cluster.
    pub async fn evict(&self) -> Option<Pass> {
        Some(self.ledger.as_ref()?.evict().await)
    }

    /// The fleet's totals, with a cluster.
    pub fn totals(&self) -> Option<Totals> {
        self.ledger.as_ref().map(|l| Totals {
            bytes: l.bytes(),
            evictions: l.evictions(),
            max: l.max(),
        })
    }
}

/// A blob upload to the shared tier.
pub struct Upload {
    part: Box<dyn PartUpload>,
    digest: Digest,
    tier: Arc<SharedTier>,
}

impl Upload {
    pub async fn write(&mut self, chunk: Bytes) {
        self.part.write(chunk).await;
    }

    /// Makes the blob of `size` bytes visible and records its publication: call only once
    /// every byte is verified (and, with a lease, once it is confirmed still held).
    pub async fn complete(self, size: u64) {
        match self.part.complete().await {
            Ok(()) => self.tier.published(Kind::Blob, &self.digest, size),
            Err(e) => self.tier.failed("publish a blob", &self.digest, &e),
        }
    }
}
