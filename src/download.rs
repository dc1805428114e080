//! Blob downloads: one upstream fetch per digest, streamed to every client that asks while it
//! runs, resumed when the upstream cuts it, verified before it is committed.
//!
//! The leader's work runs in its own task, so clients may come and go (the first included)
//! without cancelling it. The bytes go to a temp file; clients read that file behind the
//! writer, woken by a watch channel on each write. Every way a download can end is an
//! [`Outcome`], logged by name.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::body::Progress;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::singleflight::{Flights, Joined};
use crate::store::Store;
use crate::upstream::{self, Upstream};

/// Ready chunks are gathered up to this size before one write, so a fast upstream does not
/// cost a write per network packet, while a slow one is written as soon as anything arrives.
const WRITE_BATCH: usize = 1024 * 1024;

/// What a client waiting for a download learns once the upstream has answered.
#[derive(Debug, Clone)]
pub enum Start {
    /// Waiting for the upstream's response headers.
    Pending,
    /// The body is arriving; the file is readable up to the published progress.
    Streaming { size: u64 },
    /// The blob was committed by someone else before this download began: read the store.
    AlreadyCached,
    /// The disk cannot take the blob: each client streams from the upstream, uncached.
    NoSpace,
    /// The upstream refused or failed before sending the body.
    Failed(upstream::Error),
}

/// How a download ended. Each is logged; none is left implicit.
#[derive(Debug)]
enum Outcome {
    /// Verified and renamed into the store.
    Committed { size: u64, resumes: u32 },
    /// Verified and streamed, but larger than the cache bound, so not kept.
    TooLargeToKeep { size: u64 },
    /// Not enough disk space: clients were sent to stream from the upstream directly.
    NoSpace { size: u64 },
    /// Another download committed it first.
    AlreadyCached,
    /// The upstream answered with an error before the body.
    Refused(upstream::Error),
    /// The body was cut more often than `resume_attempts` allows.
    ResumesExhausted { written: u64, last: upstream::Error },
    /// The bytes did not hash to the digest, or had the wrong length.
    DigestMismatch { actual: String },
    /// The upstream's answer cannot be used (no length, wrong range).
    Protocol(String),
    /// Writing the temp file or committing it failed.
    Storage(io::Error),
    /// The download task panicked.
    Panicked,
}

pub struct Download {
    start: watch::Sender<Start>,
    progress: watch::Sender<Progress>,
    file: OnceLock<Arc<File>>,
}

impl Download {
    fn new() -> Download {
        Download {
            start: watch::channel(Start::Pending).0,
            progress: watch::channel(Progress::Writing { written: 0 }).0,
            file: OnceLock::new(),
        }
    }

    /// Waits for the upstream's answer.
    pub async fn started(&self) -> Start {
        let mut rx = self.start.subscribe();
        let result = rx
            .wait_for(|s| !matches!(s, Start::Pending))
            .await
            .map(|s| s.clone());
        // The sender lives as long as `self`, so the channel cannot close while we hold it.
        result.unwrap_or(Start::Pending)
    }

    /// The temp file and a receiver of the writer's progress; valid once `Streaming`.
    pub fn reader(&self) -> Option<(Arc<File>, watch::Receiver<Progress>)> {
        Some((self.file.get()?.clone(), self.progress.subscribe()))
    }
}

/// The in-flight download table and what a download needs.
pub struct Downloads {
    flights: Flights<Digest, Download>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    disk: Arc<DiskState>,
}

/// Space kept free on the storage file system beyond a download's own size.
const SPACE_MARGIN: u64 = 8 * 1024 * 1024;
/// After a write fails for lack of space, caching pauses this long before trying again.
const DISK_FULL_PAUSE: Duration = Duration::from_secs(60);

/// Whether the disk recently ran out of space, and when that was last logged.
#[derive(Default)]
struct DiskState {
    full_until: Mutex<Option<Instant>>,
    warned: Mutex<Option<Instant>>,
}

impl DiskState {
    fn is_full(&self) -> bool {
        let until = *self.full_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    fn set_full(&self) {
        *self.full_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + DISK_FULL_PAUSE);
    }

    /// Logs a warning at most once a minute.
    fn warn(&self, why: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *warned = Some(Instant::now());
            tracing::warn!(
                reason = why,
                "storage is full: blobs are streamed to clients without being cached"
            );
        }
    }
}

