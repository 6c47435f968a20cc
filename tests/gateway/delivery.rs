//! Delivery: exactly once in order (both modes, MQTT 5), a SIGTERM mid-stream, PUBACKs, the simulated fleet.

use super::*;

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
