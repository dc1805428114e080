//! `GET` of a blob (from an offset, streamed) and `HEAD` of one (its size).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method};
use tokio::sync::OwnedSemaphorePermit;

use super::send::{header_length, Call};
use super::{Error, Upstream};
use crate::oci::{Digest, RepoName};

/// A blob body from the upstream, starting at the offset asked for whatever the upstream did
/// with the `Range` (a 200 that ignored it has its leading bytes skipped here).
pub struct BlobBody {
    /// The whole blob's length.
    pub size: u64,
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    /// Leading bytes still to drop (a 200 answer to a Range request).
    skip: u64,
    idle_timeout: Duration,
    upstream: String,
    /// The `max_concurrent_requests` permit, held while the body streams (a registry that
    /// throttles counts the connection, not the request headers) and given back when the
    /// body ends or fails, so that a resume does not wait on the request it replaces.
    permit: Option<OwnedSemaphorePermit>,
}

impl BlobBody {
    /// The next chunk; `None` at the end. Fails if the upstream goes quiet for the idle
    /// timeout or the connection breaks.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            let Some(mut chunk) = self.poll_next().await? else {
                return Ok(None);
            };
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() as u64);
                self.skip -= n;
                chunk = chunk.slice(n as usize..);
            }
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
    }

    async fn poll_next(&mut self) -> Result<Option<Bytes>, Error> {
        let next = tokio::time::timeout(self.idle_timeout, self.stream.next()).await;
        let result = match next {
            Err(_) => Err(Error::Timeout {
                upstream: self.upstream.clone(),
                what: "the next body chunk",
            }),
            Ok(None) => Ok(None),
            Ok(Some(Ok(b))) => return Ok(Some(b)),
            Ok(Some(Err(e))) => Err(Error::from_reqwest(&self.upstream, &e)),
        };
        self.permit = None;
        result
    }
}

impl Upstream {
    /// `GET` of a blob from `offset` on (a `Range` request when `offset > 0`). A fresh
    /// request, so a fresh token and a fresh CDN redirect: also how a cut download resumes.
    /// Its headers come `by` that instant, when given, or it fails with a timeout.
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        by: Option<tokio::time::Instant>,
    ) -> Result<BlobBody, Error> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(header::RANGE, v);
            }
        }
        let path = format!("blobs/{digest}");
        let sent = self
            .send(Call {
                kind: "blob_get",
                method: Method::GET,
                repo,
                tail: &path,
                query: None,
                headers,
                by,
            })
            .await?;
        let resp = sent.resp;
        let protocol = |detail: String| Error::Protocol {
            upstream: self.name.clone(),
            detail,
        };
        let (size, skip) = match resp.status().as_u16() {
            206 => {
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let size = crate::ranges::content_range_total(range, offset).ok_or_else(|| {
                    protocol(format!(
                        "Range bytes={offset}- answered with Content-Range {range:?}"
                    ))
                })?;
                (Some(size), 0)
            }
            // No Range sent, or the upstream ignored it: the body starts at 0.
            200 => (header_length(resp.headers()), offset),
            s => return Err(protocol(format!("blob GET answered status {s}"))),
        };
        let (size, permit) = match size {
            Some(size) => (size, sent.permit),
            // A chunked answer (some registries send one): the size from a HEAD, which costs
            // no pull, under the same permit so that a cap of one never waits on itself.
            None => {
                let head = self
                    .send_with(
                        sent.permit,
                        Call {
                            kind: "blob_head",
                            method: Method::HEAD,
                            repo,
                            tail: &path,
                            query: None,
                            headers: HeaderMap::new(),
                            by,
                        },
                    )
                    .await?;
                let size = header_length(head.resp.headers())
                    .ok_or_else(|| protocol("blob HEAD without Content-Length".into()))?;
                (size, head.permit)
            }
        };
        Ok(BlobBody {
            size,
            stream: resp.bytes_stream().boxed(),
            skip,
            idle_timeout: self.config.idle_timeout,
            upstream: self.name.clone(),
            permit,
        })
    }

    /// `HEAD` of a blob: its size, without downloading it.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, Error> {
        let resp = self
            .send(Call {
                kind: "blob_head",
                method: Method::HEAD,
                repo,
                tail: &format!("blobs/{digest}"),
                query: None,
                headers: HeaderMap::new(),
                by: None,
            })
            .await?
            .resp;
        header_length(resp.headers()).ok_or_else(|| Error::Protocol {
            upstream: self.name.clone(),
            detail: "blob HEAD without Content-Length".into(),
        })
    }
}
