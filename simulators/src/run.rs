//! A run: the connections, the paced fleet, the progress line and the manifest.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use iot_gateway::clock::now_ms;
use iot_gateway::config::MqttVersion;
use iot_gateway::fleet::{Emitted, Fleet, Manifest, Rng, Style};
use iot_gateway::mqtt::{self, Event};

use crate::scenario::Settings;

/// Counters shared with the progress line.
#[derive(Default)]
pub(crate) struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    /// MQTT 5 PUBACKs with a failure reason (e.g. NotAuthorized by an ACL).
    refused: AtomicU64,
    faults: AtomicU64,
}

/// Connects one client; returns once the broker accepted it (or fails clearly).
pub(crate) async fn connect(
    s: &Settings,
    index: usize,
    device: &str,
    stats: Arc<Stats>,
) -> Result<(mqtt::Client, tokio::task::JoinHandle<()>)> {
    let id = format!("sim-{}-{}-{index}", std::process::id(), s.spec.seed);
    let (transport, login) = s.auth.for_connection(device)?;
    let (conn, mut el) = mqtt::client::new(mqtt::Options {
        version: if s.v5 {
            MqttVersion::V5
        } else {
            MqttVersion::V311
        },
        client_id: id,
        host: s.host.clone(),
        port: s.port,
        transport,
        login,
        keep_alive: Duration::from_secs(30),
        clean_session: true,
        manual_acks: false,
        max_packet_bytes: 4 << 20,
        inflight: Some(1000),
        session_expiry_secs: None,
        receive_maximum: None,
        requests: 10_000,
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let mut ready_tx = Some(ready_tx);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::ConnAck { .. }) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(Ok(()));
                    }
                }
                Ok(Event::PubAck { refused: None }) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::PubAck {
                    refused: Some(reason),
                }) => {
                    if stats.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("simulator: connection {index}: the broker refused a publish: {reason} (check its ACL)");
                    }
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Disconnecting) => break,
                Ok(_) => {}
                Err(e) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(Err(e));
                        break;
                    }
                    eprintln!("simulator: connection {index}: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
        Ok(Ok(Ok(()))) => Ok((conn, task)),
        Ok(Ok(Err(e))) => match iot_gateway::security::mqtt::classify(&e) {
            Some(kind) => bail!(
                "{}",
                iot_gateway::security::mqtt::describe(
                    kind,
                    &s.broker,
                    s.auth.user_for(device).as_deref(),
                    &e
                )
            ),
            None => bail!(
                "cannot connect to the MQTT broker at {}: {e}{}\n(is it running? for the local stack: scripts/stack up)",
                s.broker,
                iot_gateway::security::mqtt::plaintext_hint(&s.broker, &e)
            ),
        },
        _ => bail!("no answer from the MQTT broker at {} within 10 s", s.broker),
    }
}

