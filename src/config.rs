//! Configuration: typed structs with documented defaults, loaded from the TOML file, then the
//! environment, then the command line, then checked by [`Config::validate`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::{ImageRef, Platform};
use crate::oci::RepoName;
use crate::policy::{RepoGlobs, TagPatterns};

pub use crate::image::DOCKER_HUB;
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value {value:?} for {key}: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
}

/// A string that never prints: Debug and Display show `[REDACTED]`, and a value of the wrong
/// type is refused without being quoted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
        }
        d.deserialize_str(Visitor).map_err(|_: D::Error| {
            <D::Error as serde::de::Error>::custom("a secret must be a string (value not shown)")
        })
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Serialized as `[REDACTED]` too, so that a printed config (`pullthrough config check`)
/// shows that a secret is set without showing it.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[REDACTED]")
    }
}

/// Parses a size as written in the config and on the command line (`500MiB`, `20GiB`, `2TiB`,
/// `1.5GB`, or a plain number of bytes), with an error that shows the accepted forms.
pub fn parse_size(s: &str) -> Result<bytesize::ByteSize, String> {
    let trimmed = s.trim();
    // bytesize takes "-5GiB" apart as a unit error deep inside; refuse signs here.
    let parsed = if trimmed.starts_with(['-', '+']) {
        None
    } else {
        trimmed.parse::<bytesize::ByteSize>().ok()
    };
    parsed.ok_or_else(|| size_error(s))
}

fn size_error(s: &str) -> String {
    format!("invalid size {s:?}: expected a number with an optional unit, e.g. 500MiB, 20GiB, 2TiB")
}

/// Writes a size in the largest binary unit that divides it exactly (`50GiB`), so that it
/// reads back as the same number of bytes.
pub fn format_size(size: bytesize::ByteSize) -> String {
    let bytes = size.as_u64();
    for (unit, factor) in [
        ("PiB", 1u64 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes != 0 && bytes % factor == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

/// Serde for `Option<ByteSize>` fields: a string through [`parse_size`] or a number of bytes.
mod size {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    struct SizeVisitor;

    impl<'de> Visitor<'de> for SizeVisitor {
        type Value = Option<bytesize::ByteSize>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"500MiB\", \"20GiB\" or \"2TiB\", or a number of bytes")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            super::parse_size(s).map(Some).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(bytesize::ByteSize(n)))
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
            u64::try_from(n)
                .map(|n| Some(bytesize::ByteSize(n)))
                .map_err(|_| E::custom(super::size_error(&n.to_string())))
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(SizeVisitor)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<bytesize::ByteSize>, D::Error> {
        d.deserialize_option(SizeVisitor)
    }

    pub fn serialize<S: Serializer>(
        size: &Option<bytesize::ByteSize>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match size {
            Some(size) => s.serialize_str(&super::format_size(*size)),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The listener: address, TLS, client access control and limits.
    pub server: ServerConfig,
    /// The cache on local disk, its size bound, and the tier replicas share.
    pub storage: StorageConfig,
    /// How long cached tags are trusted.
    pub cache: CacheConfig,
    /// The log format (`PULLTHROUGH_LOG=debug` sets the level).
    pub log: LogConfig,
    /// Where `/metrics` is served.
    pub metrics: MetricsConfig,
    /// Images the running mirror keeps warm on a schedule. Default: none.
    pub warm: WarmConfig,
    /// Replicas sharing one cache (with `[storage.shared]`). Default: none, a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Upstream registries keyed by the registry name clients use (`docker.io`, `ghcr.io`).
    /// Default: `docker.io` → `https://registry-1.docker.io`, anonymous.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
            cache: CacheConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            warm: WarmConfig::default(),
            cluster: None,
            upstreams: BTreeMap::from([(
                DOCKER_HUB.to_owned(),
                UpstreamConfig {
                    url: DOCKER_HUB_URL.to_owned(),
                    ..UpstreamConfig::default()
                },
            )]),
        }
    }
}

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
            shutdown_grace: Duration::from_secs(30),
            client_requests: 0,
            client_window: Duration::from_secs(60),
            max_connections_per_client: 256,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Cache directory (blobs, manifests, tags, temp files). Default `./data`.
    pub dir: PathBuf,
    /// Bound on the bytes of cached blobs and manifests, e.g. `"50GiB"`; least recently used
    /// content is evicted beyond it. Default: unbounded.
    #[serde(with = "size", skip_serializing_if = "Option::is_none")]
    pub max_size: Option<bytesize::ByteSize>,
    /// Once `max_size` is crossed, evict down to this, so eviction runs in batches.
    /// Default: `max_size`.
    #[serde(with = "size", skip_serializing_if = "Option::is_none")]
    pub low_watermark: Option<bytesize::ByteSize>,
    /// A tier shared by every replica, in an S3-compatible object store, looked up after the
    /// local disk and before the upstream. Default: none (local disk only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedStorageConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: PathBuf::from("./data"),
            max_size: None,
            low_watermark: None,
            shared: None,
        }
    }
}

