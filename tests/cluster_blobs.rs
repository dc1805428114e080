//! Replicas sharing one cache, in one process: an in-process coordinator stands in for Redis
//! and an in-memory object store for S3 (the cluster suite, `tests/cluster/run.sh`, runs the
//! same behaviour on Garage and Redis). One upstream fetch per blob for the fleet, streamed to
//! the other replicas from the lease holder while it downloads; the shared tier serving a
//! replica with an empty disk; a dead lease holder taken over; a corrupt shared object never
//! served; each replica alone while the coordinator is down.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fleet::Fleet;
use common::upstream::pseudo_random;
use common::{eventually, metric_sum, x_cache, FakeUpstream, TestMirror, Tmpfs, SETTLE};
use object_store::path::Path;
use object_store::ObjectStore;
use pullthrough::cluster::coordinator::{Claim, Coordinator};

const MIB: usize = 1024 * 1024;

fn blob_path(digest: &str) -> String {
    format!("/v2/library/app/blobs/{digest}")
}

fn object(digest: &str) -> Path {
    Path::from(format!(
        "blobs/sha256/{}",
        digest.trim_start_matches("sha256:")
    ))
}

async fn get_bytes(m: &TestMirror, path: &str) -> Result<Vec<u8>, String> {
    let resp = m.get(path).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    resp.bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string())
}

async fn sum_over(replicas: &[&TestMirror], family: &str, label: &str) -> f64 {
    let mut total = 0.0;
    for r in replicas {
        total += metric_sum(&r.metrics().await, family, label);
    }
    total
}

#[tokio::test]
async fn concurrent_misses_on_three_replicas_fetch_upstream_once() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(4 * MIB, 1);
    let digest = up.add_blob(body.clone());
    up.behave(|b| b.hold_blob_after = Some(MIB as u64));
    let replicas = [
        Arc::new(fleet.replica().await),
        Arc::new(fleet.replica().await),
        Arc::new(fleet.replica().await),
    ];
    let mut clients = Vec::new();
    for r in &replicas {
        for _ in 0..2 {
            let (r, path) = (r.clone(), blob_path(&digest));
            clients.push(tokio::spawn(async move { get_bytes(&r, &path).await }));
        }
    }
    // Everyone is reading while the one upstream body is held half-way: the followers
    // stream from the lease holder, not after it.
    let all: Vec<&TestMirror> = replicas.iter().map(|r| r.as_ref()).collect();
    eventually("six clients are reading", SETTLE, || async {
        all_waiting(&all).await >= 6.0
    })
    .await;
    up.state.release.notify_waiters();
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap(), body);
    }
    assert_eq!(up.blob_gets(), 1, "one upstream body for the fleet");
    assert_eq!(
        up.blob_heads(),
        0,
        "no client's first byte waited for an upstream HEAD: the lease holder shared the link"
    );
    assert_eq!(
        sum_over(&all, "pullthrough_blob_source_total", "source=\"peer\"").await,
        4.0,
        "the four clients of the two other replicas streamed from the lease holder"
    );
}

