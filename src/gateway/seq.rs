//! Per-device sequence tracking: counts readings lost before they reached us
//! (gaps in `seq`) and repeats (duplicates, redeliveries, device restarts).

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqOutcome {
    /// First `seq` seen from this device.
    First,
    /// Exactly the next one.
    InOrder,
    /// Jumped ahead: this many readings are missing.
    Gap(u64),
    /// Not newer than the last seen one.
    Repeat,
}

#[derive(Debug, Default)]
pub struct SeqTracker {
    last: HashMap<String, u64>,
}

impl SeqTracker {
    pub fn observe(&mut self, device: &str, seq: u64) -> SeqOutcome {
        match self.last.get_mut(device) {
            None => {
                self.last.insert(device.to_string(), seq);
                SeqOutcome::First
            }
            Some(last) if seq <= *last => SeqOutcome::Repeat,
            Some(last) => {
                let missing = seq - *last - 1;
                *last = seq;
                if missing == 0 {
                    SeqOutcome::InOrder
                } else {
                    SeqOutcome::Gap(missing)
                }
            }
        }
    }

    /// Devices tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_repeats() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe("a", 5), SeqOutcome::First);
        assert_eq!(t.observe("a", 6), SeqOutcome::InOrder);
        assert_eq!(t.observe("a", 9), SeqOutcome::Gap(2));
        assert_eq!(t.observe("a", 9), SeqOutcome::Repeat);
        assert_eq!(t.observe("a", 3), SeqOutcome::Repeat);
        assert_eq!(t.observe("a", 10), SeqOutcome::InOrder);
        assert_eq!(t.observe("b", 0), SeqOutcome::First);
        assert_eq!(t.len(), 2);
    }
}
