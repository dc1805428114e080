//! The shared tier on a real S3 server: Garage (a single node on loopback, started here) when
//! it is installed — `tests/cluster/run.sh --install` installs it, as CI does — and skipped
//! with a notice otherwise (a failure with `PULLTHROUGH_REQUIRE_TOOLS=1`, as in CI; see
//! tests/common/tools.rs). Multipart publication after verification, a replica with an empty
//! disk served from the store, and presigned redirects that carry no upstream token.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::upstream::pseudo_random;
use common::{eventually, metric_sum, FakeUpstream, TestMirror, SETTLE};
use futures_util::TryStreamExt;
use pullthrough::config::{Config, Secret};
use pullthrough::store::tier::Backend;

/// The Garage release the cluster suite pins.
const GARAGE_VERSION: &str = "2.5.0";

/// Garage at the pinned version, where tests/cluster/components.sh looks for it (`find_garage`:
/// on the PATH or under `$GARAGE_ROOT`, by default ~/.local/garage-2.5.0), or at `$GARAGE_BIN`.
fn garage_binary() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(root) = std::env::var_os("GARAGE_ROOT") {
        candidates.push(PathBuf::from(root).join("bin/garage"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates
            .push(PathBuf::from(home).join(format!(".local/garage-{GARAGE_VERSION}/bin/garage")));
    }
    candidates.push(PathBuf::from("garage"));
    candidates.into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(GARAGE_VERSION))
    })
}

struct Garage {
    _server: tokio::process::Child,
    _dir: tempfile::TempDir,
    endpoint: String,
    key_id: String,
    secret: String,
}

fn free_port() -> u16 {
    // Garage binds its own ports: the port is found free here and handed over.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn garage_cli(bin: &PathBuf, config: &PathBuf, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn start_garage() -> Option<Garage> {
    let Some(bin) = garage_binary() else {
        return common::tools::missing(
            &format!("garage {GARAGE_VERSION} is not installed"),
            "tests/cluster/run.sh --install",
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let (s3, rpc, admin) = (free_port(), free_port(), free_port());
    let config = dir.path().join("garage.toml");
    std::fs::write(
        &config,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "test-admin-token"
"#,
            d = dir.path().display(),
            secret = "ab".repeat(32),
        ),
    )
    .unwrap();
    let server = tokio::process::Command::new(&bin)
        .arg("-c")
        .arg(&config)
        .arg("server")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // `node id` reads the key file; `status` needs the daemon's RPC.
    let mut up = false;
    for _ in 0..100 {
        if garage_cli(&bin, &config, &["status"]).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "garage answers");
    let node = garage_cli(&bin, &config, &["node", "id", "-q"])
        .await
        .unwrap();
    let node = node.split('@').next().unwrap().trim().to_owned();
    garage_cli(
        &bin,
        &config,
        &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
    )
    .await
    .unwrap();
    garage_cli(&bin, &config, &["layout", "apply", "--version", "1"])
        .await
        .unwrap();
    garage_cli(&bin, &config, &["bucket", "create", "pullthrough"])
        .await
        .unwrap();
    let key = garage_cli(&bin, &config, &["key", "create", "pullthrough"])
        .await
        .unwrap();
    let field = |name: &str| {
        key.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {key}"))
    };
    let (key_id, secret) = (field("Key ID"), field("Secret key"));
    garage_cli(
        &bin,
        &config,
        &[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "pullthrough",
            "--key",
            "pullthrough",
        ],
    )
    .await
    .unwrap();
    Some(Garage {
        _server: server,
        _dir: dir,
        endpoint: format!("http://127.0.0.1:{s3}"),
        key_id,
        secret,
    })
}

/// A replica on the real store, with an in-process coordinator shared by `coordinator`.
fn point_at(garage: &Garage, shared: &mut pullthrough::config::SharedStorageConfig) {
    shared.endpoint = garage.endpoint.clone();
    shared.access_key_id = Some(Secret::new(garage.key_id.clone()));
    shared.secret_access_key = Some(Secret::new(garage.secret.clone()));
}

async fn replica(
    garage: &Garage,
    up: &FakeUpstream,
    coordinator: &std::sync::Arc<pullthrough::cluster::memory::MemoryCoordinator>,
    tweak: impl FnOnce(&mut Config),
) -> TestMirror {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&up.url, dir.path());
    common::join_cluster(
        &mut config,
        &format!("http://{}", listener.local_addr().unwrap()),
    );
    point_at(garage, config.storage.shared.as_mut().unwrap());
    tweak(&mut config);
    let coordinator = coordinator.clone();
    TestMirror::launch_on(listener, pullthrough::Clock::manual(), config, dir, |s| {
        s.coordinator(coordinator)
    })
    .await
}

#[tokio::test]
async fn replicas_share_blobs_through_a_real_s3_store() {
    let Some(garage) = start_garage().await else {
        return;
    };
    let up = FakeUpstream::start().await;
    up.behave(|b| b.require_token = true);
    // Two multipart parts and a short last one.
    let body = pseudo_random(11 * 1024 * 1024 + 3, 21);
    let digest = up.add_blob(body.clone());
    let path = format!("/v2/library/app/blobs/{digest}");
    let coordinator = Default::default();

    let first = replica(&garage, &up, &coordinator, |_| {}).await;
    let got = first
        .get(&path)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got, body);
    // With the 401 that asks for a token first.
    let fetched = up.blob_gets();
    let second = replica(&garage, &up, &coordinator, |_| {}).await;
    eventually("the blob is published to the store", SETTLE, || async {
        let resp = second.head(&path).send().await.unwrap();
        resp.status() == 200
            && common::x_cache(&resp) != "HIT"
            && resp.headers()["content-length"] == body.len().to_string().as_str()
    })
    .await;
    let got = second
        .get(&path)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got, body);
    assert_eq!(
        up.blob_gets(),
        fetched,
        "the second replica read the store, not the upstream"
    );
    let metrics = second.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "pullthrough_blob_source_total",
            "source=\"shared\""
        ),
        1.0
    );

    // Redirects point at the store, signed by its key, with no upstream token in them.
    let redirecting = replica(&garage, &up, &coordinator, |c| {
        c.storage.shared.as_mut().unwrap().redirect = true;
    })
    .await;
    let resp = redirecting.get(&path).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&garage.endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature"), "{location}");
    for token in up.issued_tokens() {
        assert!(!location.contains(&token));
    }
    let redirected = reqwest::get(&location).await.unwrap();
    assert_eq!(redirected.status(), 200);
    assert_eq!(redirected.bytes().await.unwrap(), body);
    assert_eq!(up.blob_gets(), fetched);

    // The listing the fleet's hourly recount reads (`store::shared::recount`): the blob, its size.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&up.url, dir.path());
    common::join_cluster(&mut config, "http://127.0.0.1:1");
    let mut shared = config.storage.shared.unwrap();
    point_at(&garage, &mut shared);
    let tier = pullthrough::store::s3::S3::connect(&shared).unwrap();
    let listed: Vec<(String, u64, u64)> = Backend::list(&tier).try_collect().await.unwrap();
    let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    assert!(
        listed
            .iter()
            .any(|(n, size, _)| *n == name && *size == body.len() as u64),
        "{listed:?}"
    );
}
