//! The command line (clap); `--help` is its doc comments.

use std::path::PathBuf;

use clap::Parser;

use iot_gateway::fleet::Style;

use crate::auth;

#[derive(Parser, Debug, Default)]
#[command(
    name = "simulator",
    version = iot_gateway::VERSION,
    about = "Simulates temperature/humidity sensors publishing over MQTT, with faults.",
    after_help = "Flags override the values of --scenario. Example:\n  simulator --broker mqtt://127.0.0.1:1883 --devices 100 --rate 1 --duration 30s --faults 0.02"
)]
pub(crate) struct Cli {
    /// Scenario file (TOML, keys as the long flags with _ for -); flags override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) scenario: Option<PathBuf>,
    /// MQTT broker URL. [default: mqtt://127.0.0.1:1883]
    #[arg(long, value_name = "URL")]
    pub(crate) broker: Option<String>,
    /// Number of devices (ids sensor-0001, sensor-0002, ...). [default: 10]
    #[arg(long, value_name = "N")]
    pub(crate) devices: Option<usize>,
    /// Readings per second per device, or `max` (as fast as the broker accepts). [default: 1]
    #[arg(long, value_name = "R|max")]
    pub(crate) rate: Option<String>,
    /// How long to run, e.g. 30s, 5m, 1h (default: until Ctrl-C, unless --count).
    #[arg(long, value_name = "DURATION")]
    pub(crate) duration: Option<String>,
    /// Readings (ticks) per device, then stop.
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,
    /// MQTT QoS: 0 or 1. [default: 1]
    #[arg(long, value_name = "0|1")]
    pub(crate) qos: Option<u8>,
    /// MQTT protocol version: 3.1.1 or 5. [default: 3.1.1]
    #[arg(long, value_name = "VERSION")]
    pub(crate) mqtt_version: Option<String>,
    /// Payload style: canonical (numbers, device_id, ts, seq) or minimal (numeric strings). [default: canonical]
    #[arg(long, value_name = "STYLE")]
    pub(crate) style: Option<Style>,
    /// Share of ticks that inject a fault, 0.0..1.0 (mixed kinds). [default: 0]
    #[arg(long, value_name = "RATE")]
    pub(crate) faults: Option<f64>,
    /// Fault kinds to mix, comma separated (default: all): malformed_json, out_of_range,
    /// missing_field, wrong_type, oversized, duplicate, out_of_order_ts, burst, offline.
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    pub(crate) fault_kinds: Option<Vec<String>>,
    /// Seed: the same seed gives the same payloads. [default: 1]
    #[arg(long, value_name = "N")]
    pub(crate) seed: Option<u64>,
    /// MQTT connections, from 1 (shared) up to one per device. [default: 1]
    #[arg(long, value_name = "N")]
    pub(crate) connections: Option<usize>,
    /// Simulated seconds per real second (1440 = one day per minute). [default: 1]
    #[arg(long, value_name = "X")]
    pub(crate) time_scale: Option<f64>,
    /// Random variation of each device's interval, 0.0..1.0. [default: 0.1]
    #[arg(long, value_name = "J")]
    pub(crate) jitter: Option<f64>,
    /// Topics are <prefix>/<device>/telemetry. [default: sensors]
    #[arg(long, value_name = "PREFIX")]
    pub(crate) topic_prefix: Option<String>,
    /// Write JSON of exactly what was sent to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) manifest: Option<PathBuf>,
    /// No progress line or summary (errors still go to stderr).
    #[arg(long)]
    pub(crate) quiet: bool,
    #[command(flatten)]
    pub(crate) auth: auth::AuthArgs,
}
