//! `[upstreams."<registry>"]`: one upstream registry, its URLs, credentials, timeouts, back-off,
//! pull budget and policy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DOCKER_HUB_URL};
use crate::oci::RepoName;
use crate::policy::{Policy, RepoGlobs};
use crate::secret::Secret;
use crate::tag_rules::{TagPatterns, TagRule, TagRules};

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
        if !self.urls.is_empty() {
            self.urls.iter().map(String::as_str).collect()
        } else if !self.url.is_empty() {
            vec![self.url.as_str()]
        } else {
            vec![DOCKER_HUB_URL]
        }
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
