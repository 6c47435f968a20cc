//! A private stack of our own (for tests that stop or kill a broker).

use super::*;

/// A second instance of a stack service (own ports, own data dir), started and
/// stopped with the project's own `scripts/stack`, for tests that stop brokers.
pub(crate) struct PrivateStack {
    pub(crate) dir: std::path::PathBuf,
    pub(crate) kafka_port: u16,
    pub(crate) controller_port: u16,
    pub(crate) mqtt_port: u16,
    pub(crate) prometheus_port: u16,
    /// Scrape config for a private Prometheus (default: the project's).
    pub(crate) prometheus_config: Option<std::path::PathBuf>,
}

impl PrivateStack {
    pub(crate) fn new(dir: &std::path::Path) -> Self {
        PrivateStack {
            dir: dir.join("stack"),
            kafka_port: free_port(),
            controller_port: free_port(),
            mqtt_port: free_port(),
            prometheus_port: free_port(),
            prometheus_config: None,
        }
    }

    pub(crate) fn prometheus_url(&self) -> String {
        format!("127.0.0.1:{}", self.prometheus_port)
    }

    pub(crate) fn kafka_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    pub(crate) fn mqtt_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// Runs `scripts/stack ARGS` for this instance; panics with its output on failure.
    pub(crate) fn run(&self, args: &[&str]) {
        let script = repo_root().join("scripts/stack");
        let out = std::process::Command::new(script)
            .args(args)
            .env("STACK_DIR", &self.dir)
            .env("KAFKA_PORT", self.kafka_port.to_string())
            .env("KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .env("MQTT_PORT", self.mqtt_port.to_string())
            .env("PROMETHEUS_PORT", self.prometheus_port.to_string())
            .envs(
                self.prometheus_config
                    .iter()
                    .map(|p| ("PROMETHEUS_CONFIG", p)),
            )
            .env_remove("STACK_STARTED_FILE")
            .output()
            .expect("run scripts/stack");
        assert!(
            out.status.success(),
            "scripts/stack {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        let script = repo_root().join("scripts/stack");
        let _ = std::process::Command::new(script)
            .args(["down"])
            .env("STACK_DIR", &self.dir)
            .env_remove("STACK_STARTED_FILE")
            .output();
    }
}
