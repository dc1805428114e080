//! `GET /v2/<name>/tags/list`: passed through to the upstream with the paging parameters.
//!
//! An answer without a `Link` (an upstream's last or only page) is sorted here, as the spec
//! asks; an upstream that ignores `n` and `last` (it sends every tag and no `Link`) is paged
//! too: cut after `last` and to `n`, and a `Link` to the next page (through the mirror) is
//! added when more remain. An upstream that honoured them gives the
//! same page again, so the rule needs no guess at which kind it is.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Response;

use super::body::{self, Body};
use super::Query;
use crate::handlers::error::{ApiError, Object};
use crate::mirror::{Mirror, Target};
use crate::oci::RepoName;
use crate::outcome::CacheStatus;

/// The tags of `target`, which the client asked for as `name` (the name the `Link`s use).
pub async fn list(
    mirror: &Arc<Mirror>,
    target: &Target,
    name: &RepoName,
    query: &Query,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    // Only the paging parameters go upstream; `ns` is ours.
    let paging = query.paging.upstream_query();
    let mut page = mirror
        .tags(target, paging.as_deref())
        .await
        .map_err(|e| ApiError::from_mirror(e, Object::Tags))?;
    let (n, last) = (query.paging.n, query.paging.last.as_deref());
    let ns = query.ns.as_deref();
    // Without a `Link`, the upstream sent its last (or only) page: sorted here, as the spec
    // asks of every answer (lexical order), whatever order the upstream kept.
    if page.link.is_none() {
        if let Some((body, next)) = paginate(&page.body, n, last) {
            page.body = body;
            page.content_type = Some(HeaderValue::from_static("application/json"));
            page.link = next.map(|last| next_link(name, ns, n.unwrap_or(0), &last));
        }
    }
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
    // Relayed from the upstream on every request.
    h.insert(
        super::X_CACHE,
        HeaderValue::from_static(CacheStatus::Miss.x_cache()),
    );
    let link = page.link.map(|l| client_link(&l, name, ns));
    if let Some(Ok(v)) = link.map(|l| HeaderValue::from_str(&l)) {
        h.insert(header::LINK, v);
    }
    Ok(out)
}

/// The page `n`/`last` ask for out of an upstream body `{"name":…,"tags":[…]}`, and the last
/// tag of the page when more follow it. `None` when the body is not a tags list (it is then
/// passed on as it came).
fn paginate(body: &[u8], n: Option<usize>, last: Option<&str>) -> Option<(Bytes, Option<String>)> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let tags = v.get_mut("tags")?;
    let mut names: Vec<String> = match tags.take() {
        serde_json::Value::Null => Vec::new(),
        t => serde_json::from_value(t).ok()?,
    };
    names.sort();
    names.dedup();
    let next = page(&mut names, n, last);
    *tags = serde_json::json!(names);
    Some((Bytes::from(serde_json::to_vec(&v).ok()?), next))
}

/// Cuts sorted `names` to the page `n`/`last` ask for: the names after `last`, at most `n` of
/// them. Returns the page's last name when more follow it (the next page's `last`).
pub(super) fn page(
    names: &mut Vec<String>,
    n: Option<usize>,
    last: Option<&str>,
) -> Option<String> {
    if let Some(last) = last {
        names.retain(|t| t.as_str() > last);
    }
    let more = n.is_some_and(|n| names.len() > n);
    if let Some(n) = n {
        names.truncate(n);
    }
    if more {
        names.last().cloned()
    } else {
        None
    }
}

/// `</v2/<name>/tags/list?n=…&last=…>; rel="next"`, keeping the client's `ns`.
fn next_link(name: &RepoName, ns: Option<&str>, n: usize, last: &str) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(ns) = ns {
        q.append_pair("ns", ns);
    }
    q.append_pair("n", &n.to_string());
    q.append_pair("last", last);
    format!("</v2/{name}/tags/list?{}>; rel=\"next\"", q.finish())
}

/// The upstream's `Link` to its next page, pointed at the mirror and at the name the client
/// asked by, keeping its `ns`: `<https://ghcr.io/v2/org/app/tags/list?n=1&last=a>` asked for as
/// `ghcr.io/org/app` becomes `</v2/ghcr.io/org/app/tags/list?n=1&last=a>`, so the next page
/// comes through the mirror, from the same upstream.
fn client_link(link: &str, name: &RepoName, ns: Option<&str>) -> String {
    let Some((target, rest)) = link
        .trim()
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
    else {
        return link.to_owned();
    };
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(ns) = ns {
        q.append_pair("ns", ns);
    }
    q.extend_pairs(url::form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k != "ns"));
    format!("</v2/{name}/tags/list?{}>{rest}", q.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_an_unpaged_answer() {
        let body = br#"{"name":"a","tags":["c","a","b","d"]}"#;
        let (page, next) = paginate(body, Some(2), None).unwrap();
        assert_eq!(&page[..], br#"{"name":"a","tags":["a","b"]}"#);
        assert_eq!(next.as_deref(), Some("b"));
        let (page, next) = paginate(body, Some(2), Some("b")).unwrap();
        assert_eq!(&page[..], br#"{"name":"a","tags":["c","d"]}"#);
        assert_eq!(next, None);
        let (page, next) = paginate(body, None, Some("c")).unwrap();
        assert_eq!(&page[..], br#"{"name":"a","tags":["d"]}"#);
        assert_eq!(next, None);
        let (page, next) = paginate(body, Some(0), None).unwrap();
        assert_eq!(&page[..], br#"{"name":"a","tags":[]}"#);
        assert_eq!(next, None);
        assert!(paginate(b"not json", Some(1), None).is_none());
    }

    #[test]
    fn upstream_links_point_at_the_mirror_under_the_name_asked_by() {
        let name = |s: &str| s.parse::<RepoName>().unwrap();
        assert_eq!(
            client_link(
                "<https://r.example/v2/a/tags/list?n=2&last=b>; rel=\"next\"",
                &name("a"),
                None
            ),
            "</v2/a/tags/list?n=2&last=b>; rel=\"next\""
        );
        assert_eq!(
            client_link(
                "</v2/org/app/tags/list?n=2&last=b>; rel=\"next\"",
                &name("ghcr.io/org/app"),
                None
            ),
            "</v2/ghcr.io/org/app/tags/list?n=2&last=b>; rel=\"next\""
        );
        assert_eq!(
            client_link(
                "</v2/library/alpine/tags/list?n=2&last=b>; rel=\"next\"",
                &name("alpine"),
                Some("docker.io")
            ),
            "</v2/alpine/tags/list?ns=docker.io&n=2&last=b>; rel=\"next\""
        );
    }
}
