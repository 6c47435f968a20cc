//! Replays every committed fuzz input (`fuzz/corpus/<target>/`, minimized by
//! `scripts/fuzz`) through the same checks the fuzz targets run
//! (`iot_gateway::fuzzing`), on the stable toolchain: the test command's short
//! pass of each target. Crashes the fuzzer found are named tests below.

use std::path::Path;

use iot_gateway::fuzzing;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/fuzz writes it)", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).expect("corpus file"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_committed_corpus_input_passes_its_target() {
    let mut total = 0;
    for target in fuzzing::TARGETS {
        let inputs = corpus(target);
        assert!(!inputs.is_empty(), "no corpus for {target}");
        for (name, data) in &inputs {
            let r = std::panic::catch_unwind(|| fuzzing::run(target, data));
            assert!(r.is_ok(), "fuzz/corpus/{target}/{name} fails its target");
        }
        eprintln!("{target}: {} inputs", inputs.len());
        total += inputs.len();
    }
    eprintln!("{total} corpus inputs replayed");
}

// Regressions: each input the fuzzer (or a user) found crashing, by name.

/// `quote_non_finite_tokens` sliced a `str` inside a multi-byte character
/// (issue 23: a 2-byte MQTT payload crash-looped the gateway).
#[test]
fn regression_reading_non_ascii_outside_a_json_string() {
    for payload in [
        "\u{e9}",
        "{\u{201c}temperature\u{201d}:21}",
        "21\u{b0}C",
        "{\"t\": 21} \u{e9}",
    ] {
        let mut data = vec![1u8];
        data.extend_from_slice(payload.as_bytes());
        fuzzing::reading(&data);
    }
}

/// Found by the `config` target (an out-of-memory abort): a top-level key with
/// an array index, which the config crate would have sized an array by.
/// Also kept in the corpus as `fuzz/corpus/config/regression-key-with-array-index`.
#[test]
fn regression_config_key_with_a_huge_array_index() {
    fuzzing::config(b"\n'3[-3331133113]' =1");
    fuzzing::config(b"[ 'mqtt[99999999999]' ]\nurl = 1\n");
}
