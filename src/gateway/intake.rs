//! Intake (pure): one received payload becomes the Kafka record it will be —
//! a canonical reading for the main topic, or a dead-letter record with its
//! reason — or nothing (rejected with the DLQ disabled). No I/O here.

use crate::gateway::spool::{Header, Record};
use crate::gateway::Incoming;
use crate::reading::{self, Limits, Rejection, SCHEMA_VERSION};

/// What became of a payload.
#[derive(Debug)]
pub enum Intake {
    /// A valid reading: its record for the main topic.
    Reading(Record),
    /// Invalid: the reason, and its dead-letter record unless the DLQ is off.
    Rejected {
        rejection: Rejection,
        dead_letter: Option<Record>,
    },
}

/// Validates `m` (device id from the topic or the source) into its record.
/// `dlq_max_payload` is `None` when the DLQ is disabled. `buf` is reused.
pub fn intake(
    m: &Incoming,
    topic_device: Option<&str>,
    limits: &Limits,
    dlq_max_payload: Option<usize>,
    buf: &mut String,
) -> Intake {
    let received_at = reading::format_ts(m.received_ms);
    match reading::parse(&m.payload, topic_device, m.received_ms, limits) {
        Ok(r) => {
            buf.clear();
            r.write_canonical_json(buf);
            Intake::Reading(Record {
                offset: 0,
                received_ms: m.received_ms,
                ts_ms: Some(r.ts_ms),
                dlq: false,
                seq: r.seq,
                key: Some(r.device_id.into_bytes()),
                headers: vec![
                    ("schema".into(), SCHEMA_VERSION.as_bytes().into()),
                    ("source".into(), m.topic.as_bytes().to_vec().into()),
                    ("received_at".into(), received_at.into_bytes().into()),
                ],
                value: buf.as_bytes().to_vec(),
            })
        }
        Err(rejection) => {
            let dead_letter = dlq_max_payload.map(|max| {
                dead_letter(
                    rejection.code(),
                    &rejection.to_string(),
                    &m.topic,
                    m.received_ms,
                    topic_device.map(|d| d.as_bytes().to_vec()),
                    &m.payload,
                    max,
                )
            });
            Intake::Rejected {
                rejection,
                dead_letter,
            }
        }
    }
}

/// A dead-letter record: the raw payload (cut at `max_payload`) with `reason`,
/// `detail`, `source`, `received_at`, `schema` (and `original_size` when cut).
pub fn dead_letter(
    reason: &str,
    detail: &str,
    source: &str,
    received_ms: i64,
    key: Option<Vec<u8>>,
    payload: &[u8],
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
    if keep < payload.len() {
        headers.push((
            "original_size".into(),
            payload.len().to_string().into_bytes().into(),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn incoming(payload: &str) -> Incoming {
        Incoming {
            topic: "sensors/d1/telemetry".into(),
            device: None,
            payload: bytes::Bytes::from(payload.to_string()),
            received_ms: 1_700_000_000_000,
            received_at: std::time::Instant::now(),
            pkid: Some(1),
        }
    }

    #[test]
    fn a_valid_reading_becomes_its_canonical_record() {
        let mut buf = String::new();
        let m = incoming(r#"{"temperature": 21.5, "humidity": 40, "seq": 3}"#);
        let Intake::Reading(r) = intake(&m, Some("d1"), &Limits::default(), Some(100), &mut buf)
        else {
            panic!("rejected")
        };
        assert_eq!(r.key.as_deref(), Some(&b"d1"[..]));
        assert_eq!(r.seq, Some(3));
        assert!(!r.dlq);
        assert!(std::str::from_utf8(&r.value)
            .unwrap()
            .starts_with(r#"{"device_id":"d1""#));
        assert_eq!(r.headers[1].0, "source");
        assert_eq!(&r.headers[1].1[..], b"sensors/d1/telemetry");
    }

    #[test]
    fn an_invalid_one_becomes_a_dead_letter_cut_to_size_or_nothing() {
        let mut buf = String::new();
        let m = incoming(r#"{"temperature": "hot"}"#);
        let Intake::Rejected {
            rejection,
            dead_letter: Some(d),
        } = intake(&m, Some("d1"), &Limits::default(), Some(5), &mut buf)
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
        let none = intake(&m, Some("d1"), &Limits::default(), None, &mut buf);
        assert!(matches!(
            none,
            Intake::Rejected {
                dead_letter: None,
                ..
            }
        ));
    }
}
