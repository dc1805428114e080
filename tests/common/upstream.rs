//! A fake Docker Hub: registry API on 127.0.0.1, a token realm on its own port, and a "CDN" on
//! another host address (127.0.0.2) that blobs are redirected to and that refuses any request
//! carrying `Authorization`. It counts every request by kind and misbehaves on demand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Request counts by kind.
#[derive(Default)]
pub struct Counters {
    pub manifest_get: AtomicU64,
    pub manifest_head: AtomicU64,
    pub blob_get: AtomicU64,
    pub blob_head: AtomicU64,
    pub cdn_get: AtomicU64,
    pub token: AtomicU64,
    pub tags: AtomicU64,
    pub unauthorized: AtomicU64,
    pub referrers: AtomicU64,
    /// Registry requests being answered now (until their response headers are sent).
    pub in_flight: AtomicU64,
    /// The most registry requests ever answered at once.
    pub max_in_flight: AtomicU64,
}

/// A failure to inject.
#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    TooManyRequests { retry_after: Option<u64> },
}

/// Switchable misbehaviour.
#[derive(Default)]
pub struct Behaviour {
    /// Require Bearer tokens (401 with a challenge otherwise).
    pub require_token: bool,
    /// Credentials the token realm demands (Basic), if any.
    pub credentials: Option<(String, String)>,
    /// An identity token the token realm accepts in an OAuth2 refresh-token POST.
    pub refresh_token: Option<String>,
    /// A Basic-only registry: every registry request must carry these credentials as Basic
    /// auth, else 401 with `WWW-Authenticate: Basic`.
    pub basic_only: Option<(String, String)>,
    /// `expires_in` sent with tokens.
    pub token_expires_in: Option<u64>,
    /// Redirect blob GETs to the CDN.
    pub redirect_blobs: bool,
    /// Serve blobs with one byte flipped.
    pub corrupt_blobs: bool,
    /// Cut the next N blob bodies after this many bytes.
    pub cut_blob: Option<(u64, u32)>,
    /// Send only this many bytes of a blob body, then wait for `release` before the rest.
    pub hold_blob_after: Option<u64>,
    /// The same for a body that starts at the blob's first byte only (ranges from further on,
    /// such as the other parts of a download in parts, are not held).
    pub hold_first_bytes_after: Option<u64>,
    /// Cut the first response whose range starts exactly here after 64 KiB (a part of a
    /// download fetched in parallel).
    pub cut_range_from: Option<u64>,
    /// Serve a byte flipped in ranges that start after the blob's first byte.
    pub corrupt_ranges: bool,
    /// Delay before a blob response's headers.
    pub blob_delay: Option<Duration>,
    pub manifest_fault: Option<Fault>,
    pub blob_fault: Option<Fault>,
    /// Emit ratelimit headers; `remaining` drops on manifest GET only.
    pub ratelimit: Option<(u64, u64)>,
    /// Accept, then never answer.
    pub hang: bool,
    /// The token realm accepts, then never answers (the registry itself still does).
    pub hang_token: bool,
    /// Accept, then close at once (a crashed upstream behind a load balancer).
    pub down: bool,
    /// Close the connection without an answer for the next N blob GETs.
    pub drop_blob_gets: u32,
    /// Send blob GETs chunked, without `Content-Length` (as some registries do).
    pub chunked_blobs: bool,
    /// Answer tags/list with every tag, in insertion-independent but unsorted order, ignoring
    /// `n` and `last` (as some registries do).
    pub ignore_tag_paging: bool,
    /// No referrers API: `GET referrers/<digest>` is 404 (an OCI 1.0 registry).
    pub no_referrers_api: bool,
    /// Apply `artifactType` to referrers answers (and say so in `OCI-Filters-Applied`).
    pub filter_referrers: bool,
    /// Answer a manifest whatever the `Accept` lists, as a registry that holds only one form
    /// of it (a schema 1 manifest) may.
    pub ignore_accept: bool,
    /// Repositories this upstream does not serve (private, deleted, deny-listed): manifest and
    /// blob requests under them answer 404, whatever the content store holds.
    pub missing_repos: Vec<String>,
    /// A HEAD of a tag answers `Docker-Content-Digest: sha256:000…0` (a lying upstream).
    pub lie_on_tag_head: bool,
    /// Accounts with per-repository rights, as Docker Hub has them: when any is set, every
    /// registry request needs a token, and a token grants the scope it asked for only when
    /// the repository is public or one of its account's.
    pub accounts: Vec<Account>,
    /// Repositories anyone (an anonymous token included) may read, with `accounts`.
    pub public_repos: Vec<String>,
}

