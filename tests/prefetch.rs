//! Prefetch: serving one platform's image manifest downloads that image's config and layers in
//! the background, once each, joined by the clients' own requests; an index fetches nothing;
//! off per upstream or repository; within the disk bound; below the clients' requests.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::upstream::{sha256, OCI_INDEX, OCI_MANIFEST};
use common::{eventually, metric, x_cache, FakeUpstream, TestMirror, SETTLE};
use pullthrough::config::Config;
use pullthrough::policy::RepoGlobs;

const ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

const OUTCOMES: [&str; 6] = [
    "started",
    "held",
    "in_flight",
    "no_space",
    "failed",
    "skipped",
];

/// A mirror in front of `up` with prefetch on (the tests' config turns it off).
async fn mirror(up: &FakeUpstream, tweak: impl FnOnce(&mut Config)) -> TestMirror {
    TestMirror::start_with(up, |c| {
        c.cache.prefetch_concurrency = 8;
        tweak(c);
    })
    .await
}

/// The prefetch counts by outcome, and the queued and running gauges.
async fn prefetch(m: &TestMirror) -> ([u64; 6], u64, u64) {
    let text = m.metrics().await;
    let counts = OUTCOMES.map(|o| {
        metric(
            &text,
            &format!("pullthrough_prefetch_total{{outcome=\"{o}\"}}"),
        ) as u64
    });
    let gauge = |name: &str| metric(&text, name) as u64;
    (
        counts,
        gauge("pullthrough_prefetch_queued"),
        gauge("pullthrough_prefetch_running"),
    )
}

/// Waits until `n` blobs have an outcome and no prefetch waits or runs; returns the counts.
async fn settled(m: &TestMirror, n: u64) -> [u64; 6] {
    common::wait_for(&format!("{n} prefetches settled"), SETTLE, || async {
        let (counts, queued, running) = prefetch(m).await;
        (counts.iter().sum::<u64>() == n && queued == 0 && running == 0).then_some(counts)
    })
    .await
}

/// `[started, held, in_flight, no_space, failed, skipped]`
fn counts(started: u64, held: u64, in_flight: u64, no_space: u64, skipped: u64) -> [u64; 6] {
    [started, held, in_flight, no_space, 0, skipped]
}

/// The config digest of the manifest `digest` the fake holds.
fn config_of(up: &FakeUpstream, digest: &str) -> String {
    let bytes = up.state.content.lock().unwrap().manifests[digest]
        .bytes
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["config"]["digest"].as_str().unwrap().to_owned()
}

/// The fake's blob GETs of `digest` (at the registry or its CDN).
fn gets_of(up: &FakeUpstream, digest: &str) -> usize {
    up.seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with(&format!("/blobs/{digest}")))
        .count()
}

async fn get_manifest(m: &TestMirror, path: &str) -> reqwest::Response {
    let r = m.get(path).header("accept", ALL).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r
}

#[tokio::test]
async fn serving_an_image_manifest_prefetches_its_config_and_layers_once_each() {
    let up = FakeUpstream::start().await;
    let (digest, layers) = up.add_image("library/app", "v1", &[100_000, 200_000, 300_000]);
    let config = config_of(&up, &digest);
    let m = mirror(&up, |_| {}).await;

    get_manifest(&m, "/v2/library/app/manifests/v1").await;
    assert_eq!(settled(&m, 4).await, counts(4, 0, 0, 0, 0));
    assert_eq!(
        up.blob_gets(),
        4,
        "one GET per blob, before any client asked"
    );

    for blob in std::iter::once(&config).chain(&layers) {
        let r = m
            .get(&format!("/v2/library/app/blobs/{blob}"))
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&r), "HIT", "{blob}");
        assert_eq!(&sha256(&r.bytes().await.unwrap()), blob);
    }
    assert_eq!(up.blob_gets(), 4, "the clients' requests cost nothing more");
    assert_eq!(
        up.blob_heads(),
        0,
        "the prefetch bound the blobs to the repository: no HEAD to confirm them"
    );

    // Served again at once, the manifest is not looked at again (a warm hit stays cheap).
    get_manifest(&m, &format!("/v2/library/app/manifests/{digest}")).await;
    assert_eq!(settled(&m, 4).await, counts(4, 0, 0, 0, 0));
    // A minute later (a hit), it finds every blob held.
    m.advance(std::time::Duration::from_secs(61));
    get_manifest(&m, &format!("/v2/library/app/manifests/{digest}")).await;
    assert_eq!(settled(&m, 8).await, counts(4, 4, 0, 0, 0));
    let status: serde_json::Value = m.status().await;
    assert_eq!(status["prefetch"]["started"], 4);
    assert_eq!(status["prefetch"]["held"], 4);
    assert_eq!(status["prefetch"]["concurrency"], 8);
}

