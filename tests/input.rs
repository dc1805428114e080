//! Bad input gets the right OCI error code, never a file outside the cache.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::{error_code, FakeUpstream, TestMirror};

#[tokio::test]
async fn invalid_names_and_digests_are_400_with_codes() {
    // A reference that fails the tag grammar is a manifest that does not exist: see
    // `tests/oci.rs`.
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
    let cases: Vec<(String, &str)> = vec![
        ("/v2/%2e%2e/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/a/%2e%2e/b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/UPPER/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/a%00b/manifests/latest".into(), "NAME_INVALID"),
        (long, "NAME_INVALID"),
        (
            "/v2/a/blobs/sha256:..%2f..%2fetc%2fpasswd".into(),
            "DIGEST_INVALID",
        ),
        ("/v2/a/blobs/sha256:ABC".into(), "DIGEST_INVALID"),
        ("/v2/a/blobs/latest".into(), "DIGEST_INVALID"),
    ];
    // Sent raw: URL libraries resolve `..` and `%2e%2e` before a request leaves.
    for (path, code) in cases {
        let raw = raw_get(&m.url, &path).await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{path}: {raw}");
        assert!(
            raw.contains(&format!("\"code\":\"{code}\"")),
            "{path}: {raw}"
        );
    }
    let raw = raw_get(&m.url, "/v2/../../etc/passwd/blobs/sha256:abc").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    let raw = raw_get(&m.url, "/v2/a/blobs//etc/passwd").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert_eq!(up.total(), 0, "nothing invalid reaches the upstream");
}

async fn raw_get(base: &str, path: &str) -> String {
    raw_request(
        base,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn raw_request(base: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn an_http_1_1_request_without_one_host_is_400_and_http_1_0_needs_none() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    for request in [
        "GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ] {
        let raw = raw_request(&m.url, request).await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{request:?}: {raw}");
        assert!(raw.contains("\"code\":\"UNSUPPORTED\""), "{raw}");
        assert!(raw.contains("Host"), "the message says why: {raw}");
    }
    let raw = raw_request(&m.url, "GET /v2/ HTTP/1.0\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.0 200"), "{raw}");
    let raw = raw_request(
        &m.url,
        "GET /v2/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

#[tokio::test]
async fn pushes_and_deletes_are_405_unsupported() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let d = format!("sha256:{}", "a".repeat(64));
    let reqs = [
        m.client
            .post(format!("{}/v2/library/app/blobs/uploads/", m.url)),
        m.client
            .put(format!("{}/v2/library/app/manifests/latest", m.url)),
        m.client
            .delete(format!("{}/v2/library/app/blobs/{d}", m.url)),
        m.client
            .patch(format!("{}/v2/library/app/blobs/uploads/abc", m.url)),
    ];
    for req in reqs {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 405);
        assert_eq!(error_code(r).await, "UNSUPPORTED");
    }
}

#[tokio::test]
async fn unknown_paths_are_404_json() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    for path in ["/nope", "/v2/a/nothing", "/v2/a/manifests"] {
        let r = m.get(path).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(!error_code(r).await.is_empty());
    }
}

#[tokio::test]
async fn v2_answers_the_api_version_and_unmirrored_registries_are_name_unknown() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start(&up).await;
    let r = m.get("/v2/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    let r = m
        .get("/v2/library/app/manifests/v1?ns=docker.io")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = m
        .get("/v2/library/app/manifests/v1?ns=ghcr.io")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN");
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("ghcr.io"));
}
