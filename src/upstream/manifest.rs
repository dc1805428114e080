//! `HEAD` and `GET` of a manifest: the requests that count as pulls.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};

use super::send::{header_length, Call};
use super::{Error, Upstream};
use crate::identity::Caller;
use crate::oci::{Digest, Reference, RepoName};

/// Manifests larger than this are refused: the distribution registry's own limit.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// A manifest as the upstream answered it.
#[derive(Debug, Clone)]
pub struct ManifestResponse {
    pub media_type: String,
    /// `Docker-Content-Digest`, when the upstream sent a valid one.
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    /// `None` for HEAD.
    pub body: Option<Bytes>,
}

impl Upstream {
    /// `HEAD` or `GET` of a manifest with the given `Accept`.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        caller: &Caller,
        reference: &Reference,
        head: bool,
        accept: &str,
    ) -> Result<ManifestResponse, Error> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(header::ACCEPT, v);
        }
        let (kind, method) = if head {
            ("manifest_head", Method::HEAD)
        } else {
            self.spend_pull().await?;
            ("manifest_get", Method::GET)
        };
        let result = self
            .send(Call {
                kind,
                method,
                repo,
                caller,
                tail: &format!("manifests/{reference}"),
                query: None,
                headers,
                by: None,
            })
            .await;
        let sent = match result {
            Ok(sent) => sent,
            Err(e) => {
                if let Error::TooManyRequests {
                    message,
                    retry_after,
                } = e
                {
                    tracing::error!(upstream = %self.name, %repo, %message, "upstream pull rate limit reached (429)");
                    return Err(Error::TooManyRequests {
                        message,
                        retry_after: retry_after.or_else(|| {
                            self.endpoints
                                .iter()
                                .find_map(|e| e.budget.time_for_one_pull())
                        }),
                    });
                }
                return Err(e);
            }
        };
        let resp = sent.resp;
        match caller {
            // A client's account has a budget of its own (Docker Hub counts per account): not
            // the mirror's, which decides when cached tags are served stale.
            Caller::Client(c) if sent.endpoint == 0 => {
                self.observe_client_budget(c.identity, resp.headers())
            }
            _ => {
                if let Some(budget) = self.observe_budget(sent.endpoint, resp.headers()) {
                    self.share_budget(sent.endpoint, &budget).await;
                }
            }
        }
        if !head {
            self.counted_pulls.fetch_add(1, Ordering::Relaxed);
            self.metrics.counted_pull(&self.name);
        }
        let h = resp.headers();
        let media_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let size = header_length(h);
        let body = if head {
            None
        } else {
            Some(self.read_limited(resp, MAX_MANIFEST_BYTES).await?)
        };
        Ok(ManifestResponse {
            media_type,
            digest,
            size: body.as_ref().map(|b| b.len() as u64).or(size),
            body,
        })
    }
}
