//! The dead-letter topic: invalid payloads with their reasons, readings Kafka refuses for good.

use super::*;

/// Payloads that must be rejected, with the expected reason code.
fn invalid_corpus() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut v: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "bad-1",
            "malformed_json",
            br#"{"temperature": 21.5, "humidity": "#.to_vec(),
        ),
        ("bad-2", "not_an_object", b"[21.5, 40]".to_vec()),
        (
            "bad-3",
            "missing_field",
            br#"{"temperature": 21.5}"#.to_vec(),
        ),
        (
            "bad-4",
            "wrong_type",
            br#"{"temperature": "warm", "humidity": 40}"#.to_vec(),
        ),
        (
            "bad-5",
            "not_finite",
            br#"{"temperature": NaN, "humidity": 40}"#.to_vec(),
        ),
        (
            "bad-6",
            "out_of_range",
            br#"{"temperature": 85.5, "humidity": 40}"#.to_vec(),
        ),
        (
            "bad-7",
            "device_id_mismatch",
            br#"{"device_id": "other", "temperature": 1, "humidity": 2}"#.to_vec(),
        ),
        (
            "bad-8",
            "invalid_utf8",
            b"{\"temperature\": \"\xff\xfe\", \"humidity\": 2}".to_vec(),
        ),
        (
            "bad-9",
            "invalid_utf8",
            vec![0x00, 0xff, 0x13, 0x37, 0xde, 0xad, 0xbe, 0xef],
        ),
        ("bad-10", "payload_too_large", vec![b'x'; 5000]),
        ("bad-11", "payload_too_large", {
            let mut p = br#"{"temperature": 1, "humidity": 2, "pad": ""#.to_vec();
            p.extend(std::iter::repeat_n(b'a', 1 << 20));
            p.extend(br#""}"#);
            p
        }),
    ];
    // A device ts far off is not a reason to dead-letter (README "Clocks at
    // the edge"; tests/clock.rs).
    // Issue 23: non-ASCII outside a JSON string crashed the gateway, and the
    // broker's redelivery crash-looped it.
    for (dev, payload) in [
        ("poison-1", "\u{e9}"),
        ("poison-2", "{\u{201c}temperature\u{201d}:21}"),
        ("poison-3", "21\u{b0}C"),
        ("poison-4", "{\"t\": 21} \u{e9}"),
    ] {
        v.push((dev, "malformed_json", payload.as_bytes().to_vec()));
    }
    // The test-only failpoint (see `FAILPOINT`): a panic while validating
    // this one payload dead-letters it, and nothing else changes.
    v.push((
        "poison-5",
        "internal_error",
        format!(r#"{{"temperature":21,"humidity":40,"note":"{FAILPOINT}"}}"#).into_bytes(),
    ));
    // A device id that breaks the rules: spaces are legal in MQTT topics.
    v.push((
        "bad id",
        "bad_device_id",
        br#"{"temperature":1,"humidity":2}"#.to_vec(),
    ));
    v
}

/// Payload text that panics intake (`IOT_FAILPOINT_INTAKE`, feature `failpoints`).
const FAILPOINT: &str = "FAILPOINT-PANIC";

