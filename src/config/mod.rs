//! Configuration: typed structs with documented defaults, loaded from the TOML file, then the
//! environment, then the command line, then checked by [`Config::validate`].
//!
//! One file per section (`server.rs` for `[server]`, …); `load.rs` reads and overrides,
//! `validate.rs` checks. Every type is re-exported here: callers name `crate::config::X`.

mod cache;
mod cluster;
mod load;
mod log;
mod metrics;
mod pin;
mod server;
mod storage;
mod tracing;
mod upstream;
mod validate;
mod warm;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use self::cache::CacheConfig;
pub use self::cluster::ClusterConfig;
pub use self::load::Overrides;
pub use self::log::{LogConfig, LogFormat};
pub use self::metrics::MetricsConfig;
pub use self::pin::{PinConfig, RepoPattern};
pub use self::server::ServerConfig;
pub use self::storage::{SharedStorageConfig, StorageConfig};
pub use self::tracing::TracingConfig;
pub use self::upstream::{CredentialsMode, UpstreamConfig, UpstreamUrl, UrlAuth};
pub use self::warm::{TimeOfDay, WarmConfig, WarmSchedule};
pub use crate::image::DOCKER_HUB;
pub use crate::secret::Secret;
pub use crate::size::{format_size, parse_size};

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
    /// OpenTelemetry traces of requests (off unless a collector is named).
    pub tracing: TracingConfig,
    /// Images the running mirror keeps warm on a schedule. Default: none.
    pub warm: WarmConfig,
    /// Replicas sharing one cache (with `[storage.shared]`). Default: none, a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Images and repositories never evicted (`[[pin]]`, see `pullthrough cache pin`).
    /// Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<PinConfig>,
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
            tracing: TracingConfig::default(),
            warm: WarmConfig::default(),
            cluster: None,
            pin: Vec::new(),
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

impl Config {
    /// The registry whose `library/` namespace applies to single-component names.
    pub fn is_docker_hub(registry: &str) -> bool {
        registry == DOCKER_HUB
    }

    /// The pins the config asks for: `[[pin]]`, and the `[warm]` images with `warm.pin`.
    pub fn pins(&self) -> Vec<PinConfig> {
        let mut pins = self.pin.clone();
        if self.warm.pin {
            pins.extend(
                self.warm
                    .images
                    .iter()
                    .map(|i| PinConfig::image(i.clone(), self.warm.platforms.clone())),
            );
        }
        pins
    }
}