/// `[storage.shared]`: the object store all replicas share.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStorageConfig {
    /// The S3 API endpoint (Garage, MinIO, Ceph RGW, AWS S3), e.g. `http://garage:3900`.
    /// Requests are path-style. Required.
    pub endpoint: String,
    /// The bucket, which must exist. Required.
    pub bucket: String,
    /// The store's region (Garage's `s3_region`). Default `us-east-1`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Bound on the bytes in the shared tier; least recently used content, across the
    /// cluster, is deleted beyond it, never an object being read or downloaded. Needs
    /// `[cluster]`, whose Redis keeps the access times. Default: unbounded.
    #[serde(with = "size", default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<bytesize::ByteSize>,
    /// Answer a blob found in the shared tier (and not on local disk) with a `307` to a
    /// presigned URL of the object store, so the bytes flow from it directly. For fleets whose
    /// clients reach the object store. Default false.
    #[serde(default)]
    pub redirect: bool,
    /// How long a presigned redirect URL stays valid. Default 10 minutes.
    #[serde(with = "humantime_serde", default = "default_redirect_ttl")]
    pub redirect_ttl: Duration,
    /// The object store's access key ID, from env `PULLTHROUGH_S3_ACCESS_KEY_ID` only (not
    /// a key of the file). Required with `[storage.shared]`.
    #[serde(skip)]
    pub access_key_id: Option<Secret>,
    /// The object store's secret key, from env `PULLTHROUGH_S3_SECRET_ACCESS_KEY` only (not
    /// a key of the file). Required with `[storage.shared]`.
    #[serde(skip)]
    pub secret_access_key: Option<Secret>,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_redirect_ttl() -> Duration {
    Duration::from_secs(600)
}

/// `[cluster]`: replicas that coordinate through Redis, so that the fleet fetches each blob
/// once, revalidates each tag once per TTL and spends one pull budget.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The Redis URL (`redis://` or `rediss://`, e.g. `redis://redis:6379/0`; a password in
    /// it is never printed) that replicas coordinate through: download leases, tag records,
    /// the negative cache, back-offs, the pull budget, members. Required.
    pub redis: Secret,
    /// The URL the other replicas reach this one at, e.g. `http://10.0.0.5:5000`. Required;
    /// env `PULLTHROUGH_CLUSTER_ADVERTISE` replaces it, so replicas can share one file.
    pub advertise: String,
    /// How long a replica's claim on a download (its lease) outlives the replica: the time a
    /// takeover waits after a crash. Renewed every third of it. Default 5 s.
    #[serde(with = "humantime_serde", default = "default_lease_ttl")]
    pub lease_ttl: Duration,
    /// The cluster secret, from env `PULLTHROUGH_CLUSTER_SECRET` only (not a key of the
    /// file), the same on every replica and at least 16 characters: it authenticates
    /// replica-to-replica requests (`/_pullthrough/peer/blobs/…`). Required.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// A cached tag is served without asking the upstream for this long after it was last
    /// fetched or revalidated. Default 5 minutes.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// A tag the upstream answered 404 for is answered 404 without asking again for this
    /// long, so a typo in a CI matrix does not become a stream of counted pulls. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// How long a request for a cached tag past its TTL waits for the revalidation before the
    /// cached value is served stale; the revalidation goes on in the background. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            stale_after: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default) or `json`: one access-log line per request either way.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address (plain HTTP, no client auth) instead of on the main
    /// listener. Default: on the main listener, behind the same access control.
    pub listen: Option<SocketAddr>,
}

/// `[warm]`: images the running mirror pulls through its cache on a schedule, so that they are
/// hot before clients ask (see `pullthrough warm` for a one-off run).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmConfig {
    /// Images as users write them: `alpine:3.19`, `ghcr.io/org/app:1.0`,
    /// `library/alpine@sha256:…` (the registry must be a key of `[upstreams]`). Default: none,
    /// and no schedule runs.
    pub images: Vec<ImageRef>,
    /// Platforms of multi-platform images to warm (`linux/amd64`, `linux/arm64/v8`).
    /// Default: empty, every platform in the index.
    pub platforms: Vec<Platform>,
    /// Time between two runs; the first starts with the server. Default 24 h (when `at` is
    /// not set). Setting both `interval` and `at` is an error.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Run once a day at this time, UTC (`"05:30"`), instead of every `interval`; the first
    /// run is the next such time after start. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<TimeOfDay>,
}

/// When the `[warm]` list is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmSchedule {
    /// At start, then this long after each run began.
    Every(Duration),
    /// Every day at this time, UTC.
    DailyAt(TimeOfDay),
}

impl WarmConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

    pub fn schedule(&self) -> WarmSchedule {
        match (self.at, self.interval) {
            (Some(at), _) => WarmSchedule::DailyAt(at),
            (None, every) => WarmSchedule::Every(every.unwrap_or(Self::DEFAULT_INTERVAL)),
        }
    }
}

/// A time of day, `HH:MM` (24-hour clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeOfDay {
    minutes: u16,
}

impl TimeOfDay {
    /// Seconds after midnight.
    pub fn seconds(self) -> u64 {
        u64::from(self.minutes) * 60
    }
}

impl TryFrom<String> for TimeOfDay {
    type Error = String;

    fn try_from(s: String) -> Result<TimeOfDay, String> {
        let bad = || format!("invalid time {s:?}: expected HH:MM (UTC, 24-hour), e.g. 05:30");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        let digits = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(h) || !digits(m) {
            return Err(bad());
        }
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(TimeOfDay {
            minutes: h * 60 + m,
        })
    }
}

