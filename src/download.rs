//! Blob downloads: one upstream fetch per digest, streamed to every client that asks while it
//! runs, resumed when the upstream cuts it, verified before it is committed.
//!
//! The leader's work runs in its own task, so clients may come and go (the first included)
//! without cancelling it. The bytes go to a temp file; clients read that file behind the
//! writer, woken by a watch channel on each write. Every way a download can end is an
//! [`Outcome`], logged by name.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::singleflight::{Flights, Joined};
use crate::store::handle::BlobHandle;
use crate::store::writer::{BlobWriter, Finished};
use crate::store::Store;
use crate::upstream::{self, BlobBody, Upstream};

/// Ready chunks are gathered up to this size before one write, so a fast upstream does not
/// cost a write per network packet, while a slow one is written as soon as anything arrives.
const WRITE_BATCH: usize = 1024 * 1024;

/// What a client waiting for a download learns once the upstream has answered.
#[derive(Clone)]
pub enum Start {
    /// Waiting for the upstream's response headers.
    Pending,
    /// The body is arriving: read it through this handle, which follows the writer.
    Streaming(BlobHandle),
    /// The blob was committed by someone else before this download began: read the store.
    AlreadyCached,
    /// The disk cannot take the blob: each client streams from the upstream, uncached.
    NoSpace,
    /// The download failed before any byte could be served.
    Failed(Failure),
}

/// Why a download failed, as its waiters are told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Upstream(upstream::Error),
    #[error("upstream blob does not match {expected} (got {actual})")]
    DigestMismatch { expected: Digest, actual: String },
    #[error("cannot write the blob to the cache: {0}")]
    Storage(Arc<io::Error>),
    #[error("the download task panicked")]
    Panicked,
}

/// How a download ended. Each is logged; none is left implicit.
#[derive(Debug)]
enum Outcome {
    /// Verified and published in the store.
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
    Protocol(upstream::Error),
    /// Writing the temp file or committing it failed.
    Storage(io::Error),
    /// The download task panicked.
    Panicked,
}

pub struct Download {
    start: watch::Sender<Start>,
}

