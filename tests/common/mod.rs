//! Helpers shared by the integration tests: where the real services are, unique
//! names so tests never see each other's data, and a loud failure naming
//! `scripts/stack up` when a service is missing.
#![allow(dead_code)] // each test crate uses a different subset

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Kafka bootstrap servers: `KAFKA_BOOTSTRAP_SERVERS`, default the local stack.
pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// MQTT broker URL: `MQTT_BROKER`, default the local stack.
pub fn mqtt_broker() -> String {
    std::env::var("MQTT_BROKER").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into())
}

/// (host, port) of [`mqtt_broker`].
pub fn mqtt_host_port() -> (String, u16) {
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
pub fn prometheus_url() -> String {
    std::env::var("PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:9090".into())
}

/// A name no other test (or earlier run) uses: `prefix-<pid>-<time>-<n>`.
pub fn unique_name(prefix: &str) -> String {
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
pub fn require_kafka() {
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
pub fn require_failpoints() {
    if !cfg!(feature = "failpoints") {
        panic!("this test needs the test-only failpoints: run scripts/test, or cargo test --features failpoints");
    }
}

pub fn require_mqtt() {
    let (host, port) = mqtt_host_port();
    require_tcp("Mosquitto (MQTT)", &format!("{host}:{port}"));
}

/// Creates a topic on the test Kafka and waits until it is usable.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]).await
}

/// [`create_topic`] with topic configs (e.g. `max.message.bytes`).
pub async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", kafka_bootstrap());
    create_topic_in(base, name, partitions, configs).await
}

/// [`create_topic_with`] on the cluster `base` (servers, security) points at.
pub async fn create_topic_in(
    base: ClientConfig,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    create_replicated_topic_in(base, name, partitions, 1, configs).await
}

/// [`create_topic_in`] with `replicas` copies of each partition (a cluster).
pub async fn create_replicated_topic_in(
    base: ClientConfig,
    name: &str,
    partitions: i32,
    replicas: i32,
    configs: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = base.create().expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replicas));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create_topics request");
    for r in results {
        if let Err((t, code)) = r {
            panic!("creating topic {t} failed: {code}");
        }
    }
    // Created is not yet visible: wait until the broker's metadata lists it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .map(|md| {
                md.topics().iter().any(|t| {
                    t.name() == name
                        && t.error().is_none()
                        && t.partitions().len() == partitions as usize
                })
            })
            .unwrap_or(false);
        if listed {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "topic {name} created but not in the metadata after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ HTTP

/// Minimal HTTP/1.1 GET (tests only): returns (status, body), or an error text.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

// ------------------------------------------------------------------ Prometheus text

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (what `/metrics` serves).
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => panic!("bad metrics line: {line}"),
        };
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in: {line}")),
        };
        let (name, labels) = match name_labels.find('{') {
            None => (name_labels.to_string(), Default::default()),
            Some(i) => {
                let inner = name_labels[i + 1..].trim_end_matches('}');
                (name_labels[..i].to_string(), parse_labels(inner))
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(mut s: &str) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    while let Some(eq) = s.find("=\"") {
        let key = s[..eq].trim_start_matches(',').trim().to_string();
        let rest = &s[eq + 2..];
        let mut val = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => val.push('\n'),
                    Some((_, c2)) => val.push(c2),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        m.insert(key, val);
        s = &rest[end..];
    }
    m
}

/// Sum of the samples `name` whose labels include all of `labels` (`None`
/// when no sample matches).
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

/// Fetches and parses `http://addr/metrics`.
pub fn scrape(addr: &str) -> Vec<Sample> {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    parse_prometheus(&body)
}

// ------------------------------------------------------------------ Kafka reading

/// Reads `topic` from the beginning until `want` messages arrived (or `timeout`),
/// then keeps reading for `settle` more to catch extras.
pub async fn consume(
    topic: &str,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    consume_from(&kafka_bootstrap(), topic, want, timeout, settle).await
}

/// [`consume`] from another cluster.
pub async fn consume_from(
    bootstrap: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", bootstrap);
    consume_in(base, topic, want, timeout, settle).await
}

/// [`consume`] with a client config (servers, security) of its own.
pub async fn consume_in(
    mut base: ClientConfig,
    topic: &str,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::StreamConsumer;
    let consumer: StreamConsumer = base
        .set("group.id", unique_name("test-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut settle_until: Option<tokio::time::Instant> = None;
    loop {
        let until = settle_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(m)) => {
                out.push(m.detach());
                if out.len() >= want && settle_until.is_none() {
                    settle_until = Some(tokio::time::Instant::now() + settle);
                }
            }
            // A cluster node that is down shows up as transport errors while
            // the others serve: not the end of the reading.
            Ok(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                | rdkafka::types::RDKafkaErrorCode::AllBrokersDown,
            ))) => {}
            Ok(Err(e)) => panic!("consuming {topic}: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// Device id -> count from an aggregator's `/api/devices` at `http` (empty
/// while it does not answer).
pub fn device_counts(http: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut path = "/api/devices".to_string();
    loop {
        let Ok((200, body)) = http_get(http, &path) else {
            return Default::default();
        };
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/devices: {e}: {body}"));
        for d in v["devices"].as_array().expect("devices") {
            out.insert(
                d["device_id"].as_str().expect("id").to_string(),
                d["count"].as_u64().expect("count"),
            );
        }
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/api/devices?cursor={c}"),
            None => return out,
        }
    }
}

/// Header value as text (the gateway's own helper).
pub fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::Message;
    iot_gateway::gateway::kafka::header_str(m.headers()?, name)
}

// ------------------------------------------------------------------ processes

/// A child process that is killed (and reaped) when dropped.
pub struct Child {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl Child {
    /// Sends SIGTERM and waits up to `wait` for exit; returns the exit status.
    pub fn terminate(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(wait)
    }

    /// SIGTERM; asserts exit code 0 within `wait` (showing the log if not).
    pub fn stop_cleanly(&mut self, wait: Duration) {
        let code = self.terminate(wait).map(|s| s.code());
        assert_eq!(code, Some(Some(0)), "log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `wait` for the process to exit by itself.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
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
pub fn repo_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("scripts/stack").exists() {
        here.to_path_buf()
    } else {
        here.parent().unwrap_or(here).to_path_buf()
    }
}

/// Directory for per-test files (configs, logs): target/test-runs/<name>.
pub fn test_dir(name: &str) -> std::path::PathBuf {
    let d = repo_root().join("target/test-runs").join(name);
    std::fs::create_dir_all(&d).expect("test dir");
    d
}

/// Spawns `bin` with `args` and `envs`, output to `dir/<log_name>.log`.
pub fn spawn(
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
pub struct GatewayEnv<'a> {
    pub kafka: &'a str,
    pub client_id: &'a str,
    /// Reads `<prefix>/+/telemetry` from [`mqtt_broker`].
    pub prefix: &'a str,
    pub topic: &'a str,
    pub dlq: &'a str,
    pub http: &'a str,
    pub spool: &'a std::path::Path,
}

impl GatewayEnv<'_> {
    /// The `GATEWAY__*` variables for it.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
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
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
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

/// A second instance of a stack service (own ports, own data dir), started and
/// stopped with the project's own `scripts/stack`, for tests that stop brokers.
pub struct PrivateStack {
    pub dir: std::path::PathBuf,
    pub kafka_port: u16,
    pub controller_port: u16,
    pub mqtt_port: u16,
    pub prometheus_port: u16,
    /// Scrape config for a private Prometheus (default: the project's).
    pub prometheus_config: Option<std::path::PathBuf>,
}

impl PrivateStack {
    pub fn new(dir: &std::path::Path) -> Self {
        PrivateStack {
            dir: dir.join("stack"),
            kafka_port: free_port(),
            controller_port: free_port(),
            mqtt_port: free_port(),
            prometheus_port: free_port(),
            prometheus_config: None,
        }
    }

    pub fn prometheus_url(&self) -> String {
        format!("127.0.0.1:{}", self.prometheus_port)
    }

    pub fn kafka_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// Runs `scripts/stack ARGS` for this instance; panics with its output on failure.
    pub fn run(&self, args: &[&str]) {
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

/// A binary of the workspace (gateway, aggregator, simulator) next to the
/// test's own directory (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
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

/// The secured stack of `scripts/stack up --secure`: Kafka SASL_SSL, Mosquitto
/// TLS and mutual TLS, its throwaway CA and the passwords it generated.
pub struct Secure {
    pub dir: std::path::PathBuf,
    pub kafka: String,
    /// The listener that takes a client certificate instead of a password.
    pub kafka_mtls: String,
    pub mqtt_tls: String,
    pub mqtt_mtls: String,
}

impl Secure {
    /// The running secure stack, or a failure naming the command that starts it.
    pub fn require() -> Secure {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let dir = std::env::var("SECURE_STACK_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| repo_root().join(".stack/secure"));
        let s = Secure {
            kafka: env("SECURE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9094"),
            kafka_mtls: env("SECURE_KAFKA_MTLS_BOOTSTRAP_SERVERS", "127.0.0.1:9096"),
            mqtt_tls: env("SECURE_MQTT_BROKER", "mqtts://127.0.0.1:8883"),
            mqtt_mtls: env("SECURE_MQTT_MTLS_BROKER", "mqtts://127.0.0.1:8884"),
            dir,
        };
        let why = |what: &str| -> ! {
            panic!(
                "the secure stack is not running ({what}).\n\
                 These tests need it: start it with `scripts/stack up --secure` \
                 (or run everything with `scripts/test`)."
            )
        };
        if !s.dir.join("pki/.complete").exists() {
            why(&format!("no CA in {}", s.dir.display()));
        }
        for (name, addr) in [
            ("Kafka SASL_SSL", s.kafka.clone()),
            ("Kafka mutual TLS", s.kafka_mtls.clone()),
            ("Mosquitto TLS", s.host_port(&s.mqtt_tls)),
            ("Mosquitto mutual TLS", s.host_port(&s.mqtt_mtls)),
        ] {
            let ok = addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok());
            if !ok {
                why(&format!("{name} does not answer at {addr}"));
            }
        }
        s
    }

    fn host_port(&self, url: &str) -> String {
        url.trim_start_matches("mqtts://").to_string()
    }

    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.join("pki/ca.crt")
    }

    pub fn pki(&self, file: &str) -> std::path::PathBuf {
        self.dir.join("pki").join(file)
    }

    /// `secrets/<name>.password`.
    pub fn secret_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(format!("secrets/{name}.password"))
    }

    pub fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.secret_file(name))
            .expect("secret file")
            .trim()
            .to_string()
    }

    /// Every password the stack made (for "never in a log" checks).
    pub fn all_secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.join("secrets")).expect("secrets dir") {
            let p = e.expect("entry").path();
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            if p.extension().is_some_and(|x| x == "password") {
                out.push(text.trim().to_string());
            } else if p.ends_with("device-passwords") {
                out.extend(
                    text.lines()
                        .filter_map(|l| l.split_once(':'))
                        .map(|(_, pw)| pw.to_string()),
                );
            }
        }
        out
    }

    /// A client config logged in as the Kafka admin (SCRAM-SHA-512).
    pub fn admin(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka)
            .set("security.protocol", "sasl_ssl")
            .set("ssl.ca.location", self.ca().display().to_string())
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "admin")
            .set("sasl.password", self.secret("kafka-admin"));
        c
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        create_topic_in(self.admin(), name, partitions, &[]).await
    }

    pub async fn consume(
        &self,
        topic: &str,
        want: usize,
        timeout: Duration,
        settle: Duration,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        consume_in(self.admin(), topic, want, timeout, settle).await
    }

    /// `scripts/stack --secure acl ARGS` (Kafka's AclCommand as the admin).
    pub fn acl(&self, args: &[&str]) {
        let out = std::process::Command::new(repo_root().join("scripts/stack"))
            .arg("--secure")
            .arg("acl")
            .args(args)
            .env("STACK_DIR", self.dir.parent().expect("stack dir"))
            .output()
            .expect("run scripts/stack --secure acl");
        assert!(
            out.status.success(),
            "scripts/stack --secure acl {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Lets the gateway write `topic` and its DLQ, the aggregator read it in `group`.
    pub fn grant(&self, topic: &str, dlq: &str, group: &str) {
        self.acl(&[
            "--add",
            "--allow-principal",
            "User:gateway",
            "--operation",
            "Write",
            "--operation",
            "Describe",
            "--topic",
            topic,
            "--topic",
            dlq,
        ]);
        self.acl(&[
            "--add",
            "--allow-principal",
            "User:aggregator",
            "--consumer",
            "--topic",
            topic,
            "--group",
            group,
        ]);
    }
}

/// Fails if any of `secrets` appears in `text` (a log, a metrics page, ...).
pub fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            s.len() < 8 || !text.contains(s.as_str()),
            "a secret appears in {what}"
        );
    }
}

