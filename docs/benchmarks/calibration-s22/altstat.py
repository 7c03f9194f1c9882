"""The emulator's TTFT gap under the current statistic (median over rounds of each round's P50 of
36) and two candidates built on the 12 workload cells (c1 by size, c2 by pair and rank, c4 by
rank: see p50split.py), each cell's value the median over rounds of the round's median:
  cells-median: the median over the 12 cells of the cell's gap (emulator / real - 1);
  cells-geomean: the geometric mean over the 12 cells of emulator / real, minus 1.
Plus: the gap at the two cells the P50 sits on (c1 768, c2 big0), and the probe's lone 768
against the real rounds' c1 768 (host speed state of the probe against the workload's)."""
import json, math, re, statistics as st, sys
from p50split import labels

def cells(runs):
    per = {}
    for r in runs:
        rm = {}
        for x, l in zip(r["ttft"], labels(r["ttft"], r["ttft_level"])):
            rm.setdefault(l, []).append(x)
        for l, xs in rm.items():
            per.setdefault(l, []).append(st.median(xs))
    return {l: st.median(v) for l, v in per.items()}

print(f"{'run':<14}{'P50 gap':>9}{'cells-med':>10}{'cells-geo':>10}{'c1 768':>8}{'c2 big0':>8}"
      f"{'probe768/real c1 768':>22}")
for a in sys.argv[1:]:
    sp, rp, tag = a.split(",")
    s = json.load(open(sp))
    real, emu = cells(s["real"]), cells(s["calibrated"])
    g = {l: emu[l] / real[l] - 1 for l in real}
    p50 = (st.median(st.median(x["ttft"]) for x in s["calibrated"])
           / st.median(st.median(x["ttft"]) for x in s["real"]) - 1)
    geo = math.exp(st.fmean(math.log(1 + v) for v in g.values())) - 1
    probe = ""
    if rp != "-":
        r = json.load(open(rp))
        p = next((float(m.group(1)) for l in r["calibration_fit_points"]
                  if (m := re.match(r"prefill 768 tok\s+([\d.]+)", l))), None)
        probe = f"{p / real['c1 768'] - 1:+.1%}" if p else ""
    print(f"{tag:<14}{p50:>+9.1%}{st.median(g.values()):>+10.1%}{geo:>+10.1%}"
          f"{g['c1 768']:>+8.1%}{g['c2 big0']:>+8.1%}{probe:>22}")