#[tokio::test]
async fn a_range_of_a_blob_another_replica_is_downloading_comes_before_the_download_ends() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(4 * MIB, 3);
    let digest = up.add_blob(body.clone());
    up.behave(|b| b.hold_first_bytes_after = Some(MIB as u64 / 4));
    // The held download is never resumed while the test runs: only the range can answer.
    let patient = |c: &mut pullthrough::Config| {
        c.upstreams.get_mut("docker.io").unwrap().idle_timeout = Duration::from_secs(120);
    };
    let (a, b) = (
        fleet.replica_with(patient).await,
        fleet.replica_with(patient).await,
    );
    let path = blob_path(&digest);
    // Replica a holds the lease and its download is held a quarter of a MiB in.
    let leader = a.get(&path).send().await.unwrap();
    assert_eq!(leader.status(), 200);
    // Replica b follows a's download; a range far ahead of it is fetched on its own.
    let tail = tokio::time::timeout(SETTLE, b.get(&path).header("range", "bytes=-100000").send())
        .await
        .expect("the range is answered while the fleet's download is held")
        .unwrap();
    assert_eq!(tail.status(), 206);
    let got = tokio::time::timeout(SETTLE, tail.bytes())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], &body[body.len() - 100_000..]);
    up.behave(|b| b.hold_first_bytes_after = None);
    up.state.release.notify_waiters();
    assert_eq!(leader.bytes().await.unwrap().to_vec(), body);
    let full: usize = up
        .seen()
        .iter()
        .filter(|s| s.path.ends_with(&digest))
        .filter(|s| {
            s.headers
                .get("range")
                .is_none_or(|r| r.to_str().unwrap().starts_with("bytes=0-"))
        })
        .count();
    assert_eq!(full, 1, "one full body for the fleet, besides the range");
}

async fn all_waiting(replicas: &[&TestMirror]) -> f64 {
    let mut n = 0.0;
    for r in replicas {
        n += common::metric(&r.metrics().await, "pullthrough_inflight_waiters");
    }
    n
}

#[tokio::test]
async fn a_replica_with_an_empty_disk_is_served_from_the_shared_tier() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(6 * MIB + 7, 2);
    let digest = up.add_blob(body.clone());
    let first = fleet.replica().await;
    assert_eq!(get_bytes(&first, &blob_path(&digest)).await.unwrap(), body);
    fleet.wait_shared("blobs", &digest).await;

    let fresh = fleet.replica().await;
    let resp = fresh.head(&blob_path(&digest)).send().await.unwrap();
    assert_eq!(
        resp.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(get_bytes(&fresh, &blob_path(&digest)).await.unwrap(), body);
    assert_eq!(
        up.blob_gets(),
        1,
        "the second replica did not download it again"
    );
    let metrics = fresh.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "pullthrough_blob_source_total",
            "source=\"shared\""
        ),
        1.0
    );
    // And it filled its own disk on the way.
    common::wait_committed(&fresh, &blob_path(&digest)).await;

    // Its publication and its read are in the fleet's access order, for eviction.
    let member = format!(
        "blobs/sha256/{} {}",
        digest.trim_start_matches("sha256:"),
        body.len()
    );
    fleet.advance(Duration::from_secs(6));
    let coordinator = fleet.coordinator.clone();
    // One flush adds the member, then the bytes: wait for both (the member alone was seen
    // between the two, with the total the first replica's start-up recount had set).
    let total = Some(body.len().to_string().into_bytes());
    eventually(
        "the blob is in the access order and the total",
        SETTLE,
        || async {
            let order = coordinator
                .zrange(
                    "pullthrough:shared:access",
                    f64::NEG_INFINITY,
                    f64::INFINITY,
                    100,
                )
                .await
                .unwrap();
            order.iter().any(|(m, _)| *m == member)
                && coordinator.get("pullthrough:shared:bytes").await.unwrap() == total
        },
    )
    .await;
}

