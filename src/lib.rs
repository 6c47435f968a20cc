//! IoT sensor gateway library. Data flows:
//!
//! ```text
//! gateway::mqtt / gateway::simulated (fleet)      sources -> SourceEvent
//!   -> reading::parse                              raw payload -> Reading | Rejection
//!   -> gateway (pipeline)                          canonical JSON, keyed by device
//!   -> gateway::kafka                              idempotent producer, delivery reports
//!   -> gateway::acks                               PUBACK the contiguous delivered prefix
//! ```
//!
//! - [`reading`]: validation and the canonical record (pure).
//! - [`fleet`]: the sensor fleet generator, shared with the `simulator` binary.
//! - [`config`]: typed config, file + environment, validated without I/O.
//! - [`telemetry`], [`http`]: logs, metrics encoding, the `/metrics` `/healthz` `/readyz` server.

pub mod aggregator;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod gateway;
pub mod http;
pub mod reading;
pub mod shutdown;
pub mod telemetry;
