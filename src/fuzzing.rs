//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` call these), kept
//! in the library so that `tests/fuzz_corpus.rs` replays every committed
//! corpus input through the very same checks on the stable toolchain. Each
//! takes arbitrary bytes and panics only when a property is broken.
#![doc(hidden)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use crate::gateway::spool::format;
use crate::reading::{self, Limits};

/// 2026-01-01T00:00:00Z: a fixed receive time, so runs repeat.
const NOW: i64 = 1_767_225_600_000;

/// The names of the targets, for the corpus replay.
pub const TARGETS: [&str; 6] = [
    "reading",
    "aggregator",
    "topic",
    "spool_record",
    "spool_recovery",
    "config",
];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "reading" => reading(data),
        "aggregator" => aggregator(data),
        "topic" => topic(data),
        "spool_record" => spool_record(data),
        "spool_recovery" => spool_recovery(data),
        "config" => config(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

/// The reading parser: never panics; the fast path and the general one agree
/// (same reading, or the same rejection); what we write as canonical JSON
/// parses back to the same reading.
pub fn reading(data: &[u8]) {
    let Some((&flags, payload)) = data.split_first() else {
        return;
    };
    let topic_device = (flags & 1 != 0).then_some("dev-1");
    let limits = Limits::default();
    let parsed = reading::parse_ref(payload, topic_device, NOW, &limits);
    if let Ok(text) = std::str::from_utf8(payload) {
        if payload.len() <= limits.max_payload_bytes {
            let (fast, general) = reading::both_paths(text, topic_device, NOW, &limits);
            if let Some(fast) = fast {
                match (&fast, &general) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "paths disagree on {text:?}"),
                    (Err(a), Err(b)) => {
                        assert_eq!(a.code(), b.code(), "paths disagree on {text:?}")
                    }
                    _ => panic!("paths disagree on {text:?}: {fast:?} vs {general:?}"),
                }
            }
            assert_eq!(
                parsed.as_ref().map_err(|e| e.code()),
                general.as_ref().map_err(|e| e.code())
            );
        }
    }
    match parsed {
        Ok(r) => {
            let json = r.to_owned().to_canonical_json();
            let back = reading::parse_ref(json.as_bytes(), None, NOW, &limits)
                .unwrap_or_else(|e| panic!("canonical {json:?} rejected: {e}"));
            assert_eq!(back, r, "canonical round trip of {json:?}");
        }
        // A fixed code, and a message of bounded size (it becomes a header).
        Err(e) => {
            assert!(reading::Rejection::CODES.contains(&e.code()));
            assert!(e.to_string().len() < 1024, "{e}");
        }
    }
}

/// The aggregator's path: records (split at 0xFF, the first byte of each a
/// key selector and the next a time shift) parsed as the consumer does and
/// applied to the state; nothing panics, counts add up.
pub fn aggregator(data: &[u8]) {
    use crate::aggregator::state::{AggregationConfig, Applied, State};
    let mut state = State::new(AggregationConfig {
        max_devices: 8,
        windows_kept: 3,
        ..Default::default()
    });
    let limits = Limits::default();
    let mut applied = 0u64;
    for (i, rec) in data.split(|&b| b == 0xFF).enumerate() {
        let [k, shift, payload @ ..] = rec else {
            continue;
        };
        let key = ["d1", "d2", "", "dev 3"].get(usize::from(*k % 5)).copied();
        let record_ts = NOW + (i64::from(*shift as i8) << 36);
        let received = record_ts.min(NOW);
        if let Ok(r) = reading::parse(payload, key, received, &limits) {
            state.apply(Applied {
                device: r.device_id,
                temperature: r.temperature,
                humidity: r.humidity,
                ts_ms: r.ts_ms,
                seq: r.seq,
                partition: i32::from(*k % 3),
                offset: i as i64,
                future: *k & 0x80 != 0,
            });
            applied += 1;
        }
    }
    let counted: u64 = state.devices.values().map(|d| d.count).sum();
    assert!(counted <= applied);
    let _ = state.online(NOW);
    for (_, d) in state.sorted() {
        for w in d.windows() {
            assert!(w.start_ms <= w.end_ms);
            let _ = reading::format_ts(w.start_ms);
        }
        let _ = reading::format_ts(d.last_ts_ms);
    }
}

/// MQTT topic -> device id: filters and a topic (split at the first '\n'):
/// the id found is a level of the topic, and checking it never panics.
pub fn topic(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (filters, topic) = text
        .split_once('\n')
        .unwrap_or(("sensors/+/telemetry", &text));
    let filters: Vec<(String, Option<usize>)> = filters
        .split(' ')
        .map(|f| (f.to_string(), f.split('/').position(|s| s == "+")))
        .collect();
    for segment in [None, Some(0), Some(1), Some(7)] {
        if let Some(id) = crate::gateway::intake::device_in_topic(&filters, segment, topic) {
            assert!(
                topic.split('/').any(|l| l == id),
                "{id:?} not a level of {topic:?}"
            );
            let _ = reading::check_device_id(id);
        }
    }
    for (f, _) in &filters {
        let _ = crate::gateway::intake::topic_matches(f, topic);
    }
}

