"""bench/peers/direct_replay.py: the real-engine bench's slice straight to the engines, no router.

    python bench/peers/direct_replay.py [--executor uni|mp] [--duration 20] [--runs 2]

Starts three vLLM CPU engines as ``real_engines.py`` does (``--executor``: where each runs its
model), then sends the Mooncake slice's requests (the same prompts, ``--block-tokens 32``,
output capped at 16) open-loop straight to them, request ``i`` to engine ``i mod 3``, ``--runs``
times with the prefix caches reset in between. Prints every request's TTFT and E2E (ms) and, per
run, P50 / P90 / max TTFT and how many requests waited over 500 ms for their first token; exits
1 when a request failed. Before the runs each engine prefills the slice's longest prompt once
(then its cache is reset). Prompts are text (``completion-text``), as inferplane and
sglang-router get them in ``real_engines.py``.

What it is for: telling the engines' own latency from a router's. With vLLM's CPU default
(``mp``: the model in a worker process, each step handed over a shared-memory queue) on three
engines sharing two cores, TTFT falls on steps of ~1.1 s with no router at all
(docs/benchmarks.md, "Real engines, session 13").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402

from bench.peers import real_engines  # noqa: E402
from bench.peers.client import Record, send  # noqa: E402
from bench.peers.run import DEFAULT_TRACE  # noqa: E402
from bench.peers.workload import Planned, SliceSpec, body, plan  # noqa: E402
from inferplane.twin.traces.loader import load_trace  # noqa: E402


async def replay(urls: list[str], planned: list[Planned], bodies: list[bytes]) -> list[Record]:
    recs = [Record(p.index) for p in planned]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            delay = t0 + planned[i].arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(s, urls[i % len(urls)] + "/v1/completions", bodies[i],
                       {"Content-Type": "application/json"}, recs[i], 120.0)

        await asyncio.gather(*(one(i) for i in range(len(planned))))
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executor", choices=real_engines.EXECUTORS, default="uni")
    ap.add_argument("--start", type=float, default=0.0)
    ap.add_argument("--duration", type=float, default=20.0, help="trace seconds per run")
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args(argv)
    planned, _ = plan(load_trace(DEFAULT_TRACE),
                      SliceSpec(start_s=a.start, duration_s=a.duration, max_output=16))
    bodies = [orjson.dumps(body(p, "completion-text", real_engines.MODEL, real_engines.BLOCK))
              for p in planned]
    work = Path(tempfile.mkdtemp(prefix="ip-direct-"))
    try:
        engines = real_engines.start_engines(3, 1024, 16, work, executor=a.executor)
        urls = [u for u, _ in engines]
        git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip() or "?"
        print(f"python bench/peers/direct_replay.py {' '.join(sys.argv[1:])}: git {git}, "
              f"{real_engines.versions()}, load {os.getloadavg()[0]:.1f}, {len(planned)} "
              "requests", flush=True)
        # warm-up: the slice's longest prompt once on each engine (a long prefill's first run
        # is slower), then empty caches
        longest = bodies[max(range(len(planned)), key=lambda i: planned[i].input_tokens)]
        for u in urls:
            httpx.post(f"{u}/v1/completions", content=longest, timeout=120,
                       headers={"Content-Type": "application/json"}).raise_for_status()
            httpx.post(f"{u}/reset_prefix_cache", timeout=10).raise_for_status()
        failed = 0
        for run in range(a.runs):
            recs = asyncio.run(replay(urls, planned, bodies))
            ttft = [1e3 * r.ttft_s for r in recs if r.ttft_s is not None]
            failed += sum(not r.ok for r in recs)
            for p, r in zip(planned, recs, strict=True):
                print(f"run {run} req {p.index} t {p.arrival_s:.3f} input {p.input_tokens} "
                      f"engine {p.index % 3} ttft_ms "
                      f"{'-' if r.ttft_s is None else round(1e3 * r.ttft_s)} e2e_ms "
                      f"{'-' if r.e2e_s is None else round(1e3 * r.e2e_s)}"
                      f"{'' if r.error is None else ' error ' + r.error}")
            if ttft:
                ttft.sort()
                print(f"run {run} executor {a.executor}: {len(ttft)} answered of {len(recs)}; "
                      f"TTFT p50 {statistics.median(ttft):.0f} p90 (nearest rank) "
                      f"{ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]:.0f} max {ttft[-1]:.0f} "
                      f"ms; over 500 ms: {sum(t > 500 for t in ttft)}", flush=True)
            for u in urls:
                httpx.post(f"{u}/reset_prefix_cache", timeout=10).raise_for_status()
            time.sleep(1.0)
    finally:
        real_engines.stop_engines()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
