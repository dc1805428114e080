//! What ops rely on: metrics, health, TLS, access control, graceful shutdown.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::upstream::sha256;
use common::{error_code, metric, x_cache, FakeUpstream, TestMirror};
use futures_util::StreamExt;
use pullthrough::config::Secret;

#[tokio::test]
async fn metrics_count_misses_hits_requests_and_bytes_as_pulls_happen() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[100_000, 50_000]);
    let m = TestMirror::start(&up).await;
    for _ in 0..2 {
        m.get("/v2/library/app/manifests/v1")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        for b in &blobs {
            let path = format!("/v2/library/app/blobs/{b}");
            m.get(&path).send().await.unwrap().bytes().await.unwrap();
            common::wait_committed(&m, &path).await;
        }
    }
    let t = m.metrics().await;
    assert_eq!(
        metric(
            &t,
            r#"pullthrough_cache_total{kind="blob",outcome="miss",upstream="docker.io"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &t,
            r#"pullthrough_cache_total{kind="manifest",outcome="miss",upstream="docker.io"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &t,
            r#"pullthrough_cache_total{kind="manifest",outcome="hit",upstream="docker.io"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &t,
            r#"pullthrough_upstream_requests_total{kind="blob_get",status="2xx",upstream="docker.io"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &t,
            r#"pullthrough_upstream_pulls_total{upstream="docker.io"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&t, r#"pullthrough_served_bytes_total{source="upstream"}"#),
        150_000.0
    );
    assert_eq!(
        metric(
            &t,
            r#"pullthrough_upstream_bytes_total{upstream="docker.io"}"#
        ),
        150_000.0
    );
    assert!(metric(&t, r#"pullthrough_served_bytes_total{source="cache"}"#) >= 150_000.0);
    assert_eq!(metric(&t, "pullthrough_cache_entries"), 3.0);
    assert!(metric(&t, "pullthrough_cache_size_bytes") > 150_000.0);
    assert_eq!(
        metric(&t, r#"pullthrough_upstream_up{upstream="docker.io"}"#),
        1.0
    );
    assert_eq!(metric(&t, "pullthrough_inflight_downloads"), 0.0);
    assert!(
        metric(
            &t,
            r#"pullthrough_requests_total{kind="blob",method="GET",status="2xx",code="200"}"#
        ) >= 4.0
    );
    assert!(t.contains("pullthrough_miss_first_byte_seconds_bucket"));
    assert!(t.contains("pullthrough_request_duration_seconds_bucket{le="));
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener() {
    let up = FakeUpstream::start().await;
    // The listener for `metrics.listen`, bound here and handed over, so the port stays ours.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&up.url, dir.path());
    config.metrics.listen = Some(([127, 0, 0, 1], port).into());
    let m = TestMirror::launch(config, dir, |s| s.metrics_listener(listener)).await;
    assert_eq!(m.get("/v2/").send().await.unwrap().status(), 200);
    assert_eq!(m.get("/metrics").send().await.unwrap().status(), 404);
    let r = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("pullthrough_requests_total"));
    let r = reqwest::get(format!("http://127.0.0.1:{port}/v2/"))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "the metrics listener serves no registry API"
    );
}

#[tokio::test]
async fn readyz_fails_when_storage_is_not_writable() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    assert_eq!(m.get("/readyz").send().await.unwrap().status(), 200);
    assert_eq!(m.get("/healthz").send().await.unwrap().status(), 200);
    // Tests run as root, which ignores permission bits: replace the temp dir with a file.
    let tmp = m.storage().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    assert_eq!(m.get("/readyz").send().await.unwrap().status(), 503);
    assert_eq!(m.get("/healthz").send().await.unwrap().status(), 200);
}

fn write_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let pem = cert.cert.pem();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, &pem).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    (c, k, pem)
}

/// A mirror serving HTTPS with a fresh self-signed certificate written under `dir`: the mirror,
/// the certificate and key files, and the certificate's PEM for clients.
async fn start_tls_mirror(
    up: &FakeUpstream,
    dir: &std::path::Path,
) -> (TestMirror, std::path::PathBuf, std::path::PathBuf, String) {
    let (cert, key, pem) = write_cert(dir);
    let m = TestMirror::start_with(up, |c| {
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
    })
    .await;
    (m, cert, key, pem)
}

/// Over TLS, HTTP/2 responses of many streams share records (`server::batched_writes`) and
/// HTTP/1.1 file bodies are copied in place: every body must still be exact, whatever mix of
/// small and large answers one connection carries at once.
#[tokio::test]
async fn https_bodies_are_exact_over_multiplexed_h2_and_http1() {
    let up = FakeUpstream::start().await;
    let (manifest, blobs) = up.add_image("library/app", "v1", &[300, 40_000, 3 * 1024 * 1024 + 11]);
    let certs = tempfile::tempdir().unwrap();
    let (m, _, _, pem) = start_tls_mirror(&up, certs.path()).await;
    let port: u16 = m.url.rsplit(':').next().unwrap().parse().unwrap();
    let client = |http1: bool| {
        let b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .resolve("localhost", ([127, 0, 0, 1], port).into());
        if http1 { b.http1_only() } else { b }.build().unwrap()
    };
    let base = format!("https://localhost:{port}/v2/library/app");
    let accept = "application/vnd.oci.image.manifest.v1+json";
    for (http1, version) in [
        (false, http::Version::HTTP_2),
        (true, http::Version::HTTP_11),
    ] {
        let client = client(http1);
        let mut paths: Vec<(String, String)> = blobs
            .iter()
            .map(|b| (format!("{base}/blobs/{b}"), b.clone()))
            .collect();
        paths.push((format!("{base}/manifests/{manifest}"), manifest.clone()));
        paths.push((format!("{base}/manifests/v1"), manifest.clone()));
        // Cold first, then warm: four rounds of every path at once.
        for _ in 0..4 {
            let answers =
                futures_util::future::join_all(paths.iter().cycle().take(6 * paths.len()).map(
                    |(url, digest)| {
                        let req = client.get(url).header("accept", accept);
                        async move {
                            let r = req.send().await.unwrap();
                            assert_eq!(r.status(), 200, "{url}");
                            (
                                r.version(),
                                sha256(&r.bytes().await.unwrap()),
                                digest.clone(),
                            )
                        }
                    },
                ))
                .await;
            for (got_version, got, want) in answers {
                assert_eq!(got_version, version);
                assert_eq!(got, want);
            }
        }
    }
}

