//! The distribution spec to the letter (issue 16): references that cannot exist, manifest
//! negotiation decided by the mirror, registry headers, tag paging, referrers, `_catalog`.
//! Each test is the hermetic equivalent of a check of the spec's conformance suite or of a
//! defect the issue names.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::upstream::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use common::{x_cache, FakeUpstream, TestMirror, PAST_TTL, TTL};

const OCI_ONLY: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

async fn send(req: reqwest::RequestBuilder, accept: Option<&str>) -> reqwest::Response {
    let req = match accept {
        Some(a) => req.header("accept", a),
        None => req,
    };
    req.send().await.unwrap()
}

/// The first OCI error of a response body, whole.
async fn first_error(r: reqwest::Response) -> serde_json::Value {
    let v: serde_json::Value = r.json().await.unwrap();
    v["errors"][0].clone()
}

/// A Docker v2 image manifest (not OCI), tagged `repo:tag`.
fn add_docker_image(up: &FakeUpstream, repo: &str, tag: &str) -> String {
    let config = up.add_blob(&b"{\"os\":\"linux\"}"[..]);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{config}","size":14}},"layers":[]}}"#
    );
    up.add_manifest(repo, Some(tag), DOCKER_MANIFEST, manifest.into_bytes())
}

#[tokio::test]
async fn a_reference_that_is_not_a_tag_is_manifest_unknown_without_asking_upstream() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    for path in [
        "/v2/library/app/manifests/.INVALID_MANIFEST_NAME",
        "/v2/library/app/manifests/-bad",
        &format!("/v2/library/app/manifests/{}", "t".repeat(200)),
    ] {
        let r = m.head(path).send().await.unwrap();
        assert_eq!(r.status(), 404, "HEAD {path}");
        assert_eq!(
            r.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        let r = m.get(path).send().await.unwrap();
        assert_eq!(r.status(), 404, "GET {path}");
        let e = first_error(r).await;
        assert_eq!(e["code"], "MANIFEST_UNKNOWN", "{path}");
        assert!(e["detail"]["reference"].is_string(), "{e}");
    }
    // Names and digests keep their 400s.
    let r = m.get("/v2/UPPER/manifests/.bad").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(first_error(r).await["code"], "NAME_INVALID");
    let r = m
        .get("/v2/library/app/manifests/sha256:zz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(first_error(r).await["code"], "DIGEST_INVALID");
    let r = m.get("/v2/library/app/blobs/latest").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(first_error(r).await["code"], "DIGEST_INVALID");
    assert_eq!(up.total(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn an_accept_that_excludes_the_stored_type_is_refused_locally_and_spends_no_pull() {
    let up = FakeUpstream::start().await;
    let digest = add_docker_image(&up, "library/app", "v1");
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/app/manifests/v1";

    // Cold: a HEAD with the mirror's own Accept says the type; no pull is spent on a refusal.
    let r = send(m.get(path), Some(OCI_ONLY)).await;
    assert_eq!(r.status(), 404);
    let e = first_error(r).await;
    assert_eq!(e["code"], "MANIFEST_UNKNOWN");
    assert!(
        e["message"].as_str().unwrap().contains(DOCKER_MANIFEST),
        "{e}"
    );
    assert_eq!(e["detail"]["mediaType"], DOCKER_MANIFEST);
    assert_eq!(up.manifest_gets(), 0, "a refusal spends no pull");
    assert_eq!(up.manifest_heads(), 1);
    let sent = up.seen().into_iter().find(|s| s.method == "HEAD").unwrap();
    assert!(
        sent.headers["accept"]
            .to_str()
            .unwrap()
            .contains(DOCKER_MANIFEST),
        "the mirror asks with its full Accept list"
    );

    let total = up.total();
    for _ in 0..5 {
        assert_eq!(send(m.get(path), Some(OCI_ONLY)).await.status(), 404);
        assert_eq!(
            send(m.head(path), Some(OCI_ONLY)).await.status(),
            404,
            "HEAD agrees"
        );
    }
    assert_eq!(up.total(), total, "the tag record decides refusals");

    // A client that takes the stored type: one GET, then every answer from the cache.
    let r = send(m.get(path), Some(DOCKER_MANIFEST)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(up.manifest_gets(), 1);
    let total = up.total();
    let by_digest = format!("/v2/library/app/manifests/{digest}");
    for _ in 0..5 {
        assert_eq!(send(m.get(path), Some(OCI_ONLY)).await.status(), 404);
        assert_eq!(send(m.get(&by_digest), Some(OCI_ONLY)).await.status(), 404);
        assert_eq!(send(m.head(&by_digest), Some(OCI_ONLY)).await.status(), 404);
    }
    let r = send(m.get(path), Some(DOCKER_MANIFEST)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(
        up.total(),
        total,
        "refusals are decided without the upstream"
    );
}

/// A tag whose manifest is Docker's schema 1, which the mirror does not store: a client that
/// does not take schema 1 is refused after a HEAD, without the GET that would be thrown away.
#[tokio::test]
async fn a_cold_schema1_tag_for_a_client_that_excludes_it_spends_no_pull() {
    const SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    let up = FakeUpstream::start().await;
    up.add_manifest(
        "library/old",
        Some("v1"),
        SCHEMA1,
        &br#"{"schemaVersion":1,"name":"library/old","tag":"v1","fsLayers":[],"history":[]}"#[..],
    );
    up.behave(|b| b.ignore_accept = true);
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/old/manifests/v1";
    for accept in [OCI_ONLY, DOCKER_MANIFEST] {
        let r = send(m.get(path), Some(accept)).await;
        assert_eq!(r.status(), 404, "{accept}");
        let e = first_error(r).await;
        assert_eq!(e["detail"]["mediaType"], SCHEMA1, "{e}");
    }
    assert_eq!(up.manifest_gets(), 0, "no pull spent on a refused answer");
    // A client that takes schema 1 gets it, passed through.
    let r = send(m.get(path), Some(SCHEMA1)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], SCHEMA1);
    assert_eq!(up.manifest_gets(), 1);
}

#[tokio::test]
async fn head_and_get_agree_for_a_cold_tag_whatever_the_accept() {
    let up = FakeUpstream::start().await;
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
    up.add_manifest(
        "library/multi",
        Some("latest"),
        OCI_INDEX,
        index.into_bytes(),
    );
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/multi/manifests/latest";
    // HEAD first (no pull), then GET: both refuse a client that takes only Docker manifests.
    let r = send(m.head(path), Some(DOCKER_MANIFEST)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(up.manifest_gets(), 0, "a HEAD never spends a pull");
    let r = send(m.get(path), Some(DOCKER_MANIFEST)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(first_error(r).await["detail"]["mediaType"], OCI_INDEX);
    assert_eq!(
        up.manifest_gets(),
        0,
        "the tag record already says the type"
    );
    let r = send(m.get(path), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(up.manifest_gets(), 1);
}

#[tokio::test]
async fn non_sha256_digests_are_unknown_without_asking_upstream() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let other = format!("sha512:{}", "a".repeat(128));
    for (path, code) in [
        (
            format!("/v2/library/app/manifests/{other}"),
            "MANIFEST_UNKNOWN",
        ),
        (format!("/v2/library/app/blobs/{other}"), "BLOB_UNKNOWN"),
        (
            format!("/v2/library/app/referrers/{other}"),
            "MANIFEST_UNKNOWN",
        ),
    ] {
        let r = m.get(&path).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(first_error(r).await["code"], code, "{path}");
    }
    // A malformed digest of any algorithm is still the client's mistake.
    let r = m.get("/v2/library/app/blobs/sha512:").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(first_error(r).await["code"], "DIGEST_INVALID");
    assert_eq!(up.total(), 0);
}

#[tokio::test]
async fn manifests_and_blobs_carry_etag_and_answer_if_none_match_with_304() {
    let up = FakeUpstream::start().await;
    let (digest, layers) = up.add_image("library/app", "v1", &[1000]);
    let m = TestMirror::start(&up).await;
    let quoted = format!("\"{digest}\"");

    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], quoted.as_str());
    assert!(
        !r.headers().contains_key("cache-control"),
        "a tag can move: not immutable"
    );
    let by_digest = format!("/v2/library/app/manifests/{digest}");
    let r = m.get(&by_digest).send().await.unwrap();
    assert_eq!(r.headers()["etag"], quoted.as_str());
    assert_eq!(r.headers()["cache-control"], "max-age=31536000, immutable");

    let gets = up.manifest_gets();
    for path in ["/v2/library/app/manifests/v1", by_digest.as_str()] {
        for req in [m.get(path), m.head(path)] {
            let r = req.header("if-none-match", &quoted).send().await.unwrap();
            assert_eq!(r.status(), 304, "{path}");
            assert_eq!(r.headers()["etag"], quoted.as_str());
            assert!(r.bytes().await.unwrap().is_empty());
        }
    }
    // A stale validator gets the full body.
    let r = m
        .get("/v2/library/app/manifests/v1")
        .header("if-none-match", "\"sha256:0000\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.bytes().await.unwrap().is_empty());
    assert_eq!(up.manifest_gets(), gets, "no 304 spends a pull");

    let blob = format!("/v2/library/app/blobs/{}", layers[0]);
    let r = m.get(&blob).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = format!("\"{}\"", layers[0]);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.headers()["cache-control"], "max-age=31536000, immutable");
    assert_eq!(r.bytes().await.unwrap().len(), 1000);
    common::wait_committed(&m, &blob).await;
    let r = m
        .get(&blob)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn every_v2_answer_says_the_api_version_and_errors_may_carry_detail() {
    let up = FakeUpstream::start().await;
    let (digest, layers) = up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start(&up).await;
    for path in [
        "/v2/".to_owned(),
        "/v2/library/app/manifests/v1".to_owned(),
        format!("/v2/library/app/manifests/{digest}"),
        format!("/v2/library/app/blobs/{}", layers[0]),
        "/v2/library/app/tags/list".to_owned(),
        "/v2/library/nothing/manifests/v1".to_owned(),
        "/v2/UPPER/manifests/v1".to_owned(),
        "/v2/library/app/nothing".to_owned(),
    ] {
        for req in [m.get(&path), m.head(&path)] {
            let r = req.send().await.unwrap();
            assert_eq!(
                r.headers()
                    .get("docker-distribution-api-version")
                    .map(|v| v.to_str().unwrap()),
                Some("registry/2.0"),
                "{path}: {}",
                r.status()
            );
        }
    }
    let r = m
        .client
        .put(format!("{}/v2/library/app/manifests/v1", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test]
async fn tags_list_is_paged_by_the_mirror_when_the_upstream_ignores_n_and_last() {
    let up = FakeUpstream::start().await;
    for t in ["b", "d", "a", "c", "e"] {
        up.add_image("library/app", t, &[1]);
    }
    up.behave(|b| b.ignore_tag_paging = true);
    let m = TestMirror::start(&up).await;
    let tags = |v: serde_json::Value| v["tags"].clone();

    let r = m.get("/v2/library/app/tags/list?n=2").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["link"],
        "</v2/library/app/tags/list?n=2&last=b>; rel=\"next\""
    );
    assert_eq!(tags(r.json().await.unwrap()), serde_json::json!(["a", "b"]));
    let r = m
        .get("/v2/library/app/tags/list?n=2&last=b")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["link"],
        "</v2/library/app/tags/list?n=2&last=d>; rel=\"next\""
    );
    assert_eq!(tags(r.json().await.unwrap()), serde_json::json!(["c", "d"]));
    let r = m
        .get("/v2/library/app/tags/list?n=2&last=d")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("link"));
    assert_eq!(tags(r.json().await.unwrap()), serde_json::json!(["e"]));
    let r = m
        .get("/v2/library/app/tags/list?last=c")
        .send()
        .await
        .unwrap();
    assert_eq!(tags(r.json().await.unwrap()), serde_json::json!(["d", "e"]));
    // Without paging too, in lexical order as the spec asks (the upstream sent them reversed).
    let r = m.get("/v2/library/app/tags/list").send().await.unwrap();
    assert_eq!(
        tags(r.json().await.unwrap()),
        serde_json::json!(["a", "b", "c", "d", "e"])
    );
}

const SBOM: &str = "application/spdx+json";
const SIGNATURE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// The `manifests` of an image index answer, with its checks: 200, an OCI index.
async fn referrers(r: reqwest::Response) -> Vec<serde_json::Value> {
    assert_eq!(r.status(), 200, "{}", r.url());
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    v["manifests"].as_array().unwrap().clone()
}

#[tokio::test]
async fn referrers_are_fetched_once_cached_filtered_and_served_stale_on_outage() {
    let up = FakeUpstream::start().await;
    let (subject, _) = up.add_image("library/app", "v1", &[10]);
    let sbom = up.add_referrer("library/app", &subject, SBOM);
    let sig = up.add_referrer("library/app", &subject, SIGNATURE);
    up.behave(|b| b.filter_referrers = true);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
    let path = format!("/v2/library/app/referrers/{subject}");

    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS");
    assert!(!r.headers().contains_key("oci-filters-applied"));
    let list = referrers(r).await;
    let digests: Vec<_> = list.iter().map(|d| d["digest"].clone()).collect();
    assert_eq!(digests, [sbom.as_str(), sig.as_str()]);
    assert_eq!(up.referrers_gets(), 1);
    assert_eq!(up.manifest_gets(), 0, "referrers spend no counted pull");

    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(referrers(r).await.len(), 2);
    let r = m
        .get(&path)
        .query(&[("artifactType", SBOM)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let list = referrers(r).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], sbom.as_str());
    assert_eq!(list[0]["artifactType"], SBOM);
    assert_eq!(
        up.referrers_gets(),
        1,
        "one upstream list serves every filter"
    );

    // The referrer itself pulls through like any manifest.
    let r = m
        .get(&format!("/v2/library/app/manifests/{sbom}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["subject"]["digest"], subject.as_str());
    assert_eq!(v["artifactType"], SBOM);

    // Past the TTL the list is asked for again; with the upstream down, served stale.
    let late = up.add_referrer("library/app", &subject, SBOM);
    m.advance(PAST_TTL);
    up.behave(|b| b.manifest_fault = Some(common::upstream::Fault::Status(503)));
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(referrers(r).await.len(), 2);
    up.behave(|b| b.manifest_fault = None);
    m.advance(PAST_TTL);
    let r = m.get(&path).send().await.unwrap();
    let list = referrers(r).await;
    assert_eq!(list.len(), 3);
    assert_eq!(list[2]["digest"], late.as_str());
}

#[tokio::test]
async fn referrers_without_the_api_fall_back_to_the_tag_schema() {
    let up = FakeUpstream::start().await;
    up.behave(|b| b.no_referrers_api = true);
    let (subject, _) = up.add_image("library/app", "v1", &[10]);
    let (bare, _) = up.add_image("library/app", "v2", &[10]);
    let sig = up.add_referrer("library/app", &subject, SIGNATURE);
    // The referrers tag schema: an index of the referrers tagged `sha256-<hex>`.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sig, "size": 1, "artifactType": SIGNATURE}],
    });
    let tag = subject.replace(':', "-");
    up.add_manifest(
        "library/app",
        Some(&tag),
        OCI_INDEX,
        index.to_string().into_bytes(),
    );
    let m = TestMirror::start(&up).await;

    let r = m
        .get(&format!(
            "/v2/library/app/referrers/{subject}?artifactType={SBOM}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    assert!(referrers(r).await.is_empty());
    let r = m
        .get(&format!("/v2/library/app/referrers/{subject}"))
        .send()
        .await
        .unwrap();
    let list = referrers(r).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], sig.as_str());
    assert_eq!(up.manifest_gets(), 1, "the tag's index, fetched once");

    // No API and no tag: an empty index, without a counted pull.
    let r = m
        .get(&format!("/v2/library/app/referrers/{bare}"))
        .send()
        .await
        .unwrap();
    assert!(referrers(r).await.is_empty());
    assert_eq!(up.manifest_gets(), 1);
    // Bad digests are 400, as for blobs.
    let r = m
        .get("/v2/library/app/referrers/latest")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(first_error(r).await["code"], "DIGEST_INVALID");
}

#[tokio::test]
async fn catalog_lists_the_repositories_the_mirror_holds_paged() {
    let up = FakeUpstream::start().await;
    for repo in ["library/b", "library/a", "me/tools/c", "library/unpulled"] {
        up.add_image(repo, "v1", &[1]);
    }
    let m = TestMirror::start(&up).await;
    let repos = |v: serde_json::Value| v["repositories"].clone();
    let r = m.get("/v2/_catalog").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(repos(r.json().await.unwrap()), serde_json::json!([]));
    for repo in ["library/b", "library/a", "me/tools/c"] {
        let r = m
            .get(&format!("/v2/{repo}/manifests/v1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let total = up.total();
    let r = m.get("/v2/_catalog").send().await.unwrap();
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(
        repos(r.json().await.unwrap()),
        serde_json::json!(["library/a", "library/b", "me/tools/c"])
    );
    let r = m.get("/v2/_catalog?n=2").send().await.unwrap();
    assert_eq!(
        r.headers()["link"],
        "</v2/_catalog?n=2&last=library%2Fb>; rel=\"next\""
    );
    assert_eq!(
        repos(r.json().await.unwrap()),
        serde_json::json!(["library/a", "library/b"])
    );
    let r = m
        .get("/v2/_catalog?n=2&last=library%2Fb")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("link"));
    assert_eq!(
        repos(r.json().await.unwrap()),
        serde_json::json!(["me/tools/c"])
    );
    assert_eq!(up.total(), total, "the catalog never asks the upstream");
    let r = m.get("/v2/_catalog?ns=ghcr.io").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(first_error(r).await["code"], "NAME_UNKNOWN");
}
