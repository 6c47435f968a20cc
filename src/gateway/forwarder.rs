//! The forwarder: the only part that talks to Kafka. It takes records in order
//! (from the spool, or straight from the pipeline when the spool is disabled),
//! keeps at most `kafka.max_in_flight` of them in librdkafka, and settles each
//! one when Kafka acknowledged it (or its dead-letter record).
//!
//! Order: librdkafka's idempotent producer keeps per-partition order across its
//! own retries, and `message.timeout.ms = 0` means it retries until Kafka is
//! back instead of failing records (a timed-out record sent again becomes a new
//! record behind later ones). The in-flight window bounds what it holds.
//!
//! With the spool, the contiguous prefix of acknowledged offsets becomes the
//! spool checkpoint once a second; without it, every settled id goes back to
//! the pipeline, which PUBACKs in arrival order.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::acks::AckEvent;
use super::delivered::{self, Positions};
use super::intake::dead_letter;
use super::kafka::{self, GatewayProducer, Meta, ProducerSlot, Report};
use super::metrics::{self, GatewayMetrics};
use super::spool::{Record, RecordRef, Spool, SpoolReader};
use super::GatewayError;
use crate::config::{DeliveryMode, KafkaConfig};

/// Where records come from.
#[derive(Debug)]
pub enum Feed {
    Spool {
        reader: SpoolReader,
        spool: Arc<Mutex<Spool>>,
        /// The spool directory (for the Kafka positions, see `delivered`).
        dir: PathBuf,
        /// Records recovery found not yet acknowledged by Kafka.
        pending: u64,
    },
    /// Spool disabled: (ack id, record) from the pipeline; settled ids go back.
    Memory {
        rx: mpsc::UnboundedReceiver<Vec<(u64, Record)>>,
        settled: mpsc::UnboundedSender<AckEvent>,
    },
}

/// A record to send again after a retriable error.
struct Retry {
    at: Instant,
    attempts: u32,
    record: Record,
}

/// One record handed to Kafka.
struct Sent {
    id: u64,
    received_ms: i64,
    settled: bool,
    /// Spool disabled: the record, to send again if the producer is replaced
    /// (with the spool the reader rewinds instead).
    copy: Option<Record>,
    /// (partition, offset) in the topic, once acknowledged there.
    at: Option<(i32, i64)>,
}

