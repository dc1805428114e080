//! The storage seam that downloads and the pull layer use: the local disk (`local`, the
//! content-addressed cache of this process) and, with `[storage.shared]`, the shared tier that
//! replicas fill together. Callers ask for what they need ("the fleet's copy of this blob",
//! "a writer for this download") and never learn which backend holds the shared tier or
//! whether there is one: without it, every shared-tier question answers "not here" and every
//! shared-tier write is skipped.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::handle::BlobHandle;
use super::manifests::Manifest;
pub use super::shared::access::FLUSH_EVERY;
pub use super::shared::eviction::EVICT_EVERY;
use super::shared::SharedTier;
pub use super::shared::{Injected, Pass, Totals, Upload};
use super::tier::{BlobStream, Kind};
use super::writer::{BlobWriter, Finished};
use super::Store;
use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::config::SharedStorageConfig;
use crate::metrics::Metrics;
use crate::oci::Digest;

pub struct Tiers {
    /// The local disk.
    pub local: Arc<Store>,
    shared: Option<Arc<SharedTier>>,
}

impl Tiers {
    /// The local disk `local`, and `[storage.shared]`'s tier when `shared` is configured:
    /// the S3 store it names, or `injected` (an in-memory store in tests) in its place; with
    /// `cluster`, recorded for the fleet and bounded by its `max_size`.
    pub fn from_config(
        local: Arc<Store>,
        shared: Option<&SharedStorageConfig>,
        injected: Option<Injected>,
        cluster: Option<Arc<Cluster>>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Tiers> {
        let shared = match shared {
            Some(cfg) => Some(Arc::new(SharedTier::from_config(
                cfg, injected, cluster, clock, metrics,
            )?)),
            None => None,
        };
        Ok(Tiers { local, shared })
    }

    pub fn has_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The shared tier's copy of the blob from `offset` on, read as a registered reader;
    /// `None` when there is none or it cannot be read now.
    pub async fn shared_blob(&self, digest: &Digest, offset: u64) -> Option<BlobStream> {
        self.shared.as_ref()?.blob(digest, offset).await
    }

    pub async fn shared_blob_size(&self, digest: &Digest) -> Option<u64> {
        self.shared.as_ref()?.blob_size(digest).await
    }

    /// The shared tier's copy of the manifest, verified.
    pub async fn shared_manifest(&self, digest: &Digest) -> Option<Manifest> {
        self.shared.as_ref()?.manifest(digest).await
    }

    /// Publishes a verified manifest to the shared tier, in the background.
    pub fn publish_manifest(&self, m: &Manifest) {
        if let Some(tier) = &self.shared {
            tier.publish_manifest(m);
        }
    }

    /// An object read from the shared tier did not verify: it is deleted there.
    pub fn forget_damaged(&self, kind: Kind, digest: &Digest) {
        if let Some(tier) = &self.shared {
            tier.forget_damaged(kind, digest);
        }
    }

    /// A presigned URL of the shared tier's copy, valid for `ttl`.
    pub async fn redirect(&self, digest: &Digest, ttl: Duration) -> Option<url::Url> {
        self.shared.as_ref()?.redirect(digest, ttl).await
    }

    /// An upload of the blob to the shared tier, when there is one.
    pub fn upload(&self, digest: &Digest) -> Option<Upload> {
        Some(self.shared.as_ref()?.upload(digest))
    }

    /// The writer of a download: the local temp file, and with `tee` (and a shared tier) an
    /// upload of the same bytes, which is completed only after the local write verified them.
    pub async fn writer(&self, digest: &Digest, tee: bool) -> io::Result<TierWriter> {
        let local = self.local.blob_writer().await?;
        let upload = if tee { self.upload(digest) } else { None };
        Ok(TierWriter { local, upload })
    }

    /// Sends the shared tier's batched access times to the coordinator.
    pub async fn flush_shared(&self) {
        if let Some(tier) = &self.shared {
            tier.flush().await;
        }
    }

    /// One eviction pass of the shared tier; `None` without one (or without a cluster).
    pub async fn evict_shared(&self) -> Option<Pass> {
        self.shared.as_ref()?.evict().await
    }

    pub fn shared_totals(&self) -> Option<Totals> {
        self.shared.as_ref()?.totals()
    }
}

/// A download's bytes on their way into the tiers: written locally (hashed, readable behind
/// the writer) and passed to the shared-tier upload, if any.
pub struct TierWriter {
    local: BlobWriter,
    upload: Option<Upload>,
}

impl TierWriter {
    /// A handle that reads the blob as it is written.
    pub fn reader(&self, size: u64) -> BlobHandle {
        self.local.reader(size)
    }

    pub fn written(&self) -> u64 {
        self.local.written()
    }

    /// Appends `chunk` locally, then hands it to the upload (which gives up by itself when
    /// the shared tier fails: the local copy is what clients read).
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        let offset = self.local.written();
        self.write_at(offset, chunk).await
    }

    /// Marks where parts fetched in parallel will start writing.
    pub fn expect(&mut self, starts: impl IntoIterator<Item = u64>) {
        self.local.expect(starts);
    }

    /// Writes `chunk` at `offset` locally; the upload gets the bytes in order, as the local
    /// prefix (hashed) grows over them.
    pub async fn write_at(&mut self, offset: u64, chunk: Bytes) -> io::Result<()> {
        let in_order = offset == self.local.written();
        self.local.write_at(offset, chunk.clone()).await?;
        if in_order {
            if let Some(upload) = &mut self.upload {
                upload.write(chunk).await;
            }
        }
        while let Some(caught_up) = self.local.catch_up().await? {
            if let Some(upload) = &mut self.upload {
                upload.write(caught_up).await;
            }
        }
        Ok(())
    }

    /// Verifies and commits the local copy; the upload comes back for the caller to complete
    /// (after its lease fence) only when the bytes verified.
    pub async fn finish(
        self,
        digest: &Digest,
        size: u64,
    ) -> (io::Result<Finished>, Option<Upload>) {
        let finished = self.local.finish(digest, size).await;
        let kept = matches!(
            finished,
            Ok(Finished::Published) | Ok(Finished::TooLargeToKeep)
        );
        (finished, self.upload.filter(|_| kept))
    }
}
