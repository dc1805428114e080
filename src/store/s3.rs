//! The S3 backend of the shared tier: blobs and manifests in an S3-compatible object store
//! that every replica reads, under the same content-addressed names as the local disk (`blobs/sha256/<hex>`,
//! `manifests/sha256/<hex>`). Only verified content is written here: a blob's multipart
//! upload is completed (and so becomes visible) only after its sha256 matched, and an
//! abandoned upload leaves nothing. Readers verify again as they stream (see `download`), so
//! an object that does not match its name is deleted, never served.
//!
//! `object_store` does the S3 work; its in-memory store stands in for it in tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, FuturesUnordered, StreamExt};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use tokio::sync::{mpsc, oneshot};

use super::tier::{object_name, Backend, BlobStream, Error, Kind, PartUpload};
use crate::config::SharedStorageConfig;
use crate::oci::Digest;

/// Parts of a multipart upload: the smallest S3 allows, so an upload buffers little.
const PART: usize = 5 * 1024 * 1024;
/// Parts sent at once per upload.
const PARTS_IN_FLIGHT: usize = 2;
/// The most one request may wait for the store's answer (its headers, or a small object
/// whole): a store that accepts and never answers costs the first request this, then is marked
/// down (see [`REPROBE`]).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The most a streamed object body may stay silent between two chunks.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most one part of an upload (or its completion) may take.
const PART_TIMEOUT: Duration = Duration::from_secs(30);
/// The most an explicit abort waits for the upload's task: it may be waiting on a part before
/// it reads the abort, then asks the store to drop the parts.
const ABORT_WAIT: Duration = PART_TIMEOUT.saturating_add(REQUEST_TIMEOUT);
/// While the store is down, it is asked this often in the background whether it is back;
/// requests meanwhile skip it at once (reads answer "not here", so the upstream answers).
const REPROBE: Duration = Duration::from_secs(5);

/// The backend's error for an `object_store` failure: "not found" is an answer, the rest a
/// failure with its cause.
fn store_error(e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::NotFound,
        e => Error::Store(Arc::new(e)),
    }
}

/// `request` under `limit`: a timeout is an [`Error::Timeout`] naming `what`.
async fn within<T>(
    what: &'static str,
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, object_store::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, request).await {
        Ok(r) => r.map_err(store_error),
        Err(_) => Err(Error::Timeout { what, limit }),
    }
}

/// Whether `e` is the store's answer "no such object" (not a failure).
fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::NotFound)
}

/// `items` ending with [`Error::Timeout`] (naming `what`) once the store stays silent for
/// `limit`, and after its first error.
fn with_idle_timeout<'a, T: Send + 'a>(
    items: BoxStream<'a, Result<T, object_store::Error>>,
    what: &'static str,
    limit: Duration,
) -> BoxStream<'a, Result<T, Error>> {
    let items = items.map(|r| r.map_err(store_error)).boxed();
    crate::idle::idle_timeout(items, limit, move || Error::Timeout { what, limit })
}

/// Asks the store every [`REPROBE`] whether it answers (any answer, "not found" included),
/// then marks it up again.
async fn probe(store: Arc<dyn ObjectStore>, down: Arc<AtomicBool>) {
    let path = Path::from("pullthrough-probe");
    loop {
        tokio::time::sleep(REPROBE).await;
        match within("a probe", REQUEST_TIMEOUT, store.head(&path)).await {
            Err(e) if !is_not_found(&e) => {
                tracing::debug!(error = %e, "the shared tier is still down");
            }
            _ => {
                down.store(false, Ordering::Relaxed);
                tracing::info!("the shared tier answers again");
                return;
            }
        }
    }
}

/// The S3 backend of the shared tier (any S3-compatible store: Garage, MinIO, AWS).
pub struct S3 {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    /// Whether a request failed and no probe has had an answer since.
    down: Arc<AtomicBool>,
}