/// An account of the token realm (`Behaviour::accounts`).
#[derive(Clone, Debug)]
pub struct Account {
    pub user: String,
    pub pass: String,
    /// The private repositories it may read.
    pub repos: Vec<String>,
}

impl Account {
    pub fn new(user: &str, pass: &str, repos: &[&str]) -> Account {
        Account {
            user: user.into(),
            pass: pass.into(),
            repos: repos.iter().map(|r| r.to_string()).collect(),
        }
    }
}

/// What a token was issued for: the account (`None`: anonymous) and the repository granted,
/// if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub account: Option<String>,
    pub repo: Option<String>,
}

/// The digest a lying tag HEAD names (`Behaviour::lie_on_tag_head`).
pub const LIE_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone)]
pub struct StoredManifest {
    pub media_type: String,
    pub bytes: Bytes,
}

#[derive(Default)]
pub struct Content {
    /// (repo, tag) → digest
    pub tags: HashMap<(String, String), String>,
    pub manifests: HashMap<String, StoredManifest>,
    pub blobs: HashMap<String, Bytes>,
    /// subject digest → descriptors of the manifests that refer to it
    pub referrers: HashMap<String, Vec<serde_json::Value>>,
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When the request arrived.
    pub at: std::time::Instant,
    pub host: &'static str,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
}

pub struct State {
    pub counters: Counters,
    pub behaviour: Mutex<Behaviour>,
    pub content: Mutex<Content>,
    pub seen: Mutex<Vec<Seen>>,
    pub release: Notify,
    valid_tokens: Mutex<Vec<String>>,
    grants: Mutex<HashMap<String, Grant>>,
    token_serial: AtomicU64,
    registry_addr: Mutex<Option<SocketAddr>>,
    token_addr: Mutex<Option<SocketAddr>>,
    cdn_addr: Mutex<Option<SocketAddr>>,
}

pub struct FakeUpstream {
    pub state: Arc<State>,
    pub url: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn n(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let state = Arc::new(State {
            counters: Counters::default(),
            behaviour: Mutex::new(Behaviour::default()),
            content: Mutex::new(Content::default()),
            seen: Mutex::new(Vec::new()),
            release: Notify::new(),
            valid_tokens: Mutex::new(Vec::new()),
            grants: Mutex::new(HashMap::new()),
            token_serial: AtomicU64::new(0),
            registry_addr: Mutex::new(None),
            token_addr: Mutex::new(None),
            cdn_addr: Mutex::new(None),
        });
        let registry = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cdn = TcpListener::bind("127.0.0.2:0").await.unwrap();
        *state.registry_addr.lock().unwrap() = Some(registry.local_addr().unwrap());
        *state.token_addr.lock().unwrap() = Some(token.local_addr().unwrap());
        *state.cdn_addr.lock().unwrap() = Some(cdn.local_addr().unwrap());
        let url = format!("http://{}", registry.local_addr().unwrap());
        let tasks = vec![
            tokio::spawn(accept_loop(registry, state.clone(), Host::Registry)),
            tokio::spawn(accept_loop(token, state.clone(), Host::Token)),
            tokio::spawn(accept_loop(cdn, state.clone(), Host::Cdn)),
        ];
        FakeUpstream { state, url, tasks }
    }

