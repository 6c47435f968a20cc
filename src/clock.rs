//! The wall clock, and whether it can be trusted.
//!
//! Edge boxes often boot without a battery-backed clock and without network
//! time for hours. The kernel knows: `adjtimex(2)` reports `STA_UNSYNC` (or
//! `TIME_ERROR`) until a time daemon has disciplined the clock. [`watch`]
//! reads it once a second (by `[clock] sync`) into a flag that [`synced`]
//! reads on the hot path; while the clock is not synchronised the gateway keeps
//! device timestamps instead of judging them by its own clock.
//!
//! Durations never come from this clock: the code measures them with
//! `Instant` (monotonic), or clamps what only a wall time can give (the age of
//! a record read back from disk).
//!
//! Test-only (cargo feature `failpoints`): `IOT_TEST_CLOCK=<file>` holding
//! `<offset ms> <synced|unsynced>` shifts [`now_ms`] and sets the status,
//! re-read every 100 ms, so a test can step the clock of a running process
//! (libfaketime breaks librdkafka's timed waits).

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the gateway decides whether its clock is synchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// The kernel's status (`adjtimex`), else systemd-timesyncd's flag file;
    /// when neither can be read, the clock is trusted (as before this check).
    #[default]
    Auto,
    /// Always trust the clock (a GPS- or PTP-disciplined box whose status the
    /// kernel does not know).
    AssumeSynced,
    /// Never judge device timestamps by this clock.
    AssumeUnsynced,
}

/// What [`status`] can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Synced,
    Unsynced,
    /// Neither the kernel nor timesyncd could be asked (treated as synced).
    Unknown,
}

const UNKNOWN: u8 = 0;
const SYNCED: u8 = 1;
const UNSYNCED: u8 = 2;

static STATUS: AtomicU8 = AtomicU8::new(UNKNOWN);
/// Test-only shift of [`now_ms`] (always 0 without the `failpoints` feature).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Now, epoch milliseconds, by the wall clock.
pub fn now_ms() -> i64 {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    real.saturating_add(OFFSET_MS.load(Ordering::Relaxed))
}

impl Status {
    /// For the `*_clock_synchronized` gauges: 1, 0, or -1 for unknown.
    pub fn gauge(self) -> i64 {
        match self {
            Status::Synced => 1,
            Status::Unsynced => 0,
            Status::Unknown => -1,
        }
    }
}

/// The last status [`watch`] saw.
pub fn status() -> Status {
    match STATUS.load(Ordering::Relaxed) {
        SYNCED => Status::Synced,
        UNSYNCED => Status::Unsynced,
        _ => Status::Unknown,
    }
}

/// Whether device timestamps may be judged by this clock.
pub fn synced() -> bool {
    status() != Status::Unsynced
}

fn set(s: Status) {
    let v = match s {
        Status::Synced => SYNCED,
        Status::Unsynced => UNSYNCED,
        Status::Unknown => UNKNOWN,
    };
    let before = STATUS.swap(v, Ordering::Relaxed);
    if before != v && CHECKED.swap(true, Ordering::Relaxed) {
        tracing::info!(status = ?s, "system clock status changed");
    }
}

