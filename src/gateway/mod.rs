//! The gateway: sources (MQTT, simulated) -> validation -> Kafka, at least once.
//!
//! One pipeline task owns all mutable state (ack tracker, sequence tracker,
//! in-flight count): sources send it [`SourceEvent`]s, librdkafka sends it
//! delivery reports, and it acknowledges MQTT messages in arrival order once
//! Kafka has them (or their dead-letter record). When `max_in_flight` readings
//! are waiting for Kafka it stops taking new ones; the MQTT connection stays up.

pub mod acks;
pub mod kafka;
pub mod metrics;
pub mod mqtt;
pub mod seq;
pub mod simulated;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::acks::AckTracker;
use self::kafka::{GatewayProducer, InFlight, Report, Retry, TopicState};
use self::metrics::GatewayMetrics;
use self::seq::{SeqOutcome, SeqTracker};
use crate::config::{DeliveryMode, GatewayConfig};
use crate::reading::{self, SCHEMA_VERSION};

/// One received payload.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// MQTT topic, or `simulated`.
    pub topic: String,
    /// Device id known from the source (simulated); MQTT takes it from the topic.
    pub device: Option<String>,
    pub payload: Bytes,
    /// Receive time, epoch ms.
    pub received_ms: i64,
    pub received_at: Instant,
    /// MQTT packet id to acknowledge (QoS 1); `None` = nothing to acknowledge.
    pub pkid: Option<u16>,
}

/// What a source tells the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    Message(Incoming),
    /// A new MQTT connection: acks owed on the old one are void (the broker
    /// redelivers those messages).
    Connected,
}

/// Fatal gateway errors (everything else is retried, counted and logged).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Http(String),
    #[error("Kafka producer: {0}")]
    Producer(#[from] KafkaError),
    #[error("topic {topic:?} does not exist on {servers}; create it (scripts/stack up does) or set kafka.create_topics = true")]
    MissingTopic { topic: String, servers: String },
    #[error("MQTT: {0}")]
    Mqtt(String),
}

/// Runs the gateway until `shutdown` is cancelled, then drains: stops intake,
/// waits (up to the grace period) for in-flight deliveries, acknowledges what
/// was delivered and disconnects. What was not delivered stays unacknowledged.
pub async fn run(cfg: GatewayConfig, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let metrics = GatewayMetrics::new();

    let listener = crate::http::bind(&cfg.http.listen, "http.listen")
        .await
        .map_err(GatewayError::Http)?;
    info!(addr = %cfg.http.listen, "serving /metrics, /healthz, /readyz");
    let ready = {
        let (m, mqtt_on) = (metrics.clone(), cfg.mqtt.enabled);
        Arc::new(move || m.readiness(mqtt_on))
    };
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(crate::http::serve(
        listener,
        crate::http::base_router(metrics.registry.clone(), ready, None),
        http_stop.clone(),
    ));

    let (producer, reports) = kafka::producer(&cfg.kafka)?;
    let producer = Arc::new(producer);
    // MQTT first: the broker starts keeping our messages as soon as we are
    // subscribed, even while Kafka is still being checked (nothing is acked
    // until Kafka has it).
    let (mqtt, mut mqtt_rx) = if cfg.mqtt.enabled {
        let (source, events) =
            mqtt::start(&cfg.mqtt, metrics.clone()).map_err(GatewayError::Mqtt)?;
        (Some(source), events)
    } else {
        // A closed channel: the pipeline sees no MQTT source.
        (None, mpsc::unbounded_channel().1)
    };
    if let Err(e) = check_topics(&cfg, &producer, &metrics).await {
        if let Some(m) = mqtt {
            m.stop.cancel();
            m.acker.disconnect().await;
        }
        return Err(e);
    }
    let probe_stop = CancellationToken::new();
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<GatewayError>(1);
    tokio::spawn(probe_kafka(
        cfg.clone(),
        producer.clone(),
        metrics.clone(),
        probe_stop.clone(),
        fatal_tx,
    ));

    let sim = (cfg.simulate.devices > 0).then(|| simulated::start(&cfg.simulate, shutdown.clone()));
    info!(
        mqtt = cfg.mqtt.enabled,
        simulated_devices = cfg.simulate.devices,
        topic = %cfg.kafka.topic,
        mode = ?cfg.kafka.delivery_mode,
        "gateway running"
    );

    let mut pipeline = Pipeline::new(&cfg, producer.clone(), metrics.clone());
    let acker = mqtt.as_ref().map(|m| m.acker.clone());
    let mut sim_rx = match sim {
        Some(rx) => rx,
        None => mpsc::channel(1).1,
    };
    let result = pipeline
        .run(
            &mut mqtt_rx,
            &mut sim_rx,
            reports,
            acker.as_ref(),
            &shutdown,
            &mut fatal_rx,
        )
        .await;

    // Drained (or gave up after the grace period): disconnect cleanly.
    if let Some(m) = mqtt {
        m.stop.cancel();
        m.acker.disconnect().await;
        if tokio::time::timeout(Duration::from_secs(3), m.task)
            .await
            .is_err()
        {
            warn!("MQTT event loop did not stop in 3 s");
        }
    }
    probe_stop.cancel();
    let left = producer.in_flight_count();
    if left > 0 {
        warn!(records = left, "shutting down with records not acknowledged by Kafka; their MQTT messages stay unacknowledged and will be redelivered");
    }
    http_stop.cancel();
    let _ = http_task.await;
    result
}

