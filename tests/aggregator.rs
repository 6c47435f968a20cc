//! The aggregator binary against the real Kafka: exact aggregates read back
//! through /metrics (parsed) and the JSON API, other producers' shapes, garbage,
//! restarts and consumer groups.
//!
//! Over 500 lines: one binary for the aggregator's black-box tests (link time on
//! 2 cores); each test is independent, with its own topic and group.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const AGGREGATOR: &str = env!("CARGO_BIN_EXE_aggregator");

struct Agg {
    child: common::Child,
    http: String,
}

impl Agg {
    fn start(
        topic: &str,
        group: &str,
        dir: &std::path::Path,
        log: &str,
        extra: &[(&str, String)],
    ) -> Agg {
        let http = format!("127.0.0.1:{}", common::free_port());
        let mut env = vec![
            (
                "AGGREGATOR__KAFKA__BOOTSTRAP_SERVERS",
                common::kafka_bootstrap(),
            ),
            ("AGGREGATOR__KAFKA__TOPIC", topic.to_string()),
            ("AGGREGATOR__KAFKA__GROUP_ID", group.to_string()),
            ("AGGREGATOR__HTTP__LISTEN", http.clone()),
        ];
        env.extend(extra.iter().cloned());
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/aggregator.toml");
        let child = common::spawn(AGGREGATOR, &["run", "--config", config], &env, dir, log);
        Agg { child, http }
    }

    fn samples(&self) -> Vec<common::Sample> {
        common::scrape(&self.http)
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        common::http_get(&self.http, "/metrics")
            .ok()
            .and_then(|(_, body)| common::metric(&common::parse_prometheus(&body), name, labels))
            .unwrap_or(0.0)
    }

    fn json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = common::http_get(&self.http, path).expect("GET");
        (
            status,
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
        )
    }

    /// Device id -> count, from the JSON API.
    fn device_counts(&self) -> BTreeMap<String, u64> {
        common::device_counts(&self.http)
    }

    async fn wait_for(&mut self, what: &str, mut f: impl FnMut(&Agg) -> bool) {
        let mut ok = false;
        for _ in 0..300 {
            if f(self) {
                ok = true;
                break;
            }
            assert!(
                self.child.is_running(),
                "aggregator exited; log:\n{}",
                self.child.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            ok,
            "timed out waiting for {what}; log:\n{}",
            self.child.log_text()
        );
    }
}

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", common::kafka_bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

async fn send(p: &FutureProducer, topic: &str, key: Option<&str>, value: &[u8], ts_ms: i64) {
    let mut rec = FutureRecord::to(topic).payload(value).timestamp(ts_ms);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    p.send(rec, Duration::from_secs(10)).await.expect("produce");
}

