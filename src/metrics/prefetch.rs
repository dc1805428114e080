//! Prefetch: what became of each blob of a served image manifest the mirror was asked to
//! prefetch, and how many wait for a slot or hold one.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::labels::PrefetchLabels;
use super::Metrics;
use crate::outcome::Prefetched;

/// The counts since start and the gauges now, for the status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchTotals {
    pub started: u64,
    pub held: u64,
    pub in_flight: u64,
    pub no_space: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Waiting for a prefetch slot.
    pub queued: i64,
    /// Holding one: deciding, or waiting for a download they started to end.
    pub running: i64,
}

pub(super) struct PrefetchMetrics {
    outcomes: Family<PrefetchLabels, Counter>,
    /// The series of `outcomes`, in the order of [`Prefetched::ALL`], resolved once: counted
    /// without hashing labels.
    by_outcome: [Counter; 6],
    queued: Gauge,
    running: Gauge,
}

impl PrefetchMetrics {
    pub(super) fn new() -> PrefetchMetrics {
        let outcomes: Family<PrefetchLabels, Counter> = Family::default();
        let by_outcome = Prefetched::ALL
            .map(|outcome| outcomes.get_or_create(&PrefetchLabels { outcome }).clone());
        PrefetchMetrics {
            outcomes,
            by_outcome,
            queued: Gauge::default(),
            running: Gauge::default(),
        }
    }

    fn counter(&self, outcome: Prefetched) -> &Counter {
        let i = match outcome {
            Prefetched::Started => 0,
            Prefetched::Held => 1,
            Prefetched::InFlight => 2,
            Prefetched::NoSpace => 3,
            Prefetched::Failed => 4,
            Prefetched::Skipped => 5,
        };
        &self.by_outcome[i]
    }
}

impl Metrics {
    pub(super) fn register_prefetch(&self, r: &mut Registry) {
        r.register(
            "prefetch",
            "Blobs of served image manifests asked to be prefetched, by outcome: started (a download the prefetch started got going), held (already on disk), in_flight (already downloading or queued), no_space (the disk cannot take it), failed (the download failed before its first byte), skipped (queue full, no request slot to spare, upstream backing off, or queued too long)",
            self.prefetch.outcomes.clone(),
        );
        r.register(
            "prefetch_queued",
            "Prefetches waiting for a slot (cache.prefetch_concurrency)",
            self.prefetch.queued.clone(),
        );
        r.register(
            "prefetch_running",
            "Prefetches holding a slot: deciding, or waiting for the download they started",
            self.prefetch.running.clone(),
        );
    }

    pub fn prefetched(&self, outcome: Prefetched) {
        self.prefetch.counter(outcome).inc();
    }

    /// A prefetch joined (`true`) or left (`false`) the queue.
    pub fn prefetch_queued(&self, joined: bool) {
        if joined {
            self.prefetch.queued.inc();
        } else {
            self.prefetch.queued.dec();
        }
    }

    /// A prefetch took (`true`) or gave back (`false`) a slot.
    pub fn prefetch_running(&self, took: bool) {
        if took {
            self.prefetch.running.inc();
        } else {
            self.prefetch.running.dec();
        }
    }

    pub fn prefetch_totals(&self) -> PrefetchTotals {
        let count = |o| self.prefetch.counter(o).get();
        PrefetchTotals {
            started: count(Prefetched::Started),
            held: count(Prefetched::Held),
            in_flight: count(Prefetched::InFlight),
            no_space: count(Prefetched::NoSpace),
            failed: count(Prefetched::Failed),
            skipped: count(Prefetched::Skipped),
            queued: self.prefetch.queued.get(),
            running: self.prefetch.running.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Format;

    #[test]
    fn each_outcome_counts_in_its_own_series() {
        let m = Metrics::new();
        for (n, outcome) in Prefetched::ALL.into_iter().enumerate() {
            for _ in 0..=n {
                m.prefetched(outcome);
            }
        }
        let text = m.encode(Format::Text);
        for (n, outcome) in Prefetched::ALL.into_iter().enumerate() {
            let series = format!(
                "pullthrough_prefetch_total{{outcome=\"{}\"}} {}\n",
                outcome.label(),
                n + 1
            );
            assert!(text.contains(&series), "{series} in\n{text}");
        }
        let totals = m.prefetch_totals();
        assert_eq!((totals.started, totals.skipped), (1, 6));
    }
}
