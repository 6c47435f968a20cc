//! Simulated source: an in-process fleet (the simulator's generator) feeding the
//! same pipeline as MQTT, so the gateway's main job runs without a broker.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::source::{Received, SourceEvent};
use crate::config::SimulateConfig;
use crate::fleet::{Emitted, Fleet, FleetSpec, Pacer};

/// Starts the fleet task; readings arrive on the returned channel.
pub fn start(cfg: &SimulateConfig, shutdown: CancellationToken) -> mpsc::Receiver<SourceEvent> {
    // Batches of up to 256 readings.
    let (tx, rx) = mpsc::channel(16);
    let spec = FleetSpec {
        devices: cfg.devices,
        seed: cfg.seed,
        fault_rate: cfg.faults,
        time_scale: cfg.time_scale,
        ..FleetSpec::default()
    };
    let rate = cfg.devices as f64 * cfg.rate_per_device;
    tokio::spawn(async move {
        let mut fleet = Fleet::new(spec);
        let mut pacer = Pacer::new(Some(rate));
        let mut out: Vec<Emitted> = Vec::new();
        let mut next = 0usize;
        loop {
            let due = pacer.due(10_000);
            let now = crate::clock::now_ms();
            let mut batch = Received::new(now);
            for _ in 0..due {
                out.clear();
                fleet.tick(next, now, &mut out);
                let device = fleet.device_id(next);
                for e in out.iter().filter(|e| !e.payload.is_empty()) {
                    batch.push("simulated", Some(device), &e.payload, None);
                }
                next = (next + 1) % fleet.len();
                if batch.len() >= 256 {
                    let full = std::mem::replace(&mut batch, Received::new(now));
                    tokio::select! {
                        r = tx.send(SourceEvent::Messages(full)) => if r.is_err() { return },
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            if !batch.is_empty() {
                tokio::select! {
                    r = tx.send(SourceEvent::Messages(batch)) => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
            }
            pacer.sent(due);
            tokio::select! {
                _ = tokio::time::sleep(pacer.wait().max(Duration::from_millis(1))) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
    rx
}
