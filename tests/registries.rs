//! Several registries through one mirror (issue 15): the three ways in (containerd's `?ns=`, a
//! registry path prefix, an alias) and the default registry, all onto one cache; and each
//! upstream's policy (allow/deny lists, immutable tags, its own tag TTL).
//!
//! Three fake upstreams stand in for docker.io (the default registry), ghcr.io (alias `ghcr`)
//! and quay.io; every test asserts what each of them was asked.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::upstream::sha256;
use common::{
    error_code, metric, wait_committed, x_cache, FakeUpstream, TestMirror, PAST_TTL, TTL,
};
use pullthrough::config::{Config, UpstreamConfig};
use pullthrough::policy::RepoGlobs;
use pullthrough::tag_rules::TagPatterns;

struct Registries {
    hub: FakeUpstream,
    ghcr: FakeUpstream,
    quay: FakeUpstream,
}

impl Registries {
    async fn start() -> Registries {
        Registries {
            hub: FakeUpstream::start().await,
            ghcr: FakeUpstream::start().await,
            quay: FakeUpstream::start().await,
        }
    }

    /// The mirror in front of all three, tags trusted for [`TTL`]; `tweak` sets policies.
    async fn mirror(&self, tweak: impl FnOnce(&mut Config)) -> TestMirror {
        let dir = tempfile::tempdir().unwrap();
        self.mirror_in(dir, tweak).await
    }

    async fn mirror_in(
        &self,
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> TestMirror {
        let (ghcr, quay) = (self.ghcr.url.clone(), self.quay.url.clone());
        TestMirror::start_in(&self.hub, dir, |c| {
            c.cache.tag_ttl = TTL;
            c.upstreams
                .insert("ghcr.io".into(), upstream(&ghcr, &["ghcr"]));
            c.upstreams.insert("quay.io".into(), upstream(&quay, &[]));
            tweak(c);
        })
        .await
    }

    /// Requests each fake had, tokens left out.
    fn totals(&self) -> [u64; 3] {
        [self.hub.total(), self.ghcr.total(), self.quay.total()]
    }
}

fn upstream(url: &str, aliases: &[&str]) -> UpstreamConfig {
    UpstreamConfig {
        url: url.to_owned(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        ..UpstreamConfig::default()
    }
}

fn up<'a>(c: &'a mut Config, name: &str) -> &'a mut UpstreamConfig {
    c.upstreams.get_mut(name).unwrap()
}

fn globs(g: &[&str]) -> RepoGlobs {
    RepoGlobs::new(g).unwrap()
}

const SEMVER: &str = r"^v?[0-9]+\.[0-9]+\.[0-9]+$";

