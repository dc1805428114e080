//! What replicas of one cluster share about an upstream, so that the fleet treats it as one
//! client would: each URL's back-off (a replica that backs off a URL makes the others skip it
//! until the back-off ends), each URL's latest pull-budget reading (replicas behind one
//! address spend one Docker Hub budget, so `budget_reserve` is judged on the newest reading
//! any of them got), and the pulls counted against `max_pulls` (one Redis counter per
//! `max_pulls_window`, where governor's limiter could only count this replica's).
//!
//! Keys, under the cluster's prefix: `backoff:<upstream>:<url index>` (until when, in Unix
//! milliseconds, expiring then), `budget:<upstream>:<url index>` (a [`Budget`] in its serde
//! form, expiring after the budget's window) and `pulls:<upstream>` (expiring with its
//! window). A replica learns the others' state when it sends a request, at most every
//! [`SYNC_EVERY`]. With the coordinator unreachable, every decision here is this replica's
//! alone, as without `[cluster]`.

use std::time::Duration;

use super::ratelimit::Budget;
use super::{health, Upstream};
use crate::clock::{from_unix_millis, unix_millis};

/// The longest a replica goes on sending requests before it learns another's back-off.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How long a reading without a window (`w=`) is kept: Docker Hub's window.
const DEFAULT_WINDOW: Duration = Duration::from_secs(6 * 3600);

impl Upstream {
    fn backoff_key(&self, endpoint: usize) -> String {
        format!("backoff:{}:{endpoint}", self.name)
    }

    fn budget_key(&self, endpoint: usize) -> String {
        format!("budget:{}:{endpoint}", self.name)
    }

    /// Learns the back-offs and budget readings the other replicas shared, unless it did
    /// within [`SYNC_EVERY`].
    pub(super) async fn sync(&self) {
        let Some(cluster) = &self.cluster else { return };
        {
            let now = self.clock.now();
            let mut last = crate::sync::lock(&self.synced_at);
            if last.is_some_and(|t| now.duration_since(t).is_ok_and(|d| d < SYNC_EVERY)) {
                return;
            }
            *last = Some(now);
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if let Some(until_ms) = cluster.get_json::<u64>(&self.backoff_key(i)).await {
                endpoint.health.learn(from_unix_millis(until_ms));
            }
            if let Some(budget) = cluster.get_json::<Budget>(&self.budget_key(i)).await {
                if endpoint.budget.learn(budget.clone()) && i == 0 {
                    self.gauge_budget(&budget);
                }
            }
        }
    }

    /// Tells the other replicas that URL `endpoint` began backing off or answers again.
    pub(super) async fn share_health(&self, endpoint: usize, change: health::Change) {
        let Some(cluster) = &self.cluster else { return };
        let key = self.backoff_key(endpoint);
        match change {
            health::Change::BackingOff { until } => {
                let ttl = until
                    .duration_since(self.clock.now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1));
                cluster.set_json(&key, &unix_millis(until), Some(ttl)).await;
            }
            health::Change::Recovered => cluster.delete(&key).await,
        }
    }

    /// Shares the budget URL `endpoint` just reported.
    pub(super) async fn share_budget(&self, endpoint: usize, budget: &Budget) {
        let Some(cluster) = &self.cluster else { return };
        let window = match budget.window_secs {
            0 => DEFAULT_WINDOW,
            secs => Duration::from_secs(secs),
        };
        cluster
            .set_json(&self.budget_key(endpoint), budget, Some(window))
            .await;
    }

    /// Counts one pull against the fleet's `max_pulls` for the current window (a fixed window,
    /// started by its first pull, expiring with it): the fleet's count so far, or `None`
    /// without `[cluster]` or while the coordinator does not answer.
    pub(super) async fn count_fleet_pull(&self, window: Duration) -> Option<i64> {
        let cluster = self.cluster.as_ref()?;
        let key = format!("pulls:{}", self.name);
        cluster.add(&key, 1, Some(window)).await
    }
}
