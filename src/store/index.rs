//! The index of committed files: sizes, least-recently-used order, and the size bound.
//!
//! Written by hand rather than with moka: the bound needs a low watermark (evict in batches,
//! not one file per request), and a restart must restore the LRU order, which means reading
//! the order back out; moka evicts one entry at a time and keeps its order private.
//!
//! The lock is a plain mutex held only for map updates, never across I/O or an await.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::oci::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
        }
    }

    fn code(self) -> char {
        match self {
            Kind::Blob => 'b',
            Kind::Manifest => 'm',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub digest: Digest,
}

impl Key {
    pub fn blob(digest: &Digest) -> Key {
        Key {
            kind: Kind::Blob,
            digest: digest.clone(),
        }
    }

    pub fn manifest(digest: &Digest) -> Key {
        Key {
            kind: Kind::Manifest,
            digest: digest.clone(),
        }
    }
}

/// One indexed file, as the index and its snapshot know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    pub size: u64,
    /// Seconds since the epoch of the last access.
    pub last_access: u64,
    /// Hashed and found correct by this process (committed by it, or verified on a read).
    pub verified: bool,
}

impl Entry {
    /// One snapshot line: `b <hex> <size> <last_access>`.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.key.kind.code(),
            self.key.digest.hex(),
            self.size,
            self.last_access
        )
    }

    pub fn from_line(line: &str) -> Option<Entry> {
        let mut parts = line.split(' ');
        let kind = match parts.next()? {
            "b" => Kind::Blob,
            "m" => Kind::Manifest,
            _ => return None,
        };
        let digest: Digest = format!("sha256:{}", parts.next()?).parse().ok()?;
        let size = parts.next()?.parse().ok()?;
        let last_access = parts.next()?.parse().ok()?;
        Some(Entry {
            key: Key { kind, digest },
            size,
            last_access,
            verified: false,
        })
    }
}

pub fn now_secs() -> u64 {
    crate::clock::unix_secs(SystemTime::now())
}

struct Slot {
    size: u64,
    tick: u64,
    last_access: u64,
    verified: bool,
}

#[derive(Default)]
struct Inner {
    slots: crate::hashing::Map<Key, Slot>,
    /// Access order: the smallest tick is the least recently used.
    order: BTreeMap<u64, Key>,
    next_tick: u64,
    total: u64,
}

impl Inner {
    fn bump(&mut self, key: &Key) -> Option<&mut Slot> {
        let tick = self.next_tick;
        let slot = self.slots.get_mut(key)?;
        // Already the most recently used (a hot object hit again and again): the order stays.
        if slot.tick + 1 == tick {
            slot.last_access = now_secs();
            return Some(slot);
        }
        self.order.remove(&slot.tick);
        slot.tick = tick;
        slot.last_access = now_secs();
        self.order.insert(tick, key.clone());
        self.next_tick += 1;
        Some(slot)
    }

    fn remove(&mut self, key: &Key) -> Option<Slot> {
        let slot = self.slots.remove(key)?;
        self.order.remove(&slot.tick);
        self.total -= slot.size;
        Some(slot)
    }

    /// Removes least-recently-used entries until the total is at most `target`, sparing
    /// `keep` and every pinned entry (so pinned content alone may stay above `target`).
    fn evict_to(&mut self, target: u64, keep: Option<&Key>, pinned: &HashSet<Key>) -> Vec<Key> {
        let mut evicted = Vec::new();
        let mut skipped = Vec::new();
        while self.total > target {
            let Some((tick, key)) = self.order.pop_first() else {
                break;
            };
            if Some(&key) == keep || pinned.contains(&key) {
                skipped.push((tick, key));
                continue;
            }
            if let Some(slot) = self.slots.remove(&key) {
                self.total -= slot.size;
            }
            evicted.push(key);
        }
        self.order.extend(skipped);
        evicted
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub entries: usize,
    pub bytes: u64,
    pub oldest_access: Option<u64>,
    pub newest_access: Option<u64>,
}

/// The keys pinned content resolves to (`store::pins`): never evicted, from the local disk
/// or the shared tier. Shared by the index and the shared tier's evictor; replaced whole.
#[derive(Clone, Default)]
pub struct Pinned(Arc<RwLock<HashSet<Key>>>);

impl Pinned {
    pub fn contains(&self, key: &Key) -> bool {
        crate::sync::read(&self.0).contains(key)
    }

