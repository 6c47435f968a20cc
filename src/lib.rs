//! IoT sensor gateway library. Data flows:
//!
//! ```text
//! gateway::mqtt / gateway::simulated (fleet)   sources -> SourceEvent (a batch: gateway::source::Received)
//!   -> gateway::intake (reading::parse_ref)     one decision per payload: reading, dead letter or
//!                                               skipped duplicate, encoded into the wake-up's batch
//!   -> gateway::log (spool, or memory)          append; confirmed when durable (group fsync)
//!   -> gateway::forwarder                       reads the log in order: idempotent producer;
//!                                               releases what Kafka has (the spool checkpoint)
//!   -> gateway::acks                            PUBACK the contiguous confirmed prefix
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
pub mod mqtt;
pub mod reading;
pub mod security;
pub mod shutdown;
pub mod sync;
pub mod systemd;
pub mod telemetry;
