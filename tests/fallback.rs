//! Fallback upstream URLs (`urls = [primary, fallback]`): tried in order when one refuses or
//! is down, each with its own health and tokens; a 404 is an answer.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::sync::atomic::Ordering;

use common::upstream::Fault;
use common::{secret, FakeUpstream, TestMirror};
use pullthrough::config::DOCKER_HUB;

/// `urls` as a config file writes them (strings, or tables with credentials), typed as the
/// config's field is.
fn urls<T: serde::de::DeserializeOwned>(entries: &str) -> T {
    #[derive(serde::Deserialize)]
    struct Urls<T> {
        urls: T,
    }
    toml::from_str::<Urls<T>>(&format!("urls = [{entries}]"))
        .unwrap()
        .urls
}

/// A mirror whose docker.io upstream is `urls = [first, second]`, backing off for `TTL`.
async fn mirror(first: &FakeUpstream, second: &FakeUpstream) -> TestMirror {
    let urls = urls(&format!("\"{}\", \"{}\"", first.url, second.url));
    TestMirror::start_with(first, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.url = String::new();
        u.urls = urls;
        u.backoff = common::TTL;
    })
    .await
}

/// The same image (same bytes, so the same digests) on both fakes.
fn same_image(a: &FakeUpstream, b: &FakeUpstream, repo: &str, tag: &str) -> (String, Vec<String>) {
    let (digest, layers) = a.add_image(repo, tag, &[1000, 3000]);
    let content = a.state.content.lock().unwrap();
    let mut other = b.state.content.lock().unwrap();
    for (k, v) in &content.tags {
        other.tags.insert(k.clone(), v.clone());
    }
    for (k, v) in &content.manifests {
        other.manifests.insert(k.clone(), v.clone());
    }
    for (k, v) in &content.blobs {
        other.blobs.insert(k.clone(), v.clone());
    }
    (digest, layers)
}

async fn status_of(m: &TestMirror, path: &str) -> u16 {
    let r = m.get(path).send().await.unwrap();
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

fn fallback_metric(text: &str, url: &str) -> f64 {
    common::metric(
        text,
        &format!("pullthrough_upstream_fallbacks_total{{upstream=\"docker.io\",url=\"{url}\"}}"),
    )
}

#[tokio::test]
async fn fallback_url_serves_when_first_answers_429() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    let (digest, _) = same_image(&primary, &fallback, "library/app", "v1");
    primary.behave(|b| b.manifest_fault = Some(Fault::TooManyRequests { retry_after: None }));
    let m = mirror(&primary, &fallback).await;
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(primary.manifest_gets(), 1);
    assert_eq!(fallback.manifest_gets(), 1);
    assert_eq!(fallback_metric(&m.metrics().await, &fallback.url), 1.0);
}

#[tokio::test]
async fn fallback_url_serves_when_first_is_down() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    let (_, layers) = same_image(&primary, &fallback, "library/app", "v1");
    primary.behave(|b| b.down = true);
    let m = mirror(&primary, &fallback).await;
    assert_eq!(status_of(&m, "/v2/library/app/manifests/v1").await, 200);
    for l in &layers {
        assert_eq!(
            status_of(&m, &format!("/v2/library/app/blobs/{l}")).await,
            200
        );
    }
    assert_eq!(fallback.manifest_gets(), 1);
    assert_eq!(fallback.blob_gets(), 2);
    assert_eq!(primary.total(), 0, "the primary never answered");
}

#[tokio::test]
async fn a_failing_first_url_is_skipped_while_it_backs_off() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    for tag in ["t1", "t2", "t3", "t4", "t5"] {
        same_image(&primary, &fallback, "library/app", tag);
    }
    primary.behave(|b| b.manifest_fault = Some(Fault::Status(503)));
    let m = mirror(&primary, &fallback).await;
    // failure_threshold (3) failures mark the primary down; later requests skip it.
    for tag in ["t1", "t2", "t3", "t4"] {
        let path = format!("/v2/library/app/manifests/{tag}");
        assert_eq!(status_of(&m, &path).await, 200, "{tag}");
    }
    assert_eq!(primary.manifest_gets(), 3, "skipped while backing off");
    assert_eq!(fallback.manifest_gets(), 4);

    primary.behave(|b| b.manifest_fault = None);
    m.advance(common::PAST_TTL);
    assert_eq!(status_of(&m, "/v2/library/app/manifests/t5").await, 200);
    assert_eq!(primary.manifest_gets(), 4, "a probe after the back-off");
    assert_eq!(fallback.manifest_gets(), 4, "the primary answered it");
}

#[tokio::test]
async fn not_found_on_first_url_is_not_retried_elsewhere() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    fallback.add_image("library/only-there", "v1", &[100]);
    let m = mirror(&primary, &fallback).await;
    let r = m
        .get("/v2/library/only-there/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(common::error_code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(primary.manifest_gets(), 1);
    assert_eq!(fallback.total(), 0, "a 404 is an answer");
}

