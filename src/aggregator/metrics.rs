//! Aggregator metrics. Fleet-wide series live in a Prometheus registry with
//! cached handles; per-device series are written straight from the state at
//! scrape time (10,000 devices would be 100,000 registry series otherwise), at
//! most `metrics.max_devices` devices, the rest counted as not exported.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::state::State;
use crate::reading::Rejection;

/// Skip reasons besides the validation codes.
pub const EXTRA_SKIP_REASONS: [&str; 4] = ["empty", "bad_key", "replayed_offset", "duplicate_seq"];

#[derive(Clone)]
pub struct AggregatorMetrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    pub consume_errors: IntCounter,
    applied: IntCounter,
    late: IntCounter,
    future: IntCounter,
    /// 1 synchronised, 0 not, -1 unknown (trusted).
    pub clock_synchronized: IntGauge,
    evicted: IntCounter,
    skipped: HashMap<&'static str, IntCounter>,
    temperature: Histogram,
    humidity: Histogram,
    lag: IntGaugeVec,
    lag_partitions: std::sync::Arc<Mutex<Vec<i32>>>,
    pub assigned: IntGauge,
    pub rate: Gauge,
    /// TLS, login and ACL failures towards Kafka.
    pub security: crate::security::SecurityStatus,
}

impl std::fmt::Debug for AggregatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AggregatorMetrics")
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl AggregatorMetrics {
    // Metric definitions are static: a failure here is a programming error.
    pub fn new() -> Self {
        let r = Registry::new();
        let skipped_vec = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "aggregator_records_skipped_total",
                    "Records not applied, by reason (validation codes, empty, bad_key, replayed_offset, duplicate_seq).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let skipped = Rejection::CODES
            .iter()
            .chain(EXTRA_SKIP_REASONS.iter())
            .map(|c| (*c, skipped_vec.with_label_values(&[c])))
            .collect();
        let build = IntGauge::with_opts(
            Opts::new("aggregator_build_info", "Always 1; the version is a label.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("valid metric");
        build.set(1);
        reg(&r, build);
        let temp_buckets: Vec<f64> = (-8..=17).map(|i| f64::from(i) * 5.0).collect();
        let hum_buckets: Vec<f64> = (1..=10).map(|i| f64::from(i) * 10.0).collect();
        AggregatorMetrics {
            security: crate::security::SecurityStatus::new(&r, "aggregator"),
            consumed: reg(
                &r,
                IntCounter::new(
                    "aggregator_records_consumed_total",
                    "Records read from Kafka (applied or skipped).",
                )
                .expect("valid metric"),
            ),
            consume_errors: reg(
                &r,
                IntCounter::new(
                    "aggregator_consume_errors_total",
                    "Failed polls of Kafka (e.g. broker unreachable); retried.",
                )
                .expect("valid metric"),
            ),
            applied: reg(
                &r,
                IntCounter::new(
                    "aggregator_readings_applied_total",
                    "Readings applied to the aggregates.",
                )
                .expect("valid metric"),
            ),
            late: reg(
                &r,
                IntCounter::new(
                    "aggregator_readings_late_total",
                    "Applied readings whose window had already closed (kept out of windows).",
                )
                .expect("valid metric"),
            ),
            future: reg(
                &r,
                IntCounter::new(
                    "aggregator_readings_future_total",
                    "Applied readings whose ts was ahead of this synchronised clock by more than validation.max_future_secs: counted, but neither the device's last value nor in a window.",
                )
                .expect("valid metric"),
            ),
            clock_synchronized: reg(
                &r,
                IntGauge::new(
                    "aggregator_clock_synchronized",
                    "1 while the system clock is synchronised, 0 while it is not (then no ts is judged ahead of it), -1 when the status cannot be read (trusted).",
                )
                .expect("valid metric"),
            ),
            evicted: reg(
                &r,
                IntCounter::new(
                    "aggregator_devices_evicted_total",
                    "Devices forgotten because aggregation.max_devices was reached (least recently seen first).",
                )
                .expect("valid metric"),
            ),
            skipped,
            temperature: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "aggregator_temperature_celsius",
                        "Distribution of the fleet's temperature readings.",
                    )
                    .buckets(temp_buckets),
                )
                .expect("valid metric"),
            ),
            humidity: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "aggregator_humidity_percent",
                        "Distribution of the fleet's relative humidity readings.",
                    )
                    .buckets(hum_buckets),
                )
                .expect("valid metric"),
            ),
            lag: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "aggregator_consumer_lag_records",
                        "Records in the partition not yet consumed (high watermark - position).",
                    ),
                    &["partition"],
                )
                .expect("valid metric"),
            ),
            lag_partitions: Default::default(),
            assigned: reg(
                &r,
                IntGauge::new(
                    "aggregator_assigned_partitions",
                    "Partitions of the topic assigned to this instance.",
                )
                .expect("valid metric"),
            ),
            rate: reg(
                &r,
                Gauge::new(
                    "aggregator_readings_per_second",
                    "Readings applied per second over the last 5 s.",
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
    }

    pub fn applied(&self, temperature: f64, humidity: f64, late: bool) {
        self.applied.inc();
        if late {
            self.late.inc();
        }
        self.temperature.observe(temperature);
        self.humidity.observe(humidity);
    }

    /// Applied, with a `ts` ahead of our clock (not a last value, no window).
    pub fn applied_future(&self, temperature: f64, humidity: f64) {
        self.applied.inc();
        self.future.inc();
        self.temperature.observe(temperature);
        self.humidity.observe(humidity);
    }

    /// `evicted`: the state's total since the start; logged the first time.
    pub fn devices_evicted(&self, evicted: u64, max: usize) {
        let before = self.evicted.get();
        if evicted > before {
            if before == 0 {
                tracing::warn!(
                    max_devices = max,
                    "more devices than aggregation.max_devices: the least recently seen are forgotten from now on (aggregator_devices_evicted_total)"
                );
            }
            self.evicted.inc_by(evicted - before);
        }
    }

    pub fn applied_count(&self) -> u64 {
        self.applied.get()
    }

    pub fn skipped(&self, reason: &str) {
        if let Some(c) = self.skipped.get(reason) {
            c.inc();
        }
    }

    /// Replaces the lag series (partitions no longer assigned disappear).
    pub fn set_lags(&self, lags: &[(i32, i64)]) {
        let mut known = crate::sync::lock(&self.lag_partitions);
        for p in known.iter() {
            if !lags.iter().any(|(q, _)| q == p) {
                let _ = self.lag.remove_label_values(&[&p.to_string()]);
            }
        }
        known.clear();
        for (p, lag) in lags {
            self.lag.with_label_values(&[&p.to_string()]).set(*lag);
            known.push(*p);
        }
    }
}

