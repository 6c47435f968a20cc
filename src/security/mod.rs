//! TLS and authentication, written once for every client we run: MQTT (the
//! gateway's source, the simulator's devices) and Kafka (the gateway's producer,
//! the aggregator's consumer). Config sections, secrets that never reach a log,
//! and the classification of handshake and login failures into clear errors.

pub mod kafka;
pub mod mqtt;
pub mod secret;
pub mod status;

pub use secret::Secret;
pub use status::{SecurityKind, SecurityStatus};
