//! What an operator sees: the access line's fields, trusted proxies, the metric families, a
//! prune noticed by the running mirror.

#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use common::{metric, metric_sum, secret, FakeUpstream, TestMirror, SETTLE};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncBufReadExt;

/// The binary, with every JSON log line it writes kept for the test.
struct LoggingDaemon {
    child: tokio::process::Child,
    url: String,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    _dir: tempfile::TempDir,
}

impl LoggingDaemon {
    async fn start(up: &FakeUpstream, server_toml: &str) -> LoggingDaemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mirror.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\n{server_toml}\n[storage]\ndir = {:?}\n\
                 [upstreams.\"docker.io\"]\nurl = \"{}\"\n",
                dir.path().join("data"),
                up.url
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("PULLTHROUGH_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let kept = lines.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = stderr.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                if v["fields"]["message"] == "pullthrough listening" {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(v["fields"]["addr"].as_str().unwrap().to_owned());
                    }
                }
                kept.lock().unwrap().push(v);
            }
        });
        let addr = tokio::time::timeout(SETTLE, rx)
            .await
            .expect("the daemon logs its address")
            .unwrap();
        LoggingDaemon {
            child,
            url: format!("http://{addr}"),
            lines,
            _dir: dir,
        }
    }

    /// The access line of the request with `id`, once written.
    async fn access_line(&self, id: &str) -> serde_json::Value {
        common::wait_for(&format!("the access line of {id}"), SETTLE, || async {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["target"] == "pullthrough::access" && v["fields"]["request_id"] == id)
                .map(|v| v["fields"].clone())
        })
        .await
    }
}

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-request-id")
        .expect("X-Request-Id is sent back")
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn access_line_names_registry_repository_reference_user_agent_upstream_time_and_request_id() {
    let up = FakeUpstream::start().await;
    let (manifest, layers) = up.add_image("library/alpine", "3.20", &[1000]);
    let mut d = LoggingDaemon::start(&up, "").await;
    let client = reqwest::Client::new();
    let get = |path: String| {
        client
            .get(format!("{}{path}", d.url))
            .header("user-agent", "containerd/2.0.0 \"test\"")
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
            )
    };

    // A miss: the mirror waits on the upstream; the client's id is kept.
    let r = get("/v2/alpine/manifests/3.20?ns=docker.io".into())
        .header("x-request-id", "ci-job-42.step:3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(request_id(&r), "ci-job-42.step:3");
    let f = d.access_line("ci-job-42.step:3").await;
    assert_eq!(f["registry"], "docker.io");
    // As the upstream knows it.
    assert_eq!(f["repository"], "library/alpine");
    assert_eq!(f["reference"], "3.20");
    assert_eq!(f["user_agent"], "containerd/2.0.0 \"test\"");
    assert_eq!(f["cache"], "MISS");
    assert_eq!(f["client"], "127.0.0.1");
    assert!(f["upstream_ms"].as_f64().unwrap() > 0.0, "{f}");
    assert!(f["upstream_ms"].as_f64() <= f["ms"].as_f64(), "{f}");

    // A hit by digest: no upstream time; an id made by the mirror, since the client's is
    // not printable.
    let r = get(format!("/v2/alpine/manifests/{manifest}"))
        .header("x-request-id", "has spaces in it")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    let id = request_id(&r);
    assert_ne!(id, "has spaces in it");
    let f = d.access_line(&id).await;
    assert_eq!(f["reference"], manifest.as_str());
    assert_eq!(f["upstream_ms"], 0.0);

    // A blob, and a route with no repository.
    let r = get(format!("/v2/alpine/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    let id = request_id(&r);
    r.bytes().await.unwrap();
    let f = d.access_line(&id).await;
    assert_eq!(f["kind"], "blob");
    assert_eq!(f["reference"], layers[0].as_str());
    let r = get("/v2/".into()).send().await.unwrap();
    let f = d.access_line(&request_id(&r)).await;
    assert_eq!(f["registry"], "-");
    assert_eq!(f["repository"], "-");
    assert_eq!(f["reference"], "-");
    d.child.kill().await.unwrap();
}

#[tokio::test]
async fn access_line_names_the_registry_a_prefix_or_alias_resolved_to() {
    let hub = FakeUpstream::start().await;
    let ghcr = FakeUpstream::start().await;
    let (manifest, _) = ghcr.add_image("org/app", "1.0", &[10]);
    // TOML takes tables in any order: ghcr.io's entry rides after the [server] keys.
    let extra = format!(
        "[upstreams.\"ghcr.io\"]\nurl = \"{}\"\naliases = [\"ghcr\"]\n",
        ghcr.url
    );
    let mut d = LoggingDaemon::start(&hub, &extra).await;
    let client = reqwest::Client::new();
    for (path, registry, repository) in [
        ("/v2/ghcr/org/app/manifests/1.0", "ghcr.io", "org/app"),
        ("/v2/ghcr.io/org/app/manifests/1.0", "ghcr.io", "org/app"),
        ("/v2/gcr.io/org/app/manifests/1.0", "-", "gcr.io/org/app"),
    ] {
        let r = client.get(format!("{}{path}", d.url)).send().await.unwrap();
        let f = d.access_line(&request_id(&r)).await;
        assert_eq!(f["registry"], registry, "{path}");
        assert_eq!(f["repository"], repository, "{path}");
        assert_eq!(f["reference"], "1.0", "{path}");
    }
    let r = client
        .get(format!("{}/v2/ghcr/org/app/manifests/{manifest}", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hub.total(), 0);
    d.child.kill().await.unwrap();
}

#[tokio::test]
async fn forwarded_client_address_counts_only_from_a_trusted_proxy() {
    let up = FakeUpstream::start().await;
    // Trusted: the forwarded address is the client, for the log, the allow-list and limits.
    let mut d = LoggingDaemon::start(
        &up,
        "trusted_proxies = [\"127.0.0.0/8\"]\nallow = [\"192.0.2.0/24\"]\n\
         client_requests = 1\nclient_window = \"1h\"",
    )
    .await;
    let client = reqwest::Client::new();
    let ping = |xff: Option<&'static str>, fwd: Option<&'static str>| {
        let mut r = client.get(format!("{}/v2/", d.url));
        if let Some(v) = xff {
            r = r.header("x-forwarded-for", v);
        }
        if let Some(v) = fwd {
            r = r.header("forwarded", v);
        }
        r.send()
    };
    let r = ping(Some("203.0.113.9, 192.0.2.5"), None).await.unwrap();
    assert_eq!(r.status(), 200, "allowed as 192.0.2.5");
    let f = d.access_line(&request_id(&r)).await;
    assert_eq!(f["client"], "192.0.2.5");
    assert_eq!(
        f["peer"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    // Its one request is used up; another client behind the same proxy has its own.
    let r = ping(Some("192.0.2.5"), None).await.unwrap();
    assert_eq!(r.status(), 429);
    let r = ping(None, Some("for=\"192.0.2.6:1234\";proto=http"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "Forwarded: for= without X-Forwarded-For");
    assert_eq!(d.access_line(&request_id(&r)).await["client"], "192.0.2.6");
    // The proxy itself is not in the allow-list.
    assert_eq!(ping(None, None).await.unwrap().status(), 403);
    d.child.kill().await.unwrap();

    // Untrusted: the headers are ignored.
    let mut d = LoggingDaemon::start(&up, "allow = [\"192.0.2.0/24\"]").await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/v2/", d.url))
        .header("x-forwarded-for", "192.0.2.5")
        .header("forwarded", "for=192.0.2.5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(d.access_line(&request_id(&r)).await["client"], "127.0.0.1");
    d.child.kill().await.unwrap();
}

const OCI_ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

#[tokio::test]
async fn metrics_name_status_codes_upstreams_cache_status_refusals_build_and_process() {
    let up = FakeUpstream::start().await;
    up.behave(|b| b.require_token = true);
    up.add_image("library/alpine", "3.20", &[1000]);
    let m = TestMirror::start_with(&up, |c| {
        c.server.tokens = vec![secret("s3cret")];
        c.server.client_requests = 3;
        c.server.client_window = std::time::Duration::from_secs(3600);
    })
    .await;
    let authed = |path: &str| {
        m.get(path)
            .bearer_auth("s3cret")
            .header("accept", OCI_ACCEPT)
            .send()
    };
    assert_eq!(m.get("/v2/").send().await.unwrap().status(), 401);
    let manifest = "/v2/library/alpine/manifests/3.20";
    assert_eq!(authed(manifest).await.unwrap().status(), 200);
    assert_eq!(authed(manifest).await.unwrap().status(), 200);
    let missing = format!("/v2/library/alpine/blobs/sha256:{}", "0".repeat(64));
    assert_eq!(authed(&missing).await.unwrap().status(), 404);
    assert_eq!(authed(manifest).await.unwrap().status(), 429);

    // No Accept: the Prometheus text format.
    let r = m
        .get("/metrics")
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let t = r.text().await.unwrap();
    assert!(!t.contains("# EOF"));
    assert!(t.contains("# TYPE pullthrough_requests_total counter"));
    let requests = |labels: &str| metric(&t, &format!("pullthrough_requests_total{{{labels}}}"));
    assert_eq!(
        requests(r#"kind="manifest",method="GET",status="2xx",code="200""#),
        2.0
    );
    assert_eq!(
        requests(r#"kind="blob",method="GET",status="4xx",code="404""#),
        1.0
    );
    assert_eq!(
        requests(r#"kind="manifest",method="GET",status="4xx",code="429""#),
        1.0
    );
    assert_eq!(
        requests(r#"kind="ping",method="GET",status="4xx",code="401""#),
        1.0
    );
    let refusals = |r: &str| {
        metric(
            &t,
            &format!("pullthrough_client_refusals_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(refusals("credentials"), 1.0);
    assert_eq!(refusals("rate_limit"), 1.0);
    // Hits and misses are timed apart.
    let timed = |kind: &str, cache: &str| {
        metric(
            &t,
            &format!(
                "pullthrough_request_duration_seconds_count{{kind=\"{kind}\",cache=\"{cache}\"}}"
            ),
        )
    };
    assert_eq!(timed("manifest", "miss"), 1.0);
    assert_eq!(timed("manifest", "hit"), 1.0);
    // Upstream requests, bytes and cache lookups by upstream; latency of manifests and tokens.
    assert!(
        metric_sum(
            &t,
            "pullthrough_upstream_requests_total",
            r#"upstream="docker.io""#
        ) >= 2.0
    );
    assert_eq!(
        metric(
            &t,
            r#"pullthrough_cache_total{kind="manifest",outcome="miss",upstream="docker.io"}"#
        ),
        1.0
    );
    for kind in ["manifest_get", "token"] {
        let n = metric(
            &t,
            &format!(
                "pullthrough_upstream_request_duration_seconds_count{{kind=\"{kind}\",upstream=\"docker.io\"}}"
            ),
        );
        assert!(n >= 1.0, "{kind}: {n}");
    }
    assert_eq!(
        metric(
            &t,
            &format!(
                "pullthrough_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(metric(&t, "process_open_fds") > 0.0);
    assert!(metric(&t, "process_max_fds") > 0.0);
    assert!(metric(&t, "process_resident_memory_bytes") > 1e6);
    assert!(metric(&t, "process_start_time_seconds") > 1.6e9);

    // A scraper that asks for OpenMetrics gets it.
    let r = m
        .get("/metrics")
        .bearer_auth("s3cret")
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(r.text().await.unwrap().ends_with("# EOF\n"));
}

/// `promtool check metrics` (which reads the text format) accepts the exposition. Skipped
/// without promtool on the `PATH`; `.ci/lint-packaging` runs it with `PROMTOOL` set.
#[tokio::test]
async fn metrics_pass_promtool_check_metrics() {
    // Set explicitly (as CI does), a missing promtool fails the test instead of skipping it.
    let explicit = std::env::var("PROMTOOL").ok();
    let promtool = explicit.clone().unwrap_or_else(|| "promtool".into());
    let found = std::process::Command::new(&promtool)
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        found || explicit.is_none(),
        "PROMTOOL={promtool} does not run"
    );
    if !found {
        eprintln!("skipped: no promtool");
        return;
    }
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/alpine", "3.20", &[1000]);
    let m = TestMirror::start(&up).await;
    m.get("/v2/library/alpine/manifests/3.20")
        .header("accept", OCI_ACCEPT)
        .send()
        .await
        .unwrap();
    let blob = format!("/v2/library/alpine/blobs/{}", layers[0]);
    m.get(&blob).send().await.unwrap().bytes().await.unwrap();
    let text = m.metrics().await;
    let mut child = tokio::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pullthrough cache prune` beside a running mirror: the mirror's size and entry gauges
/// follow within its housekeeping interval (30 s; 50 ms here), and what was pruned is fetched
/// again.
#[tokio::test]
async fn a_running_mirror_notices_a_prune_of_its_directory() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/alpine", "3.20", &[20_000, 30_000]);
    let dir = tempfile::tempdir().unwrap();
    let config = common::test_config(&up.url, dir.path());
    let m = TestMirror::launch(config, dir, |s| {
        s.housekeeping_interval(std::time::Duration::from_millis(50))
    })
    .await;
    m.get("/v2/library/alpine/manifests/3.20")
        .header("accept", OCI_ACCEPT)
        .send()
        .await
        .unwrap();
    for l in &layers {
        let path = format!("/v2/library/alpine/blobs/{l}");
        m.get(&path).send().await.unwrap().bytes().await.unwrap();
        common::wait_committed(&m, &path).await;
    }
    let t = m.metrics().await;
    assert!(metric(&t, "pullthrough_cache_size_bytes") > 50_000.0);
    assert!(metric(&t, "pullthrough_cache_entries") >= 3.0);

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .args(["cache", "prune", "--to", "0", "--storage-dir"])
        .arg(m.storage())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    common::eventually("the gauges follow the prune", SETTLE, || async {
        let t = m.metrics().await;
        metric(&t, "pullthrough_cache_size_bytes") == 0.0
            && metric(&t, "pullthrough_cache_entries") == 0.0
    })
    .await;
    let path = format!("/v2/library/alpine/blobs/{}", layers[0]);
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(common::x_cache(&r), "MISS");
    assert_eq!(r.bytes().await.unwrap().len(), 20_000);
}

/// The status page is served at `/` and `/_pullthrough/ui`, self-contained, under the same
/// access control; the status JSON it polls carries the downloads in flight with their
/// progress, the last hour's samples, the busiest repositories, upstream errors with their
/// cause, the budget's refill time and the cache size against its bound.
#[tokio::test]
async fn status_page_and_the_json_it_polls_show_downloads_history_repositories_and_errors() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/alpine", "3.20", &[200_000]);
    up.behave(|b| b.hold_blob_after = Some(70_000));
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&up.url, dir.path());
    config.storage.max_size = Some(bytesize::ByteSize::mib(64));
    let m = TestMirror::launch(config, dir, |s| {
        s.sample_interval(std::time::Duration::from_millis(50))
    })
    .await;
    for path in ["/", "/_pullthrough/ui"] {
        let r = m.get(path).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let html = r.text().await.unwrap();
        assert!(html.contains("/_pullthrough/status"));
        assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    }
    m.get("/v2/library/alpine/manifests/3.20")
        .header("accept", OCI_ACCEPT)
        .send()
        .await
        .unwrap();
    // A blob held by the upstream at 70 000 of 200 000 bytes.
    let blob = format!("/v2/library/alpine/blobs/{}", layers[0]);
    let pull = tokio::spawn(m.get(&blob).send());
    let status = || async { m.status().await };
    let download = common::wait_for("the held download", SETTLE, || async {
        let s = status().await;
        let d = s["downloads"].get(0)?.clone();
        (d["written"] == 70_000).then_some(d)
    })
    .await;
    assert_eq!(download["digest"], layers[0].as_str());
    assert_eq!(download["size"], 200_000);
    up.state.release.notify_one();
    pull.await.unwrap().unwrap().bytes().await.unwrap();
    common::wait_committed(&m, &blob).await;

    // An upstream failure, with its cause.
    up.behave(|b| b.manifest_fault = Some(common::upstream::Fault::Status(503)));
    m.get("/v2/library/busybox/manifests/1")
        .header("accept", OCI_ACCEPT)
        .send()
        .await
        .unwrap();
    let s = common::wait_for("a sample with the blob's bytes", SETTLE, || async {
        let s = status().await;
        let samples = s["history"]["samples"].as_array()?;
        let sum = |k: &str| samples.iter().map(|x| x[k].as_u64().unwrap()).sum::<u64>();
        (sum("bytes_upstream") >= 200_000 && sum("lookups") >= 2).then_some(s)
    })
    .await;
    assert!(s["downloads"].as_array().unwrap().is_empty());
    let top = &s["top_repositories"]["by_requests"][0];
    assert_eq!(top["repository"], "library/alpine");
    assert!(top["requests"].as_u64().unwrap() >= 2);
    assert_eq!(
        s["top_repositories"]["by_bytes"][0]["repository"],
        "library/alpine"
    );
    let e = &s["recent_errors"][0];
    assert_eq!(e["upstream"], "docker.io");
    assert!(e["error"].as_str().unwrap().contains("503"), "{e}");
    assert_eq!(s["cache"]["max_bytes"], 64 * 1024 * 1024);
    assert!(s["cache"]["bytes"].as_u64().unwrap() >= 200_000);
    assert_eq!(s["totals"]["bytes_upstream"], 200_000);
    assert!(s["upstreams"][0].get("refills_in_secs").is_some());
}

#[tokio::test]
async fn status_page_follows_the_access_control() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start_with(&up, |c| c.server.tokens = vec![secret("s3cret")]).await;
    assert_eq!(m.get("/").send().await.unwrap().status(), 401);
    let r = m.get("/").bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
}