#[tokio::test]
async fn status_shows_which_url_served() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    same_image(&primary, &fallback, "library/app", "v1");
    same_image(&primary, &fallback, "library/app", "v2");
    let m = mirror(&primary, &fallback).await;
    let urls = |v: &serde_json::Value| v["upstreams"][0]["urls"].clone();
    let status = || async {
        let r = m.get("/_pullthrough/status").send().await.unwrap();
        r.json::<serde_json::Value>().await.unwrap()
    };
    let before = urls(&status().await);
    assert_eq!(before[0]["url"], primary.url.as_str());
    assert_eq!(before[1]["url"], fallback.url.as_str());
    assert_eq!(before[0]["served_last"], false);

    assert_eq!(status_of(&m, "/v2/library/app/manifests/v1").await, 200);
    let after = urls(&status().await);
    assert_eq!(after[0]["served_last"], true);
    assert_eq!(after[1]["served_last"], false);

    primary.behave(|b| b.manifest_fault = Some(Fault::Status(500)));
    assert_eq!(status_of(&m, "/v2/library/app/manifests/v2").await, 200);
    let v = status().await;
    let after = urls(&v);
    assert_eq!(after[0]["served_last"], false);
    assert_eq!(after[1]["served_last"], true);
    assert_eq!(
        after[0]["state"], "up",
        "one failure is below the threshold"
    );
    assert_eq!(v["upstreams"][0]["state"], "up");
}

#[tokio::test]
async fn fallback_urls_are_asked_without_the_first_urls_credentials() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    let (_, layers) = same_image(&primary, &fallback, "library/app", "v1");
    primary.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("hub-user".into(), "hub-pass".into()));
        b.manifest_fault = Some(Fault::TooManyRequests { retry_after: None });
    });
    fallback.behave(|b| b.require_token = true);
    let urls = urls(&format!("\"{}\", \"{}\"", primary.url, fallback.url));
    let m = TestMirror::start_with(&primary, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.url = String::new();
        u.urls = urls;
        u.username = Some("hub-user".into());
        u.password = Some(secret("hub-pass"));
    })
    .await;
    assert_eq!(status_of(&m, "/v2/library/app/manifests/v1").await, 200);
    assert_eq!(
        status_of(&m, &format!("/v2/library/app/blobs/{}", layers[0])).await,
        200,
        "blobs answer from the primary, with its own token"
    );
    assert_eq!(primary.tokens(), 1);
    assert_eq!(
        fallback.tokens(),
        1,
        "the fallback's realm issues its own token"
    );
    for s in fallback.seen() {
        assert!(
            !s.headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("Basic ")),
            "the fallback got credentials: {s:?}"
        );
        for t in primary.issued_tokens() {
            assert!(
                !s.headers
                    .values()
                    .any(|v| v.to_str().is_ok_and(|v| v.contains(&t))),
                "the primary's token reached the fallback"
            );
        }
    }
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    let raw = format!("{user}:{pass}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// The `Authorization` of every request one of a fake's hosts (`registry`, `token`, `cdn`)
/// saw, `None` where there was none.
fn authorizations(f: &FakeUpstream, host: &str) -> Vec<Option<String>> {
    f.seen()
        .into_iter()
        .filter(|s| s.host == host)
        .map(|s| {
            s.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect()
}

/// Asserts that no request `to` saw carried a token `from` issued.
fn no_token_of(from: &FakeUpstream, to: &FakeUpstream) {
    let tokens = from.issued_tokens();
    assert!(!tokens.is_empty());
    for s in to.seen() {
        for t in &tokens {
            assert!(
                !s.headers
                    .values()
                    .any(|v| v.to_str().is_ok_and(|v| v.contains(t.as_str()))),
                "a token of {} reached {}: {s:?}",
                from.url,
                to.url
            );
        }
    }
}

/// Asserts that `f`'s registry saw no `Authorization` but its own realm's tokens.
fn only_its_own_tokens(f: &FakeUpstream) {
    let own = f.issued_tokens();
    for a in authorizations(f, "registry").into_iter().flatten() {
        assert!(
            own.iter().any(|t| a == format!("Bearer {t}")),
            "{} was sent {a}",
            f.url
        );
    }
}

/// A primary that requires Docker Hub-style tokens for `hub-user` and refuses every manifest
/// and blob (429), so that each request falls back.
fn refusing_primary(primary: &FakeUpstream) {
    primary.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("hub-user".into(), "hub-pass".into()));
        b.manifest_fault = Some(Fault::TooManyRequests { retry_after: None });
        b.blob_fault = Some(Fault::TooManyRequests { retry_after: None });
    });
}

/// A mirror of `urls = [primary, <fallback entry>]`, the upstream's own credentials
/// `hub-user`/`hub-pass`.
async fn mirror_with_credentials(
    primary: &FakeUpstream,
    fallback: &FakeUpstream,
    fallback_entry: &str,
) -> TestMirror {
    let entry = fallback_entry.replace("FALLBACK", &fallback.url);
    let urls = urls(&format!("\"{}\", {entry}", primary.url));
    TestMirror::start_with(primary, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.url = String::new();
        u.urls = urls;
        u.username = Some("hub-user".into());
        u.password = Some(secret("hub-pass"));
    })
    .await
}

