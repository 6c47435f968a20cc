//! Typed configuration: a TOML file layered with environment overrides
//! (`GATEWAY__SECTION__KEY`, `AGGREGATOR__SECTION__KEY`), then validated without
//! I/O. Unknown keys are errors, and every error names the key and the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::reading::Limits;
use crate::security::kafka::{KafkaSaslConfig, KafkaSecurity, KafkaTlsConfig};
use crate::security::mqtt::MqttTlsConfig;
use crate::security::{secret, Secret};

/// A configuration problem, naming the file (or environment) and the key.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    /// The file, or "environment".
    pub origin: String,
    pub message: String,
}

/// Loads `path` (optional when `None`) plus environment variables with `prefix`
/// (`PREFIX__SECTION__KEY`), and deserializes into `T`.
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    prefix: &str,
    list_keys: &[&str],
) -> Result<T, ConfigError> {
    let origin = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in defaults".into());
    let err = |message: String| ConfigError {
        origin: origin.clone(),
        message,
    };
    let mut builder = config::Config::builder();
    if let Some(p) = path {
        if !p.exists() {
            return Err(err("file not found".into()));
        }
        builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
    }
    let mut env = config::Environment::with_prefix(prefix)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true);
    if !list_keys.is_empty() {
        env = env.list_separator(",");
        for k in list_keys {
            env = env.with_list_parse_key(k);
        }
    }
    let cfg = builder
        .add_source(env)
        .build()
        .map_err(|e| err(describe_config_error(&e, prefix)))?;
    cfg.try_deserialize::<T>()
        .map_err(|e| err(describe_config_error(&e, prefix)))
}

/// TOML text deserialized into `T` the way [`load`] does it, without the file
/// and the environment (the fuzz target of the config loader).
#[doc(hidden)]
pub fn from_toml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let err = |message: String| ConfigError {
        origin: origin.to_string(),
        message,
    };
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .map_err(|e| err(describe_config_error(&e, "GATEWAY")))
}

fn describe_config_error(e: &config::ConfigError, prefix: &str) -> String {
    let text = e.to_string();
    // The config crate reports unknown keys without saying that an environment
    // variable may be the culprit; say where else to look.
    if text.contains("unknown field") {
        format!("{text} (check the file and any {prefix}__* environment variables)")
    } else {
        text
    }
}

/// `kafka.sasl.username`, `kafka.sasl.password`, `kafka.tls.key_password`
/// from the environment, verbatim.
fn kafka_credentials_from_env(
    prefix: &str,
    tls: &mut KafkaTlsConfig,
    sasl: &mut KafkaSaslConfig,
    get: &dyn Fn(&str) -> Option<String>,
) {
    if let Some(v) = secret::raw_env(prefix, "kafka.sasl.username", get) {
        sasl.username = Some(v);
    }
    if let Some(v) = secret::raw_env(prefix, "kafka.sasl.password", get) {
        sasl.password = Some(Secret::new(v));
    }
    if let Some(v) = secret::raw_env(prefix, "kafka.tls.key_password", get) {
        tls.key_password = Some(Secret::new(v));
    }
}

/// An error whose message already names the key.
fn at(origin: &Path, message: String) -> ConfigError {
    ConfigError {
        origin: origin.display().to_string(),
        message,
    }
}

/// A `[kafka]` section's security keys, errors named under `kafka.`.
fn validate_kafka_security(origin: &Path, s: KafkaSecurity<'_>) -> Result<(), ConfigError> {
    s.validate()
        .map_err(|(key, why)| invalid(origin, &format!("kafka.{key}"), why))
}

fn invalid(origin: &Path, key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        origin: origin.display().to_string(),
        message: format!("invalid value for `{key}`: {why}"),
    }
}

/// Where an MQTT URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://` (or `ssl://`): TLS.
    pub tls: bool,
}

/// `url` with any user info (`user:password@`) replaced by `***@`, for
/// messages and the printed config: a password in a URL is never shown.
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]).into(),
        None => url.into(),
    }
}

