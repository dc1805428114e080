//! pullthrough: a pull-through caching mirror for Docker Hub and other OCI registries.
//!
//! Layering: `server` accepts connections and hands requests to `handlers` (HTTP) via
//! `routes` (pure parsing); handlers call `mirror` (the cache logic), which calls `store`
//! (disk), `download` (single-flight blob fetches) and `upstream` (the registry client).
//! Lower layers never call upward. Errors become HTTP responses only in `error`.

pub mod access;
pub mod activity;
pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod connlimit;
pub mod download;
pub mod error;
pub mod handlers;
pub mod logging;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod platform_limits;
pub mod routes;
pub mod sendfile;
pub mod server;
pub mod singleflight;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod verify;

pub use config::Config;
pub use server::serve;
