"""bench/fairness: does a flooding tenant move another tenant's P99 TTFT?

An upstream with a fixed number of slots (``--slots``; requests beyond them wait FIFO inside the
upstream, as in an engine's queue) streams 5 chunks: the first after ``--ttft`` ms, then one every
``--itl`` ms. The gateway (a real process) has one endpoint with ``max_concurrency = slots``.

Tenant B ("victim") sends an open-loop Poisson stream at ``--rate`` req/s; tenant A ("flood")
runs ``--flood`` closed-loop clients. Three runs, B measured each time:

1. B alone;
2. A floods, admission queue on (strict priority; fair shares of the pool's slots with a
   reserve for tenants below their share; VTC inside a band);
3. A floods, admission queue off (requests go straight to the upstream's FIFO queue).

Target: P99 TTFT of B under flood within 20 % of B alone. Prints a markdown table.

    python bench/fairness.py [--seconds 15] [--slots 8] [--flood 64] [--rate 10]
                             [--reserve-fraction F] [--no-fair-share]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.builders import pool_fleet, tenant, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402

KEYS = {"flood": "sk-flood", "victim": "sk-victim"}


# -- the upstream with slots ------------------------------------------------------------------
def upstream_app(slots: int, ttft: float, itl: float) -> web.Application:
    sem = asyncio.Semaphore(slots)

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        async with sem:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await asyncio.sleep(ttft)
            await resp.prepare(request)
            for i in range(5):
                if i:
                    await asyncio.sleep(itl)
                chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
                await resp.write(b"data: " + repr(chunk).replace("'", '"').encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    return app


def config(port: int, up: int, slots: int, queue: bool,
           fair: dict[str, Any] | None = None) -> str:
    """The gateway's fleet file; ``fair``: more ``admission.queue`` fields."""
    return to_yaml(pool_fleet(
        up, substrate={"cost": {"hourly_usd": 2}},
        endpoint_fields={"name": "up", "max_concurrency": slots},
        gateway={"port": port, "scrape_interval_s": 0.5, "upstream_timeout_s": 60},
        admission={"queue": {"enabled": queue, "default_deadline_ms": 30000,
                             "max_waiting": 100000, **(fair or {})}},
        tenants=[tenant("flood", KEYS["flood"]), tenant("victim", KEYS["victim"])]))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))] if s else float("nan")


async def ttft(s: aiohttp.ClientSession, url: str, tenant: str) -> float:
    body = {"model": "m", "stream": True, "max_tokens": 5,
            "messages": [{"role": "user", "content": f"hello {random.random()}"}]}
    t0 = time.perf_counter()
    async with s.post(url, json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        first = None
        async for _ in r.content.iter_any():
            if first is None:
                first = time.perf_counter() - t0
        return first if first is not None else float("nan")


async def scenario(url: str, seconds: float, rate: float, flood: int) -> list[float]:
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def flooder() -> None:
            while time.perf_counter() < stop:
                await ttft(s, url, "flood")

        floods = [asyncio.create_task(flooder()) for _ in range(flood)]
        await asyncio.sleep(1.0 if flood else 0)  # let the flood build up
        rng = random.Random(1)
        victims: list[asyncio.Task[float]] = []
        while time.perf_counter() < stop:
            victims.append(asyncio.create_task(ttft(s, url, "victim")))
            await asyncio.sleep(rng.expovariate(rate))
        out = list(await asyncio.gather(*victims))
        for f in floods:
            f.cancel()
        await asyncio.gather(*floods, return_exceptions=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--flood", type=int, default=64)
    ap.add_argument("--rate", type=float, default=10)
    ap.add_argument("--ttft", type=float, default=50, help="upstream TTFT, ms")
    ap.add_argument("--itl", type=float, default=5, help="upstream inter-token gap, ms")
    ap.add_argument("--reserve-fraction", type=float,
                    help="admission.queue.reserve_fraction (default: the gateway's)")
    ap.add_argument("--no-fair-share", action="store_true",
                    help="admission.queue.fair_share: false (VTC order only, as before issue 5 §6)")
    a = ap.parse_args()
    if a.serve_upstream:
        web.run_app(upstream_app(a.slots, a.ttft / 1e3, a.itl / 1e3), host="127.0.0.1",
                    port=a.serve_upstream, print=None)
        return
    tmp = Path(tempfile.mkdtemp())
    up = free_port()
    procs = [Proc([str(Path(__file__)), "--serve-upstream", str(up), "--slots", str(a.slots),
                   "--ttft", str(a.ttft), "--itl", str(a.itl)], tmp / "up.log")]
    results: dict[str, list[float]] = {}
    try:
        procs[0].wait_http(f"http://127.0.0.1:{up}/health")
        for name, queue, flood in [("B alone", True, 0), ("B + flood, queue on", True, a.flood),
                                   ("B + flood, queue off", False, a.flood)]:
            port = free_port()
            fair: dict[str, Any] = {}
            if a.reserve_fraction is not None:
                fair["reserve_fraction"] = a.reserve_fraction
            if a.no_fair_share:
                fair["fair_share"] = False
            (tmp / "gw.yaml").write_text(config(port, up, a.slots, queue, fair))
            g = Proc(["-m", "inferplane.cli", "serve", "--config", str(tmp / "gw.yaml"),
                      "--log-level", "warning"], tmp / f"gw-{port}.log")
            procs.append(g)
            g.wait_http(f"http://127.0.0.1:{port}/ready")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results[name] = asyncio.run(scenario(url, a.seconds, a.rate, flood))
            g.stop()
    finally:
        for p in procs:
            p.stop()
    alone = pct(results["B alone"], 99)
    print(f"\nfairness — {platform.node()}, Python {platform.python_version()}, {date.today()}; "
          f"upstream {a.slots} slots, TTFT {a.ttft:g} ms, ITL {a.itl:g} ms; victim "
          f"{a.rate:g} req/s Poisson, flood {a.flood} closed-loop clients, {a.seconds:g} s; "
          f"fair share {'off' if a.no_fair_share else 'on'}, reserve fraction "
          f"{'default' if a.reserve_fraction is None else a.reserve_fraction}\n")
    print("| scenario | victim requests | P50 TTFT ms | P99 TTFT ms | P99 vs alone |")
    print("|---|---:|---:|---:|---:|")
    for name, xs in results.items():
        p99 = pct(xs, 99)
        print(f"| {name} | {len(xs)} | {pct(xs, 50) * 1e3:.1f} | {p99 * 1e3:.1f} | "
              f"{(p99 / alone - 1) * 100:+.0f} % |")


if __name__ == "__main__":
    main()
