"""The emulator alone, running session 25's calibrated profile (``c4_profile.yaml``): the
fidelity workload (concurrency 1, 2, 4; 12 fresh prompts of 32-768 tokens a level, 32 output
tokens) for ROUNDS rounds against ``inferplane emulate`` from the tree this runs in, and the
profile's own prediction of a lone 32-token prompt's TTFT (the placement predictor's
``ttft_raw_s``) beside the emulator's.

    PYTHONPATH=src:. python docs/benchmarks/emulator-s26/emu_only.py OUT.json [ROUNDS]

No real engine: what it shows is the emulator against the model it runs (session 26)."""
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = ["src", "."]
from bench.calibration import (  # noqa: E402
    PROFILE_NAME,
    emulator,
    emulator_fleet,
    per_level_ms,
    per_size_ms,
    predicted_ttft_s,
    warm_up,
    workload_stats,
)
from inferplane.physics.probe import run_workload  # noqa: E402
from tests.fidelity import conftest as fid  # noqa: E402

PROFILE = Path(__file__).resolve().parent.parent / "calibration-s25" / "c4_profile.yaml"


def main() -> None:
    out_path = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        with emulator(PROFILE_NAME, PROFILE, Path(tmp)) as url:
            asyncio.run(warm_up(url))
            for _ in range(rounds):
                runs.append(asyncio.run(run_workload(url, fid.MODEL, requests_per_level=12)))
                time.sleep(0.2)
        log = next(Path(tmp).glob("emulator-*.log")).read_text()  # after it stopped
    fleet = emulator_fleet(PROFILE_NAME, 1, PROFILE)
    res = {
        "predicted_c1_ms": {n: round(predicted_ttft_s(fleet, n) * 1e3, 3)
                            for n in (32, 128, 384, 768)},
        "per_level_ms": per_level_ms(runs),
        "per_size_ms": per_size_ms(runs),
        "stats_ms": {k: round(v * 1e3, 3) for k, v in workload_stats(runs).items()},
        "log": [line for line in log.splitlines() if "DBG" in line or "round trip" in line],
    }
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("predicted_c1_ms", "per_level_ms", "log")}))
    print(json.dumps(res["per_size_ms"]))


if __name__ == "__main__":
    main()
