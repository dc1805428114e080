//! Pinned images: `[[pin]]`, `[warm] pin`, `pullthrough cache pin|unpin` (at rest and through
//! the admin API): never evicted, counted towards the bound, shown on the status page.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::upstream::{OCI_INDEX, OCI_MANIFEST};
use common::{run_binary as pullthrough, secret, x_cache, FakeUpstream, TestMirror};
use pullthrough::config::PinConfig;

const MIB: usize = 1024 * 1024;
const ACCEPT: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

fn pin(image: &str, platforms: &[&str]) -> PinConfig {
    PinConfig::image(
        image.parse().unwrap(),
        platforms.iter().map(|p| p.parse().unwrap()).collect(),
    )
}

/// GETs `repo:reference` and, for an index, each platform's manifest, then every blob, read
/// to the end; returns each blob's digest with its X-Cache.
async fn pull(m: &TestMirror, repo: &str, reference: &str) -> Vec<(String, String)> {
    let r = m
        .get(&format!("/v2/{repo}/manifests/{reference}"))
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{repo}:{reference}");
    let json: serde_json::Value = r.json().await.unwrap();
    if let Some(children) = json["manifests"].as_array() {
        let mut all = Vec::new();
        for child in children {
            let digest = child["digest"].as_str().unwrap();
            all.extend(Box::pin(pull(m, repo, digest)).await);
        }
        return all;
    }
    let mut digests = vec![json["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in json["layers"].as_array().unwrap() {
        digests.push(layer["digest"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    for digest in digests {
        let r = m
            .get(&format!("/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let cache = x_cache(&r);
        r.bytes().await.unwrap();
        seen.push((digest, cache));
    }
    seen
}

async fn get_blob(m: &TestMirror, repo: &str, digest: &str) -> String {
    let r = m
        .get(&format!("/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    let cache = x_cache(&r);
    r.bytes().await.unwrap();
    cache
}

async fn status(m: &TestMirror) -> serde_json::Value {
    m.status().await
}

/// Pulls `keep` (pinned or not), then more than the bound of other content; returns what a
/// second pull of `keep`'s blobs cost at the upstream, and what one of the others did.
async fn fill_then_pull_again(
    m: &TestMirror,
    up: &FakeUpstream,
    keep: &[(String, String)],
) -> (u64, u64) {
    let filler = pull(m, "library/fill", "1").await;
    let before = up.blob_gets();
    for (digest, _) in keep {
        get_blob(m, "library/keep", digest).await;
    }
    let keep_cost = up.blob_gets() - before;
    let before = up.blob_gets();
    assert_eq!(get_blob(m, "library/fill", &filler[1].0).await, "MISS");
    (keep_cost, up.blob_gets() - before)
}

#[tokio::test]
async fn a_pinned_image_survives_a_fill_to_the_bound_while_others_are_evicted() {
    let up = FakeUpstream::start().await;
    up.add_image("library/keep", "1", &[2 * MIB, 2 * MIB]);
    up.add_image("library/fill", "1", &[2 * MIB; 6]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(8));
        c.pin = vec![pin("library/keep:1", &[])];
    })
    .await;
    let keep = pull(&m, "library/keep", "1").await;
    assert!(keep.iter().all(|(_, cache)| cache == "MISS"));

    let (keep_cost, fill_cost) = fill_then_pull_again(&m, &up, &keep).await;
    assert_eq!(keep_cost, 0, "the pinned image's blobs were evicted");
    assert_eq!(
        fill_cost, 1,
        "an unpinned blob was evicted and fetched again"
    );
    let s = status(&m).await;
    assert!(
        s["cache"]["bytes"].as_u64().unwrap() <= 8 * MIB as u64,
        "{s}"
    );
    assert_eq!(s["cache"]["pins"]["files"], 4, "{s}");
}

fn add_index(up: &FakeUpstream, repo: &str, tag: &str) -> (Vec<String>, Vec<String>) {
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for arch in ["amd64", "arm64"] {
        let (digest, layers) = up.add_image(repo, &format!("only-{arch}"), &[MIB, MIB]);
        let size = up.state.content.lock().unwrap().manifests[&digest]
            .bytes
            .len();
        entries.push(format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
        ));
        blobs.push(layers);
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        entries.join(",")
    );
    up.add_manifest(repo, Some(tag), OCI_INDEX, index.into_bytes());
    let arm64 = blobs.pop().unwrap();
    (blobs.pop().unwrap(), arm64)
}

#[tokio::test]
async fn a_pin_with_platforms_keeps_those_of_an_index_and_lets_the_others_go() {
    let up = FakeUpstream::start().await;
    let (amd64, arm64) = add_index(&up, "library/keep", "1");
    up.add_image("library/fill", "1", &[MIB; 6]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(6));
        c.pin = vec![pin("library/keep:1", &["linux/amd64"])];
    })
    .await;
    pull(&m, "library/keep", "1").await;
    pull(&m, "library/fill", "1").await;
    let before = up.blob_gets();
    for layer in &amd64 {
        assert_eq!(get_blob(&m, "library/keep", layer).await, "HIT");
    }
    assert_eq!(up.blob_gets(), before, "the pinned platform stays");
    for layer in &arm64 {
        assert_eq!(get_blob(&m, "library/keep", layer).await, "MISS");
    }
}

#[tokio::test]
async fn warm_pin_pins_the_warmed_images() {
    let up = FakeUpstream::start().await;
    up.add_image("library/keep", "1", &[2 * MIB, 2 * MIB]);
    up.add_image("library/fill", "1", &[2 * MIB; 6]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(8));
        c.warm.images = vec!["library/keep:1".parse().unwrap()];
        c.warm.pin = true;
        // Half a day off: this test pulls by itself.
        let hour = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 3600
            % 24;
        let at = format!("{:02}:00", (hour + 12) % 24);
        c.warm.at = Some(at.try_into().unwrap());
    })
    .await;
    let keep = pull(&m, "library/keep", "1").await;
    let (keep_cost, fill_cost) = fill_then_pull_again(&m, &up, &keep).await;
    assert_eq!((keep_cost, fill_cost), (0, 1));
}

#[tokio::test]
async fn pin_at_rest_survives_a_restart_and_is_refused_while_a_mirror_serves_the_dir() {
    let up = FakeUpstream::start().await;
    up.add_image("library/keep", "1", &[2 * MIB, 2 * MIB]);
    up.add_image("library/fill", "1", &[2 * MIB; 6]);
    let m = TestMirror::start(&up).await;
    let keep = pull(&m, "library/keep", "1").await;
    let storage = m.storage();
    let storage = storage.to_str().unwrap();
    let args = ["cache", "pin", "keep:1", "--storage-dir", storage];

    let out = pullthrough(&args, &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("in use by another pullthrough process"),
        "{stderr}"
    );
    assert!(stderr.contains("--mirror"), "{stderr}");

    let dir = m.stop().await;
    let out = pullthrough(&args, &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pinned docker.io/library/keep:1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 pins (0 from the config): 4 files"),
        "{stdout}"
    );
    let file = std::fs::read_to_string(dir.path().join("pins")).unwrap();
    assert_eq!(file, "docker.io/library/keep:1\n");

    let m = TestMirror::start_in(&up, dir, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(8));
    })
    .await;
    let (keep_cost, fill_cost) = fill_then_pull_again(&m, &up, &keep).await;
    assert_eq!(
        keep_cost, 0,
        "the pin kept in the storage dir was forgotten"
    );
    assert_eq!(fill_cost, 1);
}

