"""The baseline peer: the gateway's job done the way a Python user would do it.

MQTT (paho-mqtt) -> json.loads -> json.dumps(sort_keys=True) -> Kafka (confluent-kafka,
produce with a delivery callback, as in confluent-kafka's own examples). paho acks QoS 1
messages on receipt, before Kafka has them: weaker guarantees than the gateway, and less
work per message.

usage: python_bridge.py MQTT_HOST MQTT_PORT TOPIC_FILTER KAFKA_BOOTSTRAP KAFKA_TOPIC CLIENT_ID
"""

import json
import signal
import sys

import paho.mqtt.client as mqtt
from confluent_kafka import Producer

host, port, topic_filter, bootstrap, kafka_topic, client_id = sys.argv[1:7]
producer = Producer(
    {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "compression.type": "lz4",
        "linger.ms": 5,
    }
)
errors = 0


def on_delivery(err, msg):
    global errors
    if err is not None:
        errors += 1
        print(f"delivery failed: {err}", file=sys.stderr)


def on_message(client, userdata, m):
    try:
        d = json.loads(m.payload)
        device = m.topic.split("/")[1]
        record = {
            "device_id": device,
            "temperature": float(d["temperature"]),
            "humidity": float(d["humidity"]),
        }
        if "seq" in d:
            record["seq"] = int(d["seq"])
        if "ts" in d:
            record["ts"] = d["ts"]
    except (ValueError, KeyError, TypeError) as e:
        print(f"bad payload: {e}", file=sys.stderr)
        return
    value = json.dumps(record, sort_keys=True)
    while True:
        try:
            producer.produce(kafka_topic, key=device, value=value, on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.1)
    producer.poll(0)


def stop(*_):
    client.disconnect()


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
client.max_inflight_messages_set(1000)
client.on_message = on_message
client.connect(host, int(port))
client.subscribe(topic_filter, qos=1)
signal.signal(signal.SIGTERM, stop)
client.loop_forever()
producer.flush(30)
sys.exit(1 if errors else 0)
