//! The on-disk cache. Layout under the storage directory:
//!
//! ```text
//! blobs/sha256/ab/abcdef…      blob bytes, named by their verified digest
//! manifests/sha256/ab/abcdef…  "<media type>\n" + the manifest's exact bytes
//! tags/<registry>/<repo>/_tags/<tag>   JSON tag record (digest, media type, fetch time)
//! tmp/                         downloads in progress; emptied at start-up
//! ```
//!
//! Paths are only ever built from parsed `Digest`, `RepoName` and `Tag` values and from
//! configured registry names, so no request can name a file outside this tree. A file appears
//! under its final name only by an atomic rename after verification.

pub mod blobs;
pub mod manifests;
pub mod tags;

use std::io;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::oci::Digest;

pub struct Store {
    root: PathBuf,
    pub blobs: blobs::Blobs,
    pub manifests: manifests::Manifests,
    pub tags: tags::Tags,
}

impl Store {
    /// Opens (creating if needed) the storage directory and removes temp files left by a
    /// previous process. Blocking: call before serving, or from `spawn_blocking`.
    pub fn open(root: &Path) -> io::Result<Store> {
        let tmp = root.join("tmp");
        for dir in ["blobs/sha256", "manifests/sha256", "tags"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        std::fs::create_dir_all(&tmp)?;
        let mut removed = 0usize;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed temp files left by an earlier run");
        }
        Ok(Store {
            root: root.to_owned(),
            blobs: blobs::Blobs::new(root.join("blobs"), tmp.clone()),
            manifests: manifests::Manifests::new(root.join("manifests"), tmp.clone()),
            tags: tags::Tags::new(root.join("tags"), tmp),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// `<dir>/sha256/ab/abcdef…` for a sha256 digest.
fn digest_path(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join(digest.algorithm()).join(&hex[..2]).join(hex)
}

/// Writes `bytes` to a temp file and renames it to `path`: readers see the old file or the
/// whole new one, never a part.
fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = NamedTempFile::new_in(tmp)?;
    file.write_all(bytes)?;
    file.as_file().sync_data()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}
