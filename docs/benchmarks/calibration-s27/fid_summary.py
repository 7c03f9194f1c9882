"""Summarise the fidelity runs in fidelity/*/report.json (session 26): per run the emulator's
and the real engine's TTFT per level (ms), the four gaps the targets judge, the control, and
the emulator's c1 TTFT per size against the fitted profile's own prediction of a lone request
(the placement predictor's ``ttft_raw_s``, bench.calibration.predicted_ttft_s).

    PYTHONPATH=src:. python docs/benchmarks/emulator-s26/fid_summary.py"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = ["src", "."]
from bench.calibration import PROFILE_NAME, emulator_fleet, predicted_ttft_s  # noqa: E402

HERE = Path(sys.argv[1])
SIZES = ("32", "128", "384", "768")


def main() -> None:
    runs = sorted(HERE.glob("*/report.json"), key=lambda p: p.parent.name.split("-")[-1])
    by_tree: dict[str, list[dict[str, float]]] = {}
    print("| run (UTC start) | TTFT c1 / c2 / c4, real | emulator | gaps TTFT P50 / P90, "
          "TPOT P50 / P90 | control | emulator c1 per size − prediction (ms) |")
    print("|---|---|---|---|---|---|")
    for p in runs:
        r = json.loads(p.read_text())
        if "calibration_workload_per_level_ms" not in r:
            print(f"| {p.parent.name} | (no result) |")
            continue
        lv = r["calibration_workload_per_level_ms"]
        g, c = r["calibration_workload_gaps"], r.get("calibration_control", {})
        with tempfile.TemporaryDirectory() as tmp:
            prof = Path(tmp) / "profile.yaml"
            prof.write_text(r["calibration_profile"])
            fleet = emulator_fleet(PROFILE_NAME, 1, prof)
            pred = {n: predicted_ttft_s(fleet, int(n)) * 1e3 for n in SIZES}
        c1 = r["calibration_workload_per_size_ms"]["calibrated"]["c1"]
        diff = {n: c1[n] - pred[n] for n in SIZES}
        tree = p.parent.name.rsplit("-", 1)[0]
        by_tree.setdefault(tree, []).append(
            {"c1": lv["calibrated"]["c1"][0], "c4": lv["calibrated"]["c4"][0],
             "c4real": lv["real"]["c4"][0], **{f"g_{k}": v for k, v in g.items()},
             **{f"d{n}": diff[n] for n in SIZES}})
        levels, gaps = ("c1", "c2", "c4"), ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")
        cells = [
            " / ".join(f"{lv['real'][k][0]:.1f}" for k in levels),
            " / ".join(f"{lv['calibrated'][k][0]:.1f}" for k in levels),
            " / ".join(f"{g[k]:+.1%}" for k in gaps),
            " / ".join(f"{c.get(k, 0):+.1%}" for k in gaps[:2]),
            " ".join(f"{n}: {c1[n]:.1f}−{pred[n]:.2f} = {diff[n]:+.2f}" for n in SIZES),
        ]
        print(f"| {p.parent.name} | " + " | ".join(cells) + " |")
    print()
    for tree, rows in by_tree.items():
        keys = rows[0].keys()
        print(tree, len(rows), "runs; medians:",
              {k: round(statistics.median(r[k] for r in rows), 3) for k in keys})


if __name__ == "__main__":
    main()