impl S3 {
    /// The S3 store of `[storage.shared]`, path-style, with short connect timeouts and few
    /// retries: an unreachable store must cost a request little, since the upstream can still
    /// answer it. (The client's own timeout stays off: it would also cut a long body; each
    /// request here has its deadline, and each body an idle timeout.)
    pub fn connect(cfg: &SharedStorageConfig) -> Result<S3, Error> {
        let key = cfg.access_key_id.as_ref().map(|s| s.expose()).unwrap_or("");
        let secret = cfg
            .secret_access_key
            .as_ref()
            .map(|s| s.expose())
            .unwrap_or("");
        let options = object_store::ClientOptions::new()
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout_disabled();
        let retry = object_store::RetryConfig {
            max_retries: 1,
            retry_timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(store_error)?;
        let s3 = Arc::new(s3);
        Ok(S3 {
            store: s3.clone(),
            signer: Some(s3),
            down: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A tier over any object store (the in-memory one in tests); no presigned URLs.
    pub fn over(store: Arc<dyn ObjectStore>) -> S3 {
        S3 {
            store,
            signer: None,
            down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the store is marked down: reads answer "not here" and writes are skipped.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Notes the outcome of a request (a `NotFound` is an answer, not a failure): a failure
    /// marks the store down and starts the probe that marks it up again.
    fn note<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &r {
            if !is_not_found(e)
                && !matches!(e, Error::Down)
                && !self.down.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(error = %e, "the shared tier is down; skipped until it answers again");
                tokio::spawn(probe(self.store.clone(), self.down.clone()));
            }
        }
        r
    }

    /// `request` unless the store is down, under `limit`, its outcome noted.
    async fn ask<T>(
        &self,
        what: &'static str,
        limit: Duration,
        request: impl std::future::Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, Error> {
        if self.is_down() {
            return Err(Error::Down);
        }
        self.note(within(what, limit, request).await)
    }

    /// `Ok(None)` for an object the store does not hold, or while it is down.
    fn absent<T>(r: Result<T, Error>) -> Result<Option<T>, Error> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(Error::Down) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bytes `from..to` of the blob `digest` (to its end without `to`), in one GET, or
    /// `None` when the tier does not hold it.
    async fn blob(
        &self,
        digest: &Digest,
        from: u64,
        to: Option<u64>,
    ) -> Result<Option<BlobStream>, Error> {
        let path = Path::from(object_name(Kind::Blob, digest));
        let range = match to {
            Some(to) => Some(GetRange::Bounded(from..to)),
            None => (from > 0).then_some(GetRange::Offset(from)),
        };
        let options = GetOptions {
            range,
            ..GetOptions::default()
        };
        let got = self.ask(
            "a blob read",
            REQUEST_TIMEOUT,
            self.store.get_opts(&path, options),
        );
        Ok(Self::absent(got.await)?.map(|got| BlobStream {
            size: got.meta.size,
            chunks: with_idle_timeout(got.into_stream(), "the next chunk of a blob", IDLE_TIMEOUT),
        }))
    }

    /// The size of the blob `digest`, or `None` when the tier does not hold it.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, Error> {
        let path = Path::from(object_name(Kind::Blob, digest));
        let meta = self.ask("a blob's size", REQUEST_TIMEOUT, self.store.head(&path));
        Ok(Self::absent(meta.await)?.map(|meta| meta.size))
    }

    /// A small object whole (a manifest, in the local store's format).
    async fn read(&self, kind: Kind, digest: &Digest) -> Result<Option<Bytes>, Error> {
        let path = Path::from(object_name(kind, digest));
        let read = self.ask("a small object read", REQUEST_TIMEOUT, async {
            self.store.get(&path).await?.bytes().await
        });
        Self::absent(read.await)
    }

    /// Writes a small object whole; the caller has verified it.
    async fn write(&self, kind: Kind, digest: &Digest, bytes: Bytes) -> Result<(), Error> {
        let path = Path::from(object_name(kind, digest));
        let put = self.store.put(&path, PutPayload::from_bytes(bytes));
        self.ask("a small object write", REQUEST_TIMEOUT, put)
            .await
            .map(|_| ())
    }

    /// Deletes the object named `name` (as [`object_name`] makes them), for eviction.
    async fn delete_named(&self, name: &str) -> Result<(), Error> {
        let path = Path::from(name);
        match self
            .ask("a delete", REQUEST_TIMEOUT, self.store.delete(&path))
            .await
        {
            Err(e) if !is_not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Every object the tier holds, as (name, size, last modified in Unix milliseconds), in
    /// the store's listing order, pages fetched as the stream is read.
    fn list(&self) -> BoxStream<'_, Result<(String, u64, u64), Error>> {
        let pages = futures_util::stream::iter(["blobs", "manifests"].map(Path::from))
            .flat_map(move |dir| self.store.list(Some(&dir)))
            .boxed();
        with_idle_timeout(pages, "a listing page", REQUEST_TIMEOUT)
            .map(|meta| {
                let meta = meta?;
                let modified = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
                Ok((meta.location.to_string(), meta.size, modified))
            })
            .boxed()
    }

    /// A presigned GET URL of the blob, valid for `ttl`, or `None` for a store that cannot
    /// sign. It carries a signature of the object store's key, never an upstream token.
    async fn presigned(&self, digest: &Digest, ttl: Duration) -> Result<Option<url::Url>, Error> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let path = Path::from(object_name(Kind::Blob, digest));
        signer
            .signed_url(http::Method::GET, &path, ttl)
            .await
            .map(Some)
            .map_err(store_error)
    }

    /// Starts a multipart upload of the blob `digest`, fed chunk by chunk as it downloads and
    /// completed by [`Upload::complete`] once verified; dropped, it is aborted.
    fn upload(&self, digest: &Digest) -> Upload {
        if self.is_down() {
            return Upload {
                tx: None,
                failed: true,
                skipped: true,
            };
        }
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        let path = Path::from(object_name(Kind::Blob, digest));
        tokio::spawn(run_upload(store, path, rx));
        Upload {
            tx: Some(tx),
            failed: false,
            skipped: false,
        }
    }
}

enum Msg {
    Chunk(Bytes),
    Complete(oneshot::Sender<Result<(), Error>>),
    /// Give the upload up; answered once the store was asked to drop its parts.
    Abort(oneshot::Sender<()>),
}

/// The blob upload in progress: bytes go to a task that sends them as parts.
struct Upload {
    tx: Option<mpsc::Sender<Msg>>,
    failed: bool,
    /// Never started: the store was down.
    skipped: bool,
}

impl Upload {
    /// Passes `chunk` on; waits when the store is slower than the download (a few parts'
    /// worth of memory at most), but not beyond a part's timeout: the download does not wait
    /// on a stuck store, the upload is given up instead. After a failure this does nothing.
    async fn write(&mut self, chunk: Bytes) {
        if self.failed {
            return;
        }
        if let Some(tx) = &self.tx {
            let sent = tokio::time::timeout(PART_TIMEOUT, tx.send(Msg::Chunk(chunk))).await;
            if !matches!(sent, Ok(Ok(()))) {
                self.failed = true;
                self.tx = None;
            }
        }
    }

    /// Makes the object visible: call only once every byte is verified.
    async fn complete(mut self) -> Result<(), Error> {
        if self.skipped {
            return Err(Error::Down);
        }
        let Some(tx) = self.tx.take().filter(|_| !self.failed) else {
            return Err(Error::UploadFailed);
        };
        let (reply, answer) = oneshot::channel();
        if tx.send(Msg::Complete(reply)).await.is_err() {
            return Err(Error::UploadFailed);
        }
        // The task bounds each of its requests, so it answers.
        answer.await.unwrap_or(Err(Error::UploadFailed))
    }

    /// Gives the upload up and waits (at most [`ABORT_WAIT`]) until the store was asked to
    /// drop its parts. An upload that failed or never started has nothing left to abort (its
    /// task aborted it, or does so as the channel closes).
    async fn abort(mut self) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let (reply, done) = oneshot::channel();
        let told = tokio::time::timeout(ABORT_WAIT, async move {
            if tx.send(Msg::Abort(reply)).await.is_ok() {
                let _ = done.await;
            }
        });
        if told.await.is_err() {
            tracing::debug!("a shared-tier upload's abort goes on in the background");
        }
    }
}

async fn run_upload(store: Arc<dyn ObjectStore>, path: Path, mut rx: mpsc::Receiver<Msg>) {
    let started = within(
        "an upload's start",
        REQUEST_TIMEOUT,
        store.put_multipart(&path),
    );
    let mut upload = match started.await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(object = %path, error = %e, "cannot start a shared-tier upload");
            return;
        }
    };
    let mut part: Vec<Bytes> = Vec::new();
    let mut part_len = 0usize;
    let mut sent = 0usize;
    let mut in_flight = FuturesUnordered::new();
    let (failed, aborted) = loop {
        match rx.recv().await {
            Some(Msg::Chunk(chunk)) => {
                part_len += chunk.len();
                part.push(chunk);
                if part_len < PART {
                    continue;
                }
                let put = upload.put_part(std::mem::take(&mut part).into_iter().collect());
                in_flight.push(within("an upload's part", PART_TIMEOUT, put));
                sent += 1;
                part_len = 0;
                if in_flight.len() >= PARTS_IN_FLIGHT {
                    if let Some(Err(e)) = in_flight.next().await {
                        break (Some(e), None);
                    }
                }
            }
            Some(Msg::Complete(reply)) => {
                // S3 needs at least one part, even for an empty blob.
                if part_len > 0 || sent == 0 {
                    let put = upload.put_part(std::mem::take(&mut part).into_iter().collect());
                    in_flight.push(within("an upload's part", PART_TIMEOUT, put));
                }
                let mut result = Ok(());
                while let Some(r) = in_flight.next().await {
                    if let Err(e) = r {
                        result = Err(e);
                    }
                }
                let result = match result {
                    Ok(()) => within("an upload's completion", PART_TIMEOUT, upload.complete())
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                };
                if result.is_err() {
                    let _ = within("an upload's abort", REQUEST_TIMEOUT, upload.abort()).await;
                }
                let _ = reply.send(result);
                return;
            }
            Some(Msg::Abort(reply)) => break (None, Some(reply)),
            // The download was not verified, failed, or lost its lease: nothing is published.
            None => break (None, None),
        }
    };
    drop(in_flight);
    if let Some(e) = failed {
        tracing::warn!(object = %path, error = %e, "shared-tier upload failed; the blob stays local");
    }
    if let Err(e) = within("an upload's abort", REQUEST_TIMEOUT, upload.abort()).await {
        tracing::debug!(object = %path, error = %e, "cannot abort a shared-tier upload");
    }
    if let Some(reply) = aborted {
        let _ = reply.send(());
    }
}

impl Backend for S3 {
    fn blob(
        &self,
        digest: &Digest,
        from: u64,
        to: Option<u64>,
    ) -> BoxFuture<'_, Result<Option<BlobStream>, Error>> {
        let digest = digest.clone();
        Box::pin(async move { S3::blob(self, &digest, from, to).await })
    }

