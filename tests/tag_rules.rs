//! Tag freshness by pattern (issue 28): an upstream's `tag_rules`, tried in order, give a tag a
//! TTL of its own, make it immutable (never revalidated once cached) or revalidate it on every
//! request (`always`: a HEAD each time, a counted GET only when the digest moved). Every test
//! counts what the fake upstream was asked, on the mirror's manual clock.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::{x_cache, FakeUpstream, TestMirror, PAST_TTL, TTL};
use pullthrough::config::Config;
use pullthrough::tag_rules::TagPatterns;

/// A mirror in front of `up` as docker.io, tags trusted for [`TTL`] unless `rules` (TOML
/// tables of `upstreams."docker.io"`) say otherwise. The rules are read from the file form, as
/// an operator writes them.
async fn mirror_with_rules(up: &FakeUpstream, rules: &str) -> TestMirror {
    mirror_with(up, |_| {}, rules).await
}

/// [`mirror_with_rules`], after `tweak` set other values.
async fn mirror_with(
    up: &FakeUpstream,
    tweak: impl FnOnce(&mut Config),
    rules: &str,
) -> TestMirror {
    let dir = tempfile::tempdir().unwrap();
    let mut base = common::test_config(&up.url, dir.path());
    base.cache.tag_ttl = TTL;
    tweak(&mut base);
    let text = format!("{}\n{rules}", base.to_redacted_toml().unwrap());
    let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    TestMirror::launch(config, dir, |server| server).await
}

/// How many requests of `method` for `path` the fake saw.
fn seen(up: &FakeUpstream, method: &str, path: &str) -> usize {
    up.seen()
        .iter()
        .filter(|s| s.method == method && s.path == path)
        .count()
}

async fn pull(m: &TestMirror, tag: &str) -> (String, String) {
    let resp = m
        .get(&format!("/v2/library/app/manifests/{tag}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{tag}");
    let digest = resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    (x_cache(&resp), digest)
}

#[tokio::test]
async fn latest_is_revalidated_after_its_short_ttl_and_a_release_tag_never() {
    let up = FakeUpstream::start().await;
    let (latest, _) = up.add_image("library/app", "latest", &[10]);
    let (release, _) = up.add_image("library/app", "v1.2.3", &[10]);
    let (edge, _) = up.add_image("library/app", "edge", &[10]);
    let m = mirror_with_rules(
        &up,
        "[[upstreams.\"docker.io\".tag_rules]]\nmatch = \"*:latest\"\nttl = \"10s\"\n\
         [[upstreams.\"docker.io\".tag_rules]]\nmatch = \"*:v[0-9]*\"\nimmutable = true\n",
    )
    .await;
    assert_eq!(pull(&m, "latest").await, ("MISS".into(), latest.clone()));
    assert_eq!(pull(&m, "v1.2.3").await, ("MISS".into(), release.clone()));
    assert_eq!(pull(&m, "edge").await, ("MISS".into(), edge.clone()));
    let before = up.total();

    // Past latest's 10 s, within the default TTL: only latest is asked (a HEAD).
    m.advance(Duration::from_secs(11));
    assert_eq!(pull(&m, "latest").await, ("REVALIDATED".into(), latest));
    assert_eq!(pull(&m, "v1.2.3").await, ("HIT".into(), release.clone()));
    assert_eq!(pull(&m, "edge").await, ("HIT".into(), edge.clone()));
    assert_eq!(seen(&up, "HEAD", "/v2/library/app/manifests/latest"), 1);
    assert_eq!(up.total(), before + 1, "{:?}", up.seen());

    // Past the default TTL: the tag no rule matches is revalidated, the release tag still not,
    // even though it moved upstream.
    up.retag("library/app", "v1.2.3", &edge);
    m.advance(PAST_TTL);
    assert_eq!(pull(&m, "edge").await, ("REVALIDATED".into(), edge));
    assert_eq!(pull(&m, "v1.2.3").await, ("HIT".into(), release));
    assert_eq!(seen(&up, "HEAD", "/v2/library/app/manifests/v1.2.3"), 0);
    assert_eq!(seen(&up, "GET", "/v2/library/app/manifests/v1.2.3"), 1);
    assert_eq!(up.total(), before + 2, "{:?}", up.seen());
}

#[tokio::test]
async fn always_costs_one_head_per_request_and_a_get_only_when_the_tag_moved() {
    let up = FakeUpstream::start().await;
    let (first, _) = up.add_image("library/app", "nightly", &[10]);
    let (second, _) = up.add_image("library/app", "other", &[10]);
    let m = mirror_with_rules(
        &up,
        "[[upstreams.\"docker.io\".tag_rules]]\nmatch = \"library/*:nightly\"\nalways = true\n",
    )
    .await;
    assert_eq!(pull(&m, "nightly").await, ("MISS".into(), first.clone()));
    let (heads, gets) = (up.manifest_heads(), up.manifest_gets());

    // No time passes: each request is still one HEAD, and no GET while the digest holds.
    for i in 1..=3u64 {
        assert_eq!(
            pull(&m, "nightly").await,
            ("REVALIDATED".into(), first.clone())
        );
        assert_eq!(up.manifest_heads(), heads + i);
        assert_eq!(up.manifest_gets(), gets);
    }
    let resp = m
        .head("/v2/library/app/manifests/nightly")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.manifest_heads(), heads + 4);
    assert_eq!(up.manifest_gets(), gets);

    // Moved upstream: the next request sees it at once, with one GET of the new manifest.
    up.retag("library/app", "nightly", &second);
    assert_eq!(pull(&m, "nightly").await.1, second);
    assert_eq!(up.manifest_heads(), heads + 5);
    assert_eq!(up.manifest_gets(), gets + 1);
}

