//! The pull layer's error: what went wrong, with its typed cause kept. Cloneable, because one
//! failure of a shared fetch is handed to every request that waited on it. Mapped to HTTP in
//! one place, `crate::handlers::error`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::download;
use crate::oci::{Digest, RepoName};
use crate::outcome::ObjectKind;
use crate::upstream;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The upstream refused or failed.
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    /// The upstream's bytes do not hash to the digest they were asked for (or claimed).
    #[error("upstream {kind} does not match its digest {expected} (got {actual})", kind = .kind.as_str())]
    DigestMismatch {
        kind: ObjectKind,
        expected: Digest,
        actual: String,
    },
    /// The upstream's content for the blob did not match its digest a moment ago: it is not
    /// fetched again until `retry_in` has passed.
    #[error("upstream content for {digest} did not match it; not fetched again for {retry_in:?}")]
    MismatchBackoff { digest: Digest, retry_in: Duration },
    /// The local cache could not be read or written.
    #[error("cache storage failed while {what}: {source}")]
    Storage {
        what: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
    /// No upstream is configured for the registry asked for.
    #[error("registry {0} is not mirrored")]
    NotMirrored(String),
    /// The upstream's policy (`allow_repositories` / `deny_repositories`) does not mirror
    /// the repository.
    #[error("repository {repo} of {registry} is refused by the mirror's policy")]
    Refused { registry: String, repo: RepoName },
    /// The manifest exists, but only as `available`, which the client's `Accept` excludes.
    #[error("the manifest is available only as {available}")]
    NotAcceptable { available: String },
    /// The content is cached, but the upstream does not serve it for the repository asked
    /// for (404, or access refused): it is not there, for that repository.
    #[error("the {} is not in this repository upstream", .kind.as_str())]
    NotInRepository { kind: ObjectKind },
    /// The upstream refuses the client's own credentials (or their absence) this repository
    /// (`credentials = "client"`).
    #[error("the upstream refuses this client the repository ({refusal:?})")]
    NotPermitted { refusal: super::access::Refusal },
    /// A replica-to-replica request without the cluster secret (or to a replica without a
    /// cluster).
    #[error("a peer request without the cluster secret")]
    PeerUnauthorized,
    /// A peer asked for a blob this replica neither holds nor is downloading.
    #[error("this replica does not have the blob")]
    PeerMissing,
    /// The work a request waited on ended without an answer (its task panicked).
    #[error("a shared fetch was abandoned: {0}")]
    Abandoned(&'static str),
}

impl Error {
    pub(crate) fn storage(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |e| Error::Storage {
            what,
            source: Arc::new(e),
        }
    }
}

impl From<crate::singleflight::Abandoned> for Error {
    fn from(_: crate::singleflight::Abandoned) -> Self {
        Error::Abandoned("the leader's task panicked")
    }
}

impl From<download::Failure> for Error {
    fn from(f: download::Failure) -> Self {
        match f {
            download::Failure::Upstream(e) => Error::Upstream(e),
            download::Failure::DigestMismatch { expected, actual } => Error::DigestMismatch {
                kind: ObjectKind::Blob,
                expected,
                actual,
            },
            download::Failure::MismatchBackoff { digest, retry_in } => {
                Error::MismatchBackoff { digest, retry_in }
            }
            download::Failure::Storage(source) => Error::Storage {
                what: "writing a downloaded blob",
                source,
            },
            download::Failure::Panicked => Error::Abandoned("the download task panicked"),
            download::Failure::Cut(_) => Error::Abandoned("the download was cut too often"),
            download::Failure::SizeChanged { .. } => {
                Error::Abandoned("a resume answered another size for the blob")
            }
            download::Failure::WaitTimeout { upstream, waiting } => {
                Error::Upstream(crate::upstream::Error::Timeout {
                    upstream,
                    what: waiting.what(),
                })
            }
            download::Failure::Dangling => {
                Error::Abandoned("the download ended without an outcome")
            }
        }
    }
}
