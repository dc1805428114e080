//! Replicas that behave as one mirror for everything but blob bytes (see `common::fleet`:
//! servers in one process sharing an in-memory coordinator and object store, one fake upstream
//! and one clock).

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::fleet::Fleet;
use common::upstream::{sha256, Fault};
use common::{error_code, x_cache, TestMirror, PAST_TTL, TTL};
use object_store::path::Path;
use object_store::ObjectStore;
use pullthrough::config::{Config, DOCKER_HUB};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

async fn get(m: &TestMirror, path: &str) -> reqwest::Response {
    m.get(path).send().await.unwrap()
}

/// GETs `path` and checks that the body is what `digest` names.
async fn pull(m: &TestMirror, path: &str, digest: &str) -> String {
    let r = get(m, path).await;
    assert_eq!(r.status(), 200, "{path}");
    let cache = x_cache(&r);
    let body = r.bytes().await.unwrap();
    assert_eq!(sha256(&body), digest, "{path}");
    cache
}

/// The config digest of an OCI image manifest.
fn config_of(manifest: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    v["config"]["digest"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_tag_revalidated_by_one_replica_is_fresh_for_the_others() {
    let fleet = Fleet::new().await;
    let (digest, _) = fleet.upstream.add_image("library/alpine", "3", &[100]);
    let (a, b) = (fleet.replica().await, fleet.replica().await);

    pull(&a, "/v2/library/alpine/manifests/3", &digest).await;
    assert_eq!(fleet.upstream.manifest_gets(), 1);
    fleet.wait_shared("manifests", &digest).await;
    let before = fleet.upstream.total();

    let cache = pull(&b, "/v2/library/alpine/manifests/3", &digest).await;
    assert_eq!(
        cache, "HIT",
        "the tag record and the manifest came from the fleet"
    );
    assert_eq!(
        fleet.upstream.total(),
        before,
        "b asked the upstream nothing"
    );

    fleet.advance(PAST_TTL);
    let cache = pull(&a, "/v2/library/alpine/manifests/3", &digest).await;
    assert_eq!(cache, "REVALIDATED");
    assert_eq!(fleet.upstream.manifest_heads(), 1);
    let cache = pull(&b, "/v2/library/alpine/manifests/3", &digest).await;
    assert_eq!(cache, "HIT", "a's revalidation is fresh for b");
    let r = b
        .head("/v2/library/alpine/manifests/3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        fleet.upstream.manifest_heads(),
        1,
        "one revalidation per TTL for the fleet"
    );
    assert_eq!(fleet.upstream.manifest_gets(), 1);
}

#[tokio::test]
async fn a_retagged_tag_is_learned_from_the_replica_that_revalidated_it() {
    let fleet = Fleet::new().await;
    let (old, _) = fleet.upstream.add_image("library/app", "1", &[100]);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    pull(&a, "/v2/library/app/manifests/1", &old).await;
    pull(&b, "/v2/library/app/manifests/1", &old).await;

    let (new, _) = fleet.upstream.add_image("library/app", "2", &[100]);
    fleet.upstream.retag("library/app", "1", &new);
    fleet.advance(PAST_TTL);
    pull(&a, "/v2/library/app/manifests/1", &new).await;
    fleet.wait_shared("manifests", &new).await;
    let before = fleet.upstream.total();
    pull(&b, "/v2/library/app/manifests/1", &new).await;
    assert_eq!(
        fleet.upstream.total(),
        before,
        "b's own stale record gave way to a's fresher one"
    );
}

#[tokio::test]
async fn a_fourth_replica_serves_a_pulled_image_with_zero_upstream_requests() {
    let fleet = Fleet::new().await;
    let repo = "library/multi";
    let (image, layers) = fleet.upstream.add_image(repo, "amd64-only", &[3000, 5000]);
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{image}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    );
    let index_digest =
        fleet
            .upstream
            .add_manifest(repo, Some("1.0"), OCI_INDEX, index.into_bytes());
    let (a, b, c) = (
        fleet.replica().await,
        fleet.replica().await,
        fleet.replica().await,
    );

    // The image pulled through three replicas, a step on each.
    pull(&a, &format!("/v2/{repo}/manifests/1.0"), &index_digest).await;
    let r = get(&b, &format!("/v2/{repo}/manifests/{image}")).await;
    assert_eq!(r.status(), 200);
    let config = config_of(&r.bytes().await.unwrap());
    let mut blobs = layers.clone();
    blobs.push(config);
    for blob in &blobs {
        pull(&c, &format!("/v2/{repo}/blobs/{blob}"), blob).await;
    }
    fleet.wait_shared("manifests", &index_digest).await;
    fleet.wait_shared("manifests", &image).await;
    for blob in &blobs {
        fleet.wait_shared("blobs", blob).await;
    }
    let before = fleet.upstream.total();

    let d = fleet.replica().await;
    pull(&d, &format!("/v2/{repo}/manifests/1.0"), &index_digest).await;
    let r = d
        .head(&format!("/v2/{repo}/manifests/{image}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    pull(&d, &format!("/v2/{repo}/manifests/{image}"), &image).await;
    for blob in &blobs {
        pull(&d, &format!("/v2/{repo}/blobs/{blob}"), blob).await;
    }
    assert_eq!(
        fleet.upstream.total(),
        before,
        "the fourth replica asked the upstream nothing"
    );

    // Shared links are per repository: another repository is still confirmed upstream.
    fleet
        .upstream
        .behave(|b| b.missing_repos = vec!["library/other".into()]);
    let r = get(&d, &format!("/v2/library/other/manifests/{image}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn a_damaged_shared_manifest_is_deleted_and_fetched_from_the_upstream() {
    let fleet = Fleet::new().await;
    let (digest, _) = fleet.upstream.add_image("library/alpine", "3", &[100]);
    let hex = digest.trim_start_matches("sha256:");
    let path = Path::from(format!("manifests/sha256/{hex}"));
    fleet
        .store
        .put(
            &path,
            b"application/vnd.oci.image.manifest.v1+json\n{}"
                .to_vec()
                .into(),
        )
        .await
        .unwrap();
    let a = fleet.replica().await;
    pull(
        &a,
        &format!("/v2/library/alpine/manifests/{digest}"),
        &digest,
    )
    .await;
    assert_eq!(
        fleet.upstream.manifest_gets(),
        1,
        "fetched from the upstream"
    );
    // The upstream's verified bytes replace the damaged object.
    common::eventually("the shared manifest is whole", common::SETTLE, || async {
        match fleet.store.get(&path).await {
            Ok(got) => {
                let raw = got.bytes().await.unwrap();
                let body = &raw[raw.iter().position(|&c| c == b'\n').unwrap() + 1..];
                sha256(body) == digest
            }
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test]
async fn a_missing_tag_is_missing_for_every_replica() {
    let fleet = Fleet::new().await;
    let (a, b) = (fleet.replica().await, fleet.replica().await);

    let r = get(&a, "/v2/library/alpine/manifests/typo").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let asked = fleet.upstream.total();
    assert!(asked >= 1);

    let r = get(&b, "/v2/library/alpine/manifests/typo").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(fleet.upstream.total(), asked, "b knew from a");

    fleet.advance(PAST_TTL);
    let r = get(&b, "/v2/library/alpine/manifests/typo").await;
    assert_eq!(r.status(), 404);
    assert!(
        fleet.upstream.total() > asked,
        "past negative_ttl the upstream is asked again"
    );
}

fn capped(config: &mut Config) {
    let up = config.upstreams.get_mut(DOCKER_HUB).unwrap();
    up.max_pulls = 2;
    up.max_pulls_window = Duration::from_secs(3600);
}

#[tokio::test]
async fn max_pulls_applies_to_the_fleet() {
    let fleet = Fleet::new().await;
    let images: Vec<String> = ["1", "2", "3"]
        .iter()
        .map(|tag| fleet.upstream.add_image("library/app", tag, &[10]).0)
        .collect();
    let a = fleet.replica_with(capped).await;
    let b = fleet.replica_with(capped).await;

    pull(&a, "/v2/library/app/manifests/1", &images[0]).await;
    pull(&b, "/v2/library/app/manifests/2", &images[1]).await;
    assert_eq!(fleet.upstream.manifest_gets(), 2);
    for m in [&a, &b] {
        let r = get(m, "/v2/library/app/manifests/3").await;
        assert_eq!(r.status(), 429, "two pulls spent the fleet's cap of two");
        assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    }
    assert_eq!(
        fleet.upstream.manifest_gets(),
        2,
        "counted once for the fleet"
    );

    // Without the coordinator, each replica has its own cap again.
    fleet.coordinator.set_down(true);
    pull(&b, "/v2/library/app/manifests/3", &images[2]).await;
    assert_eq!(fleet.upstream.manifest_gets(), 3);
}

/// The remaining pulls the status page shows for docker.io.
async fn remaining(m: &TestMirror) -> Option<u64> {
    let status: serde_json::Value = get(m, "/_pullthrough/status").await.json().await.unwrap();
    status["upstreams"][0]["remaining"].as_u64()
}

#[tokio::test]
async fn the_latest_budget_reading_is_the_fleets() {
    let fleet = Fleet::new().await;
    let (digest, layers) = fleet.upstream.add_image("library/app", "1", &[10]);
    fleet.upstream.behave(|b| b.ratelimit = Some((100, 10)));
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    pull(&a, "/v2/library/app/manifests/1", &digest).await;
    assert_eq!(remaining(&a).await, Some(9));
    assert_eq!(
        remaining(&b).await,
        None,
        "b has asked the upstream nothing yet"
    );

    // A blob answer carries no budget: b's reading is the one a shared.
    pull(
        &b,
        &format!("/v2/library/app/blobs/{}", layers[0]),
        &layers[0],
    )
    .await;
    assert_eq!(fleet.upstream.blob_gets(), 1);
    assert_eq!(remaining(&b).await, Some(9));
}

#[tokio::test]
async fn a_backed_off_upstream_is_skipped_by_every_replica() {
    let fleet = Fleet::new().await;
    let (one, _) = fleet.upstream.add_image("library/app", "1", &[10]);
    let (two, _) = fleet.upstream.add_image("library/app", "2", &[10]);
    let quick = |config: &mut Config| {
        let up = config.upstreams.get_mut(DOCKER_HUB).unwrap();
        up.failure_threshold = 1;
        up.backoff = TTL;
    };
    let a = fleet.replica_with(quick).await;
    let b = fleet.replica_with(quick).await;
    pull(&b, "/v2/library/app/manifests/1", &one).await;

    fleet
        .upstream
        .behave(|u| u.manifest_fault = Some(Fault::Status(503)));
    let r = get(&a, "/v2/library/app/manifests/2").await;
    assert!(r.status().is_server_error(), "{}", r.status());
    let asked = fleet.upstream.total();

    // Within a second b learns the back-off and asks nothing.
    fleet.advance(Duration::from_secs(2));
    let r = get(&b, "/v2/library/app/manifests/2").await;
    assert_eq!(r.status(), 503);
    assert_eq!(fleet.upstream.total(), asked, "b skipped the upstream too");

    // When the back-off ends, a probe goes through and the upstream serves again.
    fleet.upstream.behave(|u| u.manifest_fault = None);
    fleet.advance(PAST_TTL);
    pull(&b, "/v2/library/app/manifests/2", &two).await;
    pull(&a, "/v2/library/app/manifests/2", &two).await;
}

#[tokio::test]
async fn replicas_keep_serving_while_the_coordinator_is_down() {
    let fleet = Fleet::new().await;
    let (one, layers) = fleet.upstream.add_image("library/app", "1", &[2000]);
    let (two, _) = fleet.upstream.add_image("library/app", "2", &[10]);
    let (a, b) = (fleet.replica().await, fleet.replica().await);

    fleet.coordinator.set_down(true);
    for m in [&a, &b] {
        pull(m, "/v2/library/app/manifests/1", &one).await;
        pull(
            m,
            &format!("/v2/library/app/blobs/{}", layers[0]),
            &layers[0],
        )
        .await;
    }
    let r = get(&a, "/v2/library/app/manifests/missing").await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        fleet.upstream.manifest_gets(),
        3,
        "each replica fetched its tag alone"
    );

    // Coordination resumes by itself, once a replica asks again (half a lease after its
    // last failure).
    fleet.coordinator.set_down(false);
    fleet.advance(Duration::from_secs(3));
    pull(&a, "/v2/library/app/manifests/2", &two).await;
    fleet.wait_shared("manifests", &two).await;
    let before = fleet.upstream.total();
    assert_eq!(pull(&b, "/v2/library/app/manifests/2", &two).await, "HIT");
    assert_eq!(fleet.upstream.total(), before);
}
