//! Scenario files, flags and defaults merged into validated [`Settings`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use iot_gateway::fleet::{Fault, FleetSpec, Style};
use iot_gateway::mqtt::parse_mqtt_url;
use serde::Deserialize;

use crate::auth;
use crate::cli::Cli;

/// A scenario file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    /// Free text shown in the summary.
    description: Option<String>,
    broker: Option<String>,
    devices: Option<usize>,
    rate: Option<toml_rate::Rate>,
    duration: Option<String>,
    count: Option<u64>,
    qos: Option<u8>,
    mqtt_version: Option<String>,
    style: Option<Style>,
    faults: Option<f64>,
    fault_kinds: Option<Vec<String>>,
    seed: Option<u64>,
    connections: Option<usize>,
    time_scale: Option<f64>,
    jitter: Option<f64>,
    topic_prefix: Option<String>,
    /// TLS and login (same names as the flags, with _ for -).
    ca_file: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    device_certs: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    device_passwords: Option<PathBuf>,
}

pub(crate) mod toml_rate {
    /// `rate = 2.5` or `rate = "max"`.
    #[derive(Debug, serde::Deserialize)]
    #[serde(untagged)]
    pub(crate) enum Rate {
        Number(f64),
        Text(String),
    }
}

/// Settings after merging scenario, flags and defaults, validated.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) description: Option<String>,
    pub(crate) broker: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) spec: FleetSpec,
    /// Per device, per second; `None` = max.
    pub(crate) rate: Option<f64>,
    pub(crate) duration: Option<Duration>,
    pub(crate) count: Option<u64>,
    pub(crate) qos: u8,
    pub(crate) v5: bool,
    pub(crate) connections: usize,
    pub(crate) jitter: f64,
    pub(crate) topic_prefix: String,
    pub(crate) auth: auth::Auth,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a duration like 30s, 5m, 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (ms, s, m, h)"),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("{s:?} must be a positive duration");
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) fn parse_rate(s: &str) -> Result<Option<f64>> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(None);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Some(r)),
        _ => bail!("rate {s:?} must be a positive number (per device per second) or `max`"),
    }
}

pub(crate) fn parse_fault(s: &str) -> Result<Fault> {
    Fault::ALL
        .iter()
        .copied()
        .find(|f| f.name() == s.trim())
        .ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            anyhow!("unknown fault kind {s:?} (one of: {})", names.join(", "))
        })
}

pub(crate) fn load_scenario(path: &Path) -> Result<Scenario> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading scenario {}", path.display()))?;
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<Scenario>())
        .map_err(|e| anyhow!("scenario {}: {e}", path.display()))
}

