//! Blobs: content-addressed files, committed only after their digest and size were verified.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use moka::sync::Cache;
use tempfile::NamedTempFile;

use super::handle::{BlobHandle, LocalFile};
use super::index::{Index, Key};
use super::{blocking, digest_path, persist};
use crate::oci::Digest;

/// Descriptors of recently served blobs kept open: a hit then costs no path lookup and no
/// hop to the blocking pool. Bounded in number, and closed after [`OPEN_IDLE`] unused so that
/// a file deleted behind the mirror's back (`pullthrough cache prune`) frees its space soon.
const OPEN_FILES: u64 = 1024;
const OPEN_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Blobs {
    dir: PathBuf,
    tmp: PathBuf,
    index: Arc<Index>,
    open_files: Cache<Digest, Arc<File>, crate::hashing::State>,
}

impl Blobs {
    pub(super) fn new(dir: PathBuf, tmp: PathBuf, index: Arc<Index>) -> Blobs {
        Blobs {
            dir,
            tmp,
            index,
            open_files: Cache::builder()
                .max_capacity(OPEN_FILES)
                .time_to_idle(OPEN_IDLE)
                .build_with_hasher(crate::hashing::State::default()),
        }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        digest_path(&self.dir, digest)
    }

    /// Opens a committed blob, or `None` when it is not cached. A file whose size differs
    /// from the indexed one (truncated, replaced) is removed rather than served. The handle
    /// is unverified for a blob found on disk at start-up and not yet hashed by this process.
    pub async fn open(&self, digest: &Digest) -> io::Result<Option<BlobHandle>> {
        let key = Key::blob(digest);
        let Some((size, verified)) = self.index.touch(&key) else {
            return Ok(None);
        };
        if let Some(file) = self.open_files.get(digest) {
            // fstat on an open descriptor needs no disk I/O; a file truncated meanwhile is
            // dropped here and handled by the full open below.
            // A file unlinked behind our back (`pullthrough cache prune`) has no links left.
            if file
                .metadata()
                .is_ok_and(|m| m.len() == size && std::os::unix::fs::MetadataExt::nlink(&m) > 0)
            {
                return Ok(Some(hit(file, size, verified)));
            }
            self.open_files.invalidate(digest);
        }
        let path = self.path(digest);
        let opened = blocking(move || match File::open(&path) {
            Ok(file) => {
                let len = file.metadata()?.len();
                if len != size {
                    tracing::warn!(path = %path.display(), len, expected = size, "cached blob has the wrong size; removing it");
                    let _ = std::fs::remove_file(&path);
                    return Ok(None);
                }
                Ok(Some(file))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        match opened {
            Some(file) => {
                let file = Arc::new(file);
                self.open_files.insert(digest.clone(), file.clone());
                Ok(Some(hit(file, size, verified)))
            }
            None => {
                self.index.remove(&key);
                Ok(None)
            }
        }
    }

    /// Drops a blob found to be corrupt. Blocking.
    pub fn discard(&self, digest: &Digest) {
        self.forget(digest);
        self.index.remove(&Key::blob(digest));
        let _ = std::fs::remove_file(self.path(digest));
    }

    /// Closes the cached descriptor of a blob whose file is going away.
    pub(super) fn forget(&self, digest: &Digest) {
        self.open_files.invalidate(digest);
    }

    pub fn mark_verified(&self, digest: &Digest) {
        self.index.mark_verified(&Key::blob(digest));
    }

    /// A new temp file for a download; deleted when dropped unless persisted.
    pub(super) async fn create_temp(&self) -> io::Result<NamedTempFile> {
        let tmp = self.tmp.clone();
        blocking(move || NamedTempFile::new_in(tmp)).await
    }

    /// Makes a verified temp file visible under its digest and indexes it; returns what must
    /// be evicted to stay within the bound.
    pub(super) async fn commit(
        &self,
        temp: NamedTempFile,
        digest: &Digest,
        size: u64,
    ) -> io::Result<Vec<Key>> {
        let path = self.path(digest);
        blocking(move || persist(temp, &path)).await?;
        Ok(self.index.insert(Key::blob(digest), size, true))
    }
}

fn hit(file: Arc<File>, size: u64, verified: bool) -> BlobHandle {
    BlobHandle::complete(Arc::new(LocalFile(file)), size, verified)
}
