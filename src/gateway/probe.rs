//! Kafka reachability as seen by the gateway: the topic check at start-up,
//! and a probe every 2 s through the producer's own client that keeps
//! `gateway_kafka_reachable` and readiness current, creates missing topics
//! (`kafka.create_topics`), and asks the forwarder to replace a producer that
//! is wedged (librdkafka can stop reconnecting for good after a broker restart)
//! or failed fatally.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::GatewayError;
use super::kafka::{self, GatewayProducer, TopicState};
use super::metrics::GatewayMetrics;
use crate::config::GatewayConfig;
use crate::security::SecurityKind;

/// At start-up: a reachable Kafka without the topic is fatal (or the topic is
/// created); an unreachable Kafka is not (readiness says so, and the probe
/// checks the topic once Kafka answers).
pub async fn check_topics(
    cfg: &GatewayConfig,
    producer: &Arc<GatewayProducer>,
    metrics: &GatewayMetrics,
) -> Result<(), GatewayError> {
    if cfg.kafka.create_topics {
        if let Err(e) = create_topics(cfg).await {
            warn!(error = %e, "could not create topics yet (Kafka down?); trying again when Kafka answers");
        }
    }
    // A topic created a moment ago can still be missing from the broker's
    // metadata: like the probe, believe "missing" only after a few looks.
    let mut looks = 0;
    loop {
        looks += 1;
        match topics_state(cfg, producer.clone(), Duration::from_secs(5)).await {
            Ok(Topics::Ready { .. }) => {
                metrics.set_kafka_reachable(true);
                return Ok(());
            }
            Ok(Topics::Denied(topic)) => {
                // Fixable on the broker while we run: the readings wait.
                metrics.set_kafka_reachable(true);
                not_authorized(cfg, metrics, &topic);
                return Ok(());
            }
            Ok(Topics::Missing(_)) if looks < MISSING_LOOKS => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(Topics::Missing(topic)) => {
                return Err(GatewayError::MissingTopic {
                    topic,
                    servers: cfg.kafka.bootstrap_servers.clone(),
                })
            }
            Err(e) => {
                warn!(servers = %cfg.kafka.bootstrap_servers, error = %e, "Kafka is not reachable; readings wait until it is");
                return Ok(());
            }
        }
    }
}

/// Metadata answers in a row that must lack a topic at start-up before it is missing.
const MISSING_LOOKS: u32 = 3;

/// Creates the main topic and (if enabled) the DLQ; existing ones are kept.
async fn create_topics(cfg: &GatewayConfig) -> Result<(), String> {
    let mut topics = vec![(cfg.kafka.topic.as_str(), cfg.kafka.partitions)];
    if cfg.kafka.dlq_enabled {
        topics.push((cfg.kafka.dlq_topic.as_str(), 1));
    }
    kafka::create_topics(&cfg.kafka, &topics).await
}

/// What the cluster says about our topics.
#[derive(Debug, PartialEq, Eq)]
enum Topics {
    /// Every topic exists; the brokers listed, and the partitions (of all our
    /// topics) that lack a leader or an in-sync replica.
    Ready {
        brokers: usize,
        under_replicated: usize,
    },
    Missing(String),
    /// Our principal may not describe it (a missing ACL).
    Denied(String),
}

