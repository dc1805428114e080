//! Fallback upstream URLs (`urls = [primary, fallback]`): tried in order when one refuses or
//! is down, each with its own health and tokens; a 404 is an answer.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::upstream::Fault;
use common::{secret, FakeUpstream, TestMirror};
use pullthrough::config::DOCKER_HUB;

/// A mirror whose docker.io upstream is `urls = [first, second]`, backing off for `TTL`.
async fn mirror(first: &FakeUpstream, second: &FakeUpstream) -> TestMirror {
    let urls = vec![first.url.clone(), second.url.clone()];
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
    let urls = vec![primary.url.clone(), fallback.url.clone()];
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