pub struct Forwarder {
    cfg: KafkaConfig,
    producer: Arc<GatewayProducer>,
    /// Where the probe finds the producer; replaced with it.
    slot: ProducerSlot,
    report_tx: mpsc::UnboundedSender<Report>,
    generation: u32,
    metrics: GatewayMetrics,
    window: usize,
    /// Records handed to Kafka, in order.
    in_flight: VecDeque<Sent>,
    retries: VecDeque<Retry>,
    /// Every id below this is settled (the spool checkpoint).
    settled_through: Option<u64>,
    checkpointed: u64,
    settled_ids: Vec<u64>,
    /// Where the checkpointed prefix ends in each partition (spool only).
    positions: Positions,
    positions_changed: bool,
    /// Values found in Kafka that a resend after a crash must not repeat...
    in_kafka: HashSet<u64>,
    /// ...among this many records still to be read again (then it is dropped).
    replay_left: u64,
    /// Spool disabled: every settled id goes back to the pipeline.
    ack_each: bool,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

const READ_BATCH: usize = 2048;

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
            metrics,
            in_flight: VecDeque::new(),
            retries: VecDeque::new(),
            settled_through: None,
            checkpointed: 0,
            settled_ids: Vec::new(),
            positions: Positions::new(&cfg.topic),
            positions_changed: false,
            in_kafka: HashSet::new(),
            replay_left: 0,
            ack_each: false,
        }
    }

    /// Before resending after a crash: which of those records Kafka already has.
    async fn find_delivered(&mut self, dir: &std::path::Path, pending: u64) {
        self.positions = Positions::load(dir, &self.cfg.topic);
        if pending == 0 || self.positions.is_empty() {
            return;
        }
        let (cfg, positions) = (self.cfg.clone(), self.positions.clone());
        // Bounded: what was acknowledged after the last checkpoint (about a
        // second's worth) plus the in-flight window, and others' records; a
        // set of 8-byte fingerprints, at most a few MiB, dropped after the resend.
        let found = tokio::task::spawn_blocking(move || {
            delivered::already_in_kafka(&cfg, &positions, 500_000, Duration::from_secs(15))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match found {
            Ok(found) => {
                info!(pending, read = found.len(), "resending what the spool checkpoint does not cover; records Kafka already has are skipped");
                self.in_kafka = found;
                self.replay_left = pending;
            }
            Err(e) => {
                warn!(pending, error = %e, "could not read the topic to find records Kafka already has (needs Read access); resending all, some may be duplicates")
            }
        }
    }

    /// Runs until `stop`, then waits up to `grace` for what is in flight. A
    /// message on `recreate` replaces the producer (see `Forwarder::recreate`).
    pub async fn run(
        mut self,
        feed: Feed,
        mut reports: mpsc::UnboundedReceiver<Report>,
        mut recreate: mpsc::Receiver<String>,
        stop: CancellationToken,
        grace: Duration,
    ) -> Result<(), GatewayError> {
        let mut retry_tick = tokio::time::interval(Duration::from_millis(50));
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        let mut deadline: Option<tokio::time::Instant> = None;
        let (mut reader, spool, mut memory, settled, dir) = match feed {
            Feed::Spool {
                reader,
                spool,
                dir,
                pending,
            } => {
                self.find_delivered(&dir, pending).await;
                (Some(reader), Some(spool), None, None, Some(dir))
            }
            Feed::Memory { rx, settled } => {
                self.ack_each = true;
                (None, None, Some(rx), Some(settled), None)
            }
        };
        let notify = spool.as_ref().map(|s| lock(s).shared().clone());
        loop {
            let draining = deadline.is_some();
            let room = !draining && self.in_flight.len() < self.window;
            tokio::select! {
                biased;
                Some(r) = reports.recv() => {
                    self.on_report(r);
                    while let Ok(r) = reports.try_recv() {
                        self.on_report(r);
                    }
                }
                _ = stop.cancelled(), if !draining => {
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                Some(why) = recreate.recv() => self.recreate(&why, reader.as_mut())?,
                _ = wait_notify(&notify), if room => {}
                // The pipeline holds at most the window unsettled, so a whole
                // batch fits.
                item = recv_memory(&mut memory), if room => match item {
                    Some(batch) => {
                        for (id, mut rec) in batch {
                            rec.offset = id;
                            self.send_kept(rec);
                        }
                    }
                    None => memory = None,
                },
                _ = retry_tick.tick(), if !self.retries.is_empty() => self.resend_due(),
                _ = housekeeping.tick() => self.housekeeping(spool.as_ref(), dir.as_deref()).await?,
                _ = sleep_until(deadline), if draining => break,
            }
            self.settle(settled.as_ref());
            if let Some(r) = &mut reader {
                if !draining {
                    self.read_spool(r)?;
                }
            }
            if draining && self.in_flight.is_empty() {
                break;
            }
            if settled.is_some() && memory.is_none() && self.in_flight.is_empty() {
                break;
            }
        }
        self.settle(settled.as_ref());
        if !self.in_flight.is_empty() {
            info!(records = self.in_flight.len(), "stopping with records not yet acknowledged by Kafka; they are sent again after a restart");
        }
        self.housekeeping(spool.as_ref(), dir.as_deref()).await
    }

    /// Hands spool records to Kafka while the window has room.
    fn read_spool(&mut self, reader: &mut SpoolReader) -> Result<(), GatewayError> {
        while self.in_flight.len() < self.window {
            let room = (self.window - self.in_flight.len()).min(READ_BATCH);
            let corrupt = reader.corrupt_skipped;
            let n = reader
                .read_with(room, |rec| self.forward_spooled(rec))
                .map_err(|e| GatewayError::Spool(format!("reading the spool: {e}")))?;
            self.metrics
                .spool_dropped_corrupt(reader.corrupt_skipped - corrupt);
            if n < room {
                break;
            }
        }
        Ok(())
    }

    /// Hands one record read back from the spool to Kafka, unless a replay
    /// after a restart found it there already. It stays borrowed from the
    /// reader's buffer; an owned copy is made only if librdkafka refuses it.
    fn forward_spooled(&mut self, rec: RecordRef<'_>) {
        self.start(rec.offset, rec.received_ms, None);
        if self.replay_left == 0 && !self.in_kafka.is_empty() {
            self.in_kafka = HashSet::new(); // past the resent records
        }
        let replayed = self.replay_left > 0;
        self.replay_left = self.replay_left.saturating_sub(1);
        if replayed && !rec.dlq && self.in_kafka.remove(&delivered::fingerprint(rec.value)) {
            self.metrics.already_in_kafka();
            self.mark(rec.offset, None);
            return;
        }
        if let Err((e, meta)) = self.produce(&rec, 0) {
            self.on_failure(e, rec.to_owned(), meta);
        }
    }

    fn start(&mut self, id: u64, received_ms: i64, copy: Option<Record>) {
        self.in_flight.push_back(Sent {
            id,
            received_ms,
            settled: false,
            copy,
            at: None,
        });
    }

    /// Replaces a producer that stopped working (librdkafka can stop
    /// reconnecting for good after a broker restart; an idempotent producer
    /// can hit a fatal error). Records it had not settled are sent again, in
    /// order, by the new one: from the spool (rewound), or from the copies.
    /// Kafka may already have some of them: duplicates, never loss.
    fn recreate(
        &mut self,
        why: &str,
        reader: Option<&mut SpoolReader>,
    ) -> Result<(), GatewayError> {
        let new = Arc::new(kafka::producer(
            &self.cfg,
            self.report_tx.clone(),
            self.metrics.security.clone(),
        )?);
        let old = std::mem::replace(&mut self.producer, new.clone());
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = new;
        self.generation += 1;
        let unsettled: Vec<Sent> = self.in_flight.drain(..).filter(|s| !s.settled).collect();
        self.retries.clear();
        self.metrics.producer_recreated(why, unsettled.len());
        // Dropping it purges its queue (reports of an old generation are
        // ignored) and joins its threads: not on the runtime.
        tokio::task::spawn_blocking(move || drop(old));
        match reader {
            Some(r) => {
                if let Some(first) = unsettled.first() {
                    r.rewind(first.id);
                }
            }
            None => {
                for s in unsettled {
                    if let Some(rec) = s.copy {
                        self.send_kept(rec);
                    }
                }
            }
        }
        Ok(())
    }

    /// Spool disabled: sends `rec` and keeps it in `in_flight`, to send again
    /// if the producer is replaced (with the spool the reader rewinds instead).
    fn send_kept(&mut self, rec: Record) {
        self.start(rec.offset, rec.received_ms, None);
        let failed = self.produce(&rec.view(), 0);
        let copy = match failed {
            Ok(()) => rec,
            Err((e, meta)) => {
                let copy = rec.clone();
                self.on_failure(e, rec, meta);
                copy
            }
        };
        if let Some(s) = self
            .in_flight
            .iter_mut()
            .rev()
            .find(|s| s.id == copy.offset)
        {
            s.copy = Some(copy);
        }
    }

    fn send(&mut self, rec: Record, attempts: u32) {
        if let Err((e, meta)) = self.produce(&rec.view(), attempts) {
            self.on_failure(e, rec, meta);
        }
    }

    /// Hands `rec` to librdkafka; on a refusal the delivery opaque comes back.
    fn produce(&self, rec: &RecordRef<'_>, attempts: u32) -> Result<(), (KafkaError, Box<Meta>)> {
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
        let meta = Box::new(Meta {
            id: rec.offset,
            received_ms: rec.received_ms,
            dlq: rec.dlq,
            generation: self.generation,
            reason: if rec.dlq {
                rec.header("reason")
                    .and_then(|v| self.metrics.reason_code(v))
            } else {
                None
            },
            seq: rec.seq,
            attempts: attempts + 1,
        });
        let mut br: BaseRecord<'_, [u8], [u8], Box<Meta>> = BaseRecord::with_opaque_to(topic, meta)
            .payload(rec.value)
            .headers(headers);
        if let Some(k) = rec.key {
            br = br.key(k);
        }
        if let Some(ts) = rec.ts_ms {
            br = br.timestamp(ts);
        }
        self.producer
            .send(br)
            .map_err(|(e, br)| (e, br.delivery_opaque))
    }

    fn on_report(&mut self, r: Report) {
        if r.meta.generation != self.generation {
            return; // from a replaced producer: its records were sent again
        }
        match r.result {
            Ok(at) => {
                if r.meta.dlq {
                    self.metrics.dead_lettered(r.meta.reason);
                } else {
                    self.metrics
                        .security
                        .cleared("kafka", &crate::security::SecurityKind::ALL);
                    let ms = chrono::Utc::now().timestamp_millis() - r.meta.received_ms;
                    self.metrics
                        .delivered(Duration::from_millis(ms.max(0) as u64));
                }
                self.mark(r.meta.id, (!r.meta.dlq).then_some(at));
            }
            Err((e, rec)) => self.on_failure(e, rec, r.meta),
        }
    }

    #[allow(clippy::boxed_local)] // it comes boxed from librdkafka
    fn on_failure(&mut self, e: KafkaError, mut rec: Record, meta: Box<Meta>) {
        rec.offset = meta.id;
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
                self.mark(meta.id, None);
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
                    self.cfg.dlq_max_payload_bytes,
                );
                d.offset = meta.id;
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
        let backoff = Duration::from_millis((100u64 << meta.attempts.min(6)).min(5_000));
        self.retries.push_back(Retry {
            at: Instant::now() + backoff,
            attempts: meta.attempts,
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

    /// Marks `id` settled (at `at` in the topic); ids are in order in `in_flight`.
    fn mark(&mut self, id: u64, at: Option<(i32, i64)>) {
        // Ids are consecutive in `in_flight` unless a spool rewind skipped some:
        // index by distance from the front, search only when that misses.
        let guess = self
            .in_flight
            .front()
            .and_then(|f| usize::try_from(id.checked_sub(f.id)?).ok())
            .filter(|&i| self.in_flight.get(i).is_some_and(|e| e.id == id));
        let found = guess.ok_or(()).or_else(|_| {
            self.in_flight
                .binary_search_by_key(&id, |e| e.id)
                .map_err(|_| ())
        });
        if let Ok(i) = found {
            self.in_flight[i].settled = true;
            self.in_flight[i].at = at;
            // Without the spool the pipeline acknowledges each id itself.
            if self.ack_each {
                self.settled_ids.push(id);
            }
        }
    }

    /// Releases the settled prefix: the checkpoint (spool) or the acks (memory).
    fn settle(&mut self, settled: Option<&mpsc::UnboundedSender<AckEvent>>) {
        while let Some(s) = self.in_flight.front() {
            if !s.settled {
                break;
            }
            self.settled_through = Some(s.id + 1);
            if let Some((p, o)) = s.at {
                self.positions.note(p, o);
                self.positions_changed = true;
            }
            self.in_flight.pop_front();
        }
        if let Some(settled) = settled {
            if !self.settled_ids.is_empty() {
                let _ = settled.send(AckEvent::Ready(std::mem::take(&mut self.settled_ids)));
            }
        }
        self.metrics.in_flight.set(self.in_flight.len() as i64);
    }

    /// Once a second: the spool checkpoint and gauges.
    async fn housekeeping(
        &mut self,
        spool: Option<&Arc<Mutex<Spool>>>,
        dir: Option<&std::path::Path>,
    ) -> Result<(), GatewayError> {
        self.metrics
            .kafka_queue_depth
            .set(kafka::queue_depth(&self.producer));
        let now = chrono::Utc::now().timestamp_millis();
        let oldest = self.in_flight.front().map(|e| e.received_ms);
        let Some(spool) = spool else {
            return Ok(());
        };
        let through = self.settled_through.filter(|&t| t > self.checkpointed);
        // After the checkpoint: positions older than it only mean reading more.
        let positions = (through.is_some() && self.positions_changed)
            .then(|| self.positions.clone())
            .zip(dir.map(std::path::Path::to_path_buf));
        self.positions_changed &= positions.is_none();
        let spool = spool.clone();
        let stats = tokio::task::spawn_blocking(move || {
            let mut s = lock(&spool);
            if let Some(t) = through {
                s.checkpoint(t)?;
            }
            if let Some((p, dir)) = positions {
                if let Err(e) = p.save(&dir) {
                    warn!(error = %e, "writing the Kafka positions failed (a crash would resend more)");
                }
            }
            Ok::<_, std::io::Error>((s.bytes(), s.segments(), s.next_offset() - s.acked()))
        })
        .await
        .map_err(|e| GatewayError::Spool(format!("checkpoint task: {e}")))?
        .map_err(|e| {
            error!(error = %e, "writing the spool checkpoint failed");
            GatewayError::Spool(format!("writing the spool checkpoint: {e}"))
        })?;
        if let Some(t) = through {
            self.checkpointed = t;
        }
        let (bytes, segments, records) = stats;
        let age = match oldest {
            Some(ms) => (now - ms).max(0) as f64 / 1000.0,
            None => 0.0,
        };
        self.metrics.spool_gauges(bytes, segments, records, age);
        Ok(())
    }
}

fn lock(spool: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    spool.lock().unwrap_or_else(|p| p.into_inner())
}

async fn wait_notify(n: &Option<Arc<super::spool::Shared>>) {
    match n {
        Some(s) => s.notify.notified().await,
        None => std::future::pending().await,
    }
}

async fn recv_memory(
    rx: &mut Option<mpsc::UnboundedReceiver<Vec<(u64, Record)>>>,
) -> Option<Vec<(u64, Record)>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
