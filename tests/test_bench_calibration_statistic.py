"""bench/calibration_statistic.py's arithmetic (no engine needed)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.calibration_statistic import (
    cold_points,
    first_visits_median,
    judge,
    label,
    main,
    refit,
    summary,
    trimmed_mean,
)
from inferplane.physics import get_hardware
from inferplane.physics.calibration import DecodePoint, PrefillPoint, dump_profile, fit
from inferplane.physics.models import get_model

LENGTHS = (16, 64, 128, 256, 512, 768)


def test_trimmed_mean_cuts_a_fifth_from_each_end() -> None:
    assert trimmed_mean([float(x) for x in range(1, 11)]) == pytest.approx(5.5)  # 3..8
    assert trimmed_mean([1.0, 1.0, 1.0, 1.0, 100.0]) == 1.0  # one cut from each end
    assert trimmed_mean([2.0, 4.0]) == 3.0  # nothing to cut
    with pytest.raises(ValueError):
        trimmed_mean([])


def test_first_visits_are_every_rounds_first_try() -> None:
    # 3 visits a round: the first of each round is 1, 2, 3, 4, 5
    tries = [x for r in range(1, 6) for x in (float(r), 50.0, 60.0)]
    assert first_visits_median(tries, 3) == 3.0
    assert statistics.median(tries) == 50.0


def _slow_tries(ms: float) -> list[float]:
    """15 tries: 9 at ``ms``, 6 at 1.5x (two speed states): median ``ms``, trimmed mean more."""
    return [ms] * 9 + [1.5 * ms] * 6


def _profile_text() -> str:
    """A fitted profile of the tiny model whose cold points keep 15 tries each."""
    base = {n: 5.0 + n * 0.01 for n in LENGTHS}  # ms
    cold = [PrefillPoint(n, 0, base[n] / 1e3) for n in LENGTHS]
    cached = [PrefillPoint(n, n - 32, 5.2e-3 + n * 1e-6) for n in (64, 128, 256, 512, 768)]
    dec = [DecodePoint(b, ctx, 4e-3 + 2e-4 * b + ctx * 1e-7)
           for b, ctx in ((1, 64), (2, 64), (4, 64), (1, 416), (4, 416))]
    cal = fit(get_hardware("cpu"), get_model("tiny-llama"), cold + cached, dec,
              name="cpu-fidelity", precision="fp32", source="test")
    meta = {"model_profile": "tiny-llama", "tp": 1, "precision": "fp32", "prefill_visits": 3,
            "prefill_tries_ms": {n: _slow_tries(base[n]) for n in LENGTHS}}
    return dump_profile(cal, "cpu", meta)


def test_cold_points_read_each_cold_point_from_its_tries_and_keep_the_cached() -> None:
    tries: dict[int, list[float]] = {16: [1.0, 2.0, 9.0], 64: [4.0, 5.0, 6.0]}
    c: dict[str, Any] = {
        "prefill": [{"prompt_tokens": 17, "cached_tokens": 0, "ttft_s": 0.5},
                    {"prompt_tokens": 65, "cached_tokens": 0, "ttft_s": 0.5},
                    {"prompt_tokens": 65, "cached_tokens": 32, "ttft_s": 0.25}],
        # per requested length; the points hold the engine's count (17, 65)
        "prefill_tries_ms": tries,
    }
    assert cold_points(c, statistics.median) == [
        PrefillPoint(17, 0, 0.002), PrefillPoint(65, 0, 0.005), PrefillPoint(65, 32, 0.25)]
    assert cold_points(c, max)[0].ttft_s == 0.009
    tries[128] = [1.0]
    with pytest.raises(ValueError):
        cold_points(c, statistics.median)


def test_refit_moves_the_fit_with_the_points_and_keeps_the_rest() -> None:
    text = _profile_text()
    c = yaml.safe_load(text)["calibration"]
    slow = yaml.safe_load(refit(text, cold_points(c, trimmed_mean)))
    fast = yaml.safe_load(refit(text, cold_points(c, statistics.median)))
    lone = [p for p in fast["calibration"]["prefill"] if p["cached_tokens"] == 0]
    assert [p["ttft_s"] for p in lone] == pytest.approx(
        [(5.0 + n * 0.01) / 1e3 for n in LENGTHS], abs=1e-6)  # the file holds whole us
    assert [p["ttft_s"] for p in slow["calibration"]["prefill"] if p["cached_tokens"] == 0] \
        == pytest.approx([trimmed_mean(_slow_tries(5.0 + n * 0.01)) / 1e3 for n in LENGTHS],
                         abs=1e-6)
    slow_768 = [p for p in slow["calibration"]["prefill"] if p["cached_tokens"] == 0][-1]
    assert slow_768["fitted_s"] > 1.1 * lone[-1]["fitted_s"]  # the fit follows the points
    assert [d["itl_s"] for d in fast["calibration"]["decode"]] == [
        d["itl_s"] for d in c["decode"]]
    assert fast["calibration"]["prefill_tries_ms"] == c["prefill_tries_ms"]


def _report(text: str, alone: dict[str, float], burst: list[float],
            c1: dict[str, float]) -> dict[str, Any]:
    return {"calibration_profile": text,
            "calibration_held_out_ms": {"alone": alone, "burst": burst},
            "calibration_workload_per_size_ms": {"real": {"c1": c1}}}


def test_judge_scores_each_statistic_against_the_runs_real_points() -> None:
    """A run whose real engine measured exactly what the median's refit predicts: the median
    scores 0 everywhere, the trimmed mean (its points 1.2x, the fit's longer predictions
    with them) over 0 and high, and the tries' count and the real points come through."""
    text = _profile_text()
    probe = judge(_report(text, {"96": 1.0, "320": 1.0, "640": 1.0}, [1.0, 1.0, 1.0],
                          {"32": 1.0, "768": 1.0}))
    assert probe is not None
    med = probe["statistics"]["median"]
    real = _report(text, dict(zip(("96", "320", "640"), med["held_out_predicted_ms"][:3],
                                  strict=True)),
                   med["held_out_predicted_ms"][3:],
                   {str(n): v for n, v in med["c1_predicted_ms"].items()})
    r = judge(real)
    assert r is not None
    assert r["real_held_out_ms"] == pytest.approx(med["held_out_predicted_ms"], abs=0.01)
    m, t = r["statistics"]["median"], r["statistics"]["trimmed mean"]
    assert m["held_out_median_abs"] == pytest.approx(0, abs=1e-3)
    assert m["c1_median_abs"] == pytest.approx(0, abs=1e-3)
    assert all(e > 0 for e in t["held_out_signed"][:3]) and all(e > 0 for e in t["c1_signed"])
    assert t["held_out_median_abs"] > 0.02
    assert r["statistics"]["first visits"]["lone_768_ms"] == pytest.approx(m["lone_768_ms"])
    s = summary({"a": r, "b": r})
    assert s["held_out_median_abs"]["median closer"] == 2
    assert s["held_out_median_abs"]["trimmed mean closer"] == 0
    assert s["held_out_median_abs"]["mean median"] == pytest.approx(
        m["held_out_median_abs"])


