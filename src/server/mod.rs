//! The HTTP server: accepts connections (HTTP/1.1, and h2c by prior knowledge; TLS with ALPN)
//! up to a cap per client address, closes those with no request in flight for
//! `header_read_timeout`, drains on shutdown, admits each request (access control, client
//! limits), and wraps it in timing, panic isolation, metrics and one log line. What a request
//! is answered with is the business of `routes` and below.

mod activity;
pub mod admission;
mod batched_writes;
pub mod client_addr;
mod connlimit;
mod request_id;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::handlers::body::{self, Body};
use crate::handlers::error::ApiError;
use crate::logging::{self, AccessLine};
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::oci::RepoName;
use crate::outcome::CacheStatus;
use crate::routes::{self, Route};
use crate::sendfile::{self, Sendfile};
use activity::{Activity, InFlight};
use admission::{Access, ClientLimit};
use client_addr::TrustedProxies;
use connlimit::ConnLimit;
use tls::Tls;

/// Which requests a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The registry API (and /metrics unless `metrics.listen` moves it).
    Main,
    /// `metrics.listen`: /metrics and /healthz only.
    Metrics,
}

/// HTTP/2 limits. Whatever flow-control window a client advertises, a stream holds at most
/// `H2_SEND_BUF` bytes queued in h2 plus the chunk being handed over (`H2_FILE_CHUNK` for file
/// bodies): 48 KiB, so at most 4.8 MiB for a connection's `H2_MAX_STREAMS` (hyper's defaults,
/// 400 KiB and 200 streams with 128 KiB chunks, let one connection that never reads pin
/// 140 MB). RFC 9113 asks for no fewer than 100 streams; containerd uses a handful.
const H2_MAX_STREAMS: u32 = 100;
const H2_SEND_BUF: usize = 32 * 1024;
/// File bodies on HTTP/2 are read in chunks this size: one DATA frame of the default maximum
/// size with its 9-byte header, so that over TLS a frame is one full record (a 16 KiB chunk
/// left a 9-byte record behind every frame). Measured over TLS on a cached 1 MiB blob (h2load,
/// 64 x 8 streams): 1.08 times the requests per second of 32 KiB chunks.
const H2_FILE_CHUNK: usize = 16384 - 9;
/// File bodies over TLS (HTTP/1.1) are copied too, since the cipher needs the bytes: read in
/// place when their pages are cached, in chunks of four TLS records.
const TLS_FILE_CHUNK: usize = 64 * 1024;
/// Clients never upload: windows as small as the protocol's default bound what a client can
/// make the mirror buffer for request bodies (the connection window below 65535 would have no
/// effect).
const H2_STREAM_WINDOW: u32 = 16 * 1024;
const H2_CONNECTION_WINDOW: u32 = 65_535;
/// A request header block (decoded, hyper's default); a bigger one is refused.
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams a client may reset before the mirror answers them (rapid reset, CVE-2023-44487),
/// and streams the mirror may reset for a client's protocol errors before it drops the client.
const H2_MAX_PENDING_RESETS: usize = 20;
const H2_MAX_ERROR_RESETS: usize = 128;
/// A ping after this long without a frame from the client; no answer within the timeout
/// resets its streams and closes the connection (a vanished peer, or one that stopped
/// reading). A connection whose client does not read cannot take the GOAWAY either: the
/// watchdog drops it, its streams gone, `header_read_timeout` later.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a connection told to close (idle, or at shutdown) may take once it has no request
/// in flight: long enough to flush the end of a response or exchange HTTP/2's GOAWAY and
/// PING; then it is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What every request on a listener shares: the pull layer and the admission rules.
struct App {
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    access: Arc<Access>,
    client_limit: Option<ClientLimit>,
    trusted_proxies: TrustedProxies,
    /// `/metrics` is served on its own listener (`metrics.listen`), not on the main one.
    metrics_elsewhere: bool,
    /// `server.header_read_timeout`: also how long a connection may sit with no request.
    idle_timeout: Duration,
}

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

