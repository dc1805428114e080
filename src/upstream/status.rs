//! What the status page shows of an upstream: its state, each URL's health and budget and
//! which one served last, and the latest failures.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::ratelimit::Budget;
use super::{health, Error, Upstream};

/// One configured URL of an upstream as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UrlStatus {
    pub url: String,
    pub state: health::State,
    /// The pull budget this URL last reported.
    #[serde(serialize_with = "budget_as_shown")]
    pub budget: Option<Budget>,
    /// Whether this URL gave the latest successful answer.
    pub served_last: bool,
}

/// A budget as the status page shows it: [`Budget`]'s fields, `updated` in Unix seconds
/// (its own serde form, the cluster's, has `updated_ms`).
fn budget_as_shown<S: serde::Serializer>(budget: &Option<Budget>, s: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    budget
        .as_ref()
        .map(|b| {
            serde_json::json!({
                "limit": b.limit,
                "remaining": b.remaining,
                "window_secs": b.window_secs,
                "source": b.source,
                "updated": crate::clock::unix_secs(b.updated),
            })
        })
        .serialize(s)
}

/// How many failures an upstream remembers for the status page.
const RECENT_ERRORS: usize = 20;

impl Upstream {
    /// The latest failures with their causes, oldest first.
    pub fn recent_errors(&self) -> Vec<(SystemTime, String)> {
        crate::sync::lock(&self.recent_errors)
            .iter()
            .cloned()
            .collect()
    }

    /// Up while any of its URLs is; backing off when all are.
    pub fn state(&self) -> health::State {
        if self
            .endpoints
            .iter()
            .any(|e| e.health.state() == health::State::Up)
        {
            health::State::Up
        } else {
            health::State::BackingOff
        }
    }

    /// Each configured URL in order, with its health and budget, and which one served last.
    pub fn urls(&self) -> Vec<UrlStatus> {
        let last = self.served_last.load(Ordering::Relaxed);
        self.endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| UrlStatus {
                url: e.url.clone(),
                state: e.health.state(),
                budget: e.budget.latest(),
                served_last: i == last,
            })
            .collect()
    }

    /// Remembers a failure of URL `url` (not a 404) for the status page; the URL is named
    /// when the upstream has several.
    pub(super) fn record_error(&self, url: &str, e: &Error) {
        let mut recent = crate::sync::lock(&self.recent_errors);
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        let error = if self.endpoints.len() > 1 {
            format!("{url}: {e}")
        } else {
            e.to_string()
        };
        recent.push_back((self.clock.now(), error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_urls_budget_shows_updated_in_seconds() {
        let status = UrlStatus {
            url: "https://registry-1.docker.io".into(),
            state: health::State::Up,
            budget: Some(Budget {
                limit: 100,
                remaining: 76,
                window_secs: 21600,
                source: Some("203.0.113.7".into()),
                updated: crate::clock::from_unix_millis(1_763_899_200_500),
            }),
            served_last: true,
        };
        let v = serde_json::to_value(&status).unwrap_or_default();
        assert_eq!(
            v["budget"],
            serde_json::json!({"limit": 100, "remaining": 76, "window_secs": 21600,
                "source": "203.0.113.7", "updated": 1_763_899_200u64})
        );
        let none = UrlStatus {
            budget: None,
            ..status
        };
        let v = serde_json::to_value(&none).unwrap_or_default();
        assert!(v["budget"].is_null());
    }
}
