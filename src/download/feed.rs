//! Where a download's bytes come from: a [`Feed`] from the first tier that has them (the
//! shared tier, the lease holder's peer endpoint, the upstream), replaced from the same offset
//! when it breaks ([`Cut`]).

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use futures_util::FutureExt;

use super::{Job, Outcome, Start, Waiting};
use crate::cluster::peer::{Patience, PeerError};
use crate::cluster::{Claimed, LeaseGuard};
use crate::outcome::Tier;
use crate::store::tier;
use crate::upstream;

/// A blob's bytes from one tier, from some offset on.
pub(super) struct Feed {
    pub(super) tier: Tier,
    /// The whole blob's length, as this tier knows it.
    pub(super) size: u64,
    /// The tier serves ranges of the blob (an upstream that answered `206`).
    pub(super) ranged: bool,
    pub(super) chunks: BoxStream<'static, Result<Bytes, Cut>>,
}

impl Feed {
    pub(super) async fn next_chunk(&mut self) -> Result<Option<Bytes>, Cut> {
        self.chunks.next().await.transpose()
    }

    /// An upstream's body.
    pub(super) fn upstream(body: upstream::BlobBody) -> Feed {
        let (size, ranged) = (body.size, body.ranged);
        let chunks = body.into_chunks().map_err(Cut::Upstream).boxed();
        Feed {
            tier: Tier::Upstream,
            size,
            ranged,
            chunks,
        }
    }

    /// A chunk that has already arrived, without waiting: `Ok(None)` for none yet, and
    /// `Ok(Some(None))` at the end.
    pub(super) fn ready_chunk(&mut self) -> Result<Option<Option<Bytes>>, Cut> {
        match self.chunks.next().now_or_never() {
            None => Ok(None),
            Some(None) => Ok(Some(None)),
            Some(Some(r)) => r.map(|c| Some(Some(c))),
        }
    }
}

/// Why a feed stopped before the blob's end, naming the tier that stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Cut {
    #[error(transparent)]
    Upstream(upstream::Error),
    #[error(transparent)]
    Shared(tier::Error),
    #[error("peer {peer}: {source}")]
    Peer {
        peer: String,
        #[source]
        source: PeerError,
    },
    /// The tier's body ended early, without an error.
    #[error("the {} body ended at {written} of {size} bytes", tier.label())]
    Short { tier: Tier, written: u64, size: u64 },
}

impl Cut {
    /// Whether the upstream broke off: only that counts against `resume_attempts` (a peer or
    /// the shared tier is replaced by the next tier instead).
    pub(super) fn is_upstream(&self) -> bool {
        matches!(
            self,
            Cut::Upstream(_)
                | Cut::Short {
                    tier: Tier::Upstream,
                    ..
                }
        )
    }
}

/// What a download keeps across feeds.
#[derive(Default)]
pub(super) struct Sources {
    pub(super) lease: Option<LeaseGuard>,
    /// A peer served some of the bytes: a lease taken after that is a takeover.
    pub(super) followed_peer: bool,
    /// Whether this replica held the lease (or had no coordinator) from the first byte: only
    /// then did it see every byte go by for the shared tier.
    pub(super) teeing: bool,
    pub(super) peer_failures: u32,
    /// The shared store broke off once: not asked again during this download.
    pub(super) skip_shared: bool,
    /// Coordination gave no usable peer: fetch from the upstream without a lease.
    pub(super) alone: bool,
    /// A tier other than the upstream served some of the bytes: a mismatch then does not
    /// show that the upstream's object is broken.
    pub(super) other_tiers: bool,
}

impl Sources {
    /// Bytes are about to come from `tier`.
    pub(super) fn note_tier(&mut self, tier: Tier) {
        self.other_tiers |= tier != Tier::Upstream;
    }
}

/// Attempts at a peer before fetching without it: with a pause of a fifth of the lease TTL
/// between them, twice the TTL, by which a dead holder's lease has expired.
const PEER_ATTEMPTS: u32 = 10;

/// The answer to opening the next feed.
pub(super) enum Opened {
    Feed(Feed),
    /// Worth trying again shortly.
    Retry(Cut),
    Fatal(Outcome),
}

impl Job {
    /// The blob from `offset` from the shared tier, when it holds it (a tier that fails is
    /// marked down by the tier itself, and skipped).
    pub(super) async fn shared_feed(&self, offset: u64, sources: &Sources) -> Option<Feed> {
        if sources.skip_shared {
            return None;
        }
        let b = self.tiers.shared_blob(&self.digest, offset).await?;
        let chunks = b.chunks.map(|c| c.map_err(Cut::Shared)).boxed();
        Some(Feed {
            tier: Tier::Shared,
            size: b.size,
            ranged: false,
            chunks,
        })
    }

