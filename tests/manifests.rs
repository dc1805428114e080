//! Manifests and tags: cache hits, TTL, HEAD revalidation, digest immutability, Accept.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::upstream::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use common::{error_code, x_cache, FakeUpstream, TestMirror};

const ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[tokio::test]
async fn tag_miss_then_hit_within_ttl_costs_no_more_upstream_requests() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/alpine", "3.20", &[100]);
    let m = TestMirror::start(&up).await;

    let r = m
        .get("/v2/library/alpine/manifests/3.20")
        .header("accept", ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    let body = r.bytes().await.unwrap();
    assert_eq!(common::upstream::sha256(&body), digest);
    let before = (up.manifest_gets(), up.manifest_heads());
    assert_eq!(before.0, 1, "one counted GET for a cold tag");

    let r = m
        .get("/v2/library/alpine/manifests/3.20")
        .header("accept", ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.bytes().await.unwrap(), body);
    let r = m
        .head("/v2/library/alpine/manifests/3.20")
        .header("accept", ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(
        r.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!((up.manifest_gets(), up.manifest_heads()), before);
}

#[tokio::test]
async fn single_component_names_mean_library_on_docker_hub() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/alpine", "latest", &[10]);
    let m = TestMirror::start(&up).await;
    let r = m.get("/v2/alpine/manifests/latest").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
}

#[tokio::test]
async fn expired_tag_is_revalidated_with_head_only() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = Duration::from_millis(200)).await;
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS");
    let gets = up.manifest_gets();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let heads = up.manifest_heads();
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "REVALIDATED");
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
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = Duration::from_millis(100)).await;
    m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    let (new_digest, _) = up.add_image("library/app", "v1", &[20]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gets = up.manifest_gets();
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(r.headers()["docker-content-digest"], new_digest.as_str());
    assert_eq!(up.manifest_gets(), gets + 1);
}

#[tokio::test]
async fn digest_references_are_never_refetched() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = Duration::from_millis(1)).await;
    let path = format!("/v2/library/app/manifests/{digest}");
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS");
    let total = up.total();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..3 {
        let r = m.get(&path).send().await.unwrap();
        assert_eq!(x_cache(&r), "HIT");
        let r = m.head(&path).send().await.unwrap();
        assert_eq!(x_cache(&r), "HIT");
    }
    assert_eq!(up.total(), total);
}

#[tokio::test]
async fn head_of_cold_tag_does_not_spend_a_pull() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start(&up).await;
    let r = m
        .head("/v2/library/app/manifests/v1")
        .header("accept", ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert!(r.headers().contains_key("content-length"));
    assert_eq!(up.manifest_gets(), 0);
}

#[tokio::test]
async fn stored_type_not_accepted_by_client_is_passed_through_uncached() {
    let up = FakeUpstream::start().await;
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
    up.add_manifest(
        "library/multi",
        Some("latest"),
        OCI_INDEX,
        index.into_bytes(),
    );
    let m = TestMirror::start(&up).await;
    let r = m
        .get("/v2/library/multi/manifests/latest")
        .header("accept", ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], OCI_INDEX);

    // A client that only takes Docker v2 manifests must not get the index.
    let gets = up.manifest_gets();
    let r = m
        .get("/v2/library/multi/manifests/latest")
        .header("accept", DOCKER_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(
        up.manifest_gets(),
        gets + 1,
        "passed through to the upstream"
    );
    let last = up
        .seen()
        .into_iter()
        .rev()
        .find(|s| s.method == "GET")
        .unwrap();
    assert_eq!(
        last.headers["accept"], DOCKER_MANIFEST,
        "with the client's own Accept"
    );

    // No Accept and */* take anything.
    let r = m
        .get("/v2/library/multi/manifests/latest")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    let r = m
        .get("/v2/library/multi/manifests/latest")
        .header("accept", "*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
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
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(r.status(), 502, "a bad manifest is never cached");
    assert_eq!(up.manifest_gets(), 2);
}

#[tokio::test]
async fn upstream_errors_keep_their_meaning() {
    use common::upstream::Fault;
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let r = m
        .get("/v2/library/nothing/manifests/latest")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");

    up.add_image("library/app", "v1", &[10]);
    up.behave(|b| {
        b.manifest_fault = Some(Fault::TooManyRequests {
            retry_after: Some(42),
        })
    });
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "42");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");

    up.behave(|b| b.manifest_fault = Some(Fault::Status(503)));
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert!(r.status() == 502 || r.status() == 503, "{}", r.status());

    up.behave(|b| b.manifest_fault = Some(Fault::Status(403)));
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
}

#[tokio::test]
async fn tags_list_is_passed_through_with_paging() {
    let up = FakeUpstream::start().await;
    for t in ["a", "b", "c"] {
        up.add_image("library/app", t, &[1]);
    }
    let m = TestMirror::start(&up).await;
    let r = m
        .get("/v2/library/app/tags/list?n=2&ns=docker.io")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert_eq!(link, "</v2/library/app/tags/list?n=2&last=b>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    let r = m
        .get("/v2/library/app/tags/list?n=2&last=b")
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c"]));
}
