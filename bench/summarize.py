#!/usr/bin/env python3
"""Turns bench/run's raw records (one JSON object per line) into <out>.json, a markdown summary
<out>.md with the ratios and targets, and SVG plots <out>-*.svg of latency against offered rate.

usage: summarize.py RAW OUT COMMIT CORES LOADAVG PINNING CONNECTIONS SECONDS ROUNDS WALL_SECONDS
"""
import json
import math
import os
import statistics
import sys

raw, out, commit, cores, load_avg, pinning, conns, seconds, rounds, wall = sys.argv[1:11]
records = [json.loads(line) for line in open(raw) if line.strip()]
facts = {r["key"]: r["value"] for r in records if r.get("kind") == "fact"}


def ms(text):
    """wrk latency ("812.00us", "1.20ms", "2.01s") in milliseconds."""
    text = str(text)
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float("nan")


def peaks(scenario):
    """target -> list of per-round peak records, normalised to rps / p50_ms / p99_ms."""
    by = {}
    for r in records:
        if r.get("scenario") != scenario or r.get("kind") != "peak":
            continue
        if "latency_us" in r:  # our own driver
            x = {"round": int(r["round"]), "rps": r["achieved_rps"], "p50_ms": r["latency_us"]["p50"] / 1e3,
                 "p99_ms": r["latency_us"]["p99"] / 1e3, "errors": r["failed"] + r["broken"]}
        else:  # wrk
            x = {"round": r["round"], "rps": r["rps"], "p50_ms": ms(r["p50"]), "p99_ms": ms(r["p99"]),
                 "errors": r["non_2xx"] + (1 if r["socket_errors"] else 0)}
            if "steal_percent" in r:
                x["steal_percent"] = r["steal_percent"]
        by.setdefault(r["target"], []).append(x)
    return by


def summary(rs):
    v = [x["rps"] for x in rs]
    return {"rounds": rs, "rps_median": statistics.median(v), "rps_min": min(v), "rps_max": max(v),
            "p50_ms_median": statistics.median(x["p50_ms"] for x in rs),
            "p99_ms_median": statistics.median(x["p99_ms"] for x in rs),
            "errors": sum(x["errors"] for x in rs)}


def ratio(by, a, b):
    """Per round (both sides measured seconds apart), then median and spread."""
    if a not in by or b not in by:
        return None
    rb = {x["round"]: x["rps"] for x in by[b]}
    per = [x["rps"] / rb[x["round"]] for x in by[a] if rb.get(x["round"])]
    if not per:
        return None
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}


result = {
    "commit": commit,
    "machine": {"cores": int(cores), "load_average_at_start": load_avg, "pinning": pinning,
                "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")},
    "load": {"connections": int(conns), "seconds_per_run": float(seconds), "rounds": int(rounds),
             "closed_loop_tool": "wrk -t1 (scenarios 1, 2, 4); shopverse-load (3)",
             "open_loop_tool": "shopverse-load (latency from the due time: corrected for coordinated omission)"},
    "wall_seconds": int(wall),
    "facts": facts,
    "scenarios": {},
    "targets_check": [],
}
md = [f"# ShopVerse benchmarks: commit {commit}", "",
      f"{cores} cores ({result['machine']['cpu']}), load average at start {load_avg}; pinning: {pinning}.",
      f"{conns} connections, {seconds} s per run, {rounds} interleaved rounds; {wall} s in all.", ""]
checks = result["targets_check"]


def check(name, value, target, ok, detail=""):
    checks.append({"target": name, "measured": value, "goal": target, "met": ok, "detail": detail})


def stolen(scenario, target):
    """Runs of `target` measured again because the host took the system core (`peak-stolen`)."""
    return sum(1 for r in records if r.get("kind") == "peak-stolen"
               and r.get("scenario") == scenario and r.get("target") == target)


def peak_table(by, order, scenario):
    # Steal: the share of the system core's time the host took while wrk ran, per round. A
    # round with a high one measured the host's other tenants as much as the target.
    # Runs measured again: see `peak` in bench/run.
    md.extend(["| target | req/s median | min | max | p50 ms | p99 ms | errors | steal % per round | runs measured again |",
               "|---|---:|---:|---:|---:|---:|---:|---|---:|"])
    for t in order:
        if t in by:
            s = summary(by[t])
            steal = " / ".join(str(x["steal_percent"]) for x in by[t] if "steal_percent" in x) or "-"
            md.append(f"| {t} | {s['rps_median']:,.0f} | {s['rps_min']:,.0f} | {s['rps_max']:,.0f} | "
                      f"{s['p50_ms_median']:.2f} | {s['p99_ms_median']:.2f} | {s['errors']} | {steal} | {stolen(scenario, t)} |")
    md.append("")