async fn digest_of(m: &TestMirror, path: &str) -> String {
    let r = m.get(path).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// How many requests of `method` for `path` (query included) a fake saw.
fn seen(up: &FakeUpstream, method: &str, path: &str) -> usize {
    up.seen()
        .iter()
        .filter(|s| s.method == method && s.path == path)
        .count()
}

#[tokio::test]
async fn path_prefix_routes_to_that_registry() {
    let r = Registries::start().await;
    let (manifest, layers) = r.ghcr.add_image("org/app", "1.0", &[3000]);
    let m = r.mirror(|_| {}).await;

    let got = digest_of(&m, "/v2/ghcr.io/org/app/manifests/1.0").await;
    assert_eq!(got, manifest);
    let blob = m
        .get(&format!("/v2/ghcr.io/org/app/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 200);
    assert_eq!(sha256(&blob.bytes().await.unwrap()), layers[0]);
    assert_eq!(seen(&r.ghcr, "GET", "/v2/org/app/manifests/1.0"), 1);
    assert_eq!(r.ghcr.blob_gets(), 1);
    assert_eq!(r.hub.total() + r.quay.total(), 0);
    let metrics = m.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "pullthrough_cache_total{kind=\"manifest\",outcome=\"miss\",upstream=\"ghcr.io\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn alias_routes_to_its_registry() {
    let r = Registries::start().await;
    let (manifest, _) = r.ghcr.add_image("org/app", "1.0", &[10]);
    let m = r.mirror(|_| {}).await;

    assert_eq!(
        digest_of(&m, "/v2/ghcr/org/app/manifests/1.0").await,
        manifest
    );
    assert_eq!(r.totals(), [0, 1, 0]);
    // One cache, whichever way in: the prefix and containerd's `ns` find the same tag.
    for path in [
        "/v2/ghcr.io/org/app/manifests/1.0",
        "/v2/org/app/manifests/1.0?ns=ghcr.io",
        "/v2/ghcr/org/app/manifests/1.0",
    ] {
        let resp = m.get(path).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(x_cache(&resp), "HIT", "{path}");
    }
    assert_eq!(r.totals(), [0, 1, 0]);
    // The status page counts the repository as ghcr.io knows it.
    let status: serde_json::Value = m.status().await;
    let top = status["top_repositories"]["by_requests"].to_string();
    assert!(
        top.contains("\"org/app\"") && !top.contains("ghcr/"),
        "{top}"
    );
}

#[tokio::test]
async fn unprefixed_path_stays_docker_hub() {
    let r = Registries::start().await;
    let (alpine, _) = r.hub.add_image("library/alpine", "3", &[10]);
    let (app, _) = r.hub.add_image("myorg/app", "1", &[10]);
    // Same names upstream elsewhere: never asked.
    r.ghcr.add_image("myorg/app", "1", &[10]);
    let m = r.mirror(|_| {}).await;

    assert_eq!(digest_of(&m, "/v2/alpine/manifests/3").await, alpine);
    assert_eq!(
        digest_of(&m, "/v2/library/alpine/manifests/3").await,
        alpine
    );
    assert_eq!(digest_of(&m, "/v2/myorg/app/manifests/1").await, app);
    assert_eq!(
        digest_of(&m, "/v2/docker.io/myorg/app/manifests/1").await,
        app
    );
    assert_eq!(r.totals(), [2, 0, 0]);
}

/// `?ns=` decides the registry, and the path is the repository as written: containerd never
/// sends a prefix and `ns` together, and stripping one would make two names for one path.
#[tokio::test]
async fn ns_query_wins_over_prefix() {
    let r = Registries::start().await;
    let (on_hub, _) = r.hub.add_image("ghcr.io/org/app", "1.0", &[10]);
    let (on_ghcr, _) = r.ghcr.add_image("org/app", "1.0", &[20]);
    assert_ne!(on_hub, on_ghcr);
    let m = r.mirror(|_| {}).await;

    let got = digest_of(&m, "/v2/ghcr.io/org/app/manifests/1.0?ns=docker.io").await;
    assert_eq!(got, on_hub);
    assert_eq!(seen(&r.hub, "GET", "/v2/ghcr.io/org/app/manifests/1.0"), 1);
    assert_eq!(r.ghcr.total(), 0);
    let got = digest_of(&m, "/v2/ghcr.io/org/app/manifests/1.0").await;
    assert_eq!(got, on_ghcr);
    assert_eq!(r.totals(), [1, 1, 0]);
}

#[tokio::test]
async fn unknown_registry_prefix_is_refused_without_upstream_requests() {
    let r = Registries::start().await;
    let m = r.mirror(|_| {}).await;
    let d = sha256(b"x");
    for (path, registry) in [
        (
            "/v2/gcr.io/distroless/static/manifests/latest".to_owned(),
            "gcr.io",
        ),
        (format!("/v2/localhost/team/app/blobs/{d}"), "localhost"),
        (
            "/v2/registry.k8s.io/pause/tags/list".to_owned(),
            "registry.k8s.io",
        ),
        (format!("/v2/my.registry/app/referrers/{d}"), "my.registry"),
    ] {
        let resp = m.get(&path).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN", "{path}");
        assert_eq!(v["errors"][0]["detail"]["registry"], registry, "{path}");
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("not mirrored"), "{message}");
    }
    assert_eq!(r.totals(), [0, 0, 0]);
    assert_eq!(r.hub.tokens() + r.ghcr.tokens() + r.quay.tokens(), 0);
}

#[tokio::test]
async fn library_rule_applies_to_docker_hub_only() {
    let r = Registries::start().await;
    let (hub, _) = r.hub.add_image("library/alpine", "3", &[10]);
    let (ghcr, _) = r.ghcr.add_image("alpine", "3", &[10]);
    let (quay, _) = r.quay.add_image("alpine", "3", &[10]);
    let m = r.mirror(|_| {}).await;

    assert_eq!(digest_of(&m, "/v2/ghcr.io/alpine/manifests/3").await, ghcr);
    assert_eq!(seen(&r.ghcr, "GET", "/v2/alpine/manifests/3"), 1);
    assert_eq!(digest_of(&m, "/v2/docker.io/alpine/manifests/3").await, hub);
    assert_eq!(seen(&r.hub, "GET", "/v2/library/alpine/manifests/3"), 1);
    assert_eq!(
        digest_of(&m, "/v2/alpine/manifests/3?ns=quay.io").await,
        quay
    );
    assert_eq!(seen(&r.quay, "GET", "/v2/alpine/manifests/3"), 1);
}

#[tokio::test]
async fn denied_repository_costs_zero_upstream_requests() {
    let r = Registries::start().await;
    let (allowed, _) = r.quay.add_image("myorg/app", "1", &[10]);
    r.quay.add_image("evil/miner", "1", &[10]);
    r.quay.add_image("myorg/secret-keys", "1", &[10]);
    let m = r
        .mirror(|c| {
            let q = up(c, "quay.io");
            q.allow_repositories = Some(globs(&["library/*", "myorg/*"]));
            q.deny_repositories = globs(&["myorg/secret-*"]);
        })
        .await;
    let d = sha256(b"anything");
    let mut refused = 0;
    for repo in ["evil/miner", "myorg/secret-keys"] {
        for path in [
            format!("/v2/quay.io/{repo}/manifests/1"),
            format!("/v2/{repo}/manifests/1?ns=quay.io"),
            format!("/v2/quay.io/{repo}/manifests/{d}"),
            format!("/v2/quay.io/{repo}/blobs/{d}"),
            format!("/v2/quay.io/{repo}/tags/list"),
            format!("/v2/quay.io/{repo}/referrers/{d}"),
        ] {
            let resp = m.get(&path).send().await.unwrap();
            assert_eq!(resp.status(), 403, "{path}");
            assert_eq!(error_code(resp).await, "DENIED", "{path}");
            let resp = m.head(&path).send().await.unwrap();
            assert_eq!(resp.status(), 403, "HEAD {path}");
            refused += 2;
        }
    }
    assert_eq!(r.totals(), [0, 0, 0]);
    assert_eq!(r.quay.tokens(), 0);
    assert_eq!(
        metric(
            &m.metrics().await,
            "pullthrough_policy_refusals_total{upstream=\"quay.io\"}"
        ),
        f64::from(refused)
    );
    // What the lists admit is mirrored.
    assert_eq!(
        digest_of(&m, "/v2/quay.io/myorg/app/manifests/1").await,
        allowed
    );
    assert_eq!(r.totals(), [0, 0, 1]);
}

#[tokio::test]
async fn cached_content_is_not_served_for_a_denied_repository() {
    let r = Registries::start().await;
    let (manifest, layers) = r.ghcr.add_image("org/app", "1.0", &[100]);
    let m = r.mirror(|_| {}).await;
    assert_eq!(
        digest_of(&m, "/v2/ghcr.io/org/app/manifests/1.0").await,
        manifest
    );
    let blob = format!("/v2/ghcr.io/org/app/blobs/{}", layers[0]);
    assert_eq!(m.get(&blob).send().await.unwrap().status(), 200);
    wait_committed(&m, &blob).await;
    let catalog = m
        .get("/v2/_catalog")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(catalog.contains("ghcr.io/org/app"), "{catalog}");
    let asked = r.totals();

    // The operator denies the repository; the cache still holds it.
    let dir = m.stop().await;
    let m = r
        .mirror_in(dir, |c| {
            up(c, "ghcr.io").deny_repositories = globs(&["org/*"])
        })
        .await;
    for path in [
        "/v2/ghcr.io/org/app/manifests/1.0".to_owned(),
        format!("/v2/ghcr.io/org/app/manifests/{manifest}"),
        blob.clone(),
        "/v2/org/app/manifests/1.0?ns=ghcr.io".to_owned(),
    ] {
        let resp = m.get(&path).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{path}");
        assert_eq!(error_code(resp).await, "DENIED", "{path}");
    }
    assert_eq!(r.totals(), asked);
    let catalog = m
        .get("/v2/_catalog")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!catalog.contains("org/app"), "{catalog}");
    // The same blob under an admitted name is still a hit, once that repository's upstream
    // confirms it holds the blob (content is bound to repositories).
    let bytes = r.ghcr.state.content.lock().unwrap().blobs[&layers[0]].clone();
    r.hub.add_blob(bytes);
    let other = m
        .get(&format!("/v2/library/x/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&other), "HIT");
    assert_eq!((r.hub.blob_heads(), r.hub.blob_gets()), (1, 0));
}

#[tokio::test]
async fn immutable_tag_is_never_revalidated() {
    let r = Registries::start().await;
    let (release, _) = r.ghcr.add_image("org/app", "v1.2.3", &[10]);
    let (latest, _) = r.ghcr.add_image("org/app", "latest", &[10]);
    let m = r
        .mirror(|c| up(c, "ghcr.io").immutable_tags = TagPatterns::new(&[SEMVER]).unwrap())
        .await;
    assert_eq!(
        digest_of(&m, "/v2/ghcr/org/app/manifests/v1.2.3").await,
        release
    );
    assert_eq!(
        digest_of(&m, "/v2/ghcr/org/app/manifests/latest").await,
        latest
    );
    // Even a moved release tag is not looked at again.
    r.ghcr.retag("org/app", "v1.2.3", &latest);

    for _ in 0..3 {
        m.advance(PAST_TTL);
        let resp = m
            .get("/v2/ghcr/org/app/manifests/v1.2.3")
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&resp), "HIT");
        assert_eq!(resp.headers()["docker-content-digest"], release.as_str());
        let resp = m
            .head("/v2/ghcr/org/app/manifests/latest")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(seen(&r.ghcr, "HEAD", "/v2/org/app/manifests/v1.2.3"), 0);
    assert_eq!(seen(&r.ghcr, "GET", "/v2/org/app/manifests/v1.2.3"), 1);
    assert_eq!(seen(&r.ghcr, "HEAD", "/v2/org/app/manifests/latest"), 3);
}

#[tokio::test]
async fn per_upstream_tag_ttl_applies() {
    let r = Registries::start().await;
    r.hub.add_image("library/alpine", "3", &[10]);
    r.quay.add_image("org/tool", "1", &[10]);
    let m = r
        .mirror(|c| up(c, "quay.io").tag_ttl = Some(Duration::from_secs(600)))
        .await;
    digest_of(&m, "/v2/alpine/manifests/3").await;
    digest_of(&m, "/v2/quay.io/org/tool/manifests/1").await;

    // Past `cache.tag_ttl`: Docker Hub's tag is revalidated, quay.io's is not yet.
    m.advance(PAST_TTL);
    let hub = m.head("/v2/alpine/manifests/3").send().await.unwrap();
    assert_eq!(x_cache(&hub), "REVALIDATED");
    let quay = m
        .head("/v2/quay.io/org/tool/manifests/1")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&quay), "HIT");
    assert_eq!(r.hub.manifest_heads(), 1);
    assert_eq!(r.quay.manifest_heads(), 0);

    // Past quay.io's own TTL.
    m.advance(Duration::from_secs(600));
    let quay = m
        .head("/v2/quay.io/org/tool/manifests/1")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&quay), "REVALIDATED");
    assert_eq!(r.quay.manifest_heads(), 1);
}

