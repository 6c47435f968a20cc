"""The benchmark library: the stack's addresses, topics read back and verified,
process CPU and memory from /proc, metrics scraped, the processes under test."""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / os.environ.get("BENCH_PROFILE", "release")
KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
MQTT_HOST, MQTT_PORT = "127.0.0.1", os.environ.get("MQTT_PORT", "1883")
MQTT_URL = f"mqtt://{MQTT_HOST}:{MQTT_PORT}"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RUN_ID = f"{os.getpid()}-{int(time.time())}"
_counter = 0


class BenchError(Exception):
    pass


class Skipped(Exception):
    """A peer that cannot run on this machine (reported, not a failure)."""


def log(msg):
    print(f"[bench] {msg}", flush=True)


def unique(prefix):
    global _counter
    _counter += 1
    return f"bench-{prefix}-{RUN_ID}-{_counter}"


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_topic(name, partitions=6):
    admin = AdminClient({"bootstrap.servers": KAFKA})
    fut = admin.create_topics([NewTopic(name, partitions, 1)])[name]
    fut.result(30)
    time.sleep(0.5)


def delete_topics(names):
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": KAFKA})
    for f in admin.delete_topics(list(names)).values():
        try:
            f.result(30)
        except Exception:
            pass


def topic_count(name, partitions=6):
    c = Consumer({"bootstrap.servers": KAFKA, "group.id": unique("wm")})
    try:
        return sum(c.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in range(partitions))
    finally:
        c.close()


def verify_topic(name, want, partitions=6):
    """Reads the whole topic: exactly `want` records, each (device, seq) once."""
    c = Consumer(
        {
            "bootstrap.servers": KAFKA,
            "group.id": unique("verify"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(name, p, 0) for p in range(partitions)])
    seen, total, deadline = set(), 0, time.time() + 120
    while total < want and time.time() < deadline:
        for m in c.consume(10000, timeout=1.0):
            if m.error():
                continue
            total += 1
            v = json.loads(m.value())
            if "fields" in v:  # Telegraf's JSON: {"fields": {...}, "tags": {...}, ...}
                seen.add((v["tags"]["device_id"], v["fields"].get("seq")))
            else:
                seen.add((v["device_id"], v.get("seq")))
    # Anything beyond `want` (duplicates) shows up within a short settle time.
    for m in c.consume(10000, timeout=2.0):
        if not m.error():
            total += 1
    c.close()
    ok = total == want and len(seen) == want
    return {"records": total, "distinct": len(seen), "expected": want, "ok": ok}


def checked_and_deleted(topic, dlq, total, what):
    """verify_topic, then drop the case's topics; fails the case on a bad check."""
    check = verify_topic(topic, total)
    delete_topics([topic, dlq])
    if not check["ok"]:
        raise BenchError(f"{what}: delivery check failed: {check}")
    return check


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_rss_mib(pid, field="VmRSS"):
    """VmRSS (all resident pages), or RssAnon (the private part: heap and
    stacks, without the shared, clean code pages of the binary and libraries)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(url, name, labels=None):
    total, found = 0.0, False
    for line in http_get(url).splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        base = series.split("{", 1)[0]
        if base != name:
            continue
        if labels and not all(f'{k}="{v}"' in series for k, v in labels.items()):
            continue
        total += float(value)
        found = True
    return total if found else None


def histogram(url, name):
    """Cumulative bucket counts {le: count} of a histogram."""
    out = {}
    for line in http_get(url).splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def quantiles(before, after, qs):
    """Quantiles from the bucket deltas, interpolated linearly inside a bucket."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0
    res = {}
    for q in qs:
        if total <= 0:
            res[q] = None
            continue
        rank, prev_le, prev_c = q * total, 0.0, 0.0
        for le, c in zip(les, counts):
            if c >= rank:
                if le == float("inf"):
                    res[q] = prev_le
                else:
                    frac = (rank - prev_c) / (c - prev_c) if c > prev_c else 0
                    res[q] = prev_le + (le - prev_le) * frac
                break
            prev_le, prev_c = le, c
    return res


class Proc:
    def __init__(self, name, args, env=None, log_dir=None):
        self.name = name
        log_dir = log_dir or ROOT / "bench" / "out" / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=e, cwd=ROOT)

    def stop(self, timeout=20):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()

    def tail(self):
        try:
            return "".join(self.log_path.read_text().splitlines(True)[-20:])
        except OSError:
            return ""


def wait_until(pred, timeout, what, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.p.poll() is not None:
            raise BenchError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        time.sleep(0.05)
    raise BenchError(f"timed out ({timeout}s) waiting for {what}" + (f"\n{proc.tail()}" if proc else ""))


def simulator(prefix, devices, per_device=None, rate="max", qos=1, duration=None, connections=4):
    args = [str(REL / "simulator"), "--broker", MQTT_URL, "--topic-prefix", prefix, "--devices", str(devices),
            "--rate", str(rate), "--qos", str(qos), "--connections", str(connections), "--quiet", "--seed", "11"]
    if per_device is not None:
        args += ["--count", str(per_device)]
    if duration is not None:
        args += ["--duration", duration]
    return args


def run_simulator(args, timeout):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise BenchError(f"simulator failed ({r.returncode}): {r.stderr[-2000:]}")


# ------------------------------------------------------------------ cases



def start_gateway(name, topic, dlq, prefix, mode, http_port, extra=None, spool_dir=None, binary=None):
    env = {
        "GATEWAY__MQTT__URL": MQTT_URL,
        "GATEWAY__MQTT__CLIENT_ID": prefix + "-gw",
        "GATEWAY__MQTT__TOPICS": f"{prefix}/+/telemetry",
        "GATEWAY__KAFKA__BOOTSTRAP_SERVERS": KAFKA,
        "GATEWAY__KAFKA__TOPIC": topic,
        "GATEWAY__KAFKA__DLQ_TOPIC": dlq,
        "GATEWAY__KAFKA__DELIVERY_MODE": mode,
        "GATEWAY__HTTP__LISTEN": f"127.0.0.1:{http_port}",
        "GATEWAY__SPOOL__DIR": str(spool_dir or ROOT / "bench" / "out" / "spool" / unique(name)),
        "RUST_LOG": "warn",
        **(extra or {}),
    }
    # A baseline gateway reads its own commit's sample config (a newer one may have keys it does not know).
    config = os.environ.get("BENCH_BASELINE_CONFIG", "configs/gateway.toml") if binary else "configs/gateway.toml"
    gw = Proc(name, [str(binary or REL / "gateway"), "run", "--config", config], env)
    url = f"http://127.0.0.1:{http_port}"

    def ready():
        try:
            http_get(url + "/readyz", 1)
            return True
        except Exception:
            return False

    wait_until(ready, 30, "gateway ready", gw)
    return gw, url


def aggregator_stats(url):
    """The aggregator's /api/stats, or {} while it does not answer."""
    try:
        return json.loads(http_get(url + "/api/stats", 2))
    except Exception:
        return {}
