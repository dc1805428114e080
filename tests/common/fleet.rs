//! A fleet of replicas in one process: servers that share one coordinator (in memory, or a
//! real Redis) and one in-memory object store (for S3), each with its own storage dir, in
//! front of one fake upstream that counts what the fleet asks. They share one manual clock, so
//! TTLs end for all of them at once.

use std::sync::Arc;
use std::time::Duration;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use pullthrough::cluster::memory::MemoryCoordinator;
use pullthrough::config::Config;
use pullthrough::Clock;

use super::{secret, test_config, FakeUpstream, TestMirror, TTL};

/// One fleet: what its replicas share, and the upstream they all pull from.
pub struct Fleet {
    pub upstream: FakeUpstream,
    /// Stands in for Redis, unless `redis` names a real one.
    pub coordinator: Arc<MemoryCoordinator>,
    pub redis: Option<String>,
    /// Stands in for the S3 store.
    pub store: Arc<InMemory>,
    pub clock: Clock,
}

impl Fleet {
    pub async fn new() -> Fleet {
        Fleet {
            upstream: FakeUpstream::start().await,
            coordinator: Arc::new(MemoryCoordinator::default()),
            redis: None,
            store: Arc::new(InMemory::new()),
            clock: Clock::manual(),
        }
    }

    /// A fleet coordinated by the real Redis at `url`.
    pub async fn with_redis(url: &str) -> Fleet {
        Fleet {
            redis: Some(url.to_owned()),
            ..Fleet::new().await
        }
    }

    pub async fn replica(&self) -> TestMirror {
        self.replica_with(|_| {}).await
    }

    /// A replica with its own empty storage dir, advertising its real address.
    pub async fn replica_with(&self, tweak: impl FnOnce(&mut Config)) -> TestMirror {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&self.upstream.url, dir.path());
        config.cache.tag_ttl = TTL;
        config.cache.negative_ttl = TTL;
        super::join_cluster(&mut config, &format!("http://{addr}"));
        if let (Some(url), Some(cluster)) = (&self.redis, &mut config.cluster) {
            cluster.redis = secret(url);
        }
        tweak(&mut config);
        let coordinator = self.redis.is_none().then(|| self.coordinator.clone());
        let store = self.store.clone();
        TestMirror::launch_on(listener, self.clock.clone(), config, dir, |server| {
            let server = server.shared_store(store);
            match coordinator {
                Some(c) => server.coordinator(c),
                None => server,
            }
        })
        .await
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Waits until the shared tier holds `digest` (a blob or a manifest, written in the
    /// background after the answer).
    pub async fn wait_shared(&self, kind: &str, digest: &str) {
        let hex = digest.trim_start_matches("sha256:");
        let path = Path::from(format!("{kind}/sha256/{hex}"));
        super::eventually(
            &format!("{kind} {digest} in the shared tier"),
            super::SETTLE,
            || async { self.store.head(&path).await.is_ok() },
        )
        .await;
    }
}