// ------------------------------------------------------------------ a test's gateway

/// A gateway of one test, with its own topics, MQTT prefix, port and spool.
pub struct TestGateway {
    pub name: String,
    pub topic: String,
    pub dlq: String,
    pub prefix: String,
    pub http: String,
    pub dir: std::path::PathBuf,
}

impl TestGateway {
    pub async fn new(label: &str) -> TestGateway {
        require_kafka();
        require_mqtt();
        let name = unique_name(label);
        let g = TestGateway {
            topic: format!("{name}.weather"),
            dlq: format!("{name}.dlq"),
            prefix: name.clone(),
            http: format!("127.0.0.1:{}", free_port()),
            dir: test_dir(&name),
            name,
        };
        create_topic(&g.topic, 3).await;
        create_topic(&g.dlq, 1).await;
        g
    }

    /// Starts `bin` (the test's gateway binary) with `extra` variables.
    pub fn start(&self, bin: &str, kafka: &str, log: &str) -> Child {
        self.start_with(bin, kafka, log, &[])
    }

    pub fn start_with(&self, bin: &str, kafka: &str, log: &str, extra: &[(&str, String)]) -> Child {
        let mut env = GatewayEnv {
            kafka,
            client_id: &format!("gw-{}", self.name),
            prefix: &self.prefix,
            topic: &self.topic,
            dlq: &self.dlq,
            http: &self.http,
            spool: &self.dir.join("spool"),
        }
        .vars();
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let config = repo_root().join("configs/gateway.toml");
        let config = config.to_string_lossy();
        spawn(bin, &["run", "--config", &config], &env, &self.dir, log)
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(&self.http, "/metrics").ok()?;
        metric(&parse_prometheus(&body), name, &[])
    }

