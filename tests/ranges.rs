//! Ranges of blobs the mirror does not hold yet, and downloads in parallel parts: a range is
//! answered as soon as its bytes can be had (from the download, or fetched on its own), while
//! the one full download goes on and is verified before it is committed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::upstream::sha256;
use common::{metric, wait_committed, x_cache, FakeUpstream, TestMirror, SETTLE};

/// Blob GETs that asked for the whole blob (no Range, or from its first byte).
fn full_gets(up: &FakeUpstream, digest: &str) -> usize {
    up.seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with(digest))
        .filter(|s| {
            s.headers
                .get("range")
                .is_none_or(|r| r.to_str().unwrap().starts_with("bytes=0-"))
        })
        .count()
}

/// The `Range` headers of the blob GETs the upstream saw.
fn ranges_seen(up: &FakeUpstream, digest: &str) -> Vec<String> {
    up.seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with(digest))
        .filter_map(|s| s.headers.get("range"))
        .map(|r| r.to_str().unwrap().to_owned())
        .collect()
}

fn blob_of(up: &FakeUpstream, digest: &str) -> bytes::Bytes {
    up.state.content.lock().unwrap().blobs[digest].clone()
}

/// The parts of a `multipart/byteranges` body, as (Content-Range, bytes).
fn multipart(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("a boundary")
        .to_owned();
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut rest = body;
    loop {
        let at = find(rest, delimiter.as_bytes()).expect("a boundary line");
        rest = &rest[at + delimiter.len()..];
        if rest.starts_with(b"--") {
            return parts;
        }
        rest = &rest[2..]; // CRLF
        let headers_end = find(rest, b"\r\n\r\n").unwrap();
        let headers = std::str::from_utf8(&rest[..headers_end]).unwrap();
        let range = headers
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: bytes "))
            .unwrap()
            .to_owned();
        let (span, _) = range.split_once('/').unwrap();
        let (a, b) = span.split_once('-').unwrap();
        let len = (b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap()) + 1;
        rest = &rest[headers_end + 4..];
        parts.push((range, rest[..len].to_vec()));
        rest = &rest[len..];
        assert!(rest.starts_with(b"\r\n"), "a CRLF before the next boundary");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn a_tail_range_of_a_cold_blob_is_answered_before_the_download_reaches_it() {
    let up = FakeUpstream::start().await;
    let size = 4 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    let blob = blob_of(&up, &layers[0]);
    // The full download stops after 64 KiB until the test releases it.
    up.behave(|b| b.hold_first_bytes_after = Some(64 * 1024));
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().parallel_parts = 1;
    })
    .await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = tokio::time::timeout(SETTLE, m.get(&path).header("range", "bytes=-65536").send())
        .await
        .expect("the tail is answered while the download is held at 64 KiB")
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes {}-{}/{size}", size - 65536, size - 1).as_str()
    );
    let got = tokio::time::timeout(SETTLE, r.bytes())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], &blob[size - 65536..]);
    assert_eq!(full_gets(&up, &layers[0]), 1, "the full download goes on");
    // One stream (`parallel_parts = 1`): the full GET asks no range; the tail is its own.
    assert_eq!(ranges_seen(&up, &layers[0]), ["bytes=-65536"]);

    up.behave(|b| b.hold_first_bytes_after = None);
    up.state.release.notify_one();
    wait_committed(&m, &path).await;
    assert_eq!(full_gets(&up, &layers[0]), 1, "one full body");
    let text = m.metrics().await;
    assert_eq!(
        metric(&text, "pullthrough_early_ranges_total{source=\"upstream\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_probe_of_the_first_bytes_does_not_wait_for_the_blob() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[2 * 1024 * 1024]);
    let blob = blob_of(&up, &layers[0]);
    up.behave(|b| b.hold_first_bytes_after = Some(64 * 1024));
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m
        .get(&path)
        .header("range", "bytes=0-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let got = tokio::time::timeout(SETTLE, r.bytes())
        .await
        .expect("the probe's two bytes come while the download is held")
        .unwrap();
    assert_eq!(&got[..], &blob[..2]);
    assert_eq!(up.blob_gets(), 1, "the probe costs no request of its own");
    up.behave(|b| b.hold_first_bytes_after = None);
    up.state.release.notify_one();
    wait_committed(&m, &path).await;
}

#[tokio::test]
async fn several_ranges_are_answered_as_multipart_on_a_cached_blob() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[10_000]);
    let blob = blob_of(&up, &layers[0]);
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    m.get(&path).send().await.unwrap().bytes().await.unwrap();

    let r = m
        .get(&path)
        .header("range", "bytes=9000-9099,0-9,-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(x_cache(&r), "HIT");
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
    let length: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), length);
    let parts = multipart(&ct, &body);
    assert_eq!(
        parts,
        vec![
            ("9000-9099/10000".to_owned(), blob[9000..9100].to_vec()),
            ("0-9/10000".to_owned(), blob[..10].to_vec()),
            ("9995-9999/10000".to_owned(), blob[9995..].to_vec()),
        ]
    );

    // Past the end: 416; too many ranges: 400; only one satisfiable: a plain 206.
    let r = m
        .get(&path)
        .header("range", "bytes=20000-,30000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */10000");
    let many = format!("bytes={}", vec!["1-1"; 101].join(","));
    let r = m.get(&path).header("range", many).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = m
        .get(&path)
        .header("range", "bytes=5-6,20000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 5-6/10000");
    assert_eq!(&r.bytes().await.unwrap()[..], &blob[5..7]);
    assert_eq!(up.blob_gets(), 1);
}

