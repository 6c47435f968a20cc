//! The one place where raw sensor input becomes a typed [`Reading`], and where a
//! reading becomes the canonical Kafka record. Pure code: no I/O, no clock (the
//! receive time is passed in), so every rejection and boundary is unit-tested.
//!
//! Accepted payload: a JSON object with `temperature` (deg C) and `humidity` (%RH)
//! as numbers or numeric strings, and optional `device_id`, `ts` (RFC 3339 or
//! integer epoch milliseconds) and `seq` (per-device counter).
//!
//! Longer than the rest: the one parser of outside payloads, with its fast path and its general
//! path side by side (they must agree on every input, which the fuzzer checks), and its unit tests
//! (about 470 lines).

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Version of the canonical record, sent in the `schema` header.
pub const SCHEMA_VERSION: &str = "1";

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 64;

/// Validation limits (the `[validation]` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Lowest accepted temperature, deg C (inclusive).
    pub temperature_min: f64,
    /// Highest accepted temperature, deg C (inclusive).
    pub temperature_max: f64,
    /// Lowest accepted relative humidity, % (inclusive).
    pub humidity_min: f64,
    /// Highest accepted relative humidity, % (inclusive).
    pub humidity_max: f64,
    /// Largest accepted payload, bytes (inclusive).
    pub max_payload_bytes: usize,
    /// How far a device timestamp may be ahead of the receive time.
    pub max_future_secs: u64,
    /// How far a device timestamp may be behind the receive time.
    pub max_past_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            temperature_min: -40.0,
            temperature_max: 85.0,
            humidity_min: 0.0,
            humidity_max: 100.0,
            max_payload_bytes: 4096,
            max_future_secs: 300,
            max_past_secs: 7 * 24 * 3600,
        }
    }
}

/// Why a payload was rejected. [`Rejection::code`] is a short fixed string used as
/// a metric label and as the `reason` header of the dead-letter record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("payload is {size} bytes, larger than the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("payload is not valid UTF-8 (invalid byte at offset {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("payload is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("payload is JSON but not an object (got {0})")]
    NotAnObject(&'static str),
    #[error("required field `{0}` is missing or null")]
    MissingField(&'static str),
    #[error("field `{field}`: expected {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("field `{0}` is not a finite number (NaN or Infinity)")]
    NotFinite(&'static str),
    #[error("field `{field}` = {value} is outside [{min}, {max}]")]
    OutOfRange {
        field: &'static str,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error("bad device id {id:?}: {why}")]
    BadDeviceId { id: String, why: &'static str },
    #[error(
        "device id in the topic ({topic:?}) differs from `device_id` in the payload ({payload:?})"
    )]
    DeviceIdMismatch { topic: String, payload: String },
    #[error("no device id: not in the topic and no `device_id` field")]
    NoDeviceId,
    #[error("timestamp {ts} is {ahead_secs} s ahead of the receive time (limit {limit_secs} s)")]
    TimestampInFuture {
        ts: String,
        ahead_secs: i64,
        limit_secs: u64,
    },
    #[error("timestamp {ts} is {behind_secs} s before the receive time (limit {limit_secs} s)")]
    TimestampTooOld {
        ts: String,
        behind_secs: i64,
        limit_secs: u64,
    },
    /// Validating the payload panicked (a bug of ours, not of the device): the
    /// message is dead-lettered with the panic message so nothing else stops.
    #[error("internal error while validating: {0}")]
    Internal(String),
}

impl Rejection {
    /// Every code [`Rejection::code`] can return, for pre-registering metrics.
    pub const CODES: [&'static str; 14] = [
        "payload_too_large",
        "invalid_utf8",
        "malformed_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "not_finite",
        "out_of_range",
        "bad_device_id",
        "device_id_mismatch",
        "no_device_id",
        "ts_in_future",
        "ts_too_old",
        "internal_error",
    ];

    /// Short fixed code, used as a metric label value and DLQ `reason` header.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::PayloadTooLarge { .. } => "payload_too_large",
            Rejection::InvalidUtf8 { .. } => "invalid_utf8",
            Rejection::MalformedJson(_) => "malformed_json",
            Rejection::NotAnObject(_) => "not_an_object",
            Rejection::MissingField(_) => "missing_field",
            Rejection::WrongType { .. } => "wrong_type",
            Rejection::NotFinite(_) => "not_finite",
            Rejection::OutOfRange { .. } => "out_of_range",
            Rejection::BadDeviceId { .. } => "bad_device_id",
            Rejection::DeviceIdMismatch { .. } => "device_id_mismatch",
            Rejection::NoDeviceId => "no_device_id",
            Rejection::TimestampInFuture { .. } => "ts_in_future",
            Rejection::TimestampTooOld { .. } => "ts_too_old",
            Rejection::Internal(_) => "internal_error",
        }
    }
}

/// A validated reading. Nothing downstream of [`parse`] sees raw JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device_id: String,
    /// Degrees Celsius, finite and within limits.
    pub temperature: f64,
    /// Relative humidity in percent, finite and within limits.
    pub humidity: f64,
    /// Per-device counter, when the device sends one.
    pub seq: Option<u64>,
    /// Event time in epoch milliseconds: the device's `ts` when given and valid,
    /// otherwise the receive time.
    pub ts_ms: i64,
}

