//! `credentials = "client"`: each client pulls with its own upstream credentials. Cached
//! content goes to a client only once its own credentials are confirmed to read the
//! repository (one upstream HEAD per client and repository per period, never a counted pull),
//! one client's token never carries another's request, and no credential is written anywhere.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use common::upstream::Account;
use common::{FakeUpstream, TestMirror};
use pullthrough::config::{CredentialsMode, DOCKER_HUB};

const PRIVATE: &str = "private/app";
const PUBLIC: &str = "library/pub";
const PASS_A: &str = "pass-of-alice-7f3a";
const PASS_B: &str = "pass-of-bob-9c1e";

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Every log line of this test binary, at every level: the credentials must be in none.
fn log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Sink(writer.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An upstream with two accounts (alice reads `private/app`, bob nothing private), a public
/// repository, an image in each; and a mirror taking clients' credentials.
async fn setup() -> (FakeUpstream, TestMirror, Image, Image) {
    log();
    let up = FakeUpstream::start().await;
    up.behave(|b| {
        b.accounts = vec![
            Account::new("alice", PASS_A, &[PRIVATE]),
            Account::new("bob", PASS_B, &[]),
        ];
        b.public_repos = vec![PUBLIC.into()];
    });
    let private = Image::add(&up, PRIVATE);
    let public = Image::add(&up, PUBLIC);
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut(DOCKER_HUB).unwrap().credentials = CredentialsMode::Client;
    })
    .await;
    (up, m, private, public)
}

struct Image {
    repo: &'static str,
    digest: String,
    layers: Vec<String>,
}

impl Image {
    fn add(up: &FakeUpstream, repo: &'static str) -> Image {
        let (digest, layers) = up.add_image(repo, "1.0", &[3000, 5000]);
        Image {
            repo,
            digest,
            layers,
        }
    }
}

/// Registry requests that went with a token of `account` (`None`: anonymous tokens).
fn carried_by(up: &FakeUpstream, account: Option<&str>) -> usize {
    let seen = up.state.seen.lock().unwrap().clone();
    seen.iter()
        .filter(|s| s.host == "registry")
        .filter_map(|s| up.grant_of(&s.headers))
        .filter(|g| g.account.as_deref() == account)
        .count()
}

/// Manifest HEADs the upstream answered (a token granted for their repository): the
/// confirmations, without the first request's challenge round trip.
fn confirmations(up: &FakeUpstream) -> usize {
    let seen = up.state.seen.lock().unwrap().clone();
    seen.iter()
        .filter(|s| s.host == "registry" && s.method == http::Method::HEAD)
        .filter(|s| up.grant_of(&s.headers).is_some_and(|g| g.repo.is_some()))
        .count()
}

/// Pulls `image` by tag (manifest, then each layer) with `auth`; the statuses.
async fn pull(m: &TestMirror, image: &Image, auth: Option<&str>) -> Vec<u16> {
    let mut paths = vec![format!("/v2/{}/manifests/1.0", image.repo)];
    paths.extend(
        image
            .layers
            .iter()
            .map(|l| format!("/v2/{}/blobs/{l}", image.repo)),
    );
    let mut statuses = Vec::new();
    for path in paths {
        let mut req = m.get(&path);
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let resp = req.send().await.unwrap();
        statuses.push(resp.status().as_u16());
        resp.bytes().await.unwrap();
    }
    statuses
}

#[tokio::test]
async fn a_private_image_goes_only_to_the_account_that_may_read_it_though_every_blob_is_cached() {
    let (up, m, private, public) = setup().await;
    let alice = basic("alice", PASS_A);
    let bob = basic("bob", PASS_B);

    assert_eq!(pull(&m, &private, Some(&alice)).await, [200, 200, 200]);
    let fetched = up.blob_gets();
    let alices = carried_by(&up, Some("alice"));

    // Bob and an anonymous client are refused every part of it, cached as it is, and the
    // refusal costs no counted pull.
    let gets = up.manifest_gets();
    assert_eq!(pull(&m, &private, Some(&bob)).await, [401, 401, 401]);
    assert_eq!(pull(&m, &private, None).await, [401, 401, 401]);
    assert_eq!(up.manifest_gets(), gets, "a refused client costs no pull");
    assert_eq!(up.blob_gets(), fetched);
    let by_digest = m
        .get(&format!("/v2/{PRIVATE}/manifests/{}", private.digest))
        .header("authorization", &bob)
        .send()
        .await
        .unwrap();
    assert_eq!(by_digest.status(), 401);
    let challenge = by_digest.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.starts_with(&format!("Bearer realm=\"{}/_pullthrough/token\"", m.url)),
        "{challenge}"
    );
    assert_eq!(common::error_code(by_digest).await, "UNAUTHORIZED");

    // Both get the public image, the anonymous client included.
    assert_eq!(pull(&m, &public, Some(&bob)).await, [200, 200, 200]);
    assert_eq!(pull(&m, &public, None).await, [200, 200, 200]);

    // Not one request of theirs went with alice's token; bob's went with his own.
    assert_eq!(carried_by(&up, Some("alice")), alices);
    assert!(carried_by(&up, Some("bob")) > 0);
    assert!(carried_by(&up, None) > 0);
}

