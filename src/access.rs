//! Who may use the mirror, and how much: the per-client request limit.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::ServerConfig;

/// Requests per client address within a window; `None` when unlimited.
pub struct ClientLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl ClientLimit {
    pub fn from_config(server: &ServerConfig) -> Option<ClientLimit> {
        let n = NonZeroU32::new(server.client_requests)?;
        let quota = Quota::with_period(server.client_window / n.get())?.allow_burst(n);
        Some(ClientLimit {
            limiter: governor::RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        })
    }

    /// `Err(wait)` when `client` has used up its requests.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        // Forget idle clients now and then, so the table does not grow for ever.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}
