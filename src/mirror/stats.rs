//! What the status page shows beyond the metrics: a ring of samples for the last hour's chart,
//! and the repositories clients ask for most. Both bounded.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::metrics::Totals;

/// How often [`History`] is sampled (by the server), and how much it keeps.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const SAMPLES: usize = 360;

/// One interval's activity.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// The end of the interval, in Unix seconds.
    pub t: u64,
    pub lookups: u64,
    pub hits: u64,
    pub bytes_cache: u64,
    pub bytes_upstream: u64,
}

/// The last hour, one [`Sample`] per [`SAMPLE_EVERY`].
#[derive(Default)]
pub struct History {
    inner: Mutex<(Option<Totals>, VecDeque<Sample>)>,
}

impl History {
    /// Records the activity since the previous call.
    pub fn sample(&self, now: SystemTime, totals: Totals) {
        let mut inner = crate::sync::lock(&self.inner);
        let (last, ring) = &mut *inner;
        let prev = last.replace(totals).unwrap_or_default();
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(Sample {
            t: crate::clock::unix_secs(now),
            lookups: totals.lookups.saturating_sub(prev.lookups),
            hits: totals.hits.saturating_sub(prev.hits),
            bytes_cache: totals.bytes_cache.saturating_sub(prev.bytes_cache),
            bytes_upstream: totals.bytes_upstream.saturating_sub(prev.bytes_upstream),
        });
    }

    pub fn samples(&self) -> Vec<Sample> {
        crate::sync::lock(&self.inner).1.iter().cloned().collect()
    }
}

/// Requests and body bytes per repository, for at most [`REPOS`] repositories: a new one
/// beyond that replaces the least requested.
#[derive(Default)]
pub struct Repositories {
    /// Repository → (requests, bytes, the registry of its latest request).
    table: Mutex<crate::hashing::Map<String, (u64, u64, String)>>,
}

const REPOS: usize = 1000;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RepoRow {
    pub registry: String,
    pub repository: String,
    pub requests: u64,
    pub bytes: u64,
}

impl Repositories {
    pub fn record(&self, registry: &str, repository: &str, bytes: u64) {
        let mut table = crate::sync::lock(&self.table);
        if let Some((requests, total, last)) = table.get_mut(repository) {
            *requests += 1;
            *total += bytes;
            // Only when two registries share a repository name does this allocate.
            if last != registry {
                *last = registry.to_owned();
            }
            return;
        }
        if table.len() >= REPOS {
            if let Some(least) = table
                .iter()
                .min_by_key(|(_, (requests, _, _))| *requests)
                .map(|(k, _)| k.clone())
            {
                table.remove(&least);
            }
        }
        table.insert(repository.to_owned(), (1, bytes, registry.to_owned()));
    }

    /// The `n` repositories with most requests, and the `n` with most bytes.
    pub fn top(&self, n: usize) -> (Vec<RepoRow>, Vec<RepoRow>) {
        let rows: Vec<RepoRow> = crate::sync::lock(&self.table)
            .iter()
            .map(|(k, (requests, bytes, registry))| RepoRow {
                registry: registry.clone(),
                repository: k.clone(),
                requests: *requests,
                bytes: *bytes,
            })
            .collect();
        let mut by_requests = rows.clone();
        by_requests.sort_by(|a, b| (b.requests, &a.repository).cmp(&(a.requests, &b.repository)));
        by_requests.truncate(n);
        let mut by_bytes = rows;
        by_bytes.sort_by(|a, b| (b.bytes, &a.repository).cmp(&(a.bytes, &b.repository)));
        by_bytes.truncate(n);
        (by_requests, by_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_an_hour_of_deltas() {
        let h = History::default();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        for i in 1..=400u64 {
            h.sample(
                at,
                Totals {
                    lookups: 2 * i,
                    hits: i,
                    bytes_cache: 10 * i,
                    bytes_upstream: 0,
                },
            );
        }
        let s = h.samples();
        assert_eq!(s.len(), SAMPLES);
        assert!(s
            .iter()
            .all(|s| s.lookups == 2 && s.hits == 1 && s.bytes_cache == 10));
    }

    #[test]
    fn the_repository_table_stays_bounded() {
        let r = Repositories::default();
        r.record("docker.io", "big", 1 << 30);
        r.record("docker.io", "big", 0);
        for _ in 0..3 {
            r.record("docker.io", "busy", 1);
        }
        for i in 0..2 * REPOS {
            r.record("docker.io", &format!("r{i}"), 1);
        }
        assert!(crate::sync::lock(&r.table).len() <= REPOS);
        let (by_requests, by_bytes) = r.top(3);
        assert_eq!(by_requests[0].repository, "busy");
        assert_eq!(by_bytes[0].repository, "big");
    }
}
