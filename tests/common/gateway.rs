//! Starting a gateway for a test, and publishing readings to it.

use super::*;

/// A gateway of one test, with its own topics, MQTT prefix, port and spool.
pub(crate) struct TestGateway {
    pub(crate) name: String,
    pub(crate) topic: String,
    pub(crate) dlq: String,
    pub(crate) prefix: String,
    pub(crate) http: String,
    pub(crate) dir: std::path::PathBuf,
}

impl TestGateway {
    pub(crate) async fn new(label: &str) -> TestGateway {
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
    pub(crate) fn start(&self, bin: &str, kafka: &str, log: &str) -> Child {
        self.start_with(bin, kafka, log, &[])
    }

    pub(crate) fn start_with(
        &self,
        bin: &str,
        kafka: &str,
        log: &str,
        extra: &[(&str, String)],
    ) -> Child {
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

    pub(crate) fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(&self.http, "/metrics").ok()?;
        metric(&parse_prometheus(&body), name, &[])
    }

    /// Waits until subscribed (tolerant of HTTP not listening yet).
    pub(crate) async fn wait_subscribed(&self, gw: &mut Child) {
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

    pub(crate) fn mqtt_topic(&self, device: &str) -> String {
        format!("{}/{device}/telemetry", self.prefix)
    }
}

/// Publishes with QoS 1 and waits for the broker's PUBACKs.
pub(crate) async fn publish(msgs: Vec<(String, Vec<u8>)>) {
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

pub(crate) fn reading(seq: u64) -> Vec<u8> {
    format!(r#"{{"temperature":21.5,"humidity":40,"seq":{seq}}}"#).into_bytes()
}