    pub fn behave(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().unwrap());
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    pub fn manifest_gets(&self) -> u64 {
        n(&self.state.counters.manifest_get)
    }
    pub fn manifest_heads(&self) -> u64 {
        n(&self.state.counters.manifest_head)
    }
    pub fn blob_gets(&self) -> u64 {
        n(&self.state.counters.blob_get)
    }
    pub fn blob_heads(&self) -> u64 {
        n(&self.state.counters.blob_head)
    }
    pub fn cdn_gets(&self) -> u64 {
        n(&self.state.counters.cdn_get)
    }
    pub fn tokens(&self) -> u64 {
        n(&self.state.counters.token)
    }
    /// Every registry/CDN request except tokens.
    pub fn total(&self) -> u64 {
        let c = &self.state.counters;
        n(&c.manifest_get)
            + n(&c.manifest_head)
            + n(&c.blob_get)
            + n(&c.blob_head)
            + n(&c.tags)
            + n(&c.referrers)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Every token the realm has issued and not revoked.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.valid_tokens.lock().unwrap().clone()
    }

    /// The most registry requests that were being answered at once.
    pub fn max_in_flight(&self) -> u64 {
        n(&self.state.counters.max_in_flight)
    }

    /// What the token in a request's `Authorization` was issued for (`Behaviour::accounts`).
    pub fn grant_of(&self, headers: &HeaderMap) -> Option<Grant> {
        let token = headers
            .get("authorization")?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        self.state.grants.lock().unwrap().get(token).cloned()
    }

    /// Registry requests (not tokens) under `repo`, as seen, oldest first.
    pub fn seen_under(&self, repo: &str) -> Vec<Seen> {
        let prefix = format!("/v2/{repo}/");
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.host == "registry" && s.path.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Forgets every issued token, as if they had expired upstream.
    pub fn revoke_tokens(&self) {
        self.state.valid_tokens.lock().unwrap().clear();
    }

    pub fn add_blob(&self, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let d = sha256(&bytes);
        self.state
            .content
            .lock()
            .unwrap()
            .blobs
            .insert(d.clone(), bytes);
        d
    }

    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let d = sha256(&bytes);
        let mut c = self.state.content.lock().unwrap();
        c.manifests.insert(
            d.clone(),
            StoredManifest {
                media_type: media_type.into(),
                bytes,
            },
        );
        if let Some(tag) = tag {
            c.tags.insert((repo.into(), tag.into()), d.clone());
        }
        d
    }