    pub fn replace(&self, keys: HashSet<Key>) {
        *crate::sync::write(&self.0) = keys;
    }
}

/// The pinned entries the index holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinnedStats {
    pub entries: usize,
    pub bytes: u64,
}

pub struct Index {
    inner: Mutex<Inner>,
    /// Read under `inner`'s lock, never the other way round.
    pinned: Pinned,
    /// Hard bound in bytes; `None` = unbounded.
    max: Option<u64>,
    /// Evict down to this once the bound is crossed.
    low: Option<u64>,
    dirty: AtomicBool,
}

impl Index {
    pub fn new(max: Option<u64>, low_watermark: Option<u64>) -> Index {
        Index {
            inner: Mutex::new(Inner::default()),
            pinned: Pinned::default(),
            max,
            low: low_watermark,
            dirty: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent before it can panic.
        crate::sync::lock(&self.inner)
    }

    pub fn max(&self) -> Option<u64> {
        self.max
    }

    /// The pinned set this index spares (shared with the shared tier's evictor).
    pub fn pinned(&self) -> &Pinned {
        &self.pinned
    }

    /// How many pinned entries are held, and their bytes.
    pub fn pinned_stats(&self) -> PinnedStats {
        let inner = self.lock();
        let pinned = crate::sync::read(&self.pinned.0);
        let mut stats = PinnedStats::default();
        for key in pinned.iter() {
            if let Some(slot) = inner.slots.get(key) {
                stats.entries += 1;
                stats.bytes += slot.size;
            }
        }
        stats
    }

    /// The sizes of those of `keys` that are indexed.
    pub fn sizes<'a>(&self, keys: impl IntoIterator<Item = &'a Key>) -> HashMap<Key, u64> {
        let inner = self.lock();
        keys.into_iter()
            .filter_map(|k| Some((k.clone(), inner.slots.get(k)?.size)))
            .collect()
    }

    /// Whether a file of `size` bytes may be kept at all.
    pub fn fits(&self, size: u64) -> bool {
        self.max.is_none_or(|max| size <= max)
    }

    /// Whether `key` is indexed, without counting an access (a look that is not a read, such as
    /// a prefetch's, must not keep content from eviction).
    pub fn contains(&self, key: &Key) -> bool {
        self.lock().slots.contains_key(key)
    }

    /// Records an access; the entry's size and whether it was verified, if indexed.
    pub fn touch(&self, key: &Key) -> Option<(u64, bool)> {
        let mut inner = self.lock();
        let slot = inner.bump(key)?;
        let found = (slot.size, slot.verified);
        self.dirty.store(true, Ordering::Relaxed);
        Some(found)
    }

    /// Adds (or replaces) an entry as the most recently used, and returns what must be
    /// evicted to stay within the bound.
    pub fn insert(&self, key: Key, size: u64, verified: bool) -> Vec<Key> {
        let mut inner = self.lock();
        inner.remove(&key);
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.order.insert(tick, key.clone());
        inner.slots.insert(
            key.clone(),
            Slot {
                size,
                tick,
                last_access: now_secs(),
                verified,
            },
        );
        inner.total += size;
        self.dirty.store(true, Ordering::Relaxed);
        match self.max {
            Some(max) if inner.total > max => {
                let target = self.low.unwrap_or(max).min(max);
                inner.evict_to(target, Some(&key), &crate::sync::read(&self.pinned.0))
            }
            _ => Vec::new(),
        }
    }

    /// Loads entries in least-recently-used-first order (start-up).
    pub fn load(&self, entries: impl IntoIterator<Item = Entry>) -> Vec<Key> {
        let mut inner = self.lock();
        for e in entries {
            let tick = inner.next_tick;
            inner.next_tick += 1;
            if let Some(old) = inner.slots.insert(
                e.key.clone(),
                Slot {
                    size: e.size,
                    tick,
                    last_access: e.last_access,
                    verified: e.verified,
                },
            ) {
                inner.order.remove(&old.tick);
                inner.total -= old.size;
            }
            inner.order.insert(tick, e.key);
            inner.total += e.size;
        }
        match self.max {
            Some(max) if inner.total > max => {
                let target = self.low.unwrap_or(max).min(max);
                inner.evict_to(target, None, &crate::sync::read(&self.pinned.0))
            }
            _ => Vec::new(),
        }
    }

