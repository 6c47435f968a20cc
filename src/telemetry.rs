//! Logging and metrics plumbing shared by the services: tracing set-up (human or
//! JSON, never secrets) and Prometheus text encoding.

use prometheus::{Encoder, Registry, TextEncoder};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the running log filter (SIGHUP reloads `log.level`).
static RELOAD: std::sync::OnceLock<Reload> = std::sync::OnceLock::new();

/// `RUST_LOG`, when set and not empty.
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Installs the global tracing subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init_tracing(format: LogFormat, level: &str) {
    let filter = rust_log()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only on a terminal: log files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    match format {
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
            }
        }
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
            }
        }
    }
}

/// Applies a new `log.level` to the running process.
pub fn set_log_level(level: &str) -> Result<(), String> {
    if rust_log().is_some() {
        return Err("RUST_LOG is set and wins over log.level".into());
    }
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    match RELOAD.get() {
        Some(reload) => reload(filter),
        None => Err("logging was not set up by this process".into()),
    }
}

/// The registry in Prometheus text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::with_capacity(16 * 1024);
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Histogram buckets for latencies, seconds: 0.5 ms .. 10 s (finer from 10
/// to 25 ms, where a 20 ms objective is judged).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
