"""Admission through the real gateway process: budget_exceeded shape and Retry-After, max_tokens
clamping (header and forwarded body), rate limits, loop depth, usage; and two gateway processes
sharing one Redis budget under 100 concurrent clients."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port
from tests.test_admission_concurrency import REDIS_URL, redis_reachable

KEYS = {t: f"sk-{t}" for t in ("budget", "clamp", "reject", "plain", "rate", "loop", "shared")}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
# fake upstream usage: 7 prompt + 5 completion tokens; price 1000 $/Mtok both ways → $0.012
ACTUAL = 0.012
WORST = (3 + 10) * 1000 / 1e6  # "hello there" ≈ 3 tokens + max_tokens 10


# One upstream ``up`` priced at 1000 $/Mtok both ways (`pool_fleet` arguments; the Redis outage
# tests run on it too).
PRICED_UPSTREAM: dict[str, Any] = {
    "substrate": {"name": "api", "kind": "provider-api",
                  "cost": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}},
    "endpoint_fields": {"name": "up", "max_concurrency": 256},
    "models": [model(max_context=4096)],
}


def config(gw_port: int, up_port: int, admission: dict[str, Any] | None = None) -> str:
    def t(name: str, **fields: Any) -> dict[str, Any]:
        return tenant(name, KEYS[name], **fields)

    return to_yaml(pool_fleet(
        up_port,
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "seed": 3,
                 "metrics": {"public": True, "tenant_labels": True}},
        **({} if admission is None else {"admission": admission}),
        **PRICED_UPSTREAM,
        tenants=[
            t("budget", budgets=[{"scope": "tenant", "window": "day", "usd": 0.1}]),
            t("clamp", max_tokens_ceiling=50),
            t("reject", max_tokens_ceiling=50, max_tokens_policy="reject"),
            t("plain"),
            t("rate", rate_limits=[{"scope": "key", "requests_per_min": 2}]),
            t("loop", loop={"max_agent_step": 3, "max_workflow_requests": 2}),
            t("shared", budgets=[{"scope": "tenant", "window": "day", "usd": 0.5}]),
        ],
    ))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("adm-up")
    port = free_port()
    p = Proc(["-m", "tests.support.fake_upstream", "--port", str(port), "--mode", "fast"],
             tmp / "up.log")
    try:
        p.wait_http(f"http://127.0.0.1:{port}/health")
        yield port
    finally:
        p.stop()


def start_gateway(tmp: Path, name: str, up: int,
                  admission: dict[str, Any] | None = None) -> tuple[Proc, str]:
    port = free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(config(port, up, admission))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(path)], tmp / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    gw.wait_http(f"{base}/ready")
    return gw, base


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[str]:
    gw, base = start_gateway(tmp_path_factory.mktemp("adm-gw"), "gw", upstream)
    try:
        yield base
    finally:
        gw.stop()
        assert "Traceback" not in gw.log.read_text(), gw.log.read_text()


def post(base: str, tenant: str, body: object, headers: dict[str, str] | None = None
         ) -> httpx.Response:
    h = {"Authorization": f"Bearer {KEYS[tenant]}", **(headers or {})}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=h, timeout=10)


def error(r: httpx.Response, status: int) -> dict[str, str]:
    assert r.status_code == status, r.text
    err: dict[str, str] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_budget_exceeded_is_429_with_reset_and_retry_after(gateway: str) -> None:
    statuses = []
    for _ in range(12):
        r = post(gateway, "budget", {**CHAT, "max_tokens": 10})
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    # $0.1 a day, $0.012 actual each, $0.013 reserved: the 9th cannot reserve
    assert statuses == [200] * 8 + [429]
    err = error(r, 429)
    assert err["type"] == "budget_exceeded" and err["code"] == "budget_exceeded"
    assert "resets at" in err["message"] and "day" in err["message"]
    assert 0 < int(r.headers["Retry-After"]) <= 86400


def test_max_tokens_clamped_and_forwarded(gateway: str, upstream: int) -> None:
    def forwarded() -> int:
        return int(httpx.get(f"http://127.0.0.1:{upstream}/stats").json()["last_max_tokens"])

    r = post(gateway, "clamp", {**CHAT, "max_tokens": 100})
    assert r.status_code == 200 and r.headers["x-inferplane-max-tokens-clamped"] == "100->50"
    assert forwarded() == 50
    r = post(gateway, "clamp", CHAT)  # the class default (1024) is capped too, silently
    assert r.status_code == 200 and "x-inferplane-max-tokens-clamped" not in r.headers
    assert forwarded() == 50
    r = post(gateway, "plain", CHAT)  # no max_tokens: the class default is forwarded
    assert forwarded() == 1024
    r = post(gateway, "plain", {**CHAT, "max_tokens": 7})
    assert forwarded() == 7 and "x-inferplane-max-tokens-clamped" not in r.headers
    err = error(post(gateway, "reject", {**CHAT, "max_tokens": 100}), 400)
    assert err["param"] == "max_tokens" and "ceiling of 50" in err["message"]


def test_rate_limit_429_with_retry_after(gateway: str) -> None:
    codes = [post(gateway, "rate", {**CHAT, "max_tokens": i + 1}) for i in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert error(codes[2], 429)["code"] == "rate_limit_exceeded"
    assert int(codes[2].headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"x-inferplane-agent-step": "4"}, "x-inferplane-agent-step"),
        ({"x-inferplane-workflow": "bad workflow"}, "x-inferplane-workflow"),
        ({"Idempotency-Key": ""}, "Idempotency-Key"),
    ],
)
def test_loop_depth_and_bad_headers_are_400(
    gateway: str, headers: dict[str, str], param: str
) -> None:
    err = error(post(gateway, "loop", CHAT, headers), 400)
    assert err["param"] == param and param in err["message"]


def test_workflow_request_limit(gateway: str) -> None:
    h = {"x-inferplane-workflow": "wf-loop", "x-inferplane-agent-step": "1"}
    codes = [post(gateway, "loop", {**CHAT, "max_tokens": i + 1}, h).status_code
             for i in range(3)]
    assert codes == [200, 200, 400]


def test_usage_by_workflow_is_the_tenants_own(gateway: str) -> None:
    for wf in ("wf-a", "wf-a", "wf-b"):
        post(gateway, "plain", {**CHAT, "max_tokens": 3, "n": 1},
             {"x-inferplane-workflow": wf, "Idempotency-Key": os.urandom(4).hex()})
    auth = {"Authorization": f"Bearer {KEYS['plain']}"}
    u = httpx.get(f"{gateway}/v1/usage?group_by=workflow", headers=auth).json()
    rows = {row["workflow"]: row for row in u["data"]}
    assert rows["wf-a"]["requests"] == 2 and rows["wf-b"]["requests"] == 1
    assert rows["wf-a"]["cost_usd"] == pytest.approx(2 * ACTUAL)
    assert u["tenant"] == "plain"
    other = httpx.get(f"{gateway}/v1/usage?group_by=workflow",
                      headers={"Authorization": f"Bearer {KEYS['clamp']}"}).json()
    assert "wf-a" not in {row["workflow"] for row in other["data"]}
    bad = httpx.get(f"{gateway}/v1/usage?group_by=colour", headers=auth)
    assert error(bad, 400)["param"] == "group_by"
    m = httpx.get(f"{gateway}/metrics").text
    assert 'inferplane_tenant_cost_usd_total{tenant="plain",workload_class="interactive"}' in m
    assert "wf-a" not in m  # workflows are never a metric label


def test_two_gateways_share_one_redis_budget(
    tmp_path_factory: pytest.TempPathFactory, upstream: int
) -> None:
    if not redis_reachable():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    prefix = f"inferplane-it-{os.getpid()}-{random.randrange(1 << 30)}:"
    adm = {"store": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix}
    tmp = tmp_path_factory.mktemp("adm-redis")
    procs = []
    try:
        for name in ("g1", "g2"):
            procs.append(start_gateway(tmp, name, upstream, adm))
        bases = [b for _, b in procs]

        async def run() -> list[int]:
            async with httpx.AsyncClient(timeout=20) as c:
                async def one(i: int) -> int:
                    r = await c.post(f"{bases[i % 2]}/v1/chat/completions",
                                     json={**CHAT, "max_tokens": 10},
                                     headers={"Authorization": f"Bearer {KEYS['shared']}",
                                              "Idempotency-Key": f"k{i}"})
                    return r.status_code
                return await asyncio.gather(*(one(i) for i in range(100)))

        codes = asyncio.run(run())
        ok = codes.count(200)
        assert set(codes) <= {200, 429} and 0 < ok < 100

        async def spent() -> tuple[float, float]:
            import redis.asyncio as aioredis

            r = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
            keys = [k async for k in r.scan_iter(match=f"{prefix}c:budget:shared:*")]
            assert len(keys) == 1
            su, ru = await r.hmget(keys[0], ["su", "ru"])
            await r.delete(*[k async for k in r.scan_iter(match=prefix + "*")])
            await r.aclose()
            return int(su) / 1e9, int(ru or 0) / 1e9

        total, reserved = asyncio.run(spent())
        assert reserved == 0.0
        assert total == pytest.approx(ok * ACTUAL)
        assert total <= 0.5 + WORST  # overspend bounded by one request's reservation
    finally:
        for p, _ in procs:
            p.stop()
