//! A download in parts: a large blob from an upstream that serves ranges is fetched as several
//! ranged requests at once (`parallel_parts`), since one connection over a long round trip
//! (or through a registry's CDN) carries less than the link. The first request's body is the
//! first part; each part writes at its own offsets, is resumed from where it got when cut,
//! and the writer hashes the whole in order, so the blob is verified before it is committed
//! as if it had come in one stream.

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::feed::{upstream_pause, Cut, Feed};
use super::{Job, Outcome, WRITE_BATCH};
use crate::outcome::Tier;
use crate::ranges::Spec;
use crate::store::tiers::TierWriter;
use crate::upstream;

/// The parts of a `size`-byte blob: `count` spans of about equal length, in order.
pub(super) fn spans(size: u64, count: u32) -> Vec<(u64, u64)> {
    let count = u64::from(count.max(1));
    (0..count)
        .map(|i| (size * i / count, size * (i + 1) / count))
        .filter(|(s, e)| s < e)
        .collect()
}

/// What a part tells the writer.
enum Msg {
    Bytes {
        offset: u64,
        bytes: Bytes,
    },
    Done,
    Failed(Cut),
    /// The upstream now names another size: the blob is not the one being written.
    SizeChanged(u64),
}

type Chunks = BoxStream<'static, Result<Bytes, Cut>>;

impl Job {
    /// How many parts to fetch the blob `first` begins in: one unless the upstream answered
    /// a range, the blob reaches `parallel_threshold`, and `max_concurrent_requests` leaves
    /// requests to spare (`first` holds one already).
    pub(super) fn parts_for(&self, first: &Feed) -> u32 {
        let cfg = self.upstream.config();
        if first.tier != Tier::Upstream
            || !first.ranged
            || cfg.parallel_parts <= 1
            || first.size < cfg.parallel_threshold.as_u64()
        {
            return 1;
        }
        match self.upstream.free_request_slots() {
            // One free request stays for clients.
            Some(free) => {
                let extra = u32::try_from(free.saturating_sub(1)).unwrap_or(u32::MAX);
                cfg.parallel_parts.min(extra.saturating_add(1))
            }
            None => cfg.parallel_parts,
        }
    }

    /// Fetches the blob in `count` parts, the first from `first`'s body, into `writer`;
    /// the resumes it took.
    pub(super) async fn fetch_parts(
        &self,
        first: Feed,
        writer: &mut TierWriter,
        count: u32,
    ) -> Result<u32, Outcome> {
        let size = first.size;
        let spans = spans(size, count);
        let (tx, mut rx) = mpsc::channel(2 * spans.len());
        let mut tasks = JoinSet::new();
        let mut first = Some(first.chunks);
        for &(start, end) in &spans {
            let part = Part {
                upstream: self.upstream.clone(),
                repo: self.repo.clone(),
                caller: self.caller.clone(),
                digest: self.digest.clone(),
                metrics: self.metrics.clone(),
                size,
                end,
                tx: tx.clone(),
            };
            tasks.spawn(part.run(start, first.take()));
        }
        drop(tx);
        self.metrics.download_parts(spans.len() as u64 - 1);
        let mut done = 0;
        let mut resumes = 0;
        while done < spans.len() {
            match rx.recv().await {
                Some(Msg::Bytes { offset, bytes }) => {
                    self.metrics
                        .upstream_bytes(&self.upstream.name, bytes.len() as u64);
                    if let Err(e) = writer.write_at(offset, bytes).await {
                        return Err(self.storage_failed(e));
                    }
                }
                Some(Msg::Done) => done += 1,
                Some(Msg::Failed(last)) => {
                    return Err(Outcome::ResumesExhausted {
                        written: writer.written(),
                        last,
                    })
                }
                Some(Msg::SizeChanged(actual)) => {
                    return Err(Outcome::SizeChanged {
                        tier: Tier::Upstream,
                        expected: size,
                        actual,
                    })
                }
                // Every part's task is gone without a word: one panicked.
                None => return Err(Outcome::Panicked),
            }
        }
        // Each resume was counted by its part; the total is what the outcome reports.
        while let Some(joined) = tasks.join_next().await {
            resumes += joined.unwrap_or(0);
        }
        Ok(resumes)
    }
}

/// One part's fetch: `pos..end` of the blob, resumed from where it got.
struct Part {
    upstream: std::sync::Arc<upstream::Upstream>,
    repo: crate::oci::RepoName,
    caller: crate::identity::Caller,
    digest: crate::oci::Digest,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    size: u64,
    end: u64,
    tx: mpsc::Sender<Msg>,
}

