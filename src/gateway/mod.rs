//! The gateway: sources (MQTT, simulated) -> intake -> spool -> forwarder -> Kafka.
//!
//! A reading passes each part once:
//! - [`mqtt`] / [`simulated`]: sources, sending [`SourceEvent`]s.
//! - [`intake`] (pure): the Kafka record it becomes (reading or dead letter).
//! - [`spool`]: durable log; its writer thread appends (the forwarder reads
//!   from there) and its syncer thread confirms readings after the group
//!   fsync. (With `spool.enabled = false` records go straight on.)
//! - [`forwarder`]: the only Kafka producer user; settles records when Kafka
//!   acknowledged them and checkpoints the spool.
//! - [`acks`]: PUBACKs in arrival order for the settled prefix.
//!
//! The pipeline task below owns the ack tracker and the sequence tracker; it
//! stops taking readings while `max_in_flight` are unsettled (the MQTT
//! connection stays up; the broker holds the rest).

pub mod acks;
pub mod batch;
pub mod dedup;
pub mod delivered;
pub mod forwarder;
pub mod intake;
pub mod kafka;
pub mod metrics;
pub mod mqtt;
pub mod probe;
pub mod reload;
pub mod seq;
pub mod simulated;
pub mod spool;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::acks::{AckEvent, AckTracker};
use self::batch::Batch;
use self::dedup::Recent;
use self::forwarder::{Feed, Forwarder};
use self::intake::Intake;
use self::metrics::GatewayMetrics;
use self::seq::{SeqOutcome, SeqTracker};
use self::spool::writer::{SyncPolicy, Writer};
use self::spool::{Spool, SpoolOptions};
use crate::config::GatewayConfig;

/// One received payload, borrowed from the [`Received`] it came in.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// MQTT topic, or `simulated`.
    pub topic: &'a str,
    /// Device id known from the source (simulated); MQTT takes it from the topic.
    pub device: Option<&'a str>,
    /// The payload, or its first bytes when it was cut at receipt (see `size`).
    pub payload: &'a [u8],
    /// The payload's size as received: over `validation.max_payload_bytes` it
    /// was rejected on arrival and only its first `dlq_max_payload_bytes` kept.
    pub size: usize,
    /// Receive time, epoch ms.
    pub received_ms: i64,
    /// MQTT packet id to acknowledge (QoS 1); `None` = nothing to acknowledge.
    pub pkid: Option<u16>,
}

/// Payloads received together (what one read of the MQTT connection brought,
/// or one tick of the simulated fleet), copied into two buffers: a few
/// allocations per batch instead of a few per payload, and nothing left
/// pointing into the MQTT client's read buffer.
#[derive(Debug, Default)]
pub struct Received {
    /// Topics and device ids.
    text: String,
    payloads: Vec<u8>,
    msgs: Vec<Msg>,
    /// Receive time of all of them, epoch ms.
    pub received_ms: i64,
    /// The source's room taken by these messages (in messages and bytes),
    /// given back when this is dropped (see `mqtt`: it bounds what waits for
    /// the pipeline).
    held: Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )>,
}

#[derive(Debug, Clone, Copy)]
struct Msg {
    topic: (u32, u32),
    device: Option<(u32, u32)>,
    payload: (u32, u32),
    /// As received (more than `payload` holds when cut).
    size: u32,
    pkid: Option<u16>,
}

impl Received {
    pub fn new(received_ms: i64) -> Self {
        Received {
            received_ms,
            ..Received::default()
        }
    }

    /// Room for `like`'s messages and bytes, or 16 typical ones if more (a
    /// source's next batch is usually the size of its last one: allocated
    /// once, not grown push by push).
    pub fn sized_like(received_ms: i64, like: (usize, usize, usize)) -> Self {
        let (msgs, text, payloads) = like;
        Received {
            text: String::with_capacity(text.max(16 * 48)),
            payloads: Vec::with_capacity(payloads.max(16 * 160)),
            msgs: Vec::with_capacity(msgs.max(16)),
            received_ms,
            held: None,
        }
    }

    /// Keeps the permits until this is dropped or emptied.
    pub fn hold(
        &mut self,
        messages: tokio::sync::OwnedSemaphorePermit,
        bytes: tokio::sync::OwnedSemaphorePermit,
    ) {
        self.held = Some((messages, bytes));
    }

