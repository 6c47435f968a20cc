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

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
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
        crate::sync::lock(&self.state)
    }

    fn assigned(&self) -> MutexGuard<'_, BTreeSet<i32>> {
        crate::sync::lock(&self.assigned)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("{0}")]
    Http(String),
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the consumer thread died: {0}")]
    ConsumerDied(String),
}

/// Consumer callbacks: commit and forget state on revoke, note assignments.
struct RebalanceContext {
    shared: Arc<Shared>,
    /// The SASL user, for messages.
    user: Option<String>,
}

impl ClientContext for RebalanceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match crate::security::kafka::classify(&error, reason, self.user.as_deref()) {
            Some((kind, message)) => self.shared.metrics.security.failed("kafka", kind, message),
            None => tracing::debug!(%error, reason, "librdkafka"),
        }
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
            self.shared
                .metrics
                .security
                .cleared("kafka", &crate::security::SecurityKind::ALL);
            let mut a = self.shared.assigned();
            a.extend(parts);
            self.shared.metrics.assigned.set(a.len() as i64);
        }
    }
}

type AggConsumer = BaseConsumer<RebalanceContext>;

pub(crate) use crate::clock::now_ms;

/// Runs until `shutdown` is cancelled; then commits stored offsets and returns.
pub async fn run(
    cfg: AggregatorConfig,
    shutdown: CancellationToken,
) -> Result<(), AggregatorError> {
    let clock_stop = CancellationToken::new();
    crate::clock::watch(cfg.clock.sync, clock_stop.clone());
    let _stop_clock = clock_stop.drop_guard();
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
    c.set("bootstrap.servers", &cfg.kafka.bootstrap_servers);
    cfg.kafka.security().apply(&mut c);
    c.set("group.id", &cfg.kafka.group_id)
        .set("auto.offset.reset", &cfg.kafka.auto_offset_reset)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        // Catch-up memory is librdkafka's prefetch: a fetch's compressed bytes
        // become a few times more in messages plus ~200 B of bookkeeping each
        // (an 8 MiB fetch peaked at 165 MiB RSS). Small fetches keep it low;
        // what made them slow was librdkafka waiting fetch.queue.backoff.ms
        // (default 1 s) whenever the local queue was over its bound. With
        // 10 ms: 1 MiB fetches, ~45 MiB peak, over 450k readings/s here.
        .set("max.partition.fetch.bytes", "262144")
        .set("fetch.max.bytes", "1048576")
        .set("queued.max.messages.kbytes", "2048")
        .set("queued.min.messages", "10000")
        .set("fetch.queue.backoff.ms", "10")
        // Incremental rebalancing: when an instance joins or dies only the
        // partitions that move are revoked, so the others keep their devices'
        // state instead of all starting again from the committed offsets.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("client.id", "iot-aggregator");
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    let consumer: Arc<AggConsumer> = Arc::new(c.create_with_context(RebalanceContext {
        shared: shared.clone(),
        user: cfg.kafka.security().user().map(str::to_string),
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

    // The consumer runs on a thread of its own: it polls librdkafka directly
    // (no per-message wake-up) and applies readings in batches under one lock.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (consumer, shared, stop) = (consumer.clone(), shared.clone(), stop.clone());
        let (limits, topic) = (cfg.validation.clone(), cfg.kafka.topic.clone());
        std::thread::Builder::new()
            .name("consumer".into())
            .spawn(move || consume_loop(&consumer, &shared, &limits, &topic, &stop))
            .map_err(|e| AggregatorError::Http(format!("cannot start the consumer thread: {e}")))?
    };
    // systemd: ready once subscribed and serving HTTP; the consumer thread
    // feeds the watchdog.
    let mut notifier = crate::systemd::Notifier::from_env();
    notifier.ready("consuming");
    // The consumer thread ends only when told to: ending otherwise (a panic)
    // ends the process with an error, so systemd or compose restarts it
    // instead of a live process that counts nothing.
    let mut worker = tokio::task::spawn_blocking(move || worker.join());
    let died = tokio::select! {
        _ = shutdown.cancelled() => None,
        joined = &mut worker => Some(joined),
    };
    notifier.stopping();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    lag_stop.cancel();
    let result = match died {
        None => {
            let _ = worker.await;
            Ok(())
        }
        Some(joined) => {
            let why = match joined {
                Ok(Err(panic)) => crate::guard::panic_message(&*panic),
                _ => "it stopped".into(),
            };
            tracing::error!(%why, "the consumer thread died; exiting so the service is restarted");
            Err(AggregatorError::ConsumerDied(why))
        }
    };
    http_stop.cancel();
    let _ = http_task.await;
    result
}

/// A consumed record, parsed outside the state lock.
type Parsed = Result<Applied, &'static str>;

fn parse_record(msg: &BorrowedMessage<'_>, limits: &reading::Limits) -> Parsed {
    let payload = msg.payload().ok_or("empty")?;
    let key = match msg.key().map(std::str::from_utf8) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(_)) => return Err("bad_key"),
    };
    // The producer chooses the record timestamp: it may stand for the receive
    // time only where it is not ahead of our own clock, so `ts` is checked
    // against the wall clock (a future-dated record would freeze the device).
    let now = now_ms();
    let received = msg.timestamp().to_millis().map_or(now, |t| t.min(now));
    // Our own clock judges `ts` only while it is synchronised (README
    // "Clocks at the edge"); a `ts` ahead of it is counted, not trusted.
    let policy = if crate::clock::synced() {
        reading::TsPolicy::Replace
    } else {
        reading::TsPolicy::Keep
    };
    let parsed = crate::guard::catch(|| {
        crate::guard::failpoint("parse", payload);
        reading::parse_ref_with(payload, key, received, limits, policy).map(|r| {
            let future = matches!(r.ts_replaced, Some(("ts_in_future", _)));
            (r.to_owned(), future)
        })
    })
    .unwrap_or_else(|panic| {
        tracing::error!(
            partition = msg.partition(),
            offset = msg.offset(),
            payload_hash = %crate::guard::payload_hash(payload),
            %panic,
            "parsing a record panicked (a bug): skipped as internal_error, the rest goes on"
        );
        Err(reading::Rejection::Internal(panic))
    });
    match parsed {
        Ok((r, future)) => Ok(Applied {
            future,
            device: r.device_id,
            temperature: r.temperature,
            humidity: r.humidity,
            ts_ms: r.ts_ms,
            seq: r.seq,
            partition: msg.partition(),
            offset: msg.offset(),
        }),
        Err(rej) => {
            tracing::debug!(reason = rej.code(), %rej, partition = msg.partition(), offset = msg.offset(), "record skipped");
            Err(rej.code())
        }
    }
}

