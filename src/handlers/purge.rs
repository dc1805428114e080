//! The admin API of purges and refreshes (what `pullthrough cache purge|refresh --mirror`
//! calls): `POST /_pullthrough/cache/purge?reference=REF` (a tag, `repo@digest`, or a
//! repository: every tag of it), `POST /_pullthrough/cache/purge?digest=sha256:…`, and
//! `POST /_pullthrough/cache/refresh?reference=REF`. Clients are admitted as for `/metrics`
//! (address allow-list and credentials). The answer is JSON; bad input is a registry error.

use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};

use super::body::Body;
use super::error::{ApiError, Code, Object};
use crate::mirror::purge::Subject;
use crate::mirror::Mirror;
use crate::oci::Digest;

/// Who sent an admin request, as admission found it: put in the request's extensions by the
/// server, for the log line of a purge. Never the credential itself.
#[derive(Debug, Clone)]
pub struct Requester {
    pub client: IpAddr,
    /// `token #2` (its place in `server.tokens`), `user alice` (htpasswd), or `None` when the
    /// mirror asks for no credentials.
    pub credential: Option<String>,
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.credential {
            Some(c) => write!(f, "{} with {c}", self.client),
            None => write!(f, "{} (no credentials asked)", self.client),
        }
    }
}

/// The `reference` and `digest` parameters of the query.
fn params(query: Option<&str>) -> (Option<String>, Option<String>) {
    let (mut reference, mut digest) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "reference" => reference = Some(v.into_owned()),
            "digest" => digest = Some(v.into_owned()),
            _ => {}
        }
    }
    (reference, digest)
}

fn bad_request(code: Code, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

fn post_only<B>(req: &Request<B>) -> Result<(), ApiError> {
    if req.method() == Method::POST {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::Unsupported,
        "purges and refreshes are POST requests",
    ))
}

fn reference(value: &str) -> Result<Subject, ApiError> {
    value.parse().map_err(|e: String| {
        let code = if value.starts_with("sha256:") || value.contains('@') {
            Code::DigestInvalid
        } else {
            Code::NameInvalid
        };
        bad_request(code, e)
    })
}

fn who<B>(req: &Request<B>) -> String {
    req.extensions()
        .get::<Requester>()
        .map_or_else(|| "an unknown client".to_owned(), Requester::to_string)
}

fn answer(value: &impl serde::Serialize) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|_| ApiError::internal())?;
    Ok(super::json(bytes, false))
}

/// `POST /_pullthrough/cache/purge`: what was removed, as `mirror::purge::Purged` (with
/// `found: false` when there was nothing to purge).
pub async fn purge<B>(mirror: &Arc<Mirror>, req: &Request<B>) -> Result<Response<Body>, ApiError> {
    post_only(req)?;
    let subject = match params(req.uri().query()) {
        (Some(r), None) => reference(&r)?,
        (None, Some(d)) => Subject::Digest(
            d.parse::<Digest>()
                .map_err(|e| bad_request(Code::DigestInvalid, e.to_string()))?,
        ),
        _ => {
            return Err(bad_request(
                Code::Unsupported,
                "name what to purge: one reference= (a tag, repository@digest or repository) or one digest=",
            ))
        }
    };
    let purged = mirror
        .purge(&subject, &who(req))
        .await
        .map_err(|e| ApiError::from_mirror(e, Object::Manifest))?;
    answer(&purged)
}

/// `POST /_pullthrough/cache/refresh`: `{"refreshed": [...]}`, one entry per tag revalidated.
pub async fn refresh<B>(
    mirror: &Arc<Mirror>,
    req: &Request<B>,
) -> Result<Response<Body>, ApiError> {
    post_only(req)?;
    let (Some(value), None) = params(req.uri().query()) else {
        return Err(bad_request(
            Code::Unsupported,
            "name what to refresh: one reference= (a tag or a repository)",
        ));
    };
    let subject = reference(&value)?;
    let Some((registry, repo, tag)) = subject.tags() else {
        return Err(bad_request(
            Code::TagInvalid,
            format!("{subject} is named by its digest, which never changes: nothing to refresh"),
        ));
    };
    let refreshed = mirror
        .refresh(registry, repo, tag, &who(req))
        .await
        .map_err(|e| ApiError::from_mirror(e, Object::Manifest))?;
    answer(&serde_json::json!({ "refreshed": refreshed }))
}
