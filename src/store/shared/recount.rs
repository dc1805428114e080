//! The recount: once an hour for the fleet, the shared tier's total is set to what its bucket
//! holds, and objects the access set lacks (published by a replica that died before its
//! flush, or all of them after Redis lost its data) are put into it, so that they are evicted
//! in turn.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;

use super::eviction::Walk;
use super::{Ledger, Object, ACCESS, BYTES};
use crate::cluster::coordinator::{Claim, Lease};

/// How often the fleet recounts the shared tier's total from a listing of its bucket.
pub(super) const RECONCILE_EVERY: Duration = Duration::from_secs(3600);
/// Members read per request by a recount.
const RECOUNT_PAGE: usize = 1000;

impl Ledger {
    /// Whether the fleet's recount is due, and this replica's to do: a claim that nobody
    /// releases, so it is won once per [`RECONCILE_EVERY`].
    pub(super) async fn recount_due(&self) -> bool {
        matches!(
            self.cluster
                .claim("shared:recounted", RECONCILE_EVERY)
                .await,
            Some(Claim::Acquired(_))
        )
    }

    /// Sets the total to what the bucket holds, and returns it; `None` when the store or the
    /// coordinator failed midway. Objects the access set lacks are put into it, scored by
    /// their last modification: one published by a replica that died before its flush, or
    /// every object after Redis lost its data, would otherwise never be evicted. Members whose
    /// object is gone are dropped. The access set is read before the bucket is listed, and a
    /// member is only ever recorded for an object that exists, so a member missing from the
    /// listing is gone for good (only the evictor deletes, and this replica holds its lease).
    pub(super) async fn recount(&self, lease: &Lease) -> Option<u64> {
        let mut members: HashMap<String, String> = HashMap::new();
        let mut walk = Walk::default();
        loop {
            let page = walk.next(&self.cluster, RECOUNT_PAGE).await?;
            if page.is_empty() {
                break;
            }
            for (member, _) in page {
                if let Some((object, _)) = Object::parse(&member) {
                    members.insert(object.name(), member);
                }
            }
        }
        if !walk.exhausted {
            return None;
        }
        let mut total = 0u64;
        let mut untracked = Vec::new();
        let mut listing = self.tier.list();
        let mut listed_count = 0usize;
        while let Some(listed) = listing.next().await {
            listed_count += 1;
            // A big bucket takes many list pages: the evictor lease must outlast them.
            if listed_count % RECOUNT_PAGE == 0 && !self.renew(lease).await {
                return None;
            }
            let (name, size, modified_ms) = match listed {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the shared tier; recount skipped");
                    return None;
                }
            };
            let member = format!("{name} {size}");
            if Object::parse(&member).is_none() {
                continue;
            }
            total += size;
            if members.remove(&name).is_none() {
                untracked.push((member, modified_ms as f64));
            }
        }
        for page in untracked.chunks(RECOUNT_PAGE) {
            self.cluster.zadd(ACCESS, page.to_vec()).await;
        }
        let gone: Vec<String> = members.into_values().collect();
        for page in gone.chunks(RECOUNT_PAGE) {
            self.cluster.zrem(ACCESS, page.to_vec()).await;
        }
        if !untracked.is_empty() || !gone.is_empty() {
            tracing::info!(
                untracked = untracked.len(),
                gone = gone.len(),
                bytes = total,
                "shared tier recounted from its bucket"
            );
        }
        self.cluster.set_json(BYTES, &total, None).await;
        Some(total)
    }
}
