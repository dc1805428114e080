//! Upstream authentication: `WWW-Authenticate` challenges, Bearer tokens and Basic auth.
//!
//! The first request to an upstream URL goes out anonymously; its 401 challenge tells us the
//! token realm and service (or that the registry wants Basic on every request), which are
//! remembered so later repositories get a token before their first request. Tokens are cached
//! per repository scope and caller until shortly before they expire: a client's token is
//! used for that client alone (`credentials = "client"`). One `Auth` serves one upstream URL:
//! realms differ between URLs, and so do their tokens.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use moka::future::Cache;
use serde::Deserialize;
use tracing::Instrument;

use super::credentials::{Credential, Credentials};
use super::Error;
use crate::config::Secret;
use crate::identity::{Caller, Who};
use crate::metrics::Metrics;
use crate::oci::RepoName;

/// The distribution token spec: a token without `expires_in` lives 60 seconds, and no token
/// is assumed to live less than that.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

/// Parses a `WWW-Authenticate` value: `Bearer realm="…",service="…",scope="…"` or `Basic …`.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
    })
}

/// `key=value` pairs separated by commas; values may be quoted and contain commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                val.push(*c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), val.trim().to_owned()));
    }
}

#[derive(Clone)]
struct Token {
    value: Secret,
    lifetime: Duration,
}

struct TokenExpiry;

impl moka::Expiry<(Who, String), Token> for TokenExpiry {
    fn expire_after_create(
        &self,
        _: &(Who, String),
        token: &Token,
        _: Instant,
    ) -> Option<Duration> {
        // Refresh a little before the upstream's expiry so a token never dies in flight.
        let margin = (token.lifetime / 10).max(Duration::from_secs(5));
        Some(token.lifetime.saturating_sub(margin))
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

pub struct Auth {
    upstream: String,
    http: reqwest::Client,
    credentials: Credentials,
    /// Whether a client's own credentials go to this URL (`credentials = "client"`, the first
    /// URL): otherwise a client's requests go out as the mirror's own.
    takes_client_credentials: bool,
    /// The last challenge seen; a plain lock because it is only ever read or replaced.
    challenge: RwLock<Option<Challenge>>,
    /// By caller and scope: one caller's token never goes out with another's request.
    tokens: Cache<(Who, String), Token>,
    metrics: Arc<Metrics>,
    /// The most a token exchange (request and answer) may take: every request of its scope
    /// waits for it, before its own timeout starts.
    timeout: Duration,
}

impl Auth {
    pub fn new(
        upstream: String,
        http: reqwest::Client,
        credentials: Credentials,
        takes_client_credentials: bool,
        metrics: Arc<Metrics>,
        timeout: Duration,
    ) -> Auth {
        Auth {
            upstream,
            http,
            credentials,
            takes_client_credentials,
            timeout,
            challenge: RwLock::new(None),
            tokens: Cache::builder()
                .max_capacity(10_000)
                .expire_after(TokenExpiry)
                .build(),
            metrics,
        }
    }

    fn scope(repo: Option<&RepoName>) -> String {
        match repo {
            Some(r) => format!("repository:{r}:pull"),
            None => String::new(),
        }
    }

    fn basic(username: &str, password: &Secret) -> Secret {
        let raw = format!("{username}:{}", password.expose());
        Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
    }

    /// Who `caller`'s requests go out as here: a client's own credentials only where they
    /// are taken, the mirror's otherwise.
    fn effective<'c>(&self, caller: &'c Caller) -> &'c Caller {
        match caller {
            Caller::Client(_) | Caller::Anonymous if !self.takes_client_credentials => {
                &Caller::Mirror
            }
            c => c,
        }
    }

    /// The credentials `caller`'s requests carry (after [`Auth::effective`]).
    async fn credential(&self, caller: &Caller) -> Result<Option<Credential>, Error> {
        match caller {
            Caller::Mirror => self.credentials.get().await,
            Caller::Anonymous => Ok(None),
            Caller::Client(c) => Ok(Some(c.credential.clone())),
        }
    }

    /// The `Authorization` of a Basic-only registry: the credentials on every request.
    async fn basic_authorization(&self, caller: &Caller) -> Result<Option<Secret>, Error> {
        match self.credential(caller).await? {
            None => Ok(None),
            Some(Credential::Password { username, password }) => {
                Ok(Some(Self::basic(&username, &password)))
            }
            Some(Credential::IdentityToken(_)) => Err(Error::Credentials {
                upstream: self.upstream.clone(),
                detail: "the credentials are an identity token, which a Basic-only registry does not take".into(),
            }),
        }
    }

