//! Where the credentials of one upstream URL come from: none, a configured username and
//! password (the upstream's, or the URL's own), or a Docker credential helper run on demand.
//!
//! The helper protocol (docker-credential-helpers): `docker-credential-<name> get` reads the
//! registry host on stdin and prints `{"ServerURL":…,"Username":…,"Secret":…}`; it exits
//! non-zero (with a message on stdout) when it has nothing. A `Username` of `<token>` means
//! `Secret` is an identity token, which is exchanged at the token realm (OAuth2 refresh-token
//! grant) rather than sent as a password. The helper's output is never logged: it holds the
//! secret, and its messages may too.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::Error;
use crate::clock::Clock;
use crate::config::{Secret, UpstreamConfig};

/// How long a helper may take: ecr-login and its kind call a cloud API, which takes seconds.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// The `Username` by which a helper says its `Secret` is an identity token.
const IDENTITY_TOKEN_USER: &str = "<token>";

pub use crate::identity::Credential;

/// The source of the credentials of one upstream URL. Cloning shares a helper, and its last
/// answer, between URLs that get the same credentials.
#[derive(Clone)]
pub enum Credentials {
    Anonymous,
    Static(Credential),
    Helper(Arc<Helper>),
}

impl Credentials {
    /// A credential helper asked for the host (`host[:port]`) of `url`, run at most every
    /// `credential_lifetime` of `config`.
    pub fn helper(
        upstream: &str,
        helper: &str,
        url: &str,
        config: &UpstreamConfig,
        clock: &Clock,
    ) -> anyhow::Result<Credentials> {
        let base = url::Url::parse(url)?;
        let host = match base.port() {
            Some(port) => format!("{}:{port}", base.host_str().unwrap_or_default()),
            None => base.host_str().unwrap_or_default().to_owned(),
        };
        Ok(Credentials::Helper(Arc::new(Helper::new(
            upstream,
            helper,
            host,
            config.credential_lifetime,
            clock.clone(),
        ))))
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Credentials::Anonymous)
    }

    /// The credentials to use now; a helper is run when its last answer is older than its
    /// lifetime.
    pub async fn get(&self) -> Result<Option<Credential>, Error> {
        match self {
            Credentials::Anonymous => Ok(None),
            Credentials::Static(c) => Ok(Some(c.clone())),
            Credentials::Helper(h) => h.get().await.map(Some),
        }
    }
}

#[derive(Clone)]
struct Answer {
    credential: Credential,
    at: SystemTime,
}

#[derive(Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: Secret,
}

/// A Docker credential helper for one registry host, with its last answer.
pub struct Helper {
    upstream: String,
    program: PathBuf,
    server: String,
    lifetime: Duration,
    clock: Clock,
    /// The last answer; moka so that concurrent requests at expiry run the helper once.
    answer: moka::future::Cache<(), Answer>,
}

impl Helper {
    /// `helper` as configured: a name (`ecr-login` → `docker-credential-ecr-login` on `PATH`)
    /// or, containing `/`, the program's path. `server` is what the helper reads on stdin:
    /// the registry host.
    pub fn new(
        upstream: &str,
        helper: &str,
        server: String,
        lifetime: Duration,
        clock: Clock,
    ) -> Helper {
        let program = if helper.contains('/') {
            PathBuf::from(helper)
        } else {
            PathBuf::from(format!("docker-credential-{helper}"))
        };
        Helper {
            upstream: upstream.to_owned(),
            program,
            server,
            lifetime,
            clock,
            answer: moka::future::Cache::new(1),
        }
    }

    async fn get(&self) -> Result<Credential, Error> {
        if let Some(a) = self.answer.get(&()).await {
            if self.clock.since(a.at) < self.lifetime {
                return Ok(a.credential);
            }
            self.answer.invalidate(&()).await;
        }
        self.answer
            .try_get_with((), self.run())
            .await
            .map(|a| a.credential)
            .map_err(|e: std::sync::Arc<Error>| (*e).clone())
    }

    fn failed(&self, detail: String) -> Error {
        tracing::warn!(upstream = %self.upstream, helper = %self.program.display(), %detail, "credential helper failed");
        Error::Credentials {
            upstream: self.upstream.clone(),
            detail,
        }
    }

    async fn run(&self) -> Result<Answer, Error> {
        let name = self.program.display();
        let output = tokio::time::timeout(HELPER_TIMEOUT, async {
            let mut child = tokio::process::Command::new(&self.program)
                .arg("get")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                // Its messages may name accounts or hold secrets: not logged, not forwarded.
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(self.server.as_bytes()).await?;
            }
            child.wait_with_output().await
        })
        .await
        .map_err(|_| self.failed(format!("{name} did not answer within {HELPER_TIMEOUT:?}")))?
        .map_err(|e| self.failed(format!("cannot run {name}: {e}")))?;
        if !output.status.success() {
            return Err(self.failed(format!("{name} get exited with {}", output.status)));
        }
        let out: HelperOutput = serde_json::from_slice(&output.stdout).map_err(|_| {
            self.failed(format!(
                "{name} get did not print the helper protocol's JSON (Username, Secret)"
            ))
        })?;
        if out.secret.expose().is_empty() {
            return Err(self.failed(format!("{name} get answered an empty Secret")));
        }
        let credential = if out.username == IDENTITY_TOKEN_USER {
            Credential::IdentityToken(out.secret)
        } else {
            Credential::Password {
                username: out.username,
                password: out.secret,
            }
        };
        tracing::info!(upstream = %self.upstream, helper = %name, "credential helper answered");
        Ok(Answer {
            credential,
            at: self.clock.now(),
        })
    }
}
