"""The chaos suite (issue 12): kill engines, the gateway and Redis under bounded load, and assert
what clients saw, what was recorded and what was billed. Real processes on loopback: two emulated
vLLM engines (one process each), the gateway, and a redis-server the test starts.

Run with ``make chaos`` (marker ``chaos``); ``.ci/run`` runs it with CHAOS_REQUESTS=40.
docs/reliability.md lists each probe and what it measured.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.chaos

N = int(os.environ.get("CHAOS_REQUESTS", "120"))  # requests per probe (bounded load)
CONCURRENCY = 12
KEYS = {"plain": "sk-chaos-plain", "budget": "sk-chaos-budget"}
MODEL = "llama-3.1-8b"


def fleet(gw_port: int, ports: list[int], tmp: Path, redis_url: str | None = None) -> str:
    admission = {"admission": {
        "store": "redis", "redis_url": redis_url, "redis_prefix": "chaos:",
        "redis_timeout_s": 0.3, "outage_retry_after_s": 0.5,
    }} if redis_url else {}
    return to_yaml(pool_fleet(
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "token_estimate": "words",
                 "ledger_path": str(tmp / "ledger.sqlite"), "max_replacements": 1},
        **admission,
        substrate={"cost": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}},
        endpoints=[endpoint(f"e{i}", p, max_concurrency=6, models=[model(MODEL, None, 4096)],
                            emulation={"num_gpu_blocks": 4096})
                   for i, p in enumerate(ports)],
        tenants=[tenant("plain", KEYS["plain"]),
                 tenant("budget", KEYS["budget"],
                        budgets=[{"scope": "tenant", "window": "day", "usd": 1000000.0}])],
    ))


@dataclass
class Stack:
    tmp: Path
    base: str
    config: Path
    engines: list[Proc]
    gateway: Proc
    procs: list[Proc] = field(default_factory=list)

    def start_gateway(self) -> None:
        self.gateway = Proc(["-m", "inferplane.cli", "serve", "--config", str(self.config)],
                            self.tmp / f"gw-{len(self.procs)}.log")
        self.procs.append(self.gateway)
        self.gateway.wait_http(f"{self.base}/ready")


def start(tmp: Path, engines: int = 2, redis_url: str | None = None) -> Stack:
    ports = [free_port() for _ in range(engines)]
    gw_port = free_port()
    config = tmp / "fleet.yaml"
    config.write_text(fleet(gw_port, ports, tmp, redis_url))
    procs = []
    for i, p in enumerate(ports):
        e = Proc(["-m", "inferplane.cli", "emulate", "--config", str(config), "--only", f"e{i}",
                  "--time-scale", "10"], tmp / f"e{i}.log")
        procs.append(e)
        e.wait_http(f"http://127.0.0.1:{p}/health")
    stack = Stack(tmp, f"http://127.0.0.1:{gw_port}", config, list(procs), procs[0], procs)
    stack.start_gateway()
    return stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = start(tmp_path)
    try:
        yield s
    finally:
        for p in s.procs:
            p.stop()


@dataclass
class Result:
    i: int
    started: float
    status: int | None = None  # None: the connection failed (no HTTP answer)
    decision: str | None = None
    endpoint: str | None = None
    completion_tokens: int = 0
    completed: bool = False  # a 200 whose answer arrived whole ([DONE] or a JSON body)
    error: dict[str, Any] | None = None
    exception: str | None = None


async def one(c: httpx.AsyncClient, i: int, tenant: str, stream: bool) -> Result:
    body = {"model": MODEL, "prompt": f"request {i} " + "word " * 40, "max_tokens": 64,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    res = Result(i, time.monotonic())
    try:
        async with c.stream("POST", "/v1/completions", json=body,
                            headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as r:
            res.status = r.status_code
            res.decision = r.headers.get("x-inferplane-decision-id")
            res.endpoint = r.headers.get("x-inferplane-endpoint")
            data = await r.aread()
    except httpx.HTTPError as exc:
        res.exception = type(exc).__name__
        return res
    if res.status != 200:
        res.error = orjson.loads(data)["error"]
        return res
    if not stream:
        res.completed = True
        res.completion_tokens = orjson.loads(data)["usage"]["completion_tokens"]
        return res
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            obj = orjson.loads(line[6:])
            if "error" in obj:
                res.error = obj["error"]
            elif obj.get("usage"):
                res.completion_tokens = obj["usage"]["completion_tokens"]
    res.completed = res.error is None and b"data: [DONE]" in data
    return res


async def load(base: str, n: int, tenant: str = "plain", stream: bool = True,
               during: Any = None) -> list[Result]:
    """``n`` requests, ``CONCURRENCY`` at a time; ``during(results)`` runs alongside."""
    results: list[Result] = []
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        async def run(i: int) -> None:
            async with sem:
                results.append(await one(c, i, tenant, stream))

        tasks = [asyncio.ensure_future(run(i)) for i in range(n)]
        if during is not None:
            await during(results)
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.i)


def record(base: str, decision: str, tenant: str = "plain") -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/decisions/{decision}",
                  headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=10)
    assert r.status_code == 200, (decision, r.text)
    return dict(r.json())


def usage(base: str, tenant: str = "plain") -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json()["total"])


async def _until(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_engine_killed_under_load(stack: Stack) -> None:
    """kill -9 one of two engines while 12 streams run: only streams already on it may break
    (with an OpenAI-shaped error event), everything else is re-placed and served; every request
    has a record; what was delivered is billed."""
    killed_at: list[float] = []

    async def kill_e1(results: list[Result]) -> None:
        await _until(lambda: len(results) >= N // 4)
        os.kill(stack.engines[1].p.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    results = asyncio.run(load(stack.base, N, during=kill_e1))
    assert all(r.exception is None for r in results), [r for r in results if r.exception]
    assert all((r.status is not None and r.status < 500) or r.error for r in results)
    broken = [r for r in results if not r.completed]
    for r in broken:  # a stream cut by the kill: 200, then an upstream_error event
        assert r.status == 200 and r.error is not None and r.error["type"] == "upstream_error"
        assert r.started < killed_at[0]
    print(f"\nengine kill: {len(results)} streams, {len(broken)} cut on the killed engine, "
          f"{sum(r.completed for r in results)} served")
    assert len(broken) <= CONCURRENCY
    assert {r.endpoint for r in results if r.started < killed_at[0]} == {"e0", "e1"}
    late = [r for r in results if r.started > killed_at[0]]  # re-placed before any byte
    assert late and all(r.completed for r in late)
    for r in results:
        assert r.decision is not None
        out = record(stack.base, r.decision)["outcome"]
        assert out["status"] == (200 if r.completed else 502)
    total = usage(stack.base)
    assert total["completion_tokens"] >= sum(r.completion_tokens for r in results if r.completed)
    assert total["requests"] >= sum(r.completed for r in results)
    assert "Traceback" not in stack.gateway.log.read_text()


def test_gateway_killed_and_restarted(stack: Stack) -> None:
    """kill -9 the gateway under load (non-streamed, durable SQLite ledger and local admission
    store): clients in flight see the connection fail; after a restart every request answered
    before the kill has its committed record, and its spend is still counted."""

    async def kill_gateway(results: list[Result]) -> None:
        await _until(lambda: len(results) >= N // 3)
        os.kill(stack.gateway.p.pid, signal.SIGKILL)

    results = asyncio.run(load(stack.base, N, tenant="budget", stream=False, during=kill_gateway))
    answered = [r for r in results if r.completed]
    failed = [r for r in results if r.exception is not None]
    assert answered and failed  # the kill landed mid-load
    assert all(r.status in (None, 200) for r in results), [r for r in results if r.error]
    print(f"\ngateway kill: {len(answered)} answered before the kill, {len(failed)} connections "
          "failed")
    stack.start_gateway()
    for r in answered:
        assert r.decision is not None
        assert record(stack.base, r.decision, "budget")["outcome"]["status"] == 200
    again = asyncio.run(load(stack.base, 4, tenant="budget", stream=False))
    assert all(r.completed for r in again)
    total = usage(stack.base, "budget")
    # the settle and usage are written before the answer completes (issue 12 item 8); a
    # request settled but cut by the kill before its last bytes may count too
    lost = len(answered) + len(again) - total["requests"]
    assert lost <= 0, f"{lost} of {len(answered)} answered requests lost their spend to kill -9"
    assert total["completion_tokens"] >= sum(r.completion_tokens for r in answered + again)


def test_redis_killed_under_load(tmp_path: Path) -> None:
    """Redis stops answering under load: no 500, tenants without a budget are served, budgeted
    tenants get 503 store_unavailable with Retry-After; once Redis is back, spend settled during
    the outage is replayed (nothing lost)."""
    srv = RedisServer(tmp_path)
    s = start(tmp_path, engines=1, redis_url=srv.url)
    try:
        async def outage(results: list[Result]) -> None:
            await _until(lambda: len(results) >= N // 4)
            srv.pause()
            await _until(lambda: len(results) >= N // 2)
            srv.resume()

        async def both() -> tuple[list[Result], list[Result]]:
            plain, budget = await asyncio.gather(
                load(s.base, N // 2, "plain", stream=True, during=outage),
                load(s.base, N // 2, "budget", stream=False),
            )
            return plain, budget

        plain, budget = asyncio.run(both())
        for r in plain + budget:
            assert r.exception is None and r.status is not None
            assert r.status in (200, 503), (r.status, r.error)
            if r.status == 503:
                assert r.error is not None and r.error["code"] == "store_unavailable"
        assert all(r.completed for r in plain)  # no budget: served through the outage

        served = sum(r.completed for r in plain)
        deadline = time.monotonic() + 20
        while (seen := _requests(s.base, "plain")) != served and time.monotonic() < deadline:
            time.sleep(0.1)  # the journal replays once Redis answers again
        codes = [r.status for r in plain + budget]
        print(f"\nredis outage: {codes.count(200)} x 200, {codes.count(503)} x 503 "
              f"store_unavailable, usage shows {seen} requests for {served} served")
        assert "Traceback" not in s.gateway.log.read_text()
        assert seen is not None and seen >= served, (seen, served)  # nothing lost
        # nothing counted twice: a settle journaled while Redis was paused and replayed, which
        # Redis also ran on resuming, is applied once under its settle id (issue 12 item 9)
        assert seen == served, (seen, served)
        billed = usage(s.base, "plain")
        assert billed["completion_tokens"] == sum(r.completion_tokens for r in plain)
    finally:
        for p in s.procs:
            p.stop()
        srv.stop()


def _requests(base: str, tenant: str) -> int | None:
    r = httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                  timeout=10)
    return int(r.json()["total"]["requests"]) if r.status_code == 200 else None
