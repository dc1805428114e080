//! Blob downloads: one upstream fetch per digest, streamed to every client that asks while it
//! runs, resumed when the upstream cuts it, verified before it is committed.
//!
//! The leader's work runs in its own task, so clients may come and go (the first included)
//! without cancelling it. The bytes go to a temp file; clients read that file behind the
//! writer, woken by a watch channel on each write. When the disk cannot take the blob, they
//! go to a bounded window in memory that the clients follow instead ([`Relay`]). Every way a download can end is an
//! [`Outcome`], logged by name.
//!
//! With replicas, the bytes come from the first tier that has them ([`Feed`]): the shared
//! object store, else the replica holding the cluster-wide lease on the digest (streamed from
//! its peer endpoint while it downloads), else the upstream, once this replica holds the lease.
//! A feed that breaks is replaced by the next one from the same offset: a lease holder that
//! dies is taken over when its lease expires. The lease holder tees the bytes into a multipart
//! upload to the shared tier, completed only once the blob is verified and the lease is
//! still held.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::outcome::Tier;
use crate::singleflight::{Flights, Joined};
use crate::store::handle::BlobHandle;
use crate::store::tiers::Tiers;
use crate::trace;
use crate::upstream::Upstream;

mod feed;
mod job;
mod mismatched;
mod outcome;
mod parts;
mod publish;
mod relay;

pub use feed::Cut;
use job::Job;
use mismatched::Mismatched;
pub use outcome::Failure;
use outcome::{finish_waiters, log_outcome, Outcome};
pub use relay::{Relay, Subscriber};

/// Ready chunks are gathered up to this size before one write, so a fast upstream does not
/// cost a write per network packet, while a slow one is written as soon as anything arrives.
pub(super) const WRITE_BATCH: usize = 1024 * 1024;

/// What a client waiting for a download learns once the upstream has answered.
#[derive(Clone)]
pub enum Start {
    /// Waiting for the first byte, from where [`Waiting`] says.
    Pending(Waiting),
    /// The body is arriving (first from `tier`): read it through this handle, which follows
    /// the writer.
    Streaming(BlobHandle, Tier),
    /// The blob was committed by someone else before this download began: read the store.
    AlreadyCached,
    /// The disk cannot take the blob: the body (first from `tier`) is relayed from memory,
    /// uncached; follow it through the relay.
    Relaying(Arc<Relay>, Tier),
    /// The download failed before any byte could be served.
    Failed(Failure),
}

/// What a download waits for before its first byte: what a client that gives up is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// The store, the shared tier, the coordinator or the lease holder.
    Tiers,
    /// The upstream's response (its token realm's included).
    Upstream,
}

impl Waiting {
    /// What the client waited for, as its error message says.
    pub fn what(self) -> &'static str {
        match self {
            Waiting::Tiers => "the blob's download to start",
            Waiting::Upstream => "the upstream's response to the blob's download",
        }
    }
}

pub struct Download {
    /// The leader's task holds the sender: a closed channel means that task is gone.
    start: watch::Receiver<Start>,
    /// The most a client waits for the download's first byte.
    wait_limit: Duration,
    /// The upstream and repository it was started for: an upstream answer to it confirms the
    /// digest for that repository only.
    upstream: String,
    repo: RepoName,
    /// The leader's span, which the spans of clients waiting on it link to.
    span: trace::Link,
}

impl Download {
    fn new(
        upstream: &Upstream,
        repo: &RepoName,
        span: trace::Link,
    ) -> (Download, watch::Sender<Start>) {
        let (tx, rx) = watch::channel(Start::Pending(Waiting::Tiers));
        let download = Download {
            start: rx,
            wait_limit: upstream.config().first_byte_timeout,
            upstream: upstream.name.clone(),
            repo: repo.clone(),
            span,
        };
        (download, tx)
    }

    /// The download's span, for a waiting client's span to link to.
    pub fn span(&self) -> &trace::Link {
        &self.span
    }

    /// Whether it was started for `repo` of the upstream named `upstream`.
    pub fn is_for(&self, upstream: &str, repo: &RepoName) -> bool {
        self.upstream == upstream && self.repo == *repo
    }

    /// The upstream and repository it was started for.
    pub fn origin(&self) -> (&str, &RepoName) {
        (&self.upstream, &self.repo)
    }

    /// Whether the download's first answer is in (its size known, or its failure).
    pub fn has_started(&self) -> bool {
        !matches!(&*self.start.borrow(), Start::Pending(_))
    }

