//! One upstream fetch per blob or tag, however many clients ask at once.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message
#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::upstream::sha256;
use common::{x_cache, FakeUpstream, TestMirror, PAST_TTL, SETTLE};
use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_fetch_upstream_once() {
    const CLIENTS: usize = 32;
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[4 * 1024 * 1024]);
    // The upstream holds the body back after its first MiB until the test releases it, so
    // every client asks while the one download is in progress, however slow the machine.
    up.behave(|b| b.hold_blob_after = Some(1024 * 1024));
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let (answered, mut heads) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let req = m.get(&path);
        let barrier = barrier.clone();
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = req.send().await.unwrap();
            let cache = x_cache(&r);
            answered.send(()).unwrap();
            (cache, r.bytes().await.unwrap())
        }));
    }
    for i in 0..CLIENTS {
        tokio::time::timeout(SETTLE, heads.recv())
            .await
            .unwrap_or_else(|_| panic!("{i} of {CLIENTS} clients answered while the body is held"))
            .unwrap();
    }
    assert_eq!(
        up.blob_gets(),
        1,
        "{CLIENTS} clients answered during one download, from one upstream GET"
    );
    up.behave(|b| b.hold_blob_after = None);
    up.state.release.notify_one();
    let mut misses = 0;
    for t in tasks {
        let (cache, body) = t.await.unwrap();
        assert_eq!(sha256(&body), layers[0]);
        assert!(matches!(cache.as_str(), "MISS" | "COALESCED"), "{cache}");
        misses += usize::from(cache == "MISS");
    }
    assert_eq!(misses, 1);
    assert_eq!(up.blob_gets(), 1, "{CLIENTS} clients, one upstream GET");
    assert_eq!(
        up.blob_heads(),
        0,
        "the download's answer confirms the repository for all 32: none waits for a HEAD"
    );
    let metrics = m.metrics().await;
    assert!(
        metrics.contains("pullthrough_cache_total{kind=\"blob\",outcome=\"coalesced\",upstream=\"docker.io\"} 31"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_receives_bytes_before_the_upstream_finishes() {
    let up = FakeUpstream::start().await;
    let size = 2 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    up.behave(|b| b.hold_blob_after = Some(size as u64 / 2));
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let leader = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&leader), "MISS");
    let mut leader_body = leader.bytes_stream();
    let first = leader_body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    let follower = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&follower), "COALESCED");
    assert_eq!(
        follower.headers()["content-length"],
        size.to_string().as_str()
    );
    let mut follower_body = follower.bytes_stream();
    let got = tokio::time::timeout(Duration::from_secs(5), follower_body.next())
        .await
        .expect("the follower got no bytes while the upstream held back the second half")
        .unwrap()
        .unwrap();
    assert!(!got.is_empty());

    // Now let the upstream finish; both clients get the whole blob.
    up.state.release.notify_one();
    let mut all = got.to_vec();
    while let Some(c) = follower_body.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    assert_eq!(sha256(&all), layers[0]);
    let mut all = first.to_vec();
    while let Some(c) = leader_body.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    assert_eq!(sha256(&all), layers[0]);
    assert_eq!(up.blob_gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_client_disconnecting_does_not_cancel_the_download() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[4 * 1024 * 1024]);
    up.behave(|b| b.hold_blob_after = Some(2 * 1024 * 1024));
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m.get(&path).send().await.unwrap();
    let mut body = r.bytes_stream();
    let mut got = 0;
    while got < 1024 * 1024 {
        got += body.next().await.unwrap().unwrap().len();
    }
    drop(body);
    up.state.release.notify_one();

    common::wait_committed(&m, &path).await;
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
    assert_eq!(up.blob_gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_cut_is_resumed_with_a_range_request() {
    let up = FakeUpstream::start().await;
    let size = 4 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    let cut_at = (size as u64) * 4 / 10;
    up.behave(|b| {
        b.cut_blob = Some((cut_at, 1));
        b.redirect_blobs = true;
    });
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let req = m.get(&path);
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().bytes().await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(sha256(&t.await.unwrap()), layers[0]);
    }
    assert_eq!(up.blob_gets(), 2, "one GET plus one resume");
    let ranges: Vec<String> = up
        .seen()
        .iter()
        .filter(|s| s.host == "registry" && s.path.contains("/blobs/"))
        .filter_map(|s| {
            s.headers
                .get("range")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        // The first GET asks `bytes=0-`: a 206 tells the download it may fetch in parts.
        .filter(|r| r != "bytes=0-")
        .collect();
    assert_eq!(ranges.len(), 1);
    let offset: u64 = ranges[0]
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(offset > 0 && offset <= cut_at, "resumed from {offset}");
    assert!(m
        .metrics()
        .await
        .contains("pullthrough_upstream_resumes_total 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cuts_beyond_the_resume_budget_fail_every_waiter_and_commit_nothing() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[1024 * 1024]);
    up.behave(|b| b.cut_blob = Some((100_000, 100)));
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().resume_attempts = 2;
    })
    .await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    let r = m.get(&path).send().await.unwrap();
    assert!(r.bytes().await.is_err());
    assert_eq!(up.blob_gets(), 3);
    up.behave(|b| b.cut_blob = None);
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_digest_fails_every_waiter_and_the_next_request_refetches() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[2 * 1024 * 1024]);
    up.behave(|b| {
        b.corrupt_blobs = true;
        b.blob_delay = Some(Duration::from_millis(200));
    });
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let req = m.get(&path);
        tasks.push(tokio::spawn(async move {
            match req.send().await {
                Ok(r) => r.bytes().await.is_err(),
                Err(_) => true,
            }
        }));
    }
    for t in tasks {
        assert!(
            t.await.unwrap(),
            "a waiter received a corrupt blob as complete"
        );
    }
    assert_eq!(up.blob_gets(), 1);
    up.behave(|b| {
        b.corrupt_blobs = false;
        b.blob_delay = None;
    });
    // Past the back-off of a digest whose upstream content did not match it.
    m.advance(PAST_TTL);
    let r = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
    assert_eq!(up.blob_gets(), 2);
    let tmp = std::fs::read_dir(m.storage().join("tmp")).unwrap().count();
    assert_eq!(tmp, 0, "no temp file left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_one_tag_cost_one_upstream_request() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    up.behave(|b| b.blob_delay = Some(Duration::from_millis(0)));
    let m = TestMirror::start(&up).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let req = m.get("/v2/library/app/manifests/v1");
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            req.send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up.manifest_gets() + up.manifest_heads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_one_manifest_digest_cost_one_get() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/manifests/{digest}");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let req = m.get(&path);
        tasks.push(tokio::spawn(
            async move { req.send().await.unwrap().status() },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up.manifest_gets(), 1);
}
