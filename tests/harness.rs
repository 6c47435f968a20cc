//! Proves the test harness against the real local stack: a keyed message through
//! Kafka with rdkafka, and a QoS1 round trip through Mosquitto with rumqttc.

mod common;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::test]
async fn kafka_keyed_message_round_trip() {
    common::require_kafka();
    let topic = common::unique_name("harness");
    common::create_topic(&topic, 3).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka_bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .key("sensor-0001")
                .payload(r#"{"temperature":21.5}"#)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "schema",
                    value: Some("1"),
                })),
            Duration::from_secs(10),
        )
        .await
        .expect("delivery");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka_bootstrap())
        .set("group.id", common::unique_name("harness-group"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("no message within 30 s")
        .expect("consume error");
    assert_eq!(msg.key(), Some(&b"sensor-0001"[..]));
    assert_eq!(msg.payload(), Some(&br#"{"temperature":21.5}"#[..]));
    assert_eq!(
        (msg.partition(), msg.offset()),
        (delivery.partition, delivery.offset)
    );
    let header = msg.headers().expect("headers").get(0);
    assert_eq!(header.key, "schema");
    assert_eq!(header.value, Some(&b"1"[..]));
}

#[tokio::test]
async fn mqtt_qos1_round_trip() {
    common::require_mqtt();
    let (host, port) = common::mqtt_host_port();
    let topic = format!("{}/telemetry", common::unique_name("harness"));

    let mut opts = MqttOptions::new(common::unique_name("harness-sub"), host, port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    let mut published = false;
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await.expect("mqtt connection") {
                Event::Incoming(Packet::SubAck(_)) if !published => {
                    published = true;
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, &b"hello"[..])
                        .await
                        .expect("publish");
                }
                Event::Incoming(Packet::Publish(p)) => return p,
                _ => {}
            }
        }
    })
    .await
    .expect("no message within 10 s");
    assert_eq!(received.topic, topic);
    assert_eq!(&received.payload[..], b"hello");
    assert_eq!(received.qos, QoS::AtLeastOnce);
}
