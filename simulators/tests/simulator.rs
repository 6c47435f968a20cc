//! The simulator binary against the real Mosquitto: a subscriber receives exactly
//! what the manifest says was sent.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use iot_gateway::fleet::Manifest;
use iot_gateway::reading::{parse, Limits};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const SIMULATOR: &str = env!("CARGO_BIN_EXE_simulator");

#[derive(Default, Debug, PartialEq)]
struct Seen {
    valid: u64,
    seq_first: Option<u64>,
    seq_last: Option<u64>,
    faults: BTreeMap<String, u64>,
}

#[tokio::test(flavor = "multi_thread")]
async fn subscriber_receives_exactly_what_the_manifest_says() {
    common::require_mqtt();
    let (host, port) = common::mqtt_host_port();
    let prefix = common::unique_name("simtest");
    let dir = common::test_dir(&prefix);
    let manifest_path = dir.join("manifest.json");

    let mut opts = MqttOptions::new(common::unique_name("simtest-sub"), &host, port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut el) = AsyncClient::new(opts, 100);
    client
        .subscribe(format!("{prefix}/+/telemetry"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.expect("mqtt") {
            break;
        }
    }
    let received = tokio::spawn(async move {
        let mut msgs = Vec::new();
        while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(8), el.poll()).await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                msgs.push((p.topic, p.payload.to_vec()));
            }
        }
        msgs
    });

    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/office.toml");
    let broker = common::mqtt_broker();
    let status = std::process::Command::new(SIMULATOR)
        .args([
            "--scenario",
            scenario,
            "--broker",
            &broker,
            "--topic-prefix",
            &prefix,
        ])
        .args([
            "--devices",
            "8",
            "--connections",
            "2",
            "--rate",
            "25",
            "--count",
            "40",
        ])
        .args(["--faults", "0.25", "--seed", "7", "--quiet", "--manifest"])
        .arg(&manifest_path)
        .status()
        .expect("run simulator");
    assert!(status.success(), "simulator exit: {status:?}");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest"))
            .expect("manifest JSON");
    let msgs = received.await.expect("subscriber");
    assert_eq!(
        msgs.len() as u64,
        manifest.totals.payloads,
        "every payload arrived once"
    );

    // Classify what arrived, per device, the way the gateway would.
    let now = chrono::Utc::now().timestamp_millis();
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut seqs: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut last_ts: HashMap<String, i64> = HashMap::new();
    for (topic, payload) in &msgs {
        let dev = topic.split('/').nth(1).expect("device segment").to_string();
        let entry = seen.entry(dev.clone()).or_default();
        let mut fault = |name: &str| *entry.faults.entry(name.to_string()).or_default() += 1;
        match parse(payload, Some(&dev), now, &Limits::default()) {
            Ok(r) => {
                let seq = r.seq.expect("canonical payloads carry seq");
                if !seqs.entry(dev.clone()).or_default().insert(seq) {
                    fault("duplicate");
                    continue;
                }
                let last = last_ts.entry(dev.clone()).or_insert(i64::MIN);
                if r.ts_ms < *last {
                    fault("out_of_order_ts");
                } else {
                    *last = r.ts_ms;
                }
                entry.valid += 1;
                entry.seq_first = Some(entry.seq_first.map_or(seq, |f| f.min(seq)));
                entry.seq_last = Some(entry.seq_last.map_or(seq, |l| l.max(seq)));
            }
            Err(e) => fault(match e.code() {
                "payload_too_large" => "oversized",
                other => other,
            }),
        }
    }
    let invisible = ["burst", "offline"]; // timing faults: not visible in payloads
    assert_eq!(manifest.devices.len(), 8);
    let mut kinds = HashSet::new();
    for (dev, want) in &manifest.devices {
        let got = seen.remove(dev).unwrap_or_default();
        let mut want_faults = want.faults.clone();
        want_faults.retain(|k, _| !invisible.contains(&k.as_str()));
        kinds.extend(want_faults.keys().cloned());
        assert_eq!(got.valid, want.valid, "{dev}");
        assert_eq!(
            (got.seq_first, got.seq_last),
            (want.seq_first, want.seq_last),
            "{dev}"
        );
        assert_eq!(got.faults, want_faults, "{dev}");
    }
    assert!(seen.is_empty(), "unexpected devices: {seen:?}");
    assert!(
        kinds.len() >= 5,
        "a mix of fault kinds was exercised: {kinds:?}"
    );
}

#[test]
fn unreachable_broker_is_a_clear_error() {
    let port = common::free_port();
    let out = std::process::Command::new(SIMULATOR)
        .args([
            "--broker",
            &format!("mqtt://127.0.0.1:{port}"),
            "--count",
            "1",
        ])
        .output()
        .expect("run simulator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
}

#[test]
fn bad_scenario_file_names_the_key() {
    let dir = common::test_dir(&common::unique_name("simtest-bad"));
    let p = dir.join("typo.toml");
    std::fs::write(&p, "devices = 4\nfualts = 0.1\n").expect("write");
    let out = std::process::Command::new(SIMULATOR)
        .arg("--scenario")
        .arg(&p)
        .output()
        .expect("run simulator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("fualts") && stderr.contains("typo.toml"),
        "{stderr}"
    );
}
