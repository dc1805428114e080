//! Reader protection: a reader of a shared-tier object registers in `readers:<object name>`
//! (a sorted set scored by when the registration expires, renewed while it reads,
//! [`ReadGuard`]); the evictor marks `evicting:<object name>` before it looks for readers, so
//! either the reader registered first (and the evictor sees it) or it sees the mark and reads
//! elsewhere. Nobody is left reading a deleted object.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Ledger;
use crate::clock::{self, Clock};
use crate::cluster::held::{Held, Release, Renewed};
use crate::cluster::Cluster;
use crate::oci::Digest;
use crate::store::tier::{object_name, Kind};
use futures_util::future::BoxFuture;

/// How long a reader's registration lasts without a renewal: a replica that dies mid-read
/// protects the object this long. Renewed every third of it.
pub(super) const READ_TTL: Duration = Duration::from_secs(15);

/// Whether a reader may read an object of the shared tier.
pub enum Reading {
    /// Registered: the object is not evicted while the guard lives.
    Protected(ReadGuard),
    /// The evictor is deleting it: read it from elsewhere (a peer, the upstream).
    Evicting,
}

impl Ledger {
    /// Registers a reader of the object before it is read; hold the guard while reading.
    pub async fn read(&self, kind: Kind, digest: &Digest) -> Reading {
        let name = object_name(kind, digest);
        let set = readers_key(&name);
        let id = self.reader_id();
        let expires = self.expiry(READ_TTL);
        // Unregistered while the coordinator is down: no evictor can check readers then.
        self.cluster.zadd(&set, vec![(id.clone(), expires)]).await;
        if self.is_marked(&name).await {
            self.cluster.zrem(&set, vec![id]).await;
            return Reading::Evicting;
        }
        Reading::Protected(ReadGuard::start(
            self.cluster.clone(),
            self.clock.clone(),
            set,
            id,
        ))
    }

    /// Protects the object for `ttl` without a guard, for a reader this replica does not see
    /// (a client sent to a presigned URL valid that long). `false`: the evictor is deleting
    /// it, so do not send the client there.
    pub async fn lend(&self, kind: Kind, digest: &Digest, ttl: Duration) -> bool {
        let name = object_name(kind, digest);
        let set = readers_key(&name);
        self.cluster
            .zadd(&set, vec![(self.reader_id(), self.expiry(ttl))])
            .await;
        !self.is_marked(&name).await
    }

    /// A reader's id, unique in the cluster: this replica's URL and a sequence number.
    pub(super) fn reader_id(&self) -> String {
        let n = self.readers.fetch_add(1, Ordering::Relaxed);
        format!("{} {n}", self.cluster.advertise())
    }

    pub(super) async fn is_marked(&self, name: &str) -> bool {
        let key = format!("evicting:{name}");
        matches!(self.cluster.get(&key).await, Some(Some(_)))
    }
}

pub(super) fn readers_key(name: &str) -> String {
    format!("readers:{name}")
}

/// A registered reader: renews its registration every third of [`READ_TTL`] until dropped,
/// then withdraws it.
pub struct ReadGuard {
    /// Held for its drop, which withdraws the registration.
    _held: Held,
}

impl ReadGuard {
    pub(super) fn start(cluster: Arc<Cluster>, clock: Clock, set: String, id: String) -> ReadGuard {
        let renew = {
            let (cluster, set, id) = (cluster.clone(), set.clone(), id.clone());
            move || -> BoxFuture<'static, Renewed> {
                let (cluster, set, id) = (cluster.clone(), set.clone(), id.clone());
                let expires = clock::unix_millis(clock.now()) as f64 + READ_TTL.as_millis() as f64;
                Box::pin(async move {
                    cluster.zadd(&set, vec![(id, expires)]).await;
                    // A registration is ours alone: nobody else can take it.
                    Renewed::Kept
                })
            }
        };
        let release: Release = Box::new(move || {
            Box::pin(async move {
                cluster.zrem(&set, vec![id]).await;
            })
        });
        ReadGuard {
            _held: Held::start(READ_TTL / 3, renew, release),
        }
    }
}
