"""Calibration against the real vLLM: `inferplane calibrate`'s probe and fit, then the fitted
profile's predictions and the emulator running it, both against the same engine
(`bench/calibration.py` does the measuring; the bench also runs the table's profile beside it).

The issue's targets — predicted TTFT within 20 % (median absolute error) on prompt lengths the
probe did not send, the emulator within 15 % on TTFT and time-per-output-token P50 and P90 — are
benchmark targets, measured and recorded by `bench/calibration.py` (docs/benchmarks.md). On
this 2-core machine the real engine's own front end competes for CPU with the client and the
emulator, so run-to-run spread is larger than those margins; this test guards what holds in
every run: the prediction within 35 % and the emulator's P50s within 50 % of the real engine.
A run whose real engine was starved (>10 % of its streams sent in one burst) measures the
machine, not the engine: its numbers are reported, not asserted. What was measured goes to
``out/fidelity/report.json``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.calibration import compare
from tests.fidelity.conftest import REPORT, EngineUnderTest

pytestmark = pytest.mark.fidelity


def test_calibrated_profile_predicts_and_emulates_the_real_engine(
    real_engine: EngineUnderTest, tmp_path: Path
) -> None:
    res = compare(real_engine.url, tmp_path, rounds=3, requests=12, profiles=("calibrated",))
    REPORT["calibration_fit"] = res["fit"]
    REPORT["calibration_prediction_error"] = res["prediction_error"]["calibrated"]
    gaps = res["gaps"]["calibrated"]
    REPORT["calibration_workload_ms"] = {
        name: {k: round(v * 1e3, 3) for k, v in s.items()} for name, s in res["workload"].items()
    }
    REPORT["calibration_workload_gaps"] = {k: round(v, 3) for k, v in gaps.items()}
    REPORT["calibration_real_bursts"] = f"{res['real_bursts']} of {res['real_streams']} streams"

    if res["real_starved"]:
        # The real engine's HTTP front end sent >10 % of its streams in one burst (starved of
        # CPU by other work on the machine): its latencies measure the machine, not the
        # engine, so the prediction errors and the emulator's gaps are reported above, not
        # asserted (bench/calibration.py says the same).
        return
    assert res["prediction_error"]["calibrated"]["median"] <= 0.35, res
    assert abs(gaps["ttft_p50"]) <= 0.5 and abs(gaps["tpot_p50"]) <= 0.5, res
