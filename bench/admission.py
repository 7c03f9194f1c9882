"""bench/admission: the latency admission adds, with budgets, rate limits and fairness on.

Two measurements, each side by side with admission off in the same run:

1. **stage**: `Admission.admit` + `Admission.finish` timed in-process per request (no HTTP), for
   admission off, on with the in-memory store, and on with Redis (127.0.0.1:6379);
2. **end to end**: three gateway processes (off / memory / redis) in front of one fast fake
   upstream, sequential non-streaming requests interleaved across them; added latency =
   percentile(on) − percentile(off).

The tenant has a tenant and a key budget (day, USD and tokens), requests/min and tokens/min
limits on tenant and key, a token ceiling, and the priority queue on (never saturated here, so
the fast path is what is measured). Prints a markdown table.

    python bench/admission.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from inferplane.api.pipeline import Gateway  # noqa: E402
from inferplane.config.loader import parse_config  # noqa: E402
from tests.builders import pool_fleet, tenant, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402

KEY = "sk-bench"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": 5}
TENANT = {  # the tenant's limits: high enough never to bind
    "budgets": [{"scope": "tenant", "window": "day", "usd": 1.0e9, "tokens": 1000000000000},
                {"scope": "key", "window": "day", "usd": 1.0e9}],
    "rate_limits": [{"scope": "tenant", "requests_per_min": 100000000,
                     "tokens_per_min": 1000000000},
                    {"scope": "key", "requests_per_min": 100000000}],
    "max_tokens_ceiling": 4096,
}


def config(port: int, up: int, store: str | None, prefix: str) -> str:
    return to_yaml(pool_fleet(
        up, substrate={"name": "api", "kind": "provider-api"},
        endpoint_fields={"name": "up", "max_concurrency": 1000},
        gateway={"port": port, "scrape_interval_s": 0.5},
        admission={"enabled": False} if store is None else {"store": store,
                                                            "redis_prefix": prefix},
        tenants=[tenant("t", KEY, **TENANT)]))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def stage(store: str | None, n: int, prefix: str) -> list[float]:
    gw = Gateway(parse_config(config(0, 1, store, prefix)))
    adm = gw.admission
    tenant, key_hash = gw.authenticate_key(f"Bearer {KEY}")
    headers = {"x-inferplane-workflow": "wf-bench"}
    out: list[float] = []
    for i in range(n):
        body = dict(BODY, messages=[{"role": "user", "content": f"hello {i} " * 20}])
        raw = repr(body).encode()
        profile = gw.classify("chat", body, headers, tenant)
        t0 = time.perf_counter()
        ticket = await adm.admit("chat", body, raw, headers, tenant, key_hash, profile)
        adm.placed(ticket)
        ticket.observe(0.0001, 40, 5)
        await adm.finish(ticket)
        out.append(time.perf_counter() - t0)
    await adm.close()
    return out[n // 10 :]  # drop warm-up


async def e2e(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in urls}
    async with aiohttp.ClientSession() as s:
        for i in range(n + 100):
            for name, url in urls.items():
                body = dict(BODY, messages=[{"role": "user", "content": f"hi {i} " * 20}])
                t0 = time.perf_counter()
                async with s.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{name}: HTTP {r.status}: {await r.text()}")
                if i >= 100:
                    out[name].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args()
    prefix = f"inferplane-bench-{os.getpid()}-{random.randrange(1 << 30)}:"
    stores: list[tuple[str, str | None]] = [("off", None), ("memory", "memory"), ("redis", "redis")]
    rows: list[tuple[str, str, list[float]]] = []
    for name, store in stores:
        rows.append(("stage (admit+finish)", name, asyncio.run(stage(store, a.requests, prefix))))

    tmp = Path(tempfile.mkdtemp())
    procs: list[Proc] = []
    try:
        up = free_port()
        p = Proc(["-m", "tests.support.fake_upstream", "--port", str(up), "--mode", "fast"],
                 tmp / "up.log")
        procs.append(p)
        p.wait_http(f"http://127.0.0.1:{up}/health")
        urls: dict[str, str] = {}
        for name, store in stores:
            port = free_port()
            (tmp / f"{name}.yaml").write_text(config(port, up, store, prefix + name))
            g = Proc(["-m", "inferplane.cli", "serve", "--config", str(tmp / f"{name}.yaml"),
                      "--log-level", "warning"], tmp / f"{name}.log")
            procs.append(g)
            g.wait_http(f"http://127.0.0.1:{port}/ready")
            urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
        res = asyncio.run(e2e(urls, a.requests))
        for name, _ in stores:
            rows.append(("end to end (HTTP)", name, res[name]))
    finally:
        for p in procs:
            p.stop()

    print(f"\nadmission overhead — {platform.node()} {platform.processor() or platform.machine()}"
          f", Python {platform.python_version()}, {date.today()}, {a.requests} requests each\n")
    print("| measurement | admission | p50 ms | p99 ms | mean ms | added p50 ms | added p99 ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base: dict[str, list[float]] = {}
    for what, name, xs in rows:
        if name == "off":
            base[what] = xs
        b = base[what]
        print(f"| {what} | {name} | {pct(xs, 50) * 1e3:.3f} | {pct(xs, 99) * 1e3:.3f} | "
              f"{sum(xs) / len(xs) * 1e3:.3f} | {(pct(xs, 50) - pct(b, 50)) * 1e3:+.3f} | "
              f"{(pct(xs, 99) - pct(b, 99)) * 1e3:+.3f} |")

    async def clean() -> None:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = [k async for k in r.scan_iter(match=prefix + "*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()

    asyncio.run(clean())


if __name__ == "__main__":
    main()
