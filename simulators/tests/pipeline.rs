//! The whole pipeline for real: simulator -> Mosquitto -> gateway -> Kafka ->
//! aggregator, scraped by a real Prometheus loaded with the project's alert
//! rules. Every PromQL expression of every Grafana dashboard panel must be valid
//! and return data; every alert rule must evaluate cleanly and fire nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn sibling_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_simulator")).with_file_name(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (scripts/test does)",
        p.display()
    );
    p
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; Ok(number of series) or Err(Prometheus' error).
fn query(prom: &str, expr: &str) -> Result<usize, String> {
    let (status, body) = common::http_get(prom, &format!("/api/v1/query?query={}", encode(expr)))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("HTTP {status}: {body}"));
    }
    Ok(match &v["data"]["result"] {
        serde_json::Value::Array(a) => a.len(),
        serde_json::Value::Null => 0,
        _ => 1, // scalar
    })
}

fn dashboard_exprs() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        for p in d["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    let name = format!(
                        "{} / {}",
                        d["uid"].as_str().unwrap_or("?"),
                        p["title"].as_str().unwrap_or("?")
                    );
                    out.push((name, e.to_string()));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_returns_data_and_no_alert_fires() {
    common::require_kafka();
    common::require_mqtt();
    let name = common::unique_name("pipeline");
    let dir = common::test_dir(&name);
    let (topic, dlq) = (format!("{name}.weather"), format!("{name}.dlq"));
    common::create_topic(&topic, 6).await;
    common::create_topic(&dlq, 1).await;
    let (gw_port, agg_port) = (common::free_port(), common::free_port());

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().expect("root");
    let mut stack = common::PrivateStack::new(&dir);
    let prom_cfg = dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [\"127.0.0.1:{gw_port}\"]\n\
             \x20 - job_name: aggregator\n    static_configs:\n      - targets: [\"127.0.0.1:{agg_port}\"]\n",
            root.join("configs/alerts.yml").display()
        ),
    )
    .expect("prometheus config");
    stack.prometheus_config = Some(prom_cfg);
    stack.run(&["up", "prometheus"]);
    let prom = stack.prometheus_url();

    let gateway = common::spawn(
        sibling_bin("gateway").to_str().expect("path"),
        &[
            "run",
            "--config",
            root.join("configs/gateway.toml").to_str().expect("path"),
        ],
        &common::GatewayEnv {
            kafka: &common::kafka_bootstrap(),
            client_id: &name,
            prefix: &name,
            topic: &topic,
            dlq: &dlq,
            http: &format!("127.0.0.1:{gw_port}"),
            spool: &dir.join("spool"),
        }
        .vars(),
        &dir,
        "gateway",
    );
    let aggregator = common::spawn(
        sibling_bin("aggregator").to_str().expect("path"),
        &[
            "run",
            "--config",
            root.join("configs/aggregator.toml").to_str().expect("path"),
        ],
        &[
            (
                "AGGREGATOR__KAFKA__BOOTSTRAP_SERVERS",
                common::kafka_bootstrap(),
            ),
            ("AGGREGATOR__KAFKA__TOPIC", topic.clone()),
            ("AGGREGATOR__KAFKA__GROUP_ID", name.clone()),
            ("AGGREGATOR__HTTP__LISTEN", format!("127.0.0.1:{agg_port}")),
            // Short windows, so window panels have closed windows within the test.
            ("AGGREGATOR__AGGREGATION__WINDOW_SECS", "5".into()),
            ("AGGREGATOR__AGGREGATION__ALLOWED_LATENESS_SECS", "1".into()),
        ],
        &dir,
        "aggregator",
    );
    let gw_http = format!("127.0.0.1:{gw_port}");
    let ready = common::eventually(Duration::from_secs(30), || {
        matches!(common::http_get(&gw_http, "/readyz"), Ok((200, _)))
    })
    .await;
    assert!(ready, "gateway not ready; log:\n{}", gateway.log_text());
    let mut simulator = common::spawn(
        env!("CARGO_BIN_EXE_simulator"),
        &[
            "--broker",
            &common::mqtt_broker(),
            "--topic-prefix",
            &name,
            "--devices",
            "10",
            "--rate",
            "5",
            "--faults",
            "0.05",
            "--duration",
            "90s",
            "--seed",
            "3",
            "--quiet",
        ],
        &[],
        &dir,
        "simulator",
    );

    // Every panel query: valid PromQL, and data once the pipeline has run a while.
    let exprs = dashboard_exprs();
    assert!(
        exprs.len() >= 30,
        "expected every panel's queries, got {}",
        exprs.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending: Vec<(String, String)> = exprs
        .into_iter()
        .map(|(n, e)| {
            (
                n,
                e.replace("$__rate_interval", "30s")
                    .replace("$device", "sensor-0001"),
            )
        })
        .collect();
    let mut last_err = Vec::new();
    while !pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        last_err.clear();
        pending.retain(|(n, e)| match query(&prom, e) {
            Ok(n_series) if n_series > 0 => false,
            Ok(_) => {
                last_err.push(format!("{n}: `{e}` returned no data"));
                true
            }
            Err(err) => panic!("{n}: `{e}` is not valid: {err}"),
        });
    }
    assert!(
        pending.is_empty(),
        "dashboard queries without data:\n{}\ngateway log:\n{}\naggregator log:\n{}",
        last_err.join("\n"),
        gateway.log_text(),
        aggregator.log_text()
    );
    // The device variable's query lists the devices.
    assert!(
        query(
            &prom,
            "group by (device) (aggregator_device_temperature_celsius)"
        )
        .unwrap_or(0)
            >= 10
    );

    // Alert rules: loaded, evaluated without error, none firing or pending.
    let (_, body) = common::http_get(&prom, "/api/v1/rules").expect("rules");
    let v: serde_json::Value = serde_json::from_str(&body).expect("rules json");
    let rules: Vec<&serde_json::Value> = v["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| {
            g["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .leak()
                .iter()
        })
        .collect();
    assert!(rules.len() >= 5, "alert rules loaded: {body}");
    for r in &rules {
        let n = r["name"].as_str().unwrap_or("?");
        assert_eq!(r["health"], "ok", "{n}: {}", r["lastError"]);
        assert_eq!(
            r["state"], "inactive",
            "{n} is {} on a healthy pipeline",
            r["state"]
        );
        let expr = r["query"].as_str().expect("query");
        query(&prom, expr).unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    let _ = simulator.terminate(Duration::from_secs(5));
    stack.run(&["down", "prometheus"]);
}
