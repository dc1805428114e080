//! The fleet's access order of the shared tier: accesses and publications are batched in
//! memory and flushed with one `zadd` (and one `add` of the bytes published) every
//! [`FLUSH_EVERY`]: a hot blob read a thousand times costs one write per flush.

use std::collections::HashMap;

use super::{Ledger, Object, ACCESS, BYTES};
use crate::clock;
use crate::oci::Digest;
use crate::store::tier::Kind;
use crate::sync::lock;

/// How often the batch of accesses and publications goes to the coordinator.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Distinct objects the batch holds while the coordinator cannot take it; more are dropped
/// (their next access records them again).
const MAX_PENDING: usize = 100_000;

/// An access or publication waiting for the next flush.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    size: u64,
    at_ms: u64,
    /// Newly published: its size goes to the total.
    published: bool,
}

impl Ledger {
    /// A new object of `size` bytes is in the shared tier (published by this replica).
    pub fn published(&self, kind: Kind, digest: &Digest, size: u64) {
        self.record(kind, digest, size, true);
    }

    /// The object of `size` bytes was deleted on an operator's request (a purge): it leaves
    /// the access order, and the total unless its publication was not counted yet.
    pub async fn purged(&self, kind: Kind, digest: &Digest, size: u64) {
        let object = Object {
            kind,
            digest: digest.clone(),
        };
        let uncounted = lock(&self.pending)
            .remove(&object)
            .is_some_and(|p| p.published);
        self.cluster.zrem(ACCESS, vec![object.member(size)]).await;
        if !uncounted {
            let by = -i64::try_from(size).unwrap_or(i64::MAX);
            self.cluster.add(BYTES, by, None).await;
        }
    }

    /// The object was read from the shared tier (`size`: its whole length).
    pub fn accessed(&self, kind: Kind, digest: &Digest, size: u64) {
        self.record(kind, digest, size, false);
    }

    pub(super) fn record(&self, kind: Kind, digest: &Digest, size: u64, published: bool) {
        let at_ms = clock::unix_millis(self.clock.now());
        let object = Object {
            kind,
            digest: digest.clone(),
        };
        merge(
            &mut lock(&self.pending),
            object,
            Pending {
                size,
                at_ms,
                published,
            },
        );
    }

    /// Sends the batch to the coordinator: one `zadd` of the access times, one `add` of the
    /// bytes published. A batch the coordinator does not take waits for the next flush.
    pub async fn flush(&self) {
        let batch = std::mem::take(&mut *lock(&self.pending));
        if batch.is_empty() {
            return;
        }
        let members = batch
            .iter()
            .map(|(o, p)| (o.member(p.size), p.at_ms as f64))
            .collect();
        let published: u64 = batch.values().filter(|p| p.published).map(|p| p.size).sum();
        let mut taken = self.cluster.zadd(ACCESS, members).await.is_some();
        if taken && published > 0 {
            taken = self
                .cluster
                .add(BYTES, i64::try_from(published).unwrap_or(i64::MAX), None)
                .await
                .is_some();
        }
        if !taken {
            let mut pending = lock(&self.pending);
            for (object, p) in batch {
                merge(&mut pending, object, p);
            }
        }
    }
}

/// Adds `p` to the batch: the latest access wins, a publication stays one.
fn merge(pending: &mut HashMap<Object, Pending>, object: Object, p: Pending) {
    if let Some(old) = pending.get_mut(&object) {
        old.at_ms = old.at_ms.max(p.at_ms);
        old.published |= p.published;
        old.size = p.size;
    } else if pending.len() < MAX_PENDING {
        pending.insert(object, p);
    }
}
