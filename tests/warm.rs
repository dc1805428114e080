//! Pre-warming: `pullthrough warm` through a running mirror and directly into a storage
//! directory, and the `[warm]` schedule of a running server, against the fake upstream's
//! request counters.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::process::Output;
use std::time::Duration;

use common::upstream::{OCI_INDEX, OCI_MANIFEST};
use common::{eventually, x_cache, FakeUpstream, TestMirror, PAST_TTL, SETTLE, TTL};

/// Runs the binary with `args` to its end, without the caller's PULLTHROUGH_* variables.
async fn pullthrough(args: &[&str]) -> Output {
    pullthrough_with(args, &[]).await
}

use common::run_binary as pullthrough_with;

/// `pullthrough warm --json --mirror <m> ARGS…`: exit code and the parsed summary.
async fn warm_through(m: &TestMirror, args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["warm", "--json", "--mirror", &m.url];
    all.extend_from_slice(args);
    let out = pullthrough(&all).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: stdout {:?}, stderr {stderr}", out.stdout));
    (out.status.code().unwrap(), summary, stderr)
}

fn total(summary: &serde_json::Value, field: &str) -> u64 {
    summary["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[field].as_u64().unwrap())
        .sum()
}

/// A two-platform index tagged `repo:tag` (linux/amd64 with 2 layers, linux/arm64 with 1).
/// Returns the blob digests of each platform (config first).
fn add_index(up: &FakeUpstream, repo: &str, tag: &str) -> (Vec<String>, Vec<String>) {
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for (arch, layers) in [("amd64", &[3000usize, 4000][..]), ("arm64", &[5000][..])] {
        let (digest, layer_digests) = up.add_image(repo, &format!("only-{arch}"), layers);
        let (size, config) = {
            let content = up.state.content.lock().unwrap();
            let bytes = &content.manifests[&digest].bytes;
            let json: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            (
                bytes.len(),
                json["config"]["digest"].as_str().unwrap().to_owned(),
            )
        };
        entries.push(format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
        ));
        blobs.push(
            std::iter::once(config)
                .chain(layer_digests)
                .collect::<Vec<_>>(),
        );
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        entries.join(",")
    );
    up.add_manifest(repo, Some(tag), OCI_INDEX, index.into_bytes());
    let arm64 = blobs.pop().unwrap();
    let amd64 = blobs.pop().unwrap();
    (amd64, arm64)
}

#[tokio::test]
async fn warm_through_mirror_fetches_every_blob_once() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/alpine", "3.19", &[10_000, 20_000, 300_000]);
    let m = TestMirror::start(&up).await;

    let (code, summary, stderr) = warm_through(&m, &["alpine:3.19"]).await;
    assert_eq!(code, 0, "{summary} {stderr}");
    assert_eq!(up.manifest_gets(), 1);
    assert_eq!(up.blob_gets(), 4, "config and three layers");
    assert_eq!(total(&summary, "blobs"), 4);
    assert_eq!(total(&summary, "blobs_cached"), 0);
    assert!(total(&summary, "bytes_fetched") >= 330_000);
    assert!(
        stderr.contains("docker.io/library/alpine:3.19: 4 blobs (0 cached)"),
        "plain progress lines off a terminal: {stderr}"
    );
    for layer in &layers {
        common::wait_committed(&m, &format!("/v2/library/alpine/blobs/{layer}")).await;
    }

    let before = up.total();
    let (code, summary, _) = warm_through(&m, &["alpine:3.19"]).await;
    assert_eq!(code, 0, "{summary}");
    assert_eq!(
        up.total(),
        before,
        "within the TTL nothing reaches the upstream"
    );
    assert_eq!(total(&summary, "blobs_cached"), 4);
    assert_eq!(total(&summary, "bytes_fetched"), 0);
    assert_eq!(total(&summary, "manifests_cached"), 1);
}

#[tokio::test]
async fn second_warm_costs_only_head_requests() {
    let up = FakeUpstream::start().await;
    up.add_image("library/alpine", "3.19", &[10_000, 20_000]);
    let m = TestMirror::start_with(&up, |c| c.cache.tag_ttl = TTL).await;
    let (code, summary, _) = warm_through(&m, &["alpine:3.19"]).await;
    assert_eq!(code, 0, "{summary}");
    let (gets, blob_gets, heads) = (up.manifest_gets(), up.blob_gets(), up.manifest_heads());
    assert_eq!(gets, 1);

    m.advance(PAST_TTL);
    let (code, summary, _) = warm_through(&m, &["alpine:3.19"]).await;
    assert_eq!(code, 0, "{summary}");
    assert_eq!(
        up.manifest_gets(),
        gets,
        "no counted pull for an unchanged tag"
    );
    assert_eq!(
        up.manifest_heads(),
        heads + 1,
        "the tag was revalidated with a HEAD"
    );
    assert_eq!(up.blob_gets(), blob_gets);
    assert_eq!(total(&summary, "manifests_cached"), 1);
}

