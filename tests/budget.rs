//! The pull budget: tracked, shielded, and never turned into failed pulls of cached images.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::upstream::Fault;
use common::{error_code, x_cache, FakeUpstream, TestMirror, PAST_TTL, TTL};
use pullthrough::config::DOCKER_HUB;

async fn status(m: &TestMirror) -> serde_json::Value {
    let v: serde_json::Value = m.status().await;
    v["upstreams"][0].clone()
}

#[tokio::test]
async fn budget_follows_upstream_headers_and_heads_are_free() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    up.behave(|b| b.ratelimit = Some((100, 100)));
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;

    m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    let s = status(&m).await;
    assert_eq!(s["limit"], 100);
    assert_eq!(s["remaining"], 99);
    assert_eq!(s["window_secs"], 21600);
    assert_eq!(s["source"], "127.0.0.1");
    assert_eq!(s["counted_pulls"], 1);
    assert_eq!(s["state"], "up");

    for _ in 0..3 {
        m.advance(PAST_TTL);
        let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
        assert_eq!(x_cache(&r), "REVALIDATED");
    }
    let s = status(&m).await;
    assert_eq!(s["remaining"], 99, "HEAD revalidations spend nothing");
    assert_eq!(s["counted_pulls"], 1);
    let metrics = m.metrics().await;
    assert!(
        metrics.contains("pullthrough_pull_budget_remaining{upstream=\"docker.io\"} 99"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pullthrough_upstream_pulls_total{upstream=\"docker.io\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn exhausted_budget_serves_cached_tags_stale_and_429s_the_rest() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    up.add_image("library/other", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    m.advance(PAST_TTL);

    up.behave(|b| {
        b.manifest_fault = Some(Fault::TooManyRequests {
            retry_after: Some(120),
        })
    });
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "STALE");
    let r = m.head("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "STALE");

    let r = m
        .get("/v2/library/other/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "120");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
}

#[tokio::test]
async fn without_retry_after_the_budget_window_suggests_one() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    up.add_image("library/other", "v1", &[10]);
    up.behave(|b| b.ratelimit = Some((100, 1)));
    let m = TestMirror::start(&up).await;
    m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    up.behave(|b| b.manifest_fault = Some(Fault::TooManyRequests { retry_after: None }));
    let r = m
        .get("/v2/library/other/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers()["retry-after"],
        "216",
        "21600 s window / 100 pulls"
    );
}

#[tokio::test]
async fn dead_upstream_serves_stale_and_fails_fast_then_recovers() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| {
        c.cache.tag_ttl = TTL;
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.failure_threshold = 2;
        u.backoff = TTL;
        u.first_byte_timeout = Duration::from_millis(300);
    })
    .await;
    m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    m.advance(PAST_TTL);

    // Hanging: each request could wait for the timeout; after two, the mirror stops asking.
    up.behave(|b| b.hang = true);
    for _ in 0..2 {
        let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
        assert_eq!(x_cache(&r), "STALE");
    }
    let s = status(&m).await;
    assert_eq!(s["state"], "backing_off");
    // Failing fast: the upstream is not asked (and so not waited for) while backing off.
    let asked = up.seen().len();
    let r = m
        .get("/v2/library/nothing/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(up.seen().len(), asked, "did not fail fast");
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "STALE");

    // Back: after the back-off one probe goes through and the upstream is used again.
    up.behave(|b| b.hang = false);
    m.advance(PAST_TTL);
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "REVALIDATED");
    assert_eq!(status(&m).await["state"], "up");
}

#[tokio::test]
async fn refused_and_closed_connections_count_as_outages() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
    m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    m.advance(PAST_TTL);
    up.behave(|b| b.down = true);
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "STALE");
    let r = m.get("/v2/library/cold/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("docker.io"));

    // Nothing listening at all: a socket bound but not listening keeps the port ours for the
    // whole test, and connecting to it is refused.
    let bound = tokio::net::TcpSocket::new_v4().unwrap();
    bound.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = bound.local_addr().unwrap().port();
    let dead = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut(DOCKER_HUB).unwrap().url = format!("http://127.0.0.1:{port}");
    })
    .await;
    let r = dead
        .get("/v2/library/app/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // Refused at once, not given up on after the connect timeout.
    let v: serde_json::Value = r.json().await.unwrap();
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("connection refused"), "{message}");
    drop(bound);
}

#[tokio::test]
async fn missing_tags_are_remembered_for_the_negative_ttl() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start_with(&up, |c| c.cache.negative_ttl = TTL).await;
    for _ in 0..10 {
        let r = m
            .get("/v2/library/app/manifests/typo")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    }
    assert_eq!(up.manifest_gets() + up.manifest_heads(), 1);
    m.advance(PAST_TTL);
    up.add_image("library/app", "typo", &[10]);
    let r = m
        .get("/v2/library/app/manifests/typo")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "forgotten after negative_ttl");
}

#[tokio::test]
async fn per_client_limit_answers_429_and_spares_other_addresses() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start_with(&up, |c| {
        c.server.client_requests = 3;
        c.server.client_window = Duration::from_secs(60);
    })
    .await;
    for _ in 0..3 {
        assert_eq!(m.get("/v2/").send().await.unwrap().status(), 200);
    }
    let r = m.get("/v2/").send().await.unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    assert_eq!(
        m.get("/healthz").send().await.unwrap().status(),
        200,
        "health is not limited"
    );

    let other = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let r = other.get(format!("{}/v2/", m.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn pull_cap_spends_no_more_than_configured() {
    let up = FakeUpstream::start().await;
    for t in ["a", "b", "c"] {
        up.add_image("library/app", t, &[10]);
    }
    let m = TestMirror::start_with(&up, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.max_pulls = 2;
        u.max_pulls_window = Duration::from_secs(3600);
    })
    .await;
    assert_eq!(
        m.get("/v2/library/app/manifests/a")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        m.get("/v2/library/app/manifests/b")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = m.get("/v2/library/app/manifests/c").send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(up.manifest_gets(), 2);
}
