//! The storage seam's backend side: what an object store must do to be the shared tier
//! (read a blob from an offset, read and write small objects, delete, list, upload in parts
//! made visible only on completion, and presign where it can), whatever engine it is. The S3
//! backend (`s3.rs`) is one. The rest of the mirror reaches a backend only through
//! `shared::SharedTier`, which adds what every backend shares: the fleet's access order, reader
//! protection, eviction, and the deletion of damaged objects.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::oci::Digest;

/// A stored object's kind, which picks its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Blob,
    Manifest,
}

/// The object name of `digest` of `kind`: the local disk's layout (`blobs/sha256/<hex>`).
pub fn object_name(kind: Kind, digest: &Digest) -> String {
    let dir = match kind {
        Kind::Blob => "blobs",
        Kind::Manifest => "manifests",
    };
    format!("{dir}/{}/{}", crate::oci::ALGORITHM, digest.hex())
}

/// A blob read from a backend: the bytes asked for, from an offset on.
pub struct BlobStream {
    /// The whole object's length.
    pub size: u64,
    pub chunks: BoxStream<'static, Result<Bytes, Error>>,
}

/// A backend request that failed, with its typed cause. Names the object, never a credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("shared store: {0}")]
    Store(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The store answered that the object does not exist (reads answer `None` instead).
    #[error("shared store: no such object")]
    NotFound,
    #[error("shared store: no answer to {what} within {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
    /// Marked down after a failure, until a probe gets an answer.
    #[error("shared store: down since a request failed; skipped until it answers again")]
    Down,
    #[error("shared store: the upload failed earlier")]
    UploadFailed,
}

impl Error {
    /// Whether the request was skipped because the store is marked down: its failure was
    /// counted and logged once already.
    pub fn is_down(&self) -> bool {
        matches!(self, Error::Down)
    }
}

/// A read through the storage seam fails with an `io::Error` of the matching kind.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        let kind = match e {
            Error::NotFound => std::io::ErrorKind::NotFound,
            Error::Timeout { .. } => std::io::ErrorKind::TimedOut,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// An upload in parts: invisible until [`PartUpload::complete`]; aborted by
/// [`PartUpload::abort`] or, in the background, when dropped.
pub trait PartUpload: Send {
    /// Passes `chunk` on, waiting (boundedly) when the store is slower than the caller; after
    /// a failure the upload is given up and this does nothing.
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, ()>;
    /// Makes the object visible: call only once every byte is verified.
    fn complete(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>>;
    /// Gives the upload up: the parts sent are discarded and nothing becomes visible. Returns
    /// once the store has been told (or, boundedly, when it does not answer: the upload is
    /// then aborted in the background).
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// An object store that can hold the shared tier. Every request has its deadline; a backend
/// that fails is marked down (reads answer "not here", writes are skipped) until it answers.
pub trait Backend: Send + Sync {
    /// The bytes `from..to` of the blob `digest` (to its end without `to`), in one request,
    /// or `None` when the store does not hold it. The body may end early (a range past the
    /// object's end): callers count what they read.
    fn blob(
        &self,
        digest: &Digest,
        from: u64,
        to: Option<u64>,
    ) -> BoxFuture<'_, Result<Option<BlobStream>, Error>>;
    /// The size of the blob `digest`, or `None` when the store does not hold it.
    fn blob_size(&self, digest: &Digest) -> BoxFuture<'_, Result<Option<u64>, Error>>;
    /// A small object whole (a manifest, in the local store's format).
    fn read(&self, kind: Kind, digest: &Digest) -> BoxFuture<'_, Result<Option<Bytes>, Error>>;
    /// Writes a small object whole; the caller has verified it.
    fn write(&self, kind: Kind, digest: &Digest, bytes: Bytes) -> BoxFuture<'_, Result<(), Error>>;
    /// Deletes the object named `name` (as [`object_name`] makes them); absent is done.
    fn delete_named<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>>;
    /// Every object, as (name, size, last modified in Unix milliseconds).
    fn list(&self) -> BoxStream<'_, Result<(String, u64, u64), Error>>;
    /// Starts an upload of the blob `digest`.
    fn upload(&self, digest: &Digest) -> Box<dyn PartUpload>;
    /// A URL that GETs the blob without credentials for `ttl`; `None` for a store that cannot
    /// sign.
    fn presigned(
        &self,
        digest: &Digest,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Option<url::Url>, Error>>;
}
