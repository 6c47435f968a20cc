//! Intake: the one complete decision for each received payload. It becomes
//! the Kafka record it will be (a canonical reading for the main topic, or a
//! dead-letter record with its reason), or nothing: a redelivered duplicate
//! (skipped), or rejected with the DLQ disabled. Either way its ack joins the
//! wake-up's [`Batch`], so the log confirms it in order with the others.
//!
//! [`validate`] is pure (no I/O, no state); [`Intake`] adds what needs state:
//! the device id from the topic, duplicate detection, sequence tracking, and
//! the metrics of each outcome. A valid reading is written straight into the
//! batch, encoded as the spool stores it: no owned record, no allocation per
//! reading.
//!
//! Over 500 lines with its unit tests; the code is under 400.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::GatewayConfig;
use crate::gateway::acks::AckId;
use crate::gateway::batch::Batch;
use crate::gateway::dedup::RecentlySeen;
use crate::gateway::metrics::GatewayMetrics;
use crate::gateway::seq::{SeqOutcome, SeqTracker};
use crate::gateway::source::Incoming;
use crate::gateway::spool::format::RecordMeta;
use crate::gateway::spool::{Header, Record};
use crate::reading::{self, Limits, ReadingRef, Rejection, SCHEMA_VERSION};

/// The intake stage (see the module doc).
#[derive(Debug)]
pub struct Intake {
    limits: Limits,
    /// The MQTT source's copy of `validation.max_payload_bytes` (it cuts
    /// larger payloads on arrival, see `mqtt::Cut`); kept equal to `limits`.
    max_payload: Arc<AtomicUsize>,
    /// `kafka.dlq_max_payload_bytes`; `None` with the DLQ disabled.
    dlq: Option<usize>,
    /// Each topic filter with the position of its first `+` (the device id).
    plus_segments: Vec<(String, Option<usize>)>,
    device_id_segment: Option<usize>,
    /// Redeliveries to skip; `None` when the log cannot confirm a skipped
    /// reading after its original (see `log::Opened::recent`).
    recent: Option<RecentlySeen>,
    /// `None` with a shared subscription: this gateway then sees only some of
    /// each device's readings, and gaps are for the aggregator to count.
    seqs: Option<SeqTracker>,
    max_devices: usize,
    encoder: Encoder,
    metrics: GatewayMetrics,
}

impl Intake {
    /// `recent`: what the log recovered; `max_payload`: shared with the MQTT
    /// source, which starts first (it holds `validation.max_payload_bytes`).
    pub fn new(
        cfg: &GatewayConfig,
        recent: Option<RecentlySeen>,
        max_payload: Arc<AtomicUsize>,
        metrics: GatewayMetrics,
    ) -> Self {
        Intake {
            limits: cfg.validation.clone(),
            max_payload,
            dlq: cfg
                .kafka
                .dlq_enabled
                .then_some(cfg.kafka.dlq_max_payload_bytes),
            plus_segments: cfg
                .mqtt
                .topics
                .iter()
                .map(|f| (f.clone(), f.split('/').position(|s| s == "+")))
                .collect(),
            device_id_segment: cfg.mqtt.device_id_segment,
            recent,
            seqs: cfg
                .mqtt
                .shared_group
                .is_none()
                .then(|| SeqTracker::new(cfg.tracking.max_devices)),
            max_devices: cfg.tracking.max_devices,
            encoder: Encoder::default(),
            metrics,
        }
    }

    /// New validation limits (a SIGHUP reload).
    pub fn set_limits(&mut self, limits: Limits) {
        self.max_payload
            .store(limits.max_payload_bytes, Ordering::Relaxed);
        tracing::info!(?limits, "validation limits updated");
        self.limits = limits;
    }

