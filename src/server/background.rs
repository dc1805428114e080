//! The server's periodic work, spawned by `run` and aborted at shutdown: TLS reloads on SIGHUP,
//! housekeeping (index saves, a `cache prune` beside the server noticed), the status page's
//! samples, and the cluster's heartbeats, access flushes and evictions on the mirror's clock.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::tls::Tls;
use crate::clock::Clock;
use crate::mirror::Housekeeping;

pub(super) async fn reload_tls_on_sighup(tls: Arc<Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let tls = tls.clone();
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(())) => tracing::info!("TLS certificate reloaded"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the old certificate")
            }
            Err(e) => tracing::error!(error = %e, "TLS reload failed"),
        }
    }
}

/// How often the access order is saved (a restart loses at most this much LRU history) and a
/// `cache prune` run beside the server is looked for.
pub(super) const INDEX_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) async fn housekeeping_periodically(chores: Housekeeping, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        chores.notice_prune().await;
        chores.save_index().await;
    }
}

/// How often the allocator's free memory is given back to the system.
pub(super) const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Gives the allocator's free memory back to the system every `TRIM_EVERY` (see
/// `platform::release_free_memory`): a burst of connections, or of clients that never read,
/// would otherwise leave the process at its peak. On the blocking pool: trimming a large heap
/// takes milliseconds.
pub(super) async fn trim_periodically() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let _ = tokio::task::spawn_blocking(crate::platform::release_free_memory).await;
    }
}

pub(super) async fn sample_periodically(chores: Housekeeping, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        chores.sample();
    }
}

/// How often the clock is looked at by the cluster's periodic work, which follows the
/// mirror's [`Clock`] (moved by tests with `advance`) rather than timers of its own.
const CLOCK_CHECK: Duration = Duration::from_secs(1);

/// A replica's periodic work (none without `[cluster]`), each on its own task: a long
/// eviction pass never delays a heartbeat past the members' expiry.
pub(super) fn cluster_periodically(
    chores: &Housekeeping,
    clock: &Clock,
) -> Vec<tokio::task::JoinHandle<()>> {
    chores
        .periodic()
        .iter()
        .map(|&work| {
            let (chores, clock) = (chores.clone(), clock.clone());
            tokio::spawn(async move {
                on_clock(&clock, work.every(), || chores.run(work)).await;
            })
        })
        .collect()
}

/// Runs `work` at once and then each time `every` has passed on `clock`, until aborted.
async fn on_clock<F, Fut>(clock: &Clock, every: Duration, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut due = clock.now();
    loop {
        if clock.now() >= due {
            work().await;
            due = clock.now() + every;
        }
        tokio::time::sleep(CLOCK_CHECK.min(every)).await;
    }
}
