//! Sources (the MQTT subscription, the simulated fleet) hand the pipeline
//! [`SourceEvent`]s: batches of payloads received together ([`Received`]),
//! each payload seen as an [`Incoming`].

use super::pool::Pool;

/// One received payload, borrowed from the [`Received`] it came in.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// MQTT topic, or `simulated`.
    pub topic: &'a str,
    /// Device id known from the source (simulated); MQTT takes it from the topic.
    pub device: Option<&'a str>,
    /// The payload, or its first bytes when it was cut at receipt (see `size`).
    pub payload: &'a [u8],
    /// The payload's size as received: over `validation.max_payload_bytes` it
    /// was rejected on arrival and only its first `dlq_max_payload_bytes` kept.
    pub size: usize,
    /// Receive time, epoch ms.
    pub received_ms: i64,
    /// MQTT packet id to acknowledge (QoS 1); `None` = nothing to acknowledge.
    pub pkid: Option<u16>,
}

/// Payloads received together (what one read of the MQTT connection brought,
/// or one tick of the simulated fleet), copied into two buffers: a few
/// allocations per batch instead of a few per payload, and nothing left
/// pointing into the MQTT client's read buffer.
#[derive(Debug, Default)]
pub struct Received {
    /// Topics and device ids.
    text: String,
    payloads: Vec<u8>,
    msgs: Vec<Msg>,
    /// Receive time of all of them, epoch ms.
    pub received_ms: i64,
    /// The source's room taken by these messages (in messages and bytes),
    /// given back when this is dropped (see `mqtt`: it bounds what waits for
    /// the pipeline).
    held: Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )>,
}

#[derive(Debug, Clone, Copy)]
struct Msg {
    topic: (u32, u32),
    device: Option<(u32, u32)>,
    payload: (u32, u32),
    /// As received (more than `payload` holds when cut).
    size: u32,
    pkid: Option<u16>,
}

impl Received {
    pub fn new(received_ms: i64) -> Self {
        Received {
            received_ms,
            ..Received::default()
        }
    }

    /// Room for `like`'s messages and bytes, or 16 typical ones if more (a
    /// source's next batch is usually the size of its last one: allocated
    /// once, not grown push by push).
    pub fn sized_like(received_ms: i64, like: (usize, usize, usize)) -> Self {
        let (msgs, text, payloads) = like;
        Received {
            text: String::with_capacity(text.max(16 * 48)),
            payloads: Vec::with_capacity(payloads.max(16 * 160)),
            msgs: Vec::with_capacity(msgs.max(16)),
            received_ms,
            held: None,
        }
    }

    /// Keeps the permits until this is dropped or emptied.
    pub fn hold(
        &mut self,
        messages: tokio::sync::OwnedSemaphorePermit,
        bytes: tokio::sync::OwnedSemaphorePermit,
    ) {
        self.held = Some((messages, bytes));
    }

    /// Empties it for reuse (its room goes back to the source now).
    pub fn empty(mut self) -> Self {
        self.text.clear();
        self.payloads.clear();
        self.msgs.clear();
        self.held = None;
        self
    }

    /// This emptied one again, or a new one, for messages received at
    /// `received_ms`.
    pub fn reuse(pool: &Pool<Received>, received_ms: i64, like: (usize, usize, usize)) -> Self {
        match pool.take() {
            Some(mut r) => {
                r.received_ms = received_ms;
                r
            }
            None => Received::sized_like(received_ms, like),
        }
    }

    /// (messages, text bytes, payload bytes): a size hint for the next one.
    pub fn size(&self) -> (usize, usize, usize) {
        (self.msgs.len(), self.text.len(), self.payloads.len())
    }

    pub fn push(&mut self, topic: &str, device: Option<&str>, payload: &[u8], pkid: Option<u16>) {
        self.push_cut(topic, device, payload, pkid, usize::MAX);
    }

    /// [`Received::push`], keeping only the first `keep` bytes of `payload`.
    pub fn push_cut(
        &mut self,
        topic: &str,
        device: Option<&str>,
        payload: &[u8],
        pkid: Option<u16>,
        keep: usize,
    ) {
        let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let payload = &payload[..payload.len().min(keep)];
        let mut text = |s: &str| {
            let start = self.text.len() as u32;
            self.text.push_str(s);
            (start, self.text.len() as u32)
        };
        let topic = text(topic);
        let device = device.map(text);
        let start = self.payloads.len() as u32;
        self.payloads.extend_from_slice(payload);
        self.msgs.push(Msg {
            topic,
            device,
            payload: (start, self.payloads.len() as u32),
            size,
            pkid,
        });
    }

    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Bytes held (topics, ids and payloads).
    pub fn bytes(&self) -> usize {
        self.text.len() + self.payloads.len()
    }

    /// The payloads, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = Incoming<'_>> {
        let text = |(a, b): (u32, u32)| self.text.get(a as usize..b as usize).unwrap_or_default();
        self.msgs.iter().map(move |m| Incoming {
            topic: text(m.topic),
            device: m.device.map(text),
            payload: self
                .payloads
                .get(m.payload.0 as usize..m.payload.1 as usize)
                .unwrap_or_default(),
            size: m.size as usize,
            received_ms: self.received_ms,
            pkid: m.pkid,
        })
    }
}

/// What a source tells the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    Messages(Received),
    /// A new MQTT connection: acks owed on the old one are void (the broker
    /// redelivers those messages).
    Connected,
}

#[cfg(test)]
mod tests {
    use super::Received;

    #[test]
    fn received_gives_back_what_was_pushed_and_its_room_when_emptied() {
        let room = std::sync::Arc::new(tokio::sync::Semaphore::new(10));
        let mut r = Received::new(7);
        r.push("a/d1/t", None, b"{1}", Some(3));
        r.push("simulated", Some("dev-2"), b"", None);
        r.push("a/\u{e9}/t", None, "\u{e9}".as_bytes(), Some(4));
        let bytes = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
        #[allow(clippy::unwrap_used)]
        r.hold(
            room.clone().try_acquire_many_owned(3).unwrap(),
            bytes.clone().try_acquire_many_owned(50).unwrap(),
        );
        assert_eq!(room.available_permits(), 7);
        let got: Vec<_> = r
            .iter()
            .map(|m| (m.topic, m.device, m.payload, m.pkid, m.received_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("a/d1/t", None, &b"{1}"[..], Some(3), 7),
                ("simulated", Some("dev-2"), b"", None, 7),
                ("a/\u{e9}/t", None, "\u{e9}".as_bytes(), Some(4), 7),
            ]
        );
        let r = r.empty();
        assert!(r.is_empty() && r.bytes() == 0);
        assert_eq!(room.available_permits(), 10);
        assert_eq!(bytes.available_permits(), 100);
    }
}
