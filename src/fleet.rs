//! The sensor fleet generator, shared by the `simulator` binary (over MQTT) and
//! the gateway's simulated source (in process): one generator, two users.
//!
//! Deterministic: the same seed gives the same sequence of payloads. Signals are
//! a per-device baseline, a diurnal cycle (time compressible), noise and slow
//! drift, with humidity moving against temperature.
//!
//! Over 500 lines: the generator, its faults, pacing and manifest are one model that the simulator
//! and the gateway's simulated source share.

use std::collections::BTreeMap;
use std::f64::consts::TAU;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// SplitMix64: tiny, fast and stable across versions (unlike a library RNG whose
/// stream may change), which `--seed` reproducibility relies on.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
    }
}

/// Payload style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// Numbers, `device_id`, `ts` (RFC 3339) and `seq`.
    #[default]
    Canonical,
    /// Numeric strings, only temperature and humidity (as simple Python producers send).
    Minimal,
}

impl std::str::FromStr for Style {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "canonical" => Ok(Style::Canonical),
            "minimal" => Ok(Style::Minimal),
            other => Err(format!("unknown style {other:?} (canonical, minimal)")),
        }
    }
}

/// Kinds of injected faults. The first five make payloads the gateway rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    MalformedJson,
    OutOfRange,
    MissingField,
    WrongType,
    Oversized,
    /// The previous valid payload sent again, verbatim.
    Duplicate,
    /// A valid reading whose `ts` is earlier than the previous one's.
    OutOfOrderTs,
    /// Several readings at once.
    Burst,
    /// The device goes silent for a while.
    Offline,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::MalformedJson,
        Fault::OutOfRange,
        Fault::MissingField,
        Fault::WrongType,
        Fault::Oversized,
        Fault::Duplicate,
        Fault::OutOfOrderTs,
        Fault::Burst,
        Fault::Offline,
    ];

    /// True for faults whose payload the gateway must reject.
    pub fn is_invalid(self) -> bool {
        matches!(
            self,
            Fault::MalformedJson
                | Fault::OutOfRange
                | Fault::MissingField
                | Fault::WrongType
                | Fault::Oversized
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::MalformedJson => "malformed_json",
            Fault::OutOfRange => "out_of_range",
            Fault::MissingField => "missing_field",
            Fault::WrongType => "wrong_type",
            Fault::Oversized => "oversized",
            Fault::Duplicate => "duplicate",
            Fault::OutOfOrderTs => "out_of_order_ts",
            Fault::Burst => "burst",
            Fault::Offline => "offline",
        }
    }
}

/// Fleet parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    pub devices: usize,
    pub seed: u64,
    pub style: Style,
    /// Share of ticks that inject a fault (0.0..=1.0).
    pub fault_rate: f64,
    /// Fault kinds to mix (uniformly); empty means all.
    pub fault_kinds: Vec<Fault>,
    /// Simulated seconds per real second (1440 = one simulated day per minute).
    pub time_scale: f64,
    /// Device ids are `<prefix><n:04>`, starting at 1.
    pub id_prefix: String,
    /// Size of oversized payloads, bytes.
    pub oversized_bytes: usize,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            devices: 10,
            seed: 1,
            style: Style::Canonical,
            fault_rate: 0.0,
            fault_kinds: Vec::new(),
            time_scale: 1.0,
            id_prefix: "sensor-".into(),
            oversized_bytes: 8192,
        }
    }
}

#[derive(Debug, Clone)]
struct Device {
    id: String,
    base_temp: f64,
    base_hum: f64,
    amplitude: f64,
    /// Deg C per simulated hour.
    drift: f64,
    phase: f64,
    seq: u64,
    last_ts_ms: i64,
    last_valid: Option<Vec<u8>>,
    /// Remaining ticks of silence.
    offline_ticks: u32,
    /// Extra readings still to send in the current burst.
    burst_left: u32,
}

/// What one call of [`Fleet::tick`] produced for a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub payload: Vec<u8>,
    /// `Some(seq)` for a valid reading (carrying `seq` in canonical style).
    pub seq: Option<u64>,
    /// The fault this payload carries, if any.
    pub fault: Option<Fault>,
}

/// Per-device record of exactly what was generated (the manifest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceTally {
    /// Distinct valid readings (the gateway accepts each).
    pub valid: u64,
    /// First and last `seq` of the valid readings (they are consecutive).
    pub seq_first: Option<u64>,
    pub seq_last: Option<u64>,
    /// Count per fault kind (duplicates are extra copies of a valid payload).
    pub faults: BTreeMap<String, u64>,
}

