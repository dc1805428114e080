//! Ranges of a blob the mirror does not hold yet. A range is read from the download where
//! its bytes are written, or about to be (a part's head is just before it); any other range is
//! fetched on its own (an "early" range), from the shared tier when the fleet holds the blob,
//! else from the upstream as a ranged request, while the one full download goes on. Small
//! ranges that do not start the blob (a lazy-pulling client's table of contents and chunks)
//! are asked of the upstream at once, beside the download's own first request, so that they
//! cost one round trip as they would straight from the upstream.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use tokio::task::JoinHandle;

use super::{Mirror, Target};
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::outcome::Tier;
use crate::ranges::{Requested, Spec};
use crate::store::handle::{BlobHandle, Progress};
use crate::store::tiers::Tiers;
use crate::upstream::Upstream;

/// A range whose first byte lies at most this far ahead of a writer's head is read from the
/// download: about what one connection brings in a round trip, less than a request of its
/// own would cost.
const NEAR: u64 = 1024 * 1024;

/// A range asked of the upstream at once, before the download's first answer, is at most
/// this long (a lazy pull's chunks and table of contents; a bigger range waits for the
/// download, whose parts it may well follow).
const EARLY_MOST: u64 = 4 * 1024 * 1024;

/// At most this many ranges of one request are fetched at once; the others are asked for
/// when the response reaches them.
const EARLY_AT_ONCE: usize = 8;

type Chunks = BoxStream<'static, io::Result<Bytes>>;

/// The ranges of one request that are fetched on their own, by `start..end`.
#[derive(Default)]
pub struct OwnRanges(HashMap<(u64, u64), Chunks>);

impl OwnRanges {
    /// The bytes `start..end`, when they are fetched on their own (else they come from the
    /// download).
    pub fn take(&mut self, start: u64, end: u64) -> Option<Chunks> {
        self.0.remove(&(start, end))
    }
}

/// Where an early range's bytes come from, and what it needs to fetch them.
#[derive(Clone)]
struct Source {
    upstream: Arc<Upstream>,
    repo: RepoName,
    caller: Caller,
    digest: Digest,
    tiers: Arc<Tiers>,
    metrics: Arc<Metrics>,
}

/// A ranged request started before the blob's size was known: `spec` as the client wrote it.
pub struct Early {
    spec: Spec,
    opening: Opening,
}