impl Part {
    /// Runs to the part's end, or until it fails for good; the resumes it took.
    async fn run(self, mut pos: u64, mut chunks: Option<Chunks>) -> u32 {
        let mut resumes = 0u32;
        let attempts = self.upstream.config().resume_attempts;
        while pos < self.end {
            let mut body = match chunks.take() {
                Some(c) => c,
                None => match self.open(pos).await {
                    Ok(c) => c,
                    Err(Opening::SizeChanged(actual)) => {
                        let _ = self.tx.send(Msg::SizeChanged(actual)).await;
                        return resumes;
                    }
                    Err(Opening::Failed(cut)) => {
                        if !retryable(&cut) || resumes >= attempts {
                            let _ = self.tx.send(Msg::Failed(cut)).await;
                            return resumes;
                        }
                        resumes += 1;
                        self.metrics.resume();
                        tokio::time::sleep(upstream_pause(resumes)).await;
                        continue;
                    }
                },
            };
            match self.copy(&mut body, &mut pos).await {
                Copied::Done => break,
                Copied::WriterGone => return resumes,
                Copied::Cut(cut) => {
                    if resumes >= attempts {
                        let _ = self.tx.send(Msg::Failed(cut)).await;
                        return resumes;
                    }
                    resumes += 1;
                    self.metrics.resume();
                    tracing::info!(upstream = %self.upstream.name, digest = %self.digest, offset = pos, end = self.end, attempt = resumes, error = %cut, "resuming a cut part of a blob download");
                }
            }
        }
        let _ = self.tx.send(Msg::Done).await;
        resumes
    }

    /// Copies the body to the writer from `pos`, in batches of what has arrived, until the
    /// part's end.
    async fn copy(&self, body: &mut Chunks, pos: &mut u64) -> Copied {
        while *pos < self.end {
            let first = match body.next().await {
                Some(Ok(c)) => c,
                Some(Err(cut)) => return Copied::Cut(cut),
                None => {
                    return Copied::Cut(Cut::Short {
                        tier: Tier::Upstream,
                        written: *pos,
                        size: self.size,
                    })
                }
            };
            let mut batch = BytesMut::from(&first[..]);
            let mut failed = None;
            while batch.len() < WRITE_BATCH && (*pos + batch.len() as u64) < self.end {
                match body.next().now_or_never() {
                    Some(Some(Ok(c))) => batch.extend_from_slice(&c),
                    Some(Some(Err(cut))) => {
                        failed = Some(cut);
                        break;
                    }
                    Some(None) | None => break,
                }
            }
            // The first part's body runs to the blob's end: what lies past the part is
            // another part's.
            let keep = (self.end - *pos).min(batch.len() as u64) as usize;
            let bytes = batch.freeze().slice(..keep);
            let offset = *pos;
            *pos += keep as u64;
            if self.tx.send(Msg::Bytes { offset, bytes }).await.is_err() {
                return Copied::WriterGone;
            }
            if let Some(cut) = failed {
                return Copied::Cut(cut);
            }
        }
        Copied::Done
    }

    /// A ranged request for `pos..end`, its headers due within `first_byte_timeout`.
    async fn open(&self, pos: u64) -> Result<Chunks, Opening> {
        let by = tokio::time::Instant::now() + self.upstream.config().first_byte_timeout;
        let spec = Spec::From {
            first: pos,
            last: Some(self.end - 1),
        };
        let body = self
            .upstream
            .blob_range(&self.repo, &self.caller, &self.digest, spec, Some(by))
            .await
            .map_err(|e| Opening::Failed(Cut::Upstream(e)))?;
        if body.size != self.size {
            return Err(Opening::SizeChanged(body.size));
        }
        Ok(Feed::upstream(body).chunks)
    }
}

enum Copied {
    Done,
    Cut(Cut),
    WriterGone,
}

enum Opening {
    Failed(Cut),
    SizeChanged(u64),
}

/// Whether a part that could not be opened is worth asking again: an outage may be over at
/// once; a refusal (404, 401, a protocol error) will not.
fn retryable(cut: &Cut) -> bool {
    match cut {
        Cut::Upstream(e) => e.is_retryable(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_blob_once_in_order() {
        for (size, count) in [(100, 4), (7, 4), (1, 4), (1 << 30, 3), (10, 1)] {
            let s = spans(size, count);
            assert_eq!(s.first().map(|p| p.0), Some(0));
            assert_eq!(s.last().map(|p| p.1), Some(size));
            assert!(s.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
        }
        assert_eq!(spans(100, 4), vec![(0, 25), (25, 50), (50, 75), (75, 100)]);
    }
}