/// Parses `mqtt://host:port` (or `tcp://`, port 1883 by default) and
/// `mqtts://host:port` (or `ssl://`, port 8883 by default). User info in the
/// URL is refused (it would be logged with the URL): the credentials go in
/// `mqtt.username` and `mqtt.password` / `mqtt.password_file`.
pub fn parse_mqtt_url(raw: &str) -> Result<MqttUrl, String> {
    let shown = redact_url(raw);
    let url: &str = &shown;
    if url != raw {
        return Err(format!(
            "{url:?} has user info: set mqtt.username and mqtt.password (or mqtt.password_file) instead of putting them in the URL"
        ));
    }
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("tcp://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("ssl://") {
        (r, true)
    } else {
        return Err(format!(
            "{url:?} is not an mqtt://host:port or mqtts://host:port URL"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?} in {url:?} is not a number"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok(MqttUrl {
        host: host.trim_matches(['[', ']']).to_string(),
        port,
        tls,
    })
}

// ------------------------------------------------------------------ gateway

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

impl KafkaConfig {
    pub fn security(&self) -> KafkaSecurity<'_> {
        KafkaSecurity {
            protocol: &self.security_protocol,
            tls: &self.tls,
            sasl: &self.sasl,
            properties: &self.properties,
        }
    }
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
            linger_ms: 5,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `info,iot_gateway=debug`; RUST_LOG wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// `[clock]`: whether the clock is trusted to judge device timestamps (see
/// README "Clocks at the edge").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// `auto` (the kernel's status), `assume_synced` or `assume_unsynced`.
    pub sync: crate::clock::SyncMode,
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
        let origin = path.unwrap_or(Path::new("built-in defaults"));
        cfg.validate(origin)?;
        cfg.resolve_files(origin)?;
        Ok(cfg)
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

/// Upper bounds checked at load: `(key, value, max)`. They keep each value in
/// what the code, the memory budget and the peers (MQTT, Kafka) can hold; the
/// README lists them.
fn at_most(origin: &Path, checks: &[(&str, u64, u64)]) -> Result<(), ConfigError> {
    match checks.iter().find(|(_, v, max)| v > max) {
        Some((key, v, max)) => Err(invalid(
            origin,
            key,
            format!("{v} is above the maximum of {max}"),
        )),
        None => Ok(()),
    }
}

/// Largest dead-letter payload kept: with its headers it stays under Kafka's
/// default `message.max.bytes` (1,048,588) and far under the spool's 16 MiB
/// record cap (over which a rejected payload would be a fatal write error).
pub const MAX_DLQ_PAYLOAD_BYTES: u64 = 1_000_000;

/// Checks shared by both services: validation limits and the HTTP address.
fn validate_common(origin: &Path, v: &Limits, listen: &str) -> Result<(), ConfigError> {
    let below = |a: f64, b: f64| a.partial_cmp(&b) == Some(std::cmp::Ordering::Less);
    if !below(v.temperature_min, v.temperature_max) {
        return Err(invalid(
            origin,
            "validation.temperature_min",
            "must be below validation.temperature_max",
        ));
    }
    if !below(v.humidity_min, v.humidity_max) {
        return Err(invalid(
            origin,
            "validation.humidity_min",
            "must be below validation.humidity_max",
        ));
    }
    if v.max_payload_bytes == 0 {
        return Err(invalid(
            origin,
            "validation.max_payload_bytes",
            "must be positive",
        ));
    }
    const CENTURY_SECS: u64 = 100 * 366 * 24 * 3600;
    at_most(
        origin,
        &[
            (
                "validation.max_payload_bytes",
                v.max_payload_bytes as u64,
                1 << 20,
            ),
            (
                "validation.max_future_secs",
                v.max_future_secs,
                CENTURY_SECS,
            ),
            ("validation.max_past_secs", v.max_past_secs, CENTURY_SECS),
        ],
    )?;
    listen
        .parse::<std::net::SocketAddr>()
        .map_err(|e| invalid(origin, "http.listen", format!("{listen:?}: {e}")))?;
    Ok(())
}

/// Masks librdkafka properties that carry secrets (sasl.password, ssl.key.password, ...).
pub fn mask_properties(props: &mut BTreeMap<String, String>) {
    for (k, v) in props.iter_mut() {
        if k.contains("password") || k.contains("secret") || k.ends_with(".key.pem") {
            *v = "********".into();
        }
    }
}

fn toml_string<T: Serialize>(v: &T) -> String {
    // serde_json -> toml via config's own TOML writer is not available; a
    // hand-rolled writer over serde_json keeps dependencies down.
    let value = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
    let mut out = String::new();
    if let serde_json::Value::Object(map) = value {
        write_table(&mut out, "", &map);
    }
    out
}