#[tokio::test]
async fn a_shared_tier_blob_is_not_served_under_a_repository_the_upstream_refuses() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(MIB, 3);
    let digest = up.add_blob(body.clone());
    let first = fleet.replica().await;
    assert_eq!(get_bytes(&first, &blob_path(&digest)).await.unwrap(), body);
    fleet.wait_shared("blobs", &digest).await;
    up.behave(|b| b.missing_repos = vec!["private/other".into()]);

    let fresh = fleet.replica().await;
    let resp = fresh
        .get(&format!("/v2/private/other/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.unwrap();
    assert!(text.contains("BLOB_UNKNOWN"), "{text}");
    assert_eq!(up.blob_heads(), 1, "the repository was asked about once");
    // Under the repository the upstream served it for, the shared link suffices.
    assert_eq!(get_bytes(&fresh, &blob_path(&digest)).await.unwrap(), body);
    assert_eq!(up.blob_heads(), 1);
    assert_eq!(up.blob_gets(), 1);
}

#[tokio::test]
async fn a_replica_that_stops_hands_its_last_accesses_to_the_fleet() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(MIB, 6);
    let digest = up.add_blob(body.clone());
    let first = fleet.replica().await;
    assert_eq!(get_bytes(&first, &blob_path(&digest)).await.unwrap(), body);
    fleet.wait_shared("blobs", &digest).await;
    let second = fleet.replica().await;
    assert_eq!(get_bytes(&second, &blob_path(&digest)).await.unwrap(), body);

    // The fleet's clock has not moved, so no periodic flush ran: only the stop sends it.
    second.stop().await;
    let member = format!(
        "blobs/sha256/{} {}",
        digest.trim_start_matches("sha256:"),
        body.len()
    );
    let order = fleet
        .coordinator
        .zrange(
            "pullthrough:shared:access",
            f64::NEG_INFINITY,
            f64::INFINITY,
            100,
        )
        .await
        .unwrap();
    assert!(order.iter().any(|(m, _)| *m == member), "{order:?}");
}

/// A lease holder that streams 40 % of the blob to its follower and dies (closes the
/// connection, stops answering, never renews its lease).
async fn dying_peer(body: Vec<u8>, send: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut request = vec![0u8; 4096];
        let _ = conn.read(&mut request).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&body[..send]).await.unwrap();
        conn.flush().await.unwrap();
    });
    url
}

#[tokio::test]
async fn a_dead_lease_holder_is_taken_over_from_where_the_follower_got_to() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(5 * MIB, 3);
    let digest = up.add_blob(body.clone());
    let cut_at = body.len() * 2 / 5;
    let holder = dying_peer(body.clone(), cut_at).await;
    let key = format!("pullthrough:lease:blob:{digest}");
    let claim = fleet
        .coordinator
        .claim(&key, &holder, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));

    let follower = fleet.replica().await;
    assert_eq!(
        get_bytes(&follower, &blob_path(&digest)).await.unwrap(),
        body
    );
    assert_eq!(up.blob_gets(), 1, "the upstream sent only the rest");
    let ranges: Vec<String> = up
        .seen()
        .iter()
        .filter_map(|s| {
            s.headers
                .get("range")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(ranges, vec![format!("bytes={cut_at}-")]);
    let metrics = follower.metrics().await;
    assert_eq!(
        common::metric(&metrics, "pullthrough_cluster_leases_taken_over_total"),
        1.0
    );
}

#[tokio::test]
async fn a_shared_object_that_does_not_match_its_digest_is_deleted_and_never_served() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(2 * MIB, 4);
    let digest = up.add_blob(body.clone());
    let mut corrupt = body.clone();
    corrupt[MIB] ^= 0xff;
    fleet
        .store
        .put(&object(&digest), corrupt.into())
        .await
        .unwrap();

    let replica = fleet.replica().await;
    let first = get_bytes(&replica, &blob_path(&digest)).await;
    assert!(
        first.is_err(),
        "the corrupt object's bytes never complete a response"
    );
    let store = fleet.store.clone();
    eventually("the corrupt object is deleted", SETTLE, || async {
        store.head(&object(&digest)).await.is_err()
    })
    .await;
    assert_eq!(
        get_bytes(&replica, &blob_path(&digest)).await.unwrap(),
        body
    );
    assert_eq!(up.blob_gets(), 1);
}