pub(crate) async fn run(s: Settings, quiet: bool, manifest_path: Option<PathBuf>) -> Result<bool> {
    let stats = Arc::new(Stats::default());
    let mut conns = Vec::with_capacity(s.connections);
    let mut tasks = Vec::with_capacity(s.connections);
    let mut fleet = Fleet::new(s.spec.clone());
    for i in 0..s.connections {
        let (c, t) = connect(&s, i, fleet.device_id(i), stats.clone()).await?;
        conns.push(c);
        tasks.push(t);
    }
    let mut manifest = Manifest::new(&s.spec);
    let topics: Vec<String> = (0..fleet.len())
        .map(|d| format!("{}/{}/telemetry", s.topic_prefix, fleet.device_id(d)))
        .collect();
    if !quiet {
        eprintln!(
            "simulator: {} devices -> {} ({} connection(s), QoS {}, MQTT {}, {} style, rate {}, faults {})",
            s.spec.devices,
            s.broker,
            s.connections,
            s.qos,
            if s.v5 { "5" } else { "3.1.1" },
            if s.spec.style == Style::Canonical { "canonical" } else { "minimal" },
            s.rate.map_or("max".to_string(), |r| format!("{r}/s per device")),
            s.spec.fault_rate,
        );
        if let Some(d) = &s.description {
            eprintln!("scenario: {d}");
        }
    }

    let stop = iot_gateway::shutdown::on_signals();
    let started = Instant::now();
    let progress = (!quiet).then(|| tokio::spawn(progress_loop(stats.clone(), started)));
    let deadline = s.duration.map(|d| started + d);
    let mut ticks = vec![0u64; fleet.len()];
    let mut out: Vec<Emitted> = Vec::new();
    let mut jitter_rng = Rng::new(s.spec.seed ^ 0xA5A5);
    // Scheduling: a heap of (due, device) for paced runs; round-robin at max rate.
    let interval = s.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut heap: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    if let Some(iv) = interval {
        for d in 0..fleet.len() {
            // Spread the first readings over one interval.
            heap.push(Reverse((
                started + iv.mul_f64(d as f64 / fleet.len() as f64),
                d,
            )));
        }
    }
    let mut rr = 0usize;
    let mut active = fleet.len();
    'run: while active > 0 {
        if stop.is_cancelled() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let device = match interval {
            None => {
                // Max rate: next device that still has readings to send.
                let mut tries = 0;
                while s.count.is_some_and(|c| ticks[rr] >= c) {
                    rr = (rr + 1) % fleet.len();
                    tries += 1;
                    if tries > fleet.len() {
                        break 'run;
                    }
                }
                let d = rr;
                rr = (rr + 1) % fleet.len();
                d
            }
            Some(iv) => {
                let Some(Reverse((due, d))) = heap.pop() else {
                    break;
                };
                let now = Instant::now();
                if due > now {
                    let wait = tokio::time::sleep(due - now);
                    tokio::select! {
                        _ = wait => {}
                        _ = stop.cancelled() => break 'run,
                    }
                }
                let j = 1.0 + s.jitter * (2.0 * jitter_rng.next_f64() - 1.0);
                if s.count.is_none_or(|c| ticks[d] + 1 < c) {
                    heap.push(Reverse((due + iv.mul_f64(j), d)));
                }
                d
            }
        };
        ticks[device] += 1;
        if s.count.is_some_and(|c| ticks[device] == c) {
            active -= 1;
        }
        out.clear();
        fleet.tick(device, now_ms(), &mut out);
        for e in out.drain(..) {
            manifest.record(fleet.device_id(device), &e);
            if e.fault.is_some() {
                stats.faults.fetch_add(1, Ordering::Relaxed);
            }
            if !e.payload.is_empty() {
                // A failed publish ends the run with an error and no manifest.
                let conn = &conns[device % conns.len()];
                conn.publish(topics[device].clone(), s.qos == 1, e.payload)
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))?;
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    // QoS 1: wait (bounded) until the broker acknowledged everything sent.
    let sent = stats.sent.load(Ordering::Relaxed);
    let mut all_acked = true;
    if s.qos == 1 {
        let wait_until = Instant::now() + Duration::from_secs(30);
        while stats.acked.load(Ordering::Relaxed) < sent && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all_acked = stats.acked.load(Ordering::Relaxed) >= sent;
    } else {
        // QoS 0 has no acks: give the event loops a moment to write their buffers.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for c in &conns {
        c.disconnect().await;
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(path) = manifest_path {
        let json = serde_json::to_string_pretty(&manifest)?;
        std::fs::write(&path, json)
            .with_context(|| format!("writing manifest {}", path.display()))?;
    }
    if !quiet {
        let t = &manifest.totals;
        eprintln!(
            "done in {elapsed:.1}s: sent {sent} payloads ({:.0}/s): {} valid, {} invalid, {} duplicates; acked {}{}",
            sent as f64 / elapsed.max(1e-9),
            t.valid,
            t.invalid,
            t.duplicates,
            if s.qos == 1 { stats.acked.load(Ordering::Relaxed).to_string() } else { "n/a (QoS 0)".into() },
            if t.faults.is_empty() { String::new() } else { format!("; faults {:?}", t.faults) },
        );
    }
    let refused = stats.refused.load(Ordering::Relaxed);
    if refused > 0 {
        eprintln!("simulator: the broker refused {refused} of {sent} publishes (MQTT 5 reason codes; see above)");
    }
    if !all_acked {
        eprintln!(
            "simulator: only {} of {sent} QoS 1 publishes were acknowledged by the broker",
            stats.acked.load(Ordering::Relaxed)
        );
    }
    Ok(all_acked && refused == 0)
}

pub(crate) async fn progress_loop(stats: Arc<Stats>, started: Instant) {
    let mut last = (0u64, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let sent = stats.sent.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (sent - last.0) as f64 / (now - last.1).as_secs_f64();
        last = (sent, now);
        eprintln!(
            "[{:>6.1}s] rate {:>8.0}/s  sent {:>9}  acked {:>9}  faults {:>6}",
            started.elapsed().as_secs_f64(),
            rate,
            sent,
            stats.acked.load(Ordering::Relaxed),
            stats.faults.load(Ordering::Relaxed)
        );
    }
}