    fn blob_size(&self, digest: &Digest) -> BoxFuture<'_, Result<Option<u64>, Error>> {
        let digest = digest.clone();
        Box::pin(async move { S3::blob_size(self, &digest).await })
    }

    fn read(&self, kind: Kind, digest: &Digest) -> BoxFuture<'_, Result<Option<Bytes>, Error>> {
        let digest = digest.clone();
        Box::pin(async move { S3::read(self, kind, &digest).await })
    }

    fn write(&self, kind: Kind, digest: &Digest, bytes: Bytes) -> BoxFuture<'_, Result<(), Error>> {
        let digest = digest.clone();
        Box::pin(async move { S3::write(self, kind, &digest, bytes).await })
    }

    fn delete_named<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(S3::delete_named(self, name))
    }

    fn list(&self) -> BoxStream<'_, Result<(String, u64, u64), Error>> {
        S3::list(self)
    }

    fn upload(&self, digest: &Digest) -> Box<dyn PartUpload> {
        Box::new(S3::upload(self, digest))
    }

    fn presigned(
        &self,
        digest: &Digest,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Option<url::Url>, Error>> {
        let digest = digest.clone();
        Box::pin(async move { S3::presigned(self, &digest, ttl).await })
    }
}

impl PartUpload for Upload {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, ()> {
        Box::pin(Upload::write(self, chunk))
    }

