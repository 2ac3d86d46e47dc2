#!/usr/bin/env python3
"""Turns bench/run's raw rounds into results JSON and a markdown summary with ratios."""
import json
import statistics
import sys

raw, out, commit, cores, load_avg, pinning, conns, seconds, rounds, rss_kb = sys.argv[1:11]


def ms(text):
    """wrk latency ("812.00us", "1.20ms", "2.01s") in milliseconds."""
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float("nan")


runs = {}
for line in open(raw):
    r, target, rps, p50, p99, errs = line.rstrip("\n").split("\t")
    runs.setdefault(target, []).append(
        {"round": int(r), "rps": float(rps), "p50_ms": ms(p50), "p99_ms": ms(p99), "errors": errs.strip()}
    )

targets = {}
for t, rs in runs.items():
    rps = [x["rps"] for x in rs]
    targets[t] = {
        "rounds": rs,
        "rps_median": statistics.median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p99_ms_median": statistics.median(x["p99_ms"] for x in rs),
    }

# Ratios per round (both sides ran in the same round), then their median and spread.
ratios = {}
for a, b in (("shopverse", "nginx"), ("shopverse", "haproxy"), ("shopverse", "direct"), ("nginx", "direct")):
    per_round = [x["rps"] / y["rps"] for x, y in zip(runs[a], runs[b]) if y["rps"] > 0]
    ratios[f"{a}/{b}"] = {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
        "per_round": per_round,
    }

result = {
    "scenario": "1-routing (closed loop, wrk)",
    "commit": commit,
    "machine": {"cores": int(cores), "load_average_at_start": load_avg, "pinning": pinning},
    "load": {"tool": "wrk -t1", "connections": int(conns), "seconds_per_round": int(seconds), "rounds": int(rounds)},
    "gateway_rss_mb_after_load": round(int(rss_kb) / 1024, 1),
    "targets": targets,
    "ratios": ratios,
}
with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)

lines = [
    f"# Scenario 1, routing: commit {commit}",
    "",
    f"{cores} cores, load average at start {load_avg}; pinning: {pinning}.",
    f"wrk -t1 -c{conns}, {seconds} s per round, {rounds} interleaved rounds; closed loop (peak throughput).",
    "",
    "| target | req/s median | min | max | p99 median (ms) |",
    "|---|---:|---:|---:|---:|",
]
for t in ("direct", "shopverse", "nginx", "haproxy"):
    if t in targets:
        x = targets[t]
        lines.append(
            f"| {t} | {x['rps_median']:,.0f} | {x['rps_min']:,.0f} | {x['rps_max']:,.0f} | {x['p99_ms_median']:.2f} |"
        )
lines += ["", "| ratio (same round) | median | min | max |", "|---|---:|---:|---:|"]
for k, v in ratios.items():
    lines.append(f"| {k} | {v['median']:.2f}x | {v['min']:.2f}x | {v['max']:.2f}x |")
lines += ["", f"Gateway RSS after the load: {result['gateway_rss_mb_after_load']} MB."]
with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
