//! `[upstreams."<registry>"]`: one upstream registry, its URLs, credentials, timeouts, back-off,
//! pull budget and policy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DOCKER_HUB_URL};
use crate::oci::RepoName;
use crate::policy::{Policy, RepoGlobs};
use crate::secret::Secret;
use crate::tag_rules::{TagPatterns, TagRule, TagRules};

/// Whose credentials an upstream's requests carry (`credentials`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialsMode {
    /// The mirror's own (configured, or anonymous), for every client.
    #[default]
    Mirror,
    /// Each client's own, as it sent them to the mirror.
    Client,
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
    /// and is not asked elsewhere. Each URL has its own health, tokens and pull budget. An
    /// entry is a URL, or a table: `{ url = "…", username = "…", password = "…" }` or
    /// `{ url = "…", credential_helper = "…" }` (that URL's own credentials), or
    /// `{ url = "…", credentials = "same" }` (the upstream's `username`/`password` or
    /// `credential_helper` go to that URL too). The upstream's credentials go to the first URL
    /// (unless its entry has its own); a later URL written as a plain string is asked
    /// anonymously. No URL's credentials or tokens are sent to another URL. Default: empty
    /// (use `url`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<UpstreamUrl>,
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
    /// Whose credentials go to this upstream: `"mirror"` (default) uses `username`/`password`
    /// or `credential_helper` (anonymous without them) for every client; `"client"` uses the
    /// credentials each client sends the mirror (challenged for at `/v2/`, see
    /// docs/private-images.md), and serves cached content to a client only once its own
    /// credentials are confirmed to read the repository. `"client"` with mirror credentials
    /// set as well is the mixed mode: what the mirror's credentials can read is served to
    /// every client, the rest as in `"client"`. Not with `server.htpasswd` or
    /// `server.tokens`, which use the same `Authorization` header.
    pub credentials: CredentialsMode,
    /// `credentials = "client"`: how long a client's confirmed access to a repository is
    /// remembered before the upstream is asked again (a `HEAD`, not a counted pull). A
    /// refusal is remembered for at most 30 s. Default 5 minutes.
    #[serde(with = "humantime_serde")]
    pub client_confirm_ttl: Duration,
    /// TCP + TLS connect timeout. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending a request to the response headers; also the most a client waits for
    /// a cold blob's first byte, retries of a failed first request included. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// The same for a `HEAD` (tag revalidation, blob size), which has no body to wait for and
    /// holds up a request that could be answered from the cache; `first_byte_timeout` if
    /// that is shorter. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub head_timeout: Duration,
    /// Longest pause between two body chunks before the transfer counts as cut. A download's
    /// stalls and resumes may keep its clients without a byte for two of these in all; then
    /// it is cut, whatever `resume_attempts` is left. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How many times a cut blob download is resumed with a Range request (each part of a
    /// download fetched in parts, see `parallel_parts`). Default 5.
    pub resume_attempts: u32,
    /// A blob of `parallel_threshold` or more is downloaded as this many ranged requests at
    /// once, when the upstream answers ranges: on a long round trip one TCP stream (or a
    /// registry's CDN) caps what one connection carries, and parts multiply it. The parts
    /// are written at their offsets, hashed in order and verified as one blob; clients read
    /// it as the contiguous prefix grows. Never more than `max_concurrent_requests` leaves
    /// free (one request stays for clients). 1 = one stream. Default 4.
    pub parallel_parts: u32,
    /// The smallest blob downloaded in parts. Default 8 MiB: the other parts start a round
    /// trip after the first, which pays off once one stream would need more than about a
    /// round trip for the rest (over 30 ms at 24 MiB/s per connection, from about 1 MiB; on a
    /// fast near upstream the extra requests cost next to nothing).
    #[serde(with = "crate::size::required")]
    pub parallel_threshold: bytesize::ByteSize,
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
    /// it, when no `tag_rules` entry matches the tag. Default: `cache.tag_ttl`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub tag_ttl: Option<Duration>,
    /// Deprecated: write `tag_rules` with `immutable = true`. Regexes over the tag alone,
    /// anchored as written (`["^v?[0-9]+\\.[0-9]+\\.[0-9]+$"]`): a cached tag that matches
    /// one is never revalidated. They apply after every `tag_rules` entry. Default: none.
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

    /// Tag freshness by pattern: `[[upstreams."<registry>".tag_rules]]` tables, tried in order;
    /// the first whose `match` fits decides, a tag none fits gets `tag_ttl`. `match` is
    /// `"REPOSITORY-GLOB:TAG-GLOB"` (`"*:latest"`, `"library/*:3.*"`, `"*:{latest,main}"`;
    /// the repository as this upstream names it, `*` also matching `/`) or `"re:<regex>"`
    /// over `repository:tag`, anchored as written. Each has exactly one of `ttl = "1m"`,
    /// `immutable = true` (never revalidated once cached) and `always = true` (a `HEAD` on
    /// every request, a counted `GET` only when the digest moved). `pullthrough config check
    /// --explain REFERENCE` shows which rule a reference gets. Default: none.
    #[serde(
        deserialize_with = "crate::tag_rules::deserialize_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tag_rules: Vec<TagRule>,

    // Prefetch: which images of this upstream are downloaded ahead of their clients.
    /// Serving an image manifest of this upstream with a `GET` prefetches the image's config
    /// and layers (see `cache.prefetch_concurrency`). Default true.
    pub prefetch: bool,
    /// Globs of repositories (as for `deny_repositories`) whose images are not prefetched,
    /// for repositories whose manifests are read without pulling (inspection tools, update
    /// bots) or whose layers are too large to fetch unasked. Default: none.
    pub prefetch_skip: RepoGlobs,
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
            credentials: CredentialsMode::Mirror,
            client_confirm_ttl: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            head_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            resume_attempts: 5,
            parallel_parts: 4,
            parallel_threshold: bytesize::ByteSize::mib(8),
            failure_threshold: 3,
            backoff: Duration::from_secs(10),
            max_pulls: 0,
            max_pulls_window: Duration::from_secs(6 * 3600),
            budget_warn_ratio: 0.2,
            budget_reserve: 10,
            aliases: Vec::new(),
            tag_ttl: None,
            immutable_tags: TagPatterns::default(),
            tag_rules: Vec::new(),
            allow_repositories: None,
            deny_repositories: RepoGlobs::default(),
            prefetch: true,
            prefetch_skip: RepoGlobs::default(),
        }
    }
}