/// Whether a status was set before (the first one is not a change).
static CHECKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reads the status now (see [`SyncMode`]), and keeps it current until
/// `stop`: every second, and every 100 ms with a test clock.
pub fn watch(mode: SyncMode, stop: tokio_util::sync::CancellationToken) {
    let test = test_clock_file();
    let check = move || {
        if let Some(path) = &test {
            read_test_clock(path);
            return;
        }
        set(match mode {
            SyncMode::AssumeSynced => Status::Synced,
            SyncMode::AssumeUnsynced => Status::Unsynced,
            SyncMode::Auto => probe(),
        });
    };
    check();
    let every = if test_clock_file().is_some() {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => check(),
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// The kernel's view, else timesyncd's flag file, else unknown.
pub fn probe() -> Status {
    match kernel_synced() {
        Some(true) => Status::Synced,
        Some(false) => Status::Unsynced,
        None if std::path::Path::new("/run/systemd/timesync/synchronized").exists() => {
            Status::Synced
        }
        None => Status::Unknown,
    }
}

/// `adjtimex(2)` with no modes (a read): `Some(false)` when the kernel says
/// `TIME_ERROR` or `STA_UNSYNC`; `None` when the call is refused (a seccomp
/// filter) or not on Linux.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn kernel_synced() -> Option<bool> {
    // SAFETY: `timex` is plain integers; all-zero (modes = 0) is the
    // documented read-only query, and the kernel only writes into the struct
    // we own for the duration of the call.
    let (state, status) = unsafe {
        let mut t: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut t);
        (state, t.status)
    };
    if state < 0 {
        return None;
    }
    Some(state != libc::TIME_ERROR && status & libc::STA_UNSYNC == 0)
}

#[cfg(not(target_os = "linux"))]
fn kernel_synced() -> Option<bool> {
    None
}

#[cfg(feature = "failpoints")]
fn test_clock_file() -> Option<std::path::PathBuf> {
    std::env::var_os("IOT_TEST_CLOCK").map(Into::into)
}

#[cfg(not(feature = "failpoints"))]
fn test_clock_file() -> Option<std::path::PathBuf> {
    None
}

/// `<offset ms> <synced|unsynced>`; a file being rewritten is read next time.
fn read_test_clock(path: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let mut words = text.split_whitespace();
    let (Some(offset), Some(state)) = (words.next(), words.next()) else {
        return;
    };
    let Ok(offset) = offset.parse::<i64>() else {
        return;
    };
    OFFSET_MS.store(offset, Ordering::Relaxed);
    set(if state == "unsynced" {
        Status::Unsynced
    } else {
        Status::Synced
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_config_spellings_are_the_documented_ones() {
        for (text, mode) in [
            ("auto", SyncMode::Auto),
            ("assume_synced", SyncMode::AssumeSynced),
            ("assume_unsynced", SyncMode::AssumeUnsynced),
        ] {
            let got: SyncMode = serde_json::from_str(&format!("{text:?}")).unwrap();
            assert_eq!(got, mode);
        }
        assert!(serde_json::from_str::<SyncMode>("\"synced\"").is_err());
        assert_eq!(
            [Status::Synced, Status::Unsynced, Status::Unknown].map(Status::gauge),
            [1, 0, -1]
        );
    }

    /// The test clock shifts `now_ms` and sets the status; a torn or bad
    /// file changes nothing. (Restored at the end: other tests pass the
    /// clock state explicitly and do not read these globals.)
    #[test]
    fn the_test_clock_file_shifts_now_and_sets_the_status() {
        let path = std::env::temp_dir().join(format!("iot-clock-{}", std::process::id()));
        std::fs::write(&path, "-7200000 unsynced\n").unwrap();
        let real = now_ms();
        read_test_clock(&path);
        let shifted = now_ms();
        assert!(
            (real - 7_200_000 - shifted).abs() < 5_000,
            "{real} {shifted}"
        );
        assert_eq!(status(), Status::Unsynced);
        assert!(!synced());
        for bad in ["", "12", "x synced"] {
            std::fs::write(&path, bad).unwrap();
            read_test_clock(&path);
            assert_eq!(status(), Status::Unsynced, "{bad:?} changed the status");
        }
        std::fs::write(&path, "0 synced").unwrap();
        read_test_clock(&path);
        assert_eq!(status(), Status::Synced);
        assert!((now_ms() - real).abs() < 5_000);
        STATUS.store(UNKNOWN, Ordering::Relaxed);
        let _ = std::fs::remove_file(&path);
        // Asking the kernel works on this machine (no daemon: usually Unsynced).
        let _ = probe();
    }
}