/// One spool record: decoding never panics; what decodes re-encodes to the
/// same bytes; restamping keeps it decodable with the new offset.
pub fn spool_record(data: &[u8]) {
    let _ = format::plausible_start(data, 0, u64::MAX);
    let _ = format::record_len(data);
    if let Ok((r, n)) = format::decode_ref(data) {
        // Resync finds every record the encoder could have written.
        if canonical_flags(data) && (0..1 << 45).contains(&r.received_ms) {
            assert!(format::plausible_start(data, r.offset, r.offset + 1));
        }
        let owned = r.to_owned();
        let mut again = Vec::new();
        format::encode(&owned, r.offset, &mut again);
        // The decoder also takes what the encoder never writes (non-zero
        // bytes in a field its flag says is absent): re-encoding writes the
        // canonical form of the same record.
        if canonical_flags(data) {
            assert_eq!(&again[..], &data[..n], "re-encoding differs");
        }
        let (back, _) = format::decode_ref(&again).expect("re-encoded record decodes");
        assert_eq!(back.to_owned(), owned, "re-encoding changes the record");
        let mut copy = data[..n].to_vec();
        assert_eq!(format::restamp(&mut copy, 42), Ok(n));
        let (r2, _) = format::decode_ref(&copy).expect("restamped record decodes");
        assert_eq!(r2.offset, 42);
    }
}

/// Whether the record's absent fields are zero, as the encoder writes them.
fn canonical_flags(data: &[u8]) -> bool {
    let b = &data[format::RECORD_PREFIX_LEN..];
    let flags = b[24];
    let zero = |r: std::ops::Range<usize>| b[r].iter().all(|&x| x == 0);
    flags & !0x0F == 0
        && (flags & 8 != 0 || zero(16..24))
        && (flags & 2 != 0 || zero(25..33))
        && (flags & 4 != 0 || zero(33..35))
}

/// A whole spool directory built from the bytes: up to four segments and a
/// checkpoint. Recovery never panics, and every record it returns is one
/// whose exact bytes, checksum included, are in the input.
pub fn spool_recovery(data: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "iot-fuzz-spool-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut rest = data;
    let mut files: Vec<Vec<u8>> = Vec::new();
    // [count] then per file: [base u8][len u16 le][bytes]; the rest is the checkpoint.
    let count = rest.first().map_or(0, |c| usize::from(c % 5));
    rest = rest.get(1..).unwrap_or_default();
    for _ in 0..count {
        let [base, l0, l1, tail @ ..] = rest else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
        let (body, more) = tail.split_at(len);
        let mut seg = format::segment_header(u64::from(*base), NOW).to_vec();
        // A body that brings its own header replaces ours.
        if body.starts_with(format::SEGMENT_MAGIC) {
            seg.clear();
        }
        seg.extend_from_slice(body);
        std::fs::write(dir.join(format!("{:020}.seg", base)), &seg).expect("segment");
        files.push(seg);
        rest = more;
    }
    if !rest.is_empty() {
        std::fs::write(dir.join("checkpoint"), rest).expect("checkpoint");
        // The same bytes as the Kafka positions file, also read at start-up.
        let mut text = b"topic weather\n".to_vec();
        text.extend_from_slice(rest);
        std::fs::write(dir.join("kafka-positions"), &text).expect("positions");
        let p = crate::gateway::kafka_positions::Positions::load(&dir, "weather");
        let _ = p.save(&dir);
        assert_eq!(
            crate::gateway::kafka_positions::Positions::load(&dir, "weather"),
            p,
            "positions round trip"
        );
    }
    let opened = crate::gateway::spool::Spool::open(crate::gateway::spool::SpoolOptions {
        dir: dir.clone(),
        max_bytes: 1 << 30,
        segment_bytes: 1 << 20,
        on_full: crate::gateway::spool::OnFull::Block,
    });
    if let Ok((_spool, mut reader, _rec)) = opened {
        let mut last: Option<u64> = None;
        for _ in 0..10_000 {
            let mut seen = Vec::new();
            let n = reader
                .read_with(64, |r| {
                    let mut bytes = Vec::new();
                    format::encode(&r.to_owned(), r.offset, &mut bytes);
                    seen.push((r.offset, bytes));
                })
                .unwrap_or(0);
            for (offset, bytes) in seen {
                assert!(last.is_none_or(|l| offset > l), "offsets go forward");
                last = Some(offset);
                assert!(
                    files
                        .iter()
                        .any(|f| f.windows(bytes.len()).any(|w| w == bytes)),
                    "recovery returned a record that is not in the input"
                );
            }
            if n == 0 {
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The config loader: any TOML text gives a config or an error naming where;
/// validation and the masked printer never panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("fuzz.toml");
    match crate::config::from_toml::<crate::config::GatewayConfig>(text, "fuzz.toml") {
        Ok(c) => {
            if c.validate(origin).is_ok() {
                let _ = c.to_masked_toml();
            }
        }
        Err(e) => assert!(e.to_string().contains("fuzz.toml"), "{e}"),
    }
    if let Ok(c) = crate::config::from_toml::<crate::config::AggregatorConfig>(text, "fuzz.toml") {
        if c.validate(origin).is_ok() {
            let _ = c.to_masked_toml();
        }
    }
    let _ = crate::mqtt::parse_mqtt_url(text);
    let _ = crate::mqtt::redact_url(text);
}
