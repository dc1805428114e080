//! Content bound to repositories: a digest cached for one repository is answered under another
//! only after the upstream confirmed it there with a HEAD, and the links outlive restarts.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::{error_code, x_cache, FakeUpstream, TestMirror};

/// `library/alpha:1` pulled through the mirror (manifest and blobs cached for alpha).
async fn alpha_cached() -> (FakeUpstream, TestMirror, String, Vec<String>) {
    let up = FakeUpstream::start().await;
    let (manifest, layers) = up.add_image("library/alpha", "1", &[5000, 7000]);
    let m = TestMirror::start(&up).await;
    let r = m.get("/v2/library/alpha/manifests/1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    for layer in &layers {
        let path = format!("/v2/library/alpha/blobs/{layer}");
        m.get(&path).send().await.unwrap().bytes().await.unwrap();
        common::wait_committed(&m, &path).await;
    }
    (up, m, manifest, layers)
}

#[tokio::test]
async fn cached_blob_is_not_served_under_another_repository_the_upstream_refuses() {
    let (up, m, manifest, layers) = alpha_cached().await;
    up.behave(|b| b.missing_repos = vec!["library/beta".into()]);
    let blob_gets = up.blob_gets();

    let r = m
        .get(&format!("/v2/library/beta/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = m
        .head(&format!("/v2/library/beta/blobs/{}", layers[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = m
        .get(&format!("/v2/library/beta/manifests/{manifest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(up.blob_heads(), 2, "each was asked about with a HEAD");
    assert_eq!(up.manifest_heads(), 1);
    assert_eq!(up.blob_gets(), blob_gets, "and nothing was downloaded");

    // alpha itself is still served from the cache.
    let before = up.total();
    let r = m
        .get(&format!("/v2/library/alpha/blobs/{}", layers[0]))
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "HIT".into()));
    assert_eq!(up.total(), before);
}

#[tokio::test]
async fn cached_blob_under_a_new_repository_costs_one_head_then_is_linked() {
    let (up, m, manifest, layers) = alpha_cached().await;
    let (blob_gets, manifest_gets) = (up.blob_gets(), up.manifest_gets());
    let path = format!("/v2/library/gamma/blobs/{}", layers[0]);
    for _ in 0..3 {
        let r = m.get(&path).send().await.unwrap();
        assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "HIT".into()));
        assert_eq!(r.bytes().await.unwrap().len(), 5000);
    }
    assert_eq!(up.blob_heads(), 1, "confirmed once, then linked");
    let manifest_path = format!("/v2/library/gamma/manifests/{manifest}");
    for _ in 0..2 {
        let r = m.get(&manifest_path).send().await.unwrap();
        assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "HIT".into()));
    }
    assert_eq!(up.manifest_heads(), 1);
    assert_eq!(
        (up.blob_gets(), up.manifest_gets()),
        (blob_gets, manifest_gets),
        "the bytes are stored once and served from the cache"
    );
}

#[tokio::test]
async fn links_survive_a_restart() {
    let (up, m, manifest, layers) = alpha_cached().await;
    let gamma = format!("/v2/library/gamma/blobs/{}", layers[1]);
    assert_eq!(m.get(&gamma).send().await.unwrap().status(), 200);
    let dir = m.stop().await;

    let m = TestMirror::start_in(&up, dir, |_| {}).await;
    let before = up.total();
    let paths = [
        format!("/v2/library/alpha/blobs/{}", layers[0]),
        format!("/v2/library/alpha/manifests/{manifest}"),
        gamma,
    ];
    for path in &paths {
        let r = m.get(path).send().await.unwrap();
        assert_eq!(
            (r.status().as_u16(), x_cache(&r)),
            (200, "HIT".into()),
            "{path}"
        );
    }
    assert_eq!(
        up.total(),
        before,
        "no confirmation needed after the restart"
    );
}

#[tokio::test]
async fn a_cache_from_before_links_confirms_each_repository_once() {
    let (up, m, _, layers) = alpha_cached().await;
    let dir = m.stop().await;
    std::fs::remove_file(dir.path().join("links")).unwrap();

    let m = TestMirror::start_in(&up, dir, |_| {}).await;
    let heads = up.blob_heads();
    let path = format!("/v2/library/alpha/blobs/{}", layers[0]);
    for _ in 0..2 {
        let r = m.get(&path).send().await.unwrap();
        assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "HIT".into()));
    }
    assert_eq!(up.blob_heads(), heads + 1);
    let r = m.get("/v2/library/alpha/manifests/1").send().await.unwrap();
    assert_eq!(
        x_cache(&r),
        "HIT",
        "a tag record links its manifest without asking"
    );
}