fn write_table(out: &mut String, prefix: &str, map: &serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    for (k, v) in map {
        match v {
            Value::Object(_) | Value::Null => {}
            other => out.push_str(&format!("{} = {}\n", toml_key(k), toml_value(other))),
        }
    }
    for (k, v) in map {
        if let Value::Object(sub) = v {
            let name = if prefix.is_empty() {
                toml_key(k)
            } else {
                format!("{prefix}.{}", toml_key(k))
            };
            out.push_str(&format!("\n[{name}]\n"));
            write_table(out, &name, sub);
        }
    }
}

fn toml_key(k: &str) -> String {
    if k.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

fn toml_value(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Number(n) if n.is_f64() => {
            let s = n.to_string();
            if s.contains(['.', 'e', 'E']) {
                s
            } else {
                format!("{s}.0")
            }
        }
        other => other.to_string(),
    }
}

// ------------------------------------------------------------------ aggregator

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    pub kafka: ConsumerConfig,
    pub aggregation: crate::aggregator::state::AggregationConfig,
    /// Checks applied to consumed records (other producers' data too). Keys left
    /// out keep the aggregator's defaults (not the gateway's).
    #[serde(deserialize_with = "aggregator_limits")]
    pub validation: Limits,
    pub metrics: AggregatorMetricsConfig,
    pub http: AggregatorHttpConfig,
    pub log: LogConfig,
    pub clock: ClockConfig,
}

/// The aggregator's validation defaults: bigger payloads, no lower bound on
/// `ts` (replaying history is normal for a consumer).
fn aggregator_default_limits() -> Limits {
    Limits {
        max_payload_bytes: 65_536,
        max_past_secs: 100 * 365 * 24 * 3600,
        ..Limits::default()
    }
}

/// `[validation]` of the aggregator: given keys over the aggregator's defaults.
fn aggregator_limits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Given {
        temperature_min: Option<f64>,
        temperature_max: Option<f64>,
        humidity_min: Option<f64>,
        humidity_max: Option<f64>,
        max_payload_bytes: Option<usize>,
        max_future_secs: Option<u64>,
        max_past_secs: Option<u64>,
    }
    let g = Given::deserialize(d)?;
    let l = aggregator_default_limits();
    Ok(Limits {
        temperature_min: g.temperature_min.unwrap_or(l.temperature_min),
        temperature_max: g.temperature_max.unwrap_or(l.temperature_max),
        humidity_min: g.humidity_min.unwrap_or(l.humidity_min),
        humidity_max: g.humidity_max.unwrap_or(l.humidity_max),
        max_payload_bytes: g.max_payload_bytes.unwrap_or(l.max_payload_bytes),
        max_future_secs: g.max_future_secs.unwrap_or(l.max_future_secs),
        max_past_secs: g.max_past_secs.unwrap_or(l.max_past_secs),
    })
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            kafka: ConsumerConfig::default(),
            aggregation: Default::default(),
            validation: aggregator_default_limits(),
            metrics: AggregatorMetricsConfig::default(),
            http: AggregatorHttpConfig::default(),
            log: LogConfig::default(),
            clock: ClockConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    pub group_id: String,
    /// Where a group without committed offsets starts: earliest or latest.
    pub auto_offset_reset: String,
    /// plaintext (default), ssl, sasl_ssl or sasl_plaintext.
    pub security_protocol: String,
    pub tls: KafkaTlsConfig,
    pub sasl: KafkaSaslConfig,
    /// Any librdkafka consumer property, passed through as is.
    pub properties: BTreeMap<String, String>,
}

