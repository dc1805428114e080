//! Blobs whose upstream content did not match their digest a moment ago, per upstream: not
//! fetched from that upstream again for [`MISMATCH_BACKOFF`], so that clients retrying a broken
//! upstream object get a quick `502` instead of each costing a full download that is then
//! thrown away.

use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::oci::Digest;

/// How long a digest whose upstream content failed verification is not fetched from that
/// upstream again. Long enough to absorb a client's retries (seconds apart), short enough
/// that a fixed upstream object is fetched again soon without an operator.
const MISMATCH_BACKOFF: Duration = Duration::from_secs(60);

/// At most this many digests are remembered (about 100 bytes each): a bound on memory that
/// an upstream serving many broken objects cannot grow past.
const CAPACITY: u64 = 10_000;

pub(super) struct Mismatched {
    /// When each (upstream name, digest) failed.
    failed: moka::sync::Cache<(String, Digest), SystemTime>,
    clock: Clock,
}

impl Mismatched {
    pub(super) fn new(clock: Clock) -> Mismatched {
        Mismatched {
            // The clock decides expiry (tests move it); moka's own TTL only frees memory.
            failed: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(MISMATCH_BACKOFF)
                .build(),
            clock,
        }
    }

    /// `upstream` just served content for `digest` that did not match it.
    pub(super) fn note(&self, upstream: &str, digest: &Digest) {
        self.failed
            .insert((upstream.to_owned(), digest.clone()), self.clock.now());
    }

    /// How much longer `digest` is not fetched from `upstream`, if it failed there recently.
    pub(super) fn remaining(&self, upstream: &str, digest: &Digest) -> Option<Duration> {
        let key = (upstream.to_owned(), digest.clone());
        let at = self.failed.get(&key)?;
        let left = MISMATCH_BACKOFF.saturating_sub(self.clock.since(at));
        if left.is_zero() {
            self.failed.invalidate(&key);
            return None;
        }
        Some(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_is_remembered_per_upstream_until_the_backoff_ends() {
        let clock = Clock::manual();
        let m = Mismatched::new(clock.clone());
        let digest = Digest::sha256_of(b"broken");
        assert_eq!(m.remaining("docker.io", &digest), None);
        m.note("docker.io", &digest);
        assert!(m
            .remaining("docker.io", &digest)
            .is_some_and(|d| d > Duration::ZERO && d <= MISMATCH_BACKOFF));
        assert_eq!(m.remaining("ghcr.io", &digest), None, "another upstream");
        clock.advance(MISMATCH_BACKOFF);
        assert_eq!(m.remaining("docker.io", &digest), None);
    }
}
