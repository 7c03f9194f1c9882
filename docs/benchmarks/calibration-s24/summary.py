"""One row per run of this directory (offline, JSON only): start, tree, the fidelity gaps as
the test reports them, the held-out prediction error, other CPU, the probe's time and its
768-token tries; the fitted idle-wake cost (wake24's runs; "-" before the field).

    python docs/benchmarks/calibration-s24/summary.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def main() -> None:
    print("| run | start UTC | tree | TTFT P50 | TTFT P90 | TPOT P50 | TPOT P90 | prediction "
          "error | real TTFT P50 ms | probe 768 ms (statistic) | 768 tries min-median-max | "
          "probe s | other CPU | idle wake ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in sorted(p for p in HERE.iterdir() if (p / "report.json").exists()):
        r = json.loads((d / "report.json").read_text())
        first = (d / "run.log").read_text().split("\n", 1)[0].split()
        start, tree = first[1], first[-1]
        c = yaml.safe_load(r["calibration_profile"])["calibration"]
        g = r["calibration_workload_gaps"]
        tries = c["prefill_tries_ms"][768]
        point = [p for p in c["prefill"] if p["cached_tokens"] == 0][-1]["ttft_s"] * 1e3
        wake = r["calibration_profile"].split("idle_wake_s: ", 1)
        wake_ms = f"{float(wake[1].split()[0]) * 1e3:.2f}" if len(wake) > 1 else "-"
        stat = "median" if c["prefill_statistic"].startswith("median") else "trimmed"
        print(f"| {d.name} | {start[11:19]} | {tree} | "
              + " | ".join(f"{g[k]:+.1%}" for k in ("ttft_p50", "ttft_p90", "tpot_p50",
                                                      "tpot_p90"))
              + f" | {r['calibration_prediction_error']['median']:.1%} | "
              f"{r['calibration_workload_ms']['real']['ttft_p50']:.1f} | {point:.2f} ({stat}) | "
              f"{min(tries):.1f}-{statistics.median(tries):.1f}-{max(tries):.1f} | "
              f"{c['probe_s']} | {r['calibration_other_cpu']} | {wake_ms} |")


if __name__ == "__main__":
    main()