impl Downloads {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Downloads {
        Downloads {
            flights: Flights::default(),
            store,
            metrics,
            disk: Arc::default(),
        }
    }

    /// Joins the download of `digest`, starting it if none runs. Returns whether this caller
    /// joined an existing one.
    pub fn join(
        &self,
        upstream: Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> (Arc<Download>, bool) {
        match self.flights.join_or_start(digest, Download::new) {
            Joined::Follower(d) => (d, true),
            Joined::Leader(d, guard) => {
                let job = Job {
                    download: d.clone(),
                    upstream,
                    repo: repo.clone(),
                    digest: digest.clone(),
                    store: self.store.clone(),
                    metrics: self.metrics.clone(),
                    disk: self.disk.clone(),
                };
                let metrics = self.metrics.clone();
                metrics.inflight_downloads.inc();
                tokio::spawn(async move {
                    let download = job.download.clone();
                    let (digest, repo, up) = (
                        job.digest.clone(),
                        job.repo.clone(),
                        job.upstream.name.clone(),
                    );
                    let started = Instant::now();
                    let outcome = std::panic::AssertUnwindSafe(job.run())
                        .catch_unwind()
                        .await
                        .unwrap_or(Outcome::Panicked);
                    // Make sure no waiter is left waiting, whatever happened.
                    finish_waiters(&download, &outcome, &up, &digest);
                    drop(guard);
                    metrics.inflight_downloads.dec();
                    log_outcome(&outcome, &up, &repo, &digest, started);
                });
                (d, false)
            }
        }
    }

    /// The download of `digest` in progress, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Download>> {
        self.flights.get(digest)
    }

    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }
}

fn finish_waiters(d: &Download, outcome: &Outcome, upstream: &str, digest: &Digest) {
    let failure = match outcome {
        Outcome::Committed { .. }
        | Outcome::AlreadyCached
        | Outcome::TooLargeToKeep { .. }
        | Outcome::NoSpace { .. } => return,
        Outcome::Refused(e) => e.clone(),
        Outcome::ResumesExhausted { last, .. } => last.clone(),
        Outcome::DigestMismatch { actual } => upstream::Error::DigestMismatch {
            expected: digest.to_string(),
            actual: actual.clone(),
        },
        Outcome::Protocol(detail) => upstream::Error::Protocol {
            upstream: upstream.to_owned(),
            detail: detail.clone(),
        },
        Outcome::Storage(_) | Outcome::Panicked => upstream::Error::Protocol {
            upstream: upstream.to_owned(),
            detail: "download failed inside the mirror".into(),
        },
    };
    d.start.send_if_modified(|s| {
        if matches!(s, Start::Pending) {
            *s = Start::Failed(failure.clone());
            true
        } else {
            false
        }
    });
    d.progress.send_if_modified(|p| {
        if matches!(p, Progress::Writing { .. }) {
            *p = Progress::Failed(format!("{outcome:?}"));
            true
        } else {
            false
        }
    });
}

fn log_outcome(
    outcome: &Outcome,
    upstream: &str,
    repo: &RepoName,
    digest: &Digest,
    started: Instant,
) {
    let ms = started.elapsed().as_millis() as u64;
    match outcome {
        Outcome::Committed { size, resumes } => {
            tracing::info!(upstream, %repo, %digest, size, resumes, ms, "blob download committed")
        }
        Outcome::AlreadyCached => tracing::debug!(%digest, "blob was already cached"),
        Outcome::TooLargeToKeep { size } => {
            tracing::warn!(upstream, %repo, %digest, size, "blob is larger than storage.max_size; served but not kept")
        }
        Outcome::NoSpace { size } => {
            tracing::debug!(upstream, %repo, %digest, size, "no disk space; clients stream uncached")
        }
        Outcome::Refused(e) => {
            tracing::info!(upstream, %repo, %digest, error = %e, "blob download refused")
        }
        Outcome::ResumesExhausted { written, last } => {
            tracing::warn!(upstream, %repo, %digest, written, error = %last, "blob download cut too often; not cached")
        }
        Outcome::DigestMismatch { actual } => {
            tracing::error!(upstream, %repo, %digest, %actual, "upstream blob does not match its digest; discarded")
        }
        Outcome::Protocol(detail) => {
            tracing::warn!(upstream, %repo, %digest, detail, "unusable upstream blob response")
        }
        Outcome::Storage(e) => {
            tracing::error!(upstream, %repo, %digest, error = %e, "cannot write blob to the cache")
        }
        Outcome::Panicked => tracing::error!(%digest, "blob download task panicked"),
    }
}

