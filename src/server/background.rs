//! The server's periodic work, spawned by `run` and aborted at shutdown: TLS reloads on SIGHUP,
//! housekeeping (index saves, a `cache prune` beside the server noticed), the status page's
//! samples, and the cluster's heartbeats, access flushes and evictions on the mirror's clock.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::tls::Tls;
use crate::clock::Clock;
use crate::mirror::Mirror;

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

pub(super) async fn housekeeping_periodically(mirror: Arc<Mirror>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        mirror.notice_prune().await;
        mirror.save_index().await;
    }
}

pub(super) async fn sample_periodically(mirror: Arc<Mirror>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        mirror.sample();
    }
}

/// How often the clock is looked at by the cluster's periodic work, which follows the
/// mirror's [`Clock`] (moved by tests with `advance`) rather than timers of its own.
const CLOCK_CHECK: Duration = Duration::from_secs(1);

/// The cluster's periodic work: heartbeats (on their own, so that a long eviction pass never
/// delays them past the members' expiry), and the shared tier's access flushes and eviction
/// passes.
pub(super) fn cluster_periodically(
    mirror: &Arc<Mirror>,
    clock: &Clock,
) -> Vec<tokio::task::JoinHandle<()>> {
    let heartbeat = {
        let (mirror, clock) = (mirror.clone(), clock.clone());
        async move {
            on_clock(&clock, crate::cluster::HEARTBEAT, || mirror.heartbeat()).await;
        }
    };
    let flush = {
        let (mirror, clock) = (mirror.clone(), clock.clone());
        async move {
            use crate::store::shared::access::FLUSH_EVERY;
            on_clock(&clock, FLUSH_EVERY, || mirror.flush_shared_accesses()).await;
        }
    };
    let evict = {
        let (mirror, clock) = (mirror.clone(), clock.clone());
        async move {
            use crate::store::shared::eviction::EVICT_EVERY;
            on_clock(&clock, EVICT_EVERY, || mirror.evict_shared()).await;
        }
    };
    vec![
        tokio::spawn(heartbeat),
        tokio::spawn(flush),
        tokio::spawn(evict),
    ]
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
