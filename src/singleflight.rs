//! Single-flight: at most one piece of work per key at a time, shared by everyone who asks
//! while it runs.
//!
//! [`Flights`] is the table: the first caller for a key becomes the leader and holds a
//! [`FlightGuard`]; later callers join the same shared state. The guard removes the entry when
//! dropped, which happens on every outcome — success, error, or a panic unwinding the leader's
//! task — so a later caller never waits on work that no longer exists.
//!
//! [`Coalesce`] builds request coalescing for values (manifest and tag lookups) on top: the
//! leader's future runs in its own task, so a caller that goes away does not cancel it for the
//! others.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub struct Flights<K, S> {
    table: Arc<Mutex<HashMap<K, Arc<S>>>>,
}

impl<K, S> Default for Flights<K, S> {
    fn default() -> Self {
        Flights {
            table: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// Whether the caller started the work or joined it.
pub enum Joined<K: Hash + Eq, S> {
    Leader(Arc<S>, FlightGuard<K, S>),
    Follower(Arc<S>),
}

/// Held by the leader; removes the flight from the table when dropped.
pub struct FlightGuard<K: Hash + Eq, S> {
    table: Arc<Mutex<HashMap<K, Arc<S>>>>,
    key: Option<K>,
    state: Arc<S>,
}

impl<K: Hash + Eq, S> Drop for FlightGuard<K, S> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut table = lock(&self.table);
        // Only remove our own entry, never a newer flight for the same key.
        if table.get(&key).is_some_and(|s| Arc::ptr_eq(s, &self.state)) {
            table.remove(&key);
        }
    }
}

use crate::sync::lock;

impl<K: Hash + Eq + Clone, S> Flights<K, S> {
    pub fn join_or_start(&self, key: &K, start: impl FnOnce() -> S) -> Joined<K, S> {
        let mut table = lock(&self.table);
        if let Some(state) = table.get(key) {
            return Joined::Follower(state.clone());
        }
        let state = Arc::new(start());
        table.insert(key.clone(), state.clone());
        Joined::Leader(
            state.clone(),
            FlightGuard {
                table: self.table.clone(),
                key: Some(key.clone()),
                state,
            },
        )
    }

    pub fn get(&self, key: &K) -> Option<Arc<S>> {
        lock(&self.table).get(key).cloned()
    }

    /// Every flight in progress, for the status page.
    pub fn snapshot(&self) -> Vec<(K, Arc<S>)> {
        lock(&self.table)
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }
}

/// The leader's task ended without a result (it panicked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared request was abandoned")]
pub struct Abandoned;

/// Coalesces concurrent computations of the same value.
pub struct Coalesce<K, T> {
    flights: Flights<K, watch::Sender<Option<T>>>,
}

impl<K, T> Default for Coalesce<K, T> {
    fn default() -> Self {
        Coalesce {
            flights: Flights::default(),
        }
    }
}

impl<K, T> Coalesce<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless the same key is already running, and returns its result with
    /// whether this caller joined someone else's run.
    pub async fn run<F, Fut>(&self, key: &K, work: F) -> Result<(T, bool), Abandoned>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (tx, coalesced) = match self.flights.join_or_start(key, || watch::channel(None).0) {
            Joined::Leader(tx, guard) => {
                let fut = work();
                let sender = tx.clone();
                tokio::spawn(async move {
                    let value = fut.await;
                    sender.send_replace(Some(value));
                    drop(guard);
                });
                (tx, false)
            }
            Joined::Follower(tx) => (tx, true),
        };
        let mut rx = tx.subscribe();
        drop(tx);
        let value = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Abandoned)?
            .clone();
        value.map(|v| (v, coalesced)).ok_or(Abandoned)
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.flights.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let c = Arc::new(Coalesce::<u32, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (c, runs, barrier) = (c.clone(), runs.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                c.run(&1, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    42
                })
                .await
            }));
        }
        let mut coalesced = 0;
        for t in tasks {
            let (v, joined) = t.await.unwrap().unwrap();
            assert_eq!(v, 42);
            coalesced += usize::from(joined);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(coalesced, 15);
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn panicking_leader_leaves_no_entry_and_waiters_are_released() {
        let c = Coalesce::<u32, u32>::default();
        let r = c
            .run(&7, || async {
                panic!("boom");
            })
            .await;
        assert_eq!(r, Err(Abandoned));
        assert_eq!(c.in_flight(), 0);
        let (v, joined) = c.run(&7, || async { 1 }).await.unwrap();
        assert_eq!((v, joined), (1, false));
    }

    #[tokio::test]
    async fn cancelled_leader_caller_does_not_cancel_the_work() {
        let c = Arc::new(Coalesce::<u32, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let first = tokio::spawn({
            let c = c.clone();
            async move {
                c.run(&1, || async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    r2.fetch_add(1, Ordering::SeqCst);
                    5
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        let (v, joined) = c.run(&1, || async { 99 }).await.unwrap();
        assert_eq!((v, joined), (5, true));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
