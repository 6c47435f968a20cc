//! The forwarder: the only part that talks to Kafka. It reads records in order
//! from the [`log`], keeps at most `kafka.max_in_flight` of them in
//! librdkafka, and settles each one when Kafka acknowledged it (or its
//! dead-letter record); the settled prefix is released to the log.
//!
//! Order: librdkafka's idempotent producer keeps per-partition order across its
//! own retries, and `message.timeout.ms = 0` means it retries until Kafka is
//! back instead of failing records (a timed-out record sent again becomes a new
//! record behind later ones). The in-flight window bounds what it holds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::error::GatewayError;
use super::intake::dead_letter;
use super::kafka::{self, GatewayProducer, ProducerSlot, Report};
use super::log;
use super::metrics::{self, GatewayMetrics};
use super::spool::{Record, RecordRef};
use crate::config::{DeliveryMode, KafkaConfig};

/// A record to send again after a retriable error.
struct Retry {
    at: Instant,
    attempts: u32,
    record: Record,
}

/// One record handed to Kafka: what its delivery report needs besides the id.
struct Sent {
    id: u64,
    received_ms: i64,
    /// Its age by the wall clock when handed to Kafka (clamped at 0), and
    /// when (monotonic): latency and age are `waited + handed.elapsed()`, so
    /// a clock step while it is in flight does not distort them.
    waited_ms: u64,
    handed: std::time::Instant,
    /// (partition, offset) in the topic, once acknowledged there.
    at: Option<(i32, i64)>,
    settled: bool,
    /// A dead-letter record, and its reason code (for the metric).
    dlq: bool,
    reason: Option<&'static str>,
    /// Times handed to librdkafka (for the retry backoff).
    attempts: u32,
}

