//! The names of how a request was answered. The pull layer decides them, handlers send them as
//! `X-Cache`, metrics count them and the access log prints them; one enum keeps those four in
//! step and the metric labels bounded.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// What a pull was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Manifest,
    Blob,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Manifest => "manifest",
            ObjectKind::Blob => "blob",
        }
    }
}

/// How a response was served, sent as `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// From the cache, without asking the upstream.
    Hit,
    /// Fetched from the upstream (and cached).
    Miss,
    /// A cached tag the upstream confirmed unchanged with a HEAD.
    Revalidated,
    /// Cached content served because the upstream failed or refused.
    Stale,
    /// Joined a fetch another request had started.
    Coalesced,
    /// Relayed from the upstream without being cached (e.g. the disk is full).
    Passthrough,
}

impl CacheStatus {
    #[cfg(test)]
    const ALL: [CacheStatus; 6] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Revalidated,
        CacheStatus::Stale,
        CacheStatus::Coalesced,
        CacheStatus::Passthrough,
    ];

    /// The name in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Stale => "STALE",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Passthrough => "PASSTHROUGH",
        }
    }

    /// The `X-Cache` value. A passthrough is a miss to the client: the bytes came from the
    /// upstream; only the mirror's own log and metrics tell the two apart.
    pub fn x_cache(self) -> &'static str {
        match self {
            CacheStatus::Passthrough => "MISS",
            s => s.as_str(),
        }
    }

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Stale => "stale",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Passthrough => "passthrough",
        }
    }

    /// Whether the answer cost the upstream a download of the content.
    pub fn downloaded(self) -> bool {
        matches!(self, CacheStatus::Miss | CacheStatus::Passthrough)
    }

    /// A joined flight is reported as coalesced whatever the leader's outcome was.
    pub fn joined(self, coalesced: bool) -> CacheStatus {
        if coalesced && self != CacheStatus::Hit {
            CacheStatus::Coalesced
        } else {
            self
        }
    }
}

/// Where the bytes sent to a client came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The local cache.
    Cache,
    /// The upstream, during the download (or passthrough) that answered the request.
    Upstream,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
        }
    }
}

/// Where a blob's bytes came from for a request: the `source` label of
/// `pullthrough_blob_source_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// This replica's disk.
    Local,
    /// The object store all replicas share.
    Shared,
    /// Another replica's download in progress, streamed from it.
    Peer,
    /// The upstream registry.
    Upstream,
}

impl Tier {
    pub fn label(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Shared => "shared",
            Tier::Peer => "peer",
            Tier::Upstream => "upstream",
        }
    }
}

/// What became of one blob a prefetch was asked for: the `outcome` label of
/// `pullthrough_prefetch_total`. Each blob is counted once, as soon as this is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefetched {
    /// Its download was started by the prefetch and got going (its end is the download's
    /// business, logged and counted as any download's).
    Started,
    /// Already on this replica's disk.
    Held,
    /// Already downloading (a client's download, or queued for another prefetch): joined by
    /// nothing, since whoever asks joins it anyway.
    InFlight,
    /// The disk cannot take it (larger than `storage.max_size`, or too little free space):
    /// never relayed from memory with nobody reading.
    NoSpace,
    /// The download the prefetch started failed before its first byte.
    Failed,
    /// Not tried: the queue was full, the upstream had no request slot to spare for it
    /// (`max_concurrent_requests`) or was backing off, or it waited in the queue too long.
    Skipped,
}

impl Prefetched {
    pub const ALL: [Prefetched; 6] = [
        Prefetched::Started,
        Prefetched::Held,
        Prefetched::InFlight,
        Prefetched::NoSpace,
        Prefetched::Failed,
        Prefetched::Skipped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Prefetched::Started => "started",
            Prefetched::Held => "held",
            Prefetched::InFlight => "in_flight",
            Prefetched::NoSpace => "no_space",
            Prefetched::Failed => "failed",
            Prefetched::Skipped => "skipped",
        }
    }
}

impl EncodeLabelValue for Prefetched {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.label(), encoder)
    }
}

impl EncodeLabelValue for Tier {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.label(), encoder)
    }
}

impl EncodeLabelValue for Source {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.label(), encoder)
    }
}

impl EncodeLabelValue for CacheStatus {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.label(), encoder)
    }
}

impl EncodeLabelValue for ObjectKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_miss_and_passthrough_count_as_downloads() {
        let downloaded: Vec<_> = CacheStatus::ALL
            .into_iter()
            .filter(|s| s.downloaded())
            .collect();
        assert_eq!(downloaded, [CacheStatus::Miss, CacheStatus::Passthrough]);
        assert_eq!(CacheStatus::Passthrough.x_cache(), "MISS");
    }
}
