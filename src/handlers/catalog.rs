//! `GET /v2/_catalog`: the repositories this mirror holds (for the registry `ns` names, or
//! for all of them under the names clients pull them by), paged with `n`/`last` and a `Link`
//! to the next page.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::Response;

use super::body::Body;
use super::tags::page;
use super::Query;
use crate::handlers::error::{ApiError, Object};
use crate::mirror::Mirror;
use crate::outcome::CacheStatus;

pub async fn list(
    mirror: &Arc<Mirror>,
    query: &Query,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let ns = query.ns.as_deref();
    let repos = mirror
        .catalog(ns)
        .await
        .map_err(|e| ApiError::from_mirror(e, Object::Tags))?;
    let mut names: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
    let n = query.paging.n;
    let next = page(&mut names, n, query.paging.last.as_deref());
    let json =
        serde_json::to_vec(&serde_json::json!({ "repositories": names })).unwrap_or_default();
    let mut resp = super::json(json, head);
    let h = resp.headers_mut();
    // From what the mirror holds, without asking an upstream.
    h.insert(
        super::X_CACHE,
        HeaderValue::from_static(CacheStatus::Hit.x_cache()),
    );
    if let Some(last) = next {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(ns) = ns {
            q.append_pair("ns", ns);
        }
        q.append_pair("n", &n.unwrap_or(0).to_string());
        q.append_pair("last", &last);
        let link = format!("</v2/_catalog?{}>; rel=\"next\"", q.finish());
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.insert(header::LINK, v);
        }
    }
    Ok(resp)
}
