"""runs_table.py DIR: the fidelity runs of DIR (fidelity/TREE-HHMMSS/report.json) as the
benchmarks.md table, in time order, and per tree the medians of the four gaps, of the
prediction error and of each run's median of the held-out lone requests' signed errors (the
first three of ``calibration_prediction_error.each_signed``: requests sent alone between the
probe's rounds).
Beside session 27's columns: the fitted after-stream term (absent on main), the real engine's
c1 TTFT per size over the profile's lone prediction (the predictor's, which does not add the
term) and over its after-stream prediction (``predict_ttft_s(..., after_stream=True)``), and
those signed errors. Run from the branch's tree (its ``src`` reads both kinds of profile)."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = ["src", "."]
from bench.calibration import PROFILE_NAME, emulator_fleet, predicted_ttft_s  # noqa: E402
from inferplane.physics import Roofline  # noqa: E402
from inferplane.physics.calibration import load_profile_file, predict_ttft_s  # noqa: E402
from inferplane.physics.models import get_model  # noqa: E402

SIZES = ("32", "128", "384", "768")
GAPS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")


def main(d: str) -> None:
    runs = sorted(Path(d).glob("*/report.json"), key=lambda p: p.parent.name.split("-")[-1])
    print("| run (UTC) | real TTFT c1 / c2 / c4 | emulator | gaps TTFT P50 / P90, TPOT P50 / P90"
          " | control TTFT P50 / P90, TPOT P50 / P90 | after-stream fit: ms + × step "
          "| real c1 / lone pred. 32 / 128 / 384 / 768 | real c1 / after-stream pred. "
          "| prediction error | held-out lone requests, signed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by: dict[str, list[list[float]]] = {}
    for p in runs:
        r = json.loads(p.read_text())
        lv, g, c = (r["calibration_workload_per_level_ms"], r["calibration_workload_gaps"],
                    r["calibration_control"])
        with tempfile.TemporaryDirectory() as tmp:
            prof = Path(tmp) / "profile.yaml"
            prof.write_text(r["calibration_profile"])
            fleet = emulator_fleet(PROFILE_NAME, 1, prof)
            pred = {n: predicted_ttft_s(fleet, int(n)) * 1e3 for n in SIZES}
            hw, model = load_profile_file(prof)
        roof = Roofline(hw, get_model(model or "tiny-llama"), 1, "fp32")
        after = {n: predict_ttft_s(roof, int(n), after_stream=True) * 1e3 for n in SIZES}
        c1 = r["calibration_workload_per_size_ms"]["real"]["c1"]
        err = r["calibration_prediction_error"]["median"]
        lone = r["calibration_prediction_error"]["each_signed"][:3]
        tree, hhmmss = p.parent.name.rsplit("-", 1)
        by.setdefault(tree, []).append([g[k] for k in GAPS] + [err, statistics.median(lone)])
        cells = [f"{tree} {hhmmss[:2]}:{hhmmss[2:4]}",
                 " / ".join(f"{lv['real'][k][0]:.1f}" for k in ("c1", "c2", "c4")),
                 " / ".join(f"{lv['calibrated'][k][0]:.1f}" for k in ("c1", "c2", "c4")),
                 " / ".join(f"{g[k]:+.1%}" for k in GAPS),
                 " / ".join(f"{c[k]:+.1%}" for k in GAPS),
                 f"{hw.after_stream_s * 1e3:.2f} + {hw.after_stream_factor:.3f}",
                 " / ".join(f"{c1[n] / pred[n]:.2f}" for n in SIZES),
                 " / ".join(f"{c1[n] / after[n]:.2f}" for n in SIZES),
                 f"{err:.1%}",
                 " / ".join(f"{e:+.0%}" for e in lone)]
        print("| " + " | ".join(cells) + " |")
    print()
    for tree, rows in by.items():
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(f"{tree}: {len(rows)} runs, medians: gaps " + " / ".join(f"{m:+.1%}" for m in med[:4])
              + f", error {med[4]:.1%}, lone requests {med[5]:+.1%}")


if __name__ == "__main__":
    main(sys.argv[1])
