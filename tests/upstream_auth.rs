//! How the mirror authenticates to each upstream: anonymous Bearer, Basic-only registries,
//! Docker credential helpers, and credentials kept to the upstream they belong to.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use common::upstream::Seen;
use common::{secret, FakeUpstream, TestMirror};
use pullthrough::config::{UpstreamConfig, DOCKER_HUB};

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Whether any header of any request contains `needle`.
fn carries(seen: &[Seen], needle: &str) -> bool {
    seen.iter().any(|s| {
        s.headers
            .values()
            .any(|v| String::from_utf8_lossy(v.as_bytes()).contains(needle))
    })
}

/// Pulls `repo:tag` (manifest, then every layer) through the mirror; `query` is appended to
/// each path (`?ns=…`). Returns the statuses.
async fn pull(m: &TestMirror, repo: &str, tag: &str, layers: &[String], query: &str) -> Vec<u16> {
    let mut statuses = Vec::new();
    let r = m
        .get(&format!("/v2/{repo}/manifests/{tag}{query}"))
        .send()
        .await
        .unwrap();
    statuses.push(r.status().as_u16());
    for l in layers {
        let r = m
            .get(&format!("/v2/{repo}/blobs/{l}{query}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        r.bytes().await.unwrap();
    }
    statuses
}

/// A credential helper: a shell script that appends what it read on stdin to `calls` and
/// prints `answer` (or, with `fail`, exits 1 after printing junk on stdout and stderr).
fn helper_script(dir: &Path, answer: &str, fail: bool) -> PathBuf {
    let calls = dir.join("calls");
    let body = if fail {
        "echo 'credentials not found in native keychain'\necho 'HELPER-STDERR-s3cret' >&2\nexit 1\n"
            .to_owned()
    } else {
        format!("printf '%s' '{answer}'\n")
    };
    let script = format!(
        "#!/bin/sh\nread -r host || true\necho \"$host\" >> '{}'\n{body}",
        calls.display()
    );
    let path = dir.join("docker-credential-test");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn anonymous_bearer_upstream_pulls() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("org/app", "1.0", &[1000, 2000]);
    up.behave(|b| {
        b.require_token = true;
        b.redirect_blobs = true;
    });
    let m = TestMirror::start(&up).await;
    assert_eq!(
        pull(&m, "org/app", "1.0", &layers, "").await,
        [200, 200, 200]
    );
    assert_eq!(up.tokens(), 1, "one anonymous token for the repository");
    let seen = up.seen();
    let token_requests: Vec<_> = seen.iter().filter(|s| s.host == "token").collect();
    assert!(
        token_requests
            .iter()
            .all(|s| !s.headers.contains_key("authorization")),
        "an anonymous token request carries no credentials"
    );
    assert_eq!(
        up.counters().unauthorized.load(Ordering::SeqCst),
        1,
        "only the first request is challenged"
    );
}

#[tokio::test]
async fn basic_only_upstream_gets_basic_on_every_request() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("team/app", "v1", &[1000, 70_000]);
    up.behave(|b| {
        b.basic_only = Some(("robot".into(), "basic-pass-1".into()));
        b.redirect_blobs = true;
    });
    let anonymous = TestMirror::start(&up).await;
    let r = anonymous
        .get("/v2/team/app/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "no credentials configured: the refusal passes on"
    );

    let before = up.seen().len();
    let refused_before = up.counters().unauthorized.load(Ordering::SeqCst);
    let m = TestMirror::start_with(&up, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.username = Some("robot".into());
        u.password = Some(secret("basic-pass-1"));
    })
    .await;
    assert_eq!(
        pull(&m, "team/app", "v1", &layers, "").await,
        [200, 200, 200]
    );
    let r = m.head("/v2/team/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);

    let seen = &up.seen()[before..];
    let want = basic("robot", "basic-pass-1");
    let registry: Vec<_> = seen.iter().filter(|s| s.host == "registry").collect();
    assert!(registry.len() >= 4, "{registry:?}");
    // The first request goes out anonymously and learns the scheme from its 401.
    for s in &registry[1..] {
        assert_eq!(
            s.headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some(want.as_str()),
            "{} {}",
            s.method,
            s.path
        );
    }
    assert_eq!(
        up.counters().unauthorized.load(Ordering::SeqCst) - refused_before,
        1,
        "one challenge, then Basic on every request"
    );
    assert_eq!(up.tokens(), 0, "a Basic registry has no token realm");
    let cdn: Vec<_> = seen.iter().filter(|s| s.host == "cdn").collect();
    assert_eq!(cdn.len(), 2, "both blobs came from the CDN");
    assert!(
        cdn.iter().all(|s| !s.headers.contains_key("authorization")),
        "the registry's credentials never follow a redirect"
    );
}

#[tokio::test]
async fn credential_helper_answer_is_cached_for_its_lifetime() {
    let up = FakeUpstream::start().await;
    for repo in ["org/a", "org/b", "org/c"] {
        up.add_image(repo, "v1", &[100]);
    }
    up.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("helper-user".into(), "helper-pass".into()));
    });
    let tmp = tempfile::tempdir().unwrap();
    let helper = helper_script(
        tmp.path(),
        r#"{"ServerURL":"x","Username":"helper-user","Secret":"helper-pass"}"#,
        false,
    );
    let m = TestMirror::start_with(&up, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.credential_helper = Some(helper.display().to_string());
        u.credential_lifetime = Duration::from_secs(15 * 60);
    })
    .await;
    // Each repository needs its own token, so each asks for the credentials.
    for repo in ["org/a", "org/b"] {
        let r = m
            .get(&format!("/v2/{repo}/manifests/v1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{repo}");
    }
    let host = up.url.trim_start_matches("http://").to_owned();
    assert_eq!(
        calls(tmp.path()),
        std::slice::from_ref(&host),
        "run once, with the registry host on stdin"
    );
    m.advance(Duration::from_secs(16 * 60));
    let r = m.get("/v2/org/c/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        calls(tmp.path()),
        [host.clone(), host],
        "run again after its lifetime"
    );
    assert_eq!(up.tokens(), 3);
}

