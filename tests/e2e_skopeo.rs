//! End to end with real software: the CNCF distribution registry (Debian `docker-registry`)
//! as the upstream on loopback, seeded with a multi-arch image this test builds itself, and
//! `skopeo copy --all` pulling it through pullthrough, twice. The second pull must cost no
//! upstream blob request, by pullthrough's own metrics and by the registry's access log.
//!
//! Needs `docker-registry` and `skopeo` on PATH (.ci/run installs both). Without them the
//! test passes and says on stderr what it skipped and why; with `PULLTHROUGH_REQUIRE_TOOLS=1`
//! (as in CI; see tests/common/tools.rs) it fails instead.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message
#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tools::require_tool;
use common::upstream::{pseudo_random, sha256, OCI_INDEX, OCI_MANIFEST};
use common::{eventually, metric_sum, wait_for, TestMirror, PAST_TTL, SETTLE, TTL};
use serde_json::json;
use tokio::process::{Child, Command};

const REPO: &str = "library/e2e-multi";
const TAG: &str = "v1";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const DEBIAN_PACKAGE_OF_REGISTRY: &str = "Debian package docker-registry; .ci/run installs it";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_multi_arch_through_the_mirror_then_from_cache() {
    let Some(registry_bin) = require_tool("docker-registry", DEBIAN_PACKAGE_OF_REGISTRY) else {
        return;
    };
    if require_tool("skopeo", "Debian package skopeo; .ci/run installs it").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let skopeo = Skopeo::new(work);

    let registry = Registry::start(&registry_bin, work).await;
    let image = write_multi_arch_layout(&work.join("layout"));
    let upstream_ref = format!("docker://{}/{REPO}:{TAG}", registry.addr);
    skopeo
        .copy(
            &["--dest-tls-verify=false"],
            &format!("oci:{}:{TAG}", work.join("layout").display()),
            &upstream_ref,
        )
        .await;
    assert_eq!(
        registry.manifest_digest().await,
        image.index_digest,
        "the registry serves the index bytes the test wrote"
    );

    let mirror = TestMirror::start_for(
        &format!("http://{}", registry.addr),
        tempfile::tempdir().unwrap(),
        |c| c.cache.tag_ttl = TTL,
    )
    .await;
    let mirror_ref = format!("docker://{}/{REPO}:{TAG}", mirror.addr);

    // Cold: every blob comes from the upstream, exactly once.
    let first = work.join("pull-1");
    skopeo
        .copy(
            &["--src-tls-verify=false"],
            &mirror_ref,
            &format!("dir:{}", first.display()),
        )
        .await;
    assert_eq!(
        sha256_file(&first.join("manifest.json")),
        image.index_digest,
        "cold pull: index digest"
    );
    let blobs = image.blobs.len();
    eventually(
        "cold pull: the registry logs a GET per blob",
        SETTLE,
        || async { registry.blob_gets() >= blobs },
    )
    .await;
    assert_eq!(
        registry.blob_gets(),
        blobs,
        "cold pull: one upstream GET per blob"
    );
    assert_eq!(
        upstream_blob_gets(&mirror).await,
        blobs as u64,
        "cold pull: mirror's metric"
    );

    // Warm, with a fresh destination and the tag past its TTL: nothing but manifest checks
    // upstream.
    mirror.advance(PAST_TTL);
    let second = work.join("pull-2");
    skopeo
        .copy(
            &["--src-tls-verify=false"],
            &mirror_ref,
            &format!("dir:{}", second.display()),
        )
        .await;
    assert_eq!(
        sha256_file(&second.join("manifest.json")),
        image.index_digest,
        "warm pull: index digest"
    );
    for blob in &image.blobs {
        let hex = blob.trim_start_matches("sha256:");
        assert_eq!(
            &sha256_file(&second.join(hex)),
            blob,
            "warm pull: blob {blob} intact"
        );
    }
    registry.log_caught_up().await;
    assert_eq!(
        registry.blob_gets(),
        blobs,
        "warm pull: no upstream blob GET (registry log)"
    );
    assert_eq!(
        upstream_blob_gets(&mirror).await,
        blobs as u64,
        "warm pull: no upstream blob GET (metric)"
    );

    mirror.stop().await;
    registry.stop().await;
}

/// `pullthrough_upstream_requests_total{kind="blob_get"}`, summed over status classes.
async fn upstream_blob_gets(mirror: &TestMirror) -> u64 {
    metric_sum(
        &mirror.metrics().await,
        "pullthrough_upstream_requests_total",
        "kind=\"blob_get\"",
    ) as u64
}

fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    sha256(&data)
}

// ---- the image: an OCI layout written by hand ------------------------------------------

struct Image {
    index_digest: String,
    /// Configs and layers of both platforms: what a `--all` pull fetches with `/blobs/`.
    blobs: BTreeSet<String>,
}

/// Writes an OCI layout at `root` whose tag `v1` is an index over linux/amd64 and
/// linux/arm64, each with a config and two uncompressed tar layers of deterministic bytes.
fn write_multi_arch_layout(root: &Path) -> Image {
    std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
    std::fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |data: &[u8]| -> String {
        let digest = sha256(data);
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(root.join("blobs/sha256").join(hex), data).unwrap();
        digest
    };
    let mut blobs = BTreeSet::new();
    let mut platforms = Vec::new();
    for (n, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for i in 0..2u64 {
            let tar = tar_with_one_file(
                &format!("data/{arch}-{i}.bin"),
                &pseudo_random(300_000, n as u64 * 10 + i),
            );
            let digest = put(&tar);
            diff_ids.push(digest.clone()); // uncompressed: the diff_id is the digest
            layers.push(json!({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": tar.len()}));
            blobs.insert(digest);
        }
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let config_digest = put(&config);
        blobs.insert(config_digest.clone());
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        platforms.push(json!({
            "mediaType": OCI_MANIFEST, "digest": put(&manifest), "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": platforms}),
    )
    .unwrap();
    let index_digest = put(&index);
    let top = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_INDEX, "digest": index_digest, "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": TAG},
    }]});
    std::fs::write(root.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    Image {
        index_digest,
        blobs,
    }
}