impl Download {
    fn new() -> Download {
        Download {
            start: watch::channel(Start::Pending).0,
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
}

/// A download in progress, as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InFlight {
    pub digest: String,
    /// Bytes written to the cache so far.
    pub written: u64,
    /// The blob's size, once the upstream has answered.
    pub size: Option<u64>,
}

impl Download {
    fn in_flight(&self, digest: &Digest) -> InFlight {
        let (written, size) = match &*self.start.borrow() {
            Start::Streaming(handle) => {
                let size = handle.size();
                let written = match handle.clone().into_parts().1 {
                    Some(rx) => match &*rx.borrow() {
                        crate::store::handle::Progress::Writing { written } => *written,
                        crate::store::handle::Progress::Complete => size,
                        crate::store::handle::Progress::Failed(_) => 0,
                    },
                    None => size,
                };
                (written, Some(size))
            }
            _ => (0, None),
        };
        InFlight {
            digest: digest.to_string(),
            written,
            size,
        }
    }
}

/// The in-flight download table and what a download needs.
pub struct Downloads {
    flights: Flights<Digest, Download>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl Downloads {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Downloads {
        Downloads {
            flights: Flights::default(),
            store,
            metrics,
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
                    let outcome = finish_waiters(&download, outcome, &digest);
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

    /// The downloads in progress, with how far each has got.
    pub fn progress(&self) -> Vec<InFlight> {
        let mut all: Vec<InFlight> = self
            .flights
            .snapshot()
            .iter()
            .map(|(digest, d)| d.in_flight(digest))
            .collect();
        all.sort_by(|a, b| a.digest.cmp(&b.digest));
        all
    }
}

fn finish_waiters(d: &Download, outcome: Outcome, digest: &Digest) -> Outcome {
    let failure = match &outcome {
        Outcome::Committed { .. }
        | Outcome::AlreadyCached
        | Outcome::TooLargeToKeep { .. }
        | Outcome::NoSpace { .. } => return outcome,
        Outcome::Refused(e) | Outcome::Protocol(e) => Failure::Upstream(e.clone()),
        Outcome::ResumesExhausted { last, .. } => Failure::Upstream(last.clone()),
        Outcome::DigestMismatch { actual } => Failure::DigestMismatch {
            expected: digest.clone(),
            actual: actual.clone(),
        },
        Outcome::Storage(e) => Failure::Storage(Arc::new(io::Error::new(e.kind(), e.to_string()))),
        Outcome::Panicked => Failure::Panicked,
    };
    // Readers of the body learn it from the writer (dropped with the job); waiters for the
    // start learn it here.
    d.start.send_if_modified(|s| {
        if matches!(s, Start::Pending) {
            *s = Start::Failed(failure);
            true
        } else {
            false
        }
    });
    outcome
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
        Outcome::Protocol(e) => {
            tracing::warn!(upstream, %repo, %digest, error = %e, "unusable upstream blob response")
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
        let mut attempts = 0u32;
        let mut body = loop {
            match self.upstream.blob(&self.repo, &self.digest, 0).await {
                Ok(b) => break b,
                Err(e @ upstream::Error::Protocol { .. }) => return Outcome::Protocol(e),
                // A failure before the headers is retried like a cut body: the connection or
                // the upstream may be back at once.
                Err(e)
                    if e.is_outage()
                        && !matches!(e, upstream::Error::BackingOff { .. })
                        && attempts < self.upstream.config().resume_attempts =>
                {
                    attempts += 1;
                    tracing::info!(upstream = %self.upstream.name, digest = %self.digest, attempt = attempts, error = %e, "retrying blob download");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempts))).await;
                }
                Err(e) => return Outcome::Refused(e),
            }
        };
        self.metrics.miss_first_byte(asked.elapsed());
        let size = body.size;
        if !self.make_room(size).await {
            self.metrics.no_space();
            self.download.start.send_replace(Start::NoSpace);
            return Outcome::NoSpace { size };
        }
        let mut writer = match self.store.blob_writer().await {
            Ok(w) => w,
            Err(e) => return self.storage_failed(e),
        };
        self.download
            .start
            .send_replace(Start::Streaming(writer.reader(size)));

        let mut resumes = 0u32;
        loop {
            let mut cut = match self.copy_body(&mut body, &mut writer, size).await {
                Ok(()) if writer.written() == size => break,
                Ok(()) => upstream::Error::Protocol {
                    upstream: self.upstream.name.clone(),
                    detail: format!("body ended at {} of {size} bytes", writer.written()),
                },
                Err(CopyError::Upstream(e)) => e,
                Err(CopyError::TooLong) => return self.mismatch(format!("more than {size} bytes")),
                Err(CopyError::Storage(e)) => return self.storage_failed(e),
            };
            body = loop {
                if resumes >= self.upstream.config().resume_attempts {
                    return Outcome::ResumesExhausted {
                        written: writer.written(),
                        last: cut,
                    };
                }
                resumes += 1;
                self.metrics.resume();
                tracing::info!(upstream = %self.upstream.name, digest = %self.digest, offset = writer.written(), attempt = resumes, error = %cut, "resuming cut blob download");
                match self
                    .upstream
                    .blob(&self.repo, &self.digest, writer.written())
                    .await
                {
                    Ok(b) if b.size == size => break b,
                    Ok(b) => {
                        return Outcome::Protocol(upstream::Error::Protocol {
                            upstream: self.upstream.name.clone(),
                            detail: format!("resume answered size {}, expected {size}", b.size),
                        })
                    }
                    Err(e @ upstream::Error::Protocol { .. }) => return Outcome::Protocol(e),
                    Err(e) => {
                        cut = e;
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(resumes))).await;
                    }
                }
            };
        }
        match writer.finish(&self.digest, size).await {
            Ok(Finished::Published) => Outcome::Committed { size, resumes },
            Ok(Finished::TooLargeToKeep) => Outcome::TooLargeToKeep { size },
            Ok(Finished::Mismatch { actual }) => self.mismatch(actual.to_string()),
            Err(e) => self.storage_failed(e),
        }
    }

    async fn make_room(&self, size: u64) -> bool {
        self.store.make_room(size).await
    }

    fn storage_failed(&self, e: io::Error) -> Outcome {
        if self.store.note_write_failure(&e) {
            self.metrics.no_space();
        }
        Outcome::Storage(e)
    }

    fn mismatch(&self, actual: String) -> Outcome {
        self.metrics.digest_mismatch();
        Outcome::DigestMismatch { actual }
    }

    /// Copies the body into the writer until it ends or fails; ready chunks are batched.
    async fn copy_body(
        &self,
        body: &mut BlobBody,
        writer: &mut BlobWriter,
        size: u64,
    ) -> Result<(), CopyError> {
        loop {
            let first = body.next_chunk().await.map_err(CopyError::Upstream)?;
            let Some(first) = first else { return Ok(()) };
            let mut batch = BytesMut::from(&first[..]);
            let mut ended = false;
            let mut failed = None;
            // Take whatever else is already buffered, without waiting.
            while batch.len() < WRITE_BATCH {
                match body.ready_chunk() {
                    Ok(Some(Some(b))) => batch.extend_from_slice(&b),
                    Ok(Some(None)) => {
                        ended = true;
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // What arrived before a cut is kept: the resume starts after it.
            self.write(writer, batch.freeze(), size).await?;
            if let Some(e) = failed {
                return Err(CopyError::Upstream(e));
            }
            if ended {
                return Ok(());
            }
        }
    }

    async fn write(
        &self,
        writer: &mut BlobWriter,
        chunk: Bytes,
        size: u64,
    ) -> Result<(), CopyError> {
        let len = chunk.len() as u64;
        if writer.written() + len > size {
            return Err(CopyError::TooLong);
        }
        self.metrics.upstream_bytes(&self.upstream.name, len);
        writer.write(chunk).await.map_err(CopyError::Storage)
    }
}

enum CopyError {
    Upstream(upstream::Error),
    TooLong,
    Storage(io::Error),
}
