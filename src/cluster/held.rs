//! A registration in the coordinator kept alive while its holder needs it: renewed every
//! period by a task of its own, withdrawn when dropped. A download lease
//! ([`super::LeaseGuard`]) and a shared-tier reader's registration
//! (`store::shared::readers`) are both one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// Still ours.
    Kept,
    /// Taken or expired: the holder must not act on it any more. Renewals stop.
    Lost,
    /// The coordinator could not be asked; nobody else can take it meanwhile. Try again.
    Unknown,
}

/// A registration renewed until dropped, then released.
pub struct Held {
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
    release: Option<Release>,
}

/// Makes the request that withdraws a registration (a closure, so that `Held` stays `Sync`).
pub type Release = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send + Sync>;

impl Held {
    /// Renews with `renew` every `period` (the first time one period from now) until dropped
    /// or lost; runs `release` once when dropped.
    pub fn start<R>(period: Duration, mut renew: R, release: Release) -> Held
    where
        R: FnMut() -> BoxFuture<'static, Renewed> + Send + 'static,
    {
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn({
            let lost = lost.clone();
            async move {
                let mut tick = tokio::time::interval(period);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if renew().await == Renewed::Lost {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        Held {
            lost,
            renewer,
            release: Some(release),
        }
    }

    /// Whether a renewal found the registration taken or expired.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewer.abort();
        // Outside a runtime (a test's end, shutdown) the registration simply expires.
        if let (Some(release), Ok(rt)) =
            (self.release.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(release());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test(start_paused = true)]
    async fn a_registration_is_renewed_each_period_until_lost_and_released_once_dropped() {
        let renewals = Arc::new(AtomicU32::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let held = Held::start(
            Duration::from_secs(5),
            {
                let renewals = renewals.clone();
                move || {
                    let n = renewals.fetch_add(1, Ordering::SeqCst) + 1;
                    Box::pin(async move {
                        match n {
                            1 => Renewed::Unknown,
                            2 => Renewed::Kept,
                            _ => Renewed::Lost,
                        }
                    })
                }
            },
            Box::new({
                let released = released.clone();
                move || Box::pin(async move { released.store(true, Ordering::SeqCst) })
            }),
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            renewals.load(Ordering::SeqCst),
            0,
            "renewed before a period"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(renewals.load(Ordering::SeqCst), 2);
        assert!(!held.is_lost(), "an unanswered renewal is not a loss");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(held.is_lost());
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(
            renewals.load(Ordering::SeqCst),
            3,
            "renewed after it was lost"
        );
        drop(held);
        tokio::task::yield_now().await;
        assert!(released.load(Ordering::SeqCst));
    }
}
