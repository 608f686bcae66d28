//! Connections at once per IPv4 address or IPv6 /64, shared by the QUIC and HTTP accept loops.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The unit a per-address quota counts: an IPv4 address, or an IPv6 /64 (IPv4-mapped IPv6
/// addresses count as their IPv4 address).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Counts open connections per address key and refuses past `per_address`.
#[derive(Debug, Clone)]
pub struct AddressQuota {
    per_address: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection counted against its address until dropped.
#[derive(Debug)]
pub struct AddressSlot {
    key: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl AddressQuota {
    /// A quota of `per_address` connections.
    pub fn new(per_address: usize) -> Self {
        Self {
            per_address,
            counts: Arc::default(),
        }
    }

    /// Counts a connection from `ip`, or `None` when its address has used its quota.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut counts = self.counts.lock().expect("count lock is never poisoned");
        let count = counts.entry(key).or_default();
        if *count >= self.per_address {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            key,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("count lock is never poisoned");
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_64_counts_once_and_slots_free_on_drop() {
        let quota = AddressQuota::new(2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let first = quota.try_acquire(a).unwrap();
        let _second = quota.try_acquire(b).unwrap();
        assert!(quota.try_acquire(a).is_none(), "same /64");
        assert!(quota.try_acquire(other).is_some(), "another /64");
        drop(first);
        assert!(quota.try_acquire(b).is_some());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
