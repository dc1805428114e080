//! Upstream token auth: challenge, credentials, reuse, refresh.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::{secret, FakeUpstream, TestMirror};
use pullthrough::config::DOCKER_HUB;

#[tokio::test]
async fn tokens_are_fetched_once_and_reused() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    up.behave(|b| {
        b.require_token = true;
        b.token_expires_in = Some(300);
    });
    let m = TestMirror::start(&up).await;
    for _ in 0..3 {
        let r = m.head("/v2/library/app/manifests/v1").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = m.get("/v2/library/app/manifests/v2").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(up.tokens(), 1, "one token for one repository scope");
    assert_eq!(
        up.counters()
            .unauthorized
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn revoked_token_is_refreshed_once_on_401() {
    let up = FakeUpstream::start().await;
    let (digest, layers) = up.add_image("library/app", "v1", &[10]);
    up.behave(|b| b.require_token = true);
    let m = TestMirror::start(&up).await;
    let r = m
        .get(&format!("/v2/library/app/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    up.revoke_tokens();
    let r = m
        .get(&format!("/v2/library/app/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.tokens(), 2);
}

#[tokio::test]
async fn configured_credentials_are_sent_to_the_token_realm() {
    let up = FakeUpstream::start().await;
    up.add_image("me/private", "v1", &[10]);
    up.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("me".into(), "dckr_pat_s3cret".into()));
    });
    let anonymous = TestMirror::start(&up).await;
    let r = anonymous
        .get("/v2/me/private/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(common::error_code(r).await, "UNAUTHORIZED");

    let m = TestMirror::start_with(&up, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.username = Some("me".into());
        u.password = Some(secret("dckr_pat_s3cret"));
    })
    .await;
    let r = m.get("/v2/me/private/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
}
