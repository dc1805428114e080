//! An upstream's pull budget as the client spends it: the `max_pulls` cap (the fleet's with
//! `[cluster]`, see `fleet`), the readings each URL reports (parsed in `ratelimit`), the warning
//! when one runs low, the budget gauges, and the reserve (`budget_reserve`) that pulls a stale
//! answer can replace should not eat into.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderMap;

use super::ratelimit::Budget;
use super::{Error, Upstream};
use crate::identity::Identity;

/// The most client accounts whose budget is remembered per upstream; the least recently
/// reported go first.
pub(super) const MAX_CLIENT_BUDGETS: u64 = 1024;

impl Upstream {
    /// Records the budget a client's account reported, and updates the mirror-wide view of
    /// the clients' budgets (how many, the lowest remaining), which never names an account.
    pub(super) fn observe_client_budget(&self, identity: Identity, headers: &HeaderMap) {
        let Some(budget) = super::ratelimit::parse(headers, self.clock.now()) else {
            return;
        };
        self.client_budgets.insert(identity, budget);
        self.client_budgets.run_pending_tasks();
        let lowest = self.client_budgets.iter().map(|(_, b)| b.remaining).min();
        self.metrics
            .client_budgets(&self.name, self.client_budgets.entry_count(), lowest);
    }

    /// The clients' budgets as the status page shows them: how many accounts, the lowest
    /// remaining.
    pub fn client_budgets(&self) -> (u64, Option<u64>) {
        let lowest = self.client_budgets.iter().map(|(_, b)| b.remaining).min();
        (self.client_budgets.entry_count(), lowest)
    }

    /// The pull budget of the URL the next request goes to.
    pub fn budget(&self) -> Option<Budget> {
        self.next_endpoint().budget.latest()
    }

    /// Takes one pull from `max_pulls`, if configured: from the fleet's count for the current
    /// window (a fixed window, started by its first pull) when the coordinator answers, else
    /// from this replica's own limiter.
    pub(super) async fn spend_pull(&self) -> Result<(), Error> {
        let max = self.config.max_pulls;
        if max == 0 {
            return Ok(());
        }
        let window = self.config.max_pulls_window;
        match self.count_fleet_pull(window).await {
            None => self.spend_local_pull(),
            Some(spent) if spent <= i64::from(max) => Ok(()),
            Some(_) => {
                tracing::warn!(upstream = %self.name, "the fleet's pull cap (max_pulls) is reached");
                Err(Error::TooManyRequests {
                    message: format!("the mirror's pull cap for {} is reached", self.name),
                    // When the window ends is Redis's to know; one pull's share of it is the
                    // usual wait.
                    retry_after: Some((window / max).max(Duration::from_secs(1))),
                })
            }
        }
    }

    /// Takes one pull from this replica's own cap, if one is configured.
    pub(super) fn spend_local_pull(&self) -> Result<(), Error> {
        let Some(cap) = &self.pull_cap else {
            return Ok(());
        };
        cap.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            tracing::warn!(upstream = %self.name, "the mirror's own pull cap (max_pulls) is reached");
            Error::TooManyRequests {
                message: format!("the mirror's pull cap for {} is reached", self.name),
                retry_after: Some(wait.max(Duration::from_secs(1))),
            }
        })
    }

    /// Records the budget a URL reported, and returns it. The upstream's budget gauges follow
    /// its first URL, the one whose budget is normally spent; the status page shows each URL's.
    pub(super) fn observe_budget(&self, endpoint: usize, headers: &HeaderMap) -> Option<Budget> {
        let url = self.endpoints.get(endpoint)?;
        let (budget, previous) = url.budget.observe(headers, self.clock.now())?;
        if endpoint == 0 {
            self.gauge_budget(&budget);
        }
        let threshold = (budget.limit as f64 * self.config.budget_warn_ratio) as u64;
        let was_above = previous.is_none_or(|p| p.remaining > threshold);
        if budget.remaining <= threshold && was_above {
            tracing::warn!(
                upstream = %self.name,
                url = %url.url,
                remaining = budget.remaining,
                limit = budget.limit,
                window_secs = budget.window_secs,
                source = budget.source.as_deref().unwrap_or(""),
                "upstream pull budget is running low"
            );
        }
        Some(budget)
    }

    /// At or below the reserve: spend no GET that a stale answer can replace.
    pub fn budget_is_low(&self) -> bool {
        self.budget()
            .is_some_and(|b| b.remaining <= self.config.budget_reserve)
    }

    /// Manifest GETs sent since start: the requests that count as pulls.
    pub fn counted_pulls(&self) -> u64 {
        self.counted_pulls.load(Ordering::Relaxed)
    }

    /// Sets the budget gauges to `budget` (of the upstream's first URL).
    pub(super) fn gauge_budget(&self, budget: &Budget) {
        self.metrics.budget(
            &self.name,
            budget.limit,
            budget.remaining,
            budget.window_secs,
            budget.updated,
        );
    }
}
