//! Kafka: topics (created and visible) and reading a topic back.

use super::*;

/// Creates a topic on the test Kafka and waits until it is usable.
pub(crate) async fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]).await
}

/// [`create_topic`] with topic configs (e.g. `max.message.bytes`).
pub(crate) async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", kafka_bootstrap());
    create_topic_in(base, name, partitions, configs).await
}

/// [`create_topic_with`] on the cluster `base` (servers, security) points at.
pub(crate) async fn create_topic_in(
    base: ClientConfig,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    create_replicated_topic_in(base, name, partitions, 1, configs).await
}

/// [`create_topic_in`] with `replicas` copies of each partition (a cluster).
pub(crate) async fn create_replicated_topic_in(
    base: ClientConfig,
    name: &str,
    partitions: i32,
    replicas: i32,
    configs: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = base.create().expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replicas));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create_topics request");
    for r in results {
        if let Err((t, code)) = r {
            panic!("creating topic {t} failed: {code}");
        }
    }
    // Created is not yet visible: wait until the broker's metadata lists it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .map(|md| {
                md.topics().iter().any(|t| {
                    t.name() == name
                        && t.error().is_none()
                        && t.partitions().len() == partitions as usize
                })
            })
            .unwrap_or(false);
        if listed {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "topic {name} created but not in the metadata after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ HTTP

/// Reads `topic` from the beginning until `want` messages arrived (or `timeout`),
/// then keeps reading for `settle` more to catch extras.
pub(crate) async fn consume(
    topic: &str,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    consume_from(&kafka_bootstrap(), topic, want, timeout, settle).await
}

/// [`consume`] from another cluster.
pub(crate) async fn consume_from(
    bootstrap: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", bootstrap);
    consume_in(base, topic, want, timeout, settle).await
}

/// [`consume`] with a client config (servers, security) of its own.
pub(crate) async fn consume_in(
    mut base: ClientConfig,
    topic: &str,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::StreamConsumer;
    let consumer: StreamConsumer = base
        .set("group.id", unique_name("test-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut settle_until: Option<tokio::time::Instant> = None;
    loop {
        let until = settle_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(m)) => {
                out.push(m.detach());
                if out.len() >= want && settle_until.is_none() {
                    settle_until = Some(tokio::time::Instant::now() + settle);
                }
            }
            // A cluster node that is down shows up as transport errors while
            // the others serve: not the end of the reading.
            Ok(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                | rdkafka::types::RDKafkaErrorCode::AllBrokersDown,
            ))) => {}
            Ok(Err(e)) => panic!("consuming {topic}: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// Header value as text (the gateway's own helper).
pub(crate) fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::Message;
    iot_gateway::gateway::kafka::header_str(m.headers()?, name)
}

// ------------------------------------------------------------------ processes
