//! Simulated source: an in-process fleet (the simulator's generator) feeding the
//! same pipeline as MQTT, so the gateway's main job runs without a broker.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Incoming, SourceEvent};
use crate::config::SimulateConfig;
use crate::fleet::{Emitted, Fleet, FleetSpec, Pacer};

/// Starts the fleet task; readings arrive on the returned channel.
pub fn start(cfg: &SimulateConfig, shutdown: CancellationToken) -> mpsc::Receiver<SourceEvent> {
    let (tx, rx) = mpsc::channel(1024);
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
            for _ in 0..due {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                out.clear();
                fleet.tick(next, now, &mut out);
                let device = fleet.device_id(next).to_string();
                next = (next + 1) % fleet.len();
                for e in out.drain(..).filter(|e| !e.payload.is_empty()) {
                    let msg = Incoming {
                        topic: "simulated".into(),
                        device: Some(device.clone()),
                        payload: e.payload.into(),
                        received_ms: now,
                        received_at: Instant::now(),
                        pkid: None,
                    };
                    tokio::select! {
                        r = tx.send(SourceEvent::Message(msg)) => if r.is_err() { return },
                        _ = shutdown.cancelled() => return,
                    }
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
