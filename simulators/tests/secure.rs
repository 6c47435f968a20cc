//! The secured stack for real (`scripts/stack up --secure`): simulated devices
//! over TLS and mutual TLS with per-device credentials -> Mosquitto with a
//! per-device ACL -> gateway -> Kafka SASL_SSL SCRAM with ACLs -> aggregator.
//! Each failure (wrong CA, expired or missing certificate, wrong password,
//! missing ACL, a device writing another's topic) must be a clear error that
//! loses nothing, and no password may show in any log, metric or page.
//!
//! The tests share the secure Mosquitto's `sensors/+/telemetry` topics, so they
//! run one at a time (a lock); each has its own Kafka topics and ACLs.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Secure;
use iot_gateway::fleet::Manifest;
use rdkafka::message::{Message, OwnedMessage};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// One test's names and files.
struct Run {
    sec: Secure,
    name: String,
    dir: PathBuf,
    topic: String,
    dlq: String,
}

impl Run {
    fn new(prefix: &str) -> Run {
        let sec = Secure::require();
        let name = common::unique_name(prefix);
        let dir = common::test_dir(&name);
        Run {
            topic: format!("{name}.weather"),
            dlq: format!("{name}.dlq"),
            sec,
            name,
            dir,
        }
    }

    async fn topics(&self) {
        self.sec.create_topic(&self.topic, 3).await;
        self.sec.create_topic(&self.dlq, 1).await;
    }

