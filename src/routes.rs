//! Routing: a pure function from method and path to a [`Route`] ([`parse`]), and the one
//! `match` that sends each route to its handler ([`dispatch`]).
//!
//! Repository names contain slashes, so the name is whatever precedes the *last*
//! `/manifests/`, `/blobs/` or `/tags/list`. Paths are not percent-decoded: `%` is not in the
//! name, tag or digest grammar, so an encoded `..` is simply an invalid name.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response};

use crate::handlers::body::Body;
use crate::handlers::error::{ApiError, Object};
use crate::handlers::{
    blobs, catalog, client_auth, manifests, ops, pins, purge, referrers, tags, Query,
};
use crate::mirror::{self, Housekeeping, Mirror, Probe, Target};
use crate::oci::{Digest, ParseError, Reference, RepoName};
use crate::sendfile::Sendfile;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check.
    Base,
    Manifest {
        name: RepoName,
        reference: Reference,
        head: bool,
    },
    Blob {
        name: RepoName,
        digest: Digest,
        head: bool,
    },
    TagsList {
        name: RepoName,
    },
    /// `GET /v2/_catalog`: the repositories the mirror holds.
    Catalog,
    /// `GET /v2/<name>/referrers/<digest>` (OCI 1.1).
    Referrers {
        name: RepoName,
        digest: Digest,
    },
    /// A manifest reference that fails the tag grammar (and is not a digest): a manifest that
    /// cannot exist, answered `404 MANIFEST_UNKNOWN` without asking the upstream.
    NoSuchManifest {
        name: RepoName,
        reference: String,
    },
    /// A blob, manifest or referrers subject named by a digest of another algorithm than
    /// sha256: content the mirror never holds, answered `404` without asking the upstream.
    UnsupportedDigest {
        name: RepoName,
        object: Object,
    },
    /// `GET /_pullthrough/peer/blobs/<digest>`: another replica streaming a blob this one
    /// holds or is downloading (authenticated by the cluster secret).
    PeerBlob {
        digest: Digest,
    },
    /// `GET /_pullthrough/token`: this mirror's token endpoint, for clients that send their
    /// own upstream credentials (`credentials = "client"`).
    Token,
    Healthz,
    Readyz,
    Metrics,
    Status,
    /// The status page: `/` and `/_pullthrough/ui`.
    Ui,
    /// `/_pullthrough/cache/purge` (admin API; POST).
    Purge,
    /// `/_pullthrough/cache/refresh` (admin API; POST).
    Refresh,
    /// `/_pullthrough/pins`: list (`GET`), pin (`POST`) and unpin (`DELETE`) images.
    Pins,
    /// A well-formed request the mirror never serves: pushes, deletes, uploads.
    Unsupported,
    /// A name, tag or digest that fails the grammar.
    Invalid(ParseError),
    /// An HTTP/1.1 request without exactly one `Host` header (see [`host_is_valid`]).
    BadHost,
    NotFound,
}