impl Reading {
    /// This reading seen as a [`ReadingRef`].
    pub fn view(&self) -> ReadingRef<'_> {
        ReadingRef {
            ts_replaced: None,
            device_id: Cow::Borrowed(&self.device_id),
            temperature: self.temperature,
            humidity: self.humidity,
            seq: self.seq,
            ts_ms: self.ts_ms,
        }
    }

    /// The canonical record value: JSON with sorted keys
    /// (`device_id`, `humidity`, `seq` when known, `temperature`, `ts`).
    pub fn to_canonical_json(&self) -> String {
        let mut out = String::with_capacity(128);
        self.view().write_canonical_json(&mut out);
        out
    }

    /// Appends the canonical JSON to `out` (lets hot paths reuse a buffer).
    pub fn write_canonical_json(&self, out: &mut String) {
        self.view().write_canonical_json(out)
    }
}

/// A validated reading whose device id is borrowed from the payload or the
/// topic where it can be: what the hot paths use ([`parse_ref`]), without an
/// allocation per reading.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingRef<'a> {
    pub device_id: Cow<'a, str>,
    pub temperature: f64,
    pub humidity: f64,
    pub seq: Option<u64>,
    pub ts_ms: i64,
    /// With [`TsPolicy::Replace`] or [`TsPolicy::Keep`]: the device's `ts`
    /// could not be used (the rejection code it would have had, and the
    /// device's value), so `ts_ms` is the receive time.
    pub ts_replaced: Option<(&'static str, i64)>,
}

impl ReadingRef<'_> {
    pub fn to_owned(&self) -> Reading {
        Reading {
            device_id: self.device_id.clone().into_owned(),
            temperature: self.temperature,
            humidity: self.humidity,
            seq: self.seq,
            ts_ms: self.ts_ms,
        }
    }

    /// Appends the canonical JSON (see [`Reading::to_canonical_json`]) to `out`.
    pub fn write_canonical_json(&self, out: &mut String) {
        // device_id is restricted to [A-Za-z0-9_.:-]: nothing to escape.
        out.push_str("{\"device_id\":\"");
        out.push_str(&self.device_id);
        out.push_str("\",\"humidity\":");
        write_number(out, self.humidity);
        if let Some(seq) = self.seq {
            out.push_str(",\"seq\":");
            out.push_str(itoa::Buffer::new().format(seq));
        }
        out.push_str(",\"temperature\":");
        write_number(out, self.temperature);
        out.push_str(",\"ts\":\"");
        write_ts(out, self.ts_ms);
        out.push_str("\"}");
    }
}