    /// Empties it for reuse (its room goes back to the source now).
    pub fn empty(mut self) -> Self {
        self.text.clear();
        self.payloads.clear();
        self.msgs.clear();
        self.held = None;
        self
    }

    /// This emptied one again, or a new one, for messages received at
    /// `received_ms`.
    pub fn reuse(
        pool: &batch::Pool<Received>,
        received_ms: i64,
        like: (usize, usize, usize),
    ) -> Self {
        match pool.take() {
            Some(mut r) => {
                r.received_ms = received_ms;
                r
            }
            None => Received::sized_like(received_ms, like),
        }
    }

    /// (messages, text bytes, payload bytes): a size hint for the next one.
    pub fn size(&self) -> (usize, usize, usize) {
        (self.msgs.len(), self.text.len(), self.payloads.len())
    }

    pub fn push(&mut self, topic: &str, device: Option<&str>, payload: &[u8], pkid: Option<u16>) {
        self.push_cut(topic, device, payload, pkid, usize::MAX);
    }

    /// [`Received::push`], keeping only the first `keep` bytes of `payload`.
    pub fn push_cut(
        &mut self,
        topic: &str,
        device: Option<&str>,
        payload: &[u8],
        pkid: Option<u16>,
        keep: usize,
    ) {
        let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let payload = &payload[..payload.len().min(keep)];
        let mut text = |s: &str| {
            let start = self.text.len() as u32;
            self.text.push_str(s);
            (start, self.text.len() as u32)
        };
        let topic = text(topic);
        let device = device.map(text);
        let start = self.payloads.len() as u32;
        self.payloads.extend_from_slice(payload);
        self.msgs.push(Msg {
            topic,
            device,
            payload: (start, self.payloads.len() as u32),
            size,
            pkid,
        });
    }

    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Bytes held (topics, ids and payloads).
    pub fn bytes(&self) -> usize {
        self.text.len() + self.payloads.len()
    }

    /// The payloads, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = Incoming<'_>> {
        let text = |(a, b): (u32, u32)| self.text.get(a as usize..b as usize).unwrap_or_default();
        self.msgs.iter().map(move |m| Incoming {
            topic: text(m.topic),
            device: m.device.map(text),
            payload: self
                .payloads
                .get(m.payload.0 as usize..m.payload.1 as usize)
                .unwrap_or_default(),
            size: m.size as usize,
            received_ms: self.received_ms,
            pkid: m.pkid,
        })
    }
}

/// What a source tells the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    Messages(Received),
    /// A new MQTT connection: acks owed on the old one are void (the broker
    /// redelivers those messages).
    Connected,
}

/// Fatal gateway errors (everything else is retried, counted and logged).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Http(String),
    #[error("Kafka producer: {0}")]
    Producer(#[from] KafkaError),
    #[error("topic {topic:?} does not exist on {servers}; create it (scripts/stack up does) or set kafka.create_topics = true")]
    MissingTopic { topic: String, servers: String },
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error("spool: {0}")]
    Spool(String),
}

/// The open spool: the writer's side, the reader, and recent readings.
struct OpenSpool {
    spool: Arc<Mutex<Spool>>,
    reader: spool::SpoolReader,
    recent: Recent,
    pending: u64,
}

fn open_spool(cfg: &GatewayConfig, metrics: &GatewayMetrics) -> Result<OpenSpool, GatewayError> {
    let (spool, reader, rec) = Spool::open(SpoolOptions {
        dir: cfg.spool.dir.clone(),
        max_bytes: cfg.spool.max_bytes,
        segment_bytes: cfg.spool.segment_bytes,
        on_full: cfg.spool.on_full,
    })
    .map_err(|e| {
        GatewayError::Spool(format!(
            "cannot open the spool in {} (spool.dir): {e}",
            cfg.spool.dir.display()
        ))
    })?;
    metrics.spool_recovered(&rec);
    let mut recent = Recent::new(spool::RECENT_KEEP);
    for (k, seq, ts) in &rec.recent {
        recent.check_and_insert(k, *seq, *ts);
    }
    Ok(OpenSpool {
        spool: Arc::new(Mutex::new(spool)),
        reader,
        recent,
        pending: rec.pending_records,
    })
}

