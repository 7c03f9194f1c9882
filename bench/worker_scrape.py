"""What one `/metrics` scrape costs under `inferplane serve --workers 2` (every worker's page
gathered over the workers' Unix sockets and merged, `telemetry.gather`) against a single
process, side by side in one run.

Real processes on loopback: a private `redis-server`, the fast fake upstream
(`tests/support/fake_upstream.py --mode fast`), the gateway with ``admission.store: redis`` run
first as one process (``--workers 1``: no supervisor, the page as prometheus_client renders it)
then with ``--workers 2``. Each gets ``--requests`` chat requests first (so its series exist),
then ``--scrapes`` sequential scrapes, each on a new connection (so the kernel hands them to
either worker). Prints per run the scrape's wall time (median, p90, p99), the page's bytes and
samples, and the gateway's CPU per scrape (all its processes, from ``/proc``; with nothing else
sent meanwhile, that is the scrape's cost plus the idle gateway's background, measured too over
the same wall time before the scrapes), and the 2-worker / 1-process ratios.

    .venv/bin/python bench/worker_scrape.py --scrapes 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.workers import _session_cpu, load, redis_and_upstream  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402
from tests.test_redis_outage import _config  # noqa: E402


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def scrapes(base: str, n: int) -> tuple[list[float], bytes]:
    """``n`` sequential scrapes, each on a new connection: their wall times and the last page."""
    out: list[float] = []
    page = b""
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(n):
            t0 = time.perf_counter()
            async with s.get(f"{base}/metrics") as r:
                page = await r.read()
                assert r.status == 200, page[:200]
            out.append(time.perf_counter() - t0)
    return out, page


def run(
    tmp: Path, up: int, redis_url: str, workers: int, requests: int, n: int
) -> dict[str, float]:
    port = free_port()
    cfg = tmp / f"gw{workers}.yaml"
    cfg.write_text(_config(port, up, redis_url, metrics={"public": True}))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--workers", str(workers),
               "--log-level", "warning"], tmp / f"gw{workers}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        gw.wait_http(f"{base}/ready")
        deadline = time.monotonic() + 20
        while workers > 1 and b"inferplane_worker_up" not in httpx.get(f"{base}/metrics").content:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # every worker listening, its socket too
        asyncio.run(load(base, requests, 16))
        asyncio.run(scrapes(base, 20))  # warm-up
        sid = gw.p.pid  # the gateway's session (its workers and exporter processes too)
        c0, t0 = _session_cpu(sid), time.perf_counter()
        times, page = asyncio.run(scrapes(base, n))
        wall = time.perf_counter() - t0
        busy = _session_cpu(sid) - c0
        i0 = _session_cpu(sid)
        time.sleep(wall)  # the idle gateway over as long: its background CPU
        idle = _session_cpu(sid) - i0
    finally:
        gw.stop()
    samples = sum(1 for line in page.splitlines() if line and not line.startswith(b"#"))
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": _quantile(times, 0.9) * 1e3,
        "p99_ms": _quantile(times, 0.99) * 1e3,
        "bytes": len(page),
        "samples": samples,
        "cpu_ms": busy / n * 1e3,
        "idle_cpu_ms": idle / n * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scrapes", type=int, default=300)
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    res: dict[int, dict[str, float]] = {}
    with redis_and_upstream() as (tmp, srv, _upstream, up):
        for workers in (1, 2):
            res[workers] = run(tmp, up, srv.url, workers, a.requests, a.scrapes)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| gateway | scrape median ms | p90 ms | p99 ms | page bytes | samples "
          "| gateway CPU ms per scrape | idle CPU ms over as long | net CPU ms per scrape |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, r in res.items():
        name = "1 process" if w == 1 else f"--workers {w}"
        print(f"| {name} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['bytes']:.0f} | {r['samples']:.0f} | {r['cpu_ms']:.2f} | "
              f"{r['idle_cpu_ms']:.2f} | {r['cpu_ms'] - r['idle_cpu_ms']:.2f} |")
    one, two = res[1], res[2]
    net1, net2 = (r["cpu_ms"] - r["idle_cpu_ms"] for r in (one, two))
    print(f"ratio 2 workers / 1 process: median {two['median_ms'] / one['median_ms']:.2f}x, "
          f"p99 {two['p99_ms'] / one['p99_ms']:.2f}x, net CPU per scrape {net2 / net1:.2f}x, "
          f"page bytes {two['bytes'] / one['bytes']:.2f}x")

if __name__ == "__main__":
    main()
