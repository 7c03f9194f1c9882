"""levels.py: the fidelity workload's levels, stream by stream, on the real vLLM and on the
emulator running the profile fitted to it (session 27, why the emulator's TPOT is short).

    python docs/benchmarks/calibration-s27/levels.py [--rounds 3] [--probe-repeats 3]
        [--profile FILE] [--out DIR]

Starts the fidelity vLLM (cores split as the fidelity test does), calibrates it (or takes
``--profile``), starts ``inferplane emulate`` on the profile and runs ``--rounds`` rounds, each
the workload on the real engine then on the emulator (order alternating by round). Every
request's send time, every text chunk's arrival (client clock), level and prompt size are kept,
with each engine's ``/metrics`` page before and after every level (vLLM's histograms:
iteration tokens, inter-token latency, ...), and the real engine's API-server and engine CPU
seconds per level. Writes ``levels.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.calibration import (  # noqa: E402
    PROFILE_NAME,
    SWEEP,
    emulator,
    start_real_engine,
    warm_up,
)
from bench.calibration_parts import CpuMeter, _stream  # noqa: E402
from inferplane.physics.probe import _nonce, calibrate_endpoint, prompt_of  # noqa: E402
from tests.fidelity import conftest as fid  # noqa: E402
from tests.fidelity.cores import split_cores  # noqa: E402

SIZES = (32, 128, 384, 768)


def _histograms(text: str) -> str:
    """The page's histogram ``_sum`` and ``_count`` lines only (what levels_summary reads)."""
    return "\n".join(line for line in text.splitlines()
                     if re.match(r"^vllm:[a-z_]+_(sum|count)[{ ]", line))


async def level(url: str, c: int, n_req: int, meter: CpuMeter | None) -> dict[str, Any]:
    out: dict[str, Any] = {"c": c, "requests": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.get(f"{url}/metrics") as r:
            out["metrics_before"] = _histograms(await r.text())
        if meter is not None:
            meter.mark()
        t0 = time.perf_counter()
        todo = [SIZES[i % len(SIZES)] for i in range(n_req)]

        async def worker(w: int) -> None:
            while todo:
                n = todo.pop()
                sent, times = await _stream(s, url, prompt_of(n, _nonce()), 32)
                out["requests"].append({"w": w, "n": n, "sent": sent - t0,
                                        "t": [x - t0 for x in times]})

        await asyncio.gather(*(worker(w) for w in range(c)))
        out["wall_s"] = time.perf_counter() - t0
        if meter is not None:
            out["cpu_api_engine_s"] = meter.mark()
        async with s.get(f"{url}/metrics") as r:
            out["metrics_after"] = _histograms(await r.text())
    return out


def workload(url: str, meter: CpuMeter | None) -> list[dict[str, Any]]:
    return [asyncio.run(level(url, c, 12, meter)) for c in (1, 2, 4)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probe-repeats", type=int, default=3)
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--out", type=Path, default=Path("out/levels"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"real": [], "emulator": []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        proc: subprocess.Popen[bytes] | None = None
        try:
            proc, url = start_real_engine(work)
            res["cores"] = stack.enter_context(split_cores(proc.pid))
            asyncio.run(warm_up(url))
            if a.profile is None:
                text, summary = asyncio.run(calibrate_endpoint(
                    url, fid.MODEL, model_profile=fid.MODEL, base="cpu", name=PROFILE_NAME,
                    precision="fp32", prompt_tokens=SWEEP, batches=(1, 2, 4),
                    repeats=a.probe_repeats))
                res["fit"] = summary
            else:
                text = a.profile.read_text()
            profile = work / "profile.yaml"
            profile.write_text(text)
            res["profile"] = text
            meter = CpuMeter(proc.pid)
            with emulator(PROFILE_NAME, profile, work) as emu_url:
                asyncio.run(warm_up(emu_url))
                for r in range(a.rounds):
                    pair = [("real", url), ("emulator", emu_url)]
                    for name, u in (pair if r % 2 == 0 else pair[::-1]):
                        res[name].append(workload(u, meter if name == "real" else None))
                        print(name, r, flush=True)
        finally:
            stack.close()
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(30)
    (a.out / "levels.json").write_text(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
