//! `GET`/`HEAD /v2/<name>/manifests/<reference>`, with `ETag` (the quoted digest),
//! `If-None-Match` → `304`, and `Cache-Control: immutable` when asked for by digest.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response};

use super::body::{self, Body};
use super::{content_headers, none_match, not_modified, with_cache_status, DOCKER_CONTENT_DIGEST};
use crate::handlers::error::{ApiError, Object};
use crate::mirror::{ManifestAnswer, Mirror, Target};
use crate::oci::{Accept, ManifestHeaders, Reference};

pub async fn get(
    mirror: &Arc<Mirror>,
    target: &Target,
    reference: &Reference,
    head: bool,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let err = |e| ApiError::from_mirror(e, Object::Manifest);
    let accept = Accept::parse(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let by_digest = matches!(reference, Reference::Digest(_));
    if headers.contains_key(header::IF_NONE_MATCH) {
        let (answer, matched) = mirror
            .conditional_manifest(target, reference, head, &accept, |digest| {
                none_match(headers, digest)
            })
            .await
            .map_err(err)?;
        if matched {
            return Ok(with_cache_status(
                not_modified(&answer.digest, by_digest),
                answer.status,
            ));
        }
        return Ok(response(answer, by_digest));
    }
    let answer = mirror
        .manifest(target, reference, head, &accept)
        .await
        .map_err(err)?;
    Ok(response(answer, by_digest))
}

fn response(m: ManifestAnswer, by_digest: bool) -> Response<Body> {
    let mut resp = Response::new(match m.body {
        Some(b) => body::full(b),
        None => body::empty(),
    });
    // Room for these and what the server adds (the API version, the request id): no regrowth.
    *resp.headers_mut() = HeaderMap::with_capacity(8);
    let h = resp.headers_mut();
    let made = m
        .headers
        .unwrap_or_else(|| ManifestHeaders::new(&m.digest, &m.media_type));
    if let Some(v) = made.content_type {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Some(v) = made.digest {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.size));
    content_headers(h, made.etag, by_digest);
    with_cache_status(resp, m.status)
}
