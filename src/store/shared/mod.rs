//! The shared tier as the rest of the mirror sees it: a [`Backend`] (the S3 store) plus
//! what every backend shares, in one place: a damaged object is deleted (and logged) here, an
//! upload is completed and its publication recorded here, and every read is recorded in the
//! fleet's access order and protected from eviction while it streams.
//!
//! Its two sides of the storage seam: [`SharedBlob`], a blob read at offsets (each read one
//! ranged request), is its `BlobRead`; [`Upload`] is its `BlobWrite`.
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
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};

use super::handle::{BlobHandle, BlobRead};
use super::index::Pinned;
use super::manifests::{self, Manifest};
use super::s3::S3;
use super::tier::{object_name, Backend, BlobStream, Error, Kind, PartUpload};
use super::writer::{BlobWrite, Finished};
use crate::clock::{self, Clock};
use crate::cluster::Cluster;
use crate::config::SharedStorageConfig;
use crate::metrics::Metrics;
use crate::oci::Digest;
pub use eviction::Pass;
use readers::{ReadGuard, Reading};

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
    /// What this replica's pins name: never evicted while this replica evicts.
    pinned: Pinned,
}

impl Ledger {
    pub fn new(
        cluster: Arc<Cluster>,
        tier: Arc<dyn Backend>,
        max: Option<u64>,
        clock: Clock,
        metrics: Arc<Metrics>,
        pinned: Pinned,
    ) -> Ledger {
        Ledger {
            pinned,
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
        pinned: Pinned,
    ) -> SharedTier {
        let ledger = cluster.map(|c| {
            Arc::new(Ledger::new(
                c,
                backend.clone(),
                max,
                clock,
                metrics.clone(),
                pinned,
            ))
        });
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
        pinned: Pinned,
    ) -> anyhow::Result<SharedTier> {
        let backend: Arc<dyn Backend> = match injected {
            Some(store) => Arc::new(S3::over(store)),
            None => Arc::new(S3::connect(cfg).map_err(|e| {
                anyhow::anyhow!("cannot set up storage.shared ({}): {e}", cfg.endpoint)
            })?),
        };
        let max = cfg.max_size.map(|m| m.as_u64());
        Ok(SharedTier::new(
            backend, cluster, max, clock, metrics, pinned,
        ))
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
        let blob = match self.backend.blob(digest, offset, None).await {
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

    /// A handle on the blob `digest`, read at offsets (each read one ranged request, under
    /// the backend's deadlines); the object is protected from eviction while the handle (or
    /// a read from it) lives, and the opening is recorded as an access. Unverified: this
    /// process has not hashed the object, so it serves ranges, and a whole blob only hashed.
    /// `None` when the tier does not hold it, is evicting it, or cannot be asked (counted and
    /// logged).
    pub async fn open(self: &Arc<Self>, digest: &Digest) -> Option<BlobHandle> {
        let reading = match &self.ledger {
            Some(l) => match l.read(Kind::Blob, digest).await {
                Reading::Protected(guard) => Some(Arc::new(guard)),
                Reading::Evicting => return None,
            },
            None => None,
        };
        let size = self.blob_size(digest).await?;
        if let Some(l) = &self.ledger {
            l.accessed(Kind::Blob, digest, size);
        }
        let blob = SharedBlob {
            tier: self.clone(),
            digest: digest.clone(),
            size,
            _reading: reading,
        };
        Some(BlobHandle::complete(Arc::new(blob), size, false))
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
            written: 0,
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

    /// Deletes the object on an operator's request (a purge), and takes it out of the fleet's
    /// record; whether the tier held it (a failure is counted and logged, and is `false`).
    pub async fn purge(&self, kind: Kind, digest: &Digest) -> bool {
        let size = match kind {
            Kind::Blob => self.backend.blob_size(digest).await,
            Kind::Manifest => self
                .backend
                .read(kind, digest)
                .await
                .map(|raw| raw.map(|r| r.len() as u64)),
        };
        let size = match size {
            Ok(Some(size)) => size,
            Ok(None) => return false,
            Err(e) => {
                self.failed("look up an object to purge", digest, &e);
                return false;
            }
        };
        if let Err(e) = self.backend.delete_named(&object_name(kind, digest)).await {
            self.failed("purge an object", digest, &e);
            return false;
        }
        if let Some(l) = &self.ledger {
            l.purged(kind, digest, size).await;
        }
        true
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

/// A blob of the shared tier read at offsets: the shared tier's [`BlobRead`]. Each read is one
/// ranged request of the backend, bounded as all its requests are (the answer's deadline, then
/// the idle timeout between chunks); [`BlobRead::stream`] is one request, however long the
/// range. While it (or a read from it) lives, the object is protected from eviction.
#[derive(Clone)]
pub struct SharedBlob {
    tier: Arc<SharedTier>,
    digest: Digest,
    /// The object's length when it was opened.
    size: u64,
    /// Held for its drop, which withdraws the reader's registration.
    _reading: Option<Arc<ReadGuard>>,
}

impl SharedBlob {
    /// The bytes `from..to`, in one request: exactly `to - from` of them, or an error (the
    /// object is gone, shorter than opened, or the store failed or fell silent).
    fn request(self, from: u64, to: u64) -> BoxStream<'static, io::Result<Bytes>> {
        if from >= to {
            return stream::empty().boxed();
        }
        if to > self.size {
            let past = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("bytes {from}..{to} of a {}-byte blob", self.size),
            );
            return stream::once(async move { Err(past) }).boxed();
        }
        stream::once(async move {
            let blob = match self.tier.backend.blob(&self.digest, from, Some(to)).await {
                Ok(Some(blob)) => blob,
                // Deleted since it was opened, or the store is marked down.
                Ok(None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the shared tier no longer answers for the blob",
                    ))
                }
                Err(e) => {
                    self.tier.failed("read a blob", &self.digest, &e);
                    return Err(e.into());
                }
            };
            if blob.size != self.size {
                return Err(io::Error::other(format!(
                    "the shared tier's object is {} bytes, not {}",
                    blob.size, self.size
                )));
            }
            Ok(exactly(self, blob.chunks, to - from))
        })
        .try_flatten()
        .boxed()
    }
}

/// The first `len` bytes of `chunks`, or an error if they end before; `reader` is held as
/// long as the chunks are read.
fn exactly(
    reader: SharedBlob,
    chunks: BoxStream<'static, Result<Bytes, Error>>,
    len: u64,
) -> BoxStream<'static, io::Result<Bytes>> {
    stream::try_unfold(
        (reader, chunks, len),
        |(reader, mut chunks, left)| async move {
            if left == 0 {
                return Ok(None);
            }
            match chunks.next().await.transpose()? {
                Some(c) => {
                    let c = c.slice(..c.len().min(usize::try_from(left).unwrap_or(usize::MAX)));
                    let left = left - c.len() as u64;
                    Ok(Some((c, (reader, chunks, left))))
                }
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the shared tier's body ended {left} bytes early"),
                )),
            }
        },
    )
    .boxed()
}