impl From<TimeOfDay> for String {
    fn from(t: TimeOfDay) -> String {
        format!("{:02}:{:02}", t.minutes / 60, t.minutes % 60)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the registry API (`http://` is allowed). Set this or `urls`, not both.
    /// Default (neither set): Docker Hub.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Several base URLs of one registry's content, tried in order per request when one
    /// refuses (429) or is down (unreachable, timeout, 5xx, backing off); a 404 is an answer
    /// and is not asked elsewhere. Each URL has its own health, tokens and pull budget; the
    /// credentials go to the first URL only. Default: empty (use `url`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// A Docker credential helper: `"ecr-login"` runs `docker-credential-ecr-login get` from
    /// `PATH`; a value containing `/` is the helper program's path. Its answer is used as the
    /// username and password (or identity token). Not with `username`/`password`. Default:
    /// none.
    pub credential_helper: Option<String>,
    /// How long a credential helper's answer is used before the helper is run again.
    /// Default 15 minutes.
    #[serde(with = "humantime_serde")]
    pub credential_lifetime: Duration,
    /// Upstream requests in flight at once, a blob body being streamed included: for
    /// registries that throttle connections. 0 (default) = unlimited.
    pub max_concurrent_requests: u32,
    /// Upstream requests sent per second; more wait their turn (they never fail for it).
    /// 0 (default) = unlimited.
    pub max_requests_per_second: u32,
    /// Username for token (or Basic) auth. Default: none, anonymous. Env
    /// `PULLTHROUGH_UPSTREAM_USERNAME` for the default upstream.
    pub username: Option<String>,
    /// Password or access token (for Docker Hub, a read-only access token rather than the
    /// account password). Default: none. Env `PULLTHROUGH_UPSTREAM_PASSWORD` for the default
    /// upstream.
    pub password: Option<Secret>,
    /// TCP + TLS connect timeout. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending a request to the response headers. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// The same for a `HEAD` (tag revalidation, blob size), which has no body to wait for and
    /// holds up a request that could be answered from the cache; `first_byte_timeout` if
    /// that is shorter. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub head_timeout: Duration,
    /// Longest pause between two body chunks before the transfer counts as cut. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How many times a cut blob download is resumed with a Range request. Default 5.
    pub resume_attempts: u32,
    /// Consecutive failures (unreachable, timeout, 5xx) after which the upstream is marked
    /// down and requests fail fast (stale where cached) for `backoff`. Default 3.
    pub failure_threshold: u32,
    /// First back-off after `failure_threshold` failures; doubles while probes fail (up to
    /// 16 times). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// The mirror's own cap on manifest GETs (counted pulls) per `max_pulls_window`.
    /// 0 (default) = no cap.
    pub max_pulls: u32,
    /// The window of `max_pulls`. Default 6 hours, Docker Hub's window.
    #[serde(with = "humantime_serde")]
    pub max_pulls_window: Duration,
    /// Warn when the remaining pull budget falls to this share of the limit. Default 0.2.
    pub budget_warn_ratio: f64,
    /// At or below this many remaining pulls, cached tags are served stale rather than
    /// spending a GET, unless a HEAD shows the tag changed, and `pullthrough warm` stops.
    /// Default 10.
    pub budget_reserve: u64,
    /// Other names for this registry as the first segment of a repository path, besides its
    /// own name: `aliases = ["ghcr"]` makes `/v2/ghcr/org/app/…` mean `/v2/ghcr.io/org/app/…`.
    /// Single path segments, unique across upstreams, not `library`. Default: none.
    pub aliases: Vec<String>,

    // Policy: which repositories are mirrored from this upstream, and how long its tags are
    // trusted.
    /// How long a cached tag (or referrers list) of this upstream is answered without asking
    /// it. Default: `cache.tag_ttl`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub tag_ttl: Option<Duration>,
    /// Regexes, anchored as written (`["^v?[0-9]+\\.[0-9]+\\.[0-9]+$"]`): a cached tag that
    /// matches one is never revalidated. Default: none.
    pub immutable_tags: TagPatterns,
    /// Globs over repository names as this upstream knows them (`["library/*", "myorg/*"]`;
    /// `*` crosses `/`): only these are mirrored, others are refused `403 DENIED`.
    /// Default: every repository.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_repositories: Option<RepoGlobs>,
    /// Globs of repositories refused `403 DENIED`, whatever `allow_repositories` says. A
    /// refused repository is refused for manifests, blobs, tags and referrers, without an
    /// upstream request and without serving what the cache holds; counted in
    /// `pullthrough_policy_refusals_total`. Default: none.
    pub deny_repositories: RepoGlobs,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            urls: Vec::new(),
            credential_helper: None,
            credential_lifetime: Duration::from_secs(15 * 60),
            max_concurrent_requests: 0,
            max_requests_per_second: 0,
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            head_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            resume_attempts: 5,
            failure_threshold: 3,
            backoff: Duration::from_secs(10),
            max_pulls: 0,
            max_pulls_window: Duration::from_secs(6 * 3600),
            budget_warn_ratio: 0.2,
            budget_reserve: 10,
            aliases: Vec::new(),
            tag_ttl: None,
            immutable_tags: TagPatterns::default(),
            allow_repositories: None,
            deny_repositories: RepoGlobs::default(),
        }
    }
}

impl UpstreamConfig {
    /// The base URLs in the order they are tried: `urls`, or `url`, or Docker Hub.
    pub fn base_urls(&self) -> Vec<&str> {
        if !self.urls.is_empty() {
            self.urls.iter().map(String::as_str).collect()
        } else if !self.url.is_empty() {
            vec![self.url.as_str()]
        } else {
            vec![DOCKER_HUB_URL]
        }
    }

    fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let bad = |field: &str, value: &str, reason: &str| ConfigError::Value {
            key: key(field),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if !self.url.is_empty() && !self.urls.is_empty() {
            return Err(bad("urls", "", "set url or urls, not both"));
        }
        let field = if self.urls.is_empty() { "url" } else { "urls" };
        for (i, u) in self.base_urls().into_iter().enumerate() {
            if self.base_urls()[..i].contains(&u) {
                return Err(bad(field, u, "listed twice"));
            }
            let url = url::Url::parse(u).map_err(|e| bad(field, u, &e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(bad(field, u, "must be an http:// or https:// URL"));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(bad(
                    field,
                    "[REDACTED]",
                    "put credentials in username/password, not in the URL",
                ));
            }
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(bad("username", "", "a password needs a username"));
        }
        if let Some(helper) = &self.credential_helper {
            if self.username.is_some() || self.password.is_some() {
                return Err(bad(
                    "credential_helper",
                    helper,
                    "set credential_helper or username/password, not both",
                ));
            }
            // A bare name becomes part of a program name looked up on PATH.
            let name_ok = helper.contains('/')
                || (!helper.is_empty()
                    && helper
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
            if !name_ok {
                return Err(bad(
                    "credential_helper",
                    helper,
                    "must be a helper name such as ecr-login, or a path containing /",
                ));
            }
        }
        Ok(())
    }
}

/// Overrides from the command line; `None` leaves the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub storage_dir: Option<PathBuf>,
    pub max_size: Option<bytesize::ByteSize>,
    pub upstream: Option<String>,
    pub tag_ttl: Option<Duration>,
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Reads `path` (or the defaults when `None`), then applies the environment and the CLI
    /// overrides, then validates.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        cli: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env);
        config.apply_overrides(cli);
        config.validate()?;
        Ok(config)
    }

