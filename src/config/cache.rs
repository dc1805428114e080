//! `[cache]`: how long tags are trusted, how long a stale one waits, and how many blobs are
//! prefetched at once.

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
    /// Prefetch downloads at once, over all upstreams. Serving one platform's image manifest
    /// with a `GET` (not an index: other platforms are never fetched) queues the downloads of
    /// that image's config and layers the mirror does not hold; this many run at a time, below
    /// clients (never the last free slot of `max_concurrent_requests`, and a client never waits
    /// for one: it joins it), within the disk bound, and each is the download a client's miss
    /// would start, so a client asking meanwhile joins it. dockerd asks for 3 layers at a time
    /// and starts each only when it asks; 8 keeps most of a dozen-blob image in flight at once
    /// over a long round trip, while staying well under what a registry allows one client.
    /// 0 turns prefetch off everywhere (per upstream: `prefetch`, `prefetch_skip`). At most 64.
    /// Default 8.
    pub prefetch_concurrency: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            stale_after: Duration::from_secs(1),
            prefetch_concurrency: 8,
        }
    }
}
