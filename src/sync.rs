//! The crate's one lock policy.
//!
//! Every `std::sync::Mutex` here guards state that each critical section leaves consistent
//! (single inserts, removes, assignments), none is held across an await, and none is taken
//! again while held. A panic inside one therefore cannot leave broken state behind, so a
//! poisoned lock is used as it is rather than turned into a second panic.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