#[tokio::test]
async fn a_client_asking_while_a_prefetch_downloads_joins_it() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[256 * 1024, 256 * 1024]);
    up.behave(|b| b.hold_blob_after = Some(64 * 1024));
    let m = mirror(&up, |_| {}).await;

    get_manifest(&m, "/v2/library/app/manifests/v1").await;
    // The layers' downloads are held half-way; the config (smaller) is done.
    eventually("both layers' downloads are under way", SETTLE, || async {
        prefetch(&m).await.0[0] == 3
    })
    .await;
    let clients: Vec<_> = layers
        .iter()
        .map(|l| m.get(&format!("/v2/library/app/blobs/{l}")).send())
        .collect();
    let mut responses = Vec::new();
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(x_cache(&r), "COALESCED");
        responses.push(r);
    }
    up.behave(|b| b.hold_blob_after = None);
    let bodies = tokio::spawn(async move {
        let mut out = Vec::new();
        for r in responses {
            out.push(sha256(&r.bytes().await.unwrap()));
        }
        out
    });
    eventually("the held downloads are released", SETTLE, || async {
        up.state.release.notify_waiters();
        bodies.is_finished()
    })
    .await;
    assert_eq!(bodies.await.unwrap(), layers);
    assert_eq!(settled(&m, 3).await, counts(3, 0, 0, 0, 0));
    assert_eq!(
        up.blob_gets(),
        3,
        "one GET per blob, prefetch and clients together"
    );
}

#[tokio::test]
async fn an_index_prefetches_nothing_and_a_platform_only_its_own_blobs() {
    let up = FakeUpstream::start().await;
    let (amd64, amd64_layers) = up.add_image("library/multi", "amd64", &[10_000, 20_000]);
    let (arm64, arm64_layers) = up.add_image("library/multi", "arm64", &[30_000, 40_000]);
    let size = |d: &str| up.state.content.lock().unwrap().manifests[d].bytes.len();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
        {{"mediaType":"{OCI_MANIFEST}","digest":"{amd64}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}},
        {{"mediaType":"{OCI_MANIFEST}","digest":"{arm64}","size":{},"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#,
        size(&amd64),
        size(&arm64),
    );
    up.add_manifest(
        "library/multi",
        Some("latest"),
        OCI_INDEX,
        index.into_bytes(),
    );
    let m = mirror(&up, |_| {}).await;

    // The index: the decision is taken before the answer goes out, so nothing is queued now
    // means nothing will be.
    get_manifest(&m, "/v2/library/multi/manifests/latest").await;
    assert_eq!(prefetch(&m).await, ([0; 6], 0, 0));
    assert_eq!(up.blob_gets(), 0);

    get_manifest(&m, &format!("/v2/library/multi/manifests/{amd64}")).await;
    assert_eq!(settled(&m, 3).await, counts(3, 0, 0, 0, 0));
    let amd64_config = config_of(&up, &amd64);
    for blob in std::iter::once(&amd64_config).chain(&amd64_layers) {
        assert_eq!(gets_of(&up, blob), 1, "{blob}");
    }
    let arm64_config = config_of(&up, &arm64);
    for blob in std::iter::once(&arm64_config).chain(&arm64_layers) {
        assert_eq!(gets_of(&up, blob), 0, "another platform's {blob}");
    }
    assert_eq!(up.blob_gets(), 3);
}

#[tokio::test]
async fn prefetch_off_per_upstream_or_by_repository_pattern_fetches_nothing() {
    let up = FakeUpstream::start().await;
    up.add_image("library/skipped", "v1", &[10_000]);
    up.add_image("library/app", "v1", &[10_000]);
    let m = mirror(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().prefetch_skip =
            RepoGlobs::new(&["library/skip*"]).unwrap();
    })
    .await;
    get_manifest(&m, "/v2/library/skipped/manifests/v1").await;
    assert_eq!(
        prefetch(&m).await,
        ([0; 6], 0, 0),
        "decided before the answer"
    );
    // Another repository of the same upstream is prefetched: the setting is what stops it.
    get_manifest(&m, "/v2/library/app/manifests/v1").await;
    assert_eq!(settled(&m, 2).await, counts(2, 0, 0, 0, 0));
    assert_eq!(up.blob_gets(), 2);

    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10_000]);
    let m = mirror(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().prefetch = false;
    })
    .await;
    get_manifest(&m, "/v2/library/app/manifests/v1").await;
    assert_eq!(prefetch(&m).await, ([0; 6], 0, 0));
    assert_eq!(up.blob_gets(), 0);
}