#[tokio::test]
async fn a_replica_whose_disk_cannot_take_a_blob_relays_it_from_the_shared_tier() {
    let Some(fs) = Tmpfs::mount("16m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    };
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(24 * MIB, 5);
    let digest = up.add_blob(body.clone());
    let first = fleet.replica().await;
    assert_eq!(get_bytes(&first, &blob_path(&digest)).await.unwrap(), body);
    fleet.wait_shared("blobs", &digest).await;
    let fetched = up.blob_gets();
    let store = fleet.store.clone();

    let storage = fs.path().join("data");
    let small = fleet
        .replica_with(|c| c.storage.dir = storage.clone())
        .await;
    assert_eq!(get_bytes(&small, &blob_path(&digest)).await.unwrap(), body);
    assert_eq!(
        up.blob_gets(),
        fetched,
        "relayed from the shared tier, not the upstream"
    );
    let metrics = small.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "pullthrough_blob_source_total",
            "source=\"shared\""
        ),
        1.0
    );

    // A damaged object is cut before its last chunk, and deleted.
    let mut corrupt = body.clone();
    corrupt[MIB] ^= 0xff;
    store.put(&object(&digest), corrupt.into()).await.unwrap();
    assert!(
        get_bytes(&small, &blob_path(&digest)).await.is_err(),
        "the damaged object's bytes never complete a response"
    );
    eventually("the damaged object is deleted", SETTLE, || async {
        store.head(&object(&digest)).await.is_err()
    })
    .await;
    assert_eq!(
        get_bytes(&small, &blob_path(&digest)).await.unwrap(),
        body,
        "then it comes from the upstream"
    );
    // One GET: the download's own, relayed from memory for lack of room (a relay is one
    // stream, where the first replica's download came in parts).
    assert_eq!(up.blob_gets(), fetched + 1);
}

#[tokio::test]
async fn replicas_download_alone_while_the_coordinator_is_down_and_coordinate_again_after() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let a = Arc::new(fleet.replica().await);
    let b = Arc::new(fleet.replica().await);

    fleet.coordinator.set_down(true);
    let body = pseudo_random(MIB, 5);
    let digest = up.add_blob(body.clone());
    assert_eq!(get_bytes(&a, &blob_path(&digest)).await.unwrap(), body);
    assert_eq!(get_bytes(&b, &blob_path(&digest)).await.unwrap(), body);
    let metrics = a.metrics().await;
    assert_eq!(
        common::metric(&metrics, "pullthrough_cluster_coordinator_up"),
        0.0
    );
    assert!(common::metric(&metrics, "pullthrough_cluster_coordinator_errors_total") >= 1.0);

    fleet.coordinator.set_down(false);
    // A replica asks again half a lease after its last failure.
    fleet.advance(Duration::from_secs(3));
    let body = pseudo_random(2 * MIB, 6);
    let digest = up.add_blob(body.clone());
    let before = up.blob_gets();
    up.behave(|b| b.hold_blob_after = Some(MIB as u64 / 2));
    let clients: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|r| {
            let path = blob_path(&digest);
            tokio::spawn(async move { get_bytes(&r, &path).await })
        })
        .collect();
    eventually("both replicas are reading", SETTLE, || async {
        all_waiting(&[&a, &b]).await >= 2.0
    })
    .await;
    up.state.release.notify_waiters();
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap(), body);
    }
    assert_eq!(up.blob_gets() - before, 1, "coordination resumed by itself");
    let metrics = a.metrics().await;
    assert_eq!(
        common::metric(&metrics, "pullthrough_cluster_coordinator_up"),
        1.0
    );
}

#[tokio::test]
async fn peer_requests_need_the_cluster_secret() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let body = pseudo_random(100_000, 7);
    let digest = up.add_blob(body.clone());
    let replica = fleet.replica().await;
    assert_eq!(
        get_bytes(&replica, &blob_path(&digest)).await.unwrap(),
        body
    );
    common::wait_committed(&replica, &blob_path(&digest)).await;

    let peer_path = format!("/_pullthrough/peer/blobs/{digest}");
    let resp = replica.get(&peer_path).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(common::error_code(resp).await, "UNAUTHORIZED");
    let resp = replica
        .get(&peer_path)
        .header("pullthrough-cluster-secret", "fleet-secret-0123456788")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let resp = replica
        .get(&peer_path)
        .header("pullthrough-cluster-secret", common::CLUSTER_SECRET)
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), body[10..]);

    let unknown = format!("/_pullthrough/peer/blobs/sha256:{}", "0".repeat(64));
    let resp = replica
        .get(&unknown)
        .header("pullthrough-cluster-secret", common::CLUSTER_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(common::error_code(resp).await, "BLOB_UNKNOWN");
    assert_eq!(
        up.blob_gets(),
        1,
        "a peer request never reaches the upstream"
    );
}

