//! Manifests and tags: cache hits, TTL, HEAD revalidation, digest immutability, Accept.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::upstream::OCI_MANIFEST;
use common::{error_code, x_cache, FakeUpstream, TestMirror, PAST_TTL, TTL};

const ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// GET of a manifest path, with `accept` if given.
async fn get(m: &TestMirror, path: &str, accept: Option<&str>) -> reqwest::Response {
    let mut req = m.get(path);
    if let Some(accept) = accept {
        req = req.header("accept", accept);
    }
    req.send().await.unwrap()
}

/// HEAD of a manifest path, with `accept` if given.
async fn head(m: &TestMirror, path: &str, accept: Option<&str>) -> reqwest::Response {
    let mut req = m.head(path);
    if let Some(accept) = accept {
        req = req.header("accept", accept);
    }
    req.send().await.unwrap()
}

/// A manifest answer: 200, the manifest's digest and media type, and how the cache answered
/// (`X-Cache`).
#[track_caller]
fn assert_manifest(r: &reqwest::Response, digest: &str, media_type: &str, cache: &str) {
    assert_eq!(r.status(), 200, "{}", r.url());
    assert_eq!(x_cache(r), cache, "{}", r.url());
    assert_eq!(r.headers()["docker-content-digest"], digest, "{}", r.url());
    assert_eq!(r.headers()["content-type"], media_type, "{}", r.url());
}

/// An error answer: its status and its OCI error code.
async fn assert_error(r: reqwest::Response, status: u16, code: &str) {
    let url = r.url().clone();
    assert_eq!(r.status(), status, "{url}");
    assert_eq!(error_code(r).await, code, "{url}");
}

#[tokio::test]
async fn tag_miss_then_hit_within_ttl_costs_no_more_upstream_requests() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/alpine", "3.20", &[100]);
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/alpine/manifests/3.20";

    let r = get(&m, path, Some(ALL)).await;
    assert_manifest(&r, &digest, OCI_MANIFEST, "MISS");
    let body = r.bytes().await.unwrap();
    assert_eq!(common::upstream::sha256(&body), digest);
    let before = (up.manifest_gets(), up.manifest_heads());
    assert_eq!(before.0, 1, "one counted GET for a cold tag");

    let r = get(&m, path, Some(ALL)).await;
    assert_manifest(&r, &digest, OCI_MANIFEST, "HIT");
    assert_eq!(r.bytes().await.unwrap(), body);
    let r = head(&m, path, Some(ALL)).await;
    assert_manifest(&r, &digest, OCI_MANIFEST, "HIT");
    assert_eq!(
        r.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!((up.manifest_gets(), up.manifest_heads()), before);
}

#[tokio::test]
async fn single_component_names_mean_library_on_docker_hub() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/alpine", "latest", &[10]);
    let m = TestMirror::start(&up).await;
    let r = get(&m, "/v2/alpine/manifests/latest", None).await;
    assert_manifest(&r, &digest, OCI_MANIFEST, "MISS");
}

#[tokio::test]
async fn expired_tag_is_revalidated_with_head_only() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
    let path = "/v2/library/app/manifests/v1";
    assert_manifest(&get(&m, path, None).await, &digest, OCI_MANIFEST, "MISS");
    let gets = up.manifest_gets();
    m.advance(PAST_TTL);
    let heads = up.manifest_heads();
    let r = get(&m, path, None).await;
    assert_manifest(&r, &digest, OCI_MANIFEST, "REVALIDATED");
    assert_eq!(
        up.manifest_gets(),
        gets,
        "revalidation must not spend a counted GET"
    );
    assert_eq!(up.manifest_heads(), heads + 1);
}

#[tokio::test]
async fn changed_tag_fetches_only_the_new_manifest() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
    let path = "/v2/library/app/manifests/v1";
    get(&m, path, None).await;
    let (new_digest, _) = up.add_image("library/app", "v1", &[20]);
    m.advance(PAST_TTL);
    let gets = up.manifest_gets();
    let r = get(&m, path, None).await;
    assert_manifest(&r, &new_digest, OCI_MANIFEST, "MISS");
    assert_eq!(up.manifest_gets(), gets + 1);
}

#[tokio::test]
async fn digest_references_are_never_refetched() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
    let path = format!("/v2/library/app/manifests/{digest}");
    assert_manifest(&get(&m, &path, None).await, &digest, OCI_MANIFEST, "MISS");
    let total = up.total();
    // Long past any tag's TTL: a digest names the same bytes forever.
    m.advance(PAST_TTL);
    for _ in 0..3 {
        assert_manifest(&get(&m, &path, None).await, &digest, OCI_MANIFEST, "HIT");
        assert_manifest(&head(&m, &path, None).await, &digest, OCI_MANIFEST, "HIT");
        m.advance(PAST_TTL);
    }
    assert_eq!(up.total(), total);
}

#[tokio::test]
async fn head_of_cold_tag_does_not_spend_a_pull() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start(&up).await;
    let r = head(&m, "/v2/library/app/manifests/v1", Some(ALL)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert!(r.headers().contains_key("content-length"));
    assert_eq!(up.manifest_gets(), 0);
}

#[tokio::test]
async fn upstream_digest_header_mismatch_is_rejected_and_not_cached() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    {
        // Swap the stored bytes so they no longer hash to the digest the upstream claims.
        let mut c = up.state.content.lock().unwrap();
        let m = c.manifests.get_mut(&digest).unwrap();
        let mut v = m.bytes.to_vec();
        v.push(b' ');
        m.bytes = v.into();
    }
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/manifests/{digest}");
    assert_eq!(get(&m, &path, None).await.status(), 502);
    assert_eq!(
        get(&m, &path, None).await.status(),
        502,
        "a bad manifest is never cached"
    );
    assert_eq!(up.manifest_gets(), 2);
}

