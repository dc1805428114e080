//! `GET /v2/<name>/referrers/<digest>[?artifactType=…]`: an OCI image index of the manifests
//! whose `subject` is the digest (see the pull layer for caching, filtering and the tag-schema
//! fallback).

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::Response;

use super::body::{self, Body};
use super::{namespace, with_cache_status};
use crate::handlers::error::{ApiError, Object};
use crate::mirror::Mirror;
use crate::oci::{media, Digest, RepoName};

const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

pub async fn list(
    mirror: &Arc<Mirror>,
    name: &RepoName,
    subject: &Digest,
    query: Option<&str>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let err = |e| ApiError::from_mirror(e, Object::Manifest);
    let target = mirror
        .target(namespace(query).as_deref(), name)
        .map_err(err)?;
    let artifact_type = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty());
    let answer = mirror
        .referrers(&target, subject, artifact_type.as_deref())
        .await
        .map_err(err)?;
    let len = answer.body.len();
    let mut resp = Response::new(if head {
        body::empty()
    } else {
        body::full(answer.body)
    });
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(media::OCI_INDEX),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if answer.filtered {
        h.insert(
            OCI_FILTERS_APPLIED,
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(with_cache_status(resp, answer.status))
}