impl DeviceTally {
    fn record(&mut self, e: &Emitted) {
        if let Some(f) = e.fault {
            *self.faults.entry(f.name().to_string()).or_default() += 1;
        }
        if let (Some(seq), false) = (e.seq, e.fault == Some(Fault::Duplicate)) {
            self.valid += 1;
            self.seq_first.get_or_insert(seq);
            self.seq_last = Some(seq);
        }
    }
}

/// A simulated fleet.
#[derive(Debug, Clone)]
pub struct Fleet {
    spec: FleetSpec,
    devices: Vec<Device>,
    rng: Rng,
    /// Real time of the first tick, for time compression.
    start_ms: Option<i64>,
}

impl Fleet {
    pub fn new(spec: FleetSpec) -> Self {
        let mut rng = Rng::new(spec.seed);
        let devices = (1..=spec.devices)
            .map(|n| Device {
                id: format!("{}{n:04}", spec.id_prefix),
                base_temp: rng.range(15.0, 28.0),
                base_hum: rng.range(35.0, 65.0),
                amplitude: rng.range(1.5, 6.0),
                drift: rng.range(-0.05, 0.05),
                phase: rng.range(0.0, TAU),
                seq: 0,
                last_ts_ms: 0,
                last_valid: None,
                offline_ticks: 0,
                burst_left: 0,
            })
            .collect();
        Fleet {
            spec,
            devices,
            rng,
            start_ms: None,
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn device_id(&self, index: usize) -> &str {
        &self.devices[index].id
    }

    /// One scheduled tick of device `index` at real time `now_ms`: usually one
    /// payload; none while offline; several in a burst or with a duplicate.
    pub fn tick(&mut self, index: usize, now_ms: i64, out: &mut Vec<Emitted>) {
        let start = *self.start_ms.get_or_insert(now_ms);
        if self.devices[index].offline_ticks > 0 {
            self.devices[index].offline_ticks -= 1;
            return;
        }
        let fault = if self.spec.fault_rate > 0.0 && self.rng.next_f64() < self.spec.fault_rate {
            let kinds: &[Fault] = if self.spec.fault_kinds.is_empty() {
                &Fault::ALL
            } else {
                &self.spec.fault_kinds
            };
            Some(kinds[self.rng.below(kinds.len() as u64) as usize])
        } else {
            None
        };
        let sim_ms = start + ((now_ms - start) as f64 * self.spec.time_scale) as i64;
        match fault {
            None => out.push(self.valid(index, now_ms, sim_ms, None)),
            Some(Fault::Burst) => {
                self.devices[index].burst_left = 2 + self.rng.below(4) as u32;
                let mut first = self.valid(index, now_ms, sim_ms, None);
                first.fault = Some(Fault::Burst);
                out.push(first);
                while self.devices[index].burst_left > 0 {
                    self.devices[index].burst_left -= 1;
                    out.push(self.valid(index, now_ms, sim_ms, None));
                }
            }
            Some(Fault::Offline) => {
                self.devices[index].offline_ticks = 3 + self.rng.below(10) as u32;
                // The announcement of going offline is itself silent: record it
                // as an empty emission so the manifest can count periods.
                out.push(Emitted {
                    payload: Vec::new(),
                    seq: None,
                    fault: Some(Fault::Offline),
                });
            }
            Some(Fault::Duplicate) => match self.devices[index].last_valid.clone() {
                Some(prev) => {
                    let seq = self.devices[index].seq;
                    out.push(Emitted {
                        payload: prev,
                        seq: Some(seq),
                        fault: Some(Fault::Duplicate),
                    })
                }
                None => out.push(self.valid(index, now_ms, sim_ms, None)),
            },
            // Out of order needs an earlier reading to be out of order with.
            Some(Fault::OutOfOrderTs)
                if self.spec.style == Style::Canonical && self.devices[index].last_ts_ms > 0 =>
            {
                out.push(self.valid(index, now_ms, sim_ms, Some(Fault::OutOfOrderTs)))
            }
            Some(Fault::OutOfOrderTs) => out.push(self.valid(index, now_ms, sim_ms, None)),
            Some(kind) => out.push(self.invalid(index, now_ms, sim_ms, kind)),
        }
    }

    fn signal(&mut self, index: usize, sim_ms: i64) -> (f64, f64) {
        let d = &self.devices[index];
        let day_frac = (sim_ms.rem_euclid(86_400_000)) as f64 / 86_400_000.0;
        let hours = sim_ms as f64 / 3_600_000.0;
        let (base_temp, base_hum, amp, phase, drift) =
            (d.base_temp, d.base_hum, d.amplitude, d.phase, d.drift);
        let diurnal = (TAU * day_frac + phase).sin();
        let drift_c = (drift * (hours % 240.0)).clamp(-5.0, 5.0);
        let temp = base_temp + amp * diurnal + drift_c + 0.15 * self.rng.normal();
        let hum = base_hum - 2.5 * amp * diurnal + 0.8 * self.rng.normal();
        (
            (temp * 100.0).round() / 100.0,
            (hum.clamp(0.0, 100.0) * 10.0).round() / 10.0,
        )
    }

    fn valid(&mut self, index: usize, now_ms: i64, sim_ms: i64, fault: Option<Fault>) -> Emitted {
        let (t, h) = self.signal(index, sim_ms);
        let style = self.spec.style;
        let d = &mut self.devices[index];
        d.seq += 1;
        let mut ts = now_ms.max(d.last_ts_ms);
        if fault == Some(Fault::OutOfOrderTs) {
            ts = d.last_ts_ms.max(now_ms) - 30_000;
        } else {
            d.last_ts_ms = ts;
        }
        let mut s = String::with_capacity(128);
        match style {
            Style::Canonical => {
                let _ = write!(
                    s,
                    "{{\"device_id\":\"{}\",\"temperature\":{t},\"humidity\":{h},\"seq\":{},\"ts\":\"{}\"}}",
                    d.id,
                    d.seq,
                    crate::reading::format_ts(ts)
                );
            }
            Style::Minimal => {
                let _ = write!(s, "{{\"temperature\": \"{t}\", \"humidity\": \"{h}\"}}");
            }
        }
        let payload = s.into_bytes();
        d.last_valid = Some(payload.clone());
        Emitted {
            payload,
            seq: Some(d.seq),
            fault,
        }
    }

    fn invalid(&mut self, index: usize, _now_ms: i64, sim_ms: i64, kind: Fault) -> Emitted {
        let (t, h) = self.signal(index, sim_ms);
        let id = &self.devices[index].id;
        let payload = match kind {
            Fault::MalformedJson => {
                format!("{{\"device_id\":\"{id}\",\"temperature\":{t},\"humidity\":")
            }
            Fault::OutOfRange => {
                if self.rng.below(2) == 0 {
                    format!("{{\"temperature\":{},\"humidity\":{h}}}", 150.0 + t)
                } else {
                    format!("{{\"temperature\":{t},\"humidity\":{}}}", 120.0 + h)
                }
            }
            Fault::MissingField => format!("{{\"temperature\":{t}}}"),
            Fault::WrongType => format!("{{\"temperature\":\"warm\",\"humidity\":{h}}}"),
            _ => {
                let pad = self.spec.oversized_bytes.saturating_sub(60);
                format!(
                    "{{\"temperature\":{t},\"humidity\":{h},\"pad\":\"{}\"}}",
                    "x".repeat(pad)
                )
            }
        };
        Emitted {
            payload: payload.into_bytes(),
            seq: None,
            fault: Some(kind),
        }
    }
}

/// Paces a steady rate without a timer per event: asks how many events are due
/// since the start (tokio timers tick at ~1 ms, far too coarse for 100k/s).
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Events per second; `None` = as fast as possible.
    rate: Option<f64>,
    start: std::time::Instant,
    done: u64,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Self {
        Pacer {
            rate,
            start: std::time::Instant::now(),
            done: 0,
        }
    }

    /// Events due now (at most `max`); call [`Pacer::sent`] for those emitted.
    pub fn due(&self, max: u64) -> u64 {
        match self.rate {
            None => max,
            Some(r) => {
                let target = (self.start.elapsed().as_secs_f64() * r) as u64;
                target.saturating_sub(self.done).min(max)
            }
        }
    }

    pub fn sent(&mut self, n: u64) {
        self.done += n;
    }

    /// How long until the next event is due.
    pub fn wait(&self) -> std::time::Duration {
        match self.rate {
            None => std::time::Duration::ZERO,
            Some(r) => {
                let next = (self.done + 1) as f64 / r;
                std::time::Duration::from_secs_f64(
                    (next - self.start.elapsed().as_secs_f64()).max(0.0),
                )
            }
        }
    }
}

/// Exactly what was generated, per device, for end-to-end checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub seed: u64,
    pub style: Style,
    pub devices: BTreeMap<String, DeviceTally>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Distinct valid readings.
    pub valid: u64,
    /// Payloads the gateway must reject.
    pub invalid: u64,
    /// Extra copies of valid payloads.
    pub duplicates: u64,
    /// Payloads handed to the transport (valid + invalid + duplicates).
    pub payloads: u64,
    pub faults: BTreeMap<String, u64>,
}

