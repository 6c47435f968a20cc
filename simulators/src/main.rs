//! `simulator`: drives a realistic sensor fleet over MQTT, with faults, a progress
//! line and an exact manifest of what was sent. The generator is the library's
//! `fleet` module, the same one the gateway's simulated source uses.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod auth;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use iot_gateway::config::parse_mqtt_url;
use iot_gateway::fleet::{Emitted, Fault, Fleet, FleetSpec, Manifest, Rng, Style};
use serde::Deserialize;

#[derive(Parser, Debug, Default)]
#[command(
    name = "simulator",
    version = iot_gateway::VERSION,
    about = "Simulates temperature/humidity sensors publishing over MQTT, with faults.",
    after_help = "Flags override the values of --scenario. Example:\n  simulator --broker mqtt://127.0.0.1:1883 --devices 100 --rate 1 --duration 30s --faults 0.02"
)]
struct Cli {
    /// Scenario file (TOML, keys as the long flags with _ for -); flags override it.
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// MQTT broker URL. [default: mqtt://127.0.0.1:1883]
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Number of devices (ids sensor-0001, sensor-0002, ...). [default: 10]
    #[arg(long, value_name = "N")]
    devices: Option<usize>,
    /// Readings per second per device, or `max` (as fast as the broker accepts). [default: 1]
    #[arg(long, value_name = "R|max")]
    rate: Option<String>,
    /// How long to run, e.g. 30s, 5m, 1h (default: until Ctrl-C, unless --count).
    #[arg(long, value_name = "DURATION")]
    duration: Option<String>,
    /// Readings (ticks) per device, then stop.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// MQTT QoS: 0 or 1. [default: 1]
    #[arg(long, value_name = "0|1")]
    qos: Option<u8>,
    /// MQTT protocol version: 3.1.1 or 5. [default: 3.1.1]
    #[arg(long, value_name = "VERSION")]
    mqtt_version: Option<String>,
    /// Payload style: canonical (numbers, device_id, ts, seq) or minimal (numeric strings). [default: canonical]
    #[arg(long, value_name = "STYLE")]
    style: Option<Style>,
    /// Share of ticks that inject a fault, 0.0..1.0 (mixed kinds). [default: 0]
    #[arg(long, value_name = "RATE")]
    faults: Option<f64>,
    /// Fault kinds to mix, comma separated (default: all): malformed_json, out_of_range,
    /// missing_field, wrong_type, oversized, duplicate, out_of_order_ts, burst, offline.
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    fault_kinds: Option<Vec<String>>,
    /// Seed: the same seed gives the same payloads. [default: 1]
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// MQTT connections, from 1 (shared) up to one per device. [default: 1]
    #[arg(long, value_name = "N")]
    connections: Option<usize>,
    /// Simulated seconds per real second (1440 = one day per minute). [default: 1]
    #[arg(long, value_name = "X")]
    time_scale: Option<f64>,
    /// Random variation of each device's interval, 0.0..1.0. [default: 0.1]
    #[arg(long, value_name = "J")]
    jitter: Option<f64>,
    /// Topics are <prefix>/<device>/telemetry. [default: sensors]
    #[arg(long, value_name = "PREFIX")]
    topic_prefix: Option<String>,
    /// Write JSON of exactly what was sent to FILE.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// No progress line or summary (errors still go to stderr).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    auth: auth::AuthArgs,
}

/// A scenario file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
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

mod toml_rate {
    /// `rate = 2.5` or `rate = "max"`.
    #[derive(Debug, serde::Deserialize)]
    #[serde(untagged)]
    pub enum Rate {
        Number(f64),
        Text(String),
    }
}

/// Settings after merging scenario, flags and defaults, validated.
#[derive(Debug, Clone)]
struct Settings {
    description: Option<String>,
    broker: String,
    host: String,
    port: u16,
    spec: FleetSpec,
    /// Per device, per second; `None` = max.
    rate: Option<f64>,
    duration: Option<Duration>,
    count: Option<u64>,
    qos: u8,
    v5: bool,
    connections: usize,
    jitter: f64,
    topic_prefix: String,
    auth: auth::Auth,
}

fn parse_duration(s: &str) -> Result<Duration> {
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

fn parse_rate(s: &str) -> Result<Option<f64>> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(None);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Some(r)),
        _ => bail!("rate {s:?} must be a positive number (per device per second) or `max`"),
    }
}

fn parse_fault(s: &str) -> Result<Fault> {
    Fault::ALL
        .iter()
        .copied()
        .find(|f| f.name() == s.trim())
        .ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            anyhow!("unknown fault kind {s:?} (one of: {})", names.join(", "))
        })
}

fn load_scenario(path: &Path) -> Result<Scenario> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading scenario {}", path.display()))?;
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<Scenario>())
        .map_err(|e| anyhow!("scenario {}: {e}", path.display()))
}

fn settings(cli: Cli) -> Result<Settings> {
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

/// Counters shared with the progress line.
#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    /// MQTT 5 PUBACKs with a failure reason (e.g. NotAuthorized by an ACL).
    refused: AtomicU64,
    faults: AtomicU64,
}

