//! The write side of the storage seam: a [`BlobWriter`] takes a blob being downloaded. Its
//! bytes are readable (by followers, through [`BlobWriter::reader`]) as they arrive, and hashed
//! as they are written; [`BlobWriter::finish`] alone makes the blob visible under its digest,
//! and only when the length and the sha256 match. Dropping an unfinished writer aborts it:
//! the temp file goes and readers are told the write failed.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;
use tokio::sync::watch;

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

pub struct BlobWriter {
    store: Arc<Store>,
    temp: Option<NamedTempFile>,
    file: Arc<File>,
    written: u64,
    hasher: Sha256,
    progress: watch::Sender<Progress>,
}

impl BlobWriter {
    pub(super) fn new(store: Arc<Store>, temp: NamedTempFile) -> io::Result<BlobWriter> {
        let file = Arc::new(temp.as_file().try_clone()?);
        Ok(BlobWriter {
            store,
            temp: Some(temp),
            file,
            written: 0,
            hasher: Sha256::new(),
            progress: watch::channel(Progress::Writing { written: 0 }).0,
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

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `chunk`, hashing it; readers see it once this returns.
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let (file, offset, len) = (self.file.clone(), self.written, chunk.len() as u64);
        let mut hasher = std::mem::take(&mut self.hasher);
        // Hashing and writing are CPU and disk work: keep them off the async workers.
        self.hasher = tokio::task::spawn_blocking(move || {
            crate::platform::write_all_at(&file, &chunk, offset)?;
            hasher.update(&chunk);
            Ok::<_, io::Error>(hasher)
        })
        .await
        .map_err(io::Error::other)??;
        self.written += len;
        self.progress.send_replace(Progress::Writing {
            written: self.written,
        });
        Ok(())
    }

    /// Checks the bytes against `digest` and `size`, then publishes them (fsync, atomic
    /// rename, index, evictions). Readers learn the verdict either way.
    pub async fn finish(mut self, digest: &Digest, size: u64) -> io::Result<Finished> {
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

impl Drop for BlobWriter {
    fn drop(&mut self) {
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
