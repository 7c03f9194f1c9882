"""Session 20: the shape of the per-token tail, per stored fidelity run (the test's
calibration-samples.json and report.json side by side): every stream's time per output token
over its concurrency level's median in its round, pooled over the rounds, real engine against
emulator — P90 / P95 / P98 and the share of streams over 1.25x / 1.5x / 2x — and the fitted
speed spread (count, P10 / P90, mean, max, window).

    python docs/benchmarks/calibration-s20/shape.py RUN-samples.json ...
"""
import json
import statistics as st
import sys
from pathlib import Path

import yaml


def pct(xs, q):
    return st.quantiles(xs, n=100, method="inclusive")[q - 1]


def ratios(rounds):
    out = []
    for r in rounds:
        med = {c: st.median([t for t, lv in zip(r["tpot"], r["tpot_level"]) if lv == c])
               for c in (1, 2, 4)}
        out += [t / med[lv] for t, lv in zip(r["tpot"], r["tpot_level"])]
    return out


def shape(xs):
    return (f"{pct(xs, 90):.2f} / {pct(xs, 95):.2f} / {pct(xs, 98):.2f} | "
            + " / ".join(f"{sum(x > k for x in xs) / len(xs):.0%}" for k in (1.25, 1.5, 2)))


print("| run | real P90 / P95 / P98 | real > 1.25 / 1.5 / 2x | emulator P90 / P95 / P98 | "
      "emulator > 1.25 / 1.5 / 2x | spread: n, P10 / P90, mean, max, window |")
print("|---|---|---|---|---|---|")
for f in sys.argv[1:]:
    s = json.loads(Path(f).read_text())
    emu = next(v for k, v in s.items() if k != "real")
    report = Path(f.replace("-samples.json", "-report.json"))
    spread = "—"
    if report.exists():
        hw = yaml.safe_load(json.loads(report.read_text())["calibration_profile"])["hardware"]
        sp = hw.get("speed_spread")
        if sp:
            spread = (f"{len(sp)}, {pct(sp, 10):.3f} / {pct(sp, 90):.3f}, "
                      f"{st.fmean(sp):.3f}, {max(sp):.2f}, "
                      f"{hw['speed_spread_window_s'] * 1e3:.0f} ms")
    print(f"| {Path(f).name[:-13]} | {shape(ratios(s['real']))} | {shape(ratios(emu))} | "
          f"{spread} |")