/// Runs the gateway until `shutdown` is cancelled, then drains: stops intake,
/// acknowledges what is settled, disconnects MQTT, and gives Kafka the grace
/// period for what is in flight. What was not settled stays unacknowledged.
pub async fn run(cfg: GatewayConfig, shutdown: CancellationToken) -> Result<(), GatewayError> {
    run_with_reload(cfg, shutdown, None).await
}

/// [`run`], and with a loader SIGHUP reloads the configuration (see [`reload`]).
pub async fn run_with_reload(
    cfg: GatewayConfig,
    shutdown: CancellationToken,
    loader: Option<reload::Loader>,
) -> Result<(), GatewayError> {
    let (limits_tx, limits_rx) = tokio::sync::watch::channel(cfg.validation.clone());
    let reload_stop = CancellationToken::new();
    // Without a loader the sender is dropped: the pipeline's `changed()` then
    // just never fires.
    if let Some(l) = loader {
        reload::spawn(l, cfg.clone(), limits_tx, reload_stop.clone());
    }
    let _stop_reload = reload_stop.drop_guard();
    let metrics = GatewayMetrics::new();
    let clock_stop = CancellationToken::new();
    crate::clock::watch(cfg.clock.sync, clock_stop.clone());
    let _stop_clock = clock_stop.drop_guard();
    metrics
        .clock_synchronized
        .set(crate::clock::status().gauge());
    if crate::clock::status() == crate::clock::Status::Unsynced {
        warn!("the system clock is not synchronised: device timestamps are kept as sent, and records are marked clock=unsynced (README \"Clocks at the edge\")");
    }
    // The spool first: a directory we cannot use stops us before we connect.
    let opened = if cfg.spool.enabled {
        Some(open_spool(&cfg, &metrics)?)
    } else {
        None
    };

    let listener = crate::http::bind(&cfg.http.listen, "http.listen")
        .await
        .map_err(GatewayError::Http)?;
    info!(addr = %cfg.http.listen, "serving /metrics, /healthz, /readyz");
    let ready = {
        let (m, mqtt_on, spool_on) = (metrics.clone(), cfg.mqtt.enabled, cfg.spool.enabled);
        Arc::new(move || m.readiness(mqtt_on, spool_on))
    };
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(crate::http::serve(
        listener,
        crate::http::base_router(metrics.registry.clone(), ready, None),
        http_stop.clone(),
    ));
    // systemd: started once the spool is open and HTTP listens. A broker that
    // is down at boot (or refuses the subscription) must not get us killed by
    // the start timeout while the spool could drain to Kafka; MQTT and Kafka
    // state are in /readyz and the metrics. Until the pipeline loop feeds the
    // watchdog, this task does.
    let early_pings = CancellationToken::new();
    {
        let mut notifier = crate::systemd::Notifier::from_env();
        notifier.ready("spool open, serving HTTP (MQTT and Kafka state: /readyz)");
        let stop = early_pings.clone();
        tokio::spawn(async move {
            loop {
                notifier.alive();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(notifier.tick()) => {}
                }
            }
        });
    }
    let early_pings = early_pings.drop_guard();

    let (report_tx, reports) = mpsc::unbounded_channel();
    let slot: kafka::ProducerSlot = Arc::new(std::sync::RwLock::new(Arc::new(kafka::producer(
        &cfg.kafka,
        report_tx.clone(),
        0,
        metrics.security.clone(),
    )?)));
    let producer = kafka::current(&slot);
    // MQTT first: the broker starts keeping our messages as soon as we are
    // subscribed, even while Kafka is still being checked.
    // About as many as can wait for the pipeline (see mqtt).
    let received = batch::Pool::new(8);
    // Shared with the MQTT source, which cuts larger payloads on arrival.
    let max_payload = Arc::new(std::sync::atomic::AtomicUsize::new(
        cfg.validation.max_payload_bytes,
    ));
    let (mqtt, mut mqtt_rx) = if cfg.mqtt.enabled {
        let cut = mqtt::Cut {
            max_payload: max_payload.clone(),
            keep: if cfg.kafka.dlq_enabled {
                cfg.kafka.dlq_max_payload_bytes
            } else {
                0
            },
        };
        let (source, events) = mqtt::start(
            &cfg.mqtt,
            cfg.kafka.max_in_flight,
            metrics.clone(),
            received.clone(),
            cut,
        )
        .map_err(GatewayError::Mqtt)?;
        (Some(source), events)
    } else {
        (None, mpsc::channel(1).1)
    };
    if let Err(e) = probe::check_topics(&cfg, &producer, &metrics).await {
        if let Some(m) = mqtt {
            m.stop.cancel();
            m.acker.disconnect().await;
        }
        return Err(e);
    }
    drop(producer);
    let probe_stop = CancellationToken::new();
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<GatewayError>(1);
    let (recreate_tx, recreate_rx) = mpsc::channel::<String>(1);
    tokio::spawn(probe::probe_kafka(
        cfg.clone(),
        slot.clone(),
        metrics.clone(),
        probe_stop.clone(),
        fatal_tx,
        recreate_tx,
    ));

    // Settled readings come back on one channel, from the spool writer or
    // (spool disabled) from the forwarder.
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<AckEvent>();
    let grace = Duration::from_millis(cfg.shutdown.grace_period_ms);
    let fwd_stop = CancellationToken::new();
    // Batch buffers come back here from whoever is done with them, and the
    // lists of settled ids from the pipeline.
    let pool = batch::BufPool::default();
    let ids = batch::IdPool::default();
    let (out, feed, recent) = match opened {
        Some(o) => {
            let policy = SyncPolicy::from_config(&cfg.spool);
            let writer = Writer::start(
                o.spool.clone(),
                policy,
                settled_tx,
                metrics.clone(),
                (pool.clone(), ids.clone()),
            )
            .map_err(|e| GatewayError::Spool(format!("starting the writer threads: {e}")))?;
            let feed = Feed::Spool {
                reader: o.reader,
                spool: o.spool,
                dir: cfg.spool.dir.clone(),
                pending: o.pending,
            };
            (
                Out::Spool(writer, Batch::default(), pool),
                feed,
                Some(o.recent),
            )
        }
        None => {
            let (tx, rx) = mpsc::unbounded_channel();
            let feed = Feed::Memory {
                rx,
                settled: settled_tx,
                pool: pool.clone(),
                ids: ids.clone(),
            };
            (Out::Memory(tx, Batch::default(), pool), feed, None)
        }
    };
    let spool_mode = recent.is_some();
    let forwarder = tokio::spawn(
        Forwarder::new(&cfg.kafka, slot.clone(), report_tx, metrics.clone()).run(
            feed,
            reports,
            recreate_rx,
            fwd_stop.clone(),
            if spool_mode {
                grace
            } else {
                Duration::from_secs(1)
            },
        ),
    );

    let sim = (cfg.simulate.devices > 0).then(|| simulated::start(&cfg.simulate, shutdown.clone()));
    info!(
        mqtt = cfg.mqtt.enabled,
        simulated_devices = cfg.simulate.devices,
        topic = %cfg.kafka.topic,
        mode = ?cfg.kafka.delivery_mode,
        spool = spool_mode,
        shared_group = cfg.mqtt.shared_group.as_deref().unwrap_or("(none)"),
        "gateway running"
    );
    if cfg.mqtt.shared_group.is_some() {
        info!("shared subscription: this gateway gets a share of each device's readings, so it does not count sequence gaps (the aggregator does)");
    }
    let mut pipeline = Pipeline::new(&cfg, metrics.clone(), out, recent);
    pipeline.limits = Some(limits_rx);
    pipeline.max_payload = Some(max_payload);
    pipeline.received = received;
    pipeline.ids = ids;
    let acker = mqtt.as_ref().map(|m| m.acker.clone());
    let mut sim_rx = match sim {
        Some(rx) => rx,
        None => mpsc::channel(1).1,
    };
    drop(early_pings);
    let mut result = pipeline
        .run(
            &mut mqtt_rx,
            &mut sim_rx,
            &mut settled_rx,
            acker.as_ref(),
            &shutdown,
            &mut fatal_rx,
        )
        .await;
    pipeline.out.close();

    // Drained (or gave up): disconnect cleanly, then let Kafka have the rest.
    if let Some(m) = mqtt {
        m.stop.cancel();
        m.acker.disconnect().await;
        if tokio::time::timeout(Duration::from_secs(3), m.task)
            .await
            .is_err()
        {
            warn!("MQTT event loop did not stop in 3 s");
        }
    }
    fwd_stop.cancel();
    match forwarder.await {
        Ok(Err(e)) if result.is_ok() => result = Err(e),
        Ok(_) => {}
        Err(e) => error!(error = %e, "forwarder task failed"),
    }
    probe_stop.cancel();
    http_stop.cancel();
    let _ = http_task.await;
    result
}

