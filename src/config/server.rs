//! `[server]`: the listener, its timeouts and TLS, and who may use it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DOCKER_HUB;
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Default `0.0.0.0:5000`.
    pub listen: SocketAddr,
    /// Registry served to requests with neither `?ns=` nor a registry prefix or alias in the
    /// path (dockerd's `registry-mirrors`). Default `docker.io`.
    pub default_registry: String,
    /// Connections with no request in flight for this long are closed: idle ones, those with
    /// a half-sent request header, HTTP/2 connections that have not completed their preface or
    /// a request. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// An HTTP/1.1 response (plain or HTTPS) whose client reads nothing of it for this long
    /// is dropped with its connection, counted in `pullthrough_write_timeouts_total` and
    /// logged at debug. A slow client that keeps reading is
    /// never dropped, and waiting for the upstream does not count. HTTP/2 has its keep-alive
    /// ping and the response buffer budget instead. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// On SIGTERM/SIGINT, in-flight responses get this long to finish. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Requests per client address allowed in `client_window`; more get
    /// `429 TOOMANYREQUESTS` with `Retry-After`. 0 (default) = off.
    pub client_requests: u32,
    /// The window of `client_requests`. Default 1 minute.
    #[serde(with = "humantime_serde")]
    pub client_window: Duration,
    /// Open connections allowed from one client address, HTTP/1.1 and HTTP/2 alike; more are
    /// closed as they are accepted. 0 = unlimited. Default 256: far more than legitimate
    /// clients use (dockerd opens a few per pull, containerd multiplexes over one HTTP/2
    /// connection, a NAT'd build farm of dozens of hosts stays below it), yet one address
    /// cannot take every file descriptor or pin unbounded connection memory.
    pub max_connections_per_client: u32,
    /// Response memory the whole process may hold toward HTTP/2 clients: body chunks produced
    /// but not yet written to the socket, across every connection (each stream holds at most
    /// about 48 KiB of it), plus 4 KiB per open stream for its own state. When it is spent, new
    /// HTTP/2 streams are reset with `REFUSED_STREAM` (which clients retry) and the bodies
    /// already streaming wait for room; if it stays spent for a second, the stalled connection
    /// (one whose client has read nothing for a second) holding the most of it is closed, one
    /// a second; a client that reads, however slowly, only waits. Default `64MiB`: over 1,000
    /// streams' worth, far more than clients that read keep buffered, yet connections that
    /// never read cannot take the memory of the machine.
    #[serde(with = "crate::size::required")]
    pub response_buffer_budget: bytesize::ByteSize,
    /// PEM certificate chain; with `tls_key`, the listener speaks HTTPS (HTTP/2 by ALPN).
    /// SIGHUP reloads both files. Default: plain HTTP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`. Default: none.
    pub tls_key: Option<PathBuf>,
    /// Client addresses allowed, as CIDRs (`["10.0.0.0/8", "::1/128"]`); others get
    /// `403 DENIED`.
    /// Default: empty, everyone.
    pub allow: Vec<ipnet::IpNet>,
    /// Load balancers and ingresses, as CIDRs (`["10.0.0.0/8"]`). From a peer in this list,
    /// the right-most address in `X-Forwarded-For` that is not in it (or `Forwarded: for=`,
    /// without `X-Forwarded-For`) is the client: for the access log, `allow` and
    /// `client_requests`. From any other peer those headers are ignored. The proxy must set
    /// or append to `X-Forwarded-For` (nginx, HAProxy, Traefik and ingress-nginx do);
    /// `max_connections_per_client` still counts the proxy's connections. Default: empty.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// An htpasswd file with bcrypt entries (`htpasswd -B`); clients must send Basic auth.
    /// Default: none.
    pub htpasswd: Option<PathBuf>,
    /// Static tokens accepted as the Basic auth password (any user name) or as a Bearer token.
    /// Default: none.
    pub tokens: Vec<Secret>,
    /// Realm in the `WWW-Authenticate: Basic` challenge. Default `pullthrough`.
    pub auth_realm: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            default_registry: DOCKER_HUB.to_owned(),
            header_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            client_requests: 0,
            client_window: Duration::from_secs(60),
            max_connections_per_client: 256,
            response_buffer_budget: bytesize::ByteSize::mib(64),
            tls_cert: None,
            tls_key: None,
            allow: Vec::new(),
            trusted_proxies: Vec::new(),
            htpasswd: None,
            tokens: Vec::new(),
            auth_realm: "pullthrough".to_owned(),
        }
    }
}
