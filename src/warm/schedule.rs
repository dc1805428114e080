//! The `[warm]` schedule of a running server: the configured images walked through the pull
//! layer in process, at start and every `interval`, or daily at `at` (UTC), with one log
//! line per run. The task runs until the server aborts it at shutdown.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{warm, Local};
use crate::clock::{self, Clock};
use crate::config::{TimeOfDay, WarmConfig, WarmSchedule};
use crate::mirror::Mirror;

/// How often the clock is looked at while waiting for the next run: the schedule follows
/// the mirror's [`Clock`] (which tests move with `advance`), not a timer of its own.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The first run: at once for an interval, the next `at` for a daily time.
pub fn first_run(schedule: WarmSchedule, now: SystemTime) -> SystemTime {
    match schedule {
        WarmSchedule::Every(_) => now,
        WarmSchedule::DailyAt(at) => next_daily(at, now),
    }
}

/// The run after one that started at `started`.
pub fn next_run(schedule: WarmSchedule, started: SystemTime) -> SystemTime {
    match schedule {
        WarmSchedule::Every(every) => started + every,
        WarmSchedule::DailyAt(at) => next_daily(at, started + Duration::from_secs(1)),
    }
}

/// The first time of day `at` (UTC) at or after `after`.
fn next_daily(at: TimeOfDay, after: SystemTime) -> SystemTime {
    const DAY: u64 = 86_400;
    let secs = clock::unix_secs(after);
    let midnight = secs - secs % DAY;
    let today = midnight + at.seconds();
    let next = if today >= secs { today } else { today + DAY };
    clock::from_unix_secs(next)
}

/// Runs the schedule until aborted. Does nothing without images.
pub async fn run(mirror: Arc<Mirror>, config: WarmConfig, clock: Clock) {
    if config.images.is_empty() {
        return;
    }
    let schedule = config.schedule();
    let source = Local::new(mirror);
    let mut due = first_run(schedule, clock.now());
    loop {
        while let Ok(wait) = due.duration_since(clock.now()) {
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait.min(CHECK_EVERY)).await;
        }
        let started = clock.now();
        let summary = warm(&source, &config.images, &config.platforms, &()).await;
        due = next_run(schedule, started);
        let next = humantime::format_rfc3339_seconds(due).to_string();
        if summary.complete() {
            tracing::info!(next_run = %next, "scheduled warm done: {}", summary.line());
        } else {
            let failures: Vec<String> = summary
                .images
                .iter()
                .filter_map(|i| Some(format!("{}: {}", i.image, i.error.as_ref()?)))
                .collect();
            tracing::warn!(
                next_run = %next, failures = %failures.join("; "),
                "scheduled warm incomplete: {}", summary.line()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> TimeOfDay {
        TimeOfDay::try_from(s.to_owned()).unwrap()
    }

    #[test]
    fn a_daily_time_is_today_if_still_ahead_else_tomorrow() {
        // 2026-12-01 10:00:00 UTC
        let ten = clock::from_unix_secs(1_796_119_200);
        assert_eq!(clock::unix_secs(ten) % 86_400, 36_000);
        let schedule = WarmSchedule::DailyAt(at("11:30"));
        assert_eq!(
            clock::unix_secs(first_run(schedule, ten)),
            1_796_119_200 + 5400
        );
        let schedule = WarmSchedule::DailyAt(at("09:00"));
        assert_eq!(
            clock::unix_secs(first_run(schedule, ten)),
            1_796_119_200 + 23 * 3600
        );
        // A run that started at its time is followed by the next day's.
        let nine = clock::from_unix_secs(1_796_119_200 - 3600);
        assert_eq!(
            clock::unix_secs(next_run(schedule, nine)),
            1_796_119_200 - 3600 + 86_400
        );
    }

    #[test]
    fn an_interval_runs_at_start_then_after_each_start() {
        let now = clock::from_unix_secs(1_000_000);
        let schedule = WarmSchedule::Every(Duration::from_secs(3600));
        assert_eq!(first_run(schedule, now), now);
        assert_eq!(next_run(schedule, now), now + Duration::from_secs(3600));
    }
}
