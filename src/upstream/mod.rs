//! The upstream registry client: authenticated requests with timeouts, redirects followed
//! without credentials, and upstream answers classified into [`Error`] so that a 404 stays a
//! 404 and a 429 stays a 429.
//!
//! An upstream has one or more URLs (`urls`), tried in order per request: one that refuses
//! (429) or is down passes the request to the next, a 404 is an answer. Each URL keeps its own
//! auth (realm, tokens), health and pull budget. All of an upstream's requests share its caps:
//! `max_concurrent_requests` (a permit held until the response body ends) and
//! `max_requests_per_second` (waited for, never failed). With `[cluster]`, back-offs, budget
//! readings and `max_pulls` are the fleet's (see `fleet`).
//!
//! Here, [`Upstream`] and its URLs; `send` sends a request through them (fallback, auth, caps,
//! deadlines); `error` is why one failed; one file per call: `manifest`, `blob`, `tags`,
//! `referrers`; `budget` spends the pull budget (`ratelimit` reads it from the answers);
//! `status` is what the status page shows; `fleet` what replicas share.

pub mod auth;
mod blob;
mod budget;
pub mod credentials;
mod error;
mod fleet;
pub mod health;
mod manifest;
pub mod ratelimit;
mod referrers;
mod send;
mod status;
mod tags;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::Semaphore;

use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::config::{UpstreamConfig, UrlAuth};
use crate::metrics::Metrics;
use crate::oci::RepoName;

pub use self::error::Error;
pub use self::manifest::{ManifestResponse, MAX_MANIFEST_BYTES};
pub use self::tags::TagsPage;
// The other types of the calls' answers, at `crate::upstream::…` as the calls' own: callers
// take them from the calls without naming them today.
#[allow(unused_imports)]
pub use self::{blob::BlobBody, error::Failure, referrers::ReferrersIndex, status::UrlStatus};

/// One base URL of an upstream, with what is particular to it: its token realm and tokens,
/// its health and back-off, and its pull budget (mirror.gcr.io does not share Docker Hub's).
struct Endpoint {
    /// As configured: shown on the status page and used as the fallback metric's label.
    url: String,
    base: url::Url,
    auth: auth::Auth,
    health: health::Health,
    budget: ratelimit::BudgetState,
}

impl Endpoint {
    fn url(&self, repo: &RepoName, tail: &str) -> url::Url {
        let mut url = self.base.clone();
        let path = format!(
            "{}/v2/{repo}/{tail}",
            self.base.path().trim_end_matches('/')
        );
        url.set_path(&path);
        url
    }
}

pub struct Upstream {
    /// The registry name clients use (`docker.io`).
    pub name: String,
    /// In the order they are tried; never empty.
    endpoints: Vec<Endpoint>,
    /// Which endpoint answered last; `usize::MAX` before any did.
    served_last: AtomicUsize,
    http: reqwest::Client,
    config: UpstreamConfig,
    /// The configured cap on counted pulls, if any.
    pull_cap: Option<DefaultDirectRateLimiter>,
    /// `max_concurrent_requests`, over all of the upstream's URLs.
    concurrency: Option<Arc<Semaphore>>,
    /// `max_requests_per_second`, over all of the upstream's URLs.
    request_rate: Option<DefaultDirectRateLimiter>,
    counted_pulls: AtomicU64,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// When an outage was last logged at warn.
    last_outage_log: Mutex<Option<SystemTime>>,
    /// The replicas this one shares back-offs, budget readings and counted pulls with.
    cluster: Option<Arc<Cluster>>,
    /// When the others' state was last learned (see `fleet`).
    synced_at: Mutex<Option<SystemTime>>,
    /// The pull budgets clients' own accounts reported (`credentials = "client"`), by identity.
    client_budgets: moka::sync::Cache<crate::identity::Identity, ratelimit::Budget>,
    /// The latest failures (not 404s), newest last, for the status page.
    recent_errors: Mutex<std::collections::VecDeque<(SystemTime, String)>>,
}

