//! A download the disk cannot take ([`Start::Relaying`](super::Start::Relaying)): the leader
//! still fetches the blob once, but into a window of memory that its clients read behind it,
//! instead of a temp file.
//!
//! The window holds at most [`WINDOW`] bytes (plus one write batch) whatever the blob's size.
//! The leader waits for the slowest [`Subscriber`] before it drops bytes; one that holds it
//! back longer than [`STALL`] is detached, so one stalled client never stalls the others, and
//! continues on a stream of its own (the caller's business). A relay nobody follows for
//! [`STALL`] stops ([`Unread`]): its bytes would reach no one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::WRITE_BATCH;
use crate::oci::Digest;
use crate::sync::lock;

/// The most a relay holds for its slowest follower: a few write batches, so a client a little
/// behind the others does not hold the leader at every batch.
pub const WINDOW: u64 = 4 * WRITE_BATCH as u64;

/// How long the leader waits for a follower that has not read what the window holds (or, with
/// none, for a first one) before it detaches it (or stops).
const STALL: Duration = Duration::from_secs(5);

/// A blob relayed from memory: shared by the leader's [`RelayWriter`] and its subscribers.
pub struct Relay {
    size: u64,
    state: Mutex<State>,
    /// Bumped on every change: new bytes, a follower that moved on or left, the end.
    changed: watch::Sender<u64>,
}

struct State {
    /// The offset of the first byte still held.
    base: u64,
    held: VecDeque<Bytes>,
    written: u64,
    /// Each follower's next offset, by subscription.
    cursors: HashMap<u64, u64>,
    next_id: u64,
    /// False once the leader stopped, at the end of the blob or not.
    open: bool,
}

impl State {
    /// Drops the oldest batches every follower has read, until `room` more bytes fit in the
    /// window: what fits is kept, for a client that joins late. With no follower, nothing
    /// goes.
    fn trim(&mut self, room: u64) {
        let Some(low) = self.cursors.values().min().copied() else {
            return;
        };
        while let Some(front) = self.held.front() {
            let end = self.base + front.len() as u64;
            if end > low || self.written - self.base + room <= WINDOW {
                break;
            }
            self.base = end;
            self.held.pop_front();
        }
    }

    /// The held bytes from `pos` (at least `base`, less than `written`), up to `end`, within
    /// one batch.
    fn slice(&self, pos: u64, end: u64) -> Bytes {
        let mut off = self.base;
        for b in &self.held {
            let len = b.len() as u64;
            if pos < off + len {
                let to = len.min(end - off);
                return b.slice((pos - off) as usize..to as usize);
            }
            off += len;
        }
        Bytes::new()
    }
}

/// Why a relay stopped before the end of the blob: nobody followed it for [`STALL`].
#[derive(Debug)]
pub struct Unread;

