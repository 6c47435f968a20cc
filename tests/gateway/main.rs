//! The gateway binary against the real stack: MQTT in, Kafka out, exactly what a
//! user runs. Each test has its own topics, MQTT prefix, client id and HTTP port.
//! One test binary (link time on 2 cores), a module per subject; the helpers
//! they share are here.

#[path = "../common/mod.rs"]
mod common;
mod delivery;
mod dlq;
mod ops;
mod outages;
mod spool;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

use iot_gateway::clock::now_ms;

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
