//! Docker Hub's pull budget, read from the `ratelimit-*` headers of manifest responses.

use std::sync::Mutex;
use std::time::SystemTime;

use http::HeaderMap;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub limit: u64,
    pub remaining: u64,
    /// The window in seconds (`w=` in the header).
    pub window_secs: u64,
    pub source: Option<String>,
    #[serde(serialize_with = "as_unix_secs")]
    pub updated: SystemTime,
}

fn as_unix_secs<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(crate::clock::unix_secs(*t))
}

/// `100;w=21600` → (100, 21600).
fn parse_value(v: &str) -> Option<(u64, Option<u64>)> {
    let mut parts = v.split(';');
    let n = parts.next()?.trim().parse().ok()?;
    let w = parts.find_map(|p| {
        p.trim()
            .strip_prefix("w=")
            .and_then(|w| w.trim().parse().ok())
    });
    Some((n, w))
}

/// The budget in `headers`, read at `now` (the mirror's clock).
pub fn parse(headers: &HeaderMap, now: SystemTime) -> Option<Budget> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (limit, w1) = parse_value(get("ratelimit-limit")?)?;
    let (remaining, w2) = parse_value(get("ratelimit-remaining")?)?;
    Some(Budget {
        limit,
        remaining,
        window_secs: w2.or(w1).unwrap_or(0),
        source: get("docker-ratelimit-source").map(str::to_owned),
        updated: now,
    })
}

/// The latest budget seen for one upstream and credential.
#[derive(Default)]
pub struct BudgetState {
    latest: Mutex<Option<Budget>>,
}

impl BudgetState {
    /// Records the budget in `headers`, if any; returns the new and the previous values.
    pub fn observe(
        &self,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<(Budget, Option<Budget>)> {
        let budget = parse(headers, now)?;
        let mut latest = crate::sync::lock(&self.latest);
        let previous = latest.replace(budget.clone());
        Some((budget, previous))
    }

    /// Takes `budget`, read by another replica, when it is newer than the latest seen here:
    /// replicas behind one address spend one budget, and the latest reading is the truth.
    /// Returns whether it was newer.
    pub fn learn(&self, budget: Budget) -> bool {
        let mut latest = crate::sync::lock(&self.latest);
        if latest.as_ref().is_some_and(|l| l.updated >= budget.updated) {
            return false;
        }
        *latest = Some(budget);
        true
    }

    pub fn latest(&self) -> Option<Budget> {
        crate::sync::lock(&self.latest).clone()
    }

    /// With a sliding window of `w` seconds for `limit` pulls, one pull frees up about every
    /// `w / limit` seconds: the best Retry-After when the upstream sends none.
    pub fn time_for_one_pull(&self) -> Option<std::time::Duration> {
        let b = self.latest()?;
        (b.limit > 0 && b.window_secs > 0)
            .then(|| std::time::Duration::from_secs((b.window_secs / b.limit).max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_headers() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        h.insert("docker-ratelimit-source", "192.0.2.1".parse().unwrap());
        let b = parse(&h, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!((b.limit, b.remaining, b.window_secs), (100, 76, 21600));
        assert_eq!(b.source.as_deref(), Some("192.0.2.1"));
    }

    #[test]
    fn only_a_newer_reading_is_learned() {
        let state = BudgetState::default();
        let at = |secs| crate::clock::from_unix_secs(secs);
        let reading = |remaining, updated| Budget {
            limit: 100,
            remaining,
            window_secs: 21600,
            source: None,
            updated,
        };
        assert!(state.learn(reading(50, at(1000))));
        assert!(!state.learn(reading(90, at(999))));
        assert!(state.learn(reading(40, at(1001))));
        assert_eq!(state.latest().map(|b| b.remaining), Some(40));
    }

    #[test]
    fn absent_or_garbled_headers_are_none() {
        assert!(parse(&HeaderMap::new(), SystemTime::UNIX_EPOCH).is_none());
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "lots".parse().unwrap());
        h.insert("ratelimit-remaining", "1".parse().unwrap());
        assert!(parse(&h, SystemTime::UNIX_EPOCH).is_none());
    }
}
