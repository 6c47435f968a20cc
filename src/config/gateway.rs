//! The gateway's configuration (`configs/gateway.toml`, `GATEWAY__...`).
//!
//! Over 500 lines: every section of the gateway's configuration with its defaults and its
//! validation, key by key (the README documents the same keys).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::print::{mask_properties, toml_string};
use super::{
    at, at_most, checked, invalid, kafka_credentials_from_env, load, validate_common,
    validate_kafka_security, ClockConfig, ConfigError, LogConfig, MAX_DLQ_PAYLOAD_BYTES,
};
use crate::mqtt::{parse_mqtt_url, redact_url};
use crate::reading::Limits;
use crate::security::kafka::{KafkaSaslConfig, KafkaTlsConfig};
use crate::security::mqtt::MqttTlsConfig;
use crate::security::{secret, Secret};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub mqtt: MqttConfig,
    pub simulate: SimulateConfig,
    pub kafka: KafkaConfig,
    pub spool: SpoolConfig,
    pub validation: Limits,
    pub tracking: TrackingConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub clock: ClockConfig,
}

/// `[tracking]`: per-device state of the gateway (the last `seq`, for gap counts).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// Devices tracked at most; past it the least recently seen are forgotten
    /// (counted in gateway_devices_evicted_total), so invented ids cost no memory.
    pub max_devices: usize,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            max_devices: 50_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// fsync before acknowledging (group commit).
    Batch,
    /// fsync every `fsync_interval_ms`; acknowledged on write (may lose that window).
    Interval,
    /// Leave write-back to the OS (tests, benchmarks).
    Never,
}

/// `[spool]`: the durable store-and-forward buffer between intake and Kafka.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// false: no spool; readings are acknowledged to MQTT once Kafka has them.
    pub enabled: bool,
    /// Directory of the spool (created if missing; one gateway per directory).
    pub dir: PathBuf,
    /// Most bytes of segment files; then `on_full` applies.
    pub max_bytes: u64,
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    pub fsync: FsyncMode,
    pub fsync_interval_ms: u64,
    /// `fsync = "batch"`: the longest the first record of a group waits for
    /// company before the group's fsync (fewer fsyncs, and fewer rewrites of
    /// a partly filled page, at low rates; a PUBACK waits this much longer).
    /// A group of 64 KiB is fsynced at once.
    pub fsync_wait_ms: u64,
    pub on_full: crate::gateway::spool::OnFull,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            enabled: true,
            dir: PathBuf::from("spool"),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            fsync: FsyncMode::Batch,
            fsync_interval_ms: 1000,
            fsync_wait_ms: 10,
            on_full: crate::gateway::spool::OnFull::Block,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

impl std::str::FromStr for MqttVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "3.1.1" | "311" | "4" => Ok(MqttVersion::V311),
            "5" | "5.0" => Ok(MqttVersion::V5),
            other => Err(format!("MQTT version {other:?} is not \"3.1.1\" or \"5\"")),
        }
    }
}

// By hand: an environment override `5` arrives as a number, a file has "5".
impl<'de> Deserialize<'de> for MqttVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MqttVersion;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"3.1.1\" or \"5\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MqttVersion, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MqttVersion, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MqttVersion, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<MqttVersion, E> {
                v.to_string().parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Off when only the simulated source is wanted.
    pub enabled: bool,
    /// `mqtt://host:port`.
    pub url: String,
    /// Fixed id: the broker keeps the session (and unacked messages) under it.
    pub client_id: String,
    #[serde(deserialize_with = "secret::lenient_opt_string")]
    pub username: Option<String>,
    /// The password (or `password_file`, or `GATEWAY__MQTT__PASSWORD`); never logged.
    pub password: Option<Secret>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// TLS for `mqtts://` URLs.
    pub tls: MqttTlsConfig,
    /// Topic filters; the device id is taken from the first `+` segment.
    pub topics: Vec<String>,
    /// Topic segment (0-based) holding the device id; default: the `+` position.
    pub device_id_segment: Option<usize>,
    /// Shared subscription group: subscribe `$share/<group>/<filter>` so that
    /// several gateways split the messages of one broker.
    #[serde(deserialize_with = "secret::lenient_opt_string")]
    pub shared_group: Option<String>,
    pub version: MqttVersion,
    pub keep_alive_secs: u64,
    /// false = persistent session, so unacknowledged messages are redelivered.
    pub clean_session: bool,
    /// MQTT 5 session expiry (how long the broker keeps the session offline).
    pub session_expiry_secs: u32,
    /// MQTT 5 Receive Maximum: unacknowledged messages the broker may send us.
    pub receive_maximum: u16,
    /// Largest MQTT packet accepted from the broker; larger payloads than the
    /// validation limit must still arrive here to be dead-lettered with a reason.
    pub max_packet_bytes: usize,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// The longest a received message waits for others before the batch goes
    /// to intake: one wake-up of every stage per batch instead of per message
    /// at low rates. A full batch goes at once.
    pub batch_linger_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "iot-gateway".into(),
            username: None,
            password: None,
            password_file: None,
            tls: MqttTlsConfig::default(),
            topics: vec!["sensors/+/telemetry".into()],
            device_id_segment: None,
            shared_group: None,
            version: MqttVersion::V311,
            keep_alive_secs: 30,
            clean_session: false,
            session_expiry_secs: 86_400,
            receive_maximum: 10_000,
            max_packet_bytes: 4 * 1024 * 1024,
            reconnect_min_ms: 200,
            reconnect_max_ms: 10_000,
            batch_linger_ms: 5,
        }
    }
}

