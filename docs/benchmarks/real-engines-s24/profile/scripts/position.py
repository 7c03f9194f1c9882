"""prof24: client TTFT against a request's position in its burst (the client's send order,
per_request index order within an arrival instant), per router; and the fastest-of-burst
difference by burst size.

    python position.py RESULTS.json [RESULTS.json ...] -- SETUP_A SETUP_B
"""
import collections
import json
import statistics as st
import sys

i = sys.argv.index("--")
files, (A, B) = sys.argv[1:i], sys.argv[i + 1:i + 3]
slopes = collections.defaultdict(list)
pos_ttft = collections.defaultdict(lambda: collections.defaultdict(list))
fast_by_n = collections.defaultdict(list)
for f in files:
    d = json.load(open(f))
    reps = collections.defaultdict(dict)
    for r in d["results"]:
        if r["name"] in (A, B) and r.get("per_request"):
            bursts = collections.defaultdict(list)
            for row in r["per_request"]:
                bursts[round(row[1], 2)].append(row)
            reps[r.get("rep", 0)][r["name"]] = bursts
            for rows in bursts.values():
                rows.sort(key=lambda x: x[0])
                ok = [(k, row[4], row[3]) for k, row in enumerate(rows) if row[6] and row[4] is not None]
                if len(ok) < 3:
                    continue
                # TTFT minus the burst's median, against position; blocks as a covariate is left out
                med = st.median(t for _, t, _ in ok)
                for k, t, b in ok:
                    pos_ttft[r["name"]][min(k, 12)].append(t - med)
                xs = [k for k, _, _ in ok]
                ys = [t for _, t, _ in ok]
                mx, my = st.mean(xs), st.mean(ys)
                sxx = sum((x - mx) ** 2 for x in xs)
                slopes[r["name"]].append(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx)
    for rep, by in reps.items():
        if A in by and B in by:
            for a in set(by[A]) & set(by[B]):
                ta = [row[4] for row in by[A][a] if row[6] and row[4] is not None]
                tb = [row[4] for row in by[B][a] if row[6] and row[4] is not None]
                if ta and tb:
                    fast_by_n[len(by[A][a])].append(min(tb) - min(ta))
for name, s in slopes.items():
    print(f"{name}: TTFT slope against position in burst, median over bursts {st.median(s):+.2f} ms "
          f"per position (mean {st.mean(s):+.2f}, {len(s)} bursts)")
    print("   TTFT minus burst median by position: " + ", ".join(
        f"{k}:{st.median(v):+.0f}" for k, v in sorted(pos_ttft[name].items())))
print(f"fastest of burst, {B} - {A}, paired median by burst size:")
groups = [(3, 5), (6, 8), (9, 11), (12, 20)]
for lo, hi in groups:
    v = [x for n, xs in fast_by_n.items() if lo <= n <= hi for x in xs]
    if v:
        print(f"   n {lo}-{hi}: {st.median(v):+.1f} ms (mean {st.mean(v):+.1f}, {len(v)} burst pairs)")
