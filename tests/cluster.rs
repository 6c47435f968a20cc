//! Against the Kafka cluster of `scripts/stack --cluster up` (three KRaft nodes;
//! topics with replication factor 3 and min.insync.replicas=2) and the plain
//! stack's Mosquitto: a partition leader killed mid-stream, the cluster below
//! min.insync.replicas, an aggregator group losing an instance, and two gateways
//! sharing one MQTT subscription. The tests stop cluster nodes, so they take
//! turns.
//!
//! Over 500 lines: four scenarios that each stop nodes of one shared cluster, so they
//! share its setup and run one after the other in this binary.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
const AGGREGATOR: &str = env!("CARGO_BIN_EXE_aggregator");
const NODES: usize = 3;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    bootstrap: String,
    dir: PathBuf,
}

impl Cluster {
    /// The running cluster with all its nodes (any a failed test left down are
    /// started again), or a failure naming the command that starts it.
    async fn require() -> Cluster {
        let bootstrap = std::env::var("CLUSTER_KAFKA_BOOTSTRAP_SERVERS")
            .unwrap_or_else(|_| "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103".into());
        let dir = std::env::var("CLUSTER_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| common::repo_root().join(".stack/cluster"));
        let c = Cluster { bootstrap, dir };
        if c.brokers() == 0 {
            panic!(
                "the Kafka cluster does not answer at {}.\n\
                 These tests need it: start it with `scripts/stack --cluster up` \
                 (or run everything with `scripts/test`).",
                c.bootstrap
            );
        }
        if c.brokers() < NODES {
            c.stack(&["up"]);
        }
        let all = common::eventually(Duration::from_secs(60), || c.brokers() == NODES).await;
        assert!(all, "the cluster has {} of {NODES} brokers", c.brokers());
        c
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// `scripts/stack --cluster ARGS` for this cluster.
    fn stack(&self, args: &[&str]) {
        let mut cmd = std::process::Command::new(common::repo_root().join("scripts/stack"));
        cmd.arg("--cluster")
            .args(args)
            .env("STACK_DIR", self.dir.parent().expect("stack dir"));
        // scripts/test stops what is listed there (nodes restarted here too).
        match std::env::var_os("CLUSTER_STARTED_FILE") {
            Some(f) => cmd.env("STACK_STARTED_FILE", f),
            None => cmd.env_remove("STACK_STARTED_FILE"),
        };
        let st = cmd.status().expect("scripts/stack");
        assert!(st.success(), "scripts/stack --cluster {args:?} failed");
    }

    fn metadata(&self, topic: Option<&str>) -> Option<rdkafka::metadata::Metadata> {
        let consumer: BaseConsumer = self.client().create().ok()?;
        consumer.fetch_metadata(topic, Duration::from_secs(5)).ok()
    }

    /// Brokers the cluster lists (0 when none answers).
    fn brokers(&self) -> usize {
        self.metadata(None).map_or(0, |m| m.brokers().len())
    }

    /// (partition, leader node, in-sync replicas) of `topic`.
    fn partitions(&self, topic: &str) -> Vec<(i32, i32, usize)> {
        self.metadata(Some(topic))
            .and_then(|m| {
                m.topics().first().map(|t| {
                    t.partitions()
                        .iter()
                        .map(|p| (p.id(), p.leader(), p.isr().len()))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// A topic with three replicas of each partition, two of them needed for
    /// an acknowledgement; returns once every partition is fully in sync.
    async fn create_topic(&self, name: &str, partitions: i32) {
        common::create_replicated_topic_in(
            self.client(),
            name,
            partitions,
            NODES as i32,
            &[("min.insync.replicas", "2")],
        )
        .await;
        let synced = common::eventually(Duration::from_secs(60), || {
            let p = self.partitions(name);
            p.len() == partitions as usize && p.iter().all(|&(_, l, isr)| l >= 0 && isr == NODES)
        })
        .await;
        assert!(synced, "{name}: {:?}", self.partitions(name));
    }

    async fn consume(&self, topic: &str, want: usize) -> Vec<OwnedMessage> {
        common::consume_in(
            self.client(),
            topic,
            want,
            Duration::from_secs(240),
            Duration::from_secs(3),
        )
        .await
    }
}

struct Gateway {
    child: common::Child,
    http: String,
}

/// A gateway on the cluster, reading `<prefix>/+/telemetry` from the plain
/// stack's Mosquitto with the client id `client_id` (its spool is named after it).
fn gateway(
    c: &Cluster,
    dir: &Path,
    log: &str,
    client_id: &str,
    topic: &str,
    prefix: &str,
    extra: &[(&str, String)],
) -> Gateway {
    let http = format!("127.0.0.1:{}", common::free_port());
    let mut env = common::GatewayEnv {
        kafka: &c.bootstrap,
        client_id,
        prefix,
        topic,
        dlq: &format!("{topic}.dlq"),
        http: &http,
        spool: &dir.join(format!("spool-{client_id}")),
    }
    .vars();
    env.extend(extra.iter().cloned());
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/gateway.toml");
    let child = common::spawn(GATEWAY, &["run", "--config", config], &env, dir, log);
    Gateway { child, http }
}

/// A fresh topic (and DLQ) on the cluster and one gateway on it, ready.
async fn topic_and_gateway(c: &Cluster, label: &str) -> (String, PathBuf, Gateway) {
    let name = common::unique_name(label);
    let dir = common::test_dir(&name);
    c.create_topic(&name, 6).await;
    c.create_topic(&format!("{name}.dlq"), 1).await;
    let mut gw = gateway(c, &dir, "gateway", &format!("gw-{name}"), &name, &name, &[]);
    gw.wait_ready().await;
    (name, dir, gw)
}

impl Gateway {
    async fn wait_ready(&mut self) {
        let http = self.http.clone();
        let ok = common::eventually(Duration::from_secs(60), || {
            matches!(common::http_get(&http, "/readyz"), Ok((200, _)))
        })
        .await;
        assert!(
            ok && self.child.is_running(),
            "gateway not ready in 60 s; log:\n{}",
            self.child.log_text()
        );
    }

    fn metric(&self, name: &str) -> f64 {
        common::http_get(&self.http, "/metrics")
            .ok()
            .and_then(|(_, body)| common::metric(&common::parse_prometheus(&body), name, &[]))
            .unwrap_or(-1.0)
    }
}

/// The simulator: `devices` devices at `rate` readings/s each for `duration`,
/// QoS 1, writing what it sent to `dir/<log>.json`.
fn simulator(
    dir: &Path,
    log: &str,
    prefix: &str,
    devices: usize,
    rate: u32,
    duration: &str,
) -> common::Child {
    let manifest = dir.join(format!("{log}.json")).display().to_string();
    let args = [
        "--broker",
        &common::mqtt_broker(),
        "--topic-prefix",
        prefix,
        "--devices",
        &devices.to_string(),
        "--rate",
        &rate.to_string(),
        "--duration",
        duration,
        "--connections",
        "4",
        "--quiet",
        "--manifest",
        &manifest,
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = common::workspace_bin("simulator");
    common::spawn(bin.to_str().expect("path"), &args, &[], dir, log)
}

/// Waits for the simulator to finish and returns (device -> (first, last seq)).
async fn sent_by(sim: &mut common::Child, dir: &Path, log: &str) -> BTreeMap<String, (u64, u64)> {
    let done = common::eventually(Duration::from_secs(180), || !sim.is_running()).await;
    assert!(done, "simulator still running");
    let st = sim.child.wait().expect("simulator status");
    assert!(st.success(), "simulator failed ({st}):\n{}", sim.log_text());
    let text = std::fs::read_to_string(dir.join(format!("{log}.json"))).expect("manifest");
    let v: serde_json::Value = serde_json::from_str(&text).expect("manifest json");
    v["devices"]
        .as_object()
        .expect("devices")
        .iter()
        .map(|(d, m)| {
            let seq = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("{d}: {k}"));
            (d.clone(), (seq("seq_first"), seq("seq_last")))
        })
        .collect()
}

/// Per device, the seqs in the order Kafka holds them (one device is one
/// partition, and a partition is read in order).
fn seqs_in_kafka(got: &[OwnedMessage]) -> HashMap<String, Vec<u64>> {
    let mut per: HashMap<String, Vec<u64>> = HashMap::new();
    for m in got {
        let v: serde_json::Value =
            serde_json::from_slice(m.payload().expect("value")).expect("json value");
        per.entry(v["device_id"].as_str().expect("device_id").to_string())
            .or_default()
            .push(v["seq"].as_u64().expect("seq"));
    }
    per
}

/// Every reading sent is in Kafka exactly once; with `ordered`, per device in
/// seq order. Returns the number of devices whose readings are out of order.
fn assert_exactly_once(
    got: &[OwnedMessage],
    sent: &BTreeMap<String, (u64, u64)>,
    ordered: bool,
    what: &str,
) -> usize {
    let total: u64 = sent.values().map(|(f, l)| l - f + 1).sum();
    let per = seqs_in_kafka(got);
    let mut out_of_order = 0;
    for (dev, &(first, last)) in sent {
        let mut seqs = per.get(dev).cloned().unwrap_or_default();
        let want: Vec<u64> = (first..=last).collect();
        if ordered {
            assert_eq!(seqs, want, "{what}: {dev}: every reading once, in order");
        } else {
            if !seqs.is_sorted() {
                out_of_order += 1;
            }
            seqs.sort_unstable();
            assert_eq!(seqs, want, "{what}: {dev}: every reading once");
        }
    }
    let unknown: Vec<&String> = per.keys().filter(|d| !sent.contains_key(*d)).collect();
    assert!(unknown.is_empty(), "{what}: devices not sent: {unknown:?}");
    assert_eq!(got.len() as u64, total, "{what}: records in Kafka");
    out_of_order
}

/// The spec's case: ~5,000 readings/s into the cluster; the node leading
/// partition 0 (and others) is killed with -9 and comes back 30 s later.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_mid_stream_loses_nothing_and_keeps_the_order() {
    let _turn = ONE_AT_A_TIME.lock().await;
    common::require_mqtt();
    let c = Cluster::require().await;
    let (name, dir, mut gw) = topic_and_gateway(&c, "cluster-failover").await;
    // 500 devices x 10 readings/s: ~5,000 readings/s for 60 s.
    let mut sim = simulator(&dir, "sent", &name, 500, 10, "60s");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let parts = c.partitions(&name);
    let leader = parts.iter().find(|p| p.0 == 0).expect("partition 0").1;
    let led: Vec<i32> = parts
        .iter()
        .filter(|p| p.1 == leader)
        .map(|p| p.0)
        .collect();
    eprintln!("killing kafka-{leader}, leader of partitions {led:?}");
    c.stack(&["kill", &format!("kafka-{leader}")]);
    // 30 s without it: the gateway must not call itself (or Kafka) down.
    let (mut not_ready, mut min_brokers, mut max_under) = (Vec::new(), f64::MAX, 0.0f64);
    let mut min_reachable = f64::MAX;
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(30) {
        match common::http_get(&gw.http, "/readyz") {
            Ok((200, _)) => {}
            other => not_ready.push(format!("{:?}: {other:?}", down.elapsed())),
        }
        min_brokers = min_brokers.min(gw.metric("gateway_kafka_brokers"));
        min_reachable = min_reachable.min(gw.metric("gateway_kafka_reachable"));
        max_under = max_under.max(gw.metric("gateway_kafka_under_replicated_partitions"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.stack(&["up", &format!("kafka-{leader}")]);
    let sent = sent_by(&mut sim, &dir, "sent").await;
    let total: u64 = sent.values().map(|(f, l)| l - f + 1).sum();
    assert!(total >= 200_000, "the load ran ({total} readings)");
    let got = c.consume(&name, total as usize).await;
    assert_exactly_once(&got, &sent, true, "leader failover");
    assert!(
        not_ready.is_empty(),
        "/readyz answered 200 throughout while one broker of three was down: {not_ready:?}"
    );
    assert_eq!(
        min_reachable, 1.0,
        "gateway_kafka_reachable stayed 1: the cluster was reachable throughout"
    );
    assert_eq!(
        min_brokers, 2.0,
        "gateway_kafka_brokers showed the lost broker"
    );
    assert!(
        max_under >= 1.0,
        "gateway_kafka_under_replicated_partitions showed the missing replicas"
    );
    let healed = common::eventually(Duration::from_secs(90), || {
        gw.metric("gateway_kafka_brokers") == 3.0
            && gw.metric("gateway_kafka_under_replicated_partitions") == 0.0
    })
    .await;
    assert!(healed, "metrics back to 3 brokers, all in sync");
    assert_eq!(gw.metric("gateway_readings_delivered_total"), total as f64);
    let dlq = common::consume_in(
        c.client(),
        &format!("{name}.dlq"),
        1,
        Duration::from_secs(10),
        Duration::ZERO,
    )
    .await;
    assert!(
        dlq.is_empty(),
        "nothing dead-lettered: {} records",
        dlq.len()
    );
    gw.child.stop_cleanly(Duration::from_secs(20));
}

/// One node of three left: below min.insync.replicas (and the KRaft quorum),
/// nothing is acknowledged; the gateway keeps taking readings into its spool
/// and delivers every one, once and in order, when a second node returns.
#[tokio::test(flavor = "multi_thread")]
async fn below_min_insync_replicas_readings_wait_and_all_arrive_when_a_node_returns() {
    let _turn = ONE_AT_A_TIME.lock().await;
    common::require_mqtt();
    let c = Cluster::require().await;
    let (name, dir, mut gw) = topic_and_gateway(&c, "cluster-min-isr").await;
    let mut sim = simulator(&dir, "sent", &name, 100, 10, "50s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.stack(&["kill", "kafka-2"]);
    c.stack(&["kill", "kafka-3"]);
    // What was in flight settles; from then on nothing is acknowledged.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (delivered, acked) = (
        gw.metric("gateway_readings_delivered_total"),
        gw.metric("gateway_mqtt_acks_total"),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        gw.metric("gateway_readings_delivered_total"),
        delivered,
        "no Kafka acknowledgement with one node of three"
    );
    assert!(
        gw.metric("gateway_mqtt_acks_total") > acked + 5_000.0,
        "readings still taken (spooled and acknowledged to the broker)"
    );
    assert!(
        gw.metric("gateway_spool_records") > 5_000.0,
        "kept in the spool"
    );
    c.stack(&["up", "kafka-2"]);
    let sent = sent_by(&mut sim, &dir, "sent").await;
    let total: u64 = sent.values().map(|(f, l)| l - f + 1).sum();
    let got = c.consume(&name, total as usize).await;
    assert_exactly_once(&got, &sent, true, "below min.insync.replicas");
    let drained = common::eventually(Duration::from_secs(60), || {
        gw.metric("gateway_spool_records") == 0.0
    })
    .await;
    assert!(drained, "spool drained");
    c.stack(&["up", "kafka-3"]);
    gw.child.stop_cleanly(Duration::from_secs(20));
}

struct Aggregator {
    child: common::Child,
    http: String,
}

impl Aggregator {
    fn start(c: &Cluster, dir: &Path, topic: &str, group: &str, log: &str) -> Aggregator {
        // A short session timeout: a killed instance's partitions move in
        // seconds instead of the default 45.
        let config = dir.join("aggregator.toml");
        std::fs::write(
            &config,
            "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
        )
        .expect("config");
        let http = format!("127.0.0.1:{}", common::free_port());
        let env = [
            ("AGGREGATOR__KAFKA__BOOTSTRAP_SERVERS", c.bootstrap.clone()),
            ("AGGREGATOR__KAFKA__TOPIC", topic.to_string()),
            ("AGGREGATOR__KAFKA__GROUP_ID", group.to_string()),
            ("AGGREGATOR__HTTP__LISTEN", http.clone()),
        ];
        let config = config.display().to_string();
        let child = common::spawn(AGGREGATOR, &["run", "--config", &config], &env, dir, log);
        Aggregator { child, http }
    }

    fn metric(&self, name: &str) -> f64 {
        common::http_get(&self.http, "/metrics")
            .ok()
            .and_then(|(_, body)| common::metric(&common::parse_prometheus(&body), name, &[]))
            .unwrap_or(0.0)
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        common::device_counts(&self.http)
    }
}

/// Readings seq `seqs` of `devices` devices, gateway-shaped, acks=all.
async fn produce(c: &Cluster, topic: &str, devices: usize, seqs: std::ops::RangeInclusive<u64>) {
    let p: FutureProducer = c
        .client()
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for seq in seqs {
        for d in 0..devices {
            let dev = format!("dev-{d:03}");
            let now = chrono::Utc::now().timestamp_millis();
            let value = format!(
                r#"{{"device_id":"{dev}","humidity":50,"seq":{seq},"temperature":20,"ts":"{}"}}"#,
                iot_gateway::reading::format_ts(now)
            );
            let rec = FutureRecord::to(topic)
                .key(&dev)
                .payload(&value)
                .timestamp(now);
            p.send(rec, Duration::from_secs(30)).await.expect("produce");
        }
    }
}

/// True once the group's committed offsets reach the end of every partition.
fn all_committed(c: &Cluster, topic: &str, group: &str, partitions: i32) -> bool {
    let Ok(consumer) = c.client().set("group.id", group).create::<BaseConsumer>() else {
        return false;
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(5)) else {
        return false;
    };
    (0..partitions).all(|p| {
        let high = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(5))
            .map_or(-1, |(_, h)| h);
        committed
            .find_partition(topic, p)
            .is_some_and(|e| e.offset() == Offset::Offset(high))
    })
}

/// Three aggregators in one group; one is killed with -9 after its offsets are
/// committed, while new readings arrive. Its partitions move to the other two
/// (only those: incremental rebalancing), which count them from the committed
/// offsets on: every device reported by exactly one instance, nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn an_aggregator_killed_in_a_group_of_three_hands_over_without_double_counting() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let c = Cluster::require().await;
    let name = common::unique_name("cluster-agg");
    let dir = common::test_dir(&name);
    let group = format!("{name}-group");
    c.create_topic(&name, 6).await;
    let mut aggs: Vec<Aggregator> = ["a", "b", "c"]
        .iter()
        .map(|l| Aggregator::start(&c, &dir, &name, &group, &format!("aggregator-{l}")))
        .collect();
    let split = common::eventually(Duration::from_secs(60), || {
        aggs.iter()
            .all(|a| a.metric("aggregator_assigned_partitions") >= 1.0)
            && aggs
                .iter()
                .map(|a| a.metric("aggregator_assigned_partitions"))
                .sum::<f64>()
                == 6.0
    })
    .await;
    assert!(split, "6 partitions split among three instances");

    let devices = 60;
    produce(&c, &name, devices, 1..=5).await;
    let applied = common::eventually(Duration::from_secs(60), || {
        aggs.iter()
            .map(|a| a.metric("aggregator_readings_applied_total"))
            .sum::<f64>()
            == (devices * 5) as f64
    })
    .await;
    assert!(applied, "all 300 readings applied");
    let committed = common::eventually(Duration::from_secs(30), || {
        all_committed(&c, &name, &group, 6)
    })
    .await;
    assert!(committed, "the group committed every partition to its end");
    let before: Vec<BTreeMap<String, u64>> = aggs.iter().map(Aggregator::counts).collect();
    let owner: BTreeMap<String, usize> = before
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.keys().map(move |d| (d.clone(), i)))
        .collect();
    assert_eq!(
        owner.len(),
        devices,
        "every device reported before the kill"
    );

    let mut victim = aggs.remove(2);
    victim.child.child.kill().expect("kill -9");
    let _ = victim.child.child.wait();
    produce(&c, &name, devices, 6..=10).await;

    // Devices of a survivor: all 10 readings. The victim's: the 5 after its
    // committed offsets (its first 5 went with it; none is counted twice).
    let expected = |d: &String| if owner[d] == 2 { 5 } else { 10 };
    let settled = common::eventually(Duration::from_secs(60), || {
        let (a, b) = (aggs[0].counts(), aggs[1].counts());
        a.len() + b.len() == devices && a.iter().chain(b.iter()).all(|(d, n)| *n == expected(d))
    })
    .await;
    let after: Vec<BTreeMap<String, u64>> = aggs.iter().map(Aggregator::counts).collect();
    let (a, b): (BTreeSet<&String>, BTreeSet<&String>) =
        (after[0].keys().collect(), after[1].keys().collect());
    assert!(
        a.is_disjoint(&b),
        "no device reported by two instances: {:?}",
        a.intersection(&b).collect::<Vec<_>>()
    );
    assert_eq!(a.len() + b.len(), devices, "every device reported once");
    for (i, m) in after.iter().enumerate() {
        for (d, n) in m {
            assert!(
                owner[d] == i || owner[d] == 2,
                "{d} moved from instance {} to {i}: only the dead instance's partitions move",
                owner[d]
            );
            assert_eq!(*n, expected(d), "{d}: count on instance {i}");
        }
    }
    assert!(settled);
    assert_eq!(
        aggs.iter()
            .map(|a| a.metric("aggregator_assigned_partitions"))
            .sum::<f64>(),
        6.0
    );
    for mut a in aggs {
        a.child.stop_cleanly(Duration::from_secs(20));
    }
}

/// Two gateways share `$share/<group>/<prefix>/+/telemetry`; one is killed with
/// -9 mid-stream and restarted 5 s later with its session: the broker gives it
/// back what it had not acknowledged. Together they deliver every reading once.
#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_sharing_a_subscription_deliver_every_reading_once_through_a_kill_9() {
    let _turn = ONE_AT_A_TIME.lock().await;
    common::require_mqtt();
    let c = Cluster::require().await;
    let name = common::unique_name("cluster-shared");
    let dir = common::test_dir(&name);
    c.create_topic(&name, 6).await;
    c.create_topic(&format!("{name}.dlq"), 1).await;
    let shared = [("GATEWAY__MQTT__SHARED_GROUP", format!("{name}-gateways"))];
    let (id_a, id_b) = (format!("gw-a-{name}"), format!("gw-b-{name}"));
    let mut a = gateway(&c, &dir, "gateway-a", &id_a, &name, &name, &shared);
    let mut b = gateway(&c, &dir, "gateway-b", &id_b, &name, &name, &shared);
    a.wait_ready().await;
    b.wait_ready().await;
    let mut sim = simulator(&dir, "sent", &name, 200, 10, "40s");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let a_before = a.metric("gateway_readings_delivered_total");
    a.child.child.kill().expect("kill -9");
    let _ = a.child.child.wait();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut a = gateway(&c, &dir, "gateway-a2", &id_a, &name, &name, &shared);
    a.wait_ready().await;
    let sent = sent_by(&mut sim, &dir, "sent").await;
    let total: u64 = sent.values().map(|(f, l)| l - f + 1).sum();
    let got = c.consume(&name, total as usize).await;
    let reordered = assert_exactly_once(&got, &sent, false, "shared subscription");
    let (a_after, b_all) = (
        a.metric("gateway_readings_delivered_total"),
        b.metric("gateway_readings_delivered_total"),
    );
    eprintln!(
        "shared subscription: {total} readings; gateway a {a_before} before the kill and {a_after} after, \
         gateway b {b_all}; {reordered} of {} devices out of seq order in Kafka",
        sent.len()
    );
    assert!(
        a_before > 0.0 && a_after > 0.0 && b_all > 0.0,
        "both gateways carried a share"
    );
    for mut g in [a, b] {
        g.child.stop_cleanly(Duration::from_secs(20));
    }
}
