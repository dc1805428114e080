//! Who may read a repository of an upstream that takes clients' own credentials
//! (`credentials = "client"`): the first request of a caller for a repository is confirmed with
//! the upstream under that caller's credentials (a `HEAD`, never a counted pull), and the
//! answer is remembered per (caller, repository) for `client_confirm_ttl` (a refusal for at
//! most [`REFUSAL_TTL`]). Only then is anything answered, cached content included: blobs are
//! stored once by digest, and this is what keeps one client's private layers from another.
//!
//! Mixed mode (mirror credentials configured as well): what the mirror's own credentials can
//! read is everyone's, and goes out under them; the rest is confirmed per client.

use std::time::{Duration, Instant, SystemTime};

use super::{Error, Mirror, Target};
use crate::identity::{Caller, Who};
use crate::oci::{media, Digest, Reference, RepoName};
use crate::upstream;

/// The longest a refusal is remembered: a client just granted access waits at most this long.
pub const REFUSAL_TTL: Duration = Duration::from_secs(30);

/// The most (caller, repository) answers remembered.
const MAX_CONFIRMATIONS: u64 = 100_000;

/// What a confirmation asks the upstream: the object the request is for, so that the answer
/// is also the request's own (a missing object is a `404` either way).
#[derive(Debug, Clone, Copy)]
pub enum Probe<'a> {
    Manifest(&'a Reference),
    Blob(&'a Digest),
    /// The repository as a whole (tags, referrers): one tag, `tags/list?n=1`.
    Repository,
}

impl Probe<'_> {
    /// Asks the upstream whether it serves this under `target`'s repository to `caller`: a
    /// `HEAD` (or one tag of the list), never a counted pull.
    pub(super) async fn ask(self, target: &Target, caller: &Caller) -> Result<(), upstream::Error> {
        let (up, repo) = (&target.upstream, &target.repo);
        match self {
            Probe::Manifest(reference) => up
                .manifest(repo, caller, reference, true, media::ACCEPT_ALL)
                .await
                .map(drop),
            Probe::Blob(digest) => up.blob_size(repo, caller, digest).await.map(drop),
            Probe::Repository => up.tags(repo, caller, Some("n=1")).await.map(drop),
        }
    }
}

/// Why a caller may not read a repository, as the upstream said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `401`: these credentials (or none) do not get this repository.
    Unauthorized,
    /// `403`.
    Denied,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Readable,
    Refused(Refusal),
}

type Key = (Who, String, RepoName);

/// An answer, when it was given, and how long it holds.
#[derive(Debug, Clone, Copy)]
struct Answer {
    verdict: Verdict,
    at: SystemTime,
    ttl: Duration,
}

impl Answer {
    fn lifetime(&self) -> Duration {
        match self.verdict {
            Verdict::Readable => self.ttl,
            Verdict::Refused(_) => self.ttl.min(REFUSAL_TTL),
        }
    }
}

/// The mirror's clock decides whether an answer still holds (see [`Mirror::confirm`]);
/// moka's expiry only bounds memory.
struct Expiry;

impl moka::Expiry<Key, Answer> for Expiry {
    fn expire_after_create(&self, _: &Key, answer: &Answer, _: Instant) -> Option<Duration> {
        Some(answer.lifetime())
    }
}

/// The remembered answers; concurrent confirmations of one (caller, repository) share one
/// upstream request.
pub(super) struct Confirmations(moka::future::Cache<Key, Answer>);

impl Default for Confirmations {
    fn default() -> Self {
        Confirmations(
            moka::future::Cache::builder()
                .max_capacity(MAX_CONFIRMATIONS)
                .expire_after(Expiry)
                .build(),
        )
    }
}

impl Mirror {
    /// `target` for `caller`: unchanged for an upstream in the default mode; otherwise
    /// confirmed readable by `caller` (or, in mixed mode, by the mirror's own credentials, which
    /// then carry its upstream requests), or refused as the upstream refused it.
    pub async fn authorize(
        &self,
        mut target: Target,
        caller: Caller,
        probe: Probe<'_>,
    ) -> Result<Target, Error> {
        if !target.takes_client_credentials() {
            return Ok(target);
        }
        if target.upstream.has_own_credentials() {
            // The mirror's refusal or a missing object under its credentials: the client's
            // own may see more.
            if let Ok(Verdict::Readable) = self.confirm(&target, &Caller::Mirror, probe).await {
                target.caller = Caller::Mirror;
                return Ok(target);
            }
        }
        match self.confirm(&target, &caller, probe).await? {
            Verdict::Readable => {
                target.caller = caller;
                Ok(target)
            }
            Verdict::Refused(refusal) => {
                tracing::debug!(
                    upstream = %target.registry(), repo = %target.repo, caller = %caller.who(),
                    ?refusal, "the upstream refuses this client the repository"
                );
                Err(Error::NotPermitted { refusal })
            }
        }
    }

    /// Whether `caller` may read `target`'s repository: remembered, or asked now.
    async fn confirm(
        &self,
        target: &Target,
        caller: &Caller,
        probe: Probe<'_>,
    ) -> Result<Verdict, Error> {
        let key = (
            caller.who(),
            target.registry().to_owned(),
            target.repo.clone(),
        );
        let ttl = target.upstream.config().client_confirm_ttl;
        if let Some(answer) = self.access.0.get(&key).await {
            if self.clock.since(answer.at) < answer.lifetime() {
                return Ok(answer.verdict);
            }
            self.access.0.invalidate(&key).await;
        }
        let asked = async {
            let answer = probe.ask(target, caller).await;
            self.metrics
                .client_confirmation(target.registry(), confirmation_label(&answer));
            let verdict = match answer {
                Ok(()) => Verdict::Readable,
                Err(upstream::Error::Unauthorized { .. }) => {
                    Verdict::Refused(Refusal::Unauthorized)
                }
                Err(upstream::Error::Denied { .. }) => Verdict::Refused(Refusal::Denied),
                // A missing object says nothing of the repository: not remembered.
                Err(e) => return Err(Error::from(e)),
            };
            Ok(Answer {
                verdict,
                at: self.clock.now(),
                ttl,
            })
        };
        self.access
            .0
            .try_get_with(key, asked)
            .await
            .map(|answer| answer.verdict)
            .map_err(|e: std::sync::Arc<Error>| (*e).clone())
    }
}

fn confirmation_label(answer: &Result<(), upstream::Error>) -> &'static str {
    match answer {
        Ok(()) => "readable",
        Err(upstream::Error::Unauthorized { .. } | upstream::Error::Denied { .. }) => "refused",
        Err(upstream::Error::NotFound { .. }) => "not_found",
        Err(_) => "failed",
    }
}
