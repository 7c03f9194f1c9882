"""Four concurrent fresh prefills, real fidelity vLLM against the emulator running a profile
calibrated on it in the same minutes (session 25).

The fidelity workload's concurrency-4 level sends, in each of its three bursts, four fresh
prompts of 768, 384, 128 and 32 tokens (32 output tokens each) at about the same time: at
once for the first (the level's start), and each worker's next request right after its own
stream ended for the second and third. Here, after `calibrate_endpoint` (the fidelity test's
sweep; its profile written out), each of ROUNDS rounds sends, on the real engine and then on
the emulator (`inferplane emulate`, the profile, the fidelity engine settings):

* ``cold``: the four sizes at once (768 first, the workload's order), one output token each,
  right after a one-token request;
* ``after``: four 32-token streams of fresh 32-token prompts started together, each worker
  sending its size (one output token) the moment its own stream ended;
* ``wl``: the workload's own level, four closed-loop workers, 32 output tokens, 12 requests
  (three bursts; the TTFT per size pooled over the bursts after the first).

Per size and case: median TTFT (ms) over the rounds, real and emulator. Engine pinned as the
fidelity test pins it."""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path[:0] = ["src", "."]
from bench.calibration import (  # noqa: E402
    PROFILE_NAME,
    SWEEP,
    emulator,
    start_real_engine,
    warm_up,
)
from inferplane.physics.probe import (  # noqa: E402
    Prober,
    _nonce,
    calibrate_endpoint,
    prompt_of,
    run_workload,
)
from tests.fidelity import conftest as fid  # noqa: E402
from tests.fidelity.cores import split_cores  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "15"))
SIZES = (768, 384, 128, 32)


async def measure(url: str) -> dict[str, dict[int, list[float]]]:
    p = Prober(url, fid.MODEL)
    out: dict[str, dict[int, list[float]]] = {k: {n: [] for n in SIZES}
                                              for k in ("cold", "after", "wl")}
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)
        await p.warm_up(s)
        await p.open_connections(s, 4)

        async def after(n: int) -> float:
            await p.stream(s, prompt_of(p.words_for(32), _nonce()), 32)
            return (await p.stream(s, prompt_of(p.words_for(n), _nonce()), 1)).ttft_s

        for _ in range(ROUNDS):
            await p.stream(s, prompt_of(p.words_for(16), _nonce()), 1)
            got = await asyncio.gather(*(p.stream(s, prompt_of(p.words_for(n), _nonce()), 1)
                                         for n in SIZES))
            for n, g in zip(SIZES, got, strict=True):
                out["cold"][n].append(g.ttft_s)
            for n, t in zip(SIZES, await asyncio.gather(*(after(n) for n in SIZES)),
                            strict=True):
                out["after"][n].append(t)
            w = await run_workload(url, fid.MODEL, concurrency=(4,), requests_per_level=12)
            for i, (n, t) in enumerate(zip(w.ttft_prompt, w.ttft_s, strict=True)):
                if i >= 4:  # the bursts after the first: each after a stream ended
                    out["wl"][n].append(t)
    return out


def main() -> None:
    res: dict[str, dict[str, dict[int, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, url = start_real_engine(work)
        try:
            time.sleep(2)
            with split_cores(proc.pid) as cores:
                asyncio.run(warm_up(url))
                t0 = time.time()
                text, summary = asyncio.run(calibrate_endpoint(
                    url, fid.MODEL, model_profile=fid.MODEL, base="cpu", name=PROFILE_NAME,
                    precision="fp32", prompt_tokens=SWEEP, batches=(1, 2, 4), repeats=5))
                print(f"probe {time.time() - t0:.1f} s; {summary.splitlines()[-1]}")
                profile = work / "profile.yaml"
                profile.write_text(text)
                t0 = time.time()
                res["real"] = asyncio.run(measure(url))
                print(f"cores {cores}; real {ROUNDS} rounds in {time.time() - t0:.1f} s; "
                      f"load {os.getloadavg()[0]:.2f}")
                with emulator(PROFILE_NAME, profile, work) as emu:
                    asyncio.run(warm_up(emu))
                    t0 = time.time()
                    res["emulator"] = asyncio.run(measure(emu))
                    print(f"emulator {ROUNDS} rounds in {time.time() - t0:.1f} s")
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
        Path(os.environ.get("OUT_PROFILE", "c4_profile.yaml")).write_text(text)
    print("| case | " + " | ".join(f"{n} tok real / emu ms" for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for k in ("cold", "after", "wl"):
        cells = []
        for n in SIZES:
            r = statistics.median(res["real"][k][n]) * 1e3
            e = statistics.median(res["emulator"][k][n]) * 1e3
            cells.append(f"{r:.1f} / {e:.1f} ({(e - r) / r:+.0%})")
        print(f"| {k} | " + " | ".join(cells) + " |")
    Path(os.environ.get("OUT_JSON", "c4_burst.json")).write_text(json.dumps(
        {side: {k: {str(n): [round(t * 1e3, 3) for t in v] for n, v in d.items()}
                for k, d in r.items()} for side, r in res.items()}))


if __name__ == "__main__":
    main()