/// At start-up: a reachable Kafka without the topic is fatal (or the topic is
/// created); an unreachable Kafka is not (readiness says so, and the probe
/// checks the topic once Kafka answers).
async fn check_topics(
    cfg: &GatewayConfig,
    producer: &Arc<GatewayProducer>,
    metrics: &GatewayMetrics,
) -> Result<(), GatewayError> {
    if cfg.kafka.create_topics {
        if let Err(e) = create_topics(cfg).await {
            warn!(error = %e, "could not create topics yet (Kafka down?); trying again when Kafka answers");
        }
    }
    match topics_state(cfg, producer.clone(), Duration::from_secs(5)).await {
        Ok(None) => {
            metrics.kafka_reachable.set(1);
            Ok(())
        }
        Ok(Some(topic)) => Err(GatewayError::MissingTopic {
            topic,
            servers: cfg.kafka.bootstrap_servers.clone(),
        }),
        Err(e) => {
            warn!(servers = %cfg.kafka.bootstrap_servers, error = %e, "Kafka is not reachable; readings wait (not acknowledged) until it is");
            Ok(())
        }
    }
}

/// Creates the main topic and (if enabled) the DLQ; existing ones are kept.
async fn create_topics(cfg: &GatewayConfig) -> Result<(), String> {
    let mut topics = vec![(cfg.kafka.topic.as_str(), cfg.kafka.partitions)];
    if cfg.kafka.dlq_enabled {
        topics.push((cfg.kafka.dlq_topic.as_str(), 1));
    }
    kafka::create_topics(&cfg.kafka, &topics).await
}

