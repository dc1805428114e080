//! Building and running the server: [`Server`]'s settings beyond the config, then `run`: the
//! mirror, the listeners, the background tasks, the accept loop with its cap per client
//! address, and the drain at shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::admission::{Access, ClientLimit};
use super::background::{
    cluster_periodically, housekeeping_periodically, reload_tls_on_sighup, sample_periodically,
    trim_periodically, INDEX_SAVE_INTERVAL,
};
use super::client_addr::TrustedProxies;
use super::connection::{serve_io, spawn_main, Builders};
use super::connlimit::ConnLimit;
use super::tls::Tls;
use super::{App, Role};
use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mirror::{Housekeeping, Mirror};

/// Runs the mirror on `listener` until `shutdown` completes, then lets in-flight responses
/// finish for up to `server.shutdown_grace`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Server::new(config).serve(listener, shutdown).await
}

/// The server with what tests and embedders may set beyond the config.
pub struct Server {
    config: Config,
    clock: Clock,
    metrics_listener: Option<TcpListener>,
    housekeeping: Duration,
    sample_every: Duration,
    services: crate::mirror::Services,
}

impl Server {
    pub fn new(config: Config) -> Server {
        Server {
            config,
            clock: Clock::system(),
            metrics_listener: None,
            housekeeping: INDEX_SAVE_INTERVAL,
            sample_every: crate::mirror::stats::SAMPLE_EVERY,
            services: crate::mirror::Services::default(),
        }
    }

    /// A coordinator in place of the Redis of `[cluster]` (an in-process one in tests).
    pub fn coordinator(mut self, c: Arc<dyn crate::cluster::coordinator::Coordinator>) -> Server {
        self.services.coordinator = Some(c);
        self
    }

    /// An object store in place of the S3 of `[storage.shared]` (an in-memory one in tests).
    pub fn shared_store(mut self, store: Arc<dyn object_store::ObjectStore>) -> Server {
        self.services.shared_store = Some(store);
        self
    }

    /// How often the status page's history is sampled (10 s; shorter in tests).
    pub fn sample_interval(mut self, every: Duration) -> Server {
        self.sample_every = every;
        self
    }

    /// How often the index is saved and a `cache prune` beside the server is looked for
    /// (30 s; shorter in tests).
    pub fn housekeeping_interval(mut self, every: Duration) -> Server {
        self.housekeeping = every;
        self
    }

    /// The clock for TTLs and back-offs (a manual one in tests).
    pub fn clock(mut self, clock: Clock) -> Server {
        self.clock = clock;
        self
    }

    /// An already bound listener for `/metrics`, instead of binding `metrics.listen`.
    pub fn metrics_listener(mut self, listener: TcpListener) -> Server {
        self.metrics_listener = Some(listener);
        self
    }

    /// See [`serve`].
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        run(self, listener, shutdown).await
    }
}

