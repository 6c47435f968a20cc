//! Recently spooled readings by (device, seq, ts), so a redelivered MQTT message
//! or a retained message replayed on resubscribe does not become a second Kafka
//! record. Only exact repeats match: a device that restarts its `seq` sends a
//! new `ts`, so it is never taken for a duplicate. Bounded: the oldest entries
//! are forgotten first.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

#[derive(Debug)]
pub struct RecentlySeen {
    /// Fingerprints, keyed per process so that clients cannot aim at one
    /// bucket; being hashes already, the set uses them as they are.
    seen: HashSet<u64, BuildHasherDefault<AsIs>>,
    order: VecDeque<u64>,
    capacity: usize,
    keys: RandomState,
}

/// The hasher of a set of hashes.
#[derive(Default)]
struct AsIs(u64);

impl Hasher for AsIs {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; this keeps other input correct anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl RecentlySeen {
    pub fn new(capacity: usize) -> Self {
        RecentlySeen {
            seen: HashSet::with_capacity_and_hasher(capacity.min(1 << 16), Default::default()),
            order: VecDeque::new(),
            capacity,
            keys: RandomState::new(),
        }
    }

    /// True if this reading was seen recently; otherwise remembers it.
    pub fn check_and_insert(&mut self, device: &[u8], seq: u64, ts_ms: i64) -> bool {
        let f = self.keys.hash_one((device, seq, ts_ms));
        if !self.seen.insert(f) {
            return true;
        }
        self.order.push_back(f);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_repeats_only_and_bounded() {
        let mut r = RecentlySeen::new(2);
        assert!(!r.check_and_insert(b"a", 1, 100));
        assert!(r.check_and_insert(b"a", 1, 100));
        assert!(
            !r.check_and_insert(b"a", 1, 200),
            "restarted device: new ts"
        );
        assert!(!r.check_and_insert(b"b", 1, 100));
        assert!(!r.check_and_insert(b"a", 1, 100), "forgotten past capacity");
    }
}