#[tokio::test]
async fn https_speaks_http2_and_http1_by_alpn_and_refuses_plain_http() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[70_000]);
    let certs = tempfile::tempdir().unwrap();
    let (m, cert, key, pem) = start_tls_mirror(&up, certs.path()).await;
    let port = m.url.rsplit(':').next().unwrap().to_owned();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port.parse().unwrap()).into())
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    let r = client
        .get(format!("{base}/v2/library/app/blobs/{}", blobs[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(sha256(&r.bytes().await.unwrap()), blobs[0]);
    let plain = m.get("/v2/").send().await;
    assert!(
        plain.is_err() || plain.unwrap().status() != 200,
        "plain HTTP must not be served"
    );

    drop(m);

    // The same with curl against the binary, configured through a file.
    // Skipped without curl (a failure with PULLTHROUGH_REQUIRE_TOOLS=1, as in CI).
    let Some(curl_bin) =
        common::tools::require_tool("curl", "Debian package curl; .ci/run installs it")
    else {
        return;
    };
    let config = certs.path().join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
             [storage]\ndir = {:?}\n[upstreams.\"docker.io\"]\nurl = \"{}\"\n",
            certs.path().join("data"),
            up.url
        ),
    )
    .unwrap();
    // On a port it picks and logs: it accepts connections once `start_daemon` returns.
    let mut daemon =
        common::start_daemon([std::ffi::OsStr::new("--config"), config.as_ref()]).await;
    let port = daemon.addr.port();
    let curl = |http: &'static str| {
        // tokio's Command: a blocking wait would stall the fake upstream on this runtime.
        tokio::process::Command::new(&curl_bin)
            .args(["-sS", "--max-time", "20", http, "--cacert"])
            .arg(&cert)
            .args([
                "--resolve",
                &format!("localhost:{port}:127.0.0.1"),
                "-w",
                " %{http_version}",
                &format!("https://localhost:{port}/v2/"),
            ])
            .output()
    };
    let out = curl("--http1.1").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{} 1.1");
    let out = curl("--http2").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{} 2");
    daemon.child.kill().await.unwrap();
}

#[tokio::test]
async fn cidr_allow_list_denies_other_addresses() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start_with(&up, |c| {
        c.server.allow = vec!["10.0.0.0/8".parse().unwrap()]
    })
    .await;
    let r = m.get("/v2/").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    assert_eq!(m.get("/healthz").send().await.unwrap().status(), 200);

    let m = TestMirror::start_with(&up, |c| {
        c.server.allow = vec!["127.0.0.1/32".parse().unwrap()]
    })
    .await;
    assert_eq!(m.get("/v2/").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn clients_authenticate_with_htpasswd_basic_auth_or_static_tokens() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(&htpasswd, format!("ci:{hash}\n")).unwrap();
    let m = TestMirror::start_with(&up, |c| {
        c.server.htpasswd = Some(htpasswd.clone());
        c.server.tokens = vec![Secret::new("tok-123")];
    })
    .await;
    let r = m.get("/v2/").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"pullthrough\""
    );
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    let r = m
        .get("/v2/")
        .basic_auth("ci", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for _ in 0..2 {
        let r = m
            .get("/v2/")
            .basic_auth("ci", Some("s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = m
        .get("/v2/")
        .basic_auth("anyone", Some("tok-123"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = m.get("/v2/").bearer_auth("tok-123").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(m.get("/healthz").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_finishes_an_in_flight_blob() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[2 * 1024 * 1024]);
    up.behave(|b| b.hold_blob_after = Some(512 * 1024));
    let m = TestMirror::start(&up).await;
    let r = m
        .get(&format!("/v2/library/app/blobs/{}", blobs[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "MISS");
    // The blob is in flight: its first bytes are here, the rest is held upstream.
    let mut body = r.bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().to_vec();
    let reader = tokio::spawn(async move {
        while let Some(chunk) = body.next().await {
            received.extend_from_slice(&chunk?);
        }
        Ok::<_, reqwest::Error>(received)
    });
    let url = m.url.clone();
    let stopping = tokio::spawn(m.stop());
    common::eventually(
        "no longer accepting after shutdown",
        common::SETTLE,
        || async { reqwest::get(format!("{url}/v2/")).await.is_err() },
    )
    .await;
    assert!(!reader.is_finished(), "the blob was not in flight");
    up.state.release.notify_one();
    let body = reader.await.unwrap().unwrap();
    assert_eq!(sha256(&body), blobs[0]);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
}
