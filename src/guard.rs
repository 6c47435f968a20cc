//! Panics on outside input must not stop the pipeline. [`catch`] runs one
//! message's pure step and turns a panic into an error the caller routes (the
//! gateway dead-letters the message, the aggregator skips and counts it);
//! [`payload_hash`] names the message in the one error log line.
//!
//! Test-only failpoints (cargo feature `failpoints`, never in a release
//! build): `IOT_FAILPOINT_<NAME>=<text>` makes [`failpoint`] panic on a
//! payload that contains `<text>`.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`; a panic becomes `Err(panic message)`.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    // State touched by `f` is the message's own (parsers are pure), so
    // nothing half-updated is observed after the unwind.
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
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