struct Job {
    download: Arc<Download>,
    upstream: Arc<Upstream>,
    repo: RepoName,
    digest: Digest,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    disk: Arc<DiskState>,
}

/// Where the body stands: bytes on disk and the running hash.
struct Written {
    bytes: u64,
    hasher: Sha256,
}

impl Job {
    async fn run(self) -> Outcome {
        match self.store.blobs.open(&self.digest).await {
            Ok(Some(_)) => {
                self.download.start.send_replace(Start::AlreadyCached);
                return Outcome::AlreadyCached;
            }
            Ok(None) => {}
            Err(e) => return Outcome::Storage(e),
        }
        let asked = Instant::now();
        let resp = match self.upstream.blob(&self.repo, &self.digest, 0).await {
            Ok(r) => r,
            Err(e) => return Outcome::Refused(e),
        };
        self.metrics.miss_first_byte(asked.elapsed());
        let Some(size) = resp.content_length() else {
            return Outcome::Protocol("blob response without Content-Length".into());
        };
        if !self.make_room(size).await {
            self.metrics.no_space();
            self.download.start.send_replace(Start::NoSpace);
            return Outcome::NoSpace { size };
        }
        let temp = match self.store.blobs.create_temp().await {
            Ok(t) => t,
            Err(e) => return self.storage_failed(e),
        };
        let file = match temp.as_file().try_clone() {
            Ok(f) => Arc::new(f),
            Err(e) => return Outcome::Storage(e),
        };
        let _ = self.download.file.set(file.clone());
        self.download.start.send_replace(Start::Streaming { size });

        let mut written = Written {
            bytes: 0,
            hasher: Sha256::new(),
        };
        let mut body = Resumed { resp, skip: 0 };
        let mut resumes = 0u32;
        loop {
            let mut cut = match self.copy_body(body, &file, &mut written, size).await {
                Ok(()) if written.bytes == size => break,
                Ok(()) => upstream::Error::Protocol {
                    upstream: self.upstream.name.clone(),
                    detail: format!("body ended at {} of {size} bytes", written.bytes),
                },
                Err(CopyError::Upstream(e)) => e,
                Err(CopyError::TooLong) => return self.mismatch(format!("more than {size} bytes")),
                Err(CopyError::Storage(e)) => return self.storage_failed(e),
            };
            body = loop {
                if resumes >= self.upstream.config().resume_attempts {
                    return Outcome::ResumesExhausted {
                        written: written.bytes,
                        last: cut,
                    };
                }
                resumes += 1;
                self.metrics.resume();
                tracing::info!(upstream = %self.upstream.name, digest = %self.digest, offset = written.bytes, attempt = resumes, error = %cut, "resuming cut blob download");
                match self.resume(written.bytes, size).await {
                    Ok(r) => break r,
                    Err(ResumeError::Upstream(e)) => {
                        cut = e;
                        tokio::time::sleep(std::time::Duration::from_millis(
                            100 * u64::from(resumes),
                        ))
                        .await;
                    }
                    Err(ResumeError::Protocol(p)) => return Outcome::Protocol(p),
                }
            };
        }
        let actual = Digest::from_sha256(written.hasher.finalize().into());
        if actual != self.digest {
            return self.mismatch(actual.to_string());
        }
        if !self.store.index.fits(size) {
            self.download.progress.send_replace(Progress::Complete);
            return Outcome::TooLargeToKeep { size };
        }
        if let Err(e) = self.store.commit_blob(temp, &self.digest, size).await {
            return self.storage_failed(e);
        }
        self.download.progress.send_replace(Progress::Complete);
        Outcome::Committed { size, resumes }
    }

    /// Whether the disk can take `size` more bytes, evicting old content to make room.
    async fn make_room(&self, size: u64) -> bool {
        if self.disk.is_full() {
            self.disk.warn("recent write failure");
            return false;
        }
        let needed = size + SPACE_MARGIN;
        for attempt in 0..2 {
            let store = self.store.clone();
            let available = match tokio::task::spawn_blocking(move || store.available_space()).await
            {
                Ok(Ok(a)) => a,
                // Cannot tell: try, and let a failed write decide.
                _ => return true,
            };
            if available >= needed {
                return true;
            }
            if attempt == 0 {
                let evicted = self.store.index.evict_bytes(needed - available);
                if evicted.is_empty() || self.store.evict(evicted).await.is_err() {
                    break;
                }
            }
        }
        self.disk.warn("not enough free space for the blob");
        false
    }

