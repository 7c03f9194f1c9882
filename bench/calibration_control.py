"""bench/calibration_control.py: how often the calibration test's workload statistic would pass
an emulator with no error, estimated offline from a run's real rounds.

    python bench/calibration_control.py RUN.json [RUN.json ...] [--rounds 3 15]
                                        [--split 3 7] [--draws 2000] [--seed 3]

``RUN.json`` is ``out/fidelity/calibration-samples.json`` (the fidelity test's raw samples:
``{"real": [round, ...], ...}``, each round ``{"ttft": [ms], "tpot": [ms], ...}``) or a
``bench/calibration.py`` ``results.json`` (its ``samples_ms``, or, from runs that kept no raw
samples, its ``per_round``). Each real round is reduced to the four figures the test holds the
emulator to (TTFT and time per output token, P50 and P90), and the statistic is the test's: the
median over rounds of each figure, within :data:`TOLERANCE` of the real engine's.

Two estimates, ``--draws`` random draws per run file, pooled over the files:

* ``--rounds n`` (:func:`median_pass_rate`): an emulator sitting exactly at the median of all
  the run's real rounds, against ``n`` real rounds drawn **with replacement** from them;
* ``--split n`` (:func:`split_pass_rate`): two disjoint sets of ``n`` real rounds of the same run
  (drawn without replacement), one standing in for the emulator.

Both are upper bounds on what a perfect emulator would score in the strict test, not its pass
rate: the emulator here has no noise of its own (the test's emulator median comes from its own
few rounds), the rounds that are drawn are the rounds that define the truth, and the emulator's
rounds in the test run after the probe's, minutes from the real ones, so a drift of the host's
speed between the two is not in them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIGURES = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")
TOLERANCE = 0.15  # tests/fidelity/test_calibration.py's EMULATOR_TARGET

Round = Mapping[str, float]  # one round's four figures (any unit, the same for all rounds)


def _pct(xs: Sequence[float], q: int) -> float:
    # bench/calibration.py's percentile (statistics' inclusive method)
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def round_figures(sample: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """One round's raw samples (``ttft`` and ``tpot`` lists) as its four figures."""
    return {f"{m}_p{q}": _pct(sample[m], q) for m in ("ttft", "tpot") for q in (50, 90)}


def load_real_rounds(path: Path) -> list[dict[str, float]]:
    """The real engine's rounds of one run file, each as its four figures."""
    data: Any = json.loads(path.read_text())
    if "samples_ms" in data:  # a bench/calibration.py results.json
        data = data["samples_ms"]
    if isinstance(data.get("real"), list):  # raw samples, per round
        return [round_figures(s) for s in data["real"]]
    for key in ("per_round", "calibration_workload_per_round"):  # figures only
        if key in data:
            return [{k: float(r[k]) for k in FIGURES} for r in data[key]["real"]]
    raise ValueError(f"{path}: no real rounds (expected 'real', 'samples_ms' or 'per_round')")


@dataclass(frozen=True)
class PassRate:
    """Over ``draws`` draws: the share passing on all four figures, and each figure's share
    off by more than the tolerance."""

    draws: int
    all_four: float
    failed: dict[str, float]


def _rate(outcomes: list[dict[str, bool]]) -> PassRate:
    n = len(outcomes)
    return PassRate(
        draws=n,
        all_four=sum(all(o.values()) for o in outcomes) / n if n else 0.0,
        failed={k: sum(not o[k] for o in outcomes) / n if n else 0.0 for k in FIGURES},
    )


def _within(emulator: float, real: float, tolerance: float) -> bool:
    return abs(emulator - real) / real <= tolerance  # the test's gap: relative to the real engine


def median_pass_rate(
    runs: Sequence[Sequence[Round]],
    n: int,
    *,
    draws: int = 2000,
    seed: int = 3,
    tolerance: float = TOLERANCE,
) -> PassRate:
    """An emulator exactly at each run's median over all its real rounds, against the median of
    ``n`` of those rounds drawn with replacement, ``draws`` times per run."""
    rng = random.Random(seed)
    outcomes = []
    for rounds in runs:
        truth = {k: statistics.median(r[k] for r in rounds) for k in FIGURES}
        for _ in range(draws):
            drawn = rng.choices(rounds, k=n)
            outcomes.append({k: _within(truth[k], statistics.median(r[k] for r in drawn),
                                        tolerance) for k in FIGURES})
    return _rate(outcomes)


def split_pass_rate(
    runs: Sequence[Sequence[Round]],
    n: int,
    *,
    draws: int = 2000,
    seed: int = 7,
    tolerance: float = TOLERANCE,
) -> PassRate:
    """Two disjoint sets of ``n`` real rounds of the same run, the first in the emulator's
    place, ``draws`` times per run; a run with fewer than ``2 n`` rounds is left out."""
    rng = random.Random(seed)
    outcomes = []
    for rounds in runs:
        if 2 * n > len(rounds):
            continue
        for _ in range(draws):
            picked = rng.sample(range(len(rounds)), 2 * n)
            a, b = [rounds[i] for i in picked[:n]], [rounds[i] for i in picked[n:]]
            outcomes.append({k: _within(statistics.median(r[k] for r in a),
                                        statistics.median(r[k] for r in b), tolerance)
                             for k in FIGURES})
    return _rate(outcomes)


def _line(what: str, rate: PassRate) -> str:
    if not rate.draws:
        return f"{what}: no run has enough rounds"
    return (f"{what}: passes all four {rate.all_four:.0%} of {rate.draws} draws; off by > "
            f"{TOLERANCE:.0%}: " + " / ".join(f"{k} {v:.0%}" for k, v in rate.failed.items()))


def positive_int(text: str) -> int:
    """An argparse type: an int of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="samples or results files, one per run")
    ap.add_argument("--rounds", type=positive_int, nargs="*", default=[3, 15],
                    help="real rounds drawn against an emulator at the run's median")
    ap.add_argument("--split", type=positive_int, nargs="*", default=[3, 7],
                    help="rounds per side, real against real")
    ap.add_argument("--draws", type=positive_int, default=2000, help="draws per run file")
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args(argv)
    runs = [load_real_rounds(p) for p in a.runs]
    print(f"{len(runs)} runs, {sum(map(len, runs))} real rounds "
          f"({', '.join(str(len(r)) for r in runs)})")
    for n in a.rounds:
        print(_line(f"emulator at the median, {n} real rounds (with replacement)",
                    median_pass_rate(runs, n, draws=a.draws, seed=a.seed)))
    for n in a.split:
        print(_line(f"real vs real, {n} against {n}",
                    split_pass_rate(runs, n, draws=a.draws, seed=a.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