    /// Decides what `m` (acknowledged as `ack`) becomes and adds it to `batch`.
    /// Returns the bytes of the record written (0: none).
    pub fn take(&mut self, m: &Incoming<'_>, ack: AckId, batch: &mut Batch) -> usize {
        self.metrics.received(m.device.is_some());
        batch.acks.push(ack);
        let topic_device = match m.device {
            Some(d) => Some(d),
            None => device_in_topic(&self.plus_segments, self.device_id_segment, m.topic),
        };
        let before = batch.buf.len();
        let clock_synced = crate::clock::synced();
        match validate(m, topic_device, &self.limits, self.dlq, clock_synced) {
            Verdict::Reading(r) => {
                let key = r.device_id.as_bytes();
                // The device's own ts identifies a redelivery, also when the
                // receive time replaced it.
                let ts = r.ts_replaced.map_or(r.ts_ms, |(_, device_ts)| device_ts);
                let dup = match (r.seq, &mut self.recent) {
                    (Some(seq), Some(recent)) => recent.check_and_insert(key, seq, ts),
                    _ => false,
                };
                if dup {
                    self.metrics.duplicate_skipped(key, r.seq.unwrap_or(0));
                    return 0;
                }
                if let (Some(seq), Some(seqs)) = (r.seq, &mut self.seqs) {
                    let device = &*r.device_id;
                    match seqs.observe(device, seq) {
                        SeqOutcome::Gap(n) => self.metrics.seq_gap(device, n),
                        SeqOutcome::Repeat => self.metrics.seq_repeat(device),
                        SeqOutcome::First => {
                            self.metrics
                                .devices(seqs.len(), seqs.evicted(), self.max_devices)
                        }
                        SeqOutcome::InOrder => {}
                    }
                }
                if !clock_synced || r.ts_replaced.is_some() {
                    self.metrics.time_noted(!clock_synced, r.ts_replaced);
                }
                self.encoder.reading(&r, m, ack, batch, clock_synced);
            }
            Verdict::Rejected {
                rejection,
                dead_letter,
            } => {
                self.metrics.rejected(&rejection, m.topic);
                match dead_letter {
                    Some(d) => batch.push(&d, ack),
                    None => self
                        .metrics
                        .dropped(rejection.code(), &rejection.to_string()),
                }
            }
        }
        batch.buf.len() - before
    }
}

/// What becomes of a payload.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// A valid reading (see [`Encoder::reading`] for its record).
    Reading(ReadingRef<'a>),
    /// Invalid: the reason, and its dead-letter record unless the DLQ is off.
    Rejected {
        rejection: Rejection,
        dead_letter: Option<Record>,
    },
}

/// Validates `m` (device id from the topic or the source).
/// `dlq_max_payload` is `None` when the DLQ is disabled. `clock_synced`: our
/// clock may judge the device's `ts` (else it is kept; README "Clocks at the
/// edge"). Either way a `ts` that cannot be used is replaced by the receive
/// time (`ReadingRef::ts_replaced`), never a reason to dead-letter.
pub fn validate<'a>(
    m: &Incoming<'a>,
    topic_device: Option<&'a str>,
    limits: &Limits,
    dlq_max_payload: Option<usize>,
    clock_synced: bool,
) -> Verdict<'a> {
    let policy = if clock_synced {
        reading::TsPolicy::Replace
    } else {
        reading::TsPolicy::Keep
    };
    let parsed = crate::guard::catch(|| {
        crate::guard::failpoint("intake", m.payload);
        if m.size > limits.max_payload_bytes {
            // Cut on arrival (the source kept only what the DLQ keeps).
            return Err(Rejection::PayloadTooLarge {
                size: m.size,
                limit: limits.max_payload_bytes,
            });
        }
        reading::parse_ref_with(m.payload, topic_device, m.received_ms, limits, policy)
    });
    let parsed = parsed.unwrap_or_else(|panic| {
        tracing::error!(
            source = m.topic,
            payload_hash = %crate::guard::payload_hash(m.payload),
            bytes = m.payload.len(),
            %panic,
            "validating a payload panicked (a bug): dead-lettered as internal_error, the rest goes on"
        );
        Err(Rejection::Internal(panic))
    });
    match parsed {
        Ok(r) => Verdict::Reading(r),
        Err(rejection) => {
            let dead_letter = dlq_max_payload.map(|max| {
                dead_letter(
                    rejection.code(),
                    &rejection.to_string(),
                    m.topic,
                    m.received_ms,
                    topic_device.map(|d| d.as_bytes().to_vec()),
                    m.payload,
                    m.size.max(m.payload.len()),
                    max,
                )
            });
            Verdict::Rejected {
                rejection,
                dead_letter,
            }
        }
    }
}

/// Writes readings' records into batches; its buffers are reused.
#[derive(Debug, Default)]
pub struct Encoder {
    value: String,
    received_at: String,
    /// The receive time `received_at` holds the text of.
    received_ms: Option<i64>,
    /// The `device_ts` header's text.
    device_ts: String,
}