    pub fn remove(&self, key: &Key) {
        if self.lock().remove(key).is_some() {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub fn mark_verified(&self, key: &Key) {
        if let Some(slot) = self.lock().slots.get_mut(key) {
            slot.verified = true;
        }
    }

    /// Frees at least `bytes` by evicting least-recently-used entries (for a download that
    /// would not otherwise fit on the disk).
    pub fn evict_bytes(&self, bytes: u64) -> Vec<Key> {
        let mut inner = self.lock();
        let target = inner.total.saturating_sub(bytes);
        inner.evict_to(target, None, &crate::sync::read(&self.pinned.0))
    }

    pub fn total(&self) -> u64 {
        self.lock().total
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let accesses = inner.slots.values().map(|s| s.last_access);
        Stats {
            entries: inner.slots.len(),
            bytes: inner.total,
            oldest_access: accesses.clone().min(),
            newest_access: accesses.max(),
        }
    }

    /// Every entry, least recently used first; clears the dirty flag.
    pub fn snapshot(&self) -> Vec<Entry> {
        self.dirty.store(false, Ordering::Relaxed);
        let inner = self.lock();
        inner
            .order
            .values()
            .filter_map(|key| {
                let slot = inner.slots.get(key)?;
                Some(Entry {
                    key: key.clone(),
                    size: slot.size,
                    last_access: slot.last_access,
                    verified: slot.verified,
                })
            })
            .collect()
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key::blob(&Digest::sha256_of(&[n]))
    }

    #[test]
    fn evicts_least_recently_used_down_to_the_low_watermark() {
        let idx = Index::new(Some(100), Some(60));
        for n in 0..5 {
            assert!(idx.insert(key(n), 20, true).is_empty());
        }
        idx.touch(&key(0));
        let evicted = idx.insert(key(5), 20, true);
        // 120 > 100: evict down to 60, oldest first, sparing the touched 0.
        assert_eq!(evicted, vec![key(1), key(2), key(3)]);
        assert_eq!(idx.total(), 60);
        assert!(idx.touch(&key(0)).is_some());
    }

    #[test]
    fn never_evicts_the_entry_being_inserted() {
        let idx = Index::new(Some(50), None);
        idx.insert(key(0), 40, true);
        let evicted = idx.insert(key(1), 45, true);
        assert_eq!(evicted, vec![key(0)]);
        assert_eq!(idx.total(), 45);
        assert!(!idx.fits(51));
    }

    #[test]
    fn pinned_entries_are_never_evicted_and_keep_their_place() {
        let idx = Index::new(Some(100), None);
        for n in 0..5 {
            idx.insert(key(n), 20, true);
        }
        idx.pinned().replace(HashSet::from([key(0), key(2)]));
        // 120 > 100: the oldest unpinned one goes, the pinned 0 stays.
        assert_eq!(idx.insert(key(5), 20, true), vec![key(1)]);
        assert_eq!(
            idx.pinned_stats(),
            PinnedStats {
                entries: 2,
                bytes: 40
            }
        );
        // Everything unpinned goes before a pinned entry does.
        assert_eq!(idx.evict_bytes(1000), vec![key(3), key(4), key(5)]);
        assert_eq!(idx.total(), 40);
        let order: Vec<_> = idx.snapshot().into_iter().map(|e| e.key).collect();
        assert_eq!(order, vec![key(0), key(2)]);
        idx.pinned().replace(HashSet::new());
        assert_eq!(idx.evict_bytes(1), vec![key(0)]);
    }

    #[test]
    fn snapshot_round_trips_in_lru_order() {
        let idx = Index::new(None, None);
        for n in 0..3 {
            idx.insert(key(n), 10 + n as u64, false);
        }
        idx.touch(&key(0));
        let snap = idx.snapshot();
        let order: Vec<_> = snap.iter().map(|e| e.key.clone()).collect();
        assert_eq!(order, vec![key(1), key(2), key(0)]);
        let lines: Vec<_> = snap.iter().map(Entry::to_line).collect();
        let back: Vec<_> = lines.iter().filter_map(|l| Entry::from_line(l)).collect();
        let idx2 = Index::new(None, None);
        idx2.load(back);
        assert_eq!(
            idx2.snapshot()
                .iter()
                .map(|e| e.key.clone())
                .collect::<Vec<_>>(),
            order
        );
        assert_eq!(idx2.total(), 33);
        assert_eq!(Entry::from_line("x y z"), None);
    }
}
