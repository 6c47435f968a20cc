//! Per-device state with a bound: at most `max` devices are kept, and when a
//! new one would pass it, the least recently seen sixteenth is evicted at once
//! (one O(n) selection per max/16 new devices, so amortised O(1) per reading).
//! A client that invents device ids therefore costs evictions, never memory.

use std::collections::HashMap;

#[derive(Debug)]
struct Slot<V> {
    value: V,
    /// `clock` at the last touch; unique, so the eviction cut is exact.
    seen: u64,
}

#[derive(Debug)]
pub struct DeviceMap<V> {
    map: HashMap<Box<str>, Slot<V>>,
    max: usize,
    clock: u64,
    evicted: u64,
}

impl<V> DeviceMap<V> {
    /// `max` is clamped to at least 1.
    pub fn new(max: usize) -> Self {
        DeviceMap {
            map: HashMap::new(),
            max: max.max(1),
            clock: 0,
            evicted: 0,
        }
    }

    /// The device's state, created by `new` if absent, and marked as seen now.
    /// Returns whether it was created.
    pub fn touch(&mut self, device: &str, new: impl FnOnce() -> V) -> (&mut V, bool) {
        self.clock += 1;
        let seen = self.clock;
        // Looked up by &str first: the key is allocated only for a new device
        // (this runs once per reading).
        if !self.map.contains_key(device) {
            if self.map.len() >= self.max {
                self.evict(self.max.div_ceil(16));
            }
            let value = new();
            let slot = self
                .map
                .entry(device.into())
                .or_insert(Slot { value, seen });
            return (&mut slot.value, true);
        }
        match self.map.get_mut(device) {
            Some(slot) => {
                slot.seen = seen;
                (&mut slot.value, false)
            }
            None => unreachable!("present: checked above"),
        }
    }

    /// [`DeviceMap::touch`] for a caller done with the state when `f` returns:
    /// one lookup for a known device (`touch` needs two).
    pub fn touch_with<R>(
        &mut self,
        device: &str,
        new: impl FnOnce() -> V,
        f: impl FnOnce(&mut V, bool) -> R,
    ) -> R {
        if let Some(slot) = self.map.get_mut(device) {
            self.clock += 1;
            slot.seen = self.clock;
            return f(&mut slot.value, false);
        }
        let (v, created) = self.touch(device, new);
        f(v, created)
    }

    /// Drops the `n` least recently seen devices.
    fn evict(&mut self, n: usize) {
        let n = n.min(self.map.len());
        if n == 0 {
            return;
        }
        let mut seen: Vec<u64> = self.map.values().map(|s| s.seen).collect();
        let (_, &mut cut, _) = seen.select_nth_unstable(n - 1);
        self.map.retain(|_, s| s.seen > cut);
        self.evicted += n as u64;
    }

    /// Devices evicted by the bound since the start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn get(&self, device: &str) -> Option<&V> {
        self.map.get(device).map(|s| &s.value)
    }

    pub fn contains_key(&self, device: &str) -> bool {
        self.map.contains_key(device)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.map.iter().map(|(k, s)| (&**k, &s.value))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values().map(|s| &s.value)
    }

    /// Keeps the devices for which `keep` is true (not counted as evictions).
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.map.retain(|_, s| keep(&s.value));
    }
}

impl<V> std::ops::Index<&str> for DeviceMap<V> {
    type Output = V;

    fn index(&self, device: &str) -> &V {
        match self.get(device) {
            Some(v) => v,
            None => panic!("no device {device}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_least_recently_seen_go_first() {
        let mut m = DeviceMap::new(32);
        for i in 0..32 {
            m.touch(&format!("d{i}"), || i);
        }
        // d0 and d1 seen again: the oldest are now d2, d3.
        m.touch("d0", || 99);
        *m.touch("d1", || 99).0 += 100;
        assert_eq!(m.len(), 32);
        assert_eq!(m.evicted(), 0);
        let (v, created) = m.touch("new", || 7);
        assert_eq!((*v, created), (7, true));
        // 32 / 16 = 2 evicted to make room: d2 and d3.
        assert_eq!(m.evicted(), 2);
        assert_eq!(m.len(), 31);
        assert!(!m.contains_key("d2") && !m.contains_key("d3"));
        assert_eq!(m["d0"], 0, "kept, with its state");
        assert_eq!(m["d1"], 101);
        assert!(m.contains_key("d4") && m.contains_key("new"));
    }

    #[test]
    fn a_flood_of_new_ids_never_passes_the_bound() {
        let mut m = DeviceMap::new(1000);
        m.touch("steady", || 0u64);
        for i in 0..100_000u64 {
            m.touch(&format!("x{i}"), || i);
            if i % 10 == 0 {
                *m.touch("steady", || 0).0 += 1; // a real device, seen often
            }
            assert!(m.len() <= 1000);
        }
        assert_eq!(
            m["steady"], 10_000,
            "a device seen often survives the flood"
        );
        assert_eq!(m.evicted() as usize + m.len(), 100_000 + 1);
    }

    #[test]
    fn bound_of_one() {
        let mut m = DeviceMap::new(0);
        assert_eq!(m.max(), 1);
        m.touch("a", || 1);
        m.touch("b", || 2);
        assert_eq!(m.len(), 1);
        assert!(m.contains_key("b"));
        assert_eq!(m.evicted(), 1);
    }
}