    /// The `Authorization` value for `caller`'s request on `repo`, if the upstream is known
    /// to want one.
    pub async fn authorization(
        &self,
        repo: Option<&RepoName>,
        caller: &Caller,
    ) -> Result<Option<Secret>, Error> {
        let caller = self.effective(caller);
        let challenge = crate::sync::read(&self.challenge).clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => self.basic_authorization(caller).await,
            Some(Challenge::Bearer { realm, service }) => {
                let scope = Self::scope(repo);
                let token = self
                    .tokens
                    .try_get_with(
                        (caller.who(), scope.clone()),
                        self.fetch_token(&realm, service.as_deref(), &scope, caller),
                    )
                    .await
                    .map_err(|e: Arc<Error>| (*e).clone())?;
                Ok(Some(Secret::new(format!(
                    "Bearer {}",
                    token.value.expose()
                ))))
            }
        }
    }

    /// Records a 401's challenge and drops `caller`'s token that was refused. Returns whether
    /// a retry can succeed (the challenge is one we can answer).
    pub async fn on_unauthorized(
        &self,
        www_authenticate: Option<&str>,
        repo: Option<&RepoName>,
        caller: &Caller,
    ) -> bool {
        let caller = self.effective(caller);
        let Some(challenge) = www_authenticate.and_then(parse_challenge) else {
            return false;
        };
        let anonymous = match caller {
            Caller::Mirror => self.credentials.is_anonymous(),
            Caller::Anonymous => true,
            Caller::Client(_) => false,
        };
        if challenge == Challenge::Basic && anonymous {
            return false;
        }
        *crate::sync::write(&self.challenge) = Some(challenge);
        self.tokens
            .invalidate(&(caller.who(), Self::scope(repo)))
            .await;
        true
    }

    /// A token for `scope`, or [`Error::Timeout`] once the exchange has taken `timeout`: a
    /// realm that accepts and never answers must not hold every request of the scope.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        caller: &Caller,
    ) -> Result<Token, Error> {
        let asked = std::time::Instant::now();
        let span = crate::trace::span!("upstream.token", upstream = %self.upstream, scope);
        let exchange = self
            .exchange(realm, service, scope, caller)
            .instrument(span);
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                self.metrics
                    .upstream_request(&self.upstream, "token", 0, asked.elapsed());
                Err(Error::Timeout {
                    upstream: self.upstream.clone(),
                    what: "a token from its realm",
                })
            }
        }
    }

    async fn exchange(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        caller: &Caller,
    ) -> Result<Token, Error> {
        let realm = url::Url::parse(realm).map_err(|_| Error::Protocol {
            upstream: self.upstream.clone(),
            detail: "token realm is not a URL".into(),
        })?;
        let mut url = realm.clone();
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = service {
                q.append_pair("service", service);
            }
            if !scope.is_empty() {
                q.append_pair("scope", scope);
            }
        }
        let req = match self.credential(caller).await? {
            None => self.http.get(url),
            Some(Credential::Password { username, password }) => {
                let mut value =
                    http::HeaderValue::from_str(Self::basic(&username, &password).expose())
                        .map_err(|_| Error::Protocol {
                            upstream: self.upstream.clone(),
                            detail: "credentials are not a valid header value".into(),
                        })?;
                value.set_sensitive(true);
                self.http
                    .get(url)
                    .header(http::header::AUTHORIZATION, value)
            }
            Some(Credential::IdentityToken(refresh)) => {
                // What docker does with an identity token: the OAuth2 refresh-token grant,
                // POSTed to the realm, whose answer carries an `access_token`.
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", refresh.expose())
                    .append_pair("client_id", "pullthrough");
                if let Some(service) = service {
                    form.append_pair("service", service);
                }
                if !scope.is_empty() {
                    form.append_pair("scope", scope);
                }
                self.http
                    .post(realm)
                    .header(
                        http::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.finish())
            }
        };
        let asked = std::time::Instant::now();
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                self.metrics
                    .upstream_request(&self.upstream, "token", 0, asked.elapsed());
                return Err(Error::from_reqwest(&self.upstream, &e));
            }
        };
        let status = resp.status();
        self.metrics
            .upstream_request(&self.upstream, "token", status.as_u16(), asked.elapsed());
        if !status.is_success() {
            tracing::warn!(upstream = %self.upstream, %status, "token request refused");
            return Err(match status.as_u16() {
                401 => Error::Unauthorized {
                    message: match caller {
                        Caller::Client(_) => "upstream refused the client's credentials",
                        _ => "upstream refused the configured credentials",
                    }
                    .into(),
                },
                403 => Error::Denied {
                    message: "upstream denied access to the repository".into(),
                },
                429 => Error::TooManyRequests {
                    message: "upstream token service rate limited the mirror".into(),
                    retry_after: super::error::retry_after(resp.headers()),
                },
                _ => Error::Failing {
                    upstream: self.upstream.clone(),
                    status: status.as_u16(),
                },
            });
        }
        let body: TokenResponse = resp.json().await.map_err(|_| Error::Protocol {
            upstream: self.upstream.clone(),
            detail: "token response is not valid JSON".into(),
        })?;
        let value = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Protocol {
                upstream: self.upstream.clone(),
                detail: "token response has no token".into(),
            })?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60)).max(MIN_TOKEN_LIFETIME);
        Ok(Token {
            value: Secret::new(value),
            lifetime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any challenge an upstream sends parses or is refused, without a panic.
        #[test]
        fn any_www_authenticate_value_parses_or_is_refused(value in "\\PC{0,200}") {
            let _ = parse_challenge(&value);
        }

        #[test]
        fn a_bearer_challenge_yields_its_realm(realm in "https://[a-z]{1,12}\\.example/[a-z]{0,8}") {
            let value = format!("Bearer realm=\"{realm}\",service=\"s\",scope=\"repository:a:pull\"");
            let parsed = parse_challenge(&value);
            proptest::prop_assert_eq!(
                parsed,
                Some(Challenge::Bearer { realm, service: Some("s".into()) })
            );
        }
    }

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
    }

    #[test]
    fn parses_basic_and_rejects_unknown() {
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }
}