pub(super) async fn run(
    server: Server,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Server {
        config,
        clock,
        metrics_listener,
        housekeeping,
        sample_every,
        services,
    } = server;
    match crate::platform::raise_open_files_limit() {
        Ok((from, to)) if from != to => tracing::info!(from, to, "raised the open files limit"),
        Ok((limit, _)) => tracing::info!(limit, "open files limit is at its hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    let metrics = Arc::new(Metrics::new());
    let grace = config.server.shutdown_grace;
    let header_timeout = config.server.header_read_timeout;
    let write_timeout = config.server.write_timeout;
    let conn_limit = ConnLimit::new(config.server.max_connections_per_client);
    let response_budget = Arc::new(super::budget::ResponseBudget::new(
        usize::try_from(config.server.response_buffer_budget.as_u64()).unwrap_or(usize::MAX),
        metrics.clone(),
    ));
    let access = Arc::new(Access::from_config(&config.server)?);
    warn_about_exposure(&config, &access);
    let metrics_listen = config.metrics.listen;
    let tls_files = (
        config.server.tls_cert.clone(),
        config.server.tls_key.clone(),
    );
    let client_limit = ClientLimit::from_config(&config.server);
    let trusted_proxies = TrustedProxies::new(config.server.trusted_proxies.clone());
    let mirror_metrics = metrics.clone();
    let (warm, warm_clock) = (config.warm.clone(), clock.clone());
    let cluster_clock = clock.clone();
    let mirror = Arc::new(
        tokio::task::spawn_blocking(move || Mirror::new(config, mirror_metrics, clock, services))
            .await??,
    );
    let metrics_listener = match (metrics_listener, metrics_listen) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {addr}: {e}"))?,
        ),
        (None, None) => None,
    };
    let app = Arc::new(App {
        mirror: mirror.clone(),
        metrics,
        access,
        client_limit,
        trusted_proxies,
        metrics_elsewhere: metrics_listener.is_some(),
        idle_timeout: header_timeout,
        write_timeout,
        response_budget,
    });
    let tls = match tls_files {
        (Some(cert), Some(key)) => {
            let tls = tokio::task::spawn_blocking(move || Tls::load(&cert, &key)).await??;
            Some(Arc::new(tls))
        }
        _ => None,
    };
    let chores = Housekeeping::of(&mirror);
    let mut background = vec![tokio::spawn(housekeeping_periodically(
        chores.clone(),
        housekeeping,
    ))];
    background.push(tokio::spawn(sample_periodically(
        chores.clone(),
        sample_every,
    )));
    background.push(tokio::spawn(trim_periodically()));
    if let Some(tls) = &tls {
        background.push(tokio::spawn(reload_tls_on_sighup(tls.clone())));
    }
    background.extend(cluster_periodically(&chores, &cluster_clock));
    if !warm.images.is_empty() {
        background.push(tokio::spawn(crate::warm::schedule::run(
            mirror.clone(),
            warm,
            warm_clock,
        )));
    }

    // Shared, not cloned per connection: a clone copies every setting and bumps two Arcs.
    let builders = Arc::new(Builders::new());
    // Told to every connection at shutdown; dropped by each when it ends, which is how the
    // drain below knows they all have.
    let (stop_tx, stop_rx) = watch::channel(false);

    if let Some(metrics_listener) = metrics_listener {
        tracing::info!(addr = %metrics_listener.local_addr()?, "metrics listening");
        let (builders, app) = (builders.clone(), app.clone());
        // Scrapes are short: this listener is simply stopped at shutdown, not drained.
        background.push(tokio::spawn(async move {
            while let Ok((stream, peer)) = metrics_listener.accept().await {
                let (builders, app) = (builders.clone(), app.clone());
                tokio::spawn(async move {
                    let builder = &builders.auto;
                    serve_io(builder, stream, app, peer, Role::Metrics, None, None).await;
                });
            }
        }));
    }
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "pullthrough listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(place) = conn_limit.try_acquire(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: too many from this address");
            app.metrics.connection_refused();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (builders, app, stop) = (builders.clone(), app.clone(), stop_rx.clone());
        spawn_main(stream, peer, place, tls.as_ref(), builders, app, stop);
    }
    drop(listener);
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining connections"
    );
    let _ = stop_tx.send(true);
    drop(stop_rx);
    tokio::select! {
        () = stop_tx.closed() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
    for task in background {
        task.abort();
    }
    chores.save_index().await;
    // The last few seconds of shared-tier accesses, which the fleet's eviction order would
    // otherwise never see (bounded by the coordinator's request deadline).
    chores.flush_shared_accesses().await;
    Ok(())
}

fn warn_about_exposure(config: &Config, access: &Access) {
    if access.is_restricted() {
        return;
    }
    for (name, up) in &config.upstreams {
        if up.sends_credentials() {
            tracing::warn!(
                upstream = %name,
                "UPSTREAM CREDENTIALS WITHOUT CLIENT ACCESS CONTROL: anyone who can reach this \
                 mirror can pull what these credentials can, private images included; set \
                 server.allow, server.htpasswd or server.tokens (or credentials = \"client\": \
                 docs/private-images.md)"
            );
        }
    }
}