/// A POSIX ustar archive holding one regular file: header, data padded to 512 bytes, and
/// the two zero blocks that end an archive. Owner root, mtime 0.
fn tar_with_one_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let mut field =
        |offset: usize, value: &[u8]| header[offset..offset + value.len()].copy_from_slice(value);
    field(0, name.as_bytes());
    field(100, b"0000644\0");
    field(108, b"0000000\0");
    field(116, b"0000000\0");
    field(124, format!("{:011o}\0", data.len()).as_bytes());
    field(136, b"00000000000\0");
    field(148, b"        "); // the checksum counts its own field as spaces
    field(156, b"0");
    field(257, b"ustar\0");
    field(263, b"00");
    field(265, b"root");
    field(297, b"root");
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
    let mut tar = header.to_vec();
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    tar
}

// ---- skopeo ----------------------------------------------------------------------------

/// skopeo with its own (empty) registries.conf and an accept-anything policy, so the host's
/// /etc/containers files do not matter.
struct Skopeo {
    registries_conf: PathBuf,
    policy: PathBuf,
}

impl Skopeo {
    fn new(work: &Path) -> Skopeo {
        let skopeo = Skopeo {
            registries_conf: work.join("registries.conf"),
            policy: work.join("policy.json"),
        };
        std::fs::write(&skopeo.registries_conf, "").unwrap();
        std::fs::write(
            &skopeo.policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        skopeo
    }

    async fn copy(&self, tls: &[&str], from: &str, to: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.arg("--registries-conf")
            .arg(&self.registries_conf)
            .arg("--policy")
            .arg(&self.policy)
            // --preserve-digests: skopeo would otherwise gzip the uncompressed layers on
            // the way to a registry, changing every digest the test knows.
            .args(["copy", "-q", "--all", "--preserve-digests"])
            .args(tls)
            .args([from, to])
            .kill_on_drop(true);
        let out = tokio::time::timeout(STEP_TIMEOUT, cmd.output())
            .await
            .unwrap_or_else(|_| {
                panic!("skopeo copy {from} {to}: no result within {STEP_TIMEOUT:?}")
            })
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy {from} {to} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- the upstream: docker-registry -----------------------------------------------------

struct Registry {
    child: Child,
    addr: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Registry {
    /// Starts the registry on a port it picks itself (`addr: 127.0.0.1:0`), and returns once
    /// it has logged that address and answers `/v2/` there.
    async fn start(bin: &Path, work: &Path) -> Registry {
        let log = work.join("registry.log");
        let config = work.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info, formatter: text}}\n\
                 storage: {{filesystem: {{rootdirectory: {}}}}}\n\
                 http: {{addr: 127.0.0.1:0, secret: e2e-test}}\n",
                work.join("registry-data").display()
            ),
        )
        .unwrap();
        let out = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("start docker-registry");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let addr = wait_for(
            "docker-registry logs the address it listens on",
            Duration::from_secs(15),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "docker-registry exited ({status}); its log:\n{}",
                        read_log()
                    );
                }
                std::future::ready(listening_addr(&read_log()))
            },
        )
        .await;
        let registry = Registry {
            child,
            addr,
            log: log.clone(),
            http: reqwest::Client::new(),
        };
        let r = registry
            .http
            .get(format!("http://{}/v2/", registry.addr))
            .send()
            .await
            .unwrap_or_else(|e| panic!("docker-registry: {e}; its log:\n{}", read_log()));
        assert!(
            r.status().is_success(),
            "docker-registry /v2/: {}",
            r.status()
        );
        registry
    }

    /// The digest the registry gives the tag, checked against the bytes it sends.
    async fn manifest_digest(&self) -> String {
        let r = self
            .http
            .get(format!("http://{}/v2/{REPO}/manifests/{TAG}", self.addr))
            .header("accept", OCI_INDEX)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let header = r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(sha256(&r.bytes().await.unwrap()), header);
        header
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Blob GETs in the registry's access log (one line per completed request).
    fn blob_gets(&self) -> usize {
        let needle = format!("\"GET /v2/{REPO}/blobs/sha256:");
        self.log_text()
            .lines()
            .filter(|line| line.contains(&needle))
            .count()
    }

    /// Returns once the access log holds a request of the test's own, sent now: requests that
    /// ended before it are logged by then.
    async fn log_caught_up(&self) {
        let marker = format!("/v2/?caught-up={}", std::process::id());
        let r = self
            .http
            .get(format!("http://{}{marker}", self.addr))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{marker}: {}", r.status());
        let needle = format!("\"GET {marker} ");
        eventually("the registry logs the marker request", SETTLE, || {
            std::future::ready(self.log_text().contains(&needle))
        })
        .await;
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The address in distribution's `msg="listening on 127.0.0.1:PORT"` line.
fn listening_addr(log: &str) -> Option<String> {
    let (_, rest) = log.split_once("msg=\"listening on ")?;
    let (addr, _) = rest.split_once('"')?;
    Some(addr.to_owned())
}