impl ConsumerConfig {
    pub fn security(&self) -> KafkaSecurity<'_> {
        KafkaSecurity {
            protocol: &self.security_protocol,
            tls: &self.tls,
            sasl: &self.sasl,
            properties: &self.properties,
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic: "weather".into(),
            group_id: "weather-aggregator".into(),
            auto_offset_reset: "earliest".into(),
            security_protocol: "plaintext".into(),
            tls: KafkaTlsConfig::default(),
            sasl: KafkaSaslConfig::default(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorMetricsConfig {
    /// Devices exported with a `device` label on /metrics (the first N by id);
    /// the rest are counted in aggregator_devices_not_exported.
    pub max_devices: usize,
}

impl Default for AggregatorMetricsConfig {
    fn default() -> Self {
        AggregatorMetricsConfig {
            max_devices: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorHttpConfig {
    /// /metrics, /healthz, /readyz and /api.
    pub listen: String,
}

impl Default for AggregatorHttpConfig {
    fn default() -> Self {
        AggregatorHttpConfig {
            listen: "127.0.0.1:9311".into(),
        }
    }
}

impl AggregatorConfig {
    /// Loads the file (if any) and `AGGREGATOR__*` variables, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg: AggregatorConfig = load(path, "AGGREGATOR", &[])?;
        let k = &mut cfg.kafka;
        kafka_credentials_from_env("AGGREGATOR", &mut k.tls, &mut k.sasl, &|k| {
            std::env::var(k).ok()
        });
        let origin = path.unwrap_or(Path::new("built-in defaults"));
        cfg.validate(origin)?;
        cfg.resolve_files(origin)?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(invalid(origin, key, why));
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            return bad("kafka.bootstrap_servers", "must not be empty");
        }
        if k.topic.is_empty() {
            return bad("kafka.topic", "must not be empty");
        }
        if k.group_id.is_empty() {
            return bad("kafka.group_id", "must not be empty");
        }
        if !["earliest", "latest"].contains(&k.auto_offset_reset.as_str()) {
            return bad("kafka.auto_offset_reset", "must be earliest or latest");
        }
        validate_kafka_security(origin, k.security())?;
        let a = &self.aggregation;
        if a.window_secs == 0 {
            return bad("aggregation.window_secs", "must be at least 1");
        }
        if a.max_devices == 0 {
            return bad("aggregation.max_devices", "must be at least 1");
        }
        if a.windows_kept == 0 {
            return bad("aggregation.windows_kept", "must be at least 1");
        }
        if a.offline_after_secs == 0 {
            return bad("aggregation.offline_after_secs", "must be at least 1");
        }
        const YEAR_SECS: u64 = 366 * 24 * 3600;
        at_most(
            origin,
            &[
                // Window arithmetic is in ms of i64: a week keeps it far from overflow.
                ("aggregation.window_secs", a.window_secs, 7 * 24 * 3600),
                (
                    "aggregation.allowed_lateness_secs",
                    a.allowed_lateness_secs,
                    7 * 24 * 3600,
                ),
                ("aggregation.windows_kept", a.windows_kept as u64, 10_000),
                (
                    "aggregation.offline_after_secs",
                    a.offline_after_secs,
                    YEAR_SECS,
                ),
                (
                    "aggregation.seq_replay_window",
                    a.seq_replay_window,
                    1 << 40,
                ),
                ("aggregation.max_devices", a.max_devices as u64, 10_000_000),
                (
                    "metrics.max_devices",
                    self.metrics.max_devices as u64,
                    1_000_000,
                ),
            ],
        )?;
        validate_common(origin, &self.validation, &self.http.listen)
    }

    /// Reads secret files and checks PEM files (I/O, after `validate`).
    pub fn resolve_files(&mut self, origin: &Path) -> Result<(), ConfigError> {
        let k = &mut self.kafka;
        crate::security::kafka::resolve_files(&mut k.tls, &mut k.sasl, "kafka")
            .map_err(|e| at(origin, e))
    }

    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        mask_properties(&mut c.kafka.properties);
        toml_string(&c)
    }
}

/// Path given on the command line, or the default file when it exists.
pub fn resolve_path(given: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    given.or_else(|| {
        let p = PathBuf::from(default);
        p.exists().then_some(p)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
        let f =
            file("[mqtt]\nurl = \"mqtts://b\"\n[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n");
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

    #[test]
    fn mqtt_urls() {
        let u = |h: &str, port, tls| MqttUrl {
            host: h.into(),
            port,
            tls,
        };
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(),
            u("127.0.0.1", 1884, false)
        );
        assert_eq!(
            parse_mqtt_url("tcp://broker").unwrap(),
            u("broker", 1883, false)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://broker").unwrap(),
            u("broker", 8883, true)
        );
        assert_eq!(
            parse_mqtt_url("ssl://127.0.0.1:8884/").unwrap(),
            u("127.0.0.1", 8884, true)
        );
        assert!(parse_mqtt_url("mqtt://h:x").is_err());
        assert!(parse_mqtt_url("h:1883").is_err());
        assert!(parse_mqtt_url("https://h").is_err());
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
}
