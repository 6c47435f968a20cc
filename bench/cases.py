"""The benchmark cases: each runs one scenario and returns its numbers. Over 500
lines: one function per case, each read on its own; the shared parts are in benchlib.py."""

import json
import os
import subprocess
import time
from pathlib import Path

from benchlib import *  # noqa: F401,F403 (the library's helpers and constants)

def case_simulator(n, qos):
    args = [a for a in simulator(unique("sim"), 1000, per_device=max(1, n // 1000), qos=qos) if a != "--quiet"]
    t0 = time.time()
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if r.returncode != 0:
        raise BenchError(r.stderr[-2000:])
    line = [l for l in r.stderr.splitlines() if l.startswith("done in")][-1]
    sent = int(line.split("sent ")[1].split()[0])
    if sent != max(1, n // 1000) * 1000:
        raise BenchError(f"simulator sent {sent}, expected {n}")
    return {"rate": sent / float(line.split("done in ")[1].split("s")[0]), "count": sent, "wall_s": time.time() - t0}


def case_mqtt_ceiling(n):
    prefix = unique("mqtt")
    per = max(1, n // 1000)
    total = per * 1000
    sub = Proc("mqtt-ceiling-sub", ["mosquitto_sub", "-h", MQTT_HOST, "-p", MQTT_PORT, "-q", "1",
                                    "-t", f"{prefix}/+/telemetry", "-C", str(total), "-i", prefix + "-sub"])
    time.sleep(0.5)
    t0 = time.time()
    run_simulator(simulator(prefix, 1000, per_device=per), 600)
    wait_until(lambda: sub.p.poll() is not None, 120, "the counting subscriber", None)
    elapsed = time.time() - t0
    sub.stop()
    if sub.p.returncode != 0:
        raise BenchError(f"subscriber received fewer than {total}: {sub.tail()}")
    return {"rate": total / elapsed, "count": total}


def case_kafka_ceiling(n, headers=False):
    """A plain rdkafka producer with the gateway's settings; with `headers`,
    each record also has the gateway's three headers: librdkafka's own CPU for
    the gateway's record shape, the floor of the gateway's Kafka side."""
    topic = unique("kafka")
    create_topic(topic)
    r = subprocess.run([str(REL / "examples" / "kafka_produce"), KAFKA, topic, str(n), "10000"]
                       + (["--headers"] if headers else []),
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise BenchError(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    got = topic_count(topic)
    delete_topics([topic])
    if got != n:
        raise BenchError(f"kafka ceiling: {got} records in the topic, expected {n}")
    return {"rate": out["rate"], "count": n, "cpu_us_per_reading": out["cpu_us_per_record"]}


def case_e2e(kind, n, devices, mode="async"):
    """simulator (QoS 1, max rate) -> Mosquitto -> gateway|python bridge -> Kafka."""
    topic, dlq, prefix = unique(kind), unique(kind + "-dlq"), unique(kind + "-mqtt")
    create_topic(topic)
    create_topic(dlq, 1)
    per = max(1, n // devices)
    total = per * devices
    if kind == "gateway":
        proc, url = start_gateway(f"gateway-{mode}", topic, dlq, prefix, mode, free_port())
    else:
        py = ROOT / "bench" / ".venv" / "bin" / "python"
        proc = Proc("python-bridge", [str(py), str(ROOT / "bench" / "python_bridge.py"), MQTT_HOST, MQTT_PORT,
                                      f"{prefix}/+/telemetry", KAFKA, topic, prefix + "-py"])
        time.sleep(2)  # connect + subscribe
        url = None
    try:
        cpu0, t0 = proc_cpu_seconds(proc.p.pid), time.time()
        run_simulator(simulator(prefix, devices, per_device=per), 900)
        wait_until(lambda: topic_count(topic) >= total, 900, f"{total} records in Kafka", proc)
        elapsed = time.time() - t0
        cpu = proc_cpu_seconds(proc.p.pid) - cpu0
        rss = proc_peak_rss_mib(proc.p.pid)
    finally:
        proc.stop()
    check = checked_and_deleted(topic, dlq, total, f"{kind} {mode}")
    return {"rate": total / elapsed, "count": total, "cpu_us_per_reading": cpu / total * 1e6,
            "peak_rss_mib": rss, "verified": check}


TELEGRAF = os.environ.get("TELEGRAF_BIN", str(ROOT / ".cache" / "telegraf" / "v1.39.3" / "telegraf"))
DRAIN_KINDS = ("gateway_spool", "gateway_nospool", "python", "telegraf", "mqtt", "mqtt_client")
# scripts/bench --baseline REV: that commit's gateway, beside this one's in the same run.
BASELINE = os.environ.get("BENCH_BASELINE_GATEWAY")
BASELINE_KINDS = ("gateway_spool_baseline", "gateway_nospool_baseline") if BASELINE else ()


def telegraf_config(path, prefix, client_id, topic, window):
    """Telegraf as close to the gateway as it allows: QoS 1 persistent session
    (it PUBACKs after the Kafka write), device id from the topic, keyed by it,
    acks=all, idempotent, lz4, the gateway's in-flight window."""
    path.write_text(f"""
[agent]
  interval = "10s"
  flush_interval = "100ms"
  flush_jitter = "0s"
  metric_batch_size = 1000
  metric_buffer_limit = {window * 2}
  omit_hostname = true
  quiet = true

[[inputs.mqtt_consumer]]
  servers = ["tcp://{MQTT_HOST}:{MQTT_PORT}"]
  topics = ["{prefix}/+/telemetry"]
  qos = 1
  persistent_session = true
  client_id = "{client_id}"
  max_undelivered_messages = {window}
  data_format = "json_v2"
  [[inputs.mqtt_consumer.topic_parsing]]
    topic = "{prefix}/+/telemetry"
    tags = "_/device_id/_"
  [[inputs.mqtt_consumer.json_v2]]
    measurement_name = "weather"
    timestamp_path = "ts"
    timestamp_format = "rfc3339"
    [[inputs.mqtt_consumer.json_v2.field]]
      path = "temperature"
      type = "float"
    [[inputs.mqtt_consumer.json_v2.field]]
      path = "humidity"
      type = "float"
    [[inputs.mqtt_consumer.json_v2.field]]
      path = "seq"
      type = "int"

[[outputs.kafka]]
  brokers = ["{KAFKA}"]
  topic = "{topic}"
  routing_tag = "device_id"
  required_acks = -1
  idempotent_writes = true
  max_retry = 1000
  compression_codec = 4
  data_format = "json"
""")


def drain_bridge(kind, prefix, topic, dlq, port, spool_dir, n_total):
    """Starts the bridge under test; returns (Proc, wait_done)."""
    if kind.startswith("gateway"):
        spool = kind.startswith("gateway_spool")
        extra = {"GATEWAY__SPOOL__ENABLED": "true" if spool else "false"}
        binary = BASELINE if kind.endswith("_baseline") else None
        gw, _ = start_gateway(kind, topic, dlq, prefix, "async", port, extra, spool_dir, binary)
        return gw
    if kind == "python":
        py = ROOT / "bench" / ".venv" / "bin" / "python"
        return Proc("python-bridge", [str(py), str(ROOT / "bench" / "python_bridge.py"), MQTT_HOST, MQTT_PORT,
                                      f"{prefix}/+/telemetry", KAFKA, topic, prefix + "-py"])
    if kind == "telegraf":
        conf = ROOT / "bench" / "out" / f"{prefix}-telegraf.conf"
        telegraf_config(conf, prefix, prefix + "-tg", topic, 5_000)
        return Proc("telegraf", [TELEGRAF, "--config", str(conf)])
    if kind == "mqtt_client":
        # The gateway's MQTT client alone (rumqttc, acks at once): its side's floor.
        return Proc("mqtt-drain-rumqttc", [str(REL / "examples" / "mqtt_drain"), MQTT_HOST, MQTT_PORT,
                                           prefix + "-rumqttc", f"{prefix}/+/telemetry", str(n_total)])
    # Mosquitto's own delivery ceiling: a counting subscriber that acks at once.
    return Proc("mqtt-drain-sub", ["mosquitto_sub", "-h", MQTT_HOST, "-p", MQTT_PORT, "-q", "1", "-c",
                                   "-i", prefix + "-sub", "-t", f"{prefix}/+/telemetry", "-C", str(n_total)])


def broker_pid():
    try:
        return int((ROOT / ".stack" / "run" / "mosquitto.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def case_drain(kind, n, devices):
    """A bridge's own ceiling, without the load generator in the way: its
    persistent session subscribes once and goes away, the simulator fills the
    broker's queue for it, then the bridge starts and is timed from its start
    to the last record in Kafka (read back: each (device, seq) exactly once).
    kind "mqtt": a counting subscriber instead, timed to its N-th message;
    "mqtt_client": rumqttc alone, the same way (it reports its own CPU)."""
    if kind == "telegraf" and os.environ.get("TELEGRAF_SKIP"):
        raise Skipped(os.environ["TELEGRAF_SKIP"])
    if kind == "telegraf" and not os.access(TELEGRAF, os.X_OK):
        raise BenchError(f"Telegraf is not built at {TELEGRAF} (scripts/bench builds it with Go; is `go` installed?)")
    topic, dlq, prefix = unique("drain"), unique("drain-dlq"), unique(f"drain-{kind}")
    per = max(1, n // devices)
    total = per * devices
    if kind not in ("mqtt", "mqtt_client"):
        create_topic(topic)
        create_topic(dlq, 1)
    spool_dir = ROOT / "bench" / "out" / "spool" / unique(kind)
    port = free_port()
    # Prime: subscribe the persistent session once, then leave.
    p = drain_bridge(kind, prefix, topic, dlq, port, spool_dir, 0 if kind == "mqtt_client" else total)
    if kind.startswith("gateway"):
        p.stop()
    elif kind == "mqtt_client":
        wait_until(lambda: p.p.poll() is not None, 30, "the rumqttc subscriber to subscribe")
    else:
        time.sleep(3)
        p.stop()
        if kind == "telegraf" and "rror" in Path(p.log_path).read_text():
            raise BenchError(f"telegraf failed to start: {p.tail()}")
    run_simulator(simulator(prefix, devices, per_device=per), 900)
    bpid = broker_pid()
    broker_cpu0 = proc_cpu_seconds(bpid) if bpid else None
    t0 = time.time()
    p = drain_bridge(kind, prefix, topic, dlq, port, spool_dir, total)
    res = {}
    try:
        if kind in ("mqtt", "mqtt_client"):
            wait_until(lambda: p.p.poll() is not None, 900, "the counting subscriber")
            if p.p.returncode != 0:
                raise BenchError(f"subscriber got fewer than {total}: {p.tail()}")
            elapsed = time.time() - t0
            cpu = rss = None
            if kind == "mqtt_client":
                p.log.flush()
                cpu = json.loads(Path(p.log_path).read_text().strip().splitlines()[-1])["cpu_us_per_message"] * total / 1e6
        else:
            wait_until(lambda: topic_count(topic) >= total, 900, f"{total} records in Kafka", p)
            elapsed = time.time() - t0
            cpu = proc_cpu_seconds(p.p.pid)  # from process start: the whole drain is its work
            rss = proc_peak_rss_mib(p.p.pid)
            if kind == "gateway_spool":
                fs = histogram(f"http://127.0.0.1:{port}/metrics", "gateway_spool_fsync_duration_seconds")
                q = quantiles({}, fs, [0.5, 0.99])
                res.update(fsync_p50_ms=q[0.5] and q[0.5] * 1000, fsync_p99_ms=q[0.99] and q[0.99] * 1000,
                           fsyncs=int(fs.get(float("inf"), 0)))
        broker_cpu = proc_cpu_seconds(bpid) - broker_cpu0 if bpid else None
    finally:
        p.stop()
    res.update(rate=total / elapsed, count=total, peak_rss_mib=rss,
               cpu_us_per_reading=cpu and cpu / total * 1e6,
               broker_cpu_pct=broker_cpu and broker_cpu / elapsed * 100)
    if kind not in ("mqtt", "mqtt_client"):
        res["verified"] = checked_and_deleted(topic, dlq, total, f"{kind} drain")
    return res


def soak(outage_min, rate, devices=100):
    """Kafka down `outage_min` minutes at `rate` readings/s into the spool, then
    Kafka back while live traffic continues: zero loss, and the drain rate."""
    topic, dlq, prefix = unique("soak"), unique("soak-dlq"), unique("soak-mqtt")
    create_topic(topic)
    create_topic(dlq, 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw, _ = start_gateway("gateway-soak", topic, dlq, prefix, "async", port)
    lead, tail = 60, 300  # live traffic before the outage and after it
    secs = lead + outage_min * 60 + tail
    manifest = ROOT / "bench" / "out" / f"{prefix}.manifest.json"
    sim = Proc("simulator-soak", simulator(prefix, devices, rate=rate / devices, duration=f"{secs}s",
                                           connections=4) + ["--manifest", str(manifest)])
    delivered = lambda: metric(url + "/metrics", "gateway_readings_delivered_total") or 0
    backlog = lambda: metric(url + "/metrics", "gateway_spool_records") or 0
    try:
        time.sleep(lead)
        log(f"soak: stopping Kafka for {outage_min} min")
        subprocess.run([str(ROOT / "scripts" / "stack"), "down", "kafka"], check=True)
        time.sleep(outage_min * 60)
        peak = backlog()
        log(f"soak: {peak:.0f} readings spooled; starting Kafka")
        subprocess.run([str(ROOT / "scripts" / "stack"), "up", "kafka"], check=True)
        wait_until(lambda: (metric(url + "/metrics", "gateway_kafka_reachable") or 0) == 1, 300, "Kafka reachable", gw)
        t0, d0 = time.time(), delivered()
        wait_until(lambda: backlog() < rate, 3600, "the backlog drained", gw)
        drain_s = time.time() - t0
        drain_rate = (delivered() - d0) / drain_s
        log(f"soak: drained {peak:.0f} in {drain_s:.1f}s ({drain_rate:.0f} readings/s with live traffic)")
        wait_until(lambda: sim.p.poll() is not None, secs + 120, "the simulator finished", sim)
        sent = json.loads(manifest.read_text())["totals"]["valid"]
        wait_until(lambda: topic_count(topic) >= sent, 600, f"{sent} records in Kafka", gw)
    finally:
        sim.stop()
        gw.stop()
    check = verify_topic(topic, sent)
    delete_topics([topic, dlq])
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "outage_min": outage_min, "rate": rate,
           "spooled_peak": peak, "drain_s": drain_s, "drain_rate": drain_rate, "sent": sent, "verified": check}
    # Kept (committed) next to results.json: the report includes the last soak.
    (ROOT / "bench" / "soak.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"soak: {json.dumps(out)}")
    if not check["ok"]:
        raise BenchError(f"soak: delivery check failed: {check}")
    return out


def case_latency(rate_total, seconds, devices=1000, spool=True):
    """Receive -> Kafka ack quantiles below saturation; spool=False shows what
    the spool's fsync adds."""
    topic, dlq, prefix = unique("lat"), unique("lat-dlq"), unique("lat-mqtt")
    create_topic(topic)
    create_topic(dlq, 1)
    extra = None if spool else {"GATEWAY__SPOOL__ENABLED": "false"}
    gw, url = start_gateway(f"gateway-latency-{rate_total}", topic, dlq, prefix, "async", free_port(), extra)
    try:
        before = histogram(url + "/metrics", "gateway_delivery_latency_seconds")
        run_simulator(simulator(prefix, devices, rate=rate_total / devices, duration=f"{seconds}s",
                                connections=min(devices, 10)), seconds + 60)
        delivered = lambda: metric(url + "/metrics", "gateway_readings_delivered_total") or 0
        sent_expect = rate_total * seconds * 0.8
        wait_until(lambda: delivered() >= sent_expect, 60, "latency run delivered", gw)
        time.sleep(1)
        after = histogram(url + "/metrics", "gateway_delivery_latency_seconds")
        q = quantiles(before, after, [0.5, 0.99, 0.999])
        n = after.get(float("inf"), 0) - before.get(float("inf"), 0)
    finally:
        gw.stop()
    delete_topics([topic, dlq])
    if n < sent_expect:
        raise BenchError(f"latency run: only {n} readings measured")
    ms = lambda v: None if v is None else v * 1000
    return {"rate": rate_total, "count": int(n), "p50_ms": ms(q[0.5]), "p99_ms": ms(q[0.99]), "p999_ms": ms(q[0.999])}


def case_aggregator(n, devices):
    topic = unique("agg")
    create_topic(topic)
    r = subprocess.run([str(REL / "examples" / "kafka_produce"), KAFKA, topic, str(n), str(devices)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise BenchError(r.stderr)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"AGGREGATOR__KAFKA__BOOTSTRAP_SERVERS": KAFKA, "AGGREGATOR__KAFKA__TOPIC": topic,
           "AGGREGATOR__KAFKA__GROUP_ID": unique("agg-group"), "AGGREGATOR__HTTP__LISTEN": f"127.0.0.1:{port}",
           "AGGREGATOR__METRICS__MAX_DEVICES": str(devices), "RUST_LOG": "warn"}
    agg = Proc("aggregator", [str(REL / "aggregator"), "run", "--config", "configs/aggregator.toml"], env)
    try:
        # Timed from the first record consumed (group join excluded); polls the
        # cheap /api/stats, not /metrics, whose 10,000-device render would slow it.
        wait_until(lambda: aggregator_stats(url).get("consumed", 0) > 0, 120, "aggregator started consuming", agg)
        t0, cpu0 = time.time(), proc_cpu_seconds(agg.p.pid)
        wait_until(lambda: aggregator_stats(url).get("consumed", 0) >= n, 900, "aggregator consumed all", agg)
        elapsed = time.time() - t0
        cpu = proc_cpu_seconds(agg.p.pid) - cpu0
        applied = aggregator_stats(url).get("applied", 0)
        scrapes = []
        for _ in range(5):
            s = time.time()
            body = http_get(url + "/metrics", 30)
            scrapes.append((time.time() - s) * 1000)
        exported = body.count("aggregator_device_temperature_celsius{")
        rss = proc_peak_rss_mib(agg.p.pid)
    finally:
        agg.stop()
    delete_topics([topic])
    if applied != n or exported != devices:
        raise BenchError(f"aggregator: applied {applied} of {n}, exported {exported} of {devices} devices")
    return {"rate": n / elapsed, "count": n, "cpu_us_per_reading": cpu / n * 1e6, "peak_rss_mib": rss,
            "scrape_ms": statistics.median(scrapes), "devices": devices}


def case_many_devices(devices, max_devices=None):
    """`devices` distinct device ids, one reading each, through simulator ->
    Mosquitto -> gateway -> Kafka -> aggregator: both stay bounded (peak RSS)
    and count the devices they evict. `max_devices` overrides both bounds."""
    topic, dlq, prefix = unique("many"), unique("many-dlq"), unique("many-mqtt")
    create_topic(topic)
    create_topic(dlq, 1)
    extra = {"GATEWAY__TRACKING__MAX_DEVICES": str(max_devices)} if max_devices else {}
    gw, gw_url = start_gateway("gateway-many", topic, dlq, prefix, "async", free_port(), extra)
    port = free_port()
    agg_url = f"http://127.0.0.1:{port}"
    env = {"AGGREGATOR__KAFKA__BOOTSTRAP_SERVERS": KAFKA, "AGGREGATOR__KAFKA__TOPIC": topic,
           "AGGREGATOR__KAFKA__GROUP_ID": unique("many-group"), "AGGREGATOR__HTTP__LISTEN": f"127.0.0.1:{port}",
           "RUST_LOG": "warn", **({"AGGREGATOR__AGGREGATION__MAX_DEVICES": str(max_devices)} if max_devices else {})}
    agg = Proc("aggregator-many", [str(REL / "aggregator"), "run", "--config", "configs/aggregator.toml"], env)
    try:
        run_simulator(simulator(prefix, devices, per_device=1, connections=4), 1800)
        wait_until(lambda: (metric(gw_url + "/metrics", "gateway_readings_delivered_total") or 0) >= devices,
                   900, f"{devices} readings delivered", gw)
        wait_until(lambda: aggregator_stats(agg_url).get("applied", 0) >= devices, 900, "the aggregator applied all", agg)
        res = {
            "count": devices,
            "gateway_peak_rss_mib": proc_peak_rss_mib(gw.p.pid),
            "gateway_tracked": metric(gw_url + "/metrics", "gateway_devices_tracked"),
            "gateway_evicted": metric(gw_url + "/metrics", "gateway_devices_evicted_total"),
            "aggregator_peak_rss_mib": proc_peak_rss_mib(agg.p.pid),
            "aggregator_devices": aggregator_stats(agg_url).get("devices"),
            "aggregator_evicted": metric(agg_url + "/metrics", "aggregator_devices_evicted_total"),
        }
    finally:
        gw.stop()
        agg.stop()
    delete_topics([topic, dlq])
    bound = max_devices or 50_000
    for who in ("gateway", "aggregator"):
        kept = res["gateway_tracked"] if who == "gateway" else res["aggregator_devices"]
        if kept is None or kept > bound or kept + (res[f"{who}_evicted"] or 0) != devices:
            raise BenchError(f"{who}: {kept} devices kept and {res[f'{who}_evicted']} evicted of {devices} (bound {bound})")
    return res


# ------------------------------------------------------------------ footprint (edge box)

FOOTPRINT_KEYS = ("ready_ms_plain", "ready_ms_tls", "idle_rss_mib_plain", "idle_rss_mib_tls",
                  "idle_anon_mib_plain", "idle_anon_mib_tls", "devices_rss_mib", "devices_anon_mib",
                  "devices_peak_rss_mib")
SECURE_DIR = Path(os.environ.get("SECURE_STACK_DIR", ROOT / ".stack" / "secure"))
SECURE_KAFKA = os.environ.get("SECURE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9094")
SECURE_MQTT = os.environ.get("SECURE_MQTT_MTLS_BROKER", "mqtts://127.0.0.1:8884")


def secure_gateway_env():
    """The gateway as shipped for the edge: MQTT over mutual TLS, Kafka SASL_SSL
    (SCRAM-SHA-512), against `scripts/stack --secure`."""
    pki, sec = SECURE_DIR / "pki", SECURE_DIR / "secrets"
    if not (pki / ".complete").exists():
        raise BenchError(f"the secure stack is not set up ({pki}); start it with `scripts/stack up --secure`")
    return {
        "GATEWAY__MQTT__URL": SECURE_MQTT,
        "GATEWAY__MQTT__TLS__CA_FILE": str(pki / "ca.crt"),
        "GATEWAY__MQTT__TLS__CERT_FILE": str(pki / "gateway.crt"),
        "GATEWAY__MQTT__TLS__KEY_FILE": str(pki / "gateway.key"),
        "GATEWAY__KAFKA__BOOTSTRAP_SERVERS": SECURE_KAFKA,
        "GATEWAY__KAFKA__SECURITY_PROTOCOL": "sasl_ssl",
        "GATEWAY__KAFKA__TLS__CA_FILE": str(pki / "ca.crt"),
        "GATEWAY__KAFKA__SASL__MECHANISM": "SCRAM-SHA-512",
        "GATEWAY__KAFKA__SASL__USERNAME": "gateway",
        "GATEWAY__KAFKA__SASL__PASSWORD_FILE": str(sec / "kafka-gateway.password"),
        # The stack's own topics (the gateway user may write only these).
        "GATEWAY__KAFKA__TOPIC": "weather",
        "GATEWAY__KAFKA__DLQ_TOPIC": "weather.dlq",
    }


def start_until_ready(name, env, timeout=30):
    """Starts the gateway with NOTIFY_SOCKET pointing at our socket and returns
    it with the seconds from spawn to its READY=1 (sent once MQTT is subscribed
    and the spool is open: what systemd waits for)."""
    import socket
    import tempfile

    d = tempfile.mkdtemp(prefix="bench-notify-")
    path = os.path.join(d, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    try:
        t0 = time.monotonic()
        gw = Proc(name, [str(REL / "gateway"), "run", "--config", "configs/gateway.toml"],
                  {"RUST_LOG": "warn", **env, "NOTIFY_SOCKET": path})
        while True:
            try:
                if b"READY=1" in s.recv(4096).split(b"\n"):
                    return gw, time.monotonic() - t0
            except socket.timeout:
                pass
            if gw.p.poll() is not None:
                raise BenchError(f"{name} exited before READY=1:\n{gw.tail()}")
            if time.monotonic() - t0 > timeout:
                gw.stop()
                raise BenchError(f"{name}: no READY=1 within {timeout}s:\n{gw.tail()}")
    finally:
        s.close()
        os.unlink(path)
        os.rmdir(d)


def case_footprint(devices, per_device, idle_s):
    """Idle RSS and start-to-ready, plain and with TLS, both with the spool; then
    RSS after `devices` distinct devices have sent `per_device` readings each."""
    out = {}
    for label, env in [("plain", {"GATEWAY__MQTT__URL": MQTT_URL, "GATEWAY__KAFKA__BOOTSTRAP_SERVERS": KAFKA}),
                       ("tls", secure_gateway_env())]:
        env = {**env, "GATEWAY__MQTT__CLIENT_ID": unique("fp-gw"), "GATEWAY__MQTT__CLEAN_SESSION": "true",
               "GATEWAY__MQTT__TOPICS": f"{unique('fp-idle')}/+/telemetry", "GATEWAY__SPOOL__ENABLED": "true",
               "GATEWAY__SPOOL__DIR": str(ROOT / "bench" / "out" / "spool" / unique("fp")),
               "GATEWAY__HTTP__LISTEN": f"127.0.0.1:{free_port()}"}
        gw, ready_s = start_until_ready(f"gateway-footprint-{label}", env)
        try:
            time.sleep(idle_s)
            out[f"ready_ms_{label}"] = ready_s * 1000
            out[f"idle_rss_mib_{label}"] = proc_rss_mib(gw.p.pid)
            out[f"idle_anon_mib_{label}"] = proc_rss_mib(gw.p.pid, "RssAnon")
        finally:
            gw.stop()

    topic, dlq, prefix = unique("fp"), unique("fp-dlq"), unique("fp-mqtt")
    create_topic(topic)
    create_topic(dlq, 1)
    port = free_port()
    gw, _ = start_until_ready("gateway-footprint-devices", {
        "GATEWAY__MQTT__URL": MQTT_URL, "GATEWAY__MQTT__CLIENT_ID": prefix + "-gw", "GATEWAY__MQTT__CLEAN_SESSION": "true",
        "GATEWAY__MQTT__TOPICS": f"{prefix}/+/telemetry", "GATEWAY__KAFKA__BOOTSTRAP_SERVERS": KAFKA,
        "GATEWAY__KAFKA__TOPIC": topic, "GATEWAY__KAFKA__DLQ_TOPIC": dlq,
        "GATEWAY__SPOOL__DIR": str(ROOT / "bench" / "out" / "spool" / unique("fp-devices")),
        "GATEWAY__HTTP__LISTEN": f"127.0.0.1:{port}"})
    total = devices * per_device
    try:
        # 1 reading/s per device: every device is live at once, at `devices` readings/s.
        run_simulator(simulator(prefix, devices, per_device=per_device, rate=1), per_device + 120)
        wait_until(lambda: topic_count(topic) >= total, 120, f"{total} records in Kafka", gw)
        time.sleep(2)
        out["devices_rss_mib"] = proc_rss_mib(gw.p.pid)
        out["devices_anon_mib"] = proc_rss_mib(gw.p.pid, "RssAnon")
        out["devices_peak_rss_mib"] = proc_peak_rss_mib(gw.p.pid)
    finally:
        gw.stop()
    out["verified"] = checked_and_deleted(topic, dlq, total, "footprint devices")
    out["devices"] = devices
    return out


def binary_sizes():
    """Stripped binary and .deb sizes per architecture, from the packages
    `scripts/package` made (what an edge box installs), with the commit and
    target each binary reports, so a stale package shows."""
    import glob
    import shutil
    import tempfile

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    res = {}
    for arch in ("amd64", "arm64"):
        debs = sorted(glob.glob(str(ROOT / "target" / "debian" / f"iot-gateway_*_{arch}.deb")), key=os.path.getmtime)
        if not debs:
            res[arch] = {"missing": f"no target/debian/iot-gateway_*_{arch}.deb: run scripts/package"}
            continue
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(["dpkg-deb", "-x", debs[-1], d], check=True)
            r = {"deb_mib": os.path.getsize(debs[-1]) / 2**20}
            for b in ("gateway", "aggregator", "simulator"):
                r[f"{b}_mib"] = os.path.getsize(os.path.join(d, "usr", "bin", f"iot-{b}")) / 2**20
            run = [os.path.join(d, "usr", "bin", "iot-gateway"), "--version"]
            if arch == "arm64":
                run = ["qemu-aarch64"] + run if shutil.which("qemu-aarch64") else None
            if run:
                v = subprocess.run(run, capture_output=True, text=True, timeout=60)
                r["version"] = v.stdout.strip()
                r["stale"] = head not in r["version"]
        res[arch] = r
    return res


# ------------------------------------------------------------------ steady load

STEADY_KINDS = ("gateway_spool", "gateway_nospool", "telegraf", "python")
STEADY_RATES = (100, 1_000, 10_000)


def proc_write_bytes(pid):
    """Bytes this process caused to be written to the block device (/proc/<pid>/io)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def case_steady(kind, rate, seconds, devices=1_000, warmup=5):
    """A bridge at a steady rate (`rate` readings/s from `devices` devices over 4
    connections, QoS 1), as an edge box runs: CPU of the bridge and of Mosquitto,
    and the bridge's block-device writes, over `seconds` after `warmup`; for the
    gateway also receive -> Kafka ack and receive -> PUBACK quantiles, and the
    spooled bytes. Every reading is read back once afterwards."""
    if kind == "telegraf" and os.environ.get("TELEGRAF_SKIP"):
        raise Skipped(os.environ["TELEGRAF_SKIP"])
    if kind == "telegraf" and not os.access(TELEGRAF, os.X_OK):
        raise BenchError(f"Telegraf is not built at {TELEGRAF} (scripts/bench builds it with Go; is `go` installed?)")
    topic, dlq, prefix = unique("steady"), unique("steady-dlq"), unique(f"steady-{kind}")
    create_topic(topic)
    create_topic(dlq, 1)
    port = free_port()
    spool_dir = ROOT / "bench" / "out" / "spool" / unique(kind)
    per = max(1, round(rate / devices * (warmup + seconds + 2)))
    total = per * devices
    p = drain_bridge(kind, prefix, topic, dlq, port, spool_dir, total)
    gw = kind.startswith("gateway")
    url = f"http://127.0.0.1:{port}/metrics"
    res = {}
    try:
        if not gw:
            time.sleep(3)  # connect + subscribe
        sim = Proc(f"sim-steady-{kind}-{rate}", simulator(prefix, devices, per_device=per, rate=rate / devices))
        try:
            time.sleep(warmup)
            bpid = broker_pid()
            pid = p.p.pid
            b0 = proc_cpu_seconds(bpid) if bpid else None
            c0, w0, t0 = proc_cpu_seconds(pid), proc_write_bytes(pid), time.time()
            if gw:
                lat0 = histogram(url, "gateway_delivery_latency_seconds")
                ack0 = histogram(url, "gateway_mqtt_ack_latency_seconds")
                n0 = metric(url, "gateway_readings_received_total") or 0
                s0 = metric(url, "gateway_spool_appended_bytes_total") or 0
                f0 = histogram(url, "gateway_spool_fsync_duration_seconds").get(float("inf"), 0)
            time.sleep(seconds)
            elapsed = time.time() - t0
            cpu = proc_cpu_seconds(pid) - c0
            written = proc_write_bytes(pid) - w0
            broker = proc_cpu_seconds(bpid) - b0 if bpid else None
            readings = rate * elapsed
            if gw:
                lat = quantiles(lat0, histogram(url, "gateway_delivery_latency_seconds"), [0.5, 0.99])
                ack = quantiles(ack0, histogram(url, "gateway_mqtt_ack_latency_seconds"), [0.5, 0.99])
                readings = (metric(url, "gateway_readings_received_total") or 0) - n0
                spooled = (metric(url, "gateway_spool_appended_bytes_total") or 0) - s0
                fsyncs = histogram(url, "gateway_spool_fsync_duration_seconds").get(float("inf"), 0) - f0
                ms = lambda v: None if v is None else v * 1000
                res.update(p50_ms=ms(lat[0.5]), p99_ms=ms(lat[0.99]), ack_p50_ms=ms(ack[0.5]),
                           ack_p99_ms=ms(ack[0.99]), spooled_bytes_per_reading=spooled / readings if readings else None,
                           fsyncs_per_s=fsyncs / elapsed)
            wait_until(lambda: sim.p.poll() is not None, 120, "the simulator to finish")
            if sim.p.returncode != 0:
                raise BenchError(f"simulator failed: {sim.tail()}")
        finally:
            sim.stop()
        wait_until(lambda: topic_count(topic) >= total, 120, f"{total} records in Kafka", p)
    finally:
        p.stop()
    res.update(rate=rate, count=total, measured_readings=int(readings), cpu_pct=100 * cpu / elapsed,
               cpu_us_per_reading=cpu / readings * 1e6 if readings else None,
               broker_cpu_pct=broker and 100 * broker / elapsed,
               written_bytes_per_reading=written / readings if readings else None)
    res["verified"] = checked_and_deleted(topic, dlq, total, f"{kind} steady {rate}/s")
    return res


def case_idle(seconds):
    """The gateway (spool on) subscribed and connected, with no traffic: what
    its timers cost."""
    topic, dlq, prefix = unique("idle"), unique("idle-dlq"), unique("idle")
    create_topic(topic)
    create_topic(dlq, 1)
    gw, _ = start_gateway("gateway-idle", topic, dlq, prefix, "async", free_port())
    try:
        time.sleep(3)
        c0, w0, t0 = proc_cpu_seconds(gw.p.pid), proc_write_bytes(gw.p.pid), time.time()
        time.sleep(seconds)
        elapsed = time.time() - t0
        cpu = proc_cpu_seconds(gw.p.pid) - c0
        written = proc_write_bytes(gw.p.pid) - w0
    finally:
        gw.stop()
    delete_topics([topic, dlq])
    return {"cpu_pct": 100 * cpu / elapsed, "written_bytes_per_s": written / elapsed}
