//! A download's leader: opens a feed, writes it through the local writer (verified before
//! commit), or relays it from memory when the disk cannot take it, resumes it from the same
//! offset when it breaks, then publishes it.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::feed::{Cut, Feed, Opened, Sources};
use super::parts;
use super::relay::{Relay, RelayWriter, Unread};
use super::{Mismatched, Outcome, Start, WRITE_BATCH};
use crate::cluster::Cluster;
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::outcome::Tier;
use crate::store::tiers::{TierWriter, Tiers};
use crate::store::writer::Finished;
use crate::upstream::{self, Upstream};

pub(super) struct Job {
    pub(super) start: Arc<watch::Sender<Start>>,
    pub(super) upstream: Arc<Upstream>,
    pub(super) repo: RepoName,
    /// On whose behalf it fetches: the client that started it.
    pub(super) caller: Caller,
    pub(super) digest: Digest,
    pub(super) tiers: Arc<Tiers>,
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) mismatched: Arc<Mismatched>,
}

impl Job {
    pub(super) async fn run(self) -> Outcome {
        match self.tiers.local.blobs.open(&self.digest).await {
            Ok(Some(_)) => {
                self.start.send_replace(Start::AlreadyCached);
                return Outcome::AlreadyCached;
            }
            Ok(None) => {}
            Err(e) => return Outcome::Storage(e),
        }
        let mut sources = Sources::default();
        let asked = Instant::now();
        let mut attempts = 0u32;
        // The upstream's own failure, which a back-off it caused must not hide from clients.
        let mut failed: Option<upstream::Error> = None;
        // One first_byte_timeout from the first upstream request, its retries included: as
        // long as the clients wait.
        let mut first_byte_by = None;
        let feed = loop {
            match self.open(0, &mut sources, &mut first_byte_by).await {
                Opened::Feed(f) => {
                    sources.note_tier(f.tier);
                    break f;
                }
                Opened::Fatal(outcome) => {
                    return match (outcome, failed) {
                        (Outcome::Refused(upstream::Error::BackingOff { .. }), Some(e)) => {
                            Outcome::Refused(e)
                        }
                        (outcome, _) => outcome,
                    }
                }
                Opened::Retry(cut) => {
                    let pause = self.pause(&cut, attempts + 1);
                    if let Cut::Upstream(e) = &cut {
                        // Retried only within the clients' wait: a timeout has used it up.
                        let late = first_byte_by
                            .is_some_and(|by| tokio::time::Instant::now() + pause >= by);
                        if late || attempts >= self.upstream.config().resume_attempts {
                            return Outcome::Refused(e.clone());
                        }
                        failed = Some(e.clone());
                        attempts += 1;
                    }
                    tracing::info!(upstream = %self.upstream.name, digest = %self.digest, attempt = attempts, error = %cut, "retrying blob download");
                    tokio::time::sleep(pause).await;
                }
            }
        };
        if feed.tier == Tier::Upstream {
            self.metrics.miss_first_byte(asked.elapsed());
        }
        sources.teeing = sources.lease.is_some() || sources.alone || self.cluster.is_none();
        let size = feed.size;
        let mut parts = 1;
        let mut writer = if self.make_room(size).await {
            // What came from the shared tier is not uploaded back to it.
            let tee = feed.tier != Tier::Shared && sources.teeing;
            let mut writer = match self.tiers.writer(&self.digest, tee).await {
                Ok(w) => w,
                Err(e) => return self.storage_failed(e),
            };
            parts = self.parts_for(&feed);
            // Readers of a range learn where the parts will start before any byte arrives.
            writer.expect(parts::spans(size, parts).iter().skip(1).map(|p| p.0));
            self.start
                .send_replace(Start::Streaming(writer.reader(size), feed.tier));
            Sink::Disk(writer)
        } else {
            self.metrics.no_space();
            let (relay, writer) = Relay::new(size);
            self.start.send_replace(Start::Relaying(relay, feed.tier));
            Sink::Memory(writer)
        };

        let mut resumes = 0u32;
        let mut last_tier = feed.tier;
        if let (Sink::Disk(w), true) = (&mut writer, parts > 1) {
            match self.fetch_parts(feed, w, parts).await {
                Ok(r) => resumes = r,
                Err(outcome) => return outcome,
            }
        } else {
            match self
                .copy_feed(feed, &mut writer, &mut sources, &mut resumes)
                .await
            {
                Ok(tier) => last_tier = tier,
                Err(outcome) => return outcome,
            }
        }
        let other_tiers = sources.other_tiers;
        let writer = match writer {
            Sink::Disk(w) => w,
            Sink::Memory(relay) => {
                return match relay.finish(&self.digest) {
                    Ok(()) => Outcome::NoSpace { size, resumes },
                    Err(actual) => {
                        if last_tier == Tier::Shared || sources.skip_shared {
                            self.forget_shared();
                        }
                        self.mismatch(actual.to_string(), other_tiers)
                    }
                }
            }
        };
        let (finished, upload) = writer.finish(&self.digest, size).await;
        let kept = matches!(
            finished,
            Ok(Finished::Published) | Ok(Finished::TooLargeToKeep)
        );
        if kept {
            self.publish(upload, sources, size).await;
        } else if last_tier == Tier::Shared || sources.skip_shared {
            self.forget_shared();
        }
        match finished {
            Ok(Finished::Published) => Outcome::Committed { size, resumes },
            Ok(Finished::TooLargeToKeep) => Outcome::TooLargeToKeep { size },
            Ok(Finished::Mismatch { actual }) => self.mismatch(actual.to_string(), other_tiers),
            Err(e) => self.storage_failed(e),
        }
    }

