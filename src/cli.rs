//! The command line. Flags override the config file and the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, Overrides};

/// A pull-through caching mirror for Docker Hub and other OCI registries.
#[derive(Debug, Parser)]
#[command(name = "pullthrough", version, about)]
pub struct Cli {
    /// Config file (TOML). Without it, built-in defaults apply (Docker Hub, ./data, :5000).
    #[arg(long, short = 'c', value_name = "FILE", env = "PULLTHROUGH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:5000 (server.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Cache directory (storage.dir).
    #[arg(long, value_name = "DIR")]
    pub storage_dir: Option<PathBuf>,
    /// Bound on cached bytes, e.g. 50GiB (storage.max_size).
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<bytesize::ByteSize>,
    /// URL of the default upstream registry, e.g. https://registry-1.docker.io.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// How long a cached tag is served without asking the upstream, e.g. 1s, 5m (cache.tag_ttl).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub tag_ttl: Option<Duration>,
    /// Log format (log.format).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operator commands on the storage directory (of a stopped or running mirror). Without a
/// command, the mirror runs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect or trim the cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Re-hash every cached blob and manifest and report (or remove) those that fail.
    Verify {
        /// Remove corrupt files (the mirror fetches them again when asked).
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Entries, bytes, oldest and newest access.
    Stats,
    /// Delete least recently used content until the cache holds at most SIZE.
    Prune {
        /// Target size, e.g. 20GiB.
        #[arg(long, value_name = "SIZE")]
        to: bytesize::ByteSize,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 1s, 90s, 5m, 1h)"))
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            storage_dir: self.storage_dir.clone(),
            max_size: self.max_size,
            upstream: self.upstream.clone(),
            tag_ttl: self.tag_ttl,
            log_format: self.log_format,
        }
    }
}
