//! SIGHUP (`systemctl reload`): read the configuration again and apply what can
//! change without losing a reading (log level, validation limits); say in the
//! log what was applied and what needs a restart. A configuration that does
//! not load is rejected and the running one stays.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::GatewayConfig;
use crate::reading::Limits;

/// Loads the configuration the way the process was started (file + environment).
pub type Loader = Arc<dyn Fn() -> Result<GatewayConfig, String> + Send + Sync>;

/// Dotted keys whose values differ (secrets compare masked: they need a restart
/// anyway, like the files they come from).
pub fn changed_keys(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    flatten("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// What a reload may change in the running process.
fn live(key: &str) -> bool {
    key == "log.level" || key.starts_with("validation.")
}

/// Listens for SIGHUP until `stop`; new validation limits go to `limits`.
pub fn spawn(
    loader: Loader,
    mut running: GatewayConfig,
    limits: watch::Sender<Limits>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; reloading is off");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                _ = stop.cancelled() => return,
            }
            info!("SIGHUP: reloading the configuration");
            let new = match loader() {
                Ok(c) => c,
                Err(e) => {
                    error!("reload rejected, the running configuration stays: {e}");
                    continue;
                }
            };
            let keys = changed_keys(&running, &new);
            if keys.is_empty() {
                info!("configuration reloaded: nothing changed");
                continue;
            }
            let (live_keys, restart): (Vec<String>, Vec<String>) =
                keys.into_iter().partition(|k| live(k));
            let mut applied = Vec::new();
            let mut refused = Vec::new();
            for k in live_keys {
                if k == "log.level" {
                    match crate::telemetry::set_log_level(&new.log.level) {
                        Ok(()) => {
                            running.log.level = new.log.level.clone();
                            applied.push(k);
                        }
                        Err(e) => refused.push(format!("{k} ({e})")),
                    }
                } else {
                    applied.push(k);
                }
            }
            if applied.iter().any(|k| k.starts_with("validation.")) {
                running.validation = new.validation.clone();
                let _ = limits.send(new.validation.clone());
            }
            info!(
                applied = ?applied,
                not_applied = ?refused,
                needs_restart = ?restart,
                "configuration reloaded"
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_changed_keys_and_which_are_live() {
        let a = GatewayConfig::default();
        let mut b = a.clone();
        b.validation.temperature_max = 50.0;
        b.log.level = "debug".into();
        b.kafka.linger_ms = 20;
        let keys = changed_keys(&a, &b);
        assert_eq!(
            keys,
            ["kafka.linger_ms", "log.level", "validation.temperature_max"]
        );
        assert!(live("log.level") && live("validation.temperature_max"));
        assert!(!live("kafka.linger_ms") && !live("log.format"));
    }
}