#[tokio::test]
async fn failing_credential_helper_is_a_clear_error() {
    let up = FakeUpstream::start().await;
    up.add_image("org/app", "v1", &[100]);
    up.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("u".into(), "p".into()));
    });
    let tmp = tempfile::tempdir().unwrap();
    let helper = helper_script(tmp.path(), "", true);
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut(DOCKER_HUB).unwrap().credential_helper =
            Some(helper.display().to_string());
    })
    .await;
    let r = m.get("/v2/org/app/manifests/v1").send().await.unwrap();
    assert_eq!(
        r.status(),
        502,
        "the mirror's own credentials failed, not the client's"
    );
    let body = r.text().await.unwrap();
    assert!(body.contains("UNAUTHORIZED"), "{body}");
    assert!(body.contains("credentials"), "says what failed: {body}");
    assert!(
        !body.contains("HELPER-STDERR") && !body.contains("keychain"),
        "the helper's output is not forwarded: {body}"
    );
    assert_eq!(up.tokens(), 0, "no token request without credentials");
    assert_eq!(calls(tmp.path()).len(), 1);

    let status = m.get("/_pullthrough/status").send().await.unwrap();
    let status = status.text().await.unwrap();
    assert!(status.contains("credential helper"), "{status}");
    assert!(!status.contains("HELPER-STDERR") && !status.contains("keychain"));

    let missing = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut(DOCKER_HUB).unwrap().credential_helper =
            Some(tmp.path().join("no-such-helper").display().to_string());
    })
    .await;
    let r = missing
        .get("/v2/org/app/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn identity_token_from_a_credential_helper_is_exchanged_at_the_token_realm() {
    let up = FakeUpstream::start().await;
    up.add_image("org/app", "v1", &[100]);
    up.behave(|b| {
        b.require_token = true;
        // A password GET must not work: only the refresh-token grant does.
        b.credentials = Some(("<token>".into(), "not-a-password".into()));
        b.refresh_token = Some("refresh-abc".into());
    });
    let tmp = tempfile::tempdir().unwrap();
    let helper = helper_script(
        tmp.path(),
        r#"{"ServerURL":"x","Username":"<token>","Secret":"refresh-abc"}"#,
        false,
    );
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut(DOCKER_HUB).unwrap().credential_helper =
            Some(helper.display().to_string());
    })
    .await;
    let r = m.get("/v2/org/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.seen();
    let token: Vec<_> = seen.iter().filter(|s| s.host == "token").collect();
    assert_eq!(token.len(), 1);
    assert_eq!(token[0].method, http::Method::POST);
    assert!(
        !token[0].path.contains("refresh-abc"),
        "the identity token travels in the body, not the URL"
    );
}

#[tokio::test]
async fn credentials_of_one_upstream_never_reach_another() {
    let hub = FakeUpstream::start().await;
    let (_, hub_layers) = hub.add_image("library/app", "v1", &[1000, 2000]);
    hub.behave(|b| {
        b.require_token = true;
        b.credentials = Some(("hub-user".into(), "hub-pass-A".into()));
        b.redirect_blobs = true;
    });
    let private = FakeUpstream::start().await;
    let (_, private_layers) = private.add_image("team/tool", "v2", &[1500]);
    private.behave(|b| {
        b.basic_only = Some(("robot".into(), "private-pass-B".into()));
        b.redirect_blobs = true;
    });
    let m = TestMirror::start_with(&hub, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.username = Some("hub-user".into());
        u.password = Some(secret("hub-pass-A"));
        c.upstreams.insert(
            "registry.private.test".into(),
            UpstreamConfig {
                url: private.url.clone(),
                username: Some("robot".into()),
                password: Some(secret("private-pass-B")),
                ..UpstreamConfig::default()
            },
        );
    })
    .await;
    assert_eq!(
        pull(&m, "library/app", "v1", &hub_layers, "").await,
        [200, 200, 200]
    );
    assert_eq!(
        pull(
            &m,
            "team/tool",
            "v2",
            &private_layers,
            "?ns=registry.private.test"
        )
        .await,
        [200, 200]
    );

    let hub_seen = hub.seen();
    let private_seen = private.seen();
    assert!(!carries(&hub_seen, "private-pass-B"));
    assert!(!carries(&hub_seen, &basic("robot", "private-pass-B")));
    assert!(!carries(&private_seen, &basic("hub-user", "hub-pass-A")));
    let hub_tokens = hub.issued_tokens();
    assert!(!hub_tokens.is_empty());
    for t in &hub_tokens {
        assert!(
            !carries(&private_seen, t),
            "hub token {t} reached the other registry"
        );
    }
    for s in hub_seen
        .iter()
        .chain(&private_seen)
        .filter(|s| s.host == "cdn")
    {
        assert!(
            !s.headers.contains_key("authorization"),
            "a CDN got credentials: {s:?}"
        );
    }
    assert_eq!(hub.cdn_gets() + private.cdn_gets(), 3);
}