impl BlobRead for SharedBlob {
    fn file(&self) -> Option<&Arc<File>> {
        None
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
        let chunks = self
            .clone()
            .request(offset, offset.saturating_add(len as u64));
        Box::pin(async move {
            let parts: Vec<Bytes> = chunks.try_collect().await?;
            Ok(match <[Bytes; 1]>::try_from(parts) {
                Ok([one]) => one,
                Err(parts) => {
                    let mut all = BytesMut::with_capacity(len);
                    for p in parts {
                        all.extend_from_slice(&p);
                    }
                    all.freeze()
                }
            })
        })
    }

    /// One ranged request, streamed as its chunks arrive.
    fn stream(self: Arc<Self>, offset: u64, len: u64) -> BoxStream<'static, io::Result<Bytes>> {
        let blob = Arc::unwrap_or_clone(self);
        blob.request(offset, offset.saturating_add(len))
    }
}

/// A blob upload to the shared tier: the shared tier's [`BlobWrite`].
pub struct Upload {
    part: Box<dyn PartUpload>,
    digest: Digest,
    /// The bytes passed on so far.
    written: u64,
    tier: Arc<SharedTier>,
}

impl Upload {
    /// Passes `chunk` on; an upload that failed gives up by itself (the blob stays local).
    pub async fn write(&mut self, chunk: Bytes) {
        self.written += chunk.len() as u64;
        self.part.write(chunk).await;
    }

    /// Makes the blob of `size` bytes visible and records its publication: call only once
    /// every byte is verified (and, with a lease, once it is confirmed still held). Failures
    /// are counted and logged here.
    pub async fn complete(self, size: u64) {
        let _ = self.publish(size).await;
    }

    /// Gives the upload up: nothing becomes visible, and the parts sent are discarded.
    pub async fn abort(self) {
        self.part.abort().await;
    }

