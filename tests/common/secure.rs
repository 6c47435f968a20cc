//! The secured stack: its PKI, passwords and ACLs.

use super::*;

/// The secured stack of `scripts/stack up --secure`: Kafka SASL_SSL, Mosquitto
/// TLS and mutual TLS, its throwaway CA and the passwords it generated.
pub(crate) struct Secure {
    pub(crate) dir: std::path::PathBuf,
    pub(crate) kafka: String,
    /// The listener that takes a client certificate instead of a password.
    pub(crate) kafka_mtls: String,
    pub(crate) mqtt_tls: String,
    pub(crate) mqtt_mtls: String,
}

impl Secure {
    /// The running secure stack, or a failure naming the command that starts it.
    pub(crate) fn require() -> Secure {
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

    pub(crate) fn ca(&self) -> std::path::PathBuf {
        self.dir.join("pki/ca.crt")
    }

    pub(crate) fn pki(&self, file: &str) -> std::path::PathBuf {
        self.dir.join("pki").join(file)
    }

    /// `secrets/<name>.password`.
    pub(crate) fn secret_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(format!("secrets/{name}.password"))
    }

    pub(crate) fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.secret_file(name))
            .expect("secret file")
            .trim()
            .to_string()
    }

    /// Every password the stack made (for "never in a log" checks).
    pub(crate) fn all_secrets(&self) -> Vec<String> {
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
    pub(crate) fn admin(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka)
            .set("security.protocol", "sasl_ssl")
            .set("ssl.ca.location", self.ca().display().to_string())
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "admin")
            .set("sasl.password", self.secret("kafka-admin"));
        c
    }

    pub(crate) async fn create_topic(&self, name: &str, partitions: i32) {
        create_topic_in(self.admin(), name, partitions, &[]).await
    }

    pub(crate) async fn consume(
        &self,
        topic: &str,
        want: usize,
        timeout: Duration,
        settle: Duration,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        consume_in(self.admin(), topic, want, timeout, settle).await
    }

    /// `scripts/stack --secure acl ARGS` (Kafka's AclCommand as the admin).
    pub(crate) fn acl(&self, args: &[&str]) {
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
    pub(crate) fn grant(&self, topic: &str, dlq: &str, group: &str) {
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
pub(crate) fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            s.len() < 8 || !text.contains(s.as_str()),
            "a secret appears in {what}"
        );
    }
}

// ------------------------------------------------------------------ a test's gateway
