//! After a crash the spool sends again what its checkpoint does not cover, and
//! Kafka may already have some of it (acknowledged after the last checkpoint,
//! or in flight). To keep those out of Kafka a second time, the forwarder
//! writes, after each checkpoint, the offset of the newest checkpointed record
//! in each partition of the topic (`<spool dir>/kafka-positions`). On a start
//! with records to resend, each partition is read from there to its end, and
//! records whose value is already there are settled without sending them.
//!
//! Per partition Kafka keeps our records in spool order (idempotent producer),
//! so everything of ours after the checkpoint lies after that offset. Without
//! the file (or without read access to the topic) the resend is at least once.

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

const FILE: &str = "kafka-positions";

/// Offset of the newest checkpointed record per partition of `topic`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    topic: String,
    offsets: BTreeMap<i32, i64>,
}

impl Positions {
    pub fn new(topic: &str) -> Self {
        Positions {
            topic: topic.to_string(),
            offsets: BTreeMap::new(),
        }
    }

    /// The saved positions for `topic` (empty when missing, unreadable or
    /// for another topic: then nothing is skipped).
    pub fn load(dir: &Path, topic: &str) -> Self {
        let mut p = Positions::new(topic);
        let Ok(text) = std::fs::read_to_string(dir.join(FILE)) else {
            return p;
        };
        let mut lines = text.lines();
        if lines.next() != Some(&format!("topic {topic}")) {
            return p;
        }
        for line in lines {
            let mut it = line.split(' ');
            match (
                it.next().and_then(|s| s.parse().ok()),
                it.next().and_then(|s| s.parse().ok()),
            ) {
                (Some(part), Some(off)) => {
                    p.offsets.insert(part, off);
                }
                _ => return Positions::new(topic),
            }
        }
        p
    }

    /// A record of the checkpointed prefix is at `offset` of `partition`.
    pub fn note(&mut self, partition: i32, offset: i64) {
        let o = self.offsets.entry(partition).or_insert(offset);
        *o = (*o).max(offset);
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Written to a temporary file and renamed: a crash leaves the old or the
    /// new file, both safe (an older one only means reading more).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let mut text = format!("topic {}\n", self.topic);
        for (p, o) in &self.offsets {
            text.push_str(&format!("{p} {o}\n"));
        }
        let tmp: PathBuf = dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(FILE))
    }
}

pub fn fingerprint(value: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// Blocking: fingerprints of the values after `positions` up to each
/// partition's current end (at most `max` records, within `timeout`).
pub fn already_in_kafka(
    cfg: &KafkaConfig,
    positions: &Positions,
    max: usize,
    timeout: Duration,
) -> Result<HashSet<u64>, String> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = super::kafka::client_config(cfg)
        .set("group.id", "iot-gateway-recovery")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        .create()
        .map_err(|e| e.to_string())?;
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in &positions.offsets {
        let (_, high) = consumer
            .fetch_watermarks(&positions.topic, p, left(deadline))
            .map_err(|e| format!("partition {p}: {e}"))?;
        if high > o + 1 {
            ends.insert(p, high);
            tpl.add_partition_offset(&positions.topic, p, Offset::Offset(o + 1))
                .map_err(|e| e.to_string())?;
        }
    }
    let mut found = HashSet::new();
    if ends.is_empty() {
        return Ok(found);
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let (mut read, mut last_error) = (0usize, None);
    while !ends.is_empty() {
        if Instant::now() >= deadline || read >= max {
            return Err(format!(
                "read {read} records in {timeout:?}, partitions {:?} not to their end{}",
                ends.keys().collect::<Vec<_>>(),
                last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            ));
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        // Errors are not the end: e.g. a principal without group access gets
        // "group authorization failed" once and still fetches its partitions.
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                last_error = Some(e.to_string());
                continue;
            }
        };
        read += 1;
        if let Some(v) = m.payload() {
            found.insert(fingerprint(v));
        }
        if ends
            .get(&m.partition())
            .is_some_and(|&end| m.offset() + 1 >= end)
        {
            ends.remove(&m.partition());
        }
    }
    Ok(found)
}

fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_only_grow() {
        let dir = std::env::temp_dir().join(format!("iot-positions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = Positions::new("weather");
        p.note(0, 10);
        p.note(0, 7);
        p.note(3, 2);
        p.save(&dir).unwrap();
        let back = Positions::load(&dir, "weather");
        assert_eq!(back, p);
        assert_eq!(back.offsets[&0], 10);
        assert!(Positions::load(&dir, "other").is_empty(), "another topic");
        std::fs::write(dir.join(FILE), "topic weather\n0 x\n").unwrap();
        assert!(Positions::load(&dir, "weather").is_empty(), "garbage");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
