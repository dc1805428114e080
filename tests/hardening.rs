//! Bad days in production: full disks, hanging or flaky upstreams, odd but valid requests.
//! Each test is a defect of the hardening issue, failing before its fix.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message
#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::upstream::{sha256, Fault};
use common::{error_code, secret, x_cache, FakeUpstream, TestMirror, Tmpfs, PAST_TTL, SETTLE, TTL};

const MIB: usize = 1024 * 1024;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn pull(m: &TestMirror, digest: &str) -> String {
    let r = m
        .get(&format!("/v2/library/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cache = x_cache(&r);
    assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    cache
}

#[tokio::test]
async fn a_blob_that_can_never_fit_evicts_nothing() {
    let Some(fs) = Tmpfs::mount("16m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    };
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[100_000, 24 * MIB]);
    let storage = fs.path().join("data");
    let m = TestMirror::start_with(&up, |c| c.storage.dir = storage.clone()).await;
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(pull(&m, &blobs[0]).await, "MISS");
    common::wait_committed(&m, &format!("/v2/library/app/blobs/{}", blobs[0])).await;

    assert_eq!(pull(&m, &blobs[1]).await, "MISS", "streamed, uncached");
    let text = m.metrics().await;
    assert_eq!(metric(&text, "pullthrough_cache_evictions_total"), 0.0);
    assert_eq!(pull(&m, &blobs[0]).await, "HIT", "what was cached stays");
    let gets = up.manifest_gets();
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(up.manifest_gets(), gets, "no pull spent again");
}

/// A mirror whose disk is full (a 4 MiB tmpfs, filled), with a 24 MiB blob upstream: more
/// than the disk and than a relay's window.
async fn full_disk(up: &FakeUpstream, fs: &Tmpfs) -> (TestMirror, Vec<u8>, String) {
    let bytes = common::upstream::pseudo_random(24 * MIB, 24);
    let digest = up.add_blob(bytes.clone());
    let storage = fs.path().join("data");
    let m = TestMirror::start_with(up, |c| c.storage.dir = storage.clone()).await;
    let _ = std::fs::write(fs.path().join("filler"), vec![0u8; 8 * MIB]);
    (m, bytes, digest)
}

#[tokio::test]
async fn concurrent_clients_of_a_blob_the_full_disk_cannot_take_share_one_download() {
    let Some(fs) = Tmpfs::mount("4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    };
    let up = FakeUpstream::start().await;
    let (m, bytes, digest) = full_disk(&up, &fs).await;
    // The upstream holds the body after its first bytes until every client has its answer.
    up.behave(|b| b.hold_blob_after = Some(100_000));
    let path = format!("/v2/library/app/blobs/{digest}");
    let (a, b, c) = tokio::join!(
        m.get(&path).send(),
        m.get(&path).send(),
        m.get(&path).send()
    );
    let rs = [a.unwrap(), b.unwrap(), c.unwrap()];
    assert_eq!(up.blob_gets(), 1, "one upstream download for three clients");
    let mut caches: Vec<String> = rs.iter().map(x_cache).collect();
    caches.sort();
    assert_eq!(caches, ["COALESCED", "COALESCED", "MISS"]);
    up.state.release.notify_one();
    // Read together, as clients do: the relay goes at the pace of the slowest.
    let bodies = futures_util::future::join_all(rs.into_iter().map(|r| {
        assert_eq!(r.status(), 200);
        r.bytes()
    }))
    .await;
    for body in bodies {
        assert_eq!(body.unwrap(), bytes, "the whole blob");
    }
    assert_eq!(up.blob_gets(), 1);
}

#[tokio::test]
async fn a_range_of_a_blob_the_full_disk_cannot_take_is_answered_206() {
    let Some(fs) = Tmpfs::mount("4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    };
    let up = FakeUpstream::start().await;
    let (m, bytes, digest) = full_disk(&up, &fs).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    // Far ahead of any relay (its own ranged GET), then near its start (from the relay).
    for (start, end) in [(20_000_000usize, 20_000_099usize), (1000, 1099)] {
        let r = m
            .get(&path)
            .header("range", format!("bytes={start}-{end}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "bytes={start}-{end}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {start}-{end}/{}", bytes.len()).as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), bytes[start..=end]);
    }
}

#[tokio::test]
async fn a_manifest_on_a_full_disk_is_served_and_costs_one_pull() {
    let Some(fs) = Tmpfs::mount("4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    };
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[1000]);
    let storage = fs.path().join("data");
    let m = TestMirror::start_with(&up, |c| c.storage.dir = storage.clone()).await;
    // Fill the file system to the last byte.
    let filler = fs.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 8 * MIB]);
    for _ in 0..3 {
        let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        let r = m
            .get(&format!("/v2/library/app/manifests/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    }
    assert_eq!(up.manifest_gets(), 1, "one pull, however often it is asked");
    let r = m.get("/readyz").send().await.unwrap();
    assert_eq!(r.status(), 503, "readiness says the cache cannot write");
}

#[tokio::test]
async fn a_hanging_revalidation_is_answered_stale_at_the_stale_deadline_not_the_timeout() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| {
        c.cache.tag_ttl = TTL;
        // Shorter than the 1 s default, to keep the test short; what it shows is the same.
        c.cache.stale_after = Duration::from_millis(200);
        // Far beyond the test: an answer while the upstream hangs can only come from the
        // stale deadline, never from giving up on the upstream.
        c.upstreams.get_mut("docker.io").unwrap().first_byte_timeout = Duration::from_secs(3600);
    })
    .await;
    let path = "/v2/library/app/manifests/v1";
    assert_eq!(m.get(path).send().await.unwrap().status(), 200);
    m.advance(PAST_TTL);
    up.behave(|b| b.hang = true);
    for _ in 0..2 {
        let r = tokio::time::timeout(SETTLE, m.get(path).send())
            .await
            .expect("no stale answer while the revalidation hangs")
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(x_cache(&r), "STALE");
    }
}

#[tokio::test]
async fn a_chunked_upstream_blob_is_cached_with_its_length() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[300_000]);
    up.behave(|b| b.chunked_blobs = true);
    let m = TestMirror::start(&up).await;
    let r = m
        .get(&format!("/v2/library/app/blobs/{}", blobs[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "300000");
    assert_eq!(sha256(&r.bytes().await.unwrap()), blobs[0]);
    common::wait_committed(&m, &format!("/v2/library/app/blobs/{}", blobs[0])).await;
    assert_eq!(up.blob_gets(), 1);
}

#[tokio::test]
async fn a_first_blob_get_cut_before_its_headers_is_retried() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[200_000]);
    up.behave(|b| b.drop_blob_gets = 1);
    let m = TestMirror::start(&up).await;
    assert_eq!(pull(&m, &blobs[0]).await, "MISS");
    up.behave(|b| assert_eq!(b.drop_blob_gets, 0, "the first GET was dropped"));
    assert_eq!(up.blob_gets(), 1, "the retry was answered");
}

#[tokio::test]
async fn unsatisfiable_ranges_are_416_in_the_registry_json() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[1000]);
    let m = TestMirror::start(&up).await;
    pull(&m, &blobs[0]).await;
    common::wait_committed(&m, &format!("/v2/library/app/blobs/{}", blobs[0])).await;
    for range in ["bytes=-0", "bytes=5000-"] {
        let r = m
            .get(&format!("/v2/library/app/blobs/{}", blobs[0]))
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(r.headers()["content-range"], "bytes */1000");
        assert_eq!(error_code(r).await, "RANGE_INVALID");
    }
}

#[tokio::test]
async fn the_authorization_scheme_is_case_insensitive() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start_with(&up, |c| c.server.tokens = vec![secret("tok-123")]).await;
    let r = m.get("/v2/").send().await.unwrap();
    assert_eq!(r.status(), 401);
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = m
            .get("/v2/")
            .header("authorization", format!("{scheme} tok-123"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let basic = base64_basic("ci", "tok-123");
    let r = m
        .get("/v2/")
        .header("authorization", format!("basic {basic}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn base64_basic(user: &str, pass: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for c in raw.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn an_upstream_503_outage_is_503_from_the_first_request() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    up.behave(|b| b.manifest_fault = Some(Fault::Status(503)));
    let m = TestMirror::start(&up).await;
    for _ in 0..4 {
        let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(error_code(r).await, "UNAVAILABLE");
    }
}

#[tokio::test]
async fn a_blob_deleted_behind_the_mirror_is_not_served_from_an_open_descriptor() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[50_000]);
    let m = TestMirror::start(&up).await;
    pull(&m, &blobs[0]).await;
    common::wait_committed(&m, &format!("/v2/library/app/blobs/{}", blobs[0])).await;
    assert_eq!(pull(&m, &blobs[0]).await, "HIT");
    let hex = blobs[0].trim_start_matches("sha256:");
    let file: PathBuf = m.storage().join("blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        pull(&m, &blobs[0]).await,
        "MISS",
        "fetched again, not served unlinked"
    );
}

#[tokio::test]
async fn readiness_follows_free_space_at_once_both_ways_and_says_why() {
    let Some(fs) = Tmpfs::mount("16m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    };
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[1000]);
    let storage = fs.path().join("data");
    let m = TestMirror::start_with(&up, |c| c.storage.dir = storage.clone()).await;
    let r = m.get("/readyz").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Full to the last byte, with no write of the mirror's failing: readiness sees it at once.
    let filler = fs.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 16 * MIB]);
    common::eventually("/readyz is 503 on a full disk", SETTLE, || async {
        let r = m.get("/readyz").send().await.unwrap();
        if r.status() != 503 {
            return false;
        }
        let text = r.text().await.unwrap();
        assert!(
            text.contains(&storage.display().to_string()) && text.contains("0B free of 16.0MiB"),
            "{text}"
        );
        true
    })
    .await;
    // A write that fails for lack of space pauses caching (the manifest is served from
    // memory); space coming back lifts the pause with the next check, not a minute later.
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    std::fs::remove_file(&filler).unwrap();
    common::eventually("/readyz is 200 once space is back", SETTLE, || async {
        m.get("/readyz").send().await.unwrap().status() == 200
    })
    .await;
}
