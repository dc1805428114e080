//! A cache that runs for months: size bound, LRU, restarts, crashes, corruption, full disks.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::path::{Path, PathBuf};

use common::upstream::sha256;
use common::{eventually, x_cache, FakeUpstream, TestMirror, SETTLE};

const MIB: usize = 1024 * 1024;

fn blob_file(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Bytes of committed blobs and manifests on disk.
fn cached_bytes(root: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    walk(&e.path())
                } else {
                    m.len()
                }
            })
            .sum()
    }
    walk(&root.join("blobs")) + walk(&root.join("manifests"))
}

async fn pull(m: &TestMirror, digest: &str) -> String {
    let r = m
        .get(&format!("/v2/library/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    let cache = x_cache(&r);
    assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    cache
}

#[tokio::test]
async fn size_bound_keeps_recently_used_blobs() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[2 * MIB; 15]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(10))
    })
    .await;
    let root = m.storage();
    for b in &blobs[..4] {
        pull(&m, b).await;
    }
    // Use the oldest one again: it becomes the most recently used.
    assert_eq!(pull(&m, &blobs[0]).await, "HIT");
    for b in &blobs[4..] {
        pull(&m, b).await;
        assert!(
            cached_bytes(&root) <= 10 * MIB as u64,
            "over the bound: {}",
            cached_bytes(&root)
        );
        if b == &blobs[5] {
            assert!(
                blob_file(&root, &blobs[0]).exists(),
                "recently used blob was evicted"
            );
            assert!(
                !blob_file(&root, &blobs[1]).exists(),
                "least recently used blob was kept"
            );
        }
    }
    for b in &blobs[10..] {
        assert!(blob_file(&root, b).exists(), "the newest blobs are kept");
    }
    let metrics = m.metrics().await;
    assert!(
        metrics.contains("pullthrough_cache_max_bytes 10485760"),
        "{metrics}"
    );
}

#[tokio::test]
async fn low_watermark_evicts_in_batches() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[MIB; 12]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(10));
        c.storage.low_watermark = Some(bytesize::ByteSize::mib(6));
    })
    .await;
    for b in &blobs[..11] {
        pull(&m, b).await;
    }
    // The 11th MiB crossed 10 MiB: evicted down to 6 MiB in one pass.
    assert_eq!(cached_bytes(&m.storage()), 6 * MIB as u64);
}

#[tokio::test]
async fn blob_larger_than_the_bound_is_served_but_not_kept() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[3 * MIB]);
    let m = TestMirror::start_with(&up, |c| {
        c.storage.max_size = Some(bytesize::ByteSize::mib(2))
    })
    .await;
    assert_eq!(pull(&m, &blobs[0]).await, "MISS");
    assert!(!blob_file(&m.storage(), &blobs[0]).exists());
}

#[tokio::test]
async fn restart_serves_everything_cached_without_upstream_requests_and_keeps_lru_order() {
    let up = FakeUpstream::start().await;
    let (digest, blobs) = up.add_image("library/app", "v1", &[2 * MIB; 5]);
    // Four 2 MiB blobs and a manifest fit; a fifth blob does not.
    let limit = |c: &mut pullthrough::Config| c.storage.max_size = Some(bytesize::ByteSize::mib(9));
    let m = TestMirror::start_with(&up, limit).await;
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    for b in &blobs[..4] {
        pull(&m, b).await;
    }
    pull(&m, &blobs[0]).await;
    let dir = m.stop().await;

    let before = up.total();
    let m = TestMirror::start_in(&up, dir, limit).await;
    let r = m.get("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(x_cache(&r), "HIT");
    let r = m
        .get(&format!("/v2/library/app/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    for b in &blobs[..4] {
        assert_eq!(pull(&m, b).await, "HIT");
    }
    assert_eq!(
        up.total(),
        before,
        "a restarted mirror needs no upstream request"
    );

    // Access order after the restart: blobs[3] was used last, blobs[0]..[2] before it.
    // Make blobs[1] the oldest again by using the others, then overflow by one blob.
    for b in [&blobs[0], &blobs[2], &blobs[3]] {
        pull(&m, b).await;
    }
    let dir = m.stop().await;
    let m = TestMirror::start_in(&up, dir, limit).await;
    pull(&m, &blobs[4]).await;
    let root = m.storage();
    assert!(
        !blob_file(&root, &blobs[1]).exists(),
        "LRU order lost across the restart"
    );
    for b in [&blobs[0], &blobs[2], &blobs[3], &blobs[4]] {
        assert!(blob_file(&root, b).exists());
    }
}

#[tokio::test]
async fn truncated_blob_is_not_served_but_refetched() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[MIB]);
    let m = TestMirror::start(&up).await;
    pull(&m, &blobs[0]).await;
    // A hit leaves the file open in the descriptor cache: truncation must be seen there too.
    assert_eq!(pull(&m, &blobs[0]).await, "HIT");
    let file = blob_file(&m.storage(), &blobs[0]);
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(1000).unwrap();
    assert_eq!(pull(&m, &blobs[0]).await, "MISS");
    assert_eq!(up.blob_gets(), 2);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), MIB as u64);
}

