"""`inferplane serve --workers 2` against one worker, side by side in one run.

Real processes on loopback: a private `redis-server`, the fast fake upstream
(`tests/support/fake_upstream.py --mode fast`), the gateway with ``admission.store: redis`` run
first with ``--workers 1`` then with ``--workers 2`` (same fleet file), and this script's
closed-loop client (aiohttp, ``--concurrency`` connections, ``--requests`` non-streamed chat
requests after a warm-up). Prints requests/s of each and the ratio, and where the CPU went over
each timed run: the gateway's processes (the supervisor and its workers), the upstream, Redis,
this client, and the whole machine's busy share (``/proc/stat``), so that a ratio held down by
a machine with no idle core says so. ``gateway req per CPU-s`` is throughput per second of
gateway CPU: equal for 1 and 2 workers means a second worker scales with the core it gets.

    .venv/bin/python bench/workers.py --requests 3000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.procs import Proc, free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.test_redis_outage import KEYS, _config  # noqa: E402


def _session_cpu(sid: int) -> float:
    """utime + stime (seconds) of every live process in session ``sid``."""
    tck, total = os.sysconf("SC_CLK_TCK"), 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[3]) == sid:
            total += int(f[11]) + int(f[12])
    return total / tck


def _machine() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


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


@contextlib.contextmanager
def redis_and_upstream() -> Iterator[tuple[Path, RedisServer, Proc, int]]:
    """A temporary directory, a Redis server in it (the workers' shared admission store) and a
    fast fake upstream, up: (the directory, the Redis server, the upstream, its port); both
    stopped on the way out."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        srv = RedisServer(tmp)
        up = free_port()
        upstream = Proc(["-m", "tests.support.fake_upstream", "--port", str(up), "--mode",
                         "fast"], tmp / "up.log")
        try:
            upstream.wait_http(f"http://127.0.0.1:{up}/health")
            yield tmp, srv, upstream, up
        finally:
            upstream.stop()
            srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    results = {}
    cpu: dict[int, dict[str, float]] = {}
    with redis_and_upstream() as (tmp, srv, upstream, up):
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
                pids = {"gateway": gw.p.pid, "upstream": upstream.p.pid, "redis": srv.p.pid}
                c0 = {k: _session_cpu(v) for k, v in pids.items()}
                m0, me0, t0 = _machine(), time.process_time(), time.perf_counter()
                results[workers] = asyncio.run(load(base, a.requests, a.concurrency))
                wall = time.perf_counter() - t0
                m1 = _machine()
                cpu[workers] = {k: (_session_cpu(v) - c0[k]) / wall for k, v in pids.items()}
                cpu[workers]["client"] = (time.process_time() - me0) / wall
                cpu[workers]["machine busy"] = (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
                cpu[workers]["gw_s"] = cpu[workers]["gateway"] * wall
            finally:
                gw.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| workers | req/s | errors | gateway CPUs | upstream CPUs | redis CPUs | client CPUs "
          "| machine busy | gateway req per CPU-s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, (rps, err) in results.items():
        c = cpu[w]
        print(f"| {w} | {rps:.0f} | {err} | {c['gateway']:.2f} | {c['upstream']:.2f} | "
              f"{c['redis']:.2f} | {c['client']:.2f} | {c['machine busy']:.0%} | "
              f"{a.requests / c['gw_s']:.0f} |")
    print(f"(CPUs: CPU-seconds per wall second over the timed run; the machine has "
          f"{os.cpu_count()})")
    print(f"ratio 2 / 1: {results[2][0] / results[1][0]:.2f}x")


if __name__ == "__main__":
    main()