impl Encoder {
    /// Appends the record of the valid reading `r` (received as `m`) to
    /// `batch` with `id` as its offset: key = device id, value = canonical
    /// JSON, headers `schema`, `source`, `received_at` (and `clock=unsynced`
    /// when `!clock_synced`; `ts_replaced` and `device_ts` when the device's
    /// ts was not used), timestamp = `ts`.
    pub fn reading(
        &mut self,
        r: &ReadingRef<'_>,
        m: &Incoming<'_>,
        id: u64,
        batch: &mut Batch,
        clock_synced: bool,
    ) {
        self.value.clear();
        r.write_canonical_json(&mut self.value);
        // Readings received together share the time: formatted once.
        if self.received_ms != Some(m.received_ms) {
            self.received_at.clear();
            reading::write_ts(&mut self.received_at, m.received_ms);
            self.received_ms = Some(m.received_ms);
        }
        self.device_ts.clear();
        let mut headers = [
            ("schema", SCHEMA_VERSION.as_bytes()),
            ("source", m.topic.as_bytes()),
            ("received_at", self.received_at.as_bytes()),
            ("", &[][..]),
            ("", &[][..]),
            ("", &[][..]),
        ];
        let mut n = 3;
        if !clock_synced {
            headers[n] = ("clock", b"unsynced");
            n += 1;
        }
        if let Some((reason, device_ts)) = r.ts_replaced {
            self.device_ts
                .push_str(itoa::Buffer::new().format(device_ts));
            headers[n] = ("ts_replaced", reason.as_bytes());
            headers[n + 1] = ("device_ts", self.device_ts.as_bytes());
            n += 2;
        }
        let meta = RecordMeta {
            received_ms: m.received_ms,
            ts_ms: Some(r.ts_ms),
            dlq: false,
            seq: r.seq,
        };
        batch.push_parts(
            id,
            meta,
            Some(r.device_id.as_bytes()),
            headers[..n].iter().copied(),
            self.value.as_bytes(),
        );
    }
}

