"""Lone TTFT on the fidelity vLLM by request shape: max_tokens=1 (the probe's and held-out
prefill requests) against max_tokens=32 with ignore_eos/min_tokens (the workload's), fresh
prompts of 32/384/768 tokens, interleaved, back to back; and max_tokens=1 after 0.2 s idle.
Engine pinned as the fidelity test pins it. Medians (ms) over the rounds."""
from __future__ import annotations

import asyncio
import os
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

ROUNDS = 12
SIZES = (32, 384, 768)


async def measure(url: str) -> dict[str, dict[int, list[float]]]:
    p = Prober(url, fid.MODEL)
    out: dict[str, dict[int, list[float]]] = {k: {n: [] for n in SIZES}
                                              for k in ("mt1", "mt32", "mt1_idle", "mt32_idle")}
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)
        await p.warm_up(s)
        await p.open_connections(s)
        for _ in range(ROUNDS):
            for n in SIZES:
                w = p.words_for(n)
                out["mt1"][n].append((await p.stream(s, prompt_of(w, _nonce()), 1)).ttft_s)
                out["mt32"][n].append((await p.stream(s, prompt_of(w, _nonce()), 32)).ttft_s)
                await asyncio.sleep(0.2)
                out["mt1_idle"][n].append((await p.stream(s, prompt_of(w, _nonce()), 1)).ttft_s)
                await asyncio.sleep(0.2)
                out["mt32_idle"][n].append((await p.stream(s, prompt_of(w, _nonce()), 32)).ttft_s)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_real_engine(Path(tmp))
        try:
            time.sleep(2)
            with split_cores(proc.pid) as cores:
                t0 = time.time()
                res = asyncio.run(measure(url))
                print(f"cores {cores}; {ROUNDS} rounds in {time.time() - t0:.1f} s; "
                      f"load {os.getloadavg()[0]:.2f}")
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
    print("| shape | " + " | ".join(f"{n} tok median (P10-P90) ms" for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for k, by in res.items():
        cells = []
        for n in SIZES:
            xs = sorted(t * 1e3 for t in by[n])
            q = statistics.quantiles(xs, n=10, method="inclusive")
            cells.append(f"{statistics.median(xs):.2f} ({q[0]:.2f}-{q[-1]:.2f})")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
