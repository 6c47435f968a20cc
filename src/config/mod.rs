//! Typed configuration: a TOML file layered with environment overrides
//! (`GATEWAY__SECTION__KEY`, `AGGREGATOR__SECTION__KEY`), then validated without
//! I/O. Unknown keys are errors, and every error names the key and the file.
//!
//! This module loads and reports errors; each service's sections are in
//! `config/gateway.rs` and `config/aggregator.rs`, the masked printout
//! (`check-config`) in `config/print.rs`. MQTT URLs are parsed with the MQTT code ([`crate::mqtt`]).

mod aggregator;
mod gateway;
mod print;
#[cfg(test)]
mod tests;

pub use self::aggregator::*;
pub use self::gateway::*;
pub use self::print::mask_properties;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::reading::Limits;
use crate::security::kafka::{KafkaSaslConfig, KafkaSecurity, KafkaTlsConfig};
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
        let file = config::File::from(p).format(config::FileFormat::Toml);
        plain_keys(&file, prefix, "").map_err(err)?;
        builder = builder.add_source(file);
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
    plain_keys(
        &env,
        prefix,
        &format!(" (from a {prefix}__* environment variable)"),
    )
    .map_err(err)?;
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
    let file = config::File::from_str(text, config::FileFormat::Toml);
    plain_keys(&file, "GATEWAY", "").map_err(err)?;
    config::Config::builder()
        .add_source(file)
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .map_err(|e| err(describe_config_error(&e, "GATEWAY")))
}

/// The config crate reads each top-level key of a source as a path, where
/// `a[N]` is an array index: a key such as `'x[-3331133113]'` (found by the
/// fuzzer) made it allocate hundreds of GiB and abort. No key of ours has a
/// bracket, so such a key is refused before the crate sees it.
fn plain_keys(source: &dyn config::Source, prefix: &str, from: &str) -> Result<(), String> {
    let keys = source
        .collect()
        .map_err(|e| describe_config_error(&e, prefix))?;
    match keys.keys().find(|k| k.contains(['[', ']'])) {
        Some(k) => Err(format!(
            "{k:?}{from} is not a configuration key (no key has '[' or ']')"
        )),
        None => Ok(()),
    }
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

/// `security()` of a `[kafka]` section: the four connection keys the
/// gateway's producer and the aggregator's consumer both have.
macro_rules! kafka_security {
    ($($section:ty),*) => {$(
        impl $section {
            pub fn security(&self) -> KafkaSecurity<'_> {
                KafkaSecurity::of(&self.security_protocol, &self.tls, &self.sasl, &self.properties)
            }
        }
    )*};
}
kafka_security!(KafkaConfig, ConsumerConfig);

/// The end of both services' `load`: validate, then read the files the
/// config names, with errors naming `path` (or the built-in defaults).
fn checked<T>(
    mut cfg: T,
    path: Option<&Path>,
    validate: impl Fn(&T, &Path) -> Result<(), ConfigError>,
    resolve_files: impl Fn(&mut T, &Path) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let origin = path.unwrap_or(Path::new("built-in defaults"));
    validate(&cfg, origin)?;
    resolve_files(&mut cfg, origin)?;
    Ok(cfg)
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

/// Path given on the command line, or the default file when it exists.
pub fn resolve_path(given: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    given.or_else(|| {
        let p = PathBuf::from(default);
        p.exists().then_some(p)
    })
}
