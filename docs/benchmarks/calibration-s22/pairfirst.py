"""Offline: the c2 pair's first TTFT (the lower of the 768+384 pair) over the c1 768-token TTFT,
real against the emulator, per run with samples (cells as in p50split.py)."""
import sys
import json
from p50split import labels
import statistics as st

def cells(runs):
    per = {}
    for r in runs:
        rm = {}
        for x, l in zip(r["ttft"], labels(r["ttft"], r["ttft_level"])):
            rm.setdefault(l, []).append(x)
        for l, xs in rm.items():
            per.setdefault(l, []).append(st.median(xs))
    return {l: st.median(v) for l, v in per.items()}

for a in sys.argv[1:]:
    path, _, tag = a.partition("=")
    s = json.load(open(path))
    out = []
    for name in ("real", "calibrated"):
        c = cells(s[name])
        out.append(f"{name} c1 768 {c['c1 768']:5.1f} pair-first {c['c2 big0']:5.1f} "
                   f"(+{c['c2 big0'] - c['c1 768']:4.1f})")
    print(f"{tag:<18}" + " | ".join(out))
