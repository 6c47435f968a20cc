//! In-order acknowledgement. MQTT requires PUBACKs in the order the PUBLISHes
//! arrived, but Kafka delivery reports complete out of order (different
//! partitions, retries). The tracker hands out ids in arrival order and releases
//! only the contiguous prefix of completed messages.

use std::collections::VecDeque;

/// Identifies one received message inside the tracker.
pub type AckId = u64;

/// What tells the pipeline that readings may be acknowledged.
#[derive(Debug)]
pub enum AckEvent {
    /// These readings are settled: durable in the spool, or (spool disabled)
    /// acknowledged by Kafka.
    Ready(Vec<AckId>),
    /// The spool is full (`on_full = "block"`, or the disk): PUBACKs stop.
    SpoolFull(bool),
    /// The spool cannot be written: stop without acknowledging more.
    Fatal(String),
}

#[derive(Debug, Default)]
pub struct AckTracker {
    /// Id of `slots[0]`.
    base: AckId,
    /// Per message in arrival order: (MQTT packet id to acknowledge, done?).
    slots: VecDeque<(Option<u16>, bool)>,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a received message; `pkid` is `None` when nothing is to be
    /// acknowledged (QoS 0, simulated readings).
    pub fn push(&mut self, pkid: Option<u16>) -> AckId {
        self.slots.push_back((pkid, false));
        self.base + self.slots.len() as u64 - 1
    }

    /// Marks a message as handled (in Kafka or in the DLQ). Ids from before the
    /// last [`AckTracker::reset`] are ignored.
    pub fn complete(&mut self, id: AckId) {
        if let Some(i) = id.checked_sub(self.base) {
            if let Some(slot) = self.slots.get_mut(i as usize) {
                slot.1 = true;
            }
        }
    }

    /// Removes the contiguous completed prefix and returns its packet ids, in
    /// arrival order, ready to be acknowledged.
    pub fn drain_ready(&mut self, out: &mut Vec<u16>) {
        while let Some(&(pkid, true)) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
            if let Some(p) = pkid {
                out.push(p);
            }
        }
    }

    /// Forgets every pending message: after a reconnect the broker redelivers
    /// what was not acknowledged, and acks for the old connection must not be
    /// sent on the new one (packet ids may have been reused).
    pub fn reset(&mut self) {
        self.base += self.slots.len() as u64;
        self.slots.clear();
    }

    /// Messages received and not yet released.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(t: &mut AckTracker) -> Vec<u16> {
        let mut v = Vec::new();
        t.drain_ready(&mut v);
        v
    }

    #[test]
    fn releases_only_the_contiguous_prefix() {
        let mut t = AckTracker::new();
        let a = t.push(Some(10));
        let b = t.push(Some(11));
        let c = t.push(Some(12));
        t.complete(c);
        assert_eq!(drain(&mut t), Vec::<u16>::new());
        t.complete(a);
        assert_eq!(drain(&mut t), vec![10]);
        t.complete(b);
        assert_eq!(drain(&mut t), vec![11, 12]);
        assert!(t.is_empty());
    }

    #[test]
    fn messages_without_ack_keep_their_place() {
        let mut t = AckTracker::new();
        let a = t.push(None);
        let b = t.push(Some(1));
        t.complete(b);
        assert_eq!(drain(&mut t), Vec::<u16>::new());
        t.complete(a);
        assert_eq!(drain(&mut t), vec![1]);
    }

    #[test]
    fn reset_discards_pending_and_ignores_late_completions() {
        let mut t = AckTracker::new();
        let a = t.push(Some(1));
        let _b = t.push(Some(2));
        t.reset();
        assert!(t.is_empty());
        let c = t.push(Some(1));
        t.complete(a); // late report from the old connection
        assert_eq!(drain(&mut t), Vec::<u16>::new());
        t.complete(c);
        assert_eq!(drain(&mut t), vec![1]);
    }

    #[test]
    fn double_completion_is_harmless() {
        let mut t = AckTracker::new();
        let a = t.push(Some(5));
        t.complete(a);
        t.complete(a);
        assert_eq!(drain(&mut t), vec![5]);
        t.complete(a);
        assert_eq!(drain(&mut t), Vec::<u16>::new());
    }
}
