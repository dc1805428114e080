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
use tracing::Instrument;

use super::handle::BlobHandle;
use super::manifests::Manifest;
pub use super::shared::access::FLUSH_EVERY;
pub use super::shared::eviction::EVICT_EVERY;
use super::shared::SharedTier;
pub use super::shared::{Injected, Pass, Totals, Upload};
use super::tier::{BlobStream, Kind};
use super::writer::{BlobWrite, BlobWriter, Finished};
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
        let pinned = local.index.pinned().clone();
        let shared = match shared {
            Some(cfg) => Some(Arc::new(SharedTier::from_config(
                cfg, injected, cluster, clock, metrics, pinned,
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
        let shared = self.shared.as_ref()?;
        let span = crate::trace::span!("shared.read", object = "blob", %digest, offset);
        shared.blob(digest, offset).instrument(span).await
    }

    /// The blob from whichever tier holds it: the local disk's handle first (which may await
    /// its first-read verification, see `BlobHandle::is_verified`), else the shared tier's
    /// (`shared_handle`). `None` when neither holds it; a local disk that cannot be read is
    /// logged and passed over.
    pub async fn open(&self, digest: &Digest) -> Option<BlobHandle> {
        match self.local.blobs.open(digest).await {
            Ok(Some(handle)) => return Some(handle),
            Ok(None) => {}
            Err(e) => tracing::warn!(%digest, error = %e, "cannot open a cached blob"),
        }
        self.shared_handle(digest).await
    }

    /// The shared tier's copy of the blob as a handle read at offsets, each read one ranged
    /// request ([`BlobHandle::stream`]: one request for the whole range), protected from
    /// eviction while the handle lives. Unverified (this process has not hashed it): serve
    /// ranges from it, and a whole blob only through a hash. `None` when there is none or it
    /// cannot be read now.
    pub async fn shared_handle(&self, digest: &Digest) -> Option<BlobHandle> {
        let shared = self.shared.as_ref()?;
        let span = crate::trace::span!("shared.read", object = "blob handle", %digest);
        shared.open(digest).instrument(span).await
    }

    pub async fn shared_blob_size(&self, digest: &Digest) -> Option<u64> {
        let shared = self.shared.as_ref()?;
        let span = crate::trace::span!("shared.read", object = "blob size", %digest);
        shared.blob_size(digest).instrument(span).await
    }

    /// The shared tier's copy of the manifest, verified.
    pub async fn shared_manifest(&self, digest: &Digest) -> Option<Manifest> {
        let shared = self.shared.as_ref()?;
        let span = crate::trace::span!("shared.read", object = "manifest", %digest);
        shared.manifest(digest).instrument(span).await
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

    /// Deletes the shared tier's copy on an operator's request (a purge); whether there was
    /// one.
    pub async fn purge_shared(&self, kind: Kind, digest: &Digest) -> bool {
        match &self.shared {
            Some(tier) => tier.purge(kind, digest).await,
            None => false,
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
/// the writer) and passed, in order, to the shared tier's writer `U` (its [`Upload`]), if any.
/// The upload gives up by itself when it fails (the local copy is what clients read) and is
/// completed only once the local write verified the bytes. Dropped, both are aborted.
pub struct TierWriter<U: BlobWrite = Upload> {
    local: BlobWriter,
    upload: Option<U>,
}

impl<U: BlobWrite> TierWriter<U> {
    /// A handle that reads the blob as it is written.
    pub fn reader(&self, size: u64) -> BlobHandle {
        self.local.reader(size)
    }

    pub fn written(&self) -> u64 {
        self.local.written()
    }

    /// Appends `chunk` locally, then hands it to the upload.
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
            self.tee(chunk).await;
        }
        while let Some(caught_up) = self.local.catch_up().await? {
            self.tee(caught_up).await;
        }
        Ok(())
    }

    /// Passes bytes of the local prefix to the upload; one that fails is given up.
    async fn tee(&mut self, chunk: Bytes) {
        let Some(upload) = &mut self.upload else {
            return;
        };
        if let Err(e) = upload.write(chunk).await {
            tracing::warn!(error = %e, "the shared-tier copy is given up; the blob stays local");
            if let Some(upload) = self.upload.take() {
                abort_behind(upload);
            }
        }
    }

    /// Verifies and commits the local copy; the upload comes back for the caller to complete
    /// (after its lease fence) only when the bytes verified, and is aborted otherwise (in the
    /// background: the download's verdict does not wait on the shared tier).
    pub async fn finish(self, digest: &Digest, size: u64) -> (io::Result<Finished>, Option<U>) {
        let finished = self.local.finish(digest, size).await;
        let kept = matches!(
            finished,
            Ok(Finished::Published) | Ok(Finished::TooLargeToKeep)
        );
        match self.upload {
            Some(upload) if !kept => {
                abort_behind(upload);
                (finished, None)
            }
            upload => (finished, upload),
        }
    }

    /// Gives the download up on both tiers: the local temp file goes (its readers are cut)
    /// and the upload is aborted, so that nothing of the blob is left on either.
    pub async fn abort(self) {
        let upload = async {
            if let Some(upload) = self.upload {
                Box::new(upload).abort().await;
            }
        };
        futures_util::join!(self.local.abort(), upload);
    }
}

/// Aborts `upload` in its own task (its wait is bounded by the tier).
fn abort_behind(upload: impl BlobWrite) {
    tokio::spawn(Box::new(upload).abort());
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use futures_util::{StreamExt, TryStreamExt};
    use object_store::ObjectStore;

    use super::*;
    use crate::store::handle::{Failed, Progress};
    use crate::store::s3::S3;
    use crate::store::testing::{Recording, Uploads};
    use crate::store::{Limits, Mode};

    fn tiers(dir: &Path, store: &Arc<Recording>) -> Tiers {
        let local = Arc::new(Store::open(dir, Limits::default(), Mode::Serve).unwrap());
        let shared = SharedTier::new(
            Arc::new(S3::over(store.clone())),
            None,
            None,
            Clock::manual(),
            Arc::new(Metrics::new()),
            crate::store::index::Pinned::default(),
        );
        Tiers {
            local,
            shared: Some(Arc::new(shared)),
        }
    }

    fn temp_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    async fn objects(store: &Recording) -> usize {
        store.list(None).count().await
    }

    fn blob(len: usize) -> (Digest, Vec<u8>) {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        (Digest::sha256_of(&body), body)
    }

    #[tokio::test]
    async fn an_aborted_tier_writer_leaves_nothing_on_either_tier() {
        let (dir, store) = (tempfile::tempdir().unwrap(), Recording::new());
        let tiers = tiers(dir.path(), &store);
        // More than a part: the store holds one of its parts when the abort comes.
        let (digest, body) = blob(6 << 20);
        let mut writer = tiers.writer(&digest, true).await.unwrap();
        let reader = writer.reader(body.len() as u64);
        for chunk in body.chunks(1 << 20) {
            writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert_eq!(temp_files(dir.path()), 1);

        writer.abort().await;
        assert_eq!(temp_files(dir.path()), 0);
        assert_eq!(
            store.uploads(),
            Uploads {
                started: 1,
                completed: 0,
                aborted: 1
            }
        );
        assert_eq!(objects(&store).await, 0);
        assert!(matches!(
            reader.progress(),
            Some(Progress::Failed(Failed::Abandoned))
        ));
        assert!(tiers.open(&digest).await.is_none());
    }

    #[tokio::test]
    async fn each_tiers_writer_aborts_through_the_seam() {
        let (dir, store) = (tempfile::tempdir().unwrap(), Recording::new());
        let tiers = tiers(dir.path(), &store);
        let (digest, body) = blob(100);
        let writers: Vec<Box<dyn BlobWrite>> = vec![
            Box::new(tiers.local.blob_writer().await.unwrap()),
            Box::new(tiers.upload(&digest).unwrap()),
        ];
        for mut writer in writers {
            writer.write(Bytes::from(body.clone())).await.unwrap();
            writer.abort().await;
        }
        assert_eq!(temp_files(dir.path()), 0);
        assert_eq!(
            store.uploads(),
            Uploads {
                started: 1,
                completed: 0,
                aborted: 1
            }
        );
        assert_eq!(objects(&store).await, 0);
    }

    #[tokio::test]
    async fn a_tier_writer_hands_its_upload_back_only_once_the_bytes_verified() {
        let (dir, store) = (tempfile::tempdir().unwrap(), Recording::new());
        let tiers = tiers(dir.path(), &store);
        let (digest, body) = blob(1000);
        let size = body.len() as u64;

        // Bytes that are not the blob: the upload is aborted, nothing is published.
        let mut writer = tiers.writer(&digest, true).await.unwrap();
        writer.write(Bytes::from(vec![0u8; 1000])).await.unwrap();
        let (finished, upload) = writer.finish(&digest, size).await;
        assert!(matches!(finished, Ok(Finished::Mismatch { .. })));
        assert!(upload.is_none());
        store
            .wait_until("the upload is aborted", |u| u.aborted == 1)
            .await;

        // The blob: the upload comes back, and is completed through the seam.
        let mut writer = tiers.writer(&digest, true).await.unwrap();
        writer.write(Bytes::from(body.clone())).await.unwrap();
        let (finished, upload) = writer.finish(&digest, size).await;
        assert!(matches!(finished, Ok(Finished::Published)));
        let upload: Box<dyn BlobWrite> = Box::new(upload.unwrap());
        assert!(matches!(
            upload.finish(&digest, size).await,
            Ok(Finished::Published)
        ));
        assert_eq!(store.uploads().completed, 1);
        assert_eq!(objects(&store).await, 1);

        // Both tiers hold it: the local copy is opened first.
        let local = tiers.open(&digest).await.unwrap();
        assert!(local.file().is_some());
        let shared = tiers.shared_handle(&digest).await.unwrap();
        assert!(shared.file().is_none());
        let chunks: Vec<Bytes> = shared.stream(0, size).try_collect().await.unwrap();
        assert_eq!(chunks.concat(), body);
        tiers.local.blobs.discard(&digest);
        assert!(tiers.open(&digest).await.unwrap().file().is_none());
    }

    #[tokio::test]
    async fn an_upload_of_the_wrong_length_is_not_published() {
        let (dir, store) = (tempfile::tempdir().unwrap(), Recording::new());
        let tiers = tiers(dir.path(), &store);
        let (digest, body) = blob(100);
        let mut upload = tiers.upload(&digest).unwrap();
        upload.write(Bytes::from(body[..50].to_vec())).await;
        let upload: Box<dyn BlobWrite> = Box::new(upload);
        assert!(upload.finish(&digest, 100).await.is_err());
        assert_eq!(
            store.uploads(),
            Uploads {
                started: 1,
                completed: 0,
                aborted: 1
            }
        );
        assert_eq!(objects(&store).await, 0);
    }
}
