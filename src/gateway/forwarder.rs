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
use super::batch::{Batch, BufPool, IdPool};
use super::delivered::{self, Positions};
use super::intake::dead_letter;
use super::kafka::{self, GatewayProducer, ProducerSlot, Report};
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
    /// Spool disabled: the pipeline's batches (records whose offsets are
    /// their ack ids); settled ids go back.
    Memory {
        rx: mpsc::UnboundedReceiver<Batch>,
        settled: mpsc::UnboundedSender<AckEvent>,
        /// Where a batch's buffer goes once its records are settled.
        pool: BufPool,
        /// Where lists for settled ids come from.
        ids: IdPool,
    },
}

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
    /// Spool disabled: the batches that still hold an unsettled record, with
    /// the id of their last one, to send again if the producer is replaced
    /// (with the spool the reader rewinds instead).
    kept: VecDeque<(u64, Batch)>,
    pool: BufPool,
    ids: IdPool,
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
            deliveries: metrics.deliveries(),
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
            kept: VecDeque::new(),
            pool: BufPool::default(),
            ids: IdPool::default(),
            now: (crate::clock::now_ms(), std::time::Instant::now()),
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
            Feed::Memory {
                rx,
                settled,
                pool,
                ids,
            } => {
                self.ack_each = true;
                self.pool = pool;
                self.ids = ids;
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
                Some(why) = recreate.recv() => self.recreate(&why, reader.as_mut())?,
                _ = wait_notify(&notify), if room => {}
                // The pipeline holds at most the window unsettled, so a whole
                // batch fits.
                item = recv_memory(&mut memory), if room => match item {
                    Some(batch) => {
                        self.now = (crate::clock::now_ms(), std::time::Instant::now());
                        self.forward_batch(batch);
                    }
                    None => memory = None,
                },
                _ = retry_tick.tick(), if !self.retries.is_empty() => self.resend_due(),
                _ = housekeeping.tick() => self.housekeeping(spool.as_ref(), dir.as_deref()).await?,
                _ = sleep_until(deadline), if draining => break,
            }
            self.now = (crate::clock::now_ms(), std::time::Instant::now());
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
        if self.replay_left == 0 && !self.in_kafka.is_empty() {
            self.in_kafka = HashSet::new(); // past the resent records
        }
        let replayed = self.replay_left > 0;
        self.replay_left = self.replay_left.saturating_sub(1);
        if replayed && !rec.dlq && self.in_kafka.remove(&delivered::fingerprint(rec.value)) {
            self.start(&rec);
            self.metrics.already_in_kafka();
            self.mark(rec.offset, None);
            return;
        }
        self.forward(rec);
    }

    /// Spool disabled: hands a batch's records to Kafka, borrowed from it, and
    /// keeps it until they are all settled.
    fn forward_batch(&mut self, batch: Batch) {
        let mut last = None;
        for rec in batch.records() {
            last = Some(rec.offset);
            self.forward(rec);
        }
        if let Some(last) = last {
            self.kept.push_back((last, batch));
        }
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
    fn recreate(
        &mut self,
        why: &str,
        reader: Option<&mut SpoolReader>,
    ) -> Result<(), GatewayError> {
        let new = Arc::new(kafka::producer(
            &self.cfg,
            self.report_tx.clone(),
            self.generation.wrapping_add(1),
            self.metrics.security.clone(),
        )?);
        let old = std::mem::replace(&mut self.producer, new.clone());
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = new;
        self.generation = self.generation.wrapping_add(1);
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
                // Both in id order: walk the kept batches along the unsettled ids.
                let kept = std::mem::take(&mut self.kept);
                let mut ids = unsettled.iter().map(|s| s.id).peekable();
                for (_, batch) in &kept {
                    for rec in batch.records() {
                        while ids.next_if(|&id| id < rec.offset).is_some() {}
                        if ids.next_if_eq(&rec.offset).is_some() {
                            self.forward(rec);
                        }
                    }
                }
                self.kept = kept;
            }
        }
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
        // Without the spool the pipeline acknowledges each id itself.
        if self.ack_each {
            self.settled_ids.push(s.id);
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
        // Kept batches whose records are all settled (ids below the first
        // unsettled one) are done.
        let floor = self.in_flight.front().map(|s| s.id);
        while self
            .kept
            .front()
            .is_some_and(|(last, _)| floor.is_none_or(|f| *last < f))
        {
            if let Some((_, b)) = self.kept.pop_front() {
                self.pool.give_buf(b.buf);
            }
        }
        if let Some(settled) = settled {
            if !self.settled_ids.is_empty() {
                let next = self.ids.take().unwrap_or_default();
                let ids = std::mem::replace(&mut self.settled_ids, next);
                let _ = settled.send(AckEvent::Ready(ids));
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
        self.metrics
            .clock_synchronized
            .set(crate::clock::status().gauge());
        let oldest = self
            .in_flight
            .front()
            .map(|e| Duration::from_millis(e.waited_ms) + e.handed.elapsed());
        let Some(spool) = spool else {
            return Ok(());
        };
        let through = self.settled_through.filter(|&t| t > self.checkpointed);
        // After the checkpoint: positions older than it only mean reading more.
        let positions = (through.is_some() && self.positions_changed)
            .then(|| self.positions.clone())
            .zip(dir.map(std::path::Path::to_path_buf));
        let spool = spool.clone();
        let stats = tokio::task::spawn_blocking(move || {
            let mut s = lock(&spool);
            if let Some(t) = through {
                s.checkpoint(t)?;
            }
            // Positions past the checkpoint (it waits for the spool's fsync)
            // would skip records a crash resends; they wait a round instead.
            let saved = match positions {
                Some((p, dir)) if through.is_some_and(|t| s.acked() >= t) => {
                    if let Err(e) = p.save(&dir) {
                        warn!(error = %e, "writing the Kafka positions failed (a crash would resend more)");
                    }
                    true
                }
                _ => false,
            };
            let stats = (s.bytes(), s.segments(), s.next_offset() - s.acked());
            Ok::<_, std::io::Error>((stats, s.acked(), saved))
        })
        .await
        .map_err(|e| GatewayError::Spool(format!("checkpoint task: {e}")))?
        .map_err(|e| {
            error!(error = %e, "writing the spool checkpoint failed");
            GatewayError::Spool(format!("writing the spool checkpoint: {e}"))
        })?;
        let (stats, acked, saved) = stats;
        self.checkpointed = acked;
        self.positions_changed &= !saved;
        let (bytes, segments, records) = stats;
        let age = oldest.map_or(0.0, |d| d.as_secs_f64());
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

async fn recv_memory(rx: &mut Option<mpsc::UnboundedReceiver<Batch>>) -> Option<Batch> {
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
