//! What replicas share through Redis, as a trait: leases (set-if-absent with expiry, fenced by
//! a token), values with expiry, counters and sorted sets. [`super::redis`] implements it on a
//! Redis server, [`super::memory`] in process (for tests, and for replicas of one process).
//! The meaning of each key (tag records, budgets, heartbeats, access times) lives with the
//! callers in [`super::Cluster`]; this is only the storage contract.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

/// A coordinator request that failed, with its typed cause. The message never holds the
/// Redis URL (which may carry a password).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoordError {
    /// The engine refused, dropped the connection or answered an error.
    #[error("{engine}: {source}")]
    Engine {
        engine: &'static str,
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The in-process coordinator, told to fail (tests).
    #[error("connection refused (in-memory coordinator is down)")]
    Down,
}

pub type CoordResult<T> = Result<T, CoordError>;

/// A held lease: `key` is ours while it holds `token` and has not expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub token: String,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Acquired(Lease),
    /// Someone else holds it; `holder` is what they claimed it with.
    Held {
        holder: String,
    },
}

/// A lease's stored value: its token, a space, and what its holder claimed it with.
pub(super) fn lease_value(token: &str, holder: &str) -> String {
    format!("{token} {holder}")
}

/// The token of a stored lease value.
pub(super) fn token_of(value: &str) -> &str {
    value.split_once(' ').map_or(value, |(t, _)| t)
}

/// The holder of a stored lease value.
pub(super) fn holder_of(value: &str) -> &str {
    value.split_once(' ').map_or(value, |(_, h)| h)
}

pub trait Coordinator: Send + Sync + 'static {
    /// Takes `key` for `holder` for `ttl`, unless someone holds it.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, CoordResult<Claim>>;

    /// Extends `lease` to `ttl` from now if it is still ours; `false` when it expired or was
    /// taken since (the fence: a holder that lost its lease must not publish).
    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, CoordResult<bool>>;

    /// Gives `lease` up if it is still ours.
    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, CoordResult<()>>;

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, CoordResult<Option<Vec<u8>>>>;

    /// Sets `key`, expiring after `ttl` when given.
    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, CoordResult<()>>;

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, CoordResult<()>>;

    /// Adds `by` to the counter `key` and returns the new value. A counter created by this
    /// call expires after `window` when given (a fixed window, as pull limits count).
    fn add<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        window: Option<Duration>,
    ) -> BoxFuture<'a, CoordResult<i64>>;

    /// Sets the scores of `members` of the sorted set `set` (adding those not in it).
    fn zadd<'a>(
        &'a self,
        set: &'a str,
        members: Vec<(String, f64)>,
    ) -> BoxFuture<'a, CoordResult<()>>;

    /// Members with a score in `min..=max`, lowest first, at most `limit`.
    fn zrange<'a>(
        &'a self,
        set: &'a str,
        min: f64,
        max: f64,
        limit: usize,
    ) -> BoxFuture<'a, CoordResult<Vec<(String, f64)>>>;

    fn zrem<'a>(&'a self, set: &'a str, members: Vec<String>) -> BoxFuture<'a, CoordResult<()>>;
}
