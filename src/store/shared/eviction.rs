//! Least-recently-used eviction of the shared tier across the cluster, down to
//! `storage.shared.max_size`. One replica evicts at a time, holding the `lease:evictor` lease;
//! an object with a live reader or a download lease (`lease:blob:<digest>`) is skipped. A
//! pass that has looked at every member sets the fleet's total right.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::readers::readers_key;
use super::{Ledger, Object, ACCESS, BYTES, EVICTIONS};
use crate::cluster::coordinator::{Claim, Lease};
use crate::cluster::Cluster;
use crate::store::index::Key;
use crate::store::tier::Kind;

/// How often each replica looks at the shared tier's size (and evicts if it holds the lease).
pub const EVICT_EVERY: Duration = Duration::from_secs(30);
/// How long the evictor's lease lasts without a renewal (renewed between pages).
const EVICTOR_LEASE: Duration = Duration::from_secs(60);
/// How long the evictor's mark on an object lasts if the evictor dies before removing it.
const MARK_TTL: Duration = Duration::from_secs(60);
/// Candidates read from the access set per request.
const PAGE: usize = 100;

/// How an eviction pass ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// The tier is within its bound (or unbounded): nothing to evict.
    Within { bytes: u64 },
    /// Another replica holds the evictor lease.
    Busy { holder: String },
    /// The coordinator cannot be asked: nobody evicts meanwhile.
    Unavailable,
    /// `objects` objects (`bytes` bytes) deleted; `remaining` bytes are left, more than the
    /// bound when what is left is being read or downloaded.
    Evicted {
        objects: u64,
        bytes: u64,
        remaining: u64,
    },
}

impl Ledger {
    /// One pass: reads the shared tier's size and, past the bound, takes the evictor lease and
    /// deletes the least recently used objects nobody reads or downloads, down to the bound.
    /// Once per [`RECONCILE_EVERY`] for the fleet, the pass first recounts the total from the
    /// bucket (see [`Ledger::recount`]).
    pub async fn evict(&self) -> Pass {
        let Some(mut bytes) = self.counter(BYTES).await else {
            return Pass::Unavailable;
        };
        self.bytes.store(bytes, Ordering::Relaxed);
        if let Some(n) = self.counter(EVICTIONS).await {
            self.evictions.store(n, Ordering::Relaxed);
        }
        let recount = self.recount_due().await;
        if !recount && self.max.is_none_or(|max| bytes <= max) {
            return Pass::Within { bytes };
        }
        let c = &self.cluster;
        let lease = match c.claim("lease:evictor", EVICTOR_LEASE).await {
            Some(Claim::Acquired(lease)) => lease,
            Some(Claim::Held { holder }) => return Pass::Busy { holder },
            None => return Pass::Unavailable,
        };
        if recount {
            if let Some(total) = self.recount(&lease).await {
                bytes = total;
                self.bytes.store(bytes, Ordering::Relaxed);
            }
        }
        let pass = match self.max.filter(|&max| bytes > max) {
            Some(max) => self.evict_down_to(bytes, max, &lease).await,
            None => Pass::Within { bytes },
        };
        c.release(&lease).await;
        if let Pass::Evicted {
            objects,
            bytes: freed,
            remaining,
        } = &pass
        {
            self.metrics.shared_eviction(*objects);
            self.bytes.store(*remaining, Ordering::Relaxed);
            if let Some(n) = c
                .add(EVICTIONS, i64::try_from(*objects).unwrap_or(i64::MAX), None)
                .await
            {
                self.evictions
                    .store(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
            }
            if *objects > 0 {
                tracing::info!(
                    objects,
                    bytes = freed,
                    remaining,
                    max = self.max,
                    "evicted least recently used objects from the shared tier"
                );
            }
        }
        pass
    }

    /// Renews the evictor lease; `false` (warned) when it was lost and the pass must stop.
    pub(super) async fn renew(&self, lease: &Lease) -> bool {
        let renewed = self.cluster.renew(lease, EVICTOR_LEASE).await;
        if !renewed {
            tracing::warn!("the shared-tier evictor lease was lost; the pass stops");
        }
        renewed
    }

    /// Deletes from the least recently used on while the lease holds, until `bytes` minus
    /// what was freed is within `max` or no candidate is left.
    pub(super) async fn evict_down_to(&self, bytes: u64, max: u64, lease: &Lease) -> Pass {
        let c = &self.cluster;
        let (mut objects, mut freed) = (0u64, 0u64);
        // Members looked at and kept (read, downloading, or not deletable now), with sizes.
        let mut kept: HashMap<String, u64> = HashMap::new();
        let mut walk = Walk::default();
        'pages: while bytes.saturating_sub(freed) > max {
            let Some(page) = walk.next(c, PAGE).await else {
                break;
            };
            if page.is_empty() {
                break;
            }
            for (member, _) in page {
                let Some((object, size)) = Object::parse(&member) else {
                    c.zrem(ACCESS, vec![member]).await;
                    continue;
                };
                match self.evict_one(&object).await {
                    Some(true) => {
                        c.zrem(ACCESS, vec![member]).await;
                        c.add(BYTES, -i64::try_from(size).unwrap_or(i64::MAX), None)
                            .await;
                        objects += 1;
                        freed += size;
                        if bytes.saturating_sub(freed) <= max {
                            break 'pages;
                        }
                    }
                    Some(false) => {
                        kept.insert(member, size);
                    }
                    // The store failed: the next pass tries again.
                    None => break 'pages,
                }
            }
            if !self.renew(lease).await {
                break;
            }
        }
        let mut remaining = bytes.saturating_sub(freed);
        if walk.exhausted {
            // Every tracked object was looked at: what is kept is the whole tier, so the
            // counter is set right (an object published twice counted twice).
            let total: u64 = kept.values().sum();
            if total != remaining {
                c.set_json(BYTES, &total, None).await;
                remaining = total;
            }
        }
        Pass::Evicted {
            objects,
            bytes: freed,
            remaining,
        }
    }

