//! The acks stage: PUBACKs in arrival order, and the window of readings
//! accepted and not yet confirmed.
//!
//! MQTT requires PUBACKs in the order the PUBLISHes arrived, but the log
//! confirms readings when it can (after the spool's fsync, or when Kafka
//! acknowledged them, in whatever order). The [`AckTracker`] hands out ids in
//! arrival order and releases only the contiguous prefix of confirmed
//! messages; [`Acks`] sends their PUBACKs and stops intake while the window
//! (`kafka.max_in_flight` readings, [`PENDING_BYTES`] of large records) is full.

use std::collections::{HashMap, VecDeque};

use super::error::GatewayError;
use super::metrics::GatewayMetrics;
use super::mqtt::Acker;
use super::pool::Pool;

/// A record this large is counted against [`PENDING_BYTES`] (readings are
/// a few hundred bytes; dead letters of large payloads are up to
/// `dlq_max_payload_bytes`).
const BIG_RECORD: usize = 4096;
/// Bytes of large records accepted and not yet confirmed, at most (plus one).
pub const PENDING_BYTES: usize = 16 << 20;

/// Lists of confirmed ids (from the log, back from the acks stage).
pub type IdPool = Pool<Vec<AckId>>;

impl Pool<Vec<AckId>> {
    /// Gives back a list of settled ids once read.
    pub fn give_ids(&self, mut ids: Vec<AckId>) {
        ids.clear();
        self.give(ids);
    }
}

/// The acks stage (see the module doc).
#[derive(Debug)]
pub struct Acks {
    tracker: AckTracker,
    /// Where PUBACKs go (`None`: no MQTT source).
    acker: Option<Acker>,
    /// Accepted and not yet confirmed.
    pending: usize,
    window: usize,
    /// Records over [`BIG_RECORD`] bytes among them (by ack id), and their
    /// bytes: what a burst of large payloads makes us hold is bounded by
    /// [`PENDING_BYTES`], not only by the window in messages.
    big: HashMap<AckId, usize>,
    pending_big_bytes: usize,
    /// Packet ids released and not yet sent (the MQTT request channel was full).
    pkids: Vec<u16>,
    /// Where read lists of confirmed ids go back to the log.
    ids: IdPool,
    metrics: GatewayMetrics,
}

impl Acks {
    pub fn new(window: usize, acker: Option<Acker>, ids: IdPool, metrics: GatewayMetrics) -> Self {
        Acks {
            tracker: AckTracker::new(),
            acker,
            pending: 0,
            window,
            big: HashMap::new(),
            pending_big_bytes: 0,
            pkids: Vec::with_capacity(1024),
            ids,
            metrics,
        }
    }

    /// A received message (`pkid`: its MQTT packet id, if it is acknowledged).
    /// `received_ms`: when it arrived (epoch ms), for the ack latency.
    pub fn admit(&mut self, pkid: Option<u16>, received_ms: i64) -> AckId {
        self.pending += 1;
        self.tracker.push(pkid, received_ms)
    }

    /// `id`'s record has `bytes` (large ones count against [`PENDING_BYTES`]).
    pub fn sized(&mut self, id: AckId, bytes: usize) {
        if bytes > BIG_RECORD {
            self.big.insert(id, bytes);
            self.pending_big_bytes += bytes;
        }
    }

    /// Room for more: fewer than the window unconfirmed, and their large
    /// records within the byte budget.
    pub fn has_room(&self) -> bool {
        self.pending < self.window && self.pending_big_bytes < PENDING_BYTES
    }

    /// Accepted and not yet confirmed.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// PUBACKs are waiting for room in the MQTT request channel.
    pub fn owed(&self) -> bool {
        !self.pkids.is_empty()
    }

    /// A new MQTT connection: acks owed on the old one are void (the broker
    /// redelivers those messages).
    pub fn connected(&mut self) {
        self.tracker.reset();
        self.pkids.clear();
    }

    /// What the log says.
    pub fn on_log(&mut self, ev: AckEvent) -> Result<(), GatewayError> {
        match ev {
            AckEvent::Ready(ids) => {
                for &id in &ids {
                    self.tracker.complete(id);
                    self.pending = self.pending.saturating_sub(1);
                    if !self.big.is_empty() {
                        if let Some(n) = self.big.remove(&id) {
                            self.pending_big_bytes -= n;
                        }
                    }
                }
                self.ids.give_ids(ids);
            }
            AckEvent::SpoolFull(_) => {}
            AckEvent::Fatal(e) => return Err(GatewayError::Spool(e)),
        }
        Ok(())
    }

