"""Pool session 25's three real-engine runs: per router, the repetitions' P50/P90 TTFT and their
median, and every answered request of every repetition pooled (per_request column 4 = TTFT ms).
Run from this directory: python summary.py"""
import json
import statistics as st


def q(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


reps, pool = {}, {}
for run in ("run1", "run2", "run3"):
    for x in json.load(open(f"{run}/results.json"))["results"]:
        if x["rep"] < 0:
            continue
        n = x["name"]
        reps.setdefault(n, []).append((run, x["rep"], x["summary"]["ttft_ms"]["p50"],
                                       x["summary"]["ttft_ms"]["p90"]))
        pool.setdefault(n, []).extend(r[4] for r in x["per_request"] if r[6] and r[4] is not None)
for n, v in reps.items():
    print(f"{n}: " + ", ".join(f"{r}/{i}: {a:.0f}/{b:.0f}" for r, i, a, b in v))
    t = pool[n]
    print(f"  {len(v)} reps, median P50 {st.median(a for *_, a, b in v):.1f}, median P90 "
          f"{st.median(b for *_, b in v):.1f}; pooled {len(t)} requests P50 {q(t, .5):.1f} "
          f"P90 {q(t, .9):.1f}")
