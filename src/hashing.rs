//! The hasher of the maps a cache hit looks in (the index, the repository links, the routing
//! and upstream tables, the in-memory caches). std's default, SipHash-1-3, was one tenth of a
//! cached manifest's instructions (`bench/profile.sh`). foldhash is several times faster on
//! short keys and still seeded at random per process, so keys a client chooses (a repository
//! name in the busy-repository table, an address in the connection cap) cannot be made to
//! collide ahead of time; the other maps hold only what an upstream or the configuration
//! confirmed.

pub type State = foldhash::fast::RandomState;
pub type Map<K, V> = std::collections::HashMap<K, V, State>;
pub type Set<K> = std::collections::HashSet<K, State>;
