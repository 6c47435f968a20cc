//! Kafka sink: an idempotent producer whose delivery reports come back to the
//! pipeline as events (many records in flight, reports handled as they come),
//! topic checks at start-up, and a periodic reachability probe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use tokio::sync::mpsc;

use super::spool::Record;
use crate::config::{DeliveryMode, KafkaConfig};
use crate::security::{self, SecurityStatus};

/// One delivery report; a failed record comes back to be sent again.
#[derive(Debug)]
pub struct Report {
    /// Which producer sent it (reports from a replaced producer are ignored).
    pub generation: u32,
    /// The delivery opaque: the forwarder's id of the record (a spool offset,
    /// or the ack id with the spool disabled) as a `usize`. A plain number,
    /// not a box: no allocation per record; the forwarder keeps the rest.
    pub id: usize,
    /// Where Kafka put it: (partition, offset). A failed record comes back
    /// with its key, headers, value and timestamp (the forwarder sets the
    /// rest); boxed, so that a report is small on its way through the channel.
    pub result: Result<(i32, i64), Box<(KafkaError, Record)>>,
}

/// Forwards delivery reports from librdkafka's polling thread to the pipeline.
#[derive(Debug)]
pub struct ReportContext {
    tx: mpsc::UnboundedSender<Report>,
    generation: u32,
    /// Where TLS and login failures are reported (with the SASL user).
    security: Option<(SecurityStatus, Option<String>)>,
    /// Connections to cluster nodes that are up, from librdkafka's statistics
    /// (every 2 s); -1 before the first.
    brokers_up: AtomicI64,
}

impl ReportContext {
    /// See `brokers_up`: a producer with connections up that gets no answer
    /// is waiting for acknowledgements, not wedged.
    pub fn brokers_up(&self) -> i64 {
        self.brokers_up.load(Ordering::Relaxed)
    }
}

impl ClientContext for ReportContext {
    fn stats_raw(&self, raw: &[u8]) {
        // Only what we use: the broker states, not the whole statistics tree.
        #[derive(serde::Deserialize)]
        struct Stats {
            brokers: HashMap<String, Broker>,
        }
        #[derive(serde::Deserialize)]
        struct Broker {
            nodeid: i32,
            state: String,
        }
        if let Ok(s) = serde_json::from_slice::<Stats>(raw) {
            let up = s
                .brokers
                .values()
                .filter(|b| b.nodeid >= 0 && b.state == "UP")
                .count();
            self.brokers_up.store(up as i64, Ordering::Relaxed);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some((status, user)) = &self.security {
            if let Some((kind, message)) =
                security::kafka::classify(&error, reason, user.as_deref())
            {
                status.failed("kafka", kind, message);
                return;
            }
        }
        // Broker connection errors are expected during an outage; /readyz and
        // gateway_kafka_reachable report them, so keep the log readable.
        tracing::debug!(%error, reason, "librdkafka");
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        // librdkafka's own log (and its `debug` contexts, when set in
        // kafka.properties) goes to our log instead of the unused `log` crate.
        tracing::debug!(target: "iot_gateway::librdkafka", ?level, fac, "{message}");
    }
}

impl ProducerContext for ReportContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let result = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, msg)) => Err(Box::new((
                e.clone(),
                Record {
                    ts_ms: msg.timestamp().to_millis(),
                    key: msg.key().map(<[u8]>::to_vec),
                    headers: msg
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| {
                                    let v = x.value.unwrap_or_default().to_vec();
                                    (x.key.to_string().into(), v.into())
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    ..Record::default()
                },
            ))),
        };
        // The receiver is gone only when the pipeline stopped: nothing to do.
        let _ = self.tx.send(Report {
            generation: self.generation,
            id,
            result,
        });
    }
}

/// The producer, with a thread of its own that serves its events (delivery
/// reports, statistics, errors). Like rdkafka's `ThreadedProducer`, but its
/// poll waits 1 s instead of 100 ms: rdkafka's poll loop spins through the
/// last fraction of a millisecond of each wait (the remaining time rounds down
/// to a 0 ms wait), which at 100 ms cost an idle gateway about 0.5 % of a core.
/// An event ends the wait at once, so reports are not delayed.
pub struct GatewayProducer {
    inner: Arc<BaseProducer<ReportContext>>,
    stop: Arc<AtomicBool>,
}

/// How long one poll of the producer's thread waits for an event.
const POLL_WAIT: Duration = Duration::from_secs(1);

impl GatewayProducer {
    fn start(inner: BaseProducer<ReportContext>) -> Result<Self, KafkaError> {
        let inner = Arc::new(inner);
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (inner.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-events".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    p.poll(POLL_WAIT);
                }
                // The last reference may be this one: librdkafka's destroy
                // then runs here, off the async runtime.
            })
            .map_err(|e| KafkaError::ClientCreation(format!("starting its event thread: {e}")))?;
        Ok(GatewayProducer { inner, stop })
    }
}

