//! [`Config::validate`]: the checks across fields and sections that the types alone do not
//! make, each error naming the key and the value.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Config, ConfigError};
use crate::oci::RepoName;
use crate::size::format_size;

impl Config {
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
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(bad(
                "tracing.sample_ratio",
                &self.tracing.sample_ratio.to_string(),
                "must be between 0 and 1",
            ));
        }
        if let Some(url) = &self.tracing.otlp_endpoint {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad(
                    "tracing.otlp_endpoint",
                    url.as_str(),
                    "must be an http:// or https:// URL (OTLP over HTTP)",
                ));
            }
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
            if !(1..=16).contains(&up.parallel_parts) {
                return Err(bad(
                    &key("parallel_parts"),
                    &up.parallel_parts.to_string(),
                    "must be between 1 (one stream) and 16",
                ));
            }
            up.validate(&key)?;
            if up.credentials == super::upstream::CredentialsMode::Client
                && (self.server.htpasswd.is_some() || !self.server.tokens.is_empty())
            {
                return Err(bad(
                    &key("credentials"),
                    "client",
                    "clients send their upstream credentials in the Authorization header, \
                     which server.htpasswd and server.tokens also use: restrict clients with \
                     server.allow instead",
                ));
            }
            for (field, d) in [
                ("client_confirm_ttl", up.client_confirm_ttl),
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
        if self.server.response_buffer_budget.as_u64() == 0 {
            return Err(bad(
                "server.response_buffer_budget",
                "0",
                "must be greater than zero",
            ));
        }
        if self.server.write_timeout.is_zero() {
            return Err(bad(
                "server.write_timeout",
                "0s",
                "must be greater than zero",
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
        if self.cache.prefetch_concurrency > 64 {
            return Err(bad(
                "cache.prefetch_concurrency",
                &self.cache.prefetch_concurrency.to_string(),
                "must be at most 64",
            ));
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
        for pin in &self.pin {
            let value = pin.to_string();
            if pin.image.is_some() == pin.repository.is_some() {
                return Err(bad("pin", &value, "set one of image or repository"));
            }
            if !self.upstreams.contains_key(pin.registry()) {
                return Err(bad(
                    "pin",
                    &value,
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
}