    /// Copies `feed` (and the feeds that replace it when it breaks, from the same offset)
    /// into `writer` to the blob's end; the tier of the last feed.
    async fn copy_feed(
        &self,
        mut feed: Feed,
        writer: &mut Sink,
        sources: &mut Sources,
        resumes: &mut u32,
    ) -> Result<Tier, Outcome> {
        let size = feed.size;
        // What is left of the time the upstream may keep the clients without a byte.
        let mut quiet = stall_budget(self.upstream.config().idle_timeout);
        let mut last_byte = tokio::time::Instant::now();
        loop {
            let copied = self
                .copy_body(&mut feed, writer, size, &mut last_byte)
                .await;
            let mut cut = match copied {
                Ok(()) if writer.written() == size => break,
                Ok(()) => Cut::Short {
                    tier: feed.tier,
                    written: writer.written(),
                    size,
                },
                Err(CopyError::Cut(e)) => e,
                Err(CopyError::TooLong) => {
                    return Err(
                        self.mismatch(format!("more than {size} bytes"), sources.other_tiers)
                    )
                }
                Err(CopyError::Storage(e)) => return Err(self.storage_failed(e)),
                Err(CopyError::Unread) => {
                    return Err(Outcome::Unread {
                        written: writer.written(),
                        size,
                    })
                }
            };
            if feed.tier == Tier::Shared {
                sources.skip_shared = true;
            }
            if cut.is_upstream() {
                // The upstream's silence before it broke off (a stall: its idle_timeout).
                quiet = quiet.saturating_sub(last_byte.elapsed());
            }
            let by = tokio::time::Instant::now() + quiet;
            feed = loop {
                if cut.is_upstream() {
                    if *resumes >= self.upstream.config().resume_attempts {
                        return Err(Outcome::ResumesExhausted {
                            written: writer.written(),
                            last: cut,
                        });
                    }
                    if tokio::time::Instant::now() >= by {
                        return Err(Outcome::Stalled {
                            written: writer.written(),
                            last: cut,
                        });
                    }
                    *resumes += 1;
                    self.metrics.resume();
                }
                tracing::info!(upstream = %self.upstream.name, digest = %self.digest, offset = writer.written(), attempt = *resumes, error = %cut, "resuming cut blob download");
                let opened = self.open(writer.written(), sources, &mut Some(by)).await;
                if matches!(opened, Opened::Feed(_)) {
                    // The resume's wait for headers is spent; the body's own silence counts
                    // from here.
                    quiet = by.saturating_duration_since(tokio::time::Instant::now());
                    last_byte = tokio::time::Instant::now();
                }
                match opened {
                    Opened::Feed(f) if f.size == size => {
                        sources.note_tier(f.tier);
                        break f;
                    }
                    Opened::Feed(f) => {
                        return Err(Outcome::SizeChanged {
                            tier: f.tier,
                            expected: size,
                            actual: f.size,
                        })
                    }
                    Opened::Fatal(outcome) => return Err(outcome),
                    Opened::Retry(e) => {
                        tokio::time::sleep(self.pause(&e, *resumes)).await;
                        cut = e;
                    }
                }
            };
        }
        Ok(feed.tier)
    }