#[tokio::test]
async fn altered_blob_found_after_restart_is_never_served_as_complete() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[MIB]);
    let m = TestMirror::start(&up).await;
    pull(&m, &blobs[0]).await;
    let file = blob_file(&m.storage(), &blobs[0]);
    let dir = m.stop().await;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[MIB / 2] ^= 0x55;
    std::fs::write(&file, bytes).unwrap();

    let m = TestMirror::start_in(&up, dir, |_| {}).await;
    let r = m
        .get(&format!("/v2/library/app/blobs/{}", blobs[0]))
        .send()
        .await
        .unwrap();
    assert!(
        r.bytes().await.is_err(),
        "corrupt bytes were passed on as a complete blob"
    );
    eventually("the corrupt file is removed", SETTLE, || async {
        !file.exists()
    })
    .await;
    assert_eq!(pull(&m, &blobs[0]).await, "MISS");
    assert_eq!(pull(&m, &blobs[0]).await, "HIT");
}

/// After a restart, readers of a blob not yet hashed by this process share one background
/// verification: a sound blob reaches all of them (and is then trusted), an altered one
/// reaches none of them as complete, ranges included.
#[tokio::test]
async fn concurrent_first_reads_after_restart_share_one_verdict() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[3 * MIB, 3 * MIB + 5]);
    let m = TestMirror::start(&up).await;
    pull(&m, &blobs[0]).await;
    pull(&m, &blobs[1]).await;
    let altered = blob_file(&m.storage(), &blobs[1]);
    let dir = m.stop().await;
    let original = std::fs::read(&altered).unwrap();
    let mut bytes = original.clone();
    bytes[MIB] ^= 0x01;
    std::fs::write(&altered, bytes).unwrap();

    let m = TestMirror::start_in(&up, dir, |_| {}).await;
    let get = |digest: &str, range: Option<&str>| {
        let mut req = m.get(&format!("/v2/library/app/blobs/{digest}"));
        if let Some(range) = range {
            req = req.header("range", range);
        }
        async move { req.send().await.unwrap().bytes().await }
    };
    let sound = futures_util::future::join_all((0..8).map(|_| get(&blobs[0], None))).await;
    for body in sound {
        assert_eq!(sha256(&body.unwrap()), blobs[0]);
    }
    let (whole, early_range, late_range) = tokio::join!(
        get(&blobs[1], None),
        get(&blobs[1], Some("bytes=0-99")),
        get(&blobs[1], Some("bytes=2097152-")),
    );
    // A request that arrives after the verdict is a fresh miss and gets the upstream's bytes
    // (how many do depends on scheduling); what no answer may do is complete with the altered
    // ones.
    let mut refetched = false;
    for (answer, expected) in [
        (whole, &original[..]),
        (early_range, &original[..100]),
        (late_range, &original[2 * MIB..]),
    ] {
        if let Ok(body) = answer {
            assert!(
                body == expected,
                "an altered blob was passed on as complete"
            );
            refetched = true;
        }
    }
    eventually("the altered file is removed", SETTLE, || async {
        std::fs::read(&altered).map_or(true, |now| now == original)
    })
    .await;
    assert!(m
        .metrics()
        .await
        .contains("pullthrough_digest_mismatches_total 1"));
    assert_eq!(pull(&m, &blobs[0]).await, "HIT");
    let second = pull(&m, &blobs[1]).await;
    assert!(second == "MISS" || refetched, "x-cache: {second}");
}

