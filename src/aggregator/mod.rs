//! The aggregator: a Kafka consumer-group service that keeps per-device and
//! fleet aggregates of the readings and serves them as Prometheus metrics and a
//! small JSON API.
//!
//! At least once, never double counted: a record's offset is stored only after
//! the reading was applied (`enable.auto.offset.store=false`); stored offsets are
//! committed every second, on revoke and on shutdown. Within an instance, a
//! record at or below a partition's applied offset is skipped (a replay after a
//! rebalance), and so is a `seq` not newer than the device's last one (a
//! redelivery by the gateway). State lives in memory: on revoke the partitions'
//! devices are dropped; a newly assigned partition's devices start from the
//! committed offset, and their windows are whole again after one window plus
//! the allowed lateness.

pub mod api;
pub mod metrics;
pub mod state;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::metrics::AggregatorMetrics;
use self::state::{Applied, Outcome, State};
use crate::config::AggregatorConfig;
use crate::reading;

/// State shared by the consumer loop, the rebalance callbacks and HTTP.
#[derive(Debug)]
pub struct Shared {
    pub state: Mutex<State>,
    pub assigned: Mutex<BTreeSet<i32>>,
    pub metrics: AggregatorMetrics,
    pub max_devices: usize,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a
        // way worse than losing the service; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn assigned(&self) -> MutexGuard<'_, BTreeSet<i32>> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("{0}")]
    Http(String),
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// Consumer callbacks: commit and forget state on revoke, note assignments.
struct RebalanceContext {
    shared: Arc<Shared>,
}

impl ClientContext for RebalanceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka");
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what was applied so the next owner starts right after it.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                if !matches!(
                    e,
                    KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
                ) {
                    warn!(error = %e, "commit on revoke failed");
                }
            }
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            info!(partitions = ?parts, "partitions revoked; dropping their devices");
            self.shared.state().revoke(&parts);
            let mut a = self.shared.assigned();
            for p in &parts {
                a.remove(p);
            }
            self.shared.metrics.assigned.set(a.len() as i64);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            info!(partitions = ?parts, "partitions assigned");
            let mut a = self.shared.assigned();
            a.extend(parts);
            self.shared.metrics.assigned.set(a.len() as i64);
        }
    }
}

type AggConsumer = StreamConsumer<RebalanceContext>;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs until `shutdown` is cancelled; then commits stored offsets and returns.
pub async fn run(
    cfg: AggregatorConfig,
    shutdown: CancellationToken,
) -> Result<(), AggregatorError> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(cfg.aggregation.clone())),
        assigned: Mutex::new(BTreeSet::new()),
        metrics: AggregatorMetrics::new(),
        max_devices: cfg.metrics.max_devices,
    });
    let listener = crate::http::bind(&cfg.http.listen, "http.listen")
        .await
        .map_err(AggregatorError::Http)?;
    info!(addr = %cfg.http.listen, "serving /metrics, /healthz, /readyz, /api/devices");
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(crate::http::serve(
        listener,
        api::router(shared.clone()),
        http_stop.clone(),
    ));

    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.bootstrap_servers)
        .set("group.id", &cfg.kafka.group_id)
        .set("auto.offset.reset", &cfg.kafka.auto_offset_reset)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("client.id", "iot-aggregator");
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    let consumer: Arc<AggConsumer> = Arc::new(c.create_with_context(RebalanceContext {
        shared: shared.clone(),
    })?);
    consumer.subscribe(&[&cfg.kafka.topic])?;
    info!(topic = %cfg.kafka.topic, group = %cfg.kafka.group_id, "aggregator consuming");

    let lag_stop = CancellationToken::new();
    tokio::spawn(lag_loop(
        consumer.clone(),
        shared.clone(),
        cfg.kafka.topic.clone(),
        lag_stop.clone(),
    ));

    let limits = cfg.validation.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => match m {
                Ok(msg) => {
                    apply(&shared, &msg, &limits);
                    if let Err(e) = consumer.store_offset_from_message(&msg) {
                        warn!(error = %e, "storing offset failed");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    info!(
        consumed = shared.metrics.consumed.get(),
        applied = shared.metrics.applied_count(),
        "shutting down: committing offsets"
    );
    lag_stop.cancel();
    let c2 = consumer.clone();
    let committed =
        tokio::task::spawn_blocking(move || c2.commit_consumer_state(CommitMode::Sync)).await;
    match committed {
        Ok(Ok(())) => info!("offsets committed"),
        Ok(Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset))) => {}
        Ok(Err(e)) => warn!(error = %e, "final commit failed; some records will be read again"),
        Err(e) => warn!(error = %e, "final commit task failed"),
    }
    consumer.unsubscribe();
    http_stop.cancel();
    let _ = http_task.await;
    Ok(())
}

/// Validates and applies one record; anything unusable is counted by reason.
fn apply(shared: &Shared, msg: &BorrowedMessage<'_>, limits: &reading::Limits) {
    let m = &shared.metrics;
    m.consumed.inc();
    let Some(payload) = msg.payload() else {
        m.skipped("empty");
        return;
    };
    let key = match msg.key().map(std::str::from_utf8) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(_)) => {
            m.skipped("bad_key");
            return;
        }
    };
    let record_ts = msg.timestamp().to_millis().unwrap_or_else(now_ms);
    let r = match reading::parse(payload, key, record_ts, limits) {
        Ok(r) => r,
        Err(rej) => {
            tracing::debug!(reason = rej.code(), %rej, partition = msg.partition(), offset = msg.offset(), "record skipped");
            m.skipped(rej.code());
            return;
        }
    };
    let (t, h) = (r.temperature, r.humidity);
    let outcome = shared.state().apply(
        Applied {
            device: r.device_id,
            temperature: t,
            humidity: h,
            ts_ms: r.ts_ms,
            seq: r.seq,
            partition: msg.partition(),
            offset: msg.offset(),
        },
        now_ms(),
    );
    match outcome {
        Outcome::Applied | Outcome::AppliedLate => {
            m.applied(t, h, outcome == Outcome::AppliedLate);
        }
        Outcome::ReplayedOffset => m.skipped("replayed_offset"),
        Outcome::DuplicateSeq => m.skipped("duplicate_seq"),
    }
}

/// Every few seconds: consumer lag per partition, readings/s, device gauges.
async fn lag_loop(
    consumer: Arc<AggConsumer>,
    shared: Arc<Shared>,
    topic: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last = (shared.metrics.applied_count(), std::time::Instant::now());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let applied = shared.metrics.applied_count();
        let now = std::time::Instant::now();
        let rate = (applied - last.0) as f64 / (now - last.1).as_secs_f64().max(1e-3);
        shared.metrics.rate.set(rate);
        last = (applied, now);
        let (c, t) = (consumer.clone(), topic.clone());
        let parts: Vec<i32> = shared.assigned().iter().copied().collect();
        let lags = tokio::task::spawn_blocking(move || {
            let positions = c.position().ok();
            parts
                .into_iter()
                .filter_map(|p| {
                    let (low, high) = c.fetch_watermarks(&t, p, Duration::from_secs(2)).ok()?;
                    let pos = positions
                        .as_ref()
                        .and_then(|tpl| tpl.find_partition(&t, p))
                        .and_then(|e| e.offset().to_raw())
                        .filter(|o| *o >= 0);
                    // Nothing consumed yet: the whole partition is behind.
                    let lag = pos.map_or(high - low, |pos| (high - pos).max(0));
                    Some((p, lag))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        shared.metrics.set_lags(&lags);
    }
}
