//! `GET`/`HEAD /v2/<name>/manifests/<reference>`.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response};

use super::body::{self, Body};
use super::{namespace, with_cache_status, DOCKER_CONTENT_DIGEST};
use crate::handlers::error::{ApiError, Object};
use crate::mirror::{ManifestAnswer, Mirror};
use crate::oci::{Accept, Reference, RepoName};

pub async fn get(
    mirror: &Arc<Mirror>,
    name: &RepoName,
    reference: &Reference,
    head: bool,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let err = |e| ApiError::from_mirror(e, Object::Manifest);
    let target = mirror
        .target(namespace(query).as_deref(), name)
        .map_err(err)?;
    let accept = Accept::parse(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let answer = mirror
        .manifest(&target, reference, head, &accept)
        .await
        .map_err(err)?;
    Ok(response(answer))
}

fn response(m: ManifestAnswer) -> Response<Body> {
    let mut resp = Response::new(match m.body {
        Some(b) => body::full(b),
        None => body::empty(),
    });
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&m.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&m.digest.to_string()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.size));
    with_cache_status(resp, m.status)
}
