//! One connection: hyper's HTTP/1.1 and HTTP/2 settings and limits, the TLS handshake, and the
//! watchdog that closes a connection with no request in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::activity::Activity;
use super::batched_writes;
use super::connlimit::ConnGuard;
use super::request::{handle, ConnInfo};
use super::tls::Tls;
use super::{App, Role};
use crate::sendfile::{self, Sendfile};

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

/// hyper's connection builders: one that tells HTTP/1.1 from HTTP/2 by the first bytes (plain
/// TCP, where a client may speak HTTP/2 with prior knowledge), and one for each protocol when
/// TLS's ALPN named it already, which spares hyper its own look (a small read and a copy).
pub(super) struct Builders {
    pub(super) auto: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl Builders {
    pub(super) fn new() -> Builders {
        Builders {
            auto: http_builder(),
            http1: http_builder().http1_only(),
            http2: http_builder().http2_only(),
        }
    }
}

/// hyper's settings for every connection, HTTP/1.1 and HTTP/2 alike.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // `server.header_read_timeout` is the watchdog's (`serve_io`): a connection with no
        // request in flight for that long is closed, half a head or not. hyper's own would
        // only repeat it, at the cost of a timer reset on every request.
        .header_read_timeout(None)
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
    builder
}

/// Serves a connection accepted on the main listener, in a task of its own: plain TCP with
/// zero-copy file bodies, or TLS once the handshake is done (within `header_read_timeout`;
/// HTTP/2 when ALPN picked it). `place`, the connection's count against its address's cap, is
/// held until the connection ends.
pub(super) fn spawn_main(
    stream: TcpStream,
    peer: SocketAddr,
    place: ConnGuard,
    tls: Option<&Arc<Tls>>,
    builders: Arc<Builders>,
    app: Arc<App>,
    stop: watch::Receiver<bool>,
) {
    let header_timeout = app.idle_timeout;
    match tls {
        None => {
            let (conn, sendfile) = sendfile::Connection::new(stream);
            // The connection's state machine is boxed where it is made: spawned inline, its
            // kilobytes were copied at each move into the task.
            tokio::spawn(async move {
                let builder = &builders.auto;
                let serve = serve_io(
                    builder,
                    conn,
                    app,
                    peer,
                    Role::Main,
                    Some(stop),
                    Some(sendfile),
                );
                Box::pin(serve).await;
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
                // ALPN named the protocol: each goes to its own builder.
                match accepted {
                    Ok(Ok(tls_stream)) if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") => {
                        let io = batched_writes::BatchedWrites::new(tls_stream);
                        let builder = &builders.http2;
                        Box::pin(serve_io(builder, io, app, peer, Role::Main, stop, None)).await
                    }
                    Ok(Ok(tls_stream)) => {
                        let files = Some(Sendfile::copy_only(TLS_FILE_CHUNK));
                        let builder = &builders.http1;
                        let serve =
                            serve_io(builder, tls_stream, app, peer, Role::Main, stop, files);
                        Box::pin(serve).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                drop(place);
            });
        }
    }
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
pub(super) async fn serve_io<I>(
    builder: &auto::Builder<TokioExecutor>,
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
    let write_timeout = app.write_timeout;
    let metrics = app.metrics.clone();
    let activity = Arc::new(Activity::new());
    // Listed for as long as the connection is served, so that the budget can close it.
    let _registration = app.response_budget.register(&activity);
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = activity.begin();
            let app = app.clone();
            let (files, budget, writes) = if req.version() <= http::Version::HTTP_11 {
                (sendfile.clone(), None, Some(activity.clone()))
            } else {
                // HTTP/2 copies body chunks into its frames: placeholders must not reach it,
                // and file chunks stay small (see `H2_FILE_CHUNK`). Allocates nothing. What
                // h2 holds of them counts against the process's budget (see `budget`).
                let budget = (app.response_budget.clone(), activity.clone());
                (Some(Sendfile::copy_only(H2_FILE_CHUNK)), Some(budget), None)
            };
            let conn = ConnInfo {
                peer,
                role,
                files,
                in_flight,
                budget,
                writes,
            };
            // Boxed: hyper spawns one task per HTTP/2 stream holding this future, and moving
            // the whole request state machine into it costs several kilobytes of copying.
            Box::pin(handle(app, req, conn))
        })
    };
    // Borrowing the builder for as long as the connection is served (no copy of it).
    let conn = builder.serve_connection(TokioIo::new(io), service);
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
                () = activity_ref.stalled_writing(write_timeout) => Alarm::Stalled,
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
                if activity.is_shed() {
                    return Poll::Ready(Ok(Alarm::Shed));
                }
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
            Ok(Alarm::Stalled) => {
                // Its client reads nothing of what it asked for; a GOAWAY would not be read
                // either. Dropped, with its socket buffers and open file.
                tracing::debug!(%peer, timeout = ?write_timeout, "connection dropped: its client read nothing of the response for server.write_timeout");
                metrics.write_timeout();
                return;
            }
            Ok(Alarm::Shed) => {
                // A client that does not read takes no GOAWAY either: dropped, with what h2
                // buffered for it.
                tracing::debug!(%peer, "connection dropped: it held the most of the response buffer budget");
                return;
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
    /// The response buffer budget stayed spent and this connection holds the most of it.
    Shed,
    /// A response's client read nothing of it for `server.write_timeout`.
    Stalled,
}

/// Resolves once the server shuts down; never without a `stop` channel.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        // An error means the server is gone: as good as stopped.
        Some(rx) => drop(rx.wait_for(|stopped| *stopped).await),
        None => std::future::pending().await,
    }
}