impl MqttConfig {
    /// What is subscribed: the filters, each under `$share/<group>/` when
    /// `shared_group` is set (messages still arrive on their real topics).
    pub fn subscriptions(&self) -> Vec<String> {
        match &self.shared_group {
            Some(g) => self
                .topics
                .iter()
                .map(|t| format!("$share/{g}/{t}"))
                .collect(),
            None => self.topics.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulateConfig {
    /// Simulated devices fed in process (0 = off).
    pub devices: usize,
    /// Readings per second per device.
    pub rate_per_device: f64,
    pub seed: u64,
    /// Share of faulty payloads (0.0..=1.0).
    pub faults: f64,
    /// Simulated seconds per real second.
    pub time_scale: f64,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        SimulateConfig {
            devices: 0,
            rate_per_device: 1.0,
            seed: 1,
            faults: 0.0,
            time_scale: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Many readings in flight; delivery reports handled as they come.
    Async,
    /// One reading at a time: wait for each acknowledgement before the next.
    Sync,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub dlq_enabled: bool,
    /// DLQ records keep at most this many bytes of the raw payload.
    pub dlq_max_payload_bytes: usize,
    /// Create missing topics at start-up instead of failing.
    pub create_topics: bool,
    pub partitions: i32,
    pub replication_factor: i32,
    pub delivery_mode: DeliveryMode,
    /// Readings accepted and not yet acknowledged by Kafka; intake pauses at this.
    pub max_in_flight: usize,
    /// none, gzip, snappy or lz4.
    pub compression: String,
    pub linger_ms: u64,
    /// librdkafka's message.timeout.ms; 0 (default) = retry until Kafka takes
    /// it, which keeps order across outages (in-flight is bounded by max_in_flight).
    pub message_timeout_ms: u64,
    /// plaintext (default), ssl, sasl_ssl or sasl_plaintext.
    pub security_protocol: String,
    pub tls: KafkaTlsConfig,
    pub sasl: KafkaSaslConfig,
    /// Any librdkafka producer property, passed through as is.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic: "weather".into(),
            dlq_topic: "weather.dlq".into(),
            dlq_enabled: true,
            dlq_max_payload_bytes: 65_536,
            create_topics: false,
            partitions: 6,
            replication_factor: 1,
            delivery_mode: DeliveryMode::Async,
            max_in_flight: 5_000,
            compression: "lz4".into(),
            linger_ms: 10,
            message_timeout_ms: 0,
            security_protocol: "plaintext".into(),
            tls: KafkaTlsConfig::default(),
            sasl: KafkaSaslConfig::default(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9310".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGINT/SIGTERM: how long to wait for in-flight deliveries.
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period_ms: 10_000,
        }
    }
}

const COMPRESSIONS: [&str; 4] = ["none", "gzip", "snappy", "lz4"];

impl GatewayConfig {
    /// Loads the file (if any) and `GATEWAY__*` variables, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg: GatewayConfig = load(path, "GATEWAY", &["mqtt.topics"])?;
        cfg.credentials_from_env(&|k| std::env::var(k).ok());
        checked(cfg, path, Self::validate, Self::resolve_files)
    }

    /// Checks values without I/O.
    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(invalid(origin, key, why));
        if self.mqtt.enabled {
            let url = parse_mqtt_url(&self.mqtt.url).map_err(|e| invalid(origin, "mqtt.url", e))?;
            self.mqtt
                .tls
                .validate("mqtt.tls")
                .map_err(|e| at(origin, e))?;
            if self.mqtt.tls.is_set() && !url.tls {
                return bad("mqtt.tls", "[mqtt.tls] is set but mqtt.url is not mqtts://");
            }
            if self.mqtt.password.is_some() && self.mqtt.password_file.is_some() {
                return bad(
                    "mqtt.password_file",
                    "set mqtt.password or mqtt.password_file, not both",
                );
            }
            if self.mqtt.client_id.is_empty() {
                return bad(
                    "mqtt.client_id",
                    "must not be empty (a fixed id keeps the session)",
                );
            }
            if self.mqtt.topics.is_empty() {
                return bad("mqtt.topics", "needs at least one topic filter");
            }
            for t in &self.mqtt.topics {
                if t.starts_with("$share/") {
                    return Err(invalid(
                        origin,
                        "mqtt.topics",
                        format!("{t:?}: give the plain filter and set mqtt.shared_group instead"),
                    ));
                }
                if t.is_empty() || t.split('/').any(|s| s.contains(['+', '#']) && s.len() > 1) {
                    return Err(invalid(
                        origin,
                        "mqtt.topics",
                        format!("{t:?} is not a valid topic filter"),
                    ));
                }
            }
            if (self.mqtt.password.is_some() || self.mqtt.password_file.is_some())
                && self.mqtt.username.is_none()
            {
                return bad("mqtt.password", "set mqtt.username too");
            }
            if let Some(g) = &self.mqtt.shared_group {
                if g.is_empty() || g.contains(['/', '+', '#']) {
                    return bad(
                        "mqtt.shared_group",
                        "must be a non-empty name without '/', '+' or '#'",
                    );
                }
            }
            if self.mqtt.receive_maximum == 0 {
                return bad("mqtt.receive_maximum", "must be at least 1");
            }
            if self.mqtt.max_packet_bytes < self.validation.max_payload_bytes {
                return bad(
                    "mqtt.max_packet_bytes",
                    "must be at least validation.max_payload_bytes",
                );
            }
            if self.mqtt.reconnect_min_ms == 0
                || self.mqtt.reconnect_max_ms < self.mqtt.reconnect_min_ms
            {
                return bad(
                    "mqtt.reconnect_max_ms",
                    "needs 0 < reconnect_min_ms <= reconnect_max_ms",
                );
            }
        }
        if self.tracking.max_devices == 0 {
            return bad("tracking.max_devices", "must be at least 1");
        }
        if !self.mqtt.enabled && self.simulate.devices == 0 {
            return bad(
                "simulate.devices",
                "no source: enable mqtt or simulate at least one device",
            );
        }
        if self.simulate.devices > 0 {
            if !(self.simulate.rate_per_device > 0.0 && self.simulate.rate_per_device.is_finite()) {
                return bad("simulate.rate_per_device", "must be a positive number");
            }
            if !(0.0..=1.0).contains(&self.simulate.faults) {
                return bad("simulate.faults", "must be between 0.0 and 1.0");
            }
            if self.simulate.time_scale.is_nan() || self.simulate.time_scale <= 0.0 {
                return bad("simulate.time_scale", "must be positive");
            }
        }
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            return bad("kafka.bootstrap_servers", "must not be empty");
        }
        if k.topic.is_empty() {
            return bad("kafka.topic", "must not be empty");
        }
        if k.dlq_enabled && (k.dlq_topic.is_empty() || k.dlq_topic == k.topic) {
            return bad("kafka.dlq_topic", "must be set and differ from kafka.topic");
        }
        if k.max_in_flight == 0 {
            return bad("kafka.max_in_flight", "must be at least 1");
        }
        validate_kafka_security(origin, k.security())?;
        if !COMPRESSIONS.contains(&k.compression.as_str()) {
            return Err(invalid(
                origin,
                "kafka.compression",
                format!(
                    "{:?} is not one of {}",
                    k.compression,
                    COMPRESSIONS.join(", ")
                ),
            ));
        }
        if k.partitions < 1 || k.replication_factor < 1 {
            return bad(
                "kafka.partitions",
                "partitions and replication_factor must be >= 1",
            );
        }
        let sp = &self.spool;
        if sp.enabled {
            if sp.dir.as_os_str().is_empty() {
                return bad("spool.dir", "must not be empty");
            }
            if sp.segment_bytes < 4096 {
                return bad("spool.segment_bytes", "must be at least 4096");
            }
            if sp.max_bytes < 2 * sp.segment_bytes {
                return bad(
                    "spool.max_bytes",
                    "must be at least 2 x spool.segment_bytes",
                );
            }
            if sp.fsync == FsyncMode::Interval && sp.fsync_interval_ms == 0 {
                return bad("spool.fsync_interval_ms", "must be at least 1");
            }
        }
        let m = &self.mqtt;
        at_most(
            origin,
            &[
                (
                    "mqtt.keep_alive_secs",
                    m.keep_alive_secs,
                    u64::from(u16::MAX),
                ),
                // MQTT's own limit on a packet.
                (
                    "mqtt.max_packet_bytes",
                    m.max_packet_bytes as u64,
                    268_435_455,
                ),
                ("mqtt.reconnect_max_ms", m.reconnect_max_ms, 3_600_000),
                ("mqtt.batch_linger_ms", m.batch_linger_ms, 1_000),
                ("spool.fsync_wait_ms", sp.fsync_wait_ms, 1_000),
                ("simulate.devices", self.simulate.devices as u64, 10_000_000),
                (
                    "tracking.max_devices",
                    self.tracking.max_devices as u64,
                    10_000_000,
                ),
                (
                    "kafka.dlq_max_payload_bytes",
                    k.dlq_max_payload_bytes as u64,
                    MAX_DLQ_PAYLOAD_BYTES,
                ),
                ("kafka.max_in_flight", k.max_in_flight as u64, 1_000_000),
                ("kafka.partitions", k.partitions as u64, 100_000),
                ("kafka.replication_factor", k.replication_factor as u64, 100),
                ("kafka.linger_ms", k.linger_ms, 60_000),
                ("kafka.message_timeout_ms", k.message_timeout_ms, 86_400_000),
                // Recovery reads a segment whole.
                ("spool.segment_bytes", sp.segment_bytes, 1 << 30),
                ("spool.fsync_interval_ms", sp.fsync_interval_ms, 60_000),
                (
                    "shutdown.grace_period_ms",
                    self.shutdown.grace_period_ms,
                    600_000,
                ),
            ],
        )?;
        if self.simulate.devices > 0 && self.simulate.rate_per_device > 100_000.0 {
            return bad("simulate.rate_per_device", "must be at most 100000");
        }
        validate_common(origin, &self.validation, &self.http.listen)
    }

