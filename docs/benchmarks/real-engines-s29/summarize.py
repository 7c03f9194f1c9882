"""Per-rep table, medians, pooled percentiles and paired differences of a real_engines.py run
(its results.json), with what the engines were asked (their access logs): session 29's
adaptation of real-engines-s28/summarize.py.

    python summarize.py results.json > summary.md
"""
import json
import statistics as st
import sys
from pathlib import Path

d = json.loads(Path(sys.argv[1]).read_text())
rs = [r for r in d["results"] if r.get("status") == "ok"]
names: list[str] = []
for r in rs:
    if r["name"] not in names:
        names.append(r["name"])
by = {(r["name"], r["rep"]): r for r in rs}
reps = sorted({r["rep"] for r in rs})


def g(r, k):
    return r["summary"]["ttft_ms"][k]


def asked(r, pfx):
    er = r.get("engine_requests") or {}
    return sum(v for k, v in er.items() if k.startswith(pfx))


KINDS = [("completions", "POST /v1/completions"), ("filtered /metrics", "GET /metrics/?filtered"),
         ("/health", "GET /health"), ("whole /metrics", "GET /metrics ")]
print("| rep | setup | TTFT p50 | p90 | p99 | engines' own TTFT mean | API servers' CPU s | "
      "router CPU s | scrapes / probes (router's count) | hit rate | engines asked (access "
      "logs, summed): " + ", ".join(k for k, _ in KINDS) + " |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for rep in reps:
    for n in names:
        r = by.get((n, rep))
        if not r:
            continue
        a = r.get("router_asks") or {}
        asks = "–" if not a else f"{a['scrapes']:.0f} / {a['probes']:.0f}"
        cpu = "–" if r.get("cpu_s") is None else f"{r['cpu_s']:.2f}"
        print(f"| {rep} | {n} | {g(r, 'p50'):.0f} | {g(r, 'p90'):.0f} | {g(r, 'p99'):.0f} | "
              f"{r['engine_ms']['ttft']} | {r['api_cpu_s']} | {cpu} | {asks} | "
              f"{r['hit_rate']:.3f} | " + ", ".join(f"{asked(r, p)}" for _, p in KINDS) + " |")
print()
print("| setup | reps | TTFT p50 median (min-max) | p90 median (min-max) | p99 median | pooled "
      "p50 / p90 / mean | engines' own TTFT median | API servers' CPU median | router CPU "
      "median | engines asked per replay (median): " + ", ".join(k for k, _ in KINDS) + " | "
      "replay s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
med = {}


def pooled(xs):
    """Every answered request's TTFT of the replays together (per_request rows: TTFT ms at 4,
    answered at 6), percentiles interpolated as real_engines.py's pooled_ttft."""
    vals = sorted(row[4] for r in xs for row in (r.get("per_request") or [])
                  if row[4] is not None and row[6])
    if not vals:
        return "–"

    def at(q):
        k = (len(vals) - 1) * q
        lo = int(k)
        hi = min(lo + 1, len(vals) - 1)
        return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)

    return f"{at(0.5):.0f} / {at(0.9):.0f} / {st.mean(vals):.0f}"


for n in names:
    xs = [by[(n, rep)] for rep in reps if (n, rep) in by]
    p50 = [g(r, "p50") for r in xs]
    p90 = [g(r, "p90") for r in xs]
    p99 = [g(r, "p99") for r in xs]
    med[n] = (st.median(p50), st.median(p90))
    cpus = [r["cpu_s"] for r in xs if r.get("cpu_s") is not None]
    print(f"| {n} | {len(xs)} | {st.median(p50):.0f} ({min(p50):.0f}-{max(p50):.0f}) | "
          f"{st.median(p90):.0f} ({min(p90):.0f}-{max(p90):.0f}) | {st.median(p99):.0f} | "
          f"{pooled(xs)} | {st.median(r['engine_ms']['ttft'] for r in xs):.1f} | "
          f"{st.median(r['api_cpu_s'] for r in xs):.2f} | "
          f"{st.median(cpus) if cpus else float('nan'):.2f} | "
          + ", ".join(f"{st.median(asked(r, p) for r in xs):g}" for _, p in KINDS)
          + f" | {st.median(r['summary']['wall_s'] for r in xs):.1f} |")
print()


def paired(a, b, f):
    return [f(by[(a, rep)]) - f(by[(b, rep)]) for rep in reps if (a, rep) in by and (b, rep) in by]


for i, a in enumerate(names):
    for b in names[i + 1:]:
        for k in ("p50", "p90"):
            ds = paired(a, b, lambda r, k=k: g(r, k))
            if ds:
                print(f"- {a} − {b} {k}: per rep {', '.join(f'{x:+.1f}' for x in ds)}; median "
                      f"{st.median(ds):+.1f}, mean {st.mean(ds):+.1f}, {a} lower in "
                      f"{sum(x < 0 for x in ds)}/{len(ds)}")
        for label, f, fmt in (("engines' own TTFT ms", lambda r: r["engine_ms"]["ttft"], "+.1f"),
                              ("API servers' CPU s", lambda r: r["api_cpu_s"], "+.2f")):
            ds = paired(a, b, f)
            if ds:
                print(f"- {a} − {b} {label}: {', '.join(format(x, fmt) for x in ds)}; median "
                      f"{format(st.median(ds), fmt)}")
print()
for n in names:
    peers = [m for m in names if m != n and not m.startswith("inferplane")]
    if n.startswith("inferplane") and peers:
        print(f"- {n}: median P90 / best peer's = " + ", ".join(
            f"{med[n][1] / med[m][1]:.3f}× {m}" for m in peers) + "; median P50 / peer's = "
            + ", ".join(f"{med[n][0] / med[m][0]:.3f}× {m}" for m in peers))