#[tokio::test]
async fn one_confirming_head_per_client_and_repository_per_period_and_none_while_confirmed() {
    let (up, m, _, public) = setup().await;
    let alice = basic("alice", PASS_A);
    let by_digest = format!("/v2/{PUBLIC}/manifests/{}", public.digest);
    let get = |path: String| {
        let req = m.get(&path).header("authorization", alice.clone());
        async move { req.send().await.unwrap().status().as_u16() }
    };

    assert_eq!(get(by_digest.clone()).await, 200);
    assert_eq!(confirmations(&up), 1, "the first request is confirmed");
    let manifest_gets = up.manifest_gets();

    // Confirmed: the manifest again and the image's blobs cost no confirmation.
    assert_eq!(get(by_digest.clone()).await, 200);
    for l in &public.layers {
        assert_eq!(get(format!("/v2/{PUBLIC}/blobs/{l}")).await, 200);
        assert_eq!(get(format!("/v2/{PUBLIC}/blobs/{l}")).await, 200);
    }
    assert_eq!(confirmations(&up), 1);
    assert_eq!(up.blob_heads(), 0);
    assert_eq!(up.manifest_gets(), manifest_gets);

    // Another client is confirmed on its own.
    let bob = m
        .get(&by_digest)
        .header("authorization", basic("bob", PASS_B))
        .send()
        .await
        .unwrap();
    assert_eq!(bob.status(), 200);
    assert_eq!(confirmations(&up), 2);

    // After `client_confirm_ttl`, alice is confirmed again, once.
    m.advance(Duration::from_secs(5 * 60 + 1));
    assert_eq!(get(by_digest.clone()).await, 200);
    assert_eq!(get(by_digest.clone()).await, 200);
    assert_eq!(confirmations(&up), 3);
    assert_eq!(up.manifest_gets(), manifest_gets);
}

#[tokio::test]
async fn concurrent_first_requests_of_one_client_share_one_confirmation() {
    let (up, m, _, public) = setup().await;
    let alice = basic("alice", PASS_A);
    let path = format!("/v2/{PUBLIC}/manifests/{}", public.digest);
    let requests = (0..8).map(|_| m.get(&path).header("authorization", &alice).send());
    for resp in futures_util::future::join_all(requests).await {
        assert_eq!(resp.unwrap().status(), 200);
    }
    assert_eq!(confirmations(&up), 1);
}