impl std::ops::Deref for GatewayProducer {
    type Target = BaseProducer<ReportContext>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Drop for GatewayProducer {
    /// The event thread ends within one poll wait (1 s), without being waited for
    /// (a replaced producer is dropped on the async runtime).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for GatewayProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayProducer")
    }
}

/// The producer in use, shared with the reachability probe; the forwarder
/// replaces it when it has to be recreated.
pub type ProducerSlot = Arc<RwLock<Arc<GatewayProducer>>>;

/// The producer in `slot` now.
pub fn current(slot: &ProducerSlot) -> Arc<GatewayProducer> {
    crate::sync::read(slot).clone()
}

/// The servers, the typed security keys and the pass-through security
/// properties: what every client of ours (producer, admin, probe) starts from.
/// Producer-only properties are left out (an admin client would refuse them).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers);
    cfg.security().apply(&mut c);
    for (k, v) in &cfg.properties {
        if k.starts_with("ssl") || k.starts_with("sasl") || k.starts_with("security") {
            c.set(k, v);
        }
    }
    c
}

/// Builds a producer with our defaults, then the pass-through properties; its
/// delivery reports go to `tx` marked with `generation`, TLS and login
/// failures to `security`.
pub fn producer(
    cfg: &KafkaConfig,
    tx: mpsc::UnboundedSender<Report>,
    generation: u32,
    security: SecurityStatus,
) -> Result<GatewayProducer, KafkaError> {
    let mut c = client_config(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        // Room for every record we allow in flight, so `send` never sees a full queue.
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight.max(1000) * 2 + 1000).to_string(),
        )
        .set("client.id", "iot-gateway")
        // Broker connection states for the probe (see ReportContext::brokers_up).
        .set("statistics.interval.ms", "2000");
    // librdkafka's own log reaches ours (at debug level); rdkafka would set its
    // level from the unused `log` crate, i.e. errors only. With a `debug`
    // property set, everything it says.
    c.set_log_level(if cfg.properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Info
    });
    if cfg.delivery_mode == DeliveryMode::Sync {
        // One record at a time: do not wait for a batch that never fills.
        c.set("linger.ms", "0");
    }
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    let user = cfg.security().user().map(str::to_string);
    GatewayProducer::start(c.create_with_context(ReportContext {
        tx,
        generation,
        security: Some((security, user)),
        brokers_up: AtomicI64::new(-1),
    })?)
}

/// Whether a brand-new client gets cluster metadata (blocking; call from
/// `spawn_blocking`). Tells a wedged producer client from an unreachable Kafka.
pub fn fresh_client_reaches(cfg: &KafkaConfig, timeout: Duration) -> bool {
    let Ok(client) = client_config(cfg).create::<rdkafka::producer::BaseProducer>() else {
        return false;
    };
    client.client().fetch_metadata(None, timeout).is_ok()
}

/// Errors that retrying cannot fix: the record goes to the DLQ instead. A
/// missing ACL is not one of them: it is fixed on the broker, and the record
/// waits (spooled or unacknowledged) until then.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidRequiredAcks
                | C::InvalidTopic
        )
    )
}

/// What a metadata request says about a topic.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicState {
    Exists {
        partitions: usize,
        /// Partitions without a leader or with fewer in-sync replicas than
        /// replicas: a lost broker of a cluster, not an unreachable Kafka.
        under_replicated: usize,
    },
    Missing,
    /// The broker refuses to describe it to us (ACL).
    NotAuthorized,
}

/// Asks the cluster about `topic` (blocking; call from `spawn_blocking`);
/// also returns how many brokers the metadata lists.
pub fn topic_state<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<(TopicState, usize), KafkaError> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    let state = match md.topics().iter().find(|t| t.name() == topic) {
        Some(t)
            if t.error().map(RDKafkaErrorCode::from)
                == Some(RDKafkaErrorCode::TopicAuthorizationFailed) =>
        {
            TopicState::NotAuthorized
        }
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => TopicState::Exists {
            partitions: t.partitions().len(),
            under_replicated: t
                .partitions()
                .iter()
                .filter(|p| p.leader() < 0 || p.isr().len() < p.replicas().len())
                .count(),
        },
        _ => TopicState::Missing,
    };
    Ok((state, md.brokers().len()))
}

/// Creates topics with the configured partitions and replication.
pub async fn create_topics(cfg: &KafkaConfig, topics: &[(&str, i32)]) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(cfg).create().map_err(|e| e.to_string())?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(cfg.replication_factor)))
        .collect();
    let results = admin
        .create_topics(new.iter(), &AdminOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(format!("creating topic {t}: {code}")),
        }
    }
    Ok(())
}

/// The value of header `name` as text, if present and UTF-8.
pub fn header_str<'a>(h: &'a impl Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Queue depth of the producer (records not yet acknowledged by Kafka).
pub fn queue_depth(p: &GatewayProducer) -> i64 {
    i64::from(p.in_flight_count())
}
