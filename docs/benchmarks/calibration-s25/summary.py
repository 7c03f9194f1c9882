"""One row per run of this directory (offline, JSON only): start, tree, the fidelity gaps as the
test reports them, per-level TTFT P50 (emulator / real ms and the gap) at concurrency 1, 2, 4,
the held-out prediction error, real TTFT P50, the probe's 768-token point and tries, probe time,
other CPU. Then the c1 TTFT P50 by prompt size (emulator / real), and per run the held-out
lone requests' signed prediction errors (96 / 320 / 640 tokens, and their mean) and the cached
768-token point: measured, fitted, the fit's error there, and cached 768 / cached 64 measured.

    python docs/benchmarks/calibration-s25/summary.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def runs() -> list[Path]:
    return sorted((p for p in HERE.iterdir() if (p / "report.json").exists()),
                  key=lambda p: (p / "run.log").read_text().split("\n", 1)[0].split()[1])


def main() -> None:
    print("| run | start UTC | tree | TTFT P50 | TTFT P90 | TPOT P50 | TPOT P90 | c1 emu/real ms "
          "(gap) | c2 | c4 | prediction error | real TTFT P50 ms | probe 768 ms | 768 tries "
          "min-median-max | probe s | other CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sizes = []
    held: list[tuple[str, str, list[float], dict[int, list[str]]]] = []
    for d in runs():
        r = json.loads((d / "report.json").read_text())
        first = (d / "run.log").read_text().split("\n", 1)[0].split()
        start, tree = first[1], " ".join(first[3:])
        c = yaml.safe_load(r["calibration_profile"])["calibration"]
        g = r["calibration_workload_gaps"]
        tries = c["prefill_tries_ms"][768]
        point = [p for p in c["prefill"] if p["cached_tokens"] == 0][-1]["ttft_s"] * 1e3
        lv = r["calibration_workload_per_level_ms"]
        levels = []
        for k in ("c1", "c2", "c4"):
            e, re_ = lv["calibrated"][k][0], lv["real"][k][0]
            levels.append(f"{e:.1f}/{re_:.1f} ({(e - re_) / re_:+.0%})")
        print(f"| {d.name} | {start[11:19]} | {tree} | "
              + " | ".join(f"{g[k]:+.1%}" for k in ("ttft_p50", "ttft_p90", "tpot_p50",
                                                      "tpot_p90"))
              + " | " + " | ".join(levels)
              + f" | {r['calibration_prediction_error']['median']:.1%} | "
              f"{r['calibration_workload_ms']['real']['ttft_p50']:.1f} | {point:.2f} | "
              f"{min(tries):.1f}-{statistics.median(tries):.1f}-{max(tries):.1f} | "
              f"{c['probe_s']} | {r['calibration_other_cpu']} |")
        ps = r["calibration_workload_per_size_ms"]
        sizes.append((d.name, ps["calibrated"]["c1"], ps["real"]["c1"]))
        alone = r["calibration_prediction_error"]["each_signed"][:len(
            r["calibration_held_out_ms"]["alone"])]
        cached = {int(ln.split()[1]): ln.split()[-3:] for ln in r["calibration_fit_points"]
                  if ln.startswith("prefill ") and "cached)" in ln}
        held.append((d.name, tree, alone, cached))
    print()
    print("c1 TTFT P50 by prompt size, emulator / real ms:")
    print("| run | 32 | 128 | 384 | 768 |")
    print("|---|---|---|---|---|")
    for name, e, re_ in sizes:
        print(f"| {name} | " + " | ".join(f"{e[n]:.1f} / {re_[n]:.1f}"
                                          for n in ("32", "128", "384", "768")) + " |")
    print()
    print("held-out alone, signed prediction error (96 / 320 / 640 tok; mean), and the cached")
    print("768-token point (measured / fitted ms, fit error; cached 768 / cached 64 measured):")
    print("| run | tree | held-out alone | mean | cached 768 ms | fit error | 768 / 64 |")
    print("|---|---|---|---|---|---|---|")
    for name, tree, alone, cached in held:
        m, f, err = cached[768]
        print(f"| {name} | {tree} | " + " / ".join(f"{x:+.1%}" for x in alone)
              + f" | {statistics.fmean(alone):+.1%} | {m} / {f} | {err} | "
              f"{float(m) / float(cached[64][0]):.2f} |")
    for label in ("main", "branch"):
        xs = [x for _, tree, alone, _ in held if label in tree for x in alone]
        print(f"{label}: held-out alone mean signed {statistics.fmean(xs):+.1%}, "
              f"{sum(x > 0 for x in xs)} of {len(xs)} positive")


if __name__ == "__main__":
    main()