    fn storage_failed(&self, e: io::Error) -> Outcome {
        if e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull {
            self.metrics.no_space();
            self.disk.set_full();
            self.disk.warn("write failed: no space left on device");
        }
        Outcome::Storage(e)
    }

    fn mismatch(&self, actual: String) -> Outcome {
        self.metrics.digest_mismatch();
        Outcome::DigestMismatch { actual }
    }

    /// Asks for the rest of the blob from `offset`. A fresh request, so a fresh token and a
    /// fresh CDN redirect.
    async fn resume(&self, offset: u64, size: u64) -> Result<Resumed, ResumeError> {
        let resp = self
            .upstream
            .blob(&self.repo, &self.digest, offset)
            .await
            .map_err(ResumeError::Upstream)?;
        match resp.status().as_u16() {
            206 => {
                let range = resp
                    .headers()
                    .get(http::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let expected = format!("bytes {offset}-{}/{size}", size - 1);
                if range != expected {
                    return Err(ResumeError::Protocol(format!(
                        "resume answered Content-Range {range:?}, expected {expected:?}"
                    )));
                }
                Ok(Resumed { resp, skip: 0 })
            }
            // The upstream ignored the Range: read from the start and drop what we have.
            200 => Ok(Resumed { resp, skip: offset }),
            s => Err(ResumeError::Protocol(format!("resume answered status {s}"))),
        }
    }

    async fn copy_body(
        &self,
        body: Resumed,
        file: &Arc<File>,
        written: &mut Written,
        size: u64,
    ) -> Result<(), CopyError> {
        let Resumed { resp, mut skip } = body;
        let mut stream = resp.bytes_stream();
        loop {
            let first = self
                .upstream
                .next_chunk(&mut stream)
                .await
                .map_err(CopyError::Upstream)?;
            let Some(first) = first else { return Ok(()) };
            let mut batch = BytesMut::from(&first[..]);
            let mut ended = false;
            // Take whatever else is already buffered, without waiting.
            while batch.len() < WRITE_BATCH {
                match self.upstream.next_chunk(&mut stream).now_or_never() {
                    Some(Ok(Some(b))) => batch.extend_from_slice(&b),
                    Some(Ok(None)) => {
                        ended = true;
                        break;
                    }
                    Some(Err(e)) => {
                        // Keep what arrived before the cut.
                        self.write(file, written, &mut skip, batch.freeze(), size)
                            .await?;
                        return Err(CopyError::Upstream(e));
                    }
                    None => break,
                }
            }
            self.write(file, written, &mut skip, batch.freeze(), size)
                .await?;
            if ended {
                return Ok(());
            }
        }
    }

    async fn write(
        &self,
        file: &Arc<File>,
        written: &mut Written,
        skip: &mut u64,
        mut chunk: Bytes,
        size: u64,
    ) -> Result<(), CopyError> {
        if *skip > 0 {
            let n = (*skip).min(chunk.len() as u64);
            *skip -= n;
            chunk = chunk.slice(n as usize..);
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let len = chunk.len() as u64;
        if written.bytes + len > size {
            return Err(CopyError::TooLong);
        }
        self.metrics.upstream_bytes(len);
        let file = file.clone();
        let offset = written.bytes;
        let mut hasher = std::mem::take(&mut written.hasher);
        // Hashing and writing are CPU and disk work: keep them off the async workers.
        let hasher = tokio::task::spawn_blocking(move || {
            file.write_all_at(&chunk, offset)?;
            hasher.update(&chunk);
            Ok::<_, io::Error>(hasher)
        })
        .await
        .map_err(|e| CopyError::Storage(io::Error::other(e)))?
        .map_err(CopyError::Storage)?;
        written.hasher = hasher;
        written.bytes += len;
        self.download.progress.send_replace(Progress::Writing {
            written: written.bytes,
        });
        Ok(())
    }
}

/// A blob response and how many leading bytes of it we already have.
struct Resumed {
    resp: reqwest::Response,
    skip: u64,
}

enum CopyError {
    Upstream(upstream::Error),
    TooLong,
    Storage(io::Error),
}

enum ResumeError {
    Upstream(upstream::Error),
    Protocol(String),
}
