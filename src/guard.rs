//! Panics on outside input must not stop the pipeline. [`catch`] runs one
//! message's pure step and turns a panic into an error the caller routes (the
//! gateway dead-letters the message, the aggregator skips and counts it);
//! [`payload_hash`] names the message in the one error log line.
//!
//! Test-only failpoints (cargo feature `failpoints`, never in a release
//! build): `IOT_FAILPOINT_<NAME>=<text>` makes [`failpoint`] panic on a
//! payload that contains `<text>`.

use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    /// Inside [`catch`]: a panic here is one message's, not the process's.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`; a panic becomes `Err(panic message)`.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CATCHING.with(|c| c.replace(true));
    // State touched by `f` is the message's own (parsers are pure), so
    // nothing half-updated is observed after the unwind.
    let r = catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p));
    CATCHING.with(|c| c.set(outer));
    r
}

/// For the binaries: a panic outside [`catch`] (any thread or task) ends the
/// process at once with exit code 101, so systemd or compose restart it; a
/// thread that died quietly would leave a process that is up and does
/// nothing (a dead syncer: no more PUBACKs; a dead forwarder: nothing to
/// Kafka). A panic inside [`catch`] is logged by its caller instead.
pub fn exit_on_panic(service: &str) {
    let service = service.to_string();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CATCHING.with(|c| c.get()) {
            return;
        }
        default(info);
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(%thread, panic = %info, "a thread died; exiting so the service is restarted");
        eprintln!("{service}: a thread died ({thread}): exiting so the service is restarted");
        std::process::exit(101);
    }));
}

/// The text of a panic's payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

/// A short stable hash of a payload for logs (CRC32C, hex).
pub fn payload_hash(payload: &[u8]) -> String {
    format!("{:08x}", crc32c::crc32c(payload))
}

/// Panics when the failpoint `name` is armed and `payload` contains its text.
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str, payload: &[u8]) {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static ARMED: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::vars()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("IOT_FAILPOINT_")?.to_ascii_lowercase();
                (!v.is_empty()).then(|| (name, v.into_bytes()))
            })
            .collect()
    });
    if let Some(text) = armed.get(name) {
        if payload.windows(text.len()).any(|w| w == text.as_slice()) {
            panic!("failpoint {name} hit");
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_name: &str, _payload: &[u8]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(catch(|| 7), Ok(7));
        assert_eq!(catch(|| -> u8 { panic!("boom") }), Err("boom".into()));
        let n = 3;
        assert_eq!(catch(|| -> u8 { panic!("boom {n}") }), Err("boom 3".into()));
        assert_eq!(payload_hash(b""), "00000000");
    }
}