/// One MQTT connection: a client and its event-loop task.
enum Conn {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Conn {
    async fn publish(&self, topic: String, qos: u8, payload: Vec<u8>) -> Result<()> {
        match self {
            Conn::V4(c) => {
                let q = if qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.publish(topic, q, false, payload)
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))
            }
            Conn::V5(c) => {
                let q = if qos == 0 {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                };
                c.publish(topic, q, false, payload)
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))
            }
        }
    }

    async fn disconnect(&self) {
        let _ = match self {
            Conn::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Conn::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// What the simulator cares about from either protocol's event loop.
enum Ev {
    ConnAck,
    PubAck,
    /// MQTT 5 only: the broker refused the publish (reason code).
    Refused(String),
    Disconnecting,
    Other,
}

enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Loop {
    async fn poll(&mut self) -> Result<Ev, String> {
        use rumqttc::Outgoing;
        match self {
            Loop::V4(el) => {
                use rumqttc::{Event, Packet};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => Ev::ConnAck,
                    Event::Incoming(Packet::PubAck(_)) => Ev::PubAck,
                    Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnecting,
                    _ => Ev::Other,
                })
            }
            Loop::V5(el) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                use rumqttc::v5::Event;
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => Ev::ConnAck,
                    Event::Incoming(Packet::PubAck(a)) => match a.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ev::PubAck,
                        r => Ev::Refused(format!("{r:?}")),
                    },
                    Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnecting,
                    _ => Ev::Other,
                })
            }
        }
    }
}

