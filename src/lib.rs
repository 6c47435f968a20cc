//! IoT sensor gateway library. Data flows:
//!
//! ```text
//! gateway::mqtt / gateway::simulated (fleet)      sources -> SourceEvent (a batch: Received)
//!   -> gateway::intake (reading::parse_ref)        Kafka record: canonical reading or dead letter,
//!                                                  encoded into the wake-up's gateway::batch
//!   -> gateway::spool (writer, syncer threads)     append; group fsync -> durable
//!   -> gateway::acks                               PUBACK the contiguous durable prefix
//! gateway::spool (reader) -> gateway::forwarder    from the append: idempotent producer, in order
//!                                                  -> checkpoint (never past the fsynced end)
//! ```
//!
//! - [`reading`]: validation and the canonical record (pure).
//! - [`fleet`]: the sensor fleet generator, shared with the `simulator` binary.
//! - [`config`]: typed config, file + environment, validated without I/O.
//! - [`guard`]: a panic on one message becomes that message's error, not an outage.
//! - [`telemetry`], [`http`]: logs, metrics encoding, the `/metrics` `/healthz` `/readyz` server.

/// `--version` of every binary: version, git commit and target triple.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("IOT_GIT_COMMIT"),
    ", ",
    env!("IOT_BUILD_TARGET"),
    ")"
);

pub mod aggregator;
pub mod cli;
pub mod clock;
pub mod config;
pub mod devices;
pub mod fleet;
pub mod fuzzing;
pub mod gateway;
pub mod guard;
pub mod http;
pub mod reading;
pub mod security;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;
