//! Time at the edge (issue 27): the gateway's own clock two hours off, not
//! synchronised, or stepped while readings flow. The test-only clock
//! (`IOT_TEST_CLOCK`, feature `failpoints`) shifts the gateway's wall clock
//! and sets its sync status; libfaketime would break librdkafka's timed waits.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{publish, TestGateway};
use rdkafka::message::{Message, OwnedMessage};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
const HOUR_MS: i64 = 3_600_000;

use iot_gateway::clock::now_ms;

/// Sets the gateway's test clock: `offset` ms off the real one, and whether
/// it is synchronised. Written whole (rename), read every 100 ms.
fn set_clock(g: &TestGateway, offset: i64, synced: bool) -> std::path::PathBuf {
    let path = g.dir.join("clock");
    let tmp = g.dir.join("clock.tmp");
    let state = if synced { "synced" } else { "unsynced" };
    std::fs::write(&tmp, format!("{offset} {state}\n")).expect("clock file");
    std::fs::rename(&tmp, &path).expect("clock file");
    path
}

/// Starts `g`'s gateway on the test clock in `clock` (see [`set_clock`]).
fn start_on(g: &TestGateway, clock: &std::path::Path) -> common::Child {
    g.start_with(
        GATEWAY,
        &common::kafka_bootstrap(),
        "gateway",
        &[("IOT_TEST_CLOCK", clock.display().to_string())],
    )
}

/// A reading with the device's correct time.
fn reading_at(seq: u64, ts_ms: i64) -> Vec<u8> {
    format!(r#"{{"temperature":21.5,"humidity":40,"seq":{seq},"ts":{ts_ms}}}"#).into_bytes()
}

fn record_ts(m: &OwnedMessage) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(m.payload().expect("value")).expect("json");
    let ts = v["ts"].as_str().expect("ts");
    chrono::DateTime::parse_from_rfc3339(ts)
        .expect("rfc3339")
        .timestamp_millis()
}

fn seqs(records: &[OwnedMessage]) -> BTreeSet<u64> {
    records
        .iter()
        .map(|m| {
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().expect("value")).expect("json");
            v["seq"].as_u64().expect("seq")
        })
        .collect()
}

/// Two hours behind and two hours ahead, not synchronised: the devices'
/// correct `ts` are kept, the records say `clock=unsynced`, they are counted,
/// and none is dead-lettered (before: all five went to the DLQ).
#[tokio::test(flavor = "multi_thread")]
async fn an_unsynchronised_clock_two_hours_off_keeps_the_device_timestamps() {
    common::require_failpoints();
    for offset in [-2 * HOUR_MS, 2 * HOUR_MS] {
        let g = TestGateway::new("clock-unsynced").await;
        let clock = set_clock(&g, offset, false);
        let mut gw = start_on(&g, &clock);
        g.wait_subscribed(&mut gw).await;
        let sent: Vec<i64> = (0..5).map(|i| now_ms() - 1000 * i).collect();
        publish(
            sent.iter()
                .enumerate()
                .map(|(i, ts)| (g.mqtt_topic("d1"), reading_at(i as u64 + 1, *ts)))
                .collect(),
        )
        .await;
        let records =
            common::consume(&g.topic, 5, Duration::from_secs(30), Duration::from_secs(2)).await;
        assert_eq!(records.len(), 5, "offset {offset}; log:\n{}", gw.log_text());
        let mut got: Vec<i64> = records.iter().map(record_ts).collect();
        got.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(got, want, "the devices' ts are kept (offset {offset})");
        for m in &records {
            assert_eq!(common::header(m, "clock"), Some("unsynced"));
            assert_eq!(common::header(m, "ts_replaced"), None);
        }
        assert_eq!(g.metric("gateway_readings_clock_unsynced_total"), Some(5.0));
        let dlq = common::consume(&g.dlq, 1, Duration::from_secs(3), Duration::from_secs(1)).await;
        assert!(dlq.is_empty(), "nothing dead-lettered (offset {offset})");
        let ok = common::eventually(Duration::from_secs(5), || {
            g.metric("gateway_clock_synchronized") == Some(0.0)
        })
        .await;
        assert!(ok, "gateway_clock_synchronized is 0");
        let (code, body) = common::http_get(&g.http, "/readyz").expect("readyz");
        assert!(
            code == 200 && body.contains("clock: not synchronised"),
            "{code} {body}"
        );
        gw.stop_cleanly(Duration::from_secs(20));
    }
}

