//! The coordinator contract, checked on both implementations with the same assertions: the
//! in-process one (tokio's paused clock moves its expiries) and `RedisCoordinator` against a
//! real `redis-server` started here on a free loopback port (Redis's own clock expires keys,
//! so that run waits out short TTLs); then two replicas sharing a tag through that Redis.
//! Without `redis-server` installed, the Redis runs are skipped with a notice, or fail with
//! `PULLTHROUGH_REQUIRE_TOOLS=1` (as in CI; see tests/common/tools.rs).

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

mod common;

use common::fleet::Fleet;
use common::upstream::sha256;
use pullthrough::cluster::coordinator::{Claim, Coordinator};
use pullthrough::cluster::memory::MemoryCoordinator;
use pullthrough::cluster::redis::RedisCoordinator;

/// The unit of every TTL below: long enough for a loopback round trip, short enough to wait
/// out against a real Redis.
const T: Duration = Duration::from_millis(400);

type Wait = fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Every assertion of the contract, on keys under `ns` (so runs never see each other's).
async fn contract(c: &dyn Coordinator, ns: &str, wait: Wait) {
    let key = |k: &str| format!("{ns}:{k}");

    // Claims are exclusive until they expire.
    let lease = key("lease");
    let Claim::Acquired(first) = c.claim(&lease, "a", 2 * T).await.unwrap() else {
        panic!("the first claim must win");
    };
    assert_eq!(
        c.claim(&lease, "b", 2 * T).await.unwrap(),
        Claim::Held { holder: "a".into() }
    );
    assert!(c.renew(&first, 2 * T).await.unwrap(), "the holder renews");
    wait(3 * T).await;
    assert!(
        !c.renew(&first, 2 * T).await.unwrap(),
        "an expired lease is lost"
    );
    let Claim::Acquired(second) = c.claim(&lease, "b", 5 * T).await.unwrap() else {
        panic!("an expired lease can be taken");
    };

    // Renew and release are fenced by the token: the stale holder changes nothing.
    c.release(&first).await.unwrap();
    assert!(!c.renew(&first, 5 * T).await.unwrap());
    assert_eq!(
        c.claim(&lease, "c", 5 * T).await.unwrap(),
        Claim::Held { holder: "b".into() },
        "a stale release left the new lease alone"
    );
    assert!(c.renew(&second, 5 * T).await.unwrap());
    c.release(&second).await.unwrap();
    assert!(
        matches!(
            c.claim(&lease, "c", 5 * T).await.unwrap(),
            Claim::Acquired(_)
        ),
        "a released lease is free"
    );

    // Values, with and without expiry.
    let (kept, brief) = (key("kept"), key("brief"));
    assert_eq!(c.get(&kept).await.unwrap(), None);
    c.set(&kept, b"one".to_vec(), None).await.unwrap();
    c.set(&brief, b"two".to_vec(), Some(T)).await.unwrap();
    assert_eq!(c.get(&kept).await.unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(c.get(&brief).await.unwrap().as_deref(), Some(&b"two"[..]));
    wait(2 * T).await;
    assert_eq!(c.get(&brief).await.unwrap(), None, "expired");
    assert_eq!(c.get(&kept).await.unwrap().as_deref(), Some(&b"one"[..]));
    c.delete(&kept).await.unwrap();
    assert_eq!(c.get(&kept).await.unwrap(), None);

    // A counter keeps the window of its first add.
    let n = key("n");
    let w = Some(3 * T);
    assert_eq!(c.add(&n, 1, w).await.unwrap(), 1);
    wait(2 * T).await;
    assert_eq!(c.add(&n, 2, w).await.unwrap(), 3, "within the window");
    wait(2 * T).await;
    assert_eq!(c.add(&n, 1, w).await.unwrap(), 1, "a new window");
    let forever = key("forever");
    assert_eq!(c.add(&forever, 5, None).await.unwrap(), 5);
    assert_eq!(c.add(&forever, -2, None).await.unwrap(), 3);

    // Sorted sets: ranges by score, lowest first, bounded; scores updated; members removed.
    let set = key("set");
    c.zadd(
        &set,
        vec![("c".into(), 3.0), ("a".into(), 1.0), ("b".into(), 2.0)],
    )
    .await
    .unwrap();
    let names = |v: Vec<(String, f64)>| v.into_iter().map(|(m, _)| m).collect::<Vec<_>>();
    assert_eq!(
        names(c.zrange(&set, 0.0, 10.0, 10).await.unwrap()),
        ["a", "b", "c"]
    );
    assert_eq!(
        names(c.zrange(&set, 1.5, 3.0, 10).await.unwrap()),
        ["b", "c"]
    );
    assert_eq!(
        names(c.zrange(&set, 0.0, 10.0, 2).await.unwrap()),
        ["a", "b"]
    );
    c.zadd(&set, vec![("a".into(), 4.0)]).await.unwrap();
    assert_eq!(
        c.zrange(&set, f64::NEG_INFINITY, f64::INFINITY, 10)
            .await
            .unwrap(),
        vec![("b".into(), 2.0), ("c".into(), 3.0), ("a".into(), 4.0)]
    );
    c.zrem(&set, vec!["b".into(), "absent".into()])
        .await
        .unwrap();
    assert_eq!(
        names(
            c.zrange(&set, f64::NEG_INFINITY, f64::INFINITY, 10)
                .await
                .unwrap()
        ),
        ["c", "a"]
    );
}

#[tokio::test(start_paused = true)]
async fn the_memory_coordinator_keeps_the_contract() {
    let c = MemoryCoordinator::default();
    contract(&c, "memory", |d| Box::pin(tokio::time::advance(d))).await;
}

/// `redis-server` (the program at `bin`) on `port` of loopback, without persistence, killed
/// when dropped.
fn spawn_redis(bin: &std::path::Path, port: u16) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

/// A throwaway `redis-server` on loopback.
struct RedisServer {
    bin: std::path::PathBuf,
    port: u16,
    url: String,
    child: tokio::process::Child,
}

impl RedisServer {
    /// `None` (with a notice) when `redis-server` is not installed; a panic then if tools
    /// are required.
    async fn start() -> Option<RedisServer> {
        let bin = common::tools::require_tool("redis-server", "apt-get install redis-server")?;
        // Redis binds the port itself: take a free one and let it go just before.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = spawn_redis(&bin, port)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(RedisServer {
            bin,
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            child,
        })
    }
}

