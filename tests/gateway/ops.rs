//! Operations: check-config, topic creation, systemd readiness, --version, SIGHUP.

use super::*;

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
        .replace("linger_ms = 10\n", "linger_ms = 20\n");
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
