//! Gateway events: each method logs and counts together, so the log and the
//! metrics never drift. Metric handles are created once and cached (a labelled
//! lookup per reading costs far more than a cached handle).
//!
//! Over 500 lines: every gateway metric is declared here, so one file is checked against the
//! README's metrics table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tracing::{debug, error, info, warn};

use crate::reading::Rejection;

/// Reason codes used on the DLQ besides validation rejections.
pub const KAFKA_REJECTED: &str = "kafka_rejected";

/// What readiness is judged from, set by the part that knows it (the MQTT
/// source, the Kafka probe, the spool writer) through the calls below. The
/// gauges report the same; nothing reads a gauge back.
#[derive(Debug, Default)]
struct Health {
    mqtt_connected: AtomicBool,
    kafka_reachable: AtomicBool,
    spool_full: AtomicBool,
}

#[derive(Clone)]
pub struct GatewayMetrics {
    pub registry: Registry,
    health: Arc<Health>,
    received_mqtt: IntCounter,
    received_simulated: IntCounter,
    rejected: HashMap<&'static str, IntCounter>,
    delivered: IntCounter,
    dead_lettered: HashMap<&'static str, IntCounter>,
    dropped: IntCounter,
    delivery_retriable: IntCounter,
    delivery_permanent: IntCounter,
    pub in_flight: IntGauge,
    latency: Histogram,
    mqtt_connected: IntGauge,
    mqtt_reconnects: IntCounter,
    mqtt_acks: IntCounter,
    ack_latency: Histogram,
    seq_gaps: IntCounter,
    seq_repeats: IntCounter,
    devices_tracked: IntGauge,
    devices_evicted: IntCounter,
    pub kafka_queue_depth: IntGauge,
    kafka_reachable: IntGauge,
    pub kafka_brokers: IntGauge,
    pub kafka_under_replicated: IntGauge,
    ready: IntGauge,
    producer_recreated: IntCounter,
    /// 1 synchronised, 0 not, -1 unknown (trusted): see `clock`.
    pub clock_synchronized: IntGauge,
    clock_unsynced: IntCounter,
    ts_replaced: HashMap<&'static str, IntCounter>,
    spool: SpoolMetrics,
    /// TLS, login and ACL failures towards MQTT and Kafka.
    pub security: crate::security::SecurityStatus,
}

/// The spool's series (all `gateway_spool_*`).
#[derive(Clone)]
struct SpoolMetrics {
    bytes: IntGauge,
    segments: IntGauge,
    records: IntGauge,
    oldest_age: prometheus::Gauge,
    full: IntGauge,
    appended: IntCounter,
    appended_bytes: IntCounter,
    fsync: Histogram,
    dropped_full: IntCounter,
    dropped_corrupt: IntCounter,
    dropped_bytes: IntCounter,
    truncated_bytes: IntCounter,
    checkpoint_invalid: IntCounter,
    quarantined: IntCounter,
    duplicates: IntCounter,
    already_in_kafka: IntCounter,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayMetrics")
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn seconds_histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(crate::telemetry::LATENCY_BUCKETS.to_vec()),
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn labelled(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&'static str],
) -> HashMap<&'static str, IntCounter> {
    let vec = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("unique metric");
    values
        .iter()
        .map(|v| (*v, vec.with_label_values(&[v])))
        .collect()
}

/// Deliveries counted by one task and flushed once per wake-up: atomic adds
/// on counters shared with the scraper are most of a metric's cost when it
/// runs per reading.
#[derive(Debug)]
pub struct Deliveries {
    delivered: prometheus::local::LocalIntCounter,
    latency: prometheus::local::LocalHistogram,
}

impl Deliveries {
    pub fn delivered(&self, latency: Duration) {
        self.delivered.inc();
        self.latency.observe(latency.as_secs_f64());
    }

    pub fn flush(&self) {
        self.delivered.flush();
        self.latency.flush();
    }
}