impl Default for AggregatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What /metrics needs of one device, copied out under the state lock.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub id: String,
    pub temperature: f64,
    pub humidity: f64,
    pub dew_point: f64,
    pub last_seen_s: f64,
    pub count: u64,
    pub online: bool,
    /// (min, max, mean) of the last closed window: temperature, humidity.
    pub window: Option<([f64; 3], [f64; 3])>,
}

/// A copy of the state for one scrape: the lock is held only while copying,
/// not while formatting (the consumer keeps applying meanwhile).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub seen: usize,
    pub online: usize,
    /// The exported devices, sorted by id.
    pub rows: Vec<DeviceRow>,
}

pub fn snapshot(state: &State, max_devices: usize, now_ms: i64) -> Snapshot {
    let sorted = state.sorted();
    let rows = sorted
        .iter()
        .take(max_devices)
        .map(|(id, d)| DeviceRow {
            id: (*id).to_string(),
            temperature: d.temperature,
            humidity: d.humidity,
            dew_point: d.dew_point(),
            last_seen_s: d.last_ts_ms as f64 / 1000.0,
            count: d.count,
            online: state.is_online(d, now_ms),
            window: d.last_closed().map(|w| {
                let (t, h) = (&w.temperature, &w.humidity);
                ([t.min, t.max, t.mean], [h.min, h.max, h.mean])
            }),
        })
        .collect();
    Snapshot {
        seen: sorted.len(),
        online: state.online(now_ms),
        rows,
    }
}

/// Fleet gauges and per-device series, in Prometheus text format.
pub fn render_devices(snap: &Snapshot, out: &mut String) {
    let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        out,
        "aggregator_devices_seen",
        "Devices with state on this instance.",
        snap.seen,
    );
    gauge(
        out,
        "aggregator_devices_online",
        "Devices heard from within aggregation.offline_after_secs.",
        snap.online,
    );
    gauge(
        out,
        "aggregator_devices_offline",
        "Devices silent for longer than aggregation.offline_after_secs.",
        snap.seen - snap.online,
    );
    gauge(
        out,
        "aggregator_devices_not_exported",
        "Devices left out of the per-device series by metrics.max_devices.",
        snap.seen - snap.rows.len(),
    );
    type Series<'a> = (&'a str, &'a str, &'a str, fn(&DeviceRow) -> f64);
    let series: [Series<'_>; 6] = [
        (
            "aggregator_device_temperature_celsius",
            "gauge",
            "Last temperature of the device.",
            |d| d.temperature,
        ),
        (
            "aggregator_device_humidity_percent",
            "gauge",
            "Last relative humidity of the device.",
            |d| d.humidity,
        ),
        (
            "aggregator_device_dew_point_celsius",
            "gauge",
            "Dew point from the last temperature and humidity (Magnus formula).",
            |d| d.dew_point,
        ),
        (
            "aggregator_device_last_seen_timestamp_seconds",
            "gauge",
            "Event time of the device's newest reading.",
            |d| d.last_seen_s,
        ),
        (
            "aggregator_device_readings_total",
            "counter",
            "Readings applied for the device by this instance.",
            |d| d.count as f64,
        ),
        (
            "aggregator_device_online",
            "gauge",
            "1 if the device was heard from within aggregation.offline_after_secs.",
            |d| if d.online { 1.0 } else { 0.0 },
        ),
    ];
    for (name, kind, help, f) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in &snap.rows {
            let _ = writeln!(out, "{name}{{device=\"{}\"}} {}", d.id, f(d));
        }
    }
    for (name, help, temperature) in [
        (
            "aggregator_device_window_temperature_celsius",
            "Temperature min/max/mean of the device's last closed window.",
            true,
        ),
        (
            "aggregator_device_window_humidity_percent",
            "Humidity min/max/mean of the device's last closed window.",
            false,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for d in &snap.rows {
            if let Some((t, h)) = &d.window {
                let v = if temperature { t } else { h };
                for (stat, x) in ["min", "max", "mean"].iter().zip(v) {
                    let _ = writeln!(out, "{name}{{device=\"{}\",stat=\"{stat}\"}} {x}", d.id);
                }
            }
        }
    }
}