impl UpstreamConfig {
    /// Whether serving an image manifest of `repo` (named as this upstream knows it)
    /// prefetches its blobs: `prefetch`, unless `prefetch_skip` names it.
    pub fn prefetches(&self, repo: &RepoName) -> bool {
        self.prefetch && !self.prefetch_skip.matches(repo)
    }

    /// This upstream's policy: its repository lists, and its tag freshness (`tag_rules`, then
    /// `immutable_tags`, then `tag_ttl`, else `cache_tag_ttl`).
    pub fn policy(&self, cache_tag_ttl: Duration) -> Policy {
        let tags = TagRules::new(
            &self.tag_rules,
            &self.immutable_tags,
            self.tag_ttl.unwrap_or(cache_tag_ttl),
        );
        Policy::new(
            tags,
            self.allow_repositories.clone(),
            self.deny_repositories.clone(),
        )
    }

    /// The base URLs in the order they are tried: `urls`, or `url`, or Docker Hub.
    pub fn base_urls(&self) -> Vec<&str> {
        self.url_auths().into_iter().map(|(url, _)| url).collect()
    }

    /// The base URLs in the order they are tried, each with whose credentials it gets.
    pub fn url_auths(&self) -> Vec<(&str, UrlAuth<'_>)> {
        if self.urls.is_empty() {
            let url = if self.url.is_empty() {
                DOCKER_HUB_URL
            } else {
                self.url.as_str()
            };
            return vec![(url, UrlAuth::Upstream)];
        }
        self.urls
            .iter()
            .enumerate()
            .map(|(i, u)| (u.url.as_str(), u.auth(i == 0)))
            .collect()
    }

