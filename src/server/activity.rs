//! What one connection is doing, for its watchdog in `server`: how many requests are in flight
//! (from the service call to the end of the response body) and since when it has had none.
//! An HTTP/2 connection that never completes a request, or a connection that has half a
//! request header, has none in flight however many bytes or frames it sends.
//!
//! It is also the waker of the watchdog's own futures (its timer and the shutdown signal), so
//! that the connection's task polls them only when they fired, not on each of the connection's
//! I/O wake-ups (a shutdown signal that is polled locks a mutex shared by every connection).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Wake;
use std::time::Duration;

use futures_util::task::AtomicWaker;

use crate::handlers::body::WriteWatch;
use tokio::time::Instant;

pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last request in flight ended (or the connection opened), in nanoseconds since
    /// `opened`.
    idle_since: AtomicU64,
    opened: Instant,
    /// Set when a watchdog future was woken; starts set, so that it is polled once.
    watchdog_woken: AtomicBool,
    /// The connection's task, woken with the watchdog.
    task: AtomicWaker,
    /// Bytes of response data this connection holds against the process's budget.
    held: AtomicUsize,
    /// Set when it gives some back (its client read) or starts holding; cleared by each look
    /// of the budget's shedding (`stalled_since_last_look`). A flag, not a time: this is
    /// written per chunk, and a clock read there would cost every HTTP/2 response.
    moved: AtomicBool,
    /// The budget closes this connection (it holds the most of it).
    shed: AtomicBool,
    /// HTTP/1.x: the response body handed hyper a chunk that hyper has not yet written (it
    /// asks for the next once the last is out), and how many times it was asked so far.
    writing: AtomicBool,
    body_polls: AtomicU64,
}

/// One request in flight; it ends when this drops.
pub struct InFlight(Arc<Activity>);

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            opened: Instant::now(),
            watchdog_woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
            held: AtomicUsize::new(0),
            moved: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            body_polls: AtomicU64::new(0),
        }
    }

    /// Response data charged to this connection (see `budget`).
    pub fn hold(&self, n: usize) {
        if self.held.fetch_add(n, Ordering::Relaxed) == 0 {
            self.moved.store(true, Ordering::Relaxed);
        }
    }

    pub fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Whether it holds some of the budget and has given none back since the last look (the
    /// budget looks once per `SHED_AFTER` while it is spent): its client does not read. A slow
    /// reader that reads at all keeps moving. Each look starts the next interval.
    pub fn stalled_since_last_look(&self) -> bool {
        let moved = self.moved.swap(false, Ordering::Relaxed);
        self.held() > 0 && !moved
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Resolves once a response has had a chunk waiting to be written for `limit` with no
    /// other asked for meanwhile: its client reads nothing. Looks every quarter of `limit`
    /// (so it fires between `limit` and 1.25 x `limit`), costing the hot path two relaxed
    /// atomic writes per chunk and no clock.
    pub async fn stalled_writing(&self, limit: Duration) {
        let mut last = self.body_polls.load(Ordering::Relaxed);
        let mut quiet = 0u32;
        loop {
            tokio::time::sleep(limit / 4).await;
            let polls = self.body_polls.load(Ordering::Relaxed);
            let stalled = self.in_flight() > 0 && self.writing.load(Ordering::Relaxed);
            quiet = if stalled && polls == last {
                quiet + 1
            } else {
                0
            };
            last = polls;
            if quiet >= 4 {
                return;
            }
        }
    }

    /// Tells the connection's task to drop the connection (through the watchdog).
    pub fn shed(self: &Arc<Self>) {
        self.shed.store(true, Ordering::Release);
        self.wake_by_ref();
    }

    pub fn is_shed(&self) -> bool {
        self.shed.load(Ordering::Acquire)
    }

    /// For the connection's task, each time it is polled: remembers its waker, and says whether
    /// the watchdog's futures were woken since they were last polled (so need polling now,
    /// with a waker made from this `Activity`).
    pub fn watchdog_due(&self, task: &std::task::Waker) -> bool {
        self.task.register(task);
        self.watchdog_woken.swap(false, Ordering::AcqRel)
    }

    /// A request starts; keep the guard until its response body is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Restarts the idle clock, as if the last request had just ended.
    pub fn touch(&self) {
        self.idle_since.store(self.now(), Ordering::SeqCst);
    }

    /// Resolves once no request has been in flight for `limit`. It looks at the connection
    /// once per `limit` while requests are in flight, rather than being woken by each request
    /// that ends: a busy connection pays no timer per request.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            if self.in_flight() > 0 {
                // Whenever the last one ends, it moves `idle_since` to then.
                tokio::time::sleep(limit).await;
                continue;
            }
            let since = Duration::from_nanos(self.idle_since.load(Ordering::SeqCst));
            let deadline = self.opened + since + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// HTTP/1.x response bodies report here (see [`Activity::stalled_writing`]).
impl WriteWatch for Activity {
    /// hyper asks the response body for a chunk: the last one is written.
    fn polled(&self) {
        self.writing.store(false, Ordering::Relaxed);
        self.body_polls.fetch_add(1, Ordering::Relaxed);
    }

    /// The response body handed hyper a chunk to write.
    fn yielded(&self) {
        self.writing.store(true, Ordering::Relaxed);
    }
}

impl Wake for Activity {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.watchdog_woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // The clock first: whoever sees the count at zero then sees a time at least this late.
        a.touch();
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_the_last_request_ends_plus_the_limit() {
        let a = Arc::new(Activity::new());
        let limit = Duration::from_secs(10);
        let first = a.begin();
        let second = a.begin();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let waiting = tokio::spawn({
            let a = a.clone();
            async move {
                a.idle_for(limit).await;
                Instant::now()
            }
        });
        drop(first);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!waiting.is_finished(), "one request is still in flight");
        drop(second);
        let ended = Instant::now();
        let idle_at = waiting.await.unwrap();
        assert!(idle_at >= ended + limit, "{:?}", idle_at - ended);
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_is_idle_after_the_limit_and_touch_restarts_the_clock() {
        let a = Arc::new(Activity::new());
        let opened = Instant::now();
        a.idle_for(Duration::from_secs(5)).await;
        assert!(opened.elapsed() >= Duration::from_secs(5));
        a.touch();
        let touched = Instant::now();
        a.idle_for(Duration::from_secs(2)).await;
        assert!(touched.elapsed() >= Duration::from_secs(2));
    }
}
