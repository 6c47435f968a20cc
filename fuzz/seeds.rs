//! Writes the seed inputs of the fuzz targets into `fuzz/corpus/<target>/`
//! (`scripts/fuzz` runs it first; the files are named by content, so writing
//! again changes nothing). Readings are the shapes the README documents and the
//! invalid corpus of the tests; spool inputs are made with the spool's own
//! encoder, so the fuzzer starts from records whose checksums hold.

use std::path::Path;

use iot_gateway::gateway::spool::format::{self, Record};

fn write(target: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let name = format!("seed-{:08x}", crc32c::crc32c(data));
    std::fs::write(dir.join(name), data).expect("seed");
}

fn record(n: u64, dlq: bool) -> Record {
    Record {
        received_ms: 1_767_225_600_000 + n as i64,
        ts_ms: n.is_multiple_of(2).then_some(1_767_225_600_000),
        dlq,
        seq: (!n.is_multiple_of(3)).then_some(n),
        key: (!n.is_multiple_of(4)).then(|| format!("dev-{n}").into_bytes()),
        headers: vec![
            ("schema".into(), b"1".as_slice().into()),
            (
                "source".into(),
                b"sensors/dev-1/telemetry".as_slice().into(),
            ),
        ],
        value: format!(r#"{{"device_id":"dev-{n}","humidity":40,"temperature":21.5}}"#)
            .into_bytes(),
        ..Record::default()
    }
}

fn main() {
    let payloads: &[&str] = &[
        r#"{"device_id":"dev-1","temperature":21.5,"humidity":40,"seq":7,"ts":"2026-01-01T00:00:01.250Z"}"#,
        r#"{"temperature":"22","humidity":" 41.5 ","seq":"3","ts":1767225601000}"#,
        r#"{"temperature":21,"humidity":40,"device_id":null,"seq":null,"ts":null}"#,
        r#"{"temperature":NaN,"humidity":40}"#,
        r#"{"temperature":-Infinity,"humidity":40}"#,
        r#"{"temperature":"2\u0030","humidity":40}"#,
        r#"{"temperature":20,"temperature":21,"humidity":40}"#,
        r#"{"temperature":85.5,"humidity":40}"#,
        r#"{"temperature":1,"humidity":2,"ts":"2001-01-01T00:00:00Z"}"#,
        r#"[21.5, 40]"#,
        "{\u{201c}temperature\u{201d}:21}",
        "21\u{b0}C",
        "{\"t\": 21} \u{e9}",
    ];
    for p in payloads {
        for flags in [0u8, 1] {
            let mut d = vec![flags];
            d.extend_from_slice(p.as_bytes());
            write("reading", &d);
        }
        let mut agg = vec![0u8, 0];
        agg.extend_from_slice(p.as_bytes());
        agg.extend_from_slice(&[0xFF, 1, 200]);
        agg.extend_from_slice(p.as_bytes());
        write("aggregator", &agg);
    }
    for t in [
        "sensors/+/telemetry\nsensors/dev-1/telemetry",
        "zigbee2mqtt/# sensors/+/x/+\nsensors/d/x/e",
        "+/+ #\n/x",
        "a/b\na/b",
        "sensors/+/telemetry\nsensors/K\u{fc}hlschrank K\u{fc}che/telemetry",
    ] {
        write("topic", t.as_bytes());
    }
    let mut seg = format::segment_header(0, 1_767_225_600_000).to_vec();
    for n in 0..4 {
        let mut one = Vec::new();
        format::encode(&record(n, n == 3), n, &mut one);
        write("spool_record", &one);
        seg.extend_from_slice(&one);
    }
    // [count][base][len u16][bytes]... then a checkpoint.
    let mut dir = vec![1u8, 0];
    let body = &seg[format::SEGMENT_HEADER_LEN..];
    dir.extend_from_slice(&(body.len() as u16).to_le_bytes());
    dir.extend_from_slice(body);
    dir.extend_from_slice(&format::checkpoint(1, 2, 1_767_225_600_000));
    write("spool_recovery", &dir);
    let mut two = vec![2u8, 0];
    two.extend_from_slice(&(body.len() as u16).to_le_bytes());
    two.extend_from_slice(body);
    two.extend_from_slice(&[4]);
    two.extend_from_slice(&(10u16).to_le_bytes());
    two.extend_from_slice(&body[..10]);
    write("spool_recovery", &two);
    for name in ["gateway.toml", "aggregator.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(name);
        write("config", &std::fs::read(path).expect("sample config"));
    }
    write(
        "config",
        b"[mqtt]\nurl = \"mqtt://u:p@h:1\"\n[aggregation]\nwindow_secs = 18446744073709551615\n",
    );
    println!("seeds written to fuzz/corpus/");
}