/// Appends a finite f64 as a JSON number, the same text as Rust's `Display`
/// (shortest round-trip, no exponent) and "0" for -0. ryu is the fast path
/// where its output is that text, minus a trailing ".0": no exponent in this
/// range, and with at most 15 digits no halfway tie (a tie needs 16 or more;
/// ryu rounds ties to even, Display up).
fn write_number(out: &mut String, x: f64) {
    if x == 0.0 {
        // Avoid "-0", which is valid JSON but surprises consumers.
        out.push('0');
        return;
    }
    if (1e-5..1e16).contains(&x.abs()) {
        let mut b = ryu::Buffer::new();
        let s = b.format_finite(x);
        let s = s.strip_suffix(".0").unwrap_or(s);
        if s.bytes().filter(u8::is_ascii_digit).count() <= 15 {
            out.push_str(s);
            return;
        }
    }
    let _ = write!(out, "{x}");
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-01-02T03:04:05.678Z`.
pub fn format_ts(ts_ms: i64) -> String {
    let mut s = String::with_capacity(24);
    write_ts(&mut s, ts_ms);
    s
}

/// Appends [`format_ts`] to `out`. The text up to the second is kept (per
/// thread) and reused: at load many readings share a second.
pub fn write_ts(out: &mut String, ts_ms: i64) {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let (secs, ms) = (ts_ms.div_euclid(1000), ts_ms.rem_euclid(1000));
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != secs {
            // chrono's "...:05Z" without the Z; None past its range.
            last.1 = match DateTime::<Utc>::from_timestamp_millis(ts_ms) {
                Some(dt) => {
                    let mut p = dt.to_rfc3339_opts(SecondsFormat::Secs, true);
                    p.pop();
                    p.push('.');
                    p
                }
                None => String::new(),
            };
            last.0 = secs;
        }
        if last.1.is_empty() {
            out.push_str("1970-01-01T00:00:00.000Z");
            return;
        }
        out.push_str(&last.1);
        let ms = ms as u32; // 0..1000
        for d in [ms / 100, ms / 10 % 10, ms % 10] {
            out.push(char::from(b'0' + d as u8));
        }
        out.push('Z');
    })
}

/// Checks a device id: 1..=64 bytes of `[A-Za-z0-9_.:-]`.
pub fn check_device_id(id: &str) -> Result<(), Rejection> {
    let why = if id.is_empty() {
        "empty"
    } else if id.len() > MAX_DEVICE_ID_BYTES {
        "longer than 64 bytes"
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        "characters outside [A-Za-z0-9_.:-]"
    } else {
        return Ok(());
    };
    Err(Rejection::BadDeviceId {
        id: truncate_for_message(id),
        why,
    })
}

fn truncate_for_message(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Validates one payload.
///
/// `topic_device` is the device id taken from the MQTT topic, if any;
/// `received_ms` is the receive time (epoch ms), used for `ts` checks and as the
/// event time when the payload has no `ts`.
pub fn parse(
    payload: &[u8],
    topic_device: Option<&str>,
    received_ms: i64,
    limits: &Limits,
) -> Result<Reading, Rejection> {
    parse_ref(payload, topic_device, received_ms, limits).map(|r| r.to_owned())
}

/// [`parse`], borrowing the device id from `payload` or `topic_device` (owned
/// only when the payload's id had to be unescaped).
pub fn parse_ref<'a>(
    payload: &'a [u8],
    topic_device: Option<&'a str>,
    received_ms: i64,
    limits: &Limits,
) -> Result<ReadingRef<'a>, Rejection> {
    parse_ref_with(payload, topic_device, received_ms, limits, TsPolicy::Reject)
}

/// What to do with a device `ts` (README "Clocks at the edge").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsPolicy {
    /// Outside `[received - max_past, received + max_future]`: rejected
    /// (`ts_in_future` / `ts_too_old`).
    Reject,
    /// Outside that window: the reading keeps the receive time instead, and
    /// says so in [`ReadingRef::ts_replaced`] (our clock is trusted).
    Replace,
    /// Kept as the device gave it (our clock is not trusted); only a `ts`
    /// outside 1970..9999 is replaced by the receive time.
    Keep,
}

/// [`parse_ref`] with a policy for the device's `ts`.
pub fn parse_ref_with<'a>(
    payload: &'a [u8],
    topic_device: Option<&'a str>,
    received_ms: i64,
    limits: &Limits,
    policy: TsPolicy,
) -> Result<ReadingRef<'a>, Rejection> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::PayloadTooLarge {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let text = std::str::from_utf8(payload).map_err(|e| Rejection::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    match plain_fields(text) {
        Some(fields) => finish(fields, topic_device, received_ms, limits, policy),
        None => parse_general(text, topic_device, received_ms, limits, policy),
    }
}

/// The fields of a reading, each extracted or the reason it could not be.
struct Fields<'a> {
    device_id: Result<Option<Cow<'a, str>>, Rejection>,
    temperature: Result<f64, Rejection>,
    humidity: Result<f64, Rejection>,
    seq: Result<Option<u64>, Rejection>,
    ts_ms: Result<Option<i64>, Rejection>,
}

/// The fields a plain reading needs, borrowed from the text.
#[derive(Deserialize)]
struct Plain<'a> {
    #[serde(borrow, default)]
    device_id: Option<&'a str>,
    #[serde(borrow, default)]
    temperature: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    humidity: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    seq: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    ts: Option<Scalar<'a>>,
}

/// A number, or a string without escapes; anything else fails the fast path.
/// serde_json hands a number over as it would to `from_str::<f64/u64/i64>`,
/// so the values equal the general path's.
enum Scalar<'a> {
    U(u64),
    I(i64),
    F(f64),
    S(&'a str),
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::U(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::I(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::F(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::S(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// The fast path (most payloads): a JSON object whose fields all extract,
/// without building a `Value` tree. `None` for anything else (a field of
/// another type, a missing or non-finite number, escapes in a string,
/// duplicate keys), which `parse_general` then explains. Both paths extract
/// the same values, so the result never depends on the path taken.
fn plain_fields(text: &str) -> Option<Fields<'_>> {
    if !text.trim_start().starts_with('{') {
        return None; // serde would also take an array as a struct
    }
    let p: Plain<'_> = serde_json::from_str(text).ok()?;
    let number = |v: Option<Scalar<'_>>| -> Option<f64> {
        let x = match v? {
            Scalar::U(u) => u as f64,
            Scalar::I(i) => i as f64,
            Scalar::F(f) => f,
            Scalar::S(s) => s.trim().parse::<f64>().ok()?,
        };
        x.is_finite().then_some(x)
    };
    let seq = match p.seq {
        None => None,
        Some(Scalar::U(u)) => Some(u),
        Some(Scalar::S(s)) => Some(s.trim().parse::<u64>().ok()?),
        Some(_) => return None,
    };
    let ts_ms = match p.ts {
        None => None,
        Some(Scalar::U(u)) => Some(i64::try_from(u).ok()?),
        Some(Scalar::I(i)) => Some(i),
        Some(Scalar::S(s)) => Some(
            DateTime::parse_from_rfc3339(s.trim())
                .ok()?
                .timestamp_millis(),
        ),
        Some(Scalar::F(_)) => return None,
    };
    Some(Fields {
        device_id: Ok(p.device_id.map(Cow::Borrowed)),
        temperature: Ok(number(p.temperature)?),
        humidity: Ok(number(p.humidity)?),
        seq: Ok(seq),
        ts_ms: Ok(ts_ms),
    })
}

/// For the fuzz targets: the fast path's result (`None` when it declines) and
/// the general path's, for the same text.
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub fn both_paths<'a>(
    text: &'a str,
    topic_device: Option<&'a str>,
    received_ms: i64,
    limits: &Limits,
) -> (
    Option<Result<ReadingRef<'a>, Rejection>>,
    Result<ReadingRef<'a>, Rejection>,
) {
    let fast =
        plain_fields(text).map(|f| finish(f, topic_device, received_ms, limits, TsPolicy::Reject));
    (
        fast,
        parse_general(text, topic_device, received_ms, limits, TsPolicy::Reject),
    )
}

/// The fields a reading has, as values, skipping the others the way the fast
/// path does. A `Value` tree refuses a whole document for a number out of
/// f64's range anywhere (`{"t ":1e5601008}`), while skipping a field does
/// not look at its number: found by the fuzzer, the two paths disagreed.
fn known_fields(text: &str) -> Option<Value> {
    #[derive(Deserialize)]
    struct Known {
        device_id: Option<Value>,
        temperature: Option<Value>,
        humidity: Option<Value>,
        seq: Option<Value>,
        ts: Option<Value>,
    }
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let k: Known = serde_json::from_str(text).ok()?;
    let map: Map<String, Value> = [
        ("device_id", k.device_id),
        ("temperature", k.temperature),
        ("humidity", k.humidity),
        ("seq", k.seq),
        ("ts", k.ts),
    ]
    .into_iter()
    .filter_map(|(name, v)| Some((name.to_string(), v?)))
    .collect();
    Some(Value::Object(map))
}

/// Any payload, through a `Value` tree: every rejection explained.
fn parse_general<'a>(
    text: &str,
    topic_device: Option<&'a str>,
    received_ms: i64,
    limits: &Limits,
    policy: TsPolicy,
) -> Result<ReadingRef<'a>, Rejection> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => match known_fields(text) {
            Some(v) => v,
            // Python's json.dumps writes NaN/Infinity as bare tokens; explain
            // those as not finite instead of as malformed.
            None => match quote_non_finite_tokens(text) {
                Some(fixed) => serde_json::from_str(&fixed)
                    .map_err(|_| Rejection::MalformedJson(e.to_string()))?,
                None => return Err(Rejection::MalformedJson(e.to_string())),
            },
        },
    };
    let obj = match &value {
        Value::Object(map) => map,
        other => return Err(Rejection::NotAnObject(type_name(other))),
    };
    let fields = Fields {
        device_id: optional_string(obj, "device_id").map(|d| d.map(|d| Cow::Owned(d.to_string()))),
        temperature: number_field(obj, "temperature"),
        humidity: number_field(obj, "humidity"),
        seq: seq_field(obj),
        ts_ms: ts_field(obj),
    };
    finish(fields, topic_device, received_ms, limits, policy)
}

/// Checks in a fixed order, so a payload with several faults is always
/// rejected for the same one.
fn finish<'a>(
    f: Fields<'a>,
    topic_device: Option<&'a str>,
    received_ms: i64,
    limits: &Limits,
    policy: TsPolicy,
) -> Result<ReadingRef<'a>, Rejection> {
    let device_id = match (topic_device, f.device_id?) {
        (Some(t), Some(p)) if t != p => {
            return Err(Rejection::DeviceIdMismatch {
                topic: truncate_for_message(t),
                payload: truncate_for_message(&p),
            })
        }
        (Some(t), _) => Cow::Borrowed(t),
        (None, Some(p)) => p,
        (None, None) => return Err(Rejection::NoDeviceId),
    };
    check_device_id(&device_id)?;

    let temperature = f.temperature?;
    let humidity = f.humidity?;
    check_range(
        "temperature",
        temperature,
        limits.temperature_min,
        limits.temperature_max,
    )?;
    check_range(
        "humidity",
        humidity,
        limits.humidity_min,
        limits.humidity_max,
    )?;
    let seq = f.seq?;
    let mut ts_replaced = None;
    let ts_ms = match (f.ts_ms?, policy) {
        (None, _) => received_ms,
        (Some(ts), TsPolicy::Reject) => check_ts(ts, received_ms, limits)?,
        (Some(ts), TsPolicy::Replace) => check_ts(ts, received_ms, limits).unwrap_or_else(|e| {
            ts_replaced = Some((e.code(), ts));
            received_ms
        }),
        (Some(ts), TsPolicy::Keep) if (MIN_TS_MS..=MAX_TS_MS).contains(&ts) => ts,
        (Some(ts), TsPolicy::Keep) => {
            ts_replaced = Some((
                if ts < MIN_TS_MS {
                    "ts_too_old"
                } else {
                    "ts_in_future"
                },
                ts,
            ));
            received_ms
        }
    };

    Ok(ReadingRef {
        device_id,
        temperature,
        humidity,
        seq,
        ts_ms,
        ts_replaced,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{:?}", truncate_for_message(s)),
        other => type_name(other).to_string(),
    }
}

fn optional_string<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Rejection::WrongType {
            field,
            expected: "a string",
            got: describe(other),
        }),
    }
}

/// A required number: a JSON number or a string holding one ("22", " 21.5 ").
fn number_field(obj: &Map<String, Value>, field: &'static str) -> Result<f64, Rejection> {
    let v = match obj.get(field) {
        None | Some(Value::Null) => return Err(Rejection::MissingField(field)),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match v {
        Some(x) if x.is_finite() => Ok(x),
        Some(_) => Err(Rejection::NotFinite(field)),
        None => Err(Rejection::WrongType {
            field,
            expected: "a number or numeric string",
            got: describe(&obj[field]),
        }),
    }
}

fn check_range(field: &'static str, value: f64, min: f64, max: f64) -> Result<(), Rejection> {
    if value < min || value > max {
        return Err(Rejection::OutOfRange {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

fn seq_field(obj: &Map<String, Value>) -> Result<Option<u64>, Rejection> {
    let v = match obj.get("seq") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
    };
    v.map(Some).ok_or_else(|| Rejection::WrongType {
        field: "seq",
        expected: "a non-negative integer",
        got: describe(&obj["seq"]),
    })
}

/// `ts` as epoch ms: an RFC 3339 string or an integer of epoch milliseconds.
fn ts_field(obj: &Map<String, Value>) -> Result<Option<i64>, Rejection> {
    let parsed = match obj.get("ts") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s.trim())
            .ok()
            .map(|dt| dt.timestamp_millis()),
        Some(_) => None,
    };
    parsed.map(Some).ok_or_else(|| Rejection::WrongType {
        field: "ts",
        expected: "an RFC 3339 timestamp or integer epoch milliseconds",
        got: describe(&obj["ts"]),
    })
}

fn check_ts(ts_ms: i64, received_ms: i64, limits: &Limits) -> Result<i64, Rejection> {
    let delta_ms = ts_ms.saturating_sub(received_ms);
    let future_ms = i64::try_from(limits.max_future_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let past_ms = i64::try_from(limits.max_past_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if delta_ms > future_ms {
        return Err(Rejection::TimestampInFuture {
            ts: format_ts(ts_ms),
            ahead_secs: delta_ms / 1000,
            limit_secs: limits.max_future_secs,
        });
    }
    // Saturating: `delta_ms` may be i64::MIN, whose negation overflows.
    if delta_ms < past_ms.saturating_neg() || ts_ms < MIN_TS_MS {
        return Err(Rejection::TimestampTooOld {
            ts: format_ts(ts_ms),
            behind_secs: delta_ms.saturating_neg() / 1000,
            limit_secs: limits.max_past_secs,
        });
    }
    if ts_ms > MAX_TS_MS {
        return Err(Rejection::TimestampInFuture {
            ts: format_ts(ts_ms),
            ahead_secs: delta_ms / 1000,
            limit_secs: limits.max_future_secs,
        });
    }
    Ok(ts_ms)
}

/// Event times are kept between 1970-01-01 and 9999-12-31 whatever the limits
/// (also with the limits lifted for an unsynchronised clock): RFC 3339 can
/// write them, and so can every consumer.
pub const MIN_TS_MS: i64 = 0;
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Rewrites bare `NaN`, `Infinity` and `-Infinity` tokens (outside strings) as
/// strings, so they can be reported as not finite. `None` when there are none.
fn quote_non_finite_tokens(text: &str) -> Option<String> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 8);
    let (mut i, mut in_string, mut changed, mut copied) = (0, false, false, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some(tok) = TOKENS.iter().find(|t| bytes[i..].starts_with(t.as_bytes())) {
            // On bytes: `i` may be inside a multi-byte character here ("21°C"),
            // where slicing the `str` would panic. A token starts with an ASCII
            // byte, so `i` is a char boundary whenever one matches.
            out.push_str(&text[copied..i]);
            out.push('"');
            out.push_str(tok);
            out.push('"');
            i += tok.len();
            copied = i;
            changed = true;
            continue;
        }
        i += 1;
    }
    if !changed {
        return None;
    }
    out.push_str(&text[copied.min(text.len())..]);
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    #[test]
    fn numbers_are_written_as_display_writes_them() {
        let mut xs = vec![
            1e-5,
            9.99e-6,
            1e15,
            9.9e14,
            1658206780088562.2,
            0.1,
            0.3,
            21.5,
            40.0,
            -40.0,
            100.0,
            1e15,
            123456.789,
            -0.0001,
            5e-324,
            1.7e308,
            -21.04,
        ];
        // Deterministic spread over magnitudes and digits.
        let mut r: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..100_000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            let x = f64::from_bits(r);
            if x.is_finite() {
                xs.push(x);
            }
            xs.push((r % 2_000_000) as f64 / 100.0 - 10_000.0);
            // Full-precision values across the fast path's range.
            let m = (r >> 11) as f64 / (1u64 << 53) as f64;
            xs.push(m * 10f64.powi((r % 22) as i32 - 5));
        }
        for x in xs {
            let mut out = String::new();
            write_number(&mut out, x);
            assert_eq!(out, format!("{x}"), "{x:e}");
        }
        let mut out = String::new();
        write_number(&mut out, -0.0);
        assert_eq!(out, "0");
    }

    #[test]
    fn timestamps_match_chrono() {
        let mut out = String::new();
        for ts in [
            NOW,
            NOW + 1,
            NOW + 999,
            NOW + 1000,
            NOW - 1,
            0,
            -1,
            -1001,
            253_402_300_799_999,
        ] {
            out.clear();
            write_ts(&mut out, ts);
            let want = DateTime::<Utc>::from_timestamp_millis(ts)
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            assert_eq!(out, want, "{ts}");
        }
        assert_eq!(format_ts(i64::MAX), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn fast_path_agrees_with_the_general_one() {
        let l = Limits::default();
        let cases = [
            // Taken by the fast path (and each must be):
            (
                true,
                r#"{"device_id":"dev-1","temperature":21.5,"humidity":40,"seq":7,"ts":"2026-01-01T00:00:01.250Z"}"#,
            ),
            (
                true,
                r#"{"temperature":"22","humidity":" 41.5 ","seq":"3","ts":1767225601000,"x":[1,{"y":null}]}"#,
            ),
            (
                true,
                r#" {"temperature":21,"humidity":40,"device_id":null,"seq":null,"ts":null}"#,
            ),
            (true, r#"{"temperature":-99,"humidity":40}"#), // out of range: rejected the same way
            (
                true,
                r#"{"temperature":-5,"humidity":4.05e1,"seq":18446744073709551615}"#,
            ),
            (
                true,
                r#"{"temperature":123456789012345678901234567890,"humidity":1E-2,"seq":0}"#,
            ), // integer past u64: a float on both paths (then out of range)
            (true, r#"{"temperature":20,"humidity":40,"ts":-1}"#),
            (
                true,
                r#"{"temperature":20,"humidity":40,"device_id":"other"}"#,
            ), // mismatch
            (
                true,
                r#"{"temperature":20,"humidity":40,"ts":"2020-01-01T00:00:00Z"}"#,
            ), // too old
            // Left to the general path, which explains them:
            (false, r#"{"temperature":true,"humidity":40}"#),
            (false, r#"{"temperature":"NaN","humidity":40}"#),
            (false, r#"{"temperature":NaN,"humidity":40}"#),
            (false, r#"{"humidity":40}"#),
            (false, r#"{"temperature":20,"humidity":40,"seq":-1}"#),
            (false, r#"{"temperature":20,"humidity":40,"seq":1.5}"#),
            (false, r#"{"temperature":1e400,"humidity":40}"#),
            (false, r#"{"temperature":20,"humidity":40,"ts":1.5}"#),
            (
                false,
                r#"{"temperature":20,"humidity":40,"ts":9223372036854775808}"#,
            ),
            (false, r#"{"temperature":"2\u0030","humidity":40}"#),
            (false, r#"{"temperature":[20],"humidity":40}"#),
            (
                false,
                r#"{"temperature":20,"humidity":40,"ts":"yesterday"}"#,
            ),
            (
                false,
                r#"{"temperature":20,"humidity":40,"device_id":"d\u0031"}"#,
            ),
            (
                false,
                r#"{"temperature":20,"temperature":21,"humidity":40}"#,
            ),
            (false, r#"[21.5, 40]"#),
            (false, r#"{"temperature":20,"humidity":40"#),
        ];
        for (fast, text) in cases {
            let general = parse_general(text, Some("dev-1"), NOW, &l, TsPolicy::Reject);
            match plain_fields(text) {
                Some(f) => {
                    assert!(fast, "fast path took {text}");
                    assert_eq!(
                        finish(f, Some("dev-1"), NOW, &l, TsPolicy::Reject),
                        general,
                        "{text}"
                    );
                }
                None => assert!(!fast, "fast path missed {text}"),
            }
            assert_eq!(parse_ref(text.as_bytes(), Some("dev-1"), NOW, &l), general);
            assert_eq!(
                parse(text.as_bytes(), Some("dev-1"), NOW, &l),
                general.map(|r| r.to_owned())
            );
        }
    }

    fn ok(payload: &str) -> Reading {
        parse(payload.as_bytes(), Some("dev-1"), NOW, &Limits::default()).unwrap()
    }

    fn code(payload: &[u8], topic: Option<&str>) -> &'static str {
        parse(payload, topic, NOW, &Limits::default())
            .unwrap_err()
            .code()
    }

    #[test]
    fn numbers_and_numeric_strings_are_accepted() {
        let r = ok(r#"{"temperature": 22, "humidity": 55}"#);
        assert_eq!((r.temperature, r.humidity), (22.0, 55.0));
        let r = ok(r#"{"temperature": "22", "humidity": "55"}"#);
        assert_eq!((r.temperature, r.humidity), (22.0, 55.0));
        let r = ok(r#"{"temperature": " -3.25 ", "humidity": "1e1"}"#);
        assert_eq!((r.temperature, r.humidity), (-3.25, 10.0));
        assert_eq!(r.device_id, "dev-1");
        assert_eq!(r.ts_ms, NOW, "no ts: receive time");
        assert_eq!(r.seq, None);
    }

    #[test]
    fn optional_fields() {
        let r = ok(
            r#"{"temperature":1,"humidity":2,"seq":7,"ts":"2025-12-31T23:59:00.5Z","device_id":"dev-1"}"#,
        );
        assert_eq!(r.seq, Some(7));
        assert_eq!(r.ts_ms, NOW - 59_500);
        let r = ok(r#"{"temperature":1,"humidity":2,"seq":"8","ts":1767225599000}"#);
        assert_eq!((r.seq, r.ts_ms), (Some(8), NOW - 1000));
        let r = ok(r#"{"temperature":1,"humidity":2,"ts":"2026-01-01T01:00:00+01:00"}"#);
        assert_eq!(r.ts_ms, NOW);
        let r = ok(r#"{"temperature":1,"humidity":2,"seq":null,"ts":null,"device_id":null}"#);
        assert_eq!((r.seq, r.ts_ms), (None, NOW));
    }

    #[test]
    fn device_id_from_topic_or_payload() {
        let p = br#"{"device_id":"abc","temperature":1,"humidity":2}"#;
        assert_eq!(
            parse(p, None, NOW, &Limits::default()).unwrap().device_id,
            "abc"
        );
        assert_eq!(
            parse(p, Some("abc"), NOW, &Limits::default())
                .unwrap()
                .device_id,
            "abc"
        );
        assert_eq!(code(p, Some("xyz")), "device_id_mismatch");
        assert_eq!(
            code(br#"{"temperature":1,"humidity":2}"#, None),
            "no_device_id"
        );
        assert_eq!(
            code(br#"{"device_id":7,"temperature":1,"humidity":2}"#, None),
            "wrong_type"
        );
    }

    #[test]
    fn device_id_boundaries() {
        assert!(check_device_id("a").is_ok());
        assert!(check_device_id("A-z_0.9:x").is_ok());
        assert!(check_device_id(&"x".repeat(64)).is_ok());
        for bad in ["", &"x".repeat(65), "a b", "a/b", "a+b", "é", "a\"b"] {
            assert_eq!(
                check_device_id(bad).unwrap_err().code(),
                "bad_device_id",
                "{bad:?}"
            );
        }
        assert_eq!(
            code(br#"{"temperature":1,"humidity":2}"#, Some("")),
            "bad_device_id"
        );
    }

    #[test]
    fn size_and_encoding() {
        let limits = Limits {
            max_payload_bytes: 39,
            ..Limits::default()
        };
        let exact = br#"{"temperature":1,"humidity":2,"seq":12}"#;
        assert_eq!(exact.len(), 39);
        assert!(parse(exact, Some("d"), NOW, &limits).is_ok());
        let over = br#"{"temperature":1,"humidity":2,"seq":123}"#;
        assert_eq!(
            parse(over, Some("d"), NOW, &limits).unwrap_err(),
            Rejection::PayloadTooLarge {
                size: 40,
                limit: 39
            }
        );
        assert_eq!(code(&vec![b' '; 1 << 20], Some("d")), "payload_too_large");
        assert_eq!(code(b"{\"temperature\":\xff}", Some("d")), "invalid_utf8");
        assert_eq!(code(&[0, 159, 146, 150], Some("d")), "invalid_utf8");
    }

    #[test]
    fn json_shape() {
        for p in [&b"{"[..], b"", b"temperature=1", b"{\"temperature\":1,}"] {
            assert_eq!(code(p, Some("d")), "malformed_json", "{p:?}");
        }
        for p in [&b"[1,2]"[..], b"42", b"\"x\"", b"null", b"true"] {
            assert_eq!(code(p, Some("d")), "not_an_object", "{p:?}");
        }
    }

    #[test]
    fn missing_and_wrong_types() {
        assert_eq!(code(br#"{"humidity":2}"#, Some("d")), "missing_field");
        assert_eq!(code(br#"{"temperature":1}"#, Some("d")), "missing_field");
        assert_eq!(
            code(br#"{"temperature":null,"humidity":2}"#, Some("d")),
            "missing_field"
        );
        for p in [
            r#"{"temperature":"warm","humidity":2}"#,
            r#"{"temperature":true,"humidity":2}"#,
            r#"{"temperature":[1],"humidity":2}"#,
            r#"{"temperature":1,"humidity":{}}"#,
            r#"{"temperature":1,"humidity":2,"seq":-1}"#,
            r#"{"temperature":1,"humidity":2,"seq":1.5}"#,
            r#"{"temperature":1,"humidity":2,"seq":"x"}"#,
            r#"{"temperature":1,"humidity":2,"ts":"yesterday"}"#,
            r#"{"temperature":1,"humidity":2,"ts":1.5}"#,
            r#"{"temperature":1,"humidity":2,"ts":true}"#,
        ] {
            assert_eq!(code(p.as_bytes(), Some("d")), "wrong_type", "{p}");
        }
    }

    #[test]
    fn not_finite() {
        for p in [
            r#"{"temperature":NaN,"humidity":2}"#,
            r#"{"temperature":1,"humidity":Infinity}"#,
            r#"{"temperature":-Infinity,"humidity":2}"#,
            r#"{"temperature":"NaN","humidity":2}"#,
            r#"{"temperature":"inf","humidity":2}"#,
        ] {
            assert_eq!(code(p.as_bytes(), Some("d")), "not_finite", "{p}");
        }
        // The token inside a string stays a string.
        assert_eq!(
            code(br#"{"temperature":"NaN x","humidity":2}"#, Some("d")),
            "wrong_type"
        );
        assert_eq!(
            code(br#"{"note":"NaN", "x": Nope}"#, Some("d")),
            "malformed_json"
        );
    }

    /// Regression (issue 23): non-ASCII outside a JSON string made
    /// `quote_non_finite_tokens` slice inside a character and panic, which
    /// crash-looped the gateway on the broker's redelivery.
    #[test]
    fn non_ascii_outside_strings_is_malformed_not_a_panic() {
        for p in [
            "\u{e9}",
            "{\u{201c}temperature\u{201d}:21}",
            "21\u{b0}C",
            "{\"t\": 21} \u{e9}",
            "\u{e9}NaN",
            "{\"temperature\":NaN\u{b0},\"humidity\":2}",
            "\u{1f600}Infinity\u{1f600}",
            "{\"temperature\":21,\"humidity\":2,\"x\":\"\\\u{e9}\"}\u{e9}",
        ] {
            assert_eq!(code(p.as_bytes(), Some("d")), "malformed_json", "{p:?}");
        }
        assert_eq!(
            code(
                "{\"temperature\":NaN,\"humidity\":2,\"n\":\"\u{e9}\"}".as_bytes(),
                Some("d")
            ),
            "not_finite"
        );
    }

    /// Found by the fuzzer (fuzz/corpus/reading): the fast path skipped a
    /// number out of f64's range in a field it does not read and accepted,
    /// the general path refused the document as malformed.
    #[test]
    fn regression_a_huge_number_in_another_field_is_ignored_on_both_paths() {
        let text = r#"{"temperature":"22","humidity":" 07.5 ","seq":"3","t ":17672e5601004}"#;
        let (fast, general) = both_paths(text, Some("d"), NOW, &Limits::default());
        assert_eq!(fast, Some(general.clone()));
        assert_eq!(general.map(|r| r.humidity), Ok(7.5));
        // In a field it reads, both refuse it.
        assert_eq!(
            code(br#"{"temperature":1e400,"humidity":2}"#, Some("d")),
            "malformed_json"
        );
    }

    /// `ts` = i64::MIN saturated the difference to i64::MIN, whose negation
    /// overflowed (a panic in debug builds; accepted as valid in release).
    #[test]
    fn regression_ts_at_the_ends_of_i64_is_rejected_not_a_panic() {
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1] {
            let p = format!(r#"{{"temperature":1,"humidity":2,"ts":{ts}}}"#);
            let c = code(p.as_bytes(), Some("d"));
            assert!(c == "ts_too_old" || c == "ts_in_future", "{ts}: {c}");
        }
    }

    /// Found by the fuzzer: serde_json's default float parsing can be one
    /// ULP off, so the canonical JSON of a reading parsed back to another
    /// number (feature `float_roundtrip` makes it correctly rounded).
    #[test]
    fn regression_canonical_json_parses_back_to_the_same_numbers() {
        let p = br#"{"temperature":"2","humidity":38.011111000215000000862221108}"#;
        let r = parse(p, Some("dev-1"), NOW, &Limits::default()).unwrap();
        assert_eq!(r.humidity, 38.011111000215);
        let back = parse(
            r.to_canonical_json().as_bytes(),
            None,
            NOW,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn range_boundaries() {
        for (t, h) in [(-40.0, 0.0), (85.0, 100.0), (0.0, 50.0)] {
            let p = format!(r#"{{"temperature":{t},"humidity":{h}}}"#);
            assert!(parse(p.as_bytes(), Some("d"), NOW, &Limits::default()).is_ok());
        }
        for (t, h) in [(-40.01, 0.0), (85.01, 1.0), (1.0, -0.01), (1.0, 100.01)] {
            let p = format!(r#"{{"temperature":{t},"humidity":{h}}}"#);
            assert_eq!(code(p.as_bytes(), Some("d")), "out_of_range", "{p}");
        }
        let limits = Limits {
            temperature_max: 30.0,
            ..Limits::default()
        };
        assert!(parse(
            br#"{"temperature":31,"humidity":1}"#,
            Some("d"),
            NOW,
            &limits
        )
        .is_err());
    }

    #[test]
    fn timestamp_window() {
        let limits = Limits::default();
        let at = |offset_ms: i64| {
            let p = format!(
                r#"{{"temperature":1,"humidity":2,"ts":{}}}"#,
                NOW + offset_ms
            );
            parse(p.as_bytes(), Some("d"), NOW, &limits).map_err(|e| e.code())
        };
        assert!(at(300_000).is_ok());
        assert_eq!(at(300_001), Err("ts_in_future"));
        assert!(at(-7 * 24 * 3600 * 1000).is_ok());
        assert_eq!(at(-7 * 24 * 3600 * 1000 - 1), Err("ts_too_old"));
        // Epoch seconds sent by mistake read as 1970: explained as too old.
        assert_eq!(at(1_767_225_600 - NOW), Err("ts_too_old"));
    }

    #[test]
    fn every_code_is_listed_and_unique() {
        let mut codes = Rejection::CODES.to_vec();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Rejection::CODES.len());
    }

    #[test]
    fn canonical_json_is_sorted_and_stable() {
        let r = Reading {
            device_id: "sensor-0001".into(),
            temperature: 21.5,
            humidity: 40.0,
            seq: Some(3),
            ts_ms: NOW + 123,
        };
        assert_eq!(
            r.to_canonical_json(),
            r#"{"device_id":"sensor-0001","humidity":40,"seq":3,"temperature":21.5,"ts":"2026-01-01T00:00:00.123Z"}"#
        );
        let r = Reading {
            seq: None,
            temperature: -0.0,
            ..r
        };
        let json = r.to_canonical_json();
        assert_eq!(
            json,
            r#"{"device_id":"sensor-0001","humidity":40,"temperature":0,"ts":"2026-01-01T00:00:00.123Z"}"#
        );
        // It is real JSON, and a round trip through the parser gives the same reading.
        let back = parse(json.as_bytes(), None, NOW, &Limits::default()).unwrap();
        assert_eq!(back.temperature, 0.0);
        assert_eq!(back.ts_ms, NOW + 123);
    }
}