    /// Parses a config file. The error names the line and column and says what is wrong,
    /// but never quotes the file: the offending line may hold a password.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end();
            match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                    let column = before.len() - line_start + 1;
                    // The key is safe to show; what follows `=` may be a secret.
                    let key = text[line_start..]
                        .lines()
                        .next()
                        .and_then(|l| l.split_once('='))
                        .map(|(k, _)| k.trim())
                        .filter(|k| !k.is_empty());
                    match key {
                        Some(key) => format!("line {line}, column {column}, key {key}: {message}"),
                        None => format!("line {line}, column {column}: {message}"),
                    }
                }
                None => message.to_owned(),
            }
        })?;
        // Spelled out, so that a printed config shows where an upstream without either goes.
        for up in config.upstreams.values_mut() {
            if up.url.is_empty() && up.urls.is_empty() {
                up.url = DOCKER_HUB_URL.to_owned();
            }
        }
        Ok(config)
    }

    fn default_upstream_mut(&mut self) -> &mut UpstreamConfig {
        self.upstreams
            .entry(self.server.default_registry.clone())
            .or_default()
    }

    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        // An empty variable means "not set", so `VAR=` in a compose file stays anonymous.
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        if let Some(user) = env("PULLTHROUGH_UPSTREAM_USERNAME") {
            self.default_upstream_mut().username = Some(user);
        }
        if let Some(pass) = env("PULLTHROUGH_UPSTREAM_PASSWORD") {
            self.default_upstream_mut().password = Some(Secret(pass));
        }
        if let Some(shared) = &mut self.storage.shared {
            shared.access_key_id = env("PULLTHROUGH_S3_ACCESS_KEY_ID").map(Secret);
            shared.secret_access_key = env("PULLTHROUGH_S3_SECRET_ACCESS_KEY").map(Secret);
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.secret = env("PULLTHROUGH_CLUSTER_SECRET").map(Secret);
            if let Some(advertise) = env("PULLTHROUGH_CLUSTER_ADVERTISE") {
                cluster.advertise = advertise;
            }
        }
    }

    pub fn apply_overrides(&mut self, cli: &Overrides) {
        if let Some(listen) = cli.listen {
            self.server.listen = listen;
        }
        if let Some(dir) = &cli.storage_dir {
            self.storage.dir = dir.clone();
        }
        if let Some(max) = cli.max_size {
            self.storage.max_size = Some(max);
        }
        if let Some(url) = &cli.upstream {
            let up = self.default_upstream_mut();
            up.url = url.clone();
            up.urls.clear();
        }
        if let Some(ttl) = cli.tag_ttl {
            self.cache.tag_ttl = ttl;
        }
        if let Some(format) = cli.log_format {
            self.log.format = format;
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, value: &str, reason: &str| ConfigError::Value {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if !self.upstreams.contains_key(&self.server.default_registry) {
            return Err(bad(
                "server.default_registry",
                &self.server.default_registry,
                "no [upstreams] entry with this name",
            ));
        }
        for (name, up) in &self.upstreams {
            let key = |field: &str| format!("upstreams.\"{name}\".{field}");
            // The name becomes a directory under tags/: a host name with an optional port.
            let name_ok = !name.is_empty()
                && name.len() <= 255
                && !name.starts_with('.')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
            if !name_ok {
                return Err(bad(
                    "upstreams",
                    name,
                    "must be a registry host name, e.g. docker.io",
                ));
            }
            if !(0.0..=1.0).contains(&up.budget_warn_ratio) {
                return Err(bad(
                    &key("budget_warn_ratio"),
                    &up.budget_warn_ratio.to_string(),
                    "must be between 0 and 1",
                ));
            }
            up.validate(&key)?;
            for (field, d) in [
                ("backoff", up.backoff),
                ("max_pulls_window", up.max_pulls_window),
                ("connect_timeout", up.connect_timeout),
                ("first_byte_timeout", up.first_byte_timeout),
                ("head_timeout", up.head_timeout),
                ("idle_timeout", up.idle_timeout),
                ("credential_lifetime", up.credential_lifetime),
            ] {
                if d.is_zero() {
                    return Err(bad(&key(field), "0s", "must be greater than zero"));
                }
            }
        }
        self.validate_routing()?;
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err(bad(
                "server.tls_cert",
                "",
                "tls_cert and tls_key must be set together",
            ));
        }
        if self.server.client_window.is_zero() {
            return Err(bad(
                "server.client_window",
                "0s",
                "must be greater than zero",
            ));
        }
        match (self.storage.max_size, self.storage.low_watermark) {
            (Some(max), _) if max.as_u64() == 0 => {
                return Err(bad("storage.max_size", "0", "must be greater than zero"));
            }
            (Some(max), Some(low)) if low > max => {
                return Err(bad(
                    "storage.low_watermark",
                    &format_size(low),
                    "must not exceed storage.max_size",
                ));
            }
            (None, Some(low)) => {
                return Err(bad(
                    "storage.low_watermark",
                    &format_size(low),
                    "needs storage.max_size",
                ));
            }
            _ => {}
        }
        if self.storage.dir.as_os_str().is_empty() {
            return Err(bad("storage.dir", "", "must not be empty"));
        }
        match (self.warm.interval, self.warm.at) {
            (Some(d), _) if d.is_zero() => {
                return Err(bad("warm.interval", "0s", "must be greater than zero"));
            }
            (Some(_), Some(at)) => {
                return Err(bad(
                    "warm.at",
                    &String::from(at),
                    "set warm.interval or warm.at, not both",
                ));
            }
            _ => {}
        }
        self.validate_cluster()?;
        for image in &self.warm.images {
            if !self.upstreams.contains_key(image.registry()) {
                return Err(bad(
                    "warm.images",
                    &image.to_string(),
                    "its registry is not a key of [upstreams]",
                ));
            }
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, value: &str, reason: &str| ConfigError::Value {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let http_url = |key: &str, value: &str| {
            let ok = url::Url::parse(value)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if ok {
                Ok(())
            } else {
                Err(bad(key, value, "must be an http:// or https:// URL"))
            }
        };
        if let Some(shared) = &self.storage.shared {
            http_url("storage.shared.endpoint", &shared.endpoint)?;
            if shared.bucket.is_empty() {
                return Err(bad("storage.shared.bucket", "", "must not be empty"));
            }
            if shared.max_size.is_some_and(|m| m.as_u64() == 0) {
                return Err(bad(
                    "storage.shared.max_size",
                    "0",
                    "must be greater than zero",
                ));
            }
            if shared.max_size.is_some() && self.cluster.is_none() {
                return Err(bad(
                    "storage.shared.max_size",
                    &shared.max_size.map(|m| m.to_string()).unwrap_or_default(),
                    "needs [cluster]: the shared tier's access times are kept in its Redis",
                ));
            }
            if shared.redirect_ttl.is_zero() {
                return Err(bad(
                    "storage.shared.redirect_ttl",
                    "0s",
                    "must be greater than zero",
                ));
            }
            if shared.access_key_id.is_none() || shared.secret_access_key.is_none() {
                return Err(bad(
                    "storage.shared",
                    "",
                    "needs PULLTHROUGH_S3_ACCESS_KEY_ID and PULLTHROUGH_S3_SECRET_ACCESS_KEY",
                ));
            }
        }
        if let Some(cluster) = &self.cluster {
            let redis = url::Url::parse(cluster.redis.expose())
                .is_ok_and(|u| matches!(u.scheme(), "redis" | "rediss"));
            if !redis {
                return Err(bad(
                    "cluster.redis",
                    "[REDACTED]",
                    "must be a redis:// or rediss:// URL",
                ));
            }
            http_url("cluster.advertise", &cluster.advertise)?;
            if cluster.lease_ttl < Duration::from_secs(1) {
                return Err(bad(
                    "cluster.lease_ttl",
                    &humantime::format_duration(cluster.lease_ttl).to_string(),
                    "must be at least 1s",
                ));
            }
            if cluster
                .secret
                .as_ref()
                .is_none_or(|s| s.expose().len() < 16)
            {
                return Err(bad(
                    "cluster",
                    "",
                    "needs PULLTHROUGH_CLUSTER_SECRET, at least 16 characters",
                ));
            }
        }
        Ok(())
    }

    /// Every registry name and alias picks one upstream: a path's first segment is looked up
    /// among them, as is containerd's `ns`.
    fn validate_routing(&self) -> Result<(), ConfigError> {
        let bad = |key: String, value: &str, reason: String| ConfigError::Value {
            key,
            value: value.to_owned(),
            reason,
        };
        // Path segments are lowercase: `GHCR.io` and `ghcr.io` would be one registry.
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        for name in self.upstreams.keys() {
            if let Some(other) = owners.insert(name.to_ascii_lowercase(), name) {
                return Err(bad(
                    "upstreams".to_owned(),
                    name,
                    format!("the same registry as upstreams.\"{other}\""),
                ));
            }
        }
        for (name, up) in &self.upstreams {
            let key = format!("upstreams.\"{name}\".aliases");
            for alias in &up.aliases {
                if alias.contains('/') || alias.parse::<RepoName>().is_err() {
                    return Err(bad(
                        key,
                        alias,
                        "must be one path segment: lowercase letters and digits, with `.`, `_` \
                         or `-` between them"
                            .to_owned(),
                    ));
                }
                if alias == "library" {
                    return Err(bad(
                        key,
                        alias,
                        "would hide Docker Hub's official images (/v2/library/...)".to_owned(),
                    ));
                }
                if let Some(owner) = owners.insert(alias.clone(), name) {
                    let reason = format!("already names upstreams.\"{owner}\"");
                    return Err(bad(key, alias, reason));
                }
            }
        }
        Ok(())
    }

    /// The configuration as TOML that [`Config::from_toml`] reads back, secrets as
    /// `[REDACTED]`.
    pub fn to_redacted_toml(&self) -> Result<String, String> {
        toml::to_string_pretty(self).map_err(|e| e.to_string())
    }

    /// The registry whose `library/` namespace applies to single-component names.
    pub fn is_docker_hub(registry: &str) -> bool {
        registry == DOCKER_HUB
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parse_error_never_quotes_the_file() {
        let text = "[upstreams.\"docker.io\"]\nusername = \"me\"\npasword = \"PWsecret-123\"\n";
        let e = Config::from_toml(text).unwrap_err();
        assert!(!e.contains("PWsecret"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("pasword"), "names the unknown field: {e}");
        let e = Config::from_toml("[upstreams.\"docker.io\"]\npassword = 987654321\n").unwrap_err();
        assert!(!e.contains("987654321"), "{e}");
    }

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_mirror_docker_hub() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.upstreams[DOCKER_HUB].base_urls(), [DOCKER_HUB_URL]);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
        let err = Config::from_toml("bogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let err = Config::from_toml("[cache]\ntag_ttl = \"soon\"\n").unwrap_err();
        assert!(err.contains("tag_ttl") && err.contains("soon"), "{err}");
        let mut c = Config::default();
        c.upstreams.get_mut(DOCKER_HUB).unwrap().url = "ftp://x".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("upstreams.\"docker.io\".url") && err.contains("ftp://x"),
            "{err}"
        );
    }

    #[test]
    fn env_then_cli_override_file() {
        let file = "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:1\"\nusername = \"a\"\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, file).unwrap();
        let env = |k: &str| match k {
            "PULLTHROUGH_UPSTREAM_USERNAME" => Some("envuser".to_string()),
            "PULLTHROUGH_UPSTREAM_PASSWORD" => Some("hunter2".to_string()),
            _ => None,
        };
        let cli = Overrides {
            upstream: Some("http://127.0.0.1:2".into()),
            tag_ttl: Some(Duration::from_secs(1)),
            ..Overrides::default()
        };
        let c = Config::load(Some(&path), env, &cli).unwrap();
        let up = &c.upstreams[DOCKER_HUB];
        assert_eq!(up.url, "http://127.0.0.1:2");
        assert_eq!(up.username.as_deref(), Some("envuser"));
        assert_eq!(up.password.as_ref().map(Secret::expose), Some("hunter2"));
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(1));
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2") && debug.contains("[REDACTED]"));
    }

    #[test]
    fn repository_mirror_toml_is_valid() {
        let text = include_str!("../mirror.toml");
        let c = Config::from_toml(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.storage.dir, PathBuf::from("./data"));
        let _ = Config::load(None, no_env, &Overrides::default()).unwrap();
    }

    fn two_upstreams(extra: &str) -> Result<Config, String> {
        let text = format!(
            "[upstreams.\"docker.io\"]\n[upstreams.\"ghcr.io\"]\nurl = \"https://ghcr.io\"\n{extra}"
        );
        let c = Config::from_toml(&text)?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn policy_fields_parse_once_and_print_back() {
        let c = two_upstreams(
            "aliases = [\"ghcr\"]\ntag_ttl = \"1h\"\nimmutable_tags = ['^v?[0-9]+\\.[0-9]+\\.[0-9]+$']\n\
             allow_repositories = [\"myorg/*\"]\ndeny_repositories = [\"myorg/secret\"]\n",
        )
        .unwrap();
        let up = &c.upstreams["ghcr.io"];
        assert_eq!(up.aliases, ["ghcr"]);
        assert_eq!(up.tag_ttl, Some(Duration::from_secs(3600)));
        assert!(up.immutable_tags.matches("v1.2.3"));
        assert!(up.allow_repositories.is_some());
        assert_eq!(c.upstreams[DOCKER_HUB].tag_ttl, None);
        let back = Config::from_toml(&c.to_redacted_toml().unwrap()).unwrap();
        let b = &back.upstreams["ghcr.io"];
        assert_eq!(b.immutable_tags, up.immutable_tags);
        assert_eq!(b.allow_repositories, up.allow_repositories);
        assert_eq!(b.deny_repositories, up.deny_repositories);
        assert_eq!(b.tag_ttl, up.tag_ttl);
        assert_eq!(back.upstreams[DOCKER_HUB].allow_repositories, None);
    }

    #[test]
    fn a_bad_pattern_is_a_config_error_naming_the_field() {
        let e = two_upstreams("immutable_tags = [\"v([\"]\n").unwrap_err();
        assert!(e.contains("immutable_tags") && e.contains("v(["), "{e}");
        let e = two_upstreams("deny_repositories = [\n  \"ok/*\",\n  \"a/[\",\n]\n").unwrap_err();
        assert!(e.contains("deny_repositories") && e.contains("a/["), "{e}");
    }

    #[test]
    fn aliases_are_single_segments_unique_across_upstreams() {
        for (extra, key, why) in [
            ("aliases = [\"gh/cr\"]", "ghcr.io\".aliases", "one path segment"),
            ("aliases = [\"GHCR\"]", "ghcr.io\".aliases", "one path segment"),
            ("aliases = [\"docker.io\"]", "ghcr.io\".aliases", "upstreams.\"docker.io\""),
            ("aliases = [\"ghcr.io\"]", "ghcr.io\".aliases", "upstreams.\"ghcr.io\""),
            ("aliases = [\"library\"]", "ghcr.io\".aliases", "official images"),
            (
                "aliases = [\"gh\"]\n[upstreams.\"quay.io\"]\nurl = \"https://quay.io\"\naliases = [\"gh\"]",
                "quay.io\".aliases",
                "upstreams.\"ghcr.io\"",
            ),
            (
                "[upstreams.\"GHCR.io\"]\nurl = \"https://ghcr.io\"",
                "upstreams",
                "the same registry",
            ),
        ] {
            let e = two_upstreams(extra).unwrap_err();
            assert!(e.contains(key) && e.contains(why), "{extra}: {e}");
        }
        two_upstreams("aliases = [\"ghcr\", \"gh\"]").unwrap();
    }

    #[test]
    fn the_commented_second_upstream_in_mirror_toml_is_valid() {
        let text = include_str!("../mirror.toml");
        let start = text.find("# [upstreams.\"ghcr.io\"]").unwrap();
        let block: String = text[start..]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with("[upstreams.")
                    || l.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    })
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::from_toml(&format!("{text}\n{block}")).unwrap();
        c.validate().unwrap();
        let ghcr = &c.upstreams["ghcr.io"];
        assert_eq!(ghcr.aliases, ["ghcr"]);
        assert!(ghcr.immutable_tags.matches("v1.2.3"));
        assert!(ghcr.allow_repositories.is_some());
    }

    #[test]
    fn bad_size_in_toml_shows_the_accepted_forms() {
        let err = Config::from_toml("[storage]\nmax_size = \"lots\"\n").unwrap_err();
        assert!(
            err.contains(
                "invalid size \"lots\": expected a number with an optional unit, e.g. 500MiB, 20GiB, 2TiB"
            ),
            "{err}"
        );
        assert!(err.contains("max_size"), "{err}");
        let err = Config::from_toml("[storage]\nlow_watermark = -5\n").unwrap_err();
        assert!(err.contains("invalid size \"-5\""), "{err}");
        let err = Config::from_toml("[storage]\nmax_size = true\n").unwrap_err();
        assert!(err.contains("500MiB"), "{err}");
    }

    #[test]
    fn sizes_parse_as_strings_or_byte_counts() {
        let c =
            Config::from_toml("[storage]\nmax_size = \"50GiB\"\nlow_watermark = 1000\n").unwrap();
        assert_eq!(c.storage.max_size, Some(bytesize::ByteSize::gib(50)));
        assert_eq!(c.storage.low_watermark, Some(bytesize::ByteSize(1000)));
        assert_eq!(parse_size(" 2TiB ").unwrap(), bytesize::ByteSize::tib(2));
        assert!(parse_size("-1GiB").is_err());
        assert_eq!(format_size(bytesize::ByteSize::gib(50)), "50GiB");
        assert_eq!(format_size(bytesize::ByteSize(1500)), "1500B");
    }

    #[test]
    fn a_shared_tier_bound_needs_a_cluster() {
        let shared = "[storage.shared]\nendpoint = \"http://garage:3900\"\nbucket = \"b\"\nmax_size = \"2TiB\"\n";
        let mut c = Config::from_toml(shared).unwrap();
        let s = c.storage.shared.as_mut().unwrap();
        s.access_key_id = Some(Secret::new("k"));
        s.secret_access_key = Some(Secret::new("s"));
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("storage.shared.max_size") && err.contains("[cluster]"),
            "{err}"
        );
        let mut cluster: ClusterConfig = toml::from_str(
            "redis = \"redis://redis:6379/0\"\nadvertise = \"http://10.0.0.5:5000\"",
        )
        .unwrap();
        cluster.secret = Some(Secret::new("sixteen characters"));
        c.cluster = Some(cluster);
        c.validate().unwrap();
    }

    fn upstream_error(toml: &str) -> String {
        let c = Config::from_toml(&format!("[upstreams.\"docker.io\"]\n{toml}")).unwrap();
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn upstream_fields_for_auth_fallback_and_caps_parse_with_their_defaults() {
        let c = Config::from_toml("").unwrap();
        let up = &c.upstreams[DOCKER_HUB];
        assert_eq!(up.credential_lifetime, Duration::from_secs(15 * 60));
        assert_eq!(
            (up.max_concurrent_requests, up.max_requests_per_second),
            (0, 0)
        );
        assert!(up.credential_helper.is_none() && up.urls.is_empty());
        let c = Config::from_toml(
            "[upstreams.\"docker.io\"]\nurls = [\"https://registry-1.docker.io\", \"https://mirror.gcr.io\"]\n\
             credential_helper = \"ecr-login\"\ncredential_lifetime = \"1h\"\n\
             max_concurrent_requests = 8\nmax_requests_per_second = 20\n",
        )
        .unwrap();
        c.validate().unwrap();
        let up = &c.upstreams[DOCKER_HUB];
        assert_eq!(
            up.base_urls(),
            ["https://registry-1.docker.io", "https://mirror.gcr.io"]
        );
        assert_eq!(up.credential_lifetime, Duration::from_secs(3600));
        assert_eq!(
            (up.max_concurrent_requests, up.max_requests_per_second),
            (8, 20)
        );
        let back = Config::from_toml(&c.to_redacted_toml().unwrap()).unwrap();
        back.validate().unwrap();
        assert_eq!(back.upstreams[DOCKER_HUB].base_urls(), up.base_urls());
    }

    #[test]
    fn url_and_urls_are_exclusive_and_every_url_is_checked() {
        let e = upstream_error("url = \"https://a.example\"\nurls = [\"https://b.example\"]\n");
        assert!(
            e.contains("upstreams.\"docker.io\".urls") && e.contains("not both"),
            "{e}"
        );
        let e = upstream_error("urls = [\"https://a.example\", \"ftp://b.example\"]\n");
        assert!(e.contains(".urls") && e.contains("ftp://b.example"), "{e}");
        let e = upstream_error("urls = [\"https://a.example\", \"https://a.example\"]\n");
        assert!(e.contains("listed twice"), "{e}");
        let e = upstream_error("urls = [\"https://me:pw@a.example\"]\n");
        assert!(!e.contains("pw@") && e.contains("username/password"), "{e}");
    }

    #[test]
    fn credential_helper_excludes_username_and_password_and_is_a_name_or_a_path() {
        let e = upstream_error("credential_helper = \"ecr-login\"\nusername = \"me\"\n");
        assert!(
            e.contains("credential_helper") && e.contains("not both"),
            "{e}"
        );
        let e = upstream_error("credential_helper = \"ecr login; rm\"\n");
        assert!(e.contains("helper name"), "{e}");
        let e = upstream_error("credential_helper = \"\"\n");
        assert!(e.contains("helper name"), "{e}");
        let e = upstream_error("credential_helper = \"gcr\"\ncredential_lifetime = \"0s\"\n");
        assert!(e.contains("credential_lifetime"), "{e}");
        for ok in [
            "ecr-login",
            "/usr/local/bin/docker-credential-gcr",
            "./helper",
        ] {
            let c = Config::from_toml(&format!(
                "[upstreams.\"docker.io\"]\ncredential_helper = \"{ok}\"\n"
            ))
            .unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn warm_section_parses_images_platforms_and_a_schedule() {
        let c = Config::from_toml(
            "[warm]\nimages = [\"alpine:3.19\", \"docker.io/library/busybox\"]\n\
             platforms = [\"linux/amd64\"]\nat = \"05:30\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.warm.images[0].to_string(),
            "docker.io/library/alpine:3.19"
        );
        assert_eq!(c.warm.platforms[0].to_string(), "linux/amd64");
        let WarmSchedule::DailyAt(at) = c.warm.schedule() else {
            panic!("{:?}", c.warm.schedule());
        };
        assert_eq!(at.seconds(), 5 * 3600 + 30 * 60);
        assert_eq!(
            Config::default().warm.schedule(),
            WarmSchedule::Every(Duration::from_secs(86400))
        );
        let text = c.to_redacted_toml().unwrap();
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back.warm.images, c.warm.images);
        assert_eq!(back.warm.at, c.warm.at);
    }

    #[test]
    fn bad_warm_values_are_named() {
        let e = Config::from_toml("[warm]\nimages = [\"Alpine\"]\n").unwrap_err();
        assert!(e.contains("images") && e.contains("Alpine"), "{e}");
        let e = Config::from_toml("[warm]\nat = \"25:00\"\n").unwrap_err();
        assert!(e.contains("HH:MM"), "{e}");
        let e = Config::from_toml("[warm]\nplatforms = [\"amd64\"]\n").unwrap_err();
        assert!(e.contains("os/architecture"), "{e}");
        let both = Config::from_toml("[warm]\ninterval = \"1h\"\nat = \"01:00\"\n").unwrap();
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let elsewhere = Config::from_toml("[warm]\nimages = [\"quay.io/x/y\"]\n").unwrap();
        let e = elsewhere.validate().unwrap_err().to_string();
        assert!(e.contains("warm.images") && e.contains("quay.io"), "{e}");
    }

    #[test]
    fn printed_config_reads_back_the_same_and_hides_secrets() {
        let mut c = Config::default();
        c.storage.max_size = Some(bytesize::ByteSize::gib(20));
        c.server.tokens = vec![Secret::new("tok-123")];
        c.server.allow = vec!["10.0.0.0/8".parse().unwrap()];
        let up = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        up.username = Some("me".into());
        up.password = Some(Secret::new("hunter2"));
        let text = c.to_redacted_toml().unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("tok-123"),
            "{text}"
        );
        assert!(text.contains("password = \"[REDACTED]\""), "{text}");
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back.storage.max_size, c.storage.max_size);
        assert_eq!(back.cache.tag_ttl, c.cache.tag_ttl);
        assert_eq!(back.server.allow, c.server.allow);
        assert_eq!(back.upstreams[DOCKER_HUB].base_urls(), [DOCKER_HUB_URL]);
        assert_eq!(back.upstreams[DOCKER_HUB].username.as_deref(), Some("me"));
        back.validate().unwrap();
    }
}
