"""Lone cold-prefill TTFT on the fidelity vLLM by what came right before it (session 25).

Every probe prefill try (`Prober.prefill_once`) follows a one-token request (the cached resend of
the previous length's prompt), while the fidelity workload's closed loop sends each request right
after the previous request's 32-token stream ended. Here each timed request -- a fresh prompt of
LENGTHS tokens, ``max_tokens=1`` as the probe's cold try -- is sent with no pause right after one
of PRECEDERS: ``one`` a fresh one-token request (16-token prompt), ``cached`` the probe's own
order (a 64-token prompt sent cold, then again; the timed request follows the second, cached
one), ``sN`` a fresh 32-token prompt streamed with N output tokens (``ignore_eos``). Every
(preceder, length) pair once a round, shuffled; ROUNDS rounds. Engine pinned as the fidelity
test pins it. Medians (ms) over the rounds, and the median of each round's difference against
``one`` at the same length (paired within the round)."""
from __future__ import annotations

import asyncio
import json
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

ROUNDS = int(os.environ.get("ROUNDS", "14"))
PRECEDERS = ("one", "cached", "s2", "s4", "s8", "s32")
LENGTHS = (64, 384, 768)


async def before(p: Prober, s: aiohttp.ClientSession, kind: str) -> None:
    if kind == "one":
        await p.stream(s, prompt_of(p.words_for(16), _nonce()), 1)
    elif kind == "cached":
        prompt = prompt_of(p.words_for(64), _nonce())
        await p.stream(s, prompt, 1)
        await p.stream(s, prompt, 1)
    else:
        n = int(kind[1:])
        await p.stream(s, prompt_of(p.words_for(32), _nonce()), n)


async def measure(url: str) -> dict[str, dict[int, list[float]]]:
    p = Prober(url, fid.MODEL)
    out: dict[str, dict[int, list[float]]] = {k: {n: [] for n in LENGTHS} for k in PRECEDERS}
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)
        await p.warm_up(s)
        await p.open_connections(s)
        for _ in range(ROUNDS):
            pairs = [(k, n) for k in PRECEDERS for n in LENGTHS]
            random.shuffle(pairs)
            for k, n in pairs:
                await before(p, s, k)
                out[k][n].append(
                    (await p.stream(s, prompt_of(p.words_for(n), _nonce()), 1)).ttft_s)
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
    print("| before | " + " | ".join(f"{n} tok median (P10-P90) ms | vs one" for n in LENGTHS)
          + " |")
    print("|---|" + "---|---|" * len(LENGTHS))
    for k in PRECEDERS:
        cells = []
        for n in LENGTHS:
            xs = sorted(t * 1e3 for t in res[k][n])
            q = statistics.quantiles(xs, n=10, method="inclusive")
            d = statistics.median((a - b) * 1e3
                                  for a, b in zip(res[k][n], res["one"][n], strict=True))
            cells.append(f"{statistics.median(xs):.2f} ({q[0]:.2f}-{q[-1]:.2f}) | {d:+.2f}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    Path(os.environ.get("OUT_JSON", "after_stream.json")).write_text(json.dumps(
        {k: {str(n): [round(t * 1e3, 3) for t in v] for n, v in d.items()}
         for k, d in res.items()}))


if __name__ == "__main__":
    main()
