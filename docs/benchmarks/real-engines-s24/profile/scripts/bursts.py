"""prof24: per-burst fastest / mean / slowest TTFT, paired between setups of one results.json.

    python bursts.py RESULTS.json BASE_SETUP OTHER_SETUP [...]
"""
import json
import statistics as st
import sys
from collections import defaultdict

d = json.load(open(sys.argv[1]))
by = {}
for r in d["results"]:
    if not r.get("per_request"):
        continue
    b = defaultdict(list)
    for row in r["per_request"]:
        if row[6] and row[4] is not None:
            b[round(row[1], 3)].append(row[4])
    by[r["name"]] = b
    s = r["summary"]["ttft_ms"]
    print(f"{r['name']:40s} n={r['summary']['ok']} P50 {s['p50']:.1f} P90 {s['p90']:.1f} cpu {r.get('cpu_s')} "
          f"wait {r.get('wait_s')} api_cpu {r.get('api_cpu_s')} engine_ms {r.get('engine_ms')} asks {r.get('router_asks')}")
base = by[sys.argv[2]]
for other in sys.argv[3:]:
    o = by[other]
    keys = sorted(set(base) & set(o))
    for label, f in (("fastest", min), ("mean", st.mean), ("slowest", max)):
        diffs = [f(o[k]) - f(base[k]) for k in keys]
        print(f"{other} - {sys.argv[2]}: {label:8s} paired median {st.median(diffs):+.1f} ms, mean "
              f"{st.mean(diffs):+.1f}, other slower in {100 * sum(x > 0 for x in diffs) / len(diffs):.0f} % of {len(diffs)} bursts")
    for k in range(4):
        a = [sorted(base[x])[k] for x in keys if len(base[x]) > k]
        b = [sorted(o[x])[k] for x in keys if len(o[x]) > k]
        print(f"   k={k} fastest medians {st.median(a):.1f} vs {st.median(b):.1f}")