    pub(super) async fn make_room(&self, size: u64) -> bool {
        self.tiers.local.make_room(size).await
    }

    pub(super) fn storage_failed(&self, e: io::Error) -> Outcome {
        if self.tiers.local.note_write_failure(&e) {
            self.metrics.no_space();
        }
        Outcome::Storage(e)
    }

    /// The bytes did not match the digest. When every byte came from the upstream (none from
    /// `other_tiers`), the upstream's object is broken: it is not fetched again for a while
    /// (see `mismatched`).
    pub(super) fn mismatch(&self, actual: String, other_tiers: bool) -> Outcome {
        self.metrics.digest_mismatch();
        if !other_tiers {
            self.mismatched.note(&self.upstream.name, &self.digest);
        }
        Outcome::DigestMismatch { actual }
    }

    /// Copies the feed into the tiers' writer until it ends or fails, noting when bytes last
    /// arrived; ready chunks are batched.
    async fn copy_body(
        &self,
        feed: &mut Feed,
        writer: &mut Sink,
        size: u64,
        last_byte: &mut tokio::time::Instant,
    ) -> Result<(), CopyError> {
        loop {
            let first = feed.next_chunk().await.map_err(CopyError::Cut)?;
            let Some(first) = first else { return Ok(()) };
            *last_byte = tokio::time::Instant::now();
            let mut batch = BytesMut::from(&first[..]);
            let mut ended = false;
            let mut failed = None;
            // Take whatever else is already buffered, without waiting.
            while batch.len() < WRITE_BATCH {
                match feed.ready_chunk() {
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
            let batch = batch.freeze();
            self.write(writer, batch, size, feed.tier).await?;
            if let Some(e) = failed {
                return Err(CopyError::Cut(e));
            }
            if ended {
                return Ok(());
            }
        }
    }

    async fn write(
        &self,
        writer: &mut Sink,
        chunk: Bytes,
        size: u64,
        tier: Tier,
    ) -> Result<(), CopyError> {
        let len = chunk.len() as u64;
        if writer.written() + len > size {
            return Err(CopyError::TooLong);
        }
        if tier == Tier::Upstream {
            self.metrics.upstream_bytes(&self.upstream.name, len);
        }
        match writer {
            Sink::Disk(w) => w.write(chunk).await.map_err(CopyError::Storage),
            Sink::Memory(w) => w.write(chunk).await.map_err(|Unread| CopyError::Unread),
        }
    }
}

/// Where a download's bytes go: the disk, or, when it cannot take them, a relay in memory.
enum Sink {
    Disk(TierWriter),
    Memory(RelayWriter),
}

impl Sink {
    fn written(&self) -> u64 {
        match self {
            Sink::Disk(w) => w.written(),
            Sink::Memory(w) => w.written(),
        }
    }
}

/// How long, in all, the upstream may keep a download's clients without a byte once the body
/// has begun: its stalls (each noticed after `idle_timeout`) and its resumes' waits for
/// headers. Two idle timeouts: one stall noticed and one resume waited for; past that the
/// download is cut, whatever `resume_attempts` is left, so that an upstream stalling on every
/// response cannot keep a client for `resume_attempts` stalls (quick cuts cost nothing of it).
fn stall_budget(idle_timeout: std::time::Duration) -> std::time::Duration {
    idle_timeout * 2
}

enum CopyError {
    Cut(Cut),
    TooLong,
    Storage(io::Error),
    /// Relayed from memory, and nobody reads it any more.
    Unread,
}
