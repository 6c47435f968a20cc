//! HTTP and Prometheus text: GET without a client crate, samples, scrapes.

use super::*;

/// Minimal HTTP/1.1 GET (tests only): returns (status, body), or an error text.
pub(crate) fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) value: f64,
}

/// Parses the Prometheus text format (what `/metrics` serves).
pub(crate) fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => panic!("bad metrics line: {line}"),
        };
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in: {line}")),
        };
        let (name, labels) = match name_labels.find('{') {
            None => (name_labels.to_string(), Default::default()),
            Some(i) => {
                let inner = name_labels[i + 1..].trim_end_matches('}');
                (name_labels[..i].to_string(), parse_labels(inner))
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(mut s: &str) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    while let Some(eq) = s.find("=\"") {
        let key = s[..eq].trim_start_matches(',').trim().to_string();
        let rest = &s[eq + 2..];
        let mut val = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => val.push('\n'),
                    Some((_, c2)) => val.push(c2),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        m.insert(key, val);
        s = &rest[end..];
    }
    m
}

/// Sum of the samples `name` whose labels include all of `labels` (`None`
/// when no sample matches).
pub(crate) fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

/// Fetches and parses `http://addr/metrics`.
pub(crate) fn scrape(addr: &str) -> Vec<Sample> {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    parse_prometheus(&body)
}

// ------------------------------------------------------------------ Kafka reading

/// Device id -> count from an aggregator's `/api/devices` at `http` (empty
/// while it does not answer).
pub(crate) fn device_counts(http: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut path = "/api/devices".to_string();
    loop {
        let Ok((200, body)) = http_get(http, &path) else {
            return Default::default();
        };
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/devices: {e}: {body}"));
        for d in v["devices"].as_array().expect("devices") {
            out.insert(
                d["device_id"].as_str().expect("id").to_string(),
                d["count"].as_u64().expect("count"),
            );
        }
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/api/devices?cursor={c}"),
            None => return out,
        }
    }
}