#[tokio::test]
async fn pin_and_unpin_through_the_admin_api() {
    let up = FakeUpstream::start().await;
    up.add_image("library/keep", "1", &[2 * MIB, 2 * MIB]);
    up.add_image("library/fill", "1", &[2 * MIB; 6]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(8));
    })
    .await;
    let keep = pull(&m, "library/keep", "1").await;

    let out = pullthrough(&["cache", "pin", "keep:1", "--mirror", &m.url], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 pins (0 from the config): 4 files"),
        "{stdout}"
    );
    let listed: serde_json::Value = m
        .get("/_pullthrough/pins")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["runtime"][0], "docker.io/library/keep:1", "{listed}");
    assert_eq!(
        std::fs::read_to_string(m.storage().join("pins")).unwrap(),
        "docker.io/library/keep:1\n"
    );

    let (keep_cost, fill_cost) = fill_then_pull_again(&m, &up, &keep).await;
    assert_eq!((keep_cost, fill_cost), (0, 1));

    let out = pullthrough(&["cache", "unpin", "keep:1", "--mirror", &m.url], &[]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pullthrough(&["cache", "unpin", "keep:1", "--mirror", &m.url], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("docker.io/library/keep:1 is not pinned"),
        "{stderr}"
    );
    let r = m
        .client
        .post(format!("{}/_pullthrough/pins?image=Keep", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(common::error_code(r).await, "NAME_INVALID");
}

#[tokio::test]
async fn the_admin_api_asks_for_the_client_credentials() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start_with(&up, |c| {
        c.server.tokens = vec![secret("admin-token-0123456789")];
    })
    .await;
    let r = m
        .client
        .post(format!("{}/_pullthrough/pins?image=alpine:3.20", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let args = ["cache", "pin", "alpine:3.20", "--mirror", &m.url];
    let out = pullthrough(&args, &[]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!m.storage().join("pins").exists());
    let out = pullthrough(
        &args,
        &[("PULLTHROUGH_MIRROR_TOKEN", "admin-token-0123456789")],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not pulled yet: pinned all the same, and protected once pulled.
    assert!(
        stdout.contains("1 pins (0 from the config): 0 files"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_pin_set_larger_than_the_bound_is_refused_with_the_figure() {
    let up = FakeUpstream::start().await;
    up.add_image("library/keep", "1", &[2 * MIB, 2 * MIB]);
    up.add_image("library/big", "1", &[2 * MIB]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(5));
    })
    .await;
    pull(&m, "library/keep", "1").await;
    let r = m
        .client
        .post(format!("{}/_pullthrough/pins?image=keep:1", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Only its manifest: the sizes it lists count, cached or not.
    let r = m
        .get("/v2/library/big/manifests/1")
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = m
        .client
        .post(format!("{}/_pullthrough/pins?image=big:1", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("cannot pin docker.io/library/big:1: the pinned images take 6.0MiB, more than storage.max_size (5.0MiB) by 1.0MiB"),
        "{message}"
    );
    let dir = m.stop().await;
    let storage = dir.path().to_str().unwrap();

    // At rest, the same refusal, from the command.
    let out = pullthrough(
        &[
            "cache",
            "pin",
            "big:1",
            "--storage-dir",
            storage,
            "--max-size",
            "5MiB",
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("by 1.0MiB"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("pins")).unwrap(),
        "docker.io/library/keep:1\n"
    );

    // At start: the config's pins with the directory's take 6 MiB of a 3 MiB bound.
    let mut config = common::test_config(&up.url, dir.path());
    config.storage.max_size = Some(bytesize::ByteSize::mib(3));
    config.pin = vec![pin("library/big:1", &[])];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = pullthrough::Server::new(config)
        .serve(listener, std::future::pending::<()>())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the pinned images take 6.0MiB, more than storage.max_size (3.0MiB) by 3.0MiB"),
        "{e}"
    );
}

#[tokio::test]
async fn the_status_shows_pins_and_the_free_space_of_an_unbounded_cache() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/keep", "1", &[MIB, MIB]);
    let m = TestMirror::start_with(&up, |c| {
        c.pin = vec![pin("library/keep:1", &["linux/amd64"])];
    })
    .await;
    pull(&m, "library/keep", "1").await;
    let s = status(&m).await;
    let cache = &s["cache"];
    assert!(cache["max_bytes"].is_null(), "{s}");
    assert!(cache["disk_free_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(
        cache["disk_total_bytes"].as_u64().unwrap() >= cache["disk_free_bytes"].as_u64().unwrap(),
        "{s}"
    );
    let pins = &cache["pins"];
    assert_eq!(
        pins["config"][0], "docker.io/library/keep:1 (linux/amd64)",
        "{s}"
    );
    assert_eq!(
        pins["files"], 4,
        "the manifest, its config and {layers:?}: {s}"
    );
    assert!(pins["bytes"].as_u64().unwrap() > 2 * MIB as u64, "{s}");
    assert!(
        pins["bytes"].as_u64().unwrap() <= cache["bytes"].as_u64().unwrap(),
        "{s}"
    );
}