async fn topics_state(
    cfg: &GatewayConfig,
    producer: Arc<GatewayProducer>,
    timeout: Duration,
) -> Result<Topics, KafkaError> {
    let mut topics = vec![cfg.kafka.topic.clone()];
    if cfg.kafka.dlq_enabled {
        topics.push(cfg.kafka.dlq_topic.clone());
    }
    tokio::task::spawn_blocking(move || {
        let (mut brokers, mut under) = (0, 0);
        for t in topics {
            let (state, listed) = kafka::topic_state(producer.client(), &t, timeout)?;
            brokers = listed;
            match state {
                TopicState::Missing => return Ok(Topics::Missing(t)),
                TopicState::NotAuthorized => return Ok(Topics::Denied(t)),
                TopicState::Exists {
                    under_replicated, ..
                } => under += under_replicated,
            }
        }
        Ok(Topics::Ready {
            brokers,
            under_replicated: under,
        })
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

fn not_authorized(cfg: &GatewayConfig, metrics: &GatewayMetrics, topic: &str) {
    metrics.security.failed(
        "kafka",
        SecurityKind::Acl,
        not_authorized_message(&cfg.kafka, topic),
    );
}

/// One text for a denied describe (probe) and a denied write (forwarder), so a
/// repeat is recognised and not logged again.
pub fn not_authorized_message(cfg: &crate::config::KafkaConfig, topic: &str) -> String {
    let user = cfg.security().user().unwrap_or("(none)").to_string();
    format!("Kafka: user {user} is not authorized for topic {topic} (it needs Write and Describe); the readings wait")
}

const WEDGED: &str = "Kafka answers a new client but not the producer's (it stopped reconnecting)";

async fn answers_a_new_client(cfg: &GatewayConfig) -> bool {
    let kcfg = cfg.kafka.clone();
    tokio::task::spawn_blocking(move || kafka::fresh_client_reaches(&kcfg, Duration::from_secs(3)))
        .await
        .unwrap_or(false)
}

/// When to call a producer wedged (pure; the probe feeds it).
#[derive(Debug, Default)]
struct Wedge {
    /// Since when the producer's client cannot reach Kafka.
    down_since: Option<Instant>,
    /// Since when a new client reaches Kafka meanwhile.
    fresh_since: Option<Instant>,
    asked: Option<Instant>,
}

impl Wedge {
    /// After this long unreachable through the producer, ask a new client.
    const AFTER: Duration = Duration::from_secs(20);
    /// ...at most this often...
    const ASK_EVERY: Duration = Duration::from_secs(5);
    /// ...and replace the producer once a new client has reached Kafka for
    /// this long: more than librdkafka's reconnect backoff (10 s at most), so
    /// a producer that is merely about to reconnect is left alone.
    const CONFIRM: Duration = Duration::from_secs(12);

    fn reachable(&mut self) {
        *self = Wedge::default();
    }

    /// The producer's client failed; true if a new client should be asked now.
    fn unreachable(&mut self, now: Instant) -> bool {
        let since = *self.down_since.get_or_insert(now);
        let ask = now.duration_since(since) >= Self::AFTER
            && self
                .asked
                .is_none_or(|a| now.duration_since(a) >= Self::ASK_EVERY);
        if ask {
            self.asked = Some(now);
        }
        ask
    }

    /// What the new client found; true when the producer is to be replaced.
    fn fresh_client(&mut self, now: Instant, reached: bool) -> bool {
        if !reached {
            self.fresh_since = None;
            return false;
        }
        let first = *self.fresh_since.get_or_insert(now);
        if now.duration_since(first) >= Self::CONFIRM {
            self.reachable();
            return true;
        }
        false
    }
}

/// Every 2 s: is Kafka reachable (through the producer's own client), do the
/// topics exist, is the producer still usable. A producer that stays cut off
/// while a new client reaches Kafka, or that hit a fatal error, is replaced
/// (librdkafka 2.12 can stop reconnecting for good after a broker restart).
/// `durable`: the log keeps readings through a Kafka outage (see `log::Opened`).
pub async fn probe_kafka(
    cfg: GatewayConfig,
    slot: kafka::ProducerSlot,
    metrics: GatewayMetrics,
    stop: CancellationToken,
    fatal: mpsc::Sender<GatewayError>,
    recreate: mpsc::Sender<String>,
    durable: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // A topic must be missing on several probes in a row before we give up:
    // metadata can lag right after a broker (re)start.
    let mut missing_probes = 0;
    let mut wedge = Wedge::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let producer = kafka::current(&slot);
        if let Some((code, reason)) = producer.client().fatal_error() {
            // An idempotent producer in a fatal state never sends again.
            let _ = recreate.try_send(format!("fatal producer error {code:?}: {reason}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let was = metrics.kafka_reachable();
        let connected = producer.context().brokers_up() > 0;
        let state = topics_state(&cfg, producer, Duration::from_secs(3)).await;
        // The producer's own connections can be busy rather than cut off: with
        // acks=all its requests wait while a dead cluster node is still in the
        // ISR, and the metadata request queues behind them. If a new client
        // gets an answer, Kafka is reachable (one lost broker of three is not
        // a "down" to page anyone about).
        let busy = state.is_err() && was && answers_a_new_client(&cfg).await;
        if state.is_ok() {
            wedge.reachable();
        }
        match state {
            Err(e) if busy => {
                debug!(error = %e, connected, "the producer's metadata request failed, a new client's did not");
                if connected {
                    // Its connections are up: waiting for acknowledgements
                    // (e.g. below min.insync.replicas). Replacing it would
                    // send again what Kafka may still commit: duplicates.
                    wedge.reachable();
                } else if wedge.unreachable(Instant::now())
                    && wedge.fresh_client(Instant::now(), true)
                {
                    let _ = recreate.try_send(WEDGED.into());
                }
            }
            Ok(Topics::Ready {
                brokers,
                under_replicated,
            }) => {
                missing_probes = 0;
                if !was {
                    info!(servers = %cfg.kafka.bootstrap_servers, "Kafka reachable");
                }
                metrics.set_kafka_reachable(true);
                let (was_brokers, was_under) = (
                    metrics.kafka_brokers.get(),
                    metrics.kafka_under_replicated.get(),
                );
                if was_brokers > 0 && (brokers as i64) < was_brokers {
                    warn!(
                        brokers,
                        before = was_brokers,
                        "a Kafka broker left the cluster; producing through the others"
                    );
                } else if (brokers as i64) > was_brokers && was_brokers > 0 {
                    info!(brokers, "a Kafka broker joined the cluster");
                }
                if under_replicated > 0 && was_under == 0 {
                    warn!(under_replicated, "partitions without a leader or with missing in-sync replicas; acks may wait (min.insync.replicas)");
                } else if under_replicated == 0 && was_under > 0 {
                    info!("every partition fully replicated again");
                }
                metrics.kafka_brokers.set(brokers as i64);
                metrics.kafka_under_replicated.set(under_replicated as i64);
                // An ACL problem with readings waiting is cleared by their
                // delivery (the forwarder): describing a topic is not writing it.
                let waiting = metrics.in_flight.get() > 0;
                metrics
                    .security
                    .cleared_if("kafka", |kind, _| kind != SecurityKind::Acl || !waiting);
            }
            Ok(Topics::Denied(topic)) => {
                missing_probes = 0;
                metrics.set_kafka_reachable(true);
                not_authorized(&cfg, &metrics, &topic);
            }
            Ok(Topics::Missing(topic)) if missing_probes < 3 => {
                missing_probes += 1;
                if cfg.kafka.create_topics {
                    if let Err(e) = create_topics(&cfg).await {
                        warn!(topic = %topic, error = %e, "creating the topic failed");
                    }
                } else {
                    warn!(topic = %topic, "topic not found (yet) on a reachable Kafka");
                }
            }
            Ok(Topics::Missing(topic)) => {
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
                metrics.set_kafka_reachable(false);
                if connected {
                    wedge.reachable(); // waiting on live connections, see above
                } else if wedge.unreachable(Instant::now()) {
                    let fresh = answers_a_new_client(&cfg).await;
                    if wedge.fresh_client(Instant::now(), fresh) {
                        let _ = recreate.try_send(WEDGED.into());
                    }
                }
            }
        }
        let _ = metrics.readiness(cfg.mqtt.enabled, durable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnecting_producer_is_left_alone_a_wedged_one_replaced() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Wedge::default();
        // Kafka down: nobody is asked during the first 20 s.
        for s in (0..20).step_by(2) {
            assert!(!w.unreachable(at(s)));
        }
        assert!(w.unreachable(at(20)));
        assert!(!w.fresh_client(at(20), false), "Kafka is down for everyone");
        assert!(!w.unreachable(at(22)), "asked at most every 5 s");
        assert!(w.unreachable(at(26)));
        // Kafka is back for new clients; the producer reconnects in time.
        assert!(!w.fresh_client(at(26), true));
        w.reachable();
        assert!(!w.unreachable(at(28)), "a new outage starts from zero");
        // Wedged: a new client reaches Kafka for 12 s, the producer never does.
        assert!(w.unreachable(at(48)));
        assert!(!w.fresh_client(at(48), true));
        assert!(w.unreachable(at(54)));
        assert!(!w.fresh_client(at(54), true));
        assert!(w.unreachable(at(60)));
        assert!(w.fresh_client(at(60), true), "replace");
        assert!(!w.unreachable(at(62)), "and start over");
    }
}