    /// An OCI image: a config blob and layers of the given sizes (pseudo-random bytes),
    /// tagged `repo:tag`. Returns (manifest digest, layer digests).
    pub fn add_image(&self, repo: &str, tag: &str, layer_sizes: &[usize]) -> (String, Vec<String>) {
        let seed = self.state.token_serial.fetch_add(1, Ordering::SeqCst) + 0x9e37;
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}");
        let config_digest = self.add_blob(config.clone().into_bytes());
        let mut layers = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            layers.push(self.add_blob(pseudo_random(*size, seed * 31 + i as u64)));
        }
        let layer_json: Vec<String> = layers
            .iter()
            .zip(layer_sizes)
            .map(|(d, s)| {
                format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{s}}}"#)
            })
            .collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layer_json.join(",")
        );
        let digest = self.add_manifest(repo, Some(tag), OCI_MANIFEST, manifest.into_bytes());
        (digest, layers)
    }

    /// An artifact manifest with `subject` and `artifactType`, stored untagged and listed as a
    /// referrer of `subject` (an `oras attach` upstream). Returns its digest.
    pub fn add_referrer(&self, repo: &str, subject: &str, artifact_type: &str) -> String {
        let subject_size = self.state.content.lock().unwrap().manifests[subject]
            .bytes
            .len();
        let blob = self.add_blob(format!("{artifact_type} of {subject}").into_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{artifact_type}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"layers":[{{"mediaType":"application/octet-stream","digest":"{blob}","size":1}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":{subject_size}}}}}"#
        );
        let size = manifest.len();
        let digest = self.add_manifest(repo, None, OCI_MANIFEST, manifest.into_bytes());
        self.state
            .content
            .lock()
            .unwrap()
            .referrers
            .entry(subject.to_owned())
            .or_default()
            .push(serde_json::json!({
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": size,
                "artifactType": artifact_type,
            }));
        digest
    }

    pub fn referrers_gets(&self) -> u64 {
        n(&self.state.counters.referrers)
    }

    /// Points `repo:tag` at another digest (a push upstream).
    pub fn retag(&self, repo: &str, tag: &str, digest: &str) {
        self.state
            .content
            .lock()
            .unwrap()
            .tags
            .insert((repo.into(), tag.into()), digest.into());
    }
}

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    // Spread the seed so neighbouring seeds never collide after forcing the low bit.
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Host {
    Registry,
    Token,
    Cdn,
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, host: Host) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if state.behaviour.lock().unwrap().down {
            drop(stream);
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    // A service error makes hyper drop the connection without an answer.
                    {
                        let mut b = state.behaviour.lock().unwrap();
                        if b.down {
                            return Err("down");
                        }
                        let blob_get =
                            req.method() == Method::GET && req.uri().path().contains("/blobs/");
                        if blob_get && b.drop_blob_gets > 0 {
                            b.drop_blob_gets -= 1;
                            return Err("dropped");
                        }
                    }
                    Ok(route(state, host, req).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

fn oci_error(status: u16, code: &str, message: &str) -> Response<Body> {
    let mut r = full(
        status,
        format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#),
    );
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn fault_response(f: &Fault) -> Response<Body> {
    match f {
        Fault::Status(404) => oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
        Fault::Status(401) => oci_error(401, "UNAUTHORIZED", "authentication required"),
        Fault::Status(s) => oci_error(*s, "UNKNOWN", "injected failure"),
        Fault::TooManyRequests { retry_after } => {
            let mut r = oci_error(
                429,
                "TOOMANYREQUESTS",
                "You have reached your pull rate limit.",
            );
            if let Some(s) = retry_after {
                r.headers_mut()
                    .insert("retry-after", s.to_string().parse().unwrap());
            }
            r
        }
    }
}

async fn route(state: Arc<State>, host: Host, req: Request<Incoming>) -> Response<Body> {
    let host_name = match host {
        Host::Registry => "registry",
        Host::Token => "token",
        Host::Cdn => "cdn",
    };
    state.seen.lock().unwrap().push(Seen {
        at: std::time::Instant::now(),
        host: host_name,
        method: req.method().clone(),
        path: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    let hangs = {
        let b = state.behaviour.lock().unwrap();
        b.hang || (b.hang_token && matches!(host, Host::Token))
    };
    if hangs {
        std::future::pending::<()>().await;
    }
    match host {
        Host::Token => token(&state, req).await,
        Host::Cdn => cdn(&state, &req).await,
        Host::Registry => {
            let c = &state.counters;
            let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            c.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let r = registry(&state, &req).await;
            c.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
        }
    }
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

async fn token(state: &State, req: Request<Incoming>) -> Response<Body> {
    state.counters.token.fetch_add(1, Ordering::SeqCst);
    if req.method() == Method::POST {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        let want = state.behaviour.lock().unwrap().refresh_token.clone();
        if form.get("grant_type").map(String::as_str) != Some("refresh_token")
            || want.is_none()
            || form.get("refresh_token") != want.as_ref()
        {
            return oci_error(401, "UNAUTHORIZED", "bad refresh token");
        }
        return issue_token(state, true);
    }
    let b = state.behaviour.lock().unwrap();
    if !b.accounts.is_empty() {
        let sent = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let account = match sent {
            None => None,
            Some(sent) => match b.accounts.iter().find(|a| basic(&a.user, &a.pass) == sent) {
                Some(a) => Some(a.clone()),
                None => return oci_error(401, "UNAUTHORIZED", "bad credentials"),
            },
        };
        let scope_repo = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "scope")
            .and_then(|(_, v)| {
                v.strip_prefix("repository:")
                    .and_then(|r| r.strip_suffix(":pull"))
                    .map(str::to_owned)
            });
        let granted = scope_repo.filter(|r| {
            b.public_repos.contains(r) || account.as_ref().is_some_and(|a| a.repos.contains(r))
        });
        drop(b);
        let response = issue_token(state, false);
        let token = state.valid_tokens.lock().unwrap().last().cloned().unwrap();
        state.grants.lock().unwrap().insert(
            token,
            Grant {
                account: account.map(|a| a.user),
                repo: granted,
            },
        );
        return response;
    }
    if let Some((user, pass)) = &b.credentials {
        let want = basic(user, pass);
        if req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            != Some(want.as_str())
        {
            return oci_error(401, "UNAUTHORIZED", "bad credentials");
        }
    }
    drop(b);
    issue_token(state, false)
}

fn issue_token(state: &State, oauth: bool) -> Response<Body> {
    let serial = state.token_serial.fetch_add(1, Ordering::SeqCst);
    // The port makes tokens of two fakes differ, so a test can tell whose a token is.
    let port = state.registry_addr.lock().unwrap().unwrap().port();
    let token = format!("tok-{port}-{serial}");
    state.valid_tokens.lock().unwrap().push(token.clone());
    let body = match state.behaviour.lock().unwrap().token_expires_in {
        Some(e) if !oauth => format!(r#"{{"token":"{token}","expires_in":{e}}}"#),
        Some(e) => format!(r#"{{"access_token":"{token}","expires_in":{e}}}"#),
        None => format!(r#"{{"access_token":"{token}"}}"#),
    };
    full(200, body)
}

/// Whether a Basic-only registry lets the request in; `None` when it is not one.
fn basic_refusal(state: &State, headers: &HeaderMap) -> Option<Response<Body>> {
    let (user, pass) = state.behaviour.lock().unwrap().basic_only.clone()?;
    let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
    if sent == Some(basic(&user, &pass).as_str()) {
        return None;
    }
    state.counters.unauthorized.fetch_add(1, Ordering::SeqCst);
    let mut r = oci_error(401, "UNAUTHORIZED", "authentication required");
    r.headers_mut().insert(
        "www-authenticate",
        r#"Basic realm="fake-registry""#.parse().unwrap(),
    );
    Some(r)
}

fn authorized(state: &State, headers: &HeaderMap) -> bool {
    let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(t) = v.strip_prefix("Bearer ") else {
        return false;
    };
    state.valid_tokens.lock().unwrap().iter().any(|x| x == t)
}

fn challenge(state: &State, repo: &str) -> Response<Body> {
    state.counters.unauthorized.fetch_add(1, Ordering::SeqCst);
    let token_addr = state.token_addr.lock().unwrap().unwrap();
    let mut r = oci_error(401, "UNAUTHORIZED", "authentication required");
    r.headers_mut().insert(
        "www-authenticate",
        format!(r#"Bearer realm="http://{token_addr}/token",service="fake-hub",scope="repository:{repo}:pull""#)
            .parse()
            .unwrap(),
    );
    r
}

/// Splits `/v2/<name>/<kind>/<ref>`.
fn parse_path(path: &str) -> Option<(String, &'static str, String)> {
    let rest = path.strip_prefix("/v2/")?;
    for kind in ["manifests", "blobs"] {
        let pat = format!("/{kind}/");
        if let Some(i) = rest.rfind(&pat) {
            let k: &'static str = if kind == "manifests" {
                "manifests"
            } else {
                "blobs"
            };
            return Some((rest[..i].to_owned(), k, rest[i + pat.len()..].to_owned()));
        }
    }
    rest.strip_suffix("/tags/list")
        .map(|n| (n.to_owned(), "tags", String::new()))
}

async fn registry(state: &Arc<State>, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let head = req.method() == Method::HEAD;
    if let Some((repo, subject)) = path
        .strip_prefix("/v2/")
        .and_then(|rest| rest.rsplit_once("/referrers/"))
    {
        state.counters.referrers.fetch_add(1, Ordering::SeqCst);
        if state.behaviour.lock().unwrap().require_token && !authorized(state, req.headers()) {
            return challenge(state, repo);
        }
        return referrers(state, subject, req.uri().query());
    }
    let Some((repo, kind, reference)) = parse_path(&path) else {
        return oci_error(404, "NOT_FOUND", "no route");
    };
    let c = &state.counters;
    match (kind, head) {
        ("manifests", true) => c.manifest_head.fetch_add(1, Ordering::SeqCst),
        ("manifests", false) => c.manifest_get.fetch_add(1, Ordering::SeqCst),
        ("blobs", true) => c.blob_head.fetch_add(1, Ordering::SeqCst),
        ("blobs", false) => c.blob_get.fetch_add(1, Ordering::SeqCst),
        _ => c.tags.fetch_add(1, Ordering::SeqCst),
    };
    if state.behaviour.lock().unwrap().require_token && !authorized(state, req.headers()) {
        return challenge(state, &repo);
    }
    if !state.behaviour.lock().unwrap().accounts.is_empty() {
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let grant = token.and_then(|t| state.grants.lock().unwrap().get(t).cloned());
        if grant.and_then(|g| g.repo).as_deref() != Some(repo.as_str()) {
            return challenge(state, &repo);
        }
    }
    if let Some(refused) = basic_refusal(state, req.headers()) {
        return refused;
    }
    if state
        .behaviour
        .lock()
        .unwrap()
        .missing_repos
        .contains(&repo)
    {
        let code = match kind {
            "blobs" => "BLOB_UNKNOWN",
            "manifests" => "MANIFEST_UNKNOWN",
            _ => "NAME_UNKNOWN",
        };
        return oci_error(404, code, "repository name not known to registry");
    }
    match kind {
        "manifests" => manifest(state, &repo, &reference, head, req.headers()),
        "blobs" => blob(state, &reference, head, req.headers(), false).await,
        _ => tags_list(state, &repo, req.uri().query()),
    }
}

fn manifest(
    state: &State,
    repo: &str,
    reference: &str,
    head: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    let mut b = state.behaviour.lock().unwrap();
    if let Some(f) = &b.manifest_fault {
        return fault_response(f);
    }
    let content = state.content.lock().unwrap();
    let digest = if reference.starts_with("sha256:") {
        Some(reference.to_owned())
    } else {
        content
            .tags
            .get(&(repo.to_owned(), reference.to_owned()))
            .cloned()
    };
    let Some(m) = digest.as_ref().and_then(|d| content.manifests.get(d)) else {
        return oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown");
    };
    let accept: Vec<String> = headers
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(',')
                .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
        })
        .collect();
    if !b.ignore_accept
        && !accept.is_empty()
        && !accept.iter().any(|a| a == &m.media_type || a == "*/*")
    {
        return oci_error(404, "MANIFEST_UNKNOWN", "manifest not acceptable");
    }
    let mut r = full(200, if head { Bytes::new() } else { m.bytes.clone() });
    let h = r.headers_mut();
    h.insert("content-type", m.media_type.parse().unwrap());
    let digest = if head && b.lie_on_tag_head && !reference.starts_with("sha256:") {
        Some(LIE_DIGEST.to_owned())
    } else {
        digest
    };
    h.insert(
        "docker-content-digest",
        digest.unwrap_or_default().parse().unwrap(),
    );
    h.insert("content-length", m.bytes.len().to_string().parse().unwrap());
    if let Some((limit, remaining)) = b.ratelimit.as_mut() {
        if !head {
            *remaining = remaining.saturating_sub(1);
        }
        h.insert(
            "ratelimit-limit",
            format!("{limit};w=21600").parse().unwrap(),
        );
        h.insert(
            "ratelimit-remaining",
            format!("{remaining};w=21600").parse().unwrap(),
        );
        h.insert("docker-ratelimit-source", "127.0.0.1".parse().unwrap());
    }
    r
}

fn referrers(state: &State, subject: &str, query: Option<&str>) -> Response<Body> {
    let (no_api, filter) = {
        let b = state.behaviour.lock().unwrap();
        if let Some(f) = &b.manifest_fault {
            return fault_response(f);
        }
        (b.no_referrers_api, b.filter_referrers)
    };
    if no_api {
        return oci_error(404, "NOT_FOUND", "no route");
    }
    let mut list = state
        .content
        .lock()
        .unwrap()
        .referrers
        .get(subject)
        .cloned()
        .unwrap_or_default();
    let artifact_type = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v.into_owned());
    let filtered = filter && artifact_type.is_some();
    if let (true, Some(t)) = (filtered, &artifact_type) {
        list.retain(|d| d["artifactType"] == t.as_str());
    }
    let body = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list});
    let mut r = full(200, body.to_string());
    r.headers_mut()
        .insert("content-type", OCI_INDEX.parse().unwrap());
    if filtered {
        r.headers_mut()
            .insert("oci-filters-applied", "artifactType".parse().unwrap());
    }
    r
}

fn tags_list(state: &State, repo: &str, query: Option<&str>) -> Response<Body> {
    let content = state.content.lock().unwrap();
    let mut tags: Vec<&String> = content
        .tags
        .keys()
        .filter(|(r, _)| r == repo)
        .map(|(_, t)| t)
        .collect();
    tags.sort();
    let params: HashMap<String, String> =
        url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if state.behaviour.lock().unwrap().ignore_tag_paging {
        tags.reverse();
        let body = serde_json::json!({"name": repo, "tags": tags}).to_string();
        let mut r = full(200, body);
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return r;
    }
    if let Some(last) = params.get("last") {
        tags.retain(|t| *t > last);
    }
    let limit = params
        .get("n")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    let more = tags.len() > limit;
    tags.truncate(limit);
    let body = serde_json::json!({"name": repo, "tags": tags}).to_string();
    let mut r = full(200, body);
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if more {
        let last = tags.last().map(|t| t.as_str()).unwrap_or("");
        let addr = state.registry_addr.lock().unwrap().unwrap();
        r.headers_mut().insert(
            "link",
            format!("<http://{addr}/v2/{repo}/tags/list?n={limit}&last={last}>; rel=\"next\"")
                .parse()
                .unwrap(),
        );
    }
    r
}

async fn cdn(state: &Arc<State>, req: &Request<Incoming>) -> Response<Body> {
    state.counters.cdn_get.fetch_add(1, Ordering::SeqCst);
    if req.headers().contains_key("authorization") {
        return full(400, "the CDN refuses requests that carry a registry token");
    }
    let digest = req.uri().path().trim_start_matches("/blobs/").to_owned();
    blob(state, &digest, false, req.headers(), true).await
}

async fn blob(
    state: &Arc<State>,
    digest: &str,
    head: bool,
    headers: &HeaderMap,
    from_cdn: bool,
) -> Response<Body> {
    let (delay, fault, redirect, corrupt, hold, chunked) = {
        let b = state.behaviour.lock().unwrap();
        (
            b.blob_delay,
            b.blob_fault.clone(),
            b.redirect_blobs,
            b.corrupt_blobs,
            b.hold_blob_after,
            b.chunked_blobs,
        )
    };
    if let Some(f) = fault {
        return match f {
            Fault::Status(404) => oci_error(404, "BLOB_UNKNOWN", "blob unknown"),
            f => fault_response(&f),
        };
    }
    let Some(bytes) = state.content.lock().unwrap().blobs.get(digest).cloned() else {
        return oci_error(404, "BLOB_UNKNOWN", "blob unknown");
    };
    if redirect && !from_cdn && !head {
        let cdn = state.cdn_addr.lock().unwrap().unwrap();
        let mut r = full(307, Bytes::new());
        r.headers_mut().insert(
            "location",
            format!("http://{cdn}/blobs/{digest}").parse().unwrap(),
        );
        return r;
    }
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    // Only a response that carries the body spends one of the cuts.
    let cut = match state.behaviour.lock().unwrap().cut_blob.as_mut() {
        Some((at, times)) if *times > 0 && !head => {
            *times -= 1;
            Some(*at)
        }
        _ => None,
    };
    let mut bytes = bytes;
    if corrupt {
        let mut v = bytes.to_vec();
        v[0] ^= 0xff;
        bytes = Bytes::from(v);
    }
    let total = bytes.len() as u64;
    let mut start = 0u64;
    let mut end = total;
    let mut status = 200;
    if let Some(r) = headers.get("range").and_then(|v| v.to_str().ok()) {
        // One range: `a-`, `a-b` or `-n`, as registries answer them.
        if let Some((a, b)) = r.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
            let (a, b) = (a.parse::<u64>().ok(), b.parse::<u64>().ok());
            (start, end) = match (a, b) {
                (Some(a), None) => (a, total),
                (Some(a), Some(b)) => (a, (b + 1).min(total)),
                (None, Some(n)) => (total.saturating_sub(n), total),
                (None, None) => (0, total),
            };
            if start >= total {
                let mut r = full(416, Bytes::new());
                r.headers_mut()
                    .insert("content-range", format!("bytes */{total}").parse().unwrap());
                return r;
            }
            status = 206;
        }
    }
    let (cut_from, corrupt_ranges) = {
        let mut b = state.behaviour.lock().unwrap();
        let from = b.cut_range_from;
        if from == Some(start) && start > 0 && !head {
            b.cut_range_from = None;
        }
        (from, b.corrupt_ranges)
    };
    let cut = match cut_from {
        Some(from) if from == start && start > 0 && !head => Some(start + 64 * 1024),
        _ => cut,
    };
    if start > 0 && corrupt_ranges {
        let mut v = bytes.to_vec();
        v[start as usize] ^= 0xff;
        bytes = Bytes::from(v);
    }
    let hold_first = state.behaviour.lock().unwrap().hold_first_bytes_after;
    let hold = hold.or(hold_first.filter(|_| start == 0));
    let part = bytes.slice(start as usize..end as usize);
    let len = part.len();
    let body: Body = if head {
        Full::new(Bytes::new())
            .map_err(|e| match e {})
            .boxed_unsync()
    } else {
        chunked_body(
            state.clone(),
            part,
            cut.map(|c| c.saturating_sub(start)),
            hold,
        )
    };
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    let h = r.headers_mut();
    if !chunked || head {
        h.insert("content-length", len.to_string().parse().unwrap());
    }
    h.insert("docker-content-digest", digest.parse().unwrap());
    h.insert("content-type", "application/octet-stream".parse().unwrap());
    if status == 206 {
        h.insert(
            "content-range",
            format!("bytes {start}-{}/{total}", end - 1)
                .parse()
                .unwrap(),
        );
    }
    r
}

/// The body in 64 KiB chunks; errors (cutting the connection) after `cut` bytes, and pauses
/// after `hold` bytes until the test calls `release.notify_one()`.
fn chunked_body(state: Arc<State>, bytes: Bytes, cut: Option<u64>, hold: Option<u64>) -> Body {
    const CHUNK: usize = 64 * 1024;
    let s = stream::unfold((0usize, false), move |(pos, held)| {
        let bytes = bytes.clone();
        let state = state.clone();
        async move {
            if pos >= bytes.len() {
                return None;
            }
            if let Some(c) = cut {
                if pos as u64 >= c {
                    // Let what was sent reach the peer first, as a real cut would.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Some((
                        Err(std::io::Error::other("injected cut")),
                        (bytes.len(), held),
                    ));
                }
            }
            let mut held = held;
            if let Some(h) = hold {
                if !held && pos as u64 >= h {
                    state.release.notified().await;
                    held = true;
                }
            }
            let mut end = (pos + CHUNK).min(bytes.len());
            if let Some(c) = cut {
                end = end.min(c.max(pos as u64 + 1) as usize);
            }
            if let Some(h) = hold {
                if !held && (pos as u64) < h {
                    end = end.min(h as usize);
                }
            }
            Some((Ok(Frame::data(bytes.slice(pos..end))), (end, held)))
        }
    });
    StreamBody::new(s).boxed_unsync()
}