#[tokio::test]
async fn killed_mid_download_restarts_without_temp_files_and_refetches() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[4 * MIB]);
    up.behave(|b| b.hold_blob_after = Some(MIB as u64));
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = common::start_daemon([
        "--upstream".as_ref(),
        up.url.as_ref(),
        "--storage-dir".as_ref(),
        dir.path().as_os_str(),
    ])
    .await;
    let url = format!("http://{}/v2/library/app/blobs/{}", daemon.addr, blobs[0]);
    let resp = reqwest::get(&url).await.unwrap();
    let mut body = resp.bytes_stream();
    futures_util::StreamExt::next(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        1
    );
    daemon.child.kill().await.unwrap();
    drop(body);
    up.behave(|b| b.hold_blob_after = None);
    up.state.release.notify_one();

    let m = TestMirror::start_in(&up, dir, |_| {}).await;
    // The first answer means the store is open (and cleaned).
    assert_eq!(m.get("/healthz").send().await.unwrap().status(), 200);
    assert_eq!(
        std::fs::read_dir(m.storage().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(pull(&m, &blobs[0]).await, "MISS");
    assert_eq!(pull(&m, &blobs[0]).await, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_under_concurrent_readers_never_serves_wrong_bytes() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[MIB; 16]);
    let m = std::sync::Arc::new(
        TestMirror::start_with(&up, |c| {
            c.storage.max_size = Some(bytesize::ByteSize::mib(4))
        })
        .await,
    );
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (m, blobs) = (m.clone(), blobs.clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..4 {
                let b = &blobs[(i * 7 + j * 3) % blobs.len()];
                pull(&m, b).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(cached_bytes(&m.storage()) <= 4 * MIB as u64);
}

#[tokio::test]
async fn operator_commands_report_verify_repair_and_prune() {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[MIB; 3]);
    let m = TestMirror::start(&up).await;
    for b in &blobs {
        pull(&m, b).await;
    }
    let root = m.storage();
    let stats = pullthrough::admin::stats(&root).unwrap();
    assert!(stats.contains("entries: 3"), "{stats}");
    let (report, ok) = pullthrough::admin::verify(&root, false).unwrap();
    assert!(ok, "{report}");
    let file = blob_file(&root, &blobs[1]);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let (report, ok) = pullthrough::admin::verify(&root, false).unwrap();
    assert!(!ok && report.contains(&blobs[1]), "{report}");
    let (_, ok) = pullthrough::admin::verify(&root, true).unwrap();
    assert!(ok);
    assert!(!file.exists());
    assert_eq!(
        pull(&m, &blobs[1]).await,
        "MISS",
        "the running mirror refetches a removed blob"
    );

    pullthrough::admin::prune(&root, MIB as u64, Vec::new()).unwrap();
    assert!(cached_bytes(&root) <= MIB as u64);
}

/// A storage dir on a 16 MiB tmpfs (needs root to mount; skipped with a message otherwise).
#[tokio::test]
async fn full_disk_streams_uncached_and_caching_resumes() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED full_disk_streams_uncached_and_caching_resumes: cannot mount a tmpfs (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.path().to_owned());
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", &[24 * MIB, 100_000]);
    let storage = mnt.path().join("data");
    let m = TestMirror::start_with(&up, |c| c.storage.dir = storage.clone()).await;
    assert_eq!(pull(&m, &blobs[0]).await, "MISS");
    assert_eq!(
        pull(&m, &blobs[0]).await,
        "MISS",
        "too big for the disk: never cached"
    );
    assert_eq!(pull(&m, &blobs[1]).await, "MISS");
    assert_eq!(
        pull(&m, &blobs[1]).await,
        "HIT",
        "what fits is still cached"
    );
    assert!(m
        .metrics()
        .await
        .contains("pullthrough_storage_full_total 2"));
}
