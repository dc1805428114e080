//! An in-process [`Coordinator`]: the same contract as Redis, for tests (several mirrors in
//! one process share one) and to fake an outage (`set_down`). Expiry runs on tokio's clock, so
//! paused-time tests move it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use tokio::time::Instant;

use super::coordinator::{
    holder_of, lease_value, token_of, Claim, CoordError, CoordResult, Coordinator, Lease,
};
use crate::sync::lock;

/// A value and when it expires.
type Entry = (Vec<u8>, Option<Instant>);

#[derive(Default)]
pub struct MemoryCoordinator {
    values: Mutex<HashMap<String, Entry>>,
    sets: Mutex<HashMap<String, BTreeMap<String, f64>>>,
    down: AtomicBool,
    tokens: AtomicU64,
    requests: AtomicU64,
}

impl MemoryCoordinator {
    /// While down, every request fails as an unreachable Redis does.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Requests answered or refused so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn up(&self) -> CoordResult<()> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(CoordError::Down)
        } else {
            Ok(())
        }
    }

    fn live(&self, key: &str) -> Option<Vec<u8>> {
        let mut values = lock(&self.values);
        match values.get(key) {
            Some((_, Some(at))) if *at <= Instant::now() => {
                values.remove(key);
                None
            }
            Some((v, _)) => Some(v.clone()),
            None => None,
        }
    }

    fn put(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) {
        let expires = ttl.map(|t| Instant::now() + t);
        lock(&self.values).insert(key.to_owned(), (value, expires));
    }
}

fn ready<'a, T: Send + 'a>(r: CoordResult<T>) -> BoxFuture<'a, CoordResult<T>> {
    futures_util::future::ready(r).boxed()
}

impl Coordinator for MemoryCoordinator {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, CoordResult<Claim>> {
        ready(self.up().map(|()| {
            if let Some(v) = self.live(key) {
                return Claim::Held {
                    holder: holder_of(&String::from_utf8_lossy(&v)).to_owned(),
                };
            }
            let token = self.tokens.fetch_add(1, Ordering::SeqCst).to_string();
            self.put(key, lease_value(&token, holder).into_bytes(), Some(ttl));
            Claim::Acquired(Lease {
                key: key.to_owned(),
                token,
            })
        }))
    }

    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, CoordResult<bool>> {
        ready(self.up().map(|()| match self.live(&lease.key) {
            Some(v) if holds(&v, &lease.token) => {
                self.put(&lease.key, v, Some(ttl));
                true
            }
            _ => false,
        }))
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, CoordResult<()>> {
        ready(self.up().map(|()| {
            if self
                .live(&lease.key)
                .is_some_and(|v| holds(&v, &lease.token))
            {
                lock(&self.values).remove(&lease.key);
            }
        }))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, CoordResult<Option<Vec<u8>>>> {
        ready(self.up().map(|()| self.live(key)))
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, CoordResult<()>> {
        ready(self.up().map(|()| self.put(key, value, ttl)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, CoordResult<()>> {
        ready(self.up().map(|()| {
            lock(&self.values).remove(key);
        }))
    }

    fn add<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        window: Option<Duration>,
    ) -> BoxFuture<'a, CoordResult<i64>> {
        ready(self.up().map(|()| {
            let (old, ttl) = match self.live(key) {
                Some(v) => {
                    let expires = lock(&self.values).get(key).and_then(|(_, at)| *at);
                    let old = String::from_utf8_lossy(&v).parse::<i64>().unwrap_or(0);
                    (
                        old,
                        expires.map(|at| at.saturating_duration_since(Instant::now())),
                    )
                }
                None => (0, window),
            };
            let new = old + by;
            self.put(key, new.to_string().into_bytes(), ttl);
            new
        }))
    }

    fn zadd<'a>(
        &'a self,
        set: &'a str,
        members: Vec<(String, f64)>,
    ) -> BoxFuture<'a, CoordResult<()>> {
        ready(self.up().map(|()| {
            let mut sets = lock(&self.sets);
            let s = sets.entry(set.to_owned()).or_default();
            s.extend(members);
        }))
    }

    fn zrange<'a>(
        &'a self,
        set: &'a str,
        min: f64,
        max: f64,
        limit: usize,
    ) -> BoxFuture<'a, CoordResult<Vec<(String, f64)>>> {
        ready(self.up().map(|()| {
            let sets = lock(&self.sets);
            let mut found: Vec<(String, f64)> = sets
                .get(set)
                .map(|s| {
                    s.iter()
                        .filter(|(_, &score)| score >= min && score <= max)
                        .map(|(m, &score)| (m.clone(), score))
                        .collect()
                })
                .unwrap_or_default();
            found.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            found.truncate(limit);
            found
        }))
    }

    fn zrem<'a>(&'a self, set: &'a str, members: Vec<String>) -> BoxFuture<'a, CoordResult<()>> {
        ready(self.up().map(|()| {
            if let Some(s) = lock(&self.sets).get_mut(set) {
                for m in &members {
                    s.remove(m);
                }
            }
        }))
    }
}

/// Whether a stored lease value holds `token`.
fn holds(value: &[u8], token: &str) -> bool {
    token_of(&String::from_utf8_lossy(value)) == token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_exclusive_until_it_expires() {
        let c = MemoryCoordinator::default();
        let Claim::Acquired(first) = c.claim("k", "a", Duration::from_secs(5)).await.unwrap()
        else {
            panic!("first claim must win");
        };
        assert_eq!(
            c.claim("k", "b", Duration::from_secs(5)).await.unwrap(),
            Claim::Held { holder: "a".into() }
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!c.renew(&first, Duration::from_secs(5)).await.unwrap());
        assert!(matches!(
            c.claim("k", "b", Duration::from_secs(5)).await.unwrap(),
            Claim::Acquired(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_holder_cannot_renew_or_release_the_new_lease() {
        let c = MemoryCoordinator::default();
        let Claim::Acquired(old) = c.claim("k", "a", Duration::from_secs(1)).await.unwrap() else {
            panic!()
        };
        tokio::time::advance(Duration::from_secs(2)).await;
        let Claim::Acquired(new) = c.claim("k", "b", Duration::from_secs(5)).await.unwrap() else {
            panic!()
        };
        c.release(&old).await.unwrap();
        assert!(!c.renew(&old, Duration::from_secs(5)).await.unwrap());
        assert!(c.renew(&new, Duration::from_secs(5)).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_counter_keeps_the_window_of_its_first_add() {
        let c = MemoryCoordinator::default();
        let w = Some(Duration::from_secs(10));
        assert_eq!(c.add("n", 1, w).await.unwrap(), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(c.add("n", 1, w).await.unwrap(), 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.add("n", 1, w).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_down_coordinator_fails_every_request() {
        let c = MemoryCoordinator::default();
        c.set_down(true);
        assert!(c.get("k").await.is_err());
        c.set_down(false);
        assert_eq!(c.get("k").await.unwrap(), None);
    }
}