    /// Waits for the download's first answer, at most the upstream's `first_byte_timeout`
    /// (as Pingora's cache lock, every way the wait ends is named: an answer,
    /// [`Failure::WaitTimeout`] with what the download was waiting for, or
    /// [`Failure::Dangling`] when the leader's task is gone).
    pub async fn started(&self) -> Start {
        let mut rx = self.start.clone();
        let waited = tokio::time::timeout(
            self.wait_limit,
            rx.wait_for(|s| !matches!(s, Start::Pending(_))),
        )
        .await;
        match waited {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) => Start::Failed(Failure::Dangling),
            Err(_) => {
                let waiting = match &*self.start.borrow() {
                    Start::Pending(w) => *w,
                    _ => Waiting::Tiers,
                };
                Start::Failed(Failure::WaitTimeout {
                    upstream: self.upstream.clone(),
                    waiting,
                })
            }
        }
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
            Start::Streaming(handle, _) => {
                let size = handle.size();
                let written = match handle.clone().into_parts().1 {
                    Some(rx) => match &*rx.borrow() {
                        crate::store::handle::Progress::Writing { written, .. } => *written,
                        crate::store::handle::Progress::Complete => size,
                        crate::store::handle::Progress::Failed(_) => 0,
                    },
                    None => size,
                };
                (written, Some(size))
            }
            Start::Relaying(relay, _) => (relay.written(), Some(relay.size())),
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
    tiers: Arc<Tiers>,
    cluster: Option<Arc<Cluster>>,
    metrics: Arc<Metrics>,
    /// Digests whose upstream content just failed verification, not fetched there again yet.
    mismatched: Arc<Mismatched>,
}

impl Downloads {
    pub fn new(
        tiers: Arc<Tiers>,
        cluster: Option<Arc<Cluster>>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Downloads {
        Downloads {
            flights: Flights::default(),
            tiers,
            cluster,
            metrics,
            mismatched: Arc::new(Mismatched::new(clock)),
        }
    }

    /// Joins the download of `digest`, starting it if none runs. Returns whether this caller
    /// joined an existing one.
    pub fn join(
        &self,
        upstream: Arc<Upstream>,
        repo: &RepoName,
        caller: &Caller,
        digest: &Digest,
    ) -> (Arc<Download>, bool) {
        let mut sender = None;
        let mut span = tracing::Span::none();
        let joined = self.flights.join_or_start(digest, || {
            // Under the span of the client that starts it.
            span = trace::span!("download", upstream = %upstream.name, repository = %repo, %digest);
            let (download, tx) = Download::new(&upstream, repo, trace::Link::of(&span));
            sender = Some(tx);
            download
        });
        match (joined, sender) {
            (Joined::Follower(d), _) => (d, true),
            // `start` ran: the sender is there.
            (Joined::Leader(d, guard), sender) => {
                let start = Arc::new(
                    sender.unwrap_or_else(|| watch::channel(Start::Pending(Waiting::Tiers)).0),
                );
                let job = Job {
                    start: start.clone(),
                    upstream,
                    repo: repo.clone(),
                    caller: caller.clone(),
                    digest: digest.clone(),
                    tiers: self.tiers.clone(),
                    cluster: self.cluster.clone(),
                    metrics: self.metrics.clone(),
                    mismatched: self.mismatched.clone(),
                };
                let metrics = self.metrics.clone();
                metrics.inflight_downloads.inc();
                tokio::spawn(
                    async move {
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
                        let outcome = finish_waiters(&start, outcome, &digest);
                        drop(guard);
                        metrics.inflight_downloads.dec();
                        log_outcome(&outcome, &up, &repo, &digest, started);
                    }
                    .instrument(span),
                );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::UpstreamConfig;

    fn upstream(first_byte_timeout: Duration) -> Upstream {
        let config = UpstreamConfig {
            first_byte_timeout,
            ..UpstreamConfig::default()
        };
        Upstream::new(
            "docker.io",
            &config,
            Arc::new(Metrics::new()),
            Clock::manual(),
            None,
        )
        .unwrap()
    }

    fn repo() -> RepoName {
        "library/app".parse().unwrap()
    }

    #[tokio::test]
    async fn a_client_whose_leader_vanished_is_told_dangling_at_once() {
        let (download, start) = Download::new(
            &upstream(Duration::from_secs(3600)),
            &repo(),
            trace::Link::default(),
        );
        drop(start);
        let waited = tokio::time::timeout(Duration::from_secs(5), download.started()).await;
        assert!(matches!(waited, Ok(Start::Failed(Failure::Dangling))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_waits_for_a_stuck_leader_no_longer_than_first_byte_timeout() {
        let (download, _start) = Download::new(
            &upstream(Duration::from_secs(30)),
            &repo(),
            trace::Link::default(),
        );
        let asked = tokio::time::Instant::now();
        let started = download.started().await;
        assert!(
            matches!(&started, Start::Failed(Failure::WaitTimeout { upstream, waiting: Waiting::Tiers }) if upstream == "docker.io")
        );
        assert_eq!(asked.elapsed(), Duration::from_secs(30));
    }

    #[test]
    fn a_tier_that_broke_off_is_named_and_only_the_upstream_counts_as_a_resume() {
        let short = Cut::Short {
            tier: Tier::Peer,
            written: 10,
            size: 20,
        };
        assert!(!short.is_upstream());
        assert!(short.to_string().contains("peer"), "{short}");
        let changed = Failure::SizeChanged {
            tier: Tier::Shared,
            expected: 20,
            actual: 21,
        };
        assert!(!changed.to_string().contains("upstream"), "{changed}");
        assert!(Cut::Short {
            tier: Tier::Upstream,
            written: 1,
            size: 2
        }
        .is_upstream());
    }
}