impl Relay {
    /// A relay of a `size`-byte blob, and the leader's side of it.
    pub(super) fn new(size: u64) -> (Arc<Relay>, RelayWriter) {
        let (changed, rx) = watch::channel(0);
        let relay = Arc::new(Relay {
            size,
            state: Mutex::new(State {
                base: 0,
                held: VecDeque::new(),
                written: 0,
                cursors: HashMap::new(),
                next_id: 0,
                open: true,
            }),
            changed,
        });
        let writer = RelayWriter {
            relay: relay.clone(),
            rx,
            hasher: Sha256::new(),
            written: 0,
        };
        (relay, writer)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes relayed so far.
    pub fn written(&self) -> u64 {
        lock(&self.state).written
    }

    /// Follows the relay from `from`. `None` when those bytes have gone by, when they are
    /// more than a window ahead (a stream of the follower's own gets there sooner), or when
    /// the relay stopped before them.
    pub fn subscribe(self: &Arc<Self>, from: u64) -> Option<Subscriber> {
        let rx = self.changed.subscribe();
        let mut st = lock(&self.state);
        if from < st.base || from > st.written + WINDOW || (!st.open && from >= st.written) {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.cursors.insert(id, from);
        drop(st);
        Some(Subscriber {
            relay: self.clone(),
            id,
            pos: from,
            rx,
        })
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// The leader's side: appends the blob's bytes, hashing them, at the pace of its followers.
/// Dropping it ends the relay; followers still read what it holds.
pub(super) struct RelayWriter {
    relay: Arc<Relay>,
    rx: watch::Receiver<u64>,
    hasher: Sha256,
    written: u64,
}

impl RelayWriter {
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// Appends `chunk` once the window has room for it: when every follower has read what
    /// it would push out, or, after [`STALL`], by detaching those that have not.
    pub(super) async fn write(&mut self, chunk: Bytes) -> Result<(), Unread> {
        let len = chunk.len() as u64;
        let mut hasher = std::mem::take(&mut self.hasher);
        let hashed = chunk.clone();
        // CPU work: off the async workers, as the disk writer's.
        self.hasher = tokio::task::spawn_blocking(move || {
            hasher.update(&hashed);
            hasher
        })
        .await
        .map_err(|_| Unread)?;
        let deadline = tokio::time::Instant::now() + STALL;
        let mut stalled = false;
        loop {
            self.rx.borrow_and_update();
            {
                let mut st = lock(&self.relay.state);
                st.trim(len);
                let held = st.written - st.base;
                if stalled {
                    // Those that have not read what this chunk pushes out read elsewhere;
                    // what is left holds at most a window and a batch.
                    let keep_from = (st.written + len).saturating_sub(WINDOW);
                    st.cursors.retain(|_, c| *c >= keep_from);
                    if st.cursors.is_empty() {
                        return Err(Unread);
                    }
                    st.trim(len);
                }
                if stalled || held == 0 || held + len <= WINDOW {
                    st.held.push_back(chunk);
                    st.written += len;
                    drop(st);
                    self.written += len;
                    self.relay.notify();
                    return Ok(());
                }
            }
            stalled = tokio::time::timeout_at(deadline, self.rx.changed())
                .await
                .is_err();
        }
    }

    /// Whether the bytes relayed are the blob `digest`.
    pub(super) fn finish(mut self, digest: &Digest) -> Result<(), Digest> {
        let actual = Digest::from_sha256(std::mem::take(&mut self.hasher).finalize().into());
        if actual == *digest {
            Ok(())
        } else {
            Err(actual)
        }
    }
}

impl Drop for RelayWriter {
    fn drop(&mut self) {
        lock(&self.relay.state).open = false;
        self.relay.notify();
    }
}

/// A follower of a relay, reading from its offset on.
pub struct Subscriber {
    relay: Arc<Relay>,
    id: u64,
    pos: u64,
    rx: watch::Receiver<u64>,
}

impl Subscriber {
    /// The bytes from where it is, up to `end`, once the leader has them. `None` when the
    /// relay can no longer give them (this follower was detached, or the relay stopped before
    /// them): the rest must come from elsewhere.
    pub async fn next(&mut self, end: u64) -> Option<Bytes> {
        loop {
            self.rx.borrow_and_update();
            {
                let mut st = lock(&self.relay.state);
                if !st.cursors.contains_key(&self.id) {
                    return None;
                }
                if self.pos < st.written {
                    let chunk = st.slice(self.pos, end);
                    self.pos += chunk.len() as u64;
                    if self.pos >= end {
                        // Read all it wants: it must not hold the leader while it sends it.
                        st.cursors.remove(&self.id);
                    } else {
                        st.cursors.insert(self.id, self.pos);
                    }
                    drop(st);
                    self.relay.notify();
                    return Some(chunk);
                }
                if !st.open {
                    return None;
                }
            }
            // The relay holds the sender: it cannot close while this is borrowed.
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if lock(&self.relay.state).cursors.remove(&self.id).is_some() {
            self.relay.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; n])
    }

    #[tokio::test]
    async fn followers_read_the_same_bytes_from_where_they_joined() {
        let (relay, mut w) = Relay::new(6);
        let mut a = relay.subscribe(0).unwrap();
        let mut b = relay.subscribe(2).unwrap();
        w.write(Bytes::from_static(b"abc")).await.unwrap();
        w.write(Bytes::from_static(b"def")).await.unwrap();
        drop(w);
        assert_eq!(a.next(6).await.unwrap(), "abc");
        assert_eq!(a.next(6).await.unwrap(), "def");
        assert_eq!(b.next(4).await.unwrap(), "c");
        assert_eq!(b.next(4).await.unwrap(), "d");
        assert!(a.next(6).await.is_none(), "read all it asked for");
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_stays_bounded_and_a_stalled_follower_is_detached() {
        let batch = WRITE_BATCH;
        let (relay, mut w) = Relay::new(100 * batch as u64);
        let mut stalled = relay.subscribe(0).unwrap();
        let mut reading = relay.subscribe(0).unwrap();
        let leader = tokio::spawn(async move {
            for _ in 0..20 {
                w.write(bytes(batch, 1)).await.unwrap();
            }
            w
        });
        let mut got = 0u64;
        while got < 20 * batch as u64 {
            got += reading.next(u64::MAX).await.unwrap().len() as u64;
            let st = lock(&relay.state);
            assert!(st.written - st.base <= WINDOW + batch as u64, "bounded");
        }
        drop(leader.await.unwrap());
        assert!(
            stalled.next(u64::MAX).await.is_none(),
            "detached: from elsewhere"
        );
        assert!(relay.subscribe(0).is_none(), "the start has gone by");
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_nobody_follows_stops() {
        let (relay, mut w) = Relay::new(100 * WRITE_BATCH as u64);
        let mut result = Ok(());
        for _ in 0..100 {
            result = w.write(bytes(WRITE_BATCH, 0)).await;
            if result.is_err() {
                break;
            }
        }
        assert!(result.is_err());
        assert!(relay.written() <= WINDOW + WRITE_BATCH as u64);
    }

    #[tokio::test]
    async fn a_follower_far_ahead_is_refused() {
        let (relay, _w) = Relay::new(100 * WINDOW);
        assert!(relay.subscribe(WINDOW + 1).is_none());
        assert!(relay.subscribe(WINDOW).is_some());
    }
}
