//! `GET /v2/<name>/tags/list`: passed through to the upstream with the paging parameters.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::Response;

use super::body::{self, Body};
use super::namespace;
use crate::handlers::error::{ApiError, Object};
use crate::mirror::Mirror;
use crate::oci::RepoName;

pub async fn list(
    mirror: &Arc<Mirror>,
    name: &RepoName,
    query: Option<&str>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let err = |e| ApiError::from_mirror(e, Object::Tags);
    let target = mirror
        .target(namespace(query).as_deref(), name)
        .map_err(err)?;
    // Only the paging parameters go upstream; `ns` is ours.
    let paging: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .filter(|(k, _)| k == "n" || k == "last"),
        )
        .finish();
    let page = mirror
        .tags(&target, (!paging.is_empty()).then_some(paging.as_str()))
        .await
        .map_err(err)?;
    let len = page.body.len();
    let mut out = Response::new(if head {
        body::empty()
    } else {
        body::full(page.body)
    });
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        page.content_type
            .unwrap_or(HeaderValue::from_static("application/json")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(Ok(v)) = page.link.map(|l| HeaderValue::from_str(&relative_link(&l))) {
        h.insert(header::LINK, v);
    }
    Ok(out)
}

/// `<https://upstream/v2/x/tags/list?n=1&last=a>; rel="next"` → `</v2/x/tags/list?…>; rel="next"`,
/// so the client's next page comes through the mirror too.
fn relative_link(link: &str) -> String {
    let Some((target, rest)) = link
        .trim()
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
    else {
        return link.to_owned();
    };
    let target = match url::Url::parse(target) {
        Ok(u) => match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        },
        Err(_) => target.to_owned(),
    };
    format!("<{target}>{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_become_relative() {
        assert_eq!(
            relative_link("<https://r.example/v2/a/tags/list?n=2&last=b>; rel=\"next\""),
            "</v2/a/tags/list?n=2&last=b>; rel=\"next\""
        );
        assert_eq!(
            relative_link("</v2/a/tags/list?n=2>; rel=\"next\""),
            "</v2/a/tags/list?n=2>; rel=\"next\""
        );
    }
}
