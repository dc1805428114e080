//! What the server does beside answering pulls, over the same state: readiness, the metrics
//! text, the status page and its samples, the periodic work of a replica (heartbeats, the
//! shared tier's flushes and eviction passes), prune notices and saving the index. [`Mirror`]
//! keeps the pull API alone.

use std::sync::Arc;
use std::time::Duration;

use super::{stats, Mirror};
use crate::cluster::members::Members;
use crate::config::PinConfig;
use crate::image::ImageRef;
use crate::store::pins::{PinError, PinSummary};
use crate::store::tiers::Pass;
use crate::upstream;

/// The housekeeping view of a [`Mirror`].
#[derive(Clone)]
pub struct Housekeeping {
    mirror: Arc<Mirror>,
}

/// A replica's periodic work, with how often it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Periodic {
    /// Announce this replica and refresh the member list.
    Heartbeat,
    /// Send the shared tier's batched access times.
    FlushShared,
    /// One eviction pass of the shared tier.
    EvictShared,
    /// Apply the purges other replicas logged (see `purge.rs`).
    FleetPurges,
}

impl Periodic {
    pub fn every(self) -> Duration {
        match self {
            Periodic::Heartbeat => crate::cluster::HEARTBEAT,
            Periodic::FlushShared => crate::store::tiers::FLUSH_EVERY,
            Periodic::EvictShared => crate::store::tiers::EVICT_EVERY,
            Periodic::FleetPurges => super::purge::APPLY_EVERY,
        }
    }
}

impl Housekeeping {
    pub fn of(mirror: &Arc<Mirror>) -> Housekeeping {
        Housekeeping {
            mirror: mirror.clone(),
        }
    }

