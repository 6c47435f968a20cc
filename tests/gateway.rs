//! The gateway binary against the real stack: MQTT in, Kafka out, exactly what a
//! user runs. Each test has its own topics, MQTT prefix, client id and HTTP port.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// One test's private names.
struct Setup {
    name: String,
    topic: String,
    dlq: String,
    prefix: String,
    http: String,
    dir: PathBuf,
}

impl Setup {
    async fn new(label: &str) -> Setup {
        common::require_kafka();
        let s = Setup::bare(label);
        common::create_topic(&s.topic, 6).await;
        common::create_topic(&s.dlq, 1).await;
        s
    }

    /// Names only; the topics are created elsewhere.
    fn bare(label: &str) -> Setup {
        common::require_mqtt();
        let name = common::unique_name(label);
        let topic = format!("{name}.weather");
        let dlq = format!("{name}.dlq");
        Setup {
            dir: common::test_dir(&name),
            prefix: name.clone(),
            http: format!("127.0.0.1:{}", common::free_port()),
            name,
            topic,
            dlq,
        }
    }

    fn mqtt_topic(&self, device: &str) -> String {
        format!("{}/{device}/telemetry", self.prefix)
    }

    /// Environment for the gateway process: everything as overrides of the
    /// shipped sample config.
    fn env(&self, mqtt_url: &str, kafka: &str) -> Vec<(&'static str, String)> {
        vec![
            ("GATEWAY__MQTT__URL", mqtt_url.to_string()),
            ("GATEWAY__MQTT__CLIENT_ID", format!("gw-{}", self.name)),
            (
                "GATEWAY__MQTT__TOPICS",
                format!("{}/+/telemetry", self.prefix),
            ),
            ("GATEWAY__KAFKA__BOOTSTRAP_SERVERS", kafka.to_string()),
            ("GATEWAY__KAFKA__TOPIC", self.topic.clone()),
            ("GATEWAY__KAFKA__DLQ_TOPIC", self.dlq.clone()),
            ("GATEWAY__HTTP__LISTEN", self.http.clone()),
            (
                "GATEWAY__SPOOL__DIR",
                self.dir.join("spool").display().to_string(),
            ),
        ]
    }