pub struct Forwarder {
    cfg: KafkaConfig,
    producer: Arc<GatewayProducer>,
    /// Where the probe finds the producer; replaced with it.
    slot: ProducerSlot,
    report_tx: mpsc::UnboundedSender<Report>,
    generation: u32,
    metrics: GatewayMetrics,
    /// Deliveries counted since the last flush (once per wake-up).
    deliveries: metrics::Deliveries,
    window: usize,
    /// Records handed to Kafka, in order.
    in_flight: VecDeque<Sent>,
    retries: VecDeque<Retry>,
    /// The wall and monotonic clocks at this wake-up (read once for all the
    /// records it hands over).
    now: (i64, std::time::Instant),
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl Forwarder {
    pub fn new(
        cfg: &KafkaConfig,
        slot: ProducerSlot,
        report_tx: mpsc::UnboundedSender<Report>,
        metrics: GatewayMetrics,
    ) -> Self {
        Forwarder {
            producer: kafka::current(&slot),
            slot,
            report_tx,
            generation: 0,
            window: match cfg.delivery_mode {
                DeliveryMode::Async => cfg.max_in_flight,
                DeliveryMode::Sync => 1,
            },
            cfg: cfg.clone(),
            deliveries: metrics.deliveries(),
            metrics,
            in_flight: VecDeque::new(),
            retries: VecDeque::new(),
            now: (crate::clock::now_ms(), std::time::Instant::now()),
        }
    }

    /// Runs until `stop`, then waits up to `grace` for what is in flight. A
    /// message on `recreate` replaces the producer (see `Forwarder::recreate`).
    pub async fn run(
        mut self,
        mut log: log::Reader,
        mut reports: mpsc::UnboundedReceiver<Report>,
        mut recreate: mpsc::Receiver<String>,
        stop: CancellationToken,
        grace: Duration,
    ) -> Result<(), GatewayError> {
        let grace = log.stop_grace(grace);
        let mut retry_tick = tokio::time::interval(Duration::from_millis(50));
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        let mut deadline: Option<tokio::time::Instant> = None;
        log.recover(&self.cfg).await;
        loop {
            let draining = deadline.is_some();
            let room = !draining && self.in_flight.len() < self.window;
            tokio::select! {
                biased;
                Some(r) = reports.recv() => {
                    let now = std::time::Instant::now();
                    self.on_report(r, now);
                    while let Ok(r) = reports.try_recv() {
                        self.on_report(r, now);
                    }
                    self.deliveries.flush();
                }
                _ = stop.cancelled(), if !draining => {
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                Some(why) = recreate.recv() => self.recreate(&why, &mut log)?,
                _ = log.wait(), if room => {}
                _ = retry_tick.tick(), if !self.retries.is_empty() => self.resend_due(),
                _ = housekeeping.tick() => self.housekeeping(&mut log).await?,
                _ = crate::shutdown::sleep_until(deadline), if draining => break,
            }
            self.now = (crate::clock::now_ms(), std::time::Instant::now());
            self.settle(&mut log);
            if !draining {
                let room = self.window.saturating_sub(self.in_flight.len());
                log.read(room, |rec, in_kafka| self.take(rec, in_kafka))?;
            }
            if (draining || log.ended()) && self.in_flight.is_empty() {
                break;
            }
        }
        self.settle(&mut log);
        if !self.in_flight.is_empty() {
            info!(records = self.in_flight.len(), "stopping with records not yet acknowledged by Kafka; they are sent again after a restart");
        }
        self.housekeeping(&mut log).await
    }

    /// Hands one record read from the log to Kafka, unless Kafka already has
    /// it (a resend after a crash). It stays borrowed from the log's buffer;
    /// an owned copy is made only if librdkafka refuses it.
    fn take(&mut self, rec: RecordRef<'_>, in_kafka: bool) {
        if in_kafka {
            self.start(&rec);
            self.metrics.already_in_kafka();
            self.mark(rec.offset, None);
            return;
        }
        self.forward(rec);
    }

    /// Hands `rec` to Kafka as a new record in flight.
    fn forward(&mut self, rec: RecordRef<'_>) {
        self.start(&rec);
        if let Err(e) = self.produce(&rec) {
            self.on_failure(e, rec.to_owned());
        }
    }

    fn start(&mut self, rec: &RecordRef<'_>) {
        crate::guard::failpoint("forwarder", rec.value);
        let reason = self.reason(rec);
        let (wall, mono) = self.now;
        self.in_flight.push_back(Sent {
            id: rec.offset,
            received_ms: rec.received_ms,
            waited_ms: u64::try_from(wall.saturating_sub(rec.received_ms)).unwrap_or(0),
            handed: mono,
            at: None,
            settled: false,
            dlq: rec.dlq,
            reason,
            attempts: 1,
        });
    }

    /// A dead-letter record's reason code, for the metric.
    fn reason(&self, rec: &RecordRef<'_>) -> Option<&'static str> {
        if rec.dlq {
            rec.header("reason")
                .and_then(|v| self.metrics.reason_code(v))
        } else {
            None
        }
    }

    /// Replaces a producer that stopped working (librdkafka can stop
    /// reconnecting for good after a broker restart; an idempotent producer
    /// can hit a fatal error). Records it had not settled are sent again, in
    /// order, by the new one: from the spool (rewound), or from the copies.
    /// Kafka may already have some of them: duplicates, never loss.
    fn recreate(&mut self, why: &str, log: &mut log::Reader) -> Result<(), GatewayError> {
        let new = Arc::new(kafka::producer(
            &self.cfg,
            self.report_tx.clone(),
            self.generation.wrapping_add(1),
            self.metrics.security.clone(),
        )?);
        let old = std::mem::replace(&mut self.producer, new.clone());
        *crate::sync::write(&self.slot) = new;
        self.generation = self.generation.wrapping_add(1);
        let unsettled: Vec<Sent> = self.in_flight.drain(..).filter(|s| !s.settled).collect();
        self.retries.clear();
        self.metrics.producer_recreated(why, unsettled.len());
        // Dropping it purges its queue (reports of an old generation are
        // ignored) and joins its threads: not on the runtime.
        tokio::task::spawn_blocking(move || drop(old));
        let ids: Vec<u64> = unsettled.iter().map(|s| s.id).collect();
        log.rewind(&ids);
        Ok(())
    }

    /// Sends a retried (or dead-lettered) record again; its entry in flight
    /// takes the record's kind and the attempt count.
    fn send(&mut self, rec: Record, attempts: u32) {
        let view = rec.view();
        let reason = self.reason(&view);
        if let Some(i) = self.index_of(rec.offset as usize) {
            let s = &mut self.in_flight[i];
            (s.dlq, s.reason, s.attempts) = (rec.dlq, reason, attempts + 1);
        }
        if let Err(e) = self.produce(&view) {
            self.on_failure(e, rec);
        }
    }

    /// Hands `rec` to librdkafka (its delivery opaque is its id).
    fn produce(&self, rec: &RecordRef<'_>) -> Result<(), KafkaError> {
        let topic = if rec.dlq {
            self.cfg.dlq_topic.as_str()
        } else {
            self.cfg.topic.as_str()
        };
        let mut headers = OwnedHeaders::new_with_capacity(rec.header_count());
        for (key, v) in rec.headers() {
            headers = headers.insert(Header {
                key,
                value: Some(v),
            });
        }
        let mut br: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, rec.offset as usize)
                .payload(rec.value)
                .headers(headers);
        if let Some(k) = rec.key {
            br = br.key(k);
        }
        if let Some(ts) = rec.ts_ms {
            br = br.timestamp(ts);
        }
        self.producer.send(br).map_err(|(e, _)| e)
    }

    /// Where the record with delivery opaque `id` is in `in_flight`. Ids are
    /// consecutive there unless a spool rewind or intake skipped some: index
    /// by distance from the front, search only when that misses. (Compared as
    /// `usize`, the opaque's width.)
    fn index_of(&self, id: usize) -> Option<usize> {
        let front = self.in_flight.front()?;
        let guess = id.wrapping_sub(front.id as usize);
        if self
            .in_flight
            .get(guess)
            .is_some_and(|e| e.id as usize == id)
        {
            return Some(guess);
        }
        self.in_flight
            .binary_search_by_key(&(id as u64), |e| e.id)
            .ok()
    }

    fn on_report(&mut self, r: Report, now: std::time::Instant) {
        if r.generation != self.generation {
            return; // from a replaced producer: its records were sent again
        }
        let Some(i) = self.index_of(r.id) else {
            return; // settled already (e.g. resent after a replacement)
        };
        let s = &self.in_flight[i];
        match r.result {
            Ok(at) => {
                if s.dlq {
                    self.metrics.dead_lettered(s.reason);
                } else {
                    self.metrics
                        .security
                        .cleared("kafka", &crate::security::SecurityKind::ALL);
                    let latency = Duration::from_millis(s.waited_ms)
                        + now.saturating_duration_since(s.handed);
                    self.deliveries.delivered(latency);
                }
                let dlq = s.dlq;
                self.settle_at(i, (!dlq).then_some(at));
            }
            Err(failed) => {
                let (e, mut rec) = *failed;
                (rec.offset, rec.received_ms, rec.dlq) = (s.id, s.received_ms, s.dlq);
                self.on_failure(e, rec);
            }
        }
    }

    /// `rec` (its offset is its id) was refused or failed: dead-lettered,
    /// dropped when even that is impossible, or queued to be sent again.
    fn on_failure(&mut self, e: KafkaError, mut rec: Record) {
        let topic = if rec.dlq {
            &self.cfg.dlq_topic
        } else {
            &self.cfg.topic
        };
        if kafka::is_permanent(&e) {
            self.metrics.delivery_permanent(&e, topic);
            if rec.dlq || !self.cfg.dlq_enabled {
                self.metrics
                    .dropped(metrics::KAFKA_REJECTED, &e.to_string());
                self.mark(rec.offset, None);
            } else {
                // A valid reading Kafka refused for good (e.g. too large for the
                // topic): dead-letter it with the broker's reason.
                let source = rec
                    .headers
                    .iter()
                    .find(|(k, _)| k == "source")
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_else(|| self.cfg.topic.clone());
                let mut d = dead_letter(
                    metrics::KAFKA_REJECTED,
                    &e.to_string(),
                    &source,
                    rec.received_ms,
                    rec.key.take(),
                    &rec.value,
                    rec.value.len(),
                    self.cfg.dlq_max_payload_bytes,
                );
                d.offset = rec.offset;
                self.send(d, 0);
            }
            return;
        }
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed) {
            self.metrics.security.failed(
                "kafka",
                crate::security::SecurityKind::Acl,
                super::probe::not_authorized_message(&self.cfg, topic),
            );
        }
        if !matches!(
            e,
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        ) {
            self.metrics.delivery_retriable(&e);
        }
        let attempts = self
            .index_of(rec.offset as usize)
            .map_or(1, |i| self.in_flight[i].attempts);
        let backoff = Duration::from_millis((100u64 << attempts.min(6)).min(5_000));
        self.retries.push_back(Retry {
            at: Instant::now() + backoff,
            attempts,
            record: rec,
        });
    }

    fn resend_due(&mut self) {
        let now = Instant::now();
        for _ in 0..self.retries.len() {
            let Some(r) = self.retries.pop_front() else {
                break;
            };
            if r.at > now {
                self.retries.push_back(r);
            } else {
                self.send(r.record, r.attempts);
            }
        }
    }

    /// Marks `id` settled (at `at` in the topic).
    fn mark(&mut self, id: u64, at: Option<(i32, i64)>) {
        if let Some(i) = self.index_of(id as usize) {
            self.settle_at(i, at);
        }
    }

    fn settle_at(&mut self, i: usize, at: Option<(i32, i64)>) {
        let s = &mut self.in_flight[i];
        s.settled = true;
        s.at = at;
    }

    /// Releases the settled prefix to the log.
    fn settle(&mut self, log: &mut log::Reader) {
        while let Some(s) = self.in_flight.front() {
            if !s.settled {
                break;
            }
            log.release(s.id, s.at);
            self.in_flight.pop_front();
        }
        log.released(self.in_flight.front().map(|s| s.id));
        self.metrics.in_flight.set(self.in_flight.len() as i64);
    }

    /// Once a second: gauges, and the log's checkpoint.
    async fn housekeeping(&mut self, log: &mut log::Reader) -> Result<(), GatewayError> {
        self.metrics
            .kafka_queue_depth
            .set(kafka::queue_depth(&self.producer));
        self.metrics
            .clock_synchronized
            .set(crate::clock::status().gauge());
        let oldest = self
            .in_flight
            .front()
            .map(|e| Duration::from_millis(e.waited_ms) + e.handed.elapsed());
        log.checkpoint(oldest).await
    }
}