    /// PUBACKs for the confirmed prefix, in order. Never waits: when the MQTT
    /// request channel is full the rest stay queued here for the next turn,
    /// because the event loop may itself be waiting for the pipeline to take a
    /// message (waiting here too would deadlock).
    pub fn flush(&mut self) {
        if self.tracker.front_done() {
            let now = crate::clock::now_ms();
            let m = &self.metrics;
            self.tracker
                .drain_ready(&mut self.pkids, |received| m.ack_latency(now - received));
        }
        let Some(a) = &self.acker else {
            self.pkids.clear();
            return;
        };
        let sent = a.ack(&self.pkids);
        self.pkids.drain(..sent);
        self.metrics.acked(sent);
    }
}

/// Identifies one received message inside the tracker.
pub type AckId = u64;

/// What tells the pipeline that readings may be acknowledged.
#[derive(Debug)]
pub enum AckEvent {
    /// These readings are confirmed: durable in the log (see `log`).
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
    /// Per message in arrival order: (MQTT packet id to acknowledge, done?,
    /// receive time in epoch ms).
    slots: VecDeque<(Option<u16>, bool, i64)>,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a received message; `pkid` is `None` when nothing is to be
    /// acknowledged (QoS 0, simulated readings).
    pub fn push(&mut self, pkid: Option<u16>, received_ms: i64) -> AckId {
        self.slots.push_back((pkid, false, received_ms));
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

    /// The oldest message is done: [`AckTracker::drain_ready`] has work.
    pub fn front_done(&self) -> bool {
        self.slots.front().is_some_and(|s| s.1)
    }

    /// Removes the contiguous completed prefix and returns its packet ids, in
    /// arrival order, ready to be acknowledged; `received` is called with the
    /// receive time of each one.
    pub fn drain_ready(&mut self, out: &mut Vec<u16>, mut received: impl FnMut(i64)) {
        while let Some(&(pkid, true, at)) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
            if let Some(p) = pkid {
                out.push(p);
                received(at);
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
        t.drain_ready(&mut v, |_| {});
        v
    }

    #[test]
    fn releases_only_the_contiguous_prefix() {
        let mut t = AckTracker::new();
        let a = t.push(Some(10), 0);
        let b = t.push(Some(11), 0);
        let c = t.push(Some(12), 0);
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
        let a = t.push(None, 0);
        let b = t.push(Some(1), 0);
        t.complete(b);
        assert_eq!(drain(&mut t), Vec::<u16>::new());
        t.complete(a);
        assert_eq!(drain(&mut t), vec![1]);
    }

    #[test]
    fn reset_discards_pending_and_ignores_late_completions() {
        let mut t = AckTracker::new();
        let a = t.push(Some(1), 0);
        let _b = t.push(Some(2), 0);
        t.reset();
        assert!(t.is_empty());
        let c = t.push(Some(1), 0);
        t.complete(a); // late report from the old connection
        assert_eq!(drain(&mut t), Vec::<u16>::new());
        t.complete(c);
        assert_eq!(drain(&mut t), vec![1]);
    }

    #[test]
    fn receive_times_are_reported_for_what_is_acknowledged_in_order() {
        let mut t = AckTracker::new();
        let a = t.push(Some(1), 100);
        let b = t.push(None, 150);
        let c = t.push(Some(2), 200);
        let d = t.push(Some(3), 300);
        assert!(!t.front_done());
        for id in [c, b, a] {
            t.complete(id);
        }
        assert!(t.front_done());
        let (mut pkids, mut times) = (Vec::new(), Vec::new());
        t.drain_ready(&mut pkids, |at| times.push(at));
        assert_eq!((pkids, times), (vec![1, 2], vec![100, 200]));
        assert!(!t.front_done());
        t.complete(d);
        assert!(t.front_done());
    }

    #[test]
    fn double_completion_is_harmless() {
        let mut t = AckTracker::new();
        let a = t.push(Some(5), 0);
        t.complete(a);
        t.complete(a);
        assert_eq!(drain(&mut t), vec![5]);
        t.complete(a);
        assert_eq!(drain(&mut t), Vec::<u16>::new());
    }
}