/// A dead-letter record: the raw payload (cut at `max_payload`) with `reason`,
/// `detail`, `source`, `received_at`, `schema` (and `original_size` when cut).
/// `original_size`: the payload's size as received (it may have been cut
/// already on arrival).
#[allow(clippy::too_many_arguments)]
pub fn dead_letter(
    reason: &str,
    detail: &str,
    source: &str,
    received_ms: i64,
    key: Option<Vec<u8>>,
    payload: &[u8],
    original_size: usize,
    max_payload: usize,
) -> Record {
    let keep = payload.len().min(max_payload);
    let mut headers: Vec<Header> = vec![
        ("reason".into(), reason.as_bytes().to_vec().into()),
        ("detail".into(), detail.as_bytes().to_vec().into()),
        ("source".into(), source.as_bytes().to_vec().into()),
        (
            "received_at".into(),
            reading::format_ts(received_ms).into_bytes().into(),
        ),
        ("schema".into(), SCHEMA_VERSION.as_bytes().into()),
    ];
    if keep < original_size {
        headers.push((
            "original_size".into(),
            original_size.to_string().into_bytes().into(),
        ));
    }
    Record {
        offset: 0,
        received_ms,
        ts_ms: None,
        dlq: true,
        seq: None,
        key,
        headers,
        value: payload[..keep].to_vec(),
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    // On bytes: this runs for every message, and '/' is ASCII.
    let mut t = topic.as_bytes().split(|&b| b == b'/');
    for f in filter.as_bytes().split(|&b| b == b'/') {
        match (f, t.next()) {
            (b"#", _) => return true,
            (b"+", Some(_)) => {}
            (f, Some(s)) if f == s => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// The device id in an MQTT topic: level `segment` when configured, else the
/// level of the `+` of the first filter (with its `+` position) it matches.
/// Checked afterwards by `reading::check_device_id`.
pub fn device_in_topic<'a>(
    filters: &[(String, Option<usize>)],
    segment: Option<usize>,
    topic: &'a str,
) -> Option<&'a str> {
    let segment = match segment {
        Some(s) => s,
        None => filters
            .iter()
            .find(|(f, _)| topic_matches(f, topic))
            .and_then(|(_, seg)| *seg)?,
    };
    topic_level(topic, segment)
}

/// Level `n` (from 0) of `topic`.
pub fn topic_level(topic: &str, n: usize) -> Option<&str> {
    let mut start = 0;
    let mut level = 0;
    for (i, b) in topic.bytes().enumerate() {
        if b == b'/' {
            if level == n {
                return topic.get(start..i);
            }
            level += 1;
            start = i + 1;
        }
    }
    (level == n).then(|| topic.get(start..)).flatten()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        for topic in ["a/b/c", "a//c/", "/x", "", "sensors/dev-1/telemetry"] {
            for n in 0..5 {
                assert_eq!(
                    topic_level(topic, n),
                    topic.split('/').nth(n),
                    "{topic} {n}"
                );
            }
        }
    }

    #[test]
    fn filters() {
        assert!(topic_matches("sensors/+/telemetry", "sensors/a/telemetry"));
        assert!(!topic_matches(
            "sensors/+/telemetry",
            "sensors/a/b/telemetry"
        ));
        assert!(!topic_matches("sensors/+/telemetry", "sensors/a"));
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }

    fn incoming(payload: &str) -> Incoming<'_> {
        Incoming {
            topic: "sensors/d1/telemetry",
            device: None,
            payload: payload.as_bytes(),
            size: payload.len(),
            received_ms: 1_700_000_000_000,
            pkid: Some(1),
        }
    }

    #[test]
    fn a_valid_reading_becomes_its_canonical_record() {
        let m = incoming(r#"{"temperature": 21.5, "humidity": 40, "seq": 3}"#);
        let Verdict::Reading(r) = validate(&m, Some("d1"), &Limits::default(), Some(100), true)
        else {
            panic!("rejected")
        };
        let mut batch = Batch::default();
        let mut enc = Encoder::default();
        enc.reading(&r, &m, 7, &mut batch, true);
        enc.reading(&r, &m, 8, &mut batch, true);
        let recs: Vec<_> = batch.records().map(|r| r.to_owned()).collect();
        assert_eq!(recs.len(), 2);
        let r = &recs[0];
        assert_eq!((r.offset, recs[1].offset), (7, 8));
        assert_eq!(r.key.as_deref(), Some(&b"d1"[..]));
        assert_eq!(r.seq, Some(3));
        assert!(!r.dlq);
        assert_eq!(r.received_ms, m.received_ms);
        assert_eq!(
            std::str::from_utf8(&r.value).unwrap(),
            reading::parse(m.payload, Some("d1"), m.received_ms, &Limits::default())
                .unwrap()
                .to_canonical_json()
        );
        let heads: Vec<(&str, &[u8])> = r.headers.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(
            heads,
            [
                ("schema", &b"1"[..]),
                ("source", b"sensors/d1/telemetry"),
                ("received_at", b"2023-11-14T22:13:20.000Z"),
            ]
        );
        assert_eq!(recs[1].value, r.value);
    }

    /// A payload cut on arrival (issue 23: 300 x 1.9 MB took 111 MiB) is
    /// rejected for its size as received, and says it in `original_size`.
    #[test]
    fn a_payload_cut_on_arrival_is_too_large_by_its_received_size() {
        let m = Incoming {
            size: 1_900_000,
            ..incoming(r#"{"temperature": 21.5, "humidity": 40}"#)
        };
        let Verdict::Rejected {
            rejection,
            dead_letter: Some(d),
        } = validate(&m, Some("d1"), &Limits::default(), Some(1000), true)
        else {
            panic!("accepted")
        };
        assert_eq!(
            rejection,
            Rejection::PayloadTooLarge {
                size: 1_900_000,
                limit: 4096
            }
        );
        assert_eq!(d.value, m.payload);
        assert!(d
            .headers
            .iter()
            .any(|(k, v)| k == "original_size" && &v[..] == b"1900000"));
    }

    #[test]
    fn an_invalid_one_becomes_a_dead_letter_cut_to_size_or_nothing() {
        let m = incoming(r#"{"temperature": "hot"}"#);
        let Verdict::Rejected {
            rejection,
            dead_letter: Some(d),
        } = validate(&m, Some("d1"), &Limits::default(), Some(5), true)
        else {
            panic!("accepted")
        };
        assert!(d.dlq);
        assert_eq!(d.value, b"{\"tem");
        assert!(d
            .headers
            .iter()
            .any(|(k, v)| k == "reason" && &v[..] == rejection.code().as_bytes()));
        assert!(d.headers.iter().any(|(k, _)| k == "original_size"));
        let none = validate(&m, Some("d1"), &Limits::default(), None, true);
        assert!(matches!(
            none,
            Verdict::Rejected {
                dead_letter: None,
                ..
            }
        ));
    }
}
