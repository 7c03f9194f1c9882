"""bench/calibration_control.py: the perfect-emulator estimates, on synthetic rounds."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest

from bench.calibration_control import (
    FIGURES,
    load_real_rounds,
    main,
    median_pass_rate,
    round_figures,
    split_pass_rate,
)


def _sample(ttft_ms: float, tpot_ms: float, n: int = 11) -> dict[str, list[float] | list[int]]:
    # a round of n requests, the i-th 1 % slower than the first (P50: the 6th, P90: the 10th)
    return {"ttft": [ttft_ms * (1 + i / 100) for i in range(n)], "ttft_level": [1] * n,
            "tpot": [tpot_ms * (1 + i / 100) for i in range(n)], "tpot_level": [1] * n}


def _figures(tpot: float) -> dict[str, float]:
    return {"ttft_p50": 20.0, "ttft_p90": 30.0, "tpot_p50": tpot, "tpot_p90": tpot * 1.2}


def test_a_round_reads_as_its_four_percentiles() -> None:
    assert round_figures(_sample(10.0, 2.0)) == pytest.approx(
        {"ttft_p50": 10.5, "ttft_p90": 10.9, "tpot_p50": 2.1, "tpot_p90": 2.18})


def test_the_fidelity_tests_samples_file_and_a_results_file_load_alike(tmp_path: Path) -> None:
    samples = {"real": [_sample(10.0, 2.0), _sample(20.0, 3.0)], "calibrated": [_sample(9, 2)]}
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    (tmp_path / "results.json").write_text(json.dumps({"samples_ms": samples, "fit": "x"}))
    per_round = [round_figures(s) for s in samples["real"]]
    (tmp_path / "old.json").write_text(json.dumps({"per_round": {"real": per_round}}))
    (tmp_path / "report.json").write_text(
        json.dumps({"calibration_workload_per_round": {"real": per_round[:1]}}))
    for name in ("samples.json", "results.json", "old.json"):
        assert load_real_rounds(tmp_path / name) == per_round  # the real rounds only
    assert load_real_rounds(tmp_path / "report.json") == per_round[:1]
    (tmp_path / "other.json").write_text(json.dumps({"fit": "x"}))
    with pytest.raises(ValueError, match="no real rounds"):
        load_real_rounds(tmp_path / "other.json")


def test_identical_rounds_always_pass() -> None:
    runs = [[_figures(2.0)] * 6]
    for rate in (median_pass_rate(runs, 3, draws=200), split_pass_rate(runs, 3, draws=200)):
        assert rate.all_four == 1.0
        assert rate.failed == dict.fromkeys(FIGURES, 0.0)
        assert rate.draws == 200


def test_the_median_estimate_draws_with_replacement_against_the_runs_median() -> None:
    # 3 of 5 rounds at TPOT 2 ms (the run's median), 2 slow ones at 3 ms (50 % off): the median
    # of n rounds drawn with replacement is a slow one when more than half the draws are
    runs = [[_figures(2.0)] * 3 + [_figures(3.0)] * 2]
    for n in (1, 15):  # 15 draws from 5 rounds: only with replacement
        slow = sum(comb(n, k) * 0.4**k * 0.6 ** (n - k) for k in range(n // 2 + 1, n + 1))
        rate = median_pass_rate(runs, n, draws=4000, seed=11)
        assert rate.failed["tpot_p50"] == pytest.approx(slow, abs=0.03)  # 0.40, then 0.21
        assert rate.failed["tpot_p50"] == rate.failed["tpot_p90"]
        assert rate.all_four == pytest.approx(1 - rate.failed["tpot_p50"])
        assert rate.failed["ttft_p50"] == rate.failed["ttft_p90"] == 0.0


def test_the_gap_is_relative_to_the_real_side_as_in_the_test() -> None:
    # the emulator sits at the run's median, 2.0 ms; against real rounds at 2.32 it is 13.8 %
    # off (16 % relative to itself), against 1.72 it is 16.3 % off (14 % relative to itself)
    def failed(slow: float) -> float:
        runs = [[_figures(2.0)] * 3 + [_figures(slow)] * 2]
        return median_pass_rate(runs, 5, draws=500).failed["tpot_p50"]

    assert failed(2.32) == 0.0
    assert failed(1.72) > 0.2  # when most of the 5 drawn rounds are slow: 0.32


def test_the_split_estimate_uses_disjoint_rounds_and_skips_short_runs() -> None:
    # one slow round among 4: 1 against 1 disagrees when it is drawn (half the draws); two
    # disjoint sets of 2 always hold it on one side, where its median is 2.5 (> 15 % off 2.0)
    runs = [[_figures(2.0)] * 3 + [_figures(3.0)]]
    assert split_pass_rate(runs, 1, draws=4000, seed=5).all_four == pytest.approx(0.5, abs=0.03)
    assert split_pass_rate(runs, 2, draws=300).all_four == 0.0
    short = split_pass_rate(runs, 3, draws=300)
    assert short.draws == 0 and short.all_four == 0.0


def test_the_cli_pools_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, tpot in enumerate((2.0, 2.0)):
        (tmp_path / f"s{i}.json").write_text(json.dumps({"real": [_sample(10, tpot)] * 4}))
    assert main([str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--rounds", "3",
                 "--split", "2", "3", "--draws", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 runs, 8 real rounds (4, 4)"
    assert out[1].startswith("emulator at the median, 3 real rounds (with replacement): "
                             "passes all four 100% of 100 draws")
    assert out[2].startswith("real vs real, 2 against 2: passes all four 100% of 100 draws")
    assert out[3] == "real vs real, 3 against 3: no run has enough rounds"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s0.json"), "--rounds", "0"])