#[tokio::test(flavor = "multi_thread")]
async fn invalid_payloads_go_to_the_dlq_with_their_reason() {
    common::require_failpoints();
    let s = Setup::new("gw-dlq").await;
    let mut gw = s.start(&[("IOT_FAILPOINT_INTAKE", FAILPOINT.into())], "gateway");
    s.wait_ready(&mut gw).await;
    let corpus = invalid_corpus();
    let msgs: Vec<(String, Vec<u8>)> = corpus
        .iter()
        .map(|(dev, _, p)| (s.mqtt_topic(dev), p.clone()))
        .collect();
    let (host, port) = common::mqtt_host_port();
    publish_all(&host, port, &msgs, None).await;
    // ... and the gateway keeps working: a valid reading after the garbage.
    publish_all(
        &host,
        port,
        &[(
            s.mqtt_topic("good-1"),
            br#"{"temperature":20,"humidity":50}"#.to_vec(),
        )],
        None,
    )
    .await;

    let dlq = common::consume(
        &s.dlq,
        corpus.len(),
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    let mut got: HashMap<String, (String, usize, String)> = HashMap::new();
    for m in &dlq {
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let reason = common::header(m, "reason")
            .expect("reason header")
            .to_string();
        let detail = common::header(m, "detail").expect("detail header");
        assert!(!detail.is_empty());
        if common::header(m, "reason") == Some("internal_error") {
            assert!(detail.contains("failpoint intake hit"), "{detail}");
        }
        assert!(common::header(m, "received_at").is_some());
        let source = common::header(m, "source")
            .expect("source header")
            .to_string();
        got.insert(key, (reason, m.payload().map_or(0, <[u8]>::len), source));
    }
    for (dev, reason, payload) in &corpus {
        let (r, len, source) = got
            .get(*dev)
            .unwrap_or_else(|| panic!("no DLQ record for {dev}; got {got:?}"));
        assert_eq!(r, reason, "{dev}");
        assert_eq!(source, &s.mqtt_topic(dev));
        assert_eq!(
            *len,
            payload.len().min(65_536),
            "{dev}: raw payload (truncated at 64 KiB)"
        );
    }
    // The 1 MiB payload is truncated and says how large it was.
    let big = dlq
        .iter()
        .find(|m| m.key() == Some(b"bad-11"))
        .expect("bad-11");
    let big_len = corpus
        .iter()
        .find(|c| c.0 == "bad-11")
        .map(|c| c.2.len())
        .expect("bad-11");
    assert!(big_len > 1 << 20);
    assert_eq!(
        common::header(big, "original_size"),
        Some(big_len.to_string().as_str())
    );
    assert_eq!(dlq.len(), corpus.len(), "one DLQ record each");

    let weather =
        common::consume(&s.topic, 1, Duration::from_secs(30), Duration::from_secs(2)).await;
    assert_eq!(weather.len(), 1, "only the valid reading reaches the topic");
    assert_eq!(weather[0].key(), Some(&b"good-1"[..]));
    assert!(gw.is_running());
    let samples = common::scrape(&s.http);
    assert_eq!(
        common::metric(
            &samples,
            "gateway_readings_rejected_total",
            &[("reason", "payload_too_large")]
        ),
        Some(2.0)
    );
    assert_eq!(
        common::metric(
            &samples,
            "gateway_dlq_records_total",
            &[("reason", "invalid_utf8")]
        ),
        Some(2.0)
    );
    assert_eq!(
        common::metric(&samples, "gateway_mqtt_acks_total", &[]),
        Some((corpus.len() + 1) as f64)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reading_kafka_refuses_for_good_is_dead_lettered_with_the_reason() {
    common::require_kafka();
    let s = Setup::bare("gw-toolarge");
    // The topic accepts at most 100-byte batches: every canonical reading is refused.
    common::create_topic_with(&s.topic, 1, &[("max.message.bytes", "100")]).await;
    common::create_topic(&s.dlq, 1).await;
    let mut gw = s.start(&[], "gateway");
    s.wait_ready(&mut gw).await;
    let (host, port) = common::mqtt_host_port();
    let payload = br#"{"temperature": 21.5, "humidity": 40, "seq": 1}"#.to_vec();
    publish_all(&host, port, &[(s.mqtt_topic("big-1"), payload)], None).await;
    let dlq = common::consume(&s.dlq, 1, Duration::from_secs(60), Duration::from_secs(1)).await;
    assert_eq!(dlq.len(), 1, "log:\n{}", gw.log_text());
    let m = &dlq[0];
    assert_eq!(common::header(m, "reason"), Some("kafka_rejected"));
    let detail = common::header(m, "detail").expect("detail");
    assert!(
        detail.to_lowercase().contains("size") || detail.contains("large"),
        "{detail}"
    );
    assert_eq!(m.key(), Some(&b"big-1"[..]));
    let value: serde_json::Value =
        serde_json::from_slice(m.payload().expect("payload")).expect("canonical JSON");
    assert_eq!(value["device_id"], "big-1");
    assert_eq!(
        s.metric("gateway_delivery_errors_total", &[("kind", "permanent")]),
        1.0
    );
    assert_eq!(
        s.metric("gateway_dlq_records_total", &[("reason", "kafka_rejected")]),
        1.0
    );
    let acked = common::eventually(Duration::from_secs(5), || {
        s.metric("gateway_mqtt_acks_total", &[]) == 1.0
    })
    .await;
    assert!(
        acked,
        "the MQTT message is acknowledged once its DLQ record is in Kafka"
    );
}