#[tokio::test]
async fn a_blob_the_disk_bound_cannot_take_is_skipped_not_relayed() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[10_000, 200_000]);
    let m = mirror(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::kib(100));
    })
    .await;

    get_manifest(&m, "/v2/library/app/manifests/v1").await;
    assert_eq!(settled(&m, 3).await, counts(2, 0, 0, 1, 0));
    assert_eq!(gets_of(&up, &layers[1]), 0, "never fetched for nobody");
    assert_eq!(up.blob_gets(), 2);

    // A client asking for it gets it relayed, as without prefetch.
    let r = m
        .get(&format!("/v2/library/app/blobs/{}", layers[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[1]);
}

#[tokio::test]
async fn with_one_request_slot_prefetch_leaves_it_to_the_client() {
    let up = FakeUpstream::start().await;
    let (digest, layers) = up.add_image("library/app", "v1", &[10_000, 20_000, 30_000]);
    let config = config_of(&up, &digest);
    let m = mirror(&up, |c| {
        c.upstreams
            .get_mut("docker.io")
            .unwrap()
            .max_concurrent_requests = 1;
    })
    .await;

    get_manifest(&m, "/v2/library/app/manifests/v1").await;
    assert_eq!(settled(&m, 4).await, counts(0, 0, 0, 0, 4));
    assert_eq!(
        up.blob_gets(),
        0,
        "the only slot is never taken by a prefetch"
    );
    for blob in std::iter::once(&config).chain(&layers) {
        let r = m
            .get(&format!("/v2/library/app/blobs/{blob}"))
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&r), "MISS", "{blob}");
        assert_eq!(&sha256(&r.bytes().await.unwrap()), blob);
    }
    assert_eq!(up.blob_gets(), 4);
    assert_eq!(up.max_in_flight(), 1);
}

/// With two request slots and a prefetch holding one (its download stalled), a client's
/// request for a blob the prefetch has not reached gets the other at once: it waits neither
/// for the prefetch queue nor for the prefetch's slot.
#[tokio::test]
async fn a_client_is_not_queued_behind_a_prefetch() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[256 * 1024, 256 * 1024, 256 * 1024]);
    up.behave(|b| b.hold_blob_after = Some(64 * 1024));
    let m = mirror(&up, |c| {
        c.cache.prefetch_concurrency = 1;
        c.upstreams
            .get_mut("docker.io")
            .unwrap()
            .max_concurrent_requests = 2;
    })
    .await;

    get_manifest(&m, "/v2/library/app/manifests/v1").await;
    // The config is prefetched, then the first layer, stalled; the other two wait their turn.
    eventually(
        "the first layer's prefetch holds the only slot",
        SETTLE,
        || async {
            let (counts, queued, running) = prefetch(&m).await;
            counts[0] == 2 && queued == 2 && running == 1
        },
    )
    .await;
    let r = tokio::time::timeout(
        SETTLE,
        m.get(&format!("/v2/library/app/blobs/{}", layers[2]))
            .send(),
    )
    .await
    .expect("the client's request was answered while the prefetch held its slot")
    .unwrap();
    assert_eq!(x_cache(&r), "MISS", "the client started its own download");

    up.behave(|b| b.hold_blob_after = None);
    let body = tokio::spawn(async move { sha256(&r.bytes().await.unwrap()) });
    eventually("the held downloads are released", SETTLE, || async {
        up.state.release.notify_waiters();
        body.is_finished()
    })
    .await;
    assert_eq!(body.await.unwrap(), layers[2]);
    // The second layer is prefetched in its turn; the third was the client's.
    let counts = settled(&m, 4).await;
    assert_eq!(counts[0], 3, "{counts:?}");
    assert_eq!(counts[1] + counts[2], 1, "{counts:?}");
    assert_eq!(up.blob_gets(), 4, "one GET per blob");
    assert!(up.max_in_flight() <= 2);
}
