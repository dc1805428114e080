//! `[warm]`: images pulled through the cache on a schedule, and the schedule.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::{ImageRef, Platform};

/// `[warm]`: images the running mirror pulls through its cache on a schedule, so that they are
/// hot before clients ask (see `pullthrough warm` for a one-off run).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmConfig {
    /// Images as users write them: `alpine:3.19`, `ghcr.io/org/app:1.0`,
    /// `library/alpine@sha256:…` (the registry must be a key of `[upstreams]`). Default: none,
    /// and no schedule runs.
    pub images: Vec<ImageRef>,
    /// Platforms of multi-platform images to warm (`linux/amd64`, `linux/arm64/v8`).
    /// Default: empty, every platform in the index.
    pub platforms: Vec<Platform>,
    /// Time between two runs; the first starts with the server. Default 24 h (when `at` is
    /// not set). Setting both `interval` and `at` is an error.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Run once a day at this time, UTC (`"05:30"`), instead of every `interval`; the first
    /// run is the next such time after start. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<TimeOfDay>,
    /// Pin what is warmed: the `images` (their `platforms`) are never evicted, as `[[pin]]`
    /// entries would be. Default `false`.
    pub pin: bool,
}

/// When the `[warm]` list is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmSchedule {
    /// At start, then this long after each run began.
    Every(Duration),
    /// Every day at this time, UTC.
    DailyAt(TimeOfDay),
}

impl WarmConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

    pub fn schedule(&self) -> WarmSchedule {
        match (self.at, self.interval) {
            (Some(at), _) => WarmSchedule::DailyAt(at),
            (None, every) => WarmSchedule::Every(every.unwrap_or(Self::DEFAULT_INTERVAL)),
        }
    }
}

/// A time of day, `HH:MM` (24-hour clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeOfDay {
    minutes: u16,
}

impl TimeOfDay {
    /// Seconds after midnight.
    pub fn seconds(self) -> u64 {
        u64::from(self.minutes) * 60
    }
}

impl TryFrom<String> for TimeOfDay {
    type Error = String;

    fn try_from(s: String) -> Result<TimeOfDay, String> {
        let bad = || format!("invalid time {s:?}: expected HH:MM (UTC, 24-hour), e.g. 05:30");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        let digits = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(h) || !digits(m) {
            return Err(bad());
        }
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(TimeOfDay {
            minutes: h * 60 + m,
        })
    }
}

impl From<TimeOfDay> for String {
    fn from(t: TimeOfDay) -> String {
        format!("{:02}:{:02}", t.minutes / 60, t.minutes % 60)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::*;

    #[test]
    fn warm_section_parses_images_platforms_and_a_schedule() {
        let c = Config::from_toml(
            "[warm]\nimages = [\"alpine:3.19\", \"docker.io/library/busybox\"]\n\
             platforms = [\"linux/amd64\"]\nat = \"05:30\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.warm.images[0].to_string(),
            "docker.io/library/alpine:3.19"
        );
        assert_eq!(c.warm.platforms[0].to_string(), "linux/amd64");
        let WarmSchedule::DailyAt(at) = c.warm.schedule() else {
            panic!("{:?}", c.warm.schedule());
        };
        assert_eq!(at.seconds(), 5 * 3600 + 30 * 60);
        assert_eq!(
            Config::default().warm.schedule(),
            WarmSchedule::Every(Duration::from_secs(86400))
        );
        let text = c.to_redacted_toml().unwrap();
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back.warm.images, c.warm.images);
        assert_eq!(back.warm.at, c.warm.at);
    }

    #[test]
    fn bad_warm_values_are_named() {
        let e = Config::from_toml("[warm]\nimages = [\"Alpine\"]\n").unwrap_err();
        assert!(e.contains("images") && e.contains("Alpine"), "{e}");
        let e = Config::from_toml("[warm]\nat = \"25:00\"\n").unwrap_err();
        assert!(e.contains("HH:MM"), "{e}");
        let e = Config::from_toml("[warm]\nplatforms = [\"amd64\"]\n").unwrap_err();
        assert!(e.contains("os/architecture"), "{e}");
        let both = Config::from_toml("[warm]\ninterval = \"1h\"\nat = \"01:00\"\n").unwrap();
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let elsewhere = Config::from_toml("[warm]\nimages = [\"quay.io/x/y\"]\n").unwrap();
        let e = elsewhere.validate().unwrap_err().to_string();
        assert!(e.contains("warm.images") && e.contains("quay.io"), "{e}");
    }
}
