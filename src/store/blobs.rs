//! Blobs: content-addressed files, committed only after their digest and size were verified.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tempfile::NamedTempFile;

use super::{blocking, digest_path};
use crate::oci::Digest;

pub struct Blobs {
    dir: PathBuf,
    tmp: PathBuf,
}

impl Blobs {
    pub(super) fn new(dir: PathBuf, tmp: PathBuf) -> Blobs {
        Blobs { dir, tmp }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        digest_path(&self.dir, digest)
    }

    /// Opens a committed blob: its file and size, or `None` when it is not cached.
    pub async fn open(&self, digest: &Digest) -> io::Result<Option<(Arc<File>, u64)>> {
        if !digest.is_sha256() {
            return Ok(None);
        }
        let path = self.path(digest);
        blocking(move || match File::open(&path) {
            Ok(file) => {
                let len = file.metadata()?.len();
                Ok(Some((Arc::new(file), len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    /// A new temp file for a download; deleted when dropped unless committed.
    pub async fn create_temp(&self) -> io::Result<NamedTempFile> {
        let tmp = self.tmp.clone();
        blocking(move || NamedTempFile::new_in(tmp)).await
    }

    /// Makes a verified temp file visible under its digest (fsync, then atomic rename).
    pub async fn commit(&self, temp: NamedTempFile, digest: &Digest) -> io::Result<()> {
        let path = self.path(digest);
        blocking(move || {
            temp.as_file().sync_data()?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            temp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })
        .await
    }
}