/// Where intake's records go: each wake-up's [`Batch`], to the spool writer
/// or (spool disabled) straight to the forwarder.
enum Out {
    Spool(Writer, Batch, batch::BufPool),
    Memory(mpsc::UnboundedSender<Batch>, Batch, batch::BufPool),
    Closed,
}

impl Out {
    /// Hands on what this wake-up accepted.
    fn send_batch(&mut self) -> Result<(), GatewayError> {
        // The next one gets a buffer back, or one the size of this one.
        let next = |b: &mut Batch, pool: &batch::BufPool| {
            let buf = pool
                .take()
                .unwrap_or_else(|| Vec::with_capacity(b.buf.len()));
            std::mem::replace(
                b,
                Batch {
                    buf,
                    ..Batch::default()
                },
            )
        };
        match self {
            Out::Spool(w, b, pool) if !b.is_empty() => {
                w.tx.send(next(b, pool))
                    .map_err(|_| GatewayError::Spool("the writer thread stopped".into()))
            }
            Out::Memory(tx, b, pool) if !b.is_empty() => {
                let stopped = tx.send(next(b, pool)).is_err();
                if stopped {
                    warn!("forwarder stopped; readings left unacknowledged");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn close(&mut self) {
        if let Out::Spool(w, ..) = std::mem::replace(self, Out::Closed) {
            w.finish();
        }
    }
}

/// A record this large is counted against [`PENDING_BYTES`] (readings are
/// a few hundred bytes; dead letters of large payloads are up to
/// `dlq_max_payload_bytes`).
const BIG_RECORD: usize = 4096;
/// Bytes of large records accepted and not yet settled, at most (plus one).
pub const PENDING_BYTES: usize = 16 << 20;

struct Pipeline {
    cfg: GatewayConfig,
    metrics: GatewayMetrics,
    tracker: AckTracker,
    seqs: SeqTracker,
    /// Duplicate detection (spool only: a skipped repeat is confirmed after
    /// the original is durable, in order).
    recent: Option<Recent>,
    out: Out,
    /// Accepted and not yet settled.
    pending: usize,
    /// Records over [`BIG_RECORD`] bytes among them (by ack id), and their
    /// bytes: what a burst of large payloads makes us hold is bounded by
    /// [`PENDING_BYTES`], not only by the window in messages.
    big: std::collections::HashMap<acks::AckId, usize>,
    pending_big_bytes: usize,
    window: usize,
    encoder: intake::Encoder,
    /// Where emptied [`Received`] go back to the MQTT source...
    received: batch::Pool<Received>,
    /// ...and read lists of settled ids to the forwarder or spool writer.
    ids: batch::IdPool,
    pkids: Vec<u16>,
    /// Each topic filter with the position of its first `+` (the device id).
    plus_segments: Vec<(String, Option<usize>)>,
    /// New validation limits from a reload (SIGHUP); taken by `run`.
    limits: Option<tokio::sync::watch::Receiver<crate::reading::Limits>>,
    /// The MQTT source's copy of `validation.max_payload_bytes` (see `mqtt::Cut`).
    max_payload: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Pipeline {
    fn new(cfg: &GatewayConfig, metrics: GatewayMetrics, out: Out, recent: Option<Recent>) -> Self {
        Pipeline {
            cfg: cfg.clone(),
            metrics,
            tracker: AckTracker::new(),
            seqs: SeqTracker::new(cfg.tracking.max_devices),
            recent,
            out,
            pending: 0,
            big: std::collections::HashMap::new(),
            pending_big_bytes: 0,
            window: cfg.kafka.max_in_flight,
            encoder: intake::Encoder::default(),
            received: batch::Pool::default(),
            ids: batch::IdPool::default(),
            pkids: Vec::with_capacity(1024),
            plus_segments: cfg
                .mqtt
                .topics
                .iter()
                .map(|f| (f.clone(), f.split('/').position(|s| s == "+")))
                .collect(),
            limits: None,
            max_payload: None,
        }
    }

    async fn run(
        &mut self,
        mqtt_rx: &mut mpsc::Receiver<SourceEvent>,
        sim_rx: &mut mpsc::Receiver<SourceEvent>,
        settled: &mut mpsc::UnboundedReceiver<AckEvent>,
        acker: Option<&mqtt::Acker>,
        shutdown: &CancellationToken,
        fatal: &mut mpsc::Receiver<GatewayError>,
    ) -> Result<(), GatewayError> {
        let (_, never) = tokio::sync::watch::channel(self.cfg.validation.clone());
        let mut limits = self.limits.take().unwrap_or(never);
        let grace = Duration::from_millis(self.cfg.shutdown.grace_period_ms);
        let mut deadline: Option<tokio::time::Instant> = None;
        let (mut mqtt_open, mut sim_open) = (true, true);
        let mut outcome = Ok(());
        // systemd: the watchdog is fed from this loop, so a wedged pipeline
        // gets restarted (READY=1 went out once the spool and HTTP were up).
        let mut notifier = crate::systemd::Notifier::from_env().after_ready();
        let mut tick = tokio::time::interval(notifier.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let draining = deadline.is_some();
            let intake = !draining && self.has_room();
            tokio::select! {
                biased;
                Some(ev) = settled.recv() => {
                    if let Err(e) = self.on_settled(ev) {
                        // Nothing more is acknowledged: what is not, the broker redelivers.
                        error!(error = %e, "fatal");
                        return Err(e);
                    }
                    while let Ok(ev) = settled.try_recv() {
                        self.on_settled(ev)?;
                    }
                }
                _ = shutdown.cancelled(), if !draining => {
                    notifier.stopping();
                    info!(pending = self.pending, grace_ms = grace.as_millis() as u64, "shutting down: intake stopped, settling what was accepted");
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                Some(e) = fatal.recv(), if !draining => {
                    error!(error = %e, "fatal");
                    outcome = Err(e);
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                ev = mqtt_rx.recv(), if intake && mqtt_open => match ev {
                    Some(ev) => {
                        self.on_event(ev);
                        // Take what already arrived, within the window (a
                        // batch may pass it by its own size).
                        while self.has_room() {
                            let Ok(ev) = mqtt_rx.try_recv() else { break };
                            self.on_event(ev);
                        }
                    }
                    None => mqtt_open = false,
                },
                ev = sim_rx.recv(), if intake && sim_open => match ev {
                    Some(ev) => {
                        self.on_event(ev);
                        while self.has_room() {
                            let Ok(ev) = sim_rx.try_recv() else { break };
                            self.on_event(ev);
                        }
                    }
                    None => sim_open = false,
                },
                _ = sleep_until(deadline), if draining => {
                    warn!(pending = self.pending, "grace period over; unsettled readings stay unacknowledged");
                    break;
                }
                Ok(()) = limits.changed() => {
                    self.cfg.validation = limits.borrow_and_update().clone();
                    if let Some(m) = &self.max_payload {
                        m.store(self.cfg.validation.max_payload_bytes, std::sync::atomic::Ordering::Relaxed);
                    }
                    info!(limits = ?self.cfg.validation, "validation limits updated");
                }
                _ = tick.tick() => {}
                // Acks left over from a full request channel: try again soon.
                _ = tokio::time::sleep(Duration::from_millis(2)), if !self.pkids.is_empty() => {}
            }
            notifier.alive();
            self.out.send_batch()?;
            self.flush_acks(acker);
            if deadline.is_some() && self.pending == 0 {
                info!("every accepted reading settled");
                break;
            }
            if !mqtt_open && !sim_open && self.pending == 0 && deadline.is_none() {
                // Every source ended (e.g. a finite simulation): wait for shutdown.
                shutdown.cancelled().await;
                break;
            }
        }
        outcome
    }

    /// Room for more: fewer than the window unsettled, and their large
    /// records within the byte budget.
    fn has_room(&self) -> bool {
        self.pending < self.window && self.pending_big_bytes < PENDING_BYTES
    }

    fn settle(&mut self, id: acks::AckId) {
        self.tracker.complete(id);
        self.pending = self.pending.saturating_sub(1);
        if !self.big.is_empty() {
            if let Some(n) = self.big.remove(&id) {
                self.pending_big_bytes -= n;
            }
        }
    }

    fn on_settled(&mut self, ev: AckEvent) -> Result<(), GatewayError> {
        match ev {
            AckEvent::Ready(ids) => {
                for &id in &ids {
                    self.settle(id);
                }
                self.ids.give_ids(ids);
            }
            AckEvent::SpoolFull(_) => {}
            AckEvent::Fatal(e) => return Err(GatewayError::Spool(e)),
        }
        Ok(())
    }

    /// PUBACKs for the settled prefix, in order. Never waits: when the MQTT
    /// request channel is full the rest stay queued here for the next turn,
    /// because the event loop may itself be waiting for this loop to take a
    /// message (waiting here too would deadlock).
    fn flush_acks(&mut self, acker: Option<&mqtt::Acker>) {
        self.tracker.drain_ready(&mut self.pkids);
        let Some(a) = acker else {
            self.pkids.clear();
            return;
        };
        let sent = a.ack(&self.pkids);
        self.pkids.drain(..sent);
        self.metrics.acked(sent);
    }

    fn on_event(&mut self, ev: SourceEvent) {
        match ev {
            SourceEvent::Connected => {
                self.tracker.reset();
                self.pkids.clear(); // acks of the old connection
            }
            SourceEvent::Messages(batch) => {
                for m in batch.iter() {
                    self.on_message(&m);
                }
                self.received.give(batch.empty());
            }
        }
    }

    fn device_from_topic<'a>(&self, topic: &'a str) -> Option<&'a str> {
        device_in_topic(&self.plus_segments, self.cfg.mqtt.device_id_segment, topic)
    }

    fn on_message(&mut self, m: &Incoming<'_>) {
        self.metrics.received(m.device.is_some());
        let ack = self.tracker.push(m.pkid);
        self.pending += 1;
        let topic_device = match m.device {
            Some(d) => Some(d),
            None => self.device_from_topic(m.topic),
        };
        let dlq = self
            .cfg
            .kafka
            .dlq_enabled
            .then_some(self.cfg.kafka.dlq_max_payload_bytes);
        let batch = match &mut self.out {
            Out::Spool(_, b, _) => {
                b.acks.push(ack);
                Some(b)
            }
            Out::Memory(_, b, _) => Some(b),
            Out::Closed => None,
        };
        let before = batch.as_ref().map_or(0, |b| b.buf.len());
        let clock_synced = crate::clock::synced();
        let written = match intake::intake(m, topic_device, &self.cfg.validation, dlq, clock_synced)
        {
            Intake::Reading(r) => {
                let key = r.device_id.as_bytes();
                // The device's own ts identifies a redelivery, also when the
                // receive time replaced it.
                let ts = r.ts_replaced.map_or(r.ts_ms, |(_, device_ts)| device_ts);
                let dup = match (r.seq, &mut self.recent) {
                    (Some(seq), Some(recent)) => recent.check_and_insert(key, seq, ts),
                    _ => false,
                };
                if dup {
                    self.metrics.duplicate_skipped(key, r.seq.unwrap_or(0));
                    false
                } else {
                    // With a shared subscription this gateway sees only some of
                    // each device's readings: gaps are for the aggregator to count.
                    if let (Some(seq), None) = (r.seq, &self.cfg.mqtt.shared_group) {
                        let device = &*r.device_id;
                        match self.seqs.observe(device, seq) {
                            SeqOutcome::Gap(n) => self.metrics.seq_gap(device, n),
                            SeqOutcome::Repeat => self.metrics.seq_repeat(device),
                            SeqOutcome::First => self.metrics.devices(
                                self.seqs.len(),
                                self.seqs.evicted(),
                                self.cfg.tracking.max_devices,
                            ),
                            SeqOutcome::InOrder => {}
                        }
                    }
                    if !clock_synced || r.ts_replaced.is_some() {
                        self.metrics.time_noted(!clock_synced, r.ts_replaced);
                    }
                    match batch {
                        Some(b) => {
                            self.encoder.reading(&r, m, ack, b, clock_synced);
                            true
                        }
                        None => false,
                    }
                }
            }
            Intake::Rejected {
                rejection,
                dead_letter,
            } => {
                self.metrics.rejected(&rejection, m.topic);
                if dead_letter.is_none() {
                    self.metrics
                        .dropped(rejection.code(), &rejection.to_string());
                }
                match (dead_letter, batch) {
                    (Some(d), Some(b)) => {
                        b.push(&d, ack);
                        true
                    }
                    _ => false,
                }
            }
        };
        // Without the spool, a reading that makes no record is settled now
        // (with it, the writer confirms it in order with the others).
        if !written && !matches!(self.out, Out::Spool(..)) {
            self.settle(ack);
        } else if written {
            let bytes = match &self.out {
                Out::Spool(_, b, _) | Out::Memory(_, b, _) => b.buf.len().saturating_sub(before),
                Out::Closed => 0,
            };
            if bytes > BIG_RECORD {
                self.big.insert(ack, bytes);
                self.pending_big_bytes += bytes;
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    // On bytes: this runs for every message, and '/' is ASCII.
    let mut t = topic.as_bytes().split(|&b| b == b'/');
    for f in filter.as_bytes().split(|&b| b == b'/') {
        match (f, t.next()) {
            (b"#", _) => return true,
            (b"+", Some(_)) => {}
            (f, Some(s)) if f == s => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// The device id in an MQTT topic: level `segment` when configured, else the
/// level of the `+` of the first filter (with its `+` position) it matches.
/// Checked afterwards by `reading::check_device_id`.
pub fn device_in_topic<'a>(
    filters: &[(String, Option<usize>)],
    segment: Option<usize>,
    topic: &'a str,
) -> Option<&'a str> {
    let segment = match segment {
        Some(s) => s,
        None => filters
            .iter()
            .find(|(f, _)| topic_matches(f, topic))
            .and_then(|(_, seg)| *seg)?,
    };
    topic_level(topic, segment)
}

/// Level `n` (from 0) of `topic`.
pub fn topic_level(topic: &str, n: usize) -> Option<&str> {
    let mut start = 0;
    let mut level = 0;
    for (i, b) in topic.bytes().enumerate() {
        if b == b'/' {
            if level == n {
                return topic.get(start..i);
            }
            level += 1;
            start = i + 1;
        }
    }
    (level == n).then(|| topic.get(start..)).flatten()
}

#[cfg(test)]
mod tests {
    use super::{topic_level, topic_matches, Received};

    #[test]
    fn received_gives_back_what_was_pushed_and_its_room_when_emptied() {
        let room = std::sync::Arc::new(tokio::sync::Semaphore::new(10));
        let mut r = Received::new(7);
        r.push("a/d1/t", None, b"{1}", Some(3));
        r.push("simulated", Some("dev-2"), b"", None);
        r.push("a/\u{e9}/t", None, "\u{e9}".as_bytes(), Some(4));
        let bytes = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
        #[allow(clippy::unwrap_used)]
        r.hold(
            room.clone().try_acquire_many_owned(3).unwrap(),
            bytes.clone().try_acquire_many_owned(50).unwrap(),
        );
        assert_eq!(room.available_permits(), 7);
        let got: Vec<_> = r
            .iter()
            .map(|m| (m.topic, m.device, m.payload, m.pkid, m.received_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("a/d1/t", None, &b"{1}"[..], Some(3), 7),
                ("simulated", Some("dev-2"), b"", None, 7),
                ("a/\u{e9}/t", None, "\u{e9}".as_bytes(), Some(4), 7),
            ]
        );
        let r = r.empty();
        assert!(r.is_empty() && r.bytes() == 0);
        assert_eq!(room.available_permits(), 10);
        assert_eq!(bytes.available_permits(), 100);
    }

    #[test]
    fn levels() {
        for topic in ["a/b/c", "a//c/", "/x", "", "sensors/dev-1/telemetry"] {
            for n in 0..5 {
                assert_eq!(
                    topic_level(topic, n),
                    topic.split('/').nth(n),
                    "{topic} {n}"
                );
            }
        }
    }

    #[test]
    fn filters() {
        assert!(topic_matches("sensors/+/telemetry", "sensors/a/telemetry"));
        assert!(!topic_matches(
            "sensors/+/telemetry",
            "sensors/a/b/telemetry"
        ));
        assert!(!topic_matches("sensors/+/telemetry", "sensors/a"));
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }
}