/// A synchronised clock two hours behind (a wrong NTP server): the devices'
/// `ts` look two hours ahead. They are not dead-lettered: each reading keeps
/// the receive time, says why (`ts_replaced`, `device_ts`) and is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_synchronised_clock_that_disagrees_replaces_the_ts_instead_of_dead_lettering() {
    common::require_failpoints();
    let g = TestGateway::new("clock-synced").await;
    let clock = set_clock(&g, -2 * HOUR_MS, true);
    let mut gw = start_on(&g, &clock);
    g.wait_subscribed(&mut gw).await;
    let ts = now_ms();
    publish(
        (1..=3)
            .map(|i| (g.mqtt_topic("d1"), reading_at(i, ts)))
            .collect(),
    )
    .await;
    let records =
        common::consume(&g.topic, 3, Duration::from_secs(30), Duration::from_secs(2)).await;
    assert_eq!(records.len(), 3, "log:\n{}", gw.log_text());
    for m in &records {
        assert_eq!(common::header(m, "ts_replaced"), Some("ts_in_future"));
        assert_eq!(
            common::header(m, "device_ts"),
            Some(ts.to_string().as_str())
        );
        assert_eq!(common::header(m, "clock"), None);
        let kept = record_ts(m);
        assert!(
            (kept - (ts - 2 * HOUR_MS)).abs() < 60_000,
            "the receive time by our clock: {kept}"
        );
    }
    let samples = common::scrape(&g.http);
    assert_eq!(
        common::metric(
            &samples,
            "gateway_readings_ts_replaced_total",
            &[("reason", "ts_in_future")]
        ),
        Some(3.0)
    );
    assert_eq!(
        common::metric(&samples, "gateway_clock_synchronized", &[]),
        Some(1.0)
    );
    let dlq = common::consume(&g.dlq, 1, Duration::from_secs(3), Duration::from_secs(1)).await;
    assert!(dlq.is_empty(), "nothing dead-lettered");
    gw.stop_cleanly(Duration::from_secs(20));
}

/// The clock stepped by -2 h and then +2 h (4 h forward) while readings flow:
/// every reading reaches Kafka once, none is dead-lettered, and the latency
/// and spool age metrics are sane afterwards (measured on the monotonic clock
/// while a record is in flight).
#[tokio::test(flavor = "multi_thread")]
async fn clock_steps_of_two_hours_while_readings_flow_lose_and_dead_letter_nothing() {
    common::require_failpoints();
    let g = TestGateway::new("clock-step").await;
    let clock = set_clock(&g, 0, true);
    let mut gw = start_on(&g, &clock);
    g.wait_subscribed(&mut gw).await;
    let mut seq = 0;
    for offset in [0, -2 * HOUR_MS, 2 * HOUR_MS, 0] {
        // Step between readings: one received before a step and handed to
        // Kafka after it would carry the step in its wall-clock wait (the
        // README says so); this test checks that nothing else does.
        let done = seq as f64;
        let settled = common::eventually(Duration::from_secs(30), || {
            g.metric("gateway_readings_delivered_total").unwrap_or(0.0) == done
        })
        .await;
        assert!(
            settled,
            "readings before the step not delivered; log:\n{}",
            gw.log_text()
        );
        set_clock(&g, offset, true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..10 {
            let batch: Vec<_> = (0..10)
                .map(|_| {
                    seq += 1;
                    (g.mqtt_topic("d1"), reading_at(seq, now_ms()))
                })
                .collect();
            publish(batch).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let n = seq as usize;
    let records =
        common::consume(&g.topic, n, Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(
        records.len(),
        n,
        "every reading once; log:\n{}",
        gw.log_text()
    );
    assert_eq!(seqs(&records), (1..=seq).collect::<BTreeSet<_>>());
    let dlq = common::consume(&g.dlq, 1, Duration::from_secs(3), Duration::from_secs(1)).await;
    assert!(dlq.is_empty(), "nothing dead-lettered");
    let samples = common::scrape(&g.http);
    // The -2 h part: the devices' ts looked ahead and were replaced.
    let replaced = common::metric(
        &samples,
        "gateway_readings_ts_replaced_total",
        &[("reason", "ts_in_future")],
    );
    assert_eq!(replaced, Some(100.0));
    let sum =
        common::metric(&samples, "gateway_delivery_latency_seconds_sum", &[]).unwrap_or(f64::MAX);
    let count =
        common::metric(&samples, "gateway_delivery_latency_seconds_count", &[]).unwrap_or(0.0);
    assert_eq!(count, n as f64);
    eprintln!(
        "mean latency through the steps: {:.1} ms",
        sum / count * 1000.0
    );
    assert!(
        sum / count < 5.0,
        "mean latency {} s: a step leaked into it",
        sum / count
    );
    let age = common::metric(&samples, "gateway_spool_oldest_unsent_age_seconds", &[])
        .unwrap_or(f64::MAX);
    assert!(age < 60.0, "spool age {age} s after the steps");
    gw.stop_cleanly(Duration::from_secs(20));
}
