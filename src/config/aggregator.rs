//! The aggregator's configuration (`configs/aggregator.toml`, `AGGREGATOR__...`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::print::{mask_properties, toml_string};
use super::{
    at, at_most, checked, invalid, kafka_credentials_from_env, load, validate_common,
    validate_kafka_security, ClockConfig, ConfigError, LogConfig,
};
use crate::reading::Limits;
use crate::security::kafka::{KafkaSaslConfig, KafkaTlsConfig};

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
    /// plaintext (default), ssl, sasl_ssl or sasl_plaintext.
    pub security_protocol: String,
    pub tls: KafkaTlsConfig,
    pub sasl: KafkaSaslConfig,
    /// Any librdkafka consumer property, passed through as is.
    pub properties: BTreeMap<String, String>,
    pub topic: String,
    pub group_id: String,
    /// Where a group without committed offsets starts: earliest or latest.
    pub auto_offset_reset: String,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            security_protocol: "plaintext".into(),
            tls: KafkaTlsConfig::default(),
            sasl: KafkaSaslConfig::default(),
            properties: BTreeMap::new(),
            topic: "weather".into(),
            group_id: "weather-aggregator".into(),
            auto_offset_reset: "earliest".into(),
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
        checked(cfg, path, Self::validate, Self::resolve_files)
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