impl GatewayMetrics {
    // Metric definitions are static: a failure here is a programming error.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let r = Registry::new();
        let received = IntCounterVec::new(
            Opts::new(
                "gateway_readings_received_total",
                "Payloads received, by source (mqtt, simulated).",
            ),
            &["source"],
        )
        .expect("valid metric");
        r.register(Box::new(received.clone()))
            .expect("unique metric");
        let dlq_reasons: Vec<&'static str> = Rejection::CODES
            .iter()
            .copied()
            .chain([KAFKA_REJECTED])
            .collect();
        let latency = seconds_histogram(
            &r,
            "gateway_delivery_latency_seconds",
            "Time from receiving a reading to Kafka acknowledging it.",
        );
        let errors = IntCounterVec::new(
            Opts::new(
                "gateway_delivery_errors_total",
                "Failed Kafka delivery attempts, by kind: retriable (sent again) or permanent (dead-lettered).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        r.register(Box::new(errors.clone())).expect("unique metric");
        let build = IntGauge::with_opts(
            Opts::new("gateway_build_info", "Always 1; the version is a label.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("valid metric");
        build.set(1);
        r.register(Box::new(build)).expect("unique metric");
        let fsync = seconds_histogram(
            &r,
            "gateway_spool_fsync_duration_seconds",
            "Time of one spool fdatasync (one per group of readings).",
        );
        let oldest_age = prometheus::Gauge::new(
            "gateway_spool_oldest_unsent_age_seconds",
            "Age of the oldest reading not yet acknowledged by Kafka (how far behind Kafka the edge is); 0 when none.",
        )
        .expect("valid metric");
        r.register(Box::new(oldest_age.clone()))
            .expect("unique metric");
        let spool_dropped = IntCounterVec::new(
            Opts::new(
                "gateway_spool_dropped_records_total",
                "Spooled readings lost before Kafka had them, by reason: full (on_full = drop_oldest) or corrupt (damaged on disk).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        r.register(Box::new(spool_dropped.clone()))
            .expect("unique metric");
        let spool = SpoolMetrics {
            bytes: gauge(&r, "gateway_spool_bytes", "Bytes of spool segment files on disk."),
            segments: gauge(&r, "gateway_spool_segments", "Spool segment files on disk."),
            records: gauge(
                &r,
                "gateway_spool_records",
                "Readings in the spool not yet acknowledged by Kafka.",
            ),
            oldest_age,
            full: gauge(
                &r,
                "gateway_spool_full",
                "1 while the spool is full and (on_full = block, or a full disk) readings are not acknowledged.",
            ),
            appended: counter(
                &r,
                "gateway_spool_appended_total",
                "Records (readings and dead letters) written to the spool.",
            ),
            appended_bytes: counter(
                &r,
                "gateway_spool_appended_bytes_total",
                "Bytes of records written to the spool (what the disk must take, before the file system's own writes).",
            ),
            fsync,
            dropped_full: spool_dropped.with_label_values(&["full"]),
            dropped_corrupt: spool_dropped.with_label_values(&["corrupt"]),
            dropped_bytes: counter(
                &r,
                "gateway_spool_dropped_bytes_total",
                "Bytes of spool segments deleted by on_full = drop_oldest.",
            ),
            truncated_bytes: counter(
                &r,
                "gateway_spool_recovery_truncated_bytes_total",
                "Bytes cut from damaged spool tails at start-up (torn writes).",
            ),
            checkpoint_invalid: counter(
                &r,
                "gateway_spool_recovery_checkpoint_invalid_total",
                "Start-ups that found the spool checkpoint unreadable or ahead of the data (everything unacknowledged is sent again).",
            ),
            quarantined: counter(
                &r,
                "gateway_spool_quarantined_segments_total",
                "Damaged spool segments moved (or copied before repair) to quarantine/.",
            ),
            duplicates: counter(
                &r,
                "gateway_spool_duplicates_skipped_total",
                "Readings not spooled again: same device, seq and ts as one spooled recently (MQTT redelivery, retained message).",
            ),
            already_in_kafka: counter(
                &r,
                "gateway_spool_already_in_kafka_total",
                "Spooled readings not sent again after a crash because Kafka already had them.",
            ),
        };
        GatewayMetrics {
            health: Arc::default(),
            security: crate::security::SecurityStatus::new(&r, "gateway"),
            producer_recreated: counter(
                &r,
                "gateway_kafka_producer_recreated_total",
                "Kafka producers replaced because they stopped working while Kafka answered a new client (or hit a fatal error); their unsettled records were sent again.",
            ),
            clock_synchronized: gauge(
                &r,
                "gateway_clock_synchronized",
                "1 while the system clock is synchronised (kernel adjtimex status, or [clock] sync), 0 while it is not (device timestamps are kept, records marked clock=unsynced), -1 when the status cannot be read (the clock is trusted).",
            ),
            clock_unsynced: counter(
                &r,
                "gateway_readings_clock_unsynced_total",
                "Readings received while the clock was not synchronised: their device ts was kept unjudged and the record has the header clock=unsynced.",
            ),
            ts_replaced: labelled(
                &r,
                "gateway_readings_ts_replaced_total",
                "Readings whose device ts was unusable (reason ts_in_future or ts_too_old against a synchronised clock, or outside 1970..9999): kept with the receive time, headers ts_replaced and device_ts.",
                "reason",
                &["ts_in_future", "ts_too_old"],
            ),
            spool,
            received_mqtt: received.with_label_values(&["mqtt"]),
            received_simulated: received.with_label_values(&["simulated"]),
            rejected: labelled(
                &r,
                "gateway_readings_rejected_total",
                "Payloads that failed validation, by reason code.",
                "reason",
                &Rejection::CODES,
            ),
            delivered: counter(
                &r,
                "gateway_readings_delivered_total",
                "Valid readings acknowledged by Kafka on the main topic.",
            ),
            dead_lettered: labelled(
                &r,
                "gateway_dlq_records_total",
                "Records acknowledged by Kafka on the dead-letter topic, by reason code.",
                "reason",
                &dlq_reasons,
            ),
            dropped: counter(
                &r,
                "gateway_readings_dropped_total",
                "Payloads given up on: rejected with the DLQ disabled, or a DLQ record Kafka refused for good.",
            ),
            delivery_retriable: errors.with_label_values(&["retriable"]),
            delivery_permanent: errors.with_label_values(&["permanent"]),
            in_flight: gauge(
                &r,
                "gateway_in_flight_readings",
                "Payloads accepted and not yet acknowledged by Kafka.",
            ),
            latency,
            mqtt_connected: gauge(&r, "gateway_mqtt_connected", "1 while connected to the MQTT broker and subscribed to every topic filter."),
            mqtt_reconnects: counter(
                &r,
                "gateway_mqtt_reconnects_total",
                "MQTT connections lost (each is followed by reconnect attempts).",
            ),
            mqtt_acks: counter(
                &r,
                "gateway_mqtt_acks_total",
                "PUBACKs sent: once the reading (or its DLQ record) is durable in the spool, or with the spool disabled, in Kafka.",
            ),
            ack_latency: seconds_histogram(
                &r,
                "gateway_mqtt_ack_latency_seconds",
                "Time from receiving an MQTT message to handing its PUBACK to the client (what the broker waits for).",
            ),
            seq_gaps: counter(
                &r,
                "gateway_sequence_gaps_total",
                "Readings missing according to per-device seq (lost before reaching the gateway).",
            ),
            seq_repeats: counter(
                &r,
                "gateway_sequence_repeats_total",
                "Readings whose seq was not newer than the device's last one (duplicates, redeliveries).",
            ),
            devices_tracked: gauge(
                &r,
                "gateway_devices_tracked",
                "Devices whose last seq is kept (at most tracking.max_devices).",
            ),
            devices_evicted: counter(
                &r,
                "gateway_devices_evicted_total",
                "Devices forgotten because tracking.max_devices was reached (least recently seen first); their next reading starts a new seq track.",
            ),
            kafka_queue_depth: gauge(
                &r,
                "gateway_kafka_queue_depth",
                "Messages in the Kafka producer queue (librdkafka), waiting for delivery.",
            ),
            kafka_reachable: gauge(
                &r,
                "gateway_kafka_reachable",
                "1 when the last Kafka metadata request succeeded.",
            ),
            kafka_brokers: gauge(
                &r,
                "gateway_kafka_brokers",
                "Brokers listed by the last Kafka metadata response (a cluster that lost one still answers).",
            ),
            kafka_under_replicated: gauge(
                &r,
                "gateway_kafka_under_replicated_partitions",
                "Partitions of our topics without a leader or with fewer in-sync replicas than replicas.",
            ),
            ready: gauge(
                &r,
                "gateway_ready",
                "1 when /readyz answers 200: Kafka reachable and, if MQTT is enabled, MQTT subscribed.",
            ),
            registry: r,
        }
    }

    /// What `/readyz` reports; also kept in `gateway_ready` for alerting.
    /// With the spool, ready means "accepting readings": an unreachable Kafka
    /// is a note (readings are spooled), not a reason.
    pub fn readiness(&self, mqtt_enabled: bool, durable: bool) -> Result<Vec<String>, Vec<String>> {
        let mut why = Vec::new();
        let mut notes = Vec::new();
        let kafka_problem = self.security.current("kafka");
        if !self.kafka_reachable() || kafka_problem.is_some() {
            let what = kafka_problem.unwrap_or_else(|| "unreachable".into());
            if durable {
                notes.push(format!("kafka: {what}; spooling to disk"));
            } else {
                why.push(format!("Kafka not reachable: {what}"));
            }
        }
        if mqtt_enabled && !self.health.mqtt_connected.load(Ordering::Relaxed) {
            match self.security.current("mqtt") {
                Some(e) => why.push(format!("MQTT not connected: {e}")),
                None => why.push("MQTT not connected".to_string()),
            }
        } else if let Some(e) = self.security.current("mqtt") {
            why.push(format!("mqtt: {e}"));
        }
        if self.health.spool_full.load(Ordering::Relaxed) {
            why.push("spool full: readings are not acknowledged".to_string());
        }
        if crate::clock::status() == crate::clock::Status::Unsynced {
            // Information, not a reason to be out of service.
            notes.push("clock: not synchronised; device timestamps are kept unjudged and records are marked clock=unsynced".to_string());
        }
        self.ready.set(i64::from(why.is_empty()));
        if why.is_empty() {
            Ok(notes)
        } else {
            Err(why)
        }
    }

    pub fn spool_recovered(&self, r: &super::spool::Recovery) {
        self.spool.truncated_bytes.inc_by(r.truncated_bytes);
        self.spool.dropped_corrupt.inc_by(r.corrupt_records);
        self.spool.quarantined.inc_by(r.quarantined_segments);
        if r.checkpoint_invalid {
            self.spool.checkpoint_invalid.inc();
        }
        if r.corrupt_records > 0 || r.quarantined_segments > 0 || r.checkpoint_invalid {
            error!(
                lost_records = r.corrupt_records,
                quarantined_segments = r.quarantined_segments,
                checkpoint_invalid = r.checkpoint_invalid,
                "the spool was damaged; recovered what could be read"
            );
        }
        if r.truncated_bytes > 0 {
            warn!(
                bytes = r.truncated_bytes,
                "spool tail truncated (an unfinished write before a crash)"
            );
        }
        info!(pending = r.pending_records, "spool open");
    }

    pub fn producer_recreated(&self, why: &str, resent: usize) {
        warn!(
            why,
            resent, "Kafka producer replaced; records it had not settled are sent again"
        );
        self.producer_recreated.inc();
    }

    pub fn spool_appended(&self, records: usize, bytes: usize) {
        self.spool.appended.inc_by(records as u64);
        self.spool.appended_bytes.inc_by(bytes as u64);
    }

    pub fn spool_fsync(&self, d: Duration) {
        self.spool.fsync.observe(d.as_secs_f64());
    }

    pub fn spool_full(&self, full: bool) {
        if full {
            warn!("spool full: readings are no longer acknowledged (the broker keeps them) until Kafka frees space");
        } else {
            info!("spool has room again: acknowledging readings");
        }
        self.spool.full.set(i64::from(full));
        self.health.spool_full.store(full, Ordering::Relaxed);
    }

    pub fn spool_dropped_full(&self, records: u64, bytes: u64) {
        if records > 0 || bytes > 0 {
            warn!(
                records,
                bytes,
                "spool full: oldest readings not yet in Kafka dropped (on_full = drop_oldest)"
            );
            self.spool.dropped_full.inc_by(records);
            self.spool.dropped_bytes.inc_by(bytes);
        }
    }

    pub fn spool_dropped_corrupt(&self, records: u64) {
        self.spool.dropped_corrupt.inc_by(records);
    }

    pub fn spool_gauges(&self, bytes: u64, segments: usize, records: u64, oldest_age_secs: f64) {
        self.spool.bytes.set(bytes as i64);
        self.spool.segments.set(segments as i64);
        self.spool.records.set(records as i64);
        self.spool.oldest_age.set(oldest_age_secs);
    }

    pub fn already_in_kafka(&self) {
        self.spool.already_in_kafka.inc();
    }

    pub fn duplicate_skipped(&self, device: &[u8], seq: u64) {
        debug!(device = %String::from_utf8_lossy(device), seq, "repeat of a spooled reading; not spooled again");
        self.spool.duplicates.inc();
    }

    /// The fixed reason code matching a DLQ record's `reason` header.
    pub fn reason_code(&self, reason: &[u8]) -> Option<&'static str> {
        self.dead_lettered
            .keys()
            .find(|k| k.as_bytes() == reason)
            .copied()
    }

    pub fn dead_lettered(&self, reason: Option<&'static str>) {
        if let Some(c) = reason.and_then(|r| self.dead_lettered.get(r)) {
            c.inc();
        }
    }

    /// A reading's time was not the device's judged `ts` (see `TimeNote`).
    pub fn time_noted(&self, clock_unsynced: bool, replaced: Option<(&'static str, i64)>) {
        if clock_unsynced {
            self.clock_unsynced.inc();
        }
        if let Some((reason, device_ts)) = replaced {
            debug!(
                reason,
                device_ts, "device ts unusable; the receive time is kept"
            );
            if let Some(c) = self.ts_replaced.get(reason) {
                c.inc();
            }
        }
    }

    pub fn received(&self, simulated: bool) {
        if simulated {
            self.received_simulated.inc()
        } else {
            self.received_mqtt.inc()
        }
    }

    pub fn rejected(&self, rejection: &Rejection, source: &str) {
        debug!(reason = rejection.code(), %rejection, source, "reading rejected");
        if let Some(c) = self.rejected.get(rejection.code()) {
            c.inc();
        }
    }

    pub fn delivered(&self, latency: Duration) {
        self.delivered.inc();
        self.latency.observe(latency.as_secs_f64());
    }

    /// [`GatewayMetrics::delivered`] for the forwarder's hot path: counted
    /// locally, added to the shared metrics by [`Deliveries::flush`].
    pub fn deliveries(&self) -> Deliveries {
        Deliveries {
            delivered: self.delivered.local(),
            latency: self.latency.local(),
        }
    }

    pub fn dropped(&self, reason: &str, detail: &str) {
        error!(
            reason,
            detail, "payload dropped: it could not be delivered or dead-lettered"
        );
        self.dropped.inc();
    }

    pub fn delivery_retriable(&self, error: &dyn std::fmt::Display) {
        // Logged at debug: during an outage every in-flight reading fails once a
        // minute; the counter and /readyz tell the story.
        debug!(%error, "Kafka delivery failed; sending again");
        self.delivery_retriable.inc();
    }

    pub fn delivery_permanent(&self, error: &dyn std::fmt::Display, topic: &str) {
        warn!(%error, topic, "Kafka refused a record for good");
        self.delivery_permanent.inc();
    }

    pub fn acked(&self, n: usize) {
        self.mqtt_acks.inc_by(n as u64);
    }

    /// One PUBACK released `ms` after its message arrived (a clock step
    /// backwards counts as 0).
    pub fn ack_latency(&self, ms: i64) {
        self.ack_latency.observe(ms.max(0) as f64 / 1000.0);
    }

    pub fn seq_gap(&self, device: &str, missing: u64) {
        debug!(device, missing, "sequence gap");
        self.seq_gaps.inc_by(missing);
    }

    /// After a new device: `tracked` now, `evicted` since the start.
    pub fn devices(&self, tracked: usize, evicted: u64, max: usize) {
        self.devices_tracked.set(tracked as i64);
        let before = self.devices_evicted.get();
        if evicted > before {
            if before == 0 {
                warn!(
                    max_devices = max,
                    "more devices than tracking.max_devices: the least recently seen are forgotten from now on (gateway_devices_evicted_total)"
                );
            }
            self.devices_evicted.inc_by(evicted - before);
        }
    }

    pub fn seq_repeat(&self, device: &str) {
        debug!(device, "sequence repeat");
        self.seq_repeats.inc();
    }

    pub fn mqtt_up(&self, url: &str) {
        info!(url, "MQTT subscribed; receiving");
        self.mqtt_connected(true);
    }

    /// The MQTT connection is up and subscribed (or not).
    pub fn mqtt_connected(&self, up: bool) {
        self.health.mqtt_connected.store(up, Ordering::Relaxed);
        self.mqtt_connected.set(i64::from(up));
    }

    /// Kafka answers (or not), as the probe sees it.
    pub fn set_kafka_reachable(&self, up: bool) {
        self.health.kafka_reachable.store(up, Ordering::Relaxed);
        self.kafka_reachable.set(i64::from(up));
    }

    pub fn kafka_reachable(&self) -> bool {
        self.health.kafka_reachable.load(Ordering::Relaxed)
    }

    pub fn mqtt_down(&self, url: &str, error: &dyn std::fmt::Display, was_connected: bool) {
        if was_connected {
            warn!(url, %error, "MQTT connection lost; reconnecting");
            self.mqtt_reconnects.inc();
        } else {
            warn!(url, %error, "MQTT connection failed; retrying");
        }
        self.mqtt_connected(false);
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}