def ratio_table(rows):
    md.extend(["| ratio (per round, same run) | median | min | max |", "|---|---:|---:|---:|"])
    for name, r in rows:
        if r:
            md.append(f"| {name} | {r['median']:.2f}x | {r['min']:.2f}x | {r['max']:.2f}x |")
    md.append("")


def svg_plot(path, title, series, xlabel, ylabel):
    """A log-y line plot: series = {name: [(x, y), ...]}. Hand-written SVG, no dependencies."""
    W, H, L, R, T, B = 720, 420, 70, 170, 40, 50
    pts = [p for s in series.values() for p in s if p[1] > 0]
    if not pts:
        return
    x0, x1 = 0, max(p[0] for p in pts) * 1.05
    y0 = 10 ** math.floor(math.log10(min(p[1] for p in pts)))
    y1 = 10 ** math.ceil(math.log10(max(p[1] for p in pts)))
    if y1 <= y0:
        y1 = y0 * 10
    X = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    Y = lambda y: H - B - (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) * (H - T - B)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
         f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
         f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
         f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
         f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">{ylabel}</text>']
    d = y0
    while d <= y1 * 1.0001:
        o.append(f'<line x1="{L}" y1="{Y(d):.1f}" x2="{W - R}" y2="{Y(d):.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{L - 6}" y="{Y(d) + 4:.1f}" text-anchor="end">{d:g}</text>')
        d *= 10
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        o.append(f'<text x="{X(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:,.0f}</text>')
    targets = sorted({name.rsplit(" ", 1)[0] for name in series})
    for i, (name, s) in enumerate(series.items()):
        # One colour per target; p50 dashed, p99 solid.
        c = colors[targets.index(name.rsplit(" ", 1)[0]) % len(colors)]
        dash = ' stroke-dasharray="5,3"' if "p50" in name else ""
        s = sorted(p for p in s if p[1] > 0)
        o.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="'
                 + " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s) + '"/>')
        for x, y in s:
            o.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{c}"/>')
        ly = T + 10 + i * 18
        o.append(f'<line x1="{W - R + 10}" y1="{ly}" x2="{W - R + 34}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>')
        o.append(f'<text x="{W - R + 40}" y="{ly + 4}">{name}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


# --- scenario 1 -------------------------------------------------------------------------------
s1 = peaks("1")
if s1:
    md += ["## 1. Routing: a plain proxied route", "", "Closed loop (peak throughput, wrk):", ""]
    peak_table(s1, ["direct", "shopverse", "shopverse-no-access-log", "shopverse-baseline", "nginx",
                    "nginx-access-log", "haproxy"], "1")
    ratios = {k: ratio(s1, *k.split("/")) for k in
              ("shopverse/nginx", "shopverse/nginx-access-log", "shopverse-no-access-log/nginx",
               "shopverse/haproxy", "shopverse/shopverse-no-access-log",
               "shopverse/shopverse-baseline", "nginx-access-log/nginx", "nginx/direct")}
    ratio_table([(k, v) for k, v in ratios.items()])
    opens = [r for r in records if r.get("scenario") == "1" and r.get("kind") == "open"]
    if opens:
        md += ["Open loop (latency from the due time, so corrected for coordinated omission), in ms:", "",
               "| offered req/s | target | round | achieved | p50 | p90 | p99 | p99.9 | max | failed+broken | unsent | steal % |",
               "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(opens, key=lambda r: (r["offered_rps"], r["target"], str(r.get("round", "")))):
            l = r["latency_us"]
            md.append(f"| {r['offered_rps']:,} | {r['target']} | {r.get('round', '')} | {r['achieved_rps']:,.0f} | {l['p50'] / 1e3:.2f} | "
                      f"{l['p90'] / 1e3:.2f} | {l['p99'] / 1e3:.2f} | {l['p999'] / 1e3:.2f} | {l['max'] / 1e3:.2f} | "
                      f"{r['failed'] + r['broken']} | {r['unsent']} | {r.get('steal_percent', '-')} |")
        md.append("")
        series = {}
        for r in opens:
            series.setdefault(f"{r['target']} p99", []).append((r["offered_rps"], r["latency_us"]["p99"] / 1e3))
            series.setdefault(f"{r['target']} p50", []).append((r["offered_rps"], r["latency_us"]["p50"] / 1e3))
        svg_plot(out + "-routing-latency.svg", "Scenario 1: latency against offered rate (open loop)",
                 dict(sorted(series.items())), "offered rate (req/s)", "latency (ms, log)")
        md += [f"Plot: `{os.path.basename(out)}-routing-latency.svg`.", ""]
        half = facts.get("nginx_peak_rps", 0) // 2
        at_half = {}
        for r in opens:
            if r["offered_rps"] == max(1, int(facts.get("nginx_peak_rps", 0) * 0.5)):
                at_half.setdefault(r["target"], []).append(r["latency_us"]["p99"])
        if "shopverse" in at_half and "nginx" in at_half:
            # Median over the interleaved rounds at this rate.
            a, b = statistics.median(at_half["shopverse"]), statistics.median(at_half["nginx"])
            per = lambda v: ", ".join(f"{x / 1e3:.2f}" for x in v)
            check("p99 at half of nginx's peak rate, no worse than nginx's",
                  f"{a / 1e3:.2f} ms vs {b / 1e3:.2f} ms (median of {len(at_half['shopverse'])} rounds: "
                  f"{per(at_half['shopverse'])} vs {per(at_half['nginx'])})",
                  "<= nginx", a <= b, f"offered {half:,} req/s")
    r = ratios["shopverse/nginx"]
    if r:
        check("gateway plain route throughput vs nginx", f"{r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f})",
              ">= 1.0x", r["median"] >= 1.0)
    result["scenarios"]["1-routing"] = {"peak": {t: summary(v) for t, v in s1.items()}, "ratios": ratios, "open_loop": opens}

# --- scenario 2 -------------------------------------------------------------------------------
s2 = peaks("2")
if s2:
    md += ["## 2. Full edge path: JWT verification, a rate limit that never trips, 100 and 1,000 routes", ""]
    peak_table(s2, ["shopverse-plain", "shopverse-edge-100", "shopverse-edge-1000", "shopverse-edge-1000-baseline"], "2")
    ratios = {"edge-100/plain": ratio(s2, "shopverse-edge-100", "shopverse-plain"),
              "edge-1000/plain": ratio(s2, "shopverse-edge-1000", "shopverse-plain")}
    if "shopverse-edge-1000-baseline" in s2:
        ratios["edge-1000/edge-1000-baseline"] = ratio(s2, "shopverse-edge-1000", "shopverse-edge-1000-baseline")
    ratio_table(list(ratios.items()))
    for k, v in ratios.items():
        if v and k.endswith("/plain"):
            check(f"full edge path ({k.split('/')[0]}) vs plain route", f"{v['median']:.2f}x", ">= 0.9x", v["median"] >= 0.9)
    result["scenarios"]["2-edge"] = {"peak": {t: summary(v) for t, v in s2.items()}, "ratios": ratios}

# --- scenario 3 -------------------------------------------------------------------------------
s3 = peaks("3")
if s3:
    md += ["## 3. The REST read path: JSON through the gateway against a reference server and direct gRPC", "",
           "Closed loop with shopverse-load, 64 connections with one call in flight each (gRPC 16x16: 16 "
           "connections with 16 streams each). The reference is `shopverse-reference`: hyper's HTTP/1 server, "
           "rusqlite on the products service's own file, the same JSON. `gateway-*` is the appliance's own "
           "gateway (one thread, the edge cache off, a rate limit that never trips), calling its services "
           "in-process; `gateway-remote-json` a gateway process of its own calling the products service over "
           "loopback gRPC. Everything under test shares the system core.", ""]
    peak_table(s3, ["reference", "gateway-json", "grpc-direct", "grpc-direct-16x16", "gateway-remote-json",
                    "reference-list", "gateway-list", "gateway-cart"], "3")
    pairs = [("gateway-json", "reference"), ("gateway-json", "grpc-direct"), ("gateway-json", "grpc-direct-16x16"),
             ("grpc-direct", "reference"), ("gateway-remote-json", "gateway-json"),
             ("gateway-list", "reference-list"), ("gateway-cart", "reference")]
    ratios = {f"{a}/{b}": ratio(s3, a, b) for a, b in pairs if a in s3 and b in s3}
    ratio_table(list(ratios.items()))
    for key, goal in (("gateway-json/reference", 0.5), ("gateway-json/grpc-direct", 1.0)):
        v = ratios.get(key)
        if v:
            check(f"uncached product GET through the gateway: {key}", f"{v['median']:.2f}x",
                  f">= {goal}x", v["median"] >= goal)
    result["scenarios"]["3-transcoded"] = {"peak": {t: summary(v) for t, v in s3.items()}, "ratios": ratios}

# --- scenario 4 -------------------------------------------------------------------------------
s4 = peaks("4")
if s4:
    md += ["## 4. Edge cache: hit against miss against nginx `proxy_cache` hit", "",
           "A miss is the same request with `cache-control: no-cache`: the service is called and the entry stored.", ""]
    peak_table(s4, ["gateway-cache-hit", "gateway-cache-miss", "nginx-proxy-cache-hit", "shopverse-plain"], "4")
    ratios = {"hit/miss": ratio(s4, "gateway-cache-hit", "gateway-cache-miss"),
              "hit/nginx-hit": ratio(s4, "gateway-cache-hit", "nginx-proxy-cache-hit"),
              "hit/plain-route": ratio(s4, "gateway-cache-hit", "shopverse-plain")}
    ratio_table(list(ratios.items()))
    v = ratios["hit/plain-route"]
    if v:
        check("cache hit vs plain route", f"{v['median']:.2f}x", ">= 2x", v["median"] >= 2.0)
    result["scenarios"]["4-cache"] = {"peak": {t: summary(v) for t, v in s4.items()}, "ratios": ratios}

# --- scenario 5 -------------------------------------------------------------------------------
ALL_OK = "ok=100"
checkouts = [r for r in records if r.get("kind") == "checkout"]
co = [r for r in checkouts if r.get("payment_mix", ALL_OK) == ALL_OK]
mixed = [r for r in checkouts if r.get("payment_mix", ALL_OK) != ALL_OK]
recs = [r for r in records if r.get("kind") == "reconcile"]
rec = [r for r in recs if r.get("payment_mix", ALL_OK) == ALL_OK]
CORES = {"1": "the appliance pinned to the system core, goose on the other",
         "2": "the appliance on both cores, sharing them with goose"}
if co:
    md += ["## 5. Checkout mix through the appliance (goose: browse 70%, cart 20%, checkout 10%)", ""]
for c in co:
    cores = str(c.get("cores", "1"))
    md += [f"### {cores} core{'s' if cores != '1' else ''}: {CORES.get(cores, '')}", "",
           "| | value |", "|---|---:|"]
    for k in ("users", "sign_up_seconds", "seconds", "requests", "requests_per_second", "errors", "error_rate", "orders",
              "orders_per_second", "checkout_p50_ms", "checkout_p99_ms"):
        if k in c:
            v = c[k]
            md.append(f"| {k} | {v:,.3f} |" if isinstance(v, float) else f"| {k} | {v:,} |")
    md += ["", "| request | ok | failed | p50 ms | p99 ms | statuses |", "|---|---:|---:|---:|---:|---|"]
    for name, m in sorted(c.get("by_request", {}).items()):
        md.append(f"| {name} | {m['ok']:,} | {m['failed']:,} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['statuses']} |")
    md.append("")
    plural = 's' if cores != '1' else ''
    check(f"appliance checkout orders/s with zero errors ({cores} core{plural})",
          f"{c.get('orders_per_second', 0):,.1f}/s, {c.get('errors', 0)} errors",
          ">= 500/s, 0 errors", c.get("orders_per_second", 0) >= 500 and c.get("errors", 1) == 0)
    result["scenarios"].setdefault("5-checkout", {})[f"load-{cores}-cores"] = c
    for r in [r for r in rec if str(r.get("cores", "1")) == cores][-1:]:
        md += [f"Reconciliation after the run: **{'holds' if r.get('ok') else 'FAILED'}** ({r.get('summary', '')}).", ""]
        if "settle_seconds" in r and c.get("seconds"):
            # Orders taken over the time until the saga had finished them all: the rate the
            # appliance sustains, where the figure above lets the saga fall behind.
            sustained = c.get("orders", 0) / (c["seconds"] + r["settle_seconds"])
            c["orders_per_second_through_settlement"] = sustained
            md += [f"Orders per second through settlement (the run plus the {r['settle_seconds']:.1f} s the saga took "
                   f"to finish what the run left): **{sustained:,.1f}/s**.", ""]
            check(f"appliance checkout orders/s through settlement ({cores} core{plural})",
                  f"{sustained:,.1f}/s", ">= 500/s", sustained >= 500 and c.get("errors", 1) == 0)
        check(f"reconciliation after the checkout run ({cores} core{plural})",
              "holds" if r.get("ok") else "failed", "holds", bool(r.get("ok")))
        result["scenarios"]["5-checkout"][f"reconciliation-{cores}-cores"] = r

# Payment mixes: the same load with charges failing transiently, against the all-succeeding
# run on the same cores. Targets: >= 0.9x with 5% flaky, >= 0.7x with 20%, settled within 5 s.
ok2 = result["scenarios"].get("5-checkout", {}).get("load-2-cores", {}).get("orders_per_second_through_settlement")
if mixed:
    md += ["### Payment mixes (both cores): providers that fail", "",
           "| payment mix | orders | orders/s | settled after the load (s) | through settlement | vs all succeeding | reconciliation |",
           "|---|---:|---:|---:|---:|---:|---|"]
for c in mixed:
    mix = c["payment_mix"]
    r = next((r for r in reversed(recs) if r.get("payment_mix") == mix), {})
    settle = r.get("settle_seconds")
    sustained = c.get("orders", 0) / (c["seconds"] + settle) if settle is not None and c.get("seconds") else None
    vs = sustained / ok2 if sustained and ok2 else None
    md.append(f"| {mix} | {c.get('orders', 0):,} | {c.get('orders_per_second', 0):,.1f} | "
              f"{settle if settle is None else f'{settle:.1f}'} | "
              f"{'-' if sustained is None else f'{sustained:,.1f}'} | {'-' if vs is None else f'{vs:.2f}x'} | "
              f"{'holds' if r.get('ok') else 'FAILED'} |")
    flaky = int(dict(p.split("=") for p in mix.split(",")).get("flaky", 0))
    goal = 0.9 if flaky <= 5 else 0.7
    check(f"checkout through settlement with {flaky}% flaky charges vs all succeeding",
          "-" if vs is None else f"{vs:.2f}x", f">= {goal}x", vs is not None and vs >= goal)
    check(f"saga settled after the load ({mix})", "-" if settle is None else f"{settle:.1f} s", "<= 5 s",
          settle is not None and settle <= 5)
    check(f"reconciliation after the checkout run ({mix})", "holds" if r.get("ok") else "failed", "holds",
          bool(r.get("ok")))
    c["orders_per_second_through_settlement"] = sustained
    result["scenarios"].setdefault("5-checkout", {})[f"mix-{mix}"] = {"load": c, "reconciliation": r}
if mixed:
    md.append("")

# --- scenario 6 -------------------------------------------------------------------------------
micro = [r for r in records if r.get("kind") == "micro"]
if micro:
    md += ["## 6. Micro-benchmarks (criterion, median with its 95% interval)", "", "| benchmark | median | interval |", "|---|---:|---:|"]

    def t(ns):
        return f"{ns / 1e3:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"

    for r in sorted(micro, key=lambda r: r["target"]):
        md.append(f"| {r['target']} | {t(r['median_ns'])} | {t(r['low_ns'])} – {t(r['high_ns'])} |")
    md.append("")
    result["scenarios"]["6-micro"] = micro

# --- memory and targets -----------------------------------------------------------------------
rss = [v for k, v in facts.items() if k.startswith("gateway_rss") or k.startswith("edge_gateway_rss")]
if rss:
    check("gateway RSS under load", f"{max(rss)} MB", "<= 64 MB", max(rss) <= 64)
md += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
for c in checks:
    md.append(f"| {c['target']} | {c['measured']} | {c['goal']} | {'yes' if c['met'] else '**no**'} |")
md += ["", "Facts: " + ", ".join(f"{k} = {v}" for k, v in facts.items()), ""]

# The runs measured again because the host took the system core, kept as measured.
result["measured_again"] = [r for r in records if str(r.get("kind", "")).endswith("-stolen")]
with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
with open(out + ".md", "w") as f:
    f.write("\n".join(md) + "\n")
print("\n".join(md))