/// An upstream whose tag HEAD names a digest it cannot back (`sha256:000…`: a GET of it is 404,
/// or answers bytes that do not hash to it) does not pin the tag to that digest: the last
/// verified record is served stale, to HEAD-first clients too, and kept for when the upstream
/// stops lying. The lie is verified with one GET, not one per request.
#[tokio::test]
async fn a_tag_head_naming_a_digest_the_upstream_cannot_back_keeps_the_verified_tag() {
    use common::upstream::{sha256, StoredManifest, LIE_DIGEST};
    for mismatch in [false, true] {
        let up = FakeUpstream::start().await;
        let (digest, _) = up.add_image("library/app", "v1", &[10]);
        if mismatch {
            // A GET of the lying digest answers the tag's real bytes under it.
            let mut c = up.state.content.lock().unwrap();
            let real: StoredManifest = c.manifests[&digest].clone();
            c.manifests.insert(LIE_DIGEST.to_owned(), real);
        }
        let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
        let path = "/v2/library/app/manifests/v1";
        let what = if mismatch { "mismatch" } else { "404" };
        assert_manifest(&get(&m, path, None).await, &digest, OCI_MANIFEST, "MISS");
        let gets = up.manifest_gets();

        up.behave(|b| b.lie_on_tag_head = true);
        m.advance(PAST_TTL);
        // containerd and docker ask with a HEAD first, then GET what it named.
        let r = head(&m, path, None).await;
        assert_eq!(r.status(), 200, "{what}");
        assert_eq!(
            r.headers()["docker-content-digest"],
            digest.as_str(),
            "{what}"
        );
        assert_eq!(x_cache(&r), "STALE", "{what}");
        let r = get(&m, path, None).await;
        assert_manifest(&r, &digest, OCI_MANIFEST, "STALE");
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest, "{what}");
        assert_eq!(
            up.manifest_gets(),
            gets + 1,
            "{what}: one GET finds the lie; it is remembered for the next request"
        );

        up.behave(|b| b.lie_on_tag_head = false);
        let r = get(&m, path, None).await;
        assert_manifest(&r, &digest, OCI_MANIFEST, "REVALIDATED");
        assert_manifest(&head(&m, path, None).await, &digest, OCI_MANIFEST, "HIT");
    }
}

#[tokio::test]
async fn upstream_not_found_rate_limit_outage_and_denial_reach_the_client_as_such() {
    use common::upstream::Fault;
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/app/manifests/v1";
    assert_error(
        get(&m, "/v2/library/nothing/manifests/latest", None).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;

    up.add_image("library/app", "v1", &[10]);
    up.behave(|b| {
        b.manifest_fault = Some(Fault::TooManyRequests {
            retry_after: Some(42),
        })
    });
    let r = get(&m, path, None).await;
    assert_eq!(r.headers()["retry-after"], "42");
    assert_error(r, 429, "TOOMANYREQUESTS").await;

    up.behave(|b| b.manifest_fault = Some(Fault::Status(503)));
    let r = get(&m, path, None).await;
    assert!(r.status() == 502 || r.status() == 503, "{}", r.status());

    up.behave(|b| b.manifest_fault = Some(Fault::Status(403)));
    assert_error(get(&m, path, None).await, 403, "DENIED").await;
}

#[tokio::test]
async fn tags_list_is_passed_through_with_paging() {
    let up = FakeUpstream::start().await;
    for t in ["a", "b", "c"] {
        up.add_image("library/app", t, &[1]);
    }
    let m = TestMirror::start(&up).await;
    let r = get(&m, "/v2/library/app/tags/list?n=2&ns=docker.io", None).await;
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    // The next page goes to the same upstream: the client's `ns` is kept.
    assert_eq!(
        link,
        "</v2/library/app/tags/list?ns=docker.io&n=2&last=b>; rel=\"next\""
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    let r = get(&m, "/v2/library/app/tags/list?n=2&last=b", None).await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c"]));
}

#[tokio::test]
async fn a_conditional_get_that_does_not_match_is_counted_once() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[1]);
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/app/manifests/v1";
    assert_eq!(get(&m, path, None).await.status(), 200);
    let r = m
        .get(path)
        .header(
            "if-none-match",
            "\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "HIT");
    let t = m.metrics().await;
    let hits = common::metric(
        &t,
        r#"pullthrough_cache_total{kind="manifest",outcome="hit",upstream="docker.io"}"#,
    );
    assert_eq!(hits, 1.0, "one request, one lookup counted");
}

#[tokio::test]
async fn an_unpaged_tags_list_is_in_lexical_order() {
    let up = FakeUpstream::start().await;
    for t in ["b", "a", "c"] {
        up.add_image("library/app", t, &[1]);
    }
    // Sends every tag in reverse order, and no `Link`.
    up.behave(|b| b.ignore_tag_paging = true);
    let m = TestMirror::start(&up).await;
    let r = get(&m, "/v2/library/app/tags/list", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "MISS");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b", "c"]));
}

#[tokio::test]
async fn every_registry_response_carries_x_cache_errors_included() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[1]);
    let m = TestMirror::start(&up).await;
    for (path, status, cache) in [
        ("/v2/", 200, "HIT"),
        ("/v2/_catalog", 200, "HIT"),
        ("/v2/library/app/tags/list", 200, "MISS"),
        ("/v2/library/nothing/manifests/v1", 404, "MISS"),
        ("/v2/Not_A_Name/manifests/v1", 400, "HIT"),
    ] {
        let r = get(&m, path, None).await;
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(x_cache(&r), cache, "{path}");
    }
}