#[tokio::test]
async fn the_default_mode_sends_no_confirmation() {
    let up = FakeUpstream::start().await;
    let (digest, layers) = up.add_image(PUBLIC, "1.0", &[1000]);
    let m = TestMirror::start(&up).await;
    for path in [
        format!("/v2/{PUBLIC}/manifests/{digest}"),
        format!("/v2/{PUBLIC}/blobs/{}", layers[0]),
    ] {
        let resp = m
            .get(&path)
            .header("authorization", basic("alice", PASS_A))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(up.manifest_heads() + up.blob_heads(), 0);
    // And `/v2/` asks for no credentials.
    assert_eq!(m.get("/v2/").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn clients_get_tokens_from_the_mirror_that_carry_their_own_credentials() {
    let (up, m, private, public) = setup().await;

    // `/v2/` challenges, as dockerd and podman expect before they send credentials.
    let ping = m.get("/v2/").send().await.unwrap();
    assert_eq!(ping.status(), 401);
    let challenge = ping.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let realm = format!("{}/_pullthrough/token", m.url);
    assert_eq!(
        challenge,
        format!("Bearer realm=\"{realm}\",service=\"pullthrough\"")
    );

    let token = |auth: Option<String>| {
        let mut req = m.client.get(format!(
            "{realm}?service=pullthrough&scope=repository:{PRIVATE}:pull"
        ));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["cache-control"], "no-store");
            let body: serde_json::Value = resp.json().await.unwrap();
            format!("Bearer {}", body["token"].as_str().unwrap())
        }
    };
    let alice = token(Some(basic("alice", PASS_A))).await;
    let anonymous = token(None).await;

    let ping = m
        .get("/v2/")
        .header("authorization", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);
    assert_eq!(pull(&m, &private, Some(&alice)).await, [200, 200, 200]);
    assert_eq!(pull(&m, &private, Some(&anonymous)).await, [401, 401, 401]);
    assert_eq!(pull(&m, &public, Some(&anonymous)).await, [200, 200, 200]);

    // A token this mirror did not issue is challenged, so that the client asks for one.
    let forged = m
        .get(&format!("/v2/{PUBLIC}/manifests/1.0"))
        .header("authorization", "Bearer tok-made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    assert!(forged.headers().contains_key("www-authenticate"));
    assert!(up.grant_of(&http::HeaderMap::new()).is_none());
}

#[tokio::test]
async fn mixed_mode_serves_what_the_mirrors_account_reads_to_all_and_the_rest_per_client() {
    log();
    let up = FakeUpstream::start().await;
    up.behave(|b| {
        b.accounts = vec![
            Account::new("alice", PASS_A, &[PRIVATE]),
            Account::new("mirror", "pass-of-mirror-2b8d", &[]),
        ];
        b.public_repos = vec![PUBLIC.into()];
    });
    let private = Image::add(&up, PRIVATE);
    let public = Image::add(&up, PUBLIC);
    let m = TestMirror::start_with(&up, |c| {
        let d = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        d.credentials = CredentialsMode::Client;
        d.username = Some("mirror".into());
        d.password = Some(common::secret("pass-of-mirror-2b8d"));
    })
    .await;

    assert_eq!(pull(&m, &public, None).await, [200, 200, 200]);
    assert_eq!(pull(&m, &private, None).await, [401, 401, 401]);
    assert_eq!(
        pull(&m, &private, Some(&basic("alice", PASS_A))).await,
        [200, 200, 200]
    );
    for seen in up.seen_under(PUBLIC) {
        let account = up.grant_of(&seen.headers).and_then(|g| g.account);
        assert!(
            account.is_none() || account.as_deref() == Some("mirror"),
            "public content went with {account:?}: {}",
            seen.path
        );
    }
}

#[tokio::test]
async fn no_credential_is_in_a_log_line_an_error_the_status_or_the_metrics() {
    let (_up, m, private, public) = setup().await;
    let alice = basic("alice", PASS_A);
    let bob = basic("bob", PASS_B);
    assert_eq!(pull(&m, &private, Some(&alice)).await, [200, 200, 200]);
    assert_eq!(pull(&m, &public, Some(&bob)).await, [200, 200, 200]);
    let refused = m
        .get(&format!("/v2/{PRIVATE}/manifests/1.0"))
        .header("authorization", &bob)
        .send()
        .await
        .unwrap();
    let error_body = refused.text().await.unwrap();
    let status = m
        .get("/_pullthrough/status")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = m.metrics().await;
    let log = String::from_utf8_lossy(&log().lock().unwrap()).into_owned();
    assert!(log.contains("GET"), "the log capture works");
    let b64 = |s: &str| s.trim_start_matches("Basic ").to_owned();
    for (what, text) in [
        ("an error body", &error_body),
        ("the status JSON", &status),
        ("the metrics", &metrics),
        ("the log", &log),
    ] {
        for secret in [PASS_A.to_owned(), PASS_B.to_owned(), b64(&alice), b64(&bob)] {
            assert!(!text.contains(&secret), "{what} holds a credential");
        }
    }
    assert!(status.contains("\"credentials\":\"client\""), "{status}");
}

#[tokio::test]
async fn the_catalog_names_no_repository_of_an_upstream_that_takes_clients_credentials() {
    let (_up, m, private, _) = setup().await;
    assert_eq!(
        pull(&m, &private, Some(&basic("alice", PASS_A))).await,
        [200, 200, 200]
    );
    let catalog = m
        .get("/v2/_catalog")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!catalog.contains(PRIVATE), "{catalog}");
}

#[test]
fn client_credentials_and_the_mirrors_own_client_auth_are_refused_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config("http://127.0.0.1:1", dir.path());
    config.upstreams.get_mut(DOCKER_HUB).unwrap().credentials = CredentialsMode::Client;
    config.server.tokens = vec![common::secret("t")];
    let e = config.validate().unwrap_err().to_string();
    assert!(
        e.contains("credentials") && e.contains("server.allow"),
        "{e}"
    );
}

#[tokio::test]
async fn the_admin_api_answers_only_this_host_while_clients_bring_their_credentials() {
    log();
    let up = FakeUpstream::start().await;
    up.add_image(PUBLIC, "1.0", &[100]);
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut(DOCKER_HUB).unwrap().credentials = CredentialsMode::Client;
        // The test's requests come from 127.0.0.1, a proxy that names the client it relays.
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let purge = |from: &'static str| {
        let req = m
            .client
            .post(format!(
                "{}/_pullthrough/cache/purge?reference={PUBLIC}:1.0",
                m.url
            ))
            .header("x-forwarded-for", from);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        purge("10.1.2.3").await,
        403,
        "a client elsewhere may not purge"
    );
    assert_eq!(
        purge("127.0.0.1").await,
        200,
        "an operator on this host may"
    );
}
