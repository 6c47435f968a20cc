//! systemd `Type=notify`: `READY=1` once the service accepts work, `WATCHDOG=1`
//! from the loop that does the work (so a wedged service is restarted when
//! `WatchdogSec=` is set), `STOPPING=1` on shutdown. Without `NOTIFY_SOCKET`
//! (not under systemd) every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

#[derive(Debug)]
pub struct Notifier {
    active: bool,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    ready: bool,
}

impl Notifier {
    pub fn from_env() -> Self {
        Notifier {
            active: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            ready: false,
        }
    }

    fn send(&self, what: &[NotifyState<'_>]) {
        if self.active {
            if let Err(e) = sd_notify::notify(what) {
                tracing::warn!(error = %e, "systemd notification failed");
            }
        }
    }

    /// `READY=1`, once.
    pub fn ready(&mut self, status: &str) {
        if !self.ready {
            self.ready = true;
            self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
            if self.active {
                tracing::info!("told systemd: ready");
            }
        }
    }

    /// This notifier of another loop of the process: `READY=1` was sent.
    pub fn after_ready(mut self) -> Self {
        self.ready = true;
        self
    }

    /// `WATCHDOG=1` when half the watchdog interval has passed since the last one.
    pub fn alive(&mut self) {
        let Some(every) = self.watchdog else { return };
        let now = Instant::now();
        if self
            .last_ping
            .is_none_or(|t| now.duration_since(t) >= every / 2)
        {
            self.last_ping = Some(now);
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// How often the owning loop should wake up to call [`Notifier::alive`]
    /// (and check readiness): often until ready, then a quarter of the watchdog.
    pub fn tick(&self) -> Duration {
        let wd = self.watchdog.map_or(Duration::from_secs(3600), |w| w / 4);
        if self.ready {
            wd.max(Duration::from_millis(50))
        } else {
            wd.min(Duration::from_millis(100))
        }
    }

    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping]);
    }
}
