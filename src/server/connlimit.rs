//! A cap on the connections open at once from one client address
//! (`server.max_connections_per_client`), HTTP/1.1 and HTTP/2 alike: one address must not take
//! every file descriptor, nor pin the memory of thousands of connections.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Open connections by client address.
#[derive(Clone)]
pub struct ConnLimit {
    /// 0 = unlimited.
    max: usize,
    open: Arc<Mutex<crate::hashing::Map<IpAddr, usize>>>,
}

/// One admitted connection: its place is given back when this drops.
pub struct ConnGuard {
    limit: ConnLimit,
    ip: IpAddr,
}

impl ConnLimit {
    /// At most `max` connections per address; 0 = unlimited.
    pub fn new(max: u32) -> ConnLimit {
        ConnLimit {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            open: Arc::default(),
        }
    }

    /// A place for one more connection from `ip`, or `None` when it already has `max` open.
    /// An IPv4 client seen as an IPv4-mapped IPv6 address counts as that IPv4 address.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<ConnGuard> {
        let ip = ip.to_canonical();
        if self.max > 0 {
            let mut open = self.lock();
            let n = open.entry(ip).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(ConnGuard {
            limit: self.clone(),
            ip,
        })
    }

    /// How many connections `ip` has open (counted only while a cap is set).
    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, crate::hashing::Map<IpAddr, usize>> {
        crate::sync::lock(&self.open)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.limit.max == 0 {
            return;
        }
        let mut open = self.limit.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Addresses come and go: the map holds only those with connections open.
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_gets_max_places_and_a_closed_one_back() {
        let limit = ConnLimit::new(2);
        let a = limit.try_acquire(ip("10.0.0.1")).unwrap();
        let _b = limit.try_acquire(ip("10.0.0.1")).unwrap();
        assert!(limit.try_acquire(ip("10.0.0.1")).is_none());
        assert!(limit.try_acquire(ip("10.0.0.2")).is_some(), "per address");
        drop(a);
        assert_eq!(limit.open(ip("10.0.0.1")), 1);
        assert!(limit.try_acquire(ip("10.0.0.1")).is_some());
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        let limit = ConnLimit::new(1);
        let _a = limit.try_acquire(ip("192.0.2.7")).unwrap();
        assert!(limit.try_acquire(ip("::ffff:192.0.2.7")).is_none());
    }

    #[test]
    fn addresses_without_connections_are_forgotten() {
        let limit = ConnLimit::new(4);
        let guards: Vec<_> = (0..3)
            .map(|_| limit.try_acquire(ip("::1")).unwrap())
            .collect();
        assert_eq!(limit.open(ip("::1")), 3);
        drop(guards);
        assert!(limit.lock().is_empty());
    }

    #[test]
    fn zero_is_unlimited() {
        let limit = ConnLimit::new(0);
        let guards: Vec<_> = (0..1000)
            .map(|_| limit.try_acquire(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(guards.len(), 1000);
        assert!(limit.lock().is_empty(), "nothing is counted without a cap");
    }
}
