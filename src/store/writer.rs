//! The write side of the storage seam: a [`BlobWriter`] takes a blob being downloaded. Its
//! bytes are readable (by followers, through [`BlobWriter::reader`]) as they arrive, and hashed
//! as they are written; [`BlobWriter::finish`] alone makes the blob visible under its digest,
//! and only when the length and the sha256 match. Dropping an unfinished writer aborts it:
//! the temp file goes and readers are told the write failed ([`BlobWriter::abort`] does the
//! same, off the async workers).
//!
//! [`BlobWrite`] is the write side of the seam both tiers implement: this writer, and the
//! shared tier's upload (`shared::Upload`), which `tiers::TierWriter` tees the same bytes into.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;
use tokio::sync::watch;
use tracing::Instrument;

use super::coverage::{Coverage, Spans};
use super::handle::{BlobHandle, Failed, LocalFile, Progress};
use super::Store;
use crate::oci::Digest;

/// How a finished write ended.
#[derive(Debug)]
pub enum Finished {
    /// Verified and visible in the store.
    Published,
    /// Verified and readable by those who hold it, but larger than the cache bound: not kept.
    TooLargeToKeep,
    /// The bytes hash to another digest (or have another length): discarded.
    Mismatch { actual: Digest },
}

/// A blob being written into a tier: what each tier's writer implements (the local disk's
/// [`BlobWriter`], the shared tier's `shared::Upload`). Bytes go in order; only
/// [`BlobWrite::finish`] makes the blob visible, and [`BlobWrite::abort`] leaves nothing of it.
pub trait BlobWrite: Send + 'static {
    /// Appends `chunk`. A tier whose copy is optional gives up by itself when it fails (the
    /// shared upload: the blob stays local) and answers `Ok`.
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, io::Result<()>>;
    /// Makes the blob visible under `digest` once it has `size` bytes. The local writer checks
    /// the length and the sha256 itself; a tier that does not hash (the shared upload checks
    /// the length only) is finished only after a writer that does has verified the same bytes.
    fn finish<'a>(
        self: Box<Self>,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, io::Result<Finished>>;
    /// Gives the blob up: nothing of it stays in the tier, and readers following it are cut.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()>;
}

pub struct BlobWriter {
    store: Arc<Store>,
    temp: Option<NamedTempFile>,
    file: Arc<File>,
    /// The contiguous prefix written and hashed.
    written: u64,
    hasher: Sha256,
    /// What is written beyond the prefix (a download fetched in parts).
    ahead: Coverage,
    progress: watch::Sender<Progress>,
}

/// The most read back at once to hash bytes written ahead of the prefix.
const CATCH_UP: usize = 1024 * 1024;

impl BlobWriter {
    pub(super) fn new(store: Arc<Store>, temp: NamedTempFile) -> io::Result<BlobWriter> {
        let file = Arc::new(temp.as_file().try_clone()?);
        Ok(BlobWriter {
            store,
            temp: Some(temp),
            file,
            written: 0,
            hasher: Sha256::new(),
            ahead: Coverage::default(),
            progress: watch::channel(Progress::Writing {
                written: 0,
                ahead: Spans::default(),
            })
            .0,
        })
    }

    /// A handle that reads the blob as it is written (zero-copy: it is the temp file).
    pub fn reader(&self, size: u64) -> BlobHandle {
        BlobHandle::following(
            Arc::new(LocalFile(self.file.clone())),
            size,
            self.progress.subscribe(),
        )
    }

    /// The contiguous prefix written (and hashed) so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Marks where parts fetched in parallel will start writing, so that readers of a range
    /// there know a writer is about to reach it.
    pub fn expect(&mut self, starts: impl IntoIterator<Item = u64>) {
        self.ahead.expect(starts);
        self.publish();
    }

