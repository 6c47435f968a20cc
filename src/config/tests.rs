#![allow(clippy::unwrap_used)]

use super::*;
use crate::mqtt::{parse_mqtt_url, redact_url};

/// A config file that is removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file(contents: &str) -> TempFile {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("iot-gw-config-{}-{n}.toml", std::process::id()));
    std::fs::write(&p, contents).unwrap();
    TempFile(p)
}

#[test]
fn defaults_are_valid() {
    GatewayConfig::default().validate(Path::new("x")).unwrap();
}

#[test]
fn typo_names_the_key_and_the_file() {
    let f = file("[kafka]\nlinger_msec = 5\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("linger_msec"), "{e}");
    assert!(e.contains(&f.0.display().to_string()), "{e}");
    let f = file("[kafk]\ntopic = \"x\"\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("kafk"), "{e}");
}

#[test]
fn wrong_type_and_bad_values_name_the_key() {
    let f = file("[kafka]\nmax_in_flight = \"lots\"\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("max_in_flight"), "{e}");
    let f = file("[kafka]\ncompression = \"brotli\"\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(
        e.contains("kafka.compression") && e.contains("brotli"),
        "{e}"
    );
    let f = file("[mqtt]\nurl = \"http://x\"\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("mqtt.url"), "{e}");
    // The latency knobs are bounded (a reading must not wait minutes).
    for (section, key) in [("mqtt", "batch_linger_ms"), ("spool", "fsync_wait_ms")] {
        let f = file(&format!("[{section}]\n{key} = 1001\n"));
        let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
        assert!(e.contains(&format!("{section}.{key}")), "{e}");
        let f = file(&format!("[{section}]\n{key} = 0\n"));
        GatewayConfig::load(Some(&f.0)).unwrap();
    }
}

#[test]
fn shared_group_wraps_every_filter_and_is_checked() {
    let f = file("[mqtt]\ntopics = [\"a/+/b\", \"c/+\"]\nshared_group = \"gateways\"\n");
    let c = GatewayConfig::load(Some(&f.0)).unwrap();
    assert_eq!(
        c.mqtt.subscriptions(),
        vec!["$share/gateways/a/+/b", "$share/gateways/c/+"]
    );
    assert_eq!(
        GatewayConfig::default().mqtt.subscriptions(),
        vec!["sensors/+/telemetry"]
    );
    for bad in ["a/b", "", "g+"] {
        let f = file(&format!("[mqtt]\nshared_group = {bad:?}\n"));
        let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
        assert!(e.contains("mqtt.shared_group"), "{bad}: {e}");
    }
    let f = file("[mqtt]\ntopics = [\"$share/g/sensors/+/telemetry\"]\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(
        e.contains("mqtt.topics") && e.contains("shared_group"),
        "{e}"
    );
}

#[test]
fn missing_file_is_an_error() {
    let e = GatewayConfig::load(Some(Path::new("/nonexistent/gw.toml")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/gw.toml") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn file_values_are_read() {
    let f = file(
        "[mqtt]\ntopics = [\"a/+/b\"]\nversion = \"5\"\n[kafka]\ndelivery_mode = \"sync\"\n[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n",
    );
    let c = GatewayConfig::load(Some(&f.0)).unwrap();
    assert_eq!(c.mqtt.topics, vec!["a/+/b".to_string()]);
    assert_eq!(c.mqtt.version, MqttVersion::V5);
    assert_eq!(c.kafka.delivery_mode, DeliveryMode::Sync);
    let shown = c.to_masked_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("[kafka.properties]"), "{shown}");
}

#[test]
fn security_keys_are_read_checked_and_masked() {
    let pw = file("gw-secret-1\n");
    let f = file(&format!(
        "[mqtt]\nurl = \"mqtts://broker\"\nusername = \"gateway\"\npassword_file = {:?}\n\
         [kafka]\nsecurity_protocol = \"SASL_SSL\"\n[kafka.sasl]\nusername = \"gateway\"\npassword = \"kafka-secret-2\"\n",
        pw.0.display().to_string()
    ));
    let c = GatewayConfig::load(Some(&f.0)).unwrap();
    assert_eq!(
        c.mqtt.password.as_ref().map(Secret::expose),
        Some("gw-secret-1")
    );
    let shown = c.to_masked_toml();
    assert!(
        !shown.contains("gw-secret-1") && !shown.contains("kafka-secret-2"),
        "{shown}"
    );
    assert!(
        format!("{c:?}").find("secret-").is_none(),
        "Debug shows a secret"
    );
    let mut rd = rdkafka::config::ClientConfig::new();
    c.kafka.security().apply(&mut rd);
    assert_eq!(rd.get("sasl.password"), Some("kafka-secret-2"));

    let f = file("[mqtt]\n[mqtt.tls]\nca_file = \"/x/ca.pem\"\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("mqtt.tls") && e.contains("mqtts://"), "{e}");
    let f = file("[mqtt]\nurl = \"mqtts://b\"\n[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(
        e.contains("mqtt.tls.ca_file") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    let f = file("[kafka]\nsecurity_protocol = \"sasl_ssl\"\n");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("kafka.sasl.username"), "{e}");
    let f = file("[kafka]\nsecurity_protocol = \"tls\"\n");
    let e = AggregatorConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(
        e.contains("kafka.security_protocol") && e.contains("sasl_ssl"),
        "{e}"
    );
}

#[test]
fn credentials_from_the_environment_are_verbatim() {
    let mut c = GatewayConfig::default();
    let env = |k: &str| match k {
        "GATEWAY__MQTT__PASSWORD" => Some("0123".to_string()),
        "GATEWAY__KAFKA__SASL__USERNAME" => Some("007".to_string()),
        _ => None,
    };
    c.credentials_from_env(&env);
    assert_eq!(c.mqtt.password.as_ref().map(Secret::expose), Some("0123"));
    assert_eq!(c.kafka.sasl.username.as_deref(), Some("007"));
}

#[test]
fn unreadable_pem_files_name_the_key() {
    let junk = file("not a certificate\n");
    let f = file(&format!(
        "[mqtt]\nurl = \"mqtts://b\"\n[mqtt.tls]\nca_file = {:?}\n",
        junk.0.display().to_string()
    ));
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("mqtt.tls") && e.contains("CA file"), "{e}");
    let f = file(&format!(
        "[kafka]\nsecurity_protocol = \"ssl\"\n[kafka.tls]\nca_file = {:?}\n",
        junk.0.display().to_string()
    ));
    let e = AggregatorConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("kafka.tls.ca_file") && e.contains("PEM"), "{e}");
}

#[test]
fn aggregator_partial_validation_keeps_aggregator_defaults() {
    let f = file("[validation]\ntemperature_max = 60.0\n");
    let c = AggregatorConfig::load(Some(&f.0)).unwrap();
    assert_eq!(c.validation.temperature_max, 60.0);
    assert_eq!(c.validation.max_payload_bytes, 65_536);
    assert_eq!(c.validation.max_past_secs, 100 * 365 * 24 * 3600);
    let f = file("[validation]\ntemperature_maxx = 60.0\n");
    let e = AggregatorConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(e.contains("temperature_maxx"), "{e}");
}

/// Issue 23: `mqtt://u:hunter2@host` printed `hunter2` in check-config and
/// the logs. It is refused, and never shown, with or without a port.
#[test]
fn user_info_in_the_mqtt_url_is_refused_and_never_shown() {
    for url in [
        "mqtt://u:hunter2@127.0.0.1:1883",
        "mqtt://u:hunter2@127.0.0.1",
        "mqtts://hunter2@broker/",
        "tcp://u:p@ss:hunter2@h:1",
    ] {
        let e = parse_mqtt_url(url).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("mqtt.username"), "{e}");
        assert!(!redact_url(url).contains("hunter2"), "{url}");
    }
    assert_eq!(redact_url("mqtt://h:1/a@b"), "mqtt://h:1/a@b");
    let mut c = GatewayConfig::default();
    c.mqtt.url = "mqtt://u:hunter2@127.0.0.1:1883".into();
    let e = c.validate(Path::new("gw.toml")).unwrap_err().to_string();
    assert!(e.contains("mqtt.url") && !e.contains("hunter2"), "{e}");
    assert!(!c.to_masked_toml().contains("hunter2"));
}

/// Found by the config fuzz target: a top-level key with a bracket is an array
/// index to the config crate, and `[-3331133113]` made it allocate hundreds of
/// GiB and abort. Refused, naming the key and where it came from.
#[test]
fn regression_a_key_with_an_array_index_is_refused_not_allocated() {
    let f = file("\n'3[-3331133113]' =1");
    let e = GatewayConfig::load(Some(&f.0)).unwrap_err().to_string();
    assert!(
        e.contains("3[-3331133113]") && e.contains(&f.0.display().to_string()),
        "{e}"
    );
    // The same through the environment (a variable name can hold a bracket).
    std::env::set_var("BRACKETTEST__MQTT[9999999999]", "1");
    let e = load::<GatewayConfig>(None, "BRACKETTEST", &[])
        .unwrap_err()
        .to_string();
    std::env::remove_var("BRACKETTEST__MQTT[9999999999]");
    assert!(
        e.contains("mqtt[9999999999]") && e.contains("BRACKETTEST__"),
        "{e}"
    );
}
