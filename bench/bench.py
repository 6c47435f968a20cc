"""Benchmark harness (run by scripts/bench): every case in one run, against the real
local stack, so ratios are comparable. Medians of several repetitions, with min/max.

Writes bench/results.json, bench/chart.png and BENCHMARKS.md (full run), or
bench/out/quick.json (--quick: tiny loads, checks that the harness and its
delivery verification work, not speed).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from benchlib import *  # noqa: E402,F401,F403
from cases import *  # noqa: E402,F401,F403

# ------------------------------------------------------------------ driver


def summarize(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def cpu_times():
    """The machine's CPU time so far by kind (/proc/stat), in ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return {"user": v[0] + v[1], "system": v[2] + v[5] + v[6], "idle": v[3] + v[4], "steal": v[7] if len(v) > 7 else 0}


def steal_pct(before, after):
    """Share of the machine's CPU time the hypervisor gave to others (steal) between two cpu_times()."""
    d = {k: after[k] - before[k] for k in before}
    total = sum(d.values())
    return round(100 * d["steal"] / total, 1) if total else None


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) / 1024 / 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "kernel": platform.release()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--soak", action="store_true", help="only the spool soak (Kafka down --soak-minutes)")
    ap.add_argument("--soak-minutes", type=float, default=30)
    ap.add_argument("--soak-rate", type=int, default=1000)
    ap.add_argument("--steady-secs", type=float, default=None, help="measured seconds of each steady case")
    ap.add_argument("--only", help="comma-separated cases; results go to bench/out/only.json, not BENCHMARKS.md")
    a = ap.parse_args()
    if a.soak:
        soak(a.soak_minutes, a.soak_rate)
        return
    q = a.quick
    reps = 1 if q else a.reps
    sizes = dict(
        sim=20_000 if q else 1_000_000,
        mqtt=5_000 if q else 300_000,
        kafka=5_000 if q else 500_000,
        e2e=5_000 if q else 200_000,
        e2e_devices=1_000 if q else 10_000,
        drain=5_000 if q else 300_000,
        sync=500 if q else 20_000,
        python=2_000 if q else 200_000,
        lat_secs=3 if q else 15,
        agg=20_000 if q else 1_000_000,
        agg_devices=1_000 if q else 10_000,
        fp_devices=1_000 if q else 10_000,
        many_devices=20_000 if q else 1_000_000,
        fp_per_device=2 if q else 3,
        fp_idle_s=1 if q else 5,
        steady_s=a.steady_secs or (3 if q else 20),
    )
    plan = [
        ("simulator_qos0", lambda: case_simulator(sizes["sim"], 0)),
        ("simulator_qos1", lambda: case_simulator(sizes["sim"] // 2, 1)),
        ("mqtt_ceiling", lambda: case_mqtt_ceiling(sizes["mqtt"])),
        ("kafka_ceiling", lambda: case_kafka_ceiling(sizes["kafka"])),
        ("kafka_ceiling_headers", lambda: case_kafka_ceiling(sizes["kafka"], headers=True)),
        ("gateway_async", lambda: case_e2e("gateway", sizes["e2e"], sizes["e2e_devices"], "async")),
        ("gateway_sync", lambda: case_e2e("gateway", sizes["sync"], 100, "sync")),
        *[(f"drain_{k}", (lambda k=k: case_drain(k, sizes["drain"], 1_000))) for k in DRAIN_KINDS + BASELINE_KINDS],
        ("python_baseline", lambda: case_e2e("python", sizes["python"], sizes["e2e_devices"])),
        ("latency_1k", lambda: case_latency(1_000, sizes["lat_secs"])),
        ("latency_10k", lambda: case_latency(10_000, sizes["lat_secs"])),
        ("latency_10k_nospool", lambda: case_latency(10_000, sizes["lat_secs"], spool=False)),
        ("aggregator", lambda: case_aggregator(sizes["agg"], sizes["agg_devices"])),
        ("many_devices", lambda: case_many_devices(sizes["many_devices"], 5_000 if q else None)),
        ("footprint", lambda: case_footprint(sizes["fp_devices"], sizes["fp_per_device"], sizes["fp_idle_s"])),
        *[(f"steady_{k}_{r}", (lambda k=k, r=r: case_steady(k, r, sizes["steady_s"])))
          # --quick checks the harness: one bridge, one rate.
          for r in STEADY_RATES for k in STEADY_KINDS + BASELINE_KINDS if not q or (k, r) == ("gateway_spool", 1_000)],
        ("steady_idle", lambda: case_idle(sizes["steady_s"])),
    ]
    # --only steady: every steady case.
    all_steady = bool(a.only) and "steady" in a.only.split(",")
    if a.only:
        a.only = ",".join(",".join(n for n, _ in plan if n.startswith("steady_")) if w == "steady" else w
                          for w in a.only.split(","))
    if a.only:
        want = a.only.split(",")
        unknown = set(want) - {n for n, _ in plan}
        if unknown:
            ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(n for n, _ in plan)}")
        plan = [(n, f) for n, f in plan if n in want]
    results = {}
    failures = []
    skipped = {}
    times0 = cpu_times()
    if not q and not a.only:
        # Warm-up, not measured: the JVM of a fresh Kafka is slower for its first
        # minute, which would penalise whichever case runs first.
        log("warm-up (not measured)")
        try:
            case_e2e("gateway", 50_000, 1_000, "async")
        except Exception as e:
            log(f"  warm-up failed: {e}")
    for rep in range(reps):
        for name, fn in plan:
            log(f"rep {rep + 1}/{reps}: {name}")
            t = time.time()
            try:
                r = fn()
                results.setdefault(name, []).append(r)
                log(f"  {name}: {json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != 'verified'})} ({time.time() - t:.1f}s)")
            except Skipped as e:
                log(f"  {name} SKIPPED: {e}")
                skipped[name] = str(e)
            except Exception as e:  # a failed case is reported, the run goes on
                failures.append(f"{name}: {e}")
                log(f"  {name} FAILED: {e}")
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "quick": q,
        "machine": {**machine(), "steal_pct": steal_pct(times0, cpu_times())},
        "sizes": sizes,
        "cases": {name: {"runs": runs, **{k: summarize(runs, k) for k in
                                          ("rate", "cpu_us_per_reading", "peak_rss_mib", "p50_ms", "p99_ms", "p999_ms", "scrape_ms",
                                           "fsync_p50_ms", "fsync_p99_ms", "broker_cpu_pct",
                                           "cpu_pct", "ack_p50_ms", "ack_p99_ms", "written_bytes_per_reading",
                                           "spooled_bytes_per_reading", "fsyncs_per_s", "written_bytes_per_s",
                                           "gateway_peak_rss_mib", "aggregator_peak_rss_mib", "gateway_evicted", "aggregator_evicted", *FOOTPRINT_KEYS)
                                          if summarize(runs, k)}}
                  for name, runs in results.items()},
        "failures": failures,
        "skipped": skipped,
        "binaries": binary_sizes(),
    }
    if q or a.only:
        path = ROOT / "bench" / "out" / ("quick.json" if q else "only.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        log(f"quick run: {len(results)} cases, {len(failures)} failures -> {path}")
        if not q and all_steady and not failures:
            # Every steady case ran: its section of BENCHMARKS.md, and the data for the next full report.
            out["baseline"] = os.environ.get("BENCH_BASELINE_REV")
            (ROOT / "bench" / "steady.json").write_text(json.dumps(out, indent=2) + "\n")
            import report

            report.write_steady(out, ROOT)
            log("steady-load section written to BENCHMARKS.md (data: bench/steady.json)")
    else:
        soak_file = ROOT / "bench" / "soak.json"
        if soak_file.exists():
            out["soak"] = json.loads(soak_file.read_text())
        steady_file = ROOT / "bench" / "steady.json"
        if steady_file.exists():
            out["steady"] = json.loads(steady_file.read_text())
        (ROOT / "bench" / "results.json").write_text(json.dumps(out, indent=2) + "\n")
        import report

        report.write(out, ROOT)
    if failures:
        for f in failures:
            print(f"FAILED {f}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