async fn run(
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
    let conn_limit = ConnLimit::new(config.server.max_connections_per_client);
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
    });
    let tls = match tls_files {
        (Some(cert), Some(key)) => {
            let tls = tokio::task::spawn_blocking(move || Tls::load(&cert, &key)).await??;
            Some(Arc::new(tls))
        }
        _ => None,
    };
    let mut background = vec![tokio::spawn(housekeeping_periodically(
        mirror.clone(),
        housekeeping,
    ))];
    background.push(tokio::spawn(sample_periodically(
        mirror.clone(),
        sample_every,
    )));
    if let Some(tls) = &tls {
        background.push(tokio::spawn(reload_tls_on_sighup(tls.clone())));
    }
    if mirror.is_clustered() {
        background.extend(cluster_periodically(&mirror, &cluster_clock));
    }
    if !warm.images.is_empty() {
        background.push(tokio::spawn(crate::warm::schedule::run(
            mirror.clone(),
            warm,
            warm_clock,
        )));
    }

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // hyper asks a body for more while its write buffer is below this; the default
        // (~400 KiB) would let every slow reader pin that much memory.
        .max_buf_size(64 * 1024)
        // Body chunks must reach the connection's writer as they are, never copied into one
        // buffer: zero-copy file bodies depend on it (see `sendfile`).
        .writev(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUF)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .adaptive_window(false)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_ERROR_RESETS)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    // Shared, not cloned per connection: a clone copies every setting and bumps two Arcs.
    let builder = Arc::new(builder);
    // Told to every connection at shutdown; dropped by each when it ends, which is how the
    // drain below knows they all have.
    let (stop_tx, stop_rx) = watch::channel(false);

    if let Some(metrics_listener) = metrics_listener {
        tracing::info!(addr = %metrics_listener.local_addr()?, "metrics listening");
        let (builder, app) = (builder.clone(), app.clone());
        // Scrapes are short: this listener is simply stopped at shutdown, not drained.
        background.push(tokio::spawn(async move {
            while let Ok((stream, peer)) = metrics_listener.accept().await {
                let (builder, app) = (builder.clone(), app.clone());
                tokio::spawn(serve_io(
                    builder,
                    stream,
                    app,
                    peer,
                    Role::Metrics,
                    None,
                    None,
                ));
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
        let (builder, app, stop) = (builder.clone(), app.clone(), stop_rx.clone());
        match &tls {
            None => {
                let (conn, sendfile) = sendfile::Connection::new(stream);
                tokio::spawn(async move {
                    serve_io(
                        builder,
                        conn,
                        app,
                        peer,
                        Role::Main,
                        Some(stop),
                        Some(sendfile),
                    )
                    .await;
                    drop(place);
                });
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                let mut stop = Some(stop);
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(header_timeout, acceptor.accept(stream));
                    let accepted = tokio::select! {
                        accepted = handshake => accepted,
                        () = stopped(&mut stop) => return,
                    };
                    match accepted {
                        Ok(Ok(tls_stream))
                            if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") =>
                        {
                            let io = batched_writes::BatchedWrites::new(tls_stream);
                            serve_io(builder, io, app, peer, Role::Main, stop, None).await
                        }
                        Ok(Ok(tls_stream)) => {
                            let files = Some(Sendfile::copy_only(TLS_FILE_CHUNK));
                            serve_io(builder, tls_stream, app, peer, Role::Main, stop, files).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(place);
                });
            }
        }
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
    mirror.save_index().await;
    // The last few seconds of shared-tier accesses, which the fleet's eviction order would
    // otherwise never see (bounded by the coordinator's request deadline).
    mirror.flush_shared_accesses().await;
    Ok(())
}

/// Serves HTTP/1.1 or HTTP/2 on one connection until it closes. With `sendfile` (a plain TCP
/// connection), HTTP/1.x requests may answer with zero-copy file bodies; over TLS a copy-only
/// one has cached file pages read in place instead of on the blocking pool.
///
/// The watchdog: a connection with no request in flight for `header_read_timeout` (counted
/// from its opening or the end of its last response) is told to close, then dropped if it
/// has not within `CLOSE_LINGER`. hyper's own header timeout covers only HTTP/1.1 once the
/// version is known; this also covers a connection still sending the HTTP/2 preface (which
/// holds the version detection), one in the HTTP/2 handshake, and an HTTP/2 connection with
/// no complete request. On `stop`, every connection is told to close and dropped once it has
/// had no request in flight for `CLOSE_LINGER`, so a half-sent request does not hold
/// shutdown. The watchdog's timer and shutdown signal wake it through its `Activity`, so the
/// connection's many I/O wake-ups do not poll them (the shutdown signal's mutex is shared by
/// every connection).
async fn serve_io<I>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    app: Arc<App>,
    peer: SocketAddr,
    role: Role,
    mut stop: Option<watch::Receiver<bool>>,
    sendfile: Option<Sendfile>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = app.idle_timeout;
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = activity.begin();
            let app = app.clone();
            let files = if req.version() <= http::Version::HTTP_11 {
                sendfile.clone()
            } else {
                // HTTP/2 copies body chunks into its frames: placeholders must not reach it,
                // and file chunks stay small (see `H2_FILE_CHUNK`). Allocates nothing.
                Some(Sendfile::copy_only(H2_FILE_CHUNK))
            };
            let conn = ConnInfo {
                peer,
                role,
                files,
                in_flight,
            };
            // Boxed: hyper spawns one task per HTTP/2 stream holding this future, and moving
            // the whole request state machine into it costs several kilobytes of copying.
            Box::pin(async move { Ok::<_, Infallible>(handle(app, req, conn).await) })
        })
    };
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    tokio::pin!(conn);
    let watchdog_waker = Waker::from(activity.clone());
    let mut closing = false;
    let result = loop {
        let limit = if closing { CLOSE_LINGER } else { idle_timeout };
        let (watch_stop, stop, activity_ref) = (!closing, &mut stop, &*activity);
        let alarm = async move {
            tokio::select! {
                biased;
                () = stopped(stop), if watch_stop => Alarm::Stop,
                () = activity_ref.idle_for(limit) => Alarm::Idle,
            }
        };
        let mut alarm = std::pin::pin!(alarm);
        // The connection on every wake-up of the task; the watchdog first at once (it may be
        // new), then only when its timer or the shutdown signal woke it.
        // Err: the connection ended, with its result; Ok: the watchdog's alarm.
        let mut first = true;
        let fired = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Err(result));
            }
            if activity.watchdog_due(cx.waker()) | std::mem::take(&mut first) {
                let mut watchdog_cx = Context::from_waker(&watchdog_waker);
                if let Poll::Ready(alarm) = alarm.as_mut().poll(&mut watchdog_cx) {
                    return Poll::Ready(Ok(alarm));
                }
            }
            Poll::Pending
        })
        .await;
        match fired {
            Err(result) => break result,
            Ok(Alarm::Idle) if closing => {
                tracing::debug!(%peer, "connection dropped: did not close when told");
                return;
            }
            Ok(Alarm::Idle) => {
                tracing::debug!(%peer, "closing a connection with no request for the header timeout");
                conn.as_mut().graceful_shutdown();
                activity.touch();
                closing = true;
            }
            Ok(Alarm::Stop) => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// What woke a connection's watchdog.
enum Alarm {
    /// No request in flight for the limit.
    Idle,
    /// The server shuts down.
    Stop,
}

/// Resolves once the server shuts down; never without a `stop` channel.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        // An error means the server is gone: as good as stopped.
        Some(rx) => drop(rx.wait_for(|stopped| *stopped).await),
        None => std::future::pending().await,
    }
}