#[tokio::test]
async fn a_single_node_has_no_peer_endpoint() {
    let up = FakeUpstream::start().await;
    let digest = up.add_blob(pseudo_random(1000, 8));
    let m = TestMirror::start(&up).await;
    let resp = m
        .get(&format!("/_pullthrough/peer/blobs/{digest}"))
        .header("pullthrough-cluster-secret", common::CLUSTER_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn an_unreachable_shared_store_leaves_the_upstream_and_the_local_tier_serving() {
    let up = FakeUpstream::start().await;
    let body = pseudo_random(MIB, 9);
    let digest = up.add_blob(body.clone());
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let m = TestMirror::start_with(&up, |c| {
        common::join_cluster(c, "http://127.0.0.1:9");
        c.cluster = None;
        if let Some(shared) = &mut c.storage.shared {
            shared.endpoint = endpoint.clone();
        }
    })
    .await;
    assert_eq!(get_bytes(&m, &blob_path(&digest)).await.unwrap(), body);
    common::wait_committed(&m, &blob_path(&digest)).await;
    let resp = m.get(&blob_path(&digest)).send().await.unwrap();
    assert_eq!(x_cache(&resp), "HIT");
    assert_eq!(resp.bytes().await.unwrap(), body);
    let metrics = m.metrics().await;
    let errors = common::metric(&metrics, "pullthrough_shared_errors_total");
    assert!(errors >= 1.0);
    // Skipped for a while after it failed: the next miss does not wait on it again.
    let other = pseudo_random(1000, 10);
    let other_digest = up.add_blob(other.clone());
    assert_eq!(
        get_bytes(&m, &blob_path(&other_digest)).await.unwrap(),
        other
    );
    let metrics = m.metrics().await;
    assert_eq!(
        common::metric(&metrics, "pullthrough_shared_errors_total"),
        errors
    );
}

#[tokio::test]
async fn a_shared_manifest_is_one_member_of_the_access_order_with_its_object_size() {
    let fleet = Fleet::new().await;
    let up = &fleet.upstream;
    let (digest, _) = up.add_image("library/app", "v1", &[10]);
    let first = fleet.replica().await;
    let path = "/v2/library/app/manifests/v1";
    assert_eq!(first.get(path).send().await.unwrap().status(), 200);
    fleet.wait_shared("manifests", &digest).await;
    let second = fleet.replica().await;
    let r = second
        .get(&format!("/v2/library/app/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.manifest_gets(),
        1,
        "the second replica read the shared tier"
    );
    // Both replicas hand their publication and read over when they stop.
    first.stop().await;
    second.stop().await;
    let hex = digest.trim_start_matches("sha256:");
    let object = Path::from(format!("manifests/sha256/{hex}"));
    let size = fleet.store.head(&object).await.unwrap().size;
    let order = fleet
        .coordinator
        .zrange(
            "pullthrough:shared:access",
            f64::NEG_INFINITY,
            f64::INFINITY,
            100,
        )
        .await
        .unwrap();
    let members: Vec<&String> = order
        .iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(&format!("manifests/sha256/{hex} ")))
        .collect();
    assert_eq!(members, [&format!("manifests/sha256/{hex} {size}")]);
    let bytes = fleet
        .coordinator
        .get("pullthrough:shared:bytes")
        .await
        .unwrap();
    assert_eq!(bytes, Some(size.to_string().into_bytes()));
}
