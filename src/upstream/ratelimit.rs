//! Docker Hub's pull budget, read from the `ratelimit-*` headers of manifest responses.

use std::sync::Mutex;
use std::time::SystemTime;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// A pull budget reading: what an answer's `ratelimit-*` headers said, and when. The one type
/// for it: kept per URL (`BudgetState`), shared with the other replicas (`fleet`), shown on the
/// status page (`status`) and by the budget gauges (`budget`, as plain numbers: `metrics` is
/// below this layer).
///
/// Its serde form is what replicas share through the cluster, `updated` in Unix milliseconds
/// as `updated_ms`: `{"limit":100,"remaining":76,"window_secs":21600,"source":null,
/// "updated_ms":1763899200000}`. Replicas of other versions read and write it: change it only
/// in ways they still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub limit: u64,
    pub remaining: u64,
    /// The window in seconds (`w=` in the header).
    pub window_secs: u64,
    pub source: Option<String>,
    #[serde(rename = "updated_ms", with = "unix_millis")]
    pub updated: SystemTime,
}

/// `SystemTime` as Unix milliseconds.
mod unix_millis {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(crate::clock::unix_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(crate::clock::from_unix_millis)
    }
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

    /// The form replicas of earlier versions wrote to the cluster (their `SharedBudget`) and
    /// read from it: read as it is, written the same, byte for byte.
    #[test]
    fn the_shared_form_is_the_one_replicas_already_exchange() {
        let old = r#"{"limit":100,"remaining":76,"window_secs":21600,"source":"192.0.2.1","updated_ms":1763899200123}"#;
        let b: Budget = serde_json::from_str(old).unwrap();
        assert_eq!((b.limit, b.remaining, b.window_secs), (100, 76, 21600));
        assert_eq!(b.source.as_deref(), Some("192.0.2.1"));
        assert_eq!(crate::clock::unix_millis(b.updated), 1763899200123);
        assert_eq!(serde_json::to_string(&b).unwrap(), old);
        let anonymous =
            r#"{"limit":100,"remaining":76,"window_secs":0,"source":null,"updated_ms":5}"#;
        let b: Budget = serde_json::from_str(anonymous).unwrap();
        assert_eq!(b.source, None);
        assert_eq!(serde_json::to_string(&b).unwrap(), anonymous);
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