    /// User names and passwords from the environment, verbatim (`0123` stays
    /// `0123`; the environment layer would have made it a number).
    pub fn credentials_from_env(&mut self, get: &dyn Fn(&str) -> Option<String>) {
        if let Some(v) = secret::raw_env("GATEWAY", "mqtt.username", get) {
            self.mqtt.username = Some(v);
        }
        if let Some(v) = secret::raw_env("GATEWAY", "mqtt.password", get) {
            self.mqtt.password = Some(Secret::new(v));
        }
        let k = &mut self.kafka;
        kafka_credentials_from_env("GATEWAY", &mut k.tls, &mut k.sasl, get);
    }

    /// Reads secret files into their values and checks that the PEM files
    /// can be read (I/O, after `validate`).
    pub fn resolve_files(&mut self, origin: &Path) -> Result<(), ConfigError> {
        let m = &mut self.mqtt;
        if m.enabled {
            secret::resolve(&mut m.password, &m.password_file, "mqtt.password")
                .and_then(|()| m.tls.check_files("mqtt.tls"))
                .map_err(|e| at(origin, e))?;
            // The files parse into a TLS setup (the same call the client makes).
            if parse_mqtt_url(&m.url).is_ok_and(|u| u.tls) {
                m.tls
                    .connector()
                    .map_err(|e| invalid(origin, "mqtt.tls", e))?;
            }
        }
        let k = &mut self.kafka;
        crate::security::kafka::resolve_files(&mut k.tls, &mut k.sasl, "kafka")
            .map_err(|e| at(origin, e))
    }

    /// The effective config as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        c.mqtt.url = redact_url(&c.mqtt.url).into_owned();
        mask_properties(&mut c.kafka.properties);
        toml_string(&c)
    }
}
