//! `[cache]`: how long tags are trusted, and how long a stale one waits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// A cached tag is served without asking the upstream for this long after it was last
    /// fetched or revalidated. Default 5 minutes.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// A tag the upstream answered 404 for is answered 404 without asking again for this
    /// long, so a typo in a CI matrix does not become a stream of counted pulls; likewise, a
    /// digest a tag's `HEAD` named that the upstream could not back with its manifest is not
    /// fetched again for the tag (its last verified record is served stale). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// How long a request for a cached tag past its TTL waits for the revalidation before the
    /// cached value is served stale; the revalidation goes on in the background. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            stale_after: Duration::from_secs(1),
        }
    }
}
