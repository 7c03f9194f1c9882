"""Analysis of tokens.py's output (session 19): where a stream's time per output token goes.

    python docs/benchmarks/calibration-s19/tokana.py OUT.json
"""
import json, statistics as st, sys


def pct(xs, q):
    return st.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


d = json.load(open(sys.argv[1]))
recs, probes = d["recs"], d["probes"]
print("other CPU", d.get("other_cpu"), "cores", d.get("cores"))
for r in recs + probes:
    ch = r["chunks"]
    r["first"] = r["sent"] + ch[0][0]
    r["last"] = r["sent"] + ch[-1][0]
    n = r["completion_tokens"] - 1
    r["tpot"] = (ch[-1][0] - ch[0][0]) / n * 1e3
    r["gaps"] = [(b[0] - a[0]) * 1e3 for a, b in zip(ch, ch[1:])]
    r["multi"] = sum(1 for c in ch if c[1] > 1)
rounds = sorted({r["round"] for r in recs})
# 1. per level: TPOT spread within a round, and what the slow streams' extra time is made of
print("\n1. per level (workload): stream TPOT / its round's level median; slow = > 1.15x")
for c in (1, 2, 4):
    xs = [r for r in recs if r["c"] == c]
    for r in xs:
        med = st.median(o["tpot"] for o in xs if o["round"] == r["round"])
        r["ratio"] = r["tpot"] / med
        r["lvl_med"] = med
    rat = [r["ratio"] for r in xs]
    slow = [r for r in xs if r["ratio"] > 1.15]
    print(f" c{c}: n {len(xs)} ratio p50 {pct(rat,50):.3f} p90 {pct(rat,90):.3f} max {max(rat):.2f}; "
          f"slow {len(slow)} ({len(slow)/len(xs):.0%}); multi-token chunks in {sum(r['multi']>0 for r in xs)} streams")
    # the extra time of each slow stream: in its largest gap, or spread?
    for r in sorted(slow, key=lambda r: -r["ratio"])[:8]:
        g = r["gaps"]; gm = st.median(g)
        extra = sum(g) - gm * len(g)
        big = sorted(g, reverse=True)
        print(f"    round {r['round']:2d} tokens {r['tokens']:3d} tpot {r['tpot']:.2f} (x{r['ratio']:.2f}) "
              f"gap median {gm:.2f} extra {extra:.1f} ms; top gaps {[round(x,1) for x in big[:4]]}; "
              f"gaps > 1.5x med: {sum(x > 1.5*gm for x in g)}")
# 2. step gaps at c1 (lone streams): the distribution of a gap over its stream's median
print("\n2. c1 gaps over their stream's median gap (pooled)")
allg = []
for r in recs:
    if r["c"] != 1:
        continue
    gm = st.median(r["gaps"])
    allg += [x / gm for x in r["gaps"]]
for q in (50, 75, 90, 95, 98, 99):
    print(f"   p{q} {pct(allg,q):.3f}", end="")
print(f"\n   frac > 1.25: {sum(x>1.25 for x in allg)/len(allg):.3f}  > 1.5: {sum(x>1.5 for x in allg)/len(allg):.3f}  > 2: {sum(x>2 for x in allg)/len(allg):.3f}  > 4: {sum(x>4 for x in allg)/len(allg):.4f}")
ex = [x - 1 for x in allg if x > 1.5]
print(f"   slow gaps' (> 1.5x) mean excess {st.mean(ex) if ex else 0:.2f}x; share of all c1 time in them: {sum(ex)/len(allg):.3f}")
# 3. c4 / c2: overlap with other requests' prefills
print("\n3. c2/c4 streams by the prompt tokens of other requests whose first token came inside their decode")
for c in (2, 4):
    xs = [r for r in recs if r["c"] == c]
    for r in xs:
        r["ov"] = sum(o["tokens"] for o in xs if o is not r and o["round"] == r["round"] and r["first"] < o["first"] < r["last"])
    groups = {}
    for r in xs:
        groups.setdefault(r["ov"], []).append(r)
    for k in sorted(groups):
        v = groups[k]
        print(f"   c{c} overlapped {k:4d} prefill tokens: n {len(v):3d} tpot median {st.median(x['tpot'] for x in v):.2f} "
              f"ratio to level median p50 {pct([x['ratio'] for x in v],50):.3f} p90 {pct([x['ratio'] for x in v],90):.3f}")
# 4. per round: P50, P90 and who is at or above the P90
print("\n4. per round: P50 / P90 of the 36 streams, the streams at or above P90 (level, tokens, ratio to level median)")
for rd in rounds:
    xs = [r for r in recs if r["round"] == rd]
    t = [r["tpot"] for r in xs]
    p90 = pct(t, 90)
    top = sorted([r for r in xs if r["tpot"] >= p90], key=lambda r: -r["tpot"])
    lv = {c: round(st.median(r["tpot"] for r in xs if r["c"] == c), 2) for c in (1, 2, 4)}
    print(f"   {rd:2d}: P50 {pct(t,50):.2f} P90 {p90:.2f} level medians {lv} top {[(r['c'], r['tokens'], round(r['ratio'],2)) for r in top]}")
# 5. probes: the decode probe's streams (64 tokens), their TPOT over their batch point's median
print("\n5. decode probe streams (64 tokens) over their batch's median (all rounds)")
for b in (1, 2, 4):
    xs = [r for r in probes if r["batch"] == b]
    med = st.median(r["tpot"] for r in xs)
    rat = [r["tpot"] / med for r in xs]
    print(f"   batch {b}: n {len(xs)} median {med:.2f} ms ratio p10 {pct(rat,10):.3f} p50 {pct(rat,50):.3f} p90 {pct(rat,90):.3f} max {max(rat):.2f}; frac > 1.15 {sum(x>1.15 for x in rat)/len(rat):.2f}")