    /// Waits until subscribed (tolerant of HTTP not listening yet).
    pub async fn wait_subscribed(&self, gw: &mut Child) {
        let ok = eventually(Duration::from_secs(30), || {
            self.metric("gateway_mqtt_connected") == Some(1.0)
        })
        .await;
        assert!(
            ok && gw.is_running(),
            "not subscribed; log:\n{}",
            gw.log_text()
        );
    }

    pub fn mqtt_topic(&self, device: &str) -> String {
        format!("{}/{device}/telemetry", self.prefix)
    }
}

/// Publishes with QoS 1 and waits for the broker's PUBACKs.
pub async fn publish(msgs: Vec<(String, Vec<u8>)>) {
    let (host, port) = mqtt_host_port();
    let mut opts = rumqttc::MqttOptions::new(unique_name("pub"), host, port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(4 << 20, 4 << 20)
        .set_inflight(100);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
    let n = msgs.len();
    let sender = tokio::spawn(async move {
        for (t, p) in msgs {
            client
                .publish(t, rumqttc::QoS::AtLeastOnce, false, p)
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked < n {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher: {e}"),
            Err(_) => panic!("only {acked} of {n} publishes acknowledged"),
        }
    }
    let _ = sender.await.expect("sender").disconnect().await;
}

pub fn reading(seq: u64) -> Vec<u8> {
    format!(r#"{{"temperature":21.5,"humidity":40,"seq":{seq}}}"#).into_bytes()
}
