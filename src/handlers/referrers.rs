//! `GET /v2/<name>/referrers/<digest>[?artifactType=…]`: an OCI image index of the manifests
//! whose `subject` is the digest (see the pull layer for caching, filtering and the tag-schema
//! fallback).

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::Response;

use super::body::{self, Body};
use super::with_cache_status;
use crate::handlers::error::{ApiError, Object};
use crate::mirror::{Mirror, Target};
use crate::oci::{media, Digest};

const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

pub async fn list(
    mirror: &Arc<Mirror>,
    target: &Target,
    subject: &Digest,
    artifact_type: Option<&str>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let answer = mirror
        .referrers(target, subject, artifact_type)
        .await
        .map_err(|e| ApiError::from_mirror(e, Object::Manifest))?;
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
