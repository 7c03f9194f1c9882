"""`inferplane serve --workers 2` against one worker, side by side in one run.

Real processes on loopback: a private `redis-server`, the fast fake upstream
(`tests/support/fake_upstream.py --mode fast`), the gateway with ``admission.store: redis`` run
first with ``--workers 1`` then with ``--workers 2`` (same fleet file), and this script's
closed-loop client (aiohttp, ``--concurrency`` connections, ``--requests`` non-streamed chat
requests after a warm-up). Prints requests/s of each and the ratio.

    .venv/bin/python bench/workers.py --requests 3000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.procs import Proc, free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.test_redis_outage import KEYS, _config  # noqa: E402


async def load(base: str, requests: int, concurrency: int) -> tuple[float, int]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    seq = iter(range(1 << 60))
    errors = 0
    done = 0

    async def one(s: aiohttp.ClientSession) -> None:
        nonlocal errors, done
        while True:
            i = next(seq)
            if i >= requests:
                return
            h = {"Authorization": f"Bearer {KEYS['plain']}", "Idempotency-Key": f"w{i}"}
            async with s.post(f"{base}/v1/chat/completions", json=body, headers=h) as r:
                await r.read()
                errors += r.status != 200
            done += 1

    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(s) for _ in range(concurrency)))
        return requests / (time.perf_counter() - t0), errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        srv = RedisServer(tmp)
        up = free_port()
        upstream = Proc(["-m", "tests.support.fake_upstream", "--port", str(up), "--mode",
                         "fast"], tmp / "up.log")
        results = {}
        try:
            upstream.wait_http(f"http://127.0.0.1:{up}/health")
            for workers in (1, 2):
                port = free_port()
                cfg = tmp / f"gw{workers}.yaml"
                cfg.write_text(_config(port, up, srv.url))
                gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--workers",
                           str(workers), "--log-level", "warning"], tmp / f"gw{workers}.log")
                try:
                    base = f"http://127.0.0.1:{port}"
                    gw.wait_http(f"{base}/ready")
                    time.sleep(1.0)  # every worker listening
                    asyncio.run(load(base, 300, a.concurrency))  # warm-up
                    results[workers] = asyncio.run(load(base, a.requests, a.concurrency))
                finally:
                    gw.stop()
        finally:
            upstream.stop()
            srv.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| workers | req/s | errors |\n|---|---:|---:|")
    for w, (rps, err) in results.items():
        print(f"| {w} | {rps:.0f} | {err} |")
    print(f"ratio 2 / 1: {results[2][0] / results[1][0]:.2f}x")


if __name__ == "__main__":
    main()