    fn complete(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(Upload::complete(*self))
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(Upload::abort(*self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{Recording, Uploads};
    use object_store::memory::InMemory;
    use std::sync::atomic::Ordering;

    fn tier() -> S3 {
        S3::over(Arc::new(InMemory::new()))
    }

    fn recorded() -> (S3, Arc<Recording>) {
        let store = Recording::new();
        (S3::over(store.clone()), store)
    }

    /// Every object the tier lists.
    async fn names(tier: &S3) -> Vec<String> {
        tier.list().map(|o| o.unwrap().0).collect().await
    }

    async fn read_all(tier: &S3, d: &Digest, offset: u64) -> Option<Vec<u8>> {
        let blob = tier.blob(d, offset, None).await.unwrap()?;
        let parts: Vec<Bytes> = blob.chunks.map(|c| c.unwrap()).collect().await;
        Some(parts.concat())
    }

    #[tokio::test]
    async fn an_upload_is_invisible_until_completed() {
        let (t, store) = recorded();
        let body = vec![7u8; PART * 2 + 100];
        let d = Digest::sha256_of(&body);
        let mut up = t.upload(&d);
        for c in body.chunks(1 << 20) {
            up.write(Bytes::copy_from_slice(c)).await;
        }
        assert_eq!(t.blob_size(&d).await.unwrap(), None);
        up.complete().await.unwrap();
        assert_eq!(
            store.uploads(),
            Uploads {
                started: 1,
                completed: 1,
                aborted: 0
            }
        );
        assert_eq!(read_all(&t, &d, 0).await.unwrap(), body);
        assert_eq!(read_all(&t, &d, 10).await.unwrap(), body[10..]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_upload_leaves_nothing() {
        let (t, store) = recorded();
        let d = Digest::sha256_of(b"x");
        let mut up = t.upload(&d);
        up.write(Bytes::from_static(b"x")).await;
        drop(up);
        store
            .wait_until("the dropped upload is aborted", |u| u.aborted > 0)
            .await;
        assert_eq!(
            store.uploads(),
            Uploads {
                started: 1,
                completed: 0,
                aborted: 1
            }
        );
        assert_eq!(t.blob_size(&d).await.unwrap(), None);
        assert_eq!(names(&t).await, Vec::<String>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_part_aborts_the_upload_and_publishes_nothing() {
        let (t, store) = recorded();
        store.fail_parts.store(true, Ordering::SeqCst);
        let d = Digest::sha256_of(b"x");
        let mut up = t.upload(&d);
        up.write(Bytes::from_static(b"x")).await;
        assert!(up.complete().await.is_err());
        assert_eq!(
            store.uploads(),
            Uploads {
                started: 1,
                completed: 0,
                aborted: 1
            }
        );
        assert_eq!(names(&t).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_small_blob_is_one_part() {
        let t = tier();
        let d = Digest::sha256_of(b"small");
        let mut up = t.upload(&d);
        up.write(Bytes::from_static(b"small")).await;
        up.complete().await.unwrap();
        assert_eq!(read_all(&t, &d, 0).await.unwrap(), b"small");
    }
}