    /// The periodic work of this replica: none without `[cluster]`.
    pub fn periodic(&self) -> &'static [Periodic] {
        if self.mirror.cluster.is_some() {
            &[
                Periodic::Heartbeat,
                Periodic::FlushShared,
                Periodic::EvictShared,
                Periodic::FleetPurges,
            ]
        } else {
            &[]
        }
    }

    /// Runs one round of `work`.
    pub async fn run(&self, work: Periodic) {
        match work {
            Periodic::Heartbeat => self.heartbeat().await,
            Periodic::FlushShared => self.flush_shared_accesses().await,
            Periodic::EvictShared => self.evict_shared().await,
            Periodic::FleetPurges => self.mirror.apply_fleet_purges().await,
        }
    }

    /// Whether the cache can take new content, or why not.
    pub async fn readiness(&self) -> Result<(), crate::store::Unwritable> {
        match self.mirror.tiers.local.unwritable().await {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// The Prometheus exposition, with the cache and upstream gauges brought up to date.
    pub fn metrics_text(&self, format: crate::metrics::Format) -> String {
        let stats = self.mirror.tiers.local.index.stats();
        self.mirror.metrics.cache_state(
            stats.bytes,
            stats.entries as u64,
            self.mirror.tiers.local.index.max(),
            self.mirror.tiers.local.evictions(),
        );
        for up in self.mirror.upstreams.values() {
            let is_up = up.state() == upstream::health::State::Up;
            self.mirror.metrics.upstream_up(&up.name, is_up);
        }
        self.mirror.metrics.encode(format)
    }

    /// Takes the status page's sample of the last interval (see [`stats::SAMPLE_EVERY`]).
    pub fn sample(&self) {
        self.mirror
            .history
            .sample(self.mirror.clock.now(), self.mirror.metrics.totals());
    }

    /// Counts a request for `repository` that sent `bytes` of body, for the status page.
    pub fn record_request(&self, registry: &str, repository: &str, bytes: u64) {
        self.mirror.repositories.record(registry, repository, bytes);
    }

    /// `/_pullthrough/status`: each upstream's pull budget, health and latest failures; the
    /// downloads in flight; what prefetch did; the last hour's samples; the busiest
    /// repositories; the cache size.
    pub fn status(&self) -> serde_json::Value {
        let now = self.mirror.clock.now();
        let rfc3339 = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let mut errors = Vec::new();
        let mut names: Vec<&String> = self.mirror.upstreams.keys().collect();
        names.sort();
        let upstreams: Vec<_> = names
            .into_iter()
            .map(|name| &self.mirror.upstreams[name])
            .map(|u| {
                for (at, error) in u.recent_errors() {
                    errors.push((at, u.name.clone(), error));
                }
                let budget = u.budget();
                let (client_accounts, client_lowest) = u.client_budgets();
                // The window is counted from the reading: by then the budget is whole again.
                let refills_in = budget.as_ref().map(|b| {
                    let refill = b.updated + std::time::Duration::from_secs(b.window_secs);
                    refill.duration_since(now).map_or(0, |d| d.as_secs())
                });
                serde_json::json!({
                    "refills_in_secs": refills_in,
                    "name": u.name,
                    "state": u.state(),
                    "limit": budget.as_ref().map(|b| b.limit),
                    "remaining": budget.as_ref().map(|b| b.remaining),
                    "window_secs": budget.as_ref().map(|b| b.window_secs),
                    "source": budget.as_ref().and_then(|b| b.source.clone()),
                    "updated": budget.as_ref().map(|b| humantime::format_rfc3339_seconds(b.updated).to_string()),
                    "counted_pulls": u.counted_pulls(),
                    "urls": u.urls(),
                    "budget_reserve": u.config().budget_reserve,
                    "credentials": u.config().credentials,
                    // Clients' own accounts (`credentials = "client"`), never named: how many
                    // the mirror has read a budget of, and the lowest remaining.
                    "client_budgets": {
                        "accounts": client_accounts,
                        "lowest_remaining": client_lowest,
                    },
                })
            })
            .collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.0));
        errors.truncate(20);
        let recent_errors: Vec<_> = errors
            .into_iter()
            .map(|(at, upstream, error)| {
                serde_json::json!({"time": rfc3339(at), "upstream": upstream, "error": error})
            })
            .collect();
        let (by_requests, by_bytes) = self.mirror.repositories.top(10);
        // Each busy repository with the tag rules that can apply to it, in order.
        let with_rules = |rows: Vec<stats::RepoRow>| -> Vec<serde_json::Value> {
            rows.into_iter()
                .map(|row| {
                    let rules = row
                        .repository
                        .parse::<crate::oci::RepoName>()
                        .ok()
                        .and_then(|repo| {
                            let policy = self.mirror.policies.get(&row.registry)?;
                            Some(policy.tag_rules().for_repository(&repo))
                        });
                    let mut v = serde_json::json!(row);
                    v["tag_rules"] = serde_json::json!(rules.unwrap_or_default());
                    v
                })
                .collect()
        };
        let (by_requests, by_bytes) = (with_rules(by_requests), with_rules(by_bytes));
        let cache = self.mirror.tiers.local.index.stats();
        let space = self.mirror.tiers.local.last_space();
        let totals = self.mirror.metrics.totals();
        let prefetch = self.mirror.metrics.prefetch_totals();
        let mut status = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now": rfc3339(now),
            "upstreams": upstreams,
            "cache_hit_ratio": self.mirror.metrics.hit_ratio(),
            "inflight_downloads": self.mirror.downloads.in_flight(),
            "downloads": self.mirror.downloads.progress(),
            "prefetch": {
                "concurrency": self.mirror.config.cache.prefetch_concurrency,
                "started": prefetch.started,
                "held": prefetch.held,
                "in_flight": prefetch.in_flight,
                "no_space": prefetch.no_space,
                "failed": prefetch.failed,
                "skipped": prefetch.skipped,
                "queued": prefetch.queued,
                "running": prefetch.running,
            },
            "cache": {
                "bytes": cache.bytes,
                "entries": cache.entries,
                "max_bytes": self.mirror.tiers.local.index.max(),
                // The last reading (see `refresh_space`): what an unbounded cache can grow to.
                "disk_free_bytes": space.map(|s| s.free),
                "disk_total_bytes": space.map(|s| s.total),
                "pins": self.mirror.tiers.local.pin_summary(),
            },
            "totals": {
                "lookups": totals.lookups,
                "hits": totals.hits,
                "bytes_cache": totals.bytes_cache,
                "bytes_upstream": totals.bytes_upstream,
            },
            "history": {
                "interval_secs": stats::SAMPLE_EVERY.as_secs(),
                "samples": self.mirror.history.samples(),
            },
            "top_repositories": {"by_requests": by_requests, "by_bytes": by_bytes},
            "recent_errors": recent_errors,
        });
        if let Some(cluster) = self.cluster_status() {
            status["cluster"] = cluster;
        }
        status["recent_purges"] = self.recent_purges();
        status
    }

    /// The status page's `recent_purges`: the latest purges and refreshes, here and in the
    /// fleet, the latest first.
    fn recent_purges(&self) -> serde_json::Value {
        let rfc3339 =
            |ms| humantime::format_rfc3339_seconds(crate::clock::from_unix_millis(ms)).to_string();
        self.mirror
            .recent_purges()
            .into_iter()
            .map(|p| {
                serde_json::json!({
                    "time": rfc3339(p.at_ms),
                    "action": p.action,
                    "subject": p.subject,
                    "by": p.by,
                    "replica": p.replica,
                })
            })
            .collect()
    }

    /// Reads the storage file system's free space unless a reading is recent (see
    /// `Store::space`: at most one `statvfs` a second, on the blocking pool), for
    /// [`Housekeeping::status`].
    pub async fn refresh_space(&self) {
        let _ = self.mirror.tiers.local.space().await;
    }

    /// `cache pin` through the admin API: adds runtime pins, refused with the figures when
    /// the pinned content would not fit in the bound.
    pub async fn pin(&self, add: Vec<PinConfig>) -> Result<PinSummary, PinError> {
        let who = add.iter().map(ToString::to_string).collect::<Vec<_>>();
        let summary = self.mirror.tiers.local.pin(add).await?;
        tracing::info!(pins = ?who, "pinned");
        Ok(summary)
    }

    /// `cache unpin` through the admin API.
    pub async fn unpin(&self, images: Vec<ImageRef>) -> Result<PinSummary, PinError> {
        let who = images.iter().map(ToString::to_string).collect::<Vec<_>>();
        let summary = self.mirror.tiers.local.unpin(images).await?;
        tracing::info!(pins = ?who, "unpinned");
        Ok(summary)
    }

    /// What is pinned, with the bytes its manifests list that are not cached yet.
    pub async fn pins(&self) -> PinSummary {
        let store = self.mirror.tiers.local.clone();
        tokio::task::spawn_blocking(move || store.pin_report())
            .await
            .unwrap_or_default()
    }

    /// Announces this replica to the cluster and refreshes the member list.
    pub async fn heartbeat(&self) {
        if let Some(members) = &self.mirror.members {
            members.heartbeat().await;
        }
    }

    /// Sends the shared tier's batched access times to the coordinator.
    pub async fn flush_shared_accesses(&self) {
        self.mirror.tiers.flush_shared().await;
    }

    /// One eviction pass of the shared tier (see `store::shared::eviction`).
    pub async fn evict_shared(&self) {
        if let Some(Pass::Busy { holder }) = self.mirror.tiers.evict_shared().await {
            tracing::debug!(%holder, "another replica evicts the shared tier");
        }
    }

    /// The status page's `cluster` object: members, the coordinator, leases, the shared tier.
    fn cluster_status(&self) -> Option<serde_json::Value> {
        let cluster = self.mirror.cluster.as_ref()?;
        let shared = self.mirror.tiers.shared_totals().map(|t| {
            serde_json::json!({
                "max_bytes": t.max,
                "bytes": t.bytes,
                "evictions": t.evictions,
            })
        });
        Some(serde_json::json!({
            "self": cluster.advertise(),
            "members": self.mirror.members.as_ref().map(Members::live).unwrap_or_default(),
            "coordinator": if cluster.is_reachable() { "up" } else { "down" },
            "leases_held": self.mirror.metrics.leases_held.get(),
            "leases_taken_over": self.mirror.metrics.leases_taken_over(),
            "shared": shared,
        }))
    }

    /// Notices a `cache prune` run beside this process: what it deleted leaves the index (and
    /// the size gauges).
    pub async fn notice_prune(&self) {
        let store = self.mirror.tiers.local.clone();
        match tokio::task::spawn_blocking(move || store.notice_prune()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(gone)) => {
                tracing::info!(files = gone, "noticed a prune of the storage directory")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot rescan the storage directory"),
            Err(e) => tracing::warn!(error = %e, "cannot rescan the storage directory"),
        }
    }

    /// Saves the cache index (sizes and access order) if it changed, off the async workers.
    pub async fn save_index(&self) {
        let store = self.mirror.tiers.local.clone();
        match tokio::task::spawn_blocking(move || store.save_index()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the cache index"),
            Err(e) => tracing::warn!(error = %e, "cannot save the cache index"),
        }
    }
}