    /// Appends `chunk` to the prefix, hashing it; readers see it once this returns.
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.write_at(self.written, chunk).await
    }

    /// Writes `chunk` at `offset`: at the end of the prefix it is hashed at once; further on,
    /// it is hashed when the prefix reaches it ([`BlobWriter::catch_up`]). Bytes already in
    /// the prefix are never written again (its hash stands for them).
    pub async fn write_at(&mut self, offset: u64, chunk: Bytes) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        if offset < self.written {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a write at {offset} into the {} bytes already hashed",
                    self.written
                ),
            ));
        }
        let (file, len) = (self.file.clone(), chunk.len() as u64);
        let mut hasher = (offset == self.written).then(|| std::mem::take(&mut self.hasher));
        // Hashing and writing are CPU and disk work: keep them off the async workers.
        let hashed = tokio::task::spawn_blocking(move || {
            crate::platform::write_all_at(&file, &chunk, offset)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            Ok::<_, io::Error>(hasher)
        })
        .await
        .map_err(io::Error::other)??;
        match hashed {
            Some(h) => {
                self.hasher = h;
                self.written += len;
                self.ahead.hashed_to(self.written);
            }
            None => self.ahead.insert(offset, offset + len),
        }
        self.publish();
        Ok(())
    }

    /// Hashes the next bytes written ahead of the prefix, if the prefix has reached them,
    /// reading them back (at most 1 MiB): the bytes, in order, or `None`.
    pub async fn catch_up(&mut self) -> io::Result<Option<Bytes>> {
        let Some(end) = self.ahead.ready_after(self.written) else {
            return Ok(None);
        };
        let (file, offset) = (self.file.clone(), self.written);
        let len = (end - offset).min(CATCH_UP as u64) as usize;
        let mut hasher = std::mem::take(&mut self.hasher);
        let (hasher, bytes) = tokio::task::spawn_blocking(move || {
            let bytes = crate::platform::read_at(&file, offset, len)?;
            hasher.update(&bytes);
            Ok::<_, io::Error>((hasher, bytes))
        })
        .await
        .map_err(io::Error::other)??;
        self.hasher = hasher;
        self.written += bytes.len() as u64;
        self.ahead.hashed_to(self.written);
        self.publish();
        Ok(Some(bytes))
    }

    fn publish(&self) {
        self.progress.send_replace(Progress::Writing {
            written: self.written,
            ahead: self.ahead.snapshot(),
        });
    }

    /// Checks the bytes against `digest` and `size`, then publishes them (fsync, atomic
    /// rename, index, evictions). Readers learn the verdict either way.
    pub async fn finish(self, digest: &Digest, size: u64) -> io::Result<Finished> {
        let span = crate::trace::span!("store.commit", %digest, size);
        self.commit(digest, size).instrument(span).await
    }

    async fn commit(mut self, digest: &Digest, size: u64) -> io::Result<Finished> {
        let actual = Digest::from_sha256(std::mem::take(&mut self.hasher).finalize().into());
        if self.written != size || actual != *digest {
            self.progress
                .send_replace(Progress::Failed(Failed::Mismatch {
                    actual: actual.clone(),
                }));
            return Ok(Finished::Mismatch { actual });
        }
        if !self.store.index.fits(size) {
            self.progress.send_replace(Progress::Complete);
            return Ok(Finished::TooLargeToKeep);
        }
        let Some(temp) = self.temp.take() else {
            return Err(io::Error::other("blob writer finished twice"));
        };
        match self.store.publish_blob(temp, digest, size).await {
            Ok(()) => {
                self.progress.send_replace(Progress::Complete);
                Ok(Finished::Published)
            }
            Err(e) => {
                let e = Arc::new(e);
                self.progress
                    .send_replace(Progress::Failed(Failed::Storage(e.clone())));
                Err(io::Error::new(e.kind(), e))
            }
        }
    }
}

impl BlobWriter {
    /// Gives the write up: readers are told, and the temp file is removed on the blocking
    /// pool (dropping the writer does the same, in place).
    pub async fn abort(mut self) {
        self.abandon();
        if let Some(temp) = self.temp.take() {
            let closed = tokio::task::spawn_blocking(move || temp.close()).await;
            if let Ok(Err(e)) = closed {
                tracing::debug!(error = %e, "cannot remove an abandoned download's temp file");
            }
        }
    }

    /// Readers of a write still in progress learn that it was abandoned.
    fn abandon(&self) {
        self.progress.send_if_modified(|p| {
            if matches!(p, Progress::Writing { .. }) {
                *p = Progress::Failed(Failed::Abandoned);
                true
            } else {
                false
            }
        });
    }
}

impl BlobWrite for BlobWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(BlobWriter::write(self, chunk))
    }

    fn finish<'a>(
        self: Box<Self>,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, io::Result<Finished>> {
        Box::pin(BlobWriter::finish(*self, digest, size))
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(BlobWriter::abort(*self))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.abandon();
    }
}
