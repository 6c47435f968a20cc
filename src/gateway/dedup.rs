//! Recently spooled readings by (device, seq, ts), so a redelivered MQTT message
//! or a retained message replayed on resubscribe does not become a second Kafka
//! record. Only exact repeats match: a device that restarts its `seq` sends a
//! new `ts`, so it is never taken for a duplicate. Bounded: the oldest entries
//! are forgotten first.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

#[derive(Debug)]
pub struct Recent {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

fn fingerprint(device: &[u8], seq: u64, ts_ms: i64) -> u64 {
    let mut h = DefaultHasher::new();
    (device, seq, ts_ms).hash(&mut h);
    h.finish()
}

impl Recent {
    pub fn new(capacity: usize) -> Self {
        Recent {
            seen: HashSet::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// True if this reading was seen recently; otherwise remembers it.
    pub fn check_and_insert(&mut self, device: &[u8], seq: u64, ts_ms: i64) -> bool {
        let f = fingerprint(device, seq, ts_ms);
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
        let mut r = Recent::new(2);
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
