//! MQTT plumbing shared by the gateway and the simulator.

pub mod client;
mod url;

pub use self::client::{Client, Event, EventLoop, Options};
pub use self::url::{parse_mqtt_url, redact_url, MqttUrl};
