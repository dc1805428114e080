//! pullthrough: a pull-through caching mirror for Docker Hub and other OCI registries.
//!
//! Layers call one way, top to bottom (see ARCHITECTURE.md; `tests/architecture.rs` keeps it
//! so): `server` (connections, TLS, admission) → `routes` (parse, dispatch) → `handlers`
//! (HTTP: headers, ranges, bodies; `handlers::error` maps failures to responses) → `mirror` (the pull
//! layer: what to answer; `mirror::Housekeeping` for status, metrics and periodic work) →
//! services (`download`, `store` with both tiers behind one seam, `verify`, `upstream`,
//! `cluster`, `singleflight`) → foundations (`config`, `oci`, `outcome`, `metrics`,
//! `logging`, `trace`, `clock`, `sync`, `platform`, `sendfile`, `secret`, `size`, `ranges`,
//! `peer_api`).
//!
//! An embedder needs [`serve`] (or [`Server`]) and [`Config`]; the operator commands are in
//! [`admin`].

// No unwrap on anything a client or an upstream controls; tests (their own crates, and
// `#[cfg(test)]` modules by clippy.toml) may.
#![deny(clippy::unwrap_used)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
mod download;
mod handlers;
mod hashing;
mod identity;
mod idle;
pub mod image;
pub mod logging;
mod metrics;
mod mirror;
pub mod oci;
mod outcome;
mod peer_api;
mod platform;
pub mod policy;
mod ranges;
pub mod routes;
mod secret;
mod sendfile;
mod server;

mod singleflight;
mod size;
pub mod store;
mod sync;
pub mod tag_rules;
pub mod trace;
mod upstream;
mod verify;
mod warm;

pub use clock::Clock;
pub use config::Config;
pub use server::{serve, Server};