/// A gateway-shaped canonical record.
fn canonical(device: &str, t: f64, h: f64, seq: u64, ts_ms: i64) -> String {
    format!(
        r#"{{"device_id":"{device}","humidity":{h},"seq":{seq},"temperature":{t},"ts":"{}"}}"#,
        iot_gateway::reading::format_ts(ts_ms)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn known_readings_give_exact_aggregates_and_garbage_is_counted() {
    common::require_kafka();
    let name = common::unique_name("agg-exact");
    let dir = common::test_dir(&name);
    common::create_topic(&name, 3).await;
    let p = producer();
    let now = chrono::Utc::now().timestamp_millis();
    let base = now - now.rem_euclid(60_000) - 10 * 60_000; // a window start, 10 min ago
                                                           // d1: three readings in window 0, one in window 1 (closes window 0).
    for (i, (t, h)) in [(10.0, 40.0), (20.0, 60.0), (30.0, 50.0)]
        .iter()
        .enumerate()
    {
        send(
            &p,
            &name,
            Some("d1"),
            canonical("d1", *t, *h, i as u64 + 1, base + i as i64 * 20_000).as_bytes(),
            base,
        )
        .await;
    }
    send(
        &p,
        &name,
        Some("d1"),
        canonical("d1", 5.0, 10.0, 4, base + 60_000).as_bytes(),
        base + 60_000,
    )
    .await;
    // d2: gateway shape, two readings in window 0 and one in window 2.
    send(
        &p,
        &name,
        Some("d2"),
        canonical("d2", -5.5, 80.0, 1, base + 1000).as_bytes(),
        base,
    )
    .await;
    send(
        &p,
        &name,
        Some("d2"),
        canonical("d2", -4.5, 90.0, 2, base + 2000).as_bytes(),
        base,
    )
    .await;
    send(
        &p,
        &name,
        Some("d2"),
        canonical("d2", 0.0, 85.0, 3, base + 120_000).as_bytes(),
        base,
    )
    .await;
    // d3: another producer: numeric strings, device id only in the key, no ts.
    send(
        &p,
        &name,
        Some("d3"),
        br#"{"temperature": "21.5", "humidity": "40"}"#,
        base + 5_000,
    )
    .await;
    send(
        &p,
        &name,
        Some("d3"),
        br#"{"temperature": "22.5", "humidity": "42"}"#,
        base + 65_000,
    )
    .await;
    // Garbage, one of each reason.
    let garbage: [(&str, Option<&str>, &[u8]); 7] = [
        ("malformed_json", Some("g1"), b"{not json"),
        ("not_an_object", Some("g2"), b"[1,2,3]"),
        ("missing_field", Some("g3"), br#"{"temperature": 1}"#),
        (
            "wrong_type",
            Some("g4"),
            br#"{"temperature": "hot", "humidity": 1}"#,
        ),
        (
            "no_device_id",
            None,
            br#"{"temperature": 1, "humidity": 2}"#,
        ),
        ("invalid_utf8", Some("g5"), &[0xff, 0xfe, 0x00, 0x01]),
        (
            "not_finite",
            Some("g6"),
            br#"{"temperature": "NaN", "humidity": 2}"#,
        ),
    ];
    for (_, key, value) in &garbage {
        send(&p, &name, *key, value, base).await;
    }
    // A redelivered duplicate of d2's seq 2 (as after a gateway restart).
    send(
        &p,
        &name,
        Some("d2"),
        canonical("d2", -4.5, 90.0, 2, base + 2000).as_bytes(),
        base,
    )
    .await;

    let mut agg = Agg::start(
        &name,
        &common::unique_name("agg-exact-group"),
        &dir,
        "aggregator",
        &[("AGGREGATOR__AGGREGATION__ALLOWED_LATENESS_SECS", "0".into())],
    );
    let total = 4 + 3 + 2 + garbage.len() + 1;
    agg.wait_for("every record consumed", |a| {
        a.metric("aggregator_records_consumed_total", &[]) == total as f64
    })
    .await;

    let s = agg.samples();
    let m = |name: &str, labels: &[(&str, &str)]| {
        common::metric(&s, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    };
    assert_eq!(m("aggregator_readings_applied_total", &[]), 9.0);
    assert_eq!(
        m("aggregator_device_readings_total", &[("device", "d1")]),
        4.0
    );
    assert_eq!(
        m("aggregator_device_readings_total", &[("device", "d2")]),
        3.0
    );
    assert_eq!(
        m("aggregator_device_readings_total", &[("device", "d3")]),
        2.0
    );
    assert_eq!(
        m("aggregator_device_temperature_celsius", &[("device", "d1")]),
        5.0
    );
    assert_eq!(
        m("aggregator_device_humidity_percent", &[("device", "d1")]),
        10.0
    );
    assert_eq!(
        m("aggregator_device_temperature_celsius", &[("device", "d3")]),
        22.5
    );
    let dp = iot_gateway::aggregator::state::dew_point(5.0, 10.0);
    assert!((m("aggregator_device_dew_point_celsius", &[("device", "d1")]) - dp).abs() < 1e-9);
    for (stat, want) in [("min", 10.0), ("max", 30.0), ("mean", 20.0)] {
        assert_eq!(
            m(
                "aggregator_device_window_temperature_celsius",
                &[("device", "d1"), ("stat", stat)]
            ),
            want,
            "{stat}"
        );
    }
    for (stat, want) in [("min", 40.0), ("max", 60.0), ("mean", 50.0)] {
        assert_eq!(
            m(
                "aggregator_device_window_humidity_percent",
                &[("device", "d1"), ("stat", stat)]
            ),
            want,
            "{stat}"
        );
    }
    // d2's newest closed window is window 0 (window 2 is open): two readings.
    assert_eq!(
        m(
            "aggregator_device_window_temperature_celsius",
            &[("device", "d2"), ("stat", "mean")]
        ),
        -5.0
    );
    assert_eq!(
        m(
            "aggregator_device_window_humidity_percent",
            &[("device", "d3"), ("stat", "max")]
        ),
        40.0
    );
    assert_eq!(
        m(
            "aggregator_device_last_seen_timestamp_seconds",
            &[("device", "d2")]
        ),
        (base + 120_000) as f64 / 1000.0
    );
    for (reason, _, _) in &garbage {
        assert_eq!(
            m("aggregator_records_skipped_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        m(
            "aggregator_records_skipped_total",
            &[("reason", "duplicate_seq")]
        ),
        1.0
    );
    assert_eq!(m("aggregator_devices_seen", &[]), 3.0);
    assert_eq!(
        m("aggregator_devices_offline", &[]),
        3.0,
        "readings are 10 minutes old"
    );
    assert_eq!(m("aggregator_temperature_celsius_count", &[]), 9.0);
    assert_eq!(m("aggregator_assigned_partitions", &[]), 3.0);

    // The same through the JSON API.
    let (status, d1) = agg.json("/api/devices/d1");
    assert_eq!(status, 200);
    assert_eq!(d1["device"]["count"], 4);
    assert_eq!(d1["device"]["temperature"], 5.0);
    assert_eq!(d1["device"]["online"], false);
    let w0 = &d1["windows"][0];
    assert_eq!(w0["count"], 3);
    assert_eq!(w0["closed"], true);
    assert_eq!(w0["start"], iot_gateway::reading::format_ts(base).as_str());
    assert_eq!(
        (
            w0["temperature"]["min"].as_f64(),
            w0["temperature"]["max"].as_f64()
        ),
        (Some(10.0), Some(30.0))
    );
    assert_eq!(w0["humidity"]["mean"], 50.0);
    assert_eq!(d1["windows"][1]["closed"], false);
    let (_, d3) = agg.json("/api/devices/d3");
    assert_eq!(d3["device"]["humidity"], 42.0);
    assert_eq!(
        d3["device"]["last_seen"],
        iot_gateway::reading::format_ts(base + 65_000).as_str(),
        "no ts: the record timestamp"
    );
    let (status, list) = agg.json("/api/devices");
    assert_eq!(status, 200);
    assert_eq!(list["count"], 3);
    assert_eq!(list["next_cursor"], serde_json::Value::Null);
    // Pages, by device id.
    let (_, p1) = agg.json("/api/devices?limit=2");
    assert_eq!(
        (p1["count"].clone(), p1["total"].clone()),
        (2.into(), 3.into())
    );
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| d["device_id"].as_str().expect("id").to_string())
            .collect()
    };
    assert_eq!(ids(&p1), ["d1", "d2"]);
    assert_eq!(p1["next_cursor"], "d2");
    let (_, p2) = agg.json("/api/devices?limit=2&cursor=d2");
    assert_eq!(ids(&p2), ["d3"]);
    assert_eq!(p2["next_cursor"], serde_json::Value::Null);
    let (status, stats) = agg.json("/api/stats");
    assert_eq!(status, 200);
    assert_eq!(stats["consumed"], total);
    assert_eq!(stats["applied"], 9);
    assert_eq!(stats["devices"], 3);
    assert_eq!(stats["assigned_partitions"], 3);
    let (status, err) = agg.json("/api/devices/nope");
    assert_eq!(status, 404);
    assert_eq!(err["error"], "unknown device");
    assert_eq!(
        agg.child
            .terminate(Duration::from_secs(15))
            .map(|s| s.code()),
        Some(Some(0))
    );
}

/// (consumed, applied) that an aggregator logged when it shut down.
fn final_counts(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("shutting down: committing offsets"))
        .unwrap_or_else(|| panic!("no shutdown line in:\n{log}"));
    let field = |name: &str| -> u64 {
        let at = line.find(&format!("{name}=")).expect("field");
        line[at + name.len() + 1..]
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect("number")
    };
    (field("consumed"), field("applied"))
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_mid_stream_does_not_double_count() {
    common::require_kafka();
    let name = common::unique_name("agg-restart");
    let dir = common::test_dir(&name);
    let group = common::unique_name("agg-restart-group");
    common::create_topic(&name, 3).await;
    let devices = 10;
    let per_device = 60u64;
    // A steady stream (~300 records/s) that keeps flowing through the restart.
    let stream = {
        let name = name.clone();
        tokio::spawn(async move {
            let p = producer();
            for seq in 1..=per_device {
                for d in 0..devices {
                    let dev = format!("r{d:02}");
                    let now = chrono::Utc::now().timestamp_millis();
                    send(
                        &p,
                        &name,
                        Some(&dev),
                        canonical(&dev, 20.0, 50.0, seq, now).as_bytes(),
                        now,
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let mut a = Agg::start(&name, &group, &dir, "aggregator-1", &[]);
    a.wait_for("first readings", |a| {
        a.metric("aggregator_readings_applied_total", &[]) >= 100.0
    })
    .await;
    assert_eq!(
        a.child.terminate(Duration::from_secs(15)).map(|s| s.code()),
        Some(Some(0))
    );
    let (consumed_a, applied_a) = final_counts(&a.child.log_text());
    assert!(applied_a >= 100);

    let mut b = Agg::start(&name, &group, &dir, "aggregator-2", &[]);
    stream.await.expect("producer");
    let total = devices as u64 * per_device;
    b.wait_for("the rest of the stream", |b| {
        b.metric("aggregator_records_consumed_total", &[]) as u64 + consumed_a >= total
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let consumed_b = b.metric("aggregator_records_consumed_total", &[]) as u64;
    let applied_b: u64 = b.device_counts().values().sum();
    assert_eq!(
        consumed_a + consumed_b,
        total,
        "B resumed exactly where A committed"
    );
    assert_eq!(
        applied_a + applied_b,
        total,
        "every reading counted once across the restart"
    );
    assert_eq!(
        b.metric(
            "aggregator_records_skipped_total",
            &[("reason", "replayed_offset")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_split_the_partitions_and_cover_every_device_once() {
    common::require_kafka();
    let name = common::unique_name("agg-group");
    let dir = common::test_dir(&name);
    let group = common::unique_name("agg-group-group");
    common::create_topic(&name, 6).await;
    let mut a = Agg::start(&name, &group, &dir, "aggregator-a", &[]);
    let mut b = Agg::start(&name, &group, &dir, "aggregator-b", &[]);
    a.wait_for("a has partitions", |a| {
        a.metric("aggregator_assigned_partitions", &[]) >= 1.0
    })
    .await;
    b.wait_for("b has partitions", |b| {
        b.metric("aggregator_assigned_partitions", &[]) >= 1.0
    })
    .await;
    let both = |a: &Agg, b: &Agg| {
        a.metric("aggregator_assigned_partitions", &[])
            + b.metric("aggregator_assigned_partitions", &[])
    };
    let mut settled = false;
    for _ in 0..100 {
        if both(&a, &b) == 6.0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "6 partitions split between the two");

    let p = producer();
    let devices = 40;
    for seq in 1..=5u64 {
        for d in 0..devices {
            let dev = format!("g{d:02}");
            let now = chrono::Utc::now().timestamp_millis();
            send(
                &p,
                &name,
                Some(&dev),
                canonical(&dev, 20.0, 50.0, seq, now).as_bytes(),
                now,
            )
            .await;
        }
    }
    let total = (devices * 5) as f64;
    for _ in 0..300 {
        if a.metric("aggregator_readings_applied_total", &[])
            + b.metric("aggregator_readings_applied_total", &[])
            >= total
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ca, cb) = (a.device_counts(), b.device_counts());
    let sa: BTreeSet<&String> = ca.keys().collect();
    let sb: BTreeSet<&String> = cb.keys().collect();
    assert!(
        !sa.is_empty() && !sb.is_empty(),
        "both instances own devices: {sa:?} / {sb:?}"
    );
    assert!(
        sa.is_disjoint(&sb),
        "no device reported twice: {:?}",
        sa.intersection(&sb).collect::<Vec<_>>()
    );
    assert_eq!(sa.len() + sb.len(), devices, "every device reported");
    for (dev, count) in ca.iter().chain(cb.iter()) {
        assert_eq!(*count, 5, "{dev}");
    }
    // /metrics agrees with the API on each side.
    assert_eq!(a.metric("aggregator_devices_seen", &[]), sa.len() as f64);
    assert_eq!(b.metric("aggregator_devices_seen", &[]), sb.len() as f64);
}

#[test]
fn check_config_names_a_typo_d_key() {
    let dir = common::test_dir(&common::unique_name("agg-config"));
    let path = dir.join("typo.toml");
    std::fs::write(&path, "[aggregation]\nwindow_seconds = 30\n").expect("write");
    let out = std::process::Command::new(AGGREGATOR)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run aggregator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("window_seconds") && stderr.contains("typo.toml"),
        "{stderr}"
    );
    let out = std::process::Command::new(AGGREGATOR)
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/aggregator.toml"),
        ])
        .env("AGGREGATOR__AGGREGATION__WINDOW_SECS", "30")
        .output()
        .expect("run aggregator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("window_secs = 30"));
}

/// Issue 23: bytes that panicked the parser killed the consumer thread (the
/// process stayed up, counting nothing); a future-dated record froze its
/// device; a forged `seq` far ahead made the next readings duplicates.
#[tokio::test(flavor = "multi_thread")]
async fn poison_future_dated_and_forged_seq_records_do_not_stop_or_freeze_counting() {
    common::require_kafka();
    let name = common::unique_name("agg-poison");
    let dir = common::test_dir(&name);
    common::create_topic(&name, 1).await;
    let p = producer();
    let now = chrono::Utc::now().timestamp_millis();
    for (i, poison) in ["\u{e9}", "{\u{201c}temperature\u{201d}:21}", "21\u{b0}C"]
        .iter()
        .enumerate()
    {
        send(&p, &name, Some(&format!("p{i}")), poison.as_bytes(), now).await;
    }
    for seq in 1..=5 {
        send(
            &p,
            &name,
            Some("d1"),
            canonical("d1", 20.0, 50.0, seq, now).as_bytes(),
            now,
        )
        .await;
    }
    // 50 minutes ahead, in the value and in the producer-chosen record
    // timestamp (Kafka refuses record timestamps over an hour ahead).
    let ahead = now + 50 * 60_000;
    send(
        &p,
        &name,
        Some("d2"),
        canonical("d2", 80.0, 99.0, 1, ahead).as_bytes(),
        ahead,
    )
    .await;
    for seq in 2..=4 {
        send(
            &p,
            &name,
            Some("d2"),
            canonical("d2", 21.0, 40.0, seq, now + seq as i64).as_bytes(),
            now,
        )
        .await;
    }
    for seq in [1, 2, 3, 1_000, 4, 5, 6] {
        send(
            &p,
            &name,
            Some("d3"),
            canonical("d3", 22.0, 45.0, seq, now).as_bytes(),
            now,
        )
        .await;
    }
    // This machine runs no time daemon: say the clock is good, so that it
    // judges the future-dated record (README "Clocks at the edge").
    let mut agg = Agg::start(
        &name,
        &format!("{name}-g"),
        &dir,
        "aggregator",
        &[("AGGREGATOR__CLOCK__SYNC", "assume_synced".into())],
    );
    agg.wait_for("every device counted", |a| {
        let c = a.device_counts();
        c.get("d1") == Some(&5) && c.get("d2") == Some(&4) && c.get("d3") == Some(&7)
    })
    .await;
    let skipped = |reason| agg.metric("aggregator_records_skipped_total", &[("reason", reason)]);
    assert_eq!(skipped("malformed_json"), 3.0);
    // Counted, but not the device's last value.
    assert_eq!(skipped("ts_in_future"), 0.0);
    assert_eq!(agg.metric("aggregator_readings_future_total", &[]), 1.0);
    assert_eq!(agg.metric("aggregator_clock_synchronized", &[]), 1.0);
    assert_eq!(skipped("duplicate_seq"), 0.0);
    let (_, d2) = agg.json("/api/devices/d2");
    assert_eq!(d2["device"]["temperature"], 21.0, "{d2}");
    assert!(agg.child.is_running());
    agg.child.stop_cleanly(Duration::from_secs(20));
}

/// A panic in the consumer thread outside a record's parse (the test-only
/// failpoint `IOT_FAILPOINT_CONSUMER`) ends the process with an error within
/// seconds, so systemd or compose restarts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_consumer_thread_ends_the_process_with_an_error() {
    common::require_failpoints();
    common::require_kafka();
    let name = common::unique_name("agg-die");
    let dir = common::test_dir(&name);
    common::create_topic(&name, 1).await;
    let mut agg = Agg::start(
        &name,
        &format!("{name}-g"),
        &dir,
        "aggregator",
        &[("IOT_FAILPOINT_CONSUMER", "KILL-CONSUMER".into())],
    );
    agg.wait_for("ready", |a| {
        matches!(common::http_get(&a.http, "/readyz"), Ok((200, _)))
    })
    .await;
    let p = producer();
    let now = chrono::Utc::now().timestamp_millis();
    send(
        &p,
        &name,
        Some("d1"),
        canonical("d1", 20.0, 50.0, 1, now).as_bytes(),
        now,
    )
    .await;
    send(&p, &name, Some("d1"), b"KILL-CONSUMER", now).await;
    let status = agg.child.wait_exit(Duration::from_secs(15));
    let log = agg.child.log_text();
    let status =
        status.unwrap_or_else(|| panic!("still running 15 s after the panic; log:\n{log}"));
    assert!(!status.success(), "exit {status:?}; log:\n{log}");
    assert!(
        log.contains("a thread died") && log.contains("failpoint consumer hit"),
        "{log}"
    );
}
