//! Upstream health: after repeated outage-type failures the upstream is marked down for a
//! back-off, during which requests fail at once (and are served stale where possible) instead
//! of each waiting for a timeout. When the back-off ends, one probe request goes through; its
//! success marks the upstream up, its failure doubles the back-off.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::clock::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Up,
    BackingOff,
}

#[derive(Debug)]
struct Inner {
    failures: u32,
    down_until: Option<SystemTime>,
    backoff: Duration,
    probing: bool,
}

#[derive(Debug)]
pub struct Health {
    /// The upstream URL, for the log.
    url: String,
    threshold: u32,
    base_backoff: Duration,
    max_backoff: Duration,
    clock: Clock,
    inner: Mutex<Inner>,
}

/// A change of state that the other replicas should learn (see `upstream::fleet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    BackingOff { until: SystemTime },
    Recovered,
}

/// Whether a request may go to the upstream; a probe must report its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    Probe,
    Refuse,
}

impl Health {
    pub fn new(url: &str, threshold: u32, backoff: Duration, clock: Clock) -> Health {
        Health {
            url: url.to_owned(),
            threshold: threshold.max(1),
            base_backoff: backoff,
            max_backoff: backoff * 16,
            clock,
            inner: Mutex::new(Inner {
                failures: 0,
                down_until: None,
                backoff,
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    pub fn admit(&self) -> Admission {
        let mut s = self.lock();
        match s.down_until {
            None => Admission::Go,
            Some(until) if self.clock.now() < until || s.probing => Admission::Refuse,
            Some(_) => {
                s.probing = true;
                Admission::Probe
            }
        }
    }

    /// Records a request's result: `outage` for unreachable, timeout and 5xx. Returns the
    /// change of state it made, if any.
    pub fn record(&self, admission: Admission, outage: bool) -> Option<Change> {
        let mut s = self.lock();
        if admission == Admission::Probe {
            s.probing = false;
        }
        if !outage {
            s.failures = 0;
            s.backoff = self.base_backoff;
            s.down_until.take()?;
            tracing::info!(url = %self.url, "upstream is answering again");
            return Some(Change::Recovered);
        }
        s.failures += 1;
        if admission == Admission::Probe {
            s.backoff = (s.backoff * 2).min(self.max_backoff);
        } else if s.failures >= self.threshold && s.down_until.is_none() {
            tracing::warn!(
                url = %self.url,
                failures = s.failures,
                backoff_secs = s.backoff.as_secs_f64(),
                "upstream failing repeatedly; backing off"
            );
        } else {
            return None;
        }
        let until = self.clock.now() + s.backoff;
        s.down_until = Some(until);
        Some(Change::BackingOff { until })
    }

    /// Backs off until `until` because another replica does, unless this one already backs
    /// off longer. Past `until`, one probe goes through as after a back-off of its own.
    pub fn learn(&self, until: SystemTime) {
        let mut s = self.lock();
        if until <= self.clock.now() || s.down_until.is_some_and(|d| d >= until) {
            return;
        }
        if s.down_until.is_none() {
            tracing::warn!(url = %self.url, "another replica backs off this upstream URL; so does this one");
        }
        s.down_until = Some(until);
    }

    pub fn state(&self) -> State {
        if self.lock().down_until.is_some() {
            State::BackingOff
        } else {
            State::Up
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_after_threshold_then_probes_once() {
        let clock = Clock::manual();
        let h = Health::new("http://a", 2, Duration::from_millis(20), clock.clone());
        h.record(h.admit(), true);
        assert_eq!(h.admit(), Admission::Go);
        h.record(Admission::Go, true);
        assert_eq!(h.state(), State::BackingOff);
        assert_eq!(h.admit(), Admission::Refuse);
        clock.advance(Duration::from_millis(30));
        assert_eq!(h.admit(), Admission::Probe);
        assert_eq!(h.admit(), Admission::Refuse, "one probe at a time");
        h.record(Admission::Probe, false);
        assert_eq!(h.state(), State::Up);
        assert_eq!(h.admit(), Admission::Go);
    }

    #[test]
    fn failed_probe_doubles_the_backoff() {
        let clock = Clock::manual();
        let h = Health::new("http://a", 1, Duration::from_secs(10), clock.clone());
        h.record(Admission::Go, true);
        clock.advance(Duration::from_secs(15));
        assert_eq!(h.admit(), Admission::Probe);
        h.record(Admission::Probe, true);
        clock.advance(Duration::from_secs(12));
        assert_eq!(h.admit(), Admission::Refuse, "back-off doubled to 20 s");
    }

    #[test]
    fn a_learned_back_off_refuses_until_it_ends_then_probes() {
        let clock = Clock::manual();
        let h = Health::new("http://a", 3, Duration::from_secs(10), clock.clone());
        h.learn(clock.now() - Duration::from_secs(1));
        assert_eq!(h.state(), State::Up, "an expired back-off is not learned");
        h.learn(clock.now() + Duration::from_secs(30));
        assert_eq!(h.admit(), Admission::Refuse);
        h.learn(clock.now() + Duration::from_secs(5));
        clock.advance(Duration::from_secs(20));
        assert_eq!(
            h.admit(),
            Admission::Refuse,
            "a shorter one does not shorten it"
        );
        clock.advance(Duration::from_secs(11));
        assert_eq!(h.admit(), Admission::Probe);
        assert_eq!(h.record(Admission::Probe, false), Some(Change::Recovered));
        assert_eq!(h.state(), State::Up);
    }

    #[test]
    fn only_changes_of_state_are_reported() {
        let clock = Clock::manual();
        let h = Health::new("http://a", 2, Duration::from_secs(10), clock.clone());
        assert_eq!(h.record(Admission::Go, false), None);
        assert_eq!(h.record(Admission::Go, true), None);
        let before = clock.now() + Duration::from_secs(10);
        let change = h.record(Admission::Go, true);
        assert!(
            matches!(change, Some(Change::BackingOff { until }) if until >= before),
            "{change:?}"
        );
    }
}
