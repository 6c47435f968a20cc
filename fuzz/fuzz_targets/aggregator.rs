#![no_main]
// The target's checks: iot_gateway::fuzzing::aggregator (src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| iot_gateway::fuzzing::aggregator(data));