    /// Whether the upstream itself has credentials (`username` or `credential_helper`).
    fn has_credentials(&self) -> bool {
        self.username.is_some() || self.credential_helper.is_some()
    }

    /// Whether any of its URLs is sent credentials: the upstream's or a URL's own.
    pub fn sends_credentials(&self) -> bool {
        self.has_credentials()
            || self
                .urls
                .iter()
                .any(|u| u.username.is_some() || u.credential_helper.is_some())
    }

    pub(super) fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
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
        check_credentials(
            &self.username,
            &self.password,
            &self.credential_helper,
            &|f| key(f),
        )?;
        for (i, u) in self.urls.iter().enumerate() {
            let entry = |f: &str| key(&format!("urls[{i}].{f}"));
            check_credentials(&u.username, &u.password, &u.credential_helper, &entry)?;
            // No environment fills in a URL's password, so a username alone is a mistake.
            if u.username.is_some() && u.password.is_none() {
                return Err(ConfigError::Value {
                    key: entry("password"),
                    value: String::new(),
                    reason: "a username needs a password".to_owned(),
                });
            }
            let own = u.username.is_some() || u.credential_helper.is_some();
            if u.same_credentials {
                if own {
                    return Err(ConfigError::Value {
                        key: entry("credentials"),
                        value: "same".to_owned(),
                        reason: "set credentials = \"same\" or this URL's own \
                                 username/password or credential_helper, not both"
                            .to_owned(),
                    });
                }
                if !self.has_credentials() && self.credentials != CredentialsMode::Client {
                    return Err(ConfigError::Value {
                        key: entry("credentials"),
                        value: "same".to_owned(),
                        reason: "the upstream has no username or credential_helper to share \
                                 (nor takes clients' credentials)"
                            .to_owned(),
                    });
                }
            }
            if i == 0 && own && self.has_credentials() {
                let field = if u.username.is_some() {
                    "username"
                } else {
                    "credential_helper"
                };
                return Err(ConfigError::Value {
                    key: entry(field),
                    value: String::new(),
                    reason: "the first URL gets the upstream's username/password or \
                             credential_helper: set them there or here, not both"
                        .to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// The checks of one set of credentials, the upstream's or a URL's: a password needs a
/// username, a helper excludes both and is a helper name or a path.
fn check_credentials(
    username: &Option<String>,
    password: &Option<Secret>,
    credential_helper: &Option<String>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let bad = |field: &str, value: &str, reason: &str| ConfigError::Value {
        key: key(field),
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    if password.is_some() && username.is_none() {
        return Err(bad("username", "", "a password needs a username"));
    }
    if let Some(helper) = credential_helper {
        if username.is_some() || password.is_some() {
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

/// Whose credentials go to one base URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlAuth<'a> {
    /// None: the URL is asked anonymously.
    Anonymous,
    /// The upstream's own `username`/`password` or `credential_helper` (anonymous when it
    /// has none).
    Upstream,
    /// The URL's own username and password.
    Password {
        username: &'a str,
        password: &'a Secret,
    },
    /// The URL's own credential helper, asked for the URL's host.
    Helper(&'a str),
}

/// One entry of `urls`: a URL as a string, or a table with the URL and its credentials
/// (`url`, `username`, `password`, `credential_helper`, `credentials = "same"`). Written back
/// as it was read: a string when it has nothing but the URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub credential_helper: Option<String>,
    /// `credentials = "same"`: the upstream's credentials go to this URL too (with the
    /// upstream's `credentials = "client"`, each client's own as well).
    pub same_credentials: bool,
}

impl UpstreamUrl {
    /// Whose credentials this URL gets; `first`: it is the first URL, which gets the
    /// upstream's unless it has its own.
    fn auth(&self, first: bool) -> UrlAuth<'_> {
        match (&self.username, &self.password, &self.credential_helper) {
            (Some(username), Some(password), _) => UrlAuth::Password { username, password },
            (_, _, Some(helper)) => UrlAuth::Helper(helper),
            _ if first || self.same_credentials => UrlAuth::Upstream,
            _ => UrlAuth::Anonymous,
        }
    }

    fn is_plain(&self) -> bool {
        self.username.is_none()
            && self.password.is_none()
            && self.credential_helper.is_none()
            && !self.same_credentials
    }
}

impl From<&str> for UpstreamUrl {
    fn from(url: &str) -> UpstreamUrl {
        UpstreamUrl {
            url: url.to_owned(),
            ..UpstreamUrl::default()
        }
    }
}

/// The only value of an entry's `credentials`.
const SAME: &str = "same";
const URL_FIELDS: &[&str] = &[
    "url",
    "username",
    "password",
    "credential_helper",
    "credentials",
];

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UpstreamUrl, D::Error> {
        use serde::de::Error as _;

        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UpstreamUrl;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a URL, or a table with `url` and its credentials")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UpstreamUrl, E> {
                Ok(UpstreamUrl::from(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UpstreamUrl, A::Error> {
                let mut out = UpstreamUrl::default();
                let mut url = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "url" => url = Some(map.next_value::<String>()?),
                        "username" => out.username = Some(map.next_value()?),
                        "password" => out.password = Some(map.next_value()?),
                        "credential_helper" => out.credential_helper = Some(map.next_value()?),
                        "credentials" => {
                            let value: String = map.next_value()?;
                            if value != SAME {
                                return Err(A::Error::invalid_value(
                                    serde::de::Unexpected::Str(&value),
                                    &"\"same\" (or give the URL its own username and password)",
                                ));
                            }
                            out.same_credentials = true;
                        }
                        other => return Err(A::Error::unknown_field(other, URL_FIELDS)),
                    }
                }
                out.url = url.ok_or_else(|| A::Error::missing_field("url"))?;
                Ok(out)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        if self.is_plain() {
            return s.serialize_str(&self.url);
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("url", &self.url)?;
        if let Some(u) = &self.username {
            map.serialize_entry("username", u)?;
        }
        if let Some(p) = &self.password {
            // `Secret` serializes as [REDACTED].
            map.serialize_entry("password", p)?;
        }
        if let Some(h) = &self.credential_helper {
            map.serialize_entry("credential_helper", h)?;
        }
        if self.same_credentials {
            map.serialize_entry("credentials", SAME)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::*;
    use crate::oci::RepoName;
    use crate::tag_rules::Freshness;

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
    fn prefetch_is_on_by_default_and_off_per_upstream_or_repository() {
        let c = two_upstreams("prefetch_skip = [\"big/*\"]\n[upstreams.\"quay.io\"]\nurl = \"https://quay.io\"\nprefetch = false\n").unwrap();
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        assert_eq!(c.cache.prefetch_concurrency, 8);
        assert!(c.upstreams[DOCKER_HUB].prefetches(&repo("library/alpine")));
        assert!(c.upstreams["ghcr.io"].prefetches(&repo("org/app")));
        assert!(!c.upstreams["ghcr.io"].prefetches(&repo("big/model")));
        assert!(!c.upstreams["quay.io"].prefetches(&repo("org/app")));
        let back = Config::from_toml(&c.to_redacted_toml().unwrap()).unwrap();
        assert_eq!(
            back.upstreams["ghcr.io"].prefetch_skip,
            c.upstreams["ghcr.io"].prefetch_skip
        );
        assert!(!back.upstreams["quay.io"].prefetch);
        let e = Config::from_toml("[cache]\nprefetch_concurrency = 65\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache.prefetch_concurrency"), "{e}");
    }

    #[test]
    fn a_bad_pattern_is_a_config_error_naming_the_field() {
        let e = two_upstreams("immutable_tags = [\"v([\"]\n").unwrap_err();
        assert!(e.contains("immutable_tags") && e.contains("v(["), "{e}");
        let e = two_upstreams("deny_repositories = [\n  \"ok/*\",\n  \"a/[\",\n]\n").unwrap_err();
        assert!(e.contains("deny_repositories") && e.contains("a/["), "{e}");
    }

    #[test]
    fn tag_rules_parse_in_order_and_print_back() {
        let c = two_upstreams(
            "tag_ttl = \"1h\"\nimmutable_tags = ['^v[0-9]+$']\n\
             [[upstreams.\"ghcr.io\".tag_rules]]\nmatch = \"*:{latest,main}\"\nttl = \"1m\"\n\
             [[upstreams.\"ghcr.io\".tag_rules]]\nmatch = 're:^org/.*:v[0-9.]+$'\nimmutable = true\n\
             [[upstreams.\"ghcr.io\".tag_rules]]\nmatch = \"ci/*:*\"\nalways = true\n",
        )
        .unwrap();
        let up = &c.upstreams["ghcr.io"];
        let policy = up.policy(c.cache.tag_ttl);
        let f = |r: &str, t: &str| policy.freshness(&r.parse().unwrap(), &t.parse().unwrap());
        assert_eq!(
            f("org/app", "main"),
            Freshness::Ttl(Duration::from_secs(60))
        );
        assert_eq!(f("org/app", "v1.2"), Freshness::Immutable);
        assert_eq!(f("ci/app", "v1.2"), Freshness::Always);
        assert_eq!(
            f("ci/app", "latest"),
            Freshness::Ttl(Duration::from_secs(60))
        );
        assert_eq!(
            f("ci/app", "v7"),
            Freshness::Always,
            "immutable_tags come last"
        );
        assert_eq!(f("x/app", "v7"), Freshness::Immutable);
        assert_eq!(f("x/app", "1.0"), Freshness::Ttl(Duration::from_secs(3600)));
        assert_eq!(
            c.upstreams[DOCKER_HUB].policy(c.cache.tag_ttl).freshness(
                &"library/alpine".parse().unwrap(),
                &"latest".parse().unwrap()
            ),
            Freshness::Ttl(c.cache.tag_ttl)
        );
        let back = Config::from_toml(&c.to_redacted_toml().unwrap()).unwrap();
        assert_eq!(back.upstreams["ghcr.io"].tag_rules, up.tag_rules);
        assert_eq!(back.upstreams["ghcr.io"].tag_rules.len(), 3);
    }

    #[test]
    fn a_bad_tag_rule_is_a_config_error_naming_the_rule() {
        let rule = |body: &str| {
            two_upstreams(&format!(
                "[[upstreams.\"ghcr.io\".tag_rules]]\nmatch = \"*:latest\"\nttl = \"1m\"\n\
                 [[upstreams.\"ghcr.io\".tag_rules]]\n{body}"
            ))
            .unwrap_err()
        };
        for (body, says) in [
            (
                "match = \"*:v*\"\nttl = \"1m\"\nalways = true\n",
                "tag_rules #2 (match = \"*:v*\"): ttl and always are set: a rule has exactly one of",
            ),
            (
                "match = \"*:v*\"\n",
                "tag_rules #2 (match = \"*:v*\"): no action: set one of ttl",
            ),
            (
                "match = \"*:v[\"\nimmutable = true\n",
                "tag_rules #2 (match = \"*:v[\"): invalid glob \"v[\"",
            ),
            (
                "match = \"re:v([\"\nimmutable = true\n",
                "tag_rules #2 (match = \"re:v([\"): invalid regular expression \"v([\"",
            ),
            ("ttl = \"1m\"\n", "tag_rules #2: missing field `match`"),
            ("match = \"*:v*\"\nttl = \"soon\"\n", "tag_rules #2: "),
            ("match = \"*:v*\"\nimutable = true\n", "tag_rules #2: unknown field `imutable`"),
        ] {
            let e = rule(body);
            assert!(e.contains(says), "{body}: {e}");
        }
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
    fn the_commented_tag_rules_and_second_upstream_in_mirror_toml_are_valid() {
        let text = include_str!("../../mirror.toml");
        let start = text
            .find("# [[upstreams.\"docker.io\".tag_rules]]")
            .unwrap();
        let block: String = text[start..]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with("[upstreams.")
                    || l.starts_with("[[upstreams.")
                    || l.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    })
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::from_toml(&format!("{text}\n{block}")).unwrap();
        c.validate().unwrap();
        let fresh = |registry: &str, repo: &str, tag: &str| {
            c.upstreams[registry]
                .policy(c.cache.tag_ttl)
                .freshness(&repo.parse().unwrap(), &tag.parse().unwrap())
        };
        let minute = Freshness::Ttl(Duration::from_secs(60));
        assert_eq!(fresh(DOCKER_HUB, "library/alpine", "latest"), minute);
        assert_eq!(fresh(DOCKER_HUB, "myorg/app", "main"), minute);
        assert_eq!(
            fresh(DOCKER_HUB, "myorg/app", "v1.2.3"),
            Freshness::Immutable
        );
        let default = Freshness::Ttl(c.cache.tag_ttl);
        assert_eq!(fresh(DOCKER_HUB, "library/python", "3.12.1"), default);
        assert_eq!(fresh(DOCKER_HUB, "library/alpine", "3.20"), default);
        let ghcr = &c.upstreams["ghcr.io"];
        assert_eq!(ghcr.aliases, ["ghcr"]);
        assert!(ghcr.allow_repositories.is_some());
        assert_eq!(fresh("ghcr.io", "cli/cli", "v2.40.1"), Freshness::Immutable);
        assert_eq!(
            fresh("ghcr.io", "myorg/ci-base", "latest"),
            Freshness::Always
        );
        assert_eq!(
            fresh("ghcr.io", "myorg/app", "latest"),
            Freshness::Ttl(Duration::from_secs(3600))
        );
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
    fn a_url_entry_is_a_string_or_a_table_with_its_credentials_and_prints_back_redacted() {
        let c = Config::from_toml(
            "[upstreams.\"docker.io\"]\nusername = \"hub\"\npassword = \"hub-pw-1\"\n\
             urls = [\"https://a.example\",\n\
               { url = \"https://b.example\", username = \"ci\", password = \"url-pw-2\" },\n\
               { url = \"https://c.example\", credentials = \"same\" },\n\
               { url = \"https://d.example\", credential_helper = \"ecr-login\" },\n\
               { url = \"https://e.example\" }]\n",
        )
        .unwrap();
        c.validate().unwrap();
        let up = &c.upstreams[DOCKER_HUB];
        let auths = up.url_auths();
        assert_eq!(auths[0], ("https://a.example", UrlAuth::Upstream));
        assert!(
            matches!(auths[1], ("https://b.example", UrlAuth::Password { username: "ci", password })
                if password.expose() == "url-pw-2"),
            "{auths:?}"
        );
        assert_eq!(auths[2], ("https://c.example", UrlAuth::Upstream));
        assert_eq!(
            auths[3],
            ("https://d.example", UrlAuth::Helper("ecr-login"))
        );
        assert_eq!(auths[4], ("https://e.example", UrlAuth::Anonymous));
        assert!(format!("{up:?}").contains("[REDACTED]") && !format!("{up:?}").contains("url-pw"));

        let text = c.to_redacted_toml().unwrap();
        assert!(
            !text.contains("url-pw-2") && !text.contains("hub-pw-1"),
            "{text}"
        );
        let back = Config::from_toml(&text).unwrap();
        back.validate().unwrap();
        let b = &back.upstreams[DOCKER_HUB];
        assert_eq!(b.base_urls(), up.base_urls());
        assert_eq!(
            b.urls[0],
            UpstreamUrl::from("https://a.example"),
            "a string stays one"
        );
        assert_eq!(b.urls[1].username.as_deref(), Some("ci"));
        assert_eq!(
            b.urls[1].password.as_ref().map(|p| p.expose()),
            Some("[REDACTED]")
        );
        assert!(b.urls[2].same_credentials);
        assert_eq!(b.urls[3].credential_helper.as_deref(), Some("ecr-login"));
        assert_eq!(b.urls[4], UpstreamUrl::from("https://e.example"));
    }

    #[test]
    fn conflicting_credentials_of_a_url_entry_are_config_errors_naming_it() {
        let urls = |entry: &str| format!("urls = [\"https://a.example\", {entry}]\n");
        for (toml, key, why) in [
            (
                urls("{ url = \"https://b.example\", username = \"ci\", password = \"p\", credentials = \"same\" }")
                    + "username = \"hub\"\npassword = \"q\"\n",
                ".urls[1].credentials",
                "not both",
            ),
            (
                urls("{ url = \"https://b.example\", credentials = \"same\" }"),
                ".urls[1].credentials",
                "no username or credential_helper to share",
            ),
            (
                urls("{ url = \"https://b.example\", username = \"ci\" }"),
                ".urls[1].password",
                "a username needs a password",
            ),
            (
                urls("{ url = \"https://b.example\", password = \"p\" }"),
                ".urls[1].username",
                "a password needs a username",
            ),
            (
                urls("{ url = \"https://b.example\", username = \"ci\", password = \"p\", credential_helper = \"gcr\" }"),
                ".urls[1].credential_helper",
                "not both",
            ),
            (
                urls("{ url = \"https://b.example\", credential_helper = \"gcr; rm\" }"),
                ".urls[1].credential_helper",
                "helper name",
            ),
            (
                "urls = [{ url = \"https://a.example\", username = \"ci\", password = \"p\" }]\n\
                 credential_helper = \"ecr-login\"\n"
                    .to_owned(),
                ".urls[0].username",
                "not both",
            ),
            (
                urls("{ url = \"https://me:pw@b.example\" }"),
                ".urls",
                "username/password",
            ),
        ] {
            let e = upstream_error(&toml);
            assert!(e.contains(key) && e.contains(why), "{toml}: {e}");
            assert!(!e.contains("\"p\"") && !e.contains("pw@"), "{toml}: {e}");
        }
        for (toml, why) in [
            (
                urls("{ url = \"https://b.example\", credentials = \"other\" }"),
                "\"same\"",
            ),
            (
                urls("{ url = \"https://b.example\", pasword = \"p\" }"),
                "pasword",
            ),
            (
                urls("{ username = \"ci\", password = \"p\" }"),
                "missing field `url`",
            ),
        ] {
            let e = Config::from_toml(&format!("[upstreams.\"docker.io\"]\n{toml}")).unwrap_err();
            assert!(e.contains(why), "{toml}: {e}");
        }
        // The first URL's own credentials when the upstream has none; "same" where it has some.
        for ok in [
            "urls = [{ url = \"https://a.example\", username = \"ci\", password = \"p\" }, \"https://b.example\"]\n",
            "username = \"hub\"\npassword = \"q\"\nurls = [{ url = \"https://a.example\", credentials = \"same\" }]\n",
        ] {
            let c = Config::from_toml(&format!("[upstreams.\"docker.io\"]\n{ok}")).unwrap();
            c.validate().unwrap();
        }
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
}
