//! The HTTP server: accepts connections (HTTP/1.1, and h2c by prior knowledge; TLS with ALPN)
//! up to a cap per client address, closes those with no request in flight for
//! `header_read_timeout`, drains on shutdown, admits each request (access control, client
//! limits), and wraps it in timing, panic isolation, metrics and one log line. What a request
//! is answered with is the business of `routes` and below.
//!
//! `run.rs` builds and runs the server (listeners, background tasks, the accept loop, the
//! drain at shutdown); `connection.rs` serves one connection (hyper's settings and limits, the
//! TLS handshake, the idle watchdog); `request.rs` one request (admission, dispatch, metrics,
//! the access line); `background.rs` holds the periodic tasks.

mod activity;
pub mod admission;
mod background;
mod batched_writes;
mod budget;
pub mod client_addr;
mod connection;
mod connlimit;
mod request;
mod request_id;
mod run;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::mirror::Mirror;
use admission::{Access, ClientLimit};
use client_addr::TrustedProxies;

pub use run::{serve, Server};

/// Which requests a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The registry API (and /metrics unless `metrics.listen` moves it).
    Main,
    /// `metrics.listen`: /metrics and /healthz only.
    Metrics,
}

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
    /// `server.write_timeout`: how long an HTTP/1.x response may wait for its client to read.
    write_timeout: Duration,
    /// `server.response_buffer_budget`: response data buffered toward HTTP/2 clients.
    response_budget: Arc<budget::ResponseBudget>,
}