impl Upstream {
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        clock: Clock,
        cluster: Option<Arc<Cluster>>,
    ) -> anyhow::Result<Upstream> {
        // Redirects are followed by reqwest, which drops Authorization when the host changes:
        // the registry's token must never reach the CDN.
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("pullthrough/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut endpoints = Vec::new();
        let auths = config.url_auths();
        // The upstream's own credentials, made once: a URL with `credentials = "same"` shares
        // them (a helper's answer too, asked for the first URL's host); its tokens are its own.
        let own = match (&config.credential_helper, auths.first()) {
            (Some(helper), Some((first, _))) => {
                credentials::Credentials::helper(name, helper, first, config, &clock)?
            }
            _ => match (&config.username, &config.password) {
                (Some(u), Some(p)) => {
                    credentials::Credentials::Static(credentials::Credential::Password {
                        username: u.clone(),
                        password: p.clone(),
                    })
                }
                _ => credentials::Credentials::Anonymous,
            },
        };
        for (i, (url, auth)) in auths.into_iter().enumerate() {
            // A client's credentials are for the registry it named: its first URL and those
            // that share the upstream's credentials, never another operator's fallback.
            let takes_client_credentials = config.credentials
                == crate::config::CredentialsMode::Client
                && (i == 0 || matches!(auth, UrlAuth::Upstream));
            let base = url::Url::parse(url.trim_end_matches('/'))?;
            // A fallback URL is often another operator's registry (mirror.gcr.io for Docker
            // Hub): it gets credentials only when its entry names them, its own or "same".
            let credentials = match auth {
                UrlAuth::Anonymous => credentials::Credentials::Anonymous,
                UrlAuth::Upstream => own.clone(),
                UrlAuth::Password { username, password } => {
                    credentials::Credentials::Static(credentials::Credential::Password {
                        username: username.to_owned(),
                        password: password.clone(),
                    })
                }
                UrlAuth::Helper(helper) => {
                    credentials::Credentials::helper(name, helper, url, config, &clock)?
                }
            };
            endpoints.push(Endpoint {
                url: url.to_owned(),
                base,
                auth: auth::Auth::new(
                    name.to_owned(),
                    http.clone(),
                    credentials,
                    takes_client_credentials,
                    metrics.clone(),
                    config.first_byte_timeout,
                ),
                health: health::Health::new(
                    url,
                    config.failure_threshold,
                    config.backoff,
                    clock.clone(),
                ),
                budget: ratelimit::BudgetState::default(),
            });
        }
        anyhow::ensure!(!endpoints.is_empty(), "upstream {name} has no URL");
        let pull_cap = NonZeroU32::new(config.max_pulls).and_then(|n| {
            let quota = Quota::with_period(config.max_pulls_window / n.get())?.allow_burst(n);
            Some(governor::RateLimiter::direct(quota))
        });
        let concurrency = usize::try_from(config.max_concurrent_requests)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| Arc::new(Semaphore::new(n)));
        let request_rate = NonZeroU32::new(config.max_requests_per_second)
            .map(|n| governor::RateLimiter::direct(Quota::per_second(n)));
        Ok(Upstream {
            name: name.to_owned(),
            endpoints,
            served_last: AtomicUsize::new(usize::MAX),
            clock,
            last_outage_log: Mutex::new(None),
            cluster,
            synced_at: Mutex::new(None),
            recent_errors: Mutex::new(std::collections::VecDeque::new()),
            client_budgets: moka::sync::Cache::new(budget::MAX_CLIENT_BUDGETS),
            pull_cap,
            concurrency,
            request_rate,
            counted_pulls: AtomicU64::new(0),
            http,
            config: config.clone(),
            metrics,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Whether the mirror has credentials of its own for this upstream (mixed mode, with
    /// `credentials = "client"`).
    pub fn has_own_credentials(&self) -> bool {
        self.config.credential_helper.is_some()
            || (self.config.username.is_some() && self.config.password.is_some())
    }
}
