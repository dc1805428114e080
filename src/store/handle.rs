//! The read side of the storage seam: a [`BlobHandle`] is what a lookup or a download in
//! progress hands out, whatever tier holds the bytes. Handlers and bodies read through it and
//! never see where the bytes live; a tier with local files exposes the descriptor so that
//! `sendfile` and page-cache checks keep working.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
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

/// How much the default [`BlobRead::stream`] reads per [`BlobRead::read_at`].
pub const STREAM_CHUNK: usize = 256 * 1024;

/// Random access to a blob's bytes: what each storage tier implements (the local disk's
/// [`LocalFile`], the shared tier's object in `shared::SharedBlob`).
pub trait BlobRead: Send + Sync + 'static {
    /// The local file, where the tier has one.
    fn file(&self) -> Option<&Arc<File>>;
    /// `len` bytes from `offset`; an error if the blob ends before.
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>>;
    /// The `len` bytes from `offset`, in chunks, ending with an error if the blob ends before.
    /// By default, one [`BlobRead::read_at`] of at most [`STREAM_CHUNK`] bytes per chunk, as
    /// the stream is read; a tier whose every read is a request overrides it with one
    /// request streamed in chunks.
    fn stream(self: Arc<Self>, offset: u64, len: u64) -> BoxStream<'static, io::Result<Bytes>> {
        let end = offset.saturating_add(len);
        stream::try_unfold((self, offset), move |(reader, pos)| async move {
            if pos >= end {
                return Ok(None);
            }
            let want = (end - pos).min(STREAM_CHUNK as u64) as usize;
            let chunk = reader.read_at(pos, want).await?;
            if chunk.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the blob ended at {pos}, before {end}"),
                ));
            }
            let next = pos + chunk.len() as u64;
            Ok(Some((chunk, (reader, next))))
        })
        .boxed()
    }
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
    /// A complete blob; `verified` is false for one not yet hashed by this process (found on
    /// disk at start-up, or the shared tier's object).
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

    /// The `len` bytes from `offset`, through the tier's [`BlobRead::stream`] (one request
    /// for a tier whose reads are requests). It reads what is there, without following a
    /// writer: for a complete handle (one still written is read by `handlers::body`), and,
    /// for an unverified one, for a range (a whole blob is served only once hashed).
    pub fn stream(&self, offset: u64, len: u64) -> BoxStream<'static, io::Result<Bytes>> {
        self.reader.clone().stream(offset, len)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::TryStreamExt;

    use super::*;

    /// A blob in memory, counting its reads.
    struct Counted {
        bytes: Bytes,
        reads: AtomicUsize,
    }

    impl BlobRead for Counted {
        fn file(&self) -> Option<&Arc<File>> {
            None
        }

        fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let end = offset as usize + len;
            let read = if end <= self.bytes.len() {
                Ok(self.bytes.slice(offset as usize..end))
            } else {
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            };
            Box::pin(async move { read })
        }
    }

    fn counted(len: usize) -> Arc<Counted> {
        Arc::new(Counted {
            bytes: (0..len).map(|i| (i % 251) as u8).collect(),
            reads: AtomicUsize::new(0),
        })
    }

    #[tokio::test]
    async fn the_default_stream_reads_a_range_in_bounded_chunks_as_it_is_read() {
        let blob = counted(3 * STREAM_CHUNK);
        let len = 2 * STREAM_CHUNK as u64 + 10;
        let chunks = blob.clone().stream(7, len);
        assert_eq!(
            blob.reads.load(Ordering::SeqCst),
            0,
            "nothing read before asked"
        );
        let chunks: Vec<Bytes> = chunks.try_collect().await.unwrap();
        assert_eq!(
            chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
            [STREAM_CHUNK, STREAM_CHUNK, 10]
        );
        assert_eq!(chunks.concat(), blob.bytes[7..7 + len as usize]);
        assert_eq!(blob.reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_default_stream_fails_past_the_blobs_end() {
        let blob = counted(1000);
        let read: Result<Vec<Bytes>, _> = blob.clone().stream(995, 10).try_collect().await;
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let handle = BlobHandle::complete(blob, 1000, true);
        let none: Vec<Bytes> = handle.stream(10, 0).try_collect().await.unwrap();
        assert!(none.is_empty());
    }
}