async fn reload_tls_on_sighup(tls: Arc<Tls>) {
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
const INDEX_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

async fn housekeeping_periodically(mirror: Arc<Mirror>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        mirror.notice_prune().await;
        mirror.save_index().await;
    }
}

async fn sample_periodically(mirror: Arc<Mirror>, every: Duration) {
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
fn cluster_periodically(mirror: &Arc<Mirror>, clock: &Clock) -> Vec<tokio::task::JoinHandle<()>> {
    let heartbeat = {
        let (mirror, clock) = (mirror.clone(), clock.clone());
        async move {
            on_clock(&clock, crate::cluster::HEARTBEAT, || mirror.heartbeat()).await;
        }
    };
    let flush = {
        let (mirror, clock) = (mirror.clone(), clock.clone());
        async move {
            use crate::cluster::eviction::FLUSH_EVERY;
            on_clock(&clock, FLUSH_EVERY, || mirror.flush_shared_accesses()).await;
        }
    };
    let evict = {
        let (mirror, clock) = (mirror.clone(), clock.clone());
        async move {
            use crate::cluster::eviction::EVICT_EVERY;
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

fn warn_about_exposure(config: &Config, access: &Access) {
    if access.is_restricted() {
        return;
    }
    for (name, up) in &config.upstreams {
        if up.username.is_some() {
            tracing::warn!(
                upstream = %name,
                "UPSTREAM CREDENTIALS WITHOUT CLIENT ACCESS CONTROL: anyone who can reach this \
                 mirror can pull what these credentials can, private images included; set \
                 server.allow, server.htpasswd or server.tokens"
            );
        }
    }
}

/// Access control, then the per-client limit. Health checks are always answered, so that
/// orchestrators need no credentials; replica-to-replica requests are authenticated by the
/// cluster secret instead (in the pull layer), since replicas are not clients.
async fn admit(
    app: &App,
    route: &Route,
    role: Role,
    req: &Request<Incoming>,
    client: IpAddr,
) -> Result<(), ApiError> {
    if matches!(
        route,
        Route::Healthz | Route::Readyz | Route::PeerBlob { .. }
    ) || role == Role::Metrics
    {
        return Ok(());
    }
    use crate::metrics::Refusal;
    let refused = |why| {
        let metrics = app.metrics.clone();
        move |e| {
            metrics.client_refused(why);
            e
        }
    };
    app.access
        .check_address(client)
        .map_err(refused(Refusal::Address))?;
    // Boxed: a password check's state would otherwise sit in every request's future.
    Box::pin(app.access.check_credentials(req.headers()))
        .await
        .map_err(refused(Refusal::Credentials))?;
    if matches!(route, Route::Metrics | Route::Status | Route::Ui) {
        return Ok(());
    }
    let Some(limit) = &app.client_limit else {
        return Ok(());
    };
    limit.check(client).map_err(|wait| {
        let mut e = ApiError::new(
            http::StatusCode::TOO_MANY_REQUESTS,
            crate::handlers::error::Code::Toomanyrequests,
            "too many requests from this address; slow down",
        );
        e.retry_after = Some(wait.max(std::time::Duration::from_secs(1)));
        app.metrics.client_refused(Refusal::RateLimit);
        e
    })
}

/// What a request knows of its connection.
struct ConnInfo {
    peer: SocketAddr,
    role: Role,
    /// How file bodies go out on this connection (see `sendfile`).
    files: Option<Sendfile>,
    /// Held until the response body is dropped, for the connection's watchdog.
    in_flight: InFlight,
}

/// One request: route, dispatch (panics become 500s), then metrics and a log line when the
/// response body ends, with the bytes actually sent.
async fn handle(app: Arc<App>, mut req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let ConnInfo {
        peer,
        role,
        files,
        in_flight,
    } = conn;
    let started = Instant::now();
    let route = match (role, routes::parse(req.method(), req.uri().path())) {
        (Role::Metrics, r @ (Route::Metrics | Route::Healthz)) => r,
        (Role::Metrics, _) => Route::NotFound,
        // /metrics lives on its own listener when one is configured.
        (Role::Main, Route::Metrics) if app.metrics_elsewhere => Route::NotFound,
        (Role::Main, r) => r,
    };
    // Only blob bodies use it; other requests are spared the allocations of an extension.
    if let (Route::Blob { .. }, Some(files)) = (&route, files) {
        req.extensions_mut().insert(files);
    }
    let method = req.method().clone();
    let head = method == http::Method::HEAD;
    let client = app.trusted_proxies.client(peer.ip(), req.headers());
    let request_id = request_id::for_request(req.headers());
    let user_agent: String = req
        .headers()
        .get(http::header::USER_AGENT)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(256)
                .collect()
        })
        .unwrap_or_default();
    let reference = match &route {
        Route::Manifest { reference, .. } => reference.to_string(),
        Route::Blob { digest, .. } | Route::Referrers { digest, .. } => digest.to_string(),
        _ => String::new(),
    };
    // The log names the registry a request went to and the repository as that registry
    // knows it (`/v2/ghcr/org/app` is ghcr.io's `org/app`); with no registry resolved, `-`
    // and the name as asked for.
    let target = route.repository().and_then(|name| {
        let ns = crate::handlers::namespace(req.uri().query());
        app.mirror.resolve(ns.as_deref(), name).ok()
    });
    let registry = target.as_ref().map(|t| t.registry().to_owned());
    let repository = target
        .map(|t| t.repo().clone())
        .or_else(|| route.repository().cloned());
    let mut waited = Duration::ZERO;
    let dispatched = match admit(&app, &route, role, &req, client).await {
        Err(e) => Ok(Err(e)),
        Ok(()) => {
            let asked = Instant::now();
            let answer = std::panic::AssertUnwindSafe(routes::dispatch(&app.mirror, &route, &req))
                .catch_unwind()
                .await;
            // What the pull layer took to answer is time spent on the upstream, unless the
            // answer came from the cache alone.
            if route.repository().is_some() {
                waited = asked.elapsed();
            }
            answer
        }
    };
    let mut resp = match dispatched {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => e.into_response(head),
        Err(_) => {
            tracing::error!(%method, path = req.uri().path(), "handler panicked");
            ApiError::internal().into_response(head)
        }
    };
    let status = resp.status().as_u16();
    let cache_status = resp.extensions().get::<CacheStatus>().copied();
    if cache_status == Some(CacheStatus::Hit) {
        waited = Duration::ZERO;
    }
    let cache = cache_status.map_or("-", |s| s.as_str());
    if let Ok(mut v) = http::HeaderValue::from_str(&request_id) {
        // Never indexed by HTTP/2's HPACK: a value unique to each response would only push the
        // connection's repeated headers (digest, ETag, type) out of its compression table.
        v.set_sensitive(true);
        resp.headers_mut().insert(request_id::HEADER, v);
    }
    // hyper stops polling a body once Content-Length bytes are out, so "complete" is judged
    // against the declared length rather than by seeing the end of the stream.
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let metrics = app.metrics.clone();
    let mirror = app.mirror.clone();
    resp.map(move |b| {
        body::observe(b, move |bytes, ended| {
            let complete = ended || head || declared.is_some_and(|len| bytes >= len);
            let elapsed = started.elapsed();
            let kind = route.kind();
            metrics.request(kind, method.as_str(), status, cache_status, elapsed);
            logging::access(&AccessLine {
                peer,
                client,
                request_id: &request_id,
                method: method.as_str(),
                registry: registry.as_deref().unwrap_or("-"),
                repository: repository.as_ref().map_or("-", RepoName::as_str),
                reference: if reference.is_empty() {
                    "-"
                } else {
                    &reference
                },
                kind,
                status,
                bytes,
                complete,
                cache,
                elapsed,
                upstream: waited,
                user_agent: &user_agent,
            });
            if let Some(repo) = &repository {
                mirror.record_request(repo.as_str(), bytes);
            }
            drop(in_flight);
        })
    })
}
