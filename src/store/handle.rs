//! The read side of the storage seam: a [`BlobHandle`] is what a lookup or a download in
//! progress hands out, whatever tier holds the bytes. Handlers and bodies read through it and
//! never see where the bytes live; a tier with local files exposes the descriptor so that
//! `sendfile` and page-cache checks keep working.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::coverage::Spans;
use crate::oci::Digest;

/// How far a blob has been written. A committed blob is `Complete`; a download in progress
/// publishes its progress through a watch channel.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The first `written` bytes are readable (and hashed), and so are the `ahead` spans of
    /// a download fetched in parts; more will come, or the verdict on the whole is pending.
    Writing { written: u64, ahead: Spans },
    /// The whole blob is readable and verified.
    Complete,
    /// The write or the verification failed; readers must cut their connection.
    Failed(Failed),
}

impl Progress {
    /// Where the bytes readable from `pos` end (`pos` itself when they are not there yet).
    pub fn readable_from(&self, pos: u64) -> u64 {
        match self {
            Progress::Writing { written, ahead } => ahead.readable_from(*written, pos),
            Progress::Complete => u64::MAX,
            Progress::Failed(_) => pos,
        }
    }

    /// How far `pos` lies ahead of a writer that will reach it (`None`: there already, or
    /// no writer before it).
    pub fn behind_head(&self, pos: u64) -> Option<u64> {
        match self {
            Progress::Writing { written, ahead } => ahead.behind_head(*written, pos),
            _ => None,
        }
    }
}

/// Why the readers of a blob are cut.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failed {
    #[error("content hashed to {actual}")]
    Mismatch { actual: Digest },
    #[error("cannot store the blob: {0}")]
    Storage(#[source] Arc<io::Error>),
    #[error("cannot read the cached blob to verify it: {0}")]
    Unreadable(#[source] Arc<io::Error>),
    #[error("its verification panicked")]
    Panicked,
    #[error("the download was abandoned")]
    Abandoned,
}

/// Random access to a blob's bytes: what a storage tier implements.
pub trait BlobRead: Send + Sync {
    /// The local file, where the tier has one.
    fn file(&self) -> Option<&Arc<File>>;
    /// `len` bytes from `offset`; an error if the blob ends before.
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>>;
}

/// A blob on the local disk (committed, or a download's temp file).
pub(crate) struct LocalFile(pub(crate) Arc<File>);

impl BlobRead for LocalFile {
    fn file(&self) -> Option<&Arc<File>> {
        Some(&self.0)
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
        let file = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || crate::platform::read_at(&file, offset, len))
                .await
                .map_err(io::Error::other)?
        })
    }
}

/// A readable blob of a known size, with the writer's progress while it is still being
/// written or verified.
#[derive(Clone)]
pub struct BlobHandle {
    reader: Arc<dyn BlobRead>,
    size: u64,
    progress: Option<watch::Receiver<Progress>>,
    verified: bool,
}

impl BlobHandle {
    /// A complete blob; `verified` is false for one found on disk at start-up and not yet
    /// hashed by this process.
    pub fn complete(reader: Arc<dyn BlobRead>, size: u64, verified: bool) -> BlobHandle {
        BlobHandle {
            reader,
            size,
            progress: None,
            verified,
        }
    }

    /// A blob that is readable only as far as `progress` says.
    pub fn following(
        reader: Arc<dyn BlobRead>,
        size: u64,
        progress: watch::Receiver<Progress>,
    ) -> BlobHandle {
        BlobHandle {
            reader,
            size,
            progress: Some(progress),
            verified: true,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> Option<&Arc<File>> {
        self.reader.file()
    }

    pub fn is_verified(&self) -> bool {
        self.verified
    }

    /// Readers follow `progress` (a verification pass) until its verdict.
    pub fn verified_by(mut self, progress: watch::Receiver<Progress>) -> BlobHandle {
        self.progress = Some(progress);
        self.verified = true;
        self
    }

    /// Where the writer is now (`None`: every byte is there and verified).
    pub fn progress(&self) -> Option<Progress> {
        self.progress.as_ref().map(|rx| rx.borrow().clone())
    }

    /// The reader and the progress to follow (`None`: every byte is there and verified).
    pub fn into_parts(self) -> (Arc<dyn BlobRead>, Option<watch::Receiver<Progress>>) {
        (self.reader, self.progress)
    }
}
