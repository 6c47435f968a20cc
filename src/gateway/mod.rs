//! The gateway: a short list of stages, wired here. One reading passes each
//! module once, in this order:
//!
//! 1. **source** ([`mqtt`], [`simulated`]): payloads received together become
//!    a [`source::Received`] batch, sent as a [`source::SourceEvent`]. `mqtt`
//!    owns the connection (and sends the PUBACKs it is given).
//! 2. **intake** ([`intake`]): one complete decision per message, a record
//!    (reading or dead letter), or a skipped duplicate, with dedup and
//!    sequence tracking inside; encoded into the wake-up's [`batch::Batch`].
//! 3. **log** ([`log`]): the batch is appended; the log says which readings
//!    are confirmed (after the spool's fsync, or, with `spool.enabled =
//!    false`, once Kafka has them). The spool on/off choice is made there
//!    only.
//! 4. **forwarder** ([`forwarder`]): reads the log in order, the only Kafka
//!    producer user, and releases what Kafka acknowledged back to the log
//!    (the spool checkpoint).
//! 5. **acks** ([`acks`]): PUBACKs for the confirmed prefix, in arrival
//!    order; intake stops while its window is full (the MQTT connection stays
//!    up; the broker holds the rest).
//!
//! Beside them: [`probe`] watches Kafka (and replaces a stuck producer),
//! [`reload`] applies SIGHUP, [`metrics`] reports. The `Pipeline` task below
//! is the loop that moves messages from the sources through intake into the
//! log, and confirmations from the log to the acks stage.

