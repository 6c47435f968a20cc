//! MQTT source (rumqttc, MQTT 3.1.1 or 5). One task only polls the event loop and
//! forwards what arrives; it never awaits anything else, so keepalives flow even
//! while Kafka is slow. Acknowledgements are sent by the pipeline through
//! [`Acker`], only for readings Kafka has, in arrival order.
//!
//! Messages go to the pipeline in batches: what one read of the socket brought,
//! and at low rates what arrives within `mqtt.batch_linger_ms` of a batch's
//! first message (the task sleeps meanwhile), so every stage wakes once per
//! batch rather than once per message.
//!
//! The channel to the pipeline is bounded, and the task waits when it is full:
//! then nothing more is read from the socket and TCP stops the broker. The
//! broker's own limit is not enough: Mosquitto 2.0.11 stops applying
//! `max_inflight_messages` to a resumed session once the client acknowledges,
//! and sent a restarted gateway its whole queue (300,000 readings: 130 MiB).
//! While it waits, no keepalive goes out; past 1.5x keep_alive_secs the broker
//! drops the connection and redelivers what was not acknowledged.
//!
//! PUBACKs in batches (MQTT 3.1.1): rumqttc writes and flushes each request
//! on its own (a `write` per PUBACK). So only the first PUBACK of a batch goes
//! through its request channel; when the event loop reports it written, this
//! task writes the rest of that batch into the connection and flushes once.
//! Order is kept: a batch's rest follows its first, before the next batch.
//! (rumqttc's v5 client does not expose its connection: one request each.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::metrics::GatewayMetrics;
use super::pool::Pool;
use super::source::{Received, SourceEvent};
use crate::config::MqttConfig;
use crate::mqtt::client::{Event, EventLoop, Options};
use crate::mqtt::{parse_mqtt_url, Client};
use crate::security::SecurityKind;

/// Batches whose first PUBACK is in rumqttc's request channel: (its pkid, the
/// rest), written by the event-loop task once the first is out.
type AckBatches = Arc<Mutex<VecDeque<(u16, Vec<u16>)>>>;

use crate::sync::lock;

/// Sends PUBACKs and the final DISCONNECT.
#[derive(Clone, Debug)]
pub struct Acker {
    client: Client,
    /// MQTT 3.1.1: the batches' rests (see the module docs); `None` with 5.
    batches: Option<AckBatches>,
}

impl Acker {
    /// Queues the PUBACKs for `pkids` (QoS 1), in order, without waiting;
    /// returns how many were taken (a prefix). The rest: try again later (the
    /// request channel is full, or closed).
    pub fn ack(&self, pkids: &[u16]) -> usize {
        match (&self.batches, pkids) {
            (_, []) => 0,
            (Some(batches), [first, rest @ ..]) => {
                // Locked across the send: the event loop looks for this batch
                // as soon as the first PUBACK is written.
                let mut q = lock(batches);
                if !self.client.try_ack(*first) {
                    return 0;
                }
                if !rest.is_empty() {
                    q.push_back((*first, rest.to_vec()));
                }
                pkids.len()
            }
            (None, _) => pkids
                .iter()
                .take_while(|&&p| self.client.try_ack(p))
                .count(),
        }
    }

    pub async fn disconnect(&self) {
        self.client.disconnect().await;
    }

    fn subscribe_all(&self, topics: &[String]) {
        // Spawned: the request channel may be full, and the event-loop task must
        // never wait on it.
        let (client, topics) = (self.client.clone(), topics.to_vec());
        tokio::spawn(async move {
            for t in topics {
                if let Err(e) = client.subscribe(&t).await {
                    tracing::error!(topic = %t, error = %e, "MQTT subscribe request failed");
                }
            }
        });
    }
}