#[tokio::test]
async fn same_digest_through_two_registries_is_stored_once() {
    let r = Registries::start().await;
    let bytes = common::upstream::pseudo_random(5000, 7);
    let d = r.hub.add_blob(bytes.clone());
    assert_eq!(r.ghcr.add_blob(bytes.clone()), d);
    let m = r.mirror(|_| {}).await;

    let hub_path = format!("/v2/library/base/blobs/{d}");
    let got = m
        .get(&hub_path)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], &bytes[..]);
    wait_committed(&m, &hub_path).await;
    for path in [
        format!("/v2/ghcr.io/org/app/blobs/{d}"),
        format!("/v2/ghcr/other/blobs/{d}"),
        format!("/v2/org/app/blobs/{d}?ns=ghcr.io"),
    ] {
        let resp = m.get(&path).send().await.unwrap();
        assert_eq!(x_cache(&resp), "HIT", "{path}");
        assert_eq!(&resp.bytes().await.unwrap()[..], &bytes[..], "{path}");
    }
    assert_eq!(r.hub.blob_gets(), 1);
    assert_eq!(r.ghcr.blob_gets(), 0);
    assert_eq!(
        r.ghcr.blob_heads(),
        2,
        "each new repository is confirmed once with a HEAD (org/app, other)"
    );
    // One file on disk holds those bytes.
    let hex = d.trim_start_matches("sha256:");
    let mut copies = 0;
    let mut pending = vec![m.storage()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else if std::fs::read(entry.path()).unwrap() == bytes {
                copies += 1;
                assert!(entry.file_name().to_string_lossy().contains(hex));
            }
        }
    }
    assert_eq!(copies, 1);
}

