//! Replicas of one cluster in one process, sharing an in-memory coordinator and object store:
//! membership by heartbeat and the cluster as `/_pullthrough/status` shows it. (The shared
//! tier's eviction is unit-tested in `src/cluster/eviction.rs`.)

#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::fleet::Fleet;
use common::{eventually, metric, FakeUpstream, TestMirror, SETTLE};
use object_store::ObjectStore;
use pullthrough::cluster::coordinator::Coordinator;
use pullthrough::cluster::HEARTBEAT;
use pullthrough::oci::Digest;
use pullthrough::store::tier::{object_name, Kind};

async fn status(m: &TestMirror) -> serde_json::Value {
    m.status().await
}

async fn members(m: &TestMirror) -> Vec<String> {
    let s = status(m).await;
    s["cluster"]["members"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn members_are_listed_while_they_heartbeat_and_dropped_after() {
    let cluster = Fleet::new().await;
    let a = cluster.replica_with(|_| {}).await;
    let b = cluster.replica_with(|_| {}).await;
    let mut both = vec![a.url.clone(), b.url.clone()];
    both.sort();
    // a announced itself before b started: it learns of b at its next heartbeat.
    cluster.advance(HEARTBEAT);
    eventually("each replica lists both", SETTLE, || async {
        members(&a).await == both && members(&b).await == both
    })
    .await;
    assert_eq!(
        metric(&a.metrics().await, "pullthrough_cluster_members"),
        2.0
    );

    b.stop().await;
    cluster.advance(3 * HEARTBEAT + Duration::from_secs(1));
    eventually("a stopped replica is dropped", SETTLE, || async {
        members(&a).await == vec![a.url.clone()]
    })
    .await;
    assert_eq!(
        metric(&a.metrics().await, "pullthrough_cluster_members"),
        1.0
    );
}

#[tokio::test]
async fn the_status_shows_the_cluster() {
    let upstream = FakeUpstream::start().await;
    let cluster = Fleet::new().await;
    // What the fleet published so far: in the bucket, as the coordinator counts it and in its
    // access set (the first eviction pass recounts it from the bucket).
    let object = object_name(Kind::Blob, &Digest::sha256_of(b"published"));
    cluster
        .store
        .put(&object.as_str().into(), vec![0u8; 1234].into())
        .await
        .unwrap();
    cluster
        .coordinator
        .zadd(
            "pullthrough:shared:access",
            vec![(format!("{object} 1234"), 1.0)],
        )
        .await
        .unwrap();
    cluster
        .coordinator
        .add("pullthrough:shared:bytes", 1234, None)
        .await
        .unwrap();
    let a = cluster
        .replica_with(|c| {
            c.storage.shared.as_mut().unwrap().max_size = Some(bytesize::ByteSize::mib(2));
        })
        .await;
    eventually(
        "the status shows the replica and the shared tier",
        SETTLE,
        || async {
            let s = status(&a).await;
            members(&a).await == vec![a.url.clone()] && s["cluster"]["shared"]["bytes"] == 1234
        },
    )
    .await;
    let s = status(&a).await;
    let c = &s["cluster"];
    assert_eq!(c["self"], a.url.as_str());
    assert_eq!(c["coordinator"], "up");
    assert_eq!(c["leases_held"], 0);
    assert_eq!(c["leases_taken_over"], 0);
    assert_eq!(c["shared"]["max_bytes"], 2 * 1024 * 1024);
    assert_eq!(c["shared"]["bytes"], 1234);
    assert_eq!(c["shared"]["evictions"], 0);

    cluster.coordinator.set_down(true);
    cluster.advance(HEARTBEAT);
    eventually("the status shows the coordinator down", SETTLE, || async {
        status(&a).await["cluster"]["coordinator"] == "down"
    })
    .await;
    cluster.coordinator.set_down(false);
    cluster.advance(HEARTBEAT);
    eventually(
        "the status shows the coordinator up again",
        SETTLE,
        || async { status(&a).await["cluster"]["coordinator"] == "up" },
    )
    .await;

    let single = TestMirror::start(&upstream).await;
    assert!(status(&single).await.get("cluster").is_none());
}
