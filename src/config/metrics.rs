//! `[metrics]`: where `/metrics` is served.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address (plain HTTP, no client auth) instead of on the main
    /// listener. Default: on the main listener, behind the same access control.
    pub listen: Option<SocketAddr>,
}
