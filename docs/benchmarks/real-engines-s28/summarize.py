"""Per-rep table, medians and paired differences of p90-28's run (results.json)."""
import json, statistics as st, sys
d = json.load(open(sys.argv[1]))
rs = [r for r in d["results"] if r.get("status") == "ok"]
names = []
for r in rs:
    if r["name"] not in names:
        names.append(r["name"])
by = {(r["name"], r["rep"]): r for r in rs}
reps = sorted({r["rep"] for r in rs})
def g(r, k):
    s = r["summary"]["ttft_ms"]
    return s[k]
print("| rep | setup | TTFT p50 | p90 | p99 | engines' own TTFT mean | API servers' CPU s | router CPU s | scrapes / probes (held) | hit rate | engines asked /s: completions, filtered /metrics, /health, whole /metrics |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for rep in reps:
    for n in names:
        r = by.get((n, rep))
        if not r:
            continue
        a = r.get("router_asks") or {}
        er = r.get("engine_requests") or {}
        w = r["summary"]["wall_s"]
        def c(pfx):
            return sum(v for k, v in er.items() if k.startswith(pfx))
        asks = "–" if not a else f"{a['scrapes']:.0f} / {a['probes']:.0f}" + (f" ({a['deferred']:.0f}, {a['deferred_s']:.1f} s)" if "deferred" in a else "")
        print(f"| {rep} | {n} | {g(r,'p50'):.0f} | {g(r,'p90'):.0f} | {g(r,'p99'):.0f} | {r['engine_ms']['ttft']} | {r['api_cpu_s']} | {r['cpu_s']:.2f} | {asks} | {r['hit_rate']:.3f} | "
              f"{c('POST /v1/completions')/w:.2f}, {c('GET /metrics/?filtered')/w:.2f}, {c('GET /health')/w:.2f}, {c('GET /metrics ')/w:.2f} |")
print()
print("| setup | reps | TTFT p50 median (min-max) | p90 median (min-max) | p99 median | engines' own TTFT median | API servers' CPU median | router CPU median |")
print("|---|---|---|---|---|---|---|---|")
med = {}
for n in names:
    xs = [by[(n, rep)] for rep in reps if (n, rep) in by]
    p50 = [g(r, "p50") for r in xs]; p90 = [g(r, "p90") for r in xs]; p99 = [g(r, "p99") for r in xs]
    med[n] = (st.median(p50), st.median(p90))
    print(f"| {n} | {len(xs)} | {st.median(p50):.0f} ({min(p50):.0f}-{max(p50):.0f}) | {st.median(p90):.0f} ({min(p90):.0f}-{max(p90):.0f}) | {st.median(p99):.0f} | "
          f"{st.median(r['engine_ms']['ttft'] for r in xs):.1f} | {st.median(r['api_cpu_s'] for r in xs):.2f} | {st.median(r['cpu_s'] for r in xs):.2f} |")
print()
def pair(a, b, k):
    ds = [g(by[(a, rep)], k) - g(by[(b, rep)], k) for rep in reps if (a, rep) in by and (b, rep) in by]
    return ds
for a, b in [(names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i < j]:
    for k in ("p50", "p90"):
        ds = pair(a, b, k)
        if ds:
            print(f"{a} − {b} {k}: per rep {', '.join(f'{x:+.1f}' for x in ds)}; median {st.median(ds):+.1f}, mean {st.mean(ds):+.1f}, {sum(x < 0 for x in ds)}/{len(ds)} lower")
    da = [by[(a, rep)]['api_cpu_s'] - by[(b, rep)]['api_cpu_s'] for rep in reps if (a, rep) in by and (b, rep) in by]
    print(f"{a} − {b} API servers' CPU s: {', '.join(f'{x:+.2f}' for x in da)}; median {st.median(da):+.2f}")
for n in names:
    print(f"{n}: median P90 / best peer's = " + ", ".join(f"{med[n][1] / med[m][1]:.3f}× {m}" for m in names if m != n and not m.startswith("inferplane")))
