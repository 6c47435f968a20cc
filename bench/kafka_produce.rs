//! Benchmark helper: produces pre-serialized canonical readings with a plain
//! rdkafka producer configured like the gateway's (idempotent, acks=all, lz4,
//! linger 5 ms). Used for the Kafka ceiling and to pre-fill topics.
//!
//!   cargo run --release --example kafka_produce -- BOOTSTRAP TOPIC COUNT DEVICES [--headers]
//!
//! `--headers`: each record also carries the gateway's three headers (`schema`,
//! `source`, `received_at`), so the run shows librdkafka's own cost for the
//! gateway's record shape.
//!
//! Prints one JSON line: {"count":N,"delivered":N,"seconds":S,"rate":R,"cpu_us_per_record":C}
//! (C: this process's user+system CPU over the run, all threads).

#[path = "cpu.rs"]
mod cpu;
use cpu::cpu_seconds;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_gateway::reading::Reading;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

struct Count(Arc<AtomicU64>, Arc<AtomicU64>);

impl ClientContext for Count {}

impl ProducerContext for Count {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => self.0.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.1.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let headers = args.get(5).map(String::as_str) == Some("--headers");
    if args.len() != 5 && !(args.len() == 6 && headers) {
        return Err("usage: kafka_produce BOOTSTRAP TOPIC COUNT DEVICES [--headers]".into());
    }
    let (bootstrap, topic) = (&args[1], &args[2]);
    let count: u64 = args[3].parse()?;
    let devices: u64 = args[4].parse()?;
    let now = chrono::Utc::now().timestamp_millis();
    // Pre-serialize: the ceiling measures Kafka, not JSON.
    let records: Vec<(String, String)> = (0..count)
        .map(|i| {
            let d = i % devices;
            let r = Reading {
                device_id: format!("sensor-{:05}", d + 1),
                temperature: 15.0 + (i % 200) as f64 / 10.0,
                humidity: 30.0 + (i % 500) as f64 / 10.0,
                seq: Some(i / devices + 1),
                ts_ms: now - (count - i) as i64 / 100,
            };
            (r.device_id.clone(), r.to_canonical_json())
        })
        .collect();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let producer: ThreadedProducer<Count> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .create_with_context(Count(ok.clone(), failed.clone()))?;
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    let received_at = iot_gateway::reading::format_ts(now);
    for (key, value) in &records {
        let mut rec = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(value.as_str());
        if headers {
            rec = rec.headers(
                OwnedHeaders::new_with_capacity(3)
                    .insert(Header {
                        key: "schema",
                        value: Some("1"),
                    })
                    .insert(Header {
                        key: "source",
                        value: Some("sensors/sensor-00001/telemetry"),
                    })
                    .insert(Header {
                        key: "received_at",
                        value: Some(received_at.as_str()),
                    }),
            );
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let delivered = ok.load(Ordering::Relaxed);
    println!(
        "{{\"count\":{count},\"delivered\":{delivered},\"failed\":{},\"seconds\":{secs:.3},\"rate\":{:.0},\"cpu_us_per_record\":{:.3}}}",
        failed.load(Ordering::Relaxed),
        delivered as f64 / secs,
        cpu / count.max(1) as f64 * 1e6
    );
    if delivered != count {
        return Err(format!("only {delivered} of {count} delivered").into());
    }
    Ok(())
}
