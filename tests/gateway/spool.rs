//! The spool: a full disk, redelivered duplicates, upgrades from an earlier release's spool.

use super::*;

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

/// Issue 29: an edge box is upgraded with readings still in its spool (Kafka
/// was down). `tests/fixtures/spool-upgrade/spool` was written by an earlier
/// release's gateway (which one: `MADE_BY`; how: `make` beside it): 120
/// readings and 2 dead letters over 9 segments, none delivered. This release
/// starts on a copy of it and delivers each one exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_delivers_every_reading_an_older_release_spooled() {
    let s = Setup::new("gw-upgrade").await;
    let fixture = common::repo_root().join("tests/fixtures/spool-upgrade");
    let spool = s.dir.join("spool");
    std::fs::create_dir_all(&spool).expect("spool dir");
    for e in std::fs::read_dir(fixture.join("spool")).expect("fixture") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), spool.join(e.file_name())).expect("copy");
    }
    let expected: std::collections::BTreeSet<(String, u64)> =
        std::fs::read_to_string(fixture.join("readings.txt"))
            .expect("readings.txt")
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(d, s)| (d.to_string(), s.parse().expect("seq")))
            .collect();
    assert_eq!(expected.len(), 120);
    let mut gw = s.start(&[], "gateway-upgraded");
    s.wait_ready(&mut gw).await;
    let records = common::consume(
        &s.topic,
        expected.len(),
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        readings_seen(&records),
        expected,
        "every spooled reading; log:\n{}",
        gw.log_text()
    );
    assert_eq!(records.len(), expected.len(), "each once");
    let dead = common::consume(&s.dlq, 2, Duration::from_secs(30), Duration::from_secs(2)).await;
    let reasons: Vec<_> = dead
        .iter()
        .map(|m| common::header(m, "reason").unwrap_or("").to_string())
        .collect();
    assert_eq!(
        reasons,
        ["malformed_json", "missing_field"],
        "the dead letters too"
    );
    assert_eq!(
        gw.terminate(Duration::from_secs(15)).map(|s| s.code()),
        Some(Some(0))
    );
}
