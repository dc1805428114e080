//! Who may use the mirror, and how much: client address allow-list, Basic auth (htpasswd with
//! bcrypt, or static tokens), and the per-client request limit. All off by default: a mirror
//! of public images is usually open.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::{header, HeaderMap, StatusCode};
use sha2::{Digest as _, Sha256};

use crate::config::{Secret, ServerConfig};
use crate::handlers::error::{ApiError, Code};

/// Requests per client address within a window.
pub struct ClientLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl ClientLimit {
    pub fn from_config(server: &ServerConfig) -> Option<ClientLimit> {
        let n = NonZeroU32::new(server.client_requests)?;
        let quota = Quota::with_period(server.client_window / n.get())?.allow_burst(n);
        Some(ClientLimit {
            limiter: governor::RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        })
    }

    /// `Err(wait)` when `client` has used up its requests.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        // Forget idle clients now and then, so the table does not grow for ever.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// The allow-list and client credentials.
pub struct Access {
    allow: Vec<ipnet::IpNet>,
    /// user → bcrypt hash
    htpasswd: HashMap<String, String>,
    tokens: Vec<Secret>,
    realm: String,
    /// Credentials already checked, by a hash of the header, with whose they are (see
    /// [`Access::check_credentials`]): bcrypt costs tens of milliseconds, far too much to pay
    /// on every request.
    accepted: moka::sync::Cache<[u8; 32], Arc<str>>,
}

impl Access {
    /// Reads the htpasswd file, if any. Blocking.
    pub fn from_config(server: &ServerConfig) -> anyhow::Result<Access> {
        let mut htpasswd = HashMap::new();
        if let Some(path) = &server.htpasswd {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read server.htpasswd {}: {e}", path.display())
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((user, hash)) = line.split_once(':') else {
                    anyhow::bail!("{}:{}: not a user:hash line", path.display(), n + 1);
                };
                if !hash.starts_with("$2") {
                    anyhow::bail!(
                        "{}:{}: only bcrypt entries are supported (htpasswd -B)",
                        path.display(),
                        n + 1
                    );
                }
                htpasswd.insert(user.to_owned(), hash.to_owned());
            }
        }
        Ok(Access {
            allow: server.allow.clone(),
            htpasswd,
            tokens: server.tokens.clone(),
            realm: server.auth_realm.clone(),
            accepted: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        })
    }

    pub fn requires_credentials(&self) -> bool {
        !self.htpasswd.is_empty() || !self.tokens.is_empty()
    }

    /// Whether any client access control is configured.
    pub fn is_restricted(&self) -> bool {
        !self.allow.is_empty() || self.requires_credentials()
    }

    pub fn check_address(&self, peer: IpAddr) -> Result<(), ApiError> {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        if self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&peer)) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                Code::Denied,
                "this address may not use the mirror",
            ))
        }
    }

    /// The token `presented` is, as `token #N` (its place in `server.tokens`, from 1): the
    /// token itself is never named.
    fn token(&self, presented: &[u8]) -> Option<String> {
        self.tokens
            .iter()
            .position(|t| t.matches(presented))
            .map(|i| format!("token #{}", i + 1))
    }

    /// Checks an `Authorization` value against the tokens and the htpasswd file: whose
    /// credential it is (`token #2`, `user alice`), or `None`. Blocking: bcrypt takes tens of
    /// milliseconds.
    fn credentials_ok(&self, value: &str) -> Option<String> {
        // RFC 9110 §11.1: the scheme is case-insensitive.
        let (scheme, rest) = value.trim_start().split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.token(rest.trim().as_bytes());
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let encoded = rest;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok());
        let (user, pass) = decoded.as_deref().and_then(|d| d.split_once(':'))?;
        // The client chose the user name: quoted and bounded in what is logged.
        let user_name: String = user.chars().take(64).collect();
        if let Some(token) = self.token(pass.as_bytes()) {
            return Some(format!("{token} (user {user_name:?})"));
        }
        self.htpasswd
            .get(user)
            .is_some_and(|hash| bcrypt::verify(pass, hash).unwrap_or(false))
            .then(|| format!("user {user_name:?}"))
    }

    /// Checks the request's credentials when the mirror asks for some: `Ok(Some(whose))`
    /// (`token #2`, `user "alice"`) for good ones, `Ok(None)` when none are asked for.
    pub async fn check_credentials(
        self: &Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<str>>, ApiError> {
        if !self.requires_credentials() {
            return Ok(None);
        }
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let whose = match value {
            None => None,
            Some(value) => {
                // Credentials seen before are checked here, without a trip to a blocking thread.
                let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
                match self.accepted.get(&key) {
                    Some(whose) => Some(whose),
                    None => {
                        let this = self.clone();
                        let whose: Option<Arc<str>> =
                            tokio::task::spawn_blocking(move || this.credentials_ok(&value))
                                .await
                                .ok()
                                .flatten()
                                .map(Into::into);
                        if let Some(whose) = &whose {
                            self.accepted.insert(key, whose.clone());
                        }
                        whose
                    }
                }
            }
        };
        if let Some(whose) = whose {
            Ok(Some(whose))
        } else {
            let mut e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthorized,
                "authentication required",
            );
            e.challenge = Some(format!("Basic realm=\"{}\"", self.realm.replace('"', "")));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_allow_list_with_mapped_v4() {
        let cfg = ServerConfig {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            ..ServerConfig::default()
        };
        let a = Access::from_config(&cfg).unwrap();
        assert!(a.check_address("10.1.2.3".parse().unwrap()).is_ok());
        assert!(a.check_address("::ffff:10.1.2.3".parse().unwrap()).is_ok());
        assert!(a.check_address("192.168.0.1".parse().unwrap()).is_err());
    }
}
