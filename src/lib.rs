//! IoT sensor gateway: sensor readings over MQTT (or simulated) are validated,
//! keyed by device and produced to Kafka; an aggregator consumes them.
//!
//! Modules arrive with their features; see README.md for what works today.
