"""bench/calibration.py's report helpers (no engine needed)."""

from __future__ import annotations

from bench.calibration import per_level_ms
from inferplane.physics.probe import WorkloadResult


def _round(ttft: dict[int, list[float]], tpot: dict[int, list[float]]) -> WorkloadResult:
    r = WorkloadResult()
    for c, xs in ttft.items():
        r.ttft_s += xs
        r.ttft_level += [c] * len(xs)
    for c, xs in tpot.items():
        r.tpot_s += xs
        r.tpot_level += [c] * len(xs)
    return r


def test_per_level_keeps_levels_apart_when_a_stream_has_no_tpot() -> None:
    # level 1's first stream came in one burst (no TPOT): a positional slice of 3 per level
    # would give level 1 [0.001, 0.001, 0.002] and level 2 [0.002, 0.002, 0.004]
    r = _round({1: [0.010] * 3, 2: [0.020] * 3, 4: [0.040] * 3},
               {1: [0.001, 0.001], 2: [0.002] * 3, 4: [0.004] * 3})
    assert per_level_ms([r, r]) == {"c1": [10.0, 1.0], "c2": [20.0, 2.0], "c4": [40.0, 4.0]}


def test_per_level_takes_the_median_over_rounds() -> None:
    rounds = [_round({1: [t]}, {1: [t / 10]}) for t in (0.010, 0.030, 0.020)]
    assert per_level_ms(rounds, levels=(1,)) == {"c1": [20.0, 2.0]}


def test_a_level_without_samples_reads_none_instead_of_failing() -> None:
    # the last level's streams all came in one burst in one round, and in every round in the other
    a = _round({1: [0.010], 2: [0.020]}, {1: [0.001], 2: [0.002]})
    b = _round({1: [0.010], 2: [0.030]}, {1: [0.001]})
    assert per_level_ms([a, b], levels=(1, 2)) == {"c1": [10.0, 1.0], "c2": [25.0, 2.0]}
    assert per_level_ms([b], levels=(1, 2, 4)) == {
        "c1": [10.0, 1.0], "c2": [30.0, None], "c4": [None, None]}
