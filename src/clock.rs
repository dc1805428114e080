//! Time: the clock the pull layer reads, and the one conversion between `SystemTime` and the
//! Unix seconds stored on disk.
//!
//! Tag TTLs, the negative cache and the upstream back-off are decided against [`Clock::now`],
//! so tests move time forward with [`Clock::advance`] instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The system clock, plus an offset that only a manual clock moves.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Milliseconds added to the system time; `None` for the plain system clock.
    offset_ms: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that runs with the system clock and jumps forward on [`Clock::advance`].
    pub fn manual() -> Clock {
        Clock {
            offset_ms: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    pub fn now(&self) -> SystemTime {
        let offset = self
            .offset_ms
            .as_ref()
            .map_or(0, |o| o.load(Ordering::Relaxed));
        SystemTime::now() + Duration::from_millis(offset)
    }

    /// How long ago `then` was; zero for a time in the future.
    pub fn since(&self, then: SystemTime) -> Duration {
        self.now().duration_since(then).unwrap_or(Duration::ZERO)
    }

    /// Moves a manual clock forward; does nothing to the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(o) = &self.offset_ms {
            let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
            o.fetch_add(ms, Ordering::Relaxed);
        }
    }
}

/// Whole seconds since the Unix epoch; 0 for times before it.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch; 0 for times before it.
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

pub fn from_unix_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Serde for a time stored as whole Unix seconds (`#[serde(with = "clock::as_unix_secs")]`).
pub mod as_unix_secs {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(super::unix_secs(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(super::from_unix_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_advances_and_the_system_clock_does_not() {
        let manual = Clock::manual();
        let before = manual.now();
        manual.advance(Duration::from_secs(3600));
        assert!(manual.since(before) >= Duration::from_secs(3600));
        let system = Clock::system();
        let t = system.now();
        system.advance(Duration::from_secs(3600));
        assert!(system.since(t) < Duration::from_secs(60));
    }

    #[test]
    fn unix_seconds_round_trip() {
        assert_eq!(unix_secs(from_unix_secs(1_700_000_000)), 1_700_000_000);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), 0);
    }
}