/// Pulls the image's manifest and blobs through `m`, each answered 200.
async fn pull(m: &TestMirror, layers: &[String]) {
    assert_eq!(status_of(m, "/v2/library/app/manifests/v1").await, 200);
    for l in layers {
        let path = format!("/v2/library/app/blobs/{l}");
        assert_eq!(status_of(m, &path).await, 200, "{path}");
    }
}

#[tokio::test]
async fn a_fallback_url_with_its_own_credentials_gets_them_and_never_the_first_urls() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    let (_, layers) = same_image(&primary, &fallback, "library/app", "v1");
    refusing_primary(&primary);
    fallback.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("ci".into(), "ci-pass".into()));
        // Its CDN refuses any request carrying Authorization.
        b.redirect_blobs = true;
    });
    let m = mirror_with_credentials(
        &primary,
        &fallback,
        r#"{ url = "FALLBACK", username = "ci", password = "ci-pass" }"#,
    )
    .await;
    pull(&m, &layers).await;
    assert_eq!(
        fallback.manifest_gets(),
        2,
        "a challenge, then with its token"
    );
    assert_eq!(fallback.cdn_gets(), layers.len() as u64);
    assert_eq!(fallback.tokens(), 1, "one token for the repository's scope");
    assert_eq!(primary.tokens(), 1);

    let (hub, ci) = (basic("hub-user", "hub-pass"), basic("ci", "ci-pass"));
    assert_eq!(authorizations(&fallback, "token"), [Some(ci.clone())]);
    assert_eq!(authorizations(&primary, "token"), [Some(hub.clone())]);
    only_its_own_tokens(&fallback);
    only_its_own_tokens(&primary);
    assert_eq!(authorizations(&fallback, "cdn"), vec![None; layers.len()]);
    no_token_of(&primary, &fallback);
    no_token_of(&fallback, &primary);
}

#[tokio::test]
async fn credentials_same_sends_the_upstreams_credentials_to_the_fallback_for_its_own_token() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    let (_, layers) = same_image(&primary, &fallback, "library/app", "v1");
    refusing_primary(&primary);
    fallback.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("hub-user".into(), "hub-pass".into()));
        b.redirect_blobs = true;
    });
    let m = mirror_with_credentials(
        &primary,
        &fallback,
        r#"{ url = "FALLBACK", credentials = "same" }"#,
    )
    .await;
    pull(&m, &layers).await;
    assert_eq!(
        fallback.manifest_gets(),
        2,
        "a challenge, then with its token"
    );
    assert_eq!(fallback.cdn_gets(), layers.len() as u64);
    let hub = basic("hub-user", "hub-pass");
    assert_eq!(authorizations(&primary, "token"), [Some(hub.clone())]);
    assert_eq!(
        authorizations(&fallback, "token"),
        [Some(hub)],
        "the fallback's realm issues its own token for the same credentials"
    );
    only_its_own_tokens(&fallback);
    only_its_own_tokens(&primary);
    assert_eq!(authorizations(&fallback, "cdn"), vec![None; layers.len()]);
    no_token_of(&primary, &fallback);
    no_token_of(&fallback, &primary);
}

#[tokio::test]
async fn a_basic_only_fallback_gets_its_own_basic_credentials_and_its_redirects_none() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    let (_, layers) = same_image(&primary, &fallback, "library/app", "v1");
    refusing_primary(&primary);
    fallback.behave(|b| {
        b.basic_only = Some(("ci".into(), "ci-pass".into()));
        b.redirect_blobs = true;
    });
    let m = mirror_with_credentials(
        &primary,
        &fallback,
        r#"{ url = "FALLBACK", username = "ci", password = "ci-pass" }"#,
    )
    .await;
    pull(&m, &layers).await;
    let ci = basic("ci", "ci-pass");
    let sent = authorizations(&fallback, "registry");
    assert_eq!(
        sent.first(),
        Some(&None),
        "asked anonymously until it says Basic"
    );
    assert_eq!(fallback.counters().unauthorized.load(Ordering::SeqCst), 1);
    assert!(
        sent[1..].iter().all(|a| a.as_deref() == Some(ci.as_str())),
        "{sent:?}"
    );
    assert_eq!(
        sent.len(),
        1 + 1 + layers.len(),
        "challenge, manifest, blobs"
    );
    assert_eq!(authorizations(&fallback, "cdn"), vec![None; layers.len()]);
    assert_eq!(fallback.tokens(), 0);
    no_token_of(&primary, &fallback);
    assert!(
        authorizations(&primary, "token")
            .iter()
            .chain(&authorizations(&primary, "registry"))
            .all(|a| a.as_deref() != Some(ci.as_str())),
        "the fallback's credentials reached the primary"
    );
}
