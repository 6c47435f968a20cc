//! What stops the gateway (everything else is retried, counted and logged).

use rdkafka::error::KafkaError;

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
    #[error("spool: {0}")]
    Spool(String),
}