/// A request in flight in its own task, aborted when dropped.
struct Opening(JoinHandle<io::Result<(u64, Chunks)>>);

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Mirror {
    /// Ranges worth asking of the upstream before the download answers: each small, none at
    /// the blob's start (whose bytes the download brings first), and no download of the blob
    /// under way whose answer is in.
    pub(super) async fn early_ranges(
        &self,
        target: &Target,
        digest: &Digest,
        requested: &Requested,
    ) -> Vec<Early> {
        let Requested::Ranges(specs) = requested else {
            return Vec::new();
        };
        let small = |s: &Spec| {
            s.most().is_some_and(|n| n <= EARLY_MOST) && !matches!(s, Spec::From { first: 0, .. })
        };
        if specs.is_empty() || !specs.iter().all(small) {
            return Vec::new();
        }
        if self.downloads.get(digest).is_some_and(|d| d.has_started()) {
            return Vec::new();
        }
        // The fleet's copy answers it without the upstream, once the download has the size.
        if self.tiers.shared_blob_size(digest).await.is_some() {
            return Vec::new();
        }
        let source = self.range_source(target, digest);
        specs
            .iter()
            .take(EARLY_AT_ONCE)
            .map(|&spec| {
                let source = source.clone();
                let task = tokio::spawn(async move { source.upstream_range(spec, None).await });
                Early {
                    spec,
                    opening: Opening(task),
                }
            })
            .collect()
    }

    /// For each of `ranges` of the download `handle` follows, the bytes fetched on their own
    /// where the download has not got near them: `early` ones when asked already, else new
    /// ones (the first few at once).
    pub(super) fn own_ranges(
        &self,
        target: &Target,
        digest: &Digest,
        handle: &BlobHandle,
        ranges: &[(u64, u64)],
        early: Vec<Early>,
    ) -> OwnRanges {
        let size = handle.size();
        let progress = handle.progress();
        let near = |start: u64| progress.as_ref().is_none_or(|p| near(p, start));
        let mut early: HashMap<(u64, u64), Opening> = early
            .into_iter()
            .filter_map(|e| Some((e.spec.resolve(size)?, e.opening)))
            .collect();
        let source = self.range_source(target, digest);
        let mut own = HashMap::new();
        let mut at_once = 0;
        for &(start, end) in ranges {
            if near(start) || own.contains_key(&(start, end)) {
                continue;
            }
            let chunks = match early.remove(&(start, end)) {
                Some(opening) => checked(opening, size),
                None if at_once < EARLY_AT_ONCE => {
                    at_once += 1;
                    let s = source.clone();
                    let task = tokio::spawn(async move { s.range(start, end, size).await });
                    checked(Opening(task), size)
                }
                None => {
                    let s = source.clone();
                    stream::once(async move { s.range(start, end, size).await.map(|(_, c)| c) })
                        .try_flatten()
                        .boxed()
                }
            };
            own.insert((start, end), exactly(chunks, end - start));
        }
        OwnRanges(own)
    }

    fn range_source(&self, target: &Target, digest: &Digest) -> Source {
        Source {
            upstream: target.upstream.clone(),
            repo: target.repo.clone(),
            caller: target.caller.clone(),
            digest: digest.clone(),
            tiers: self.tiers.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The bytes of an opening request, once it has answered for a blob of `size` bytes.
fn checked(opening: Opening, size: u64) -> Chunks {
    stream::once(async move {
        let mut opening = opening;
        let (answered, chunks) = (&mut opening.0).await.map_err(io::Error::other)??;
        if answered != size {
            return Err(io::Error::other(format!(
                "a range was answered for a blob of {answered} bytes, not {size}"
            )));
        }
        Ok(chunks)
    })
    .try_flatten()
    .boxed()
}

impl Source {
    /// `start..end` of a `size`-byte blob: from the shared tier when it holds the blob (one
    /// ranged request, through its handle) and answers, else from the upstream.
    async fn range(&self, start: u64, end: u64, size: u64) -> io::Result<(u64, Chunks)> {
        if let Some(blob) = self.tiers.shared_handle(&self.digest).await {
            if blob.size() == size {
                let mut chunks = blob.stream(start, end - start);
                // Its first chunk decides: a shared tier that does not answer is passed over.
                match chunks.next().await {
                    Some(Ok(first)) => {
                        self.metrics.early_range(Tier::Shared);
                        let chunks = stream::once(async move { Ok(first) }).chain(chunks);
                        return Ok((size, chunks.boxed()));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(digest = %self.digest, error = %e, "the shared tier did not answer a range; asking the upstream");
                    }
                    None => return Ok((size, stream::empty().boxed())),
                }
            }
        }
        let spec = Spec::From {
            first: start,
            last: Some(end - 1),
        };
        self.upstream_range(spec, Some(size)).await
    }

    /// The bytes `spec` names, from the upstream: the blob's size and the bytes.
    async fn upstream_range(&self, spec: Spec, size: Option<u64>) -> io::Result<(u64, Chunks)> {
        let by = tokio::time::Instant::now() + self.upstream.config().first_byte_timeout;
        let body = self
            .upstream
            .blob_range(&self.repo, &self.caller, &self.digest, spec, Some(by))
            .await
            .map_err(io::Error::other)?;
        if size.is_some_and(|s| s != body.size) {
            return Err(io::Error::other(format!(
                "the upstream answered size {} for a blob of {} bytes",
                body.size,
                size.unwrap_or_default()
            )));
        }
        self.metrics.early_range(Tier::Upstream);
        let answered = body.size;
        let (metrics, upstream) = (self.metrics.clone(), self.upstream.name.clone());
        let chunks = body
            .into_chunks()
            .map_err(io::Error::other)
            .inspect_ok(move |c| metrics.upstream_bytes(&upstream, c.len() as u64))
            .boxed();
        Ok((answered, chunks))
    }
}

/// Whether `progress` has the byte at `pos` or is about to.
fn near(progress: &Progress, pos: u64) -> bool {
    progress.readable_from(pos) > pos || progress.behind_head(pos).is_some_and(|d| d <= NEAR)
}

/// A range is served whole or not at all: a body that ends early is cut.
fn exactly(chunks: Chunks, len: u64) -> Chunks {
    stream::try_unfold((chunks, 0u64), move |(mut chunks, seen)| async move {
        match chunks.next().await.transpose()? {
            Some(c) => Ok(Some((c.clone(), (chunks, seen + c.len() as u64)))),
            None if seen == len => Ok(None),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the range ended at {seen} of {len} bytes"),
            )),
        }
    })
    .boxed()
}
