//! `GET tags/list`: one page of a repository's tags.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};

use super::send::Call;
use super::{Error, Upstream, MAX_MANIFEST_BYTES};
use crate::identity::Caller;
use crate::oci::RepoName;

/// One page of a repository's tags, as the upstream sent it.
pub struct TagsPage {
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    /// The `Link` header (next page), as sent.
    pub link: Option<String>,
}

impl Upstream {
    /// `GET tags/list`, passed through with the client's query (`n`, `last`).
    pub async fn tags(
        &self,
        repo: &RepoName,
        caller: &Caller,
        query: Option<&str>,
    ) -> Result<TagsPage, Error> {
        let sent = self
            .send(Call {
                kind: "tags",
                method: Method::GET,
                repo,
                caller,
                tail: "tags/list",
                query,
                headers: HeaderMap::new(),
                by: None,
            })
            .await?;
        let resp = sent.resp;
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let body = self.read_limited(resp, MAX_MANIFEST_BYTES).await?;
        Ok(TagsPage {
            body,
            content_type,
            link,
        })
    }
}