    /// The next feed from `offset`: the shared tier, else the lease holder's peer endpoint,
    /// else the upstream (taking the lease first, when there is a coordinator), whose headers
    /// must come `by` that instant: set to `first_byte_timeout` from now when the upstream is
    /// first asked, if not set.
    pub(super) async fn open(
        &self,
        offset: u64,
        sources: &mut Sources,
        by: &mut Option<tokio::time::Instant>,
    ) -> Opened {
        if let Some(feed) = self.shared_feed(offset, sources).await {
            return Opened::Feed(feed);
        }
        if let (Some(cluster), None, false) = (&self.cluster, &sources.lease, sources.alone) {
            match cluster.claim_download(&self.digest).await {
                Claimed::Acquired(lease) => {
                    if sources.followed_peer {
                        self.metrics.lease_taken_over();
                        tracing::info!(digest = %self.digest, offset, "took over a download whose lease holder stopped");
                    }
                    sources.lease = Some(lease);
                    // The previous holder may have published it between the look above and
                    // the release of its lease: look again before asking the upstream.
                    if let Some(feed) = self.shared_feed(offset, sources).await {
                        return Opened::Feed(feed);
                    }
                }
                Claimed::Held { peer } => {
                    sources.followed_peer = true;
                    let patience = Patience {
                        first_byte: self.upstream.config().first_byte_timeout,
                        idle: self.upstream.config().idle_timeout,
                    };
                    let asked = cluster.peers().blob(&peer, &self.digest, offset, patience);
                    match asked.await {
                        Ok(b) => {
                            sources.peer_failures = 0;
                            let holder = peer.clone();
                            let chunks = b
                                .chunks
                                .map(move |c| {
                                    c.map_err(|source| Cut::Peer {
                                        peer: holder.clone(),
                                        source,
                                    })
                                })
                                .boxed();
                            return Opened::Feed(Feed {
                                tier: Tier::Peer,
                                size: b.size,
                                ranged: false,
                                chunks,
                            });
                        }
                        Err(e) => {
                            sources.peer_failures += 1;
                            if sources.peer_failures >= PEER_ATTEMPTS {
                                tracing::warn!(digest = %self.digest, %peer, error = %e, "the lease holder cannot be streamed from; fetching from the upstream alone");
                                sources.alone = true;
                            }
                            return Opened::Retry(Cut::Peer { peer, source: e });
                        }
                    }
                }
                Claimed::Alone => sources.alone = true,
            }
        }
        // Its content failed verification a moment ago: not downloaded again for a while.
        if let Some(retry_in) = self.mismatched.remaining(&self.upstream.name, &self.digest) {
            self.metrics.mismatch_refusal();
            return Opened::Fatal(Outcome::MismatchBackoff { retry_in });
        }
        // Clients still waiting for the first byte now wait for the upstream.
        self.start.send_if_modified(|s| {
            let tiers = matches!(s, Start::Pending(Waiting::Tiers));
            if tiers {
                *s = Start::Pending(Waiting::Upstream);
            }
            tiers
        });
        let by = *by.get_or_insert_with(|| {
            tokio::time::Instant::now() + self.upstream.config().first_byte_timeout
        });
        match self
            .upstream
            .blob(&self.repo, &self.caller, &self.digest, offset, Some(by))
            .await
        {
            Ok(body) => Opened::Feed(Feed::upstream(body)),
            Err(e @ upstream::Error::Protocol { .. }) => Opened::Fatal(Outcome::Protocol(e)),
            // A failure before the headers is retried like a cut body: the connection or the
            // upstream may be back at once.
            Err(e) if e.is_retryable() => Opened::Retry(Cut::Upstream(e)),
            Err(e) => Opened::Fatal(Outcome::Refused(e)),
        }
    }

    /// How long to wait before the next attempt after `cut`.
    pub(super) fn pause(&self, cut: &Cut, attempt: u32) -> Duration {
        match (cut.is_upstream(), &self.cluster) {
            (false, Some(cluster)) => cluster.lease_ttl() / 5,
            _ => upstream_pause(attempt),
        }
    }
}

/// The pause before the `attempt`-th request to the upstream after a cut or a failure.
pub(super) fn upstream_pause(attempt: u32) -> Duration {
    Duration::from_millis(100 * u64::from(attempt.max(1)))
}