    /// The gateway's environment: MQTT over mutual TLS (its certificate, CN
    /// gateway), Kafka SASL_SSL as user gateway with the stack's password.
    fn gateway_env(&self, http: &str, spool: &str) -> Vec<(&'static str, String)> {
        let s = &self.sec;
        vec![
            ("GATEWAY__MQTT__URL", s.mqtt_mtls.clone()),
            ("GATEWAY__MQTT__CLIENT_ID", self.name.clone()),
            // A clean session: nothing queues for a test's gateway after it ends.
            ("GATEWAY__MQTT__CLEAN_SESSION", "true".into()),
            ("GATEWAY__MQTT__TLS__CA_FILE", path(&s.ca())),
            ("GATEWAY__MQTT__TLS__CERT_FILE", path(&s.pki("gateway.crt"))),
            ("GATEWAY__MQTT__TLS__KEY_FILE", path(&s.pki("gateway.key"))),
            ("GATEWAY__KAFKA__BOOTSTRAP_SERVERS", s.kafka.clone()),
            ("GATEWAY__KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
            ("GATEWAY__KAFKA__TLS__CA_FILE", path(&s.ca())),
            ("GATEWAY__KAFKA__SASL__MECHANISM", "SCRAM-SHA-512".into()),
            ("GATEWAY__KAFKA__SASL__USERNAME", "gateway".into()),
            (
                "GATEWAY__KAFKA__SASL__PASSWORD_FILE",
                path(&s.secret_file("kafka-gateway")),
            ),
            ("GATEWAY__KAFKA__TOPIC", self.topic.clone()),
            ("GATEWAY__KAFKA__DLQ_TOPIC", self.dlq.clone()),
            ("GATEWAY__HTTP__LISTEN", http.to_string()),
            ("GATEWAY__SPOOL__DIR", path(&self.dir.join(spool))),
        ]
    }

    /// Starts the gateway with `env` over the defaults of [`Run::gateway_env`].
    fn gateway(&self, log: &str, http: &str, env: &[(&'static str, String)]) -> common::Child {
        let mut all = self.gateway_env(http, "spool");
        for (k, v) in env {
            all.retain(|(k2, _)| k2 != k);
            all.push((k, v.clone()));
        }
        // Drop keys set to "" (to remove a default, e.g. the client certificate).
        all.retain(|(_, v)| !v.is_empty());
        let cfg = common::repo_root().join("configs/gateway.toml");
        common::spawn(
            common::workspace_bin("gateway").to_str().expect("path"),
            &["run", "--config", cfg.to_str().expect("path")],
            &all,
            &self.dir,
            log,
        )
    }

    /// Runs the simulator with `args` (plus the CA) to the end; its manifest.
    fn simulate(&self, log: &str, args: &[&str]) -> (bool, Manifest, String) {
        let manifest = self.dir.join(format!("{log}.json"));
        let ca = path(&self.sec.ca());
        let mut all: Vec<&str> = vec!["--quiet"];
        for (flag, default) in [("--ca-file", ca.as_str()), ("--seed", "11")] {
            if !args.contains(&flag) {
                all.extend_from_slice(&[flag, default]);
            }
        }
        all.extend_from_slice(args);
        let m = path(&manifest);
        all.extend_from_slice(&["--manifest", &m]);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_simulator"))
            .args(&all)
            .output()
            .expect("run simulator");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(self.dir.join(format!("{log}.log")), &text).expect("log");
        let manifest = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| Manifest::new(&Default::default()));
        (out.status.success(), manifest, text)
    }

    /// Every file this test wrote (logs, configs), for the secret check.
    fn all_logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(&self.dir).expect("test dir") {
            let p = e.expect("entry").path();
            if p.is_file() {
                out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
        out
    }

    fn assert_no_secret_anywhere(&self, extra: &[(&str, String)]) {
        let secrets = self.sec.all_secrets();
        assert!(
            secrets.len() >= 10,
            "the stack's passwords: {}",
            secrets.len()
        );
        common::assert_no_secret("the test's logs", &self.all_logs(), &secrets);
        for (what, text) in extra {
            common::assert_no_secret(what, text, &secrets);
        }
    }
}

fn readyz(http: &str) -> (u16, String) {
    common::http_get(http, "/readyz").unwrap_or((0, String::new()))
}

fn metric(http: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    common::http_get(http, "/metrics")
        .ok()
        .and_then(|(_, body)| common::metric(&common::parse_prometheus(&body), name, labels))
        .unwrap_or(0.0)
}

async fn until(what: &str, child: &common::Child, secs: u64, f: impl FnMut() -> bool) {
    let ok = common::eventually(Duration::from_secs(secs), f).await;
    assert!(ok, "{what} within {secs}s; log:\n{}", child.log_text());
}

/// Until the gateway at `http` counted a `kind` failure towards `peer`.
async fn until_counted(
    what: &str,
    gw: &common::Child,
    http: &str,
    peer: &str,
    kind: &str,
    secs: u64,
) {
    until(what, gw, secs, || {
        metric(
            http,
            "gateway_security_errors_total",
            &[("peer", peer), ("kind", kind)],
        ) >= 1.0
    })
    .await;
}

async fn until_subscribed(gw: &common::Child, http: &str) {
    until("MQTT subscribed", gw, 30, || {
        metric(http, "gateway_mqtt_connected", &[]) == 1.0
    })
    .await;
}

/// The seqs of each device; asserts no reading (device, seq, ts) is there twice.
fn readings(records: &[OwnedMessage]) -> BTreeMap<String, Vec<u64>> {
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for m in records {
        let v: serde_json::Value =
            serde_json::from_slice(m.payload().expect("value")).expect("JSON value");
        let dev = v["device_id"].as_str().expect("device_id").to_string();
        let seq = v["seq"].as_u64().expect("seq");
        let ts = v["ts"].to_string();
        assert!(seen.insert((dev.clone(), seq, ts)), "{dev} seq {seq} twice");
        per_device.entry(dev).or_default().push(seq);
    }
    per_device
}

/// Kafka holds exactly the manifest's valid readings, each once.
fn assert_matches_manifest(records: &[OwnedMessage], m: &Manifest) {
    let got = readings(records);
    for (dev, tally) in &m.devices {
        let seqs = got.get(dev).cloned().unwrap_or_default();
        assert_eq!(seqs.len() as u64, tally.valid, "{dev}: {seqs:?}");
        if let (Some(a), Some(b)) = (tally.seq_first, tally.seq_last) {
            let want: BTreeSet<u64> = (a..=b).collect();
            assert_eq!(seqs.iter().copied().collect::<BTreeSet<_>>(), want, "{dev}");
        }
    }
    assert_eq!(records.len() as u64, m.totals.valid);
}

#[tokio::test(flavor = "multi_thread")]
async fn secured_pipeline_delivers_and_aggregates_like_the_plain_one() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Run::new("secure-e2e");
    r.topics().await;
    let group = r.name.clone();
    r.sec.grant(&r.topic, &r.dlq, &group);
    let (gw_http, agg_http) = (
        format!("127.0.0.1:{}", common::free_port()),
        format!("127.0.0.1:{}", common::free_port()),
    );
    // The gateway on the TLS + password listener this time (MQTT 5).
    let gw = r.gateway(
        "gateway",
        &gw_http,
        &[
            ("GATEWAY__MQTT__URL", r.sec.mqtt_tls.clone()),
            ("GATEWAY__MQTT__VERSION", "5".into()),
            ("GATEWAY__MQTT__TLS__CERT_FILE", String::new()),
            ("GATEWAY__MQTT__TLS__KEY_FILE", String::new()),
            ("GATEWAY__MQTT__USERNAME", "gateway".into()),
            (
                "GATEWAY__MQTT__PASSWORD_FILE",
                path(&r.sec.secret_file("mqtt-gateway")),
            ),
        ],
    );
    let cfg = common::repo_root().join("configs/aggregator.toml");
    let s = &r.sec;
    let agg = common::spawn(
        common::workspace_bin("aggregator").to_str().expect("path"),
        &["run", "--config", cfg.to_str().expect("path")],
        &[
            ("AGGREGATOR__KAFKA__BOOTSTRAP_SERVERS", s.kafka.clone()),
            ("AGGREGATOR__KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
            ("AGGREGATOR__KAFKA__TLS__CA_FILE", path(&s.ca())),
            ("AGGREGATOR__KAFKA__SASL__MECHANISM", "SCRAM-SHA-256".into()),
            ("AGGREGATOR__KAFKA__SASL__USERNAME", "aggregator".into()),
            (
                "AGGREGATOR__KAFKA__SASL__PASSWORD_FILE",
                path(&s.secret_file("kafka-aggregator")),
            ),
            ("AGGREGATOR__KAFKA__TOPIC", r.topic.clone()),
            ("AGGREGATOR__KAFKA__GROUP_ID", group.clone()),
            ("AGGREGATOR__HTTP__LISTEN", agg_http.clone()),
        ],
        &r.dir,
        "aggregator",
    );
    until("gateway ready", &gw, 30, || readyz(&gw_http).0 == 200).await;
    until("aggregator ready", &agg, 60, || readyz(&agg_http).0 == 200).await;

    // Devices over mutual TLS, each with its own certificate (CN = device).
    let devices = s.pki("devices");
    let (ok, m, out) = r.simulate(
        "simulator",
        &[
            "--broker",
            &s.mqtt_mtls,
            "--device-certs",
            &path(&devices),
            "--devices",
            "5",
            "--count",
            "40",
            "--rate",
            "20",
            "--faults",
            "0.1",
            "--fault-kinds",
            "malformed_json,out_of_range,missing_field,duplicate",
        ],
    );
    assert!(ok, "simulator: {out}");
    assert!(
        m.totals.valid >= 150 && m.totals.invalid > 0,
        "{:?}",
        m.totals
    );

    let records = s
        .consume(
            &r.topic,
            m.totals.valid as usize,
            Duration::from_secs(60),
            Duration::from_secs(3),
        )
        .await;
    assert_matches_manifest(&records, &m);
    let dead = s
        .consume(
            &r.dlq,
            m.totals.invalid as usize,
            Duration::from_secs(30),
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(dead.len() as u64, m.totals.invalid, "DLQ");

    // The aggregator (SCRAM-SHA-256) counts every valid reading per device.
    let want: BTreeMap<String, u64> = m
        .devices
        .iter()
        .map(|(d, t)| (d.clone(), t.valid))
        .collect();
    let mut last = String::new();
    let counted = common::eventually(Duration::from_secs(30), || {
        let Ok((200, body)) = common::http_get(&agg_http, "/api/devices") else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let got: BTreeMap<String, u64> = v["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| {
                        Some((d["device_id"].as_str()?.to_string(), d["count"].as_u64()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        last = body;
        got == want
    })
    .await;
    assert!(counted, "aggregator counts {last}, want {want:?}");
    assert_eq!(metric(&gw_http, "gateway_security_errors_total", &[]), 0.0);

    let (_, gw_metrics) = common::http_get(&gw_http, "/metrics").expect("metrics");
    let (_, agg_metrics) = common::http_get(&agg_http, "/metrics").expect("metrics");
    let ready = readyz(&gw_http).1;
    drop(gw);
    drop(agg);
    r.assert_no_secret_anywhere(&[
        ("gateway /metrics", gw_metrics),
        ("aggregator /metrics", agg_metrics),
        ("/readyz", ready),
    ]);
}

/// A CA unrelated to the stack's, and an expired certificate the stack's CA
/// signed (CN gateway), written as PEM files into `dir`.
fn bad_certificates(sec: &Secure, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use openssl::asn1::Asn1Time;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::{X509NameBuilder, X509};

    let key = || {
        let g = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("curve");
        PKey::from_ec_key(EcKey::generate(&g).expect("key")).expect("pkey")
    };
    let name = |cn: &str| {
        let mut n = X509NameBuilder::new().expect("name");
        n.append_entry_by_text("CN", cn).expect("cn");
        n.build()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let cert = |cn: &str,
                k: &PKey<openssl::pkey::Private>,
                issuer: &str,
                signer: &PKey<openssl::pkey::Private>,
                from: i64,
                to: i64| {
        let mut b = X509::builder().expect("builder");
        b.set_version(2).expect("v3");
        b.set_subject_name(&name(cn)).expect("subject");
        b.set_issuer_name(&name(issuer)).expect("issuer");
        b.set_pubkey(k).expect("pubkey");
        b.set_not_before(&Asn1Time::from_unix(from).expect("time"))
            .expect("nb");
        b.set_not_after(&Asn1Time::from_unix(to).expect("time"))
            .expect("na");
        let serial = openssl::bn::BigNum::from_u32(now as u32).expect("bn");
        b.set_serial_number(&serial.to_asn1_integer().expect("serial"))
            .expect("serial");
        b.sign(signer, MessageDigest::sha256()).expect("sign");
        b.build()
    };
    // The wrong CA: self-signed, never trusted by the stack.
    let other_key = key();
    let other = cert(
        "Some Other CA",
        &other_key,
        "Some Other CA",
        &other_key,
        now - 60,
        now + 86_400,
    );
    let other_path = dir.join("other-ca.crt");
    std::fs::write(&other_path, other.to_pem().expect("pem")).expect("write");
    // Expired yesterday, signed by the real CA.
    let ca_key = PKey::private_key_from_pem(&std::fs::read(sec.pki("ca.key")).expect("ca key"))
        .expect("ca key");
    let ca = X509::from_pem(&std::fs::read(sec.ca()).expect("ca")).expect("ca cert");
    let ca_cn = ca
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .expect("ca cn");
    let k = key();
    let expired = cert(
        "gateway",
        &k,
        &ca_cn,
        &ca_key,
        now - 3 * 86_400,
        now - 86_400,
    );
    let (crt, keyp) = (dir.join("expired.crt"), dir.join("expired.key"));
    std::fs::write(&crt, expired.to_pem().expect("pem")).expect("write");
    std::fs::write(&keyp, k.private_key_to_pem_pkcs8().expect("pem")).expect("write");
    (other_path, crt, keyp)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_failures_are_clear_errors_and_lose_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Run::new("secure-tls");
    r.topics().await;
    r.sec.grant(&r.topic, &r.dlq, &r.name);
    let (other_ca, expired_crt, expired_key) = bad_certificates(&r.sec, &r.dir);
    let http = format!("127.0.0.1:{}", common::free_port());

    // 1. A good start makes the broker keep our session (readings queue for us).
    let persistent = [("GATEWAY__MQTT__CLEAN_SESSION", "false".to_string())];
    let mut gw = r.gateway("gateway-good", &http, &persistent);
    until("gateway ready", &gw, 30, || readyz(&http).0 == 200).await;
    gw.terminate(Duration::from_secs(15))
        .expect("gateway stops");

    // 2. Wrong CA, expired certificate, no certificate: each a clear error.
    // (case, environment, what the error says)
    type Case = (&'static str, Vec<(&'static str, String)>, &'static str);
    let cases: [Case; 3] = [
        (
            "wrong-ca",
            vec![("GATEWAY__MQTT__TLS__CA_FILE", path(&other_ca))],
            "certificate verify failed",
        ),
        (
            "expired",
            vec![
                ("GATEWAY__MQTT__TLS__CERT_FILE", path(&expired_crt)),
                ("GATEWAY__MQTT__TLS__KEY_FILE", path(&expired_key)),
            ],
            "expired",
        ),
        (
            "no-cert",
            vec![
                ("GATEWAY__MQTT__TLS__CERT_FILE", String::new()),
                ("GATEWAY__MQTT__TLS__KEY_FILE", String::new()),
            ],
            "certificate required",
        ),
    ];
    let mut sent = Vec::new();
    for (i, (case, env, says)) in cases.iter().enumerate() {
        let mut env = env.clone();
        env.extend(persistent.iter().cloned());
        let gw = r.gateway(&format!("gateway-{case}"), &http, &env);
        until_counted(&format!("{case}: counted"), &gw, &http, "mqtt", "tls", 30).await;
        let (code, body) = readyz(&http);
        assert_eq!(code, 503, "{case}: {body}");
        assert!(
            body.contains("TLS") && body.contains(says),
            "{case}: /readyz says {body}"
        );
        let log = gw.log_text();
        assert!(
            log.lines().any(|l| l.contains("ERROR") && l.contains(says)),
            "{case}: the log has no clear error:\n{log}"
        );
        // Devices publish meanwhile (over TLS + their passwords): the broker keeps it.
        let (ok, m, out) = r.simulate(
            &format!("simulator-{case}"),
            &[
                "--broker",
                &r.sec.mqtt_tls,
                "--device-passwords",
                &path(&r.sec.dir.join("secrets/device-passwords")),
                "--devices",
                "3",
                "--count",
                "10",
                "--rate",
                "50",
                "--seed",
                &(20 + i).to_string(),
            ],
        );
        assert!(ok, "{out}");
        sent.push(m);
        assert_eq!(
            metric(
                &http,
                "gateway_readings_received_total",
                &[("source", "mqtt")]
            ),
            0.0
        );
    }
    // The simulator with the wrong CA refuses to start, saying why.
    let (ok, _, out) = r.simulate(
        "simulator-wrong-ca",
        &[
            "--broker",
            &r.sec.mqtt_tls,
            "--ca-file",
            &path(&other_ca),
            "--devices",
            "1",
            "--count",
            "1",
        ],
    );
    assert!(!ok && out.contains("certificate verify failed"), "{out}");

    // 3. Fixed: everything the devices sent meanwhile arrives, once.
    let mut gw = r.gateway("gateway-fixed", &http, &persistent);
    let want: u64 = sent.iter().map(|m| m.totals.valid).sum();
    let records = r
        .sec
        .consume(
            &r.topic,
            want as usize,
            Duration::from_secs(60),
            Duration::from_secs(3),
        )
        .await;
    assert_eq!(records.len() as u64, want, "log:\n{}", gw.log_text());
    readings(&records);
    gw.terminate(Duration::from_secs(15)).expect("stops");
    // Drop the persistent session, so nothing queues for it after the test.
    let gw = r.gateway("gateway-cleanup", &http, &[]);
    until("cleanup connects", &gw, 30, || readyz(&http).0 == 200).await;
    drop(gw);
    r.assert_no_secret_anywhere(&[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_or_missing_acl_keeps_readings_until_fixed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Run::new("secure-auth");
    r.topics().await;
    let http = format!("127.0.0.1:{}", common::free_port());
    let devices = path(&r.sec.pki("devices"));
    let publish = |log: &str, seed: &str| {
        let (ok, m, out) = r.simulate(
            log,
            &[
                "--broker",
                &r.sec.mqtt_mtls,
                "--device-certs",
                &devices,
                "--devices",
                "3",
                "--count",
                "10",
                "--rate",
                "50",
                "--seed",
                seed,
            ],
        );
        assert!(ok, "{out}");
        m
    };

    // 1. Wrong SCRAM password: readings are spooled (and acknowledged), not sent.
    let wrong = "not-the-password-123";
    let gw = r.gateway(
        "gateway-wrong-password",
        &http,
        &[
            ("GATEWAY__KAFKA__SASL__PASSWORD_FILE", String::new()),
            ("GATEWAY__KAFKA__SASL__PASSWORD", wrong.into()),
        ],
    );
    until_counted("auth failure counted", &gw, &http, "kafka", "auth", 30).await;
    until_subscribed(&gw, &http).await;
    let a = publish("simulator-a", "31");
    until("spooled", &gw, 30, || {
        metric(
            &http,
            "gateway_readings_received_total",
            &[("source", "mqtt")],
        ) >= a.totals.payloads as f64
    })
    .await;
    let (code, body) = readyz(&http);
    assert_eq!(code, 200, "the spool keeps accepting: {body}");
    assert!(
        body.contains("SASL authentication failed for user gateway"),
        "/readyz: {body}"
    );
    assert!(
        gw.log_text()
            .lines()
            .any(|l| l.contains("ERROR")
                && l.contains("SASL authentication failed for user gateway")),
        "{}",
        gw.log_text()
    );
    assert!(
        !gw.log_text().contains(wrong),
        "the wrong password is logged"
    );
    let none = r
        .sec
        .consume(&r.topic, 1, Duration::from_secs(3), Duration::ZERO)
        .await;
    assert!(none.is_empty(), "nothing reaches Kafka without a login");
    drop(gw);

    // 2. Right password, but no ACL yet: still held, and /readyz says why.
    let mut gw = r.gateway(
        "gateway-no-acl",
        &http,
        &[("GATEWAY__KAFKA__SASL__MECHANISM", "PLAIN".into())],
    );
    let b = publish("simulator-b", "32");
    until_counted("ACL failure counted", &gw, &http, "kafka", "acl", 40).await;
    let (_, body) = readyz(&http);
    assert!(body.contains("not authorized"), "/readyz: {body}");
    let none = r
        .sec
        .consume(&r.topic, 1, Duration::from_secs(3), Duration::ZERO)
        .await;
    assert!(none.is_empty(), "nothing reaches Kafka without the ACL");
    let dead = r
        .sec
        .consume(&r.dlq, 1, Duration::from_secs(2), Duration::ZERO)
        .await;
    assert!(dead.is_empty(), "an ACL problem is not a dead letter");

    // 3. Granted while it runs: everything arrives once; /readyz clears.
    r.sec.grant(&r.topic, &r.dlq, &r.name);
    let want = (a.totals.valid + b.totals.valid) as usize;
    let records = r
        .sec
        .consume(
            &r.topic,
            want,
            Duration::from_secs(90),
            Duration::from_secs(3),
        )
        .await;
    assert_eq!(records.len(), want, "log:\n{}", gw.log_text());
    readings(&records);
    until("/readyz clears", &gw, 20, || {
        !readyz(&http).1.contains("not authorized")
    })
    .await;
    let (_, metrics) = common::http_get(&http, "/metrics").expect("metrics");
    gw.terminate(Duration::from_secs(15)).expect("stops");
    r.assert_no_secret_anywhere(&[("/metrics", metrics)]);

    // The aggregator with a wrong password: a clear reason on /readyz.
    let agg_http = format!("127.0.0.1:{}", common::free_port());
    let agg = common::spawn(
        common::workspace_bin("aggregator").to_str().expect("path"),
        &["run"],
        &[
            ("AGGREGATOR__KAFKA__BOOTSTRAP_SERVERS", r.sec.kafka.clone()),
            ("AGGREGATOR__KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
            ("AGGREGATOR__KAFKA__TLS__CA_FILE", path(&r.sec.ca())),
            ("AGGREGATOR__KAFKA__SASL__USERNAME", "aggregator".into()),
            ("AGGREGATOR__KAFKA__SASL__PASSWORD", wrong.into()),
            ("AGGREGATOR__KAFKA__TOPIC", r.topic.clone()),
            ("AGGREGATOR__KAFKA__GROUP_ID", r.name.clone()),
            ("AGGREGATOR__HTTP__LISTEN", agg_http.clone()),
        ],
        &r.dir,
        "aggregator-wrong-password",
    );
    until("aggregator says why", &agg, 30, || {
        readyz(&agg_http)
            .1
            .contains("SASL authentication failed for user aggregator")
    })
    .await;
    assert_eq!(readyz(&agg_http).0, 503);
}

/// Publishes one QoS 1 message as `device` (its password) to `topic`; the
/// PUBACK's reason (MQTT 5) or "ok" (3.1.1, where a denial is silent).
async fn publish_as(sec: &Secure, device: &str, password: &str, topic: &str, v5: bool) -> String {
    let (host, port) = sec
        .mqtt_tls
        .trim_start_matches("mqtts://")
        .split_once(':')
        .expect("url");
    let port: u16 = port.parse().expect("port");
    let tls = iot_gateway::security::mqtt::MqttTlsConfig {
        ca_file: Some(sec.ca()),
        ..Default::default()
    };
    let transport = rumqttc::Transport::Tls(rumqttc::TlsConfiguration::NativeConnector(
        tls.connector().expect("connector"),
    ));
    let id = common::unique_name("cross");
    let payload = format!(
        r#"{{"device_id":"{device}","temperature":21.5,"humidity":40.0,"seq":1,"ts":{}}}"#,
        chrono::Utc::now().timestamp_millis()
    );
    if v5 {
        use rumqttc::v5::mqttbytes::v5::Packet;
        let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
        o.set_transport(transport).set_credentials(device, password);
        let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
        c.publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .expect("publish");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                Ok(Ok(rumqttc::v5::Event::Incoming(Packet::PubAck(a)))) => {
                    return format!("{:?}", a.reason)
                }
                Ok(Ok(_)) => {}
                other => panic!("MQTT 5 publish as {device}: {other:?}"),
            }
        }
    } else {
        let mut o = rumqttc::MqttOptions::new(id, host, port);
        o.set_transport(transport).set_credentials(device, password);
        let (c, mut el) = rumqttc::AsyncClient::new(o, 10);
        c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => return "ok".into(),
                Ok(Ok(_)) => {}
                other => panic!("MQTT 3.1.1 publish as {device}: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_publish_to_another_devices_topic() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Run::new("secure-acl");
    r.topics().await;
    r.sec.grant(&r.topic, &r.dlq, &r.name);
    let http = format!("127.0.0.1:{}", common::free_port());
    let gw = r.gateway("gateway", &http, &[]);
    until("gateway ready", &gw, 30, || readyz(&http).0 == 200).await;
    let pw: BTreeMap<String, String> =
        std::fs::read_to_string(r.sec.dir.join("secrets/device-passwords"))
            .expect("device passwords")
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(d, p)| (d.to_string(), p.to_string()))
            .collect();
    let p1 = &pw["sensor-0001"];
    // sensor-0001 writes sensor-0002's topic: MQTT 5 is told, 3.1.1 is not.
    let v5 = publish_as(
        &r.sec,
        "sensor-0001",
        p1,
        "sensors/sensor-0002/telemetry",
        true,
    )
    .await;
    assert_eq!(v5, "NotAuthorized");
    let v311 = publish_as(
        &r.sec,
        "sensor-0001",
        p1,
        "sensors/sensor-0002/telemetry",
        false,
    )
    .await;
    assert_eq!(v311, "ok", "3.1.1 gets a PUBACK even when denied");
    // Its own topic works, and is the only reading the gateway ever sees.
    let own = publish_as(
        &r.sec,
        "sensor-0001",
        p1,
        "sensors/sensor-0001/telemetry",
        true,
    )
    .await;
    assert!(own == "Success" || own == "NoMatchingSubscribers", "{own}");
    let records = r
        .sec
        .consume(&r.topic, 1, Duration::from_secs(30), Duration::from_secs(3))
        .await;
    assert_eq!(records.len(), 1, "log:\n{}", gw.log_text());
    assert_eq!(records[0].key(), Some(&b"sensor-0001"[..]));
    assert_eq!(
        metric(
            &http,
            "gateway_readings_received_total",
            &[("source", "mqtt")]
        ),
        1.0
    );
    drop(gw);
    r.assert_no_secret_anywhere(&[]);
}

#[test]
fn check_config_masks_every_secret() {
    let sec = Secure::require();
    let secret = "inline-Secret-4711";
    let out = std::process::Command::new(common::workspace_bin("gateway"))
        .args(["check-config"])
        .env("GATEWAY__MQTT__URL", &sec.mqtt_tls)
        .env("GATEWAY__MQTT__USERNAME", "gateway")
        .env("GATEWAY__MQTT__PASSWORD", secret)
        .env("GATEWAY__MQTT__TLS__CA_FILE", sec.ca())
        .env("GATEWAY__KAFKA__SECURITY_PROTOCOL", "sasl_ssl")
        .env("GATEWAY__KAFKA__SASL__USERNAME", "gateway")
        .env(
            "GATEWAY__KAFKA__SASL__PASSWORD_FILE",
            sec.secret_file("kafka-gateway"),
        )
        .output()
        .expect("check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[kafka.sasl]") && text.contains("********"),
        "{text}"
    );
    let mut secrets = sec.all_secrets();
    secrets.push(secret.into());
    common::assert_no_secret("check-config", &text, &secrets);
    // A password file that is not there names the key and the path.
    let out = std::process::Command::new(common::workspace_bin("aggregator"))
        .args(["check-config"])
        .env("AGGREGATOR__KAFKA__SECURITY_PROTOCOL", "sasl_ssl")
        .env("AGGREGATOR__KAFKA__SASL__USERNAME", "aggregator")
        .env("AGGREGATOR__KAFKA__SASL__PASSWORD_FILE", "/nonexistent/pw")
        .output()
        .expect("check-config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("kafka.sasl.password_file") && err.contains("/nonexistent/pw"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_over_mutual_tls_and_a_wrong_kafka_ca() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = Run::new("secure-kafka-tls");
    r.topics().await;
    r.sec.grant(&r.topic, &r.dlq, &r.name);
    let (other_ca, _, _) = bad_certificates(&r.sec, &r.dir);
    let http = format!("127.0.0.1:{}", common::free_port());

    // A wrong CA for Kafka: a TLS error naming the cause; the reading waits on disk.
    let gw = r.gateway(
        "gateway-wrong-kafka-ca",
        &http,
        &[("GATEWAY__KAFKA__TLS__CA_FILE", path(&other_ca))],
    );
    until_counted("Kafka TLS failure counted", &gw, &http, "kafka", "tls", 30).await;
    until_subscribed(&gw, &http).await;
    let (code, body) = readyz(&http);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("Kafka TLS failed") && body.contains("certificate verify failed"),
        "/readyz: {body}"
    );
    let p1 = std::fs::read_to_string(r.sec.dir.join("secrets/device-passwords"))
        .expect("device passwords");
    let p1 = p1
        .lines()
        .find_map(|l| l.strip_prefix("sensor-0001:"))
        .expect("sensor-0001")
        .to_string();
    let reason = publish_as(
        &r.sec,
        "sensor-0001",
        &p1,
        "sensors/sensor-0001/telemetry",
        true,
    )
    .await;
    assert!(reason == "Success", "{reason}");
    until("spooled", &gw, 20, || {
        metric(
            &http,
            "gateway_readings_received_total",
            &[("source", "mqtt")],
        ) == 1.0
    })
    .await;
    drop(gw);

    // Mutual TLS to Kafka (CN=gateway is the principal, no password): it arrives.
    let gw = r.gateway(
        "gateway-kafka-mtls",
        &http,
        &[
            (
                "GATEWAY__KAFKA__BOOTSTRAP_SERVERS",
                r.sec.kafka_mtls.clone(),
            ),
            ("GATEWAY__KAFKA__SECURITY_PROTOCOL", "ssl".into()),
            (
                "GATEWAY__KAFKA__TLS__CERT_FILE",
                path(&r.sec.pki("gateway.crt")),
            ),
            (
                "GATEWAY__KAFKA__TLS__KEY_FILE",
                path(&r.sec.pki("gateway.key")),
            ),
            ("GATEWAY__KAFKA__SASL__USERNAME", String::new()),
            ("GATEWAY__KAFKA__SASL__PASSWORD_FILE", String::new()),
        ],
    );
    let records = r
        .sec
        .consume(&r.topic, 1, Duration::from_secs(30), Duration::from_secs(2))
        .await;
    assert_eq!(records.len(), 1, "log:\n{}", gw.log_text());
    drop(gw);

    // The same listener without a client certificate: refused, and said so.
    let gw = r.gateway(
        "gateway-kafka-no-cert",
        &http,
        &[
            (
                "GATEWAY__KAFKA__BOOTSTRAP_SERVERS",
                r.sec.kafka_mtls.clone(),
            ),
            ("GATEWAY__KAFKA__SECURITY_PROTOCOL", "ssl".into()),
            ("GATEWAY__KAFKA__SASL__USERNAME", String::new()),
            ("GATEWAY__KAFKA__SASL__PASSWORD_FILE", String::new()),
        ],
    );
    until_counted(
        "refused without a certificate",
        &gw,
        &http,
        "kafka",
        "tls",
        30,
    )
    .await;
    drop(gw);
    r.assert_no_secret_anywhere(&[]);
}