#[tokio::test]
async fn immutable_tags_still_work_and_apply_after_the_tag_rules() {
    let up = FakeUpstream::start().await;
    let (release, _) = up.add_image("library/app", "1.2.3", &[10]);
    let (risky, _) = up.add_image("library/risky", "1.2.3", &[10]);
    let m = mirror_with(
        &up,
        |c| {
            c.upstreams.get_mut("docker.io").unwrap().immutable_tags =
                TagPatterns::new(&[r"^v?[0-9]+\.[0-9]+\.[0-9]+$"]).unwrap();
        },
        "[[upstreams.\"docker.io\".tag_rules]]\nmatch = \"library/risky:*\"\nalways = true\n",
    )
    .await;
    let app = "/v2/library/app/manifests/1.2.3";
    let risky_path = "/v2/library/risky/manifests/1.2.3";
    for path in [app, risky_path] {
        assert_eq!(m.get(path).send().await.unwrap().status(), 200);
    }
    m.advance(PAST_TTL);
    for _ in 0..2 {
        let resp = m.get(app).send().await.unwrap();
        assert_eq!(x_cache(&resp), "HIT");
        assert_eq!(resp.headers()["docker-content-digest"], release.as_str());
        let resp = m.get(risky_path).send().await.unwrap();
        assert_eq!(x_cache(&resp), "REVALIDATED");
        assert_eq!(resp.headers()["docker-content-digest"], risky.as_str());
    }
    assert_eq!(seen(&up, "HEAD", app), 0);
    assert_eq!(seen(&up, "HEAD", risky_path), 2);
}

#[tokio::test]
async fn the_status_page_shows_each_busy_repositorys_tag_rules() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "latest", &[100]);
    let m = mirror_with_rules(
        &up,
        r#"[[upstreams."docker.io".tag_rules]]
match = "*:latest"
ttl = "1m"
[[upstreams."docker.io".tag_rules]]
match = "other/*:*"
always = true
"#,
    )
    .await;
    pull(&m, "latest").await;
    let status: serde_json::Value = common::wait_for("the request counted", TTL, || async {
        let s: serde_json::Value = m.status().await;
        (!s["top_repositories"]["by_requests"][0].is_null()).then_some(s)
    })
    .await;
    let row = &status["top_repositories"]["by_requests"][0];
    assert_eq!(row["repository"], "library/app");
    assert_eq!(row["registry"], "docker.io");
    let rules: Vec<&str> = row["tag_rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    // The rule for other/* cannot match this repository; the default closes the list.
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(
        rules[0].starts_with("tag_rules #1 match = \"*:latest\": ttl 1m"),
        "{rules:?}"
    );
    assert!(rules[1].starts_with("otherwise: ttl"), "{rules:?}");
}
