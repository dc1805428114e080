//! A thread's memory of the series it last counted in a family. A hot path counts under the
//! same few label sets again and again, and the family's own lookup hashes the labels
//! (SipHash) under a lock every thread shares; this looks first among the thread's last
//! [`SLOTS`] series, by comparing labels.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;

use prometheus_client::metrics::family::{Family, MetricConstructor};

const SLOTS: usize = 16;

/// Tells apart the [`Metrics`](super::Metrics) of one process (tests run many).
pub(super) fn next_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The series a thread last used, with the labels and owner each was made for.
pub(super) struct Memo<L, M>(VecDeque<(u64, L, M)>);

impl<L, M> Memo<L, M> {
    pub(super) const fn new() -> Memo<L, M> {
        Memo(VecDeque::new())
    }
}

/// [`with`] for labels the caller has made already: compared whole, and kept if new.
pub(super) fn with_labels<L, M, C>(
    memo: &'static LocalKey<RefCell<Memo<L, M>>>,
    owner: u64,
    family: &Family<L, M, C>,
    labels: L,
    count: impl FnOnce(&M),
) where
    L: Clone + Eq + Hash + 'static,
    M: Clone + 'static,
    C: MetricConstructor<M>,
{
    with(
        memo,
        owner,
        |l| *l == labels,
        || {
            let series = family.get_or_create(&labels).clone();
            (labels.clone(), series)
        },
        count,
    );
}

/// Runs `count` on the series of `owner`'s family whose labels `matches`; `make` gives the
/// labels and the series when this thread has not used it lately.
pub(super) fn with<L: 'static, M: 'static>(
    memo: &'static LocalKey<RefCell<Memo<L, M>>>,
    owner: u64,
    matches: impl Fn(&L) -> bool,
    make: impl FnOnce() -> (L, M),
    count: impl FnOnce(&M),
) {
    memo.with_borrow_mut(|Memo(slots)| {
        if let Some((_, _, series)) = slots.iter().find(|(o, l, _)| *o == owner && matches(l)) {
            return count(series);
        }
        let (labels, series) = make();
        count(&series);
        if slots.len() == SLOTS {
            slots.pop_back();
        }
        slots.push_front((owner, labels, series));
    });
}
