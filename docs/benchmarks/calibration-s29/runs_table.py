"""runs_table.py DIR: the fidelity runs of DIR (fidelity/TREE-HHMMSS/{report,samples}.json) as
the benchmarks.md table, in time order, and per tree the medians of the four gaps and of the
prediction error (adapted from calibration-s28/runs_table.py).

Beside session 28's columns (other CPU, the test's outcome from run.log), two groups of the
closed loop's requests, real / emulator / the fitted model (``closed_loop.py``: the run's
profile in virtual time, no HTTP): "c4 768 after a wave", the 768-token requests of
concurrency 4 but each round's first (each sent as its own stream ended, one step before the
other three streams end and their workers send theirs), the median over rounds of the round's
mean; "c2 32/128", the small prompts of concurrency 2 (each sent beside the other worker's
stream), the median over rounds of the round's median. Run from the branch's tree:
``PYTHONPATH=src:. python docs/benchmarks/calibration-s29/runs_table.py
docs/benchmarks/calibration-s29/fidelity``."""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = ["src", ".", str(Path(__file__).parent)]
from closed_loop import run  # noqa: E402

GAPS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")
Pick = Callable[[list[tuple[int, float]]], float]


def c4_after_wave(xs: list[tuple[int, float]]) -> float:
    return statistics.mean([t for n, t in xs if n == 768][1:])


def c2_small(xs: list[tuple[int, float]]) -> float:
    return statistics.median([t for n, t in xs if n in (32, 128)])


def measured(samples: dict, name: str, level: int, pick: Pick) -> float:
    per_round = []
    for r in samples[name]:
        xs = [(p, t) for t, lv, p in zip(r["ttft"], r["ttft_level"], r["ttft_prompt"],
                                          strict=True) if lv == level]
        per_round.append(pick(xs))
    return statistics.median(per_round)


def outcome(log: str) -> str:
    if re.search(r"\b1 passed\b", log):
        return "passed"
    if "other work took" in log:
        return "skipped: other CPU"
    if "targets not met" in log:
        return "skipped: targets"
    return "?"


def main(d: str) -> None:
    runs = sorted(Path(d).glob("*/report.json"), key=lambda p: p.parent.name.split("-")[-1])
    print("| run (UTC) | other CPU | test | real TTFT c1 / c2 / c4 | emulator "
          "| gaps TTFT P50 / P90, TPOT P50 / P90 | control TTFT P50 / P90 "
          "| c4 768 after a wave: real / emulator / model | c2 32/128: real / emulator / model "
          "| prediction error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by: dict[str, list[list[float]]] = {}
    loaded: dict[str, int] = {}  # runs the test skipped for other CPU: left out of the medians
    for p in runs:
        r = json.loads(p.read_text())
        s = json.loads((p.parent / "samples.json").read_text())
        log = (p.parent / "run.log").read_text()
        lv, g, c = (r["calibration_workload_per_level_ms"], r["calibration_workload_gaps"],
                    r["calibration_control"])
        model = run(r["calibration_profile"])
        err = r["calibration_prediction_error"]["median"]
        tree, hhmmss = p.parent.name.rsplit("-", 1)
        if outcome(log) == "skipped: other CPU":
            loaded[tree] = loaded.get(tree, 0) + 1
        else:
            by.setdefault(tree, []).append([g[k] for k in GAPS] + [err])
        groups = []
        for level, pick in ((4, c4_after_wave), (2, c2_small)):
            groups.append(" / ".join(f"{v:.1f}" for v in (
                measured(s, "real", level, pick), measured(s, "calibrated", level, pick),
                pick(model[level]))))
        cells = [f"{tree} {hhmmss[:2]}:{hhmmss[2:4]}", f"{r['calibration_other_cpu']:.2f}",
                 outcome(log),
                 " / ".join(f"{lv['real'][k][0]:.1f}" for k in ("c1", "c2", "c4")),
                 " / ".join(f"{lv['calibrated'][k][0]:.1f}" for k in ("c1", "c2", "c4")),
                 " / ".join(f"{g[k]:+.1%}" for k in GAPS),
                 " / ".join(f"{c[k]:+.1%}" for k in GAPS[:2]),
                 *groups, f"{err:.1%}"]
        print("| " + " | ".join(cells) + " |")
    print()
    for tree, rows in by.items():
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        left = f" ({loaded[tree]} skipped for other CPU left out)" if loaded.get(tree) else ""
        print(f"{tree}: {len(rows)} runs{left}, medians: gaps "
              + " / ".join(f"{m:+.1%}" for m in med[:4]) + f", error {med[4]:.1%}")


if __name__ == "__main__":
    main(sys.argv[1])