/// Writes the rest of the batches up to the one `sent` led (see the module
/// docs), then flushes once. An error here is the connection's: the next poll
/// reports it and reconnects, and the broker redelivers what was not acked.
async fn write_rest(el: &mut EventLoop, batches: &AckBatches, sent: u16, scratch: &mut Vec<u16>) {
    let EventLoop::V311(el) = el else { return };
    scratch.clear();
    {
        let mut q = lock(batches);
        if let Some(i) = q.iter().position(|(first, _)| *first == sent) {
            for (_, rest) in q.drain(..=i) {
                scratch.extend(rest);
            }
        }
    }
    let Some(net) = el.network.as_mut() else {
        return;
    };
    if scratch.is_empty() {
        return;
    }
    for &pkid in scratch.iter() {
        if net
            .write(rumqttc::Packet::PubAck(rumqttc::PubAck::new(pkid)))
            .await
            .is_err()
        {
            return;
        }
    }
    let timeout = Duration::from_secs(el.network_options.connection_timeout());
    if let Err(e) = tokio::time::timeout(timeout, net.flush()).await {
        tracing::debug!(error = %e, "writing PUBACKs timed out");
    }
}

/// A running MQTT source.
#[derive(Debug)]
pub struct MqttSource {
    pub acker: Acker,
    pub task: JoinHandle<()>,
    /// Cancel to let the event loop stop retrying a lost connection.
    pub stop: CancellationToken,
}

/// Bytes of messages (topics and payloads) waiting for the pipeline at most:
/// with payloads cut on arrival (see [`Cut`]) a burst of large messages holds
/// this much, not their size.
pub const QUEUE_BYTES: usize = 16 << 20;

/// Payloads over `max_payload` bytes (`validation.max_payload_bytes`, shared
/// with the pipeline, which updates it on reload) are rejected anyway: only
/// their first `keep` bytes (what the DLQ keeps) are copied on arrival.
#[derive(Debug, Clone)]
pub struct Cut {
    pub max_payload: Arc<std::sync::atomic::AtomicUsize>,
    pub keep: usize,
}

/// Starts the client and its event-loop task; what arrives comes on the receiver.
/// `window`: readings the pipeline holds unsettled at most (`kafka.max_in_flight`).
/// Emptied batches come back through `pool`.
pub fn start(
    cfg: &MqttConfig,
    window: usize,
    metrics: GatewayMetrics,
    pool: Pool<Received>,
    cut: Cut,
) -> Result<(MqttSource, mpsc::Receiver<SourceEvent>), String> {
    let url = parse_mqtt_url(&cfg.url)?;
    let (host, port) = (url.host, url.port);
    let transport = if url.tls {
        rumqttc::Transport::Tls(rumqttc::TlsConfiguration::NativeConnector(
            cfg.tls.connector()?,
        ))
    } else {
        rumqttc::Transport::Tcp
    };
    let keep_alive = Duration::from_secs(cfg.keep_alive_secs.max(5));
    // Messages waiting for the pipeline, and requests (mostly PUBACKs) for
    // the event loop: room for the acks of all the pipeline holds.
    let queued = usize::from(cfg.receive_maximum).max(1000);
    let (client, el) = crate::mqtt::client::new(Options {
        version: cfg.version,
        client_id: cfg.client_id.clone(),
        host,
        port,
        transport,
        login: cfg.username.as_ref().map(|u| {
            let p = cfg.password.as_ref().map(|p| p.expose().to_string());
            (u.clone(), p.unwrap_or_default())
        }),
        keep_alive,
        clean_session: cfg.clean_session,
        manual_acks: true,
        max_packet_bytes: cfg.max_packet_bytes,
        inflight: None,
        session_expiry_secs: Some(cfg.session_expiry_secs),
        receive_maximum: Some(cfg.receive_maximum),
        requests: window + queued,
    });
    let acker = Acker {
        batches: matches!(el, EventLoop::V311(_)).then(AckBatches::default),
        client,
    };
    // Batches; at most `queued` messages in them (the semaphore's permits
    // go with a batch and come back when the pipeline is done with it).
    let (tx, rx) = mpsc::channel(queued);
    let room = Arc::new(tokio::sync::Semaphore::new(queued));
    let room_bytes = Arc::new(tokio::sync::Semaphore::new(QUEUE_BYTES));
    let stop = CancellationToken::new();
    let task = tokio::spawn(event_loop(
        el,
        acker.clone(),
        cfg.clone(),
        (tx, room, room_bytes),
        metrics,
        stop.clone(),
        (pool, cut),
    ));
    Ok((MqttSource { acker, task, stop }, rx))
}

/// Most payloads passed on in one [`Received`]: one wake-up of the pipeline
/// for a socket's worth of messages, not for each read of ten.
const MAX_BATCH: usize = 256;
/// A batch is passed on once it holds this many bytes (a part of
/// [`QUEUE_BYTES`], so several batches can wait).
const MAX_BATCH_BYTES: usize = QUEUE_BYTES / 8;