#[tokio::test]
async fn warm_stops_at_the_budget_reserve() {
    let up = FakeUpstream::start().await;
    for repo in ["library/a", "library/b", "library/c"] {
        up.add_image(repo, "1", &[1000]);
    }
    // Two pulls above the default reserve of 10.
    up.behave(|b| b.ratelimit = Some((100, 12)));
    let m = TestMirror::start(&up).await;

    let (code, summary, _) = warm_through(&m, &["a:1", "b:1", "c:1", "d:1"]).await;
    assert_eq!(code, 1, "{summary}");
    assert_eq!(
        up.manifest_gets(),
        2,
        "a and b, then the budget was at its reserve"
    );
    assert_eq!(up.blob_gets(), 4, "the config and layer of a and of b");
    let stopped = summary["stopped"].as_str().unwrap();
    assert!(
        stopped.contains("docker.io") && stopped.contains("reserve") && stopped.contains("10 left"),
        "{stopped}"
    );
    assert_eq!(summary["images"][2]["image"], "docker.io/library/c:1");
    assert!(summary["images"][2]["error"]
        .as_str()
        .unwrap()
        .contains("reserve"));
    assert_eq!(summary["skipped"][0], "docker.io/library/d:1");
}

#[tokio::test]
async fn warm_filters_platforms() {
    let up = FakeUpstream::start().await;
    let (amd64, arm64) = add_index(&up, "library/multi", "1");
    let m = TestMirror::start(&up).await;

    let (code, summary, _) = warm_through(&m, &["multi:1", "--platform", "linux/arm64"]).await;
    assert_eq!(code, 0, "{summary}");
    assert_eq!(up.manifest_gets(), 2, "the index and the arm64 manifest");
    assert_eq!(up.blob_gets(), arm64.len() as u64);
    for blob in &amd64 {
        let r = m
            .head(&format!("/v2/library/multi/blobs/{blob}"))
            .send()
            .await
            .unwrap();
        assert_ne!(x_cache(&r), "HIT", "amd64 was not warmed");
    }

    let (code, summary, _) = warm_through(&m, &["multi:1", "--platform", "linux/s390x"]).await;
    assert_eq!(code, 1, "no such platform: {summary}");
    assert!(summary["images"][0]["error"]
        .as_str()
        .unwrap()
        .contains("linux/s390x"));

    let (code, summary, _) = warm_through(&m, &["multi:1"]).await;
    assert_eq!(code, 0, "{summary}");
    assert_eq!(
        total(&summary, "manifests"),
        3,
        "every platform without --platform"
    );
    assert_eq!(up.blob_gets(), (amd64.len() + arm64.len()) as u64);
}

#[tokio::test]
async fn warm_reads_images_from_file_with_line_numbers_in_errors() {
    let up = FakeUpstream::start().await;
    up.add_image("library/alpine", "3.19", &[1000]);
    up.add_image("org/app", "1.0", &[2000]);
    let m = TestMirror::start(&up).await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    let list_arg = list.to_str().unwrap();

    std::fs::write(
        &list,
        "# CI base images\nalpine:3.19\n\nOrg/App:1.0\nalpine@sha256:12\n",
    )
    .unwrap();
    let out = pullthrough(&["warm", "--mirror", &m.url, "--file", list_arg]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("images.txt line 4: invalid image reference \"Org/App:1.0\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("images.txt line 5: invalid image reference"),
        "{stderr}"
    );
    assert!(!stderr.contains("line 2"), "{stderr}");
    assert_eq!(up.total(), 0, "nothing is pulled from a bad list");

    std::fs::write(
        &list,
        "# CI base images\nalpine:3.19\n\norg/app:1.0  # the app\n",
    )
    .unwrap();
    let (code, summary, _) = warm_through(&m, &["--file", list_arg]).await;
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["images"].as_array().unwrap().len(), 2);
    assert_eq!(summary["images"][1]["image"], "docker.io/org/app:1.0");
    assert_eq!(up.blob_gets(), 4);
}

#[tokio::test]
async fn warm_routes_other_registries_with_ns() {
    let up = FakeUpstream::start().await;
    up.add_image("org/app", "1.0", &[1000]);
    let m = TestMirror::start_with(&up, |c| {
        let mut ghcr = c.upstreams["docker.io"].clone();
        ghcr.url = up.url.clone();
        c.upstreams.insert("ghcr.io".into(), ghcr);
    })
    .await;
    let (code, summary, _) = warm_through(&m, &["ghcr.io/org/app:1.0"]).await;
    assert_eq!(code, 0, "{summary}");
    let seen = up.seen();
    let manifest = seen
        .iter()
        .find(|s| s.path.contains("/manifests/"))
        .unwrap();
    assert_eq!(
        manifest.path, "/v2/org/app/manifests/1.0",
        "no library/ outside Docker Hub"
    );
    let r = m
        .get("/v2/org/app/manifests/1.0?ns=ghcr.io")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT", "cached under ghcr.io");
}

