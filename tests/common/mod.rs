//! Helpers shared by the integration tests: where the real services are, unique
//! names so tests never see each other's data, and a loud failure naming
//! `scripts/stack up` when a service is missing.
#![allow(dead_code)] // each test crate uses a different subset
#![allow(unused_imports)] // the re-exports below, likewise

mod gateway;
mod kafka;
mod prom;
mod secure;
mod stack;

pub(crate) use self::gateway::*;
pub(crate) use self::kafka::*;
pub(crate) use self::prom::*;
pub(crate) use self::secure::*;
pub(crate) use self::stack::*;

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Kafka bootstrap servers: `KAFKA_BOOTSTRAP_SERVERS`, default the local stack.
pub(crate) fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// MQTT broker URL: `MQTT_BROKER`, default the local stack.
pub(crate) fn mqtt_broker() -> String {
    std::env::var("MQTT_BROKER").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into())
}

/// (host, port) of [`mqtt_broker`].
pub(crate) fn mqtt_host_port() -> (String, u16) {
    let url = mqtt_broker();
    let rest = url.strip_prefix("mqtt://").unwrap_or(&url);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    let port = port
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|_| panic!("MQTT_BROKER={url}: port is not a number"));
    (host.to_string(), port)
}

/// Prometheus base URL: `PROMETHEUS_URL`, default the local stack.
pub(crate) fn prometheus_url() -> String {
    std::env::var("PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:9090".into())
}

/// A name no other test (or earlier run) uses: `prefix-<pid>-<time>-<n>`.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{nanos}-{n}", std::process::id())
}

fn unreachable(service: &str, addr: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is not reachable at {addr}: {why}.\n\
         The integration tests need the real local stack: start it with `scripts/stack up` \
         (or run everything with `scripts/test`)."
    )
}

fn require_tcp(service: &str, addr: &str) {
    let sock = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(sock)) => sock,
        Ok(None) => unreachable(service, addr, "address did not resolve"),
        Err(e) => unreachable(service, addr, e),
    };
    if let Err(e) = TcpStream::connect_timeout(&sock, Duration::from_secs(3)) {
        unreachable(service, addr, e);
    }
}

/// Fails the test, naming `scripts/stack up`, unless a Kafka broker answers a
/// metadata request.
pub(crate) fn require_kafka() {
    let bootstrap = kafka_bootstrap();
    let first = bootstrap.split(',').next().unwrap_or_default().to_string();
    require_tcp("Kafka", &first);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap_or_else(|e| unreachable("Kafka", &bootstrap, e));
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        unreachable("Kafka", &bootstrap, e);
    }
}

/// Fails the test, naming `scripts/stack up`, unless the MQTT broker accepts TCP.
/// Fails (never skips) when the test-only failpoints are not built in.
/// (The simulators package shares this file and has no such feature.)
#[allow(unexpected_cfgs, dead_code)]
pub(crate) fn require_failpoints() {
    if !cfg!(feature = "failpoints") {
        panic!("this test needs the test-only failpoints: run scripts/test, or cargo test --features failpoints");
    }
}

pub(crate) fn require_mqtt() {
    let (host, port) = mqtt_host_port();
    require_tcp("Mosquitto (MQTT)", &format!("{host}:{port}"));
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

// ------------------------------------------------------------------ Prometheus text

/// A child process that is killed (and reaped) when dropped.
pub(crate) struct Child {
    pub(crate) child: std::process::Child,
    pub(crate) log: std::path::PathBuf,
}

impl Child {
    /// Sends SIGTERM and waits up to `wait` for exit; returns the exit status.
    pub(crate) fn terminate(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(wait)
    }

    /// SIGTERM; asserts exit code 0 within `wait` (showing the log if not).
    pub(crate) fn stop_cleanly(&mut self, wait: Duration) {
        let code = self.terminate(wait).map(|s| s.code());
        assert_eq!(code, Some(Some(0)), "log:\n{}", self.log_text());
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `wait` for the process to exit by itself.
    pub(crate) fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The repository root (these helpers are shared by both workspace packages).
pub(crate) fn repo_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("scripts/stack").exists() {
        here.to_path_buf()
    } else {
        here.parent().unwrap_or(here).to_path_buf()
    }
}

/// Directory for per-test files (configs, logs): target/test-runs/<name>.
pub(crate) fn test_dir(name: &str) -> std::path::PathBuf {
    let d = repo_root().join("target/test-runs").join(name);
    std::fs::create_dir_all(&d).expect("test dir");
    d
}

/// Spawns `bin` with `args` and `envs`, output to `dir/<log_name>.log`.
pub(crate) fn spawn(
    bin: &str,
    args: &[&str],
    envs: &[(&str, String)],
    dir: &std::path::Path,
    log_name: &str,
) -> Child {
    let log = dir.join(format!("{log_name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", "info,iot_gateway=debug");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
    Child { child, log }
}

/// Where a test's gateway reads, writes and listens.
pub(crate) struct GatewayEnv<'a> {
    pub(crate) kafka: &'a str,
    pub(crate) client_id: &'a str,
    /// Reads `<prefix>/+/telemetry` from [`mqtt_broker`].
    pub(crate) prefix: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) dlq: &'a str,
    pub(crate) http: &'a str,
    pub(crate) spool: &'a std::path::Path,
}

impl GatewayEnv<'_> {
    /// The `GATEWAY__*` variables for it.
    pub(crate) fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GATEWAY__MQTT__URL", mqtt_broker()),
            ("GATEWAY__MQTT__CLIENT_ID", self.client_id.to_string()),
            (
                "GATEWAY__MQTT__TOPICS",
                format!("{}/+/telemetry", self.prefix),
            ),
            ("GATEWAY__KAFKA__BOOTSTRAP_SERVERS", self.kafka.to_string()),
            ("GATEWAY__KAFKA__TOPIC", self.topic.to_string()),
            ("GATEWAY__KAFKA__DLQ_TOPIC", self.dlq.to_string()),
            ("GATEWAY__HTTP__LISTEN", self.http.to_string()),
            ("GATEWAY__SPOOL__DIR", self.spool.display().to_string()),
        ]
    }
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub(crate) async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ a private stack

/// A binary of the workspace (gateway, aggregator, simulator) next to the
/// test's own directory (`target/<profile>/`).
pub(crate) fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let p = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|d| d.join(name))
        .expect("target dir");
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (scripts/test does)",
        p.display()
    );
    p
}

// ------------------------------------------------------------------ the secure stack