#[tokio::test]
async fn several_ranges_of_a_cold_blob_are_answered_while_the_download_is_held() {
    let up = FakeUpstream::start().await;
    let size = 4 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    let blob = blob_of(&up, &layers[0]);
    up.behave(|b| b.hold_first_bytes_after = Some(64 * 1024));
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m
        .get(&path)
        .header("range", "bytes=3000000-3050000,1000000-1050000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    let body = tokio::time::timeout(SETTLE, r.bytes())
        .await
        .expect("both ranges come while the download is held")
        .unwrap();
    let parts = multipart(&ct, &body);
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].1, &blob[3_000_000..3_050_001]);
    assert_eq!(parts[1].1, &blob[1_000_000..1_050_001]);
    assert_eq!(full_gets(&up, &layers[0]), 1);
    up.behave(|b| b.hold_first_bytes_after = None);
    up.state.release.notify_one();
    wait_committed(&m, &path).await;
    assert_eq!(full_gets(&up, &layers[0]), 1, "one full body");
}

/// A mirror that downloads blobs of 1 MiB or more in four parts.
async fn parallel_mirror(up: &FakeUpstream) -> TestMirror {
    TestMirror::start_with(up, |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.parallel_parts = 4;
        u.parallel_threshold = bytesize::ByteSize::mib(1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_in_parts_resumes_the_part_that_was_cut() {
    let up = FakeUpstream::start().await;
    let size = 4 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    // The third part is cut after 64 KiB, once.
    up.behave(|b| b.cut_range_from = Some(2 * 1024 * 1024));
    let m = parallel_mirror(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m.get(&path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), layers[0]);
    wait_committed(&m, &path).await;
    let mut seen = ranges_seen(&up, &layers[0]);
    seen.sort();
    assert_eq!(seen.len(), 5, "four parts and one resume: {seen:?}");
    assert!(seen.contains(&"bytes=0-".to_owned()), "{seen:?}");
    for part in [
        "bytes=1048576-2097151",
        "bytes=2097152-3145727",
        "bytes=3145728-4194303",
    ] {
        assert!(seen.contains(&part.to_owned()), "{part} in {seen:?}");
    }
    let resume = seen
        .iter()
        .find(|r| r.ends_with("-3145727") && *r != "bytes=2097152-3145727")
        .expect("the cut part resumed from where it got");
    let from: u64 = resume["bytes=".len()..resume.find('-').unwrap()]
        .parse()
        .unwrap();
    assert!(from > 2 * 1024 * 1024, "{resume}");
    let text = m.metrics().await;
    assert_eq!(metric(&text, "pullthrough_upstream_resumes_total"), 1.0);
    assert_eq!(metric(&text, "pullthrough_download_parts_total"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_part_is_never_committed_and_the_clients_of_the_blob_are_cut() {
    let up = FakeUpstream::start().await;
    let size = 4 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    up.behave(|b| b.corrupt_ranges = true);
    let m = parallel_mirror(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let r = m.get(&path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "the client of the whole blob is cut before its last byte"
    );
    let text = m.metrics().await;
    assert_eq!(metric(&text, "pullthrough_digest_mismatches_total"), 1.0);
    let r = m.head(&path).send().await.unwrap();
    assert_ne!(x_cache(&r), "HIT", "nothing was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ranged_and_full_readers_share_one_full_body() {
    let up = FakeUpstream::start().await;
    let size = 4 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    let blob = blob_of(&up, &layers[0]);
    up.behave(|b| b.hold_first_bytes_after = Some(64 * 1024));
    let m = parallel_mirror(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let mut full = Vec::new();
    let mut ranged = Vec::new();
    let asks = [
        None,
        None,
        Some((0, 1)),
        Some((1024 * 1024, 2 * 1024 * 1024 - 1)),
        Some((3 * 1024 * 1024 + 5, 3 * 1024 * 1024 + 50_000)),
        None,
    ];
    for ask in asks {
        let mut req = m.get(&path);
        if let Some((a, b)) = ask {
            req = req.header("range", format!("bytes={a}-{b}"));
        }
        let task = tokio::spawn(async move {
            let r = req.send().await.unwrap();
            (r.status(), r.bytes().await.unwrap())
        });
        match ask {
            None => full.push(task),
            Some(range) => ranged.push((range, task)),
        }
    }
    // While the first part is held at 64 KiB: the probe from its first bytes, a part's span
    // from that part, the range far from every head on its own.
    for ((a, b), task) in ranged {
        let (status, body) = tokio::time::timeout(SETTLE, task)
            .await
            .unwrap_or_else(|_| panic!("{a}-{b} answered while the first part is held"))
            .unwrap();
        assert_eq!(status, 206);
        assert_eq!(&body[..], &blob[a..=b]);
    }
    up.behave(|b| b.hold_first_bytes_after = None);
    up.state.release.notify_one();
    for task in full {
        let (status, body) = tokio::time::timeout(SETTLE, task).await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(sha256(&body), layers[0]);
    }
    wait_committed(&m, &path).await;
    assert_eq!(full_gets(&up, &layers[0]), 1, "one full body for everyone");
    // Besides the four parts, the upstream was asked only for ranges the clients asked for
    // (a small one may be asked at once, before the download's answer says where its parts
    // start; one the download is about to write is then dropped, not read).
    let parts = [
        "bytes=0-",
        "bytes=1048576-2097151",
        "bytes=2097152-3145727",
        "bytes=3145728-4194303",
    ];
    let mut seen = ranges_seen(&up, &layers[0]);
    for p in parts {
        let i = seen
            .iter()
            .position(|s| s == p)
            .unwrap_or_else(|| panic!("{p}"));
        seen.remove(i);
    }
    let asked: Vec<String> = asks
        .iter()
        .flatten()
        .map(|(a, b)| format!("bytes={a}-{b}"))
        .collect();
    assert!(seen.iter().all(|s| asked.contains(s)), "{seen:?}");
}

/// stargz-snapshotter reads a blob lazily: a probe, the footer and table of contents from the
/// end, then chunks of about 50 KB, some several to a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lazy_pull_pattern_is_served_from_a_cold_blob_then_from_the_cache() {
    let up = FakeUpstream::start().await;
    let size: usize = 8 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    let blob = blob_of(&up, &layers[0]);
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let chunk = 50_000;
    let mut singles: Vec<(usize, usize)> = vec![(0, 1), (size - 65536, size - 1)];
    singles.extend((0..20).map(|i| {
        let a = (i * 7919 * 53 + 1_000_000) % (size - chunk);
        (a, a + chunk - 1)
    }));
    for &(a, b) in &singles {
        let r = m
            .get(&path)
            .header("range", format!("bytes={a}-{b}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{a}-{b}");
        assert_eq!(&r.bytes().await.unwrap()[..], &blob[a..=b], "{a}-{b}");
    }
    for pair in [
        [(100_000, 149_999), (5_000_000, 5_049_999)],
        [(7_000_000, 7_049_999), (200_000, 249_999)],
    ] {
        let header = format!(
            "bytes={}-{},{}-{}",
            pair[0].0, pair[0].1, pair[1].0, pair[1].1
        );
        let r = m.get(&path).header("range", header).send().await.unwrap();
        assert_eq!(r.status(), 206);
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        let parts = multipart(&ct, &r.bytes().await.unwrap());
        for (i, (a, b)) in pair.into_iter().enumerate() {
            assert_eq!(parts[i].1, &blob[a..=b]);
        }
    }
    wait_committed(&m, &path).await;
    assert_eq!(full_gets(&up, &layers[0]), 1, "one full download");
    let early = ranges_seen(&up, &layers[0]).len() - 1;
    assert!(
        early <= 2 + 20 + 4,
        "at most one request per range the download had not reached: {early}"
    );

    // Warm: every range from the cache, the upstream untouched.
    let before = up.blob_gets();
    for &(a, b) in &singles {
        let r = m
            .get(&path)
            .header("range", format!("bytes={a}-{b}"))
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&r), "HIT");
        assert_eq!(&r.bytes().await.unwrap()[..], &blob[a..=b]);
    }
    assert_eq!(up.blob_gets(), before);
}