def _result(median: list[float], trimmed: list[float], c1m: float, c1t: float) -> dict[str, Any]:
    def one(signed: list[float], c1: float) -> dict[str, Any]:
        return {"held_out_signed": signed, "c1_signed": [c1],
                "held_out_median_abs": statistics.median(abs(e) for e in signed),
                "c1_median_abs": abs(c1)}
    return {"statistics": {"median": one(median, c1m), "trimmed mean": one(trimmed, c1t)}}


def test_summary_counts_runs_and_points_each_statistic_was_closer_in() -> None:
    results = {
        "r1": _result([0.1, -0.2, 0.3], [0.1, -0.1, 0.2], 0.05, -0.1),  # trimmed closer
        "r2": _result([0.1, 0.1, 0.1], [0.2, 0.2, -0.2], 0.0, 0.0),  # median closer
        "r3": _result([0.1, 0.1, 0.1], [0.1, 0.1, 0.3], 0.1, 0.2),  # held out tied
    }
    s = summary(results)
    h = s["held_out_median_abs"]
    assert h["trimmed mean - median"] == pytest.approx([-0.1, 0.1, 0.0])
    assert (h["median closer"], h["trimmed mean closer"]) == (1, 1)
    assert h["mean median"] == pytest.approx((0.2 + 0.1 + 0.1) / 3, abs=1e-4)
    assert h["mean trimmed mean"] == pytest.approx((0.1 + 0.2 + 0.1) / 3, abs=1e-4)
    c = s["c1_median_abs"]
    assert c["trimmed mean - median"] == pytest.approx([0.05, 0.0, 0.1])
    assert (c["median closer"], c["trimmed mean closer"]) == (2, 0)
    # points: r1 trimmed closer at 2 held out, median at c1; r2 median at 3; r3 median at 2
    assert s["points"] == {"median closer": 6, "trimmed mean closer": 2, "tied": 4}


def test_main_skips_reports_without_tries(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_report("calibration:\n  repeats: 5\n", {}, [], {})))
    assert main([str(old)]) == 1
    assert "no prefill tries" in capsys.readouterr().err


def test_runs_are_named_by_their_folder_and_file() -> None:
    assert label(Path("docs/benchmarks/calibration-s24/main1/report.json")) == "s24/main1"
    assert label(Path("docs/benchmarks/calibration-s23/new1-report.json")) == "s23/new1"
    assert label(Path("report.json")) == "report"
