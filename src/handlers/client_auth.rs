//! Clients' own upstream credentials over HTTP (`credentials = "client"`): the challenge that
//! makes clients send them, the token endpoint that takes them (`/_pullthrough/token`, the
//! distribution token protocol's `GET` with Basic auth), and the caller of a repository
//! request, confirmed by the pull layer before anything is answered.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use super::body::Body;
use super::error::{ApiError, Code, Object};
use crate::identity::{self, Clients};
use crate::mirror::{Mirror, Probe, Target};

/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/_pullthrough/token";

/// The `WWW-Authenticate` that sends a client to this mirror's token endpoint, at the host
/// and scheme it reached the mirror by. `None` without a usable `Host`.
fn challenge<B>(clients: &Clients, req: &Request<B>) -> Option<String> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })?;
    // Only what an authority may hold: no quote or space can leave the header's value.
    let host: http::uri::Authority = host.parse().ok()?;
    let scheme = match req.uri().scheme_str() {
        Some(s) => s,
        None if clients.tls() => "https",
        None => "http",
    };
    Some(format!(
        "Bearer realm=\"{scheme}://{host}{TOKEN_PATH}\",service=\"pullthrough\""
    ))
}

fn unauthorized<B>(clients: &Clients, req: &Request<B>, message: &str) -> ApiError {
    let mut e = ApiError::new(StatusCode::UNAUTHORIZED, Code::Unauthorized, message);
    e.challenge = challenge(clients, req);
    e
}

/// `GET /v2/` when an upstream takes clients' credentials: a client that sent none (or a
/// token this mirror does not know) is challenged, so that it sends what it holds for the
/// registry (dockerd, podman and skopeo ask the token endpoint; an anonymous client gets an
/// anonymous token there and goes on).
pub fn base<B>(mirror: &Mirror, req: &Request<B>) -> Result<(), ApiError> {
    let Some(clients) = mirror.clients() else {
        return Ok(());
    };
    match req.headers().get(header::AUTHORIZATION) {
        Some(v) if clients.caller(Some(v)).is_ok() => Ok(()),
        _ => Err(unauthorized(clients, req, "authentication required")),
    }
}

/// `target` confirmed for the caller `req` names (see [`Mirror::authorize`]); a refusal
/// under the client's credentials (or none) is a `401` with the challenge, so that a client
/// that has credentials sends them.
pub async fn caller_target<B>(
    mirror: &Mirror,
    req: &Request<B>,
    target: Target,
    probe: Probe<'_>,
    object: Object,
) -> Result<Target, ApiError> {
    let Some(clients) = mirror.clients() else {
        return Ok(target);
    };
    let caller = clients
        .caller(req.headers().get(header::AUTHORIZATION))
        .map_err(|why| {
            let message = match why {
                identity::Unrecognized::UnknownToken => "the token expired or was not issued here",
                identity::Unrecognized::Malformed => {
                    "the Authorization header is not Basic or Bearer credentials"
                }
            };
            unauthorized(clients, req, message)
        })?;
    mirror.authorize(target, caller, probe).await.map_err(|e| {
        let mut answer = ApiError::from_mirror(e, object);
        if answer.status == StatusCode::UNAUTHORIZED {
            answer.challenge = challenge(clients, req);
        }
        answer
    })
}

#[derive(serde::Serialize)]
struct TokenAnswer<'a> {
    token: &'a str,
    access_token: &'a str,
    expires_in: u64,
}

/// `GET /_pullthrough/token`: a token for the credentials sent as Basic auth (none: an
/// anonymous token). The credentials are not checked here: the upstream checks them when
/// the token is first used, and a token only ever carries the credentials it was issued for.
pub fn token<B>(mirror: &Mirror, req: &Request<B>) -> Result<Response<Body>, ApiError> {
    let Some(clients) = mirror.clients() else {
        return Err(ApiError::not_found());
    };
    let credential = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let basic = v
                .to_str()
                .ok()
                .and_then(|v| v.trim().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                .map(|(_, rest)| identity::basic(rest));
            match basic {
                Some(Ok(credential)) => credential,
                _ => {
                    let mut e = ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        Code::Unauthorized,
                        "the token endpoint takes Basic credentials (or none)",
                    );
                    e.challenge = Some("Basic realm=\"pullthrough\"".into());
                    return Err(e);
                }
            }
        }
    };
    let issued = clients.issue(credential.map(|c| clients.identify(c)));
    let answer = TokenAnswer {
        token: &issued.token,
        access_token: &issued.token,
        expires_in: issued.expires_in.as_secs(),
    };
    let body = serde_json::to_vec(&answer).map_err(|_| ApiError::internal())?;
    let mut resp = super::json(body, false);
    // A token is a credential: never stored by a cache between client and mirror.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