#[tokio::test]
async fn catalog_and_tag_links_name_paths_a_client_can_follow() {
    let r = Registries::start().await;
    r.hub.add_image("library/alpine", "3", &[10]);
    for tag in ["a", "b", "c"] {
        r.ghcr.add_image("org/app", tag, &[10]);
    }
    let m = r.mirror(|_| {}).await;
    digest_of(&m, "/v2/alpine/manifests/3").await;
    digest_of(&m, "/v2/ghcr/org/app/manifests/a").await;

    let catalog: serde_json::Value = m
        .get("/v2/_catalog")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["ghcr.io/org/app", "library/alpine"])
    );
    let catalog: serde_json::Value = m
        .get("/v2/_catalog?ns=ghcr.io")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["org/app"]));

    // ghcr.io pages and links to `/v2/org/app/…`: the mirror's link keeps the prefix.
    let resp = m
        .get("/v2/ghcr.io/org/app/tags/list?n=2")
        .send()
        .await
        .unwrap();
    let link = resp.headers()["link"].to_str().unwrap().to_owned();
    assert_eq!(
        link,
        "</v2/ghcr.io/org/app/tags/list?n=2&last=b>; rel=\"next\""
    );
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let page: serde_json::Value = m.get(next).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["tags"], serde_json::json!(["c"]));
    assert_eq!(
        r.hub
            .counters()
            .tags
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
