"""Lone TTFT on the fidelity vLLM by the idle gap before it: a 32-token stream (the fidelity
workload's request: 32 output tokens, ignore_eos), then a pause of each of GAPS seconds (0: the
next request sent as soon as the stream ended, as the workload's closed loop does at
concurrency 1), then a fresh 384-token request with 32 output tokens, timed. Gaps shuffled in
every round. Engine pinned as the fidelity test pins it. Medians (ms) over the rounds."""
from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path[:0] = ["src", "."]
from bench.calibration import start_real_engine  # noqa: E402
from inferplane.physics.probe import Prober, _nonce, prompt_of  # noqa: E402
from tests.fidelity import conftest as fid  # noqa: E402
from tests.fidelity.cores import split_cores  # noqa: E402

ROUNDS = 14
GAPS = (0.0, 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2)
TOKENS = 384


async def measure(url: str) -> tuple[dict[float, list[float]], list[float]]:
    p = Prober(url, fid.MODEL)
    out: dict[float, list[float]] = {g: [] for g in GAPS}
    real_gap: list[float] = []
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)
        await p.warm_up(s)
        await p.open_connections(s)
        w = p.words_for(TOKENS)
        for _ in range(ROUNDS):
            gaps = list(GAPS)
            random.shuffle(gaps)
            for g in gaps:
                await p.stream(s, prompt_of(p.words_for(32), _nonce()), 32)
                ended = time.perf_counter()
                if g:
                    await asyncio.sleep(g)
                prompt = prompt_of(w, _nonce())
                if not g:
                    real_gap.append(time.perf_counter() - ended)
                out[g].append((await p.stream(s, prompt, 32)).ttft_s)
    return out, real_gap


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_real_engine(Path(tmp))
        try:
            time.sleep(2)
            with split_cores(proc.pid) as cores:
                t0 = time.time()
                res, real_gap = asyncio.run(measure(url))
                print(f"cores {cores}; {ROUNDS} rounds in {time.time() - t0:.1f} s; "
                      f"load {os.getloadavg()[0]:.2f}")
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
    print(f"gap-0 client turnaround median {statistics.median(real_gap) * 1e6:.0f} us")
    print(f"| gap s | {TOKENS} tok TTFT median (P10-P90) ms | minus gap 0 |")
    print("|---|---|---|")
    base = statistics.median(res[0.0])
    for g in GAPS:
        xs = sorted(t * 1e3 for t in res[g])
        q = statistics.quantiles(xs, n=10, method="inclusive")
        m = statistics.median(xs)
        print(f"| {g} | {m:.2f} ({q[0]:.2f}-{q[-1]:.2f}) | {m - base * 1e3:+.2f} |")


if __name__ == "__main__":
    main()