/// Connects one client; returns once the broker accepted it (or fails clearly).
async fn connect(
    s: &Settings,
    index: usize,
    device: &str,
    stats: Arc<Stats>,
) -> Result<(Conn, tokio::task::JoinHandle<()>)> {
    let id = format!("sim-{}-{}-{index}", std::process::id(), s.spec.seed);
    let (transport, login) = s.auth.for_connection(device)?;
    let (conn, mut el) = if s.v5 {
        let mut o = rumqttc::v5::MqttOptions::new(id, &s.host, s.port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(4 << 20))
            .set_transport(transport);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (c, el) = rumqttc::v5::AsyncClient::new(o, 10_000);
        (Conn::V5(c), Loop::V5(Box::new(el)))
    } else {
        let mut o = rumqttc::MqttOptions::new(id, &s.host, s.port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_inflight(1000)
            .set_transport(transport);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (c, el) = rumqttc::AsyncClient::new(o, 10_000);
        (Conn::V4(c), Loop::V4(Box::new(el)))
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let mut ready_tx = Some(ready_tx);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Ev::ConnAck) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(Ok(()));
                    }
                }
                Ok(Ev::PubAck) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ev::Refused(reason)) => {
                    if stats.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("simulator: connection {index}: the broker refused a publish: {reason} (check its ACL)");
                    }
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ev::Disconnecting) => break,
                Ok(Ev::Other) => {}
                Err(e) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(Err(e));
                        break;
                    }
                    eprintln!("simulator: connection {index}: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
        Ok(Ok(Ok(()))) => Ok((conn, task)),
        Ok(Ok(Err(e))) => match iot_gateway::security::mqtt::classify(&e) {
            Some(kind) => bail!(
                "{}",
                iot_gateway::security::mqtt::describe(
                    kind,
                    &s.broker,
                    s.auth.user_for(device).as_deref(),
                    &e
                )
            ),
            None => bail!(
                "cannot connect to the MQTT broker at {}: {e}{}\n(is it running? for the local stack: scripts/stack up)",
                s.broker,
                iot_gateway::security::mqtt::plaintext_hint(&s.broker, &e)
            ),
        },
        _ => bail!("no answer from the MQTT broker at {} within 10 s", s.broker),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn run(s: Settings, quiet: bool, manifest_path: Option<PathBuf>) -> Result<bool> {
    let stats = Arc::new(Stats::default());
    let mut conns = Vec::with_capacity(s.connections);
    let mut tasks = Vec::with_capacity(s.connections);
    let mut fleet = Fleet::new(s.spec.clone());
    for i in 0..s.connections {
        let (c, t) = connect(&s, i, fleet.device_id(i), stats.clone()).await?;
        conns.push(c);
        tasks.push(t);
    }
    let mut manifest = Manifest::new(&s.spec);
    let topics: Vec<String> = (0..fleet.len())
        .map(|d| format!("{}/{}/telemetry", s.topic_prefix, fleet.device_id(d)))
        .collect();
    if !quiet {
        eprintln!(
            "simulator: {} devices -> {} ({} connection(s), QoS {}, MQTT {}, {} style, rate {}, faults {})",
            s.spec.devices,
            s.broker,
            s.connections,
            s.qos,
            if s.v5 { "5" } else { "3.1.1" },
            if s.spec.style == Style::Canonical { "canonical" } else { "minimal" },
            s.rate.map_or("max".to_string(), |r| format!("{r}/s per device")),
            s.spec.fault_rate,
        );
        if let Some(d) = &s.description {
            eprintln!("scenario: {d}");
        }
    }

    let stop = iot_gateway::shutdown::on_signals();
    let started = Instant::now();
    let progress = (!quiet).then(|| tokio::spawn(progress_loop(stats.clone(), started)));
    let deadline = s.duration.map(|d| started + d);
    let mut ticks = vec![0u64; fleet.len()];
    let mut out: Vec<Emitted> = Vec::new();
    let mut jitter_rng = Rng::new(s.spec.seed ^ 0xA5A5);
    // Scheduling: a heap of (due, device) for paced runs; round-robin at max rate.
    let interval = s.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut heap: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    if let Some(iv) = interval {
        for d in 0..fleet.len() {
            // Spread the first readings over one interval.
            heap.push(Reverse((
                started + iv.mul_f64(d as f64 / fleet.len() as f64),
                d,
            )));
        }
    }
    let mut rr = 0usize;
    let mut active = fleet.len();
    'run: while active > 0 {
        if stop.is_cancelled() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let device = match interval {
            None => {
                // Max rate: next device that still has readings to send.
                let mut tries = 0;
                while s.count.is_some_and(|c| ticks[rr] >= c) {
                    rr = (rr + 1) % fleet.len();
                    tries += 1;
                    if tries > fleet.len() {
                        break 'run;
                    }
                }
                let d = rr;
                rr = (rr + 1) % fleet.len();
                d
            }
            Some(iv) => {
                let Some(Reverse((due, d))) = heap.pop() else {
                    break;
                };
                let now = Instant::now();
                if due > now {
                    let wait = tokio::time::sleep(due - now);
                    tokio::select! {
                        _ = wait => {}
                        _ = stop.cancelled() => break 'run,
                    }
                }
                let j = 1.0 + s.jitter * (2.0 * jitter_rng.next_f64() - 1.0);
                if s.count.is_none_or(|c| ticks[d] + 1 < c) {
                    heap.push(Reverse((due + iv.mul_f64(j), d)));
                }
                d
            }
        };
        ticks[device] += 1;
        if s.count.is_some_and(|c| ticks[device] == c) {
            active -= 1;
        }
        out.clear();
        fleet.tick(device, now_ms(), &mut out);
        for e in out.drain(..) {
            manifest.record(fleet.device_id(device), &e);
            if e.fault.is_some() {
                stats.faults.fetch_add(1, Ordering::Relaxed);
            }
            if !e.payload.is_empty() {
                // A failed publish ends the run with an error and no manifest.
                let conn = &conns[device % conns.len()];
                conn.publish(topics[device].clone(), s.qos, e.payload)
                    .await?;
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    // QoS 1: wait (bounded) until the broker acknowledged everything sent.
    let sent = stats.sent.load(Ordering::Relaxed);
    let mut all_acked = true;
    if s.qos == 1 {
        let wait_until = Instant::now() + Duration::from_secs(30);
        while stats.acked.load(Ordering::Relaxed) < sent && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all_acked = stats.acked.load(Ordering::Relaxed) >= sent;
    } else {
        // QoS 0 has no acks: give the event loops a moment to write their buffers.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for c in &conns {
        c.disconnect().await;
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(path) = manifest_path {
        let json = serde_json::to_string_pretty(&manifest)?;
        std::fs::write(&path, json)
            .with_context(|| format!("writing manifest {}", path.display()))?;
    }
    if !quiet {
        let t = &manifest.totals;
        eprintln!(
            "done in {elapsed:.1}s: sent {sent} payloads ({:.0}/s): {} valid, {} invalid, {} duplicates; acked {}{}",
            sent as f64 / elapsed.max(1e-9),
            t.valid,
            t.invalid,
            t.duplicates,
            if s.qos == 1 { stats.acked.load(Ordering::Relaxed).to_string() } else { "n/a (QoS 0)".into() },
            if t.faults.is_empty() { String::new() } else { format!("; faults {:?}", t.faults) },
        );
    }
    let refused = stats.refused.load(Ordering::Relaxed);
    if refused > 0 {
        eprintln!("simulator: the broker refused {refused} of {sent} publishes (MQTT 5 reason codes; see above)");
    }
    if !all_acked {
        eprintln!(
            "simulator: only {} of {sent} QoS 1 publishes were acknowledged by the broker",
            stats.acked.load(Ordering::Relaxed)
        );
    }
    Ok(all_acked && refused == 0)
}

async fn progress_loop(stats: Arc<Stats>, started: Instant) {
    let mut last = (0u64, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let sent = stats.sent.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (sent - last.0) as f64 / (now - last.1).as_secs_f64();
        last = (sent, now);
        eprintln!(
            "[{:>6.1}s] rate {:>8.0}/s  sent {:>9}  acked {:>9}  faults {:>6}",
            started.elapsed().as_secs_f64(),
            rate,
            sent,
            stats.acked.load(Ordering::Relaxed),
            stats.faults.load(Ordering::Relaxed)
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = cli.quiet;
    let manifest = cli.manifest.clone();
    let s = match settings(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("simulator: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("simulator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(s, quiet, manifest)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("simulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
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
