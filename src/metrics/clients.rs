//! Clients' own upstream credentials (`credentials = "client"`): access confirmations by
//! outcome, and the pull budgets of the clients' accounts as one mirror-wide view (how many
//! are known, the lowest remaining), never by account.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::labels::UpstreamLabels;
use super::Metrics;

/// An upstream and a confirmation's outcome (`readable`, `refused`, `not_found`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfirmationLabels {
    upstream: String,
    outcome: &'static str,
}

pub(super) struct ClientMetrics {
    confirmations: Family<ConfirmationLabels, Counter>,
    budgets_known: Family<UpstreamLabels, Gauge>,
    budget_lowest: Family<UpstreamLabels, Gauge>,
}

impl ClientMetrics {
    pub(super) fn new() -> ClientMetrics {
        ClientMetrics {
            confirmations: Family::default(),
            budgets_known: Family::default(),
            budget_lowest: Family::default(),
        }
    }
}

impl Metrics {
    pub(super) fn register_clients(&self, r: &mut Registry) {
        r.register(
            "client_confirmations",
            "Upstream confirmations that a client's own credentials may read a repository, by upstream and outcome",
            self.clients.confirmations.clone(),
        );
        r.register(
            "client_pull_budgets",
            "Client accounts whose upstream pull budget the mirror has read (at most 1024 per upstream)",
            self.clients.budgets_known.clone(),
        );
        r.register(
            "client_pull_budget_lowest_remaining",
            "The fewest pulls any known client account has left (ratelimit-remaining)",
            self.clients.budget_lowest.clone(),
        );
    }

    pub fn client_confirmation(&self, upstream: &str, outcome: &'static str) {
        self.clients
            .confirmations
            .get_or_create(&ConfirmationLabels {
                upstream: upstream.to_owned(),
                outcome,
            })
            .inc();
    }

    /// The mirror-wide view of the clients' budgets: how many accounts, the lowest remaining.
    pub fn client_budgets(&self, upstream: &str, known: u64, lowest: Option<u64>) {
        let labels = UpstreamLabels {
            upstream: upstream.to_owned(),
        };
        self.clients
            .budgets_known
            .get_or_create(&labels)
            .set(known as i64);
        if let Some(lowest) = lowest {
            self.clients
                .budget_lowest
                .get_or_create(&labels)
                .set(lowest as i64);
        }
    }
}