#[tokio::test]
async fn the_redis_coordinator_keeps_the_contract() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let c = RedisCoordinator::new(&server.url).unwrap();
    contract(&c, "pullthrough:contract", |d| {
        Box::pin(tokio::time::sleep(d))
    })
    .await;
}

#[tokio::test]
async fn the_redis_coordinator_fails_while_redis_is_down_and_reconnects_by_itself() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let c = RedisCoordinator::new(&server.url).unwrap();
    c.set("k", b"v".to_vec(), None).await.unwrap();
    server.child.kill().await.unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        while c.get("k").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "requests fail once Redis is gone");

    // A fresh, empty Redis on the same port (started again until the old socket is gone).
    let mut again = spawn_redis(&server.bin, server.port).unwrap();
    let recovered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(v) = c.get("k").await {
                return v;
            }
            if again.try_wait().unwrap().is_some() {
                again = spawn_redis(&server.bin, server.port).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        recovered.ok(),
        Some(None),
        "the coordinator reconnects by itself"
    );
}

#[tokio::test]
async fn replicas_share_a_tag_through_a_real_redis() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let fleet = Fleet::with_redis(&server.url).await;
    let (digest, _) = fleet.upstream.add_image("library/alpine", "3", &[100]);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let path = "/v2/library/alpine/manifests/3";
    let body = a.get(path).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&body), digest);
    fleet.wait_shared("manifests", &digest).await;
    let before = fleet.upstream.total();

    let r = b.get(path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    assert_eq!(
        fleet.upstream.total(),
        before,
        "b's tag record came through Redis"
    );
    assert_eq!(
        fleet.coordinator.requests(),
        0,
        "the in-memory one was not used"
    );
}

#[tokio::test]
async fn a_purge_reaches_the_other_replicas_through_a_real_redis() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let fleet = Fleet::with_redis(&server.url).await;
    let (digest, _) = fleet.upstream.add_image("library/alpine", "3", &[100]);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let path = "/v2/library/alpine/manifests/3";
    for m in [&a, &b] {
        let r = m.get(path).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    }
    assert_eq!(fleet.upstream.manifest_gets(), 1);

    let r = a
        .client
        .post(format!("{}/_pullthrough/cache/purge", a.url))
        .query(&[("reference", "alpine:3")])
        .send()
        .await
        .unwrap();
    let purged: serde_json::Value = r.json().await.unwrap();
    assert_eq!(purged["fleet"], true, "{purged}");
    common::eventually("b applied a's purge", common::SETTLE, || async {
        let s: serde_json::Value = b.status().await;
        s["recent_purges"][0]["subject"] == "docker.io/library/alpine:3"
    })
    .await;
    let r = b.get(path).send().await.unwrap();
    assert_eq!(common::x_cache(&r), "MISS");
    assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    assert_eq!(fleet.upstream.manifest_gets(), 2, "b fetched the tag again");
}