/// Packets rumqttc handles per read of the socket when more are there (its
/// `max_readb_count` of 10 counts the first one twice).
const READB_COUNT: usize = 9;

/// Polls `f` once. For the event loop's `poll`, which is cancel-safe (what it
/// read stays queued in rumqttc, what it wrote stays in the write buffer):
/// dropped when it would wait.
fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Passes `batch` on to the pipeline, waiting while its channel is full (then
/// nothing more is read: see the module docs). False if the pipeline is gone.
async fn pass_on(batch: &mut Option<Received>, out: &Out, stop: &CancellationToken) -> bool {
    let Some(mut b) = batch.take() else {
        return true;
    };
    let (tx, room, room_bytes) = out;
    let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
    // A batch is at most MAX_BATCH_BYTES plus one message (<= 2 MiB by the
    // config bounds), so this fits the budget.
    let bytes = u32::try_from(b.bytes().min(QUEUE_BYTES)).unwrap_or(u32::MAX);
    let sent = async {
        // Closed only with the pipeline gone.
        let Ok(permit) = room.clone().acquire_many_owned(n).await else {
            return false;
        };
        let Ok(bytes) = room_bytes.clone().acquire_many_owned(bytes).await else {
            return false;
        };
        b.hold(permit, bytes);
        tx.send(SourceEvent::Messages(b)).await.is_ok()
    };
    tokio::select! {
        sent = sent => sent,
        // Shutting down: not taken (the broker redelivers it); keep polling
        // so the last acks and the DISCONNECT go out.
        _ = stop.cancelled() => true,
    }
}

/// Where messages go: the pipeline's channel, and the room left in it (in
/// messages, and in bytes).
type Out = (
    mpsc::Sender<SourceEvent>,
    Arc<tokio::sync::Semaphore>,
    Arc<tokio::sync::Semaphore>,
);

async fn event_loop(
    mut el: EventLoop,
    acker: Acker,
    cfg: MqttConfig,
    out: Out,
    metrics: GatewayMetrics,
    stop: CancellationToken,
    (pool, cut): (Pool<Received>, Cut),
) {
    let tx = &out.0;
    let min = Duration::from_millis(cfg.reconnect_min_ms);
    let max = Duration::from_millis(cfg.reconnect_max_ms);
    let mut backoff = min;
    let mut connected = false;
    let mut subacks = 0;
    let batches = acker.batches.clone();
    let mut scratch = Vec::new();
    let mut batch: Option<Received> = None;
    let cert_problem = cfg.tls.client_certificate_problem();
    if let Some(p) = &cert_problem {
        tracing::warn!(problem = %p, "the MQTT client certificate is outside its validity period; the broker will refuse it");
    }
    // The last batch's size, for the next one.
    let mut size = (0, 0, 0);
    // A batch waits for company until then (`mqtt.batch_linger_ms`).
    let linger = Duration::from_millis(cfg.batch_linger_ms);
    let mut due: Option<tokio::time::Instant> = None;
    'poll: loop {
        if batch.is_none() {
            due = None;
        }
        let mut next = match due {
            // A batch waiting for company: sleep, then take what arrived
            // meanwhile without waiting (one wake-up per batch, not one per
            // message). PUBACKs queued meanwhile go out then too.
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = stop.cancelled() => {}
                }
                match now_or_never(el.poll()) {
                    Some(ev) => ev,
                    None => {
                        if !pass_on(&mut batch, &out, &stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            None => el.poll().await,
        };
        // Messages since the last read of the socket.
        let mut read = 0;
        loop {
            match next {
                Ok(Event::Publish {
                    topic,
                    payload,
                    pkid,
                }) => {
                    // Copied: a payload is a slice of rumqttc's read buffer,
                    // and one slice alive keeps the whole buffer.
                    let b = batch.get_or_insert_with(|| {
                        due = Some(tokio::time::Instant::now() + linger);
                        Received::reuse(&pool, crate::clock::now_ms(), size)
                    });
                    let max = cut.max_payload.load(std::sync::atomic::Ordering::Relaxed);
                    let keep = if payload.len() > max {
                        cut.keep
                    } else {
                        usize::MAX
                    };
                    b.push_cut(&topic, None, &payload, pkid, keep);
                    size = b.size();
                    read += 1;
                    let full = b.len() >= MAX_BATCH || b.bytes() >= MAX_BATCH_BYTES;
                    if full && !pass_on(&mut batch, &out, &stop).await {
                        break 'poll; // pipeline gone
                    }
                }
                Ok(Event::AckSent(pkid)) => {
                    if let Some(b) = &batches {
                        write_rest(&mut el, b, pkid, &mut scratch).await;
                    }
                }
                Ok(Event::ConnAck { session_present }) => {
                    if !pass_on(&mut batch, &out, &stop).await {
                        break 'poll;
                    }
                    connected = true;
                    backoff = min;
                    subacks = 0;
                    tracing::info!(url = %cfg.url, session_present, "MQTT connected; subscribing");
                    // Acks of the old connection not written by now are dropped: written
                    // later, a reused pkid could ack a message not yet in Kafka.
                    if let Some(b) = &batches {
                        lock(b).clear();
                    }
                    metrics.security.cleared("mqtt", &SecurityKind::CONNECTION);
                    // A new connection: the broker redelivers whatever was not acked.
                    let _ = tx.send(SourceEvent::Connected).await;
                    acker.subscribe_all(&cfg.subscriptions());
                }
                Ok(Event::SubAck { refused }) if refused > 0 => {
                    metrics.security.failed(
                        "mqtt",
                        SecurityKind::Acl,
                        format!(
                            "{} refused {refused} of the subscriptions {:?} for user {} (check the broker's ACL)",
                            cfg.url,
                            cfg.subscriptions(),
                            cfg.username.as_deref().unwrap_or("(none)")
                        ),
                    );
                }
                Ok(Event::SubAck { .. }) => {
                    subacks += 1;
                    // Ready only once every filter is subscribed.
                    if subacks == cfg.topics.len() {
                        metrics.security.cleared("mqtt", &SecurityKind::ALL);
                        metrics.mqtt_up(&cfg.url);
                    }
                }
                Ok(Event::Disconnecting) => break 'poll,
                Ok(Event::PubAck { .. } | Event::Other) => {}
                Err(e) => {
                    // What arrived before the connection broke goes on first.
                    if !pass_on(&mut batch, &out, &stop).await || stop.is_cancelled() {
                        break 'poll;
                    }
                    match crate::security::mqtt::classify_with(&e, cert_problem.as_deref()) {
                        Some((kind, e)) => {
                            let user = cfg.username.as_deref();
                            let why = crate::security::mqtt::describe(kind, &cfg.url, user, &e);
                            metrics.security.failed("mqtt", kind, why);
                            metrics.mqtt_connected(false);
                        }
                        None => {
                            let hint = crate::security::mqtt::plaintext_hint(&cfg.url, &e);
                            metrics.mqtt_down(&cfg.url, &format!("{e}{hint}"), connected)
                        }
                    }
                    connected = false;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => break 'poll,
                    }
                    backoff = (backoff * 2).min(max);
                    continue 'poll;
                }
            }
            // More of what already arrived, without waiting: first what
            // rumqttc queued, then whatever the socket has now, up to a batch.
            if let Some(ev) = el.buffered() {
                next = Ok(ev);
                continue;
            }
            // rumqttc reads at most READB_COUNT packets at a time: fewer
            // means the socket had no more, and asking again is a wasted read.
            if read < READB_COUNT
                || batch
                    .as_ref()
                    .is_none_or(|b| b.len() >= MAX_BATCH || b.bytes() >= MAX_BATCH_BYTES)
            {
                break;
            }
            read = 0;
            match now_or_never(el.poll()) {
                Some(ev) => next = ev,
                None => break,
            }
        }
        // Not full: it may wait for company (at low rates one wake-up of
        // every stage then serves several messages).
        let full = batch
            .as_ref()
            .is_some_and(|b| b.len() >= MAX_BATCH || b.bytes() >= MAX_BATCH_BYTES);
        if !full && due.is_some_and(|at| at > tokio::time::Instant::now()) {
            continue;
        }
        if !pass_on(&mut batch, &out, &stop).await {
            break;
        }
    }
    metrics.mqtt_connected(false);
}