    fn start(&self, extra: &[(&'static str, String)], log: &str) -> common::Child {
        self.start_with(
            &common::mqtt_broker(),
            &common::kafka_bootstrap(),
            extra,
            log,
        )
    }

    fn start_with(
        &self,
        mqtt_url: &str,
        kafka: &str,
        extra: &[(&'static str, String)],
        log: &str,
    ) -> common::Child {
        let mut env = self.env(mqtt_url, kafka);
        env.extend(extra.iter().cloned());
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/gateway.toml");
        common::spawn(GATEWAY, &["run", "--config", config], &env, &self.dir, log)
    }

    async fn wait_ready(&self, gw: &mut common::Child) {
        let http = self.http.clone();
        let ok = common::eventually(Duration::from_secs(30), || {
            matches!(common::http_get(&http, "/readyz"), Ok((200, _)))
        })
        .await;
        assert!(
            ok && gw.is_running(),
            "gateway not ready in 30 s; log:\n{}",
            gw.log_text()
        );
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        common::metric(&common::scrape(&self.http), name, labels).unwrap_or(0.0)
    }
}

/// Publishes every (topic, payload) with QoS 1 and waits for all PUBACKs.
async fn publish_all(host: &str, port: u16, msgs: &[(String, Vec<u8>)], pace: Option<Duration>) {
    let mut opts = MqttOptions::new(common::unique_name("pub"), host, port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(4 << 20, 4 << 20)
        .set_inflight(200);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let to_send = msgs.to_vec();
    let sender = tokio::spawn(async move {
        for (t, p) in to_send {
            client
                .publish(t, QoS::AtLeastOnce, false, p)
                .await
                .expect("publish");
            if let Some(d) = pace {
                tokio::time::sleep(d).await;
            }
        }
        client
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked < msgs.len() {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // The broker may be restarting (Mosquitto restart test): retry.
                eprintln!("publisher connection: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => panic!("only {acked} of {} publishes acknowledged", msgs.len()),
        }
    }
    let client = sender.await.expect("sender");
    let _ = client.disconnect().await;
}

/// `devices` x `per_device` readings, alternating numeric and numeric-string payloads.
fn readings(
    s: &Setup,
    devices: usize,
    seqs: std::ops::RangeInclusive<u64>,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let ts = now_ms();
    for seq in seqs {
        for d in 0..devices {
            let dev = format!("dev-{d:03}");
            let t = 15.0 + (d % 10) as f64 + seq as f64 / 1000.0;
            let h = 30.0 + (seq % 50) as f64;
            let payload = if seq % 2 == 0 {
                format!(
                    r#"{{"device_id":"{dev}","temperature":{t},"humidity":{h},"seq":{seq},"ts":{ts}}}"#
                )
            } else {
                format!(r#"{{"temperature": "{t}", "humidity": "{h}", "seq": "{seq}"}}"#)
            };
            out.push((s.mqtt_topic(&dev), payload.into_bytes()));
        }
    }
    out
}

/// Every record: key = device, canonical sorted JSON, headers, timestamp = ts;
/// returns seqs per device in consumption (= partition) order.
fn check_records(s: &Setup, records: &[OwnedMessage], start_ms: i64) -> BTreeMap<String, Vec<u64>> {
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in records {
        let key = std::str::from_utf8(m.key().expect("key"))
            .expect("utf8 key")
            .to_string();
        let value = std::str::from_utf8(m.payload().expect("value")).expect("utf8 value");
        let v: serde_json::Value = serde_json::from_str(value).expect("JSON value");
        let obj = v.as_object().expect("object");
        let keys: Vec<&String> = obj.keys().collect();
        assert_eq!(
            keys,
            ["device_id", "humidity", "seq", "temperature", "ts"],
            "{value}"
        );
        assert!(
            value.starts_with(&format!(r#"{{"device_id":"{key}","humidity":"#)),
            "keys sorted in the raw value: {value}"
        );
        assert_eq!(obj["device_id"], key.as_str());
        let seq = obj["seq"].as_u64().expect("seq number");
        let d: f64 = key[4..].parse().expect("device number");
        let t = obj["temperature"].as_f64().expect("temperature number");
        let h = obj["humidity"].as_f64().expect("humidity number");
        assert!(
            (t - (15.0 + d % 10.0 + seq as f64 / 1000.0)).abs() < 1e-9,
            "{value}"
        );
        assert!((h - (30.0 + (seq % 50) as f64)).abs() < 1e-9, "{value}");
        let ts = obj["ts"].as_str().expect("ts string");
        let ts_ms = chrono::DateTime::parse_from_rfc3339(ts)
            .expect("rfc3339")
            .timestamp_millis();
        assert!(
            ts.ends_with('Z') && ts.len() == 24,
            "RFC 3339 UTC with ms: {ts}"
        );
        assert!(ts_ms >= start_ms - 1000 && ts_ms <= now_ms(), "{ts}");
        assert_eq!(
            m.timestamp().to_millis(),
            Some(ts_ms),
            "record timestamp = ts"
        );
        assert_eq!(common::header(m, "schema"), Some("1"));
        assert_eq!(
            common::header(m, "source"),
            Some(s.mqtt_topic(&key).as_str())
        );
        let recv = common::header(m, "received_at").expect("received_at header");
        assert!(chrono::DateTime::parse_from_rfc3339(recv).is_ok(), "{recv}");
        per_device.entry(key).or_default().push(seq);
    }
    per_device
}

async fn exactly_once(mode: &str, version: &str, devices: usize, per_device: u64) {
    let s = Setup::new(&format!("gw-{mode}")).await;
    let mut gw = s.start(
        &[
            ("GATEWAY__KAFKA__DELIVERY_MODE", mode.to_string()),
            ("GATEWAY__MQTT__VERSION", version.to_string()),
        ],
        "gateway",
    );
    s.wait_ready(&mut gw).await;
    let start = now_ms();
    let msgs = readings(&s, devices, 1..=per_device);
    let (host, port) = common::mqtt_host_port();
    publish_all(&host, port, &msgs, None).await;

    let total = devices * per_device as usize;
    let records = common::consume(
        &s.topic,
        total,
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        records.len(),
        total,
        "exactly once; gateway log:\n{}",
        gw.log_text()
    );
    let per_device_seqs = check_records(&s, &records, start);
    assert_eq!(per_device_seqs.len(), devices);
    for (dev, seqs) in &per_device_seqs {
        let want: Vec<u64> = (1..=per_device).collect();
        assert_eq!(seqs, &want, "{dev}: every reading once, in order");
    }
    // Every MQTT message was acknowledged, and the counters agree.
    let ok = common::eventually(Duration::from_secs(10), || {
        s.metric("gateway_mqtt_acks_total", &[]) == total as f64
    })
    .await;
    assert!(ok, "acks: {}", s.metric("gateway_mqtt_acks_total", &[]));
    assert_eq!(
        s.metric("gateway_readings_delivered_total", &[]),
        total as f64
    );
    assert_eq!(
        s.metric("gateway_readings_received_total", &[("source", "mqtt")]),
        total as f64
    );
    assert_eq!(s.metric("gateway_sequence_gaps_total", &[]), 0.0);
    assert_eq!(s.metric("gateway_in_flight_readings", &[]), 0.0);
    assert!(
        common::consume(&s.dlq, 0, Duration::from_secs(2), Duration::ZERO)
            .await
            .is_empty()
    );
    assert_eq!(
        gw.terminate(Duration::from_secs(15)).map(|st| st.code()),
        Some(Some(0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn async_mode_delivers_10000_readings_exactly_once_in_order() {
    exactly_once("async", "3.1.1", 100, 100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_mode_delivers_10000_readings_exactly_once_in_order() {
    exactly_once("sync", "3.1.1", 100, 100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_delivers_exactly_once() {
    exactly_once("async", "5", 20, 50).await;
}

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
async fn sigterm_mid_stream_then_restart_loses_nothing() {
    let s = Setup::new("gw-sigterm").await;
    let mut gw = s.start(&[], "gateway-1");
    s.wait_ready(&mut gw).await;
    let (host, port) = common::mqtt_host_port();
    let msgs = readings(&s, 20, 1..=150);
    let total = msgs.len();
    // Publish at ~1000/s; stop the gateway while the stream is flowing.
    let publisher = {
        let (host, msgs) = (host.clone(), msgs.clone());
        tokio::spawn(async move {
            publish_all(&host, port, &msgs, Some(Duration::from_millis(1))).await
        })
    };
    let http = s.http.clone();
    let flowing = common::eventually(Duration::from_secs(30), || {
        common::http_get(&http, "/metrics")
            .map(|(_, b)| {
                common::metric(
                    &common::parse_prometheus(&b),
                    "gateway_readings_delivered_total",
                    &[],
                )
                .unwrap_or(0.0)
                    >= 300.0
            })
            .unwrap_or(false)
    })
    .await;
    assert!(flowing, "stream did not start; log:\n{}", gw.log_text());
    let status = gw
        .terminate(Duration::from_secs(20))
        .expect("gateway exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit 0; log:\n{}", gw.log_text());
    assert!(gw.log_text().contains("shutting down"), "{}", gw.log_text());
    publisher.await.expect("publisher");

    let mut gw2 = s.start(&[], "gateway-2");
    s.wait_ready(&mut gw2).await;
    let records = common::consume(
        &s.topic,
        total,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    let mut seen: BTreeMap<String, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for m in &records {
        let v: serde_json::Value =
            serde_json::from_slice(m.payload().expect("value")).expect("json");
        seen.entry(v["device_id"].as_str().expect("id").to_string())
            .or_default()
            .insert(v["seq"].as_u64().expect("seq"));
    }
    assert_eq!(seen.len(), 20);
    for (dev, seqs) in &seen {
        assert_eq!(seqs.len(), 150, "{dev}: missing readings after restart");
    }
    // A clean stop settles and checkpoints everything: nothing is sent twice.
    assert_eq!(records.len(), total, "no duplicates after a clean restart");
    assert_eq!(
        gw2.terminate(Duration::from_secs(15)).map(|s| s.code()),
        Some(Some(0))
    );
}

/// PUBACKs go out in batches (the first through rumqttc, the rest written by
/// the gateway): if any were lost, the broker would send them again to the
/// restarted gateway. Spool off, so nothing downstream hides a repeat; more
/// readings than the broker's in-flight window, so a lost one would also stall.
#[tokio::test(flavor = "multi_thread")]
async fn every_puback_is_written_so_a_restart_gets_nothing_again() {
    let s = Setup::new("gw-acks").await;
    let extra = [("GATEWAY__SPOOL__ENABLED", "false".to_string())];
    let mut gw = s.start(&extra, "gateway-1");
    s.wait_ready(&mut gw).await;
    let (host, port) = common::mqtt_host_port();
    let msgs = readings(&s, 20, 1..=1500);
    let total = msgs.len() as f64;
    publish_all(&host, port, &msgs, None).await;
    let all_acked = common::eventually(Duration::from_secs(60), || {
        s.metric("gateway_mqtt_acks_total", &[]) >= total
    })
    .await;
    assert!(all_acked, "not all acknowledged; log:\n{}", gw.log_text());
    assert_eq!(s.metric("gateway_readings_delivered_total", &[]), total);
    let status = gw.terminate(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0), "exit 0; log:\n{}", gw.log_text());

    let mut gw2 = s.start(&extra, "gateway-2");
    s.wait_ready(&mut gw2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.metric("gateway_readings_received_total", &[]),
        0.0,
        "the broker sent readings again: some PUBACKs were not written; log:\n{}",
        gw2.log_text()
    );
    let records = common::consume(
        &s.topic,
        msgs.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(records.len(), msgs.len());
    assert_eq!(
        gw2.terminate(Duration::from_secs(15)).map(|s| s.code()),
        Some(Some(0))
    );
}

#[test]
fn check_config_names_a_typo_d_key() {
    let dir = common::test_dir(&common::unique_name("gw-config"));
    let path = dir.join("typo.toml");
    std::fs::write(&path, "[kafka]\ntopic = \"weather\"\nlinger_msec = 5\n").expect("write");
    let out = std::process::Command::new(GATEWAY)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run gateway");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("linger_msec"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    // The shipped sample is valid, and secrets are masked.
    let out = std::process::Command::new(GATEWAY)
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/gateway.toml"),
        ])
        .env("GATEWAY__MQTT__USERNAME", "u")
        .env("GATEWAY__MQTT__PASSWORD", "hunter2")
        .output()
        .expect("run gateway");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("username = \"u\"") && !stdout.contains("hunter2"),
        "{stdout}"
    );
}

#[test]
fn missing_topic_is_a_clear_error_not_a_hang() {
    common::require_kafka();
    let dir = common::test_dir(&common::unique_name("gw-notopic"));
    let started = std::time::Instant::now();
    let out = std::process::Command::new(GATEWAY)
        .args(["--simulate", "1"])
        .env(
            "GATEWAY__KAFKA__BOOTSTRAP_SERVERS",
            common::kafka_bootstrap(),
        )
        .env(
            "GATEWAY__KAFKA__TOPIC",
            common::unique_name("no-such-topic"),
        )
        .env(
            "GATEWAY__HTTP__LISTEN",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .current_dir(&dir)
        .output()
        .expect("run gateway");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not exist") && stderr.contains("no-such-topic"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Distinct (device, seq) pairs in `records`.
fn readings_seen(records: &[OwnedMessage]) -> std::collections::BTreeSet<(String, u64)> {
    records
        .iter()
        .map(|m| {
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().expect("value")).expect("json");
            (
                v["device_id"].as_str().expect("id").to_string(),
                v["seq"].as_u64().expect("seq"),
            )
        })
        .collect()
}

fn readyz(s: &Setup) -> (u16, String) {
    common::http_get(&s.http, "/readyz").unwrap_or((0, String::new()))
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_down_at_start_and_for_20s_mid_stream_loses_nothing() {
    let mut s = Setup::bare("gw-kafka-outage");
    let stack = common::PrivateStack::new(&s.dir);
    // A Kafka of our own (with its topics), stopped before the gateway starts.
    stack.run(&["up", "kafka"]);
    stack.run(&["down", "kafka"]);
    s.topic = "weather".into();
    s.dlq = "weather.dlq".into();
    let kafka = stack.kafka_bootstrap();
    // Without the spool: readings wait unacknowledged (the broker keeps them).
    let mut gw = s.start_with(
        &common::mqtt_broker(),
        &kafka,
        &[("GATEWAY__SPOOL__ENABLED", "false".into())],
        "gateway",
    );
    let http = s.http.clone();
    let up = common::eventually(Duration::from_secs(20), || {
        matches!(common::http_get(&http, "/healthz"), Ok((200, _)))
    })
    .await;
    assert!(
        up && gw.is_running(),
        "gateway must run without Kafka; log:\n{}",
        gw.log_text()
    );
    let subscribed = common::eventually(Duration::from_secs(20), || {
        s.metric("gateway_mqtt_connected", &[]) == 1.0
    })
    .await;
    assert!(subscribed, "MQTT subscribed while Kafka is down");
    let (code, body) = readyz(&s);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("Kafka not reachable"), "{body}");

    // Readings published while Kafka is down wait, unacknowledged.
    let (host, port) = common::mqtt_host_port();
    let batch_a = readings(&s, 10, 1..=50);
    publish_all(&host, port, &batch_a, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.metric("gateway_mqtt_acks_total", &[]),
        0.0,
        "nothing acked without Kafka"
    );
    stack.run(&["up", "kafka"]);
    s.wait_ready(&mut gw).await;
    let got = common::consume_from(
        &kafka,
        "weather",
        batch_a.len(),
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert_eq!(
        readings_seen(&got).len(),
        batch_a.len(),
        "log:\n{}",
        gw.log_text()
    );

    // Mid-stream: ~30 s of readings at ~100/s; Kafka stops for 20 s in the middle.
    let batch_b = readings(&s, 10, 51..=350);
    let publisher = {
        let (host, msgs) = (host.clone(), batch_b.clone());
        tokio::spawn(async move {
            publish_all(&host, port, &msgs, Some(Duration::from_millis(10))).await
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.run(&["down", "kafka"]);
    let down_at = std::time::Instant::now();
    let noticed = common::eventually(Duration::from_secs(15), || readyz(&s).0 == 503).await;
    assert!(noticed, "/readyz must report Kafka down");
    assert!(gw.is_running());
    assert_eq!(
        s.metric("gateway_mqtt_connected", &[]),
        1.0,
        "MQTT stays connected"
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(down_at.elapsed())).await;
    stack.run(&["up", "kafka"]);
    publisher.await.expect("publisher");
    let all = batch_a.len() + batch_b.len();
    let got = common::consume_from(
        &kafka,
        "weather",
        all,
        Duration::from_secs(120),
        Duration::from_secs(2),
    )
    .await;
    let seen = readings_seen(&got);
    assert_eq!(
        seen.len(),
        all,
        "every reading reached Kafka; log:\n{}",
        gw.log_text()
    );
    assert_eq!(readyz(&s).0, 200);
    assert_eq!(
        gw.terminate(Duration::from_secs(20)).map(|st| st.code()),
        Some(Some(0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_restart_mid_stream_reconnects_and_resumes() {
    let s = Setup::new("gw-mqtt-restart").await;
    let stack = common::PrivateStack::new(&s.dir);
    stack.run(&["up", "mosquitto"]);
    let mut gw = s.start_with(
        &stack.mqtt_url(),
        &common::kafka_bootstrap(),
        &[],
        "gateway",
    );
    s.wait_ready(&mut gw).await;
    let batch_a = readings(&s, 10, 1..=100);
    publish_all("127.0.0.1", stack.mqtt_port, &batch_a, None).await;
    stack.run(&["down", "mosquitto"]);
    let http = s.http.clone();
    let noticed = common::eventually(Duration::from_secs(10), || {
        matches!(common::http_get(&http, "/readyz"), Ok((503, _)))
    })
    .await;
    assert!(noticed, "/readyz must report MQTT down");
    stack.run(&["up", "mosquitto"]);
    s.wait_ready(&mut gw).await;
    let batch_b = readings(&s, 10, 101..=200);
    publish_all("127.0.0.1", stack.mqtt_port, &batch_b, None).await;
    let all = batch_a.len() + batch_b.len();
    let got = common::consume(
        &s.topic,
        all,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(readings_seen(&got).len(), all, "log:\n{}", gw.log_text());
    assert!(s.metric("gateway_mqtt_reconnects_total", &[]) >= 1.0);
    assert_eq!(s.metric("gateway_mqtt_connected", &[]), 1.0);
    assert_eq!(
        gw.terminate(Duration::from_secs(20)).map(|st| st.code()),
        Some(Some(0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_fleet_runs_without_a_broker() {
    common::require_kafka();
    let s = Setup::new("gw-sim").await;
    // MQTT points nowhere: --simulate turns it off.
    let dead = format!("mqtt://127.0.0.1:{}", common::free_port());
    let mut gw = common::spawn(
        GATEWAY,
        &["--simulate", "20"],
        &[
            ("GATEWAY__MQTT__URL", dead),
            (
                "GATEWAY__KAFKA__BOOTSTRAP_SERVERS",
                common::kafka_bootstrap(),
            ),
            ("GATEWAY__KAFKA__TOPIC", s.topic.clone()),
            ("GATEWAY__KAFKA__DLQ_TOPIC", s.dlq.clone()),
            ("GATEWAY__HTTP__LISTEN", s.http.clone()),
            ("GATEWAY__SIMULATE__RATE_PER_DEVICE", "20".into()),
            ("GATEWAY__SIMULATE__FAULTS", "0.3".into()),
            (
                "GATEWAY__SPOOL__DIR",
                s.dir.join("spool").display().to_string(),
            ),
        ],
        &s.dir,
        "gateway",
    );
    s.wait_ready(&mut gw).await;
    let ok = common::eventually(Duration::from_secs(30), || {
        s.metric("gateway_readings_delivered_total", &[]) >= 500.0
            && s.metric("gateway_dlq_records_total", &[]) >= 20.0
    })
    .await;
    assert!(ok, "log:\n{}", gw.log_text());
    assert_eq!(
        gw.terminate(Duration::from_secs(15)).map(|st| st.code()),
        Some(Some(0))
    );
    let records = common::consume(
        &s.topic,
        500,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert!(records.len() >= 500);
    for m in records.iter().take(200) {
        assert_eq!(common::header(m, "source"), Some("simulated"));
        let key = std::str::from_utf8(m.key().expect("key")).expect("utf8");
        assert!(key.starts_with("sensor-"), "{key}");
        let v: serde_json::Value =
            serde_json::from_slice(m.payload().expect("value")).expect("json");
        assert_eq!(v["device_id"], key);
    }
    let dlq = common::consume(&s.dlq, 20, Duration::from_secs(30), Duration::from_secs(1)).await;
    assert!(dlq.len() >= 20);
    assert!(dlq.iter().all(|m| common::header(m, "reason").is_some()
        && common::header(m, "source") == Some("simulated")));
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

#[tokio::test(flavor = "multi_thread")]
async fn create_topics_makes_missing_topics_with_the_configured_partitions() {
    common::require_kafka();
    let s = Setup::bare("gw-create");
    let mut gw = s.start(
        &[
            ("GATEWAY__KAFKA__CREATE_TOPICS", "true".into()),
            ("GATEWAY__KAFKA__PARTITIONS", "3".into()),
        ],
        "gateway",
    );
    s.wait_ready(&mut gw).await;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::kafka_bootstrap())
        .create()
        .expect("client");
    use rdkafka::consumer::Consumer;
    let md = consumer
        .fetch_metadata(Some(&s.topic), Duration::from_secs(10))
        .expect("metadata");
    assert_eq!(md.topics()[0].partitions().len(), 3);
    let md = consumer
        .fetch_metadata(Some(&s.dlq), Duration::from_secs(10))
        .expect("metadata");
    assert_eq!(md.topics()[0].partitions().len(), 1);
    assert_eq!(
        gw.terminate(Duration::from_secs(15)).map(|st| st.code()),
        Some(Some(0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn create_topics_waits_for_a_kafka_that_is_down_at_start() {
    let s = Setup::bare("gw-create-late");
    let stack = common::PrivateStack::new(&s.dir);
    let kafka = stack.kafka_bootstrap();
    let mut gw = s.start_with(
        &common::mqtt_broker(),
        &kafka,
        &[("GATEWAY__KAFKA__CREATE_TOPICS", "true".into())],
        "gateway",
    );
    let http = s.http.clone();
    // Ready (accepting readings into the spool) while Kafka is unreachable.
    let up = common::eventually(Duration::from_secs(20), || {
        matches!(common::http_get(&http, "/readyz"), Ok((200, b)) if b.contains("kafka: unreachable"))
    })
    .await;
    assert!(up && gw.is_running(), "log:\n{}", gw.log_text());
    stack.run(&["up", "kafka"]);
    // Kafka answers without our topics: the gateway creates them instead of giving up.
    let reachable = common::eventually(Duration::from_secs(60), || {
        s.metric("gateway_kafka_reachable", &[]) == 1.0
    })
    .await;
    assert!(reachable, "log:\n{}", gw.log_text());
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .create()
        .expect("client");
    use rdkafka::consumer::Consumer;
    for (topic, partitions) in [(&s.topic, 6), (&s.dlq, 1)] {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        assert_eq!(md.topics()[0].partitions().len(), partitions, "{topic}");
    }
    assert!(gw.is_running());
    assert_eq!(
        gw.terminate(Duration::from_secs(15)).map(|st| st.code()),
        Some(Some(0))
    );
}

/// `count` readings for `devices` devices starting at `seq0`, published at
/// about `rate` per second (QoS 1; waits for every PUBACK, across broker restarts).
async fn publish_paced(
    s: &Setup,
    port: u16,
    devices: usize,
    seqs: std::ops::Range<u64>,
    rate: u64,
) {
    let msgs = readings(s, devices, seqs.start..=seqs.end - 1);
    // A tenth of a second of readings per connection, then wait for the clock.
    let chunks = msgs.chunks((rate / 10).max(1) as usize);
    let t0 = std::time::Instant::now();
    let mut sent = 0usize;
    for chunk in chunks {
        publish_all("127.0.0.1", port, chunk, None).await;
        sent += chunk.len();
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

fn kill9(stack: &common::PrivateStack, service: &str) {
    let pid = std::fs::read_to_string(stack.dir.join("run").join(format!("{service}.pid")))
        .expect("pid file");
    let st = std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .expect("kill");
    assert!(st.success());
}

/// The spool's promise against the real brokers: Kafka down for 3 minutes at
/// ~2,000 readings/s; meanwhile Mosquitto and the gateway are each killed with
/// -9 and restarted. Every reading the broker acknowledged to the publisher
/// reaches Kafka once Kafka is back; duplicates are reported.
#[tokio::test(flavor = "multi_thread")]
async fn spool_keeps_every_reading_through_a_3_minute_kafka_outage_and_kill_9s() {
    let mut s = Setup::bare("gw-spool-outage");
    let stack = common::PrivateStack::new(&s.dir);
    stack.run(&["up", "kafka", "mosquitto"]);
    s.topic = "weather".into();
    s.dlq = "weather.dlq".into();
    let kafka = stack.kafka_bootstrap();
    let mqtt = stack.mqtt_url();
    let mut gw = s.start_with(&mqtt, &kafka, &[], "gateway-1");
    s.wait_ready(&mut gw).await;
    let (devices, rate) = (50usize, 2000u64);
    let per_sec = rate / devices as u64; // seqs per device per second

    // A: 10 s with Kafka up.
    let mut seq = 0u64;
    publish_paced(&s, stack.mqtt_port, devices, seq..seq + 10 * per_sec, rate).await;
    seq += 10 * per_sec;
    stack.run(&["down", "kafka"]);
    let outage = std::time::Instant::now();
    // B: 40 s into the spool; everything is acknowledged although Kafka is down.
    publish_paced(&s, stack.mqtt_port, devices, seq..seq + 40 * per_sec, rate).await;
    seq += 40 * per_sec;
    let published = seq * devices as u64;
    let acked = common::eventually(Duration::from_secs(30), || {
        s.metric("gateway_mqtt_acks_total", &[]) >= published as f64
    })
    .await;
    assert!(
        acked,
        "PUBACKed from the spool while Kafka is down; log:\n{}",
        gw.log_text()
    );
    let (code, body) = readyz(&s);
    assert!(code == 200 && body.contains("spooling"), "{code} {body}");
    // The edge broker loses power: its queue for us is empty, the spool has it all.
    kill9(&stack, "mosquitto");
    stack.run(&["up", "mosquitto"]);
    // C: 60 s; the gateway is killed with -9 after 20 s and back 5 s later.
    let publisher = {
        let s2 = Setup {
            http: s.http.clone(),
            dir: s.dir.clone(),
            name: s.name.clone(),
            topic: s.topic.clone(),
            dlq: s.dlq.clone(),
            prefix: s.prefix.clone(),
        };
        let port = stack.mqtt_port;
        let range = seq..seq + 60 * per_sec;
        tokio::spawn(async move { publish_paced(&s2, port, devices, range, rate).await })
    };
    seq += 60 * per_sec;
    tokio::time::sleep(Duration::from_secs(20)).await;
    gw.child.kill().expect("kill -9 gateway");
    let _ = gw.child.wait();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut gw = s.start_with(&mqtt, &kafka, &[], "gateway-2");
    s.wait_ready(&mut gw).await;
    publisher.await.expect("publisher");
    // D: until Kafka has been down for 3 minutes.
    let rest = Duration::from_secs(180)
        .saturating_sub(outage.elapsed())
        .as_secs();
    publish_paced(
        &s,
        stack.mqtt_port,
        devices,
        seq..seq + rest * per_sec,
        rate,
    )
    .await;
    seq += rest * per_sec;
    let total = seq as usize * devices;
    stack.run(&["up", "kafka"]);
    let got = common::consume_from(
        &kafka,
        "weather",
        total,
        Duration::from_secs(300),
        Duration::from_secs(3),
    )
    .await;
    let seen = readings_seen(&got);
    let missing = total - seen.len();
    eprintln!(
        "spool outage: {total} readings published and acknowledged by the broker, {} records in Kafka, {} distinct, {missing} missing, {} duplicates",
        got.len(),
        seen.len(),
        got.len() - seen.len()
    );
    assert_eq!(
        missing,
        0,
        "every acknowledged reading reached Kafka; log:\n{}",
        gw.log_text()
    );
    // Per device, first occurrences are in seq order (the spool forwards in order).
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut firsts = std::collections::HashSet::new();
    for m in &got {
        let v: serde_json::Value =
            serde_json::from_slice(m.payload().expect("value")).expect("json");
        let (d, q) = (
            v["device_id"].as_str().expect("id").to_string(),
            v["seq"].as_u64().expect("seq"),
        );
        if firsts.insert((d.clone(), q)) {
            let prev = last.insert(d.clone(), q);
            assert!(prev.is_none_or(|p| p < q), "{d}: seq {q} after {prev:?}");
        }
    }
    let drained = common::eventually(Duration::from_secs(60), || {
        s.metric("gateway_spool_records", &[]) == 0.0
    })
    .await;
    assert!(drained, "spool drained after the outage");
    assert_eq!(
        gw.terminate(Duration::from_secs(20)).map(|st| st.code()),
        Some(Some(0))
    );
}

/// A tmpfs mounted by the test (root only), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill the disk under the spool and needs root \
             (CI runs as root): `sudo scripts/test`. mount said: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Distinct (device, seq) of `s`'s readings among `records` (several tests
/// share a private Kafka's `weather`; the `source` header names the topic).
fn readings_of(s: &Setup, records: &[OwnedMessage]) -> std::collections::BTreeSet<(String, u64)> {
    let mine: Vec<OwnedMessage> = records
        .iter()
        .filter(|m| common::header(m, "source").is_some_and(|t| t.starts_with(&s.prefix)))
        .cloned()
        .collect();
    readings_seen(&mine)
}

/// The spool on a 16 MiB tmpfs (the disk fills long before `max_bytes`) while
/// Kafka is down. `block`: acknowledgements stop, nothing crashes, and every
/// reading arrives once Kafka is back (the broker held the rest).
/// `drop_oldest`: everything is acknowledged, and what is missing from Kafka
/// afterwards is exactly what the counter says was dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_blocks_or_drops_exactly_what_it_counts() {
    let base = Setup::bare("gw-diskfull");
    let stack = common::PrivateStack::new(&base.dir);
    stack.run(&["up", "kafka"]);
    stack.run(&["down", "kafka"]);
    let kafka = stack.kafka_bootstrap();
    let (host, port) = common::mqtt_host_port();
    let n_devices = 40;
    let per_device = 2000u64; // 80,000 readings: about 26 MiB of spool
    let total = n_devices * per_device as usize;
    let mut phases = Vec::new();
    for policy in ["block", "drop_oldest"] {
        let mut s = Setup::bare(&format!("gw-full-{policy}"));
        s.topic = "weather".into();
        s.dlq = "weather.dlq".into();
        let spool_dir = s.dir.join("tmpfs");
        let mnt = Tmpfs::mount(&spool_dir, "16m");
        let mut gw = s.start_with(
            &common::mqtt_broker(),
            &kafka,
            &[
                (
                    "GATEWAY__SPOOL__DIR",
                    spool_dir.join("spool").display().to_string(),
                ),
                ("GATEWAY__SPOOL__SEGMENT_BYTES", "1048576".into()),
                ("GATEWAY__SPOOL__ON_FULL", policy.into()),
            ],
            "gateway",
        );
        let http = s.http.clone();
        let up = common::eventually(Duration::from_secs(20), || {
            matches!(common::http_get(&http, "/readyz"), Ok((200, _)))
        })
        .await;
        assert!(up, "{policy}: ready without Kafka; log:\n{}", gw.log_text());
        let msgs = readings(&s, n_devices, 1..=per_device);
        publish_all(&host, port, &msgs, None).await;
        if policy == "block" {
            let full = common::eventually(Duration::from_secs(60), || {
                s.metric("gateway_spool_full", &[]) == 1.0
            })
            .await;
            assert!(full, "spool full; log:\n{}", gw.log_text());
            let (code, body) = readyz(&s);
            assert!(code == 503 && body.contains("spool full"), "{code} {body}");
            tokio::time::sleep(Duration::from_secs(2)).await;
            let acked = s.metric("gateway_mqtt_acks_total", &[]);
            assert!(acked < total as f64, "acknowledging stopped at {acked}");
            assert!(gw.is_running(), "no crash on a full disk");
        } else {
            let acked = common::eventually(Duration::from_secs(60), || {
                s.metric("gateway_mqtt_acks_total", &[]) == total as f64
            })
            .await;
            assert!(
                acked,
                "drop_oldest acknowledges everything; log:\n{}",
                gw.log_text()
            );
            assert!(s.metric("gateway_spool_dropped_records_total", &[("reason", "full")]) > 0.0);
        }
        phases.push((s, gw, mnt));
        if policy == "block" {
            // Kafka back: the spool drains and takes the rest from the broker.
            stack.run(&["up", "kafka"]);
            let (s, gw, _) = phases.last_mut().expect("phase");
            let all = common::eventually(Duration::from_secs(120), || {
                s.metric("gateway_mqtt_acks_total", &[]) == total as f64
            })
            .await;
            assert!(
                all,
                "block: every reading acknowledged once Kafka is back; log:\n{}",
                gw.log_text()
            );
            assert_eq!(s.metric("gateway_spool_full", &[]), 0.0);
            stack.run(&["down", "kafka"]);
        }
    }
    stack.run(&["up", "kafka"]);
    for (s, gw, _) in &mut phases {
        let drained = common::eventually(Duration::from_secs(120), || {
            s.metric("gateway_spool_records", &[]) == 0.0
        })
        .await;
        assert!(drained, "spool drained; log:\n{}", gw.log_text());
    }
    let got = common::consume_from(
        &kafka,
        "weather",
        2 * total,
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    let (block, drop) = (&phases[0].0, &phases[1].0);
    assert_eq!(readings_of(block, &got).len(), total, "block loses nothing");
    let dropped = drop.metric("gateway_spool_dropped_records_total", &[("reason", "full")]);
    let arrived = readings_of(drop, &got).len();
    eprintln!("drop_oldest: {arrived} of {total} in Kafka, {dropped} counted as dropped");
    assert_eq!(
        arrived as f64 + dropped,
        total as f64,
        "drop_oldest drops exactly what it counts"
    );
    for (s, gw, _) in &mut phases {
        assert_eq!(
            gw.terminate(Duration::from_secs(20)).map(|st| st.code()),
            Some(Some(0)),
            "{}",
            s.name
        );
    }
}

/// Publishes one QoS 1 message with `retain` and waits for its PUBACK.
async fn publish_one(topic: &str, payload: &[u8], retain: bool) {
    let (host, port) = common::mqtt_host_port();
    let mut opts = MqttOptions::new(common::unique_name("pub1"), host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
        .await
        .expect("publish");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publish {topic}: {e}"),
            Err(_) => panic!("no PUBACK for {topic}"),
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
}

/// A retained reading replayed on every resubscribe (here: after a restart)
/// is spooled once and the repeat counted; the same `seq` with a new `ts` (a
/// device that restarted its counter) is a new reading.
#[tokio::test(flavor = "multi_thread")]
async fn replayed_retained_reading_is_not_sent_twice_but_a_restarted_device_is_kept() {
    let s = Setup::new("gw-dedup").await;
    let topic = s.mqtt_topic("ret-1");
    let ts = now_ms() - 1000;
    let first = format!(r#"{{"temperature":20.5,"humidity":40,"seq":1,"ts":{ts}}}"#);
    let mut gw = s.start(&[], "gateway-1");
    s.wait_ready(&mut gw).await;
    publish_one(&topic, first.as_bytes(), true).await;
    let ok = common::eventually(Duration::from_secs(20), || {
        s.metric("gateway_readings_delivered_total", &[]) == 1.0
    })
    .await;
    assert!(ok, "log:\n{}", gw.log_text());
    assert_eq!(
        gw.terminate(Duration::from_secs(15)).map(|st| st.code()),
        Some(Some(0))
    );

    // Restart: the broker sends the retained reading again on subscribe.
    let mut gw = s.start(&[], "gateway-2");
    s.wait_ready(&mut gw).await;
    let skipped = common::eventually(Duration::from_secs(20), || {
        s.metric("gateway_spool_duplicates_skipped_total", &[]) == 1.0
    })
    .await;
    assert!(
        skipped,
        "replayed retained reading skipped; log:\n{}",
        gw.log_text()
    );
    // The device restarts: seq 1 again, later ts.
    let again = format!(
        r#"{{"temperature":21.0,"humidity":41,"seq":1,"ts":{}}}"#,
        ts + 500
    );
    publish_one(&topic, again.as_bytes(), false).await;
    let records =
        common::consume(&s.topic, 2, Duration::from_secs(30), Duration::from_secs(3)).await;
    let temps: Vec<f64> = records
        .iter()
        .map(|m| {
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().expect("value")).expect("json");
            v["temperature"].as_f64().expect("temperature")
        })
        .collect();
    assert_eq!(
        temps,
        vec![20.5, 21.0],
        "one record each; log:\n{}",
        gw.log_text()
    );
    // Clear the retained message.
    publish_one(&topic, b"", true).await;
    assert_eq!(
        gw.terminate(Duration::from_secs(15)).map(|st| st.code()),
        Some(Some(0))
    );
}

/// Datagrams a gateway sent to its NOTIFY_SOCKET within `wait` (or until `until` is seen).
fn notifications(
    sock: &std::os::unix::net::UnixDatagram,
    wait: Duration,
    until: &str,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == until);
                got.push(msg);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    got
}

/// Issue 23: READY=1 used to wait for the MQTT subscription, so a gateway
/// booting while the broker was down was killed by systemd's start timeout
/// over and over, interrupting the drain of its spool. Now: READY once the
/// spool is open and HTTP listens; the spool drains to Kafka with no broker.
#[tokio::test(flavor = "multi_thread")]
async fn systemd_ready_with_the_broker_down_at_boot_while_the_spool_drains() {
    let s = Setup::new("gw-notify").await;
    let path = s.dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    let notify = [
        ("NOTIFY_SOCKET", path.display().to_string()),
        ("WATCHDOG_USEC", "1000000".to_string()),
    ];

    // 1. Kafka unreachable: readings are spooled and acknowledged.
    let dead_kafka = format!("127.0.0.1:{}", common::free_port());
    let mut gw = s.start_with(
        &common::mqtt_broker(),
        &dead_kafka,
        &[("GATEWAY__KAFKA__CREATE_TOPICS", "false".into())],
        "gateway-no-kafka",
    );
    let (host, port) = common::mqtt_host_port();
    let mut up = false;
    for _ in 0..100 {
        // Tolerant of the first tries, before HTTP listens.
        up = common::http_get(&s.http, "/metrics").is_ok_and(|(_, body)| {
            common::metric(
                &common::parse_prometheus(&body),
                "gateway_mqtt_connected",
                &[],
            ) == Some(1.0)
        });
        if up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(up, "not subscribed; log:\n{}", gw.log_text());
    let msgs = readings(&s, 5, 1..=10);
    publish_all(&host, port, &msgs, None).await;
    // The gateway's PUBACKs go out once the readings are in the spool.
    let spooled = common::eventually(Duration::from_secs(30), || {
        s.metric("gateway_mqtt_acks_total", &[]) == msgs.len() as f64
    })
    .await;
    assert!(spooled, "not spooled; log:\n{}", gw.log_text());
    assert!(
        gw.terminate(Duration::from_secs(20)).is_some(),
        "{}",
        gw.log_text()
    );

    // 2. The broker down at boot, Kafka back: READY, watchdog pings, and the
    //    spool drains to Kafka.
    let dead_broker = format!("mqtt://127.0.0.1:{}", common::free_port());
    let mut gw = s.start_with(
        &dead_broker,
        &common::kafka_bootstrap(),
        &notify,
        "gateway-no-broker",
    );
    let got = notifications(&sock, Duration::from_secs(15), "READY=1");
    assert!(
        got.iter().any(|m| m.contains("READY=1")),
        "no READY with the broker down: {got:?}\n{}",
        gw.log_text()
    );
    let later = notifications(&sock, Duration::from_secs(3), "never");
    assert!(
        later.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 4,
        "a 1 s watchdog wants a ping every 0.5 s: {later:?}"
    );
    let records = common::consume(
        &s.topic,
        msgs.len(),
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        readings_seen(&records).len(),
        msgs.len(),
        "the spool drained to Kafka without a broker; log:\n{}",
        gw.log_text()
    );
    assert_eq!(s.metric("gateway_mqtt_connected", &[]), 0.0);
    let (code, body) = readyz(&s);
    assert!(
        code == 503 && body.to_lowercase().contains("mqtt"),
        "{code} {body}"
    );
    assert!(gw.is_running());
    drop(gw);

    // 3. The real broker: READY, then STOPPING on SIGTERM.
    let mut gw = s.start(&notify, "gateway");
    let got = notifications(&sock, Duration::from_secs(30), "READY=1");
    assert!(
        got.iter().any(|m| m.contains("READY=1")),
        "no READY: {got:?}\n{}",
        gw.log_text()
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status();
    let end = notifications(&sock, Duration::from_secs(10), "STOPPING=1");
    assert!(end.iter().any(|m| m.contains("STOPPING=1")), "{end:?}");
    assert!(gw
        .terminate(Duration::from_secs(15))
        .is_some_and(|st| st.success()));
}

#[test]
fn version_names_the_git_commit_and_the_target() {
    let out = std::process::Command::new(GATEWAY)
        .arg("--version")
        .output()
        .expect("gateway --version");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(head.len(), 12, "a git checkout");
    assert_eq!(
        text.trim(),
        format!(
            "gateway {} (commit {head}, {}-unknown-linux-gnu)",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_limits_and_log_level_and_names_what_needs_a_restart() {
    let s = Setup::new("gw-hup").await;
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/gateway.toml"))
            .expect("sample config");
    let cfg = s.dir.join("gateway.toml");
    std::fs::write(&cfg, &shipped).expect("config");
    let mut env = s.env(&common::mqtt_broker(), &common::kafka_bootstrap());
    // log.level applies only when RUST_LOG does not override it.
    env.push(("RUST_LOG", String::new()));
    let mut gw = common::spawn(
        GATEWAY,
        &["run", "--config", cfg.to_str().expect("path")],
        &env,
        &s.dir,
        "gateway",
    );
    s.wait_ready(&mut gw).await;
    let reading = |seq: u64| {
        format!(
            r#"{{"device_id":"dev-001","temperature":60.0,"humidity":40.0,"seq":{seq},"ts":{}}}"#,
            now_ms()
        )
    };
    publish_one(&s.mqtt_topic("dev-001"), reading(1).as_bytes(), false).await;
    let ok = common::consume(&s.topic, 1, Duration::from_secs(30), Duration::ZERO).await;
    assert_eq!(ok.len(), 1, "60 C is valid by default");

    // Tighter limits and debug logging apply at once; a Kafka setting needs a restart.
    let edited = shipped
        .replace("temperature_max = 85.0", "temperature_max = 50.0")
        .replace("level = \"info\"", "level = \"debug\"")
        .replace("linger_ms = 5", "linger_ms = 10");
    assert_ne!(edited, shipped);
    std::fs::write(&cfg, &edited).expect("config");
    let hup = |gw: &common::Child| {
        std::process::Command::new("kill")
            .args(["-HUP", &gw.child.id().to_string()])
            .status()
            .expect("kill -HUP")
    };
    hup(&gw);
    let reloaded = common::eventually(Duration::from_secs(10), || {
        gw.log_text().lines().any(|l| {
            l.contains("configuration reloaded")
                && l.contains("validation.temperature_max")
                && l.contains("log.level")
                && l.contains("needs_restart=[\"kafka.linger_ms\"]")
        })
    })
    .await;
    assert!(reloaded, "log:\n{}", gw.log_text());
    publish_one(&s.mqtt_topic("dev-001"), reading(2).as_bytes(), false).await;
    let dead = common::consume(&s.dlq, 1, Duration::from_secs(30), Duration::ZERO).await;
    assert_eq!(dead.len(), 1, "log:\n{}", gw.log_text());
    assert_eq!(common::header(&dead[0], "reason"), Some("out_of_range"));
    assert!(
        gw.log_text().lines().any(|l| l.contains(" DEBUG ")),
        "log.level debug took effect"
    );

    // A broken file is rejected; the gateway keeps running as it was.
    std::fs::write(&cfg, format!("{edited}\n[kafka]\nlinger_msec = 1\n")).expect("config");
    hup(&gw);
    let rejected = common::eventually(Duration::from_secs(10), || {
        gw.log_text().contains("reload rejected")
    })
    .await;
    assert!(rejected, "log:\n{}", gw.log_text());
    assert!(gw.is_running());
    assert_eq!(readyz(&s).0, 200);
    assert!(gw
        .terminate(Duration::from_secs(15))
        .is_some_and(|st| st.success()));
}