    /// Deletes one object unless it is read or downloaded: `Some(true)` deleted,
    /// `Some(false)` kept, `None` the store failed.
    pub(super) async fn evict_one(&self, object: &Object) -> Option<bool> {
        let c = &self.cluster;
        let name = object.name();
        let mark = format!("evicting:{name}");
        if c.set(&mark, b"1".to_vec(), Some(MARK_TTL)).await.is_none() {
            return Some(false);
        }
        let deleted = if self.is_protected(object, &name).await {
            Some(false)
        } else {
            match self.tier.delete_named(&name).await {
                Ok(()) => Some(true),
                Err(e) => {
                    self.metrics.shared_error();
                    tracing::warn!(object = %name, error = %e, "cannot evict from the shared tier");
                    None
                }
            }
        };
        if deleted == Some(true) {
            let set = readers_key(&name);
            if let Some(stale) = c.zrange(&set, f64::NEG_INFINITY, f64::INFINITY, 1000).await {
                if !stale.is_empty() {
                    c.zrem(&set, stale.into_iter().map(|(m, _)| m).collect())
                        .await;
                }
            }
        }
        c.delete(&mark).await;
        deleted
    }

    /// Whether the object has a live reader or a download lease; `true` when that cannot be
    /// told (the coordinator did not answer).
    pub(super) async fn is_protected(&self, object: &Object, name: &str) -> bool {
        let key = match object.kind {
            Kind::Blob => Key::blob(&object.digest),
            Kind::Manifest => Key::manifest(&object.digest),
        };
        if self.pinned.contains(&key) {
            return true;
        }
        let c = &self.cluster;
        match c
            .zrange(&readers_key(name), self.now_ms(), f64::INFINITY, 1)
            .await
        {
            Some(readers) if readers.is_empty() => {}
            _ => return true,
        }
        if object.kind != Kind::Blob {
            return false;
        }
        !matches!(c.is_downloading(&object.digest).await, Some(false))
    }
}

/// A walk through the access set from the least recently used on, a page at a time. Members
/// looked at and kept stay in the set, so each page starts at the last score seen and leaves
/// out the members of that score already seen.
#[derive(Default)]
pub(super) struct Walk {
    from: Option<f64>,
    seen_at_from: HashSet<String>,
    /// Every member was seen (a short page ended the walk).
    pub(super) exhausted: bool,
}

