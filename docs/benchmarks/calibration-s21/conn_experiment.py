"""calib21 experiment (not committed): what a new connection costs a lone TTFT and a burst."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp
import pytest

from inferplane.physics.probe import Prober, _nonce, prompt_of
from tests.fidelity.conftest import MODEL, EngineUnderTest
from tests.fidelity.cores import split_cores

pytestmark = pytest.mark.fidelity


async def _run(url: str) -> dict:
    out: dict = {k: [] for k in ("fresh96", "reused96", "fresh320", "reused320",
                                 "idle96", "burst_fresh", "burst_warm", "seq")}
    p = Prober(url, MODEL)
    async with aiohttp.ClientSession() as s:
        await p.learn_words_per_token(s)
        await p.warm_up(s)
    keep = aiohttp.ClientSession()
    await p.stream(keep, prompt_of(p.words_for(32), _nonce()), 1)
    for i in range(24):
        async with aiohttp.ClientSession() as s:  # as HeldOut.measure: a new session
            t = time.perf_counter()
            for n in (96, 320):
                a = await p.stream(s, prompt_of(p.words_for(n), _nonce()), 1)
                b = await p.stream(s, prompt_of(p.words_for(n), _nonce()), 1)
                out[f"fresh{n}" if n == 96 else f"reused{n}"].append(a.ttft_s * 1e3)
                out[f"reused{n}" if n == 96 else f"reused{n}"].append(b.ttft_s * 1e3)
            burst = await asyncio.gather(*(p.stream(s, prompt_of(p.words_for(320), _nonce()), 1)
                                           for _ in range(3)))
            out["burst_fresh"].append(sorted(x.ttft_s * 1e3 for x in burst))
            burst = await asyncio.gather(*(p.stream(s, prompt_of(p.words_for(320), _nonce()), 1)
                                           for _ in range(3)))
            out["burst_warm"].append(sorted(x.ttft_s * 1e3 for x in burst))
        async with aiohttp.ClientSession() as s:  # a fresh session, 320 first
            a = await p.stream(s, prompt_of(p.words_for(320), _nonce()), 1)
            out["fresh320"].append(a.ttft_s * 1e3)
        if i % 4 == 3:  # the kept session's connection after > 5 s idle (keep-alive timeout)
            await asyncio.sleep(6.0)
            a = await p.stream(keep, prompt_of(p.words_for(96), _nonce()), 1)
            out["idle96"].append(a.ttft_s * 1e3)
    await keep.close()
    return out


def test_conn(real_engine: EngineUnderTest) -> None:
    with split_cores(real_engine.pid) as cores:
        out = asyncio.run(_run(real_engine.url))
    out["cores"] = cores
    summ = {}
    for k, v in out.items():
        if k in ("cores", "seq") or not v:
            continue
        if isinstance(v[0], list):
            summ[k] = [round(statistics.median(r[i] for r in v), 3) for i in range(3)]
        else:
            summ[k] = (round(statistics.median(v), 3), len(v))
    out["summary"] = summ
    with open("/work/exp/calib21/conn.json", "w") as f:
        json.dump(out, f)
    print(json.dumps(summ))