pub(crate) fn settings(cli: Cli) -> Result<Settings> {
    let sc = match &cli.scenario {
        Some(p) => load_scenario(p)?,
        None => Scenario::default(),
    };
    let origin = |key: &str| -> String {
        match &cli.scenario {
            Some(p) => format!("--{} / `{key}` in {}", key.replace('_', "-"), p.display()),
            None => format!("--{}", key.replace('_', "-")),
        }
    };
    let broker = cli
        .broker
        .or(sc.broker)
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let url = parse_mqtt_url(&broker).map_err(|e| anyhow!("{}: {e}", origin("broker")))?;
    let (host, port) = (url.host, url.port);
    let sc_auth = auth::AuthArgs {
        ca_file: sc.ca_file,
        cert: sc.cert,
        key: sc.key,
        device_certs: sc.device_certs,
        username: sc.username,
        password_file: sc.password_file,
        device_passwords: sc.device_passwords,
    };
    let auth = auth::Auth::from_args(cli.auth.or(sc_auth), url.tls)?;
    let devices = cli.devices.or(sc.devices).unwrap_or(10);
    if devices == 0 || devices > 1_000_000 {
        bail!(
            "{}: {devices} devices is not between 1 and 1,000,000",
            origin("devices")
        );
    }
    let rate = match (cli.rate, sc.rate) {
        (Some(r), _) => parse_rate(&r),
        (None, Some(toml_rate::Rate::Number(r))) => parse_rate(&r.to_string()),
        (None, Some(toml_rate::Rate::Text(t))) => parse_rate(&t),
        (None, None) => Ok(Some(1.0)),
    }
    .map_err(|e| anyhow!("{}: {e}", origin("rate")))?;
    let duration = cli
        .duration
        .or(sc.duration)
        .map(|d| parse_duration(&d))
        .transpose()
        .map_err(|e| anyhow!("{}: {e}", origin("duration")))?;
    let count = cli.count.or(sc.count);
    if count == Some(0) {
        bail!("{}: must be at least 1", origin("count"));
    }
    let qos = cli.qos.or(sc.qos).unwrap_or(1);
    if qos > 1 {
        bail!("{}: QoS {qos} is not supported (0 or 1)", origin("qos"));
    }
    let v5 = match cli.mqtt_version.or(sc.mqtt_version).as_deref() {
        None | Some("3.1.1") | Some("311") => false,
        Some("5") => true,
        Some(v) => bail!("{}: {v:?} is not 3.1.1 or 5", origin("mqtt_version")),
    };
    let faults = cli.faults.or(sc.faults).unwrap_or(0.0);
    if !(0.0..=1.0).contains(&faults) {
        bail!("{}: {faults} is not between 0 and 1", origin("faults"));
    }
    let fault_kinds = cli
        .fault_kinds
        .or(sc.fault_kinds)
        .unwrap_or_default()
        .iter()
        .map(|k| parse_fault(k))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| anyhow!("{}: {e}", origin("fault_kinds")))?;
    let connections = match cli.connections.or(sc.connections) {
        // Per-device credentials: the broker must see each device as itself.
        Some(n) if auth.per_device() && n != devices => bail!(
            "{}: per-device credentials need one connection per device ({devices})",
            origin("connections")
        ),
        _ if auth.per_device() => devices,
        n => n.unwrap_or(1),
    };
    if connections == 0 || connections > devices {
        bail!(
            "{}: {connections} must be between 1 and the number of devices ({devices})",
            origin("connections")
        );
    }
    let time_scale = cli.time_scale.or(sc.time_scale).unwrap_or(1.0);
    if !(time_scale > 0.0 && time_scale.is_finite()) {
        bail!("{}: must be positive", origin("time_scale"));
    }
    let jitter = cli.jitter.or(sc.jitter).unwrap_or(0.1);
    if !(0.0..1.0).contains(&jitter) {
        bail!("{}: {jitter} is not in [0, 1)", origin("jitter"));
    }
    let topic_prefix = cli
        .topic_prefix
        .or(sc.topic_prefix)
        .unwrap_or_else(|| "sensors".into());
    if topic_prefix.is_empty() || topic_prefix.contains(['+', '#']) {
        bail!(
            "{}: {topic_prefix:?} is not a valid topic prefix",
            origin("topic_prefix")
        );
    }
    Ok(Settings {
        description: sc.description,
        broker,
        host,
        port,
        spec: FleetSpec {
            devices,
            seed: cli.seed.or(sc.seed).unwrap_or(1),
            style: cli.style.or(sc.style).unwrap_or_default(),
            fault_rate: faults,
            fault_kinds,
            time_scale,
            ..FleetSpec::default()
        },
        rate,
        duration,
        count,
        qos,
        v5,
        connections,
        jitter,
        topic_prefix,
        auth,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("simulator").chain(args.iter().copied()))
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m").ok(), Some(Duration::from_secs(300)));
        assert_eq!(
            parse_duration("250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert_eq!(parse_rate("max").ok(), Some(None));
        assert_eq!(parse_rate("2.5").ok(), Some(Some(2.5)));
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn impossible_values_are_explained() {
        let e = settings(cli(&["--devices", "0"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--devices"), "{e}");
        let e = settings(cli(&["--devices", "5", "--connections", "6"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--connections"), "{e}");
        let e = settings(cli(&["--qos", "2"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("QoS 2"), "{e}");
        let e = settings(cli(&["--fault-kinds", "gremlins"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("gremlins"), "{e}");
    }

    #[test]
    fn scenario_files_parse_and_flags_override() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for f in ["office.toml", "greenhouse.toml", "stress.toml"] {
            let p = dir.join(f);
            let s = settings(cli(&["--scenario", p.to_str().unwrap_or_default()]));
            assert!(s.is_ok(), "{f}: {:?}", s.err());
        }
        let p = dir.join("greenhouse.toml");
        let s = settings(cli(&[
            "--scenario",
            p.to_str().unwrap_or_default(),
            "--devices",
            "3",
            "--connections",
            "1",
        ]));
        assert_eq!(s.ok().map(|s| s.spec.devices), Some(3));
    }

    #[test]
    fn bad_scenario_names_the_key() {
        let p = std::env::temp_dir().join(format!("bad-scenario-{}.toml", std::process::id()));
        let _ = std::fs::write(&p, "devices = 3\nratee = 2\n");
        let e = settings(cli(&["--scenario", p.to_str().unwrap_or_default()]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let _ = std::fs::remove_file(&p);
        assert!(e.contains("ratee") && e.contains("bad-scenario"), "{e}");
    }
}