pub mod acks;
pub mod batch;
pub mod dedup;
pub mod error;
pub mod forwarder;
pub mod intake;
pub mod kafka;
pub mod kafka_positions;
pub mod log;
pub mod metrics;
pub mod mqtt;
pub mod pool;
pub mod probe;
pub mod reload;
pub mod seq;
pub mod simulated;
pub mod source;
pub mod spool;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::acks::{AckEvent, Acks};
pub use self::error::GatewayError;
use self::forwarder::Forwarder;
use self::intake::Intake;
use self::metrics::GatewayMetrics;
use self::source::{Received, SourceEvent};
use crate::config::GatewayConfig;

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
    // The log first: a spool directory we cannot use stops us before we connect.
    let log = log::open(&cfg, &metrics)?;
    let durable = log.durable;

    let listener = crate::http::bind(&cfg.http.listen, "http.listen")
        .await
        .map_err(GatewayError::Http)?;
    info!(addr = %cfg.http.listen, "serving /metrics, /healthz, /readyz");
    let ready = {
        let (m, mqtt_on, durable) = (metrics.clone(), cfg.mqtt.enabled, log.durable);
        Arc::new(move || m.readiness(mqtt_on, durable))
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
    let received = pool::Pool::new(8);
    // Shared with the MQTT source, which cuts larger payloads on arrival.
    let max_payload = Arc::new(std::sync::atomic::AtomicUsize::new(
        cfg.validation.max_payload_bytes,
    ));
    let (mqtt, mqtt_rx) = if cfg.mqtt.enabled {
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
    let (fatal_tx, fatal_rx) = mpsc::channel::<GatewayError>(1);
    let (recreate_tx, recreate_rx) = mpsc::channel::<String>(1);
    tokio::spawn(probe::probe_kafka(
        cfg.clone(),
        slot.clone(),
        metrics.clone(),
        probe_stop.clone(),
        fatal_tx,
        recreate_tx,
        log.durable,
    ));

    let fwd_stop = CancellationToken::new();
    let forwarder = tokio::spawn(
        Forwarder::new(&cfg.kafka, slot.clone(), report_tx, metrics.clone()).run(
            log.reader,
            reports,
            recreate_rx,
            fwd_stop.clone(),
            Duration::from_millis(cfg.shutdown.grace_period_ms),
        ),
    );

    let sim = (cfg.simulate.devices > 0).then(|| simulated::start(&cfg.simulate, shutdown.clone()));
    info!(
        mqtt = cfg.mqtt.enabled,
        simulated_devices = cfg.simulate.devices,
        topic = %cfg.kafka.topic,
        mode = ?cfg.kafka.delivery_mode,
        durable_log = durable,
        shared_group = cfg.mqtt.shared_group.as_deref().unwrap_or("(none)"),
        "gateway running"
    );
    if cfg.mqtt.shared_group.is_some() {
        info!("shared subscription: this gateway gets a share of each device's readings, so it does not count sequence gaps (the aggregator does)");
    }
    let acker = mqtt.as_ref().map(|m| m.acker.clone());
    let mut pipeline = Pipeline {
        intake: Intake::new(&cfg, log.recent, max_payload, metrics.clone()),
        log: log.appender,
        acks: Acks::new(cfg.kafka.max_in_flight, acker, log.ids, metrics.clone()),
        confirmed: log.confirmed,
        mqtt: mqtt_rx,
        simulated: sim.unwrap_or_else(|| mpsc::channel(1).1),
        received,
        limits: limits_rx,
        fatal: fatal_rx,
        grace: Duration::from_millis(cfg.shutdown.grace_period_ms),
    };
    drop(early_pings);
    let mut result = pipeline.run(&shutdown).await;
    pipeline.log.close();

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

/// The loop between the stages: sources -> intake -> log, and the log's
/// confirmations -> acks. Built in one step from what the stages need.
struct Pipeline {
    intake: Intake,
    log: log::Appender,
    acks: Acks,
    /// Readings the log confirmed.
    confirmed: mpsc::UnboundedReceiver<AckEvent>,
    mqtt: mpsc::Receiver<SourceEvent>,
    simulated: mpsc::Receiver<SourceEvent>,
    /// Where emptied [`Received`] go back to the MQTT source.
    received: pool::Pool<Received>,
    /// New validation limits from a reload (SIGHUP).
    limits: tokio::sync::watch::Receiver<crate::reading::Limits>,
    /// A fatal error from elsewhere (the probe).
    fatal: mpsc::Receiver<GatewayError>,
    /// `shutdown.grace_period_ms`.
    grace: Duration,
}

impl Pipeline {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), GatewayError> {
        let grace = self.grace;
        let mut deadline: Option<tokio::time::Instant> = None;
        let (mut mqtt_open, mut sim_open) = (true, true);
        let mut outcome = Ok(());
        // systemd: the watchdog is fed from this loop, so a wedged pipeline
        // gets restarted (READY=1 went out once the log and HTTP were up).
        let mut notifier = crate::systemd::Notifier::from_env().after_ready();
        let mut tick = tokio::time::interval(notifier.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let draining = deadline.is_some();
            let intake = !draining && self.acks.has_room();
            tokio::select! {
                biased;
                Some(ev) = self.confirmed.recv() => {
                    // On a fatal error nothing more is acknowledged: what is
                    // not, the broker redelivers.
                    if let Err(e) = self.acks.on_log(ev) {
                        error!(error = %e, "fatal");
                        return Err(e);
                    }
                    while let Ok(ev) = self.confirmed.try_recv() {
                        self.acks.on_log(ev)?;
                    }
                }
                _ = shutdown.cancelled(), if !draining => {
                    notifier.stopping();
                    info!(pending = self.acks.pending(), grace_ms = grace.as_millis() as u64, "shutting down: intake stopped, settling what was accepted");
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                Some(e) = self.fatal.recv(), if !draining => {
                    error!(error = %e, "fatal");
                    outcome = Err(e);
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                ev = self.mqtt.recv(), if intake && mqtt_open => mqtt_open = self.take(ev, false),
                ev = self.simulated.recv(), if intake && sim_open => sim_open = self.take(ev, true),
                _ = crate::shutdown::sleep_until(deadline), if draining => {
                    warn!(pending = self.acks.pending(), "grace period over; unsettled readings stay unacknowledged");
                    break;
                }
                Ok(()) = self.limits.changed() => {
                    let limits = self.limits.borrow_and_update().clone();
                    self.intake.set_limits(limits);
                }
                _ = tick.tick() => {}
                // Acks left over from a full request channel: try again soon.
                _ = tokio::time::sleep(Duration::from_millis(2)), if self.acks.owed() => {}
            }
            notifier.alive();
            self.log.flush()?;
            self.acks.flush();
            if deadline.is_some() && self.acks.pending() == 0 {
                info!("every accepted reading settled");
                break;
            }
            if !mqtt_open && !sim_open && self.acks.pending() == 0 && deadline.is_none() {
                // Every source ended (e.g. a finite simulation): wait for shutdown.
                shutdown.cancelled().await;
                break;
            }
        }
        outcome
    }

    /// Takes `first` and what already arrived behind it from the same source,
    /// within the window (a batch may pass it by its own size). False once
    /// the source ended.
    fn take(&mut self, first: Option<SourceEvent>, simulated: bool) -> bool {
        let Some(ev) = first else { return false };
        self.on_event(ev);
        while self.acks.has_room() {
            let rx = if simulated {
                &mut self.simulated
            } else {
                &mut self.mqtt
            };
            let Ok(ev) = rx.try_recv() else { break };
            self.on_event(ev);
        }
        true
    }

    fn on_event(&mut self, ev: SourceEvent) {
        match ev {
            SourceEvent::Connected => self.acks.connected(),
            SourceEvent::Messages(batch) => {
                for m in batch.iter() {
                    let id = self.acks.admit(m.pkid, m.received_ms);
                    let bytes = self.intake.take(&m, id, self.log.batch());
                    self.acks.sized(id, bytes);
                }
                self.received.give(batch.empty());
            }
        }
    }
}