/// Polls, applies batches, stores the offsets of what was applied; on stop,
/// commits them. Rebalance callbacks run inside `poll`, on this thread.
fn consume_loop(
    consumer: &AggConsumer,
    shared: &Shared,
    limits: &reading::Limits,
    topic: &str,
    stop: &std::sync::atomic::AtomicBool,
) {
    const BATCH: usize = 2048;
    let user = consumer.context().user.as_deref();
    let mut watchdog = crate::systemd::Notifier::from_env();
    let mut batch: Vec<(i32, i64, Parsed)> = Vec::with_capacity(BATCH);
    let mut stored: HashMap<i32, i64> = HashMap::new();
    // While Kafka is down every poll fails: warn once, then debug until it recovers.
    let mut failing = false;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        watchdog.alive();
        batch.clear();
        let mut wait = Duration::from_millis(100);
        while batch.len() < BATCH {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(msg)) => {
                    if failing {
                        info!("consuming again");
                        failing = false;
                    }
                    // Outside the per-record guard: a death of this thread.
                    crate::guard::failpoint("consumer", msg.payload().unwrap_or_default());
                    batch.push((msg.partition(), msg.offset(), parse_record(&msg, limits)));
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => {
                    shared.metrics.consume_errors.inc();
                    let security = crate::security::kafka::classify(&e, &e.to_string(), user);
                    if let Some((kind, message)) = security {
                        // TLS and login failures come through the client's error
                        // callback too; authorization ones only here.
                        if kind == crate::security::SecurityKind::Acl {
                            shared.metrics.security.failed("kafka", kind, message);
                        }
                    } else if failing {
                        tracing::debug!(error = %e, "consume error");
                    } else {
                        warn!(error = %e, "consume error; retrying (repeats are logged at debug level)");
                        failing = true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        apply_batch(shared, &mut batch, &mut stored);
        for (p, o) in stored.drain() {
            if let Err(e) = consumer.store_offset(topic, p, o) {
                warn!(error = %e, partition = p, "storing offset failed");
            }
        }
    }
    info!(
        consumed = shared.metrics.consumed.get(),
        applied = shared.metrics.applied_count(),
        "shutting down: committing offsets"
    );
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("offsets committed"),
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(error = %e, "final commit failed; some records will be read again"),
    }
    consumer.unsubscribe();
}

/// Applies a batch under one lock. Records of partitions revoked while the
/// batch was being polled are dropped (their new owner reads them); the others'
/// offsets are marked in `stored` (`store_offset` commits offset + 1).
fn apply_batch(shared: &Shared, batch: &mut [(i32, i64, Parsed)], stored: &mut HashMap<i32, i64>) {
    let m = &shared.metrics;
    let assigned = shared.assigned().clone();
    let mut state = shared.state();
    for (partition, offset, parsed) in batch.iter_mut() {
        if !assigned.contains(partition) {
            continue;
        }
        m.consumed.inc();
        stored.insert(*partition, *offset);
        let r = match std::mem::replace(parsed, Err("empty")) {
            Ok(r) => r,
            Err(reason) => {
                m.skipped(reason);
                continue;
            }
        };
        let (t, h) = (r.temperature, r.humidity);
        match state.apply(r) {
            Outcome::Applied => m.applied(t, h, false),
            Outcome::AppliedLate => m.applied(t, h, true),
            Outcome::AppliedFuture => m.applied_future(t, h),
            Outcome::ReplayedOffset => m.skipped("replayed_offset"),
            Outcome::DuplicateSeq => m.skipped("duplicate_seq"),
        }
    }
    m.devices_evicted(state.devices.evicted(), state.devices.max());
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
        shared
            .metrics
            .clock_synchronized
            .set(crate::clock::status().gauge());
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
