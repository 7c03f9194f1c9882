"""Which requests carry the fidelity workload's TTFT P50 (each round's median of 36 requests:
12 at each of concurrency 1, 2, 4), real against the emulator, from a run's samples file.
Labels: c1 by prompt size (the closed loop sends 768, 384, 128, 32, ... one after the other);
c2 by pair (768+384 sent together, then 128+32; 'big'/'small' pair) and the rank of the TTFT
within the pair; c4 by the rank of the TTFT within its burst of 4 (all four sizes together).
Per label: median over rounds of that round's median (ms). Then: the labels at ranks 18 and 19
of each round (the two the P50 averages), counted over rounds."""
import json, statistics as st, sys
from collections import Counter

def labels(ttft, level):
    out = []
    by = {1: [], 2: [], 4: []}
    for i, (x, lv) in enumerate(zip(ttft, level)):
        by[lv].append((i, x))
    lab = {}
    for j, (i, x) in enumerate(by[1]):
        lab[i] = f"c1 {[768, 384, 128, 32][j % 4]}"
    for blk in range(0, len(by[2]), 2):
        pair = by[2][blk:blk + 2]
        kind = "big" if (blk // 2) % 2 == 0 else "small"
        for r, (i, x) in enumerate(sorted(pair, key=lambda t: t[1])):
            lab[i] = f"c2 {kind}{r}"
    for blk in range(0, len(by[4]), 4):
        for r, (i, x) in enumerate(sorted(by[4][blk:blk + 4], key=lambda t: t[1])):
            lab[i] = f"c4 r{r}"
    return [lab[i] for i in range(len(ttft))]

ORDER = ["c1 32", "c1 128", "c1 384", "c1 768", "c2 small0", "c2 small1", "c2 big0", "c2 big1",
         "c4 r0", "c4 r1", "c4 r2", "c4 r3"]

def main(path, tag):
    s = json.load(open(path))
    res = {}
    for name, runs in s.items():
        per = {}
        at = Counter()
        p50 = []
        for r in runs:
            lb = labels(r["ttft"], r["ttft_level"])
            rm = {}
            for x, l in zip(r["ttft"], lb):
                rm.setdefault(l, []).append(x)
            for l, xs in rm.items():
                per.setdefault(l, []).append(st.median(xs))
            order = sorted(zip(r["ttft"], lb))
            n = len(order)
            mid = order[n // 2 - 1:n // 2 + 1] if n % 2 == 0 else [order[n // 2]]
            for _, l in mid:
                at[l] += 1
            p50.append(st.median(r["ttft"]))
        res[name] = ({l: st.median(v) for l, v in per.items()}, at, st.median(p50), len(runs))
    names = list(res)
    print(f"== {tag}: rounds " + ", ".join(f"{n} {res[n][3]}" for n in names))
    print("label      " + "".join(f"{n[:10]:>11}" for n in names) + "   gap   | at P50 (rank 18/19) " + " / ".join(names))
    for l in ORDER:
        if l not in res[names[0]][0]:
            continue
        vals = [res[n][0].get(l) for n in names]
        gap = (vals[1] - vals[0]) / vals[0] if len(vals) > 1 and vals[1] else float("nan")
        print(f"{l:<11}" + "".join(f"{v:>11.1f}" for v in vals) + f" {gap:+6.1%}  | "
              + " / ".join(str(res[n][1].get(l, 0)) for n in names))
    p = [res[n][2] for n in names]
    print("P50 (median of round P50s) " + "  ".join(f"{n} {v:.1f}" for n, v in zip(names, p))
          + (f"  gap {(p[1] - p[0]) / p[0]:+.1%}" if len(p) > 1 else ""))

if __name__ == "__main__":
    for a in sys.argv[1:]:
        path, _, tag = a.partition("=")
        main(path, tag or path)
