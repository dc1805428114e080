//! Manifests by digest: the upstream's exact bytes and media type. A digest names immutable
//! content, so a stored manifest is served for ever. Recently used manifests are also kept in
//! memory, since clients ask for the same few over and over.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use moka::sync::Cache;

use super::index::{Index, Key};
use super::{blocking, digest_path, write_atomic};
use crate::oci::{Digest, ManifestHeaders};

/// Memory for manifests kept in RAM, by their byte size.
const MEMORY_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// Its response headers, made once here rather than on each hit.
    pub headers: ManifestHeaders,
}

impl Manifest {
    pub fn new(digest: Digest, media_type: String, bytes: Bytes) -> Manifest {
        Manifest {
            headers: ManifestHeaders::new(&digest, &media_type),
            digest,
            media_type,
            bytes,
        }
    }
}

/// Memory for manifests that could not be written (the disk is full), so that each costs the
/// upstream one pull, not one per request.
const UNWRITTEN_BYTES: u64 = 16 * 1024 * 1024;

pub struct Manifests {
    dir: PathBuf,
    tmp: PathBuf,
    memory: Cache<Digest, Arc<Manifest>, crate::hashing::State>,
    unwritten: Cache<Digest, Arc<Manifest>, crate::hashing::State>,
    index: Arc<Index>,
}

fn weigh(_: &Digest, m: &Arc<Manifest>) -> u32 {
    u32::try_from(m.bytes.len()).unwrap_or(u32::MAX)
}

/// A manifest as a file holds it (on disk, and in the shared tier): its media type, a
/// newline, its exact bytes.
pub fn encode(m: &Manifest) -> Vec<u8> {
    let mut raw = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
    raw.extend_from_slice(m.media_type.as_bytes());
    raw.push(b'\n');
    raw.extend_from_slice(&m.bytes);
    raw
}

/// The manifest `digest` from what [`encode`] made; `None` when it has no media type line or
/// its bytes do not hash to `digest`.
pub fn decode(digest: &Digest, raw: Bytes) -> Option<Manifest> {
    let newline = raw.iter().position(|&b| b == b'\n')?;
    let bytes = raw.slice(newline + 1..);
    if Digest::sha256_of(&bytes) != *digest {
        return None;
    }
    Some(Manifest::new(
        digest.clone(),
        String::from_utf8_lossy(&raw[..newline]).into_owned(),
        bytes,
    ))
}

impl Manifests {
    pub(super) fn new(dir: PathBuf, tmp: PathBuf, index: Arc<Index>) -> Manifests {
        Manifests {
            dir,
            tmp,
            index,
            memory: Cache::builder()
                .max_capacity(MEMORY_BYTES)
                .weigher(weigh)
                .build_with_hasher(crate::hashing::State::default()),
            unwritten: Cache::builder()
                .max_capacity(UNWRITTEN_BYTES)
                .weigher(weigh)
                .build_with_hasher(crate::hashing::State::default()),
        }
    }

    pub async fn get(&self, digest: &Digest) -> io::Result<Option<Arc<Manifest>>> {
        if self.index.touch(&Key::manifest(digest)).is_none() {
            return Ok(self.unwritten.get(digest));
        }
        if let Some(m) = self.memory.get(digest) {
            return Ok(Some(m));
        }
        let path = digest_path(&self.dir, digest);
        let read = blocking(move || match std::fs::read(&path) {
            Ok(raw) => Ok(Some(raw)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        let Some(raw) = read else {
            self.index.remove(&Key::manifest(digest));
            return Ok(None);
        };
        let Some(m) = decode(digest, Bytes::from(raw)) else {
            // Manifests are small: re-hashing on load means a damaged file is never served.
            tracing::warn!(%digest, "stored manifest is damaged or does not match its digest; removing it");
            self.index.remove(&Key::manifest(digest));
            let path = digest_path(&self.dir, digest);
            blocking(move || std::fs::remove_file(path)).await.ok();
            return Ok(None);
        };
        let m = Arc::new(m);
        self.memory.insert(digest.clone(), m.clone());
        Ok(Some(m))
    }

    /// Keeps a manifest in memory only (the disk cannot take it now).
    pub(super) fn keep_unwritten(&self, m: Arc<Manifest>) {
        self.unwritten.insert(m.digest.clone(), m);
    }

    pub(super) fn forget(&self, digest: &Digest) {
        self.memory.invalidate(digest);
    }

    /// Forgets a manifest kept in memory only (a purge); whether there was one.
    pub(super) fn forget_unwritten(&self, digest: &Digest) -> bool {
        self.unwritten.remove(digest).is_some()
    }

    /// Stores a manifest whose bytes were verified against `m.digest`; returns what must be
    /// evicted to stay within the bound. When the file cannot be written, the manifest is
    /// kept in memory (bounded) and the error returned.
    pub(super) async fn put(&self, m: Arc<Manifest>) -> io::Result<Vec<Key>> {
        let path = digest_path(&self.dir, &m.digest);
        let tmp = self.tmp.clone();
        let raw = encode(&m);
        let size = raw.len() as u64;
        if let Err(e) = blocking(move || write_atomic(&tmp, &path, &raw)).await {
            self.keep_unwritten(m);
            return Err(e);
        }
        self.unwritten.invalidate(&m.digest);
        let evicted = self.index.insert(Key::manifest(&m.digest), size, true);
        self.memory.insert(m.digest.clone(), m);
        Ok(evicted)
    }
}
