//! Caps on what the mirror asks of one upstream: requests in flight at once
//! (`max_concurrent_requests`) and requests per second (`max_requests_per_second`).

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message
#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::time::{Duration, Instant};

use common::{FakeUpstream, TestMirror};
use pullthrough::config::DOCKER_HUB;

/// The blobs, fetched through the mirror all at once; returns the statuses.
async fn fetch_all(m: &TestMirror, blobs: &[String]) -> Vec<u16> {
    let requests = blobs.iter().map(|d| {
        let r = m.get(&format!("/v2/library/app/blobs/{d}")).send();
        async move {
            let r = r.await.unwrap();
            let status = r.status().as_u16();
            r.bytes().await.unwrap();
            status
        }
    });
    futures_util::future::join_all(requests).await
}

fn blobs(up: &FakeUpstream, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| up.add_blob(common::upstream::pseudo_random(2000, 7000 + i as u64)))
        .collect()
}

#[tokio::test]
async fn concurrent_upstream_requests_never_exceed_the_cap() {
    let up = FakeUpstream::start().await;
    let digests = blobs(&up, 6);
    // Slow answers, so that requests would overlap without the cap.
    up.behave(|b| b.blob_delay = Some(Duration::from_millis(100)));
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams
            .get_mut(DOCKER_HUB)
            .unwrap()
            .max_concurrent_requests = 2;
    })
    .await;
    assert_eq!(fetch_all(&m, &digests).await, [200; 6]);
    assert_eq!(up.blob_gets(), 6);
    assert_eq!(
        up.max_in_flight(),
        2,
        "at most the cap, and the cap was used"
    );
}

// Virtual time: the sleep below ends only once every task of the test (mirror, fake upstream
// and clients alike) is parked with nothing left to do, so the second request has been as far
// as it can go; on loopback that includes reaching the upstream, were it let through.
#[tokio::test(start_paused = true)]
async fn a_streaming_blob_body_holds_its_permit() {
    let up = FakeUpstream::start().await;
    let first = up.add_blob(common::upstream::pseudo_random(200_000, 1));
    let second = up.add_blob(common::upstream::pseudo_random(2000, 2));
    up.behave(|b| b.hold_blob_after = Some(1000));
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams
            .get_mut(DOCKER_HUB)
            .unwrap()
            .max_concurrent_requests = 1;
    })
    .await;
    let held = m
        .get(&format!("/v2/library/app/blobs/{first}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        held.status(),
        200,
        "headers arrive; the body is held upstream"
    );
    let path = format!("{}/v2/library/app/blobs/{second}", m.url);
    let client = m.client.clone();
    let waiting = tokio::spawn(async move { client.get(path).send().await.unwrap().status() });
    // Nothing can be observed of a request that is correctly not sent: wait until the runtime
    // is idle (the paused clock then jumps to the sleep's end), i.e. the second is parked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.blob_gets(),
        1,
        "the second waits while the first body streams"
    );
    up.behave(|b| b.hold_blob_after = None);
    up.state.release.notify_one();
    assert_eq!(held.bytes().await.unwrap().len(), 200_000);
    assert_eq!(waiting.await.unwrap(), 200);
    assert_eq!(up.blob_gets(), 2);
}

#[tokio::test]
async fn requests_over_the_rate_wait_instead_of_failing() {
    let up = FakeUpstream::start().await;
    let digests = blobs(&up, 8);
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams
            .get_mut(DOCKER_HUB)
            .unwrap()
            .max_requests_per_second = 4;
    })
    .await;
    let start = Instant::now();
    assert_eq!(fetch_all(&m, &digests).await, [200; 8]);
    let mut arrivals: Vec<Duration> = up
        .seen()
        .iter()
        .filter(|s| s.path.contains("/blobs/"))
        .map(|s| s.at.duration_since(start))
        .collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 8);
    // A burst of 4, then one every 250 ms: the fifth cannot be sent before 250 ms, nor the
    // eighth before 1 s.
    assert!(
        arrivals[4] >= Duration::from_millis(240),
        "more than the burst of 4 went at once: {arrivals:?}"
    );
    assert!(
        arrivals[7] >= Duration::from_millis(950),
        "sent too fast: {arrivals:?}"
    );
    assert_eq!(up.blob_gets(), 8);
}

#[tokio::test]
async fn a_cap_of_one_still_resumes_a_cut_blob_and_sizes_a_chunked_one() {
    let up = FakeUpstream::start().await;
    let cut = up.add_blob(common::upstream::pseudo_random(300_000, 11));
    let chunked = up.add_blob(common::upstream::pseudo_random(100_000, 12));
    up.behave(|b| b.cut_blob = Some((100_000, 1)));
    let m = TestMirror::start_with(&up, |c| {
        let u = c.upstreams.get_mut(DOCKER_HUB).unwrap();
        u.max_concurrent_requests = 1;
        // A first GET without a Range, so that a chunked answer has no size but a HEAD's.
        u.parallel_parts = 1;
    })
    .await;
    let get = |digest: String| {
        let r = m.get(&format!("/v2/library/app/blobs/{digest}")).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap().len()
        }
    };
    // The resume and the HEAD are asked while the first request's permit would be held.
    let len = tokio::time::timeout(common::SETTLE, get(cut)).await;
    assert_eq!(len.expect("the resume waited on its own permit"), 300_000);
    up.behave(|b| b.chunked_blobs = true);
    let len = tokio::time::timeout(common::SETTLE, get(chunked)).await;
    assert_eq!(len.expect("the HEAD waited on the GET's permit"), 100_000);
    assert_eq!(
        up.blob_heads(),
        1,
        "the chunked blob's size came from a HEAD"
    );
    assert_eq!(up.blob_gets(), 3, "GET, resume, GET");
}
