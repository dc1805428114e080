//! Test support for the shared tier: an in-memory object store that records what it was asked
//! (GETs and their ranges, multipart uploads started, completed and aborted) and can be made
//! to fail or fall silent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{BoxStream, StreamExt};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use tokio::sync::watch;

use crate::sync::lock;

/// The multipart uploads a [`Recording`] store saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Uploads {
    pub started: usize,
    pub completed: usize,
    pub aborted: usize,
}

/// The in-memory store, counting multipart uploads started, completed and aborted (an upload
/// neither completed nor aborted is one S3 keeps, and bills, forever) and recording the range
/// of every GET (not HEAD); it fails every part when `fail_parts` is set, never answers a GET
/// when `silent_gets` is, and answers a GET's headers, then no byte, when `silent_bodies` is.
#[derive(Debug)]
pub struct Recording {
    inner: InMemory,
    uploads: Arc<watch::Sender<Uploads>>,
    gets: Mutex<Vec<Option<GetRange>>>,
    pub fail_parts: Arc<AtomicBool>,
    pub silent_gets: AtomicBool,
    pub silent_bodies: AtomicBool,
}

impl Recording {
    pub fn new() -> Arc<Recording> {
        Arc::new(Recording {
            inner: InMemory::new(),
            uploads: Arc::new(watch::Sender::new(Uploads::default())),
            gets: Mutex::new(Vec::new()),
            fail_parts: Arc::new(AtomicBool::new(false)),
            silent_gets: AtomicBool::new(false),
            silent_bodies: AtomicBool::new(false),
        })
    }

    pub fn uploads(&self) -> Uploads {
        *self.uploads.borrow()
    }

    /// The range of every GET so far (`None`: the whole object), in order.
    pub fn gets(&self) -> Vec<Option<GetRange>> {
        lock(&self.gets).clone()
    }

    /// Waits (in virtual time, so a wait that cannot end fails at once) until `done` holds of
    /// the uploads seen.
    pub async fn wait_until(&self, what: &str, done: impl FnMut(&Uploads) -> bool) {
        let mut seen = self.uploads.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(60), seen.wait_for(done)).await;
        assert!(waited.is_ok(), "{what}: {:?}", self.uploads());
    }
}

impl std::fmt::Display for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recording({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Recording {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        self.uploads.send_modify(|u| u.started += 1);
        Ok(Box::new(RecordingUpload {
            inner,
            uploads: self.uploads.clone(),
            fail_parts: self.fail_parts.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head {
            return self.inner.get_opts(location, options).await;
        }
        lock(&self.gets).push(options.range.clone());
        if self.silent_gets.load(Ordering::SeqCst) {
            return futures_util::future::pending().await;
        }
        let got = self.inner.get_opts(location, options).await?;
        if !self.silent_bodies.load(Ordering::SeqCst) {
            return Ok(got);
        }
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures_util::stream::pending().boxed()),
            meta: got.meta,
            range: got.range,
            attributes: got.attributes,
        })
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[derive(Debug)]
struct RecordingUpload {
    inner: Box<dyn MultipartUpload>,
    uploads: Arc<watch::Sender<Uploads>>,
    fail_parts: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl MultipartUpload for RecordingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        if self.fail_parts.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(object_store::Error::Generic {
                    store: "recording",
                    source: "injected part failure".into(),
                })
            });
        }
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let done = self.inner.complete().await;
        if done.is_ok() {
            self.uploads.send_modify(|u| u.completed += 1);
        }
        done
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.uploads.send_modify(|u| u.aborted += 1);
        self.inner.abort().await
    }
}