impl Walk {
    /// The next members, none at the end; `None` when the coordinator failed.
    pub(super) async fn next(&mut self, c: &Cluster, limit: usize) -> Option<Vec<(String, f64)>> {
        let from = self.from.unwrap_or(f64::NEG_INFINITY);
        let page = c.zrange(ACCESS, from, f64::INFINITY, limit).await?;
        let full = page.len() >= limit;
        let mut fresh = Vec::with_capacity(page.len());
        for (member, score) in page {
            if Some(score) == self.from && self.seen_at_from.contains(&member) {
                continue;
            }
            if Some(score) != self.from {
                self.from = Some(score);
                self.seen_at_from.clear();
            }
            self.seen_at_from.insert(member.clone());
            fresh.push((member, score));
        }
        // A full page of members already seen: more than a page share one score, and the walk
        // cannot get past them (it ends without claiming to have seen everything).
        if fresh.is_empty() {
            self.exhausted = !full;
        }
        Some(fresh)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::readers::{Reading, READ_TTL};
    use super::super::recount::RECONCILE_EVERY;
    use super::super::{Ledger, Pass, SharedTier};
    use super::*;
    use crate::clock::Clock;
    use crate::cluster::coordinator::Coordinator;
    use crate::cluster::memory::MemoryCoordinator;
    use crate::cluster::Claimed;
    use crate::config::{ClusterConfig, Secret};
    use crate::metrics::Metrics;
    use crate::oci::Digest;
    use crate::store::index::Pinned;
    use crate::store::s3::S3;
    use crate::store::tier::{object_name, Backend};
    use bytes::Bytes;
    use object_store::memory::InMemory;

    /// Replicas sharing one coordinator, one object store and one clock.
    struct Fleet {
        coordinator: Arc<MemoryCoordinator>,
        tier: Arc<S3>,
        clock: Clock,
    }

    impl Fleet {
        fn new() -> Fleet {
            Fleet {
                coordinator: Arc::new(MemoryCoordinator::default()),
                tier: Arc::new(S3::over(Arc::new(InMemory::new()))),
                clock: Clock::manual(),
            }
        }

        fn cluster(&self, advertise: &str) -> Arc<Cluster> {
            let config = ClusterConfig {
                redis: Secret::new("redis://127.0.0.1:1/0"),
                advertise: advertise.to_owned(),
                lease_ttl: Duration::from_secs(5),
                secret: Some(Secret::new("a cluster secret, long enough")),
            };
            Arc::new(Cluster::new(
                self.coordinator.clone(),
                &config,
                Arc::new(Metrics::new()),
                self.clock.clone(),
            ))
        }

        fn replica(&self, advertise: &str, max: u64) -> Ledger {
            self.pinning_replica(advertise, max, Pinned::default())
        }

        fn pinning_replica(&self, advertise: &str, max: u64, pinned: Pinned) -> Ledger {
            Ledger::new(
                self.cluster(advertise),
                self.tier.clone(),
                Some(max),
                self.clock.clone(),
                Arc::new(Metrics::new()),
                pinned,
            )
        }

        /// Publishes a blob of `size` bytes through `by`, a second after the previous one.
        async fn publish(&self, by: &Ledger, seed: u8, size: usize) -> Digest {
            let body = vec![seed; size];
            let digest = Digest::sha256_of(&body);
            self.tier
                .write(Kind::Blob, &digest, Bytes::from(body))
                .await
                .unwrap();
            by.published(Kind::Blob, &digest, size as u64);
            self.clock.advance(Duration::from_secs(1));
            digest
        }

        async fn holds(&self, digest: &Digest) -> bool {
            self.tier.blob_size(digest).await.unwrap().is_some()
        }

        async fn bytes(&self) -> Option<Vec<u8>> {
            self.coordinator
                .get("pullthrough:shared:bytes")
                .await
                .unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_shared_tier_is_evicted_least_recently_used_first_down_to_max_size() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 3000),
            fleet.replica("http://b", 3000),
        );
        let first = fleet.publish(&a, 1, 1000).await;
        let second = fleet.publish(&b, 2, 1000).await;
        let third = fleet.publish(&a, 3, 1000).await;
        // The oldest is read again (through the other replica): the second is now the LRU.
        b.accessed(Kind::Blob, &first, 1000);
        fleet.clock.advance(Duration::from_secs(1));
        let fourth = fleet.publish(&b, 4, 1000).await;
        a.flush().await;
        b.flush().await;
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"4000"[..]));

        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 1,
                bytes: 1000,
                remaining: 3000
            }
        );
        assert!(!fleet.holds(&second).await, "the least recently used goes");
        for kept in [&first, &third, &fourth] {
            assert!(fleet.holds(kept).await);
        }
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"3000"[..]));
        assert_eq!(b.evict().await, Pass::Within { bytes: 3000 });
        assert_eq!(b.evictions(), 1, "evictions are counted for the fleet");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_object_is_not_evicted() {
        let fleet = Fleet::new();
        let pinned = Pinned::default();
        let a = fleet.pinning_replica("http://a", 1000, pinned.clone());
        let oldest = fleet.publish(&a, 1, 1000).await;
        let newer = fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        pinned.replace(std::collections::HashSet::from([Key::blob(&oldest)]));
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(fleet.holds(&oldest).await, "the pinned object stays");
        assert!(!fleet.holds(&newer).await, "the unpinned one goes instead");
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_with_a_reader_is_not_evicted() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 1000),
            fleet.replica("http://b", 1000),
        );
        let read = fleet.publish(&a, 1, 1000).await;
        let unread = fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        let Reading::Protected(guard) = b.read(Kind::Blob, &read).await else {
            panic!("nothing evicts it: the read is protected");
        };
        // Longer than a registration lasts unrenewed: the guard renews it.
        for _ in 0..4 {
            fleet.clock.advance(READ_TTL / 3);
            tokio::time::sleep(READ_TTL / 3).await;
        }
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(fleet.holds(&read).await, "the object being read stays");
        assert!(
            !fleet.holds(&unread).await,
            "the next least recently used goes instead"
        );

        drop(guard);
        tokio::task::yield_now().await;
        let newer = fleet.publish(&a, 3, 1000).await;
        a.flush().await;
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(!fleet.holds(&read).await, "once read, it goes");
        assert!(fleet.holds(&newer).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_blob_handle_protects_its_object_while_it_lives() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        let read = fleet.publish(&a, 1, 1000).await;
        let unread = fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        let b = Arc::new(SharedTier::new(
            fleet.tier.clone(),
            Some(fleet.cluster("http://b")),
            Some(1000),
            fleet.clock.clone(),
            Arc::new(Metrics::new()),
            Pinned::default(),
        ));
        let handle = b.open(&read).await.unwrap();
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(fleet.holds(&read).await, "the object being read stays");
        assert!(!fleet.holds(&unread).await);
        let chunks: Vec<Bytes> = futures_util::TryStreamExt::try_collect(handle.stream(0, 1000))
            .await
            .unwrap();
        assert_eq!(chunks.concat(), vec![1u8; 1000]);

        drop(handle);
        tokio::task::yield_now().await;
        let newer = fleet.publish(&a, 3, 1000).await;
        a.flush().await;
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(
            !fleet.holds(&read).await,
            "once the handle is gone, so is the object"
        );
        assert!(fleet.holds(&newer).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_of_an_object_being_evicted_reads_elsewhere() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        let digest = fleet.publish(&a, 1, 1000).await;
        let mark = format!("pullthrough:evicting:{}", object_name(Kind::Blob, &digest));
        fleet
            .coordinator
            .set(&mark, b"1".to_vec(), Some(MARK_TTL))
            .await
            .unwrap();
        assert!(matches!(
            a.read(Kind::Blob, &digest).await,
            Reading::Evicting
        ));
        assert!(!a.lend(Kind::Blob, &digest, READ_TTL).await);
        fleet.coordinator.delete(&mark).await.unwrap();
        assert!(matches!(
            a.read(Kind::Blob, &digest).await,
            Reading::Protected(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_being_downloaded_is_not_evicted() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        let downloading = fleet.publish(&a, 1, 1000).await;
        let other = fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        let Claimed::Acquired(lease) = fleet.cluster("http://b").claim_download(&downloading).await
        else {
            panic!("nobody else downloads it");
        };
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(fleet.holds(&downloading).await);
        assert!(!fleet.holds(&other).await);
        drop(lease);
        tokio::task::yield_now().await;
        fleet.publish(&a, 3, 1000).await;
        a.flush().await;
        assert!(matches!(a.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(!fleet.holds(&downloading).await, "once downloaded, it goes");
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_replica_evicts_at_a_time() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 1000),
            fleet.replica("http://b", 1000),
        );
        let old = fleet.publish(&a, 1, 1000).await;
        fleet.publish(&a, 2, 1000).await;
        a.flush().await;
        // Replica a is in the middle of a pass.
        let Claim::Acquired(_) = fleet
            .coordinator
            .claim("pullthrough:lease:evictor", "http://a", EVICTOR_LEASE)
            .await
            .unwrap()
        else {
            panic!("the lease is free");
        };
        assert_eq!(
            b.evict().await,
            Pass::Busy {
                holder: "http://a".into()
            }
        );
        assert!(fleet.holds(&old).await, "b deleted nothing");
        // a died mid-pass: its lease expires and b takes over.
        tokio::time::advance(EVICTOR_LEASE + Duration::from_secs(1)).await;
        assert!(matches!(b.evict().await, Pass::Evicted { objects: 1, .. }));
        assert!(!fleet.holds(&old).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_counter_that_drifted_is_set_right_once_every_object_was_looked_at() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        let digest = fleet.publish(&a, 1, 1000).await;
        a.flush().await;
        assert_eq!(a.evict().await, Pass::Within { bytes: 1000 });
        // Published twice (e.g. while the coordinator was down): counted twice.
        a.published(Kind::Blob, &digest, 1000);
        a.flush().await;
        let _reading = a.read(Kind::Blob, &digest).await;
        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 0,
                bytes: 0,
                remaining: 1000
            }
        );
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
        assert_eq!(a.evict().await, Pass::Within { bytes: 1000 });
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_is_recounted_from_the_bucket_once_an_hour_for_the_fleet() {
        let fleet = Fleet::new();
        let (a, b) = (
            fleet.replica("http://a", 1500),
            fleet.replica("http://b", 1500),
        );
        let old = fleet.publish(&a, 1, 1000).await;
        let new = fleet.publish(&b, 2, 1000).await;
        a.flush().await;
        b.flush().await;
        // Redis lost the counter (a restart without persistence), not the access set.
        fleet
            .coordinator
            .delete("pullthrough:shared:bytes")
            .await
            .unwrap();
        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 1,
                bytes: 1000,
                remaining: 1000
            }
        );
        assert!(!fleet.holds(&old).await);
        assert!(fleet.holds(&new).await);

        fleet
            .coordinator
            .delete("pullthrough:shared:bytes")
            .await
            .unwrap();
        assert_eq!(
            b.evict().await,
            Pass::Within { bytes: 0 },
            "not due again yet"
        );
        tokio::time::advance(RECONCILE_EVERY).await;
        assert_eq!(b.evict().await, Pass::Within { bytes: 1000 });
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn objects_missing_from_the_access_set_are_found_in_the_bucket_and_evicted() {
        let fleet = Fleet::new();
        let dead = fleet.replica("http://dead", 1500);
        let kept = fleet.publish(&dead, 1, 1000).await;
        let orphan = fleet.publish(&dead, 2, 1000).await;
        // The replica died before its flush: the fleet never heard of either object. And the
        // access set names one that is gone.
        drop(dead);
        let gone = "blobs/sha256/".to_owned() + &"ab".repeat(32) + " 500";
        let access = format!("pullthrough:{ACCESS}");
        fleet
            .coordinator
            .zadd(&access, vec![(gone.clone(), 1.0)])
            .await
            .unwrap();

        let b = fleet.replica("http://b", 1500);
        assert_eq!(
            b.evict().await,
            Pass::Evicted {
                objects: 1,
                bytes: 1000,
                remaining: 1000
            },
            "the recount found 2000 bytes in the bucket"
        );
        assert_ne!(
            fleet.holds(&kept).await,
            fleet.holds(&orphan).await,
            "one of the two was evicted"
        );
        let members: Vec<String> = fleet
            .coordinator
            .zrange(&access, f64::NEG_INFINITY, f64::INFINITY, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        assert_eq!(members.len(), 1, "{members:?}");
        assert!(!members.contains(&gone), "the gone member was dropped");
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_pages_past_the_objects_it_keeps() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1150);
        let mut digests = Vec::new();
        for i in 0..120u8 {
            digests.push(fleet.publish(&a, i, 10).await);
        }
        a.flush().await;
        let mut guards = Vec::new();
        for d in &digests[..PAGE + 10] {
            guards.push(a.read(Kind::Blob, d).await);
        }
        assert_eq!(
            a.evict().await,
            Pass::Evicted {
                objects: 5,
                bytes: 50,
                remaining: 1150
            }
        );
        for (i, d) in digests.iter().enumerate() {
            let evicted = (PAGE + 10..PAGE + 15).contains(&i);
            assert_eq!(fleet.holds(d).await, !evicted, "object {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accesses_wait_for_a_coordinator_that_is_down() {
        let fleet = Fleet::new();
        let a = fleet.replica("http://a", 1000);
        fleet.coordinator.set_down(true);
        fleet.publish(&a, 1, 1000).await;
        a.flush().await;
        assert_eq!(a.evict().await, Pass::Unavailable);
        fleet.coordinator.set_down(false);
        // Asked again half a lease after the last failure.
        fleet.clock.advance(Duration::from_secs(3));
        a.flush().await;
        assert_eq!(fleet.bytes().await.as_deref(), Some(&b"1000"[..]));
    }

    #[test]
    fn an_access_set_member_names_its_object_and_size() {
        let object = Object {
            kind: Kind::Manifest,
            digest: Digest::sha256_of(b"m"),
        };
        assert_eq!(Object::parse(&object.member(42)), Some((object, 42)));
        assert_eq!(Object::parse("blobs/sha256/zz 1"), None);
        assert_eq!(Object::parse("elsewhere/sha256/00 1"), None);
    }
}
