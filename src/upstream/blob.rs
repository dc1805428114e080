//! `GET` of a blob (from an offset, streamed) and `HEAD` of one (its size).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method};
use tokio::sync::OwnedSemaphorePermit;

use super::send::{header_length, Call};
use super::{Error, Upstream};
use crate::identity::Caller;
use crate::oci::{Digest, RepoName};
use crate::ranges::Spec;

/// A blob body from the upstream: the bytes asked for, starting where they were asked
/// whatever the upstream did with the `Range` (a 200 that ignored it has its leading bytes
/// skipped here and its tail left unread).
pub struct BlobBody {
    /// The whole blob's length.
    pub size: u64,
    /// Whether the upstream answered the range itself (`206`): it serves ranges, so a
    /// download may fetch parts in parallel.
    pub ranged: bool,
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    /// Leading bytes still to drop (a 200 answer to a Range request).
    skip: u64,
    /// Bytes still to hand out.
    remaining: u64,
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
        while self.remaining > 0 {
            let Some(mut chunk) = self.poll_next().await? else {
                return Ok(None);
            };
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() as u64);
                self.skip -= n;
                chunk = chunk.slice(n as usize..);
            }
            if chunk.len() as u64 > self.remaining {
                chunk = chunk.slice(..self.remaining as usize);
            }
            self.remaining -= chunk.len() as u64;
            if self.remaining == 0 {
                self.permit = None;
            }
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
        Ok(None)
    }

    /// The body as a stream of chunks, ending where [`BlobBody::next_chunk`] ends.
    pub fn into_chunks(self) -> futures_util::stream::BoxStream<'static, Result<Bytes, Error>> {
        futures_util::stream::try_unfold(self, |mut body| async move {
            let chunk = body.next_chunk().await?;
            Ok(chunk.map(|c| (c, body)))
        })
        .boxed()
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
    /// `GET` of a blob from `offset` on (a `Range` request when `offset > 0`, or when the
    /// upstream's blobs may be fetched in parts: a `206` then says it serves ranges). A fresh
    /// request, so a fresh token and a fresh CDN redirect: also how a cut download resumes.
    /// Its headers come `by` that instant, when given, or it fails with a timeout.
    pub async fn blob(
        &self,
        repo: &RepoName,
        caller: &Caller,
        digest: &Digest,
        offset: u64,
        by: Option<tokio::time::Instant>,
    ) -> Result<BlobBody, Error> {
        let spec = Spec::From {
            first: offset,
            last: None,
        };
        let ask = offset > 0 || self.config.parallel_parts > 1;
        self.blob_bytes(repo, caller, digest, spec, ask, by).await
    }

    /// `GET` of the bytes `spec` names (a `Range` request): a part of a download, or a
    /// client's range fetched before the download reaches it.
    pub async fn blob_range(
        &self,
        repo: &RepoName,
        caller: &Caller,
        digest: &Digest,
        spec: Spec,
        by: Option<tokio::time::Instant>,
    ) -> Result<BlobBody, Error> {
        self.blob_bytes(repo, caller, digest, spec, true, by).await
    }

    async fn blob_bytes(
        &self,
        repo: &RepoName,
        caller: &Caller,
        digest: &Digest,
        spec: Spec,
        ask: bool,
        by: Option<tokio::time::Instant>,
    ) -> Result<BlobBody, Error> {
        let mut headers = HeaderMap::new();
        if ask {
            if let Ok(v) = HeaderValue::from_str(&spec.header()) {
                headers.insert(header::RANGE, v);
            }
        }
        let path = format!("blobs/{digest}");
        let sent = self
            .send(Call {
                kind: "blob_get",
                method: Method::GET,
                repo,
                caller,
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
        let (size, span, ranged) = match resp.status().as_u16() {
            206 => {
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                // The answer must be exactly what was asked of a blob of its total size.
                let answered = crate::ranges::content_range(range)
                    .filter(|(first, last, total)| spec.resolve(*total) == Some((*first, last + 1)))
                    .ok_or_else(|| {
                        protocol(format!(
                            "Range {} answered with Content-Range {range:?}",
                            spec.header()
                        ))
                    })?;
                (Some(answered.2), Some((answered.0, answered.1 + 1)), true)
            }
            // No Range sent, or the upstream ignored it: the body is the whole blob.
            200 => (header_length(resp.headers()), None, false),
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
                            caller,
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
        let (start, end, skip) = match span {
            Some((start, end)) => (start, end, 0),
            None => {
                let (start, end) = spec.resolve(size).ok_or_else(|| {
                    protocol(format!(
                        "Range {} lies outside the blob's {size} bytes",
                        spec.header()
                    ))
                })?;
                (start, end, start)
            }
        };
        Ok(BlobBody {
            size,
            ranged,
            stream: resp.bytes_stream().boxed(),
            skip,
            remaining: end - start,
            idle_timeout: self.config.idle_timeout,
            upstream: self.name.clone(),
            permit,
        })
    }

    /// `HEAD` of a blob: its size, without downloading it.
    pub async fn blob_size(
        &self,
        repo: &RepoName,
        caller: &Caller,
        digest: &Digest,
    ) -> Result<u64, Error> {
        let resp = self
            .send(Call {
                kind: "blob_head",
                method: Method::HEAD,
                repo,
                caller,
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
