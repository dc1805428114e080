//! Blobs: miss, hit, HEAD without download, ranges, verification, redirects.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::upstream::{sha256, Fault};
use common::{error_code, metric, x_cache, FakeUpstream, TestMirror, PAST_TTL};

#[tokio::test]
async fn blob_miss_is_streamed_and_cached_then_hit() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[3 * 1024 * 1024 + 17]);
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m.get(&path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(r.headers()["docker-content-digest"], layers[0].as_str());
    assert_eq!(
        r.headers()["content-length"],
        (3 * 1024 * 1024 + 17).to_string().as_str()
    );
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
    assert_eq!(up.blob_gets(), 1);

    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
    assert_eq!(up.blob_gets(), 1, "a hit costs no upstream request");
}

#[tokio::test]
async fn head_of_uncached_blob_does_not_download_it() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[4096]);
    let m = TestMirror::start(&up).await;
    let r = m
        .head(&format!("/v2/library/app/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "4096");
    assert_eq!(r.headers()["docker-content-digest"], layers[0].as_str());
    assert_eq!(up.blob_gets(), 0);
    assert_eq!(up.blob_heads(), 1);
}

#[tokio::test]
async fn ranges_are_206_on_a_miss_and_a_hit_and_416_past_the_end() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[1000]);
    let blob = up.state.content.lock().unwrap().blobs[&layers[0]].clone();
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    // On a miss: the range is served from the download in progress.
    let r = m
        .get(&path)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/1000");
    assert_eq!(r.bytes().await.unwrap(), blob.slice(100..200));
    common::wait_committed(&m, &path).await;

    // On a hit.
    let r = m
        .get(&path)
        .header("range", "bytes=900-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.headers()["content-range"], "bytes 900-999/1000");
    assert_eq!(r.bytes().await.unwrap(), blob.slice(900..));

    let r = m
        .get(&path)
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */1000");
    // The download, and the miss's range asked of the upstream at once beside it.
    assert_eq!(up.blob_gets(), 2);
}

#[tokio::test]
async fn a_range_under_an_if_range_that_does_not_match_gets_the_whole_blob() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[1000]);
    let blob = up.state.content.lock().unwrap().blobs[&layers[0]].clone();
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    let etag = format!("\"{}\"", layers[0]);
    let get = |if_range: String| {
        m.get(&path)
            .header("range", "bytes=100-199")
            .header("if-range", if_range)
            .send()
    };
    // A resuming client whose partial copy is this blob gets the range.
    let r = get(etag.clone()).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), blob.slice(100..200));
    // Any other validator: its partial copy is of something else, so the whole blob.
    for other in [
        "\"sha256:0000\"".to_string(),
        format!("W/{etag}"),
        "Wed, 21 Oct 2015 07:28:00 GMT".to_string(),
    ] {
        let r = get(other.clone()).await.unwrap();
        assert_eq!(r.status(), 200, "{other}");
        assert!(!r.headers().contains_key("content-range"), "{other}");
        assert_eq!(r.bytes().await.unwrap(), blob, "{other}");
    }
}

#[tokio::test]
async fn wrong_digest_is_never_cached_and_the_connection_is_cut() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[256 * 1024]);
    up.behave(|b| b.corrupt_blobs = true);
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m.get(&path).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "headers go out before the body is verified"
    );
    assert!(
        r.bytes().await.is_err(),
        "the client must see a cut, not a complete body"
    );

    up.behave(|b| b.corrupt_blobs = false);
    // Past the back-off of a digest whose upstream content did not match it.
    m.advance(PAST_TTL);
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS", "nothing was committed");
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
    assert_eq!(up.blob_gets(), 2);
    assert!(m
        .metrics()
        .await
        .contains("pullthrough_digest_mismatches_total 1"));
}

/// Clients retrying a blob whose upstream content does not match its digest do not make the
/// mirror download it again each time: within the back-off they get a 502 at once, without an
/// upstream request; after it, the upstream is asked again.
#[tokio::test]
async fn retries_of_a_corrupt_blob_are_answered_502_without_refetching_it() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[256 * 1024]);
    up.behave(|b| b.corrupt_blobs = true);
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m.get(&path).send().await.unwrap();
    assert!(r.bytes().await.is_err(), "the first client sees a cut");
    for attempt in 2..=5 {
        let r = m.get(&path).send().await.unwrap();
        assert_eq!(r.status(), 502, "attempt {attempt}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "UNKNOWN", "attempt {attempt}");
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains(&layers[0]) && message.contains("not fetched again for"),
            "{message}"
        );
    }
    assert_eq!(up.blob_gets(), 1, "5 requests, 1 upstream download");
    let metrics = m.metrics().await;
    assert_eq!(metric(&metrics, "pullthrough_digest_mismatches_total"), 1.0);
    assert_eq!(
        metric(&metrics, "pullthrough_digest_mismatch_refusals_total"),
        4.0
    );

    m.advance(PAST_TTL);
    let r = m.get(&path).send().await.unwrap();
    assert!(r.bytes().await.is_err(), "asked again, still corrupt");
    assert_eq!(up.blob_gets(), 2, "the back-off is over");
}

#[tokio::test]
async fn blob_redirects_reach_the_cdn_without_the_token() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[70_000]);
    up.behave(|b| {
        b.require_token = true;
        b.redirect_blobs = true;
    });
    let m = TestMirror::start(&up).await;
    let r = m
        .get(&format!("/v2/library/app/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
    assert_eq!(up.cdn_gets(), 1);
    for s in up.seen().iter().filter(|s| s.host == "cdn") {
        assert!(
            !s.headers.contains_key("authorization"),
            "token leaked to the CDN"
        );
    }
}

#[tokio::test]
async fn missing_blob_is_blob_unknown_and_a_rate_limited_one_keeps_retry_after() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let r = m
        .get(&format!("/v2/library/app/blobs/sha256:{}", "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");

    up.add_image("library/app", "v1", &[10]);
    up.behave(|b| {
        b.blob_fault = Some(Fault::TooManyRequests {
            retry_after: Some(9),
        })
    });
    let (_, layers) = up.add_image("library/app", "v2", &[10]);
    let r = m
        .get(&format!("/v2/library/app/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "9");
}

/// Cached blobs on plain HTTP/1.1 go out with sendfile; HTTP/2 copies. Both must carry exactly
/// the file's bytes, for whole blobs and for ranges that cross the zero-copy chunk size.
#[tokio::test]
async fn cached_blob_bytes_are_exact_over_http1_keep_alive_and_h2c() {
    let up = FakeUpstream::start().await;
    let size = 3 * 1024 * 1024 + 17;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    let blob = up.state.content.lock().unwrap().blobs[&layers[0]].clone();
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    assert_eq!(
        sha256(&m.get(&path).send().await.unwrap().bytes().await.unwrap()),
        layers[0]
    );
    common::wait_committed(&m, &path).await;

    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (client, version) in [
        (&m.client, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ] {
        // Several requests on one connection: zero-copy ranges must stay in step.
        for _ in 0..2 {
            let r = client.get(format!("{}{path}", m.url)).send().await.unwrap();
            assert_eq!(r.version(), version);
            assert_eq!(x_cache(&r), "HIT");
            assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
            let r = client
                .get(format!("{}{path}", m.url))
                .header("range", "bytes=1048000-2097999")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
            assert!(r.bytes().await.unwrap() == blob.slice(1048000..2098000));
        }
    }
    assert_eq!(up.blob_gets(), 1);
}