    async fn publish(self, size: u64) -> io::Result<()> {
        if self.written != size {
            tracing::error!(digest = %self.digest, written = self.written, size, "a shared-tier upload got another length than its blob's; not published");
            self.part.abort().await;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the upload got {} bytes, not {size}", self.written),
            ));
        }
        match self.part.complete().await {
            Ok(()) => {
                self.tier.published(Kind::Blob, &self.digest, size);
                Ok(())
            }
            Err(e) => {
                self.tier.failed("publish a blob", &self.digest, &e);
                Err(e.into())
            }
        }
    }
}

impl BlobWrite for Upload {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            Upload::write(self, chunk).await;
            Ok(())
        })
    }

    fn finish<'a>(
        self: Box<Self>,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, io::Result<Finished>> {
        Box::pin(async move {
            if *digest != self.digest {
                self.abort().await;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("an upload of another blob finished as {digest}"),
                ));
            }
            self.publish(size).await.map(|()| Finished::Published)
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(Upload::abort(*self))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use object_store::path::Path;
    use object_store::{GetRange, ObjectStore, PutPayload};

    use super::*;
    use crate::store::s3::{IDLE_TIMEOUT, REQUEST_TIMEOUT};
    use crate::store::testing::Recording;

    fn tier(store: &Arc<Recording>) -> Arc<SharedTier> {
        Arc::new(SharedTier::new(
            Arc::new(S3::over(store.clone())),
            None,
            None,
            Clock::manual(),
            Arc::new(Metrics::new()),
            Pinned::default(),
        ))
    }

    /// A blob of `len` bytes, stored in the shared tier.
    async fn stored(store: &Recording, len: usize) -> (Digest, Vec<u8>) {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let digest = Digest::sha256_of(&body);
        let path = Path::from(object_name(Kind::Blob, &digest));
        store
            .put(&path, PutPayload::from(body.clone()))
            .await
            .unwrap();
        (digest, body)
    }

    async fn read(handle: &BlobHandle, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let chunks: Vec<Bytes> = handle.stream(offset, len).try_collect().await?;
        Ok(chunks.concat())
    }

    #[tokio::test]
    async fn a_range_of_a_shared_blob_is_one_ranged_get() {
        let store = Recording::new();
        let tier = tier(&store);
        let (digest, body) = stored(&store, 3 << 20).await;
        let handle = tier.open(&digest).await.unwrap();
        assert_eq!(handle.size(), body.len() as u64);
        assert!(!handle.is_verified(), "this process has not hashed it");
        assert!(handle.file().is_none());
        assert!(store.gets().is_empty(), "opening asks for the size alone");

        let (start, len) = (1000u64, 2u64 << 20);
        let got = read(&handle, start, len).await.unwrap();
        assert!(got == body[1000..1000 + (2 << 20)], "exactly the bytes");
        assert_eq!(store.gets(), [Some(GetRange::Bounded(start..start + len))]);

        let (reader, _) = handle.clone().into_parts();
        assert_eq!(reader.read_at(5, 10).await.unwrap(), body[5..15]);
        assert_eq!(store.gets().len(), 2, "a read at an offset is one GET too");
        assert_eq!(
            read(&handle, body.len() as u64 - 4, 4).await.unwrap(),
            body[body.len() - 4..]
        );
    }

    #[tokio::test]
    async fn a_read_of_a_missing_or_vanished_shared_blob_fails() {
        let store = Recording::new();
        let tier = tier(&store);
        assert!(tier.open(&Digest::sha256_of(b"absent")).await.is_none());

        let (digest, _) = stored(&store, 100).await;
        let handle = tier.open(&digest).await.unwrap();
        let past = read(&handle, 90, 20).await.unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
        assert!(store.gets().is_empty(), "a read past the end asks nothing");

        let path = Path::from(object_name(Kind::Blob, &digest));
        store.delete(&path).await.unwrap();
        let gone = read(&handle, 0, 10).await.unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_from_a_silent_store_fails_by_its_deadline() {
        let store = Recording::new();
        let tier = tier(&store);
        let (digest, _) = stored(&store, 100).await;
        let handle = tier.open(&digest).await.unwrap();

        store.silent_bodies.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let silent = read(&handle, 0, 10).await.unwrap_err();
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), IDLE_TIMEOUT, "the body's idle timeout");

        store.silent_bodies.store(false, Ordering::SeqCst);
        store.silent_gets.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let (reader, _) = handle.clone().into_parts();
        let silent = reader.read_at(0, 10).await.unwrap_err();
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT, "the answer's deadline");
        // Marked down: the next read is skipped at once.
        let skipped = read(&handle, 0, 10).await.unwrap_err();
        assert_eq!(skipped.kind(), io::ErrorKind::NotFound);
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
    }
}
