"""bench/failover: how fast a failing endpoint is ejected, and what clients see meanwhile.

Three OpenAI-compatible fake upstreams (`tests.support.fake_upstream`) of one peer group behind an
in-process gateway: two answer, one is faulty while its ``/health`` stays green —

- ``fail500``: answers HTTP 500 before any byte;
- ``hang``: accepts the request and never answers (a hung engine).

``--clients`` concurrent clients send streamed chat requests at about ``--rate`` requests/s in
all for ``--seconds`` (bounded by ``--requests``). A watcher polls the faulty endpoint's
``ejected`` flag every 5 ms. Reported per scenario and variant: the outcomes the faulty
endpoint produced before its ejection (attempts the gateway sent it), seconds from the first
request to the ejection, client errors (any non-200 or client timeout), and client P99 latency.

Variants run side by side in one run: ``baseline`` switches the new failure semantics off (no
consecutive-failure ejection, no first-byte timeout, one re-placement, no error-rate term in
predicted-latency: the behaviour before issue 10 item 5); ``default`` is the shipped
configuration; ``baseline+errsig`` is the baseline with the error-rate placement signal
(predicted-latency's expected retry cost) and ``default-errsig0`` the shipped configuration
without it (``error_weight: 0``), to measure that signal alone. Also reported: every attempt the
faulty endpoint got in the whole run (half-open returns included).

    python bench/failover.py [--seconds 12] [--clients 8] [--rate 40] [--variants a,b,...]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from inferplane.api.app import serve  # noqa: E402
from inferplane.api.pipeline import Gateway  # noqa: E402
from inferplane.config.loader import parse_config  # noqa: E402
from tests.builders import endpoint, pool_fleet, to_yaml  # noqa: E402
from tests.support.fake_upstream import build  # noqa: E402
from tests.support.procs import free_port  # noqa: E402

KEY = "sk-failover"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": 5,
        "stream": True}

_OLD: tuple[dict[str, Any], dict[str, Any]] = (
    {"max_replacements": 1, "first_byte_timeout": {"enabled": False}},
    {"consecutive_5xx": None, "consecutive_timeouts": None},
)
_NO_ERRSIG = {"plugins": [{"type": "predicted-latency", "parameters": {"error_weight": 0}}]}
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # (gateway keys, health.outlier keys, extra top-level blocks)
    "baseline": (*_OLD, _NO_ERRSIG),
    "baseline+errsig": (*_OLD, {}),  # the old semantics plus the error-rate placement signal
    "default-errsig0": ({}, {}, _NO_ERRSIG),  # the shipped semantics without that signal
    "default": ({}, {}, {}),
}


def config(port: int, ups: dict[str, int], variant: str) -> str:
    gw, outlier, extra = VARIANTS[variant]
    return to_yaml(pool_fleet(
        gateway={"port": port, "scrape_interval_s": 0.1, **gw},
        health={"outlier": dict(outlier)},
        substrate={"zone": "r1-a", "cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint(name, p) for name, p in ups.items()],
        key=KEY,
        **extra,
    ))


@dataclass
class Result:
    outcomes_before_ejection: int | None = None
    seconds_to_eject: float | None = None
    faulty_attempts: int = 0  # attempts the faulty endpoint got in the whole run
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def p99(self) -> float:
        s = sorted(self.latencies)
        return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] if s else float("nan")


async def scenario(
    fault: str, variant: str, seconds: float, clients: int, cap: int, rate: float
) -> Result:
    names = {"bad": fault, "ok-1": "ok", "ok-2": "ok"}
    ports = {n: free_port() for n in names}
    runners = []
    for n, mode in names.items():
        r = web.AppRunner(build(n, mode, 0.0), handler_cancellation=True)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", ports[n]).start()
        runners.append(r)
    gw_port = free_port()
    gw = Gateway(parse_config(config(gw_port, ports, variant)))
    runner = await serve(gw, "127.0.0.1", gw_port)
    res = Result()
    url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    t0 = time.perf_counter()
    stop = t0 + seconds

    async def watch() -> None:
        rec = gw.live.live["bad"]
        while res.seconds_to_eject is None:
            if rec.ejected:
                res.seconds_to_eject = time.perf_counter() - t0
                res.outcomes_before_ejection = rec.requests_total
            await asyncio.sleep(0.005)

    async def client(s: aiohttp.ClientSession) -> None:
        gap = clients / rate
        while time.perf_counter() < stop and res.requests < cap:
            res.requests += 1
            start = time.perf_counter()
            nxt = start + gap
            try:
                async with s.post(url, json=BODY) as r:
                    await r.read()
                    if r.status != 200:
                        res.errors += 1
            except (TimeoutError, aiohttp.ClientError):
                res.errors += 1
            res.latencies.append(time.perf_counter() - start)
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    watcher = asyncio.create_task(watch())
    timeout = aiohttp.ClientTimeout(total=seconds + 5)
    try:
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout
        ) as s:
            await asyncio.gather(*(client(s) for _ in range(clients)))
    finally:
        watcher.cancel()
        res.faulty_attempts = gw.live.live["bad"].requests_total
        await runner.cleanup()
        for r in runners:
            await r.cleanup()
    return res


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s offered (all clients)")
    ap.add_argument("--requests", type=int, default=3000, help="cap per scenario")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    print(f"bench/failover.py, {date.today()}, {platform.machine()}, Python "
          f"{platform.python_version()}, {a.clients} clients, ~{a.rate:g} req/s, "
          f"{a.seconds:g} s per scenario\n")
    print("| faulty endpoint | variant | outcomes before ejection | seconds to eject | "
          "faulty attempts, whole run | requests | client errors | client P99 s |")
    print("|---|---|---|---|---|---|---|---|")
    for fault in ("fail500", "hang"):
        for v in variants:
            r = await scenario(fault, v, a.seconds, a.clients, a.requests, a.rate)
            out = "not ejected" if r.outcomes_before_ejection is None else str(
                r.outcomes_before_ejection)
            sec = "-" if r.seconds_to_eject is None else f"{r.seconds_to_eject:.2f}"
            print(f"| {fault} | {v} | {out} | {sec} | {r.faulty_attempts} | {r.requests} | "
                  f"{r.errors} | "
                  f"{r.p99():.2f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
