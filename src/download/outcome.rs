//! Every way a download ends ([`Outcome`], each logged by name) and what its waiting clients
//! are told ([`Failure`]).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Cut, Start, Waiting};
use crate::oci::{Digest, RepoName};
use crate::outcome::Tier;
use crate::upstream;

/// Why a download failed, as its waiters are told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Upstream(upstream::Error),
    #[error("upstream blob does not match {expected} (got {actual})")]
    DigestMismatch { expected: Digest, actual: String },
    /// The upstream's content for the blob did not match it a moment ago: not fetched again
    /// for `retry_in`.
    #[error("upstream content for {digest} did not match it; not fetched again for {retry_in:?}")]
    MismatchBackoff { digest: Digest, retry_in: Duration },
    #[error("cannot write the blob to the cache: {0}")]
    Storage(Arc<io::Error>),
    #[error("the download task panicked")]
    Panicked,
    /// Another tier (a peer, the shared store) broke off, too often.
    #[error("the download was cut: {0}")]
    Cut(#[source] Cut),
    /// A tier answered a resume with another size than the blob's.
    #[error("the {} answered size {actual} for a blob of {expected} bytes", tier.label())]
    SizeChanged {
        tier: Tier,
        expected: u64,
        actual: u64,
    },
    /// This client waited for the download's first byte as long as its upstream's
    /// `first_byte_timeout` allows; the download goes on for the others.
    #[error("timed out waiting for {} from {upstream}", waiting.what())]
    WaitTimeout { upstream: String, waiting: Waiting },
    /// The download's task vanished without an outcome (aborted): a new one may start.
    #[error("the download ended without an outcome")]
    Dangling,
}

/// How a download ended. Each is logged; none is left implicit.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Verified and published in the store.
    Committed { size: u64, resumes: u32 },
    /// Verified and streamed, but larger than the cache bound, so not kept.
    TooLargeToKeep { size: u64 },
    /// Not enough disk space: relayed from memory to its clients, verified, not kept.
    NoSpace { size: u64, resumes: u32 },
    /// Not enough disk space, and the relay stopped at `written`: nobody read it any more.
    Unread { written: u64, size: u64 },
    /// Another download committed it first.
    AlreadyCached,
    /// The upstream answered with an error before the body, or did not answer within
    /// `first_byte_timeout`.
    Refused(upstream::Error),
    /// The body was cut more often than `resume_attempts` allows.
    ResumesExhausted { written: u64, last: Cut },
    /// The upstream's stalls and resumes went without a byte for longer than the stall budget
    /// (see `job::stall_budget`).
    Stalled { written: u64, last: Cut },
    /// The bytes did not hash to the digest, or had the wrong length.
    DigestMismatch { actual: String },
    /// Not asked for: the upstream's content failed verification a moment ago.
    MismatchBackoff { retry_in: Duration },
    /// The upstream's answer cannot be used (no length, wrong range).
    Protocol(upstream::Error),
    /// A resume from `tier` answered another size than the blob's.
    SizeChanged {
        tier: Tier,
        expected: u64,
        actual: u64,
    },
    /// Writing the temp file or committing it failed.
    Storage(io::Error),
    /// The download task panicked.
    Panicked,
}

pub(super) fn finish_waiters(
    start: &watch::Sender<Start>,
    outcome: Outcome,
    digest: &Digest,
) -> Outcome {
    let failure = match &outcome {
        Outcome::Committed { .. }
        | Outcome::AlreadyCached
        | Outcome::TooLargeToKeep { .. }
        | Outcome::NoSpace { .. }
        | Outcome::Unread { .. } => return outcome,
        Outcome::Refused(e) | Outcome::Protocol(e) => Failure::Upstream(e.clone()),
        Outcome::ResumesExhausted { last, .. } | Outcome::Stalled { last, .. } => match last {
            Cut::Upstream(e) => Failure::Upstream(e.clone()),
            other => Failure::Cut(other.clone()),
        },
        Outcome::SizeChanged {
            tier,
            expected,
            actual,
        } => Failure::SizeChanged {
            tier: *tier,
            expected: *expected,
            actual: *actual,
        },
        Outcome::DigestMismatch { actual } => Failure::DigestMismatch {
            expected: digest.clone(),
            actual: actual.clone(),
        },
        Outcome::MismatchBackoff { retry_in } => Failure::MismatchBackoff {
            digest: digest.clone(),
            retry_in: *retry_in,
        },
        Outcome::Storage(e) => Failure::Storage(Arc::new(io::Error::new(e.kind(), e.to_string()))),
        Outcome::Panicked => Failure::Panicked,
    };
    // Readers of the body learn it from the writer (dropped with the job); waiters for the
    // start learn it here.
    start.send_if_modified(|s| {
        if matches!(s, Start::Pending(_)) {
            *s = Start::Failed(failure);
            true
        } else {
            false
        }
    });
    outcome
}

pub(super) fn log_outcome(
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
        Outcome::NoSpace { size, resumes } => {
            tracing::debug!(upstream, %repo, %digest, size, resumes, "no disk space; relayed uncached")
        }
        Outcome::Unread { written, size } => {
            tracing::debug!(upstream, %repo, %digest, written, size, "no disk space; relay stopped, nobody read it")
        }
        Outcome::Refused(e) => {
            tracing::info!(upstream, %repo, %digest, error = %e, "blob download refused")
        }
        Outcome::ResumesExhausted { written, last } => {
            tracing::warn!(upstream, %repo, %digest, written, error = %last, "blob download cut too often; not cached")
        }
        Outcome::Stalled { written, last } => {
            tracing::warn!(upstream, %repo, %digest, written, error = %last, "blob download stalled too long; not cached")
        }
        Outcome::DigestMismatch { actual } => {
            tracing::error!(upstream, %repo, %digest, %actual, "upstream blob does not match its digest; discarded")
        }
        // Each client retry of a broken object is one: the mismatch itself was logged.
        Outcome::MismatchBackoff { retry_in } => {
            tracing::debug!(upstream, %repo, %digest, retry_in_secs = retry_in.as_secs(), "blob refused: its upstream content did not match a moment ago")
        }
        Outcome::Protocol(e) => {
            tracing::warn!(upstream, %repo, %digest, error = %e, "unusable upstream blob response")
        }
        Outcome::SizeChanged {
            tier,
            expected,
            actual,
        } => {
            tracing::warn!(upstream, %repo, %digest, tier = tier.label(), expected, actual, "a resume answered another size; not cached")
        }
        Outcome::Storage(e) => {
            tracing::error!(upstream, %repo, %digest, error = %e, "cannot write blob to the cache")
        }
        Outcome::Panicked => tracing::error!(%digest, "blob download task panicked"),
    }
}