/// `Ok(None)`: all topics exist; `Ok(Some(t))`: `t` is missing.
async fn topics_state(
    cfg: &GatewayConfig,
    producer: Arc<GatewayProducer>,
    timeout: Duration,
) -> Result<Option<String>, KafkaError> {
    let mut topics = vec![cfg.kafka.topic.clone()];
    if cfg.kafka.dlq_enabled {
        topics.push(cfg.kafka.dlq_topic.clone());
    }
    tokio::task::spawn_blocking(move || {
        for t in topics {
            if kafka::topic_state(producer.client(), &t, timeout)? == TopicState::Missing {
                return Ok(Some(t));
            }
        }
        Ok(None)
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

async fn probe_kafka(
    cfg: GatewayConfig,
    producer: Arc<GatewayProducer>,
    metrics: GatewayMetrics,
    stop: CancellationToken,
    fatal: mpsc::Sender<GatewayError>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // A topic must be missing on several probes in a row before we give up:
    // metadata can lag right after a broker (re)start.
    let mut missing_probes = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        metrics.kafka_queue_depth.set(kafka::queue_depth(&producer));
        let state = topics_state(&cfg, producer.clone(), Duration::from_secs(3)).await;
        let was = metrics.kafka_reachable.get() == 1;
        match state {
            Ok(None) => {
                missing_probes = 0;
                if !was {
                    info!(servers = %cfg.kafka.bootstrap_servers, "Kafka reachable");
                }
                metrics.kafka_reachable.set(1);
            }
            Ok(Some(topic)) if missing_probes < 3 => {
                missing_probes += 1;
                if cfg.kafka.create_topics {
                    if let Err(e) = create_topics(&cfg).await {
                        warn!(topic = %topic, error = %e, "creating the topic failed");
                    }
                } else {
                    warn!(topic = %topic, "topic not found (yet) on a reachable Kafka");
                }
            }
            Ok(Some(topic)) => {
                let _ = fatal
                    .send(GatewayError::MissingTopic {
                        topic,
                        servers: cfg.kafka.bootstrap_servers.clone(),
                    })
                    .await;
                return;
            }
            Err(e) => {
                if was {
                    warn!(servers = %cfg.kafka.bootstrap_servers, error = %e, "Kafka not reachable; holding readings until it is back");
                }
                metrics.kafka_reachable.set(0);
            }
        }
        let _ = metrics.readiness(cfg.mqtt.enabled);
    }
}

/// Why and whence a payload is dead-lettered (its DLQ headers).
struct DeadLetter<'a> {
    reason: &'static str,
    detail: &'a str,
    source: &'a str,
    received_at: &'a str,
}

/// A record waiting to be (re)sent.
struct Pending {
    dlq: bool,
    retry: Retry,
    meta: Box<InFlight>,
    not_before: Instant,
}

struct Pipeline {
    cfg: GatewayConfig,
    producer: Arc<GatewayProducer>,
    metrics: GatewayMetrics,
    tracker: AckTracker,
    seqs: SeqTracker,
    /// Accepted and not yet finished (delivered, dead-lettered or dropped).
    in_flight: usize,
    window: usize,
    retries: VecDeque<Pending>,
    value_buf: String,
    pkids: Vec<u16>,
    /// Each topic filter with the position of its first `+` (the device id).
    plus_segments: Vec<(String, Option<usize>)>,
}

impl Pipeline {
    fn new(cfg: &GatewayConfig, producer: Arc<GatewayProducer>, metrics: GatewayMetrics) -> Self {
        let window = match cfg.kafka.delivery_mode {
            DeliveryMode::Async => cfg.kafka.max_in_flight,
            DeliveryMode::Sync => 1,
        };
        Pipeline {
            cfg: cfg.clone(),
            producer,
            metrics,
            tracker: AckTracker::new(),
            seqs: SeqTracker::default(),
            in_flight: 0,
            window,
            retries: VecDeque::new(),
            value_buf: String::with_capacity(256),
            pkids: Vec::with_capacity(1024),
            plus_segments: cfg
                .mqtt
                .topics
                .iter()
                .map(|f| (f.clone(), f.split('/').position(|s| s == "+")))
                .collect(),
        }
    }

    async fn run(
        &mut self,
        mqtt_rx: &mut mpsc::UnboundedReceiver<SourceEvent>,
        sim_rx: &mut mpsc::Receiver<SourceEvent>,
        mut reports: mpsc::UnboundedReceiver<Report>,
        acker: Option<&mqtt::Acker>,
        shutdown: &CancellationToken,
        fatal: &mut mpsc::Receiver<GatewayError>,
    ) -> Result<(), GatewayError> {
        let grace = Duration::from_millis(self.cfg.shutdown.grace_period_ms);
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut retry_tick = tokio::time::interval(Duration::from_millis(50));
        let (mut mqtt_open, mut sim_open) = (true, true);
        let mut outcome = Ok(());
        loop {
            let draining = deadline.is_some();
            let intake = !draining && self.in_flight < self.window;
            tokio::select! {
                biased;
                Some(r) = reports.recv() => {
                    self.on_report(r);
                    // Take every report already waiting: one wake-up, one ack batch.
                    while let Ok(r) = reports.try_recv() {
                        self.on_report(r);
                    }
                }
                _ = shutdown.cancelled(), if !draining => {
                    info!(in_flight = self.in_flight, grace_ms = grace.as_millis() as u64, "shutting down: intake stopped, flushing");
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                Some(e) = fatal.recv(), if !draining => {
                    error!(error = %e, "fatal");
                    outcome = Err(e);
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                ev = mqtt_rx.recv(), if intake && mqtt_open => match ev {
                    Some(ev) => {
                        self.on_event(ev);
                        // Drain what already arrived, within the in-flight window.
                        while self.in_flight < self.window {
                            let Ok(ev) = mqtt_rx.try_recv() else { break };
                            self.on_event(ev);
                        }
                    }
                    None => mqtt_open = false,
                },
                ev = sim_rx.recv(), if intake && sim_open => match ev {
                    Some(ev) => {
                        self.on_event(ev);
                        while self.in_flight < self.window {
                            let Ok(ev) = sim_rx.try_recv() else { break };
                            self.on_event(ev);
                        }
                    }
                    None => sim_open = false,
                },
                _ = retry_tick.tick(), if !self.retries.is_empty() => self.resend_due(),
                _ = sleep_until(deadline), if draining => {
                    warn!(in_flight = self.in_flight, "grace period over; undelivered readings stay unacknowledged");
                    break;
                }
            }
            self.flush_acks(acker).await;
            self.metrics.in_flight.set(self.in_flight as i64);
            if deadline.is_some() && self.in_flight == 0 {
                info!("all accepted readings delivered");
                break;
            }
            if !mqtt_open && !sim_open && self.in_flight == 0 && deadline.is_none() {
                // Every source ended (e.g. a finite simulation): nothing left to do
                // but wait for shutdown.
                shutdown.cancelled().await;
                break;
            }
        }
        // Purge nothing here: records still queued are simply not acknowledged.
        let _ = self.producer.flush(Duration::from_millis(100));
        outcome
    }

    async fn flush_acks(&mut self, acker: Option<&mqtt::Acker>) {
        self.pkids.clear();
        self.tracker.drain_ready(&mut self.pkids);
        if self.pkids.is_empty() {
            return;
        }
        if let Some(a) = acker {
            for &p in &self.pkids {
                if let Err(e) = a.ack(p).await {
                    warn!(error = %e, "PUBACK not sent (connection closing); the broker will redeliver");
                    break;
                }
            }
            self.metrics.acked(self.pkids.len());
        }
    }

    fn on_event(&mut self, ev: SourceEvent) {
        match ev {
            SourceEvent::Connected => self.tracker.reset(),
            SourceEvent::Message(m) => self.on_message(m),
        }
    }

    fn device_from_topic<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let segment = match self.cfg.mqtt.device_id_segment {
            Some(s) => s,
            None => self
                .plus_segments
                .iter()
                .find(|(f, _)| topic_matches(f, topic))
                .and_then(|(_, seg)| *seg)?,
        };
        topic.split('/').nth(segment)
    }

    fn on_message(&mut self, m: Incoming) {
        let simulated = m.device.is_some();
        self.metrics.received(simulated);
        let ack_id = self.tracker.push(m.pkid);
        self.in_flight += 1;
        let topic_device = match &m.device {
            Some(d) => Some(d.as_str()),
            None => self.device_from_topic(&m.topic),
        };
        let received_ts = reading::format_ts(m.received_ms);
        let meta = |dlq_reason| {
            Box::new(InFlight {
                ack_id,
                received_at: m.received_at,
                dlq_reason,
                attempts: 0,
            })
        };
        match reading::parse(
            &m.payload,
            topic_device,
            m.received_ms,
            &self.cfg.validation,
        ) {
            Ok(r) => {
                if let Some(seq) = r.seq {
                    match self.seqs.observe(&r.device_id, seq) {
                        SeqOutcome::Gap(n) => self.metrics.seq_gap(&r.device_id, n),
                        SeqOutcome::Repeat => self.metrics.seq_repeat(&r.device_id),
                        _ => {}
                    }
                }
                self.value_buf.clear();
                r.write_canonical_json(&mut self.value_buf);
                let headers = OwnedHeaders::new_with_capacity(3)
                    .insert(header("schema", SCHEMA_VERSION))
                    .insert(header("source", &m.topic))
                    .insert(header("received_at", &received_ts));
                let retry = Retry {
                    key: Some(r.device_id.into_bytes()),
                    payload: std::mem::take(&mut self.value_buf).into_bytes(),
                    headers: Some(headers),
                    timestamp: Some(r.ts_ms),
                };
                self.send(false, retry, meta(None));
            }
            Err(rej) => {
                self.metrics.rejected(&rej, &m.topic);
                let key = topic_device.map(|d| d.as_bytes().to_vec());
                let detail = rej.to_string();
                let d = DeadLetter {
                    reason: rej.code(),
                    detail: &detail,
                    source: &m.topic,
                    received_at: &received_ts,
                };
                self.dead_letter(d, key, &m.payload, meta(Some(rej.code())));
            }
        }
    }

    /// Sends the raw payload (cut at `dlq_max_payload_bytes`) to the DLQ with
    /// its reason, or, with the DLQ disabled, counts and logs it as dropped.
    fn dead_letter(
        &mut self,
        d: DeadLetter<'_>,
        key: Option<Vec<u8>>,
        payload: &[u8],
        meta: Box<InFlight>,
    ) {
        if !self.cfg.kafka.dlq_enabled {
            self.metrics.dropped(d.reason, d.detail);
            self.finish(meta.ack_id);
            return;
        }
        let keep = payload.len().min(self.cfg.kafka.dlq_max_payload_bytes);
        let mut headers = OwnedHeaders::new_with_capacity(6)
            .insert(header("reason", d.reason))
            .insert(header("detail", d.detail))
            .insert(header("source", d.source))
            .insert(header("received_at", d.received_at))
            .insert(header("schema", SCHEMA_VERSION));
        if keep < payload.len() {
            headers = headers.insert(header("original_size", &payload.len().to_string()));
        }
        let retry = Retry {
            key,
            payload: payload[..keep].to_vec(),
            headers: Some(headers),
            timestamp: None,
        };
        self.send(true, retry, meta);
    }

    fn send(&mut self, dlq: bool, r: Retry, mut meta: Box<InFlight>) {
        meta.attempts += 1;
        let topic = if dlq {
            self.cfg.kafka.dlq_topic.as_str()
        } else {
            self.cfg.kafka.topic.as_str()
        };
        let Retry {
            key,
            payload,
            headers,
            timestamp,
        } = r;
        let mut rec: BaseRecord<'_, [u8], [u8], Box<InFlight>> =
            BaseRecord::with_opaque_to(topic, meta).payload(&payload[..]);
        if let Some(k) = &key {
            rec = rec.key(&k[..]);
        }
        if let Some(ts) = timestamp {
            rec = rec.timestamp(ts);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        if let Err((e, rec)) = self.producer.send(rec) {
            let BaseRecord {
                headers,
                delivery_opaque: meta,
                ..
            } = rec;
            let retry = Retry {
                key,
                payload,
                headers,
                timestamp,
            };
            self.on_failure(dlq, e, retry, meta);
        }
    }

    fn on_report(&mut self, rep: Report) {
        let dlq = rep.meta.dlq_reason.is_some();
        match rep.result {
            Ok(()) => {
                match rep.meta.dlq_reason {
                    None => self.metrics.delivered(rep.meta.received_at.elapsed()),
                    Some(reason) => self.metrics.dead_lettered(reason),
                }
                self.finish(rep.meta.ack_id);
            }
            Err((e, retry)) => self.on_failure(dlq, e, retry, rep.meta),
        }
    }

    fn on_failure(&mut self, dlq: bool, e: KafkaError, r: Retry, meta: Box<InFlight>) {
        let topic = if dlq {
            &self.cfg.kafka.dlq_topic
        } else {
            &self.cfg.kafka.topic
        };
        if kafka::is_permanent(&e) {
            self.metrics.delivery_permanent(&e, topic);
            if dlq {
                self.metrics
                    .dropped(metrics::KAFKA_REJECTED, &e.to_string());
                self.finish(meta.ack_id);
            } else {
                // A valid reading Kafka refused for good (e.g. too large for the
                // topic): dead-letter it with the broker's reason.
                let detail = e.to_string();
                let meta = Box::new(InFlight {
                    dlq_reason: Some(metrics::KAFKA_REJECTED),
                    attempts: 0,
                    ..*meta
                });
                let Retry {
                    key,
                    payload,
                    headers,
                    ..
                } = r;
                let received_at = headers
                    .as_ref()
                    .and_then(|h| kafka::header_str(h, "received_at"))
                    .map(str::to_string)
                    .unwrap_or_else(|| reading::format_ts(chrono::Utc::now().timestamp_millis()));
                let source = self.cfg.kafka.topic.clone();
                let d = DeadLetter {
                    reason: metrics::KAFKA_REJECTED,
                    detail: &detail,
                    source: &source,
                    received_at: &received_at,
                };
                self.dead_letter(d, key, &payload, meta);
            }
            return;
        }
        if !matches!(
            e,
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        ) {
            self.metrics.delivery_retriable(&e);
        }
        let backoff = Duration::from_millis((100u64 << meta.attempts.min(6)).min(5_000));
        self.retries.push_back(Pending {
            dlq,
            retry: r,
            meta,
            not_before: Instant::now() + backoff,
        });
    }

    fn resend_due(&mut self) {
        let now = Instant::now();
        let mut n = self.retries.len();
        while n > 0 {
            n -= 1;
            let Some(p) = self.retries.pop_front() else {
                break;
            };
            if p.not_before > now {
                self.retries.push_back(p);
                continue;
            }
            self.send(p.dlq, p.retry, p.meta);
        }
    }

    fn finish(&mut self, ack_id: acks::AckId) {
        self.tracker.complete(ack_id);
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(s)) if f == s => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn filters() {
        assert!(topic_matches("sensors/+/telemetry", "sensors/a/telemetry"));
        assert!(!topic_matches(
            "sensors/+/telemetry",
            "sensors/a/b/telemetry"
        ));
        assert!(!topic_matches("sensors/+/telemetry", "sensors/a"));
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }
}
