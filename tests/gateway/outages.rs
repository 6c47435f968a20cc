//! Outages: Kafka or Mosquitto down at start or mid-stream, a missing topic, a 3-minute Kafka outage with kill -9s.

use super::*;

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