impl Route {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "ping",
            Route::Manifest { .. } | Route::NoSuchManifest { .. } => "manifest",
            Route::UnsupportedDigest { object, .. } => match object {
                Object::Blob => "blob",
                _ => "manifest",
            },
            Route::Blob { .. } => "blob",
            Route::TagsList { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Catalog => "catalog",
            Route::PeerBlob { .. } => "peer",
            Route::Purge | Route::Refresh => "admin",
            _ => "other",
        }
    }

    /// The tag or digest the request names, for its log line and trace.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Route::Manifest { reference, .. } => Some(reference.as_str()),
            Route::Blob { digest, .. } | Route::Referrers { digest, .. } => Some(digest.as_str()),
            _ => None,
        }
    }

    pub fn repository(&self) -> Option<&RepoName> {
        match self {
            Route::Manifest { name, .. }
            | Route::NoSuchManifest { name, .. }
            | Route::UnsupportedDigest { name, .. }
            | Route::Blob { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Where a route that names a repository goes: the upstream and the repository as it knows
/// it ([`Mirror::resolve`], by `ns`, a registry prefix or alias), or why nowhere; `None` for
/// a route without a repository. Resolved once per request, by the server (its access line
/// names the target even of a refused request), and handed to [`dispatch`].
pub fn target(
    mirror: &Mirror,
    route: &Route,
    query: &Query,
) -> Option<Result<Target, mirror::Error>> {
    route
        .repository()
        .map(|name| mirror.resolve(query.ns.as_deref(), name))
}

/// Answers `req`, which was routed to `route`, with its `query` (parsed once, at the edge) and
/// its `target` (from [`target`]); blob bodies go out as `files` says (zero-copy or in chunks
/// of a size, by connection: see `sendfile`). Every registry API answer carries
/// `Docker-Distribution-Api-Version` (errors get it in [`ApiError::into_response`]).
pub async fn dispatch<B>(
    mirror: &Arc<Mirror>,
    route: &Route,
    req: &Request<B>,
    query: &Query,
    target: Option<Result<Target, mirror::Error>>,
    files: Option<Sendfile>,
) -> Result<Response<Body>, ApiError> {
    let mut resp = answer(mirror, route, req, query, target, files).await?;
    if !matches!(
        route,
        Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::Status
            | Route::Pins
            | Route::PeerBlob { .. }
            | Route::Purge
            | Route::Refresh
    ) {
        resp.headers_mut().insert(
            HeaderName::from_static("docker-distribution-api-version"),
            HeaderValue::from_static("registry/2.0"),
        );
    }
    Ok(resp)
}

async fn answer<B>(
    mirror: &Arc<Mirror>,
    route: &Route,
    req: &Request<B>,
    query: &Query,
    target: Option<Result<Target, mirror::Error>>,
    files: Option<Sendfile>,
) -> Result<Response<Body>, ApiError> {
    // The target of a route naming `name`, admitted by its upstream's policy; resolved here
    // only when the caller passed none.
    let admitted = |name: &RepoName, object| {
        target
            .unwrap_or_else(|| mirror.resolve(query.ns.as_deref(), name))
            .and_then(|target| mirror.admit(target))
            .map_err(|e| ApiError::from_mirror(e, object))
    };
    let head = req.method() == Method::HEAD;
    match route {
        Route::Base => {
            client_auth::base(mirror, req)?;
            Ok(ops::base())
        }
        // An upstream that takes clients' credentials confirms the caller's access first
        // (boxed: only those requests carry its state).
        Route::Manifest {
            name,
            reference,
            head,
        } => {
            let mut target = admitted(name, Object::Manifest)?;
            if target.takes_client_credentials() {
                let probe = Probe::Manifest(reference);
                let confirmed =
                    client_auth::caller_target(mirror, req, target, probe, Object::Manifest);
                target = Box::pin(confirmed).await?;
            }
            manifests::get(mirror, &target, reference, *head, req.headers()).await
        }
        Route::Blob { name, digest, head } => {
            let mut target = admitted(name, Object::Blob)?;
            if target.takes_client_credentials() {
                let probe = Probe::Blob(digest);
                let confirmed =
                    client_auth::caller_target(mirror, req, target, probe, Object::Blob);
                target = Box::pin(confirmed).await?;
            }
            blobs::get(mirror, &target, digest, *head, req.headers(), files).await
        }
        // The rarer answers are boxed: inline, their state would make every request's future
        // (moved into its task) kilobytes larger.
        Route::TagsList { name } => {
            let mut target = admitted(name, Object::Tags)?;
            if target.takes_client_credentials() {
                let probe = Probe::Repository;
                let confirmed =
                    client_auth::caller_target(mirror, req, target, probe, Object::Tags);
                target = Box::pin(confirmed).await?;
            }
            Box::pin(tags::list(mirror, &target, name, query, head)).await
        }
        Route::Catalog => Box::pin(catalog::list(mirror, query, head)).await,
        Route::Referrers { name, digest } => {
            let mut target = admitted(name, Object::Manifest)?;
            if target.takes_client_credentials() {
                let probe = Probe::Repository;
                let confirmed =
                    client_auth::caller_target(mirror, req, target, probe, Object::Manifest);
                target = Box::pin(confirmed).await?;
            }
            let artifact_type = query.artifact_type.as_deref();
            Box::pin(referrers::list(
                mirror,
                &target,
                digest,
                artifact_type,
                head,
            ))
            .await
        }
        Route::NoSuchManifest { reference, .. } => Err(ApiError::manifest_unknown(reference)),
        Route::UnsupportedDigest { object, .. } => Err(ApiError::unsupported_digest(*object)),
        Route::PeerBlob { digest } => {
            Box::pin(blobs::peer(mirror, digest, req.headers(), files)).await
        }
        Route::Token => client_auth::token(mirror, req),
        Route::Healthz => Ok(ops::healthz()),
        Route::Readyz => Ok(Box::pin(ops::readyz(&Housekeeping::of(mirror))).await),
        Route::Metrics => Ok(ops::metrics(&Housekeeping::of(mirror), req.headers())),
        Route::Status => Ok(Box::pin(ops::status(&Housekeeping::of(mirror))).await),
        Route::Pins => {
            let hk = Housekeeping::of(mirror);
            Box::pin(pins::handle(&hk, req.method(), req.uri().query())).await
        }
        Route::Ui => Ok(ops::ui()),
        Route::Purge => Box::pin(purge::purge(mirror, req)).await,
        Route::Refresh => Box::pin(purge::refresh(mirror, req)).await,
        Route::Unsupported => Err(ApiError::unsupported()),
        Route::Invalid(e) => Err(e.clone().into()),
        Route::BadHost => Err(ApiError::bad_host()),
        Route::NotFound => Err(ApiError::not_found()),
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`. HTTP/1.0 may omit it, and
/// HTTP/2 names its authority in a pseudo-header instead.
pub fn host_is_valid(version: http::Version, headers: &http::HeaderMap) -> bool {
    version != http::Version::HTTP_11 || headers.get_all(http::header::HOST).iter().count() == 1
}

/// `path.rfind(segment)` for a `segment` that starts with `/`: only the path's slashes are
/// tried (a substring searcher's set-up cost more than the search, on every request).
fn rfind_segment(path: &str, segment: &str) -> Option<usize> {
    path.rmatch_indices('/')
        .map(|(i, _)| i)
        .find(|&i| path[i..].starts_with(segment))
}

pub fn parse(method: &Method, path: &str) -> Route {
    let read = method == Method::GET || method == Method::HEAD;
    let head = method == Method::HEAD;
    let operational = match path {
        "/healthz" => Some(Route::Healthz),
        "/readyz" => Some(Route::Readyz),
        "/metrics" => Some(Route::Metrics),
        "/_pullthrough/status" => Some(Route::Status),
        // A POST (the OAuth2 form) is 405, after which containerd asks with a GET.
        crate::handlers::client_auth::TOKEN_PATH => Some(Route::Token),
        "/" | "/_pullthrough/ui" => Some(Route::Ui),
        _ => None,
    };
    if let Some(route) = operational {
        return if read { route } else { Route::Unsupported };
    }
    // Any method: the handler answers anything but POST with what it takes.
    match path {
        "/_pullthrough/cache/purge" => return Route::Purge,
        "/_pullthrough/cache/refresh" => return Route::Refresh,
        "/_pullthrough/pins" => return Route::Pins,
        _ => {}
    }
    if let Some(digest) = path.strip_prefix(crate::peer_api::BLOBS_PATH) {
        if method != Method::GET {
            return Route::Unsupported;
        }
        return match digest.parse() {
            Ok(digest) => Route::PeerBlob { digest },
            Err(e) => Route::Invalid(e),
        };
    }
    let rest = match path {
        "/v2" => "",
        _ => match path.strip_prefix("/v2/") {
            Some(rest) => rest,
            None => return Route::NotFound,
        },
    };
    if rest.is_empty() {
        return if read {
            Route::Base
        } else {
            Route::Unsupported
        };
    }
    // `_catalog` cannot be a repository name (a component never starts with `_`).
    if rest == "_catalog" {
        return if read {
            Route::Catalog
        } else {
            Route::Unsupported
        };
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        if !read {
            return Route::Unsupported;
        }
        return match name.parse() {
            Ok(name) => Route::TagsList { name },
            Err(e) => Route::Invalid(e),
        };
    }
    // The digest has no `/`, so a `/referrers/` followed by one is part of a longer path.
    if let Some(i) = rfind_segment(rest, "/referrers/") {
        let (name, digest) = (&rest[..i], &rest[i + "/referrers/".len()..]);
        if !digest.contains('/') {
            if !read {
                return Route::Unsupported;
            }
            return match (name.parse(), digest.parse()) {
                (Ok(name), Ok(digest)) => Route::Referrers { name, digest },
                (Ok(name), Err(ParseError::UnsupportedDigest(_))) => Route::UnsupportedDigest {
                    name,
                    object: Object::Manifest,
                },
                (Err(e), _) | (_, Err(e)) => Route::Invalid(e),
            };
        }
    }
    if let Some(i) = rfind_segment(rest, "/manifests/") {
        let (name, reference) = (&rest[..i], &rest[i + "/manifests/".len()..]);
        if !read {
            return Route::Unsupported;
        }
        return match (name.parse(), reference.parse()) {
            (Ok(name), Ok(reference)) => Route::Manifest {
                name,
                reference,
                head,
            },
            // A malformed *digest* stays `400 DIGEST_INVALID`: it says what is wrong with the
            // request, as it does for blobs.
            (Ok(name), Err(ParseError::Tag(_))) => Route::NoSuchManifest {
                name,
                reference: reference.to_owned(),
            },
            (Ok(name), Err(ParseError::UnsupportedDigest(_))) => Route::UnsupportedDigest {
                name,
                object: Object::Manifest,
            },
            (Err(e), _) | (_, Err(e)) => Route::Invalid(e),
        };
    }
    if rest.ends_with("/blobs/uploads") || rfind_segment(rest, "/blobs/uploads/").is_some() {
        return Route::Unsupported;
    }
    if let Some(i) = rfind_segment(rest, "/blobs/") {
        let (name, digest) = (&rest[..i], &rest[i + "/blobs/".len()..]);
        if !read {
            return Route::Unsupported;
        }
        return match (name.parse(), digest.parse()) {
            (Ok(name), Ok(digest)) => Route::Blob { name, digest, head },
            (Ok(name), Err(ParseError::UnsupportedDigest(_))) => Route::UnsupportedDigest {
                name,
                object: Object::Blob,
            },
            (Err(e), _) | (_, Err(e)) => Route::Invalid(e),
        };
    }
    if read {
        Route::NotFound
    } else {
        Route::Unsupported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn rfind_segment_is_rfind() {
        for path in [
            "a/manifests/b",
            "a/manifests/manifests/b",
            "manifests/x",
            "a/b/manifests/",
            "/manifests/",
            "a/manifestsx/b/manifests",
            "",
        ] {
            assert_eq!(
                rfind_segment(path, "/manifests/"),
                path.rfind("/manifests/"),
                "{path}"
            );
        }
    }

    #[test]
    fn base_and_operational_routes() {
        assert_eq!(parse(&Method::GET, "/v2/"), Route::Base);
        assert_eq!(parse(&Method::GET, "/v2"), Route::Base);
        assert_eq!(parse(&Method::HEAD, "/v2/"), Route::Base);
        assert_eq!(parse(&Method::GET, "/healthz"), Route::Healthz);
        assert_eq!(parse(&Method::GET, "/readyz"), Route::Readyz);
        assert_eq!(parse(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(parse(&Method::GET, "/_pullthrough/status"), Route::Status);
        for m in [Method::GET, Method::POST, Method::DELETE] {
            assert_eq!(parse(&m, "/_pullthrough/pins"), Route::Pins);
        }
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parse(&Method::GET, &format!("/_pullthrough/peer/blobs/{d}")),
            Route::PeerBlob {
                digest: d.parse().unwrap()
            }
        );
        assert_eq!(
            parse(&Method::PUT, &format!("/_pullthrough/peer/blobs/{d}")),
            Route::Unsupported
        );
        assert!(matches!(
            parse(&Method::GET, "/_pullthrough/peer/blobs/sha256:xyz"),
            Route::Invalid(_)
        ));
        assert_eq!(
            parse(&Method::POST, "/_pullthrough/cache/purge"),
            Route::Purge
        );
        assert_eq!(
            parse(&Method::GET, "/_pullthrough/cache/refresh"),
            Route::Refresh
        );
        assert_eq!(
            parse(&Method::POST, "/_pullthrough/cache/purge/x"),
            Route::NotFound
        );
        assert_eq!(parse(&Method::GET, "/"), Route::Ui);
        assert_eq!(parse(&Method::GET, "/_pullthrough/ui"), Route::Ui);
        assert_eq!(parse(&Method::POST, "/"), Route::Unsupported);
        assert_eq!(parse(&Method::GET, "/index.html"), Route::NotFound);
        assert_eq!(parse(&Method::GET, "/v2x/foo"), Route::NotFound);
    }

    #[test]
    fn names_with_slashes_split_at_last_keyword() {
        let r = parse(&Method::GET, "/v2/a/manifests/b/manifests/latest");
        match r {
            Route::Manifest {
                name,
                reference,
                head,
            } => {
                assert_eq!(name.as_str(), "a/manifests/b");
                assert_eq!(reference.to_string(), "latest");
                assert!(!head);
            }
            other => panic!("{other:?}"),
        }
        let r = parse(&Method::HEAD, &format!("/v2/library/alpine/blobs/{}", d()));
        assert!(matches!(r, Route::Blob { head: true, .. }));
        let r = parse(&Method::GET, "/v2/x/y/z/tags/list");
        assert!(matches!(r, Route::TagsList { name } if name.as_str() == "x/y/z"));
    }

    #[test]
    fn writes_are_unsupported() {
        for (m, p) in [
            (Method::PUT, "/v2/a/manifests/latest".to_string()),
            (Method::DELETE, format!("/v2/a/blobs/{}", d())),
            (Method::POST, "/v2/a/blobs/uploads/".to_string()),
            (Method::PATCH, "/v2/a/blobs/uploads/123".to_string()),
            (Method::GET, "/v2/a/blobs/uploads/123".to_string()),
            (Method::POST, "/v2/".to_string()),
            (Method::POST, "/v2/whatever".to_string()),
        ] {
            assert_eq!(parse(&m, &p), Route::Unsupported, "{m} {p}");
        }
    }

    #[test]
    fn invalid_input_is_classified() {
        let cases = [
            ("/v2/../etc/manifests/latest", "name"),
            ("/v2/%2e%2e/manifests/latest", "name"),
            ("/v2//abs/manifests/latest", "name"),
            ("/v2/UPPER/manifests/latest", "name"),
            ("/v2/a\0b/manifests/latest", "name"),
            ("/v2/a/manifests/..", "no such manifest"),
            ("/v2/a/manifests/a%2fb", "no such manifest"),
            ("/v2/a/manifests/.INVALID_MANIFEST_NAME", "no such manifest"),
            ("/v2/UPPER/manifests/..", "name"),
            ("/v2/a/blobs/sha256:../../etc/passwd", "digest"),
            ("/v2/a/blobs/latest", "digest"),
            ("/v2/a/manifests/sha256:zz", "digest"),
        ];
        for (path, want) in cases {
            let got = match parse(&Method::GET, path) {
                Route::Invalid(ParseError::Name(_)) => "name",
                Route::NoSuchManifest { .. } => "no such manifest",
                Route::Invalid(ParseError::Digest(_)) => "digest",
                other => panic!("{path}: {other:?}"),
            };
            assert_eq!(got, want, "{path}");
        }
        let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
        assert!(matches!(
            parse(&Method::GET, &long),
            Route::Invalid(ParseError::Name(_))
        ));
    }

    #[test]
    fn referrers_are_routed() {
        let r = parse(&Method::GET, &format!("/v2/a/b/referrers/{}", d()));
        assert!(
            matches!(&r, Route::Referrers { name, digest } if name.as_str() == "a/b" && digest.to_string() == d()),
            "{r:?}"
        );
        assert!(matches!(
            parse(&Method::GET, "/v2/a/referrers/latest"),
            Route::Invalid(ParseError::Digest(_))
        ));
        assert!(matches!(
            parse(&Method::GET, "/v2/UPPER/referrers/latest"),
            Route::Invalid(ParseError::Name(_))
        ));
        assert_eq!(
            parse(&Method::PUT, &format!("/v2/a/referrers/{}", d())),
            Route::Unsupported
        );
        // A repository named `…/referrers/…` still has manifests.
        assert!(matches!(
            parse(&Method::GET, "/v2/a/referrers/b/manifests/latest"),
            Route::Manifest { name, .. } if name.as_str() == "a/referrers/b"
        ));
    }

    #[test]
    fn catalog_is_routed() {
        assert_eq!(parse(&Method::GET, "/v2/_catalog"), Route::Catalog);
        assert_eq!(parse(&Method::HEAD, "/v2/_catalog"), Route::Catalog);
        assert_eq!(parse(&Method::POST, "/v2/_catalog"), Route::Unsupported);
        assert_eq!(parse(&Method::GET, "/v2/_catalog/x"), Route::NotFound);
    }

    #[test]
    fn unknown_v2_paths_are_not_found() {
        assert_eq!(parse(&Method::GET, "/v2/a/nothing"), Route::NotFound);
    }
}