impl Manifest {
    pub fn new(spec: &FleetSpec) -> Self {
        Manifest {
            seed: spec.seed,
            style: spec.style,
            ..Manifest::default()
        }
    }

    /// Records one emission of `device` that was actually sent.
    pub fn record(&mut self, device: &str, e: &Emitted) {
        let tally = self.devices.entry(device.to_string()).or_default();
        tally.record(e);
        if let Some(f) = e.fault {
            *self.totals.faults.entry(f.name().to_string()).or_default() += 1;
        }
        if e.payload.is_empty() {
            return; // offline marker, nothing was sent
        }
        self.totals.payloads += 1;
        match e.fault {
            Some(Fault::Duplicate) => self.totals.duplicates += 1,
            Some(f) if f.is_invalid() => self.totals.invalid += 1,
            _ => self.totals.valid += 1,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::reading::{parse, Limits};

    fn run(spec: FleetSpec, ticks: usize) -> Vec<(String, Emitted)> {
        let mut fleet = Fleet::new(spec);
        let mut out = Vec::new();
        let mut all = Vec::new();
        for t in 0..ticks {
            for d in 0..fleet.len() {
                out.clear();
                fleet.tick(d, 1_767_225_600_000 + t as i64 * 1000, &mut out);
                for e in out.drain(..) {
                    all.push((fleet.device_id(d).to_string(), e));
                }
            }
        }
        all
    }

    #[test]
    fn same_seed_same_payloads() {
        let spec = FleetSpec {
            devices: 5,
            seed: 42,
            fault_rate: 0.3,
            ..FleetSpec::default()
        };
        let a = run(spec.clone(), 50);
        let b = run(spec.clone(), 50);
        assert_eq!(a, b);
        let c = run(FleetSpec { seed: 43, ..spec }, 50);
        assert_ne!(a, c);
    }

    #[test]
    fn valid_payloads_pass_validation_and_faults_are_rejected() {
        for style in [Style::Canonical, Style::Minimal] {
            let spec = FleetSpec {
                devices: 20,
                seed: 7,
                style,
                fault_rate: 0.5,
                ..FleetSpec::default()
            };
            let now = 1_767_225_600_000;
            let mut manifest = Manifest::new(&spec);
            let mut kinds = std::collections::BTreeSet::new();
            for (dev, e) in run(spec, 100) {
                manifest.record(&dev, &e);
                if e.payload.is_empty() {
                    continue;
                }
                let r = parse(&e.payload, Some(&dev), now + 100_000, &Limits::default());
                match e.fault {
                    Some(f) if f.is_invalid() => {
                        kinds.insert(f);
                        assert!(
                            r.is_err(),
                            "{f:?} accepted: {}",
                            String::from_utf8_lossy(&e.payload)
                        )
                    }
                    _ => {
                        let r = r.unwrap();
                        if style == Style::Canonical {
                            assert_eq!(r.seq, e.seq);
                        }
                    }
                }
            }
            assert_eq!(kinds.len(), 5, "every invalid kind was generated");
            for tally in manifest.devices.values() {
                if let (Some(a), Some(b)) = (tally.seq_first, tally.seq_last) {
                    assert_eq!(b - a + 1, tally.valid, "seq range is contiguous");
                }
            }
            let t = &manifest.totals;
            assert_eq!(t.payloads, t.valid + t.invalid + t.duplicates);
        }
    }

    #[test]
    fn signals_are_plausible() {
        let spec = FleetSpec {
            devices: 3,
            time_scale: 1440.0,
            ..FleetSpec::default()
        };
        for (_, e) in run(spec, 120) {
            let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
            let t = v["temperature"].as_f64().unwrap();
            let h = v["humidity"].as_f64().unwrap();
            assert!((0.0..45.0).contains(&t), "{t}");
            assert!((0.0..=100.0).contains(&h), "{h}");
        }
    }
}
