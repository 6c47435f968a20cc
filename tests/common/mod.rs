//! Helpers shared by the integration tests: where the real services are, unique
//! names so tests never see each other's data, and a loud failure naming
//! `scripts/stack up` when a service is missing.
#![allow(dead_code)] // each test crate uses a different subset

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Kafka bootstrap servers: `KAFKA_BOOTSTRAP_SERVERS`, default the local stack.
pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// MQTT broker URL: `MQTT_BROKER`, default the local stack.
pub fn mqtt_broker() -> String {
    std::env::var("MQTT_BROKER").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into())
}

/// (host, port) of [`mqtt_broker`].
pub fn mqtt_host_port() -> (String, u16) {
    let url = mqtt_broker();
    let rest = url.strip_prefix("mqtt://").unwrap_or(&url);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    let port = port
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|_| panic!("MQTT_BROKER={url}: port is not a number"));
    (host.to_string(), port)
}

/// Prometheus base URL: `PROMETHEUS_URL`, default the local stack.
pub fn prometheus_url() -> String {
    std::env::var("PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:9090".into())
}

/// A name no other test (or earlier run) uses: `prefix-<pid>-<time>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{nanos}-{n}", std::process::id())
}

fn unreachable(service: &str, addr: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is not reachable at {addr}: {why}.\n\
         The integration tests need the real local stack: start it with `scripts/stack up` \
         (or run everything with `scripts/test`)."
    )
}

fn require_tcp(service: &str, addr: &str) {
    let sock = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(sock)) => sock,
        Ok(None) => unreachable(service, addr, "address did not resolve"),
        Err(e) => unreachable(service, addr, e),
    };
    if let Err(e) = TcpStream::connect_timeout(&sock, Duration::from_secs(3)) {
        unreachable(service, addr, e);
    }
}

/// Fails the test, naming `scripts/stack up`, unless a Kafka broker answers a
/// metadata request.
pub fn require_kafka() {
    let bootstrap = kafka_bootstrap();
    let first = bootstrap.split(',').next().unwrap_or_default().to_string();
    require_tcp("Kafka", &first);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap_or_else(|e| unreachable("Kafka", &bootstrap, e));
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        unreachable("Kafka", &bootstrap, e);
    }
}

/// Fails the test, naming `scripts/stack up`, unless the MQTT broker accepts TCP.
pub fn require_mqtt() {
    let (host, port) = mqtt_host_port();
    require_tcp("Mosquitto (MQTT)", &format!("{host}:{port}"));
}

/// Creates a topic on the test Kafka and waits until it is usable.
pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create_topics request");
    for r in results {
        if let Err((t, code)) = r {
            panic!("creating topic {t} failed: {code}");
        }
    }
}
