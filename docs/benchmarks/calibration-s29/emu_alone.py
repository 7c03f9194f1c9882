"""emu_alone.py REPORT.json [ROUNDS]: the fidelity workload's client (``run_workload``, 12
requests a level, as the fidelity test runs it) against the emulator alone (``inferplane
emulate`` in its own process, the run's fitted profile, real HTTP on loopback; no vLLM), and
the same workload by the fitted model in virtual time (``closed_loop.run``, no round trip):
per level, each request in completion order, ``prompt tokens: emulator / model`` (ms; the
emulator's the median over ROUNDS rounds, default 5; ``*``: in some round the request at
that place had another size). Run from a tree's root (the tree's ``src`` is the emulator
measured): ``PYTHONPATH=src:. python docs/benchmarks/calibration-s29/emu_alone.py
REPORT.json``."""
from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = ["src", ".", str(Path(__file__).parent)]
from closed_loop import run  # noqa: E402

from bench.calibration import PROFILE_NAME, emulator, warm_up  # noqa: E402
from inferplane.physics.probe import run_workload  # noqa: E402
from tests.fidelity import conftest as fid  # noqa: E402


def main(report: str, rounds: int = 5) -> None:
    text = json.loads(Path(report).read_text())["calibration_profile"]
    model = run(text)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prof = work / "profile.yaml"
        prof.write_text(text)
        with emulator(PROFILE_NAME, prof, work) as url:
            asyncio.run(warm_up(url))
            res = []
            for _ in range(rounds):
                res.append(asyncio.run(run_workload(url, fid.MODEL, requests_per_level=12)))
                time.sleep(0.2)
    print(report, f"{rounds} rounds")
    for level in (1, 2, 4):
        rows = [[(p, t * 1e3) for t, lv, p in zip(r.ttft_s, r.ttft_level, r.ttft_prompt,
                                                  strict=True) if lv == level] for r in res]
        cells, diffs = [], []
        for i, (size, ms) in enumerate(model[level]):
            emu = statistics.median(row[i][1] for row in rows if i < len(row))
            same = all(row[i][0] == size for row in rows if i < len(row))
            cells.append(f"{size}{'' if same else '*'}:{emu:.1f}/{ms:.1f}")
            diffs.append(emu - ms)
        print(f" c{level} " + " ".join(cells)
              + f"  | emulator - model: median {statistics.median(diffs):+.2f} ms,"
              f" range {min(diffs):+.2f} … {max(diffs):+.2f}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
