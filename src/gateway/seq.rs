//! Per-device sequence tracking: counts readings lost before they reached us
//! (gaps in `seq`) and repeats (duplicates, redeliveries, device restarts).
//! At most `max_devices` are tracked; an evicted device starts again as `First`.

use crate::devices::DeviceMap;

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

#[derive(Debug)]
pub struct SeqTracker {
    last: DeviceMap<u64>,
}

impl SeqTracker {
    pub fn new(max_devices: usize) -> Self {
        SeqTracker {
            last: DeviceMap::new(max_devices),
        }
    }

    pub fn observe(&mut self, device: &str, seq: u64) -> SeqOutcome {
        self.last.touch_with(
            device,
            || seq,
            |last, created| match created {
                true => SeqOutcome::First,
                false if seq <= *last => SeqOutcome::Repeat,
                false => {
                    let missing = seq - *last - 1;
                    *last = seq;
                    if missing == 0 {
                        SeqOutcome::InOrder
                    } else {
                        SeqOutcome::Gap(missing)
                    }
                }
            },
        )
    }

    /// Devices tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Devices evicted by the bound since the start.
    pub fn evicted(&self) -> u64 {
        self.last.evicted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_repeats() {
        let mut t = SeqTracker::new(10);
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
