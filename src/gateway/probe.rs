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
use tracing::{info, warn};

use super::kafka::{self, GatewayProducer, TopicState};
use super::metrics::GatewayMetrics;
use super::GatewayError;
use crate::config::GatewayConfig;

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

/// After this long with a producer that cannot reach Kafka, ask a new client:
/// if it can, the producer is wedged and is replaced.
const WEDGED_AFTER: Duration = Duration::from_secs(20);

/// Every 2 s: is Kafka reachable (through the producer's own client), do the
/// topics exist, is the producer still usable. A producer that stays cut off
/// while a new client reaches Kafka, or that hit a fatal error, is replaced
/// (librdkafka 2.12 can stop reconnecting for good after a broker restart).
pub async fn probe_kafka(
    cfg: GatewayConfig,
    slot: kafka::ProducerSlot,
    metrics: GatewayMetrics,
    stop: CancellationToken,
    fatal: mpsc::Sender<GatewayError>,
    recreate: mpsc::Sender<String>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // A topic must be missing on several probes in a row before we give up:
    // metadata can lag right after a broker (re)start.
    let mut missing_probes = 0;
    let mut down_since: Option<Instant> = None;
    // Since when a new client reaches Kafka while the producer's does not.
    let mut fresh_since: Option<Instant> = None;
    let mut asked = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let producer = kafka::current(&slot);
        metrics.kafka_queue_depth.set(kafka::queue_depth(&producer));
        if let Some((code, reason)) = producer.client().fatal_error() {
            // An idempotent producer in a fatal state never sends again.
            let _ = recreate.try_send(format!("fatal producer error {code:?}: {reason}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let state = topics_state(&cfg, producer, Duration::from_secs(3)).await;
        let was = metrics.kafka_reachable.get() == 1;
        if state.is_ok() {
            down_since = None;
            fresh_since = None;
        }
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
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= WEDGED_AFTER && asked.elapsed() >= Duration::from_secs(5) {
                    asked = Instant::now();
                    let kcfg = cfg.kafka.clone();
                    let fresh = tokio::task::spawn_blocking(move || {
                        kafka::fresh_client_reaches(&kcfg, Duration::from_secs(5))
                    })
                    .await
                    .unwrap_or(false);
                    // Longer than librdkafka's reconnect backoff (10 s at most):
                    // a producer that is merely waiting to reconnect is left alone.
                    let first = fresh.then(|| *fresh_since.get_or_insert_with(Instant::now));
                    if !fresh {
                        fresh_since = None;
                    } else if first.is_some_and(|t| t.elapsed() >= Duration::from_secs(12)) {
                        let _ = recreate.try_send(
                            "Kafka answers a new client but not the producer's (it stopped reconnecting)"
                                .into(),
                        );
                        down_since = None;
                        fresh_since = None;
                    }
                }
            }
        }
        let _ = metrics.readiness(cfg.mqtt.enabled, cfg.spool.enabled);
    }
}