#[tokio::test]
async fn warm_directly_into_the_storage_dir_then_the_mirror_serves_it_from_cache() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/alpine", "3.19", &[10_000, 200_000]);
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().to_str().unwrap();

    let out = pullthrough(&[
        "warm",
        "alpine:3.19",
        "--json",
        "--storage-dir",
        storage,
        "--upstream",
        &up.url,
    ])
    .await;
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{summary}");
    assert_eq!(total(&summary, "blobs"), 3);
    assert_eq!((up.manifest_gets(), up.blob_gets()), (1, 3));

    let m = TestMirror::start_in(&up, dir, |_| {}).await;
    let before = up.total();
    let r = m
        .get("/v2/library/alpine/manifests/3.19")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    for layer in &layers {
        let r = m
            .get(&format!("/v2/library/alpine/blobs/{layer}"))
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&r), "HIT");
        r.bytes().await.unwrap();
    }
    assert_eq!(up.total(), before, "everything came from the warmed cache");
}

#[tokio::test]
async fn direct_warm_is_refused_while_a_mirror_serves_the_storage_dir() {
    let up = FakeUpstream::start().await;
    up.add_image("library/alpine", "3.19", &[1000]);
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().to_str().unwrap();
    let _daemon = common::start_daemon(["--storage-dir", storage, "--upstream", &up.url]).await;

    let out = pullthrough(&[
        "warm",
        "alpine:3.19",
        "--storage-dir",
        storage,
        "--upstream",
        &up.url,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("in use by another pullthrough process"),
        "{stderr}"
    );
    assert!(stderr.contains("--mirror"), "{stderr}");
    assert_eq!(up.total(), 0);
}

// Virtual time: the schedule looks at the mirror's clock on a tokio timer (every second), so
// a virtual wait of a few seconds is a few of its looks, each run to the end before time moves.
#[tokio::test(start_paused = true)]
async fn scheduled_warm_refreshes_on_its_interval() {
    let up = FakeUpstream::start().await;
    up.add_image("library/alpine", "3.19", &[1000, 2000]);
    let m = TestMirror::start_with(&up, |c| {
        c.cache.tag_ttl = TTL;
        c.warm.images = vec!["alpine:3.19".parse().unwrap()];
        c.warm.interval = Some(Duration::from_secs(3600));
    })
    .await;
    eventually("the first run at start", SETTLE, || async {
        up.blob_gets() == 3
    })
    .await;
    assert_eq!(up.manifest_gets(), 1);

    // A push upstream: the next run picks it up with a HEAD and a GET of the new digest.
    let (new, _) = up.add_image("library/alpine", "next", &[3000]);
    up.retag("library/alpine", "3.19", &new);
    m.advance(PAST_TTL);
    let asked = up.total();
    // The paused clock moves only when every task is idle: by the end of this wait the
    // schedule has looked at the clock several times, and a run it started has reached the
    // upstream (it is on loopback, in this runtime).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(up.total(), asked, "not before the interval has passed");
    assert_eq!(up.blob_gets(), 3);
    // The cold tag's type was learnt with a HEAD before the GET (warm does not take schema 1).
    assert_eq!(up.manifest_heads(), 1);

    m.advance(Duration::from_secs(3600));
    eventually("the run an interval later", SETTLE, || async {
        up.blob_gets() == 5
    })
    .await;
    assert_eq!(
        up.manifest_heads(),
        2,
        "the tag was revalidated with a HEAD"
    );
    assert_eq!(
        up.manifest_gets(),
        2,
        "and only the new manifest was a counted pull"
    );
    let r = m
        .head(&format!("/v2/library/alpine/manifests/{new}"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
}

#[tokio::test]
async fn warm_through_a_mirror_with_tokens_sends_the_token_from_the_environment() {
    let up = FakeUpstream::start().await;
    up.add_image("library/alpine", "3.19", &[1000]);
    let m = TestMirror::start_with(&up, |c| c.server.tokens = vec![common::secret("t0k3n")]).await;
    let args = ["warm", "alpine:3.19", "--mirror", &m.url];

    let out = pullthrough(&args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("401"), "{stdout}");
    assert_eq!(up.total(), 0);

    let out = pullthrough_with(&args, &[("PULLTHROUGH_MIRROR_TOKEN", "t0k3n")]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("t0k3n") && !String::from_utf8_lossy(&out.stderr).contains("t0k3n"));
    assert_eq!(up.blob_gets(), 2);
}
